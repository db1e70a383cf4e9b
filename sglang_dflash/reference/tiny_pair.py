"""The tiny bundled pair: a Kimi-Linear-shaped target and a DFlash drafter trained for it.

Both live under ``sglang_dflash/assets`` as ``config.json`` + ``model.safetensors`` and are
made by ``python -m sglang_dflash.dev.train``. Their vocabulary is bytes:
ids 0..255 are the bytes of UTF-8 text, then BOS 256, EOS 257, and PAD 263, which is also
the drafter's mask id (as Kimi-Linear's ``[PAD]`` is for the published drafter).

Both bundled targets carry the byte tokenizer of ``write_tokenizer``. It adds BOS to
plain text itself (a ``TemplateProcessing`` post-processor, so ``tokenizer("the cat")``
starts with 256 as ``encode`` does), and its chat template writes the BOS too, because
chat templates are tokenized without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TARGET_DIR = ASSETS / "tiny-kimi-linear"
DRAFTER_DIR = ASSETS / "tiny-dflash"

VOCAB_SIZE = 264
BOS, EOS, PAD = 256, 257, 263

DEMO_PROMPTS = (
    "count: 3 4 5 6",
    "12+7=19; 30+4=",
    "the cat sat on the",
    "a red fox runs to the",
    "count: 41 42",
    "8+8=16; 9+3=",
)


def encode(text: str) -> list[int]:
    return [BOS] + list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Bytes as text; special ids shown by name."""
    names = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}
    out, run = [], bytearray()
    for i in ids:
        if i < 256:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(names.get(i, f"<{i}>"))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


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


def write_tokenizer(out: Path, model_max_length: int) -> None:
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
        "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE,
    }, indent=1) + "\n")


def save_kimi_target(model, out: Path) -> None:
    """The Kimi-shaped target directory: config and weights, then the byte tokenizer."""
    model.save_pretrained(out)
    write_tokenizer(out, model.config.max_position_embeddings)


def load_tiny_pair(target_dir=TARGET_DIR, drafter_dir=DRAFTER_DIR):
    """(target, drafter) of the bundled pair, fp32, eval mode."""
    from ..drafter import load_drafter
    from .kimi_linear import KimiLinearForCausalLM

    target = KimiLinearForCausalLM.from_pretrained(target_dir).eval()
    drafter = load_drafter(drafter_dir, target.config.hidden_size)
    return target, drafter
