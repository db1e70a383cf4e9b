"""Development only: run SGLang 0.5.23 on a CPU machine without its GPU dependencies.

Nothing in the serving path imports this module; it fills in what the lean CPU install
of SGLang lacks, for tests and for a local server on a tiny model:

- torchvision: the PyPI wheels do not load beside the CPU torch build
  (``sglang_dflash.torchvision_stub``, which ``serve --check`` uses too).
- vllm: on a device SGLang does not know (plain CPU without sgl-kernel), its rotary
  embedding falls back to ``vllm._custom_ops.rotary_embedding``.
  ``install_vllm_rotary_shim`` provides that one op in torch.
- speculative verify on the torch-native attention backend: its extend path reads
  ``extend_prefix_lens`` / ``extend_seq_lens``, which a TARGET_VERIFY batch does not
  carry (it holds the committed ``seq_lens`` and a fixed block per request).
  ``install_torch_native_verify_shim`` fills them in for that call: the block attends
  causally to the committed prefix and to itself, exactly a chain verify. The other
  way to verify on CPU is SGLang's Triton backend in the interpreter, which serves
  correctly but is far slower (a 24-prompt test run had not finished in 16 minutes
  that took 75 s on torch_native, on the same busy machine).
- hybrid linear-attention, MLA and MoE targets (SGLang's own ``KimiLinearForCausalLM``):
  ``kimi_shims``, each shim beside the SGLang file:line it works around.

Server: ``python -m sglang_dflash.dev.cpu_shims serve --model-path DIR [sglang serve args]``
runs ``sglang serve`` with the shims and the CPU flags (``--device cpu
--attention-backend torch_native --disable-cuda-graph`` unless given) under
``TRITON_INTERPRET=1``: SGLang's Triton kernels (the KV-pool copy a speculative server
warms up, the KDA conv, or the whole Triton attention backend if chosen) then run in the
interpreter. It also sets ``OMP_NUM_THREADS=1`` unless given: CPU servers sharing a few
cores with default thread counts run about ten times slower. SGLang starts
its scheduler and detokenizer with multiprocessing "spawn", which re-runs this module
as ``__mp_main__`` in each child before anything is unpickled, so the shims are
installed there too (the guard at the bottom).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

from ..torchvision_stub import install_torchvision_stub
from .kimi_shims import install_kimi_shims

# the server's (and its children's) thread count unless the environment sets one
DEFAULT_THREADS = "1"
CPU_SERVE_DEFAULTS = (("--device", "cpu"), ("--attention-backend", "torch_native"),
                      ("--disable-cuda-graph", None))


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, Hq * D] or [T, Hq, D], rotated in place
    key: torch.Tensor | None,  # [T, Hk * D] or [T, Hk, D], rotated in place
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_pos, R]: cos in the first R/2 columns, sin after
    is_neox: bool,
) -> None:
    """vLLM's in-place rotary op in torch: the first R dims of every head are rotated."""
    cos, sin = cos_sin_cache.index_select(0, positions.flatten()).float().chunk(2, dim=-1)
    half = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(positions.numel(), -1, head_size)
        rot = heads[..., : 2 * half].float()
        if is_neox:
            # [x0..x_{h-1} | x_h..x_{2h-1}]: pairs (x_i, x_{i+h})
            a, b = rot[..., :half], rot[..., half:]
            out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:
            # GPT-J layout: pairs (x_{2i}, x_{2i+1})
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        heads[..., : 2 * half] = out.to(x.dtype)


def install_vllm_rotary_shim() -> bool:
    """Provide ``vllm._custom_ops.rotary_embedding`` unless vllm is installed. True if shimmed."""
    if "vllm._custom_ops" in sys.modules:
        return False
    if importlib.util.find_spec("vllm") is not None:
        return False
    vllm = types.ModuleType("vllm")
    vllm.__path__ = []
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = rotary_embedding
    vllm._custom_ops = ops
    sys.modules["vllm"], sys.modules["vllm._custom_ops"] = vllm, ops
    return True


def install_torch_native_verify_shim() -> None:
    """Let SGLang's TorchNativeAttnBackend run TARGET_VERIFY forwards; idempotent."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original = TorchNativeAttnBackend.forward_extend
    if getattr(original, "_sglang_dflash_verify_shim", False):
        return

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not forward_batch.forward_mode.is_target_verify():
            return original(self, q, k, v, layer, forward_batch, save_kv_cache)
        fb = forward_batch
        committed = fb.seq_lens  # [B], the block not included
        block = q.shape[0] // committed.shape[0]
        saved = fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens
        # e.g. committed [5, 9], block 4: keys 0..8 and 0..12, queries at 5..8 and 9..12
        fb.seq_lens = committed + block
        fb.extend_prefix_lens = committed
        fb.extend_seq_lens = torch.full_like(committed, block)
        try:
            return original(self, q, k, v, layer, fb, save_kv_cache)
        finally:
            fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens = saved

    forward_extend._sglang_dflash_verify_shim = True
    TorchNativeAttnBackend.forward_extend = forward_extend


def install_cpu_shims() -> None:
    install_torchvision_stub()
    install_vllm_rotary_shim()
    install_torch_native_verify_shim()
    install_kimi_shims()


def cpu_serve_argv(argv: list[str]) -> list[str]:
    """``sglang serve`` arguments: ``argv`` plus each CPU default it does not set itself."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = list(argv)
    for flag, value in CPU_SERVE_DEFAULTS:
        if flag not in given:
            out += [flag] if value is None else [flag, value]
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "serve":
        raise SystemExit("usage: python -m sglang_dflash.dev.cpu_shims serve --model-path DIR "
                         "[sglang serve arguments]")
    from sglang.cli.main import main as sglang_main

    sys.argv = ["sglang", "serve", *cpu_serve_argv(argv[1:])]
    print("sglang_dflash.dev.cpu_shims:", " ".join(sys.argv), flush=True)
    sglang_main()


# "__mp_main__": SGLang's spawned children re-run this module before unpickling anything.
if __name__ in ("__main__", "__mp_main__"):
    # before any @triton.jit is created (the shims import SGLang); children inherit it
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OMP_NUM_THREADS", DEFAULT_THREADS)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    install_cpu_shims()
if __name__ == "__main__":
    main(sys.argv[1:])
