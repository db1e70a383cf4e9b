"""A real `sglang serve` on CPU (through the dev shims) in a child process: tests and the demo.

Started as ``python -m sglang_dflash.dev.cpu_shims serve`` in its own session, so
stopping it also stops SGLang's scheduler and detokenizer. Each server gets a thread
count (``OMP_NUM_THREADS``, default 1): two CPU servers with default threads on two
cores run about ten times slower than with one thread each.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 400
PORT_RETRIES = 2  # fresh ports tried when another process took the chosen one first
DEFAULT_THREADS = "1"
# With --skip-server-warmup, SGLang 0.5.23 posts /freeze_gc before uvicorn listens and logs
# the refused connection with its traceback: harmless, and the only traceback a healthy
# start-up writes.
BENIGN_TRACEBACKS = ("post-warmup freeze_gc failed",)
# a log record starts with SGLang's "[2026-12-01 10:16:24" timestamp
_RECORD_START = re.compile(r"^\[\d{4}-\d\d-\d\d ", re.MULTILINE)


class ServerExited(AssertionError):
    """The server process ended before it was healthy (its log tail is the message)."""


def cpu_tp_env(tp_size: int) -> dict[str, str]:
    """The environment a CPU server with ``--tp-size tp_size`` needs, one core per rank.

    SGLang 0.5.23 asserts at most one rank per NUMA node (``utils/numa_utils.py``) unless
    ``SGLANG_CPU_OMP_THREADS_BIND`` names a core group per rank ("0|1" for two ranks);
    it must be set before the schedulers spawn. Without sgl_kernel the binding itself is
    skipped and each rank runs ``OMP_NUM_THREADS`` threads.
    """
    cores = os.cpu_count() or 1
    return {"SGLANG_CPU_OMP_THREADS_BIND": "|".join(str(rank % cores) for rank in range(tp_size))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``Server(model, log, extra_args)`` starts the server and waits until it is healthy;
    with ``wait=False`` it only starts it (call ``wait_healthy`` later)."""

    def __init__(self, model: Path, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, wait: bool = True):
        self.model, self.log, self.extra_args = model, log, extra_args
        self.env = {"OMP_NUM_THREADS": DEFAULT_THREADS, **os.environ, **(env or {})}
        self._launch()
        if wait:
            try:
                self.wait_healthy()
            except BaseException:
                self.stop()
                raise

    def _launch(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "sglang_dflash.dev.cpu_shims", "serve", "--model-path", str(self.model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--skip-server-warmup", *self.extra_args]
        self.t0 = time.perf_counter()
        self.startup_s: float | None = None
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env)

    def _lost_port_race(self) -> bool:
        """The HTTP port was free when chosen, but taken before SGLang bound it (SGLang picks
        its internal ports, and binds the HTTP port last, after start-up)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"error while attempting to bind on address ('127.0.0.1', {self.port})" in text

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def healthy(self) -> bool:
        """One health probe; raises ServerExited if the process is gone."""
        if self.proc.poll() is not None:
            raise ServerExited(f"server exited (rc {self.proc.returncode}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                ok = r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        if ok and self.startup_s is None:
            self.startup_s = time.perf_counter() - self.t0
        return ok

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline, retries = time.monotonic() + timeout, PORT_RETRIES
        while time.monotonic() < deadline:
            try:
                if self.healthy():
                    return
            except ServerExited:
                if not (retries and self._lost_port_race()):
                    raise
                retries -= 1
                with contextlib.suppress(ProcessLookupError):  # whatever of it is left
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self._launch()
            time.sleep(1.0)
        raise AssertionError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

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

    def answer(self, input_ids: list[int], sampling: dict) -> tuple[int, list[int] | None]:
        """(HTTP status, output ids or None) of one /generate: a refusal is an answer too."""
        try:
            out, _ = self.post("/generate", {"input_ids": input_ids, "sampling_params": sampling})
        except urllib.error.HTTPError as err:
            return err.code, None
        return 200, out["output_ids"]

    def wait_idle(self, timeout: float = 120) -> dict:
        """SGLang's /v1/loads once no request runs or waits; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            load = self.get("/v1/loads")["loads"][0]
            if load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0:
                return load
            time.sleep(0.5)
        raise AssertionError(f"server still busy after {timeout} s: {load}")

    def hang_up_mid_stream(self, input_ids: list[int], chunks: int, max_new_tokens: int = 1000) -> None:
        """Start a long streamed greedy generation, read ``chunks`` events, close the connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = {"input_ids": input_ids, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = 0
        while seen < chunks:
            line = resp.readline()
            assert line, "stream ended early"
            seen += line.startswith(b"data:")
        conn.close()

    def tracebacks(self) -> list[str]:
        """The log records that carry a Python traceback, except ``BENIGN_TRACEBACKS``."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        starts = [m.start() for m in _RECORD_START.finditer(text)] + [len(text)]
        records = [text[a:b] for a, b in zip([0] + starts, starts)]
        return [r for r in records if "Traceback" in r and not any(b in r for b in BENIGN_TRACEBACKS)]

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
