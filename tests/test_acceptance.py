"""Acceptance figures against hand-computed answers (an off-by-one shows here)."""

import pytest

from sglang_dflash.acceptance import acceptance_stats, from_accepted_histogram, stats_from_counts


def test_hand_written_commit_lengths():
    # L = 4; steps commit 1, 3, 2, 4, 4 tokens
    s = acceptance_stats([1, 3, 2, 4, 4], 4)
    assert s.commit_len_counts == (0, 1, 1, 1, 2)
    assert (s.steps, s.tokens, s.tau) == (5, 14, 14 / 5)
    # draft 1 is accepted in the steps that committed 2, 3, 4, 4 tokens; draft 3 in 4, 4
    assert s.position_accept_rate == (4 / 5, 3 / 5, 2 / 5)


def test_no_draft_ever_accepted_and_every_draft_accepted():
    assert acceptance_stats([1, 1, 1], 16).position_accept_rate == (0.0,) * 15
    full = acceptance_stats([16, 16], 16)
    assert full.position_accept_rate == (1.0,) * 15 and full.tau == 16.0


def test_sglang_histogram_counts_accepted_drafts():
    # SGLang: index = accepted drafts; 2 steps accepted 0, 1 step accepted 2
    s = from_accepted_histogram([2, 0, 1], 4)
    assert s.commit_len_counts == (0, 2, 0, 1, 0)
    assert s.position_accept_rate == (1 / 3, 1 / 3, 0.0) and s.tau == 5 / 3
    assert from_accepted_histogram([2, 0, 1], 4) == acceptance_stats([1, 1, 3], 4)


def test_empty_and_bad_inputs():
    empty = acceptance_stats([], 4)
    assert (empty.steps, empty.tau, empty.position_accept_rate) == (0, 0.0, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="1..4"):
        acceptance_stats([0, 2], 4)
    with pytest.raises(ValueError, match="1..4"):
        acceptance_stats([5], 4)
    with pytest.raises(ValueError, match="block size 2"):
        from_accepted_histogram([1, 1, 1], 2)
    with pytest.raises(ValueError, match="non-negative"):
        stats_from_counts([1, -1])
