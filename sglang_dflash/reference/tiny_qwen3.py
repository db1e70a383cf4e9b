"""The tiny Qwen3 pair: a stock transformers ``Qwen3ForCausalLM`` target and its DFlash drafter.

A standard architecture that SGLang serves on CPU without this project's Kimi-Linear code,
trained like the Kimi-shaped pair (``python -m sglang_dflash.dev.train --target qwen3``)
on the same byte corpus and vocabulary as ``tiny_pair``. The target directory is a complete
transformers checkpoint: config, safetensors, generation config and a byte-level tokenizer.

The tokenizer adds BOS to plain text itself (a ``TemplateProcessing`` post-processor, so
``tokenizer("the cat")`` starts with 256 as ``tiny_pair.encode`` does), and its chat
template writes the BOS too, because chat templates are tokenized without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tiny_pair import ASSETS, BOS, EOS, PAD, VOCAB_SIZE

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

# ids 258..262 exist only so that <pad> lands on 263 and every id decodes
SPECIAL_TOKENS = ["<bos>", "<eos>"] + [f"<unused{i}>" for i in range(5)] + ["<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def byte_symbols() -> list[str]:
    """The printable stand-in character of each byte 0..255 (the byte-level BPE alphabet).

    Printable Latin-1 bytes stand for themselves; the others map, in byte order, to
    code points from 256 up, so every byte has a visible, whitespace-free symbol.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_tokenizer(out: Path) -> None:
    """tokenizer.json + tokenizer_config.json: one token per byte, then the special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")] == [BOS, EOS, PAD]
    assert tok.get_vocab_size() == VOCAB_SIZE
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": CONFIG["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
    }, indent=1) + "\n")


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
    write_tokenizer(out)


def load_tiny_qwen3_pair(target_dir=TARGET_DIR, drafter_dir=DRAFTER_DIR):
    """(HFTarget, drafter) of the bundled Qwen3 pair, fp32, eval mode."""
    from .hf_target import HFTarget
    from ..drafter import load_drafter

    target = HFTarget.from_pretrained(target_dir, trust_remote_code=False)
    drafter = load_drafter(drafter_dir, target.hidden_size)
    return target, drafter
