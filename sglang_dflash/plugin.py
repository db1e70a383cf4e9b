"""SGLang 0.5.23 integration: the only module of sglang_dflash that patches SGLang.

SGLang calls ``load()`` through the entry point ``sglang.srt.plugins: dflash`` in every
process it starts (engine, tokenizer, scheduler, detokenizer); its loader
(``sglang.srt.plugins.load_plugins``) then applies the hooks registered here. ``load()``
only registers: it imports nothing heavy, so the processes that never build a worker
pay nothing for the plugin.

The main hook is on ``SpeculativeAlgorithm.create_worker``: the single place where SGLang turns
``--speculative-algorithm dflash`` (any case; ``from_string`` upper-cases it) into a
worker class (``Scheduler.maybe_init_draft_worker`` is its only caller). For DFLASH the
hook returns ``sglang_dflash.worker.dflash_worker.DFlashWorker``; ``SGLANG_DFLASH_ROUTE=0`` gives the
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

While DFLASH is routed here, a second hook wraps SGLang's DFLASH server-args pass
(``speculative_hook._handle_dflash``) so that ``--device cpu`` is accepted: our worker
runs on CPU (the end-to-end tests serve a tiny model there), SGLang's refuses it. On
every other device SGLang's pass runs unchanged. The same hook settles the verify width
W on every device (``resolve_verify_width``): ``--speculative-num-draft-tokens`` (or its
DFLASH alias ``--speculative-dflash-block-size``, "verify window length" in SGLang's
help) is W, the positions the target verifies; the drafter always drafts its trained
block L (its config.json ``block_size``), so W must lie in 2..L. Everything SGLang sizes
from ``speculative_num_draft_tokens`` (the 2W slots reserved per request, the verify
CUDA graphs, the result stride) then follows W.

Acceptance counts in ``/server_info``: when the factory hook hands out our worker it
also wraps ``SchedulerInternalStateController._add_speculative`` (the piece of the
scheduler's ``get_internal_state`` that adds ``avg_spec_accept_length``) to add
``dflash_acceptance``, the worker's per-position counts. That hook is registered and
applied there, in the scheduler process, which has already imported the module:
registering it in ``load()`` would make every SGLang process import the scheduler's
internals when the hooks are applied.

The same hook gives Kimi-Linear the DFLASH capture method (``add_kimi_dflash_capture``)
whatever the routing, so the built-in worker can be compared against ours on Kimi too.
In 0.5.23 the scheduler builds the target model, then calls ``create_worker``, and only
later asks the model for ``set_dflash_layers_to_capture`` (in
``ModelRunner.init_attention_backends``), so the method is in place in time, and
``sglang.srt.models.kimi_linear`` is imported only where a DFLASH worker is made.

Two more hooks, registered in every server the plugin is loaded into (plain servers too),
refuse requests that SGLang 0.5.23 would pass to the scheduler and die of or misserve
(``request_validation`` lists them): one around ``TokenizerManager._validate_one_request``,
SGLang's own per-request check (every single request and every item of a batch, after
normalisation and tokenization, before the scheduler sees it; a ValueError raised there
becomes HTTP 400 on ``/generate`` and the OpenAI routes), and one after
``GenerateReqInput._handle_parallel_sampling``, the only place that still sees ``n`` when
a batch prompt with ``n = 0`` would expand to no request at all. Applying them imports
``tokenizer_manager`` in the scheduler processes too (about 20 ms once the scheduler's own
imports are done).

A version of SGLang other than 0.5.23 is refused: ``load()`` raises, and SGLang's loader
logs the error with its traceback and starts without the plugin.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

logger = logging.getLogger("sglang_dflash")

SUPPORTED_SGLANG = "0.5.23"
# "0": `--speculative-algorithm dflash` runs SGLang's built-in DFlashWorkerV2.
ROUTE_ENV = "SGLANG_DFLASH_ROUTE"
WORKER = "sglang_dflash.worker.dflash_worker.DFlashWorker"
CREATE_WORKER = "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker"
HANDLE_DFLASH = "sglang.srt.arg_groups.speculative_hook._handle_dflash"
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
PARALLEL_SAMPLING = "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling"
ADD_SPECULATIVE_STATE = ("sglang.srt.managers.scheduler_components.internal_state."
                         "SchedulerInternalStateController._add_speculative")
# the key of /server_info's internal_states[i] that holds the worker's acceptance counts
SERVER_INFO_KEY = "dflash_acceptance"
REQ_ROW_EXTRA = "sglang.srt.mem_cache.allocation_sizing.get_req_to_token_extra_context_len"
# the DFLASH server-args defaults SGLang's _handle_dflash declares, which ours keeps
DFLASH_DEFAULT_MAX_RUNNING_REQUESTS = 48

_loaded = False
_server_info_hooked = False


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
    """Entry point of ``sglang.srt.plugins``; idempotent. SGLang applies the hooks after."""
    global _loaded
    if _loaded:
        return
    check_sglang_version()
    route = route_to_plugin_worker()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_WORKER, make_create_worker_hook(route), HookType.AROUND)
    HookRegistry.register(REQ_ROW_EXTRA, req_row_extra_for_dflash, HookType.AROUND)
    if route:
        HookRegistry.register(HANDLE_DFLASH, handle_dflash_args, HookType.AROUND)
    HookRegistry.register(VALIDATE_REQUEST, validate_one_request, HookType.AROUND)
    HookRegistry.register(PARALLEL_SAMPLING, check_parallel_sampling, HookType.AFTER)
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
        from sglang_dflash.worker.dflash_worker import DFlashWorker

        add_acceptance_to_server_info()
        return DFlashWorker

    return create_worker


def validate_one_request(original: Callable, manager, obj, input_ids):
    """SGLang's per-request validation, after the plugin's own checks of a generate request."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    from .request_validation import check_request

    if isinstance(obj, GenerateReqInput):
        check_request(obj, input_ids, manager.model_config.vocab_size)
    return original(manager, obj, input_ids)


def check_parallel_sampling(result, request) -> None:
    """After SGLang resolved ``n`` into ``parallel_sample_num``: refuse n < 1."""
    from .request_validation import check_parallel_sample_num

    check_parallel_sample_num(request.parallel_sample_num)


def handle_dflash_args(original: Callable, server_args) -> None:
    """SGLang's DFLASH server-args pass, with the drafter checked first and CPU allowed.

    Before SGLang's pass: a Hub drafter id is resolved to a local snapshot of its
    configs and safetensors (never its ``dflash.py``), and the drafter is checked with
    ``sglang-dflash check`` (against the target's config.json too when the model path is
    a local directory), so a mismatched pair fails in seconds, every problem listed,
    before the target's weights load. The worker checks the pair again against the
    loaded target.

    On every device the verify width W is checked against the drafter's block
    (``resolve_verify_width``). On CPU SGLang's pass would refuse the device, so this
    declares what it declares for a single-rank server instead: one step, top-k 1,
    ``speculative_num_draft_tokens`` = W, 48 running requests by default. The draft attention backend it also resolves is for
    SGLang's draft ModelRunner, which our worker does not have.
    """
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution

    from .checkpoint import resolve_drafter_dir
    from .check import run_check
    from .config import load_drafter_config

    source = "sglang_dflash.handle_dflash_args"
    cfg = resolving_view(server_args)
    if cfg.speculative_draft_model_path is None:
        raise ValueError("DFLASH speculative decoding requires --speculative-draft-model-path "
                         "(the DFlash drafter directory or Hub id)")
    drafter = resolve_drafter_dir(cfg.speculative_draft_model_path, cfg.speculative_draft_model_revision)
    if drafter != cfg.speculative_draft_model_path:
        declare_resolution(server_args, source, speculative_draft_model_path=drafter)
    target = cfg.model_path if Path(cfg.model_path).is_dir() else None
    ok, report = run_check(drafter, target)
    if not ok:
        raise ValueError(f"--speculative-draft-model-path {cfg.speculative_draft_model_path}: the "
                         f"DFlash drafter cannot serve --model-path {cfg.model_path}:\n{report}")
    verify_width = resolve_verify_width(cfg.speculative_num_draft_tokens, cfg.speculative_dflash_block_size,
                                        load_drafter_config(drafter).block_size, drafter)
    if cfg.device != "cpu":
        # SGLang's pass sets speculative_num_draft_tokens from the same flags (or, with
        # neither, from the drafter's block_size: W = L)
        return original(server_args)
    if cfg.pp_size != 1:
        raise ValueError(f"DFLASH on CPU: --pp-size must be 1, got {cfg.pp_size}")
    fields = dict(speculative_num_steps=1, speculative_eagle_topk=1, speculative_num_draft_tokens=verify_width)
    if cfg.max_running_requests is None:
        fields["max_running_requests"] = DFLASH_DEFAULT_MAX_RUNNING_REQUESTS
    declare_resolution(server_args, source, **fields)


def resolve_verify_width(num_draft_tokens: int | None, dflash_block_size: int | None,
                         drafter_block: int, drafter: str) -> int:
    """W from SGLang's two DFLASH flags (aliases), the drafter's block L when neither is set.

    The target verifies the bonus token and the first W - 1 of the L - 1 drafts, so
    2 <= W <= L; a W outside that range is refused with the drafter's L named.
    """
    given = {f: int(v) for f, v in (("--speculative-num-draft-tokens", num_draft_tokens),
                                    ("--speculative-dflash-block-size", dflash_block_size)) if v is not None}
    if len(set(given.values())) > 1:
        raise ValueError("DFLASH: " + " and ".join(f"{f} {v}" for f, v in given.items()) +
                         " differ; for DFLASH both set the verify width W, give one")
    W = next(iter(given.values()), drafter_block)
    if not 2 <= W <= drafter_block:
        flag = next(iter(given), "--speculative-num-draft-tokens")
        raise ValueError(
            f"DFLASH: {flag} {W}: the verify width W must lie in 2..{drafter_block}. The drafter "
            f"{drafter} drafts blocks of {drafter_block} (its config.json block_size: the last token "
            f"and {drafter_block - 1} drafts); the target verifies the last token and the first W - 1 "
            "drafts")
    return W


def add_acceptance_to_server_info() -> None:
    """Put the worker's acceptance counts into ``/server_info`` (scheduler process; idempotent)."""
    global _server_info_hooked
    if _server_info_hooked:
        return
    from sglang.srt.managers.scheduler_components.internal_state import SchedulerInternalStateController
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    before = SchedulerInternalStateController._add_speculative
    HookRegistry.register(ADD_SPECULATIVE_STATE, add_dflash_acceptance, HookType.AROUND)
    # applies only what is not applied yet: this hook (the others ran at plugin load)
    HookRegistry.apply_hooks()
    if SchedulerInternalStateController._add_speculative is before:
        # apply_hooks logs and skips a target it cannot patch; say what that costs
        raise RuntimeError(f"sglang-dflash: could not wrap {ADD_SPECULATIVE_STATE} (see the log "
                           f"above); /server_info would lack {SERVER_INFO_KEY}")
    _server_info_hooked = True


def add_dflash_acceptance(original: Callable, controller, state: dict) -> None:
    """AROUND ``_add_speculative``: SGLang's figures, then ours under ``dflash_acceptance``."""
    original(controller, state)
    worker = controller.scheduler.draft_worker
    from sglang_dflash.worker.dflash_worker import DFlashWorker

    if isinstance(worker, DFlashWorker):
        state[SERVER_INFO_KEY] = worker.acceptance_report()


def req_row_extra_for_dflash(original: Callable) -> int:
    """``req_to_token`` row headroom past the context length, wide enough for DFLASH.

    Before each DFLASH decode step ``DFlashDraftInputV2.prepare_for_decode`` reserves
    slots up to ``kv_committed_len + 2 * W`` (W = ``speculative_num_draft_tokens``, the
    verify width; rounded up to a page), and a request still decoding has
    ``kv_committed_len`` below ``context_len``. SGLang 0.5.23 sizes the rows for that
    reserve only when pages are wider than 1 (``4 + W`` at page 1),
    so near the context its slot-table write runs past the row end (into the next
    request's row, or past the table) and the release at finish, which reads the row,
    never frees those slots: a leak, then SGLang's idle leak check stops the server.
    Whatever worker DFLASH routes to.
    """
    from sglang.srt.mem_cache.allocation_sizing import get_alloc_page_size
    from sglang.srt.runtime_context import get_spec
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    extra = original()
    spec = get_spec()
    if spec.speculative_algorithm is None or not SpeculativeAlgorithm.from_string(
            spec.speculative_algorithm).is_dflash():
        return extra
    return max(extra, 2 * int(spec.speculative_num_draft_tokens) + get_alloc_page_size() - 1)


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
