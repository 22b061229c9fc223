"""Mixture-of-Supernets (MoS; Jawahar, Yang, Liu, Lakshmanan, Abdul-Mageed, Mukherjee, arXiv 2306.04845).

Official code: github UBC-NLP/MoS, ``mos-mt/mos-mt`` (a fork of HAT / fairseq):
``fairseq/models/transformer_super.py`` (``TransformerEncoderLayer.__init__`` :971-1184 builds the routers and the
extra experts, ``set_sample_config`` :1222-1234 feeds the architecture encoding, ``forward`` :1296-1342 mixes the
expert weights), ``fairseq/modules/linear_super.py`` (HAT first-k slicing), ``fairseq/utils.py:591``
(``get_config_features``: the router's input), ``train.py:271-276`` (sandwich rule: one random child + the largest +
the smallest per step, plain cross-entropy, no distillation), ``generate_script.py`` (defaults: router hidden 128,
``neuronrouting_jack_drop_2L``, sandwich on).

The method, as in the official code (here for a decoder-only byte LM built from ``reprolab.tf.tiny``):

- Each feed-forward projection (fc1, fc2; the attention projections stay HAT-sliced) holds ``m`` expert weight
  matrices ``E_1..E_m`` of the supernet's largest size.
- A router MLP maps the architecture encoding ``a`` of the active child (embedding width, depth, mean feed-forward
  width, mean heads, each divided by the space's maximum: ``arch_encoding``) to mixing weights.
- **Layer-wise** MoS (``archrouting_jack_drop_2L``): one router per layer, Linear(n_arch, h) -> ReLU -> Dropout(0.1)
  -> Linear(h, m) -> softmax, gives alpha (m,), shared by fc1 and fc2 of that layer; ``W(a) = sum_k alpha_k E_k``,
  then sliced first-k to the child's size.
- **Neuron-wise** MoS (``neuronrouting_jack_drop_2L``): one router per projection whose last layer is itself elastic
  (HAT ``LinearSuper`` with ``m * max_out`` outputs, sliced to ``m * out``), reshaped to (out, m) and softmaxed per
  output neuron: row i of ``W(a)`` is ``sum_k alpha_{i,k} E_k[i, :in]`` (the bias likewise).
- With ``m = 1`` every softmax is 1 and MoS is exactly HAT's plain slicing (tested).

The HAT baseline is ``TinyTransformer`` with the default (sliced) projections; both are trained with the sandwich rule
(:func:`train_supernet`); every evaluated child is also trained standalone for the same number of steps
(:func:`train_standalone`).
"""
from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import DynamicLinear
from ..nas.harness import train_model
from .tiny import TFConfig, TinyTransformer, lm_loss, lm_nll, unigram_nll

ARMS = ("hat", "mos_layer", "mos_neuron")  # the supernet arms; "standalone" is the reference
MODES = ("layer", "neuron")
MOS_ROLES = ("fc1", "fc2")  # official: the feed-forward layers get MoS (transformer_super.py:1018-1019, 1183-1184)
N_ARCH = 4


# ---------------------------------------------------------------------------------------------- architecture encoding
def arch_encoding(tf: TFConfig, child: dict) -> torch.Tensor:
    """The router's input (official ``get_config_features`` aggregated format, ``utils.py:612-660``, divided by
    ``feature_norm``): [embed / max embed, depth / max depth, mean FFN width / max, mean heads / max]."""
    d = int(child["depth"])
    return torch.tensor([child["embed"] / tf.d_model, d / tf.n_layers,
                         float(np.mean(child["mlp"][:d])) / tf.mlp_hidden,
                         float(np.mean(child["heads"][:d])) / tf.n_heads], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- routers
class LayerRouter(nn.Module):
    """``archrouting_jack_drop_2L``: encoding -> alpha (m,) on the simplex."""

    def __init__(self, n_experts: int, hidden: int = 128, dropout: float = 0.1, n_arch: int = N_ARCH):
        super().__init__()
        self.n_experts = n_experts
        self.net = nn.Sequential(nn.Linear(n_arch, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_experts))

    def reset_parameters(self):
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()  # torch's default init (the official nn.Linear layers)

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(enc), dim=-1)


class NeuronRouter(nn.Module):
    """``neuronrouting_jack_drop_2L``: encoding -> alpha (out, m), a softmax over the experts per output neuron; the
    last layer has ``m * max_out`` outputs sliced first-k to ``m * out`` (official ``LinearSuper``)."""

    def __init__(self, n_experts: int, max_out: int, hidden: int = 128, dropout: float = 0.1, n_arch: int = N_ARCH):
        super().__init__()
        self.n_experts, self.max_out = n_experts, max_out
        self.body = nn.Sequential(nn.Linear(n_arch, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.last = nn.Linear(hidden, n_experts * max_out)

    def reset_parameters(self):
        self.body[0].reset_parameters()
        nn.init.xavier_uniform_(self.last.weight)  # LinearSuper._reset_parameters (xavier family), bias 0
        nn.init.zeros_(self.last.bias)

    def forward(self, enc: torch.Tensor, out_features: int) -> torch.Tensor:
        k = self.n_experts * out_features
        z = F.linear(self.body(enc), self.last.weight[:k], self.last.bias[:k])
        return torch.softmax(z.view(out_features, self.n_experts), dim=-1)


# ---------------------------------------------------------------------------------------------- the MoS projection
class MoSLinear(nn.Module):
    """A projection whose weight is an architecture-routed mixture of ``m`` experts, sliced to the child's size.

    Called as ``proj(x, out_features)`` like ``nas.elastic.DynamicLinear`` (input width = ``x.size(-1)``). The
    active architecture encoding lives in the buffer ``arch`` (set by :meth:`MoSTransformer.set_active_subnet`)."""

    def __init__(self, max_in: int, max_out: int, n_experts: int, mode: str, bias: bool = True,
                 router: nn.Module | None = None, hidden: int = 128, dropout: float = 0.1, n_arch: int = N_ARCH):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        if n_experts < 1:
            raise ValueError(f"n_experts={n_experts} must be >= 1")
        self.max_in, self.max_out, self.n_experts, self.mode = max_in, max_out, n_experts, mode
        self.weight = nn.Parameter(torch.empty(n_experts, max_out, max_in))
        self.bias = nn.Parameter(torch.zeros(n_experts, max_out)) if bias else None
        if router is None:
            router = (LayerRouter(n_experts, hidden, dropout, n_arch) if mode == "layer"
                      else NeuronRouter(n_experts, max_out, hidden, dropout, n_arch))
        self.router = router
        self.register_buffer("arch", torch.ones(n_arch))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        nn.init.normal_(self.weight, std=std)  # every expert like the kit's sliced projections (GPT-2 init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.router.reset_parameters()

    def alphas(self, out_features: int) -> torch.Tensor:
        """Layer-wise: (m,); neuron-wise: (out_features, m). Rows sum to one."""
        if self.mode == "layer":
            return self.router(self.arch)
        return self.router(self.arch, out_features)

    def mixed(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W(a)[:out, :in], b(a)[:out]): the mixture of the experts' first-k slices (= the slice of the mixture)."""
        a = self.alphas(out_features)
        E = self.weight[:, :out_features, :in_features]
        B = None if self.bias is None else self.bias[:, :out_features]
        if self.mode == "layer":
            w = torch.einsum("k,koi->oi", a, E)
            b = None if B is None else torch.einsum("k,ko->o", a, B)
        else:
            w = torch.einsum("ok,koi->oi", a, E)
            b = None if B is None else torch.einsum("ok,ko->o", a, B)
        return w, b

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        out = self.max_out if out_features is None else out_features
        w, b = self.mixed(out, x.size(-1))
        return F.linear(x, w, b)


class MoSFactory:
    """``proj_factory`` for ``TinyTransformer``: MoS projections for ``roles`` (default fc1, fc2), the kit's
    ``DynamicLinear`` (HAT slicing) elsewhere. Layer-wise MoS shares one router between a layer's fc1 and fc2
    (official ``arch_expert``, one per layer); neuron-wise gives each projection its own (``fc1_expert``,
    ``fc2_expert``)."""

    def __init__(self, n_experts: int, mode: str, hidden: int = 128, dropout: float = 0.1,
                 roles: tuple = MOS_ROLES):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        self.n_experts, self.mode, self.hidden, self.dropout, self.roles = n_experts, mode, hidden, dropout, roles
        self.layer_routers: dict[int, LayerRouter] = {}

    def __call__(self, in_features: int, out_features: int, role: str, layer: int, bias: bool = True):
        if role not in self.roles:
            return DynamicLinear(in_features, out_features, bias)
        router = None
        if self.mode == "layer":
            router = self.layer_routers.setdefault(layer, LayerRouter(self.n_experts, self.hidden, self.dropout))
        return MoSLinear(in_features, out_features, self.n_experts, self.mode, bias, router, self.hidden,
                         self.dropout)


class MoSTransformer(TinyTransformer):
    """``TinyTransformer`` whose feed-forward projections are MoS layers; ``set_active_subnet`` also sets the
    architecture encoding every router reads."""

    def __init__(self, cfg: TFConfig, n_experts: int = 2, mode: str = "layer", hidden: int = 128,
                 dropout: float = 0.1, roles: tuple = MOS_ROLES):
        super().__init__(cfg, MoSFactory(n_experts, mode, hidden, dropout, roles))
        self.n_experts, self.mode = n_experts, mode
        self.set_active_subnet(self.max_config())

    def mos_layers(self) -> list[MoSLinear]:
        return [m for m in self.modules() if isinstance(m, MoSLinear)]

    def reset_parameters(self):
        super().reset_parameters()  # the kit's init (normal 0.02 on nn.Linear: also hits the routers) ...
        for m in self.mos_layers():
            m.reset_parameters()  # ... then experts normal 0.02 and the routers' official init

    def set_active_subnet(self, cfg: dict) -> None:
        super().set_active_subnet(cfg)
        enc = arch_encoding(self.cfg, self.active_config())
        for m in self.mos_layers():
            m.arch.copy_(enc)

    def get_active_subnet(self):
        raise NotImplementedError("a MoS child is evaluated in place (its weights are the router's mixture)")


# ---------------------------------------------------------------------------------------------- configuration
def tf_config(cfg: dict) -> TFConfig:
    return TFConfig(kind="causal", d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                    head_dim=cfg["head_dim"], mlp_hidden=cfg["mlp_hidden"], vocab_size=256, max_len=cfg["seq_len"],
                    dropout=0.0)


def space_of(cfg: dict) -> dict:
    return {"embed": list(cfg["embed_choices"]), "depth": list(cfg["depth_choices"]),
            "heads": list(cfg["heads_choices"]), "mlp": list(cfg["mlp_choices"])}


def check_space(cfg: dict) -> None:
    tf, space = tf_config(cfg), space_of(cfg)
    for key, top in (("embed", tf.d_model), ("depth", tf.n_layers), ("heads", tf.n_heads), ("mlp", tf.mlp_hidden)):
        if max(space[key]) != top:
            raise ValueError(f"{key}_choices: the largest choice must be the supernet's size {top}")
    for name, (e, d, h, m) in cfg["subnets"].items():
        if e not in space["embed"] or d not in space["depth"] or h not in space["heads"] or m not in space["mlp"]:
            raise ValueError(f"subnet {name}={[e, d, h, m]} is not in the search space {space}")


def subnets(cfg: dict) -> dict[str, dict]:
    """The fixed evaluated children {name: {"embed", "depth", "heads", "mlp"}} from ``cfg["subnets"]``
    ({name: [embed, depth, heads, mlp]}, uniform per layer)."""
    return {n: {"embed": e, "depth": d, "heads": [h] * d, "mlp": [m] * d} for n, (e, d, h, m) in cfg["subnets"].items()}


def build_supernet(arm: str, cfg: dict, seed: int) -> TinyTransformer:
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    tf = tf_config(cfg)
    if arm == "hat":
        return TinyTransformer(tf)
    return MoSTransformer(tf, cfg["n_experts"], arm.split("_")[1], cfg["router_hidden"], cfg["router_dropout"])


# ---------------------------------------------------------------------------------------------- training
def _opt(cfg: dict, seed: int) -> dict:
    return dict(lr=cfg["lr"], optimizer="adamw", betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                batch_size=cfg["batch_size"], seed=seed, schedule="cosine", warmup_steps=cfg["warmup_steps"],
                grad_clip=cfg["grad_clip"])


def step_configs(space: dict, rng: random.Random, sandwich: bool = True) -> list[dict]:
    """One training step's children: a uniformly sampled one (per layer heads / FFN width, HAT ``sample_configs``),
    then, with the sandwich rule, the largest and the smallest (official ``train.py:273-276``)."""
    cs = [TinyTransformer.sample_config(space, rng)]
    if sandwich:
        cs += [TinyTransformer.space_max(space), TinyTransformer.space_min(space)]
    return cs


def sandwich_step(model: TinyTransformer, x, y, configs: list[dict]) -> float:
    """Accumulate the gradients of the children's mean LM loss (fairseq divides the summed gradients by the summed
    sample size, i.e. the mean over the children); returns that mean loss."""
    tot = 0.0
    for c in configs:
        model.set_active_subnet(c)
        loss = lm_loss(model, x, y) / len(configs)
        loss.backward()
        tot += float(loss.detach())
    return tot


def train_supernet(arm: str, data: dict, cfg: dict, seed: int):
    """(model, per-step mean loss) of one supernet arm; children drawn from ``random.Random(seed)`` (the same draws
    for every arm of a seed), batches from ``train_model``'s seeded generator (the same for every arm)."""
    model = build_supernet(arm, cfg, seed)
    space = space_of(cfg)
    rng = random.Random(seed)

    def loss_fn(m, x, y, step):
        return torch.tensor(sandwich_step(m, x, y, step_configs(space, rng, cfg["sandwich"])))

    losses = train_model(model, data, cfg["steps"], loss_fn, **_opt(cfg, seed))
    model.set_active_subnet(model.max_config())
    return model, losses


def train_standalone(child: dict, data: dict, cfg: dict, seed: int):
    """The child as its own ``TinyTransformer`` (plain sliced layers, kit init), trained alone for the same steps,
    batches, optimiser and schedule."""
    torch.manual_seed(seed)
    tf = tf_config(cfg)
    model = TinyTransformer(_child_tf(tf, child))
    losses = train_model(model, data, cfg["steps"], lambda m, x, y, s: lm_loss(m, x, y), **_opt(cfg, seed))
    return model, losses


def _child_tf(tf: TFConfig, child: dict) -> TFConfig:
    """The standalone config of a uniform child (kit ``child_tfconfig`` without building a supernet, so the
    standalone model's initialisation draws from the seed directly)."""
    if len(set(child["heads"])) > 1 or len(set(child["mlp"])) > 1:
        raise ValueError("standalone children must be uniform per layer")
    return replace(tf, d_model=child["embed"], n_layers=child["depth"], n_heads=child["heads"][0],
                   mlp_hidden=child["mlp"][0], loops=tuple(tf.loops[:child["depth"]]))


# ---------------------------------------------------------------------------------------------- evaluation
def perplexity(model: TinyTransformer, X: torch.Tensor, Y: torch.Tensor, child: dict | None = None,
               batch_size: int = 256) -> float:
    """exp(mean next-byte cross-entropy over every target byte), eval mode (router dropout off)."""
    if child is not None:
        model.set_active_subnet(child)
    return math.exp(lm_nll(model, X, Y, batch_size))


def unigram_perplexity(data: dict, split: str = "val") -> float:
    """Perplexity on ``split`` of the add-one-smoothed byte unigram model of the training targets."""
    return math.exp(unigram_nll(data["train"][1], data[split][1]))


def gap_reduction(gap_method: float, gap_hat: float) -> float:
    """Relative reduction 1 - gap_method / gap_hat of the supernet-vs-standalone perplexity gap (0 if gap_hat is
    exactly 0: nothing to reduce)."""
    return 0.0 if gap_hat == 0 else 1.0 - gap_method / gap_hat


def reduction_of_means(gap_method, gap_hat, confidence: float = 0.95) -> tuple[float, list[float] | None]:
    """The relative reduction R = 1 - mean(gap_method) / mean(gap_hat) of paired per-seed gaps, with its Fieller
    interval: the set of R for which the paired t test of mean(gap_method - (1 - R) gap_hat) = 0 does not reject
    (None when that set is unbounded, i.e. mean(gap_hat) is not distinguishable from 0). The claims test the same
    hypothesis at R = threshold_reduction, so R's lower bound > threshold iff the claim's interval is wholly < 0."""
    from scipy import stats

    x, y = np.asarray(gap_method, dtype=float), np.asarray(gap_hat, dtype=float)
    n = len(x)
    est = float(1.0 - x.mean() / y.mean()) if y.mean() != 0 else float("nan")
    if n < 2:
        return est, None
    t2 = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) ** 2
    c = np.cov(x, y, ddof=1) / n  # covariance of the two means
    # (mx - k my)^2 <= t2 (sxx - 2 k sxy + k^2 syy): a k^2 + b k + c0 <= 0, k = 1 - R the ratio of means
    a = y.mean() ** 2 - t2 * c[1, 1]
    b = -2.0 * (x.mean() * y.mean() - t2 * c[0, 1])
    c0 = x.mean() ** 2 - t2 * c[0, 0]
    disc = b * b - 4 * a * c0
    if a <= 0 or disc < 0:
        return est, None
    k1, k2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    return est, [float(1.0 - k2), float(1.0 - k1)]


def router_alphas(model: MoSTransformer, child: dict) -> list:
    """The mixing weights each MoS projection uses for ``child`` (eval mode): layer-wise (m,) per layer, neuron-wise
    the mean over output neurons (m,)."""
    was = model.training
    model.eval()
    model.set_active_subnet(child)
    out = []
    with torch.no_grad():
        for li, blk in enumerate(model.blocks[:child["depth"]]):
            for role in MOS_ROLES:
                p = getattr(blk, role)
                o = child["mlp"][li] if role == "fc1" else child["embed"]
                a = p.alphas(o)
                out.append((a if a.dim() == 1 else a.mean(0)).tolist())
    model.train(was)
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARMS", "MODES", "MOS_ROLES", "arch_encoding", "LayerRouter", "NeuronRouter", "MoSLinear", "MoSFactory",
           "MoSTransformer", "tf_config", "space_of", "check_space", "subnets", "build_supernet", "step_configs",
           "sandwich_step", "train_supernet", "train_standalone", "perplexity", "unigram_perplexity",
           "gap_reduction", "reduction_of_means", "router_alphas", "n_params"]
