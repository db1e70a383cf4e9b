"""benchmarks/gpu_check.sh --cpu-smoke: every part of the GPU check runs, small, on CPU and
without sglang (the GPU machine has none), writing its JSON; a failed part fails the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _without_sglang(tmp_path: Path) -> dict:
    """An environment in which `import sglang` fails, as on the GPU machine."""
    blocker = tmp_path / "no-sglang" / "sglang"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("sglang is not installed on the GPU machine")\n')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(blocker.parent), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


def test_cpu_smoke_runs_every_part_without_sglang(tmp_path):
    env = _without_sglang(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import sglang"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on the GPU machine" in probe.stderr
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] and summary["cpu_smoke"] and set(summary["exit_codes"].values()) == {0}
    for name in ("compile_check", "draft_step", "reference_e2e"):
        assert json.loads((out / f"{name}.json").read_text())["ok"], name
    assert json.loads((out / "kernels_smoke.json").read_text())["all_ok"]
    step = summary["draft_step"][0]
    assert step["candidates_equal"] and step["meta_count"]["graph"] < step["meta_count"]["eager"]
    assert all(row["lossless"] for row in summary["reference_e2e"])
    assert {row["layer"] for row in summary["verify_cost"]} == {"moe", "kda", "mla"}


def test_a_failed_part_fails_the_check(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = ROOT / "benchmarks" / "gpu_check_summary.py"
    args = [sys.executable, str(script), str(out), "0", "1", "compile_check=0", "draft_step=1"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 1 and "FAILED: draft_step" in proc.stderr
    assert json.loads((out / "gpu_check.json").read_text())["ok"] is False
