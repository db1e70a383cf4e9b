"""The step-time model and `sglang-dflash plan` against hand-computed cases.

The model's figures are estimates (see cost_model's docstring); these tests check that
the formulas compute what the docstring derives, that they reproduce the step-time table
of GPU_READINESS.md within its own rounding, and that the planner picks the W a hand
calculation picks.
"""

import argparse
import json

import pytest

from sglang_dflash.plan import acceptance_curve as ac
from sglang_dflash.plan.cost_model import (
    GPUS, Assumptions, Drafter, Target, draft_ms, experts_touched, hbm_efficiency, routed_tokens, tau_at,
    target_step_ms,
)
from sglang_dflash.plan.planner import MeasuredCosts, add_plan_args, main_plan, plan

H200, KIMI, DRAFTER = GPUS["h200"], Target(), Drafter()


def test_experts_touched_by_hand():
    assert experts_touched(1, 256, 8) == pytest.approx(8.0)
    # 256 x (1 - (31/32)^16): "~102 of 256" in GPU_READINESS.md
    assert experts_touched(16, 256, 8) == pytest.approx(101.962, abs=1e-3)
    assert experts_touched(32, 256, 8) == pytest.approx(163.314, abs=1e-3)
    assert experts_touched(512, 256, 8) == pytest.approx(256.0, abs=1e-3)
    # rho = 0.46: a request's 16 tokens route like 1 + 15 x 0.54 = 9.1 independent ones
    assert routed_tokens(1, 16, 0.46) == pytest.approx(9.1)
    assert experts_touched(routed_tokens(1, 16, 0.46), 256, 8) == pytest.approx(64.2, abs=0.1)
    assert routed_tokens(32, 16, 0.0) == 512


def test_hbm_efficiency_interpolates_in_log2_tokens():
    a = Assumptions()
    assert [hbm_efficiency(t, a) for t in (1, 4, 16, 512)] == pytest.approx([0.5, 0.6, 0.7, 0.7])


def test_plain_step_by_hand():
    # 3.08e9 bf16 weights + 2048 tokens x 8064 B MLA KV + KDA state read and written,
    # at 50 % of 4.3 TB/s (one token): 6.2633e9 B / 2.15e12 B/s
    assert KIMI.mla_kv_bytes_per_token == 8064
    assert target_step_ms(H200, KIMI, Assumptions(), 1, 1) == pytest.approx(2.91318, rel=1e-5)


def test_tensor_parallel_halves_weights_and_state_not_the_latent_kv():
    a = Assumptions()
    one, two = target_step_ms(H200, KIMI, a, 1, 1), target_step_ms(H200, KIMI, a, 1, 1, tp=2)
    halved = (2 * 3.08e9 / 2 + 2048 * 8064 + 2 * 41.4 * 2**20 / 2) / (4.3e12 * 0.5) * 1e3
    assert two == pytest.approx(halved + 2 * 27 * 10e-3, rel=1e-6)  # + 54 all-reduces of 10 us
    assert one / 2 < two < one


# GPU_READINESS.md, "Step-time model": (plain, 16-token verify, draft, break-even tau,
# speed-ups at tau 2..6), the rounded figures it prints
TABLE = {
    "B1-independent-eager": (1, Assumptions(drafter_graphed=False), 2.9, 13.6, 1.8, 5.4,
                             (0.37, 0.56, 0.75, 0.93, 1.12)),
    "B1-clustered-graphed": (1, Assumptions(routing_locality=0.46), 2.9, 9.0, 0.57, 3.4,
                             (0.59, 0.89, 1.19, 1.48, 1.78)),
    "B32-independent": (32, Assumptions(drafter_graphed=False), 22.0, 33.8, 3.0, 1.7,
                        (1.19, 1.79, 2.39, 2.99, 3.58)),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_reproduces_the_gpu_readiness_table(case):
    """Step times within 3 %, the draft within 15 % (the table's B=32 draft also counts
    the greedy head's L2 re-reads, which the model leaves out), speed-ups and break-even
    tau within 6 % (the table's own rounding of plain 2.87 ms to 2.9 is ~1 %)."""
    B, a, plain, verify, draft, breakeven, speedups = TABLE[case]
    p, v, d = (target_step_ms(H200, KIMI, a, B, 1), target_step_ms(H200, KIMI, a, B, 16),
               draft_ms(H200, DRAFTER, a, B, 16))
    assert p == pytest.approx(plain, rel=0.03)
    assert v == pytest.approx(verify, rel=0.03)
    assert d == pytest.approx(draft, rel=0.15)
    assert (v + d) / p == pytest.approx(breakeven, rel=0.06)
    assert [tau * p / (v + d) for tau in (2, 3, 4, 5, 6)] == pytest.approx(speedups, rel=0.06)


def test_graphed_draft_has_no_launch_floor():
    eager, graphed = Assumptions(drafter_graphed=False), Assumptions()
    assert draft_ms(H200, DRAFTER, eager, 1, 16) == pytest.approx(350 * 5e-3)
    # weights 0.902 GB + lm_head 0.755 GB + draft K/V of 2048 tokens, at 70 % of 4.3 TB/s (16 tokens)
    by_hand = (2 * 451.2e6 + 2 * 163840 * 2304 + 2048 * 46080) / (4.3e12 * 0.7) * 1e3
    assert draft_ms(H200, DRAFTER, graphed, 1, 16) == pytest.approx(by_hand, rel=1e-6)


def test_tau_and_geometric_curve():
    assert tau_at([0.9, 0.5, 0.1], 1) == 1.0 and tau_at([0.9, 0.5, 0.1], 3) == pytest.approx(2.4)
    with pytest.raises(ValueError, match="covers W = 1..4"):
        tau_at([0.9, 0.5, 0.1], 5)
    curve = ac.geometric_curve(5.21, 16)
    assert len(curve) == 15 and 1 + sum(curve) == pytest.approx(5.21, abs=1e-9)
    assert curve[1] == pytest.approx(curve[0] ** 2)
    assert ac.geometric_curve(16, 16) == pytest.approx([1.0] * 15)
    with pytest.raises(ValueError, match="1 <= tau <= L"):
        ac.geometric_curve(17, 16)


class HandCosts:
    """Verify of W costs 1 + 0.5 (W - 1) plain steps; the draft is free."""

    def widths(self, B):
        return None

    def target_ms(self, B, W):
        return 1.0 + 0.5 * (W - 1)

    def draft_ms(self, B, W):
        return 0.0


def test_planner_picks_the_hand_computed_width():
    # W=2: 1.9 / 1.5 = 1.267; W=3: 2.4 / 2.0 = 1.2; W=4: 2.5 / 2.5 = 1.0
    (choice,) = plan(ac.Acceptance([0.9, 0.5, 0.1], "hand"), HandCosts(), [1])
    assert (choice.verify_width, choice.tau) == (2, pytest.approx(1.9))
    assert choice.speedup == pytest.approx(1.9 / 1.5) and choice.breakeven_tau == pytest.approx(1.5)
    assert choice.full_block_speedup == pytest.approx(1.0)
    # a measured tau(3) of 3.0 (bench offline --verify-width) wins over the curve's 2.4: 3.0 / 2.0
    (choice,) = plan(ac.Acceptance([0.9, 0.5, 0.1], "hand", {3: 3.0}), HandCosts(), [1])
    assert (choice.verify_width, choice.speedup) == (3, pytest.approx(1.5))


def test_curve_sources_and_their_errors(tmp_path):
    cases = {
        "offline.json": {"tau": 2.4, "position_accept_rate": [0.9, 0.5, 0.1]},
        "server_info.json": {"internal_states": [{"dflash_acceptance": {"position_accept_rate": [0.9, 0.5, 0.1]}}]},
        # two levels whose histograms (index = accepted drafts) sum to [1, 4, 4, 1]
        "online.json": {"server": {"server_info": {"speculative_num_draft_tokens": 4}},
                        "levels": [{"accept_len_histogram": [1, 2, 2]}, {"accept_len_histogram": [0, 2, 2, 1]}]},
    }
    for name, data in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert ac.load_curve(str(tmp_path / "offline.json"))[0] == [0.9, 0.5, 0.1]
    assert ac.load_curve(str(tmp_path / "server_info.json"))[0] == [0.9, 0.5, 0.1]
    assert ac.load_curve(str(tmp_path / "online.json"))[0] == pytest.approx([0.9, 0.5, 0.1])
    sweep = {"position_accept_rate": [0.9, 0.5, 0.1], "verify_widths": [
        {"verify_width": 2, "draft_trained_block": {"tau": 1.95}, "draft_shrunk_block": {"tau": 1.9}}]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert ac.load_acceptance(str(tmp_path / "sweep.json")).tau_by_width == {2: 1.95}
    bad = {"rising.json": ({"position_accept_rate": [0.5, 0.6]}, "cannot rise"),
           "plain_server.json": ({"internal_states": [{"avg_spec_accept_length": 3.0}]}, "no dflash_acceptance"),
           "other.json": ({"tau": 3.0}, "expected position_accept_rate")}
    for name, (data, needle) in bad.items():
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(ValueError, match=needle) as err:
            ac.load_curve(str(tmp_path / name))
        assert name in str(err.value)


def _run(argv, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_plan_args(parser)
    rc = main_plan(parser.parse_args(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_plan_command_prints_widths_and_flag_lines(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc, text, _ = _run(["--acceptance", "geometric:5.21", "--concurrency", "1,64", "--out", str(out)], capsys)
    assert rc == 0
    assert "model (sglang_dflash/plan/cost_model.py): estimates, not measurements" in text
    result = json.loads(out.read_text())
    low, high = result["plan"]
    # at concurrency 1 a short verify pays (experts are read per token); at 64 the full block
    assert 2 < low["verify_width"] < 16 and high["verify_width"] == 16
    assert low["speedup"] > low["full_block_speedup"]
    assert f"concurrency   1:  speculative-num-draft-tokens: {low['verify_width']}" in text
    assert set(result["speedup_by_width"]) == {str(w) for w in range(2, 17)}


def test_plan_with_a_measured_cost_table(tmp_path, capsys):
    """--cost: the target step is the measured layers x their counts + the modelled rest."""
    rows = [{"layer": layer, "B": 1, "W": W, "ms": ms * W ** 0.5}
            for layer, ms in (("moe", 0.2), ("kda", 0.05), ("mla", 0.04)) for W in range(1, 17)]
    table = tmp_path / "cost.json"
    table.write_text(json.dumps({"rows": rows}))
    costs = MeasuredCosts(table, "h200", Assumptions())
    rest = (2 * (163840 * 2304 + 3 * 2304 * 9216)) / (4.3e12 * 0.7) * 1e3
    assert costs.target_ms(1, 4) == pytest.approx(2 * (26 * 0.2 + 20 * 0.05 + 7 * 0.04) + rest)
    rc, text, _ = _run(["--acceptance", "geometric:5.21", "--concurrency", "1", "--cost", str(table)], capsys)
    assert rc == 0 and f"measured layer times ({table})" in text
    rc, _, err = _run(["--acceptance", "geometric:5.21", "--concurrency", "8", "--cost", str(table)], capsys)
    assert rc == 2 and "no moe row for B=8, W=1" in err
