"""Stock `sglang serve` on CPU (through the dev shims) answering over HTTP.

One server per module: a tiny random-weight Qwen3 (written by
``fixtures/make_tiny_qwen3.py``), fp32, ``--attention-backend torch_native``, started
with ``python -m sglang_dflash.cpu_shims serve``. Its greedy tokens must equal a
pure-torch greedy run of the same weights (transformers' Qwen3 in fp32; the logit gaps
of these weights are >= 1e-2, far above fp32 kernel noise). Start-up time and
per-token latency are printed (``pytest -s``), not asserted: the machine is shared.
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

import pytest
import torch
from sglang_env import free_port, require_sglang

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_tiny_qwen3 import BOS, make_tiny_qwen3  # noqa: E402

require_sglang()
pytestmark = pytest.mark.slow

PROMPT = "the cat sat on the"
START_TIMEOUT_S = 300


class Server:
    def __init__(self, model: Path, log: Path):
        self.model, self.port, self.log = model, free_port(), log
        cmd = [sys.executable, "-m", "sglang_dflash.cpu_shims", "serve", "--model-path", str(model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-total-tokens", "2048", "--skip-server-warmup"]
        t0 = time.perf_counter()
        # own session: the server's scheduler and detokenizer are stopped with it
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_healthy()
        self.startup_s = time.perf_counter() - t0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited (rc {self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise AssertionError(f"server not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def post(self, path: str, body: dict) -> tuple[dict, float]:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read()), time.perf_counter() - t0

    def generate(self, input_ids: list[int], n: int) -> tuple[list[int], float]:
        out, seconds = self.post("/generate", {"input_ids": input_ids, "sampling_params": {
            "max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
        return out["output_ids"], seconds

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_server")
    srv = Server(make_tiny_qwen3(root / "tiny_qwen3"), root / "server.log")
    print(f"\nCPU server start-up: {srv.startup_s:.1f} s")
    yield srv
    srv.stop()


def torch_greedy(model_dir: Path, input_ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, out = torch.tensor([input_ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_tokens_match_torch(server):
    prompt_ids = [BOS] + list(PROMPT.encode())
    got, _ = server.generate(prompt_ids, 24)
    assert got == torch_greedy(server.model, prompt_ids, 24)


def test_openai_completion(server):
    out, _ = server.post("/v1/completions", {"model": str(server.model), "prompt": PROMPT,
                                             "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    choice = out["choices"][0]
    assert out["usage"]["completion_tokens"] == 8 and choice["finish_reason"] == "length"
    # the same request through SGLang's native endpoint gives the same text
    native, _ = server.post("/generate", {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
    assert choice["text"] == native["text"]


def test_latency_report(server):
    prompt_ids = [BOS] + list(PROMPT.encode())
    server.generate(prompt_ids, 1)  # the prompt is now in the radix cache
    _, one = server.generate(prompt_ids, 1)
    ids, many = server.generate(prompt_ids, 65)
    assert len(ids) == 65
    print(f"\nCPU server decode: {1000 * (many - one) / 64:.1f} ms/token "
          f"(first token {1000 * one:.0f} ms)")
