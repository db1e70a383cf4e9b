"""`bench offline`: reproduces the reference teacher-forced tau; runs a transformers target."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.bench.offline import add_offline_args, main_offline
from sglang_dflash.reference.demo import use_ops
from sglang_dflash.reference.offline import offline_acceptance
from sglang_dflash.reference.tiny_pair import DEMO_PROMPTS, encode, load_tiny_pair

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))


def _args(argv):
    parser = argparse.ArgumentParser()
    add_offline_args(parser)
    return parser.parse_args(argv)


def test_tiny_pair_reproduces_the_reference_tau(tmp_path):
    out = tmp_path / "bench"
    assert main_offline(_args(["--max-new-tokens", "32", "--num-prompts", "3", "--out", str(out)])) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "acceptance.png").stat().st_size > 0

    target, drafter = load_tiny_pair()
    ops = get_ops("torch")
    use_ops(target, drafter, ops)
    stats, _ = offline_acceptance(target, drafter, ops, [encode(p) for p in DEMO_PROMPTS[:3]],
                                  max_new_tokens=32)
    assert result["tau"] == stats.tau
    assert result["commit_len_counts"] == list(stats.commit_len_counts)
    assert result["steps"] == stats.steps and result["num_prompts"] == 3
    assert len(result["position_accept_rate"]) == drafter.cfg.block_size - 1


def test_bad_prompt_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert main_offline(_args(["--prompts", str(bad), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "prompt" in err


def test_transformers_target_runs(tmp_path):
    """A transformers Qwen3 target with a (random) drafter of its hidden size."""
    from make_tiny_qwen3 import make_tiny_qwen3

    from sglang_dflash.drafter import DFlashDrafter
    from sglang_dflash.dev.train import drafter_config, save_drafter

    target_dir = make_tiny_qwen3(tmp_path / "qwen3")
    cfg = json.loads((target_dir / "config.json").read_text())
    torch.manual_seed(0)
    dcfg = drafter_config(cfg["hidden_size"], cfg["num_hidden_layers"], target_layer_ids=(0, 1))
    save_drafter(DFlashDrafter(dcfg), tmp_path / "drafter")
    out = tmp_path / "bench"
    argv = ["--target", str(target_dir), "--drafter", str(tmp_path / "drafter"),
            "--max-new-tokens", "12", "--num-prompts", "2", "--no-chat-template", "--out", str(out)]
    assert main_offline(_args(argv)) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["num_prompts"] == 2 and result["steps"] >= 1
    assert 1.0 <= result["tau"] <= 16.0


def test_bundled_qwen3_pair_with_chat_template(tmp_path):
    """The chat template path on a transformers target; the trained pair drafts well."""
    from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR

    out = tmp_path / "bench"
    argv = ["--target", str(TARGET_DIR), "--drafter", str(DRAFTER_DIR),
            "--max-new-tokens", "24", "--num-prompts", "2", "--verify-width", "4", "--out", str(out)]
    assert main_offline(_args(argv)) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["num_prompts"] == 2 and 2 <= result["tokens"] <= 2 * 23 and 1.0 <= result["tau"] <= 16.0
    (row,) = result["verify_widths"]
    assert row["verify_width"] == 4 and 1.0 <= row["draft_trained_block"]["tau"] <= 4.0


def test_verify_width_sweep_both_ways(tmp_path, capsys):
    """--verify-width: 'draft 16, verify W' and 'draft W, verify W' walk the same continuations."""
    from sglang_dflash.reference.offline import teacher_forced_commit_lens

    out = tmp_path / "bench"
    argv = ["--max-new-tokens", "32", "--num-prompts", "3", "--verify-width", "16,2,4", "--out", str(out)]
    assert main_offline(_args(argv)) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "verify_width.png").stat().st_size > 0
    rows = result["verify_widths"]
    assert [r["verify_width"] for r in rows] == [2, 4, 16]
    # at W = L both ways are the plain walk of the top-level figures
    assert rows[-1]["draft_trained_block"]["tau"] == rows[-1]["draft_shrunk_block"]["tau"] == result["tau"]

    target, drafter = load_tiny_pair()
    ops = get_ops("torch")
    use_ops(target, drafter, ops)
    prompts = [encode(p) for p in DEMO_PROMPTS[:3]]
    _, continuations = offline_acceptance(target, drafter, ops, prompts, max_new_tokens=32)
    for row in rows:
        W = row["verify_width"]
        for key, block in (("draft_trained_block", 16), ("draft_shrunk_block", W)):
            got = row[key]
            lens = teacher_forced_commit_lens(target, drafter, ops, prompts, [c.tokens for c in continuations],
                                              block, W)
            assert got["block_size"] == block and got["steps"] == sum(map(len, lens))
            assert got["tokens"] == sum(map(sum, lens)) and len(got["commit_len_counts"]) == W + 1
            assert len(got["position_accept_rate"]) == W - 1 and 1.0 <= got["tau"] <= W
    printed = capsys.readouterr().out
    assert "draft L" in printed and "draft W" in printed

    assert main_offline(_args(["--max-new-tokens", "8", "--num-prompts", "1", "--verify-width", "17",
                               "--out", str(tmp_path / "o")])) == 2
    assert "--verify-width 17 exceeds the draft block 16" in capsys.readouterr().err


def test_draft_kv_dtype_walks_with_that_pool(tmp_path, monkeypatch):
    """`--draft-kv-dtype fp8_e4m3`: the walk drafts from an e4m3 pool (every pool it makes
    is one) and its tau is the reference walk's with the same pool."""
    from sglang_dflash.drafter import DFlashDrafter

    made, new_pool = [], DFlashDrafter.new_pool

    def spy(self, *args, **kwargs):
        pool = new_pool(self, *args, **kwargs)
        made.append(pool.k.dtype)
        return pool

    monkeypatch.setattr(DFlashDrafter, "new_pool", spy)
    out = tmp_path / "bench"
    argv = ["--max-new-tokens", "32", "--num-prompts", "3", "--draft-kv-dtype", "fp8_e4m3", "--out", str(out)]
    assert main_offline(_args(argv)) == 0
    result = json.loads((out / "result.json").read_text())
    assert made == [torch.float8_e4m3fn]
    assert (result["draft_kv_dtype"], result["draft_kv_pool"]) == ("fp8_e4m3", "float8_e4m3fn")

    target, drafter = load_tiny_pair()
    ops = get_ops("torch")
    use_ops(target, drafter, ops)
    drafter.kv_dtype = torch.float8_e4m3fn
    stats, _ = offline_acceptance(target, drafter, ops, [encode(p) for p in DEMO_PROMPTS[:3]],
                                  max_new_tokens=32)
    assert made[1:] == [torch.float8_e4m3fn]
    assert result["tau"] == stats.tau and result["commit_len_counts"] == list(stats.commit_len_counts)
