r"""Make a tiny bundled pair: train a tiny target on a synthetic byte corpus, then train a
DFlash drafter on the target's own greedy continuations.

    python -m sglang_dflash.dev.train [--target {kimi,qwen3}] [--target-out DIR] ...
    python -m sglang_dflash.dev.train --drafter-only [--drafter-heads N ...] --drafter-out DIR

``kimi`` (the default) is the Kimi-Linear-shaped pair of ``tiny_pair``; ``qwen3`` is a
stock transformers Qwen3ForCausalLM (``tiny_qwen3``) that SGLang serves as it is. Both go
through the same optimisation loop and the same drafter objective; a ``TargetRecipe``
says how to build, run and save each.

The drafter objective is DFlash's: pick anchor positions s in a target-generated sequence,
feed the block [token s, MASK x (L-1)] with the target features of positions < s as
context, and predict token s + j at block position j (same-position prediction), with
cross-entropy through the target's frozen lm_head, weighted towards early positions.
Deterministic for a given seed on one machine; the kimi defaults took about 35 minutes on
two busy CPU cores (the target steps dominate), the qwen3 defaults about
12 minutes (one torch thread).

``--drafter-only`` trains just a drafter, of the shape the ``--drafter-*`` options give,
against the target already in ``--target-out`` (default: the bundled one), e.g. the
bundled MHA drafter with a head dim that is not a power of two (``tiny-dflash-mha``):

    python -m sglang_dflash.dev.train --drafter-only --drafter-heads 4 --drafter-kv-heads 4 \
        --drafter-head-dim 24 --drafter-out sglang_dflash/assets/tiny-dflash-mha

(the kimi drafter defaults, 2000 steps on 256 sequences: 8 minutes of wall time, 3 of
CPU, with one torch thread on two cores shared with other jobs). With the default shape
it writes the same bytes as the full run's drafter step for the same target and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..config import DrafterConfig
from ..drafter import DFlashDrafter
from ..reference import tiny_qwen3
from ..reference.hf_target import HFTarget
from ..reference.kimi_linear import KimiLinearForCausalLM, tiny_config
from ..reference.tiny_pair import DRAFTER_DIR, EOS, PAD, TARGET_DIR, VOCAB_SIZE, encode, save_kimi_target

SEQ_LEN = 80
PROMPT_LEN = 16
GEN_LEN = 48
BLOCK = 16
TARGET_LAYER_IDS = (1, 3, 5)
# documents no training batch draws (the stream is random.Random(seed), seed small)
EVAL_SEED = 1_000_003

_NOUNS = ["cat", "dog", "fox", "bird", "man", "girl", "boy", "tree", "car", "ship", "mat"]
_ADJS = ["red", "big", "small", "old", "new", "green", "fast"]
_VERBS = ["sat on", "runs to", "looked at", "jumped over", "walks to", "sees"]


def _item(rng: random.Random, kind: str) -> str:
    if kind == "count":
        start = rng.randrange(0, 90)
        return "count: " + " ".join(str(start + i) for i in range(rng.randrange(4, 12)))
    if kind == "add":
        pairs = [(rng.randrange(1, 40), rng.randrange(1, 40)) for _ in range(rng.randrange(2, 5))]
        return " ".join(f"{a}+{b}={a + b};" for a, b in pairs)
    article = rng.choice(["the", "a"])
    return (f"{article} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_NOUNS)}.")


def synthetic_document(rng: random.Random) -> list[int]:
    """BOS, items of one kind separated by newlines until ~SEQ_LEN bytes, then EOS."""
    kind = rng.choice(["count", "add", "sentence"])
    text = _item(rng, kind)
    while len(text) < SEQ_LEN - 30:
        text += "\n" + _item(rng, kind)
    return (encode(text) + [EOS])[:SEQ_LEN]


def _batch(docs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(docs), SEQ_LEN), PAD, dtype=torch.long)
    for i, d in enumerate(docs):
        out[i, : len(d)] = torch.tensor(d)
    return out


def _optimize(name: str, params, loss_fn, steps: int, lr: float, weight_decay: float,
              log_every: int) -> None:
    """AdamW with a cosine schedule and gradient clipping; ``loss_fn()`` draws a batch."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % log_every == 0 or step == steps:
            print(f"{name} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


@dataclass(frozen=True)
class TargetRecipe:
    """How to build, run and save one kind of target, and its training defaults."""

    build: Callable[[], torch.nn.Module]  # fresh weights, drawn from torch's global RNG
    load: Callable[[Path], torch.nn.Module]  # a saved target, fp32, eval mode
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # ids [B, T] -> [B, T, V]
    # ids [B, P], n -> ids [B, P + n], greedy, running on past EOS
    greedy: Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]
    # ids [B, T], layer ids -> residual streams after those layers, concatenated [B, T, F]
    features: Callable[[torch.nn.Module, torch.Tensor, tuple[int, ...]], torch.Tensor]
    save: Callable[[torch.nn.Module, Path], None]
    target_layer_ids: tuple[int, ...]
    drafter_max_positions: int
    target_dir: Path
    drafter_dir: Path
    target_steps: int
    drafter_steps: int
    drafter_seqs: int


def _kimi_greedy(model, ids, n):
    """Full re-forwards (no cache): fast enough at this size, and the same greedy function
    of the weights as the cached decoder up to fp32 rounding."""
    for _ in range(n):
        logits, _ = model.forward_train(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


def _hf_greedy(model, ids, n):
    step, cache = ids, None
    for _ in range(n):
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        step, cache = out.logits[:, -1:].argmax(dim=-1), out.past_key_values
        ids = torch.cat([ids, step], dim=1)
    return ids


def _load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _kimi_features(model, ids, layer_ids):
    model.set_capture_layers(layer_ids)
    return model.forward_train(ids)[1]


def _hf_features(model, ids, layer_ids):
    """Through HFTarget's forward hooks, one sequence at a time (its only mode)."""
    target = HFTarget(model)
    target.set_capture_layers(layer_ids)
    return torch.stack([target.extend(None, row).features for row in ids])


RECIPES = {
    "kimi": TargetRecipe(
        build=lambda: KimiLinearForCausalLM(tiny_config(vocab_size=VOCAB_SIZE)),
        load=lambda path: KimiLinearForCausalLM.from_pretrained(path).eval(),
        logits=lambda model, ids: model.forward_train(ids)[0], greedy=_kimi_greedy,
        features=_kimi_features, save=save_kimi_target,
        target_layer_ids=TARGET_LAYER_IDS, drafter_max_positions=4096,
        target_dir=TARGET_DIR, drafter_dir=DRAFTER_DIR,
        target_steps=150, drafter_steps=2000, drafter_seqs=256),
    "qwen3": TargetRecipe(
        build=tiny_qwen3.new_target, load=_load_hf,
        logits=lambda model, ids: model(input_ids=ids, use_cache=False).logits,
        greedy=_hf_greedy, features=_hf_features, save=tiny_qwen3.save_target,
        target_layer_ids=tiny_qwen3.TARGET_LAYER_IDS,
        drafter_max_positions=tiny_qwen3.DRAFTER_MAX_POSITIONS,
        target_dir=tiny_qwen3.TARGET_DIR, drafter_dir=tiny_qwen3.DRAFTER_DIR,
        # 256 sequences were memorised (held-out drafter loss 40x the training loss)
        target_steps=1500, drafter_steps=3000, drafter_seqs=2048),
}


def lm_loss(recipe: TargetRecipe, model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over documents ids [B, SEQ_LEN]; padding is no label."""
    logits = recipe.logits(model, ids[:, :-1])
    labels = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, -100)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def corpus_loss(recipe: TargetRecipe, model, n: int = 64) -> float:
    """lm_loss on n fixed documents: the number to compare targets by."""
    rng = random.Random(EVAL_SEED)
    return lm_loss(recipe, model, _batch([synthetic_document(rng) for _ in range(n)])).item()


def train_target(recipe: TargetRecipe, steps: int, seed: int, log_every: int = 25):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = recipe.build()

    def loss_fn():
        return lm_loss(recipe, model, _batch([synthetic_document(rng) for _ in range(8)]))

    _optimize("target", model.parameters(), loss_fn, steps, 3e-3, 0.01, log_every)
    return model.eval()


@dataclass(frozen=True)
class DrafterShape:
    """The drafter's own widths; the defaults are the bundled drafters' (GQA 4 q / 2 kv x 16)."""

    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128


def drafter_config(hidden_size: int, target_num_layers: int,
                   target_layer_ids: tuple[int, ...] = TARGET_LAYER_IDS,
                   max_position_embeddings: int = 4096,
                   shape: DrafterShape = DrafterShape()) -> DrafterConfig:
    """The tiny drafter's config for a target of this hidden size and depth."""
    return DrafterConfig(
        hidden_size=hidden_size, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.intermediate, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=max_position_embeddings,
        attention_bias=False, block_size=BLOCK, mask_token_id=PAD,
        target_layer_ids=target_layer_ids, vocab_size=VOCAB_SIZE,
        target_num_layers=target_num_layers,
    )


@torch.no_grad()
def target_sequences(recipe: TargetRecipe, target, n: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of prompt (a corpus prefix) + the target's greedy continuation, decoded
    as one batch, and the target features of every position: ids [n, P+G],
    features [n, P+G, F]."""
    rng = random.Random(seed + 1)
    prompts = torch.tensor([synthetic_document(rng)[:PROMPT_LEN] for _ in range(n)])
    ids = recipe.greedy(target, prompts, GEN_LEN)
    return ids, recipe.features(target, ids, recipe.target_layer_ids)


def drafter_loss(drafter, target, ids, features, anchors_per_seq: int, gen) -> torch.Tensor:
    """DFlash objective on a batch of sequences; anchors drawn after the prompt."""
    n, T = ids.shape
    L = drafter.cfg.block_size
    pool = drafter.new_pool(n * T)
    positions = torch.arange(T).repeat(n)
    drafter.append_context(pool, features.reshape(n * T, -1), positions, torch.arange(n * T))
    seq = torch.arange(n).repeat_interleave(anchors_per_seq)
    start = torch.randint(PROMPT_LEN, T - 1, (len(seq),), generator=gen)
    block_pos = start[:, None] + torch.arange(L)[None, :]
    block = torch.full((len(seq), L), drafter.cfg.mask_token_id, dtype=torch.long)
    block[:, 0] = ids[seq, start]
    labels = ids[seq[:, None], block_pos.clamp(max=T - 1)].masked_fill(block_pos >= T, -100)
    labels[:, 0] = -100
    cols = torch.arange(T)[None, :]
    slot_table = torch.where(cols < start[:, None], seq[:, None] * T + cols, 0)
    embeds = target.model.embed_tokens(block)
    hidden = drafter.forward_block(pool, embeds, block_pos, slot_table, start)
    logits = F.linear(hidden, target.lm_head.weight)
    # earlier block positions matter more: a miss there ends the accepted prefix
    weights = torch.exp(-(torch.arange(L) - 1).clamp(min=0) / 7.0)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=-100, reduction="none").view(len(seq), L)
    valid = (labels != -100).float() * weights[None, :]
    return (ce * valid).sum() / valid.sum()


def train_drafter(recipe: TargetRecipe, target, steps: int, seed: int, n_seqs: int = 256,
                  log_every: int = 50, shape: DrafterShape = DrafterShape()):
    for p in target.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    ids, features = target_sequences(recipe, target, n_seqs, seed)
    print(f"generated {n_seqs} greedy continuations ({time.time() - t0:.0f}s)", flush=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = drafter_config(target.config.hidden_size, target.config.num_hidden_layers,
                         recipe.target_layer_ids, recipe.drafter_max_positions, shape)
    drafter = DFlashDrafter(cfg)

    def loss_fn():
        rows = torch.randint(0, n_seqs, (16,), generator=gen)
        return drafter_loss(drafter, target, ids[rows], features[rows], 4, gen)

    _optimize("drafter", drafter.parameters(), loss_fn, steps, 2e-3, 0.0, log_every)
    return drafter.eval()


def save_drafter(drafter: DFlashDrafter, out: Path) -> None:
    """The published DFlash checkpoint format: config.json + model.safetensors."""
    cfg = drafter.cfg
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
        # the published format's num_target_layers counts the TARGET's layers
        "num_target_layers": cfg.target_num_layers, "torch_dtype": "float32",
        "dflash_config": {"mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": list(cfg.target_layer_ids)},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in drafter.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))


def _per_target(field: str) -> str:
    """A recipe default as help text, e.g. "default: kimi 150, qwen3 1500"."""
    return "default: " + ", ".join(f"{k} {getattr(r, field)}" for k, r in RECIPES.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=sorted(RECIPES), default="kimi",
                        help="which tiny target to train (default: kimi)")
    parser.add_argument("--target-out", type=Path, default=None,
                        help="default: the bundled target directory of --target")
    parser.add_argument("--drafter-out", type=Path, default=None,
                        help="default: the bundled drafter directory of --target")
    parser.add_argument("--drafter-only", action="store_true",
                        help="train no target: load the one in --target-out and train a drafter for it")
    parser.add_argument("--target-steps", type=int, default=None, help=_per_target("target_steps"))
    parser.add_argument("--drafter-steps", type=int, default=None, help=_per_target("drafter_steps"))
    parser.add_argument("--drafter-seqs", type=int, default=None,
                        help="target-generated sequences the drafter trains on; "
                             + _per_target("drafter_seqs"))
    default = DrafterShape()
    for name, help_text in (("layers", "draft layers"), ("heads", "query heads"),
                            ("kv_heads", "key/value heads"), ("head_dim", "head dim (even)"),
                            ("intermediate", "MLP width")):
        parser.add_argument(f"--drafter-{name.replace('_', '-')}", type=int, default=getattr(default, name),
                            help=f"{help_text} (default: {getattr(default, name)})")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = RECIPES[args.target]
    target_out = args.target_out or recipe.target_dir
    drafter_out = args.drafter_out or recipe.drafter_dir
    shape = DrafterShape(args.drafter_layers, args.drafter_heads, args.drafter_kv_heads,
                         args.drafter_head_dim, args.drafter_intermediate)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    if args.drafter_only:
        target = recipe.load(target_out)
        print(f"loaded target {target_out}: corpus loss {corpus_loss(recipe, target):.3f}", flush=True)
    else:
        target = train_target(recipe, args.target_steps or recipe.target_steps, args.seed)
        print(f"target corpus loss {corpus_loss(recipe, target):.3f}", flush=True)
        recipe.save(target, target_out)
    drafter = train_drafter(recipe, target, args.drafter_steps or recipe.drafter_steps, args.seed,
                            n_seqs=args.drafter_seqs or recipe.drafter_seqs, shape=shape)
    save_drafter(drafter, drafter_out)
    written = drafter_out if args.drafter_only else f"{target_out} and {drafter_out}"
    print(f"wrote {written} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
