#!/usr/bin/env bash
# The README's walkthrough: starts the worker and the proxy as `make run` does, makes each request
# with curl, prints it and its answer, stops both. Exits non-zero if any answer is not as expected.
# With PROXY_URL set (e.g. http://127.0.0.1:8000, a compose stack's proxy) it starts nothing and
# makes the same requests there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=../.venv/bin/python
work=$(mktemp -d)
if [ -n "${PROXY_URL:-}" ]; then
  URL=${PROXY_URL%/}
  stop() { rm -rf "$work"; }
  failed() { echo "demo FAILED: $*" >&2; echo "(the servers' logs: docker compose logs)" >&2; exit 1; }
else
  export PORT=${PORT:-8000} REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/5}
  export NUM_WORKERS=${NUM_WORKERS:-2} QUEUE_NAME=${QUEUE_NAME:-queue:jobs}
  export METRICS_PORT=${METRICS_PORT:-8001}
  URL=http://localhost:$PORT
  for port in "$PORT" "$METRICS_PORT"; do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "demo: port $port is busy (another demo or 'make run'?); stop it or set PORT and METRICS_PORT" >&2
      exit 1
    fi
  done
  $PYTHON worker.py >"$work/worker.log" 2>&1 &
  worker=$!
  $PYTHON proxy.py >"$work/proxy.log" 2>&1 &
  proxy=$!
  stop() {
    kill "$proxy" "$worker" 2>/dev/null || true
    wait "$proxy" "$worker" 2>/dev/null || true
    rm -rf "$work"
  }
  failed() {
    echo "demo FAILED: $*" >&2
    echo "--- proxy log"; tail -n 20 "$work/proxy.log"; echo "--- worker log"; tail -n 20 "$work/worker.log"
    exit 1
  }
fi
trap stop EXIT

for _ in $(seq 120); do curl -sf "$URL/health" >/dev/null && break; sleep 0.5; done
curl -sf "$URL/health" >/dev/null || failed "the proxy did not come up"

# call EXPECTED_STATUS CURL_ARGS...: prints the command and the answer, checks the status code.
call() {
  local expected=$1; shift
  local shown="" arg
  for arg in "$@"; do  # quote what the shell would need quoted, to print a copyable command
    if [[ $arg =~ ^[A-Za-z0-9_/:.@=-]+$ ]]; then shown+=" $arg"; else shown+=" '$arg'"; fi
  done
  echo "\$ curl$shown"
  local status
  status=$(curl -s -o "$work/body" -w '%{http_code}' "$@") || failed "curl $*"
  cat "$work/body"; echo; echo
  [ "$status" = "$expected" ] || failed "expected HTTP $expected, got $status"
}

call 200 "$URL/health"
call 200 "$URL/metadata"

echo "\$ printf '{\"image_data\": \"%s\"}' \"\$(base64 -w0 samples/chelsea.jpg)\" > request.json"
printf '{"image_data": "%s"}' "$(base64 -w0 samples/chelsea.jpg)" >"$work/request.json"
echo
cd "$work"
call 200 -X POST "$URL/predict" -H 'Content-Type: application/json' -d @request.json
cd - >/dev/null
job_id=$($PYTHON -c 'import json,sys; print(json.load(sys.stdin)["job_id"])' <"$work/body")
# At once: the worker is still on it ("queued" or "in_progress"; "complete" if it was quicker).
call 200 "$URL/job/$job_id"

# The accurate answer: poll until the worker has written it (a few hundred ms).
for _ in $(seq 100); do
  curl -s "$URL/job/$job_id" | grep -q '"status":"complete"' && break
  sleep 0.1
done
call 200 "$URL/job/$job_id"
grep -q '"prediction":"Egyptian cat"' "$work/body" || failed "the accurate answer is not Egyptian cat"

call 200 "$URL/predict/test"
call 400 -X POST "$URL/predict" -H 'Content-Type: application/json' -d '{"image_data": "not base64!"}'
call 400 -X POST "$URL/predict" -H 'Content-Type: application/json' -d '{"image_data": "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"}'
call 400 -X POST "$URL/predict" -H 'Content-Type: application/json' -d '{"image": "..."}'
call 404 "$URL/job/000000"
echo "demo: every answer as expected"
