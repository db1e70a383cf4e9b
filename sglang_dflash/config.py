"""Drafter and target configuration: parsed once at the boundary into frozen dataclasses.

Everything downstream receives these dataclasses, never raw JSON or SGLang's server args.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A config file is unusable; the message names the file and the field."""


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

    @property
    def num_target_layers(self) -> int:
        return len(self.target_layer_ids)


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
