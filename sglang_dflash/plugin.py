"""SGLang 0.5.23 integration: the only module of sglang_dflash that patches SGLang.

SGLang calls ``load()`` through the entry point ``sglang.srt.plugins: dflash`` in every
process it starts (engine, tokenizer, scheduler, detokenizer); its loader
(``sglang.srt.plugins.load_plugins``) then applies the hooks registered here. ``load()``
only registers: it imports nothing heavy, so the processes that never build a worker
pay nothing for the plugin.

One hook, on ``SpeculativeAlgorithm.create_worker``: the single place where SGLang turns
``--speculative-algorithm dflash`` (any case; ``from_string`` upper-cases it) into a
worker class (``Scheduler.maybe_init_draft_worker`` is its only caller). For DFLASH the
hook returns ``sglang_dflash.worker.DFlashWorker``; ``SGLANG_DFLASH_ROUTE=0`` gives the
built-in ``DFlashWorkerV2`` back. Why this seam and not the other two:

- a registered name (``SpeculativeAlgorithm.register`` + a ``CustomSpecAlgo`` subclass)
  cannot be ``dflash``: DFLASH is a reserved built-in member, so users would need another
  flag value, and the subclass would have to impersonate DFLASH in every scheduler
  branch (``is_dflash_family``, ``create_future_map``, ``need_topk``,
  ``carries_draft_hidden_states``, ``supports_mixed_chunk`` ...). Keeping the built-in
  member keeps every DFLASH branch of the scheduler, memory planner and server-args
  handler exactly as SGLang wrote and tested it;
- a class REPLACE of ``dflash_worker_v2.DFlashWorkerV2`` through ``HookRegistry``
  needs the replacement class at registration, so both workers (and the model-runner
  stack they import) would load in every SGLang process, and a failed import would be
  logged and skipped by ``apply_hooks``. The factory hook imports our worker lazily, in
  the scheduler only, and an import error there stops the start-up with its traceback.

The same hook gives Kimi-Linear the DFLASH capture method (``add_kimi_dflash_capture``)
whatever the routing, so the built-in worker can be compared against ours on Kimi too.
In 0.5.23 the scheduler builds the target model, then calls ``create_worker``, and only
later asks the model for ``set_dflash_layers_to_capture`` (in
``ModelRunner.init_attention_backends``), so the method is in place in time, and
``sglang.srt.models.kimi_linear`` is imported only where a DFLASH worker is made.

A version of SGLang other than 0.5.23 is refused: ``load()`` raises, and SGLang's loader
logs the error with its traceback and starts without the plugin.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

logger = logging.getLogger("sglang_dflash")

SUPPORTED_SGLANG = "0.5.23"
# "0": `--speculative-algorithm dflash` runs SGLang's built-in DFlashWorkerV2.
ROUTE_ENV = "SGLANG_DFLASH_ROUTE"
WORKER = "sglang_dflash.worker.DFlashWorker"
CREATE_WORKER = "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker"

_loaded = False


def installed_sglang_version() -> str:
    from sglang import version

    return version.__version__


def check_sglang_version() -> None:
    """Raise unless the installed SGLang is the one release this plugin is written for."""
    installed = installed_sglang_version()
    # a local build tag ("0.5.23+cpu") is the same release; "0.5.23.post1" is not
    if installed.split("+", 1)[0] != SUPPORTED_SGLANG:
        raise RuntimeError(
            f"sglang-dflash supports SGLang {SUPPORTED_SGLANG} only, but SGLang {installed} is "
            f"installed. Install sglang=={SUPPORTED_SGLANG}, or leave the plugin out "
            "(SGLANG_PLUGINS=<other plugins>, or uninstall sglang-dflash).")


def route_to_plugin_worker() -> bool:
    """Whether DFLASH runs our worker; the only reader of ``SGLANG_DFLASH_ROUTE``."""
    value = os.environ.get(ROUTE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ROUTE_ENV}={value!r}: expected '1' (DFLASH runs {WORKER}, the "
                         "default) or '0' (DFLASH runs SGLang's built-in DFlashWorkerV2)")
    return value == "1"


def load() -> None:
    """Entry point of ``sglang.srt.plugins``; idempotent. SGLang applies the hook after."""
    global _loaded
    if _loaded:
        return
    check_sglang_version()
    route = route_to_plugin_worker()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_WORKER, make_create_worker_hook(route), HookType.AROUND)
    _loaded = True
    logger.info("sglang-dflash: --speculative-algorithm dflash runs %s",
                WORKER if route else f"SGLang's built-in DFlashWorkerV2 ({ROUTE_ENV}=0)")


def make_create_worker_hook(route: bool) -> Callable:
    """The AROUND hook on ``SpeculativeAlgorithm.create_worker`` (``route``: ours for DFLASH)."""

    def create_worker(original: Callable, algorithm, server_args) -> type:
        if not algorithm.is_dflash():
            return original(algorithm, server_args)
        add_kimi_dflash_capture()
        if not route:
            return original(algorithm, server_args)
        from sglang_dflash.worker import DFlashWorker

        return DFlashWorker

    return create_worker


def add_kimi_dflash_capture() -> None:
    """Give SGLang's ``KimiLinearForCausalLM`` a ``set_dflash_layers_to_capture``; idempotent."""
    from sglang.srt.models.kimi_linear import KimiLinearForCausalLM

    if "set_dflash_layers_to_capture" not in vars(KimiLinearForCausalLM):
        KimiLinearForCausalLM.set_dflash_layers_to_capture = kimi_set_dflash_layers_to_capture


def kimi_set_dflash_layers_to_capture(self, layer_ids: list[int]) -> None:
    """Capture the residual stream (hidden + residual) after each decoder layer in layer_ids.

    That is HF's ``hidden_states[i + 1]`` for layer i, the DFlash target feature. Unlike
    llama/qwen3, whose taps sit at a layer's input (hence their ``+ 1``), KimiLinearModel's
    DSpark taps snapshot the stream right after layer i runs, so the ids pass unshifted
    (SGLang's kimi_k3 does the same). The taps append in layer order, which is the order
    the drafter's ``fc`` concatenates, hence ids must increase.
    """
    num_layers = self.config.num_hidden_layers
    ids = list(layer_ids) if isinstance(layer_ids, (list, tuple)) else None
    if (not ids or any(type(i) is not int or not 0 <= i < num_layers for i in ids)
            or any(a >= b for a, b in zip(ids, ids[1:]))):
        raise ValueError(f"set_dflash_layers_to_capture: layer_ids must be increasing layer "
                         f"indices in [0, {num_layers}) (0-based, the layer whose output is "
                         f"captured), got {layer_ids!r}")
    self.set_dspark_layers_to_capture(ids)
