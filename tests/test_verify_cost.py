"""benchmarks/verify_cost.py at tiny shapes on CPU: its pieces compute what they claim, it
writes the table `plan --cost` reads. (Its timings on CPU say nothing about a GPU.)"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sglang_dflash.plan.planner import add_plan_args, main_plan

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_cost.py"


@pytest.fixture(scope="module")
def vc():
    spec = importlib.util.spec_from_file_location("verify_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["verify_cost"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("K,V,T", [(16, 16, 3), (12, 24, 5)], ids=["K16-V16-T3", "K12-V24-T5"])
def test_kda_recurrence_kernel_matches_its_twin(vc, K, V, T):
    """The Triton kernel (interpreter) against the torch loop, on irregular head dims;
    the state is updated in place by both."""
    torch.manual_seed(0)
    B, H = 2, 3
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H, K)
    beta = torch.rand(B, T, H)
    state = torch.randn(B, H, K, V)
    s_twin, s_kernel = state.clone(), state.clone()
    o_twin = vc.kda_verify_recurrence(s_twin, q, k, v, g, beta, use_triton=False)
    o_kernel = vc.kda_verify_recurrence(s_kernel, q, k, v, g, beta, use_triton=True)
    assert o_kernel.shape == (B, T, H, V)
    torch.testing.assert_close(o_kernel, o_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_kernel, s_twin, rtol=1e-5, atol=1e-5)
    # one step by hand for row (0, 0): S' = S exp(g); S'' = S' + beta k (v - k S')
    s = state[0, 0] * g[0, 0, 0].exp()[:, None]
    s = s + beta[0, 0, 0] * k[0, 0, 0][:, None] * (v[0, 0, 0] - k[0, 0, 0] @ s)[None, :]
    torch.testing.assert_close(o_twin[0, 0, 0], (q[0, 0, 0] * K ** -0.5) @ s, rtol=1e-5, atol=1e-5)


def test_grouped_expert_gemm_equals_the_per_expert_loop(vc):
    s = vc.SHAPES["tiny"]
    assert vc.check_moe_modes(torch.device("cpu"), torch.float32, s) < 1e-5
    torch.manual_seed(1)
    moe = vc.MoELayer(s, "cpu", torch.float32, "grouped")
    x = torch.randn(5, s.hidden)
    ids, w = moe.route(x)
    # the layer by its definition, token by token
    out = []
    for t in range(5):
        y = x[t] @ moe.shared13
        y = (torch.nn.functional.silu(y[: s.moe_inter]) * y[s.moe_inter:]) @ moe.shared2
        for e, we in zip(ids[t].tolist(), w[t]):
            h = x[t] @ moe.w13[e]
            y = y + we * ((torch.nn.functional.silu(h[: s.moe_inter]) * h[s.moe_inter:]) @ moe.w2[e])
        out.append(y)
    torch.testing.assert_close(moe(x), torch.stack(out), rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.full((5,), s.routed_scale))


def test_writes_the_table_plan_reads(vc, tmp_path, capsys):
    out = tmp_path / "vc"
    assert vc.main(["--shapes", "tiny", "--batch", "1,2", "--widths", "1,2,3", "--context", "8",
                    "--kda-kernel", "triton", "--reps", "1", "--out", str(out)]) == 0
    result = json.loads((out / "verify_cost.json").read_text())
    assert result["expert_gemm"] == "torch._grouped_mm" and "independent" in result["routing"]
    rows = {(r["layer"], r["B"], r["W"]): r for r in result["rows"]}
    assert set(rows) == {(layer, B, W) for layer in ("moe", "kda", "mla") for B in (1, 2) for W in (1, 2, 3)}
    assert all(r["ms"] > 0 and r["tokens"] == r["B"] * r["W"] for r in rows.values())
    assert rows[("moe", 1, 1)]["experts_touched"] == 2 and rows[("moe", 2, 3)]["experts_touched"] <= 8

    parser = argparse.ArgumentParser()
    add_plan_args(parser)
    capsys.readouterr()
    assert main_plan(parser.parse_args(["--acceptance", "geometric:2.5:4", "--concurrency", "1,2",
                                        "--cost", str(out / "verify_cost.json")])) == 0
    text = capsys.readouterr().out
    assert "measured layer times" in text and "speculative-num-draft-tokens" in text
