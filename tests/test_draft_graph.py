"""The capturable draft step: static shapes and addresses across steps, no host reads,
graph mode's code path on CPU (capture replaced by a direct call), the launch count per
step, the warm-up's specialisations, and on a GPU the real capture."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_dflash.backend import get_ops
from sglang_dflash.config import DrafterConfig
from sglang_dflash.drafter import DFlashDrafter
from sglang_dflash.kernels.jit_launches import count_launches, distinct, gpu_target, jit_of
from sglang_dflash.worker.draft_graph import DraftParts, DraftRunner, direct_call, draft_block
from sglang_dflash.worker.settings import ServerSettings, worker_config
from sglang_dflash.worker.steps import block_inputs
from sglang_dflash.worker.warmup import EAGER_BATCH_SIZES, serving_launches

# the small SGLang scheduler loop of test_worker and its module fixtures (SGLang imports
# happen inside them, so this import is cheap)
from test_worker import MAX_NEW, MiniScheduler, _tokens, pair, reference, sgl  # noqa: F401, E402

H, L, V, R, C = 64, 8, 300, 6, 64


def _config(**kw) -> DrafterConfig:
    base = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                max_position_embeddings=4096, attention_bias=False, block_size=L, mask_token_id=7,
                target_layer_ids=(1, 3))
    return DrafterConfig(**{**base, **kw})


def _real_config() -> DrafterConfig:
    """The published Kimi-Linear drafter's geometry: 5 layers, 32 x 72 MHA, hidden 2304."""
    return _config(hidden_size=2304, num_hidden_layers=5, num_attention_heads=32, num_key_value_heads=32,
                   head_dim=72, intermediate_size=9216, block_size=16, mask_token_id=163839,
                   target_layer_ids=(3, 7, 15, 19, 23))


@pytest.fixture(scope="module")
def setup():
    """A tiny drafter whose pool holds a context at every position of every request row."""
    torch.manual_seed(0)
    drafter = DFlashDrafter(_config()).eval()
    embed = torch.nn.Embedding(V, H)
    lm_head = torch.randn(V, H) * 0.3
    req_to_token = torch.randperm(R * C + 10)[: R * C].view(R, C).to(torch.int32)
    pool = drafter.new_pool(R * C + 10)
    with torch.no_grad():
        for r in range(R):
            drafter.append_context(pool, torch.randn(C, 2 * H), torch.arange(C), req_to_token[r].long())
    drafter.prepare(torch.device("cpu"))
    return drafter, embed, lm_head, req_to_token, pool


def _parts(setup, ops) -> DraftParts:
    drafter, embed, lm_head, req_to_token, pool = setup
    drafter.ops = ops
    return DraftParts(drafter, pool, embed, lambda h: ops.greedy_head(h, lm_head, 0)[1], req_to_token, 7, L, L)


def _batch(seq_lens, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (len(rows),), generator=gen), torch.tensor(seq_lens), torch.tensor(rows)


def _reference_candidates(setup, bonus, seq_lens, rows):
    """The draft as the worker used to build it: block_inputs, a [B, S] slot table cut to
    the host's longest context, forward_block, argmax over the full logits."""
    drafter, embed, lm_head, req_to_token, pool = setup
    block_ids, positions, _ = block_inputs(bonus, seq_lens, rows, req_to_token, 7, L, L)
    table = req_to_token[rows, : int(seq_lens.max())].long()
    hidden = drafter.forward_block(pool, embed(block_ids), positions, table, seq_lens)
    drafts = (hidden[:, 1:].double() @ lm_head.double().T).argmax(dim=-1)
    return torch.cat([block_ids[:, :1], drafts], dim=1)


STEPS = [([5, 17, 40], [2, 0, 5]), ([6, 33, 56], [2, 0, 5]), ([0, 1, 15], [1, 3, 4]), ([31, 16, 48], [4, 1, 0])]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eager_and_graph_mode_draft_the_reference_candidates(setup, backend):
    parts = _parts(setup, get_ops(backend))
    runner = DraftRunner(parts)
    runner.capture([2, 4], direct_call)
    with torch.no_grad():
        for i, (seq_lens, rows) in enumerate(STEPS + [([9, 12], [3, 1]), ([20] * 5, [0, 1, 2, 3, 4])]):
            bonus, seq_lens, rows = _batch(seq_lens, rows, seed=i)
            ref = _reference_candidates(setup, bonus, seq_lens, rows)
            assert torch.equal(draft_block(parts, bonus, seq_lens, rows), ref)
            # bucket 4 for 3 requests (one padding row), 2 for 2, eager for 5 (above the buckets)
            assert torch.equal(runner.draft(bonus, seq_lens, rows), ref)
    assert runner.bucket_for(3) == 4 and runner.bucket_for(2) == 2 and runner.bucket_for(5) is None


def test_a_verify_width_below_the_block_drafts_the_whole_block_and_keeps_its_first_w(setup):
    parts = _parts(setup, get_ops("torch"))
    narrow = DraftParts(**{**parts.__dict__, "verify_width": 5})
    runner = DraftRunner(narrow)
    runner.capture([4], direct_call)
    with torch.no_grad():
        for i, (seq_lens, rows) in enumerate(STEPS):
            batch = _batch(seq_lens, rows, seed=i)
            full = draft_block(parts, *batch)
            assert full.shape == (3, L)
            assert torch.equal(draft_block(narrow, *batch), full[:, :5])
            assert torch.equal(runner.draft(*batch), full[:, :5])


class StepTrace(TorchDispatchMode):
    """Every aten op and Triton launch of a step: op, shapes, strides, dtypes, scalar
    arguments, and the address of every tensor the step did not make itself."""

    def __init__(self):
        super().__init__()
        self.rows, self.made, self.paused = [], set(), 0

    def describe(self, x):
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            return (tuple(x.shape), x.stride(), x.dtype, "step" if ptr in self.made else x.data_ptr())
        return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype)) else type(x).__name__

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.rows.append((str(func), tuple(self.describe(a) for a in pytree.tree_leaves((args, kwargs)))))
            self.made.update(t.untyped_storage().data_ptr() for t in pytree.tree_leaves(out)
                             if isinstance(t, torch.Tensor))
        return out


@contextlib.contextmanager
def traced_triton(trace: StepTrace, monkeypatch):
    """Triton launches (the interpreter's) enter the trace with grid and arguments."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        trace.rows.append((self.fn.__name__, tuple(grid), tuple(map(trace.describe, args)), sorted(kwargs.items())))
        trace.paused += 1
        try:
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            trace.paused -= 1

    with monkeypatch.context() as m:
        m.setattr(InterpretedFunction, "run", run)
        yield


def _traces(parts, step_fn, steps, monkeypatch):
    """The trace of the replayed part of every step (capture replaced by a traced call)."""
    traces = []

    def capture(fn):
        def replay():
            with traced_triton(trace := StepTrace(), monkeypatch), trace:
                out = fn()
            traces.append(trace.rows)
            return out
        return replay

    runner = DraftRunner(parts)
    runner.capture([4], capture)
    inputs = runner.buckets[4][0]
    addresses = []
    with torch.no_grad():
        for i, (seq_lens, rows) in enumerate(steps):
            step_fn(runner, *_batch(seq_lens, rows, seed=i))
            addresses.append((inputs.data_ptr(), tuple(inputs.shape)))
    return traces, addresses


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_step_keeps_shapes_and_addresses_across_context_lengths(setup, backend, monkeypatch):
    import sglang_dflash.kernels.naive.draft_attention as twin

    # the ops' value checks run on CPU only (data-dependent shapes), never on a GPU
    monkeypatch.setattr(twin, "_check_index_values", lambda *args: None)
    parts = _parts(setup, get_ops(backend))
    traces, addresses = _traces(parts, lambda runner, *batch: runner.draft(*batch), STEPS, monkeypatch)
    assert len(traces) == len(STEPS) and len(traces[0]) > 50
    for trace in traces[1:]:
        assert trace == traces[0]
    assert len(set(addresses)) == 1
    # the persistent buffers the step reads appear by address: pool, req_to_token, weights
    drafter, _, _, req_to_token, pool = setup
    seen = {d[3] for row in traces[0] for part in row if isinstance(part, tuple)
            for d in part if isinstance(d, tuple) and len(d) == 4}
    assert {req_to_token.data_ptr(), pool.k.data_ptr(), addresses[0][0]} <= seen

    # the check fails on a step shaped by its context lengths (the old [B, S] table)
    def host_bound_table(runner, bonus, seq_lens, rows):
        inputs, replay = runner.buckets[4]
        inputs[:, 3:].zero_()
        inputs[0, :3], inputs[1, :3], inputs[2, :3] = bonus, seq_lens, rows
        narrow = DraftParts(**{**parts.__dict__, "req_to_token": req_to_token[:, : int(seq_lens.max())]})
        runner.parts = narrow
        replay()
        runner.parts = parts

    bad, _ = _traces(parts, host_bound_table, STEPS[:2], monkeypatch)
    assert bad[0] != bad[1]


def _meta_parts(ops, tp_size=1) -> DraftParts:
    cfg = _real_config()
    with torch.device("meta"):
        drafter = DFlashDrafter(cfg).to(torch.bfloat16)
    drafter.ops = ops
    lm_head = torch.empty(163840 // tp_size, cfg.hidden_size, dtype=torch.bfloat16, device="meta")
    embed = torch.nn.Embedding(163840, cfg.hidden_size, device="meta", dtype=torch.bfloat16)
    req_to_token = torch.empty(64, 32788, dtype=torch.int32, device="meta")
    return DraftParts(drafter, drafter.new_pool(8), embed, lambda h: ops.greedy_head(h, lm_head, 0)[1],
                      req_to_token, cfg.mask_token_id, cfg.block_size, cfg.block_size)


def test_step_reads_nothing_back_to_host_and_its_launches_are_counted():
    """On meta tensors any host read of device data raises, and Triton launches are
    recorded, not run: the step runs through at the real drafter's shapes."""
    ops = get_ops("triton")
    parts = _meta_parts(ops)
    ints = torch.empty(8, dtype=torch.int64, device="meta")
    with torch.no_grad(), count_launches(sm_count=132) as eager:
        assert draft_block(parts, ints, ints, ints).shape == (8, 16)

    def opaque_capture(fn):
        def replay():
            with graph.opaque():
                return fn()
        return replay

    runner = DraftRunner(parts)
    with torch.no_grad():
        runner.capture([8], direct_call)
        runner.buckets[8] = (runner.buckets[8][0], opaque_capture(runner.buckets[8][1]))
        with count_launches(sm_count=132) as graph:
            runner.draft(ints, ints, ints)
    print(f"launches per draft step at B=8 (5 layers): eager {eager.total} ({len(eager.torch_ops)} torch ops + "
          f"{len(eager.triton)} Triton), graph {graph.total} (input copies, one replay, output copy)")
    # per layer attention + merge (2 splits: 2 x 132 SMs over 8 x 32 programs), the head's two passes
    assert [launch.name for launch in eager.triton] == (
        ["_draft_attention_kernel", "_merge_splits_kernel"] * 5 + ["_tile_max_kernel", "_reduce_tiles_kernel"])
    assert eager.total > 40 * 5
    # three input copies, one replay, the output copy (B fills the bucket: no padding to zero)
    assert graph.total == 5 and graph.opaque_calls == 1

    # the same step with a host read fails here, so the check can fail
    with pytest.raises(Exception):
        with torch.no_grad():
            draft_block(DraftParts(**{**parts.__dict__, "head": lambda h: torch.zeros(int(h.sum()))}), ints, ints, ints)


def _warm_keys(batch_sizes, table_width=32788, tp_size=1):
    parts = _meta_parts(get_ops("triton"), tp_size)
    table = torch.empty(64, table_width, dtype=torch.int32, device="meta")
    launches = serving_launches(parts.drafter, table, 163840 // tp_size, 163840, tp_size, 16, 16, batch_sizes, 132)
    return distinct(launches, gpu_target(90))


def test_warmup_enumerates_every_specialisation():
    keys = _warm_keys(EAGER_BATCH_SIZES)
    names = sorted(binding.name for _, binding in keys.values())
    print(f"warm-up: {len(keys)} binaries for batch sizes 1..64: {names}")
    # batch sizes past 64 bring no new binary: eager drafting at any batch size is covered
    assert keys.keys() == _warm_keys(EAGER_BATCH_SIZES + (96, 127, 128, 200)).keys()
    # both attention variants (split and not, with its merge), both greedy-head tile classes
    attention = [b for _, b in keys.values() if b.name == "_draft_attention_kernel"]
    split_flags = {_constexpr(b, "SPLIT") for b in attention}
    assert split_flags == {True, False}
    assert {_constexpr(b, "BLOCK_M") for _, b in keys.values() if b.name == "_tile_max_kernel"} >= {16, 256}
    assert {"_merge_splits_kernel", "_reduce_tiles_kernel", "_accept_greedy_kernel", "_accept_sampled_kernel",
            "_draft_kv_append_kernel"} <= set(names)
    # the table width enters the binary (its row stride specialises on % 16), so the
    # warm-up must use the real req_to_token: 32768 and 32788 give different attention binaries
    wide16 = {k for k in _warm_keys((1,), table_width=32768) if k.startswith("_draft_attention")}
    assert wide16.isdisjoint(k for k in keys if k.startswith("_draft_attention"))
    assert any(b.name == "_combine_shards_kernel" for _, b in _warm_keys((1, 8), tp_size=2).values())


def _constexpr(binding, name):
    index = list(binding.signature).index(name)
    return binding.constexprs[(index,)]


def test_worker_config_takes_the_graph_buckets_and_refuses_graphs_off_cuda():
    base = dict(drafter_path="drafter", verify_width=16, device="cuda:0", tp_size=1, pp_size=1,
                dp_attention=False, topk=None, draft_window_size=None, hierarchical_cache=False,
                disaggregation_mode="null", unified_memory=False, lora=False, adaptive=False, ops_env=None)
    assert worker_config(ServerSettings(**base)).cuda_graph_bs is None
    assert worker_config(ServerSettings(**base, cuda_graph_bs=(1, 2, 4))).cuda_graph_bs == (1, 2, 4)
    with pytest.raises(ValueError, match="need a CUDA device.*--disable-cuda-graph"):
        worker_config(ServerSettings(**{**base, "device": "cpu"}, cuda_graph_bs=(1, 2)))


# ---- the worker in graph mode, inside the small SGLang scheduler loop of test_worker ----


def test_worker_in_graph_mode_replays_and_serves_the_reference_tokens(sgl, pair, reference, monkeypatch, caplog):
    """init_cuda_graphs with SGLang's buckets, capture replaced by a direct call: every
    decode step replays its bucket and the worker emits the reference tokens."""
    import dataclasses
    import logging
    from types import SimpleNamespace

    import sglang.srt.distributed.parallel_state as parallel_state

    from sglang_dflash.worker import dflash_worker

    replays = []

    def capture_factory(stream):
        def capture(fn):
            def replay():
                replays.append(1)
                return fn()
            return replay
        return capture

    monkeypatch.setattr(dflash_worker, "CudaGraphCapture", capture_factory)
    monkeypatch.setattr(parallel_state, "graph_capture",
                        contextlib.contextmanager(lambda: (yield SimpleNamespace(stream=None))))
    prompts, plain, spec = reference
    sched = MiniScheduler(sgl, pair, 16)
    sched.worker.cfg = dataclasses.replace(sched.worker.cfg, cuda_graph_bs=(1, 2, 4))
    with caplog.at_level(logging.INFO, logger="sglang_dflash"):
        sched.worker.init_cuda_graphs()
    assert "DFlash warm-up: nothing to compile (torch ops on cpu)" in caplog.text
    assert "captured 3 CUDA graphs (batch buckets [1, 2, 4])" in caplog.text
    reqs = sched.serve(prompts, MAX_NEW)
    for req, p, s in zip(reqs, plain, spec):
        assert _tokens(req) == p.tokens
        assert req.commit_lens[:-1] == s.commit_lens[:-1]
    assert len(replays) == len(sched.step_accept_lens) > 0


# ---- on a GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_replay_equals_eager(setup, dtype):
    from sglang_dflash.worker.draft_graph import CudaGraphCapture

    drafter, embed, lm_head, req_to_token, pool = setup
    device = torch.device("cuda")
    ops = get_ops("triton")
    gpu = DFlashDrafter(drafter.cfg).to(device, dtype)
    gpu.load_state_dict(drafter.state_dict())
    gpu.ops = ops
    gpu_pool = gpu.new_pool(pool.num_slots)
    gpu_pool.k.copy_(pool.k)
    gpu_pool.v.copy_(pool.v)
    gpu.prepare(device)
    lm = lm_head.to(device, dtype)
    parts = DraftParts(gpu, gpu_pool, embed.to(device, dtype), lambda h: ops.greedy_head(h, lm, 0)[1],
                       req_to_token.to(device), 7, L, L)
    runner = DraftRunner(parts)
    with torch.no_grad():
        runner.capture([2, 4], CudaGraphCapture())
        for i, (seq_lens, rows) in enumerate(STEPS):
            batch = [t.to(device) for t in _batch(seq_lens, rows, seed=i)]
            assert torch.equal(runner.draft(*batch), draft_block(parts, *batch))


@pytest.mark.gpu
def test_extend_positions_never_blocks_the_host():
    from sglang_dflash.worker.steps import extend_positions

    torch.cuda.set_sync_debug_mode("error")
    try:
        got = extend_positions([0, 5, 3], [3, 2, 1], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), torch.tensor([0, 1, 2, 5, 6, 3]))


@pytest.mark.gpu
def test_warm_up_leaves_nothing_to_compile_for_the_draft(setup):
    from sglang_dflash.worker.warmup import warm_up

    drafter, embed, lm_head, req_to_token, pool = setup
    device = torch.device("cuda")
    ops = get_ops("triton")
    gpu = DFlashDrafter(drafter.cfg).to(device, torch.bfloat16)
    gpu.ops = ops
    gpu.prepare(device)
    table = req_to_token.to(device)
    launches = serving_launches(gpu, table, V, V, 1, L, L, (3,), torch.cuda.get_device_properties(0).multi_processor_count)
    binaries, _ = warm_up(launches)
    assert binaries > 5
    kernels = {id(jit_of(launch.kernel)): jit_of(launch.kernel) for launch in launches}.values()
    cached = {id(k): len(k.device_caches[0][0]) for k in kernels}
    lm = lm_head.to(device, torch.bfloat16)
    parts = DraftParts(gpu, gpu.new_pool(pool.num_slots), embed.to(device, torch.bfloat16),
                       lambda h: ops.greedy_head(h, lm, 0)[1], table, 7, L, L)
    with torch.no_grad():
        draft_block(parts, *[t.to(device) for t in _batch([5, 17, 40], [2, 0, 5], seed=0)])
    assert {id(k): len(k.device_caches[0][0]) for k in kernels} == cached
