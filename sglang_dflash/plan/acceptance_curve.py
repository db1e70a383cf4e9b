"""The acceptance curve the planner reads: P(draft j accepted), j = 1 .. L-1, of the trained block.

Sources, each named in errors by file and field:

- ``bench offline`` result.json (``position_accept_rate`` at the drafter's block); run
  with ``--verify-width`` it also holds the teacher-forced tau of "draft L, verify W" at
  each W (``verify_widths``), which the planner then uses for those W: it is higher
  than the curve's 1 + p_1 + ... + p_(W-1), because a walk capped at W starts its next
  block where the last one was cut, not where a draft was rejected (an easier place);
- ``/server_info`` saved as JSON (``internal_states[0].dflash_acceptance``) or that dict
  alone: the curve covers only the server's verify width W;
- ``bench online`` result.json: the per-request histograms of every level, summed;
- ``{"position_accept_rate": [...]}`` written by hand;
- ``geometric:TAU[:L]``: every draft accepted with the same conditional probability a,
  a solved so that tau(L) = 1 + a + ... + a^(L-1) = TAU. A published offline tau is one
  number, not a curve; this turns it into the simplest curve with that tau (real curves
  usually fall faster than geometric towards the end of the block).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..acceptance import from_accepted_histogram

SERVER_INFO_KEY = "dflash_acceptance"


@dataclass(frozen=True)
class Acceptance:
    curve: list[float]                  # [L-1] P(draft j accepted) of the trained block
    source: str
    tau_by_width: dict[int, float] = field(default_factory=dict)  # measured tau(W), where known


def measured_taus(data: dict, where: str) -> dict[int, float]:
    """{W: tau} of bench offline's "draft L, verify W" rows (empty without them)."""
    rows = data.get("verify_widths") or []
    try:
        return {int(r["verify_width"]): float(r["draft_trained_block"]["tau"]) for r in rows}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: field verify_widths: expected rows of verify_width and "
                         "draft_trained_block.tau (bench offline --verify-width)") from None


def geometric_curve(tau: float, L: int) -> list[float]:
    """[L-1] curve a, a^2, ... with 1 + a + ... + a^(L-1) = tau (bisection on a)."""
    if L < 2 or not 1.0 <= tau <= L:
        raise ValueError(f"geometric acceptance: expected 1 <= tau <= L and L >= 2, got tau {tau}, L {L}")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        a = (lo + hi) / 2
        if 1.0 + sum(a**j for j in range(1, L)) < tau:
            lo = a
        else:
            hi = a
    a = (lo + hi) / 2
    return [a**j for j in range(1, L)]


def _check(curve, where: str) -> list[float]:
    if not isinstance(curve, list) or not curve or not all(isinstance(p, (int, float)) for p in curve):
        raise ValueError(f"{where}: expected a non-empty list of probabilities, got {curve!r}")
    if any(not 0.0 <= p <= 1.0 for p in curve):
        raise ValueError(f"{where}: probabilities must lie in [0, 1], got {curve}")
    # draft j is accepted only if draft j-1 was: the curve cannot rise (1e-12: float sums)
    if any(b > a + 1e-12 for a, b in zip(curve, curve[1:])):
        raise ValueError(f"{where}: P(draft j accepted) cannot rise with j, got {curve}")
    return [float(p) for p in curve]


def _from_online(data: dict, where: str) -> list[float]:
    hists = [lv.get("accept_len_histogram") for lv in data["levels"] if lv.get("accept_len_histogram")]
    if not hists:
        raise ValueError(f"{where}: no level has an accept_len_histogram (the server sent no "
                         "per-request stats)")
    total = [0] * max(map(len, hists))
    for h in hists:
        for i, n in enumerate(h):
            total[i] += n
    info = (data.get("server") or {}).get("server_info") or {}
    W = max(int(info.get("speculative_num_draft_tokens") or 0), len(total))
    return list(from_accepted_histogram(total, W).position_accept_rate)


def curve_from_json(data, where: str) -> list[float]:
    """The curve held by one of the JSON shapes in the module docstring."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "position_accept_rate" in data:
        return _check(data["position_accept_rate"], f"{where}: field position_accept_rate")
    if isinstance(data.get(SERVER_INFO_KEY), dict):
        return curve_from_json(data[SERVER_INFO_KEY], f"{where}: {SERVER_INFO_KEY}")
    states = data.get("internal_states")
    if isinstance(states, list) and states and isinstance(states[0], dict):
        if SERVER_INFO_KEY not in states[0]:
            raise ValueError(f"{where}: internal_states[0] has no {SERVER_INFO_KEY} (not a server "
                             "running the sglang-dflash worker?)")
        return curve_from_json(states[0], f"{where}: internal_states[0]")
    if isinstance(data.get("levels"), list):
        return _check(_from_online(data, where), f"{where}: levels")
    raise ValueError(f"{where}: expected position_accept_rate (bench offline, or by hand), "
                     f"internal_states[0].{SERVER_INFO_KEY} (/server_info) or levels (bench online)")


def load_acceptance(spec: str) -> Acceptance:
    """The curve (and measured taus) of ``--acceptance FILE.json`` or ``geometric:TAU[:L]``."""
    curve, source = load_curve(spec)
    if spec.startswith("geometric:"):
        return Acceptance(curve, source)
    data = json.loads(Path(spec).read_text())
    return Acceptance(curve, source, measured_taus(data, spec) if isinstance(data, dict) else {})


def load_curve(spec: str) -> tuple[list[float], str]:
    """(curve, where it came from) for ``--acceptance FILE.json`` or ``geometric:TAU[:L]``."""
    if spec.startswith("geometric:"):
        parts = spec.split(":")[1:]
        try:
            tau, L = float(parts[0]), int(parts[1]) if len(parts) > 1 else 16
        except (ValueError, IndexError):
            raise ValueError(f"--acceptance {spec}: expected geometric:TAU or geometric:TAU:L") from None
        curve = geometric_curve(tau, L)
        return curve, f"assumed geometric curve, P(draft j accepted) = {curve[0]:.4f}^j"
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--acceptance {spec}: no such file (or geometric:TAU[:L])")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return curve_from_json(data, str(path)), str(path)
