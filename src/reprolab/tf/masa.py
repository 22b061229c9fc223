"""MASA: Matrix Atom Sharing in Attention (Zhussip, Shopkhoev, Ali & Lefkimmiatis, "Share Your Attention: Transformer
Weight Sharing via Matrix-based Dictionary Learning", AAAI 2026), https://arxiv.org/abs/2508.04581.

No official code is public (searched 2026-12-07: code, issues and pages corpora); this follows the paper's equation.
For every attention projection type p in {Q, K, V, O} the L layers share one dictionary of S matrix atoms and each
layer keeps only S coefficients::

    W_l^(p) = sum_{s=1..S} c_{l,s}^(p) D_s^(p)          (S = L / 3 in the paper: 66.7 % fewer attention parameters)

trained end-to-end with a standard optimiser (atoms and coefficients are ordinary parameters).

Everything plugs into :class:`reprolab.tf.tiny.TinyTransformer` through ``proj_factory`` (roles q, k, v, o; the
feed-forward fc1 / fc2 stay the kit's dense projections). Arms (:data:`ARMS`), all from the same ``build_model``:

- ``full``     the unshared model (quality reference);
- ``masa``     atom-shared Q, K, V, O (:class:`AtomLinear` over a per-role :class:`AtomDictionary`);
- ``cycle``    "Repeat-all-over" sharing (Takase & Kiyono 2021 CYCLE; MobileLLM repeat-all-over): layer l uses the
               attention projections of group l mod S;
- ``sequence`` "Sequential" sharing (Takase & Kiyono SEQUENCE; MobileLLM immediate block-wise): layer l uses group
               floor(l S / L), i.e. consecutive layers reuse one layer's Q, K, V, O in groups of L / S;
- ``lowrank``  every layer's projection factored W = B A with rank r matched to MASA's attention budget;
- ``gqa``      grouped-query attention: K and V with ``n_kv_heads`` heads, each shared by a group of query heads
               (its budget is larger than MASA's: GQA cannot shrink Q and O).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import DynamicLinear
from .tiny import TFConfig, TinyTransformer, default_proj, lm_loss, lm_nll, unigram_nll

ATTN_ROLES = ("q", "k", "v", "o")
ARMS = ("full", "masa", "cycle", "sequence", "lowrank", "gqa")
EQUAL_BUDGET = ("cycle", "sequence", "lowrank")  # baselines at MASA's attention-parameter budget
INIT_STD = 0.02  # the kit's (GPT-2) weight init: every arm's effective projection matrix starts with this std


# ----------------------------------------------------------------------------------------------- MASA projections
class AtomDictionary(nn.Module):
    """The S shared matrix atoms D_s (S, out, in) of one projection type."""

    def __init__(self, n_atoms: int, in_features: int, out_features: int, std: float = INIT_STD):
        super().__init__()
        self.atoms = nn.Parameter(torch.randn(n_atoms, out_features, in_features) * std)  # (S, out, in)

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]


class AtomLinear(nn.Module):
    """One layer's projection W_l = sum_s c_{l,s} D_s over a shared :class:`AtomDictionary` (+ the layer's own bias).

    Coefficients start N(0, 1/S), so Var(W_l) = S * (1/S) * std^2 = std^2 (the same scale as a dense layer's init)."""

    def __init__(self, dictionary: AtomDictionary, bias: bool = False):
        super().__init__()
        self.dictionary = dictionary  # shared: registered in every layer, deduplicated by model.parameters()
        S, out, _ = dictionary.atoms.shape
        self.coef = nn.Parameter(torch.randn(S) / math.sqrt(S))  # (S,) c_{l,s}
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def weight(self) -> torch.Tensor:
        return torch.einsum("s,soi->oi", self.coef, self.dictionary.atoms)  # (out, in) = sum_s c_s D_s

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        W = self.weight()
        out = out_features or W.shape[0]
        return F.linear(x, W[:out], None if self.bias is None else self.bias[:out])


# ----------------------------------------------------------------------------------------------- baseline projections
class LowRankLinear(nn.Module):
    """W = B A with A (r, in), B (out, r); factors start N(0, std / sqrt(r)) each so Var(W) = std^2."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, std: float = INIT_STD):
        super().__init__()
        s = math.sqrt(std / math.sqrt(rank))
        self.A = nn.Parameter(torch.randn(rank, in_features) * s)   # (r, in)
        self.B = nn.Parameter(torch.randn(out_features, rank) * s)  # (out, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        return self.B @ self.A

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        out = out_features or self.B.shape[0]
        h = F.linear(x, self.A)                                    # (..., r)
        return F.linear(h, self.B[:out], None if self.bias is None else self.bias[:out])


class GQALinear(nn.Module):
    """K or V projection of grouped-query attention: ``n_kv`` heads of ``head_dim``, head j of the (n_kv * group)
    query heads reads kv head j // group (``transformers`` ``repeat_kv``)."""

    def __init__(self, in_features: int, n_kv: int, head_dim: int, group: int, bias: bool = False):
        super().__init__()
        self.n_kv, self.head_dim, self.group = n_kv, head_dim, group
        self.lin = DynamicLinear(in_features, n_kv * head_dim, bias)

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        y = self.lin(x, self.n_kv * self.head_dim)                             # (..., n_kv * hd)
        y = y.unflatten(-1, (self.n_kv, self.head_dim))                         # (..., n_kv, hd)
        y = y.repeat_interleave(self.group, dim=-2).flatten(-2)                 # (..., n_heads * hd)
        out = out_features or y.shape[-1]
        return y[..., :out]


# ----------------------------------------------------------------------------------------------- factories
def shared_group(layer: int, n_layers: int, n_groups: int, scheme: str) -> int:
    """Which shared weight set layer ``layer`` uses: ``cycle`` (repeat-all-over) l mod S, ``sequence`` floor(l S / L)."""
    if scheme == "cycle":
        return layer % n_groups
    if scheme == "sequence":
        return layer * n_groups // n_layers
    raise ValueError(f"scheme={scheme!r}; allowed: cycle, sequence")


def lowrank_rank(d_in: int, d_out: int, n_layers: int, n_atoms: int) -> int:
    """The rank whose L layers of factors come nearest MASA's budget per projection type (S d_in d_out + L S)."""
    return max(1, int(round((n_atoms * d_in * d_out + n_layers * n_atoms) / (n_layers * (d_in + d_out)))))


def make_proj_factory(arm: str, cfg: TFConfig, n_atoms: int, rank: int | None = None, n_kv_heads: int = 1) -> Callable:
    """``proj_factory(in, out, role, layer, bias)`` of an arm (roles fc1 / fc2 always dense)."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    if arm in ("masa", "cycle", "sequence") and not 1 <= n_atoms <= cfg.n_layers:
        raise ValueError(f"n_atoms={n_atoms} outside 1..n_layers={cfg.n_layers}")
    if arm == "gqa" and cfg.n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} does not divide n_heads={cfg.n_heads}")
    if arm == "full":
        return default_proj
    shared: dict = {}

    def factory(d_in: int, d_out: int, role: str, layer: int, bias: bool = True) -> nn.Module:
        if role not in ATTN_ROLES:
            return default_proj(d_in, d_out, role, layer, bias)
        if arm == "masa":
            if role not in shared:
                shared[role] = AtomDictionary(n_atoms, d_in, d_out)
            return AtomLinear(shared[role], bias)
        if arm in ("cycle", "sequence"):
            key = (role, shared_group(layer, cfg.n_layers, n_atoms, arm))
            if key not in shared:
                shared[key] = DynamicLinear(d_in, d_out, bias)
            return shared[key]
        if arm == "lowrank":
            r = rank or lowrank_rank(d_in, d_out, cfg.n_layers, n_atoms)
            return LowRankLinear(d_in, d_out, r, bias)
        # gqa: Q and O dense, K and V with n_kv_heads heads
        if role in ("k", "v"):
            return GQALinear(d_in, n_kv_heads, cfg.head_dim, cfg.n_heads // n_kv_heads, bias)
        return default_proj(d_in, d_out, role, layer, bias)

    return factory


def tf_config(cfg: dict) -> TFConfig:
    return TFConfig(kind="causal", d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                    head_dim=cfg["d_model"] // cfg["n_heads"], mlp_hidden=cfg["mlp_hidden"], max_len=cfg["seq_len"],
                    bias=cfg["bias"], dropout=0.0)


def build_model(arm: str, cfg: dict, seed: int) -> TinyTransformer:
    """The arm's causal byte LM, initialised from ``seed`` (dense weights: the kit's GPT-2 init)."""
    torch.manual_seed(seed)
    tc = tf_config(cfg)
    return TinyTransformer(tc, make_proj_factory(arm, tc, cfg["n_atoms"], cfg.get("lowrank_rank"), cfg["n_kv_heads"]))


# ----------------------------------------------------------------------------------------------- accounting
def unique_params(modules) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def attention_params(model: TinyTransformer) -> int:
    """Distinct parameters of every layer's Q, K, V, O projections (shared atoms / shared layers counted once)."""
    return unique_params([getattr(b, r) for b in model.blocks for r in ATTN_ROLES])


def total_params(model: TinyTransformer) -> int:
    return unique_params([model])


def attention_budget_formula(arm: str, d: int, n_layers: int, n_heads: int, n_atoms: int, rank: int | None = None,
                             n_kv_heads: int = 1, bias: bool = False) -> int:
    """Attention parameters by hand (q/k/v width = d, head_dim = d / n_heads): the reference the tests check."""
    L, S, hd, b = n_layers, n_atoms, d // n_heads, int(bias)
    if arm == "full":
        return 4 * L * (d * d + b * d)
    if arm == "masa":
        return 4 * (S * d * d + L * S + L * b * d)
    if arm in ("cycle", "sequence"):
        return 4 * S * (d * d + b * d)
    if arm == "lowrank":
        r = rank or lowrank_rank(d, d, L, S)
        return 4 * L * (r * 2 * d + b * d)
    if arm == "gqa":
        return L * (2 * (d * d + b * d) + 2 * (d * n_kv_heads * hd + b * n_kv_heads * hd))
    raise ValueError(arm)


# ----------------------------------------------------------------------------------------------- training / evaluation
def unigram_perplexity(train_tokens: torch.Tensor, eval_targets: torch.Tensor, vocab: int = 256) -> float:
    """Perplexity of the add-one-smoothed byte unigram model of ``train_tokens`` on ``eval_targets``."""
    return math.exp(unigram_nll(train_tokens, eval_targets, vocab))


def perplexity(model: TinyTransformer, data: dict, split: str, batch_size: int = 256) -> float:
    """exp(mean next-byte cross-entropy) over every target of ``data[split]``."""
    return math.exp(lm_nll(model, *data[split], batch_size=batch_size))


def ngram_perplexity(train: tuple, evaluate: tuple, n: int, k: float = 0.1, vocab: int = 256) -> float:
    """Perplexity of the add-``k`` byte ``n``-gram model of the training windows on the targets of ``evaluate``.

    ``train`` / ``evaluate`` are (X, Y) windows as ``lm_data`` gives them; every target sees (like the transformer)
    only the history inside its own window: the last min(n - 1, position) bytes (shorter contexts at the start of a
    window are separate, shorter n-grams). p(b | ctx) = (count(ctx, b) + k) / (count(ctx) + k * vocab). A reference
    that needs no attention for n <= 2 (the token itself predicts the next) and only a fixed short look-back for n = 3.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")

    def keys(X: torch.Tensor, Y: torch.Tensor):
        seq = torch.cat([X[:, :1], Y], 1).numpy().astype(np.int64)  # (N, T + 1): the window's bytes
        N, T1 = seq.shape
        ctx_keys, full_keys = [], []
        for t in range(1, T1):  # target seq[:, t]
            c = min(n - 1, t)
            ctx = np.full(N, c, dtype=np.int64)  # the context length marks the key
            for j in range(t - c, t):
                ctx = ctx * vocab + seq[:, j]
            ctx_keys.append(ctx)
            full_keys.append(ctx * vocab + seq[:, t])
        return np.concatenate(ctx_keys), np.concatenate(full_keys)

    def count(train_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
        u, c = np.unique(train_keys, return_counts=True)
        i = np.clip(np.searchsorted(u, query), 0, len(u) - 1)
        return np.where(u[i] == query, c[i], 0).astype(np.float64)

    tc, tf = keys(*train)
    ec, ef = keys(*evaluate)
    p = (count(tf, ef) + k) / (count(tc, ec) + k * vocab)
    return float(np.exp(-np.log(p).mean()))


@torch.no_grad()
def perplexity_without_attention(model: TinyTransformer, data: dict, split: str, batch_size: int = 256) -> float:
    """:func:`perplexity` with every block's attention output replaced by zeros (each position then sees only its own
    byte: a learned bigram predictor); how much the trained model relies on attention at all."""
    def zero_attention(x, causal, mask=None):
        return torch.zeros_like(x), None, None, None

    for b in model.blocks:
        b.attention = zero_attention  # instance attribute shadows Block.attention
    try:
        return perplexity(model, data, split, batch_size)
    finally:
        for b in model.blocks:
            del b.attention


def no_decay_params(model: TinyTransformer) -> list:
    """The parameters trained without weight decay: every vector (LayerNorm gains, biases, MASA coefficients)."""
    return [p for p in model.parameters() if p.ndim < 2]


def train_arm(arm: str, data: dict, cfg: dict, seed: int) -> tuple[TinyTransformer, list[float]]:
    """Train one arm with the recipe every arm shares (AdamW, cosine with linear warm-up, clipping; no weight decay
    on vectors: LayerNorm gains, biases and MASA coefficients)."""
    from ..nas.harness import train_model

    model = build_model(arm, cfg, seed)
    no_decay = no_decay_params(model)
    losses = train_model(model, data, cfg["steps"], lambda m, x, y, step: lm_loss(m, x, y), lr=cfg["lr"],
                         optimizer="adamw", betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                         no_decay=no_decay, batch_size=cfg["batch_size"], seed=seed, schedule="cosine",
                         warmup_steps=cfg["warmup_steps"], grad_clip=cfg["grad_clip"])
    return model, losses


def coefficients(model: TinyTransformer) -> dict[str, np.ndarray]:
    """MASA's learned coefficients per role as (L, S) arrays."""
    return {r: np.stack([getattr(b, r).coef.detach().numpy() for b in model.blocks]) for r in ATTN_ROLES}


def layer_weight_cosine(model: TinyTransformer, role: str) -> np.ndarray:
    """(L, L) cosine similarity between the layers' flattened ``role`` weights (any arm with .weight())."""
    Ws = []
    for b in model.blocks:
        p = getattr(b, role)
        W = p.linear.weight if isinstance(p, DynamicLinear) else p.weight()
        Ws.append(W.detach().reshape(-1))
    W = F.normalize(torch.stack(Ws), dim=1)
    return (W @ W.T).numpy()


__all__ = ["AtomDictionary", "AtomLinear", "LowRankLinear", "GQALinear", "ARMS", "EQUAL_BUDGET", "ATTN_ROLES",
           "make_proj_factory", "build_model", "tf_config", "shared_group", "lowrank_rank", "attention_params",
           "total_params", "attention_budget_formula", "unigram_perplexity", "ngram_perplexity", "perplexity",
           "perplexity_without_attention", "no_decay_params", "train_arm",
           "coefficients", "layer_weight_cosine"]
