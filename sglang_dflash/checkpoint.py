"""Strict drafter checkpoint loading: safetensors only, no remote code, no pickle.

A DFlash checkpoint directory holds ``config.json``, the weights as ``model.safetensors``
(or shards listed in ``model.safetensors.index.json``) and often a ``dflash.py`` for
transformers' remote code. Nothing in the directory is imported or unpickled: a safetensors
file is an 8-byte little-endian header length, a JSON header, then raw tensor bytes, so
reading it runs no code. Tensor names may carry one ``model.`` prefix; once it is stripped,
the names and every shape must be exactly those the config implies, or one error lists
every missing, unexpected and mis-shaped tensor.

Two kinds of extra tensor are known, checked, never loaded, and named in one log line:
RoPE's ``rotary_emb.inv_freq`` buffers (recomputed from the config), and copies of the
target's ``embed_tokens`` / ``lm_head`` (the drafter always uses the target's own), whose
shape must be the target's [vocab, hidden].
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .config import ConfigError, DrafterConfig

logger = logging.getLogger("sglang_dflash")


class CheckpointError(ConfigError):
    """A checkpoint is unusable; every problem names the file and the tensor."""


class TensorInfo(NamedTuple):
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    key: str  # the name as stored in the file (maybe with the `model.` prefix)


# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                "BOOL": 1}
LOADABLE_DTYPES = ("F32", "F16", "BF16")
# the format's own bound on the header, so a corrupt length cannot make us read gigabytes
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PREFIX = "model."
# RoPE's inverse frequencies, a buffer some exporters save (globally or per layer)
_INV_FREQ = re.compile(r"(?:layers\.(\d+)\.self_attn\.)?rotary_emb\.inv_freq")
# the target's embedding and output head, which a drafter may ship copies of
TARGET_COPIES = ("embed_tokens.weight", "lm_head.weight")


def _header_entry(path: Path, name: str, info, data_bytes: int) -> tuple[str, tuple[int, ...]]:
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
        raise CheckpointError(f"{path}: header entry `{name}` is not a tensor description: {info!r}")
    dtype, shape, offsets = info.get("dtype"), info["shape"], info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor `{name}`: unknown dtype {dtype!r}")
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor `{name}`: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{path}: tensor `{name}`: bad data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor `{name}`: data_offsets {offsets} do not hold "
                              f"{nbytes} bytes of {dtype} {shape}")
    if end > data_bytes:
        raise CheckpointError(f"{path}: tensor `{name}` ends at byte {end} of the data but the file "
                              f"holds {data_bytes}: truncated (incomplete download?)")
    return dtype, tuple(shape)


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header; reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file "
                                  "(truncated, or not safetensors)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file "
                                  "(truncated, or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: the header is not JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object (not a safetensors file)")
    data_bytes = size - 8 - n
    return {name: _header_entry(path, name, info, data_bytes)
            for name, info in header.items() if name != "__metadata__"}


def expected_drafter_tensors(cfg: DrafterConfig, target_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DFlash drafter checkpoint and its shape (names without `model.`)."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    out = {
        # features of num_target_layers target layers, concatenated, projected to H
        "fc.weight": (H, cfg.num_target_layers * target_hidden),
        "hidden_norm.weight": (H,),
        "norm.weight": (H,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
        if cfg.attention_bias:
            # Qwen3 puts the bias on all four projections (o_proj too, unlike Qwen2)
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (H,)})
    return out


def _pickle_error(where: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(f"{where}: pickle checkpoint(s) {names} are refused (unpickling can run "
                           "arbitrary code); convert them to safetensors first")


def _shards(index: Path) -> dict[str, Path]:
    """``{stored tensor name: shard file}`` from a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field `weight_map`: expected a non-empty object "
                              "{tensor name: shard file}")
    shards = {}
    for name, file in weight_map.items():
        # shard names are plain file names beside the index, never paths out of the directory
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise CheckpointError(f"{index}: field `weight_map.{name}`: expected a .safetensors "
                                  f"file name beside the index, got {file!r}")
        shards[name] = index.parent / file
    return shards


def weight_files(dir_or_file: str | Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors file(s) of a checkpoint, and the index's tensor->file map if sharded."""
    p = Path(dir_or_file)
    if p.is_file():
        if p.suffix in _PICKLE_SUFFIXES:
            raise _pickle_error(p.parent, [p.name])
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: expected a .safetensors file or a checkpoint directory")
        return [p], None
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"], None
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = _shards(index)
        return sorted(set(shards.values())), shards
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(p, pickles)
    raise CheckpointError(f"{p}: no model.safetensors or model.safetensors.index.json")


def read_drafter_header(dir_or_file: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint by name (one `model.` prefix stripped); reads no data."""
    files, shards = weight_files(dir_or_file)
    tensors: dict[str, TensorInfo] = {}
    problems = []
    for file in files:
        for key, (dtype, shape) in read_safetensors_header(file).items():
            if shards is not None and shards.get(key) != file:
                problems.append(f"{file}: tensor `{key}` is not mapped to this shard by the index")
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            if name in tensors:
                problems.append(f"{file}: tensor `{key}` duplicates `{tensors[name].key}` "
                                f"of {tensors[name].file}")
            tensors[name] = TensorInfo(dtype, shape, file, key)
    if shards is not None:
        stored = {info.key for info in tensors.values()}
        absent = sorted(set(shards) - stored)
        if absent:
            problems.append(f"{files[0].parent}: the index lists tensor(s) no shard holds: {absent}")
    if problems:
        raise CheckpointError(problems)
    return tensors


def ignored_tensors(tensors: dict[str, TensorInfo], cfg: DrafterConfig) -> list[str]:
    """The names (prefix stripped) of the tensors that carry no drafter weight: RoPE
    buffers of existing layers and copies of the target's embedding / lm_head."""
    def ignored(name: str) -> bool:
        m = _INV_FREQ.fullmatch(name)
        if m:
            return m.group(1) is None or int(m.group(1)) < cfg.num_hidden_layers
        return name in TARGET_COPIES
    return sorted(filter(ignored, tensors))


def _copy_problems(tensors: dict[str, TensorInfo], target_hidden: int,
                   target_vocab: int | None) -> list[str]:
    """A shipped embed_tokens / lm_head must have the target's shape [vocab, hidden]: a
    copy of another shape is from another model (the rows are unchecked without a vocab)."""
    problems = []
    for name in TARGET_COPIES:
        info = tensors.get(name)
        if info is None:
            continue
        rows_ok = target_vocab is None or (len(info.shape) == 2 and info.shape[0] == target_vocab)
        if not rows_ok or len(info.shape) != 2 or info.shape[1] != target_hidden:
            want = f"[{target_vocab if target_vocab is not None else 'vocab'}, {target_hidden}]"
            problems.append(f"{info.file}: tensor `{info.key}` has shape {list(info.shape)}, but a "
                            f"copy of the target's {name.split('.')[0]} must be {want} "
                            f"(the target's vocab x hidden)")
    return problems


def tensor_problems(tensors: dict[str, TensorInfo], cfg: DrafterConfig, target_hidden: int,
                    source: str, target_vocab: int | None = None) -> list[str]:
    """Every missing, unexpected, mis-shaped or non-float tensor, each named with its shape.
    ``target_vocab`` (else the drafter's own ``vocab_size``) checks shipped target copies."""
    expected = expected_drafter_tensors(cfg, target_hidden)
    ignored = ignored_tensors(tensors, cfg)
    vocab = target_vocab if target_vocab is not None else cfg.vocab_size
    problems = _copy_problems(tensors, target_hidden, vocab)
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"{source}: missing tensor `{name}` {list(expected[name])}")
    for name in sorted(set(tensors) - set(expected) - set(ignored)):
        info = tensors[name]
        problems.append(f"{info.file}: unexpected tensor `{info.key}` {list(info.shape)}")
    for name in sorted(set(tensors) & set(expected)):
        info = tensors[name]
        if info.shape != expected[name]:
            problems.append(f"{info.file}: tensor `{info.key}` has shape {list(info.shape)}, "
                            f"the config implies {list(expected[name])}")
        if info.dtype not in LOADABLE_DTYPES:
            problems.append(f"{info.file}: tensor `{info.key}` is {info.dtype}; only "
                            f"{'/'.join(LOADABLE_DTYPES)} weights are supported")
    return problems


def describe_ignored(tensors: dict[str, TensorInfo], names: list[str]) -> str:
    """One line naming the ignored tensors, e.g. `model.lm_head.weight [264, 64], ...`."""
    return ", ".join(f"`{tensors[n].key}` {list(tensors[n].shape)}" for n in names)


def load_drafter_state_dict(dir_or_file: str | Path, cfg: DrafterConfig, target_hidden: int,
                            dtype: torch.dtype | None = None,
                            target_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """The drafter's tensors by DESIGN name, checked strictly against ``cfg`` before loading;
    the ignored ones (``ignored_tensors``) are checked, logged, and never read."""
    tensors = read_drafter_header(dir_or_file)
    problems = tensor_problems(tensors, cfg, target_hidden, str(dir_or_file), target_vocab)
    if problems:
        raise CheckpointError(problems)
    ignored = ignored_tensors(tensors, cfg)
    if ignored:
        logger.info("%s: ignoring %d tensor(s) that are no drafter weights (RoPE buffers, copies "
                    "of the target's embedding / lm_head): %s", dir_or_file, len(ignored),
                    describe_ignored(tensors, ignored))
    tensors = {name: info for name, info in tensors.items() if name not in ignored}
    out = {}
    for file in sorted({info.file for info in tensors.values()}):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, info in tensors.items():
                if info.file == file:
                    t = f.get_tensor(info.key)
                    out[name] = t if dtype is None else t.to(dtype)
    return out


# what a drafter download fetches: configs and weights; never remote code or pickles
DRAFTER_DOWNLOAD_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json")


def resolve_drafter_dir(path: str, revision: str | None = None) -> str:
    """A local directory for ``path``: itself if it is one, else a Hugging Face Hub
    snapshot of repository ``path`` holding only ``DRAFTER_DOWNLOAD_PATTERNS``."""
    if Path(path).is_dir():
        return path
    if Path(path).exists() or path.count("/") != 1:
        raise ConfigError(f"{path}: expected a drafter directory (config.json + safetensors) "
                          "or a Hugging Face Hub repository id such as `org/name`")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=path, revision=revision,
                             allow_patterns=list(DRAFTER_DOWNLOAD_PATTERNS))
