#!/usr/bin/env bash
# The README's walkthrough, for real: start three services and the proxy, make the requests,
# stop one service to show a partial answer, bring it back, stop everything.
# Exits non-zero if any answer has an unexpected HTTP status. Run it via `make demo`.
set -euo pipefail
source "$(dirname "$0")/run.sh"

LOGS=$(mktemp)
failed=0
cleanup() {
    stop_all
    if [[ $failed -ne 0 ]]; then echo "--- process logs:"; tail -n 40 "$LOGS"; fi
    rm -f "$LOGS"
}
trap cleanup EXIT

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

check_ports_free
echo "# starting setosa:$SETOSA_PORT versicolor:$VERSICOLOR_PORT virginica:$VIRGINICA_PORT" \
    "proxy:$PROXY_PORT (logs to a temp file)"
for mode in setosa versicolor virginica; do start_service "$mode" >>"$LOGS" 2>&1; done
start_proxy >>"$LOGS" 2>&1
wait_healthy "$SETOSA_PORT" "$VERSICOLOR_PORT" "$VIRGINICA_PORT" "$PROXY_PORT" || {
    failed=1
    exit 1
}
echo

ROW='{"data": [[6.5, 3.0, 5.5, 2.0]]}'
P=http://127.0.0.1:$PROXY_PORT

echo "## each service on its own"
show 200 GET "http://127.0.0.1:$SETOSA_PORT/health"
show 200 POST "http://127.0.0.1:$SETOSA_PORT/predict" "$ROW"
show 200 POST "http://127.0.0.1:$VERSICOLOR_PORT/predict" "$ROW"
show 200 GET "http://127.0.0.1:$VIRGINICA_PORT/predict/test"

echo "## the proxy: every service at once"
show 200 GET "$P/health/all"
show 200 POST "$P/predict" "$ROW"
show 200 POST "$P/predict/label" "$ROW"
show 200 POST "$P/predict/label" '{"data": [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5]]}'
show 200 GET "$P/predict/get/test"
show 422 POST "$P/predict/label" '{"data": [[6.5, 3.0, 5.5]]}'

echo "## stop virginica (SIGKILL): the others still answer, the missing one is named"
kill -KILL "${PID_OF[virginica]}"
wait "${PID_OF[virginica]}" 2>/dev/null || true
show 200 POST "$P/predict" "$ROW"
show 200 POST "$P/predict/label" "$ROW"
show 200 GET "$P/health/all"
echo "# the detail, with the address, is in the proxy's log only (its last warning):"
grep '"logger": "proxy"' "$LOGS" | tail -n 1
echo

echo "## virginica back: full answers again"
start_service virginica >>"$LOGS" 2>&1
wait_healthy "$VIRGINICA_PORT" || failed=1
show 200 POST "$P/predict/label" "$ROW"

if [[ $failed -ne 0 ]]; then echo "demo: FAILED" >&2; exit 1; fi
echo "demo: ok"
