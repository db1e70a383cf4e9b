"""The draft step, eager vs replayed from CUDA graphs: µs per step and launches per step.

On a GPU: the published Kimi-Linear drafter's geometry with random weights (5 layers,
hidden 2304, 32 heads x 72 MHA, intermediate 9216, block 16, bf16), the target's
embed_tokens / lm_head shapes (163840 x 2304), a draft pool holding ``--context`` tokens of
context per request at scattered slots, and SGLang's ``req_to_token`` layout
(64 rows x 32788). For each batch size: ``draft_block`` eagerly and ``DraftRunner``
replaying its bucket's graph; the candidates must be equal (exit 1 otherwise); µs per step
by CUDA events (median of ``--iters``); launches per step as the host issues them
(torch.profiler: kernel launches, memcpy/memset, graph launches) and as counted on meta
tensors (aten ops that launch device work + Triton launches; a GEMM counts once).

``--smoke`` (any machine): a tiny drafter on CPU, capture replaced by a direct call, the
same equality check, and the meta count at the real geometry.

    python benchmarks/draft_step_bench.py --out OUT          # GPU
    python benchmarks/draft_step_bench.py --smoke --out OUT  # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from sglang_dflash.backend import get_ops
from sglang_dflash.config import DrafterConfig
from sglang_dflash.drafter import DFlashDrafter
from sglang_dflash.kernels.jit_launches import count_launches
from sglang_dflash.worker.draft_graph import CudaGraphCapture, DraftParts, DraftRunner, direct_call, draft_block

REAL = dict(hidden_size=2304, num_hidden_layers=5, num_attention_heads=32, num_key_value_heads=32, head_dim=72,
            intermediate_size=9216, block_size=16, mask_token_id=163839, target_layer_ids=(3, 7, 15, 19, 23))
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, block_size=8, mask_token_id=7, target_layer_ids=(1, 3))
VOCAB = {"real": 163840, "tiny": 300}
HOST_LAUNCHES = ("LaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def _config(geometry: dict) -> DrafterConfig:
    return DrafterConfig(rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=1 << 20,
                         attention_bias=False, **geometry)


def build(geometry: dict, vocab: int, rows: int, width: int, context: int, device, dtype) -> DraftParts:
    """Random drafter, embeddings and lm_head; every request row holds `context` tokens."""
    torch.manual_seed(0)
    cfg = _config(geometry)
    with torch.device(device):
        drafter = DFlashDrafter(cfg).to(dtype).eval()
        embed = torch.nn.Embedding(vocab, cfg.hidden_size, dtype=dtype)
        lm_head = torch.randn(vocab, cfg.hidden_size, dtype=dtype) * 0.05
        slots = rows * context + 16
        req_to_token = torch.zeros(rows, width, dtype=torch.int32)
        req_to_token[:, :context] = torch.randperm(slots)[: rows * context].view(rows, context).int()
    drafter.ops = get_ops("triton")
    pool = drafter.new_pool(slots)
    # random context K/V: the attention reads them, their values do not matter here
    pool.k.normal_()
    pool.v.normal_()
    drafter.prepare(torch.device(device))
    ops = drafter.ops
    return DraftParts(drafter, pool, embed, lambda h: ops.greedy_head(h, lm_head, 0)[1], req_to_token,
                      cfg.mask_token_id, cfg.block_size, cfg.block_size)


def _batch(parts: DraftParts, B: int, context: int):
    device = parts.req_to_token.device
    gen = torch.Generator().manual_seed(B)
    bonus = torch.randint(0, 100, (B,), generator=gen).to(device)
    seq_lens = torch.randint(context // 2, context + 1, (B,), generator=gen).to(device)
    rows = torch.randperm(parts.req_to_token.shape[0], generator=gen)[:B].to(device)
    return bonus, seq_lens, rows


def _time_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _host_launches(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    host = sum(1 for e in events if any(k in e.name for k in HOST_LAUNCHES))
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"host_launch_calls": host, "device_activities": kernels}


def meta_counts(B: int) -> dict:
    """Launches per step counted on meta tensors at the real geometry (nothing runs)."""
    cfg = _config(REAL)
    with torch.device("meta"):
        drafter = DFlashDrafter(cfg).to(torch.bfloat16)
        lm_head = torch.empty(VOCAB["real"], cfg.hidden_size, dtype=torch.bfloat16)
        embed = torch.nn.Embedding(VOCAB["real"], cfg.hidden_size, dtype=torch.bfloat16)
        req_to_token = torch.empty(64, 32788, dtype=torch.int32)
        ints = torch.empty(B, dtype=torch.int64)
    ops = drafter.ops = get_ops("triton")
    parts = DraftParts(drafter, drafter.new_pool(8), embed, lambda h: ops.greedy_head(h, lm_head, 0)[1],
                       req_to_token, cfg.mask_token_id, cfg.block_size, cfg.block_size)
    counts = {}

    def capture(fn):
        # a replay is one launch: what the step does inside it is not counted again
        def replay():
            with counts["graph"].opaque():
                return fn()
        return replay

    runner = DraftRunner(parts)
    with torch.no_grad():
        with count_launches(sm_count=132) as counts["eager"]:
            draft_block(parts, ints, ints, ints)
        runner.capture([B], capture)
        with count_launches(sm_count=132) as counts["graph"]:
            runner.draft(ints, ints, ints)
    eager, graph = counts["eager"], counts["graph"]
    return {"eager_torch_ops": len(eager.torch_ops), "eager_triton": len(eager.triton), "eager": eager.total,
            "graph_torch_ops": graph.torch_ops, "graph_replays": graph.opaque_calls, "graph": graph.total}


def run_gpu(batches, context: int, iters: int) -> list[dict]:
    parts = build(REAL, VOCAB["real"], max(64, max(batches)), 32788, context, "cuda", torch.bfloat16)
    runner = DraftRunner(parts)
    rows = []
    with torch.no_grad():
        runner.capture(batches, CudaGraphCapture())
        for B in batches:
            batch = _batch(parts, B, context)
            eager = lambda: draft_block(parts, *batch)  # noqa: E731
            graph = lambda: runner.draft(*batch)  # noqa: E731
            same = torch.equal(eager(), graph())
            rows.append({"B": B, "context": context, "candidates_equal": bool(same),
                         "eager_us": _time_us(eager, iters), "graph_us": _time_us(graph, iters),
                         "eager_launches": _host_launches(eager), "graph_launches": _host_launches(graph),
                         "meta_count": meta_counts(B)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_smoke(batches) -> list[dict]:
    parts = build(TINY, VOCAB["tiny"], max(batches), 64, 40, "cpu", torch.float32)
    runner = DraftRunner(parts)
    rows = []
    with torch.no_grad():
        runner.capture(batches, direct_call)
        for B in batches:
            batch = _batch(parts, B, 40)
            same = torch.equal(draft_block(parts, *batch), runner.draft(*batch))
            rows.append({"B": B, "candidates_equal": bool(same), "meta_count": meta_counts(B)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="draft_step_bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny drafter, capture = direct call")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke")
    rows = run_smoke(args.batches) if args.smoke else run_gpu(args.batches, args.context, args.iters)
    ok = all(r["candidates_equal"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"ok": ok, "smoke": args.smoke, "torch": torch.__version__, "rows": rows}
    (args.out / "draft_step.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'draft_step.json'}; {'graph == eager' if ok else 'GRAPH AND EAGER DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
