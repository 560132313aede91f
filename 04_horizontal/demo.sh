#!/usr/bin/env bash
# The README's walkthrough, for real: make the requests, stop one service to show a partial
# answer, bring it back. Exits non-zero if any answer has an unexpected HTTP status.
#   make demo                            starts three services and the proxy on the host, and
#                                        stops them at the end (run.sh's functions)
#   COMPOSE="docker compose" ./demo.sh   against a compose stack that is already up: the
#                                        addresses come from `$COMPOSE port`, nothing is started
#                                        but the virginica container it stops and starts again
set -euo pipefail
cd "$(dirname "$0")"
failed=0

if [[ -n ${COMPOSE:-} ]]; then
    url_of() { echo "http://$($COMPOSE port "$1" "$2")"; }
    SETOSA=$(url_of service_setosa 8000)
    VERSICOLOR=$(url_of service_versicolor 8001)
    VIRGINICA=$(url_of service_virginica 8002)
    P=$(url_of proxy 9000)
    # `kill` is a manual stop for Docker: the restart policy leaves the container down.
    stop_virginica() { $COMPOSE kill service_virginica >/dev/null 2>&1; }
    start_virginica() { $COMPOSE start service_virginica >/dev/null 2>&1; }
    proxy_log() { $COMPOSE logs --no-color --no-log-prefix proxy; }
    echo "# against the compose stack: proxy $P"
else
    source ./run.sh
    LOGS=$(mktemp)
    cleanup() {
        stop_all
        if [[ $failed -ne 0 ]]; then echo "--- process logs:"; tail -n 40 "$LOGS"; fi
        rm -f "$LOGS"
    }
    trap cleanup EXIT
    stop_virginica() {
        kill -KILL "${PID_OF[virginica]}"
        wait "${PID_OF[virginica]}" 2>/dev/null || true
    }
    start_virginica() { start_service virginica >>"$LOGS" 2>&1; }
    proxy_log() { grep '"logger": "proxy"' "$LOGS"; }
    check_ports_free
    echo "# starting setosa:$SETOSA_PORT versicolor:$VERSICOLOR_PORT virginica:$VIRGINICA_PORT" \
        "proxy:$PROXY_PORT (logs to a temp file)"
    for mode in setosa versicolor virginica; do start_service "$mode" >>"$LOGS" 2>&1; done
    start_proxy >>"$LOGS" 2>&1
    wait_healthy "$SETOSA_PORT" "$VERSICOLOR_PORT" "$VIRGINICA_PORT" "$PROXY_PORT" || {
        failed=1
        exit 1
    }
    SETOSA=http://127.0.0.1:$SETOSA_PORT
    VERSICOLOR=http://127.0.0.1:$VERSICOLOR_PORT
    VIRGINICA=http://127.0.0.1:$VIRGINICA_PORT
    P=http://127.0.0.1:$PROXY_PORT
fi
echo

# show EXPECTED_STATUS METHOD URL [BODY] (a GET has no body): print the request as a curl command, then the answer.
show() {
    local expected=$1 method=$2 url=$3 body=${4:-} answer status
    if [[ -n $body ]]; then
        echo "\$ curl -s -X $method $url -H 'Content-Type: application/json' -d '$body'"
        answer=$(curl -s -w '\n%{http_code}' -X "$method" "$url" \
            -H 'Content-Type: application/json' -d "$body")
    else
        echo "\$ curl -s $url"
        answer=$(curl -s -w '\n%{http_code}' "$url")
    fi
    status=${answer##*$'\n'}
    echo "${answer%$'\n'*}"
    echo "(HTTP $status)"
    echo
    if [[ $status != "$expected" ]]; then
        echo "UNEXPECTED: wanted HTTP $expected" >&2
        failed=1
    fi
}

virginica_back() {  # as the proxy sees it: healthy again within 60 s
    for _ in $(seq 600); do
        curl -s "$P/health/all" | grep -q '"virginica":{"health":"ok"}' && return 0
        sleep 0.1
    done
    echo "virginica not back after 60 s" >&2
    return 1
}

ROW='{"data": [[6.5, 3.0, 5.5, 2.0]]}'

echo "## each service on its own"
show 200 GET "$SETOSA/health"
show 200 POST "$SETOSA/predict" "$ROW"
show 200 POST "$VERSICOLOR/predict" "$ROW"
show 200 GET "$VIRGINICA/predict/test"

echo "## the proxy: every service at once"
show 200 GET "$P/health/all"
show 200 POST "$P/predict" "$ROW"
show 200 POST "$P/predict/label" "$ROW"
show 200 POST "$P/predict/label" '{"data": [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5]]}'
show 200 GET "$P/predict/get/test"
show 422 POST "$P/predict/label" '{"data": [[6.5, 3.0, 5.5]]}'

echo "## stop virginica (SIGKILL): the others still answer, the missing one is named"
stop_virginica
show 200 POST "$P/predict" "$ROW"
show 200 POST "$P/predict/label" "$ROW"
show 200 GET "$P/health/all"
echo "# the detail, with the address, is in the proxy's log only (its last warning):"
proxy_log | grep '"level": "WARNING"' | tail -n 1
echo

echo "## virginica back: full answers again"
start_virginica
virginica_back || failed=1
show 200 POST "$P/predict/label" "$ROW"

if [[ $failed -ne 0 ]]; then echo "demo: FAILED" >&2; exit 1; fi
echo "demo: ok"
