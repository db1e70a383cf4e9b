"""Prompt sets for `sglang-dflash bench online`.

The bundled JSONL (40 math / gsm8k / code / chat prompts), a user JSONL file (errors name
the file, the line and the field), or a Hugging Face dataset; `PromptItem` turns one
prompt into a chat conversation or a raw completion prompt, templated by its kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_ASK = "Complete this Python function. Reply with the whole function in one code block."
KINDS = ("math", "gsm8k", "code", "chat", "raw")
# --dataset name -> (hub id, config, split, text field, kind)
DATASETS = {
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "math"),
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "gsm8k"),
    "humaneval": ("openai/openai_humaneval", None, "test", "prompt", "code"),
    "mt-bench": ("HuggingFaceH4/mt_bench_prompts", None, "train", "prompt", "chat"),
}
# Ships with the source tree, not inside the wheel.
BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "prompts" / "bundled.jsonl"


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a `text` templated by `kind`, or a conversation sent as is."""

    id: str
    kind: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def completion_prompt(self) -> str:
        # Raw mode: a base model continues a code stub as is; questions get the instruction.
        return f"{self.text}\n{BOXED}\n" if self.kind in ("math", "gsm8k") else self.text

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        content = {"math": f"{self.text}\n{BOXED}", "gsm8k": f"{self.text}\n{BOXED}",
                   "code": f"{CODE_ASK}\n\n```python\n{self.text}```"}.get(self.kind, self.text)
        return [{"role": "user", "content": content}]


def _item(row, where: str, default_id: str, completions: bool) -> PromptItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    kind = row.get("kind", "raw")
    if kind not in KINDS:
        raise ValueError(f"{where}: field 'kind': expected one of {', '.join(KINDS)}, "
                         f"got {kind!r}")
    ident = str(row.get("id", default_id))
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs)):
            raise ValueError(f"{where}: field 'messages': expected a non-empty list of "
                             "{\"role\": str, \"content\": str} objects")
        if completions:
            raise ValueError(f"{where}: field 'messages' needs the chat endpoint; "
                             "drop --completions or give a 'prompt' string")
        return PromptItem(ident, kind, messages=tuple(msgs))
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise ValueError(f"{where}: field 'prompt': expected a non-empty string "
                         "(or a 'messages' list)")
    return PromptItem(ident, kind, text=row["prompt"])


def read_jsonl(path: Path, completions: bool) -> list[PromptItem]:
    """Prompts from a JSONL file; errors name the file, the line and the field."""
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
        items.append(_item(row, f"{path} line {n}", f"line-{n}", completions))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def hub_items(name: str, limit: int | None) -> list[PromptItem]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--dataset {name}: needs the `datasets` package (pip install "
                         "datasets) and network access; or pass --prompts FILE.jsonl") from None
    repo, config, split, fld, kind = DATASETS[name]
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # re-raised with the remedy; the cause stays attached
        raise ValueError(f"--dataset {name}: could not load {repo} ({type(e).__name__}: {e}); "
                         "offline? pass --prompts FILE.jsonl") from e
    items = []
    for i, row in enumerate(ds):
        text = row[fld][0] if isinstance(row[fld], list) else row[fld]  # mt-bench: turn 1
        items.append(PromptItem(f"{name}-{i}", kind, text=text))
        if limit and len(items) == limit:
            break
    return items


def round_robin_by_kind(items: list[PromptItem], limit: int) -> list[PromptItem]:
    """The first ``limit`` prompts taken one kind at a time, kinds in order of first
    appearance, each kind's prompts in file order. E.g. kinds [m, m, m, c, c, g] and
    limit 4 -> m1, c1, g1, m2."""
    by_kind: dict[str, list[PromptItem]] = {}
    for item in items:
        by_kind.setdefault(item.kind, []).append(item)
    queues = list(by_kind.values())
    out: list[PromptItem] = []
    for i in range(max(map(len, queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out[:limit]


def load_prompts(path: Path | None, dataset: str | None, limit: int | None,
                 completions: bool) -> list[PromptItem]:
    """A prompt set; ``limit`` takes that many, round-robin over the kinds it holds."""
    if dataset:
        return hub_items(dataset, limit)
    items = read_jsonl(path or BUNDLED, completions)
    return round_robin_by_kind(items, limit) if limit else items
