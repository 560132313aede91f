#!/usr/bin/env bash
# Makes every official image the compose files name available in the private engine (run it
# under engine.sh, which sets DOCKER_HOST):
#   .ci/containers/engine.sh .ci/containers/images.sh [IMAGE...]
# For each image: present already -> used as it is; else with PULL=1 -> pulled; else a stand-in
# is built under that exact name and tag from Debian's packages (see README.md). Prints, for
# every image, whether it is the real one or a stand-in, what it was built from, and its size.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export DOCKER_BUILDKIT=0 # the classic builder: no buildx needed, and it never pulls a local base
BASE=ml-serving-patterns/debian-standin:bookworm
STANDIN_LABEL=org.ml-serving-patterns.stand-in
IMAGES=(python:3.11-slim redis:7.4.1-alpine mysql:8.0.40 tensorflow/serving:2.18.0 prom/prometheus:v3.5.0)
[ $# -gt 0 ] && IMAGES=("$@")

say() { echo "images.sh: $*"; }
case ${DOCKER_HOST:-} in
  unix:///var/run/docker.sock | unix:///run/docker.sock | "")
    say "DOCKER_HOST must name a private engine: run me under .ci/containers/engine.sh" >&2
    exit 2 ;;
esac
work=$(mktemp -d /tmp/mlsp-images.XXXXXX)
trap 'rm -rf --one-file-system "$work"' EXIT

# The stand-in's directory under .ci/containers/ for each official image.
standin_dir() {
  case $1 in
    python:*) echo python ;;
    redis:*) echo redis ;;
    mysql:*) echo mysql ;;
    tensorflow/serving:*) echo tfserving ;;
    prom/prometheus:*) echo prometheus ;;
    *) return 1 ;;
  esac
}

present() { docker image inspect "$1" >/dev/null 2>&1; }

# "URI SUITE" for each Debian bookworm source of the machine (one-line and deb822 formats), so
# the mirror comes from the machine's own apt configuration and is written in no file here.
apt_sources() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
                       print $i, $(i + 1) }'
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk 'function flush() { if (types ~ /(^| )deb( |$)/) { n = split(uris, u, " "); m = split(suites, s, " ");
                              for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print u[i], s[j] }
                            types = uris = suites = "" }
         /^#/ { next } /^[ \t]*$/ { flush(); next }
         { key = tolower($1); sub(/^[^:]*:[ \t]*/, "") }
         key == "types:" { types = $0 } key == "uris:" { uris = $0 } key == "suites:" { suites = $0 }
         END { flush() }'
}

# The Debian base of every stand-in: debootstrap (minbase) from the machine's mirror, imported.
build_base() {
  present "$BASE" && return 0
  local sources mirror root=$work/rootfs t=$SECONDS
  sources=$(apt_sources | awk '$2 ~ /^bookworm(-updates|-security)?$/' | sort -u)
  mirror=$(awk '$2 == "bookworm" {print $1; exit}' <<<"$sources")
  [ -n "$mirror" ] || { say "no Debian bookworm source in this machine's apt configuration" >&2; return 1; }
  say "debootstrap bookworm (minbase) from the machine's Debian mirror"
  debootstrap --variant=minbase --components=main bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; return 1; }
  awk '{print "deb", $1, $2, "main"}' <<<"$sources" >"$root/etc/apt/sources.list"
  # As Debian's own container images: no service starts in builds, no docs, no recommends.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
    >"$root/etc/dpkg/dpkg.cfg.d/docker-slim"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$root/etc/apt/apt.conf.d/docker-slim"
  # The machine's CA bundle: apt and pip inside builds trust what the host trusts.
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,info}/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/tmp/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar -C "$root" --numeric-owner -c . |
    docker import --change 'CMD ["bash"]' --change "LABEL $STANDIN_LABEL=\"Debian bookworm minbase (debootstrap)\"" \
      - "$BASE" >/dev/null
  rm -rf --one-file-system "$root"
  say "built $BASE in $((SECONDS - t)) s"
}

build_standin() { # image
  local image=$1 dir ctx t
  dir=$(standin_dir "$image") || { say "no stand-in for $image" >&2; return 1; }
  build_base
  ctx=$work/$dir
  cp -a "$here/$dir/." "$ctx/"
  case $dir in
    python) cp /etc/ssl/certs/ca-certificates.crt "$ctx/" ;;
    tfserving)
      ensure python:3.11-slim
      mkdir -p "$ctx/app"
      cp "$repo"/01_synchronous/*.py "$repo/01_synchronous/requirements.txt" "$ctx/app/"
      rm -f "$ctx/app/bench.py" ;;
  esac
  t=$SECONDS
  say "building stand-in $image from .ci/containers/$dir/"
  if ! docker build --pull=false -t "$image" "$ctx" >"$work/$dir.log" 2>&1; then
    tail -n 30 "$work/$dir.log" >&2
    return 1
  fi
  say "built $image in $((SECONDS - t)) s"
}

ensure() { # image
  present "$1" && return 0
  if [ "${PULL:-0}" = 1 ] && docker pull -q "$1" >/dev/null; then
    say "pulled $1"
    return 0
  fi
  build_standin "$1"
}

for image in "${IMAGES[@]}"; do ensure "$image"; done

printf '\n%-28s %-9s %9s  %s\n' IMAGE KIND SIZE "BUILT FROM"
for image in "${IMAGES[@]}"; do
  from=$(docker image inspect -f "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$image" 2>/dev/null || true)
  size=$(docker image inspect -f '{{.Size}}' "$image")
  if [ -n "$from" ]; then kind=stand-in; else kind=real from="the official image"; fi
  printf '%-28s %-9s %6d MB  %s\n' "$image" "$kind" $((size / 1000000)) "$from"
done
