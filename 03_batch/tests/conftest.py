"""Fixtures: a real MariaDB/MySQL (own database per test), the real API and job as processes."""

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pymysql
import pytest

CHAPTER = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHAPTER))

import db  # noqa: E402
from config import Settings  # noqa: E402

BASE = Settings.from_env()
T = TypeVar("T")


ACCESS_DENIED = (1045, 1698)  # wrong password / unknown account; unix-socket-only account
NO_SERVER_HINT = (
    "Start one: install the Debian package mariadb-server (Homebrew: mariadb), or set\n"
    "MYSQL_HOST/MYSQL_PORT/MYSQL_USER/MYSQL_PASSWORD. (The compose stack's MySQL publishes no\n"
    "port; `make containers` tests the stack itself.)"
)
DENIED_HINT = r"""The server is up but refuses the account. A stock Debian MariaDB lets root in
through the unix socket only; create an account for the tests there (as .ci/run does):
  mariadb -e "CREATE USER 'batch_test'@'127.0.0.1';
              GRANT ALL PRIVILEGES ON \`batch\\_%\`.* TO 'batch_test'@'127.0.0.1'"
and run the tests with MYSQL_USER=batch_test (or set MYSQL_USER/MYSQL_PASSWORD)."""


@pytest.fixture(scope="session", autouse=True)
def mysql_server(request: pytest.FixtureRequest) -> None:
    """Stop the run at once, with a clear message, when there is no database server to test
    against or it refuses our account."""
    if all(item.get_closest_marker("containers") for item in request.session.items):
        return  # the container checks use the compose stack's MySQL (make containers)
    try:
        db.connect(BASE, database=False).close()
    except pymysql.err.MySQLError as e:
        hint = DENIED_HINT if e.args and e.args[0] in ACCESS_DENIED else NO_SERVER_HINT
        pytest.exit(
            f"cannot use MySQL at {BASE.mysql_host}:{BASE.mysql_port} as {BASE.mysql_user}"
            f" ({e}).\n{hint}",
            returncode=2,
        )


@pytest.fixture
def settings() -> Iterator[Settings]:
    """Settings for a fresh database of this test's own (batch_test_<random>), dropped after."""
    s = dataclasses.replace(BASE, mysql_database=f"batch_test_{secrets.token_hex(4)}")
    db.apply_schema(s)
    yield s
    db.drop_database(s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def env_for(settings: Settings, **extra: object) -> dict[str, str]:
    env = dict(
        os.environ,
        MYSQL_HOST=settings.mysql_host,
        MYSQL_PORT=str(settings.mysql_port),
        MYSQL_USER=settings.mysql_user,
        MYSQL_PASSWORD=settings.mysql_password,
        MYSQL_DATABASE=settings.mysql_database,
        API_KEY="",  # off unless a test turns it on
        METRICS_PORT="0",  # the job's metrics server: off unless a test gives it a free port
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Process(subprocess.Popen[bytes]):
    """A started process and the file its output goes to."""

    log_path: str
    log_file: IO[str]


class Processes:
    """Processes a test starts; all of them are stopped at the end, pass or fail."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Process] = []

    def start(self, args: list[str], env: dict[str, str], name: str) -> Process:
        log = open(self.tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed in stop_all)
        proc = Process(
            [sys.executable, *args], cwd=CHAPTER, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        proc.log_path, proc.log_file = log.name, log
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        # SIGTERM first, so a process's coverage data is written; SIGKILL if it does not stop.
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.log_file.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def read_log(proc: Process) -> str:
    with open(proc.log_path) as f:
        return f.read()


def log_lines(proc: Process) -> list[dict[str, Any]]:
    """The JSON log lines a process wrote so far (every line must be JSON)."""
    with open(proc.log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for(predicate: Callable[[], T], timeout: float = 60, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http(
    method: str, url: str, body: object = None, raw: bytes | None = None, auth: str | None = None
) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_api(
    processes: Processes, settings: Settings, env: dict[str, str] | None = None, **extra: object
) -> str:
    """The API as a process on a free port (or env's PORT); returns its URL once it is up."""
    if env is None:
        env = env_for(settings, PORT=free_port(), HOST="127.0.0.1", **extra)
    proc = processes.start(["api.py"], env, "api")
    url = f"http://127.0.0.1:{env['PORT']}"

    def up() -> bool:
        assert proc.poll() is None, f"api exited early: {read_log(proc)}"
        try:
            return http("GET", url + "/health")[0] == 200
        except (OSError, ValueError):
            return False

    wait_for(up, what="the API to answer /health")
    return url


@pytest.fixture
def api(processes: Processes, settings: Settings) -> str:
    return start_api(processes, settings)


def run_job(
    settings: Settings, timeout: float = 300, **env: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "job.py", "--once"],
        cwd=CHAPTER,
        env=env_for(settings, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def insert_rows(settings: Settings, values_list: list[list[float]]) -> list[int]:
    conn = db.connect(settings)
    try:
        items = db.insert_items(conn, values_list)
        conn.commit()
    finally:
        conn.close()
    return [item["id"] for item in items]


def query(settings: Settings, sql: str, args: object = None) -> list[tuple[Any, ...]]:
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            rows = list(cur.fetchall())
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def private_mysql(
    tmp_path: Path, processes: Processes
) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    """A MariaDB server of this test's own, on a free port, that the test may stop."""
    install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd")
    if not (install and server):
        pytest.skip("needs mariadb-install-db and mariadbd (Debian package mariadb-server)")
    datadir = tmp_path / "mysql"
    subprocess.run(
        [install, "--no-defaults", f"--datadir={datadir}", "--user=root",
         "--auth-root-authentication-method=normal", "--skip-test-db"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={datadir}", "--user=root", f"--port={port}",
         "--bind-address=127.0.0.1", f"--socket={tmp_path / 'mysql.sock'}", "--skip-log-bin",
         "--innodb-buffer-pool-size=16M"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    s = Settings(mysql_host="127.0.0.1", mysql_port=port, mysql_database="batch_private")

    def ready() -> bool:
        try:
            db.apply_schema(s)
            return True
        except pymysql.err.MySQLError:
            return False

    try:
        wait_for(ready, timeout=60, what="the private MariaDB server")
        yield s, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the container checks saw, and how many requests the fuzz test sent to each
    operation (when they ran)."""
    containers = sys.modules.get("test_containers")
    for note in containers.NOTES if containers else []:
        terminalreporter.write_line(f"containers: {note}")
    fuzz = sys.modules.get("test_fuzz")
    if fuzz and fuzz.REQUESTS:
        terminalreporter.write_line(f"schemathesis requests: {sum(fuzz.REQUESTS.values())} in all")
        for operation, n in sorted(fuzz.REQUESTS.items()):
            terminalreporter.write_line(f"  {n:5} {operation}")
