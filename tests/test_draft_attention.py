"""draft_attention: Triton kernel vs torch twin, and the twin vs a per-request dense softmax."""

import pytest
import torch

from helpers import assert_close
from sglang_dflash.kernels.draft_attention import _launch, draft_attention, draft_attention_splits, num_splits
from sglang_dflash.kernels.naive.draft_attention import draft_attention as draft_attention_ref
from sglang_dflash.kernels.naive.draft_kv import quantize_fp8

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


def _inputs(B, L, Hq, Hkv, D, dtype, lens, seed=0, width=None):
    """Inputs whose pool holds NaN everywhere the batch must not read: the context slots
    are scattered through a larger pool, each request's context is a row of a taller
    table (rows in shuffled order, two rows nobody reads), and columns past ctx_lens point
    out of range (-1 and N + 7), so a read of either would show in the output."""
    gen = torch.Generator().manual_seed(seed)
    S = width or max(max(lens), 1)
    N = sum(lens) + 50
    order = torch.randperm(N, generator=gen)
    k_pool = torch.full((N, Hkv, D), float("nan"), dtype=dtype)
    v_pool = torch.full((N, Hkv, D), float("nan"), dtype=dtype)
    slot_table = torch.where(torch.rand(B + 2, S, generator=gen) < 0.5, -1, N + 7)
    slot_rows = torch.randperm(B + 2, generator=gen)[:B]
    used = 0
    for b, n in enumerate(lens):
        slots = order[used: used + n]
        used += n
        slot_table[slot_rows[b], :n] = slots
        k_pool[slots] = torch.randn(n, Hkv, D, generator=gen).to(dtype)
        v_pool[slots] = torch.randn(n, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(B, L, Hq, D, generator=gen).to(dtype)
    block_k = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)
    block_v = torch.randn(B, L, Hkv, D, generator=gen).to(dtype)
    ctx_lens = torch.tensor(lens, dtype=torch.int32 if B == 7 else torch.int64)
    slot_table = slot_table.to(torch.int32 if B == 3 else torch.int64)
    slot_rows = slot_rows.to(torch.int32 if B == 1 else torch.int64)
    return q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v


def _dense(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v, scale):
    """Per request and per query head: concat context and block keys, plain softmax, fp64."""
    B, L, Hq, D = q.shape
    G = Hq // k_pool.shape[1]
    out = torch.empty(B, L, Hq, D, dtype=torch.float64)
    for b in range(B):
        slots = slot_table[int(slot_rows[b]), : int(ctx_lens[b])].long()
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


@pytest.mark.parametrize("splits", [2, 5, 12], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("width", [None, 1000], ids=["table300", "table1000"])
def test_split_context_merges_to_twin(splits, width):
    # each request's context is cut into `splits` chunks on the device: 12 splits of 45
    # columns leave trailing splits empty, and a table wider than every context changes nothing
    case = (3, 16, 4, 2, 32, torch.float32, [300, 0, 45])
    args = _inputs(*case, seed=splits, width=width)
    ref = draft_attention_ref(*args, 0.3)
    out = draft_attention_splits(*args, 0.3, splits, torch.full_like(args[0], float("nan")))
    assert_close(f"splits={splits}", ref, out, 1e-5)


def test_twin_folds_a_table_wider_than_its_chunk():
    # contexts across the twin's 4096-column chunk boundary
    args = _inputs(2, 4, 4, 2, 16, torch.float32, [4500, 100], width=5000)
    assert_close("twin", _dense(*args, 0.25), draft_attention_ref(*args, 0.25), 1e-6)


def test_context_length_past_the_row_is_cut_on_the_device():
    """On a GPU the launcher cannot check ctx_lens against the table width (that would be a
    device sync): a length past the row must not read the next row's slots."""
    q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v = _inputs(
        3, 16, 4, 2, 16, torch.float32, [40, 7, 40])
    # the row after each request's row points at NaN slots of the pool
    S = slot_table.shape[1]
    poison = torch.isnan(k_pool[:, 0, 0]).nonzero()[:, 0][:S]
    table = slot_table.repeat_interleave(2, dim=0)
    table[1::2] = poison.to(table.dtype)
    rows = slot_rows * 2
    long_lens = torch.tensor([S + 20, 7, 2 * S], dtype=ctx_lens.dtype)
    out = torch.full_like(q, float("nan"))
    _launch(q, k_pool, v_pool, table[:, :S], rows, long_lens, block_k, block_v, 0.3, 3, out)
    ref = draft_attention_ref(q, k_pool, v_pool, slot_table, slot_rows, long_lens.clamp(max=S), block_k,
                              block_v, 0.3)
    assert_close("clamped", ref, out, 1e-5)


def test_split_count_depends_on_shapes_only():
    # two waves of programs on the GPU, at most one split per 512 table columns, none on CPU
    assert num_splits(1, 8, 32768, 132) == 33 and num_splits(1, 32, 32768, 132) == 9
    assert num_splits(8, 32, 32768, 132) == 2 and num_splits(32, 8, 32768, 132) == 2
    assert num_splits(64, 32, 32768, 132) == 1 and num_splits(1, 8, 1000, 132) == 1
    assert num_splits(1, 8, 4100, 132) == 8 and num_splits(1, 8, 32768, None) == 1


def test_strided_query_and_pool():
    """q as a slice of a wider projection, pools as one layer of a [Ld, N, Hkv, D] pool."""
    q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v = _inputs(
        3, 16, 4, 2, 16, torch.float32, [20, 0, 9])
    wide = torch.randn(3, 16, 6, 16)
    wide[:, :, 1:5] = q
    layers_k = torch.stack([torch.randn_like(k_pool), k_pool])
    layers_v = torch.stack([torch.randn_like(v_pool), v_pool])
    args = (wide[:, :, 1:5], layers_k[1], layers_v[1], slot_table, slot_rows, ctx_lens, block_k, block_v, 0.25)
    ref = draft_attention_ref(*args)
    assert_close("strided", ref, draft_attention(*args), 1e-5)


@pytest.mark.parametrize("op", [draft_attention_ref, draft_attention], ids=["twin", "kernel"])
def test_bad_inputs_name_the_argument(op):
    q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v = _inputs(
        3, 4, 4, 2, 16, torch.float32, [3, 0, 5])
    with pytest.raises(ValueError, match="`k_pool`"):
        op(q, k_pool[:, :, :8], v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v, 0.25)
    with pytest.raises(ValueError, match="`block_v`"):
        op(q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v[:, :2], 0.25)
    with pytest.raises(ValueError, match="`ctx_lens`"):
        op(q, k_pool, v_pool, slot_table, slot_rows, torch.tensor([3, 0, 6]), block_k, block_v, 0.25)
    with pytest.raises(ValueError, match="`slot_rows`"):
        op(q, k_pool, v_pool, slot_table, torch.tensor([0, 1, 5]), ctx_lens, block_k, block_v, 0.25)
    bad_slots = slot_table.clone()
    bad_slots[slot_rows[2], 4] = k_pool.shape[0]
    with pytest.raises(ValueError, match="`slot_table`"):
        op(q, k_pool, v_pool, bad_slots, slot_rows, ctx_lens, block_k, block_v, 0.25)
    with pytest.raises(ValueError, match="`slot_table`"):
        op(q, k_pool, v_pool, slot_table.float(), slot_rows, ctx_lens, block_k, block_v, 0.25)


# ---- fp8 (e4m3) pools ----

# (B, L, Hq, Hkv, D, dtype of q and the block, ctx_lens)
FP8_CASES = [
    (3, 16, 4, 2, 32, torch.float32, [0, 17, 300]),
    (7, 4, 4, 4, 24, torch.float32, [300, 1, 0, 17, 33, 2, 100]),
    (3, 16, 4, 4, 24, torch.bfloat16, [0, 300, 1]),
]


def _fp8_inputs(case, seed=0, width=None):
    """``_inputs`` with the pools quantised to e4m3 at per-head scales (NaN poison stays
    NaN), plus the float pools holding exactly the dequantised values."""
    q, k_pool, v_pool, slot_table, slot_rows, ctx_lens, block_k, block_v = _inputs(*case, seed=seed, width=width)
    scales = []
    for pool in (k_pool, v_pool):
        # scaled so the largest entry of each head sits at 300 (some spread, no saturation)
        scales.append((pool.float().nan_to_num(0.0).abs().amax(dim=(0, 2)) / 300).clamp_min(1e-3))
    k_scale, v_scale = (s.contiguous() for s in scales)
    k8, v8 = quantize_fp8(k_pool, k_scale), quantize_fp8(v_pool, v_scale)
    deq_k, deq_v = k8.float() * k_scale[:, None], v8.float() * v_scale[:, None]
    fp8_args = (q, k8, v8, slot_table, slot_rows, ctx_lens, block_k, block_v)
    deq_args = (q, deq_k, deq_v, slot_table, slot_rows, ctx_lens, block_k, block_v)
    return fp8_args, (k_scale, v_scale), deq_args, (k_pool, v_pool)


@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_fp8_twin_reads_the_dequantised_pool(case):
    """Scaling the scores and the weights (the twin) equals attending to pool * scale."""
    args, (k_scale, v_scale), deq_args, _ = _fp8_inputs(case)
    scale = case[4] ** -0.5
    out = draft_attention_ref(*args, scale, k_scale, v_scale)
    # fp32 dequantised pools, fp32 queries: the same arithmetic up to the order of the scale
    deq = draft_attention_ref(*(a.float() if a.is_floating_point() else a for a in deq_args), scale)
    assert out.dtype == case[5]
    assert_close("twin fp8", deq, out.float(), 1e-6 if case[5] == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", FP8_CASES, ids=_case_id)
def test_fp8_kernel_matches_twin(case):
    args, (k_scale, v_scale), _, (k_full, v_full) = _fp8_inputs(case)
    scale = case[4] ** -0.5
    ref = draft_attention_ref(*args, scale, k_scale, v_scale)
    out = draft_attention_splits(*args, scale, 1, torch.full_like(args[0], float("nan")), k_scale, v_scale)
    assert out.dtype == ref.dtype
    assert_close("kernel fp8", ref.float(), out.float(), 1e-5 if case[5] == torch.float32 else 1e-2)
    assert torch.equal(draft_attention(*args, scale, k_scale, v_scale), out)
    # and e4m3 is a close stand-in for the unquantised pool (2^-4 relative per entry at most)
    full = draft_attention_ref(*args[:1], k_full, v_full, *args[3:], scale)
    assert_close("fp8 vs full", full.float(), out.float(), 0.05)


@pytest.mark.parametrize("splits", [3, 12], ids=lambda n: f"splits{n}")
def test_fp8_split_context_merges_to_twin(splits):
    args, (k_scale, v_scale), _, _ = _fp8_inputs((3, 16, 4, 2, 32, torch.float32, [300, 0, 45]), seed=splits,
                                                 width=1000)
    ref = draft_attention_ref(*args, 0.3, k_scale, v_scale)
    out = draft_attention_splits(*args, 0.3, splits, torch.full_like(args[0], float("nan")), k_scale, v_scale)
    assert_close(f"fp8 splits={splits}", ref, out, 1e-5)


@pytest.mark.parametrize("op", [draft_attention_ref, draft_attention], ids=["twin", "kernel"])
def test_fp8_pool_needs_its_scales(op):
    args, (k_scale, v_scale), _, (k_full, v_full) = _fp8_inputs((3, 4, 4, 2, 16, torch.float32, [3, 0, 5]))
    q, k8, v8, table, rows, lens, bk, bv = args
    with pytest.raises(ValueError, match="`k_scale`"):
        op(*args, 0.25)
    with pytest.raises(ValueError, match="`v_scale`"):
        op(*args, 0.25, k_scale, v_scale[:1])
    with pytest.raises(ValueError, match="`k_scale`"):
        op(q, k_full, v_full, table, rows, lens, bk, bv, 0.25, k_scale, v_scale)
    with pytest.raises(ValueError, match="`v_pool`"):
        op(q, k8, v_full, table, rows, lens, bk, bv, 0.25, k_scale, v_scale)
    with pytest.raises(ValueError, match="only the pool"):
        op(q, k8, v8, table, rows, lens, bk.to(k8.dtype), bv, 0.25, k_scale, v_scale)
