"""The compose stack for real (`make containers`): the walkthrough against the containers, the
page, the monitoring profile's Prometheus scraping every role, and a worker crash, first of one
worker process holding a job, then of the container's main process. ../.ci/containers/chapter.sh
brings the stack up healthy and takes it down afterwards; each test leaves it healthy again.
COMPOSE is the command prefix for this stack."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import SAMPLE_B64, http, wait_until

CHAPTER = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        "COMPOSE" not in os.environ,
        reason="needs a running compose stack: `make containers` (../.ci/containers/chapter.sh)",
    ),
]
QUEUE = "queue:jobs"  # compose.yaml's QUEUE_NAME, in Redis DB 5
VISIBILITY_TIMEOUT = 30  # compose.yaml leaves the worker's default
JOB_DONE = VISIBILITY_TIMEOUT + 60  # requeued after the timeout, then a new process's first job


def compose(*args: str, check: bool = True) -> str:
    command = [*shlex.split(os.environ["COMPOSE"]), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, f"{shlex.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def proxy_url() -> str:
    """The proxy's published address: 127.0.0.1 and a port the engine picked."""
    return "http://" + compose("port", "proxy", "8000").strip()


def redis_cli(*args: str) -> str:
    """redis-cli inside the redis container, on DB 5 (it reads REDISCLI_AUTH from its env)."""
    return compose("exec", "-T", "redis", "redis-cli", "-n", "5", *args)


def worker_clients() -> dict[int, dict]:
    """The worker processes' Redis connections, by pid (inside the container): `worker-<pid>`."""
    clients = {}
    for line in redis_cli("CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        name = fields.get("name", "")
        if re.fullmatch(r"worker-\d+", name):
            clients[int(name.removeprefix("worker-"))] = fields
    return clients


def signal_worker(pid: int, sig: str, check: bool = True) -> None:
    """A signal to one process inside the worker container (sh's own kill: no procps needed)."""
    compose("exec", "-T", "worker", "sh", "-c", f'kill -s {sig} "$1"', "sh", str(pid), check=check)


def hold_a_job() -> tuple[str, int, list[int]]:
    """A job submitted through the proxy and claimed by one worker process that is stopped
    (SIGSTOP) before it can run it. Returns the job id, that process and the other one, both
    stopped: they are SIGCONT'd or killed by the caller.

    Deterministic: with every process stopped and out of BLMOVE (its 1 s block timed out), the
    job waits in the queue; Redis is paused for writes, one process is let go just long enough
    to send its BLMOVE, which Redis postpones, and stopped again; unpaused, Redis runs that
    BLMOVE and hands the job to the stopped process."""
    pids = wait_until(
        lambda: sorted(worker_clients()) if len(worker_clients()) == 2 else None,  # NUM_WORKERS
        90,
        "both worker processes to be connected",
    )
    for pid in pids:
        signal_worker(pid, "STOP")
    wait_until(
        lambda: all("b" not in c["flags"] for c in worker_clients().values()),
        10,
        "the stopped processes' BLMOVEs to time out",
    )
    status, body = http(
        "POST", f"{proxy_url()}/predict", json.dumps({"image_data": SAMPLE_B64}).encode()
    )
    assert status == 200, body
    job_id, holder = body["job_id"], pids[0]
    redis_cli("CLIENT", "PAUSE", "10000", "WRITE")  # BLMOVE writes: it waits for the unpause
    try:
        signal_worker(holder, "CONT")
        wait_until(
            lambda: "b" in worker_clients()[holder]["flags"], 10, "its BLMOVE to be postponed"
        )
        signal_worker(holder, "STOP")
    finally:
        redis_cli("CLIENT", "UNPAUSE")
    wait_until(
        lambda: redis_cli("LRANGE", f"{QUEUE}:processing", "0", "-1").split() == [job_id],
        10,
        f"worker-{holder} to hold job {job_id}",
    )
    return job_id, holder, pids[1:]


def accurate_answer(job_id: str) -> dict:
    def complete() -> dict | None:
        status, body = http("GET", f"{proxy_url()}/job/{job_id}")
        assert status == 200, body
        return body[job_id] if body[job_id]["status"] == "complete" else None

    return wait_until(complete, JOB_DONE, f"job {job_id} to complete")


def wait_healthy(service: str, timeout: float = 120) -> None:
    def healthy() -> bool:
        (state,) = [
            json.loads(line) for line in compose("ps", "--format", "json", service).splitlines()
        ]
        return bool(state["State"] == "running" and state.get("Health") == "healthy")

    wait_until(healthy, timeout, f"{service} to be healthy")


def readme_walkthrough() -> str:
    text = (CHAPTER / "README.md").read_text()
    section = text[text.index("## Walkthrough") :]
    return section.split("```")[1].strip("\n")


def exchanges(transcript: str) -> list[tuple[str, str]]:
    """(command, answer) pairs of a walkthrough, with job ids and the proxy's address made the
    README's: the first id seen is J1, the next J2."""
    ids: dict[str, str] = {}

    def job(match: re.Match) -> str:
        return ids.setdefault(match.group(0), f"J{len(ids) + 1}")

    pairs = []
    for block in transcript.strip().split("\n\n"):
        command, _, answer = block.partition("\n")
        command = re.sub(r"http://[\w.]+:\d+", "http://localhost:8000", command)
        fix = lambda s: re.sub(r"(?<![0-9a-f])(?!000000)[0-9a-f]{6}(?![0-9a-f])", job, s)  # noqa: E731
        pairs.append((fix(command), fix(answer)))
    return pairs


def test_the_walkthrough_gives_the_readmes_answers() -> None:
    done = subprocess.run(
        ["./demo.sh"],
        cwd=CHAPTER,
        env={**os.environ, "PROXY_URL": proxy_url()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("demo: every answer as expected")
    got = exchanges(done.stdout.rstrip().removesuffix("demo: every answer as expected"))
    want = exchanges(readme_walkthrough())
    assert [c for c, _ in got] == [c for c, _ in want]
    for (command, answer), (_, expected) in zip(got, want, strict=True):
        if answer != expected and command.endswith("/job/J1") and '"complete"' not in expected:
            # The lookup right after the submit: queued, or already claimed or done.
            assert re.fullmatch(r'\{"J1":\{"status":"(queued|in_progress|complete)".*\}\}', answer)
            continue
        assert answer == expected, command


def test_the_page_loads_from_the_container() -> None:
    with urllib.request.urlopen(f"{proxy_url()}/", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert page == (CHAPTER / "index.html").read_text()  # the page, whole, from the image
    assert "fetch(" in page and "/predict" in page and "/job/" in page


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

        def targets() -> dict[str, str] | None:
            try:
                active = api("targets")["activeTargets"]
            except OSError:
                return None  # not answering yet
            health = {t["labels"]["job"]: t["health"] for t in active}
            return health if set(health.values()) == {"up"} else None

        health = wait_until(targets, 90, "every target up")
        assert health == {"proxy": "up", "worker": "up", "prometheus": "up"}
        # Found by Docker's DNS: the worker container's address and its METRICS_PORT.
        (worker,) = [t for t in api("targets")["activeTargets"] if t["labels"]["job"] == "worker"]
        assert worker["labels"]["instance"].endswith(":8001")
        queue = api("query?query=job_queue_length")["result"]
        assert {r["metric"]["state"] for r in queue} == {"waiting", "claimed"}
    finally:
        compose(*monitoring, "rm", "--stop", "--force", "--volumes", "prometheus")


def test_a_worker_process_killed_holding_a_job_loses_nothing() -> None:
    job_id, holder, others = hold_a_job()
    signal_worker(holder, "KILL")  # a real crash: the supervisor sees exit code -9
    for pid in others:
        signal_worker(pid, "CONT")
    answer = accurate_answer(job_id)
    assert answer["prediction"] == "Egyptian cat" and answer["model"] == "resnet50"
    assert holder not in worker_clients()  # replaced by the supervisor
    logs = compose("logs", "--no-color", "worker")
    assert '"worker died, starting another"' in logs and '"exitcode": -9' in logs
    assert f'"claim expired, job requeued", "job_id": "{job_id}"' in logs
    assert redis_cli("LLEN", f"{QUEUE}:processing").strip() == "0"
    wait_healthy("worker")


def test_the_worker_container_restarts_when_its_main_process_dies() -> None:
    # pid 1 of a container ignores every signal it has no handler for when it comes from inside
    # the container, SIGKILL included (`exec worker kill -9 1` does nothing): the kernel's rule for
    # a pid namespace's init. So the crash comes from the host, as the OOM killer's would.
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("needs the docker CLI to find the container's main process")
    (container,) = compose("ps", "-q", "worker").split()

    def inspect() -> dict:
        out = subprocess.run([docker, "inspect", container], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        details: dict = json.loads(out.stdout)[0]
        return details

    before = inspect()
    signal_worker(1, "KILL")  # from inside: ignored, as said above
    job_id, _, _ = hold_a_job()  # a process of the container holds a job when it dies
    assert inspect()["State"]["Pid"] == before["State"]["Pid"]  # kill -9 1 changed nothing
    os.kill(before["State"]["Pid"], signal.SIGKILL)  # the supervisor; its processes die with it

    def restarted() -> dict | None:
        # Docker marks the container Running (and Restarting, Pid 0) with the count already
        # raised while it waits out the restart delay: only a new Pid means it started again.
        state = inspect()
        again = state["RestartCount"] == before["RestartCount"] + 1
        started = state["State"]["Running"] and not state["State"]["Restarting"]
        return state if again and started and state["State"]["Pid"] else None

    after = wait_until(restarted, 60, "the restart policy to start the worker container again")
    assert after["State"]["Pid"] != before["State"]["Pid"]
    assert after["State"]["StartedAt"] > before["State"]["StartedAt"]
    # The claim outlives every process of the container: the new supervisor requeues it.
    answer = accurate_answer(job_id)
    assert answer["prediction"] == "Egyptian cat"
    wait_healthy("worker")  # as chapter.sh brought it up
