"""The tiny bundled pair: a Kimi-Linear-shaped target and a DFlash drafter trained for it.

Both live under ``sglang_dflash/assets`` as ``config.json`` + ``model.safetensors`` and are
made by ``python -m sglang_dflash.dev.train``. Their vocabulary is bytes:
ids 0..255 are the bytes of UTF-8 text, then BOS 256, EOS 257, and PAD 263, which is also
the drafter's mask id (as Kimi-Linear's ``[PAD]`` is for the published drafter).
"""

from __future__ import annotations

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


def load_tiny_pair(target_dir=TARGET_DIR, drafter_dir=DRAFTER_DIR):
    """(target, drafter) of the bundled pair, fp32, eval mode."""
    from ..drafter import load_drafter
    from .kimi_linear import KimiLinearForCausalLM

    target = KimiLinearForCausalLM.from_pretrained(target_dir).eval()
    drafter = load_drafter(drafter_dir, target.config.hidden_size)
    return target, drafter
