"""The tiny Kimi-Linear reference target: config parsing, extend/commit bit-exactness
against token-by-token decoding, feature capture, training forward, checkpoints, and the
KDA layer against fla's reference ops."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.gate import naive_kda_gate
from fla.ops.kda.naive import naive_recurrent_kda
from safetensors.torch import load_file, save_file

from helpers import assert_close
from sglang_dflash.checkpoint import CheckpointError
from sglang_dflash.config import ConfigError
from sglang_dflash.kernels.kda_commit import kda_commit as kda_commit_triton
from sglang_dflash.reference.kimi_linear import KimiLinearForCausalLM, KimiMoEGate, tiny_config
from sglang_dflash.reference.kimi_linear_config import KimiLinearConfig

PROMPT, BLOCK = 11, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        # weights 10x the init scale, so routing, attention and the decay all matter
        for module in m.modules():
            if isinstance(module, (torch.nn.Linear, KimiMoEGate)):
                module.weight.mul_(10)
    return m


def _tokens(n, seed):
    return torch.randint(0, 264, (n,), generator=torch.Generator().manual_seed(seed))


def _prefilled(model, prompt):
    state = model.new_state()
    model.commit(state, model.extend(state, prompt).record, len(prompt))
    return state


def _state_tensors(state):
    out = []
    for cache in state.layers:
        out += [cache.recurrent, cache.conv] if hasattr(cache, "recurrent") else [cache.k, cache.v]
    return out


def _assert_states_equal(a, b):
    assert a.length == b.length
    for x, y in zip(_state_tensors(a), _state_tensors(b)):
        assert x.shape == y.shape and torch.equal(x, y)


# ---- config

def test_tiny_config_layer_kinds():
    cfg = tiny_config()
    assert cfg.layer_kinds == ("kda", "kda", "kda", "mla", "kda", "kda", "kda", "mla")
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id, cfg.vocab_size) == (256, (257,), 263, 264)
    assert [cfg.is_moe_layer(i) for i in range(8)] == [False] + [True] * 7


def test_config_round_trip():
    cfg = tiny_config()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["linear_attn_config"]["kda_layers"] == [1, 2, 3, 5, 6, 7]
    assert KimiLinearConfig.from_dict(d) == cfg


def _published_config():
    """The fields of Kimi-Linear-48B-A3B-Instruct's config.json, plus ones we ignore."""
    full = [4, 8, 12, 16, 20, 24, 27]
    return {
        "architectures": ["KimiLinearForCausalLM"], "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig"},
        "model_type": "kimi_linear", "torch_dtype": "bfloat16", "vocab_size": 163840, "hidden_size": 2304,
        "intermediate_size": 9216, "moe_intermediate_size": 1024, "num_hidden_layers": 27,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1, "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid", "routed_scaling_factor": 2.446, "first_k_dense_replace": 1,
        "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "mla_use_nope": True, "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163586,
        "pad_token_id": 163839,
        "linear_attn_config": {"full_attn_layers": full, "kda_layers": [i for i in range(1, 28) if i not in full],
                               "num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4},
    }


def test_published_config_parses():
    cfg = KimiLinearConfig.from_dict(_published_config(), source="kimi/config.json")
    assert [i for i, kind in enumerate(cfg.layer_kinds) if kind == "mla"] == [3, 7, 11, 15, 19, 23, 26]
    assert (cfg.num_heads, cfg.head_dim, cfg.num_experts, cfg.eos_token_ids) == (32, 128, 256, (163586,))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("hidden_size"), "`hidden_size`: missing"),
    (lambda d: d.update(num_experts_per_token="8"), "`num_experts_per_token`: expected a positive integer"),
    (lambda d: d.update(q_lora_rank=1536), "`q_lora_rank`: 1536 is not supported"),
    (lambda d: d.update(mla_use_nope=False), "`mla_use_nope`"),
    (lambda d: d["linear_attn_config"].update(kda_layers=[1, 2, 3, 4]), "`linear_attn_config.kda_layers`"),
    (lambda d: d["linear_attn_config"].pop("head_dim"), "`linear_attn_config.head_dim`: missing"),
    (lambda d: d["linear_attn_config"].update(gate_lower_bound=-5.0), "`linear_attn_config.gate_lower_bound`"),
    (lambda d: d.update(eos_token_id=999999), "`eos_token_id`: 999999 is outside vocab_size"),
    (lambda d: d.update(num_experts_per_token=300), "`num_experts_per_token`: 300 > num_experts 256"),
])
def test_config_errors_name_file_and_field(edit, field):
    d = _published_config()
    edit(d)
    with pytest.raises(ConfigError, match="kimi/config.json: field") as e:
        KimiLinearConfig.from_dict(d, source="kimi/config.json")
    assert field in str(e.value)


# ---- extend / commit

def test_extend_does_not_mutate_state(model):
    state = _prefilled(model, _tokens(PROMPT, 1))
    before = [t.clone() for t in _state_tensors(state)]
    model.extend(state, _tokens(BLOCK, 2))
    assert state.length == PROMPT
    assert all(torch.equal(a, b) for a, b in zip(before, _state_tensors(state)))


@pytest.mark.parametrize("n", [0, 1, 5, BLOCK])
def test_commit_equals_token_by_token_decode(model, n):
    """Bit-exact: the state after commit(n) and the block's logits/features equal what n
    single-token extend+commit steps produce (extend is batch-invariant on one device)."""
    model.set_capture_layers([1, 3])
    prompt, block = _tokens(PROMPT, 3), _tokens(BLOCK, 4)
    state = _prefilled(model, prompt)
    out = model.extend(state, block)
    model.commit(state, out.record, n)

    seq = _prefilled(model, prompt)
    for t in range(n):
        step = model.extend(seq, block[t:t + 1])
        model.commit(seq, step.record, 1)
        assert torch.equal(step.logits[0], out.logits[t]), f"logits of token {t}"
        assert torch.equal(step.features[0], out.features[t]), f"features of token {t}"
    _assert_states_equal(state, seq)
    model.set_capture_layers([])


def test_triton_commit_matches_twin(model):
    """The same record committed by either op: KDA state to fp32 rounding, the rest exact."""
    state = _prefilled(model, _tokens(PROMPT, 5))
    out = model.extend(state, _tokens(BLOCK, 6))
    states = {name: copy.deepcopy(state) for name in ("twin", "triton")}
    model.commit(states["twin"], out.record, 6)
    twin = model.kda_commit_op
    try:
        model.kda_commit_op = kda_commit_triton
        model.commit(states["triton"], out.record, 6)
    finally:
        model.kda_commit_op = twin
    for a, b in zip(states["twin"].layers, states["triton"].layers):
        if hasattr(a, "recurrent"):
            assert_close("kda state", a.recurrent, b.recurrent, 1e-6)
            assert torch.equal(a.conv, b.conv)
        else:
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_commit_refuses_stale_record_and_bad_n(model):
    state = model.new_state()
    first = model.extend(state, _tokens(4, 7))
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 4\]"):
        model.commit(state, first.record, 5)
    model.commit(state, first.record, 2)
    with pytest.raises(ValueError, match="length 0 but this state has length 2"):
        model.commit(state, first.record, 1)
    with pytest.raises(ValueError, match="input_ids"):
        model.extend(state, torch.tensor([1, 264]))


# ---- features and the training forward

def test_features_are_layer_outputs_in_capture_order(model):
    ids = _tokens(9, 8)
    model.set_capture_layers([5, 1, 3])
    out = model.extend(model.new_state(), ids)
    _, train_features = model.forward_train(ids[None])
    model.set_capture_layers([])
    assert model.extend(model.new_state(), ids).features is None

    with torch.no_grad():
        x, outputs, state = model.model.embed_tokens(ids)[None], [], model.new_state()
        for layer, cache in zip(model.model.layers, state.layers):
            x = layer(x, cache, True, [])
            outputs.append(x[0])
    expected = torch.cat([outputs[5], outputs[1], outputs[3]], dim=-1)
    assert torch.equal(out.features, expected)
    assert_close("train features", expected, train_features[0].detach(), 1e-5)
    with pytest.raises(ValueError, match=r"capture layer ids \[8\]"):
        model.set_capture_layers([1, 8])


def test_forward_train_matches_extend_per_row(model):
    ids = torch.stack([_tokens(20, s) for s in (9, 10, 11)])
    model.set_capture_layers([2, 7])
    logits, features = model.forward_train(ids)
    assert logits.shape == (3, 20, 264) and logits.dtype == torch.float32 and features.shape == (3, 20, 128)
    for b in range(3):
        out = model.extend(model.new_state(), ids[b])
        assert_close(f"logits row {b}", out.logits, logits[b].detach(), 1e-5)
        assert_close(f"features row {b}", out.features, features[b].detach(), 1e-5)
    model.set_capture_layers([])
    # differentiable, and the correction bias only picks experts (no gradient reaches it)
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[1].self_attn.A_log.grad is not None
    assert model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.grad is None
    model.zero_grad(set_to_none=True)


def test_router_bias_picks_experts_but_does_not_weigh_them():
    cfg = tiny_config()
    gate = KimiMoEGate(cfg)
    with torch.no_grad():
        gate.weight.zero_()  # every score sigmoid(0) = 0.5
        gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0.3, 0, 0.2, 0, 0]))
    ids, weights = gate(torch.randn(3, cfg.hidden_size), invariant=False)
    assert torch.equal(ids, torch.tensor([[3, 5]] * 3))
    # renormalised unbiased scores (0.5 / 1.0) times routed_scaling_factor
    assert torch.equal(weights, torch.full((3, 2), 0.5 * cfg.routed_scaling_factor))


# ---- checkpoints

def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = _tokens(6, 12)
    assert torch.equal(loaded.extend(loaded.new_state(), ids).logits, model.extend(model.new_state(), ids).logits)


def test_strict_load_lists_every_bad_tensor(model, tmp_path):
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.3.self_attn.kv_b_proj.weight"]
    tensors["model.layers.2.self_attn.extra.weight"] = torch.zeros(2)
    tensors["model.layers.1.self_attn.A_log"] = torch.zeros(4)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    for name in ("missing: ['model.layers.3.self_attn.kv_b_proj.weight']",
                 "unexpected: ['model.layers.2.self_attn.extra.weight']",
                 "model.layers.1.self_attn.A_log (4,) != (1, 1, 4, 1)"):
        assert name in str(e.value)


# ---- the KDA layer against fla's reference ops

def test_kda_layer_matches_fla_reference_ops(model):
    """Our KDA layer vs HF's forward composed from F.conv1d, fla's gate, fla's naive
    recurrence and the gated RMSNorm formula, from a non-empty state and conv window."""
    attn = model.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(13)
    B, T, H, K, W = 2, 7, 4, 16, 4
    x = torch.randn(B, T, 64, generator=gen)
    state = torch.randn(B, H, K, K, generator=gen) * 0.1
    window = torch.randn(B, 3 * H * K, W - 1, generator=gen)
    with torch.no_grad():
        out, record = attn(x, state, window, invariant=False)

        conv_w = torch.cat([attn.q_conv1d.weight, attn.k_conv1d.weight, attn.v_conv1d.weight])
        seq = torch.cat([window, torch.cat([F.linear(x, p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj)],
                                           -1).transpose(1, 2)], dim=2)
        qkv = F.silu(F.conv1d(seq, conv_w, groups=3 * H * K)).transpose(1, 2).unflatten(-1, (3, H, K))
        q, k, v = qkv.unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = naive_kda_gate(attn.f_b_proj(attn.f_a_proj(x)).unflatten(-1, (H, K)), attn.A_log, attn.dt_bias)
        beta = attn.b_proj(x).sigmoid()
        o, final = naive_recurrent_kda(q, k, v, g, beta, initial_state=state.clone(), output_final_state=True)
        gate = attn.g_b_proj(attn.g_a_proj(x)).unflatten(-1, (H, K)).sigmoid()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + attn.eps) * attn.o_norm.weight * gate
        ref = attn.o_proj(o.flatten(2))
    assert_close("kda layer output", ref, out, 1e-5)
    assert_close("recorded k", k, record.k, 1e-5)
    assert_close("recorded g", g, record.g, 1e-5)
