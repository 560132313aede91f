#!/usr/bin/env bash
# The README walkthrough, end to end: start the API, register rows, run the job, read the
# predictions, run three jobs side by side. Uses its own database (dropped at the end) and
# stops everything it started, even on failure. Exit status non-zero if any step failed.
#   COMPOSE="docker compose" ./demo.sh   against a compose stack that is already up (and new:
#                                        the ids must start at 1): the API's address comes from
#                                        `$COMPOSE port`, the job runs as one-off containers
#                                        (`$COMPOSE run`); the loop job is stopped meanwhile and
#                                        started again at the end. No process or database of its own.
set -euo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin/python
LOGS=$(mktemp -d)
API_PID= JOBS=()  # background processes: stopped and waited for on any exit, Ctrl-C included

if [[ -n ${COMPOSE:-} ]]; then
  URL="http://$($COMPOSE port api 8000)"
  JOB_CMD="docker compose run --rm job python job.py --once"
  run_job() { ${EXEC:-} $COMPOSE run --rm --no-deps -T ${CHUNK_SIZE:+-e CHUNK_SIZE=$CHUNK_SIZE} job python job.py --once; }
  start_api() { :; }
  drop_db() { :; }
  stop_loop_job() { $COMPOSE stop job >/dev/null 2>&1; }
  # Also on failure: the stack is left with its loop job running, as it was found.
  start_loop_job() { $COMPOSE start job >/dev/null 2>&1; }
  if [ "$(curl -sS --fail "$URL/data/all?limit=1")" != "[]" ]; then
    echo "demo: the stack's table has rows already, so the ids would not be the README's;" \
      "start from a new stack (docker compose down -v && docker compose up -d)" >&2
    exit 1
  fi
  echo "# against the compose stack: API $URL"
else
  export MYSQL_HOST=${MYSQL_HOST:-127.0.0.1} MYSQL_PORT=${MYSQL_PORT:-3306}
  export MYSQL_USER=${MYSQL_USER:-root} MYSQL_PASSWORD=${MYSQL_PASSWORD:-}
  export MYSQL_DATABASE=${DEMO_DATABASE:-batch_demo} PORT=${PORT:-8000}
  URL="http://127.0.0.1:$PORT"
  JOB_CMD="python job.py --once"
  run_job() { ${EXEC:-} $PY job.py --once; }
  start_api() {
    echo "== start the API on :$PORT (database $MYSQL_DATABASE)"
    $PY api.py >"$LOGS/api.log" 2>&1 &
    API_PID=$!
    for _ in $(seq 100); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
  }
  drop_db() {
    $PY -c 'import db; from config import Settings; db.drop_database(Settings.from_env())'
  }
  stop_loop_job() { :; }
  start_loop_job() { :; }
  if $PY -c "import socket,sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)) != 0)"; then
    echo "demo: port $PORT is busy; stop what runs there or set PORT" >&2
    exit 1
  fi
fi

cleanup() {
  # A script's background processes ignore Ctrl-C's SIGINT: they are stopped here.
  for pid in $API_PID "${JOBS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in $API_PID "${JOBS[@]}"; do wait "$pid" 2>/dev/null || true; done  # uvicorn: 143
  drop_db || true
  start_loop_job || true
  rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
drop_db
stop_loop_job  # in compose: the loop job would otherwise take rows from the jobs run below

print_request() {  # the request as a reader would type it (the README shows these lines)
  case "$1 $2" in
    GET*\?*) echo "\$ curl '$URL$2'" ;;
    GET*) echo "\$ curl $URL$2" ;;
    *) echo "\$ curl -X $1 $URL$2${3:+ -d '$3'}" ;;
  esac
}

show() {  # show METHOD PATH [JSON]: print the request and the answer; fail on a non-2xx status
  print_request "$@"
  curl -sS --fail-with-body -X "$1" "$URL$2" ${3:+-H 'Content-Type: application/json' -d "$3"}
  echo; echo
}
show_error() {  # show_error METHOD PATH JSON EXPECTED_STATUS
  print_request "$@"
  status=$(curl -sS -o "$LOGS/body" -w '%{http_code}' -X "$1" "$URL$2" ${3:+-d "$3"})
  cat "$LOGS/body"; echo "   (HTTP $status)"; echo
  [ "$status" = "$4" ] || { echo "demo: expected HTTP $4" >&2; exit 1; }
}

start_api
show GET /health

echo "== register rows: nothing is predicted yet"
show POST /data '{"values": [5.1, 3.5, 1.4, 0.2]}'
show POST /data/list '{"items": [{"values": [7.0, 3.2, 4.7, 1.4]}, {"values": [6.3, 3.3, 6.0, 2.5]}]}'
show GET '/data/unpredicted?limit=2'
show_error POST /data '{"values": [5.1, 3.5, 1.4]}' 400
show_error GET /data/99 '' 404

echo "== run the job once (normally: every INTERVAL seconds)"
echo "\$ $JOB_CMD"
run_job
echo
show GET '/data/predicted?limit=2'
show GET '/data/predicted?limit=2&after_id=2'
show GET /data/1

echo "== three jobs at once on 30,000 new rows: each row is claimed by exactly one"
$PY -c 'import json; print(json.dumps({"items": [{"values": [5.9, 3.0, 5.1, 1.8]}] * 10000}))' \
  >"$LOGS/rows.json"
for _ in 1 2 3; do curl -sS --fail -o /dev/null -X POST "$URL/data/list" -d @"$LOGS/rows.json"; done
echo "\$ for i in 1 2 3; do CHUNK_SIZE=1000 $JOB_CMD & done; wait"
# EXEC=exec: the background subshell becomes the job, so cleanup signals and waits for the job
# itself (not a subshell that would leave it running).
for i in 1 2 3; do CHUNK_SIZE=1000 EXEC=exec run_job >"$LOGS/job$i.log" & JOBS+=($!); done
for pid in "${JOBS[@]}"; do wait "$pid"; done
JOBS=()  # all exited: never signal their (reusable) pids
total=0
for i in 1 2 3; do
  end=$(grep '"batch end"' "$LOGS/job$i.log")
  echo "job $i: $end"
  total=$((total + $($PY -c 'import json,sys; print(json.loads(sys.argv[1])["rows"])' "$end")))
done
echo "rows predicted by the three jobs together: $total"
[ "$total" = 30000 ] || { echo "demo: expected 30000" >&2; exit 1; }
show GET '/data/unpredicted'
echo "demo: ok"
