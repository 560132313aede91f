"""Real processes on loopback: three services and a proxy, started on free ports, always stopped."""

import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processes import Process, start, start_proxy, start_services, wait_healthy  # noqa: E402

FUZZ_REQUESTS: Counter[str] = (
    Counter()
)  # app -> requests sent by test_fuzz.py, printed after the run
CONTAINER_NOTES: list[str] = []  # what test_containers.py saw, printed after the run


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for app, count in sorted(FUZZ_REQUESTS.items()):
        terminalreporter.write_line(f"fuzz: {count} requests to the {app}")
    for note in CONTAINER_NOTES:
        terminalreporter.write_line(f"containers: {note}")


@dataclass
class Cluster:
    services: dict[str, Process]
    proxy: Process


@contextmanager
def running_cluster(
    proxy_env: dict[str, str] | None = None,
    env_for: dict[str, dict[str, str]] | None = None,
    **service_env: str,
) -> Iterator[Cluster]:
    started: list[Process] = []
    try:
        services = start_services(env_for, ACCESS_LOG="0", **service_env)
        started.extend(services.values())
        urls = {name: process.url for name, process in services.items()}
        proxy = start_proxy(urls, ACCESS_LOG="0", **(proxy_env or {}))
        started.append(proxy)
        wait_healthy(*started)
        yield Cluster(services, proxy)
    finally:
        for process in started:
            process.stop()


# What the fixtures below give a test: a function that starts something (or calls it).
ClusterWith = Callable[..., Cluster]  # running_cluster's arguments
Http = Callable[..., tuple[int, Any]]  # call's arguments -> (status, JSON body)
MakeRecorder = Callable[..., "Recorder"]  # Recorder's arguments
MakeService = Callable[..., Process]  # settings of the service
MakeProxy = Callable[..., Process]  # services, then settings of the proxy


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    # A generous timeout: the machine is shared, and these tests are about answers, not speed.
    with running_cluster(proxy_env={"SERVICE_TIMEOUT_S": "5"}) as running:
        yield running


@pytest.fixture
def cluster_with() -> Iterator[ClusterWith]:
    """A private cluster for a test that slows or kills its services."""
    with ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(running_cluster(**kwargs))


def call(
    url: str,
    body: object = None,
    method: str | None = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, JSON body) of one HTTP request; body is JSON-encoded unless it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def http() -> Http:
    return call


def connect(url: str) -> socket.socket:
    """A raw TCP connection to an http://127.0.0.1:port URL, for what urllib cannot send."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def status_line(sock: socket.socket) -> bytes:
    """The first line the server sends, or b"" if it closes without answering."""
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n")[0]


class Recorder:
    """A stand-in service that records every request and answers with a fixed status.

    raw: the exact body bytes to answer with (any JSON, or none); endless: stream chunks with
    no Content-Length until the client hangs up; keep_alive: HTTP/1.1, connections kept open.
    ports: the client port of each request, which tells the connections apart.
    """

    def __init__(
        self,
        status: int = 200,
        body: dict | None = None,
        raw: bytes | None = None,
        endless: bool = False,
        keep_alive: bool = False,
    ):
        self.requests: list[str] = []
        self.ports: list[int] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 (the name http.server asks for)
                self.answer()

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.answer()

            def answer(self) -> None:
                recorder.requests.append(f"{self.command} {self.path}")
                recorder.ports.append(self.client_address[1])
                payload = raw if raw is not None else json.dumps(body or {"error": "broken"})
                payload = payload.encode() if isinstance(payload, str) else payload
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if not endless:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                    while endless:  # HTTP/1.0 style: the body ends when the connection does
                        self.wfile.write(b" " * 65536)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the proxy stopped reading: what a size cap should do

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[MakeRecorder]:
    recorders: list[Recorder] = []

    def make(**kwargs: Any) -> Recorder:
        recorders.append(Recorder(**kwargs))
        return recorders[-1]

    yield make
    for item in recorders:
        item.close()


@pytest.fixture
def service_with() -> Iterator[MakeService]:
    """One setosa service alone, with the settings a test gives it."""
    started: list[Process] = []

    def make(**env: str) -> Process:
        started.append(start("service.py", "setosa", {"MODE": "setosa", "ACCESS_LOG": "0", **env}))
        wait_healthy(started[-1])
        return started[-1]

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def proxy_for() -> Iterator[MakeProxy]:
    """A proxy alone, in front of whatever services a test names."""
    started: list[Process] = []

    def make(services: dict[str, str], **env: str) -> Process:
        started.append(start_proxy(services, ACCESS_LOG="0", **env))
        wait_healthy(started[-1])
        return started[-1]

    yield make
    for process in started:
        process.stop()
