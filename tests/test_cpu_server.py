"""Stock `sglang serve` on CPU (through the dev shims) answering over HTTP.

One server per module: a tiny random-weight Qwen3 (written by
``fixtures/make_tiny_qwen3.py``), fp32, ``--attention-backend torch_native``, started
with ``python -m sglang_dflash.dev.cpu_shims serve``. Its greedy tokens must equal a
pure-torch greedy run of the same weights (transformers' Qwen3 in fp32; the logit gaps
of these weights are >= 1e-2, far above fp32 kernel noise). Start-up time and
per-token latency are printed (``pytest -s``), not asserted: the machine is shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from sglang_env import require_sglang

from sglang_dflash.dev.server import Server

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_tiny_qwen3 import BOS, make_tiny_qwen3  # noqa: E402

require_sglang()
pytestmark = pytest.mark.slow

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_server")
    srv = Server(make_tiny_qwen3(root / "tiny_qwen3"), root / "server.log",
                 ("--max-total-tokens", "2048"))
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
    out, _ = server.generate(prompt_ids, 24, ignore_eos=True)
    got = out["output_ids"]
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
    server.generate(prompt_ids, 1, ignore_eos=True)  # the prompt is now in the radix cache
    _, one = server.generate(prompt_ids, 1, ignore_eos=True)
    out, many = server.generate(prompt_ids, 65, ignore_eos=True)
    assert len(out["output_ids"]) == 65
    print(f"\nCPU server decode: {1000 * (many - one) / 64:.1f} ms/token "
          f"(first token {1000 * one:.0f} ms)")
