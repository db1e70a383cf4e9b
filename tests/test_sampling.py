"""Sampled DFlash decoding is lossless: its tokens follow the target's own distribution."""

import pytest
import torch
from scipy.stats import chi2

from sglang_dflash.backend import get_ops
from sglang_dflash.reference.demo import use_ops
from sglang_dflash.reference.loop import generate_dflash
from sglang_dflash.kernels.naive.accept import inverse_cdf_fixed_point
from sglang_dflash.reference.sampling import SamplingParams, probs_from_logits
from sglang_dflash.reference.tiny_pair import encode, load_tiny_pair

OPS = get_ops("torch")
PARAMS = SamplingParams(max_new_tokens=3, temperature=1.5, top_k=3, ignore_eos=True)
N = 1200


@pytest.fixture(scope="module")
def pair():
    target, drafter = load_tiny_pair()
    use_ops(target, drafter, OPS)
    return target, drafter


def exact_joint(target, prompt):
    """P(t1, t2, t3) of the target alone, over the top-k support."""
    joint = {}

    def dist(prefix):
        out = target.extend(target.new_state(), torch.tensor(prefix))
        return probs_from_logits(out.logits[-1], PARAMS)

    p1 = dist(prompt)
    for t1 in p1.nonzero().flatten().tolist():
        p2 = dist(prompt + [t1])
        for t2 in p2.nonzero().flatten().tolist():
            p3 = dist(prompt + [t1, t2])
            for t3 in p3.nonzero().flatten().tolist():
                joint[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
    return joint


def chi_square_pvalue(samples, joint):
    """Goodness of fit of sampled triples to the exact joint (rare cells pooled)."""
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= set(joint), f"tokens outside the target's support: {set(counts) - set(joint)}"
    cells = sorted(joint, key=joint.get, reverse=True)
    observed, expected, pool_obs, pool_exp = [], [], 0, 0.0
    for c in cells:
        e = joint[c] * len(samples)
        if e >= 5:
            observed.append(counts.get(c, 0))
            expected.append(e)
        else:
            pool_obs, pool_exp = pool_obs + counts.get(c, 0), pool_exp + e
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(chi2.sf(stat, len(observed) - 1))


def _sample_triples(target, drafter, ops, prompt, seed, **widths):
    widths = widths or {"block_size": 4}
    results = generate_dflash(target, drafter, [prompt] * N, [PARAMS] * N, ops, seed=seed, **widths)
    return [tuple(r.tokens) for r in results]


def _always_accept(candidates, probs, u_accept, u_sample, remaining, stop_ids):
    """A broken verifier: accept every draft (what a lossy implementation might do)."""
    zeros = torch.zeros_like(u_accept)
    return OPS.accept_sampled(candidates, probs, zeros, u_sample, remaining, stop_ids)


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_distribution(pair):
    target, drafter = pair
    prompt = encode("the big ")
    joint = exact_joint(target, prompt)
    assert len(joint) > 5, "distribution too narrow for a meaningful test"
    p_value = chi_square_pvalue(_sample_triples(target, drafter, OPS, prompt, seed=0), joint)
    assert p_value > 1e-3, f"DFlash sampling deviates from the target (p={p_value:.2e})"

    # the same test must catch a lossy verifier
    broken = OPS.__class__(**{**OPS.__dict__, "accept_sampled": _always_accept})
    p_broken = chi_square_pvalue(_sample_triples(target, drafter, broken, prompt, seed=0), joint)
    assert p_broken < 1e-6, f"the test cannot see an always-accept verifier (p={p_broken:.2e})"


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_at_a_verify_width_below_the_block(pair):
    """Draft the trained block of 16, verify 3 (the bonus token and 2 drafts): after the
    prefill's token, one step emits the other two, so the whole triple passes the verify."""
    target, drafter = pair
    prompt = encode("the big ")
    joint = exact_joint(target, prompt)
    samples = _sample_triples(target, drafter, OPS, prompt, seed=1, verify_width=3)
    p_value = chi_square_pvalue(samples, joint)
    assert p_value > 1e-3, f"DFlash sampling at verify width 3 deviates from the target (p={p_value:.2e})"


def test_probs_from_logits_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.equal(p[0] > 0, torch.tensor([True, False, False, False, True]))
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    # top_p keeps the smallest prefix of sorted tokens whose mass reaches top_p
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert full[0, 4] < 0.7 < full[0, 4] + full[0, 0]
    assert torch.equal(p[0] > 0, torch.tensor([True, False, False, False, True]))


def test_inverse_cdf_edges_without_a_removed_token():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 3)
    u = torch.tensor([0.0, 0.5, 0.9999999])
    assert inverse_cdf_fixed_point(probs, torch.full((3,), -1), u).tolist() == [1, 2, 2]


# ---- SGLang's sampling definitions (sglang_dflash.sampling) ----

from sglang_dflash.sampling import TOP_K_ALL, RowSampling, target_probs  # noqa: E402


@pytest.fixture(scope="module")
def sglang_filter():
    """SGLang 0.5.23's torch sampler filter, as a function of (probs, RowSampling) -> the
    normalised distribution its multinomial draws from."""
    from sglang_env import require_sglang

    require_sglang()
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    def dist(logits, s: RowSampling):
        probs = torch.softmax(logits.float() / s.temperatures.view(-1, 1), dim=-1)
        if not (s.need_top_k or s.need_top_p or s.need_min_p):
            return probs
        _, kept, order, _ = top_k_top_p_min_p_sampling_from_probs_torch(
            probs.clone(), s.top_ks.to(torch.int32), s.top_ps, s.min_ps, s.need_min_p, None,
            torch.zeros(len(probs), dtype=torch.int64), return_filtered_probs=True)
        out = torch.zeros_like(probs).scatter_(1, order.long(), kept)
        return out / out.sum(dim=-1, keepdim=True)

    return dist


def rows(n, temperature=1.0, top_k=TOP_K_ALL, top_p=1.0, min_p=0.0, max_top_k=None):
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)  # noqa: E731
    return RowSampling(full(temperature), full(top_k, torch.int64), full(top_p), full(min_p),
                       need_top_k=top_k != TOP_K_ALL, max_top_k=max_top_k, need_top_p=top_p != 1.0,
                       need_min_p=min_p > 0)


CASES = {  # id: RowSampling keyword arguments
    "k5": dict(top_k=5), "p0.8": dict(top_p=0.8), "k4-p0.6": dict(top_k=4, top_p=0.6),
    "k7-p0.9-bound": dict(top_k=7, top_p=0.9, max_top_k=7), "minp0.1": dict(min_p=0.1),
    "T0.7-k6-p0.7-minp0.05": dict(temperature=0.7, top_k=6, top_p=0.7, min_p=0.05), "plain-T1.3": dict(temperature=1.3),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pytorch_definition_is_sglangs_torch_sampler(sglang_filter, case):
    torch.manual_seed(len(case))
    logits = torch.randn(64, 50) * 2.5
    logits[32:, :6] = 4.0  # six tied maxima in half the rows
    s = rows(64, **CASES[case])
    ours, theirs = target_probs(logits, s, "pytorch"), sglang_filter(logits, s)
    if s.max_top_k is not None:
        # with a top-k bound both sort only the head (topk), but asked for its filtered
        # weights SGLang sorts everything, and the two may order tied tokens differently
        ours, theirs = ours[:32], theirs[:32]
    assert torch.equal(ours > 0, theirs > 0)
    assert (ours - theirs).abs().max() < 1e-6


def test_top_p_mass_is_taken_before_top_k():
    # p = [.5, .3, .2]: SGLang keeps {.5, .3} for top_k 2, top_p .6 (mass before .3 is .5);
    # renormalising the top 2 first ([.625, .375]) would leave only the top token
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    for backend in ("pytorch", "flashinfer"):
        p = target_probs(logits, rows(1, top_k=2, top_p=0.6), backend)
        assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0]]), atol=1e-6), backend


def test_backends_differ_on_ties_and_flashinfer_min_p_runs_in_sequence():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])  # p1 == p2
    # top-k 2: the torch sampler keeps exactly two (its sort breaks the tie), flashinfer both
    assert int((target_probs(logits, rows(1, top_k=2), "pytorch") > 0).sum()) == 2
    assert (target_probs(logits, rows(1, top_k=2), "flashinfer")[0, :3] > 0).all()
    # top-p between p0 and p0 + p1: the torch sampler's mass before the second tied token
    # is p0 + p1 > top_p, flashinfer's mass strictly above either is p0 < top_p
    p0, p1 = torch.softmax(logits, -1)[0, :2].tolist()
    top_p = p0 + p1 / 2
    assert int((target_probs(logits, rows(1, top_p=top_p), "pytorch") > 0).sum()) == 2
    assert int((target_probs(logits, rows(1, top_p=top_p), "flashinfer") > 0).sum()) == 3
    # with min-p on, flashinfer renormalises the top-k before its top-p
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    p = target_probs(logits, rows(1, top_k=2, top_p=0.6, min_p=0.01), "flashinfer")
    assert torch.equal(p > 0, torch.tensor([[True, False, False]]))
    p = target_probs(logits, rows(1, top_k=2, top_p=0.6, min_p=0.01), "pytorch")
    assert torch.equal(p > 0, torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match="--sampling-backend 'ascend'"):
        target_probs(logits, rows(1, top_k=2), "ascend")


# ---- the worker's sampled verify against SGLang's sampler ----


def _old_probs(logits, s: RowSampling, backend):
    """The definition the worker had before: top-k, renormalise, keep preceding mass < top_p."""
    scaled = logits.float() / s.temperatures.view(-1, 1)
    kth = scaled.sort(dim=-1, descending=True).values.gather(-1, s.top_ks.clamp(max=scaled.shape[-1]).view(-1, 1) - 1)
    probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
    sorted_p = probs.sort(dim=-1, descending=True).values
    keep = (sorted_p.cumsum(-1) - sorted_p) < s.top_ps.view(-1, 1)
    threshold = sorted_p.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _per_position_counts(accept_len, emitted, L, V):
    """Counts [L, V] of the token emitted at block position j, over the rows whose first j
    drafts were accepted (so that position's target distribution is the one it draws from)."""
    counts = torch.zeros(L, V)
    for j in range(L):
        reached = accept_len >= j
        counts[j] = torch.bincount(emitted[reached, j], minlength=V).float()
    return counts


def _chi_square_p(observed, expected_probs):
    n = observed.sum()
    if n == 0:
        return 1.0
    assert (observed[expected_probs == 0] == 0).all(), "tokens outside SGLang's support"
    exp = expected_probs * n
    big = exp >= 5
    obs_cells, exp_cells = list(observed[big]), list(exp[big])
    if (~big).any() and exp[~big].sum() > 0:
        obs_cells.append(observed[~big].sum())
        exp_cells.append(exp[~big].sum())
    if len(exp_cells) < 2:
        return 1.0
    stat = sum(float((o - e) ** 2 / e) for o, e in zip(obs_cells, exp_cells))
    return float(chi2.sf(stat, len(exp_cells) - 1))


def _worker_block_samples(logits, drafts, s, n, seed):
    """accept_len [n], emitted [n, L] of n independent verifies of the same block."""
    from sglang_dflash.worker.steps import accept_block

    L, V = logits.shape
    torch.manual_seed(seed)
    candidates = torch.cat([torch.tensor([0]), drafts]).expand(n, L).clone()
    return accept_block(OPS, candidates, logits.expand(n, L, V).clone(), s, None, "pytorch")


@pytest.mark.parametrize("case", ["k4-p0.6", "T0.7-k6-p0.7-minp0.05", "p0.8"], ids=str)
def test_worker_verify_samples_what_sglangs_sampler_samples(sglang_filter, monkeypatch, case):
    """Distribution test through the worker's accept step (4 positions, 3 drafts): at each
    position the emitted token follows SGLang's own sampler on the same logits; the same
    test rejects the worker's former definition."""
    import sglang_dflash.worker.steps as steps

    n, L, V = 12000, 4, 12
    torch.manual_seed(7)
    logits = torch.randn(L, V) * 1.5
    logits[0, :3] = torch.tensor([0.5, 0.3, 0.2]).log() + 3  # where the former definition differs
    kwargs = CASES[case]
    want = sglang_filter(logits, rows(L, **kwargs))
    # drafts: each position's most likely token, so that later positions get samples too
    drafts = want[:-1].argmax(dim=-1)
    accept_len, emitted = _worker_block_samples(logits, drafts, rows(n, **kwargs), n, seed=1)
    counts = _per_position_counts(accept_len, emitted, L, V)
    p_values = [_chi_square_p(counts[j], want[j]) for j in range(L)]
    print(f"\n{case}: samples per position {counts.sum(1).tolist()}, p-values {p_values}")
    assert counts[L - 1].sum() > 300, "too few rows reach the last position"
    assert min(p_values) > 1e-3, p_values

    monkeypatch.setattr(steps, "target_probs", _old_probs)
    accept_len, emitted = _worker_block_samples(logits, drafts, rows(n, **kwargs), n, seed=1)
    counts = _per_position_counts(accept_len, emitted, L, V)
    if case == "k4-p0.6":
        p_old = _chi_square_p(counts[0], want[0]) if (counts[0][want[0] == 0] == 0).all() else 0.0
        print(f"former definition: p-value {p_old:.2e} at position 0")
        assert p_old < 1e-6, f"the test cannot tell the former definition apart (p={p_old:.2e})"
