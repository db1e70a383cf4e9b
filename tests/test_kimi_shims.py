"""The dev shims that serve SGLang's Kimi-Linear on CPU (``sglang_dflash.dev.kimi_shims``).

The torch versions of SGLang's KDA kernels (``dev/kda_torch.py``) against the kernels
themselves, run in the Triton interpreter on random inputs of irregular shape (K, V not
powers of two, GQA, ragged sequences, padding rows), with untouched state slots checked
bit for bit; the ReplaySSM fold against the verify kernel's own per-step states; the
interpreter shims on kernels that fail without them.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close
from sglang_env import require_sglang

require_sglang()

from sglang_dflash.dev import kda_torch, kimi_shims  # noqa: E402

H, HV, K, V = 2, 4, 12, 10  # GQA; head dims below the kernel's power-of-two tiles
SLOTS = 6


def random_call(lens: list[int], slots: list[int], seed: int, a_4d: bool = False) -> dict:
    """Arguments of one fused_sigmoid_gating_delta_rule_update call, KDA branch, varlen."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(A_log=rand(HV) * 0.5, a=rand(1, T, HV, K) if a_4d else rand(1, T, HV * K), dt_bias=rand(HV * K),
                softplus_beta=1.0, softplus_threshold=20.0, q=rand(1, T, H, K), k=rand(1, T, H, K),
                v=rand(1, T, HV, V), b=rand(1, T, HV), initial_state_source=rand(SLOTS, HV, V, K),
                initial_state_indices=torch.tensor(slots, dtype=torch.int32), cu_seqlens=cu,
                use_qk_l2norm_in_kernel=True, is_kda=True)


def both(args: dict, **extra) -> tuple[tuple, tuple]:
    """(kernel, twin): each call's output and the tensors it writes, from equal copies."""
    from sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent import (
        fused_sigmoid_gating_delta_rule_update as kernel,
    )

    results = []
    for fn in (kernel, kda_torch.fused_sigmoid_gating_delta_rule_update):
        call = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in {**args, **extra}.items()}
        out = fn(**call)
        written = [call["initial_state_source"]] + [call[k] for k in (
            "intermediate_states_buffer", "replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta")
            if call.get(k) is not None]
        results.append((out, *written))
    return results[0], results[1]


def assert_untouched(name: str, before: torch.Tensor, after: torch.Tensor, written: list[int]) -> None:
    keep = [i for i in range(before.shape[0]) if i not in written]
    assert torch.equal(before[keep], after[keep]), f"{name}: slots {keep} changed"


@pytest.mark.parametrize("lens,slots,a_4d", [([3, 1, 5], [4, -1, 1], False), ([1, 1, 1], [0, 5, 2], True)],
                         ids=["extend-ragged-pad", "decode-a4d"])
def test_recurrent_twin_extend_and_decode(lens, slots, a_4d):
    args = random_call(lens, slots, seed=len(lens) + sum(lens), a_4d=a_4d)
    (o_ref, pool_ref), (o, pool) = both(args)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("state", pool_ref, pool, 1e-5)
    assert_untouched("state", args["initial_state_source"], pool, [s for s in slots if s >= 0])
    assert not torch.equal(pool[slots[0]], args["initial_state_source"][slots[0]]), "state not updated"


def verify_buffers(rows: int, steps: int, ring_len: int) -> dict:
    """Poisoned verify scratch: per-step states and per-layer ReplaySSM ring views."""
    nan = lambda *shape: torch.full(shape, float("nan"))  # noqa: E731
    return dict(intermediate_states_buffer=nan(rows, steps, HV, V, K),
                replayssm_rawv=nan(2, SLOTS, HV, ring_len, V)[1], replayssm_rawk=nan(2, SLOTS, H, ring_len, K)[1],
                replayssm_g=nan(2, SLOTS, HV, ring_len, K)[1], replayssm_beta=nan(2, SLOTS, HV, ring_len)[1])


@pytest.mark.parametrize("ring_len", [32, 12], ids=["ring32", "ring12-short"])
def test_recurrent_twin_verify_with_states_and_ring(ring_len):
    """Chain verify: the committed pool untouched, each step's state into the scratch row,
    raw k/v, gate and beta into the slot's ring (steps past a short ring dropped)."""
    L, slots, rows = 16, [3, 0], [2, 0]
    args = random_call([L, L], slots, seed=ring_len)
    extra = dict(disable_state_update=True, intermediate_state_indices=torch.tensor(rows, dtype=torch.int32),
                 cache_steps=L, cache_ring=True, **verify_buffers(3, L, ring_len))
    ref, ours = both(args, **extra)
    names = ("o", "state", "intermediate", "rawv", "rawk", "g", "beta")
    for name, r, o in zip(names, ref, ours):
        assert torch.equal(r.isnan(), o.isnan()), f"{name}: written elements differ"
        assert_close(name, torch.nan_to_num(r), torch.nan_to_num(o), 1e-5)
    assert torch.equal(ours[1], args["initial_state_source"]), "verify must not write the committed pool"
    assert ours[2][1].isnan().all(), "scratch row of no request written"


def test_replayssm_fold_replays_what_the_verify_kernel_computed():
    """The fold of the ring the (interpreted) verify kernel wrote gives its own per-step
    states: the state after commit_len steps in the slot, the tracked step in the track slot."""
    from sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent import (
        fused_sigmoid_gating_delta_rule_update as kernel,
    )

    L, slots, rows = 16, [3, 1], [0, 1]
    args = random_call([L, L], slots, seed=5)
    bufs = verify_buffers(2, L, 32)
    kernel(**args, disable_state_update=True, intermediate_state_indices=torch.tensor(rows, dtype=torch.int32),
           cache_steps=L, cache_ring=True, **bufs)
    state = args["initial_state_source"].clone()[None]  # one layer
    commit = torch.tensor([5, 16])
    kda_torch.commit_kda_replayssm_spec_all_layers(
        state, bufs["replayssm_rawv"][None], bufs["replayssm_rawk"][None], bufs["replayssm_g"][None],
        bufs["replayssm_beta"][None], torch.tensor(slots), commit, max_cache_len=32, num_k_heads=H,
        mamba_track_indices=torch.tensor([-1, 4]), mamba_steps_to_track=torch.tensor([-1, 9]), null_block_id=-1)
    steps = bufs["intermediate_states_buffer"]
    for slot, row, n in zip(slots, rows, commit.tolist()):
        assert_close(f"slot {slot} after {n}", steps[row, n - 1], state[0, slot], 1e-5)
    assert_close("track slot", steps[1, 9], state[0, 4], 1e-5)
    assert_untouched("state", args["initial_state_source"], state[0], slots + [4])


DIM, WIDTH = 20, 4  # conv channels (not a power of two), the KDA short-conv width


def conv_inputs(seed: int, *shape) -> tuple:
    """(weight [DIM, W], bias [DIM], a state pool in KDA's layout viewed as [N, DIM, W-1], x)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(SLOTS, WIDTH - 1, DIM, generator=g).transpose(-1, -2)  # non-contiguous, as KDA's
    return torch.randn(DIM, WIDTH, generator=g), torch.randn(DIM, generator=g), pool, torch.randn(*shape, generator=g)


def test_causal_conv_twin_prefill():
    from sglang.kernels.ops.mamba.causal_conv1d_triton import causal_conv1d_fn

    lens, slots, initial = [5, 2, 1, 7], [4, -1, 1, 2], [True, False, True, False]
    weight, bias, pool, x = conv_inputs(1, sum(lens), DIM)
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    outs = []
    for fn in (causal_conv1d_fn, kda_torch.causal_conv1d_fn):
        states = pool.clone().transpose(-1, -2).contiguous().transpose(-1, -2)
        out = fn(x.t(), weight, bias, activation="silu", conv_states=states, has_initial_state=torch.tensor(initial),
                 cache_indices=torch.tensor(slots, dtype=torch.int32), query_start_loc=qsl, seq_lens_cpu=lens)
        outs.append((out, states))
    (o_ref, s_ref), (o, s) = outs
    live = torch.cat([torch.arange(a, b) for a, b, slot in zip(qsl[:-1], qsl[1:], slots) if slot >= 0])
    assert_close("out", o_ref[:, live], o[:, live], 1e-6)
    assert torch.equal(s_ref, s), "prefill conv windows are data movement: bit-identical"
    assert_untouched("conv state", pool, s, [t for t in slots if t >= 0])


@pytest.mark.parametrize("T", [1, 16], ids=["decode", "verify"])
def test_causal_conv_twin_update(T):
    from sglang.kernels.ops.mamba.causal_conv1d_triton import causal_conv1d_update

    slots, rows = [3, 0, 5], [1, 2, 0]
    weight, bias, pool, x = conv_inputs(T, len(slots), DIM, T)
    x = x[..., 0] if T == 1 else x  # decode passes [B, dim]
    outs = []
    for fn in (causal_conv1d_update, kda_torch.causal_conv1d_update):
        states = pool.clone().transpose(-1, -2).contiguous().transpose(-1, -2)
        inter = torch.full((3, 16, WIDTH - 1, DIM), float("nan")).transpose(-1, -2)  # KDA's transposed scratch
        out = fn(x, states, weight, bias, activation="silu", conv_state_indices=torch.tensor(slots, dtype=torch.int32),
                 intermediate_conv_window=inter if T > 1 else None,
                 intermediate_state_indices=torch.tensor(rows, dtype=torch.int32))
        outs.append((out, states, inter))
    (o_ref, s_ref, i_ref), (o, s, i) = outs
    assert_close("out", o_ref, o, 1e-6)
    assert torch.equal(s_ref, s) and torch.equal(i_ref.isnan(), i.isnan())
    assert torch.equal(torch.nan_to_num(i_ref), torch.nan_to_num(i)), "per-step windows: bit-identical"
    assert_untouched("conv state", pool, s, slots)


@pytest.mark.parametrize("activation", ["sigmoid", "swish"])
def test_gated_norm_twin(activation):
    from sglang.kernels.ops.attention.fla.fused_norm_gate import rms_norm_gated

    g = torch.Generator().manual_seed(2)
    x, gate = torch.randn(1, 7, 3, 24, generator=g), torch.randn(7, 72, generator=g)[:, None].view(1, 7, 3, 24)
    weight = torch.randn(24, generator=g)
    # both write the result into x
    x_ref, x_ours = x.clone(), x.clone()
    ref = rms_norm_gated(x_ref, gate, weight, None, activation, eps=1e-5)
    ours = kda_torch.rms_norm_gated(x_ours, gate, weight, None, activation, eps=1e-5)
    assert_close("y", ref, ours, 1e-6)
    assert torch.equal(x_ref, ref) and torch.equal(x_ours, ours)


def test_scatter_rows_is_sglangs_masked_scatter():
    """Same rows as the torch path SGLang keeps for its small PLE state (hybrid backend)."""
    from sglang.srt.layers.attention.hybrid_linear_attn_backend import HybridLinearAttnBackend

    g = torch.Generator().manual_seed(3)
    src = torch.randn(2, 5, 16, 3, 4, generator=g)
    dst_idx, steps = torch.tensor([4, 0, 7, 2, 9]), torch.tensor([15, -1, 3, 16, 0])
    for rows in (None, torch.tensor([1, 0, 4, 3, 2])):
        ref, ours = torch.zeros(2, 8, 3, 4), torch.zeros(2, 8, 3, 4)
        HybridLinearAttnBackend._scatter_speculative_state_with_mask(ref, src, dst_idx, steps, rows)
        kda_torch.scatter_rows(ours, src, dst_idx, steps, rows)
        assert torch.equal(ref, ours)
        assert ours[:, 4].abs().sum() > 0 and not ours[:, [0, 1, 3, 5, 6]].any()


_exp = tl.exp  # a module-level alias, as SGLang's fla/op.py has them


@triton.jit
def _alias_kernel(x, y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, _exp(tl.load(x + o, mask=o < n, other=0.0)), mask=o < n)


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
@triton.jit
def _tuned_kernel(x, y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n, other=0.0) * 2, mask=o < n)


def test_interpreter_patches_aliased_builtins():
    from triton.runtime import interpreter

    kimi_shims.install_interpreter_alias_patch()
    patched = interpreter._patch_lang
    x, y = torch.randn(10), torch.empty(10)
    interpreter._patch_lang = patched._sglang_dflash_original
    try:
        with pytest.raises(Exception, match="triton.jit"):
            _alias_kernel[(1,)](x, y, 10, BLOCK=16)
    finally:
        interpreter._patch_lang = patched
    _alias_kernel[(1,)](x, y, 10, BLOCK=16)
    assert_close("exp", x.exp(), y, 1e-6)
    assert tl.core.is_builtin(_exp), "the alias is restored after the launch"


def test_autotuner_runs_without_a_gpu_driver():
    x, y = torch.randn(12), torch.empty(12)
    kimi_shims.install_autotuner_without_benchmarks()
    _tuned_kernel[(1,)](x, y, 12)
    assert torch.equal(y, x * 2) and _tuned_kernel.best_config.kwargs == {"BLOCK": 16}
