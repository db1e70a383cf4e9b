"""The script that made the bundled pairs still runs and writes loadable checkpoints."""

from transformers import AutoTokenizer

from sglang_dflash.backend import get_ops
from sglang_dflash.check import run_check
from sglang_dflash.reference.offline import teacher_forced_commit_lens
from sglang_dflash.config import load_drafter_config
from sglang_dflash.reference import tiny_pair
from sglang_dflash.reference.tiny_pair import BOS, encode, load_tiny_pair
from sglang_dflash.reference.tiny_pair import TARGET_DIR as KIMI_TARGET_DIR
from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR, load_tiny_qwen3_pair
from sglang_dflash.dev.train import DrafterShape, drafter_config, main


def test_train_script_writes_a_loadable_pair(tmp_path, capsys):
    target_dir, drafter_dir = tmp_path / "target", tmp_path / "drafter"
    argv = ["--target-out", str(target_dir), "--drafter-out", str(drafter_dir),
            "--target-steps", "1", "--drafter-steps", "2", "--drafter-seqs", "4"]
    assert main(argv) == 0
    assert "drafter step 2/2" in capsys.readouterr().out
    assert_byte_tokenizer(target_dir)
    target, drafter = load_tiny_pair(target_dir, drafter_dir)
    assert drafter.cfg.target_layer_ids == (1, 3, 5)
    assert drafter.cfg.target_num_layers == target.config.num_hidden_layers


def assert_byte_tokenizer(target_dir):
    tok = AutoTokenizer.from_pretrained(target_dir)
    # as SGLang tokenizes a /v1/completions text prompt: the tokenizer adds BOS itself
    assert tok("the cat")["input_ids"] == encode("the cat")
    assert tok.decode(encode("the cat"), skip_special_tokens=True) == "the cat"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert chat == encode("user: hi\nassistant: ") and chat.count(BOS) == 1


def test_train_script_writes_a_loadable_qwen3_pair(tmp_path, capsys):
    target_dir, drafter_dir = tmp_path / "target", tmp_path / "drafter"
    argv = ["--target", "qwen3", "--target-out", str(target_dir), "--drafter-out", str(drafter_dir),
            "--target-steps", "1", "--drafter-steps", "2", "--drafter-seqs", "4"]
    assert main(argv) == 0
    assert "drafter step 2/2" in capsys.readouterr().out
    ok, report = run_check(drafter_dir, target_dir)
    assert ok, report
    assert_byte_tokenizer(target_dir)
    target, drafter = load_tiny_qwen3_pair(target_dir, drafter_dir)
    # never the last layer: SGLang's Qwen3 captures each layer's output before the next one
    assert drafter.cfg.target_layer_ids == (0, 1, 2)
    assert drafter.cfg.target_num_layers == len(target.model.layers) == 4
    assert drafter.cfg.max_position_embeddings == 512
    # features fit the drafter: a teacher-forced walk through a fixed continuation
    continuation = list(b" sat on the mat.")
    drafter.ops = ops = get_ops("torch")
    lens = teacher_forced_commit_lens(target, drafter, ops, [encode("the cat")], [continuation], 16)
    assert sum(lens[0]) == len(continuation) - 1


def test_bundled_qwen3_pair_passes_check():
    ok, report = run_check(DRAFTER_DIR, TARGET_DIR)
    assert ok, report
    assert_byte_tokenizer(TARGET_DIR)


def test_drafter_only_trains_a_given_shape_against_the_bundled_target(tmp_path, capsys):
    argv = ["--drafter-only", "--drafter-heads", "4", "--drafter-kv-heads", "4",
            "--drafter-head-dim", "24", "--drafter-steps", "2", "--drafter-seqs", "4",
            "--target-out", str(tiny_pair.TARGET_DIR)]
    weights = tiny_pair.TARGET_DIR / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert main(argv + ["--drafter-out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "loaded target" in out and "drafter step 2/2" in out and f"wrote {tmp_path / 'a'}" in out
    assert weights.stat().st_mtime_ns == written  # the bundled target is read, never rewritten
    target, drafter = load_tiny_pair(tiny_pair.TARGET_DIR, tmp_path / "a")
    assert (drafter.cfg.num_key_value_heads, drafter.cfg.head_dim) == (4, 24)
    ok, report = run_check(tmp_path / "a", tiny_pair.TARGET_DIR)
    assert ok, report
    # deterministic: a second run writes the same bytes
    assert main(argv + ["--drafter-out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_default_shape_is_the_bundled_drafters_and_the_mha_asset_the_documented_one():
    for shape, drafter_dir in ((DrafterShape(), tiny_pair.DRAFTER_DIR),
                               (DrafterShape(heads=4, kv_heads=4, head_dim=24),
                                tiny_pair.ASSETS / "tiny-dflash-mha")):
        bundled = load_drafter_config(drafter_dir)
        assert drafter_config(64, 8, shape=shape) == bundled, drafter_dir


def test_bundled_kimi_target_has_the_byte_tokenizer():
    assert_byte_tokenizer(KIMI_TARGET_DIR)
