"""A small, faithful re-implementation of HF ``KimiLinearForCausalLM`` (Kimi-Linear-48B-A3B).

Same config.json field names and the same weight names as the published checkpoint, so
``from_pretrained`` reads either a real checkpoint or the tiny bundled one. Layers are KDA
(``reference/kda.py``) or NoPE MLA (``full_attn_layers``, 1-based in the config); layers
from ``first_k_dense_replace`` on use a sigmoid-routed MoE with a correction bias (top-k
chosen on ``score + bias``, weighted by ``score``, renormalised, times
``routed_scaling_factor``) plus shared experts, as SGLang serves it. (HF's remote code adds
the bias to the scores in place, so there the weights include the bias.)

Speculative decoding separates *running* tokens from *keeping* them::

    state = model.new_state()               # per request; length 0
    out = model.extend(state, input_ids)    # [T] tokens at state.length..; state untouched
    model.commit(state, out.record, n)      # keep the first n: MLA K/V appended, KDA
                                            # state replayed by ``model.kda_commit_op``

``extend`` is batch-invariant (see ``kda.linear``): one extend of T tokens gives the same
logits, features and committed state, bit for bit, as T single-token extends on the same
device. ``forward_train`` runs a batch from an empty state with ordinary GEMMs (it agrees
with ``extend`` to fp32 rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import CheckpointError, weight_files
from ..config import read_config_json
from ..kernels.naive.kda_commit import kda_commit
from .kda import KdaRecord, KimiDeltaAttention, linear, pointwise, rms_norm
from .kimi_linear_config import ARCHITECTURE, KimiLinearConfig, tiny_config

__all__ = ["ExtendOutput", "KimiLinearConfig", "KimiLinearForCausalLM", "KimiLinearState", "tiny_config"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KimiMLP(nn.Module):
    """SwiGLU MLP; ``names`` are (gate, up, down): HF's dense/shared MLP or an expert's w1, w3, w2."""

    def __init__(self, hidden: int, inner: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, shape in zip(names, ((inner, hidden), (inner, hidden), (hidden, inner))):
            self.add_module(name, nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        gate, up, down = (getattr(self, n).weight for n in self.names)
        act = pointwise(F.silu, linear(x, gate, invariant), 1, invariant)
        return linear(act * linear(x, up, invariant), down, invariant)


class KimiMoEGate(nn.Module):
    def __init__(self, cfg: KimiLinearConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # set by load balancing, not by gradients: it only picks experts, never weighs them
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor, invariant: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [M, k] (best first) and their fp32 weights [M, k] for x [M, D]."""
        cfg, M = self.cfg, x.shape[0]
        logits = linear(x.float(), self.weight.float(), invariant)
        fn = torch.sigmoid if cfg.moe_router_activation_func == "sigmoid" else (lambda z: z.softmax(-1))
        scores = pointwise(fn, logits, 1, invariant)
        choice = scores + self.e_score_correction_bias.float()
        if cfg.num_expert_group > 1:
            # keep the topk_group groups whose two best experts score highest
            groups = choice.detach().view(M, cfg.num_expert_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], 1), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_token, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.moe_renormalize and cfg.num_experts_per_token > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


class KimiSparseMoeBlock(nn.Module):
    def __init__(self, cfg: KimiLinearConfig):
        super().__init__()
        self.experts = nn.ModuleList(KimiMLP(cfg.hidden_size, cfg.moe_intermediate_size, ("w1", "w3", "w2"))
                                     for _ in range(cfg.num_experts))
        self.gate = KimiMoEGate(cfg)
        self.shared_experts = None
        if cfg.num_shared_experts:
            self.shared_experts = KimiMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.gate(flat, invariant)
        picked = flat.new_zeros(*ids.shape, flat.shape[-1])  # [M, k, D]
        for e in ids.unique().tolist():
            rows, slots = (ids == e).nonzero(as_tuple=True)
            picked[rows, slots] = self.experts[e](flat[rows], invariant)
        # weigh in fp32, expert slot by slot, so each token sums in one fixed order
        out = weights[:, 0, None] * picked[:, 0].float()
        for j in range(1, ids.shape[1]):
            out = out + weights[:, j, None] * picked[:, j].float()
        out = out.to(x.dtype).view_as(x)
        return out if self.shared_experts is None else out + self.shared_experts(x, invariant)


class KimiMLAAttention(nn.Module):
    """MLA with NoPE: the rope part of the key is one shared head, used without rotation."""

    def __init__(self, cfg: KimiLinearConfig):
        super().__init__()
        self.cfg, H = cfg, cfg.num_attention_heads
        self.q_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, invariant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, dq], k [B, H, T, dq], v [B, H, T, dv] for x [B, T, D]."""
        cfg, (B, T, _) = self.cfg, x.shape
        H = cfg.num_attention_heads
        q = linear(x, self.q_proj.weight, invariant).view(B, T, H, self.q_head_dim)
        latent, k_rope = linear(x, self.kv_a_proj_with_mqa.weight, invariant).split(
            [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = linear(self.kv_a_layernorm(latent), self.kv_b_proj.weight, invariant)
        k_nope, v = kv.view(B, T, H, -1).split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, T, H, -1)], dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """Softmax attention in fp32; q [..., Tq, dq], k [..., Tk, dq], v [..., Tk, dv]."""
        s = torch.matmul(q, k.transpose(-1, -2)) * self.q_head_dim ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return torch.matmul(s.float().softmax(-1).to(q.dtype), v)

    def forward(self, x: torch.Tensor, cache: MlaCache | None, invariant: bool) -> tuple[torch.Tensor, MlaCache]:
        """Output [B, T, D] and this call's new K/V (B == 1 with a cache)."""
        q, k, v = self.qkv(x, invariant)
        if cache is None:
            o = self.attend(q, k, v, causal=True)
        else:
            keys, values = torch.cat([cache.k, k[0]], dim=1), torch.cat([cache.v, v[0]], dim=1)
            P, rows = cache.k.shape[1], []
            # query t sees exactly the P + t + 1 keys a single-token decode would see
            for t in range(x.shape[1]):
                n = P + t + 1
                rows.append(self.attend(q[0, :, t:t + 1], keys[:, :n].contiguous(), values[:, :n].contiguous(), False))
            o = torch.cat(rows, dim=1)[None]
        o = o.transpose(1, 2).flatten(2)
        return linear(o, self.o_proj.weight, invariant), MlaCache(k[0], v[0])


@dataclass
class MlaCache:
    k: torch.Tensor  # [H, P, dq]
    v: torch.Tensor  # [H, P, dv]


@dataclass
class KdaCache:
    recurrent: torch.Tensor  # [1, H, K, V] fp32 (a pool of one slot for kda_commit)
    conv: torch.Tensor       # [1, C, W-1] the last W-1 pre-conv inputs, oldest first


@dataclass
class KimiLinearState:
    """One request's committed state; ``commit`` mutates it, ``extend`` never does."""

    length: int
    layers: list  # MlaCache or KdaCache per layer


@dataclass
class ExtendRecord:
    """Per-layer new K/V (MLA) or replay inputs (KDA) of one ``extend`` call."""

    start: int     # the state length the extend ran from
    n_tokens: int
    layers: list = field(default_factory=list)  # MlaCache or KdaRecord per layer


@dataclass
class ExtendOutput:
    logits: torch.Tensor           # [T, V] fp32
    features: torch.Tensor | None  # [T, n_capture * hidden]
    record: ExtendRecord


class KimiDecoderLayer(nn.Module):
    def __init__(self, cfg: KimiLinearConfig, i: int):
        super().__init__()
        self.kind = cfg.layer_kinds[i]
        if self.kind == "kda":
            self.self_attn = KimiDeltaAttention(cfg.hidden_size, cfg.num_heads, cfg.head_dim,
                                                cfg.short_conv_kernel_size, cfg.rms_norm_eps)
        else:
            self.self_attn = KimiMLAAttention(cfg)
        if cfg.is_moe_layer(i):
            self.block_sparse_moe = KimiSparseMoeBlock(cfg)
        else:
            self.mlp = KimiMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache, invariant: bool, records: list) -> torch.Tensor:
        """The residual stream after this layer (HF ``hidden_states[i + 1]``); the layer's
        record is appended to ``records``. ``cache`` None: an empty state, any batch."""
        h = self.input_layernorm(x)
        if self.kind == "kda":
            cache = cache or KdaCache(*self.self_attn.empty_state(x.shape[0], x))
            h, record = self.self_attn(h, cache.recurrent, cache.conv, invariant)
        else:
            h, record = self.self_attn(h, cache, invariant)
        records.append(record)
        x = x + h
        h = self.post_attention_layernorm(x)
        mlp = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + mlp(h, invariant)


class KimiLinearModel(nn.Module):
    def __init__(self, cfg: KimiLinearConfig):
        super().__init__()
        # no padding_idx: it only zeroes the pad row at init and freezes it, and the
        # drafter's mask token is the pad id, whose embedding must tell positions apart
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(KimiDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KimiLinearForCausalLM(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the op that replays accepted KDA tokens; the backend switch may replace it
        self.kda_commit_op = kda_commit
        self._capture_ids: tuple[int, ...] = ()
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, KimiMoEGate)):
                nn.init.normal_(module.weight, std=std)

    def set_capture_layers(self, ids) -> None:
        """Capture the residual stream after each layer in ``ids`` (HF hidden_states[i+1])."""
        n = self.config.num_hidden_layers
        ids = tuple(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise ValueError(f"capture layer ids {bad}: expected 0-based layers in [0, {n})")
        for h in self._hooks:
            h.remove()
        self._capture_ids, self._captured = ids, {}

        def hook(i):
            def store(_module, _inputs, output):
                self._captured[i] = output
            return store

        self._hooks = [self.model.layers[i].register_forward_hook(hook(i)) for i in set(ids)]

    def _features(self) -> torch.Tensor | None:
        if not self._capture_ids:
            return None
        features = torch.cat([self._captured[i] for i in self._capture_ids], dim=-1)
        self._captured = {}
        return features

    def new_state(self) -> KimiLinearState:
        """An empty request state on the model's device (conv windows in its dtype)."""
        w = self.lm_head.weight
        layers = []
        for layer in self.model.layers:
            attn, H = layer.self_attn, self.config.num_attention_heads
            if layer.kind == "kda":
                layers.append(KdaCache(*attn.empty_state(1, w)))
            else:
                layers.append(MlaCache(w.new_zeros(H, 0, attn.q_head_dim), w.new_zeros(H, 0, self.config.v_head_dim)))
        return KimiLinearState(0, layers)

    def _run(self, input_ids: torch.Tensor, caches: list, invariant: bool) -> tuple[torch.Tensor, list]:
        """Final hidden [B, T, D] and per-layer records for input_ids [B, T]."""
        records: list = []
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cache, invariant, records)
        return self.model.norm(x), records

    def _check_ids(self, input_ids: torch.Tensor, ndim: int) -> None:
        if input_ids.ndim != ndim or input_ids.dtype != torch.int64 or input_ids.shape[-1] == 0:
            raise ValueError(f"input_ids: expected a non-empty {ndim}-d int64 tensor, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        V = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
            raise ValueError(f"input_ids: token ids must lie in [0, {V}), got {input_ids.min()}..{input_ids.max()}")

    @torch.no_grad()
    def extend(self, state: KimiLinearState, input_ids: torch.Tensor) -> ExtendOutput:
        """Run input_ids [T] at positions state.length.. from the committed state.

        The state is not mutated; ``commit(state, out.record, n)`` keeps the first n tokens.
        """
        self._check_ids(input_ids, 1)
        ids = input_ids.to(self.lm_head.weight.device)[None]
        hidden, records = self._run(ids, state.layers, invariant=True)
        logits = linear(hidden[0], self.lm_head.weight, invariant=True).float()
        features = self._features()
        record = ExtendRecord(state.length, ids.shape[1], records)
        return ExtendOutput(logits, None if features is None else features[0], record)

    @torch.no_grad()
    def commit(self, state: KimiLinearState, record: ExtendRecord, n: int) -> None:
        """Advance ``state`` by the first n tokens of the extend that made ``record``."""
        if record.start != state.length or len(record.layers) != len(state.layers):
            raise ValueError(f"commit: the record was made from a state of length {record.start} "
                             f"but this state has length {state.length} (extend again after a commit)")
        if not (isinstance(n, int) and 0 <= n <= record.n_tokens):
            raise ValueError(f"commit: n must be an int in [0, {record.n_tokens}], got {n!r}")
        device = self.lm_head.weight.device
        slot, commit_len = torch.zeros(1, dtype=torch.int64, device=device), torch.tensor([n], device=device)
        for cache, rec in zip(state.layers, record.layers):
            if isinstance(cache, MlaCache):
                cache.k = torch.cat([cache.k, rec.k[:, :n]], dim=1)
                cache.v = torch.cat([cache.v, rec.v[:, :n]], dim=1)
            else:
                self.kda_commit_op(cache.recurrent, cache.conv, slot, rec.k, rec.v, rec.g, rec.beta,
                                   rec.conv_inputs, commit_len)
        state.length += n

    def forward_train(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] fp32 and captured features [B, T, n_capture * D] (or None) for
        input_ids [B, T] from an empty state; differentiable."""
        self._check_ids(input_ids, 2)
        ids = input_ids.to(self.lm_head.weight.device)
        hidden, _ = self._run(ids, [None] * len(self.model.layers), invariant=False)
        return F.linear(hidden, self.lm_head.weight).float(), self._features()

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors (HF names)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> KimiLinearForCausalLM:
        """Strict load: every tensor the config implies, with its shape, and nothing else."""
        config = KimiLinearConfig.from_dict(*read_config_json(path, "Kimi-Linear target"))
        model = cls(config)
        files, _ = weight_files(path)
        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys()})
        problems = _weight_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, tensors)
        if problems:
            raise CheckpointError(f"{path}: weights do not match config.json; " + "; ".join(problems))
        model.load_state_dict(tensors, strict=True)
        return model.to(device=device, dtype=dtype)


def _weight_problems(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped tensor names, one entry per kind."""
    problems = []
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing:
        problems.append(f"missing: {missing}")
    if unexpected:
        problems.append(f"unexpected: {unexpected}")
    shapes = [f"{k} {tuple(t.shape)} != {expected[k]}" for k, t in sorted(tensors.items())
              if k in expected and tuple(t.shape) != expected[k]]
    if shapes:
        problems.append(f"mis-shaped: {shapes}")
    return problems
