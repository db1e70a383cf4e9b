"""Triton kernels for DFlash drafting and verification (installed as ``sglang_dflash.kernels``).

Every public op here has a pure-torch twin with the same signature in
``sglang_dflash.kernels.naive``; tests compare the two on irregular shapes.

Glossary (one name per concept, used everywhere in the project):

- ``B`` batch (requests), ``L`` block size (16 for the published drafters; the drafter
  always drafts all L), ``W`` verify width (the first W block positions, 2..L, are what
  the target verifies; ``candidates`` then hold W columns, and the ops take any width), ``N`` slots
  of a pool, ``H`` heads, ``K``/``V`` head dims of keys/values, ``D`` a head dim, ``T``
  tokens of a flat (ragged) batch, ``E`` stop ids per request.
- ``candidates [B, L]``: the block sent to the target for verification; column 0 is the
  last committed token, columns 1..L-1 the drafter's proposals.
- ``target_predict [B, L]``: the target's token for the position after each candidate.
- ``accept_len [B]``: accepted drafts, 0..L-1 (after stop conditions are applied).
- ``commit_len [B] = accept_len + 1``: tokens emitted by the step (accepted drafts plus
  the bonus); also the number of block positions whose target state is kept.
- ``bonus [B]``: the last emitted token, ``emitted[b, accept_len[b]]``.
- ``emitted [B, L]``: the step's new tokens, ``-1`` past ``commit_len``.
- ``slot_table [R, S]`` / ``slot_rows [B]``: the draft context of request ``b`` is
  ``slot_table[slot_rows[b], :ctx_lens[b]]`` (in serving, SGLang's ``req_to_token`` and
  ``req_pool_indices``, so the table's shape never changes between steps).
- ``k_scale`` / ``v_scale``: fixed fp32 scales of an fp8 (e4m3) draft K/V pool, one per
  (layer, KV head) (``[Ld, Hkv]``; one layer's ``[Hkv]`` in ``draft_attention``): the pool
  holds ``value / scale``; None for float pools.

Kernels import only torch and triton. Under ``TRITON_INTERPRET=1`` they run on CPU
tensors (slowly); the launchers validate shapes, dtypes and bounds because the
interpreter never faults on an out-of-bounds access. ``jit_launches`` records launches
on meta tensors and binds them as the JIT does, for ``benchmarks/compile_check.py``
(real sm_90 / sm_100 compiles on CPU) and the serving warm-up.
"""
