"""kda_commit: Triton kernel vs torch twin (ragged commit lengths, poisoned slots and
tails), the twin vs fla's naive KDA recurrence, and the launcher's input checks."""

import os

import pytest
import torch
from fla.ops.kda.naive import naive_recurrent_kda

from helpers import assert_close
from sglang_dflash.kernels.kda_commit import kda_commit
from sglang_dflash.kernels.naive.kda_commit import kda_commit as kda_commit_ref

DEVICE = os.environ.get("SGLANG_DFLASH_TEST_DEVICE", "cpu")
POISON = 1e30
H, W = 4, 4

# (B, L, K (= V), k/v dtype, conv dtype, N)
CASES = [
    (1, 16, 16, torch.float32, torch.float32, 3),
    (1, 4, 32, torch.bfloat16, torch.bfloat16, 2),
    (3, 16, 32, torch.float32, torch.bfloat16, 9),
    (3, 4, 16, torch.bfloat16, torch.float32, 5),
    (7, 16, 16, torch.bfloat16, torch.float32, 11),
    (7, 4, 32, torch.float32, torch.float32, 8),
]


def _case_id(case):
    B, L, K, dtype, conv_dtype, N = case
    return f"B{B}-L{L}-H{H}-K{K}-{str(dtype)[6:]}-conv_{str(conv_dtype)[6:]}-N{N}"


def _commit_lens(B, L, gen):
    """Every edge (0, 1, L-1, L) appears in each batch of 4+; the rest random."""
    edges = [0, 1, L - 1, L]
    lens = [edges[b % 4] if b < 4 or B < 4 else int(torch.randint(0, L + 1, (1,), generator=gen)) for b in range(B)]
    return torch.tensor(lens if B > 1 else [L - 1])


def _inputs(B, L, K, dtype, conv_dtype, N, seed=0):
    """Block inputs whose rows past commit_len are NaN: the op must never read them."""
    gen = torch.Generator().manual_seed(seed)
    C = 3 * H * K
    k = torch.nn.functional.normalize(torch.randn(B, L, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, L, H, K, generator=gen).to(dtype)
    g = -torch.rand(B, L, H, K, generator=gen) * 0.5
    beta = torch.rand(B, L, H, generator=gen).to(dtype)
    conv_inputs = torch.randn(B, L, C, generator=gen).to(conv_dtype)
    commit_len = _commit_lens(B, L, gen)
    tail = torch.arange(L)[None, :] >= commit_len[:, None]  # [B, L]
    for t in (k, v, g, beta, conv_inputs):
        t[tail] = float("nan")
    slot_ids = torch.randperm(N, generator=gen)[:B].to(torch.int32 if B % 2 else torch.int64)
    state = torch.full((N, H, K, K), POISON)
    conv_state = torch.full((N, C, W - 1), POISON, dtype=conv_dtype)
    state[slot_ids.long()] = torch.randn(B, H, K, K, generator=gen)
    conv_state[slot_ids.long()] = torch.randn(B, C, W - 1, generator=gen).to(conv_dtype)
    args = (state, conv_state, slot_ids, k, v, g, beta, conv_inputs, commit_len.to(torch.int32))
    return tuple(a.to(DEVICE) for a in args)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_twin(case):
    args = _inputs(*case)
    state, conv_state, slot_ids = args[:3]
    before_state, before_conv = state.clone(), conv_state.clone()
    ref_state, ref_conv = state.clone(), conv_state.clone()
    kda_commit_ref(ref_state, ref_conv, *args[2:])
    kda_commit(state, conv_state, *args[2:])

    slots = slot_ids.long()
    assert_close("state", ref_state[slots], state[slots], 1e-6)
    assert torch.equal(conv_state, ref_conv), "conv window: data movement must be bit-identical"
    outside = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
    outside[slots] = False
    assert torch.equal(state[outside], before_state[outside]), "a slot outside slot_ids was written"
    assert torch.equal(conv_state[outside], before_conv[outside]), "a conv slot outside slot_ids was written"
    # commit_len 0 leaves its slot exactly as it was
    for b, n in enumerate(args[-1].tolist()):
        if n == 0:
            assert torch.equal(state[slots[b]], before_state[slots[b]])
            assert torch.equal(conv_state[slots[b]], before_conv[slots[b]])


def test_conv_window_by_hand():
    """Window [a, b, c] + inputs [d, e] -> [c, d, e]; + nothing -> unchanged; + 4 -> last 3."""
    state = torch.zeros(3, 1, 16, 16)
    conv_state = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0]]])  # [N=3, C=1, 3]
    inputs = torch.tensor([[10.0, 11.0, 12.0, 13.0]] * 3)[..., None]  # [B=3, L=4, C=1]
    zeros = torch.zeros(3, 4, 1, 16)
    # request 0 -> slot 2 keeps 2 tokens, request 1 -> slot 0 keeps none, request 2 -> slot 1 all 4
    args = (torch.tensor([2, 0, 1]), zeros, zeros, zeros, torch.zeros(3, 4, 1), inputs, torch.tensor([2, 0, 4]))
    for op in (kda_commit_ref, kda_commit):
        s, c = state.clone().to(DEVICE), conv_state.clone().to(DEVICE)
        op(s, c, *(a.to(DEVICE) for a in args))
        assert c.cpu().tolist() == [[[1.0, 2.0, 3.0]], [[11.0, 12.0, 13.0]], [[9.0, 10.0, 11.0]]], op.__module__


@pytest.mark.parametrize("K", [16, 32])
def test_twin_matches_fla_naive_recurrence(K):
    """Replaying all L steps gives fla's final state from the same initial state."""
    gen = torch.Generator().manual_seed(1)
    B, L = 2, 9
    q = torch.randn(B, L, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, L, H, K, generator=gen), dim=-1)
    v = torch.randn(B, L, H, K, generator=gen)
    g = -torch.rand(B, L, H, K, generator=gen)
    beta = torch.rand(B, L, H, generator=gen)
    h0 = torch.randn(B, H, K, K, generator=gen)
    _, ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True)
    state = h0.clone()
    conv_state = torch.zeros(B, 3 * H * K, W - 1)
    kda_commit_ref(state, conv_state, torch.arange(B), k, v, g, beta, torch.zeros(B, L, 3 * H * K),
                   torch.full((B,), L))
    assert_close("state vs fla", ref, state, 1e-6)


def _good_args():
    gen = torch.Generator().manual_seed(2)
    B, L, K, N = 2, 4, 16, 3
    return [torch.zeros(N, H, K, K), torch.zeros(N, 3 * H * K, W - 1), torch.tensor([0, 2]),
            torch.zeros(B, L, H, K), torch.zeros(B, L, H, K), torch.zeros(B, L, H, K),
            torch.rand(B, L, H, generator=gen), torch.zeros(B, L, 3 * H * K), torch.tensor([1, 4])]


@pytest.mark.parametrize("op", [kda_commit_ref, kda_commit], ids=["twin", "kernel"])
@pytest.mark.parametrize("index, bad, message", [
    (2, torch.tensor([0, 3]), "slot_ids: expected values in"),
    (2, torch.tensor([1, 1]), "distinct"),
    (8, torch.tensor([1, 5]), "commit_len: expected values in"),
    (0, torch.zeros(3, 4, 16, 16, dtype=torch.bfloat16), "state: expected"),
    (5, torch.zeros(2, 4, 4, 16, dtype=torch.bfloat16), "g: expected"),
    (7, torch.zeros(2, 4, 3 * 4 * 16, dtype=torch.bfloat16), "conv_inputs dtype"),
    (4, torch.zeros(2, 4, 4, 8), "v: expected"),
])
def test_bad_inputs_are_refused(op, index, bad, message):
    args = _good_args()
    op(*args)  # the good call passes
    args[index] = bad
    with pytest.raises(AssertionError, match=message):
        op(*args)
