"""greedy_head: kernel vs twin vs the argmax of full logits; shards, ties, clear errors."""

import contextlib

import pytest
import torch
from helpers import assert_close

from sglang_dflash.kernels import greedy_head as kernel
from sglang_dflash.kernels.naive import greedy_head as twin

OPS = {"twin": twin.greedy_head, "kernel": kernel.greedy_head}
COMBINE = {"twin": twin.combine_shards, "kernel": kernel.combine_shards}
# (M, V, H, dtype): every M, V (one not a multiple of the 128-row tile) and H of the
# spec appears, each dtype with several of them; M 70 and 300 take the large tiles
CASES = [
    (1, 264, 64, torch.float32),
    (5, 1000, 96, torch.bfloat16),
    (33, 4099, 64, torch.float32),
    (5, 4099, 96, torch.bfloat16),
    (33, 264, 96, torch.bfloat16),
    (1, 1000, 96, torch.float32),
    # above 64 rows: the GEMM-sized 256 x 128 tile, with a partial row tile
    (70, 4099, 64, torch.bfloat16),
    (300, 1000, 96, torch.float32),
]
IDS = [f"M{M}-V{V}-H{H}-{str(dt).split('.')[-1]}" for M, V, H, dt in CASES]


@contextlib.contextmanager
def poisoned_empty(monkeypatch):
    """torch.empty hands out NaN floats and -7 ints: unwritten outputs or partials show."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", poisoned)
        yield


def _run(impl, hidden, weight, offset, monkeypatch):
    with poisoned_empty(monkeypatch):
        return OPS[impl](hidden, weight, offset)


def _full_logits(hidden, weight):
    """Reference: full logits in fp64 of the (possibly bf16) inputs."""
    return hidden.double() @ weight.double().T


@pytest.mark.parametrize("impl", OPS)
@pytest.mark.parametrize("M,V,H,dtype", CASES, ids=IDS)
def test_integer_logits_exact_with_ties(impl, M, V, H, dtype, monkeypatch):
    # small integers: every logit is exact in fp32 in any summation order, and ties abound
    gen = torch.Generator().manual_seed(M * V + H)
    hidden = torch.randint(-2, 3, (M, H), generator=gen).to(dtype)
    weight = torch.randint(-1, 2, (V, H), generator=gen).to(dtype)
    max_logit, token = _run(impl, hidden, weight, 0, monkeypatch)
    logits = _full_logits(hidden, weight)
    assert torch.equal(token, logits.argmax(dim=1))  # argmax: the first maximum
    assert torch.equal(max_logit, logits.max(dim=1).values.float())
    assert max_logit.dtype == torch.float32 and token.dtype == torch.int64


@pytest.mark.parametrize("M,V,H,dtype", CASES, ids=IDS)
def test_kernel_matches_twin_and_full_argmax(M, V, H, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(7 * M + V + H)
    # hidden rows strided inside a wider buffer: the kernel must follow stride(0)
    hidden = torch.randn(M, H + 32, generator=gen).to(dtype)[:, :H]
    weight = torch.randn(V, H, generator=gen).to(dtype) * 0.1
    offset = 12345
    logits = _full_logits(hidden, weight)
    ref_max = logits.max(dim=1).values
    for impl in OPS:
        max_logit, token = _run(impl, hidden, weight, offset, monkeypatch)
        assert_close(f"{impl} max_logit", ref_max, max_logit, 1e-5)
        # the chosen token's exact logit is the maximum up to fp32 summation error
        chosen = logits.gather(1, (token - offset)[:, None])[:, 0]
        assert (ref_max - chosen).abs().max() < 1e-4, impl
        # and it is the argmax wherever the top two are not within that error
        top2 = logits.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.float().mean() > 0.8, "too many near-ties: the comparison says little"
        assert torch.equal(token[clear] - offset, logits.argmax(dim=1)[clear]), impl


@pytest.mark.parametrize("impl", OPS)
def test_ties_go_to_the_lowest_id(impl, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    # integers keep the tie exact: positive hidden rows, and rows 7, 150 and 299 (three
    # different tiles) all 2 while every other weight is in -1..1
    hidden = torch.randint(1, 4, (5, 64), generator=gen).float()
    weight = torch.randint(-1, 2, (300, 64), generator=gen).float()
    weight[[7, 150, 299]] = 2.0
    _, token = _run(impl, hidden, weight, 40, monkeypatch)
    assert torch.equal(token, torch.full((5,), 47))
    _, token = _run(impl, hidden, weight.new_ones(300, 64), 0, monkeypatch)
    assert torch.equal(token, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("impl", OPS)
def test_negative_logits_never_pick_the_padded_tail(impl, monkeypatch):
    # V = 300 leaves 84 padding rows in the last tile; a zero logit there would win
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randint(1, 4, (4, 64), generator=gen).float()
    weight = -torch.randint(1, 4, (300, 64), generator=gen).float()
    max_logit, token = _run(impl, hidden, weight, 0, monkeypatch)
    logits = _full_logits(hidden, weight)
    assert torch.equal(token, logits.argmax(dim=1))
    assert (max_logit < 0).all()


@pytest.mark.parametrize("impl", OPS)
def test_two_shards_combined_equal_the_full_head(impl, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randint(-2, 3, (9, 64), generator=gen).float()
    weight = torch.randint(-1, 2, (1000, 64), generator=gen).float()
    # a tie across the shard boundary: the first shard's id must win
    weight[900] = weight[100] = hidden[0] * 4
    full_max, full_token = _run(impl, hidden, weight, 0, monkeypatch)
    shards = [_run(impl, hidden, weight[:500], 0, monkeypatch),
              _run(impl, hidden, weight[500:], 500, monkeypatch)]
    maxes = torch.stack([s[0] for s in shards])
    tokens = torch.stack([s[1] for s in shards])
    combine = COMBINE[impl]
    with poisoned_empty(monkeypatch):
        assert torch.equal(combine(maxes, tokens), full_token)
        # the order of the shards does not matter
        assert torch.equal(combine(maxes.flip(0), tokens.flip(0)), full_token)
    assert torch.equal(maxes.max(dim=0).values, full_max)
    assert full_token[0] == 100


@pytest.mark.parametrize("R,M", [(1, 5), (2, 300), (4, 7)], ids=["R1-M5", "R2-M300", "R4-M7"])
def test_combine_shards_kernel_equals_twin_on_ties(R, M, monkeypatch):
    gen = torch.Generator().manual_seed(R * 100 + M)
    # few distinct values: most rows tie across shards, and -inf shards never win
    maxes = torch.randint(-2, 2, (R, M), generator=gen).float()
    maxes[0, ::3] = float("-inf")
    tokens = torch.randint(0, 1000, (R, M), generator=gen)
    ref = twin.combine_shards(maxes, tokens)
    with poisoned_empty(monkeypatch):
        out = kernel.combine_shards(maxes, tokens)
    assert torch.equal(out, ref)
    top = maxes.max(dim=0).values
    want = torch.where(maxes == top, tokens, 1 << 40).min(dim=0).values
    assert torch.equal(ref, want)


def test_bad_arguments_are_named():
    hidden, weight = torch.randn(3, 64), torch.randn(100, 64)
    with pytest.raises(ValueError, match="greedy_head: argument `weight`.*64"):
        kernel.greedy_head(hidden, torch.randn(100, 32), 0)
    with pytest.raises(ValueError, match="greedy_head: argument `hidden`"):
        kernel.greedy_head(hidden[0], weight, 0)
    with pytest.raises(ValueError, match="greedy_head: argument `vocab_offset`"):
        kernel.greedy_head(hidden, weight, -1)
    with pytest.raises(ValueError, match="greedy_head: argument `vocab_offset`"):
        kernel.greedy_head(hidden, weight, torch.tensor(3))
    with pytest.raises(ValueError, match="greedy_head: argument `hidden/weight`"):
        kernel.greedy_head(hidden.long(), weight, 0)
    with pytest.raises(ValueError, match="greedy_head: argument `weight`.*contiguous"):
        kernel.greedy_head(hidden, torch.randn(64, 100).T, 0)
    for combine in COMBINE.values():
        with pytest.raises(ValueError, match="combine_shards"):
            combine(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match="combine_shards"):
            combine(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.int64))
