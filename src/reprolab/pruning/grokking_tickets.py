"""Grokking Tickets: Lottery Tickets Accelerate Grokking (Minegishi, Iwasawa, Matsuo), arXiv:2310.19470.

https://arxiv.org/abs/2310.19470 -- official code: github.com/gouki510/Grokking-Tickets (model.py OnlyMLP,
train.py, prune.py, pruner.py). The recipe, on modular addition (a + b) mod p with an embedding MLP:

1. train the dense network (AdamW, weight decay, full batch) until it generalises (grokking);
2. prune the ``prune_amount`` smallest-|w| weights of all four matrices, globally (the official ``Mag`` pruner);
3. rewind the surviving weights to their initial values (mask kept) and train again: the *grokking ticket*.

Controls: the dense network with its initial weights scaled to the ticket's weight norm ("norm-matched dense"),
a random mask at initialisation (pruning at init, the official ``Rand`` pruner) and the mask taken from the dense
network on its memorisation plateau, both rewound to init likewise. The memorisation-stage mask is taken at
``mem_step = (step_memorise + dense_step) // 2`` -- halfway between the dense model's first 100% train accuracy and
its 95% test step (a rule set after the review: the first 100% train accuracy comes at ~1% of the run, where the mask
is effectively another pruning-at-init mask); those weights come from re-training the dense model from the same init
for ``mem_step`` steps (deterministic: the same full-batch updates).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .masks import apply_masks, global_magnitude_masks, random_masks, rewind

TARGETS = ("embed", "inproj", "outproj", "unembed")  # every weight matrix is prunable (official generator.py)


# ---------------------------------------------------------------- data
def modular_addition_split(p: int, frac_train: float, seed: int, symmetric: bool = True):
    """All pairs (a, b) (a <= b when ``symmetric``), shuffled with ``random.seed(seed)`` and split (official
    data_module.py gen_train_test). Returns (x_train (n, 2), y_train, x_test, y_test) as int64 tensors."""
    pairs = [(i, j) for i in range(p) for j in range(p) if (i <= j or not symmetric)]
    rnd = random.Random(seed)
    rnd.shuffle(pairs)
    div = int(frac_train * len(pairs))
    x = torch.tensor(pairs, dtype=torch.long)  # (N, 2)
    y = (x[:, 0] + x[:, 1]) % p
    return x[:div], y[:div], x[div:], y[div:]


# ---------------------------------------------------------------- model (official model.py OnlyMLP, num_layers=0)
class Matrix(nn.Module):
    """A bias-free weight matrix; ``forward`` reads ``self.weight`` so ``torch.nn.utils.prune`` can mask it."""

    def __init__(self, rows: int, cols: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols) * std)

    def forward(self) -> torch.Tensor:
        """The weight; calling the module runs prune's forward pre-hook (weight = weight_orig * weight_mask)."""
        return self.weight


class GrokMLP(nn.Module):
    """logits = W_U^T W_out^T relu(W_in (E[:, a] + E[:, b])), no biases (official OnlyMLP.forward).

    Shapes: embed.weight (d_emb, p), inproj.weight (d_model, d_emb), outproj.weight (d_emb, d_model),
    unembed.weight (d_emb, p); init N(0, 1/fan_in) as in the official code (fan_in = p, d_emb, d_model, d_emb)."""

    def __init__(self, p: int = 67, d_emb: int = 500, d_model: int = 48):
        super().__init__()
        self.embed = Matrix(d_emb, p, 1 / np.sqrt(p))
        self.inproj = Matrix(d_model, d_emb, 1 / np.sqrt(d_emb))
        self.outproj = Matrix(d_emb, d_model, 1 / np.sqrt(d_model))
        self.unembed = Matrix(d_emb, p, 1 / np.sqrt(d_emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 2)
        # the official order is relu(sum_t W_in E[:, x_t]) then W_U^T W_out; both products are linear, so they are
        # formed once per step on the p tokens instead of on every example (same function, ~16x fewer FLOPs)
        E, W_in, W_out, W_U = self.embed(), self.inproj(), self.outproj(), self.unembed()
        P = (W_in @ E).T  # (p, d_model): W_in E, one row per token
        h = torch.relu(P[x[:, 0]] + P[x[:, 1]])  # (B, d_model)
        M = W_out.T @ W_U  # (d_model, p): W_out^T W_U
        return h @ M  # (B, p)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official evaluation order (model.py OnlyMLP.forward), for the tests."""
        E, W_in, W_out, W_U = self.embed(), self.inproj(), self.outproj(), self.unembed()
        e = E.T[x]  # (B, 2, d_emb)
        h = torch.relu((e @ W_in.T).sum(1))  # (B, d_model)
        return (h @ W_out.T) @ W_U  # (B, p)

    def targets(self):
        return [(getattr(self, n), "weight") for n in TARGETS]


def weights(model: GrokMLP) -> dict:
    """The current (masked) weight of each target, keyed like the masks. Calls each module, so prune's pre-hook
    recomputes ``weight_orig * weight_mask`` (the attribute ``weight`` is stale after an optimiser step)."""
    return {f"{n}.weight": getattr(model, n)().detach().clone() for n in TARGETS}


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float64 (official utils.py cross_entropy_high_precision)."""
    return F.cross_entropy(logits.double(), y)


# ---------------------------------------------------------------- training
@dataclass
class Run:
    """One training run: accuracy curves every ``eval_every`` steps and the first steps at which thresholds fell."""
    steps: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    step_memorise: int | None = None  # first evaluated step with train accuracy 1.0
    step_generalise: int | None = None  # first evaluated step with test accuracy >= test_target
    snapshots: dict = field(default_factory=dict)  # name -> weights()


def train(model: GrokMLP, data, *, lr: float, weight_decay: float, betas=(0.9, 0.98), max_steps: int,
          eval_every: int, test_target: float, stop_at: float | None = None, snapshot_memorise: bool = False,
          snapshot_at: float | None = None) -> Run:
    """Full-batch AdamW (official train.py / prune.py). Accuracy is taken every ``eval_every`` steps, *before* the
    update (as the official loop logs it); a step count is the number of updates done. Stops when the test accuracy
    reaches ``stop_at`` (default ``test_target``) or at ``max_steps``. Snapshots: the weights at the first evaluated
    step with train accuracy 1.0 (``snapshot_memorise``) and at the first with test accuracy >= ``snapshot_at``."""
    x_tr, y_tr, x_te, y_te = data
    stop_at = test_target if stop_at is None else stop_at
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)
    run = Run()
    for step in range(max_steps + 1):
        logits = model(x_tr)
        if step % eval_every == 0 or step == max_steps:
            with torch.no_grad():
                tr = float((logits.argmax(-1) == y_tr).double().mean())
                te = float((model(x_te).argmax(-1) == y_te).double().mean())
            run.steps.append(step)
            run.train_acc.append(tr)
            run.test_acc.append(te)
            if run.step_memorise is None and tr >= 1.0:
                run.step_memorise = step
                if snapshot_memorise:
                    run.snapshots["memorise"] = weights(model)
            if run.step_generalise is None and te >= test_target:
                run.step_generalise = step
            if snapshot_at is not None and "generalise" not in run.snapshots and te >= snapshot_at:
                run.snapshots["generalise"] = weights(model)
            if te >= stop_at or step == max_steps:
                break
        opt.zero_grad(set_to_none=True)
        loss_fn(logits, y_tr).backward()
        opt.step()
    return run


# ---------------------------------------------------------------- the arms
def masked_from_init(init: dict, masks: dict, p: int, d_emb: int, d_model: int) -> GrokMLP:
    """A fresh network with the initial weights ``init``, pruned by ``masks`` (torch prune) -- the rewound ticket."""
    net = GrokMLP(p, d_emb, d_model)
    apply_masks(net.targets(), masks, model=net)
    rewind(net.targets(), init, model=net)
    return net


def norm_ratio(init: dict, masks: dict) -> float:
    """sum_l ||m_l * theta0_l||_2 / sum_l ||theta0_l||_2 (official prune.py:190-199 with utils.py get_weight_norm):
    the factor that gives the dense initialisation the ticket's L2 weight norm."""
    num = sum(float(torch.linalg.norm(init[k] * masks[k])) for k in init)
    den = sum(float(torch.linalg.norm(init[k])) for k in init)
    return num / den


def scaled_from_init(init: dict, scale: float, p: int, d_emb: int, d_model: int) -> GrokMLP:
    """The dense network with every initial weight multiplied by ``scale`` (official set_weight_ratio)."""
    net = GrokMLP(p, d_emb, d_model)
    with torch.no_grad():
        for n in TARGETS:
            getattr(net, n).weight.copy_(init[f"{n}.weight"] * scale)
    return net


def ticket_masks(trained: dict, amount: float) -> dict:
    """Global magnitude masks from a snapshot of weights (torch prune.global_unstructured, L1)."""
    holders = GrokMLP(*_shape(trained))
    with torch.no_grad():
        for n in TARGETS:
            getattr(holders, n).weight.copy_(trained[f"{n}.weight"])
    return global_magnitude_masks(holders.targets(), amount, model=holders)


def pai_random_masks(init: dict, amount: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(10_000 + seed)
    holders = GrokMLP(*_shape(init))
    return random_masks(holders.targets(), amount, generator=g, model=holders)


def _shape(w: dict) -> tuple[int, int, int]:
    d_emb, p = w["embed.weight"].shape
    d_model = w["inproj.weight"].shape[0]
    return p, d_emb, d_model


# ---------------------------------------------------------------- one seed, every arm
ARMS = ("dense", "ticket", "norm_matched", "pai_random", "memorisation_mask")


def memorisation_step(step_memorise: int | None, dense_step: int) -> int:
    """The rule for the memorisation-stage mask: halfway between memorisation and the dense 95% step (floor)."""
    return (dense_step if step_memorise is None else step_memorise + dense_step) // 2


def run_seed(cfg: dict, seed: int, keep: bool = False) -> dict:
    """Dense run, then the ticket and the three controls under the same optimiser, split and initialisation.

    Returns, per arm: ``step`` (steps to ``test_target``, or the arm's cap if not reached: ``reached`` False),
    the accuracy curves, and the masks' removed counts; plus the dense run's memorisation step and the norm ratio.
    ``keep``: also return ``internals`` (init weights, masks, the snapshots the masks came from), for the tests."""
    torch.manual_seed(seed)
    data = modular_addition_split(cfg["p"], cfg["frac_train"], seed, cfg["symmetric"])
    shape = (cfg["p"], cfg["d_emb"], cfg["d_model"])
    net = GrokMLP(*shape)
    init = weights(net)
    kw = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"], eval_every=cfg["eval_every"],
              test_target=cfg["test_target"])
    stop = max(cfg["test_target"], cfg["ticket_at_test_acc"])
    dense = train(net, data, max_steps=cfg["max_steps"], stop_at=stop, snapshot_memorise=True,
                  snapshot_at=cfg["ticket_at_test_acc"], **kw)
    grokked = dense.step_generalise is not None
    dense_step = dense.step_generalise if grokked else cfg["max_steps"]
    ticket_from = dense.snapshots.get("generalise", weights(net))  # final weights if it never got there
    mem_step = memorisation_step(dense.step_memorise, dense_step)
    torch.manual_seed(seed)
    again = GrokMLP(*shape)  # the same init (same seed), trained again for mem_step updates
    train(again, data, max_steps=mem_step, stop_at=2.0, **{**kw, "eval_every": max(mem_step, 1)})
    mem_from = weights(again)
    masks = {"ticket": ticket_masks(ticket_from, cfg["prune_amount"]),
             "memorisation_mask": ticket_masks(mem_from, cfg["prune_amount"]),
             "pai_random": pai_random_masks(init, cfg["prune_amount"], seed)}
    ratio = norm_ratio(init, masks["ticket"])
    cap = max(cfg["eval_every"], int(np.ceil(cfg["arm_cap"] * dense_step)))
    nets = {"ticket": masked_from_init(init, masks["ticket"], *shape),
            "norm_matched": scaled_from_init(init, ratio, *shape),
            "pai_random": masked_from_init(init, masks["pai_random"], *shape),
            "memorisation_mask": masked_from_init(init, masks["memorisation_mask"], *shape)}
    out = {"seed": seed, "dense_grokked": grokked, "dense_step_memorise": dense.step_memorise,
           "dense_best_train_acc": max(dense.train_acc), "ticket_taken_at": dense.steps[-1] if
           "generalise" not in dense.snapshots else _snap_step(dense, cfg["ticket_at_test_acc"]),
           "mem_mask_taken_at": mem_step, "norm_ratio": ratio, "cap": cap, "n_weights": int(sum(v.numel() for v in init.values())),
           "removed": {k: int(sum(int((~m).sum()) for m in v.values())) for k, v in masks.items()},
           "arms": {"dense": _arm(dense, dense_step)}}
    for name, model in nets.items():
        run = train(model, data, max_steps=cap, **kw)
        out["arms"][name] = _arm(run, run.step_generalise if run.step_generalise is not None else cap)
    if keep:
        out["internals"] = {"init": init, "masks": masks, "ticket_from": ticket_from, "mem_from": mem_from}
    return out


def _snap_step(run: Run, acc: float) -> int:
    return next(s for s, a in zip(run.steps, run.test_acc) if a >= acc)


def _arm(run: Run, step: int) -> dict:
    return {"step": int(step), "reached": run.step_generalise is not None, "step_memorise": run.step_memorise,
            "steps": run.steps, "train_acc": [round(a, 6) for a in run.train_acc],
            "test_acc": [round(a, 6) for a in run.test_acc]}
