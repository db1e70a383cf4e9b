"""The bundled MHA drafter (4 heads x head dim 24, 4 KV heads) for the tiny Kimi target.

Its head dim is not a power of two, like the published drafter's 72, so the kernels run
their masked head-dim paths (draft_attention pads D 24 to a 32-wide tile, draft_kv the
rotated half 12 to 16). Made by ``python -m sglang_dflash.dev.train --drafter-only
--drafter-heads 4 --drafter-kv-heads 4 --drafter-head-dim 24 --drafter-out
sglang_dflash/assets/tiny-dflash-mha``.
"""

import pytest
import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.check import run_check
from sglang_dflash.drafter import DFlashDrafter
from sglang_dflash.reference.demo import use_ops
from sglang_dflash.acceptance import acceptance_stats
from sglang_dflash.reference.loop import generate_dflash, generate_plain
from sglang_dflash.reference.offline import teacher_forced_commit_lens
from sglang_dflash.reference.sampling import SamplingParams
from sglang_dflash.reference.tiny_pair import ASSETS, DEMO_PROMPTS, TARGET_DIR, encode, load_tiny_pair

MHA_DIR = ASSETS / "tiny-dflash-mha"
PROMPTS = [encode(p) for p in DEMO_PROMPTS]


def _pair(backend: str):
    target, drafter = load_tiny_pair(TARGET_DIR, MHA_DIR)
    ops = get_ops(backend)
    use_ops(target, drafter, ops)
    return target, drafter, ops


@pytest.fixture(scope="module")
def torch_pair():
    return _pair("torch")


@pytest.fixture(scope="module")
def plain(torch_pair):
    """The target's own greedy continuations of the demo prompts, 64 tokens (or to EOS)."""
    target, _, _ = torch_pair
    return generate_plain(target, PROMPTS, [SamplingParams(max_new_tokens=64)] * len(PROMPTS))


def test_bundled_asset_is_mha_with_a_masked_head_dim():
    target, drafter = load_tiny_pair(TARGET_DIR, MHA_DIR)
    cfg = drafter.cfg
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 4, 24)
    assert cfg.hidden_size == target.config.hidden_size == 64
    assert cfg.head_dim & (cfg.head_dim - 1) and (cfg.head_dim // 2) & (cfg.head_dim // 2 - 1)
    assert sum(f.stat().st_size for f in MHA_DIR.iterdir()) < 2**20


def test_check_accepts_it_against_the_tiny_kimi_target():
    ok, report = run_check(MHA_DIR, TARGET_DIR)
    assert ok, report
    assert "heads 4 q / 4 kv x 24" in report and "1 (kda), 3 (mla), 5 (kda)" in report


def test_greedy_lossless_with_torch_ops_and_offline_tau_well_above_chance(torch_pair, plain):
    """Online: the plain tokens exactly. Offline (teacher-forced on those tokens): the
    same blocks, tau well above 3; the same shape untrained: about 1 (nothing accepted)."""
    target, drafter, ops = torch_pair
    spec = generate_dflash(target, drafter, PROMPTS, [SamplingParams(max_new_tokens=64)] * len(PROMPTS), ops)
    assert [s.tokens for s in spec] == [p.tokens for p in plain]
    assert [s.finish_reason for s in spec] == [p.finish_reason for p in plain]
    continuations = [p.tokens for p in plain]
    walked = teacher_forced_commit_lens(target, drafter, ops, PROMPTS, continuations, 16)
    assert walked == [s.commit_lens for s in spec]
    trained = acceptance_stats([n for per in walked for n in per], 16)
    torch.manual_seed(1)
    untrained = DFlashDrafter(drafter.cfg).eval()
    untrained.ops = ops
    chance = acceptance_stats([n for per in teacher_forced_commit_lens(
        target, untrained, ops, PROMPTS, continuations, 16) for n in per], 16)
    print(f"offline tau: trained MHA drafter {trained.tau:.3f} over {trained.steps} steps, "
          f"untrained {chance.tau:.3f}")
    assert chance.tau < 1.5
    assert trained.tau >= 3.0, f"offline tau {trained.tau:.3f}: the MHA drafter does not match its target"


def test_greedy_lossless_with_triton_kernels(torch_pair, plain):
    """Every op through its Triton kernel (interpreter on CPU): the plain tokens, and the
    same blocks as the torch twins."""
    target, drafter, ops = torch_pair
    # three prompts: the interpreter is slow, and the Kimi server test serves all six this way
    prompts = PROMPTS[:3]
    params = [SamplingParams(max_new_tokens=16)] * len(prompts)
    reference = generate_dflash(target, drafter, prompts, params, ops)
    t_target, t_drafter, t_ops = _pair("triton")
    fast = generate_dflash(t_target, t_drafter, prompts, params, t_ops)
    assert [r.tokens for r in fast] == [p.tokens[:16] for p in plain[:3]]
    assert [r.commit_lens for r in fast] == [r.commit_lens for r in reference]
