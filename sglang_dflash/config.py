"""Drafter configuration, parsed once at the boundary into a frozen dataclass.

Everything downstream receives the dataclass, never raw JSON or SGLang's server args.
A parse collects every problem of a file into one ``ConfigError`` naming file and field
(the reader here serves ``target_config`` too; ``pair`` checks a drafter against a target).
DFlash fields sit at the top level or under ``dflash_config`` (agreeing if both);
``num_target_layers`` is the *target's* layer count. Variants that share the architecture
name but switch behaviour with extra keys are refused by name, never served with wrong
numerics; unknown top-level keys are ignored, unknown ``dflash_config`` keys refused.
Fields that transformers' Qwen3 would default (``QWEN3_DEFAULTS``, and ``head_dim``) are
filled when absent, each with a note naming the field and the value used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("sglang_dflash")


class ConfigError(ValueError):
    """A config file is unusable; every problem names the file and the field."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        many = [f"{len(self.problems)} problems:"] + [f"  - {p}" for p in self.problems]
        super().__init__(self.problems[0] if len(self.problems) == 1 else "\n".join(many))


@dataclass(frozen=True)
class DrafterConfig:
    """A DFlash drafter (Qwen3-style layers, no embedding, no lm_head)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # rope_scaling as a sorted tuple of (key, value) pairs, or None: kept hashable
    rope_scaling: tuple | None
    max_position_embeddings: int
    attention_bias: bool
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    # the drafter's own idea of the vocabulary (None when the config does not say)
    vocab_size: int | None = None
    # config.json's `num_target_layers`: the layer count of the target the drafter was
    # trained for (None when the config does not say); not the number of feature layers
    target_num_layers: int | None = None

    @property
    def num_target_layers(self) -> int:
        """Number of feature layers (the fc input is this many target hidden states)."""
        return len(self.target_layer_ids)


DRAFTER_ARCHITECTURE = "DFlashDraftModel"
# DFlash keys that may sit at the top level or under dflash_config
_DFLASH_KEYS = ("block_size", "mask_token_id", "target_layer_ids", "num_target_layers", "mask_token")
# variant switches: keys -> (values meaning the plain drafter, what any other value turns on)
_VARIANT_GROUPS = {
    ("causal_head",): ((False, None), "a causal draft head"),
    ("causal", "is_causal"): ((False, None), "causal draft attention"),
    ("input_embedding_scale",): ((1.0, None), "scaled input embeddings"),
    ("output_multiplier",): ((1.0, None), "scaled draft logits"),
    ("final_logit_softcapping",): ((0.0, None), "draft logit soft-capping"),
    ("conv_kernel_size", "conv_group_size"): ((0, None), "grouped dynamic convolutions (DFlash2)"),
    ("selector_rank", "selector_top_k"): ((0, None), "a candidate selector (DFlash2)"),
    ("attention_sink_bias",): ((False, None), "attention sink biases"),
    ("attention_value_scale",): ((None,), "scaled attention values"),
    ("projector_type",): ((None,), "a non-linear feature projector"),
    ("sample_from_anchor",): ((True, None), "a non-anchor query layout"),
    ("swa_window_size",): ((None,), "sliding-window draft attention"),
    ("has_embed_tokens", "has_lm_head"): ((False, None), "the drafter's own embedding or lm_head"),
    ("quantization_config",): ((None,), "quantized weights"),
}
_VARIANTS = {key: rule for keys, rule in _VARIANT_GROUPS.items() for key in keys}
# transformers' Qwen3Config default: with sliding on, layers at index >= this slide
_QWEN3_MAX_WINDOW_LAYERS = 28
# transformers' Qwen3Config defaults (rope_theta as its `default_theta`) for fields a
# drafter config may omit; head_dim has no constant default here (see `_head_dim`)
QWEN3_DEFAULTS = {"rope_theta": 10000.0, "max_position_embeddings": 32768}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_int_list(v) -> bool:
    return isinstance(v, list) and all(map(_is_int, v))


def as_list(v) -> list:
    return v if isinstance(v, list) else [v]


class FieldReader:
    """Typed access to one JSON object that records every problem instead of stopping."""

    def __init__(self, d: dict, source: str, names: dict[str, str] | None = None):
        self.d, self.source = d, source
        self.names = names or {}  # key -> its place in the file, e.g. "dflash_config.x"
        self.problems: list[str] = []
        self.missing: list[str] = []
        self.notes: list[str] = []  # defaults filled in, for one log line

    def name(self, key: str) -> str:
        return self.names.get(key, key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: field `{self.name(key)}`: {message}")

    def present(self, key: str) -> bool:
        return self.d.get(key) is not None

    def get(self, key: str, ok, expected: str, required: bool = True):
        """The value of ``key`` if ``ok(value)``; else None, with the reason recorded."""
        if not self.present(key):
            if required:
                self.missing.append(self.name(key))
            return None
        if ok(self.d[key]):
            return self.d[key]
        self.problem(key, f"expected {expected}, got {self.d[key]!r}")
        return None

    def int(self, key: str, minimum: int = 0, required: bool = True) -> int | None:
        return self.get(key, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}", required)

    def float(self, key: str) -> float | None:
        v = self.get(key, lambda v: (_is_int(v) or isinstance(v, float)) and v > 0, "a positive number")
        return None if v is None else float(v)

    def default(self, key: str, value, why: str = "the Qwen3 default"):
        """``value`` for an absent ``key``, with a note saying so."""
        self.notes.append(f"{self.source}: field `{self.name(key)}` absent; using {value!r} ({why})")
        return value

    def int_list(self, key: str) -> list[int] | None:
        return self.get(key, is_int_list, "a list of integers")

    def absorb(self, other: FieldReader) -> None:
        self.problems += other.problems
        self.missing += other.missing
        self.notes += other.notes

    def all_problems(self) -> list[str]:
        missing = [f"{self.source}: missing required field(s): {', '.join(self.missing)}"]
        return (missing if self.missing else []) + self.problems


def config_file(path_or_dir: str | Path) -> Path:
    """A model directory's config.json (a file path is taken as the config itself)."""
    p = Path(path_or_dir)
    return p / "config.json" if p.is_dir() else p


def read_config_json(path_or_dir: str | Path, what: str) -> tuple[dict, str]:
    """(the JSON object, its path as the source named in errors); ``what`` names the model."""
    f = config_file(path_or_dir)
    if not f.is_file():
        raise ConfigError(f"{f}: no such file (expected a {what} directory holding config.json, "
                          "or the path of that config.json)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not a valid UTF-8 JSON file: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object at the top level, got {type(d).__name__}")
    return d, str(f)


def check_architecture(r: FieldReader, expected: str) -> None:
    if r.d.get("architectures") != [expected]:
        r.problem("architectures", f"expected [\"{expected}\"], got {r.d.get('architectures')!r}")


def _merge_dflash(r: FieldReader) -> None:
    """Lay dflash_config over the top level (in place), remembering where each key came from."""
    nested = r.d.get("dflash_config") or {}
    if not isinstance(nested, dict):
        r.problem("dflash_config", f"expected an object, got {nested!r}")
        return
    unknown = sorted(k for k in nested if k not in _DFLASH_KEYS and k not in _VARIANTS)
    if unknown:
        r.problem("dflash_config", f"unknown key(s) {', '.join(unknown)} "
                                   "(a DFlash variant this plugin does not implement?)")
    for key, value in nested.items():
        if key in r.d and r.d[key] != value:
            r.problem(key, f"{r.d[key]!r} at the top level but {value!r} in "
                           f"dflash_config.{key}; they must agree")
        r.d[key] = value
        r.names[key] = f"dflash_config.{key}"


def _refuse_variants(r: FieldReader) -> None:
    for key, (plain, feature) in _VARIANTS.items():
        if key in r.d and r.d[key] not in plain:
            r.problem(key, f"{r.d[key]!r} turns on {feature}, which is not implemented "
                           f"(the plain DFlash drafter has {plain[0]!r})")
    if r.d.get("hidden_act", "silu") != "silu":
        r.problem("hidden_act", f"only \"silu\" is implemented, got {r.d['hidden_act']!r}")


def _refuse_sliding(r: FieldReader, num_layers: int | None) -> None:
    layer_types = r.d.get("layer_types")
    if layer_types is None:
        # transformers derives layer_types then: layers >= max_window_layers slide
        max_full = r.d.get("max_window_layers", _QWEN3_MAX_WINDOW_LAYERS)
        sliding = r.d.get("use_sliding_window") and r.present("sliding_window")
        if sliding and (num_layers or 0) > max_full:
            r.problem("use_sliding_window", "sliding-window draft layers are not implemented")
        return
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        r.problem("layer_types", f"expected a list of strings, got {layer_types!r}")
        return
    if num_layers is not None and len(layer_types) != num_layers:
        r.problem("layer_types", f"has {len(layer_types)} entries for {num_layers} layers")
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        r.problem("layer_types", f"{others} not implemented: every draft layer must be "
                                 "\"full_attention\" (non-causal, no sliding window)")


def _freeze(value):
    """JSON value -> hashable: objects become sorted (key, value) tuples, lists tuples."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _rope(r: FieldReader) -> tuple[float | None, tuple | None]:
    """(rope_theta, rope_scaling) from transformers-5 `rope_parameters` or the older pair."""
    params, theta_reader = r.d.get("rope_parameters"), r
    if params is not None:
        if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
            # rope per attention kind: draft layers are all full attention
            params = params["full_attention"]
        if not isinstance(params, dict):
            r.problem("rope_parameters", f"expected an object, got {params!r}")
            return None, None
        if r.present("rope_theta") and r.d["rope_theta"] != params.get("rope_theta"):
            r.problem("rope_theta", f"{r.d['rope_theta']!r} disagrees with "
                                    f"rope_parameters.rope_theta {params.get('rope_theta')!r}")
        theta_reader = FieldReader(params, r.source, {"rope_theta": "rope_parameters.rope_theta"})
        extra = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        extra = r.d.get("rope_scaling") or {}
        if not isinstance(extra, dict):
            r.problem("rope_scaling", f"expected an object or null, got {extra!r}")
            return None, None
    if theta_reader.present("rope_theta"):
        theta = theta_reader.float("rope_theta")
    else:
        theta = theta_reader.default("rope_theta", QWEN3_DEFAULTS["rope_theta"])
    if theta_reader is not r:
        r.absorb(theta_reader)
    plain = extra.get("rope_type", extra.get("type", "default")) == "default" \
        and set(extra) <= {"rope_type", "type"}
    return theta, None if plain else _freeze(extra)


def _layer_id_problems(ids: tuple[int, ...], target_layers: int | None, where: str) -> list[str]:
    problems = [] if ids else [f"{where}: must name at least one target layer"]
    negative = [i for i in ids if i < 0]
    if negative:
        problems.append(f"{where}: negative layer id(s) {negative}")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.append(f"{where}: duplicate layer id(s) {duplicates}")
    if any(a > b for a, b in zip(ids, ids[1:])):
        # fc reads the features concatenated in layer order (every target captures them
        # so), so [7, 3] would feed layer 3's features into the weights trained for 7's
        problems.append(f"{where}: {list(ids)} must be strictly increasing (fc takes the "
                        "features concatenated in layer order)")
    if target_layers is not None and any(i >= target_layers for i in ids):
        problems.append(f"{where}: id(s) {[i for i in ids if i >= target_layers]} not below "
                        f"`num_target_layers` {target_layers} (the target's layer count)")
    return problems


def _mask_id_problems(mask_id: int | None, vocab: int | None, where: str) -> list[str]:
    if mask_id is None or vocab is None or mask_id < vocab:
        return []
    return [f"{where}: {mask_id} outside the drafter's own vocabulary (field `vocab_size` "
            f"{vocab}, ids 0..{vocab - 1})"]


def _head_dim(r: FieldReader, hidden: int | None, heads: int | None) -> int | None:
    """head_dim, or hidden_size / num_attention_heads when absent: what SGLang's DFlash
    model and the Qwen3 attention fall back to without the field. (transformers'
    Qwen3Config itself says 128; either way the checkpoint's q_norm/k_norm shapes must
    then match, so a wrong default is refused at the weights, never served.)"""
    if r.present("head_dim"):
        return r.int("head_dim", minimum=1)
    if hidden is None or heads is None:
        # absent, and nothing to derive it from
        r.missing.append(r.name("head_dim"))
        return None
    if hidden % heads:
        r.problem("head_dim", f"absent, and hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads}, so there is no default")
        return None
    return r.default("head_dim", hidden // heads, f"hidden_size {hidden} / num_attention_heads {heads}")


def _max_positions(r: FieldReader) -> int | None:
    if r.present("max_position_embeddings"):
        return r.int("max_position_embeddings", minimum=1)
    return r.default("max_position_embeddings", QWEN3_DEFAULTS["max_position_embeddings"])


def parse_drafter(d: dict, source: str) -> tuple[DrafterConfig | None, list[str], list[str]]:
    """(config, every problem of the file, notes on defaults filled in): the config is None
    only when fields are missing or mistyped, so a checker can still compare a flawed
    drafter with its target."""
    r = FieldReader(dict(d), source)
    _merge_dflash(r)
    check_architecture(r, DRAFTER_ARCHITECTURE)
    _refuse_variants(r)
    layers = r.int("num_hidden_layers", minimum=1)
    _refuse_sliding(r, layers)
    heads = r.int("num_attention_heads", minimum=1)
    kv_heads = r.int("num_key_value_heads", minimum=1, required=False) or heads
    if heads and kv_heads and heads % kv_heads:
        r.problem("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    theta, scaling = _rope(r)
    ids = r.int_list("target_layer_ids")
    target_layers = r.int("num_target_layers", minimum=1, required=False)
    if ids is not None:
        where = f"{source}: field `{r.name('target_layer_ids')}`"
        r.problems += _layer_id_problems(tuple(ids), target_layers, where)
    bias = r.get("attention_bias", lambda v: isinstance(v, bool), "true or false", required=False)
    if r.present("mask_token") and not r.present("mask_token_id"):
        r.problem("mask_token", "a mask token given as text only; set mask_token_id to its id")
    hidden = r.int("hidden_size", minimum=1)
    mask_id, vocab = r.int("mask_token_id"), r.int("vocab_size", minimum=1, required=False)
    r.problems += _mask_id_problems(mask_id, vocab, f"{source}: field `{r.name('mask_token_id')}`")
    cfg = dict(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=_head_dim(r, hidden, heads), intermediate_size=r.int("intermediate_size", minimum=1),
        rms_norm_eps=r.float("rms_norm_eps"), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=_max_positions(r),
        attention_bias=bool(bias), block_size=r.int("block_size", minimum=2),
        mask_token_id=mask_id, target_layer_ids=None if ids is None else tuple(ids),
        vocab_size=vocab, target_num_layers=target_layers,
    )
    optional = ("vocab_size", "target_num_layers", "rope_scaling")
    complete = all(v is not None for k, v in cfg.items() if k not in optional)
    return (DrafterConfig(**cfg) if complete else None), r.all_problems(), r.notes


def drafter_config_from_dict(d: dict, source: str) -> DrafterConfig:
    """Parse a drafter config.json object; ``source`` names the file in every error."""
    drafter, problems, notes = parse_drafter(d, source)
    if problems:
        raise ConfigError(problems)
    if notes:
        logger.info("DFlash drafter config: %s", "; ".join(notes))
    return drafter


def drafter_problems(drafter: DrafterConfig, source: str) -> list[str]:
    """Problems a drafter config has on its own (no target needed); for configs built in code."""
    problems = _layer_id_problems(drafter.target_layer_ids, drafter.target_num_layers,
                                  f"{source}: field `target_layer_ids`")
    if drafter.block_size < 2:
        problems.append(f"{source}: field `block_size`: expected >= 2, got {drafter.block_size}")
    if drafter.num_attention_heads % drafter.num_key_value_heads:
        problems.append(f"{source}: field `num_key_value_heads`: {drafter.num_key_value_heads} does "
                        f"not divide num_attention_heads {drafter.num_attention_heads}")
    return problems + _mask_id_problems(drafter.mask_token_id, drafter.vocab_size,
                                        f"{source}: field `mask_token_id`")


def load_drafter_config(path_or_dir: str | Path) -> DrafterConfig:
    """The drafter config of a checkpoint directory (or of one config.json file)."""
    d, source = read_config_json(path_or_dir, "drafter")
    return drafter_config_from_dict(d, source)
