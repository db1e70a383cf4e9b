"""Can this drafter serve this target? Every reason it cannot, each naming file and field."""

from __future__ import annotations

from .config import ConfigError, DrafterConfig, drafter_problems
from .target_config import KIMI_LINEAR, TargetConfig


def pair_problems(drafter: DrafterConfig, target: TargetConfig, drafter_source: str,
                  target_source: str) -> list[str]:
    """Why ``drafter`` cannot serve ``target``, beyond the drafter's own problems."""
    d, t, n = drafter_source, target_source, target.num_hidden_layers
    problems = []
    if drafter.hidden_size != target.hidden_size:
        # the drafter runs on the target's embeddings and through its lm_head
        problems.append(f"{d}: field `hidden_size` {drafter.hidden_size} != {t}: field `hidden_size` "
                        f"{target.hidden_size} (the drafter uses the target's embed_tokens and lm_head)")
    outside = [i for i in drafter.target_layer_ids if i >= n]
    if outside:
        problems.append(f"{d}: field `target_layer_ids`: id(s) {outside} are not layers of the "
                        f"target ({t}: field `num_hidden_layers` {n}, 0-based ids 0..{n - 1})")
    if n - 1 in drafter.target_layer_ids and target.architecture != KIMI_LINEAR[1]:
        # SGLang's llama/qwen models tap the stream at a layer's input (layer i + 1 for
        # the output of i), so nothing taps the last layer's output before the final norm
        problems.append(f"{d}: field `target_layer_ids`: id {n - 1} is the target's last layer, "
                        f"whose output SGLang cannot capture for {target.architecture} (use ids "
                        f"below {n - 1})")
    if drafter.target_num_layers is not None and drafter.target_num_layers != n:
        problems.append(f"{d}: field `num_target_layers` {drafter.target_num_layers} != {t}: "
                        f"field `num_hidden_layers` {n} (trained for another target?)")
    if not 0 <= drafter.mask_token_id < target.vocab_size:
        problems.append(f"{d}: field `mask_token_id` {drafter.mask_token_id} outside the target "
                        f"vocabulary ({t}: field `vocab_size` {target.vocab_size})")
    if drafter.vocab_size is not None and drafter.vocab_size != target.vocab_size:
        problems.append(f"{d}: field `vocab_size` {drafter.vocab_size} != {t}: field "
                        f"`vocab_size` {target.vocab_size}")
    return problems


def validate_pair(drafter: DrafterConfig, target: TargetConfig, drafter_source: str,
                  target_source: str) -> list[str]:
    """Every reason ``drafter`` cannot serve ``target`` (empty when they fit)."""
    return (drafter_problems(drafter, drafter_source)
            + pair_problems(drafter, target, drafter_source, target_source))


def check_pair(drafter: DrafterConfig, target: TargetConfig, drafter_source: str,
               target_source: str) -> None:
    """Raise one ``ConfigError`` listing every incompatibility of the pair."""
    problems = validate_pair(drafter, target, drafter_source, target_source)
    if problems:
        raise ConfigError(problems)
