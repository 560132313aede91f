#!/usr/bin/env bash
# The no-Docker path: the same processes, ports and environment variables as compose.yaml,
# on the host's loopback. `./run.sh` starts everything and stops everything on Ctrl-C.
# demo.sh sources this file for the same functions and settings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-../.venv/bin/python}
export MODEL_DIR=${MODEL_DIR:-../models}
SETOSA_PORT=${SETOSA_PORT:-8000}
VERSICOLOR_PORT=${VERSICOLOR_PORT:-8001}
VIRGINICA_PORT=${VIRGINICA_PORT:-8002}
PROXY_PORT=${PROXY_PORT:-9000}
SERVICE_TIMEOUT_S=${SERVICE_TIMEOUT_S:-1.0}
declare -A PORT_OF=([setosa]=$SETOSA_PORT [versicolor]=$VERSICOLOR_PORT [virginica]=$VIRGINICA_PORT)
declare -A PID_OF=()

start_service() {  # start_service MODE
    MODE=$1 PORT=${PORT_OF[$1]} "$PYTHON" service.py &
    PID_OF[$1]=$!
}

start_proxy() {
    local services="setosa=http://127.0.0.1:$SETOSA_PORT"
    services+=",versicolor=http://127.0.0.1:$VERSICOLOR_PORT"
    services+=",virginica=http://127.0.0.1:$VIRGINICA_PORT"
    SERVICES=$services SERVICE_TIMEOUT_S=$SERVICE_TIMEOUT_S PORT=$PROXY_PORT "$PYTHON" proxy.py &
    PID_OF[proxy]=$!
}

stop_all() {  # only the processes this script started, by their pid
    local pid
    for pid in "${PID_OF[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

check_ports_free() {
    local port
    for port in "$SETOSA_PORT" "$VERSICOLOR_PORT" "$VIRGINICA_PORT" "$PROXY_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is already in use: stop what listens there, or set *_PORT" >&2
            return 1
        fi
    done
}

wait_healthy() {  # wait_healthy PORT...
    local port
    for port in "$@"; do
        for _ in $(seq 600); do
            curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && continue 2
            sleep 0.1
        done
        echo "nothing healthy on port $port after 60 s" >&2
        return 1
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    check_ports_free
    trap stop_all EXIT
    trap 'exit 130' INT TERM
    for mode in setosa versicolor virginica; do start_service "$mode"; done
    start_proxy
    wait
fi
