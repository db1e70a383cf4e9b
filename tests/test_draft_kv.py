"""draft_kv_append: Triton kernel vs torch twin, the twin vs a per-token HF-style reference,
and pool slots outside the call left bit-identical."""

import pytest
import torch

from helpers import assert_close
from sglang_dflash.kernels.draft_kv import draft_kv_append
from sglang_dflash.kernels.naive.draft_kv import draft_kv_append as draft_kv_append_ref

POISON = 1e30
EPS = 1e-6

# (T, Ld, Hkv, D, N, dtype)
CASES = [
    (1, 1, 1, 16, 4, torch.float32),
    (13, 3, 2, 24, 40, torch.float32),
    (29, 2, 4, 32, 64, torch.float32),
    (11, 2, 2, 16, 30, torch.bfloat16),
    (17, 3, 4, 24, 33, torch.bfloat16),
]


def _case_id(case):
    T, Ld, Hkv, D, N, dtype = case
    return f"T{T}-Ld{Ld}-Hkv{Hkv}-D{D}-N{N}-{str(dtype)[6:]}"


def _inputs(T, Ld, Hkv, D, N, dtype, seed=0):
    """kv is a slice of a wider buffer (non-contiguous); slots a random subset of the pool."""
    gen = torch.Generator().manual_seed(seed)
    kv = (torch.randn(T, Ld, 2, Hkv, D + 8, generator=gen) * 3).to(dtype)[..., :D]
    k_norm = (torch.rand(Ld, D, generator=gen) + 0.5).to(dtype)
    positions = torch.randint(0, 70000, (T,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = positions.float()[:, None] * inv_freq
    slots = torch.randperm(N, generator=gen)[:T].to(torch.int32 if T % 2 else torch.int64)
    return kv, k_norm, freqs.cos(), freqs.sin(), slots


def _poisoned_pools(Ld, N, Hkv, D, dtype):
    return (torch.full((Ld, N, Hkv, D), POISON, dtype=dtype),
            torch.full((Ld, N, Hkv, D), POISON, dtype=dtype))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _per_token_reference(kv, k_norm, cos, sin, eps):
    """HF Qwen3 arithmetic, token by token: RMSNorm, then x*cos + rotate_half(x)*sin with
    the [D] cos/sin duplicated over the two halves. fp64."""
    T, Ld, _, Hkv, D = kv.shape
    k = torch.empty(T, Ld, Hkv, D, dtype=torch.float64)
    for t in range(T):
        c, s = torch.cat([cos[t], cos[t]]).double(), torch.cat([sin[t], sin[t]]).double()
        for layer in range(Ld):
            x = kv[t, layer, 0].double()
            x = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * k_norm[layer].double()
            k[t, layer] = x * c + _rotate_half(x) * s
    return k


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_twin_matches_per_token_reference(case):
    T, Ld, Hkv, D, N, dtype = case
    kv, k_norm, cos, sin, slots = _inputs(*case)
    k_pool, v_pool = _poisoned_pools(Ld, N, Hkv, D, dtype)
    draft_kv_append_ref(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS)
    idx = slots.long()
    ratio = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close("k", _per_token_reference(kv, k_norm, cos, sin, EPS).transpose(0, 1),
                 k_pool[:, idx].double(), ratio)
    assert torch.equal(v_pool[:, idx], kv[:, :, 1].transpose(0, 1))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_twin_and_leaves_other_slots(case):
    T, Ld, Hkv, D, N, dtype = case
    kv, k_norm, cos, sin, slots = _inputs(*case)
    ref_k, ref_v = _poisoned_pools(Ld, N, Hkv, D, dtype)
    draft_kv_append_ref(kv, k_norm, cos, sin, slots, ref_k, ref_v, EPS)
    k_pool, v_pool = _poisoned_pools(Ld, N, Hkv, D, dtype)
    draft_kv_append(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS)

    idx = slots.long()
    ratio = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close("k", ref_k[:, idx].float(), k_pool[:, idx].float(), ratio)
    assert torch.equal(v_pool[:, idx], ref_v[:, idx])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    for name, pool in (("k", k_pool), ("v", v_pool), ("twin k", ref_k), ("twin v", ref_v)):
        rest = pool[:, untouched]
        assert torch.equal(rest, torch.full_like(rest, POISON)), f"{name}: a slot outside `slots` changed"


def test_pool_dtype_differs_from_kv():
    """fp32 projections into a bf16 pool: both ops cast at the store."""
    case = (9, 2, 2, 16, 20, torch.float32)
    kv, k_norm, cos, sin, slots = _inputs(*case)
    ref_k, ref_v = _poisoned_pools(2, 20, 2, 16, torch.bfloat16)
    k_pool, v_pool = _poisoned_pools(2, 20, 2, 16, torch.bfloat16)
    draft_kv_append_ref(kv, k_norm, cos, sin, slots, ref_k, ref_v, EPS)
    draft_kv_append(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS)
    idx = slots.long()
    assert_close("k", ref_k[:, idx].float(), k_pool[:, idx].float(), 1e-2)
    assert_close("v", ref_v[:, idx].float(), v_pool[:, idx].float(), 1e-2)


@pytest.mark.parametrize("op", [draft_kv_append_ref, draft_kv_append], ids=["twin", "kernel"])
def test_no_tokens_is_a_no_op(op):
    kv, k_norm, cos, sin, slots = _inputs(0, 2, 2, 16, 8, torch.float32)
    k_pool, v_pool = _poisoned_pools(2, 8, 2, 16, torch.float32)
    op(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS)
    assert torch.equal(k_pool, torch.full_like(k_pool, POISON))
    assert torch.equal(v_pool, torch.full_like(v_pool, POISON))


@pytest.mark.parametrize("op", [draft_kv_append_ref, draft_kv_append], ids=["twin", "kernel"])
def test_bad_inputs_name_the_argument(op):
    kv, k_norm, cos, sin, slots = _inputs(5, 2, 2, 16, 8, torch.float32)
    k_pool, v_pool = _poisoned_pools(2, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="`cos`"):
        op(kv, k_norm, cos.double(), sin, slots, k_pool, v_pool, EPS)
    with pytest.raises(ValueError, match="`k_norm`"):
        op(kv, k_norm[:1], cos, sin, slots, k_pool, v_pool, EPS)
    with pytest.raises(ValueError, match="`v_pool`"):
        op(kv, k_norm, cos, sin, slots, k_pool, v_pool[:, :, :1], EPS)
    with pytest.raises(ValueError, match="`slots`"):
        op(kv, k_norm, cos, sin, torch.tensor([0, 1, 2, 3, 8]), k_pool, v_pool, EPS)
    with pytest.raises(ValueError, match="`kv`"):
        op(kv[:, :, :1], k_norm, cos, sin, slots, k_pool, v_pool, EPS)


# ---- fp8 (e4m3) pools ----

FP8 = torch.float8_e4m3fn
# (T, Ld, Hkv, D, N)
FP8_CASES = [(13, 3, 2, 24, 40), (29, 2, 4, 32, 64), (5, 1, 1, 16, 8)]


def _fp8_scales(Ld, Hkv, seed, power_of_two):
    """Per (layer, head) scales that put some keys and values past +-448 (saturated)."""
    gen = torch.Generator().manual_seed(seed + 1)
    scale = torch.rand(2, Ld, Hkv, generator=gen) * 0.004 + 0.004
    if power_of_two:
        scale = torch.exp2(torch.log2(scale).round())
    return scale[0].contiguous(), scale[1].contiguous()


def _fp8_pools(Ld, N, Hkv, D):
    # 0x7e = 448: a poison value fp8 can hold, distinct from anything a zero input writes
    fill = torch.full((Ld, N, Hkv, D), 448.0).to(FP8)
    return fill.clone(), fill.clone()


def _fp8_case_id(case):
    return "T{}-Ld{}-Hkv{}-D{}-N{}".format(*case)


@pytest.mark.parametrize("power_of_two", [True, False], ids=["pow2-scales", "any-scales"])
@pytest.mark.parametrize("case", FP8_CASES, ids=_fp8_case_id)
def test_fp8_kernel_equals_twin_value_for_value(case, power_of_two):
    """Same e4m3 value in every written element (the interpreter's own fp32 -> e4m3 cast
    gets ties and round-up carries wrong, so this fails if the kernel relied on it), and
    the slots outside the call keep their poison."""
    T, Ld, Hkv, D, N = case
    kv, k_norm, cos, sin, slots = _inputs(T, Ld, Hkv, D, N, torch.float32)
    k_scale, v_scale = _fp8_scales(Ld, Hkv, T, power_of_two)
    ref_k, ref_v = _fp8_pools(Ld, N, Hkv, D)
    draft_kv_append_ref(kv, k_norm, cos, sin, slots, ref_k, ref_v, EPS, k_scale, v_scale)
    k_pool, v_pool = _fp8_pools(Ld, N, Hkv, D)
    draft_kv_append(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS, k_scale, v_scale)
    idx = slots.long()
    # -0 and +0 are the same value: compare values, not bits
    for name, ref, out in (("k", ref_k, k_pool), ("v", ref_v, v_pool)):
        differ = ref[:, idx].float() != out[:, idx].float()
        assert not differ.any(), f"{name}: {int(differ.sum())} of {differ.numel()} values differ"
    assert (ref_v[:, idx].float().abs() == 448).any(), "the case should saturate some values"
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    for name, pool in (("k", k_pool), ("v", v_pool)):
        assert (pool[:, untouched].float() == 448).all(), f"{name}: a slot outside `slots` changed"


def test_fp8_twin_dequantises_to_the_float_pool():
    """Dequantised (x 1 / scale back) fp8 entries are the fp32 ones within e4m3 rounding
    (2^-4 relative at most) where nothing saturates."""
    T, Ld, Hkv, D, N = 29, 2, 4, 32, 64
    kv, k_norm, cos, sin, slots = _inputs(T, Ld, Hkv, D, N, torch.float32)
    f_k, f_v = _poisoned_pools(Ld, N, Hkv, D, torch.float32)
    draft_kv_append_ref(kv, k_norm, cos, sin, slots, f_k, f_v, EPS)
    idx = slots.long()
    # scales from the largest magnitude per (layer, head): no saturation
    k_scale = f_k[:, idx].abs().amax(dim=(1, 3)) / 448
    v_scale = f_v[:, idx].abs().amax(dim=(1, 3)) / 448
    q_k, q_v = _fp8_pools(Ld, N, Hkv, D)
    draft_kv_append(kv, k_norm, cos, sin, slots, q_k, q_v, EPS, k_scale, v_scale)
    for name, ref, pool, scale in (("k", f_k, q_k, k_scale), ("v", f_v, q_v, v_scale)):
        deq = pool[:, idx].float() * scale[:, None, :, None]
        exact = ref[:, idx]
        # e4m3 normals keep 3 mantissa bits: half a step is 2^-4 of the value
        normal = exact.abs() >= 2.0 ** -6 * scale[:, None, :, None]
        assert ((deq - exact).abs()[normal] <= exact.abs()[normal] * 2.0 ** -4).all(), name
        assert_close(f"fp8 {name}", exact, deq, 0.04)


@pytest.mark.parametrize("op", [draft_kv_append_ref, draft_kv_append], ids=["twin", "kernel"])
def test_fp8_pool_needs_its_scales(op):
    kv, k_norm, cos, sin, slots = _inputs(5, 2, 2, 16, 8, torch.float32)
    k_pool, v_pool = _fp8_pools(2, 8, 2, 16)
    k_scale, v_scale = _fp8_scales(2, 2, 0, True)
    with pytest.raises(ValueError, match="`k_scale`"):
        op(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS)
    with pytest.raises(ValueError, match="`v_scale`"):
        op(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS, k_scale, v_scale[:1])
    with pytest.raises(ValueError, match="`v_scale`"):
        op(kv, k_norm, cos, sin, slots, k_pool, v_pool, EPS, k_scale, v_scale.double())
    f_k, f_v = _poisoned_pools(2, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="`k_scale`"):
        op(kv, k_norm, cos, sin, slots, f_k, f_v, EPS, k_scale, v_scale)
    with pytest.raises(ValueError, match="`v_pool`"):
        op(kv, k_norm, cos, sin, slots, k_pool, f_v, EPS, k_scale, v_scale)
