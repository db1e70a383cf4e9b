"""draft_attention: Triton kernel vs torch twin, and the twin vs a per-request dense softmax."""

import pytest
import torch

from helpers import assert_close
from sglang_dflash.kernels.draft_attention import draft_attention, draft_attention_splits
from sglang_dflash.kernels.naive.draft_attention import draft_attention as draft_attention_ref

# (B, L, Hq, Hkv, D, dtype, ctx_lens): ragged contexts in one batch, including 0 and 300
CASES = [
    (1, 16, 4, 2, 16, torch.float32, [300]),
    (1, 4, 4, 4, 32, torch.float32, [0]),
    (3, 16, 4, 2, 32, torch.float32, [0, 17, 300]),
    (3, 4, 4, 2, 24, torch.float32, [1, 300, 17]),
    (7, 16, 4, 4, 16, torch.float32, [0, 1, 17, 300, 5, 0, 64]),
    (3, 16, 4, 2, 32, torch.bfloat16, [17, 0, 300]),
    (7, 4, 4, 2, 16, torch.bfloat16, [300, 1, 0, 17, 33, 2, 100]),
    (3, 16, 4, 4, 24, torch.bfloat16, [0, 300, 1]),
]


def _case_id(case):
    B, L, Hq, Hkv, D, dtype, lens = case
    return f"B{B}-L{L}-Hq{Hq}-Hkv{Hkv}-D{D}-{str(dtype)[6:]}-ctx{max(lens)}"


def _inputs(B, L, Hq, Hkv, D, dtype, lens, seed=0):
    """Inputs whose pool holds NaN everywhere the batch must not read: the context slots
    are scattered through a larger pool, and slot_table columns past ctx_lens point out of
    range (-1 and N + 7), so a read of either would show in the output."""
    gen = torch.Generator().manual_seed(seed)
    S = max(max(lens), 1)
    N = sum(lens) + 50
    order = torch.randperm(N, generator=gen)
    k_pool = torch.full((N, Hkv, D), float("nan"), dtype=dtype)
    v_pool = torch.full((N, Hkv, D), float("nan"), dtype=dtype)
    slot_table = torch.where(torch.rand(B, S, generator=gen) < 0.5, -1, N + 7)
    used = 0
    for b, n in enumerate(lens):
        slots = order[used: used + n]
        used += n
        slot_table[b, :n] = slots
        k_pool[slots] = torch.randn(n, Hkv, D, generator=gen).to(dtype)
        v_pool[slots] = torch.randn(n, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(B, L, Hq, D, generator=gen).to(dtype)
    block_k = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)
    block_v = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)
    ctx_lens = torch.tensor(lens, dtype=torch.int32 if B == 7 else torch.int64)
    slot_table = slot_table.to(torch.int32 if B == 3 else torch.int64)
    return q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v


def _dense(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v, scale):
    """Per request and per query head: concat context and block keys, plain softmax, fp64."""
    B, L, Hq, D = q.shape
    G = Hq // k_pool.shape[1]
    out = torch.empty(B, L, Hq, D, dtype=torch.float64)
    for b in range(B):
        slots = slot_table[b, : int(ctx_lens[b])].long()
        keys = torch.cat([k_pool[slots], block_k[b]]).double()  # [n + L, Hkv, D]
        values = torch.cat([v_pool[slots], block_v[b]]).double()
        for h in range(Hq):
            weights = torch.softmax(q[b, :, h].double() @ keys[:, h // G].T * scale, dim=-1)
            out[b, :, h] = weights @ values[:, h // G]
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_twin_matches_dense_softmax(case):
    args = _inputs(*case)
    scale = case[4] ** -0.5
    out = draft_attention_ref(*args, scale)
    assert out.dtype == case[5]
    ratio = 1e-6 if case[5] == torch.float32 else 1e-2
    assert_close("twin", _dense(*args, scale), out, ratio)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_twin(case):
    args = _inputs(*case)
    scale = case[4] ** -0.5
    ref = draft_attention_ref(*args, scale)
    out = draft_attention_splits(*args, scale, 1, torch.full_like(args[0], float("nan")))
    assert out.dtype == ref.dtype
    ratio = 1e-5 if case[5] == torch.float32 else 1e-2
    assert_close("kernel", ref.float(), out.float(), ratio)
    # the public op picks the splits itself (1 on CPU): same numbers
    assert torch.equal(draft_attention(*args, scale), out)


@pytest.mark.parametrize("num_splits", [2, 5, 12], ids=lambda n: f"splits{n}")
def test_split_context_merges_to_twin(num_splits):
    # 12 splits of 300 context columns leave trailing splits empty for the short requests
    case = (3, 16, 4, 2, 32, torch.float32, [300, 0, 45])
    args = _inputs(*case, seed=num_splits)
    ref = draft_attention_ref(*args, 0.3)
    out = draft_attention_splits(*args, 0.3, num_splits, torch.full_like(args[0], float("nan")))
    assert_close(f"splits={num_splits}", ref, out, 1e-5)


def test_strided_query_and_pool():
    """q as a slice of a wider projection, pools as one layer of a [Ld, N, Hkv, D] pool."""
    q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v = _inputs(3, 16, 4, 2, 16, torch.float32,
                                                                        [20, 0, 9])
    wide = torch.randn(3, 16, 6, 16)
    wide[:, :, 1:5] = q
    layers_k = torch.stack([torch.randn_like(k_pool), k_pool])
    layers_v = torch.stack([torch.randn_like(v_pool), v_pool])
    args = (wide[:, :, 1:5], layers_k[1], layers_v[1], slot_table, ctx_lens, block_k, block_v, 0.25)
    ref = draft_attention_ref(*args)
    assert_close("strided", ref, draft_attention(*args), 1e-5)


@pytest.mark.parametrize("op", [draft_attention_ref, draft_attention], ids=["twin", "kernel"])
def test_bad_inputs_name_the_argument(op):
    q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v = _inputs(3, 4, 4, 2, 16, torch.float32,
                                                                        [3, 0, 5])
    with pytest.raises(ValueError, match="`k_pool`"):
        op(q, k_pool[:, :, :8], v_pool, slot_table, ctx_lens, block_k, block_v, 0.25)
    with pytest.raises(ValueError, match="`block_v`"):
        op(q, k_pool, v_pool, slot_table, ctx_lens, block_k, block_v[:, :2], 0.25)
    with pytest.raises(ValueError, match="`ctx_lens`"):
        op(q, k_pool, v_pool, slot_table, torch.tensor([3, 0, 6]), block_k, block_v, 0.25)
    bad_slots = slot_table.clone()
    bad_slots[2, 4] = k_pool.shape[0]
    with pytest.raises(ValueError, match="`slot_table`"):
        op(q, k_pool, v_pool, bad_slots, ctx_lens, block_k, block_v, 0.25)
    with pytest.raises(ValueError, match="`slot_table`"):
        op(q, k_pool, v_pool, slot_table.float(), ctx_lens, block_k, block_v, 0.25)
