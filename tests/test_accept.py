"""accept_greedy / accept_sampled: hand-written scenarios, kernel == twin, and the sampled
rule reproduces the target distribution (with negative controls it must catch)."""

import pytest
import torch

from sglang_dflash.kernels import accept as kernel
from sglang_dflash.kernels.naive import accept as twin
from sglang_dflash.kernels.naive.accept import inverse_cdf_fixed_point

MASK = 163839  # Kimi's mask id: an ordinary token for acceptance
SENTINEL = -7  # poison for the kernel's int outputs; -1 is a legal emitted value


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output element of a kernel call must be written: start them as garbage."""
    real = kernel._outputs

    def poisoned(candidates):
        accept_len, emitted, finished = real(candidates)
        return accept_len.fill_(SENTINEL), emitted.fill_(SENTINEL), finished.fill_(True)

    monkeypatch.setattr(kernel, "_outputs", poisoned)


OPS = {"twin": twin, "kernel": kernel}


def _long(rows):
    return torch.tensor(rows, dtype=torch.long)


def _stops(ids):
    return _long([ids]) if ids else torch.empty(1, 0, dtype=torch.long)


def _pad(tokens, L):
    return _long([tokens + [-1] * (L - len(tokens))])


# candidates [c, d1, d2, d3, d4] against target_predict [1, 2, 3, 4, 5]:
# (id, drafts, remaining, stop_ids, expected emitted, expected finished)
PRED = [1, 2, 3, 4, 5]
GREEDY_SCENARIOS = [
    ("all-accepted", [1, 2, 3, 4], 100, [], [1, 2, 3, 4, 5], False),
    ("none-accepted", [7, 7, 7, 7], 100, [], [1], False),
    ("first-draft-wrong", [7, 2, 3, 4], 100, [], [1], False),
    ("mid-rejection", [1, 2, 7, 4], 100, [], [1, 2, 3], False),
    ("eos-first-emitted", [1, 2, 3, 4], 100, [1], [1], True),
    ("eos-middle", [1, 2, 3, 4], 100, [3], [1, 2, 3], True),
    ("eos-is-bonus", [1, 7, 3, 4], 100, [2], [1, 2], True),
    ("eos-only-rejected", [1, 7, 3, 4], 100, [4, 7], [1, 2], False),
    ("first-of-two-stops", [1, 2, 3, 4], 100, [4, 2], [1, 2], True),
    ("stop-ids-padded", [1, 2, 3, 4], 100, [-1, 3, -1], [1, 2, 3], True),
    ("remaining-1", [1, 2, 3, 4], 1, [], [1], True),
    ("remaining-mid-block", [1, 2, 3, 4], 3, [], [1, 2, 3], True),
    ("remaining-equals-chain", [1, 2, 3, 4], 5, [], [1, 2, 3, 4, 5], True),
    ("remaining-one-more", [1, 2, 3, 4], 6, [], [1, 2, 3, 4, 5], False),
    ("remaining-before-stop", [1, 2, 3, 4], 2, [4], [1, 2], True),
]


@pytest.mark.parametrize("impl", OPS)
@pytest.mark.parametrize("case", GREEDY_SCENARIOS, ids=[c[0] for c in GREEDY_SCENARIOS])
def test_accept_greedy_scenarios(impl, case):
    _, drafts, remaining, stops, want, want_finished = case
    a, emitted, finished = OPS[impl].accept_greedy(
        _long([[0] + drafts]), _long([PRED]), _long([remaining]), _stops(stops))
    assert torch.equal(emitted, _pad(want, 5))
    assert torch.equal(a, _long([len(want) - 1]))
    assert finished.tolist() == [want_finished]


@pytest.mark.parametrize("impl", OPS)
def test_accept_greedy_mask_id_is_ordinary_and_full_block(impl):
    L = 16
    pred = torch.arange(100, 100 + L)
    pred[:4] = MASK
    rows = [torch.cat([pred.new_tensor([MASK]), pred[:-1]]),  # all 15 accepted, mask ids included
            torch.cat([pred.new_tensor([5, 6]), pred[1:-1]])]  # draft 1 wrong: accept_len 0
    stops = _long([[MASK + 1, 99], [MASK + 1, 99]])  # a stop that never appears
    a, emitted, finished = OPS[impl].accept_greedy(torch.stack(rows), torch.stack([pred, pred]),
                                                   _long([50, 50]), stops)
    assert torch.equal(a, _long([L - 1, 0]))
    assert torch.equal(emitted[0], pred)
    assert torch.equal(emitted[1], _pad([MASK], L)[0])
    assert finished.tolist() == [False, False]


def _random_greedy(B, L, E, gen):
    # few distinct tokens so stops hit often; drafts copy the target up to a random point
    pred = torch.randint(0, 6, (B, L), generator=gen)
    cand = torch.cat([torch.randint(0, 6, (B, 1), generator=gen), pred[:, :-1]], dim=1)
    wrong_at = torch.randint(1, L + 3, (B,), generator=gen)
    cols = torch.arange(L)[None, :]
    cand = torch.where(cols == wrong_at[:, None], (cand + 1) % 6, cand)
    remaining = torch.randint(1, L + 4, (B,), generator=gen)
    stops = torch.randint(-1, 12, (B, E), generator=gen)
    return cand, pred, remaining, stops


GREEDY_SHAPES = [(B, L, E) for B in (1, 3, 7) for L in (16, 4) for E in (0, 2)]


@pytest.mark.parametrize("B,L,E", GREEDY_SHAPES, ids=[f"B{B}-L{L}-E{E}" for B, L, E in GREEDY_SHAPES])
def test_accept_greedy_kernel_equals_twin(B, L, E):
    gen = torch.Generator().manual_seed(100 * B + L + E)
    cand, pred, remaining, stops = _random_greedy(B, L, E, gen)
    # row-strided views: the kernel must follow stride(0), not assume L
    cand = torch.cat([cand, cand], dim=1)[:, :L]
    ref = twin.accept_greedy(cand, pred, remaining, stops)
    out = kernel.accept_greedy(cand, pred, remaining, stops)
    for name, r, o in zip(("accept_len", "emitted", "finished"), ref, out):
        assert torch.equal(r, o), name


# ---- sampled acceptance: hand-made distributions (no rounding boundary near any u) ----

def _probs(rows, V=4):
    p = torch.zeros(1, len(rows), V)
    for j, row in enumerate(rows):
        p[0, j, : len(row)] = torch.tensor(row)
    return p


SAMPLED_SCENARIOS = [
    # (id, drafts, prob rows, u_accept, u_sample, stops, remaining, expected emitted)
    ("certain-drafts-then-bonus", [1, 2], [[0, 1.0], [0, 0, 1.0], [0.25, 0.25, 0.25, 0.25]],
     [0.99, 0.99, 0.99], 0.6, [], 100, [1, 2, 2]),
    ("zero-prob-draft-rejected", [0, 2], [[0, 0.5, 0.5], [0, 0, 1.0], [1.0]],
     [0.0, 0.0, 0.0], 0.75, [], 100, [2]),
    ("rejected-draft-removed", [0, 2], [[0.5, 0.5], [0, 0, 1.0], [1.0]],
     [0.7, 0.0, 0.0], 0.1, [], 100, [1]),
    ("accepted-then-rejected", [0, 3], [[0.5, 0.5], [0, 0.25, 0.25, 0.5], [1.0]],
     [0.3, 0.6, 0.0], 0.6, [], 100, [0, 2]),
    ("residual-renormalised", [3, 2], [[0.25, 0.25, 0, 0.5], [1.0], [1.0]],
     [0.9, 0.0, 0.0], 0.6, [], 100, [1]),
    ("rejected-draft-with-all-mass", [0, 2], [[0.5], [1.0], [1.0]],
     [0.7, 0.0, 0.0], 0.3, [], 100, [0]),
    ("sampled-token-is-eos", [0, 2], [[0.5, 0.5], [1.0], [1.0]],
     [0.7, 0.0, 0.0], 0.1, [1], 100, [1]),
    ("eos-accepted-draft", [1, 2], [[0, 1.0], [0, 0, 1.0], [1.0]],
     [0.0, 0.0, 0.0], 0.1, [1], 100, [1]),
    ("remaining-2", [1, 2], [[0, 1.0], [0, 0, 1.0], [1.0]],
     [0.0, 0.0, 0.0], 0.1, [], 2, [1, 2]),
]


@pytest.mark.parametrize("impl", OPS)
@pytest.mark.parametrize("case", SAMPLED_SCENARIOS, ids=[c[0] for c in SAMPLED_SCENARIOS])
def test_accept_sampled_scenarios(impl, case):
    _, drafts, rows, u_acc, u_smp, stops, remaining, want = case
    a, emitted, finished = OPS[impl].accept_sampled(
        _long([[MASK] + drafts]), _probs(rows), torch.tensor([u_acc]), torch.tensor([u_smp]),
        _long([remaining]), _stops(stops))
    assert torch.equal(emitted, _pad(want, 3))
    assert torch.equal(a, _long([len(want) - 1]))
    stopped = bool(stops) and want[-1] in stops
    assert finished.tolist() == [stopped or len(want) == remaining]


def _random_sampled(B, L, V, E, gen):
    logits = torch.randn(B, L, V, generator=gen) * 3
    # some rows top-k-like: zero mass outside a few tokens
    keep = torch.rand(B, L, V, generator=gen) < 0.3
    keep[:, :, 0] = True
    probs = torch.softmax(logits.masked_fill(~keep & (torch.rand(B, L, 1, generator=gen) < 0.5),
                                             float("-inf")), dim=-1)
    drafts = torch.where(torch.rand(B, L - 1, generator=gen) < 0.7, probs[:, :-1].argmax(-1),
                         torch.randint(0, V, (B, L - 1), generator=gen))
    cand = torch.cat([torch.randint(0, V, (B, 1), generator=gen), drafts], dim=1)
    u_accept = torch.rand(B, L, generator=gen)
    u_sample = torch.rand(B, generator=gen)
    remaining = torch.randint(1, L + 4, (B,), generator=gen)
    # stops are often the likeliest first token, so they hit inside the block
    likely = probs[:, 0].argmax(-1, keepdim=True)  # [B, 1]
    stops = torch.where(torch.rand(B, E, generator=gen) < 0.5, likely,
                        torch.randint(-1, V, (B, E), generator=gen))
    # row 0 always accepts its first draft (the argmax, u = 0) and has no stop or cap
    cand[0, 1] = probs[0, 0].argmax()
    u_accept[0, 0] = 0.0
    remaining[0] = L + 3
    stops[0] = -1
    return cand, probs, u_accept, u_sample, remaining, stops


SAMPLED_SHAPES = [(1, 16, 37, 0), (3, 4, 1000, 2), (7, 16, 5000, 3), (3, 2, 8, 1)]


@pytest.mark.parametrize("B,L,V,E", SAMPLED_SHAPES,
                         ids=[f"B{B}-L{L}-V{V}-E{E}" for B, L, V, E in SAMPLED_SHAPES])
def test_accept_sampled_kernel_equals_twin(B, L, V, E):
    gen = torch.Generator().manual_seed(B * V + L + E)
    args = _random_sampled(B, L, V, E, gen)
    ref = twin.accept_sampled(*args)
    out = kernel.accept_sampled(*args)
    for name, r, o in zip(("accept_len", "emitted", "finished"), ref, out):
        assert torch.equal(r, o), name
    assert ref[0].max() > 0, "no draft accepted: the random inputs do not exercise acceptance"


# ---- the sampled rule is lossless: a distribution test with negative controls ----

V8 = 8
P0 = torch.tensor([0.05, 0.10, 0.30, 0.15, 0.05, 0.20, 0.10, 0.05])  # first position
P1 = torch.tensor([0.30, 0.02, 0.08, 0.10, 0.25, 0.05, 0.15, 0.05])  # after draft D1
D1, D2 = 2, 4  # the drafter's proposals: p0(D1) = 0.30, p1(D2) = 0.25
N = 20000


def _batch(n, gen):
    cand = _long([[0, D1, D2]]).expand(n, 3).contiguous()
    probs = torch.stack([P0, P1, torch.full((V8,), 1.0 / V8)])[None].expand(n, 3, V8).contiguous()
    return (cand, probs, torch.rand(n, 3, generator=gen), torch.rand(n, generator=gen),
            torch.full((n,), 10, dtype=torch.long), torch.empty(n, 0, dtype=torch.long))


def _always_accept(cand, probs, u_accept, u_sample, remaining, stops):
    return twin.accept_sampled(cand, probs, torch.zeros_like(u_accept), u_sample, remaining, stops)


def _resample_with_draft(cand, probs, u_accept, u_sample, remaining, stops):
    """Broken on purpose: a rejected draft is resampled from p *including* the draft (and
    a resampled draft continues the chain as if accepted)."""
    none = torch.full((cand.shape[0],), -1, dtype=torch.long)
    t0 = torch.where(u_accept[:, 0] < probs[:, 0, D1], D1,
                     inverse_cdf_fixed_point(probs[:, 0], none, u_sample))
    t1 = torch.where(u_accept[:, 1] < probs[:, 1, D2], D2,
                     inverse_cdf_fixed_point(probs[:, 1], none, u_sample))
    emitted = torch.full_like(cand, -1)
    emitted[:, 0] = t0
    emitted[:, 1] = torch.where(t0 == D1, t1, -1)
    return None, emitted, None


def _joint_pvalue(emitted):
    """Chi-square p-value of (first token, second token or END) against the exact joint:
    P(D1, x) = p0(D1) p1(x); P(y, END) = p0(y) for y != D1."""
    t0, t1 = emitted[:, 0], emitted[:, 1]
    observed, expected = [], []
    for y in range(V8):
        if y == D1:
            for x in range(V8):
                observed.append(int(((t0 == D1) & (t1 == x)).sum()))
                expected.append(float(P0[D1] * P1[x]) * len(t0))
        else:
            observed.append(int(((t0 == y) & (t1 == -1)).sum()))
            expected.append(float(P0[y]) * len(t0))
    assert sum(observed) <= len(t0)
    # rows outside every expected cell (impossible outcomes) count against the fit
    stray = len(t0) - sum(observed)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected)) + stray * 1e6
    dof = len(expected) - 1
    # chi-square survival function: the regularised upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_accept_sampled_matches_target_distribution():
    gen = torch.Generator().manual_seed(0)
    batch = _batch(N, gen)
    _, emitted, _ = twin.accept_sampled(*batch)
    # the first emitted token follows p0 (total variation well inside sampling noise)
    freq0 = torch.bincount(emitted[:, 0], minlength=V8).float() / N
    assert 0.5 * (freq0 - P0).abs().sum() < 0.02
    p_value = _joint_pvalue(emitted)
    assert p_value > 1e-3, f"sampled acceptance deviates from the target (p={p_value:.2e})"
    # the same test must catch lossy rules
    for broken in (_always_accept, _resample_with_draft):
        _, bad, _ = broken(*batch)
        p_bad = _joint_pvalue(bad)
        assert p_bad < 1e-6, f"{broken.__name__} would go unnoticed (p={p_bad:.2e})"
    # and the kernel takes the twin's decisions on a slice of the same draws
    rows = slice(0, 24)
    out = kernel.accept_sampled(*(t[rows] for t in batch))
    assert torch.equal(out[1], emitted[rows])


# ---- clear errors ----

def test_bad_arguments_are_named():
    cand, pred = _long([[0, 1, 2]]), _long([[1, 2, 3]])
    rem, stops = _long([4]), _stops([])
    with pytest.raises(ValueError, match="accept_greedy: argument `target_predict`"):
        kernel.accept_greedy(cand, pred.int(), rem, stops)
    with pytest.raises(ValueError, match="accept_greedy: argument `remaining`.*>= 1"):
        kernel.accept_greedy(cand, pred, _long([0]), stops)
    with pytest.raises(ValueError, match="accept_greedy: argument `stop_ids`"):
        kernel.accept_greedy(cand, pred, rem, _long([1, 2]))
    probs = torch.full((1, 3, 4), 0.25)
    u = torch.rand(1, 3)
    with pytest.raises(ValueError, match="accept_sampled: argument `probs`"):
        kernel.accept_sampled(cand, probs.double(), u, torch.rand(1), rem, stops)
    with pytest.raises(ValueError, match="accept_sampled: argument `candidates`.*0..3"):
        kernel.accept_sampled(_long([[0, 9, 1]]), probs, u, torch.rand(1), rem, stops)
    with pytest.raises(ValueError, match="accept_sampled: argument `u_sample`.*\\[0, 1\\)"):
        kernel.accept_sampled(cand, probs, u, torch.ones(1), rem, stops)
    with pytest.raises(ValueError, match="accept_sampled: argument `probs`.*contiguous"):
        kernel.accept_sampled(cand, probs.transpose(1, 2).contiguous().transpose(1, 2), u,
                              torch.rand(1), rem, stops)
