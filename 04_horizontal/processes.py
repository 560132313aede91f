"""Start this chapter's processes on free loopback ports, for the tests and the bench.

Real processes (`python service.py`, `python proxy.py`), exactly as `make run` starts them; only
the ports and a few settings differ.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = ("setosa", "versicolor", "virginica")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # (host, port) for AF_INET
        return port


@dataclass
class Process:
    name: str
    script: str
    url: str
    env: dict[str, str] = field(repr=False)
    popen: subprocess.Popen[bytes] = field(init=False, repr=False)  # set by spawn()

    def spawn(self) -> "Process":
        self.popen = subprocess.Popen(
            [sys.executable, self.script],
            cwd=HERE,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        """A crash: SIGKILL, nothing runs in the process any more."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """A normal stop, as an orchestrator does it: SIGTERM, on which uvicorn finishes its
        requests and exits (and coverage, under `make test`, saves what the process ran);
        SIGKILL if it is still running after timeout seconds."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start(script: str, name: str, env: dict[str, str]) -> Process:
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
    return Process(name, script, f"http://127.0.0.1:{port}", env).spawn()


def wait_healthy(*processes: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        while True:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}")
            try:
                with urllib.request.urlopen(process.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.name} not healthy at {process.url} after {timeout}s")
            time.sleep(0.1)


def start_services(
    env_for: dict[str, dict[str, str]] | None = None, /, **common_env: str
) -> dict[str, Process]:
    """One service per class; env_for={"virginica": {...}} adds settings for one of them."""
    env_for = env_for or {}
    return {
        mode: start("service.py", mode, {"MODE": mode, **common_env, **env_for.get(mode, {})})
        for mode in CLASSES
    }


def start_proxy(services: dict[str, str], **env: str) -> Process:
    setting = ",".join(f"{name}={url}" for name, url in services.items())
    return start("proxy.py", "proxy", {"SERVICES": setting, **env})
