#!/usr/bin/env bash
# The no-Docker path: the same processes, ports and environment variables as compose.yaml, on
# the host's loopback. Redis is the one already running (REDIS_URL); TensorFlow Serving is
# chapter 01's local stand-in, run as a program. `./run.sh` starts everything and stops
# everything on Ctrl-C. demo.sh sources this file for the same functions and settings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-../.venv/bin/python}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export TF_SERVING_HOST=127.0.0.1
export TF_SERVING_GRPC_PORT=${TF_SERVING_GRPC_PORT:-8500}
export TF_SERVING_REST_PORT=${TF_SERVING_REST_PORT:-8501}
export MODEL_NAME=iris
export LABELS_PATH=../models/label.json
export HOST=127.0.0.1
export PORT=${PORT:-8000}
# compose.yaml runs 2 worker replicas of NUM_WORKERS=1; here one command runs both processes.
export NUM_WORKERS=${NUM_WORKERS:-2}
export BATCH_SIZE=${BATCH_SIZE:-32}
export TF_CPP_MIN_LOG_LEVEL=2
declare -A PID_OF=()

start_tf_serving() {
    "$PYTHON" ../01_synchronous/local_serving.py --port="$TF_SERVING_GRPC_PORT" \
        --rest_api_port="$TF_SERVING_REST_PORT" --model_name=iris --model_base_path=../models/iris &
    PID_OF[tf_serving]=$!
}

start_proxy() {
    "$PYTHON" proxy.py &
    PID_OF[proxy]=$!
}

start_worker() {
    "$PYTHON" worker.py &
    PID_OF[worker]=$!
}

stop() {  # stop NAME: only a process this script started, by its pid
    kill "${PID_OF[$1]}" 2>/dev/null || true
    wait "${PID_OF[$1]}" 2>/dev/null || true
}

stop_all() {
    local name
    for name in worker proxy tf_serving; do
        [[ -n ${PID_OF[$name]:-} ]] && stop "$name"
    done
    return 0
}

check_ports_free() {
    local port
    for port in "$TF_SERVING_GRPC_PORT" "$TF_SERVING_REST_PORT" "$PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is already in use: stop what listens there, or set the *_PORT variables" >&2
            return 1
        fi
    done
}

# REDIS_URL and REDIS_PASSWORD are read from the environment by Python and redis-cli alone:
# never put on a command line (ps shows it) nor printed.
redis_where() {  # host:port/db of REDIS_URL, without a password: safe to print
    "$PYTHON" -c 'import os, urllib.parse as u; p = u.urlsplit(os.environ["REDIS_URL"])
print(f"{p.hostname}:{p.port or 6379}", p.path or "/0", sep="")'
}

redis_cli() {  # redis-cli on REDIS_URL's database; the password goes in as REDISCLI_AUTH
    local host port db password
    read -r host port db password < <("$PYTHON" -c 'import os, urllib.parse as u
p = u.urlsplit(os.environ["REDIS_URL"])
pw = os.environ.get("REDIS_PASSWORD") or u.unquote(p.password or "")
print(p.hostname, p.port or 6379, p.path.strip("/") or 0, pw)')
    if [[ -n $password ]]; then
        REDISCLI_AUTH=$password redis-cli -h "$host" -p "$port" -n "$db" "$@"
    else
        redis-cli -h "$host" -p "$port" -n "$db" "$@"
    fi
}

check_redis() {
    "$PYTHON" -c 'import os, redis
redis.Redis.from_url(os.environ["REDIS_URL"], password=os.environ.get("REDIS_PASSWORD")).ping()' \
        2>/dev/null || {
        echo "no Redis at $(redis_where) (or a wrong password): start one (redis-server)" >&2
        return 1
    }
}

wait_tf_serving() {  # like compose's healthcheck + depends_on: the model must be AVAILABLE
    for _ in $(seq 1200); do
        curl -fsS "http://127.0.0.1:$TF_SERVING_REST_PORT/v1/models/iris" 2>/dev/null |
            grep -q AVAILABLE && return 0
        sleep 0.1
    done
    echo "TensorFlow Serving not AVAILABLE on port $TF_SERVING_REST_PORT after 120 s" >&2
    return 1
}

wait_healthy() {
    for _ in $(seq 600); do
        curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "proxy not healthy on port $PORT after 60 s" >&2
    return 1
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    check_ports_free
    check_redis
    trap stop_all EXIT
    trap 'exit 130' INT TERM
    start_tf_serving
    wait_tf_serving
    start_proxy
    start_worker
    wait
fi
