"""SGLang's memory planner charges for the draft K/V pool exactly what the worker allocates:
the dtype (``--speculative-draft-kv-cache-dtype``, or ``--kv-cache-dtype`` it follows) and,
at tensor parallelism, all the KV heads (the drafter runs whole on every rank).

The planner's own functions run here on a published CPU config of the tiny Qwen3 target
with the published Kimi-Linear drafter's config (32 KV heads x 72, 5 layers).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang_env import require_sglang

require_sglang()

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
BF16_BYTES = 5 * 2 * 32 * 72 * 2  # layers x (K, V) x KV heads x head dim x 2 B


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("published-drafter")
    shutil.copy(FIXTURES / "kimi-linear-48b-a3b-dflash.json", path / "config.json")
    return path


@pytest.fixture
def published(drafter_dir):
    """(publish, draft ModelConfig): ``publish(*flags)`` publishes a CPU server's resolved
    config (the tiny Qwen3 target, ``--dtype bfloat16``) as the scheduler process does."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    from sglang_dflash.reference.tiny_qwen3 import TARGET_DIR

    def publish_flags(*flags):
        reset_context()
        args = prepare_server_args(["--model-path", str(TARGET_DIR), "--device", "cpu", "--dtype", "bfloat16",
                                    "--disable-cuda-graph", *flags])
        publish(args, role="test", ranks=SpawnRanks(world_rank=0))
        return args

    args = publish_flags()
    draft_config = ModelConfig.from_server_args(args, model_path=str(drafter_dir), is_draft_model=True)
    try:
        yield publish_flags, draft_config
    finally:
        reset_context()


def _settings(**fields):
    from sglang_dflash.worker.settings import ServerSettings

    base = dict(drafter_path="drafter", verify_width=16, device="cpu", tp_size=1, pp_size=1, dp_attention=False,
                topk=None, draft_window_size=None, hierarchical_cache=False, disaggregation_mode="null",
                unified_memory=False, lora=False, adaptive=False, ops_env=None)
    return ServerSettings(**{**base, **fields})


def _worker_pool_bytes(publish, draft_config, *flags) -> tuple[int, int, torch.dtype]:
    """(what SGLang's planner charges per token at the worker's layout, what the worker's
    pool holds per token, the pool's dtype) for a server started with ``flags``."""
    from sglang.srt.mem_cache.draft_kv_budget import resolve_dflash_draft_cell_size

    from sglang_dflash.config import load_drafter_config
    from sglang_dflash.drafter import DFlashDrafter
    from sglang_dflash.worker.dflash_worker import DFlashWorker
    from sglang_dflash.worker.settings import read_server_settings, worker_config

    publish(*flags)
    planned = resolve_dflash_draft_cell_size(draft_model_config=draft_config, draft_num_layers=5,
                                             attn_tp_size=DFlashWorker.draft_parallel_layout.attn_tp_size)
    # the plain server's published config carries no speculative flags; the worker's own
    # ones do not enter the pricing
    settings = replace(read_server_settings("cpu", draft_config.dtype), drafter_path="drafter", verify_width=16)
    cfg = worker_config(settings)
    with torch.device("meta"):
        drafter = DFlashDrafter(load_drafter_config(draft_config.model_path)).to(draft_config.dtype)
    pool = drafter.new_pool(8, dtype=cfg.draft_kv_dtype)
    return planned, pool.bytes_per_token, pool.k.dtype


@pytest.mark.parametrize("flags, dtype, size", [
    ((), torch.bfloat16, 2),
    (("--speculative-draft-kv-cache-dtype", "fp8_e4m3"), torch.float8_e4m3fn, 1),
    (("--speculative-draft-kv-cache-dtype", "bf16"), torch.bfloat16, 2),
    # the draft K/V follows the target's --kv-cache-dtype when it has none of its own
    (("--kv-cache-dtype", "fp8_e4m3"), torch.float8_e4m3fn, 1),
], ids=["auto", "draft-fp8", "draft-bf16", "target-fp8"])
def test_the_pool_is_the_one_sglang_prices(published, flags, dtype, size):
    planned, held, pool_dtype = _worker_pool_bytes(*published, *flags)
    assert pool_dtype == dtype
    assert planned == held == BF16_BYTES // 2 * size


def test_unsupported_draft_dtypes_are_refused_with_the_flag(published):
    from sglang_dflash.worker.settings import worker_config

    with pytest.raises(ValueError, match="--speculative-draft-kv-cache-dtype fp8_e5m2"):
        worker_config(_settings(draft_kv_cache_dtype="fp8_e5m2", draft_model_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e5m2"):
        worker_config(_settings(kv_cache_dtype="fp8_e5m2", device="cuda:0", draft_model_dtype=torch.bfloat16))


def test_tensor_parallel_planner_charges_every_kv_head(published):
    """At tp 2 SGLang's DFLASH default layout charges half the heads (16 of 32 per rank);
    the worker's layout makes it charge the 32 heads each rank's pool really holds."""
    from sglang.srt.mem_cache.draft_kv_budget import resolve_dflash_draft_cell_size
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_dflash.worker.dflash_worker import DFlashWorker

    publish, draft_config = published
    publish("--tp-size", "2")
    dflash = SpeculativeAlgorithm.DFLASH
    # the planner's width: the layout the scheduler passes from the draft worker, else SGLang's default
    width = KVCacheConfigurator.draft_attn_tp_size.fget
    default = width(SimpleNamespace(draft_parallel_layout=None, spec_algorithm=dflash))
    ours = width(SimpleNamespace(draft_parallel_layout=DFlashWorker.draft_parallel_layout, spec_algorithm=dflash))
    assert (default, ours) == (2, 1)

    def charged(attn_tp_size):
        return resolve_dflash_draft_cell_size(draft_model_config=draft_config, draft_num_layers=5,
                                              attn_tp_size=attn_tp_size)

    assert charged(default) == BF16_BYTES // 2  # what SGLang alone would plan for
    assert charged(ours) == BF16_BYTES          # what every rank allocates


def test_scheduler_hands_the_worker_layout_to_the_target_planner():
    """SGLang's own Scheduler.init_target_memory_pool, on stand-ins: the target's
    alloc_memory_pool receives the DFlash worker's layout."""
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_dflash.worker.dflash_worker import DFlashWorker

    worker = DFlashWorker.__new__(DFlashWorker)
    worker._draft_worker = None
    received = {}
    runner = SimpleNamespace(memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None,
                             account_preloaded_weights=lambda n: None)
    tp_worker = SimpleNamespace(model_runner=runner, preloaded_weights_bytes=0,
                                alloc_memory_pool=lambda **kw: received.update(kw))
    Scheduler.init_target_memory_pool(SimpleNamespace(tp_worker=tp_worker, draft_worker=worker))
    assert received["draft_parallel_layout"].attn_tp_size == 1
