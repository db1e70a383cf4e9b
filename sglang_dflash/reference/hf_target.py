"""A transformers causal LM seen through the target API the offline walk uses.

Only what teacher forcing needs: a greedy continuation (``generate``), one forward over
prompt + continuation whose features are captured by forward hooks on
``model.layers[i]`` (a transformers decoder layer returns the full residual stream, i.e.
``hidden_states[i + 1]``), and the target's ``embed_tokens`` / ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Forward:
    logits: torch.Tensor    # [T, V]
    features: torch.Tensor  # [T, n_capture * H]
    record: None = None


class HFTarget:
    def __init__(self, hf_model):
        self.hf = hf_model.eval()
        self.model = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.model
        self.lm_head = hf_model.get_output_embeddings()
        eos = hf_model.generation_config.eos_token_id or hf_model.config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, (list, tuple)) else [eos])
        self._capture_ids: tuple[int, ...] = ()

    @classmethod
    def from_pretrained(cls, path, trust_remote_code: bool, dtype=torch.float32, device="cpu"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True)
        return cls(model.to(device))

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    def set_capture_layers(self, ids) -> None:
        n = len(self.model.layers)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"target layer ids {bad} outside the target's {n} layers")
        self._capture_ids = tuple(ids)

    def new_state(self):
        return None

    @torch.no_grad()
    def extend(self, state, input_ids: torch.Tensor) -> _Forward:
        """One forward over input_ids [T] from an empty cache (teacher forcing only)."""
        assert state is None, "HFTarget runs whole sequences only"
        captured: dict[int, torch.Tensor] = {}

        def hook(i):
            def fn(_module, _inputs, output):
                captured[i] = output[0] if isinstance(output, tuple) else output
            return fn

        handles = [self.model.layers[i].register_forward_hook(hook(i)) for i in self._capture_ids]
        try:
            device = self.lm_head.weight.device
            logits = self.hf(input_ids[None].to(device), use_cache=False).logits[0]
        finally:
            for h in handles:
                h.remove()
        features = torch.cat([captured[i][0] for i in self._capture_ids], dim=-1)
        return _Forward(logits.float(), features)

    @torch.no_grad()
    def greedy_continuation(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        device = self.lm_head.weight.device
        ids = torch.tensor([prompt], device=device)
        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=list(self.eos_token_ids),
                               pad_token_id=self.eos_token_ids[0])
        tokens = out[0, len(prompt):].tolist()
        # generate pads finished rows; cut at the first EOS, inclusive
        for n, t in enumerate(tokens):
            if t in self.eos_token_ids:
                return tokens[: n + 1]
        return tokens
