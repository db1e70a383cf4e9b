"""benchmarks/kernel_bench.py in smoke mode: every op checked against its twin, JSON + plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sglang_dflash.backend import _OP_MODULES
from sglang_dflash.kernels import accept

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("kernel_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_covers_every_op_and_writes_json_and_plot(bench, tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert result["smoke"] and result["all_ok"]
    if not torch.cuda.is_available():
        assert "timings are not performance" in result["mode"]
    # every op the backend serves has a row, so a new op cannot go unbenchmarked
    assert {row["op"] for row in result["cases"]} == set(_OP_MODULES)
    for row in result["cases"]:
        assert row["ok"] and row["bytes"] > 0 and row["op_us"] > 0 and row["twin_us"] > 0
        assert row["check"] and all(c["error"] is not None for c in row["check"].values())


def test_a_wrong_op_fails_the_check(bench, tmp_path, monkeypatch):
    real = accept.accept_greedy

    def off_by_one(candidates, target_predict, remaining, stop_ids):
        accept_len, emitted, finished = real(candidates, target_predict, remaining, stop_ids)
        return accept_len, emitted + 1, finished

    monkeypatch.setattr(accept, "accept_greedy", off_by_one)
    case = next(c for c in bench._builders(smoke=True) if c.op == "accept_greedy")
    row = bench.run_case(case, torch.device("cpu"))
    assert not row["ok"]
    assert row["check"]["emitted"]["error"] > 0 and row["check"]["accept_len"]["error"] == 0
    assert bench.main(["--smoke", "--only", case.name, "--out", str(tmp_path)]) == 1
