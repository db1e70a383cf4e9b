"""The script that made the bundled pairs still runs and writes loadable checkpoints."""

from transformers import AutoTokenizer

from sglang_dflash.backend import get_ops
from sglang_dflash.check import run_check
from sglang_dflash.reference.offline import teacher_forced_commit_lens
from sglang_dflash.reference.tiny_pair import BOS, encode, load_tiny_pair
from sglang_dflash.reference.tiny_pair import TARGET_DIR as KIMI_TARGET_DIR
from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR, TARGET_DIR, load_tiny_qwen3_pair
from sglang_dflash.dev.train import main


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


def test_bundled_kimi_target_has_the_byte_tokenizer():
    assert_byte_tokenizer(KIMI_TARGET_DIR)
