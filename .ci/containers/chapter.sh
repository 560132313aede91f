#!/usr/bin/env bash
# One chapter's compose stack for real:  .ci/containers/chapter.sh 02_asynchronous
# Under a private engine (starts one with engine.sh unless DOCKER_HOST already names one):
#   1. the official images, or their stand-ins (images.sh),
#   2. `up -d --build --wait --pull never`, then every service must be running and healthy,
#   3. the chapter's own container checks: `pytest -m containers tests/test_containers.py`, which
#      runs the README walkthrough (demo.sh) against the stack, then the pattern's fault checks,
#   4. `down -v --remove-orphans`, always, also when a step failed.
# Ports are published on 127.0.0.1 with host ports the engine picks (EPHEMERAL_PORTS=1), so this
# never clashes with a local Redis or server; the checks find them with `$COMPOSE port SERVICE N`.
# The checks get COMPOSE (a command prefix for this stack: `$COMPOSE ps`, `$COMPOSE exec ...`)
# and the stack's passwords (REDIS_PASSWORD, MYSQL_PASSWORD, MYSQL_ROOT_PASSWORD) in the environment.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
[ $# -eq 1 ] && [ -f "$1/compose.yaml" ] || { echo "usage: $0 CHAPTER_DIR" >&2; exit 2; }
if [ -z "${DOCKER_HOST:-}" ]; then exec "$here/engine.sh" "$0" "$@"; fi
chapter=$(cd "$1" && pwd)
name=$(basename "$chapter")
say() { printf '\n=== %s: %s (%ss)\n' "$name" "$*" "$SECONDS"; }
# One run per chapter at a time: two runs would share one compose project and wreck each other.
exec 8>"/run/lock/ml-serving-patterns-$name.lock"
flock 8

say "images"
"$here/images.sh"

# The compose files take their passwords from the environment (a user's .env): fresh ones per run.
for v in REDIS_PASSWORD MYSQL_PASSWORD MYSQL_ROOT_PASSWORD; do
  [ -n "${!v:-}" ] || export "$v=$(head -c 18 /dev/urandom | base64 | tr '+/' 'xy')"
done
export EPHEMERAL_PORTS=1 COMPOSE_PROJECT_NAME="mlsp-${name//_/-}"
export COMPOSE="$here/compose.sh -f $chapter/compose.yaml"
compose() { $COMPOSE "$@"; }
finish() {
  local rc=$?
  trap - EXIT
  if [ $rc -ne 0 ]; then
    say "FAILED: the stack's state and its last log lines"
    compose ps -a || true
    compose logs --no-color --tail 40 || true
  fi
  say "down"
  compose down -v --remove-orphans || rc=1
  exit $rc
}
trap finish EXIT

say "up --build --wait"
compose up -d --build --wait --pull never
# `up --wait` has been seen to return 0 with a container that failed to start: check each one.
compose ps -a --format json | python3 -c '
import json, sys
bad = []
for line in sys.stdin:
    c = json.loads(line) if line.strip() else None
    if not c:
        continue
    ok = (c["State"] == "running" and c.get("Health", "") in ("", "healthy")) or (
        c["State"] == "exited" and c.get("ExitCode") == 0)
    print("  %-20s %-8s %-9s %s" % (c["Service"], c["State"], c.get("Health") or "-", c["Image"]))
    if not ok:
        bad.append(c["Service"])
sys.exit(f"not healthy: {bad}" if bad else 0)
'
compose images

say "container checks"
cd "$chapter"
"$repo/.venv/bin/python" -m pytest -q -m containers tests/test_containers.py
