"""The reference DFlash loop: lossless against plain decoding, and real acceptance."""

import pytest
import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.reference.demo import use_ops
from sglang_dflash.reference.loop import acceptance_length, generate_dflash, generate_plain
from sglang_dflash.reference.offline import acceptance_stats, offline_acceptance, teacher_forced_commit_lens
from sglang_dflash.reference.sampling import SamplingParams
from sglang_dflash.reference.tiny_pair import DEMO_PROMPTS, PAD, encode, load_tiny_pair

OPS = get_ops("torch")


@pytest.fixture(scope="module")
def pair():
    target, drafter = load_tiny_pair()
    use_ops(target, drafter, OPS)
    return target, drafter


def _greedy(n):
    return SamplingParams(max_new_tokens=n)


# ragged prompts: lengths 1 (just BOS) to ~20
PROMPTS = [encode("")] + [encode(p) for p in DEMO_PROMPTS[:4]]


@pytest.mark.parametrize("block_size", [16, 4], ids=["L16", "L4"])
def test_greedy_equals_plain_on_ragged_batch(pair, block_size):
    target, drafter = pair
    params = [_greedy(n) for n in (30, 7, 23, 30, 13)]  # several stop mid-block
    plain = generate_plain(target, PROMPTS, params)
    spec = generate_dflash(target, drafter, PROMPTS, params, OPS, block_size=block_size)
    for p, s, prm in zip(plain, spec, params):
        assert s.tokens == p.tokens
        assert s.finish_reason == p.finish_reason
        if p.finish_reason == "length":
            assert len(s.tokens) == prm.max_new_tokens
        # the prefill emits the first token, the steps the rest
        assert sum(s.commit_lens) == len(s.tokens) - 1
        assert all(1 <= n <= block_size for n in s.commit_lens)
    # a trained drafter must actually be accepted (it was trained at block 16; a smaller
    # block caps tau at block_size and changes what the mask positions see)
    assert acceptance_length(spec) > {16: 2.5, 4: 1.5}[block_size]


def test_stop_token_inside_a_block(pair):
    target, drafter = pair
    # ';' and '.' end items of the tiny corpus: frequent, and often deep inside a block
    params = [SamplingParams(max_new_tokens=60, stop_token_ids=(ord(";"), ord(".")))] * len(PROMPTS)
    plain = generate_plain(target, PROMPTS, params)
    spec = generate_dflash(target, drafter, PROMPTS, params, OPS)
    assert [s.tokens for s in spec] == [p.tokens for p in plain]
    stopped = [s for s in spec if s.finish_reason == "stop"]
    assert stopped, "no request hit the stop token: the scenario is not exercised"
    assert all(s.tokens[-1] in (ord(";"), ord(".")) for s in stopped)
    # at least one stop came after an accepted draft of the same block
    assert any(s.commit_lens and s.commit_lens[-1] >= 2 for s in stopped)


def test_target_that_emits_the_mask_id_is_served_losslessly(pair):
    target, drafter = pair
    # make the target prefer the mask/pad id wherever it would have emitted a space
    with torch.no_grad():
        saved = target.lm_head.weight[PAD].clone()
        target.lm_head.weight[PAD] = target.lm_head.weight[ord(" ")] * 1.05
    try:
        params = [_greedy(30)] * len(PROMPTS)
        plain = generate_plain(target, PROMPTS, params)
        assert any(PAD in p.tokens for p in plain), "scenario not exercised: no mask id emitted"
        spec = generate_dflash(target, drafter, PROMPTS, params, OPS)
        assert [s.tokens for s in spec] == [p.tokens for p in plain]
    finally:
        with torch.no_grad():
            target.lm_head.weight[PAD] = saved


def test_trained_pair_offline_tau_and_online_tau_agree(pair):
    target, drafter = pair
    prompts = [encode(p) for p in DEMO_PROMPTS]
    stats, continuations = offline_acceptance(target, drafter, OPS, prompts, max_new_tokens=64)
    assert stats.tau >= 3.0, f"offline tau {stats.tau:.3f} < 3.0: the drafter does not match its target"
    spec = generate_dflash(target, drafter, prompts, [_greedy(64)] * len(prompts), OPS)
    assert [s.tokens for s in spec] == [c.tokens for c in continuations]
    online_lens = [n for s in spec for n in s.commit_lens]
    # same blocks, so the same per-step commit lengths, not just the same mean
    assert acceptance_stats(online_lens, drafter.cfg.block_size) == stats
    assert acceptance_length(spec) == stats.tau


def test_untrained_drafter_is_lossless_but_not_accepted(pair):
    """A broken (random) drafter must show up as low acceptance, not as wrong output."""
    from sglang_dflash.drafter import DFlashDrafter

    target, drafter = pair
    torch.manual_seed(1)
    random_drafter = DFlashDrafter(drafter.cfg).eval()
    random_drafter.ops = OPS
    params = [_greedy(24)] * 3
    plain = generate_plain(target, PROMPTS[:3], params)
    spec = generate_dflash(target, random_drafter, PROMPTS[:3], params, OPS)
    assert [s.tokens for s in spec] == [p.tokens for p in plain]
    assert acceptance_length(spec) < 1.5


def test_triton_backend_emits_the_same_tokens_and_blocks(pair):
    """Every op through its Triton kernel (interpreter on CPU) vs the torch twins."""
    target, drafter = pair
    prompts, params = PROMPTS[1:3], [_greedy(12), _greedy(9)]
    reference = generate_dflash(target, drafter, prompts, params, OPS)
    triton_ops = get_ops("triton")
    t_target, t_drafter = load_tiny_pair()
    use_ops(t_target, t_drafter, triton_ops)
    fast = generate_dflash(t_target, t_drafter, prompts, params, triton_ops)
    assert [r.tokens for r in fast] == [r.tokens for r in reference]
    assert [r.commit_lens for r in fast] == [r.commit_lens for r in reference]


# ---- verify width: draft the trained block, verify its first W positions ----


WIDTH_PARAMS = [_greedy(n) for n in (20, 7, 16, 20, 11)]  # several stop mid-block


@pytest.fixture(scope="module")
def plain_for_widths(pair):
    return generate_plain(pair[0], PROMPTS, WIDTH_PARAMS)


@pytest.mark.parametrize("W", [2, 6], ids=lambda w: f"L16-W{w}")
def test_verify_width_is_lossless_and_walks_like_teacher_forcing(pair, plain_for_widths, W):
    target, drafter = pair
    plain = plain_for_widths
    spec = generate_dflash(target, drafter, PROMPTS, WIDTH_PARAMS, OPS, verify_width=W)
    assert [s.tokens for s in spec] == [p.tokens for p in plain]
    assert all(1 <= n <= W for s in spec for n in s.commit_lens)
    assert any(n == W for s in spec for n in s.commit_lens), "no step used the whole verify width"
    # online greedy decoding takes exactly the teacher-forced walk's steps at the same W
    walked = teacher_forced_commit_lens(target, drafter, OPS, PROMPTS, [p.tokens for p in plain],
                                        drafter.cfg.block_size, W)
    assert [s.commit_lens for s in spec] == walked


def test_verify_width_drafts_the_whole_trained_block(pair):
    """The W candidates are the first W of the L-block's, not the drafts of a W-block."""
    from sglang_dflash.reference.loop import draft_block

    target, drafter = pair
    prompts = [encode(p) for p in DEMO_PROMPTS[:2]]
    seqs = [p + c.tokens for p, c in zip(prompts, generate_plain(target, prompts, [_greedy(8)] * 2))]
    target.set_capture_layers(drafter.cfg.target_layer_ids)
    pool = drafter.new_pool(sum(map(len, seqs)))
    bases = [sum(map(len, seqs[:i])) for i in range(len(seqs))]
    for seq, base in zip(seqs, bases):
        positions = torch.arange(len(seq))
        drafter.append_context(pool, target.extend(target.new_state(), torch.tensor(seq)).features,
                               positions, base + positions)
    start = torch.tensor([len(p) + 3 for p in prompts])
    last = torch.tensor([s[i] for s, i in zip(seqs, start.tolist())])
    args = (target, drafter, OPS, pool, last, start, torch.tensor(bases))
    full = draft_block(*args, L=16)
    assert full.shape == (2, 16)
    for W in (2, 4, 8):
        assert torch.equal(draft_block(*args, L=16, W=W), full[:, :W])
    # a block of 4 is a different context: its drafts differ somewhere (what stock engines draft)
    assert not torch.equal(draft_block(*args, L=4), full[:, :4])


def test_verify_width_outside_the_block_is_refused(pair):
    target, drafter = pair
    for W in (1, 17):
        with pytest.raises(ValueError, match=rf"verify width must lie in 2\.\.16.*got {W}"):
            generate_dflash(target, drafter, PROMPTS[:1], [_greedy(4)], OPS, verify_width=W)
    with pytest.raises(ValueError, match=r"2\.\.4"):
        generate_dflash(target, drafter, PROMPTS[:1], [_greedy(4)], OPS, block_size=4, verify_width=8)
