#!/usr/bin/env bash
# docker compose, with every port the compose file publishes bound to 127.0.0.1 only:
#   .ci/containers/compose.sh -f 02_asynchronous/compose.yaml up -d --build --wait
# Compose sends "8000:8000" to the engine as 0.0.0.0:8000, so dockerd's --ip default does not
# apply; an override made from the file's own resolved configuration republishes each port on
# loopback (same host port, same container port). The chapter's files are only read.
#   EPHEMERAL_PORTS=1  publish on 127.0.0.1 with a host port the engine picks, so stacks and
#                      servers running side by side never clash (find it: `compose.sh ... port`)
set -euo pipefail
[ "${1:-}" = -f ] && [ -n "${2:-}" ] || { echo "usage: $0 -f COMPOSE_FILE ARGS..." >&2; exit 2; }
file=$2
shift 2
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
else compose=("$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/docker-compose"); fi
override=$(mktemp /tmp/mlsp-compose.XXXXXX.yaml)
trap 'rm -f "$override"' EXIT
"${compose[@]}" -f "$file" --profile '*' config --format json | EPHEMERAL_PORTS=${EPHEMERAL_PORTS:-0} python3 -c '
import json, os, sys
ephemeral = os.environ["EPHEMERAL_PORTS"] == "1"
services = json.load(sys.stdin)["services"]
print("services: {}" if not any(s.get("ports") for s in services.values()) else "services:")
for name, svc in services.items():
    if not svc.get("ports"):
        continue
    ports = [dict(p, host_ip="127.0.0.1") for p in svc["ports"]]
    if ephemeral:
        ports = [{k: v for k, v in p.items() if k != "published"} for p in ports]
    print(f"  {name}:\n    ports: !override {json.dumps(ports)}")
' >"$override"
"${compose[@]}" -f "$file" -f "$override" "$@"
