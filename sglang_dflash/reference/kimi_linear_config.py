"""Config of the Kimi-Linear reference target: HF ``configuration_kimi.py`` field names.

``KimiLinearConfig.from_dict`` reads a published Kimi-Linear config.json (unknown fields
such as ``auto_map`` or ``torch_dtype`` are ignored) and refuses, by field name, any value
that would change the math the reference target implements. Layer lists in
``linear_attn_config`` are 1-based, as in the published config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError

ARCHITECTURE = "KimiLinearForCausalLM"
MODEL_TYPE = "kimi_linear"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return (_int(v) or isinstance(v, float)) and v > 0


# config.json field -> (check, what is expected, default; REQUIRED if it has none)
REQUIRED = object()
_FIELDS = {
    "vocab_size": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "hidden_size": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "intermediate_size": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "num_hidden_layers": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "num_attention_heads": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "rms_norm_eps": (_num, "a positive number", REQUIRED),
    "initializer_range": (_num, "a positive number", 0.02),
    "max_position_embeddings": (lambda v: _int(v) and v > 0, "a positive integer", 4096),
    "bos_token_id": (lambda v: _int(v) and v >= 0, "a token id", REQUIRED),
    "eos_token_id": (lambda v: (_int(v) and v >= 0) or (isinstance(v, list) and v and all(map(_int, v))),
                     "a token id or a non-empty list of token ids", REQUIRED),
    "pad_token_id": (lambda v: _int(v) and v >= 0, "a token id", REQUIRED),
    "num_experts": (lambda v: v is None or (_int(v) and v > 0), "null or a positive integer", None),
    "num_experts_per_token": (lambda v: v is None or (_int(v) and v > 0), "a positive integer", None),
    "num_shared_experts": (lambda v: _int(v) and v >= 0, "an integer >= 0", 0),
    "moe_intermediate_size": (lambda v: v is None or (_int(v) and v > 0), "a positive integer", None),
    "moe_renormalize": (lambda v: isinstance(v, bool), "true or false", True),
    "moe_router_activation_func": (lambda v: v in ("sigmoid", "softmax"), '"sigmoid" or "softmax"', "sigmoid"),
    "routed_scaling_factor": (_num, "a positive number", 1.0),
    "first_k_dense_replace": (lambda v: _int(v) and v >= 0, "an integer >= 0", 0),
    "moe_layer_freq": (lambda v: _int(v) and v > 0, "a positive integer", 1),
    "num_expert_group": (lambda v: _int(v) and v > 0, "a positive integer", 1),
    "topk_group": (lambda v: _int(v) and v > 0, "a positive integer", 1),
    "kv_lora_rank": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "qk_nope_head_dim": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
    "qk_rope_head_dim": (lambda v: _int(v) and v >= 0, "an integer >= 0", REQUIRED),
    "v_head_dim": (lambda v: _int(v) and v > 0, "a positive integer", REQUIRED),
}
_KDA_FIELDS = {
    "num_heads": (lambda v: _int(v) and v > 0, "a positive integer"),
    "head_dim": (lambda v: _int(v) and v > 0, "a positive integer"),
    "short_conv_kernel_size": (lambda v: _int(v) and v > 0, "a positive integer"),
    "kda_layers": (lambda v: isinstance(v, list) and all(map(_int, v)), "a list of 1-based layer numbers"),
    "full_attn_layers": (lambda v: isinstance(v, list) and all(map(_int, v)), "a list of 1-based layer numbers"),
}
# fields that would change the math this model implements: field -> values it supports
_FIXED = {"model_type": (MODEL_TYPE, None), "hidden_act": ("silu", None), "q_lora_rank": (None,),
          "mla_use_nope": (True,), "tie_word_embeddings": (False, None), "mla_use_output_gate": (False, None),
          "attn_res_block_size": (None,), "routed_expert_hidden_size": (None,),
          "latent_moe_use_norm": (False, None), "activation_situ_beta": (None,)}
_FIXED_KDA = {"gate_lower_bound": (None,), "use_full_rank_gate": (False, None)}


@dataclass(frozen=True)
class KimiLinearConfig:
    """The config.json of a Kimi-Linear checkpoint, parsed once (HF field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float
    initializer_range: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int | tuple[int, ...]
    pad_token_id: int
    num_experts: int | None
    num_experts_per_token: int | None
    num_shared_experts: int
    moe_intermediate_size: int | None
    moe_renormalize: bool
    moe_router_activation_func: str
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    num_expert_group: int
    topk_group: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # linear_attn_config
    num_heads: int
    head_dim: int
    short_conv_kernel_size: int
    kda_layers: tuple[int, ...]
    full_attn_layers: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> KimiLinearConfig:
        """Parse a config.json object; one ConfigError lists every bad field by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        problems, values = [], {}
        lac = d.get("linear_attn_config")
        if not isinstance(lac, dict):
            problems.append(f"{source}: field `linear_attn_config`: expected an object, got {lac!r}")
            lac = {}
        for where, obj, fields in (("", d, _FIELDS), ("linear_attn_config.", lac, _KDA_FIELDS)):
            for key, (ok, expected, *default) in fields.items():
                if key not in obj and default and default[0] is not REQUIRED:
                    values[key] = default[0]
                elif key not in obj:
                    problems.append(f"{source}: field `{where}{key}`: missing (expected {expected})")
                elif not ok(obj[key]):
                    problems.append(f"{source}: field `{where}{key}`: expected {expected}, got {obj[key]!r}")
                else:
                    values[key] = obj[key]
        for where, obj, fixed in (("", d, _FIXED), ("linear_attn_config.", lac, _FIXED_KDA)):
            for key, allowed in fixed.items():
                if obj.get(key) not in allowed:
                    problems.append(f"{source}: field `{where}{key}`: {obj.get(key)!r} is not supported "
                                    f"(this model implements {allowed[0]!r})")
        if problems:
            raise ConfigError("\n".join(problems))
        eos = values["eos_token_id"]
        values["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
        values["rms_norm_eps"], values["routed_scaling_factor"] = (
            float(values["rms_norm_eps"]), float(values["routed_scaling_factor"]))
        values["kda_layers"], values["full_attn_layers"] = (
            tuple(values["kda_layers"]), tuple(values["full_attn_layers"]))
        cfg = cls(**values)
        problems = cfg.problems(source)
        if problems:
            raise ConfigError("\n".join(problems))
        return cfg

    def problems(self, source: str) -> list[str]:
        """Cross-field consistency, one line per problem."""
        out, n = [], self.num_hidden_layers
        kda, full = set(self.kda_layers), set(self.full_attn_layers)
        if kda & full or kda | full != set(range(1, n + 1)) or len(kda) + len(full) != n:
            out.append(f"{source}: fields `linear_attn_config.kda_layers` {list(self.kda_layers)} and "
                       f"`linear_attn_config.full_attn_layers` {list(self.full_attn_layers)}: expected "
                       f"each of the 1-based layers 1..{n} in exactly one of them")
        for key in ("bos_token_id", "pad_token_id"):
            if getattr(self, key) >= self.vocab_size:
                out.append(f"{source}: field `{key}`: {getattr(self, key)} is outside vocab_size {self.vocab_size}")
        if any(e >= self.vocab_size for e in self.eos_token_ids):
            out.append(f"{source}: field `eos_token_id`: {self.eos_token_id} is outside vocab_size {self.vocab_size}")
        if self.num_experts is not None:
            for key in ("num_experts_per_token", "moe_intermediate_size"):
                if getattr(self, key) is None:
                    out.append(f"{source}: field `{key}`: missing (required with num_experts)")
            if (self.num_experts_per_token or 0) > self.num_experts:
                out.append(f"{source}: field `num_experts_per_token`: {self.num_experts_per_token} > "
                           f"num_experts {self.num_experts}")
            if self.num_experts % self.num_expert_group or self.topk_group > self.num_expert_group:
                out.append(f"{source}: fields `num_expert_group`/`topk_group`: expected num_experts "
                           f"{self.num_experts} divisible by num_expert_group {self.num_expert_group} "
                           f"and topk_group <= num_expert_group, got topk_group {self.topk_group}")
        return out

    def to_dict(self) -> dict:
        d = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_act": "silu",
             "tie_word_embeddings": False, "q_lora_rank": None, "mla_use_nope": True,
             "num_key_value_heads": self.num_attention_heads, "use_grouped_topk": True,
             "topk_method": "noaux_tc"}
        d.update({key: getattr(self, key) for key in _FIELDS})
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["linear_attn_config"] = {key: getattr(self, key) for key in _KDA_FIELDS}
        for key in ("kda_layers", "full_attn_layers"):
            d["linear_attn_config"][key] = list(getattr(self, key))
        return d

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """"kda" or "mla" per 0-based layer (the config's lists are 1-based)."""
        return tuple("kda" if i + 1 in self.kda_layers else "mla" for i in range(self.num_hidden_layers))

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


def tiny_config(vocab_size: int = 264) -> KimiLinearConfig:
    """8 layers (0-based MLA {3, 7}), dense layer 0, 8 experts top-2 + 1 shared, NoPE MLA
    without q LoRA, KDA 4 heads x 16 with a width-4 short conv, hidden 64."""
    cfg = KimiLinearConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, rms_norm_eps=1e-5, initializer_range=0.02, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=263,
        num_experts=8, num_experts_per_token=2, num_shared_experts=1, moe_intermediate_size=32,
        moe_renormalize=True, moe_router_activation_func="sigmoid", routed_scaling_factor=2.446,
        first_k_dense_replace=1, moe_layer_freq=1, num_expert_group=1, topk_group=1,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        num_heads=4, head_dim=16, short_conv_kernel_size=4,
        kda_layers=(1, 2, 3, 5, 6, 7), full_attn_layers=(4, 8),
    )
    problems = cfg.problems("tiny_config")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg
