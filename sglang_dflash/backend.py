"""The op backend (``torch`` twins or ``triton`` kernels), chosen once and logged.

There is no fallback between the two: a kernel error propagates. The torch twins exist
for tests and debugging, and as the specification of each kernel.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger("sglang_dflash")

BACKENDS = ("torch", "triton")

# op name -> module (under sglang_dflash.kernels, and .naive for the twin)
_OP_MODULES = {
    "accept_greedy": "accept",
    "accept_sampled": "accept",
    "greedy_head": "greedy_head",
    "combine_shards": "greedy_head",
    "draft_attention": "draft_attention",
    "draft_kv_append": "draft_kv",
    "kda_commit": "kda_commit",
}


@dataclass(frozen=True)
class Ops:
    backend: str
    accept_greedy: Callable
    accept_sampled: Callable
    greedy_head: Callable
    combine_shards: Callable
    draft_attention: Callable
    draft_kv_append: Callable
    kda_commit: Callable


def get_ops(backend: str) -> Ops:
    if backend not in BACKENDS:
        raise ValueError(f"unknown DFlash op backend {backend!r}; expected one of {BACKENDS}")
    package = "sglang_dflash.kernels.naive" if backend == "torch" else "sglang_dflash.kernels"
    ops = {
        name: getattr(importlib.import_module(f"{package}.{module}"), name)
        for name, module in _OP_MODULES.items()
    }
    logger.info("DFlash op backend: %s", backend)
    return Ops(backend=backend, **ops)
