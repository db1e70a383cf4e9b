"""The tiny Qwen3 pair: a stock transformers ``Qwen3ForCausalLM`` target and its DFlash drafter.

A standard architecture that SGLang serves on CPU without this project's Kimi-Linear code,
trained like the Kimi-shaped pair (``python -m sglang_dflash.dev.train --target qwen3``)
on the same byte corpus and vocabulary as ``tiny_pair``. The target directory is a complete
transformers checkpoint: config, safetensors, generation config and a byte-level tokenizer.

The tokenizer is the byte tokenizer of ``tiny_pair.write_tokenizer``, shared with the
Kimi-shaped target.
"""

from __future__ import annotations

from pathlib import Path

from .tiny_pair import ASSETS, BOS, EOS, PAD, VOCAB_SIZE, write_tokenizer

TARGET_DIR = ASSETS / "tiny-qwen3"
DRAFTER_DIR = ASSETS / "tiny-qwen3-dflash"

# SGLang's Qwen3 captures a layer's output "before layer i + 1", so it never captures the
# last layer: the features come from the first three of four.
TARGET_LAYER_IDS = (0, 1, 2)
# below the target's 2048 on purpose: the end-to-end tests draft past the drafter's limit
DRAFTER_MAX_POSITIONS = 512

# intermediate 128, not 256: keeps the pair under 3 MB, and 256 trained no better (corpus
# loss 0.52 vs 0.49 with the default steps). No pad_token_id: transformers would make it
# the embedding's padding_idx, pinning the drafter's mask embedding (PAD 263) at zero.
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "dtype": "float32",
}

def new_target():
    """A freshly initialised target (draws from torch's global RNG)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**CONFIG))


def save_target(model, out: Path) -> None:
    """The whole target directory: weights and configs via save_pretrained, the tokenizer."""
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, CONFIG["max_position_embeddings"])


def load_tiny_qwen3_pair(target_dir=TARGET_DIR, drafter_dir=DRAFTER_DIR):
    """(HFTarget, drafter) of the bundled Qwen3 pair, fp32, eval mode."""
    from .hf_target import HFTarget
    from ..drafter import load_drafter

    target = HFTarget.from_pretrained(target_dir, trust_remote_code=False)
    drafter = load_drafter(drafter_dir, target.hidden_size)
    return target, drafter
