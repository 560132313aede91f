"""The compose stack for real: the walkthrough, three job containers sharing 20,000 rows, MySQL
restarted under a running job, a job crashed mid-run, and the monitoring profile's Prometheus
scraping the API and every job container. Run by `make containers`
(../.ci/containers/chapter.sh), which brings the stack up healthy first, sets COMPOSE (a command
prefix for this stack) and takes it down afterwards. The tests run in this order: the walkthrough
needs the new stack's empty table (its ids start at 1).

The database is read through `$COMPOSE exec -T mysql mysql` as the stack's own user, with the
password taken from the container's environment into MYSQL_PWD: it never is on a command line.
"""

import json
import os
import re
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        not os.environ.get("COMPOSE"),
        reason="COMPOSE is unset: run `make containers`, which starts the compose stack",
    ),
]

CHAPTER = Path(__file__).resolve().parent.parent
T = TypeVar("T")
ROWS = 20_000
BATCH = 10_000  # MAX_ITEMS: rows per POST /data/list
NOTES: list[str] = []  # what the checks saw: conftest prints it at the end of the run


def compose(*args: str, env: dict | None = None, timeout: float = 180) -> str:
    command = shlex.split(os.environ["COMPOSE"]) + list(args)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def mysql_command(statements: str) -> list[str]:
    """`$COMPOSE exec` arguments running SQL as the stack's user; the shell inside the container
    puts its MYSQL_PASSWORD into MYSQL_PWD, so no password is in any process's argv."""
    script = (
        'MYSQL_PWD="$MYSQL_PASSWORD" exec mysql -u"$MYSQL_USER" -N -B "$MYSQL_DATABASE" -e "$1"'
    )
    return ["exec", "-T", "mysql", "sh", "-c", script, "sh", statements]


def sql(statements: str) -> list[list[str]]:
    return [line.split("\t") for line in compose(*mysql_command(statements)).splitlines()]


def api_url() -> str:
    return "http://" + compose("port", "api", "8000").strip()


def http(method: str, url: str, body: object = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float = 120,
    what: str = "condition",
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)


def register(url: str, n: int = ROWS) -> tuple[int, int]:
    """n rows through the API; returns the first and last id (consecutive: one writer)."""
    ids = []
    for _ in range(n // BATCH):
        status, items = http(
            "POST", url + "/data/list", {"items": [{"values": [5.9, 3.0, 5.1, 1.8]}] * BATCH}
        )
        assert status == 201, items
        ids += [item["id"] for item in items]
    assert ids == list(range(ids[0], ids[0] + n)), "ids not consecutive"
    return ids[0], ids[-1]


def predicted(first: int, last: int) -> int:
    return int(sql(f"SELECT SUM(state = 1) FROM items WHERE id BETWEEN {first} AND {last}")[0][0])


def assert_whole_chunks(first: int, last: int, size: int) -> int:
    """The rows are consecutive and every earlier row is predicted, so each chunk a job claims is
    `size` consecutive ids on the grid from `first` (a rolled-back chunk is claimed again whole).
    One consistent read: every grid chunk has all its rows predicted or none. Returns how many
    rows are predicted."""
    rows = sql(
        f"SELECT (id - {first}) DIV {size} AS chunk, SUM(state = 1) FROM items"
        f" WHERE id BETWEEN {first} AND {last} GROUP BY chunk"
    )
    counts = {int(chunk): int(n) for chunk, n in rows}
    half = {chunk: n for chunk, n in counts.items() if n not in (0, size)}
    assert not half, f"chunks written in part (chunk: rows predicted): {half}"
    return sum(counts.values())


def job_log() -> list[tuple[str, dict]]:
    """(container, JSON log entry) for each line every job container has logged."""
    entries = []
    for line in compose("logs", "--no-color", "job").splitlines():
        container, sep, text = line.partition("|")
        if sep and text.strip().startswith("{"):
            entries.append((container.strip(), json.loads(text)))
    return entries


def committed_rows(first: int) -> Counter[str]:
    """Rows of the committed chunks (a chunk is logged after its commit) from id `first` on,
    per job container."""
    done: Counter[str] = Counter()
    for container, entry in job_log():
        if entry["message"] == "chunk" and entry["first_id"] >= first:
            done[container] += entry["rows"]
    return done


def start_jobs(n: int, **settings: object) -> None:
    """n fresh job containers with these settings (`INTERVAL=1 ... docker compose up`): the job
    service's containers are removed first, so --no-recreate creates them all anew."""
    compose("rm", "--stop", "--force", "job")
    env = {**os.environ, **{k: str(v) for k, v in settings.items()}}
    compose(
        "up", "-d", "--wait", "--no-recreate", "--pull", "never", "--scale", f"job={n}", env=env
    )


def restore_jobs() -> None:
    """Back to the stack as chapter.sh brought it up: one job with the file's settings."""
    compose("up", "-d", "--wait", "--pull", "never", "--scale", "job=1")
    assert len(compose("ps", "-q", "job").split()) == 1


def nothing_waiting(url: str) -> bool:
    status, body = http("GET", url + "/data/unpredicted?limit=1")
    return status == 200 and body == []


def readme_answers() -> list[str]:
    """The answer lines of the README's walkthrough (the JSON the API sent), timestamps masked."""
    text = (CHAPTER / "README.md").read_text()
    walkthrough = text[text.index("## Walkthrough") : text.index("## How the job works")]
    lines = [line for line in walkthrough.splitlines() if line.startswith(("{", "["))]
    return [mask(line) for line in lines if '"time"' not in line]


def mask(text: str) -> str:
    return re.sub(r'"created_datetime":"[^"]+"', '"created_datetime":"T"', text)


def test_the_walkthrough_gives_the_readme_answers() -> None:
    done = subprocess.run(
        ["bash", str(CHAPTER / "demo.sh")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = mask(done.stdout)
    missing = [line for line in readme_answers() if line not in output]
    assert not missing, f"README answers not given by the containers: {missing}"
    assert "rows predicted by the three jobs together: 30000" in output
    assert len(compose("ps", "-q", "--status", "running", "job").split()) == 1  # started again


def test_three_job_containers_predict_each_row_exactly_once() -> None:
    url = api_url()
    size = 200  # 100 chunks, so the three containers' 12 threads all get some
    start_jobs(0)
    try:
        first, last = register(url)
        # The three containers are released together: a table lock held here makes each one's
        # first run wait, and all three go when it is dropped.
        holder = subprocess.Popen(
            shlex.split(os.environ["COMPOSE"])
            + mysql_command("LOCK TABLES items WRITE; SELECT SLEEP(300)"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            lock = until(
                lambda: sql(
                    "SELECT id FROM information_schema.processlist WHERE info = 'SELECT SLEEP(300)'"
                ),
                what="the table lock",
            )[0][0]
            start_jobs(3, INTERVAL=1, CHUNK_SIZE=size)
            waiting = (
                "SELECT COUNT(*) FROM information_schema.processlist"
                " WHERE state LIKE 'Waiting for table%lock'"
            )
            until(lambda: sql(waiting)[0][0] == "3", what="three jobs waiting for the lock")
            sql(f"KILL CONNECTION {lock}")
        finally:
            holder.kill()
            holder.wait()
        until(lambda: predicted(first, last) == ROWS, what=f"{ROWS} rows predicted")
        assert_whole_chunks(first, last, size)
        # Every row is predicted, and the committed chunks add up to exactly ROWS: none twice.
        by_container = until(lambda: (c := committed_rows(first)).total() == ROWS and c, timeout=30)
        NOTES.append(f"--scale job=3, {ROWS} rows, rows per container: {dict(by_container)}")
        assert len(by_container) >= 2, by_container
        assert nothing_waiting(url)
    finally:
        restore_jobs()


def test_mysql_restart_under_a_running_job() -> None:
    url = api_url()
    size = 10  # 2,000 commits: the run lasts long enough to be cut by the restart
    start_jobs(0)
    try:
        first, last = register(url)
        start_jobs(1, INTERVAL=1, CHUNK_SIZE=size, THREADS=2)
        until(lambda: predicted(first, last) > 0, what="the job's first chunks")

        statuses: list[int] = []
        stop = threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                try:
                    statuses.append(http("GET", url + "/health", timeout=10)[0])
                except OSError:
                    statuses.append(0)  # no answer at all: never expected, counted below
                time.sleep(0.05)

        poller = threading.Thread(target=poll_health)
        poller.start()
        try:
            compose("restart", "mysql")
            until(lambda: 503 in statuses, timeout=60, what="the API's 503 while MySQL is down")
            until(lambda: statuses[-1] == 200, timeout=120, what="the API healthy again")
        finally:
            stop.set()
            poller.join()
        at_recovery = assert_whole_chunks(first, last, size)
        assert set(statuses) <= {200, 503}, Counter(statuses)
        NOTES.append(f"restart mysql: /health answers {dict(Counter(statuses))}")

        while (done := assert_whole_chunks(first, last, size)) < ROWS:  # checked as it goes
            time.sleep(0.2)
        # A chunk whose COMMIT reached the server but whose answer was lost with the connection
        # is predicted and not logged (the job saw an error and retried; its rows were no longer
        # waiting, so it was not claimed again): only such whole chunks may be missing here.
        unlogged = ROWS - committed_rows(first).total()
        entries = [entry for _, entry in job_log()]
        retries = [e["error"] for e in entries if e["message"] == "chunk failed; retrying"]
        failed = sum(e["message"] == "batch failed; retrying at the next interval" for e in entries)
        NOTES.append(
            f"restart mysql: {at_recovery} of {done} rows predicted when the API was back;"
            f" job log: {len(retries)} chunk retries {dict(Counter(retries))}, {failed} failed"
            f" runs, {unlogged} rows committed with their answer lost"
        )
        retried = len(retries)
        assert unlogged % size == 0 and 0 <= unlogged // size <= retried + failed, unlogged
        assert retried + failed > 0, "the restart did not hit the run: make the chunks smaller"
        assert http("GET", f"{url}/data/{last}")[1]["prediction"] is not None
    finally:
        restore_jobs()


def test_a_killed_job_leaves_whole_chunks_and_is_restarted() -> None:
    url = api_url()
    size = 10
    start_jobs(0)
    try:
        first, last = register(url)
        start_jobs(1, INTERVAL=1, CHUNK_SIZE=size)
        container = compose("ps", "-q", "job").strip()
        until(lambda: predicted(first, last) > 0, what="the job's first chunks")
        # A real crash: SIGKILL to the job's Python inside its container (PID 1 there is the
        # init of `init: true`, Python its only child). `docker compose kill` would be a manual
        # stop, which `restart: unless-stopped` leaves stopped.
        compose("exec", "-T", "job", "sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)")
        at_crash = assert_whole_chunks(first, last, size)

        def restarts() -> int:
            out = subprocess.run(
                ["docker", "inspect", "-f", "{{.RestartCount}}", container],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return int(out.stdout)

        until(lambda: restarts() >= 1, what="the job container restarted by its policy")
        until(lambda: assert_whole_chunks(first, last, size) == ROWS, what=f"{ROWS} rows predicted")
        NOTES.append(f"job SIGKILLed with {at_crash} of {ROWS} rows predicted; restarted, all done")
        assert nothing_waiting(url)
    finally:
        restore_jobs()


def prometheus_api(base: str, path: str, **params: str) -> dict[str, Any]:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{base}/api/v1/{path}?{query}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    data: dict[str, Any] = answer["data"]
    return data


def targets_up(base: str) -> Counter[str] | None:
    """Active targets per scrape job, once every one of them is up."""
    try:
        active = prometheus_api(base, "targets", state="active")["activeTargets"]
    except OSError:
        return None  # not answering yet
    if not active or any(t["health"] != "up" for t in active):
        return None
    return Counter(t["labels"]["job"] for t in active)


def promql(base: str, query: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus_api(base, "query", query=query)["result"]
    return result


def test_the_monitoring_profile_scrapes_every_role_and_every_job() -> None:
    url = api_url()
    monitoring = ("--profile", "monitoring")
    # chapter.sh brings the stack up without profiles: this starts the profile's one service.
    compose(*monitoring, "up", "-d", "--wait", "--pull", "never", "prometheus")
    try:
        base = "http://" + compose(*monitoring, "port", "prometheus", "9090").strip()
        one_each = Counter(api=1, job=1, prometheus=1)
        until(lambda: targets_up(base) == one_each, what=f"targets {dict(one_each)} up")
        assert nothing_waiting(url)
        start_jobs(3, INTERVAL=1, CHUNK_SIZE=500)  # fresh containers: their counters start at 0
        try:
            # dns_sd_configs re-reads the name `job` every 5 s: each container is a target.
            three = Counter(api=1, job=3, prometheus=1)
            until(lambda: targets_up(base) == three, what="three job targets up")
            first, last = register(url, BATCH)
            until(lambda: predicted(first, last) == BATCH, what=f"{BATCH} rows predicted")

            def seen(query: str, expected: float) -> bool:
                result = promql(base, query)
                return len(result) == 1 and float(result[0]["value"][1]) == expected

            until(lambda: seen("sum(batch_rows_predicted_total)", BATCH), what="rows predicted")
            until(lambda: seen("batch_rows_unpredicted", 0), what="nothing waiting")
            per_job = promql(base, "batch_rows_predicted_total")
            NOTES.append(
                f"monitoring: targets {dict(targets_up(base))}; rows predicted per job target"  # type: ignore[arg-type]  # all were up just above
                f" {sorted(int(float(r['value'][1])) for r in per_job)}"
            )
        finally:
            restore_jobs()
        until(lambda: targets_up(base) == one_each, what="back to one job target")
    finally:
        compose(*monitoring, "rm", "--stop", "--force", "--volumes", "prometheus")
