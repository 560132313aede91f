"""Ctrl-C on demo.sh and bench.py: a real SIGINT to the whole process group, as a terminal
sends it, while job processes run. Nothing they started may outlive them."""

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from config import Settings
from conftest import CHAPTER, env_for, free_port, query, wait_for


def group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of a process group, with their command lines."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append((int(stat.parent.name), cmdline))
    return found


def jobs_running(pgid: int, n: int) -> bool:
    return sum("job.py" in cmd for _, cmd in group_members(pgid)) >= n


def interrupt_and_check(proc: subprocess.Popen, group: bool = True) -> None:
    """SIGINT to the whole group (Ctrl-C in a terminal) or to the process alone (`kill -INT`,
    a CI runner cancelling)."""
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    # At the moment the script has exited, everything it started must be gone already.
    left = group_members(proc.pid)
    if left:
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], left


def bench_databases(settings: Settings) -> set[str]:
    return {r[0] for r in query(settings, "SHOW DATABASES LIKE 'batch\\_bench\\_%%'")}


StartGroup = Callable[[list[str], dict[str, str]], subprocess.Popen[bytes]]


@pytest.fixture
def own_group() -> Iterator[StartGroup]:
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, cwd=CHAPTER, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:  # even if the test failed half-way
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_on_demo_stops_its_jobs_and_api(settings: Settings, own_group: StartGroup) -> None:
    env = env_for(settings, PORT=free_port(), DEMO_DATABASE=settings.mysql_database + "_demo")
    demo = own_group(["bash", "demo.sh"], env)
    wait_for(lambda: jobs_running(demo.pid, 3), timeout=120, what="the demo's three jobs")
    interrupt_and_check(demo)
    assert demo.returncode != 0
    assert query(settings, "SHOW DATABASES LIKE %s", (env["DEMO_DATABASE"],)) == []


@pytest.mark.parametrize("group", [True, False], ids=["ctrl-c", "kill -INT"])
def test_sigint_on_bench_stops_its_jobs(
    settings: Settings, own_group: StartGroup, group: bool
) -> None:
    before = bench_databases(settings)
    # One row per chunk and one thread: the job takes seconds, so Ctrl-C lands while it runs.
    env = env_for(settings, CHUNK_SIZE=1, THREADS=1)
    bench = own_group([sys.executable, "bench.py", "--rows", "3000", "--processes", "1"], env)

    def predicting() -> bool:  # the job has loaded its model and commits chunks
        new = bench_databases(settings) - before
        sql = f"SELECT COUNT(*) FROM `{new.pop()}`.items WHERE state = 1" if new else None
        return sql is not None and query(settings, sql)[0][0] > 0

    wait_for(lambda: jobs_running(bench.pid, 1), timeout=120, what="the bench's job")
    wait_for(predicting, timeout=120, what="the job's first chunks")
    interrupt_and_check(bench, group)
    assert bench.returncode != 0
    assert bench_databases(settings) == before  # its database was dropped too


def test_a_refused_account_stops_the_tests_at_once_with_a_hint() -> None:
    # The server is up (the other tests use it) but knows no such account: the session fixture
    # must say so and stop, not report "cannot reach" nor let every test fail on its own.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_api.py"],
        cwd=CHAPTER, env=dict(os.environ, MYSQL_USER="no_such_user_03"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:]
    assert "refuses the account" in done.stdout and "batch_test" in done.stdout
    assert " passed" not in done.stdout and " failed" not in done.stdout
