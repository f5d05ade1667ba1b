"""A real `quiver serve` process on a free port, for the service's tests and its benchmark."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
QUIVER = Path(sys.executable).parent / "quiver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`quiver serve` for DAGSTER_HOME `home`, its log in `log`; `wait_ready` returns /readyz's answer."""

    def __init__(self, home: Path, log: Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.home, self.log_path = home, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args or []
        self.env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServerProcess":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(QUIVER), "serve", "--port", str(self.port), *self.args], cwd=PROJECT,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_listening(self, timeout_s: float = 120) -> None:
        self._wait(lambda: self._answers("/healthz"), timeout_s, "listening")

    def wait_ready(self, timeout_s: float = 300) -> dict[str, Any]:
        self._wait(lambda: self._answers("/readyz") == 200, timeout_s, "ready")
        return self.get("/readyz")[1]

    def _answers(self, path: str) -> int | None:
        try:
            return self.get(path)[0]
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _wait(self, done: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"quiver serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"quiver serve was not {what} after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
