"""plugin.py against the installed SGLang 0.5.23, on CPU.

Fresh processes load the plugin through SGLang's own loader (entry point discovery,
``HookRegistry.apply_hooks``) and resolve ``--speculative-algorithm`` the way the
scheduler does (``from_string`` on the parsed server args, then ``create_worker``).
The Kimi-Linear capture runs SGLang's own ``KimiLinearModel`` (layer loop, residual
stream, norms, MLP, DSpark taps) on a tiny config; only each layer's attention is a
plain linear mixer, because SGLang's KDA/MLA kernels need a GPU attention backend, and
the capture taps sit outside the attention.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from sglang_env import last_json_line, one_rank_group, require_sglang, start_fresh_python

from sglang_dflash import plugin

require_sglang()

RESOLVE_WORKER = r"""
import json
from sglang_dflash.torchvision_stub import install_torchvision_stub
install_torchvision_stub()
from importlib.metadata import entry_points
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
from sglang.srt.server_args import prepare_server_args
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
args = prepare_server_args(["--model-path", "target-unused", "--device", "cpu",
    "--speculative-algorithm", "DFlash", "--speculative-draft-model-path", "drafter-unused",
    "--speculative-num-draft-tokens", "16"])
algorithm = SpeculativeAlgorithm.from_string(args.speculative_algorithm)
worker = algorithm.create_worker(args)
from sglang.srt.models.kimi_linear import KimiLinearForCausalLM
# /server_info: SGLang's _add_speculative, wrapped when DFLASH runs our worker
from types import SimpleNamespace
from sglang.srt.managers.scheduler_components.internal_state import SchedulerInternalStateController
draft_worker = object()
if worker.__name__ == "DFlashWorker":
    from sglang_dflash.worker.stats import AcceptanceCounter
    draft_worker = worker.__new__(worker)
    draft_worker.block_size, draft_worker.acceptance = 16, AcceptanceCounter(4)
    draft_worker.acceptance.add([0, 3])
state = {}
controller = SimpleNamespace(scheduler=SimpleNamespace(spec_algorithm=algorithm, draft_worker=draft_worker),
                             _average_accept_length=lambda: 2.5)
SchedulerInternalStateController._add_speculative(controller, state)
print(json.dumps({
    "server_info": state,
    "entry_points": sorted(f"{e.name}={e.value}" for e in entry_points(group="sglang.srt.plugins")),
    "hook_applied": "%s" in HookRegistry._patched,
    "request_hooks": sorted(t for t in HookRegistry._patched if t in %r),
    "algorithm": f"{type(algorithm).__name__}.{algorithm.name}",
    "worker": f"{worker.__module__}.{worker.__qualname__}",
    "kimi_capture": "set_dflash_layers_to_capture" in vars(KimiLinearForCausalLM),
}))
""" % (plugin.CREATE_WORKER, (plugin.VALIDATE_REQUEST, plugin.PARALLEL_SAMPLING))


@pytest.fixture(scope="module", autouse=True)
def fresh_routes():
    """Both routings, each in a fresh process, started first so that they import SGLang
    while this process runs the other tests."""
    env = {"default": None, "off": "0"}
    procs = {name: start_fresh_python(RESOLVE_WORKER,
                                      {plugin.ROUTE_ENV: value, "SGLANG_PLUGINS": None})
             for name, value in env.items()}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_other_algorithms_pass_through():
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    calls = []

    def original(algorithm, server_args):
        calls.append((algorithm, server_args))
        return "builtin"

    hook = plugin.make_create_worker_hook(route=True)
    assert hook(original, SpeculativeAlgorithm.EAGLE, "args") == "builtin"
    assert hook(original, SpeculativeAlgorithm.DSPARK, "args") == "builtin"
    assert calls == [(SpeculativeAlgorithm.EAGLE, "args"), (SpeculativeAlgorithm.DSPARK, "args")]


def test_route_env(monkeypatch):
    monkeypatch.delenv(plugin.ROUTE_ENV, raising=False)
    assert plugin.route_to_plugin_worker() is True
    monkeypatch.setenv(plugin.ROUTE_ENV, "0")
    assert plugin.route_to_plugin_worker() is False
    monkeypatch.setenv(plugin.ROUTE_ENV, "off")
    with pytest.raises(ValueError, match="SGLANG_DFLASH_ROUTE='off': expected '1'"):
        plugin.route_to_plugin_worker()


def test_version_gate(monkeypatch):
    import sglang.version
    from sglang.srt.plugins.hook_registry import HookRegistry

    hooks_before = list(HookRegistry._hooks.get(plugin.CREATE_WORKER, []))
    monkeypatch.setattr(sglang.version, "__version__", "0.5.24")
    monkeypatch.setattr(plugin, "_loaded", False)
    with pytest.raises(RuntimeError, match=r"supports SGLang 0\.5\.23 only, but SGLang 0\.5\.24"):
        plugin.load()
    assert not plugin._loaded
    assert HookRegistry._hooks.get(plugin.CREATE_WORKER, []) == hooks_before
    monkeypatch.setattr(sglang.version, "__version__", "0.5.23.post1")
    with pytest.raises(RuntimeError, match=r"0\.5\.23\.post1 is installed"):
        plugin.check_sglang_version()
    monkeypatch.setattr(sglang.version, "__version__", "0.5.23+cpu")
    plugin.check_sglang_version()


def test_request_hooks_check_before_sglang():
    """The per-request hook runs the plugin's checks, then SGLang's own; embeddings pass."""
    import types

    from sglang.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput

    manager = types.SimpleNamespace(model_config=types.SimpleNamespace(vocab_size=264))
    calls = []

    def original(mgr, obj, input_ids):
        calls.append(input_ids)

    good = GenerateReqInput(input_ids=[256, 263], sampling_params={"max_new_tokens": 2})
    good.normalize_batch_and_arguments()
    plugin.validate_one_request(original, manager, good, good.input_ids)
    bad = GenerateReqInput(input_ids=[256, 264], sampling_params={"max_new_tokens": 2})
    bad.normalize_batch_and_arguments()
    with pytest.raises(ValueError, match=r"token id 264 at index 1 .* \[0, 264\)"):
        plugin.validate_one_request(original, manager, bad, bad.input_ids)
    embedding = EmbeddingReqInput(input_ids=[256, 999])
    plugin.validate_one_request(original, manager, embedding, embedding.input_ids)
    assert calls == [[256, 263], [256, 999]]

    batch = GenerateReqInput(input_ids=[[256], [256, 1]], sampling_params={"n": 0})
    batch._determine_batch_size()
    batch._handle_parallel_sampling()
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        plugin.check_parallel_sampling(None, batch)


def _dflash_args(device: str, drafter, *extra: str):
    from sglang.srt.server_args import prepare_server_args

    from sglang_dflash.reference.tiny_qwen3 import TARGET_DIR

    return prepare_server_args(["--model-path", str(TARGET_DIR), "--device", device,
                                "--speculative-algorithm", "dflash",
                                "--speculative-draft-model-path", str(drafter), *extra])


def test_dflash_args_checked_before_sglang_pass(tmp_path):
    """The drafter is checked against the target's config before SGLang's own pass runs."""
    import json
    import shutil

    from sglang.srt.arg_groups.model_override_base import resolving_view

    from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR

    calls = []
    args = _dflash_args("cuda", DRAFTER_DIR)
    plugin.handle_dflash_args(calls.append, args)
    assert calls == [args]

    bad = tmp_path / "drafter"
    shutil.copytree(DRAFTER_DIR, bad)
    config = json.loads((bad / "config.json").read_text())
    config["dflash_config"]["mask_token_id"] = 999
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mask_token_id. 999 outside the target vocabulary"):
        plugin.handle_dflash_args(calls.append, _dflash_args("cuda", bad))
    assert len(calls) == 1

    # on CPU SGLang's pass would refuse the device; the plugin resolves what it would
    args = _dflash_args("cpu", DRAFTER_DIR)
    plugin.handle_dflash_args(calls.append, args)
    view = resolving_view(args)
    assert len(calls) == 1
    assert (view.speculative_num_draft_tokens, view.speculative_num_steps,
            view.speculative_eagle_topk, view.max_running_requests) == (16, 1, 1, 48)


def test_verify_width_is_resolved_and_bounded_by_the_drafter_block():
    """--speculative-num-draft-tokens (or its DFLASH alias) is W, 2..L of the drafter's
    block, on every device; neither flag: W = L."""
    from sglang.srt.arg_groups.model_override_base import resolving_view

    from sglang_dflash.reference.tiny_qwen3 import DRAFTER_DIR

    calls = []
    for extra, W in ((("--speculative-num-draft-tokens", "4"), 4),
                     (("--speculative-dflash-block-size", "8"), 8), ((), 16)):
        args = _dflash_args("cpu", DRAFTER_DIR, *extra)
        plugin.handle_dflash_args(calls.append, args)
        assert resolving_view(args).speculative_num_draft_tokens == W
    refused = {("--speculative-num-draft-tokens", "17"):
               r"--speculative-num-draft-tokens 17: the verify width W must lie in 2\.\.16\. The drafter "
               r".*drafts blocks of 16",
               ("--speculative-dflash-block-size", "1"): r"--speculative-dflash-block-size 1: .* 2\.\.16",
               ("--speculative-num-draft-tokens", "4", "--speculative-dflash-block-size", "8"):
               r"--speculative-num-draft-tokens 4 and --speculative-dflash-block-size 8 differ"}
    for extra, needle in refused.items():
        for device in ("cpu", "cuda"):
            with pytest.raises(ValueError, match=needle):
                plugin.handle_dflash_args(calls.append, _dflash_args(device, DRAFTER_DIR, *extra))
    assert calls == []
    # on a GPU a valid W goes on to SGLang's own pass, which sizes everything by it
    args = _dflash_args("cuda", DRAFTER_DIR, "--speculative-num-draft-tokens", "4")
    plugin.handle_dflash_args(calls.append, args)
    assert calls == [args]


# ---- Kimi-Linear feature capture ----

NUM_LAYERS = 4


class LinearMixer(torch.nn.Module):
    """Stands in for a layer's KDA/MLA attention, with the same call signature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, positions, forward_batch, zero_allocator):
        return self.proj(hidden_states)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:  # [T, H]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


@pytest.fixture(scope="module")
def tiny_kimi():
    from sglang.srt.configs.kimi_linear import KimiLinearConfig
    from sglang.srt.models.kimi_linear import KimiLinearForCausalLM

    # 1-based lists as in Kimi's config: layers 0-2 KDA, layer 3 (the last) MLA
    config = KimiLinearConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2, head_dim=16, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, mla_use_nope=True,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 16,
                            "num_heads": 2, "short_conv_kernel_size": 4})
    # the layers read their parallel groups while built and while run
    with one_rank_group():
        model = KimiLinearForCausalLM(config)
        torch.manual_seed(0)
        for layer in model.model.layers:
            layer.self_attn = LinearMixer(config.hidden_size)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        yield model


def residual_stream_after_each_layer(model, input_ids) -> list[torch.Tensor]:
    """HF's hidden_states[1:], computed from the layers' own modules, one op at a time."""
    h = model.model.embed_tokens(input_ids)
    after = []
    for layer in model.model.layers:
        h = h + layer.self_attn(rms_norm(h, layer.input_layernorm), None, None, None)
        h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm))
        after.append(h)
    return after


def run_layer_stack(model, input_ids):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    T = input_ids.numel()
    batch = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=input_ids,
                         req_pool_indices=torch.zeros(1, dtype=torch.int64),
                         seq_lens=torch.tensor([T]), out_cache_loc=torch.arange(T), seq_lens_sum=T)
    return model.model(input_ids, torch.arange(T), batch)


@pytest.mark.parametrize("layer_ids", [[0, 2], [1, 3], [3]], ids=["L0-2", "L1-3", "L3-last"])
def test_kimi_capture_is_output_of_layer(tiny_kimi, layer_ids):
    from sglang.srt.model_executor.model_runner_components.attention_backend_setup import (
        configure_aux_hidden_state_capture,
    )

    plugin.add_kimi_dflash_capture()
    # SGLang's own call for a DFLASH target (ModelRunner.init_attention_backends)
    configure_aux_hidden_state_capture(
        model=tiny_kimi, eagle_use_aux_hidden_state=False, eagle_aux_hidden_state_layer_ids=None,
        dflash_use_aux_hidden_state=True, dflash_target_layer_ids=layer_ids, is_dspark=False)
    input_ids = torch.tensor([5, 17, 3, 88, 41, 9, 60])
    with torch.no_grad():
        _, captured = run_layer_stack(tiny_kimi, input_ids)
        expected = residual_stream_after_each_layer(tiny_kimi, input_ids)
    assert len(captured) == len(layer_ids)
    for i, got in zip(layer_ids, captured):
        assert_close(f"after layer {i}", expected[i], got, 1e-5)
        # the stream before layer i is a different tensor: an off-by-one cannot pass
        before = expected[i - 1] if i else tiny_kimi.model.embed_tokens(input_ids)
        assert (before - got).norm() > 0.1 * got.norm()


@pytest.mark.parametrize("layer_ids",
                         [[], [2, 1], [1, 1], [0, NUM_LAYERS], [-1], [True], "0,1", None])
def test_kimi_capture_refuses_bad_layer_ids(tiny_kimi, layer_ids):
    plugin.add_kimi_dflash_capture()
    expected = rf"layer_ids must be increasing layer indices in \[0, {NUM_LAYERS}\)"
    with pytest.raises(ValueError, match=expected):
        tiny_kimi.set_dflash_layers_to_capture(layer_ids)


# ---- routing, resolved in fresh processes (last: they finish while the tests above run) ----


def test_dflash_routes_to_plugin_worker(fresh_routes):
    got = last_json_line(fresh_routes["default"], timeout=300)
    assert "dflash=sglang_dflash.plugin:load" in got["entry_points"]
    assert got["hook_applied"]
    assert got["request_hooks"] == sorted([plugin.VALIDATE_REQUEST, plugin.PARALLEL_SAMPLING])
    # the built-in member, so every DFLASH branch of the scheduler stays valid
    assert got["algorithm"] == "SpeculativeAlgorithm.DFLASH"
    assert got["worker"] == plugin.WORKER
    assert got["kimi_capture"]
    # /server_info gets the worker's counts beside SGLang's own average
    info = got["server_info"]
    assert info["avg_spec_accept_length"] == 2.5
    assert info[plugin.SERVER_INFO_KEY]["accepted_drafts_histogram"] == [1, 0, 0, 1]
    assert info[plugin.SERVER_INFO_KEY]["position_accept_rate"] == [0.5, 0.5, 0.5]


def test_route_off_gives_builtin_worker(fresh_routes):
    got = last_json_line(fresh_routes["off"], timeout=300)
    assert got["hook_applied"]
    # the request checks do not depend on the routing
    assert got["request_hooks"] == sorted([plugin.VALIDATE_REQUEST, plugin.PARALLEL_SAMPLING])
    assert got["worker"] == "sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2"
    # the built-in worker gets the Kimi-Linear capture too
    assert got["kimi_capture"]
    assert got["server_info"] == {"avg_spec_accept_length": 2.5}


def test_req_to_token_rows_hold_the_dflash_reserve(monkeypatch):
    """DFLASH reserves committed + 2 x W slots (W the verify width) (page-rounded) before each decode step; the
    rows must hold that much past the context, or the reserve overruns the row and leaks."""
    import types

    import sglang.srt.mem_cache.allocation_sizing as sizing
    import sglang.srt.runtime_context as runtime

    for algorithm, page, original, want in (("DFLASH", 1, 20, 32), ("DFLASH", 4, 35, 35),
                                            ("EAGLE", 1, 20, 20), (None, 1, 4, 4)):
        spec = types.SimpleNamespace(speculative_algorithm=algorithm, speculative_num_draft_tokens=16)
        monkeypatch.setattr(runtime, "get_spec", lambda spec=spec: spec)
        monkeypatch.setattr(sizing, "get_alloc_page_size", lambda page=page: page)
        assert plugin.req_row_extra_for_dflash(lambda original=original: original) == want, (algorithm, page)
