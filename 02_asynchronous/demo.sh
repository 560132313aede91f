#!/usr/bin/env bash
# The README's walkthrough, for real: start TensorFlow Serving, the proxy and two workers,
# submit jobs and poll them, show a failed job and a cancelled one, stop everything.
# Exits non-zero if any answer is not the expected one. Run it via `make demo`.
#   COMPOSE="docker compose" ./demo.sh   against a compose stack that is already up (and new, so
#                                        the job list is the README's): the proxy's address is
#                                        PROXY_URL, else `$COMPOSE port proxy 8000`; redis-cli
#                                        runs in the redis container, the cancel stops and starts
#                                        the worker service. No process of its own.
set -euo pipefail
source "$(dirname "$0")/run.sh"
if [[ -n ${COMPOSE:-} ]]; then
    P=${PROXY_URL:-http://$($COMPOSE port proxy 8000)}
    # The container has the password in REDISCLI_AUTH; database 0 is compose.yaml's REDIS_URL.
    redis_cli() { $COMPOSE exec -T redis redis-cli "$@"; }
    stop() { $COMPOSE stop "$1"; }
    start_worker() { $COMPOSE start worker; }
    stop_all() { $COMPOSE start worker >/dev/null 2>&1 || true; }  # left as it was found
fi

LOGS=$(mktemp)
failed=0
cleanup() {
    stop_all
    if [[ $failed -ne 0 ]]; then echo "--- process logs:"; tail -n 40 "$LOGS"; fi
    rm -f "$LOGS"
}
trap cleanup EXIT

# show EXPECTED_STATUS METHOD URL [BODY]: print the request as a curl command, then the answer;
# the answer's body is left in $BODY.
show() {
    local expected=$1 method=$2 url=$3 body=${4:-} answer status
    if [[ -n $body ]]; then
        echo "\$ curl -s -X $method $url -d '$body'"
        answer=$(curl -s -w '\n%{http_code}' -X "$method" "$url" -d "$body")
    elif [[ $method != GET ]]; then
        echo "\$ curl -s -X $method $url"
        answer=$(curl -s -w '\n%{http_code}' -X "$method" "$url")
    else
        echo "\$ curl -s $url"
        answer=$(curl -s -w '\n%{http_code}' "$url")
    fi
    status=${answer##*$'\n'}
    BODY=${answer%$'\n'*}
    echo "$BODY"
    echo "(HTTP $status)"
    echo
    if [[ $status != "$expected" ]]; then
        echo "UNEXPECTED: wanted HTTP $expected" >&2
        failed=1
    fi
}

job_id() { sed -E 's/.*"job_id":"([^"]+)".*/\1/' <<<"$BODY"; }

# poll ID EXPECTED_STATUS: GET /job/ID until the job is no longer pending or processing.
poll() {
    local id=$1 expected=$2 answer
    for _ in $(seq 600); do  # up to 60 s: a worker that just started imports TensorFlow first
        answer=$(curl -s "$P/job/$id")
        [[ $answer == *'"status":"pending"'* || $answer == *'"status":"processing"'* ]] || break
        sleep 0.1
    done
    show 200 GET "$P/job/$id"
    if [[ $BODY != *"\"status\":\"$expected\""* ]]; then
        echo "UNEXPECTED: wanted status $expected" >&2
        failed=1
    fi
}

if [[ -n ${COMPOSE:-} ]]; then
    echo "# against the compose stack: proxy $P (logs of stop/start to a temp file)"
else
    check_ports_free
    check_redis
    echo "# starting TensorFlow Serving :$TF_SERVING_GRPC_PORT/:$TF_SERVING_REST_PORT, proxy :$PORT," \
        "$NUM_WORKERS workers; Redis $(redis_where) (logs to a temp file)"
    start_tf_serving >>"$LOGS" 2>&1
    wait_tf_serving || { failed=1; exit 1; }
    start_proxy >>"$LOGS" 2>&1
    start_worker >>"$LOGS" 2>&1
    wait_healthy || { failed=1; exit 1; }
    P=http://127.0.0.1:$PORT
fi
echo

echo "## submit: the answer is a job id, at once"
show 202 POST "$P/predict" '{"data": [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3]]}'
ID=$(job_id)
echo "## read it at once (it may still be pending), then poll until the result is stored"
show 200 GET "$P/job/$ID"
poll "$ID" completed

echo "## a high-priority job, and the fixed sample"
show 202 POST "$P/predict" '{"data": [[7.7, 3.0, 6.1, 2.3]], "priority": "high"}'
poll "$(job_id)" completed
show 202 POST "$P/predict/test"
poll "$(job_id)" completed

echo "## invalid input: 422, nothing queued"
show 422 POST "$P/predict" '{"data": [[5.1, 3.5, 1.4]]}'
show 422 POST "$P/predict" '{"data": [[5.1, 3.5, 1.4, 42]]}'
show 404 GET "$P/job/nosuchjob"

echo "## a failed job: written straight into Redis with 3 numbers per row; the worker checks"
BAD=demo$RANDOM
echo "\$ redis-cli SET job:$BAD:data '[[1, 2, 3]]' EX 86400"
echo "\$ redis-cli SET job:$BAD:status pending EX 86400"
echo "\$ redis-cli LPUSH queue:predict $BAD"
redis_cli SET "job:$BAD:data" '[[1, 2, 3]]' EX 86400 >/dev/null
redis_cli SET "job:$BAD:status" pending EX 86400 >/dev/null
redis_cli LPUSH queue:predict "$BAD" >/dev/null
echo
poll "$BAD" failed

echo "## cancel: with the workers stopped, a job stays pending and can be cancelled"
stop worker >>"$LOGS" 2>&1
show 202 POST "$P/predict" '{"data": [[6.3, 3.3, 6.0, 2.5]]}'
WAITING=$(job_id)
show 202 POST "$P/predict" '{"data": [[5.8, 2.7, 5.1, 1.9]]}'
LATER=$(job_id)
show 200 GET "$P/jobs?limit=2"
show 200 DELETE "$P/job/$WAITING"
show 200 GET "$P/job/$WAITING"
show 409 DELETE "$P/job/$ID"
echo "## workers back: the job that waited in the queue completes"
start_worker >>"$LOGS" 2>&1
poll "$LATER" completed

echo "## health and the model's metadata (from TensorFlow Serving's REST API)"
show 200 GET "$P/health"
echo "\$ curl -s $P/metadata | jq -c '.model_spec, .metadata.signature_def.signature_def.serving_default'"
curl -s "$P/metadata" | jq -c '.model_spec, .metadata.signature_def.signature_def.serving_default'
echo

if [[ $failed -ne 0 ]]; then echo "demo: FAILED"; exit 1; fi
echo "demo: ok"
