"""benchmarks/compile_check.py in CI: every Triton kernel compiles for sm_90 and sm_100 at
serving shapes, without spills and within the hardware limits (no GPU needed)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_check.py"


def _kernels_of_the_project() -> set[str]:
    """Every launched @triton.jit kernel in kernels/*.py (helpers are not named *_kernel)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    # real compilation in a fresh process: the interpreter switch must be off before triton loads
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "ci", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, json.loads((out / "compile_check.json").read_text())


def test_every_kernel_compiles_for_hopper_and_blackwell_within_limits(ci_run):
    proc, result = ci_run
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["ok"] and result["archs"] == [90, 100]
    rows = result["rows"]
    assert {r["kernel"] for r in rows} == _kernels_of_the_project()
    for arch in (90, 100):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == _kernels_of_the_project()
    for r in rows:
        assert r["ok"] and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r
    # the draft attention feeds bf16 tiles to its dots and multi-buffers its K/V loads
    attention = [r for r in rows if r["kernel"] == "_draft_attention_kernel"]
    assert attention and all(r["dot"] == "bf16" and r["async_copies"] > 0 for r in attention)


def _module(monkeypatch):
    spec = importlib.util.spec_from_file_location("compile_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built
    monkeypatch.setitem(sys.modules, spec.name, module)
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(module)
    finally:
        # the script sets up real compilation for its own process; this one keeps interpreting
        os.environ.clear()
        os.environ.update(saved)
    return module


PTXAS_LOG = """ptxas info    : Compiling entry function '_tile_max_kernel' for 'sm_100a'
ptxas info    : Function properties for _tile_max_kernel
    40 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_spills_and_limits_fail_the_check(monkeypatch):
    cc = _module(monkeypatch)
    assert cc._ptxas_resources(PTXAS_LOG) == (255, 48, 40)
    fine = cc.Compiled(registers=128, spill_bytes=0, stack_bytes=0, shared=144 * 1024, num_warps=8,
                       num_stages=3, dot="bf16", async_copies=6, seconds=1.0)
    assert cc.problems(fine, 90) == []
    spilled = cc.Compiled(**{**fine.__dict__, "registers": 255, "spill_bytes": 48})
    assert cc.problems(spilled, 100) == ["48 bytes of register spills"]
    # 16 warps x 32 threads x 255 registers > 65536 per SM; 240 KB > 227 KB per block
    heavy = cc.Compiled(**{**fine.__dict__, "registers": 255, "num_warps": 16, "shared": 240 * 1024})
    assert len(cc.problems(heavy, 90)) == 2
    with pytest.raises(RuntimeError, match="no resource usage"):
        cc._ptxas_resources("ptxas fatal : garbage")
