"""Start and stop this chapter's processes on free ports: for the tests and the bench.

Everything runs as a real process, exactly as `make run` starts it: TensorFlow Serving (chapter
01's local stand-in, run as a program, never imported), the proxy, the workers, and a private
redis-server where a test needs to stop Redis.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCAL_SERVING = HERE.parent / "01_synchronous" / "local_serving.py"
MODELS = HERE.parent / "models"


def redis_url(db: int) -> str:
    """REDIS_URL (default the local server) with its database index replaced by `db`."""
    url = urllib.parse.urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    return url._replace(path=f"/{db}").geturl()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(method: str, url: str, body: object = None, timeout: float = 10) -> tuple[int, dict]:
    """(status, JSON body) for any status code."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def ready(proc: "Process", check: Callable[[], bool], timeout: float, what: str) -> "Process":
    """Return proc once check() is true. If it exits or times out: stop it, raise with its log."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{what}: process exited early{proc.output()}")
            try:
                if check():
                    return proc
            except (OSError, ValueError):
                pass  # not up yet
            time.sleep(0.1)
        raise TimeoutError(f"{what}: not ready after {timeout:.0f} s{proc.output()}")
    except BaseException:
        proc.close()
        raise


class Process:
    """A child process whose stdout+stderr go to a temporary file, shown when something fails."""

    def __init__(self, name: str, args: list[str], env: dict | None = None, stdin: str = ""):
        self.name = name
        fd, self.log_path = tempfile.mkstemp(prefix=f"02-{name}-", suffix=".log")
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.popen = subprocess.Popen(
            args, cwd=HERE, env=full_env, stdin=subprocess.PIPE, stdout=fd, stderr=fd
        )
        os.close(fd)
        assert self.popen.stdin is not None  # stdin=PIPE
        self.popen.stdin.write(stdin.encode())  # e.g. a secret that must not be in argv
        self.popen.stdin.close()
        self.pid = self.popen.pid

    def text(self) -> str:
        """Everything the process has printed so far."""
        return Path(self.log_path).read_text()

    def output(self, tail: int = 4000) -> str:
        """The end of it, headed with the name: for failure messages."""
        return f"\n--- {self.name} output ---\n" + self.text()[-tail:]

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # in case a test froze it
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def close(self) -> None:
        self.stop()
        Path(self.log_path).unlink(missing_ok=True)


def start_tf_serving(grpc_port: int, rest_port: int, timeout: float = 180) -> Process:
    if not LOCAL_SERVING.exists():
        raise FileNotFoundError(f"{LOCAL_SERVING} is missing: chapter 01 provides it")
    proc = Process(
        "tf-serving",
        [
            sys.executable,
            str(LOCAL_SERVING),
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            "--model_name=iris",
            f"--model_base_path={MODELS / 'iris'}",
        ],
    )
    url = f"http://127.0.0.1:{rest_port}/v1/models/iris"

    def available() -> bool:
        status, body = http("GET", url, timeout=2)
        return status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"

    return ready(proc, available, timeout, url)


def start_proxy(env: dict, timeout: float = 60) -> Process:
    proc = Process("proxy", [sys.executable, "proxy.py"], env)
    url = f"http://127.0.0.1:{env['PORT']}/jobs"
    up = (200, 401) if env.get("API_KEY") else (200,)  # 401: up, and it wants the key
    return ready(proc, lambda: http("GET", url, timeout=2)[0] in up, timeout, url)


def start_worker(env: dict, timeout: float = 120) -> Process:
    """Returns once every worker process (NUM_WORKERS) has logged that it started: importing
    TensorFlow takes a while."""
    env = {"METRICS_PORT": str(free_port()), **env}  # several workers may share one env
    proc = Process("worker", [sys.executable, "worker.py"], env)
    count = int(env.get("NUM_WORKERS", "1"))
    return ready(proc, lambda: proc.text().count('"worker started"') >= count, timeout, "worker")


def start_redis(port: int, password: str = "", timeout: float = 10) -> Process:
    """A private redis-server; a password goes in as configuration on stdin, not in argv."""
    proc = Process(
        "redis",
        [
            "redis-server",
            "-",  # read configuration from stdin too
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdin=f'requirepass "{password}"\n' if password else "",
    )

    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))

    return ready(proc, pong, timeout, f"redis-server on port {port}")
