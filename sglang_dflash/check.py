"""`sglang-dflash check DRAFTER [--target TARGET]`: is this drafter servable (for this target)?

Reads only the config files and the safetensors header(s), never tensor data, so it runs
in a second on a laptop against a 48B target's directory (config.json is all it needs).
Every problem of every file is reported at once, so one run shows everything to fix.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from .checkpoint import DTYPE_BYTES, describe_ignored, ignored_tensors, read_drafter_header, tensor_problems
from .config import ConfigError, DrafterConfig, config_file, parse_drafter, read_config_json
from .pair import pair_problems
from .target_config import TargetConfig, load_target_config


def _features(drafter: DrafterConfig, target: TargetConfig | None) -> str:
    """Feature layers with their kind in the target, e.g. `3 (mla), 7 (mla)`."""
    if target is None:
        return ", ".join(map(str, drafter.target_layer_ids)) + " (kinds unknown without --target)"
    kinds = target.layer_kinds
    return ", ".join(f"{i} ({kinds[i] if 0 <= i < len(kinds) else 'no such layer'})"
                     for i in drafter.target_layer_ids)


def _summary(drafter: DrafterConfig, target: TargetConfig | None, tensors: dict) -> list[str]:
    d = drafter
    lines = [
        f"drafter: {d.num_hidden_layers} layers, hidden {d.hidden_size}, heads {d.num_attention_heads} q"
        f" / {d.num_key_value_heads} kv x {d.head_dim}, intermediate {d.intermediate_size}, "
        f"block {d.block_size}, mask id {d.mask_token_id}",
        f"features: target layers {_features(d, target)} -> fc {list(tensors['fc.weight'].shape)}",
        # what the draft context cache costs per token (bf16), beside the target's own KV
        f"draft K/V per token: {d.num_hidden_layers} layers x (K,V) x {d.num_key_value_heads} kv "
        f"heads x {d.head_dim} x 2 B = {d.num_hidden_layers * 2 * d.num_key_value_heads * d.head_dim * 2} "
        "B in bf16",
    ]
    if target is not None:
        counts = ", ".join(f"{n} {kind}" for kind, n in Counter(target.layer_kinds).items())
        lines.append(f"target: {target.architecture}, {target.num_hidden_layers} layers ({counts}), "
                     f"hidden {target.hidden_size}, vocab {target.vocab_size}")
    dtypes = ", ".join(sorted({info.dtype for info in tensors.values()}))
    n_bytes = sum(math.prod(info.shape) * DTYPE_BYTES[info.dtype] for info in tensors.values())
    files = len({info.file for info in tensors.values()})
    lines.append(f"weights: {len(tensors)} tensors, {dtypes}, {n_bytes / 2**20:.1f} MiB "
                 f"in {files} file(s)")
    return lines


def _load(loader, path: str | Path, problems: list[str]):
    try:
        return loader(path)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _drafter(drafter_dir: str | Path, problems: list[str],
             notes: list[str]) -> tuple[DrafterConfig | None, str]:
    try:
        d, source = read_config_json(drafter_dir, "drafter")
    except ConfigError as e:
        problems.extend(e.problems)
        return None, ""
    drafter, drafter_problems, drafter_notes = parse_drafter(d, source)
    problems.extend(drafter_problems)
    notes.extend(drafter_notes)
    return drafter, source


def _weights(drafter_dir: str | Path, drafter: DrafterConfig, target: TargetConfig | None,
             problems: list[str], notes: list[str]) -> dict | None:
    """The drafter's own tensors from the header, checked against the config (and the
    target, when known); the ignored ones are noted and left out."""
    tensors = _load(read_drafter_header, drafter_dir, problems)
    if tensors is None:
        return None
    hidden = target.hidden_size if target is not None else drafter.hidden_size
    vocab = target.vocab_size if target is not None else None
    problems += tensor_problems(tensors, drafter, hidden, str(drafter_dir), vocab)
    ignored = ignored_tensors(tensors, drafter)
    if ignored:
        notes.append(f"{drafter_dir}: ignored, not drafter weights: {describe_ignored(tensors, ignored)}")
    return {name: info for name, info in tensors.items() if name not in ignored}


def run_check(drafter_dir: str | Path, target_dir: str | Path | None) -> tuple[bool, str]:
    """(ok, report): every incompatibility at once, or OK with a summary of the pair;
    notes (defaults filled in, tensors ignored) follow either."""
    problems: list[str] = []
    notes: list[str] = []
    # a flawed drafter config is still compared with its weights and target when its
    # fields are all there, so one run lists everything to fix
    drafter, source = _drafter(drafter_dir, problems, notes)
    target = None if target_dir is None else _load(load_target_config, target_dir, problems)
    tensors = None if drafter is None else _weights(drafter_dir, drafter, target, problems, notes)
    if drafter is not None and target is not None:
        problems += pair_problems(drafter, target, source, str(config_file(target_dir)))
    notes = [f"  note: {n}" for n in notes]
    if problems:
        return False, "\n".join([f"FAIL: {len(problems)} problem(s)"]
                                + [f"  - {p}" for p in problems] + notes)
    head = f"OK: {drafter_dir}" + (f" fits {target_dir}" if target_dir is not None else "")
    return True, "\n".join([head] + [f"  {line}" for line in _summary(drafter, target, tensors)] + notes)


def add_check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("drafter", help="drafter checkpoint directory (config.json + safetensors)")
    parser.add_argument("--target", default=None,
                        help="target model directory (only its config.json is read)")


def main_check(args: argparse.Namespace) -> int:
    ok, report = run_check(args.drafter, args.target)
    print(report)
    return 0 if ok else 1
