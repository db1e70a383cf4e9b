"""Development only: serve SGLang 0.5.23's own ``KimiLinearForCausalLM`` on a CPU.

``cpu_shims`` installs these for every CPU server (they touch only the code paths of
hybrid linear-attention, MLA and MoE models). Each function works past one obstacle
of the lean CPU install and names, in its docstring, the SGLang (or Triton) file:line
it works around; ``install_kimi_shims`` runs them all. Nothing in the serving path
imports this module.

KDA kernels: with ``SGLANG_DFLASH_CPU_KDA=torch`` (the default) SGLang's recurrent KDA
kernel, its short convolution, gated norm and ReplaySSM fold are replaced by their torch
versions in ``kda_torch``; with ``triton`` SGLang's own Triton kernels run in the
interpreter (extend, decode and verify; the fold stays in torch, since SGLang's does not
run in the interpreter at all), many times slower.

Besides the shims, ``install_mamba_slot_readout`` adds the mamba state pool's slot
counts to ``/server_info`` so that tests can count the slots a request holds.
"""

from __future__ import annotations

import os

from . import kda_torch

KDA_KERNELS_ENV = "SGLANG_DFLASH_CPU_KDA"
KDA_KERNELS = ("torch", "triton")


def install_autotuner_without_benchmarks() -> None:
    """Triton's autotuner picks its first pruned config instead of timing them.

    ``triton/runtime/autotuner.py:128`` ``Autotuner._bench`` times every config with the
    driver's benchmarker (``do_bench`` at :123, ``driver.active.get_benchmarker()``) and
    ``check_disk_cache`` (:166) keys its cache on ``driver.active.get_current_target()``;
    without a GPU driver both fail. In the interpreter timings mean nothing, so every
    config scores 0 and ``min`` keeps the first one.
    """
    from triton.runtime.autotuner import Autotuner

    def _bench(self, *args, config, **meta):
        return [0.0, 0.0, 0.0]

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        bench_fn()
        return False

    Autotuner._bench = _bench
    Autotuner.check_disk_cache = check_disk_cache


class _GlobalsNamespace:
    """A function's globals dict as attributes (what the interpreter's patch scope edits)."""

    def __init__(self, names: dict):
        object.__setattr__(self, "_names", names)

    def __getattr__(self, name):
        try:
            return self._names[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self._names[name] = value

    def __delattr__(self, name):
        del self._names[name]


def install_interpreter_alias_patch() -> None:
    """The interpreter also patches Triton builtins a kernel holds under another name.

    ``triton/runtime/interpreter.py:1181`` ``_patch_lang`` patches the builtins of
    ``triton.language`` seen from the kernel's globals, not module-level aliases such as
    ``exp = tl.exp`` (``sglang/kernels/ops/attention/fla/op.py:19``), so calling one fails
    with "Did you forget to add @triton.jit?" (KDA packed decode,
    ``fla/fused_recurrent.py:689``). Patched through the same scope, so the aliases are
    restored with everything else after the launch.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._patch_lang
    if getattr(original, "_sglang_dflash_aliases", False):
        return

    def _patch_lang(fn):
        scope = original(fn)
        names = _GlobalsNamespace(fn.__globals__)
        for name, member in list(fn.__globals__.items()):
            if tl.core.is_builtin(member):
                interpreter._patch_attr(names, name, member, interpreter.interpreter_builder, scope)
        return scope

    _patch_lang._sglang_dflash_aliases = True
    _patch_lang._sglang_dflash_original = original
    interpreter._patch_lang = _patch_lang


def install_kda_extend_through_recurrent_kernel() -> None:
    """KDA prefill runs SGLang's recurrent KDA kernel instead of ``chunk_kda``.

    ``TritonKDAKernel.extend`` (``srt/layers/attention/linear/kernels/kda_triton.py:223``)
    calls ``chunk_kda``, which does not run in the interpreter (module-level aliases, then
    ``kernels/ops/attention/fla/kda.py:1125``). The recurrent kernel
    ``fused_sigmoid_gating_delta_rule_update`` takes the same raw gate and beta and updates
    the state pool in place, as ``chunk_kda`` does. It writes no per-chunk snapshots, so
    mamba radix tracking (``extra_buffer``) is refused: use ``--disable-radix-cache`` or
    ``--mamba-radix-cache-strategy no_buffer``.
    """
    from sglang.srt.layers.attention.linear.kernels import kda_triton

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc,
               A_log=None, dt_bias=None, lower_bound=None, beta_is_raw=False,
               return_intermediate_states=False, **kwargs):
        if return_intermediate_states or kwargs.get("track_state") is not None:
            raise NotImplementedError("CPU KDA extend keeps no chunk snapshots: serve with "
                                      "--disable-radix-cache or --mamba-radix-cache-strategy no_buffer")
        if not beta_is_raw or A_log is None or dt_bias is None:
            raise NotImplementedError("CPU KDA extend expects the raw gate and beta with A_log and dt_bias")
        return kda_triton.fused_sigmoid_gating_delta_rule_update(
            A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=g, b=beta,
            initial_state_source=ssm_states, initial_state_indices=cache_indices,
            cu_seqlens=query_start_loc, use_qk_l2norm_in_kernel=True, softplus_beta=1.0,
            softplus_threshold=20.0, is_kda=True, lower_bound=lower_bound)

    kda_triton.TritonKDAKernel.extend = extend


def install_torch_kda_recurrence() -> None:
    """Every KDA recurrence (extend, decode, verify) runs ``kda_torch``'s torch version.

    ``kda_triton.py:23`` imports ``fused_sigmoid_gating_delta_rule_update``
    (``kernels/ops/attention/linear/fused_sigmoid_gating_recurrent.py:538``) by name;
    decode, verify and the extend above call it through that module. Packed decode
    (``kda_triton.py:33``, the separate ``fused_recurrent_kda_packed_decode``) is turned
    off so that decode takes ``TritonKDAKernel.decode``, the same kernel.
    """
    from sglang.srt.layers.attention.linear.kernels import kda_triton

    kda_triton.fused_sigmoid_gating_delta_rule_update = kda_torch.fused_sigmoid_gating_delta_rule_update
    kda_triton.TritonKDAKernel.supports_packed_decode = False


def install_torch_causal_conv() -> None:
    """The short convolution before each KDA layer runs ``kda_torch``'s torch version.

    ``srt/layers/attention/linear/kda_backend.py:7`` imports ``causal_conv1d_fn`` (prefill)
    and ``causal_conv1d_update`` (decode, and verify with per-step windows) from
    ``kernels/ops/mamba/causal_conv1d_triton.py`` (:408, :1021) by name; interpreted, the
    update kernel took 86% of a CPU Kimi server's decode time (py-spy).
    """
    from sglang.srt.layers.attention.linear import kda_backend

    kda_backend.causal_conv1d_fn = kda_torch.causal_conv1d_fn
    kda_backend.causal_conv1d_update = kda_torch.causal_conv1d_update


def install_torch_norm_gate() -> None:
    """The gated RMSNorm after each KDA layer runs ``kda_torch``'s torch version.

    ``FusedRMSNormGated.forward`` (``kernels/ops/attention/fla/fused_norm_gate.py:435``)
    calls that module's ``rms_norm_gated`` (:383), a Triton kernel (:27); interpreted, it
    took 63% of a CPU Kimi server's verify time once the conv ran in torch (py-spy).
    """
    from sglang.kernels.ops.attention.fla import fused_norm_gate

    fused_norm_gate.rms_norm_gated = kda_torch.rms_norm_gated


def install_torch_replayssm_fold() -> None:
    """The ReplaySSM-KDA commit folds the accepted ring prefix in torch.

    ``commit_kda_replayssm_after_verify`` (called from
    ``srt/layers/attention/hybrid_linear_attn_backend.py:1563``) runs
    ``kda_replayssm_exact_fold_kernel`` (``kernels/ops/attention/linear/
    kda_replayssm_spec_decode.py:297``), which fails in the interpreter (``.to`` on a
    ``range`` index: "'int' object has no attribute 'to'"). It calls
    ``commit_kda_replayssm_spec_all_layers`` through its module, so that name is replaced.
    """
    from sglang.kernels.ops.attention.linear import kda_replayssm_spec_decode as replayssm

    replayssm.commit_kda_replayssm_spec_all_layers = kda_torch.commit_kda_replayssm_spec_all_layers


def install_torch_native_mla_handler() -> None:
    """MLA layers on the ``torch_native`` backend take the absorbed-MLA forward.

    ``srt/models/deepseek_common/attention_backend_handler.py:54`` ``get_handler`` has no
    ``torch_native`` entry and falls back to the triton handler, which picks MHA for a
    fresh prefill; torch_native then attends q ``[T, H, 32]`` against the latent cache
    ``[N, 1, 48]`` (shape error, ``srt/layers/attention/torch_native_backend.py:160``).
    The absorbed subtype (``_dispatch_mla_subtype``, :58) attends in the latent space,
    which is what a latent cache holds, for prefill, decode and verify alike.
    """
    from sglang.srt.models.deepseek_common import attention_backend_handler as handlers

    handlers.AttentionBackendRegistry.register("torch_native", handlers._dispatch_mla_subtype)


def install_moe_routed_scaling() -> None:
    """The native MoE path applies ``routed_scaling_factor`` (an SGLang CPU bug).

    ``UnquantizedFusedMoEMethod.forward_cpu`` (``srt/layers/quantization/unquant.py:1383``)
    calls ``moe_forward_native`` (``srt/layers/moe/fused_moe_native.py:61``), which never
    multiplies by the routed scaling factor, while the Triton runner does
    (``srt/layers/moe/moe_runner/triton.py:111``): without this every routed expert output
    of a CPU Kimi-Linear is 1/2.446 of the model's. Skipped where the top-k weights
    already carry the factor (``layer.should_fuse_routed_scaling_factor_in_topk``).
    """
    from sglang.srt.layers.moe import fused_moe_native

    original = fused_moe_native.moe_forward_native
    if getattr(original, "_sglang_dflash_scaled", False):
        return

    def moe_forward_native(layer, x, topk_output, moe_runner_config):
        out = original(layer, x, topk_output, moe_runner_config)
        factor = moe_runner_config.routed_scaling_factor
        if factor is not None and not layer.should_fuse_routed_scaling_factor_in_topk:
            out = out * factor
        return out

    moe_forward_native._sglang_dflash_scaled = True
    fused_moe_native.moe_forward_native = moe_forward_native


def scatter_mamba_states_after_mtp_verify(mamba_caches, state_indices_tensor, last_correct_step_indices,
                                          mamba_track_indices, mamba_steps_to_track, src_indices_raw=None):
    """Torch version of SGLang's post-verify commit of the recurrent and conv states."""
    pairs = [(mamba_caches.temporal, mamba_caches.intermediate_ssm),
             *zip(mamba_caches.conv, mamba_caches.intermediate_conv_window)]
    for dst, src in pairs:
        kda_torch.scatter_rows(dst, src, state_indices_tensor, last_correct_step_indices, src_indices_raw)
        if mamba_track_indices is not None:
            kda_torch.scatter_rows(dst, src, mamba_track_indices, mamba_steps_to_track, src_indices_raw)


def install_mamba_scatter_in_torch() -> None:
    """The post-verify mamba state scatter runs in torch.

    ``update_mamba_state_after_mtp_verify`` → ``scatter_mamba_states_after_mtp_verify``
    raises "fused_mamba_state_scatter_with_mask only supports CUDA/XPU tensors"
    (``kernels/ops/mamba/mamba_state_scatter_triton.py:343``; the conv twin at :507). The
    three functions are replaced in that module and in
    ``srt/layers/attention/hybrid_linear_attn_backend.py:12``, which imports them by name.
    """
    from sglang.kernels.ops.mamba import mamba_state_scatter_triton as scatter
    from sglang.srt.layers.attention import hybrid_linear_attn_backend as hybrid

    for module in (scatter, hybrid):
        module.fused_mamba_state_scatter_with_mask = kda_torch.scatter_rows
        module.fused_conv_window_scatter_with_mask = kda_torch.scatter_rows
        module.scatter_mamba_states_after_mtp_verify = scatter_mamba_states_after_mtp_verify


def set_mamba_conv_dtype_float32() -> None:
    """The KDA conv window is kept in fp32 (``SGLANG_MAMBA_CONV_DTYPE=float32`` unless set).

    ``srt/configs/mamba_utils.py:68`` keeps it in bf16 by default, so an fp32 server's
    decode drifts ~1e-3 from the model; fp32 brings it to ~1e-6. Set before SGLang reads
    it (start-up); children inherit it.
    """
    os.environ.setdefault("SGLANG_MAMBA_CONV_DTYPE", "float32")


def mamba_slot_counts(scheduler) -> dict | None:
    """The hybrid state pool of a scheduler, read at one instant between its steps.

    size / available: the allocator's slots and the free ones; evictable / protected:
    slots the radix cache holds (free to evict / locked by running requests); running /
    waiting: requests in the running batch and in the queue; intermediate_ssm: [rows,
    steps] of the verify scratch (one row of per-step states per running request);
    replayssm_ring: [rows, steps] of the ReplaySSM ring.
    """
    pool = scheduler.req_to_token_pool
    if not hasattr(pool, "mamba_allocator"):
        return None
    tree = scheduler.tree_cache
    count = lambda name: int(getattr(tree, name)()) if hasattr(tree, name) else 0  # noqa: E731
    spec = pool.mamba_pool.mamba_cache
    inter = getattr(spec, "intermediate_ssm", None)  # [layers, rows, steps, HV, V, K]
    ring = getattr(spec, "replayssm_rawv", None)  # [layers, rows, HV, steps, V]
    return {
        "size": int(pool.mamba_pool.size), "available": int(pool.mamba_allocator.available_size()),
        "evictable": count("mamba_evictable_size"), "protected": count("mamba_protected_size"),
        "running": len(scheduler.running_batch.reqs), "waiting": len(scheduler.waiting_queue),
        "intermediate_ssm": None if inter is None else [int(inter.shape[1]), int(inter.shape[2])],
        "replayssm_ring": None if ring is None else [int(ring.shape[1]), int(ring.shape[-2])],
    }


def install_mamba_slot_readout() -> None:
    """``/server_info`` reports the mamba state pool as ``dev_mamba_slots`` (dev only).

    SGLang 0.5.23 shows its free mamba slots only in the decode log line ("mamba num",
    ``srt/managers/scheduler_components/pool_stats_observer.py:135``) and as Prometheus
    gauges; tests need an exact count at any time, so the scheduler's internal-state
    readback (``scheduler_components/internal_state.py:45``) also reads the allocator.
    """
    from sglang.srt.managers.scheduler_components.internal_state import SchedulerInternalStateController

    original = SchedulerInternalStateController.get_internal_state
    if getattr(original, "_sglang_dflash_slots", False):
        return

    def get_internal_state(self, recv_req):
        out = original(self, recv_req)
        out.internal_state["dev_mamba_slots"] = mamba_slot_counts(self.scheduler)
        return out

    get_internal_state._sglang_dflash_slots = True
    SchedulerInternalStateController.get_internal_state = get_internal_state


def kda_kernels() -> str:
    """Which KDA kernels a CPU server runs (``SGLANG_DFLASH_CPU_KDA``, default torch)."""
    value = os.environ.get(KDA_KERNELS_ENV, "torch")
    if value not in KDA_KERNELS:
        raise SystemExit(f"{KDA_KERNELS_ENV}={value!r}: expected one of {', '.join(KDA_KERNELS)}")
    return value


def install_kimi_shims() -> None:
    """Everything above, in the order SGLang meets the obstacles."""
    set_mamba_conv_dtype_float32()
    install_autotuner_without_benchmarks()
    install_kda_extend_through_recurrent_kernel()
    if kda_kernels() == "torch":
        install_torch_kda_recurrence()
        install_torch_causal_conv()
        install_torch_norm_gate()
    else:
        # only SGLang's own KDA kernels need it; its per-launch scan of the kernel's
        # globals costs a quarter of the interpreted launches' time
        install_interpreter_alias_patch()
    install_torch_replayssm_fold()
    install_torch_native_mla_handler()
    install_moe_routed_scaling()
    install_mamba_scatter_in_torch()
    install_mamba_slot_readout()
