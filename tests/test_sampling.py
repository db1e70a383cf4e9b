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
