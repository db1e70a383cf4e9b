"""`sglang-dflash plan`: the verify width W that maximises tokens per second, per concurrency.

Combines an acceptance curve (``acceptance_curve``) with step times: the model of
``cost_model`` by default, or with ``--cost FILE.json`` the per-layer times that
``benchmarks/verify_cost.py`` measured on a GPU (the draft and the weights outside the
timed layers stay modelled). For each concurrency C (C requests decoding together) it
prints the best W, tau(W), the predicted speed-up over no speculation and the
break-even tau at that W, and the server-config line that sets W. Without ``--cost``
every figure is the model's estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .acceptance_curve import Acceptance, load_acceptance
from .cost_model import GPUS, Assumptions, Drafter, Target, draft_ms, tau_at, target_step_ms

FLAG = "speculative-num-draft-tokens"


class ModelCosts:
    """Step times from ``cost_model`` (estimates)."""

    source = "model (sglang_dflash/plan/cost_model.py): estimates, not measurements"

    def widths(self, B: int) -> set[int] | None:
        """The verify widths it can price at B (None: any)."""
        return None

    def __init__(self, gpu: str, tp: int, a: Assumptions, target: Target = Target(), drafter: Drafter = Drafter()):
        self.gpu, self.tp, self.a, self.target, self.drafter = GPUS[gpu], tp, a, target, drafter

    def target_ms(self, B: int, W: int) -> float:
        return target_step_ms(self.gpu, self.target, self.a, B, W, self.tp)

    def draft_ms(self, B: int, W: int) -> float:
        return draft_ms(self.gpu, self.drafter, self.a, B, W, self.tp)


class MeasuredCosts(ModelCosts):
    """Target step = measured MoE, KDA and MLA layer times x their counts, plus the model's
    estimate of the weights outside them (lm_head, layer 0's dense MLP); draft modelled."""

    def __init__(self, path: Path, gpu: str, a: Assumptions):
        super().__init__(gpu, 1, a)
        self.table, self.where = read_cost_table(path), str(path)
        self.source = f"measured layer times ({path}) + modelled draft and lm_head"

    def widths(self, B: int) -> set[int]:
        return {W for (layer, b, W) in self.table if b == B and W > 1
                and all((other, B, W) in self.table for other in ("moe", "kda", "mla"))}

    def layer_ms(self, layer: str, B: int, W: int) -> float:
        try:
            return self.table[(layer, B, W)]
        except KeyError:
            raise ValueError(f"{self.where}: no {layer} row for B={B}, W={W} (measure it: "
                             f"benchmarks/verify_cost.py --batch {B} --widths {W})") from None

    def target_ms(self, B: int, W: int) -> float:
        m, T = self.target, B * W
        layers = (m.moe_layers * self.layer_ms("moe", B, W) + m.kda_layers * self.layer_ms("kda", B, W)
                  + m.mla_layers * self.layer_ms("mla", B, W))
        rest = m.untimed_params
        bw = self.gpu.hbm_gbps * 1e9 * 0.7
        fl = self.gpu.bf16_tflops * 1e12 * self.a.flop_eff
        return layers + 1e3 * max(2 * rest / bw, 2 * T * rest / fl)


def read_cost_table(path: Path) -> dict[tuple[str, int, int], float]:
    """{(layer, B, W): ms} from verify_cost.py's JSON (``rows`` of layer, B, W, ms)."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        return {(r["layer"], int(r["B"]), int(r["W"])): float(r["ms"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected verify_cost.py's JSON with rows of "
                         f"{{layer, B, W, ms}} ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Choice:
    concurrency: int
    plain_ms: float
    verify_width: int
    tau: float
    verify_ms: float
    draft_ms: float
    speedup: float
    breakeven_tau: float
    full_block_speedup: float | None  # at W = L, what a fixed full verify gives (None: not priced)


def tau_of(acc: Acceptance, W: int) -> float:
    """Measured tau(W) where bench offline walked W, else 1 + p_1 + ... + p_(W-1)."""
    return acc.tau_by_width.get(W) or tau_at(acc.curve, W)


def plan(acc: Acceptance, costs, concurrency: list[int]) -> list[Choice]:
    L = len(acc.curve) + 1
    choices = []
    for C in concurrency:
        plain = costs.target_ms(C, 1)

        def option(W: int) -> Choice:
            verify, draft = costs.target_ms(C, W), costs.draft_ms(C, W)
            tau = tau_of(acc, W)
            return Choice(C, plain, W, tau, verify, draft, tau * plain / (verify + draft),
                          (verify + draft) / plain, 0.0)

        priced = costs.widths(C)
        widths = [W for W in range(2, L + 1) if priced is None or W in priced]
        if not widths:
            raise ValueError(f"no verify width 2..{L} is priced at concurrency {C} (the cost table "
                             f"has none for B={C})")
        best = max((option(W) for W in widths), key=lambda c: c.speedup)
        full = option(L).speedup if L in widths else None
        choices.append(Choice(**{**asdict(best), "full_block_speedup": full}))
    return choices


def speedup_matrix(acc: Acceptance, costs, concurrency: list[int]) -> list[list[float]]:
    """[W - 2][i]: predicted speed-up of verify width W at concurrency[i], W = 2 .. L
    (None where the costs cannot price W)."""
    plain = [costs.target_ms(C, 1) for C in concurrency]

    def speedup(C: int, p: float, W: int) -> float:
        if costs.widths(C) is not None and W not in costs.widths(C):
            return None
        return tau_of(acc, W) * p / (costs.target_ms(C, W) + costs.draft_ms(C, W))

    return [[speedup(C, p, W) for C, p in zip(concurrency, plain)] for W in range(2, len(acc.curve) + 2)]


def print_matrix(matrix: list[list[float]], concurrency: list[int]) -> None:
    print("predicted speed-up by verify width (rows) and concurrency (columns):")
    print("    W " + "".join(f"{C:>7}" for C in concurrency))
    for W, row in enumerate(matrix, start=2):
        print(f"  {W:>3} " + "".join("    n/a" if x is None else f"{x:>6.2f}x" for x in row))


def print_plan(choices: list[Choice], header: list[str]) -> None:
    for line in header:
        print(line)
    print(f"{'conc':>5} {'plain ms':>9} {'best W':>7} {'tau(W)':>7} {'verify ms':>10} {'draft ms':>9} "
          f"{'speed-up':>9} {'break-even tau':>15} {'speed-up at W=L':>16}")
    for c in choices:
        print(f"{c.concurrency:>5} {c.plain_ms:>9.2f} {c.verify_width:>7} {c.tau:>7.2f} {c.verify_ms:>10.2f} "
              f"{c.draft_ms:>9.2f} {c.speedup:>8.2f}x {c.breakeven_tau:>15.2f} "
              + ("{:>16}".format("n/a") if c.full_block_speedup is None else f"{c.full_block_speedup:>15.2f}x"))
    print("server config lines (one W per server; pick the row of the concurrency it serves):")
    for c in choices:
        note = "" if c.speedup > 1 else "  # no W beats plain decoding here: serve without speculation"
        print(f"  concurrency {c.concurrency:>3}:  {FLAG}: {c.verify_width}{note}")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[1]
    p.add_argument("--acceptance", required=True, metavar="FILE.json|geometric:TAU[:L]",
                   help="the drafter's per-position acceptance: bench offline / bench online result.json, "
                        "a saved /server_info, {\"position_accept_rate\": [...]}, or an assumed "
                        "geometric curve with the given tau at block L (default 16)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64], help="default 1,8,32,64")
    p.add_argument("--context", type=int, default=Assumptions.context, help="tokens per request (default 2048)")
    p.add_argument("--routing-locality", type=float, default=0.0,
                   help="rho in [0, 1]: 0 = a request's verify tokens route independently (pessimistic, "
                        "default); 0.46 = ~64 of 256 experts for 16 tokens (clustered)")
    p.add_argument("--eager-drafter", action="store_true",
                   help="the draft is not CUDA-graphed: its ~350 launches bound it below")
    p.add_argument("--cost", type=Path, default=None,
                   help="per-layer times measured by benchmarks/verify_cost.py (TP1) instead of the model")
    p.add_argument("--out", type=Path, default=None, help="also write the plan as JSON here")


def main_plan(args) -> int:
    try:
        acc = load_acceptance(args.acceptance)
        a = Assumptions(context=args.context, routing_locality=args.routing_locality,
                        drafter_graphed=not args.eager_drafter)
        if args.tp < 1 or (args.cost is not None and args.tp != 1):
            raise ValueError(f"--tp {args.tp}: expected >= 1, and 1 with --cost (the measured layers are one GPU's)")
        costs = MeasuredCosts(args.cost, args.gpu, a) if args.cost else ModelCosts(args.gpu, args.tp, a)
        choices = plan(acc, costs, args.concurrency)
    except ValueError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    L = len(acc.curve) + 1
    measured = sorted(acc.tau_by_width)
    header = [f"plan: {GPUS[args.gpu].name} TP{args.tp}, context {args.context}, routing locality "
              f"{args.routing_locality:g}, drafter {'eager' if args.eager_drafter else 'graphed'}, block {L}",
              f"acceptance: {acc.source} (tau({L}) = {tau_of(acc, L):.2f}; tau(W) "
              + (f"as measured by bench offline at W = {measured}, elsewhere " if measured else "")
              + "1 + p_1 + ... + p_(W-1) of the curve)",
              f"step times: {costs.source}"]
    print_plan(choices, header)
    matrix = speedup_matrix(acc, costs, args.concurrency)
    print_matrix(matrix, args.concurrency)
    if args.out:
        args.out.write_text(json.dumps({"header": header, "acceptance_curve": acc.curve,
                                        "tau_by_width": {W: tau_of(acc, W) for W in range(1, L + 1)},
                                        "assumptions": asdict(a),
                                        "plan": [asdict(c) for c in choices], "concurrency": args.concurrency,
                                        "speedup_by_width": {W: row for W, row in enumerate(matrix, start=2)}},
                                       indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
