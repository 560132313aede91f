#!/usr/bin/env bash
# A private Docker Engine for one command:  .ci/containers/engine.sh <command...>
# Starts containerd and dockerd with their own state, sockets and bridge under a temporary
# directory (never the system's default socket or another engine's state), waits until the engine
# answers, runs the command with DOCKER_HOST pointing at it, then stops everything and cleans up,
# also when the command fails or on Ctrl-C. Exits with the command's status.
#   ENGINE_DIR=DIR  keep images and build cache in DIR between local runs (CI: unset, fresh each run)
#   PULL=1          let the engine pull from registries; otherwise its registry traffic goes to a
#                   closed loopback port, so no pull ever leaves the machine
# Published ports bind to 127.0.0.1 unless a compose file names another address.
# Needs root, dockerd, containerd (install.sh installs them). One private engine at a time.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 <command...>" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
say() { echo "engine.sh: $*" >&2; }

# The bridge and its address are fixed, so the lock keeps two private engines from sharing them.
BRIDGE=mlsp0
BRIDGE_CIDR=${ENGINE_BRIDGE_CIDR:-172.31.254.1/24}
exec 9>/run/lock/ml-serving-patterns-engine.lock
flock -n 9 || { say "another private engine is running (lock held)"; exit 1; }

# Sockets live in a short fresh directory (unix socket paths are limited to 108 bytes).
run=$(mktemp -d /tmp/mlsp-engine.XXXXXX)
if [ -n "${ENGINE_DIR:-}" ]; then
  mkdir -p "$ENGINE_DIR"
  data=$(cd "$ENGINE_DIR" && pwd)
  keep_data=1
else
  data=$run/data
  keep_data=0
fi
mkdir -p "$data/docker" "$data/containerd" "$run/exec" "$run/containerd" "$run/config/cli-plugins"
ip_forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
dockerd_pid="" containerd_pid="" bridge_made=0

stop_pid() { # pid seconds: TERM, wait, then KILL
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < $2 * 10; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  say "pid $pid still running after $2 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid m
  trap - EXIT INT TERM
  set +e
  # dockerd stops its containers on SIGTERM (within --shutdown-timeout), then exits.
  stop_pid "$dockerd_pid" 60
  # Container shims that outlived it, found by our containerd's socket in their argv.
  for pid in /proc/[0-9]*; do
    [[ $(cat "$pid/comm" 2>/dev/null) == containerd-shim* ]] || continue
    [[ $(tr '\0' ' ' <"$pid/cmdline" 2>/dev/null) == *"$run/containerd.sock"* ]] || continue
    say "left-over shim ${pid#/proc/}: SIGKILL"
    kill -KILL "${pid#/proc/}" 2>/dev/null
  done
  stop_pid "$containerd_pid" 20
  # Unmount whatever is still mounted under our directories, deepest first, before deleting.
  for m in $(awk -v a="$run/" -v b="$data/" 'index($5, a) == 1 || index($5, b) == 1 {print $5}' \
    /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  [ $bridge_made = 1 ] && ip link delete "$BRIDGE" 2>/dev/null
  echo "$ip_forward_before" >/proc/sys/net/ipv4/ip_forward
  if awk -v a="$run/" -v b="$data/" 'index($5, a) == 1 || index($5, b) == 1 {f = 1} END {exit !f}' \
    /proc/self/mountinfo; then
    say "mounts remain under $run or $data: not deleting them"
  else
    rm -rf --one-file-system "$run"
    [ $keep_data = 1 ] || rm -rf --one-file-system "$data"
  fi
  [ $keep_data = 1 ] && say "images kept in ENGINE_DIR=$data"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Our own containerd: dockerd would otherwise use a system one at /run/containerd if it exists.
cat >"$run/containerd.toml" <<EOF
version = 2
root = "$data/containerd"
state = "$run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$data/containerd/opt"
EOF
setsid containerd --config "$run/containerd.toml" >"$run/containerd.log" 2>&1 </dev/null &
containerd_pid=$!

if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  bridge_made=1
  ip addr add "$BRIDGE_CIDR" dev "$BRIDGE"
  ip link set "$BRIDGE" up
fi
# The bridge's MTU follows the default route's interface: larger packets stall TLS to registries.
mtu=$(ip route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1); exit}' |
  xargs -r -I{} cat /sys/class/net/{}/mtu)
echo '{}' >"$run/daemon.json"

proxy_env=()
if [ "${PULL:-0}" != 1 ]; then
  # Any registry request (pull, or a build resolving a base image) fails at once, on loopback.
  proxy_env=(HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=)
fi
for _ in $(seq 100); do [ -S "$run/containerd.sock" ] && break; sleep 0.1; done
env "${proxy_env[@]}" setsid dockerd \
  --config-file "$run/daemon.json" \
  --data-root "$data/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
  --host "unix://$run/docker.sock" --containerd "$run/containerd.sock" \
  --bridge "$BRIDGE" --mtu "${mtu:-1500}" --ip 127.0.0.1 --shutdown-timeout 10 \
  >"$run/dockerd.log" 2>&1 </dev/null &
dockerd_pid=$!

export DOCKER_HOST="unix://$run/docker.sock"
# A client config of our own: no credential helpers or settings from ~/.docker, and Compose v2
# as the `docker compose` plugin when only its standalone binary is installed.
export DOCKER_CONFIG=$run/config
compose_bin=$(command -v docker-compose || true)
[ -x "$repo/.venv/bin/docker-compose" ] && compose_bin=$repo/.venv/bin/docker-compose
[ -n "$compose_bin" ] && ln -s "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"

for i in $(seq 600); do
  docker version >/dev/null 2>&1 && break
  if ! kill -0 "$dockerd_pid" 2>/dev/null || ! kill -0 "$containerd_pid" 2>/dev/null || [ "$i" = 600 ]; then
    say "the engine did not start; its logs:"
    tail -n 30 "$run/containerd.log" "$run/dockerd.log" >&2
    exit 1
  fi
  sleep 0.1
done
say "engine $(docker version -f '{{.Server.Version}}') ready at $DOCKER_HOST ($SECONDS s, data in $data)"

set +e
"$@"
rc=$?
set -e
exit "$rc"
