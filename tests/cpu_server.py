"""A real `sglang serve` on CPU (through the dev shims) in a child process, for tests.

Started with ``python -m sglang_dflash.cpu_shims serve`` in its own session, so
stopping it also stops SGLang's scheduler and detokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sglang_env import free_port

START_TIMEOUT_S = 400


class ServerExited(AssertionError):
    """The server process ended before it was healthy (its log tail is the message)."""


class Server:
    def __init__(self, model: Path, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.model, self.port, self.log = model, free_port(), log
        cmd = [sys.executable, "-m", "sglang_dflash.cpu_shims", "serve", "--model-path", str(model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--skip-server-warmup", *extra_args]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(f"server exited (rc {self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise AssertionError(f"server not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def post(self, path: str, body: dict, timeout: float = 600) -> tuple[dict, float]:
        """(the JSON answer, seconds it took)."""
        text, seconds = self.post_text(path, body, timeout)
        return json.loads(text), seconds

    def post_text(self, path: str, body: dict, timeout: float = 600) -> tuple[str, float]:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode(), time.perf_counter() - t0

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url(path), timeout=60) as r:
            return json.loads(r.read())

    def generate(self, input_ids: list[int], n: int, **params) -> tuple[dict, float]:
        """SGLang's native /generate, greedy unless ``params`` say otherwise."""
        sampling = {"max_new_tokens": n, "temperature": 0, **params}
        return self.post("/generate", {"input_ids": input_ids, "sampling_params": sampling})

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
