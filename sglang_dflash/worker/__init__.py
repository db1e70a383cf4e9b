"""The DFlash worker for SGLang 0.5.23 spec-v2, and the scheduler contract it implements.

Modules: ``dflash_worker`` (the ``DFlashWorker`` class SGLang builds), ``steps`` (its
tensor steps, free of SGLang objects), ``target`` (the worker's door to the target model
and the drafter loader check), ``settings`` (SGLang's resolved settings, read once, as a
frozen ``WorkerConfig``). Nothing here is imported until SGLang builds the worker.

The contract with SGLang 0.5.23's scheduler, as read from the installed wheel
(managers/scheduler.py, speculative/dflash_worker_v2.py, speculative/dflash_info_v2.py,
managers/utils.py, managers/scheduler_components/batch_result_processor.py):

Construction. ``Scheduler.maybe_init_draft_worker`` builds the class that
``SpeculativeAlgorithm.create_worker`` returns for DFLASH (plugin.py points it here) once
per scheduler process, after the target ``TpModelWorker`` has loaded its weights and
before any KV pool exists: ``DFlashWorker(server_args=, gpu_id=, nccl_port=,
target_worker=)``. Settings this worker cannot serve (pp > 1, dp attention, topk > 1,
draft window, HiCache, PD disaggregation, unified memory, LoRA, adaptive steps) are
refused right there (``worker_config``), as is a drafter that does not fit the target.

Start-up hooks, in this order: ``alloc_memory_pool(memory_pool_config=,
req_to_token_pool=, token_to_kv_pool_allocator=)`` after the target's pools (for DFLASH
SGLang's KV budget already counts the draft K/V bytes per token, computed from the
drafter's config, so the draft pool allocated there fits);
``init_hicache_draft_plan()``; ``init_attention_backends()`` and ``init_cuda_graphs()``,
each after the target's; ``prewarm_sampling()``. The scheduler also reads
``weight_load_time``, ``preloaded_weights_bytes``, ``graph_memory_usage``,
``graph_time_usage``, ``draft_parallel_layout``, ``hicache_draft_plan``,
``draft_swa_window`` and ``_draft_model_runners()``; ``BaseSpecWorker`` answers all of
them from ``draft_worker``, which is None here (the drafter is a torch module, not an
SGLang ModelRunner). Later: ``on_verify_complete_cpu`` after each verify result reaches
the host (the worker counts accepted drafts there, ``stats``), ``note_request_finished``,
``clear_cache_pool`` on a cache flush (no-ops).

``forward_batch_generation(batch, on_publish=None, grammar_barrier=None,
pp_proxy_tensors=None) -> GenerationBatchResult`` runs once per iteration inside the
scheduler's ``_forward_isolation``, which undoes the worker's edits to the batch
(``forward_mode``, ``input_ids``, ``out_cache_loc``, ``spec_info``) afterwards. Overlap
and non-overlap scheduling call it the same way; under overlap ``on_publish`` is given
and the next iteration may be prepared on the host while this one runs.

- Extend (``forward_mode.is_extend()``: prefill, a prefill chunk, a mixed batch). The
  batch carries ``input_ids`` and ``out_cache_loc [T]`` (the new tokens' KV slots),
  host lists ``prefix_lens`` / ``extend_lens``, ``seq_lens [B]`` after the extend and
  ``sampling_info``. The target runs it with ``CaptureHiddenMode.FULL`` and samples each
  request's first token itself. Return the target's result with ``new_seq_lens =
  seq_lens`` and ``next_draft_input = DFlashDraftInputV2(bonus_tokens=next_token_ids,
  new_seq_lens=seq_lens)``, after ``on_publish(seq_lens)``. The draft context of every
  new token must be written before returning: the scheduler may put the prompt into the
  radix cache right after, and later requests reuse those slots.
- Decode (``forward_mode.is_decode()``). No ``input_ids`` / ``out_cache_loc``:
  ``spec_info`` is the ``DFlashDraftInputV2`` returned last time (under overlap its
  ``bonus_tokens`` are resolved from the FutureMap), ``bonus_tokens [B]`` are the last
  committed tokens, ``seq_lens [B]`` (device) and ``seq_lens_cpu`` the committed
  lengths, and ``DFlashDraftInputV2.prepare_for_decode`` has already reserved KV slots
  for positions ``seq_lens .. seq_lens + 2W - 1`` in ``req_to_token``, W =
  ``--speculative-num-draft-tokens`` (the verify width; the drafter still drafts its whole
  trained block of L >= W positions, and only the first W are verified). Return
  ``GenerationBatchResult(next_token_ids [B*W], accept_lens [B] int32 = commit_len,
  speculative_num_draft_tokens = W, new_seq_lens [B], next_draft_input =
  DFlashDraftInputV2(bonus, new_seq_lens), logits_output, can_run_cuda_graph)``, calling
  ``on_publish(new_seq_lens)`` as soon as they are known. The scheduler then reads row b
  of ``next_token_ids`` (stride W) up to ``accept_lens[b]``, adds that to the request's
  ``output_ids`` and ``kv_committed_len``, counts ``spec_verify_ct += 1``, and trims the
  run at EOS / stop ids / ``max_new_tokens`` (``Req.update_finish_state``). Without
  overlap it sets ``batch.seq_lens = new_seq_lens``. Reserved slots past the committed
  length stay with the request (the next block overwrites them) until it is freed.
- Idle (``forward_mode.is_idle()``): an empty result.

The hybrid linear-attention state (Kimi-Linear's KDA layers) is committed after verify
through SGLang's own ``update_mamba_state_after_mtp_verify`` on the target's attention
backend, with ``last_correct_step_indices = commit_len - 1``: it scatters the verify's
per-step states, replays the accepted prefix (ReplaySSM-KDA) or records the accept
length (KDA fused-accept), whichever the target's backend was built for. The project's
``kda_commit`` op serves the pure-torch reference engine; inside SGLang the verify
kernels that would feed it belong to SGLang's KDA backend.

The draft context K/V lives in a pool indexed by the target's KV slot ids: a slot gets
its draft K/V whenever the target writes its KV (every extend token, every verified block
position), so a radix-cache prefix hit finds the draft context of its tokens too, and
positions a verify rejects are overwritten by a later block exactly as the target's are.
"""
