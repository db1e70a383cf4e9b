"""Strict safetensors loading: header parsing, exact names and shapes, no pickle, no remote code."""

import json
import logging
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang_dflash.checkpoint import (
    CheckpointError,
    expected_drafter_tensors,
    load_drafter_state_dict,
    read_safetensors_header,
)
from sglang_dflash.config import ConfigError, drafter_config_from_dict, load_drafter_config
from test_config import tiny_drafter


def drafter_cfg(**overrides):
    return drafter_config_from_dict({**tiny_drafter(), **overrides}, "ckpt/config.json")


def random_tensors(cfg, target_hidden, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype)
            for name, shape in expected_drafter_tensors(cfg, target_hidden).items()}


def write_drafter(path, config: dict, tensors: dict, prefix: str = ""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_header_matches_safetensors_own_reader(tmp_path):
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b.c": torch.ones(7, dtype=torch.int64),
               "d": torch.zeros(2, 0, 4), "e": torch.zeros((), dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert sorted(header) == sorted(f.keys())
        for name in f.keys():
            sl = f.get_slice(name)
            assert header[name] == (sl.get_dtype(), tuple(sl.get_shape())), name


def test_truncated_and_foreign_files_refused(tmp_path):
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    cases = {
        "short.safetensors": raw[:5],
        "cut_header.safetensors": raw[:40],
        "cut_data.safetensors": raw[:-1],
        "text.safetensors": b"hello world, not a checkpoint at all",
        "json.safetensors": (2).to_bytes(8, "little") + b"[]",
        # 4 floats need 16 bytes, not 8
        "bad_offsets.safetensors": _raw_file({"w": {"dtype": "F32", "shape": [4],
                                                    "data_offsets": [0, 8]}}, 16),
    }
    expect = {"short": "too short", "cut_header": "does not fit", "cut_data": "truncated",
              "text": "does not fit", "json": "not a JSON object", "bad_offsets": "do not hold"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            read_safetensors_header(tmp_path / name)
        assert name in str(info.value) and expect[name.split(".")[0]] in str(info.value), name


def _raw_file(header: dict, data_bytes: int) -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + bytes(data_bytes)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_expected_layer_tensors_match_transformers_qwen3(bias):
    """Per-layer names and shapes are those of transformers' own Qwen3 decoder layer."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    cfg = drafter_cfg(attention_bias=bias)
    hf = qwen3.Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, attention_bias=bias)
    state = qwen3.Qwen3DecoderLayer(hf, 1).state_dict()
    layer = {f"layers.1.{k}": tuple(v.shape) for k, v in state.items()}
    ours = {k: v for k, v in expected_drafter_tensors(cfg, 64).items() if k.startswith("layers.1.")}
    assert ours == layer


def test_expected_global_tensors():
    cfg = drafter_cfg()
    expected = expected_drafter_tensors(cfg, target_hidden=48)
    # fc takes the 3 feature layers of a 48-wide target
    assert expected["fc.weight"] == (64, 3 * 48)
    assert expected["hidden_norm.weight"] == expected["norm.weight"] == (64,)
    assert len(expected) == 3 + 11 * cfg.num_hidden_layers


@pytest.mark.parametrize("prefix", ["", "model."], ids=["plain", "model-prefix"])
def test_good_checkpoint_loads_exactly(tmp_path, prefix):
    cfg = drafter_cfg()
    tensors = random_tensors(cfg, 64)
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), tensors, prefix)
    state = load_drafter_state_dict(ckpt, load_drafter_config(ckpt), 64)
    assert sorted(state) == sorted(tensors)
    for name, t in tensors.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], t), name
    half = load_drafter_state_dict(ckpt / "model.safetensors", cfg, 64, dtype=torch.bfloat16)
    assert all(torch.equal(half[k], tensors[k].to(torch.bfloat16)) for k in tensors)


def test_strict_names_and_shapes_in_one_error(tmp_path):
    cfg = drafter_cfg()
    tensors = random_tensors(cfg, 64)
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    tensors["mtp_head.weight"] = torch.zeros(300, 64)
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.int8)
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), tensors)
    with pytest.raises(CheckpointError) as info:
        load_drafter_state_dict(ckpt, cfg, 64)
    msg = str(info.value)
    assert "4 problems" in msg, msg
    assert "missing tensor `layers.1.mlp.up_proj.weight` [96, 64]" in msg
    assert "unexpected tensor `mtp_head.weight` [300, 64]" in msg
    assert "`layers.0.self_attn.k_proj.weight` has shape [16, 64], the config implies [32, 64]" in msg
    assert "`norm.weight` is I8" in msg


def _ignored_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]


@pytest.mark.parametrize("prefix", ["", "model."], ids=["plain", "model-prefix"])
def test_rope_buffers_ignored_with_one_log_line(tmp_path, caplog, prefix):
    cfg = drafter_cfg()  # 2 layers, head_dim 16
    tensors = random_tensors(cfg, 64)
    extra = {"rotary_emb.inv_freq": torch.ones(8), "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
             "layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), {**tensors, **extra}, prefix)
    with caplog.at_level(logging.INFO, logger="sglang_dflash"):
        state = load_drafter_state_dict(ckpt, cfg, 64)
    assert sorted(state) == sorted(tensors)
    [line] = _ignored_lines(caplog)
    assert f"{ckpt}: ignoring 3 tensor(s)" in line
    assert all(f"`{prefix}{name}` [8]" in line for name in extra), line
    # a buffer of a layer the config does not have is an unknown weight, not a RoPE buffer
    ckpt = write_drafter(tmp_path / "bad", tiny_drafter(),
                         {**tensors, "layers.2.self_attn.rotary_emb.inv_freq": torch.ones(8)}, prefix)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor `{prefix}layers\.2\.self_attn\.rotary_emb"):
        load_drafter_state_dict(ckpt, cfg, 64)


def _copies(vocab: int, hidden: int) -> dict:
    return {"model.embed_tokens.weight": torch.randn(vocab, hidden), "lm_head.weight": torch.randn(vocab, hidden)}


def test_target_copies_checked_and_never_used(tmp_path, caplog):
    from sglang_dflash.drafter import load_drafter

    cfg = drafter_cfg()  # vocab_size 300, hidden 64
    tensors = random_tensors(cfg, 64)
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), {**tensors, **_copies(300, 64)})
    with caplog.at_level(logging.INFO, logger="sglang_dflash"):
        state = load_drafter_state_dict(ckpt, cfg, 64, target_vocab=300)
        drafter = load_drafter(ckpt, 64, target_vocab=300)
    assert sorted(state) == sorted(tensors)
    assert not any("embed" in n or "lm_head" in n for n in drafter.state_dict())
    lines = _ignored_lines(caplog)
    assert len(lines) == 2 and "`model.embed_tokens.weight` [300, 64], `lm_head.weight` [300, 64]" in lines[0]
    # the target's vocabulary is one row short of the copies: refused, file and shapes named
    with pytest.raises(CheckpointError) as info:
        load_drafter_state_dict(ckpt, cfg, 64, target_vocab=299)
    msg = str(info.value)
    assert "2 problems" in msg
    assert (f"{ckpt / 'model.safetensors'}: tensor `model.embed_tokens.weight` has shape [300, 64], "
            "but a copy of the target's embed_tokens must be [299, 64]") in msg
    assert "tensor `lm_head.weight` has shape [300, 64], but a copy of the target's lm_head" in msg


@pytest.mark.parametrize("vocab,hidden,target_vocab", [(300, 48, 300), (301, 64, None), (300, 64, 301)],
                         ids=["hidden", "own-vocab", "target-vocab"])
def test_target_copy_of_another_shape_refused(tmp_path, vocab, hidden, target_vocab):
    """Columns must be the target's hidden; rows its vocab, else the drafter's own vocab_size."""
    cfg = drafter_cfg()
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), {**random_tensors(cfg, 64), **_copies(vocab, hidden)})
    with pytest.raises(CheckpointError, match=rf"`model\.embed_tokens\.weight` has shape \[{vocab}, {hidden}\]"):
        load_drafter_state_dict(ckpt, cfg, 64, target_vocab=target_vocab)


def test_target_hidden_shapes_fc(tmp_path):
    cfg = drafter_cfg()
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), random_tensors(cfg, 64))
    # 3 feature layers of a 48-wide target: fc must be [64, 144]
    expect = r"`fc.weight` has shape \[64, 192\], the config implies \[64, 144\]"
    with pytest.raises(CheckpointError, match=expect):
        load_drafter_state_dict(ckpt, cfg, 48)


def _write_sharded(path, tensors, weight_map_edit=None):
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    if weight_map_edit:
        weight_map_edit(weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(tiny_drafter()))
    return path


def test_sharded_checkpoint(tmp_path):
    cfg = drafter_cfg()
    tensors = random_tensors(cfg, 64)
    state = load_drafter_state_dict(_write_sharded(tmp_path / "a", tensors), cfg, 64)
    assert all(torch.equal(state[k], tensors[k]) for k in tensors) and len(state) == len(tensors)

    def escape(m):
        m["norm.weight"] = "../evil.safetensors"

    with pytest.raises(CheckpointError, match="weight_map.norm.weight"):
        load_drafter_state_dict(_write_sharded(tmp_path / "b", tensors, escape), cfg, 64)

    def phantom(m):
        m["ghost.weight"] = "model-00001-of-00002.safetensors"

    with pytest.raises(CheckpointError, match="ghost.weight"):
        load_drafter_state_dict(_write_sharded(tmp_path / "c", tensors, phantom), cfg, 64)


def test_pickle_checkpoints_refused(tmp_path):
    cfg = drafter_cfg()
    (tmp_path / "config.json").write_text(json.dumps(tiny_drafter()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint\(s\) \['pytorch_model.bin'\]"):
        load_drafter_state_dict(tmp_path, cfg, 64)
    (tmp_path / "drafter.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="unpickling can run arbitrary code"):
        load_drafter_state_dict(tmp_path / "drafter.pt", cfg, 64)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "drafter.pt").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_drafter_state_dict(tmp_path, cfg, 64)


def test_remote_code_beside_checkpoint_never_runs(tmp_path):
    from sglang_dflash.check import run_check

    cfg = drafter_cfg()
    config = {**tiny_drafter(), "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}}
    ckpt = write_drafter(tmp_path / "ckpt", config, random_tensors(cfg, 64))
    marker = tmp_path / "imported"
    (ckpt / "dflash.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "raise RuntimeError('remote code executed')\n")
    (ckpt / "__init__.py").write_text("raise RuntimeError('package imported')\n")
    state = load_drafter_state_dict(ckpt, load_drafter_config(ckpt), 64)
    ok, report = run_check(ckpt, None)
    assert len(state) == len(expected_drafter_tensors(cfg, 64)) and ok, report
    assert not marker.exists() and "dflash" not in sys.modules


def test_hub_drafter_id_fetches_configs_and_weights_only(tmp_path, monkeypatch):
    import huggingface_hub

    from sglang_dflash.checkpoint import resolve_drafter_dir

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_drafter_dir(str(tmp_path)) == str(tmp_path) and not calls
    assert resolve_drafter_dir("org/drafter", "main") == str(tmp_path)
    patterns = calls[0]["allow_patterns"]
    assert calls[0]["repo_id"] == "org/drafter" and calls[0]["revision"] == "main"
    assert "config.json" in patterns and not any(p.endswith((".py", ".bin", "*")) for p in patterns)
    for bad in ("no-such-dir", "a/b/c", str(tmp_path / "missing" / "x")):
        with pytest.raises(ConfigError, match="Hub repository id"):
            resolve_drafter_dir(bad)
