"""The DFlash drafter: the slot-paged forward equals a dense reimplementation; context K/V
are computed once per committed token; the weights keep the checkpoint's names."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from sglang_dflash.checkpoint import expected_drafter_tensors
from sglang_dflash.config import DrafterConfig
from sglang_dflash.drafter import DFlashDrafter, DrafterOps
from sglang_dflash.kernels.draft_attention import draft_attention as triton_draft_attention
from sglang_dflash.kernels.draft_kv import draft_kv_append as triton_draft_kv_append

H, L = 64, 8
TARGET_LAYERS = (1, 3)


def _config(attention_bias=False, rope_scaling=None, kv_heads=2):
    return DrafterConfig(
        hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        head_dim=16, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=rope_scaling, max_position_embeddings=4096, attention_bias=attention_bias,
        block_size=L, mask_token_id=0, target_layer_ids=TARGET_LAYERS,
    )


def _drafter(cfg, seed=0):
    torch.manual_seed(seed)
    drafter = DFlashDrafter(cfg)
    with torch.no_grad():
        # norms away from 1 and biases away from 0, so a skipped norm or bias shows
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return drafter.eval()


class Scenario:
    """Three requests with contexts of 0, 5 and 23 tokens (plus a request outside the batch),
    their slots scattered through one pool, and a block per request."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ctx_lens = [0, 5, 23]
        lens = self.ctx_lens + [11]
        self.num_slots = sum(lens) + 9
        order = torch.randperm(self.num_slots, generator=gen)
        self.features, self.slots, used = [], [], 0
        for n in lens:
            self.features.append(torch.randn(n, len(TARGET_LAYERS) * H, generator=gen) * 2)
            self.slots.append(order[used: used + n])
            used += n
        self.embeds = torch.randn(3, L, H, generator=gen)
        # block positions start where each context ends
        self.positions = torch.tensor(self.ctx_lens)[:, None] + torch.arange(L)[None, :]
        S = max(self.ctx_lens)
        self.slot_table = torch.full((3, S), -1, dtype=torch.int64)
        for b, n in enumerate(self.ctx_lens):
            self.slot_table[b, :n] = self.slots[b]

    def fill(self, drafter, chunk_at=None):
        pool = drafter.new_pool(self.num_slots)
        for feats, slots in zip(self.features, self.slots):
            positions = torch.arange(len(feats))
            cuts = sorted({0, len(feats)} | ({min(chunk_at, len(feats))} if chunk_at else set()))
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                drafter.append_context(pool, feats[lo:hi], positions[lo:hi], slots[lo:hi])
        return pool

    def run(self, drafter, pool):
        return drafter.forward_block(pool, self.embeds, self.positions, self.slot_table,
                                     torch.tensor(self.ctx_lens))


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def _rope_hf(x, positions, theta, D, factor):
    """x [n, heads, D]: x*cos + rotate_half(x)*sin with cos/sin over the full head dim."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)) / factor
    freqs = positions.double()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _dense_reference(drafter, features, embeds, positions, factor=1.0):
    """One request, fp64, no pool: concat context features and block per layer, plain
    non-causal attention over all of it."""
    cfg = drafter.cfg
    W = {k: v.double() for k, v in drafter.state_dict().items()}
    D, Hq, Hkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    n = features.shape[0]
    c = _rms(features.double() @ W["fc.weight"].T, W["hidden_norm.weight"], eps)
    all_pos = torch.cat([torch.arange(n), positions])
    h = embeds.double()

    def linear(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        x = _rms(h, W[p + "input_layernorm.weight"], eps)
        # the context features go into k_proj/v_proj without input_layernorm
        kv_in = torch.cat([c, x])
        q = linear(x, p + "self_attn.q_proj").view(L, Hq, D)
        q = _rms(q, W[p + "self_attn.q_norm.weight"], eps)
        k = linear(kv_in, p + "self_attn.k_proj").view(n + L, Hkv, D)
        k = _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        v = linear(kv_in, p + "self_attn.v_proj").view(n + L, Hkv, D)
        q = _rope_hf(q, positions, cfg.rope_theta, D, factor)
        k = _rope_hf(k, all_pos, cfg.rope_theta, D, factor)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              scale=1 / math.sqrt(D))
        h = h + linear(attn.transpose(0, 1).reshape(L, Hq * D), p + "self_attn.o_proj")
        x = _rms(h, W[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(x, p + "mlp.gate_proj"), linear(x, p + "mlp.up_proj")
        h = h + linear(F.silu(gate) * up, p + "mlp.down_proj")
    return _rms(h, W["norm.weight"], eps)


VARIANTS = {
    "plain": dict(),
    "bias-mha": dict(attention_bias=True, kv_heads=4),
    "linear-rope": dict(rope_scaling=(("factor", 4.0), ("rope_type", "linear"))),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paged_forward_equals_dense_reference(variant):
    cfg = _config(**VARIANTS[variant])
    drafter, sc = _drafter(cfg), Scenario()
    with torch.no_grad():
        out = sc.run(drafter, sc.fill(drafter))
    factor = 4.0 if variant == "linear-rope" else 1.0
    for b in range(3):
        ref = _dense_reference(drafter, sc.features[b], sc.embeds[b], sc.positions[b], factor)
        assert_close(f"{variant} request {b}", ref, out[b], 1e-5)


def test_triton_ops_match_torch_ops():
    drafter, sc = _drafter(_config()), Scenario(seed=1)
    with torch.no_grad():
        ref_pool = sc.fill(drafter)
        ref = sc.run(drafter, ref_pool)
        drafter.ops = DrafterOps(draft_attention=triton_draft_attention,
                                 draft_kv_append=triton_draft_kv_append)
        pool = sc.fill(drafter)
        out = sc.run(drafter, pool)
    assert_close("pool k", ref_pool.k, pool.k, 1e-6)
    assert torch.equal(ref_pool.v, pool.v)
    assert_close("hidden", ref, out, 1e-5)


class _CountingOps:
    def __init__(self, ops):
        self.ops, self.kv_tokens, self.attention_calls = ops, [], 0

    def draft_kv_append(self, kv, *args):
        self.kv_tokens.append(kv.shape[0])
        return self.ops.draft_kv_append(kv, *args)

    def draft_attention(self, *args):
        self.attention_calls += 1
        return self.ops.draft_attention(*args)


def test_context_kv_computed_once_per_token():
    drafter, sc = _drafter(_config()), Scenario(seed=2)
    with torch.no_grad():
        whole = sc.fill(drafter)
        counting = _CountingOps(drafter.ops)
        drafter.ops = counting
        chunked = sc.fill(drafter, chunk_at=7)
        assert counting.kv_tokens == [5, 7, 16, 7, 4]
        sc.run(drafter, chunked)
    # the block forward attends to the cached K/V and never appends
    assert len(counting.kv_tokens) == 5
    assert counting.attention_calls == drafter.cfg.num_hidden_layers
    assert_close("k chunked", whole.k, chunked.k, 1e-6)
    assert_close("v chunked", whole.v, chunked.v, 1e-6)
    # slots nobody owns stay as allocated
    owned = torch.cat(sc.slots)
    free = torch.ones(sc.num_slots, dtype=torch.bool)
    free[owned] = False
    assert free.any() and not chunked.k[:, free].any() and not chunked.v[:, free].any()


def test_reloaded_weights_reach_the_context_kv():
    """The stacked k_proj/v_proj are cached between calls; a load must invalidate them."""
    cfg = _config()
    drafter, other, sc = _drafter(cfg, seed=0), _drafter(cfg, seed=5), Scenario(seed=3)
    with torch.no_grad():
        sc.fill(drafter)
        drafter.load_state_dict(other.state_dict())
        assert_close("after reload", sc.fill(other).k, sc.fill(drafter).k, 1e-7)


def test_gradients_flow_through_the_context():
    """The reference training script backpropagates through append_context + forward_block."""
    drafter, sc = _drafter(_config()), Scenario(seed=4)
    drafter.train()
    sc.run(drafter, sc.fill(drafter)).pow(2).mean().backward()
    # fc reaches the output only through the cached context K/V
    assert drafter.fc.weight.grad is not None and drafter.fc.weight.grad.abs().sum() > 0
    for layer in drafter.layers:
        assert layer.self_attn.k_proj.weight.grad.abs().sum() > 0


def test_parameter_names_are_checkpoint_names():
    cfg = _config(attention_bias=True)
    shapes = {k: tuple(v.shape) for k, v in DFlashDrafter(cfg).state_dict().items()}
    assert shapes == expected_drafter_tensors(cfg, H)


def test_bad_inputs_are_refused_by_name():
    drafter, sc = _drafter(_config()), Scenario()
    pool = drafter.new_pool(sc.num_slots)
    with pytest.raises(ValueError, match="`features`"):
        drafter.append_context(pool, torch.randn(3, H), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="`slots`"):
        drafter.append_context(pool, sc.features[1], torch.arange(5), torch.arange(5).float())
    with pytest.raises(ValueError, match="`pool.k`"):
        drafter.forward_block(_drafter(_config(kv_heads=4)).new_pool(8), sc.embeds, sc.positions,
                              sc.slot_table, torch.tensor(sc.ctx_lens))
    with pytest.raises(ValueError, match="`block_positions`"):
        drafter.forward_block(pool, sc.embeds, sc.positions[:, :2], sc.slot_table, torch.tensor(sc.ctx_lens))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        DFlashDrafter(_config(rope_scaling=(("factor", 2.0), ("rope_type", "yarn"))))


# ---- fp8 (e4m3) draft K/V ----

FP8 = torch.float8_e4m3fn


def test_fp8_pool_stays_inside_e4m3_and_close_to_the_float_pool():
    """The weight-derived scales hold every context entry below 448 even for large
    features (no saturation), and the dequantised entries are the fp32 pool's within
    e4m3 rounding (2^-4 relative) wherever they are e4m3 normals."""
    drafter, sc = _drafter(_config(attention_bias=True)), Scenario(seed=5)
    sc.features = [f * 50 for f in sc.features]
    with torch.no_grad():
        full = sc.fill(drafter)
        drafter.kv_dtype = FP8
        quant = sc.fill(drafter)
    assert quant.k.dtype == FP8 and quant.k_scale.shape == (2, 2) and quant.v_scale.dtype == torch.float32
    owned = torch.cat(sc.slots)
    for name, exact, stored, scale in (("k", full.k, quant.k, quant.k_scale), ("v", full.v, quant.v, quant.v_scale)):
        stored = stored[:, owned].float()
        # inside the range, and not so far inside that the format is wasted
        assert stored.abs().max() < 448 and stored.abs().max() > 8, (name, stored.abs().max())
        deq = stored * scale[:, None, :, None]
        exact = exact[:, owned]
        normal = exact.abs() >= 2.0 ** -6 * scale[:, None, :, None]
        assert normal.float().mean() > 0.99
        assert ((deq - exact).abs()[normal] <= exact.abs()[normal] * 2.0 ** -4 * 1.0001).all(), name
    # scales are powers of two, so pool * scale is exact in any float format
    assert torch.equal(torch.log2(quant.v_scale), torch.log2(quant.v_scale).round())


def test_fp8_forward_follows_the_float_forward_on_both_backends():
    drafter, sc = _drafter(_config()), Scenario(seed=6)
    with torch.no_grad():
        ref = sc.run(drafter, sc.fill(drafter))
        drafter.kv_dtype = FP8
        torch_pool = sc.fill(drafter)
        out_torch = sc.run(drafter, torch_pool)
        drafter.ops = DrafterOps(draft_attention=triton_draft_attention, draft_kv_append=triton_draft_kv_append)
        triton_pool = sc.fill(drafter)
        out_triton = sc.run(drafter, triton_pool)
    assert torch.equal(torch_pool.k.float(), triton_pool.k.float())
    assert torch.equal(torch_pool.v.float(), triton_pool.v.float())
    assert_close("triton vs torch, fp8 pool", out_torch, out_triton, 1e-5)
    assert_close("fp8 vs fp32 pool", ref, out_torch, 0.05)


def test_pool_dtype_and_bytes_per_token():
    drafter = _drafter(_config())
    per_element = {torch.float32: 4, torch.bfloat16: 2, FP8: 1}
    for dtype, size in per_element.items():
        pool = drafter.new_pool(8, dtype=dtype)
        # layers x (K, V) x KV heads x head dim x bytes
        assert pool.k.dtype == dtype and pool.bytes_per_token == 2 * 2 * 2 * 16 * size
        assert (pool.k_scale is None) == (dtype != FP8)
    drafter.kv_dtype = torch.bfloat16
    assert drafter.new_pool(4).k.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`dtype`"):
        drafter.new_pool(4, dtype=torch.float8_e5m2)
    from sglang_dflash.drafter import DraftKVPool

    with pytest.raises(ValueError, match="`scales`"):
        DraftKVPool(2, 4, 2, 16, FP8, "cpu")
    with pytest.raises(ValueError, match="`scales`"):
        DraftKVPool(2, 4, 2, 16, FP8, "cpu", (torch.ones(2, 2), torch.ones(2, 3)))
