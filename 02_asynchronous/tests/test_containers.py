"""The compose stack for real (`make containers`): the walkthrough against the containers, then
four workers draining 1,000 jobs while one is SIGKILLed holding a batch, then Redis restarted
with jobs queued. ../.ci/containers/chapter.sh brings the stack up healthy, sets COMPOSE (a
command prefix for this stack) and takes it down afterwards; each test leaves it as it found it.
The tests run in file order: the walkthrough needs the new stack's empty job list.

Redis is read with `$COMPOSE exec -T redis redis-cli` (the container has its password in
REDISCLI_AUTH: none on any command line). Workers are stopped, continued and killed by their
host pid (`docker inspect`): the test runs as root on the host, as chapter.sh does.
"""

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from launch import MODELS, http

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        not os.environ.get("COMPOSE"),
        reason="COMPOSE is unset: run `make containers`, which starts the compose stack",
    ),
]

CHAPTER = Path(__file__).resolve().parent.parent
QUEUE = "queue:predict"  # compose.yaml leaves QUEUE_NAME at its default, in Redis db 0
VISIBILITY_TIMEOUT = 30  # compose.yaml leaves the worker's default
JOBS = 1_000
NOTES: list[str] = []  # what the checks saw: printed at the end of the module's run


@pytest.fixture(scope="module", autouse=True)
def print_notes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    # Plugins looked up by name: pluggy can only type them as `Any | None`; both always exist.
    reporter: Any = request.config.pluginmanager.get_plugin("terminalreporter")
    capture: Any = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # else the lines go into the captured output
        for note in NOTES:
            reporter.write_line(f"containers: {note}")


def compose(*args: str, env: dict | None = None, timeout: float = 300) -> str:
    command = shlex.split(os.environ["COMPOSE"]) + list(args)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def redis_cli(*args: str) -> str:
    return compose("exec", "-T", "redis", "redis-cli", *args).strip()


def proxy_url() -> str:
    return "http://" + compose("port", "proxy", "8000").strip()


T = TypeVar("T")


def until(condition: Callable[[], T | None], timeout: float = 120, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def inspect(container: str) -> dict:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("needs the docker CLI to find the containers' host pids")
    out = subprocess.run([docker, "inspect", container], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    state: dict = json.loads(out.stdout)[0]
    return state


def workers() -> list[str]:
    return sorted(compose("ps", "-q", "worker").split())


def scale_workers(n: int) -> None:
    compose("up", "-d", "--wait", "--no-recreate", "--pull", "never", "--scale", f"worker={n}")
    assert len(workers()) == n


def workers_waiting(n: int) -> bool:
    """n worker connections have sent a BLMOVE (each worker's one blocking call): started."""
    clients = redis_cli("CLIENT", "LIST").splitlines()
    return sum(" cmd=blmove" in line for line in clients) >= n


def worker_log(since: str) -> list[tuple[str, dict]]:
    """(container, JSON line) for every line the worker containers have logged at `since` (ISO,
    UTC) or later, also those of a container's run before a restart."""
    entries = []
    for line in compose("logs", "--no-color", "worker").splitlines():
        container, sep, text = line.partition("|")
        text = text.strip()
        if sep and text.startswith("{"):
            entry = json.loads(text)
            if entry["ts"] >= since:
                entries.append((container.strip(), entry))
    return entries


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture(scope="module")
def iris() -> list[list[float]]:
    with open(MODELS / "iris.csv") as f:
        rows = list(csv.DictReader(f))
    return [[float(r[k]) for k in list(r)[:4]] for r in rows]


def submit_all(url: str, rows: list[list[float]]) -> list[str]:
    def submit(row: list[float]) -> str:
        status, body = http("POST", url + "/predict", {"data": [row]}, timeout=30)
        assert status == 202, body
        job_id: str = body["job_id"]
        return job_id

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(submit, rows))


def read_all(url: str, ids: list[str]) -> list[dict]:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: http("GET", f"{url}/job/{i}", timeout=30), ids))
    assert all(status == 200 for status, _ in answers)
    return [job for _, job in answers]


def reference_classes(url: str, rows: list[list[float]]) -> list[str]:
    """The class of each row, from one job holding all of them (the model is deterministic)."""
    status, body = http("POST", url + "/predict", {"data": rows})
    assert status == 202, body
    job_id = body["job_id"]
    job = until(
        lambda: (j := http("GET", f"{url}/job/{job_id}")[1])["status"] == "completed" and j,
        what="the reference job",
    )
    return [r["class_name"] for r in job["result"]]


def drained() -> bool:
    return redis_cli("LLEN", QUEUE) == "0" and redis_cli("LLEN", f"{QUEUE}:processing") == "0"


def assert_right_classes(url: str, ids: list[str], rows: list, reference: list[str]) -> None:
    jobs = read_all(url, ids)
    wrong = [
        (job["job_id"], job["status"], job.get("result"))
        for job, i in zip(jobs, range(len(ids)), strict=True)
        if job["status"] != "completed"
        or [r["class_name"] for r in job["result"]] != [reference[i % len(rows)]]
    ]
    assert not wrong, f"{len(wrong)} jobs not completed with the reference class: {wrong[:5]}"


# -- the walkthrough ---------------------------------------------------------------------------


def readme_walkthrough() -> str:
    text = (CHAPTER / "README.md").read_text()
    section = text[text.index("## Walkthrough") :]
    return section.split("```")[1]


def answers(transcript: str) -> list[str]:
    """The JSON answer lines, with job ids named by order of appearance (J1, J2...), the
    hand-made job's id and the timestamps masked."""
    ids: dict[str, str] = {}
    lines = []
    for line in transcript.splitlines():
        if not line.startswith("{"):
            continue
        line = re.sub(r"demo\d+", "BAD", line)
        line = re.sub(r'"submitted_at":"[^"]+"', '"submitted_at":"T"', line)
        line = re.sub(r"\b[0-9a-f]{10}\b", lambda m: ids.setdefault(m[0], f"J{len(ids) + 1}"), line)
        lines.append(line)
    return lines


def test_the_walkthrough_gives_the_readme_answers() -> None:
    done = subprocess.run(
        ["bash", str(CHAPTER / "demo.sh")],
        env={**os.environ, "PROXY_URL": proxy_url()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("demo: ok")
    got, want = answers(done.stdout), answers(readme_walkthrough())
    assert len(got) == len(want), (got, want)
    for i, (line, expected) in enumerate(zip(got, want, strict=True)):
        if i == 1:  # the read right after the first submit: pending, or already claimed or done
            assert re.fullmatch(
                r'\{"job_id":"J1","status":"(pending|processing|completed)".*', line
            )
            continue
        assert line == expected
    assert len(compose("ps", "-q", "--status", "running", "worker").split()) == 2  # back


# -- the monitoring profile ---------------------------------------------------------------------


def test_the_monitoring_profile_scrapes_every_role() -> None:
    # chapter.sh starts the stack without profiles: this starts the profile's one service.
    monitoring = ("--profile", "monitoring")
    compose(*monitoring, "up", "-d", "--wait", "--pull", "never", "prometheus")
    try:
        base = "http://" + compose(*monitoring, "port", "prometheus", "9090").strip()

        def api(path: str) -> dict:
            with urllib.request.urlopen(f"{base}/api/v1/{path}", timeout=10) as response:
                body = json.loads(response.read())
            assert body["status"] == "success", body
            data: dict = body["data"]
            return data

        def targets() -> list[dict] | None:
            try:
                active = api("targets")["activeTargets"]
            except OSError:
                return None  # not answering yet
            # Both worker replicas, found by Docker's DNS, each on its METRICS_PORT.
            jobs = Counter(t["labels"]["job"] for t in active)
            up = all(t["health"] == "up" for t in active)
            return active if up and jobs == {"proxy": 1, "worker": 2, "prometheus": 1} else None

        active = until(targets, 120, "every target up")
        workers = [t["labels"]["instance"] for t in active if t["labels"]["job"] == "worker"]
        assert all(instance.endswith(":8001") for instance in workers), workers
        queue = api("query?query=job_queue_length")["result"]
        assert {r["metric"]["state"] for r in queue} == {"waiting", "claimed"}
        finished = api("query?query=jobs_finished_total")["result"]
        assert len(finished) == 4  # completed and failed, from each replica
        NOTES.append(f"monitoring: every target up: {sorted(t['scrapeUrl'] for t in active)}")
    finally:
        compose(*monitoring, "rm", "--stop", "--force", "--volumes", "prometheus")


# -- four workers, one SIGKILLed holding a batch -----------------------------------------------


def test_four_workers_one_killed_mid_run_every_job_completes_once(iris: list[list[float]]) -> None:
    url = proxy_url()
    reference = reference_classes(url, iris)
    scale_workers(4)
    pids: dict[str, int] = {}
    try:
        until(lambda: workers_waiting(4), what="four workers waiting on the queue")
        pids = {c: inspect(c)["State"]["Pid"] for c in workers()}
        victim, *others = pids
        victim_before = inspect(victim)
        # Every worker stopped (SIGSTOP from the host), and once their pending BLMOVEs have timed
        # out (BLOCK_SECONDS, 1 s) Redis hands no job to any of them: the queue fills.
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        until(
            lambda: not re.search(r"flags=\w*b", redis_cli("CLIENT", "LIST")),
            timeout=10,
            what="the stopped workers' BLMOVEs to time out",
        )
        since = now()
        ids = submit_all(url, [iris[i % len(iris)] for i in range(JOBS)])
        assert int(redis_cli("LLEN", QUEUE)) == JOBS
        # The victim alone runs, for a moment at a time, until it is caught holding a batch
        # (stopped, so what it holds stays put) with jobs still queued: then the crash.
        held: list[str] = []
        for _ in range(200):
            os.kill(pids[victim], signal.SIGCONT)
            time.sleep(0.02)
            os.kill(pids[victim], signal.SIGSTOP)
            if held := redis_cli("LRANGE", f"{QUEUE}:processing", "0", "-1").split():
                break
        assert held, "the victim never held a batch"
        queued = int(redis_cli("LLEN", QUEUE))
        assert queued > 0, "the victim drained the queue alone: no longer mid-run"
        os.kill(pids[victim], signal.SIGKILL)  # a real crash, as the OOM killer's
        for container in others:
            os.kill(pids[container], signal.SIGCONT)

        def restarted() -> dict | None:
            # Docker marks the container Running (and Restarting, Pid 0) with the count already
            # raised while it waits out the restart delay: only a new Pid means it started again.
            state = inspect(victim)
            again = state["RestartCount"] == victim_before["RestartCount"] + 1
            started = state["State"]["Running"] and not state["State"]["Restarting"]
            return state if again and started and state["State"]["Pid"] else None

        after = until(restarted, 60, "the restart policy to start the killed worker again")
        assert after["State"]["Pid"] != pids[victim]
        # The victim's batch waits VISIBILITY_TIMEOUT for a reaper, then completes.
        until(drained, VISIBILITY_TIMEOUT + 90, f"all {JOBS} jobs done")
        assert_right_classes(url, ids, iris, reference)
        # Exactly once: FINISH stores a result only under the claim in force and returns how
        # many it stored; the workers log that count ("stored") after every batch. The killed
        # worker stored nothing of the batch it held; the sum over every worker is one per job.
        entries = worker_log(since)
        stored: Counter[str] = Counter()
        for container, e in entries:
            if e["message"] == "batch done":
                stored[container] += e["stored"]
        reaped = sum(
            e["jobs"]
            for _, e in entries
            if e["message"] == "requeued jobs past the visibility timeout"
        )
        NOTES.append(
            f"--scale worker=4, {JOBS} jobs: one worker SIGKILLed holding {len(held)} jobs with"
            f" {queued} queued, restarted by its policy; reaped {reaped}; results stored"
            f" {stored.total()}, per container {dict(sorted(stored.items()))}"
        )
        assert reaped == len(held)
        assert stored.total() == JOBS
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        scale_workers(2)


# -- Redis restarted with jobs queued ----------------------------------------------------------


def test_redis_restart_keeps_queued_jobs(iris: list[list[float]]) -> None:
    url = proxy_url()
    reference = reference_classes(url, iris)
    compose("stop", "worker")  # the jobs stay queued
    try:
        ids = submit_all(url, iris)
        assert int(redis_cli("LLEN", QUEUE)) == len(iris)
        compose("restart", "redis")
        until(lambda: redis_cli("PING") == "PONG", what="Redis back")
        # The append-only file had them: still queued, still pending.
        assert int(redis_cli("LLEN", QUEUE)) == len(iris)
        assert {job["status"] for job in read_all(url, ids)} == {"pending"}
    finally:
        compose("start", "worker")
    until(drained, 120, "the queued jobs done")
    assert_right_classes(url, ids, iris, reference)
    until(lambda: http("GET", url + "/health")[0] == 200, what="the proxy healthy")
    NOTES.append(f"restart redis with {len(iris)} jobs queued: all kept, all completed")
