"""Server-wide acceptance counts of the DFlash worker, as ``/server_info`` shows them.

SGLang hands the worker each verify's accepted-draft counts on the host
(``BaseSpecWorker.on_verify_complete_cpu``, called by the scheduler's result processor
right after ``accept_lens`` reach the CPU), so counting costs no device sync. The counts
are per verify *row*: under the overlap scheduler a request that finished in one step
can still be verified once more in the next, which the scheduler then discards, so the
server-wide counts can exceed the sum of the per-request histograms by about one step
per finished request (with ``--disable-overlap-schedule`` the two are equal).

The per-position acceptance follows from the counts (``acceptance.stats_from_counts``):
draft j was accepted in every step that accepted at least j drafts.
"""

from __future__ import annotations

from ..acceptance import stats_from_counts


class AcceptanceCounter:
    """Steps counted by accepted drafts (0 .. W-1) at verify width W."""

    def __init__(self, verify_width: int):
        if verify_width < 2:
            raise ValueError(f"verify width must be >= 2, got {verify_width}")
        self.verify_width = verify_width
        self.accepted_drafts_histogram = [0] * verify_width

    def add(self, accepted_drafts: list[int]) -> None:
        """Count one verify step per row; each value is that row's accepted drafts."""
        W = self.verify_width
        for n in accepted_drafts:
            if not 0 <= n < W:
                raise ValueError(f"accepted drafts must lie in 0..{W - 1} at verify width {W}, got {n}")
            self.accepted_drafts_histogram[n] += 1

    def report(self, block_size: int) -> dict:
        """JSON-ready figures: the counts, tau and P(draft j accepted) for j = 1 .. W-1."""
        stats = stats_from_counts([0] + self.accepted_drafts_histogram)
        return {
            "block_size": block_size,
            "verify_width": self.verify_width,
            "accepted_drafts_histogram": list(self.accepted_drafts_histogram),
            **stats.to_dict(),
            "counted": "every verified row since start-up (overlap scheduling also counts the one "
                       "discarded step of a request that had just finished)",
        }
