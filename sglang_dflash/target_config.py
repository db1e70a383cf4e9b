"""Target model configuration: the facts about a target that DFlash depends on.

Kimi-Linear targets: 1-based ``kda_layers`` are KDA, ``full_attn_layers`` MLA; every layer
must be in exactly one list (HF and SGLang silently call unlisted layers MLA), and without
``linear_attn_config`` all layers are MLA. Standard targets (Llama, Qwen, Mistral) are
softmax attention throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, FieldReader, as_list, check_architecture, is_int_list, read_config_json


@dataclass(frozen=True)
class TargetConfig:
    """The facts about a target model that DFlash depends on."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    # per 0-based layer: "kda" (linear attention), "mla", or "attention"
    layer_kinds: tuple[str, ...]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None


KIMI_LINEAR = ("kimi_linear", "KimiLinearForCausalLM")
# model_type -> architecture; every layer of these is plain softmax attention
STANDARD_TARGETS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def _one_based_layers(r: FieldReader, key: str, n: int) -> set[int] | None:
    ids = r.int_list(key)
    if ids is None:
        return None
    bad = [i for i in ids if not 1 <= i <= n]
    if bad:
        r.problem(key, f"layer number(s) {bad} outside 1..{n} (these lists are 1-based)")
    if len(set(ids)) != len(ids):
        r.problem(key, f"duplicate layer number(s) {sorted({i for i in ids if ids.count(i) > 1})}")
    return set(ids)


def _kimi_layer_kinds(r: FieldReader, n: int | None) -> tuple[str, ...] | None:
    lac = r.d.get("linear_attn_config")
    if n is None:
        return None
    if lac is None:
        return ("mla",) * n
    if not isinstance(lac, dict):
        r.problem("linear_attn_config", f"expected an object or null, got {lac!r}")
        return None
    names = {k: f"linear_attn_config.{k}" for k in ("kda_layers", "full_attn_layers")}
    sub = FieldReader(lac, r.source, names)
    kda, full = _one_based_layers(sub, "kda_layers", n), _one_based_layers(sub, "full_attn_layers", n)
    kinds = None
    if kda is not None and full is not None:
        if kda & full:
            sub.problem("full_attn_layers", f"layer(s) {sorted(kda & full)} also listed in kda_layers")
        neither = sorted(set(range(1, n + 1)) - kda - full)
        if neither:
            sub.problem("full_attn_layers", f"layer(s) {neither} in neither list")
        kinds = tuple("kda" if i + 1 in kda else "mla" for i in range(n))
    r.absorb(sub)
    return kinds


def _eos_ids(r: FieldReader) -> tuple[int, ...] | None:
    v = r.get("eos_token_id", lambda v: as_list(v) != [] and is_int_list(as_list(v)),
              "a token id or a non-empty list of them")
    return None if v is None else tuple(as_list(v))


def target_config_from_dict(d: dict, source: str) -> TargetConfig:
    """Parse a target config.json object; ``source`` names the file in every error."""
    model_type = d.get("model_type")
    architecture = KIMI_LINEAR[1] if model_type == KIMI_LINEAR[0] else STANDARD_TARGETS.get(model_type)
    if architecture is None:
        supported = ", ".join([KIMI_LINEAR[0], *STANDARD_TARGETS])
        raise ConfigError(f"{source}: field `model_type`: unsupported target {model_type!r} "
                          f"(supported: {supported})")
    r = FieldReader(d, source)
    check_architecture(r, architecture)
    n = r.int("num_hidden_layers", minimum=1)
    if model_type == KIMI_LINEAR[0]:
        kinds = _kimi_layer_kinds(r, n)
    else:
        kinds = None if n is None else ("attention",) * n
    cfg = dict(
        architecture=architecture, hidden_size=r.int("hidden_size", minimum=1), num_hidden_layers=n,
        vocab_size=r.int("vocab_size", minimum=1), layer_kinds=kinds, eos_token_ids=_eos_ids(r),
        pad_token_id=r.int("pad_token_id", required=False),
    )
    if r.all_problems():
        raise ConfigError(r.all_problems())
    return TargetConfig(**cfg)


def load_target_config(path_or_dir: str | Path) -> TargetConfig:
    """The target config of a model directory (or of one config.json file)."""
    d, source = read_config_json(path_or_dir, "target")
    return target_config_from_dict(d, source)
