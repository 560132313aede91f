#!/usr/bin/env bash
# The README walkthrough, for real: start the local server, make each request, print the
# command and its answer, stop the server. Exits non-zero if any answer is not the expected one.
# With TF_SERVING_HOST set (and TF_SERVING_REST_PORT / TF_SERVING_GRPC_PORT, default 8501/8500,
# the clients' variables) it starts nothing and walks through the server there, e.g. the
# compose stack's TensorFlow Serving.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=../.venv/bin/python
if [ -n "${TF_SERVING_HOST:-}" ]; then
  HOST=$TF_SERVING_HOST
  REST_API_PORT=${TF_SERVING_REST_PORT:-8501}
  PORT=${TF_SERVING_GRPC_PORT:-8500}
  SERVER=
else
  HOST=localhost
  PORT=${PORT:-8500}
  REST_API_PORT=${REST_API_PORT:-8501}
  SERVER=${SERVER:-$PYTHON local_serving.py --port=$PORT --rest_api_port=$REST_API_PORT --model_name=iris --model_base_path=../models/iris}
fi
BASE=http://$HOST:$REST_API_PORT
URL=$BASE/v1/models/iris
SERVER_PID=
if [ -n "$SERVER" ]; then
  for port in "$PORT" "$REST_API_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "demo: port $port is busy; stop what is listening there or set PORT / REST_API_PORT" >&2
      exit 1
    fi
  done
  LOG=$(mktemp)
  $SERVER >"$LOG" 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null; rm -f "$LOG"' EXIT
fi
# running: true while there is a server to wait for (ours alive, or one we did not start).
running() { [ -z "$SERVER_PID" ] || kill -0 "$SERVER_PID" 2>/dev/null; }
server_log() { [ -z "$SERVER_PID" ] || cat "$LOG"; }

echo "# waiting for $URL to report AVAILABLE"
for _ in $(seq 240); do
  curl -s "$URL" 2>/dev/null | grep -q AVAILABLE && break
  running || { server_log; echo "demo: server exited" >&2; exit 1; }
  sleep 0.5
done
curl -s "$URL" | grep -q AVAILABLE || { server_log; echo "demo: server not ready at $URL" >&2; exit 1; }

failures=0
# step EXPECTED COMMAND...: prints the command and its output; the output must contain EXPECTED.
step() {
  local expected=$1; shift
  echo; echo "\$ $*"
  local output
  output=$(eval "$@" 2>&1) || true
  echo "$output"
  if ! grep -q -- "$expected" <<<"$output"; then
    echo "demo: FAILED, expected to see: $expected" >&2
    failures=$((failures + 1))
  fi
}

step '"state": "AVAILABLE"' "curl -s $URL"
step '"signature_def"' "curl -s $URL/metadata"
step '"predictions": *\[ *\[' "curl -s -d '{\"instances\": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}' $URL:predict"
step '"outputs": *\[ *\[' "curl -s -d '{\"inputs\": {\"input\": [[5.9, 3.0, 5.1, 1.8]]}}' $URL/versions/1:predict"
step '"predictions": *\[ *\[' "echo '{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}' | gzip | curl -s -H 'Content-Encoding: gzip' --data-binary @- $URL:predict"
step 'HTTP/1.1 400' "curl -s -i -d '{\"instances\": [[5.1, 3.5, 1.4]]}' $URL:predict"
step 'HTTP/1.1 400' "curl -s -i -d '{\"instances\": [[5.1, 3.5' $URL:predict"
step 'HTTP/1.1 404' "curl -s -i -d '{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}' $URL/versions/2:predict"
step '"predictions"' "$PYTHON rest_client.py predict --host $HOST --port $REST_API_PORT"
step '"output"' "$PYTHON grpc_client.py predict --host $HOST --port $PORT --rows '[[5.1, 3.5, 1.4, 0.2]]' 2>/dev/null"
step 'INVALID_ARGUMENT' "$PYTHON grpc_client.py predict --host $HOST --port $PORT --rows '[[5.1, 3.5, 1.4]]' 2>&1 | grep -v '^[IWE]0000\|^WARNING: All'"

echo
if [ "$failures" -ne 0 ]; then
  echo "demo: $failures step(s) failed" >&2
  exit 1
fi
echo "demo: all steps answered as expected"
