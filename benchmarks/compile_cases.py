"""Serving shapes of every Triton op, as calls of the op's own launcher on meta tensors.

Kimi-Linear + DFlash: vocab 163840 (81920 per rank at TP2), hidden 2304, draft block 16
and verify widths 2..16, batch 1/8/32/64, the real drafter's attention (32 heads x head
dim 72, MHA) and the 8-KV-head GQA case (32 x 128), draft context rows up to 32k slots,
5 draft layers, KDA 32 heads of 128 x 128. The draft context table is SGLang's
``req_to_token``, as wide as the context length plus 20 slots of headroom (4 + block). bf16
everywhere, and the draft K/V pool also in fp8 (e4m3, ``--speculative-draft-kv-cache-dtype
fp8_e4m3``) for the two kernels that touch it. ``cases("ci")`` is a representative subset:
every kernel, both head layouts, both pool dtypes, both vocabulary widths, a small and a
large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

V, V_TP2, HIDDEN, LAYERS = 163840, 81920, 2304, 5
META = torch.device("meta")
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
POOL_DTYPES = {"bf16": BF16, "fp8": FP8}
HEADS = {"mha32x72": (32, 32, 72), "gqa32/8x128": (32, 8, 128)}


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    call: Callable[[], None]


def _empty(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device=META)


def _ints(*shape):
    return torch.empty(shape, dtype=torch.int64, device=META)


def accept_cases(batches, widths, stop_counts) -> list[Case]:
    from sglang_dflash.kernels.accept import accept_greedy, accept_sampled

    out = []
    for B in batches:
        for L in widths:
            for E in stop_counts:
                args = (_ints(B, L), _ints(B), _ints(B, E))
                out.append(Case("accept_greedy", f"B{B} L{L} E{E}",
                                lambda a=args, L=L, B=B: accept_greedy(a[0], _ints(B, L), a[1], a[2])))
                out.append(Case("accept_sampled", f"B{B} L{L} E{E} V{V}",
                                lambda a=args, B=B, L=L: accept_sampled(
                                    a[0], _empty(B, L, V, dtype=torch.float32), _empty(B, L, dtype=torch.float32),
                                    _empty(B, dtype=torch.float32), a[1], a[2])))
    return out


def greedy_head_cases(batches, widths, vocabs) -> list[Case]:
    from sglang_dflash.kernels.greedy_head import combine_shards, greedy_head

    out = []
    for B in batches:
        for L in widths:
            M = B * (L - 1)
            for v in vocabs:
                out.append(Case("greedy_head", f"B{B} L{L} M{M} V{v} H{HIDDEN} bf16",
                                lambda M=M, v=v: greedy_head(_empty(M, HIDDEN), _empty(v, HIDDEN), 0)))
            out.append(Case("combine_shards", f"B{B} L{L} R2 M{M}",
                            lambda M=M: combine_shards(_empty(2, M, dtype=torch.float32), _ints(2, M))))
    return out


def _pool_scales(pool_dtype, *shape):
    """The (k_scale, v_scale) an fp8 pool comes with; None for a bf16 pool."""
    if pool_dtype != FP8:
        return None, None
    return _empty(*shape, dtype=torch.float32), _empty(*shape, dtype=torch.float32)


def draft_attention_cases(batches, widths, heads, table_widths, pools=("bf16",)) -> list[Case]:
    from sglang_dflash.kernels.draft_attention import draft_attention

    out = []
    for B in batches:
        for L in widths:
            for name in heads:
                Hq, Hkv, D = HEADS[name]
                for S in table_widths:
                    for pool_name in pools:
                        # the context rows are SGLang's req_to_token [requests, context + headroom] int32
                        def call(B=B, L=L, Hq=Hq, Hkv=Hkv, D=D, S=S, dtype=POOL_DTYPES[pool_name]):
                            pool = _empty(LAYERS, 4096, Hkv, D, dtype=dtype)
                            draft_attention(_empty(B, L, Hq, D), pool[1], pool[1], _ints(B + 64, S).int(),
                                            _ints(B), _ints(B), _empty(B, L, Hkv, D), _empty(B, L, Hkv, D),
                                            D ** -0.5, *_pool_scales(dtype, Hkv))
                        out.append(Case("draft_attention", f"B{B} L{L} {name} S{S} pool {pool_name}", call))
    return out


def draft_kv_cases(token_counts, heads, pools=("bf16",)) -> list[Case]:
    from sglang_dflash.kernels.draft_kv import draft_kv_append

    out = []
    for T in token_counts:
        for name in heads:
            _, Hkv, D = HEADS[name]
            for pool_name in pools:
                def call(T=T, Hkv=Hkv, D=D, dtype=POOL_DTYPES[pool_name]):
                    kv = _empty(T, LAYERS * 2 * Hkv * D).view(T, LAYERS, 2, Hkv, D)
                    pool = _empty(LAYERS, 4096, Hkv, D, dtype=dtype)
                    draft_kv_append(kv, _empty(LAYERS, D), _empty(T, D // 2, dtype=torch.float32),
                                    _empty(T, D // 2, dtype=torch.float32), _ints(T), pool, pool, 1e-6,
                                    *_pool_scales(dtype, LAYERS, Hkv))
                out.append(Case("draft_kv_append", f"T{T} Ld{LAYERS} {name} bf16 -> pool {pool_name}", call))
    return out


def kda_commit_cases(batches, widths) -> list[Case]:
    from sglang_dflash.kernels.kda_commit import kda_commit

    H, K, C, W1 = 32, 128, 3 * 32 * 128, 3
    out = []
    for B in batches:
        for L in widths:
            def call(B=B, L=L):
                kda_commit(_empty(B + 8, H, K, K, dtype=torch.float32), _empty(B + 8, C, W1), _ints(B),
                           _empty(B, L, H, K), _empty(B, L, H, K), _empty(B, L, H, K, dtype=torch.float32),
                           _empty(B, L, H), _empty(B, L, C), _ints(B))
            out.append(Case("kda_commit", f"B{B} L{L} H{H} K{K} V{K} bf16", call))
    return out


def cases(subset: str) -> list[Case]:
    if subset == "ci":
        return (accept_cases((1, 32), (16,), (0,))
                + greedy_head_cases((1, 32), (16,), (V, V_TP2))
                + draft_attention_cases((1, 64), (16,), tuple(HEADS), (32788,), tuple(POOL_DTYPES))
                + draft_kv_cases((512,), tuple(HEADS), tuple(POOL_DTYPES))
                + kda_commit_cases((32,), (16,)))
    batches, widths = (1, 8, 32, 64), (2, 4, 8, 16)
    return (accept_cases(batches, widths, (0, 2))
            + greedy_head_cases(batches, widths, (V, V_TP2))
            + draft_attention_cases(batches, (8, 16), tuple(HEADS), (532, 4116, 32768, 32788),
                                    tuple(POOL_DTYPES))
            + draft_kv_cases((16, 1024, 8192), tuple(HEADS), tuple(POOL_DTYPES))
            + kda_commit_cases(batches, (8, 16)))
