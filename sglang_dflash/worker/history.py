"""What each request has emitted so far, on the device, for the penalties of a verify block.

SGLang's scheduler knows a request's output on the host, one iteration late under overlap
scheduling (the worker's last results are read back after the next step is launched), and
its penalty state of a DFLASH batch is never fed. The worker therefore keeps its own, per
``req_to_token`` row (a request keeps its row for life; a new request's extend resets it):

  counts     [R, V] int32  occurrences of each token in the output (presence, repetition)
  frequency  [R, V] fp32   frequency penalty accumulated one occurrence at a time, as
                           SGLang's ``BatchedFrequencyPenalizer`` accumulates it, so the
                           penalty is the same float as the plain server's
  last_run   [R, L] int64  the tokens the last step committed (``last_len`` [R] of them),
                           which the host may not have seen yet

``counts`` and ``frequency`` exist from the first request that asks for a penalty on
(R x V x 8 bytes); ``last_run`` always (R x L).
"""

from __future__ import annotations

import torch


class OutputHistory:
    def __init__(self, rows: int, block_size: int, device):
        self.rows, self.block_size, self.device = rows, block_size, device
        self.last_run = torch.zeros((rows, block_size), dtype=torch.int64, device=device)
        self.last_len = torch.zeros((rows,), dtype=torch.int64, device=device)
        self.counts: torch.Tensor | None = None
        self.frequency: torch.Tensor | None = None

    @property
    def has_tables(self) -> bool:
        return self.counts is not None

    def start(self, rows: torch.Tensor, first: torch.Tensor, earlier: list[list[int]],
              frequency: torch.Tensor, need_tables: bool, vocab: int) -> None:
        """Reset rows [B] for requests whose output is ``earlier`` + first [B].

        ``earlier`` is empty unless a request was retracted and prefilled again; ``frequency``
        [B] fp32 is each request's frequency penalty (0 for none).
        """
        rows = rows.to(torch.int64)
        self.last_run[rows] = 0
        self.last_run[rows, 0] = first.to(torch.int64)
        self.last_len[rows] = 1
        if need_tables and not self.has_tables:
            self.counts = torch.zeros((self.rows, vocab), dtype=torch.int32, device=self.device)
            self.frequency = torch.zeros((self.rows, vocab), dtype=torch.float32, device=self.device)
        if not self.has_tables:
            return
        B, V = rows.shape[0], self.counts.shape[1]
        width = max(map(len, earlier), default=0)
        tokens = torch.zeros((B, width), dtype=torch.int64)
        for b, out in enumerate(earlier):
            tokens[b, : len(out)] = torch.tensor(list(out), dtype=torch.int64)
        valid = torch.arange(width)[None, :] < torch.tensor([len(out) for out in earlier])[:, None]
        # E.g. earlier [[], [5, 7]], first [3, 9] -> tokens [[0, 0, 3], [5, 7, 9]], valid [[F, F, T], [T, T, T]]
        tokens = torch.cat([tokens.to(self.device), first.to(torch.int64)[:, None]], dim=1)
        valid = torch.cat([valid.to(self.device), torch.ones((B, 1), dtype=torch.bool, device=self.device)], dim=1)
        counts = torch.zeros((B, V), dtype=torch.int32, device=self.device)
        acc = torch.zeros((B, V), dtype=torch.float32, device=self.device)
        _add_tokens(counts, acc, tokens, valid, frequency)
        self.counts[rows], self.frequency[rows] = counts, acc

    def block_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [B, V], frequency [B, V]): copies of rows [B], for a block to extend."""
        rows = rows.to(torch.int64)
        return self.counts[rows], self.frequency[rows]

    def commit(self, rows: torch.Tensor, emitted: torch.Tensor, commit_lens: torch.Tensor,
               frequency: torch.Tensor | None) -> None:
        """Record a verify step: emitted [B, L] (-1 past commit_lens [B]) joins the output of
        rows [B]; the tables only when ``frequency`` [B] (the rows' penalties) is given."""
        rows = rows.to(torch.int64)
        self.last_run[rows] = emitted.clamp_min(0)
        self.last_len[rows] = commit_lens.to(torch.int64)
        if frequency is None or not self.has_tables:
            return
        cols = torch.arange(emitted.shape[1], device=emitted.device)[None, :]
        counts, acc = self.block_rows(rows)
        _add_tokens(counts, acc, emitted.clamp_min(0), cols < commit_lens.to(torch.int64)[:, None], frequency)
        self.counts[rows], self.frequency[rows] = counts, acc

    def outputs_so_far(self, reqs, rows: torch.Tensor, seq_lens: torch.Tensor) -> list[list[int]]:
        """Each request's exact output on the host: what the scheduler has read back plus
        the part of the last step it has not (one device sync; custom logit processors)."""
        committed = seq_lens.tolist()
        runs = self.last_run[rows.to(torch.int64)].tolist()
        lens = self.last_len[rows.to(torch.int64)].tolist()
        out = []
        for req, seq_len, run, n in zip(reqs, committed, runs, lens, strict=True):
            # seq_lens counts the prompt and every output token but the last (its KV is
            # written by this step's verify)
            total = seq_len - len(req.origin_input_ids) + 1
            seen = list(req.output_ids)[:total]
            missing = total - len(seen)
            if not 0 <= missing <= n:
                raise RuntimeError(f"DFlash: request {req.rid} has {total} output tokens on the device but "
                                   f"{len(req.output_ids)} on the host, more apart than its last step ({n})")
            out.append(seen + run[n - missing: n])
        return out


def _add_tokens(counts: torch.Tensor, acc: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                frequency: torch.Tensor) -> None:
    """counts [B, V] += occurrences of tokens [B, T] where valid [B, T]; acc [B, V] += the
    row's frequency [B] per occurrence. Adding 0.0 where not valid leaves acc unchanged, and
    every addend of one cell is the same value, so the sum does not depend on the order."""
    counts.scatter_add_(1, tokens, valid.to(torch.int32))
    acc.scatter_add_(1, tokens, valid.to(torch.float32) * frequency.float()[:, None])
