"""`sglang-dflash check`: header-only, every problem at once, exit 1 on problems."""

import json
import math
import shutil
from pathlib import Path

import torch

from sglang_dflash.check import run_check
from sglang_dflash.checkpoint import expected_drafter_tensors, read_safetensors_header
from sglang_dflash.cli import main as cli_main
from sglang_dflash.config import load_drafter_config
from test_checkpoint import drafter_cfg, random_tensors, write_drafter
from test_config import tiny_drafter, tiny_kimi

FIXTURES = Path(__file__).parent / "fixtures" / "configs"


def write_header_only(path: Path, shapes: dict, dtype: str = "BF16") -> None:
    """A safetensors file of the given shapes whose data region is a hole: the file has its
    full length (so truncation checks pass) but no data blocks are written."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


def published_pair(tmp_path: Path, extra: dict | None = None) -> tuple[Path, Path]:
    drafter, target = tmp_path / "drafter", tmp_path / "target"
    drafter.mkdir()
    target.mkdir()
    shutil.copy(FIXTURES / "kimi-linear-48b-a3b-dflash.json", drafter / "config.json")
    shutil.copy(FIXTURES / "kimi-linear-48b-a3b-instruct.json", target / "config.json")
    cfg = load_drafter_config(drafter)
    write_header_only(drafter / "model.safetensors", {
        **{"model." + k: v for k, v in expected_drafter_tensors(cfg, 2304).items()}, **(extra or {})})
    return drafter, target


def test_published_kimi_pair_passes(tmp_path, capsys):
    drafter, target = published_pair(tmp_path)
    header = read_safetensors_header(drafter / "model.safetensors")
    assert header["model.fc.weight"] == ("BF16", (2304, 11520))
    # the fixture's inferred geometry reproduces the published file: 902 MB of bf16
    assert round(sum(math.prod(shape) * 2 for _, shape in header.values()) / 1e6) == 902
    ok, report = run_check(drafter, target)
    assert ok, report
    assert "5 layers, hidden 2304, heads 32 q / 32 kv x 72" in report
    assert "draft K/V per token: 5 layers x (K,V) x 32 kv heads x 72 x 2 B = 46080 B in bf16" in report
    assert "block 16, mask id 163839" in report
    assert "3 (mla), 7 (mla), 15 (mla), 19 (mla), 23 (mla)" in report
    assert "27 layers (20 kda, 7 mla)" in report and "fc [2304, 11520]" in report
    assert cli_main(["check", str(drafter), "--target", str(target)]) == 0
    assert "OK" in capsys.readouterr().out


def test_published_drafter_shipping_rope_buffers_and_target_copies(tmp_path):
    copies = {"model.embed_tokens.weight": (163840, 2304), "lm_head.weight": (163840, 2304)}
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (36,) for i in range(5)}
    drafter, target = published_pair(tmp_path, {**copies, **buffers})
    for target_dir in (None, target):
        ok, report = run_check(drafter, target_dir)
        assert ok, report
        note = next(line for line in report.splitlines() if "ignored, not drafter weights" in line)
        assert "`model.embed_tokens.weight` [163840, 2304]" in note and "layers.4.self_attn.rotary_emb" in note
        # the weights line counts the drafter's own tensors only: 902 MB = 860.7 MiB
        assert "weights: 58 tensors, BF16, 860.7 MiB" in report


def test_target_copy_of_a_foreign_vocab_refused(tmp_path):
    drafter, target = published_pair(tmp_path, {"lm_head.weight": (163776, 2304)})
    ok, report = run_check(drafter, target)
    assert not ok and report.startswith("FAIL: 1 problem(s)"), report
    assert (f"{drafter / 'model.safetensors'}: tensor `lm_head.weight` has shape [163776, 2304], "
            "but a copy of the target's lm_head must be [163840, 2304]") in report


def test_drafter_alone(tmp_path):
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), random_tensors(drafter_cfg(), 64))
    ok, report = run_check(ckpt, None)
    assert ok and "1, 3, 7 (kinds unknown without --target)" in report, report


def test_drafter_alone_mask_id_bound_by_its_own_vocab(tmp_path):
    d = tiny_drafter()  # vocab_size 300
    d["dflash_config"]["mask_token_id"] = 300
    ckpt = write_drafter(tmp_path / "ckpt", d, random_tensors(drafter_cfg(), 64))
    ok, report = run_check(ckpt, None)
    assert not ok and report.startswith("FAIL: 1 problem(s)"), report
    assert f"{ckpt}/config.json: field `dflash_config.mask_token_id`: 300 outside the drafter's own" in report


def test_defaults_noted_in_the_report(tmp_path):
    d = tiny_drafter()
    del d["head_dim"], d["rope_theta"]
    ckpt = write_drafter(tmp_path / "ckpt", d, random_tensors(drafter_cfg(), 64))
    ok, report = run_check(ckpt, None)
    assert ok, report
    assert f"note: {ckpt}/config.json: field `head_dim` absent; using 16 (hidden_size 64 / " \
           "num_attention_heads 4)" in report
    assert "field `rope_theta` absent; using 10000.0 (the Qwen3 default)" in report


def _target_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps(config))
    return tmp_path / "target"


def test_doubly_broken_pair_reports_everything(tmp_path, capsys):
    tensors = random_tensors(drafter_cfg(), 64)
    del tensors["layers.0.mlp.down_proj.weight"]
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), tensors)
    target = _target_dir(tmp_path, {**tiny_kimi(), "hidden_size": 48, "vocab_size": 200})
    ok, report = run_check(ckpt, target)
    assert not ok and report.startswith("FAIL: 5 problem(s)"), report
    for needle in ("missing tensor `layers.0.mlp.down_proj.weight`", "`fc.weight` has shape [64, 192]",
                   "`hidden_size` 64", "`mask_token_id` 299", "`vocab_size` 300"):
        assert needle in report, needle
    assert cli_main(["check", str(ckpt), "--target", str(target)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_both_config_files_broken(tmp_path):
    d = tiny_drafter()
    d["dflash_config"]["causal_head"] = True
    del d["intermediate_size"]
    ckpt = write_drafter(tmp_path / "ckpt", d, {"x": torch.zeros(1)})
    target = _target_dir(tmp_path, {**tiny_kimi(), "linear_attn_config": {"kda_layers": [0, 1, 2],
                                                                          "full_attn_layers": [4, 8]}})
    ok, report = run_check(ckpt, target)
    assert not ok
    for needle in (f"{ckpt}/config.json: missing required field(s): intermediate_size",
                   "`dflash_config.causal_head`",
                   f"{target}/config.json: field `linear_attn_config.kda_layers`", "in neither"):
        assert needle in report, (needle, report)


def test_truncated_weights_reported(tmp_path):
    ckpt = write_drafter(tmp_path / "ckpt", tiny_drafter(), random_tensors(drafter_cfg(), 64))
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    ok, report = run_check(ckpt, None)
    assert not ok and "truncated" in report and "model.safetensors" in report, report


def test_flawed_drafter_still_compared_with_target(tmp_path):
    d = tiny_drafter()
    d["dflash_config"].update(target_layer_ids=[1, 1, 9], causal_head=True)
    ckpt = write_drafter(tmp_path / "ckpt", d, random_tensors(drafter_cfg(), 64))
    target = _target_dir(tmp_path, {**tiny_kimi(), "vocab_size": 299})
    ok, report = run_check(ckpt, target)
    assert not ok
    for needle in ("duplicate layer id(s) [1]", "not below `num_target_layers` 8",
                   "`dflash_config.causal_head`", "id(s) [9] are not layers of the target",
                   "`mask_token_id` 299 outside", "`vocab_size` 300 != "):
        assert needle in report, (needle, report)
