"""Acceptance figures from the commit length of each verify step: pure Python, no torch.

``commit_len`` = accepted drafts + 1 (the bonus). Draft ``j`` (1-based) is accepted in a
step exactly when the step committed more than ``j`` tokens, so with
``counts[n]`` = steps that committed ``n`` tokens:

    P(draft j accepted) = sum(counts[n] for n > j) / steps,   j = 1 .. L-1
    tau                 = sum(n * counts[n]) / steps

E.g. commit lengths [1, 3, 2] at L = 4: counts [0, 1, 1, 1, 0], P(draft 1) = 2/3,
P(draft 2) = 1/3, P(draft 3) = 0, tau = 2. SGLang's per-request
``spec_correct_drafts_histogram`` counts steps by accepted drafts (index = commit_len - 1);
``from_accepted_histogram`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcceptanceStats:
    tau: float                               # tokens per verify step, bonus included
    steps: int                               # verify steps (blocks)
    tokens: int                              # tokens committed by those steps
    commit_len_counts: tuple[int, ...]       # [L + 1]: steps that committed 0..L tokens
    position_accept_rate: tuple[float, ...]  # [L - 1]: P(draft j accepted), j = 1..L-1

    def to_dict(self) -> dict:
        return {
            "tau": self.tau, "steps": self.steps, "tokens": self.tokens,
            "commit_len_counts": list(self.commit_len_counts),
            "position_accept_rate": list(self.position_accept_rate),
        }


def stats_from_counts(counts: list[int]) -> AcceptanceStats:
    """Figures from ``counts[n]`` = steps that committed n tokens (n = 0 .. L)."""
    if len(counts) < 2 or any(c < 0 for c in counts):
        raise ValueError(f"commit length counts: expected L + 1 >= 2 non-negative counts, got {counts}")
    steps = sum(counts)
    tokens = sum(n * c for n, c in enumerate(counts))
    L = len(counts) - 1
    rates = tuple(sum(counts[j + 1:]) / steps if steps else 0.0 for j in range(1, L))
    return AcceptanceStats(tokens / steps if steps else 0.0, steps, tokens, tuple(counts), rates)


def acceptance_stats(commit_lens: list[int], block_size: int) -> AcceptanceStats:
    """Figures from the commit length (1 .. block_size) of every verify step."""
    bad = [n for n in commit_lens if not 1 <= n <= block_size]
    if bad:
        raise ValueError(f"commit lengths must lie in 1..{block_size}, got {sorted(set(bad))}")
    counts = [0] * (block_size + 1)
    for n in commit_lens:
        counts[n] += 1
    return stats_from_counts(counts)


def from_accepted_histogram(histogram: list[int], block_size: int) -> AcceptanceStats:
    """Figures from SGLang's histogram of accepted drafts per step (index 0 .. L-1)."""
    if len(histogram) > block_size:
        raise ValueError(f"accepted-drafts histogram has {len(histogram)} entries for block "
                         f"size {block_size} (at most L: 0 .. L-1 accepted drafts)")
    counts = [0] + list(histogram) + [0] * (block_size - len(histogram))
    return stats_from_counts(counts)
