"""The script that made the bundled pair still runs and writes loadable checkpoints."""

from sglang_dflash.reference.train import main
from sglang_dflash.reference.tiny_pair import load_tiny_pair


def test_train_script_writes_a_loadable_pair(tmp_path, capsys):
    target_dir, drafter_dir = tmp_path / "target", tmp_path / "drafter"
    argv = ["--target-out", str(target_dir), "--drafter-out", str(drafter_dir),
            "--target-steps", "1", "--drafter-steps", "2", "--drafter-seqs", "4"]
    assert main(argv) == 0
    assert "drafter step 2/2" in capsys.readouterr().out
    target, drafter = load_tiny_pair(target_dir, drafter_dir)
    assert drafter.cfg.target_layer_ids == (1, 3, 5)
    assert drafter.cfg.target_num_layers == target.config.num_hidden_layers
