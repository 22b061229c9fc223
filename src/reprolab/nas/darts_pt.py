"""DARTS-PT: perturbation-based architecture selection in differentiable NAS (Wang et al., ICLR 2021, arXiv 2108.04392).

Follows the official NAS-Bench-201 code, ruocwang/darts-pt (``nasbench201/``):

* supernet training = first-order DARTS (``train_search.py`` ``train``, ``architect_ig.py`` ``_step_fo``): per step one
  random batch of the weight half and one of the architecture half; the alphas take an Adam step on the architecture
  batch's loss (lr ``arch_lr``, betas (0.5, 0.999), weight decay ``arch_weight_decay``), then the weights an SGD step on
  the weight batch's loss (momentum, weight decay, gradient norm clipped to ``grad_clip``), cosine learning rate from
  ``lr`` to ``lr_min``; mixture weights = softmax(alphas) per edge (``search_model_darts.py``), the candidate ops'
  BatchNorms non-affine (``reprolab.nas.supernet201.NB201SuperNet``).
* DARTS' selection = argmax of alphas per edge (``search_model.py`` ``genotype``).
* DARTS-PT (``projection.py`` ``pt_project`` + ``search_model_darts_proj.py``): starting from the trained supernet, the
  weight optimizer is reset to SGD at ``lr / 10`` (constant), and for ``proj_intv * (n_edges - 1)`` fine-tuning
  "epochs" (here: blocks of ``tune_steps`` steps) the supernet keeps training exactly as in the search (alphas too);
  at the start of block 0, proj_intv, 2 proj_intv, ... and of the last block one still undecided edge is drawn at
  random (``edge_decision random``) and projected: for every op of that edge in the official op order, the op's
  weight is set to 0 in the (projected) mixture weights, the supernet is evaluated on the whole architecture half with
  BatchNorm in train mode (``infer(..., eval=False)``: batch statistics), and the op whose removal gives the LOWEST
  accuracy (``proj_crit acc``, strict ``<``: the first such op in the official order wins ties) or the HIGHEST loss
  (``proj_crit loss``) is kept; the edge's weights become that op's one-hot vector from then on
  (``get_projected_weights``; no gradient reaches the alphas of a decided edge). The selected cell is the projected
  one-hot of every edge.

The op order of the official code is ``OFFICIAL_OP_ORDER`` (``cell_operations.py`` ``NAS_BENCH_201``); our cells use
``space201.OPS`` (NASLib's order). Only tie-breaking depends on the order: we iterate the official order so ties break
as in the official code.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import space201
from .space201 import N_EDGES, N_OPS, OPS

OFFICIAL_OP_ORDER = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
OFFICIAL_ITER = tuple(OPS.index(o) for o in OFFICIAL_OP_ORDER)  # our op indices, in the official iteration order
SKIP = OPS.index("skip_connect")
CRITS = ("acc", "loss")


# ------------------------------------------------------------------------------------------------ selection helpers
def argmax_cell(alphas: torch.Tensor) -> tuple[int, ...]:
    """DARTS' discretisation: per edge the op of largest alpha (first in the official op order on an exact tie,
    as ``torch.argmax`` over the official layout)."""
    a = alphas.detach()
    out = []
    for e in range(a.shape[0]):
        best = None
        for o in OFFICIAL_ITER:
            if best is None or float(a[e, o]) > float(a[e, best]):
                best = o
        out.append(int(best))
    return tuple(out)


def count_skips(cell) -> int:
    return int(sum(int(o) == SKIP for o in cell))


def mask_op(weights: torch.Tensor, edge: int, op: int) -> torch.Tensor:
    """A copy of the (6, 5) mixture weights with op ``op`` of edge ``edge`` removed (its weight set to 0, the rest
    untouched, not renormalised: ``proj_mask[opid] = 0; weights[eid] *= proj_mask``)."""
    w = weights.clone()
    w[edge, op] = 0.0
    return w


def projected_weights(alphas: torch.Tensor, proj: torch.Tensor, undecided: torch.Tensor) -> torch.Tensor:
    """softmax(alphas) per edge, decided edges replaced by their one-hot row (no gradient to those alphas)."""
    w = torch.softmax(alphas, dim=-1)
    return torch.where(undecided[:, None], w, proj)


@torch.no_grad()
def evaluate_mixture(net: nn.Module, weights: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the supernet with mixture ``weights`` on (X, y) in batches of ``batch_size``,
    BatchNorm in TRAIN mode (batch statistics, the official ``infer(eval=False)``); the running statistics it updates
    are restored afterwards (they are never used by the method)."""
    state = {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches" in k}
    was = net.training
    net.train()
    w = weights.detach()
    correct, loss, n = 0, 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = X[i:i + batch_size], y[i:i + batch_size]
        logits = net(xb, w)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        n += len(yb)
    net.load_state_dict(state, strict=False)
    net.train(was)
    return correct / n, loss / n


def select_op(score_fn, weights: torch.Tensor, edge: int, crit: str = "acc") -> tuple[int, list[dict]]:
    """DARTS-PT's op choice on one edge: remove each op in turn (official order), score the supernet
    (``score_fn(weights) -> (acc, loss)``), keep the op whose removal hurts most: lowest accuracy (``crit='acc'``) or
    highest loss (``'loss'``); strict comparison, so the first op in the official order wins a tie."""
    if crit not in CRITS:
        raise ValueError(f"proj_crit={crit!r}; allowed: {CRITS}")
    best_op, best = None, None
    table = []
    for o in OFFICIAL_ITER:
        acc, loss = score_fn(mask_op(weights, edge, o))
        table.append({"op": int(o), "acc": float(acc), "loss": float(loss)})
        v = acc if crit == "acc" else loss
        if best is None or (v < best if crit == "acc" else v > best):
            best, best_op = v, int(o)
    return best_op, table


# ------------------------------------------------------------------------------------------------------- training
class DartsTrainer:
    """First-order DARTS on an ``NB201SuperNet`` with the official optimisers; also runs DARTS-PT's fine-tuning with
    projected weights (``self.proj`` / ``self.undecided``)."""

    def __init__(self, net: nn.Module, data: dict, cfg: dict, seed: int):
        self.net, self.cfg = net, cfg
        self.Xw, self.yw = (torch.as_tensor(a) for a in data["train"])  # weight half
        self.Xa, self.ya = (torch.as_tensor(a) for a in data["val"])  # architecture half (also the projection set)
        self.g = torch.Generator().manual_seed(int(seed))
        self.w_opt = torch.optim.SGD(net.weight_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                     weight_decay=cfg["weight_decay"])
        self.a_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg["arch_lr"], betas=(0.5, 0.999),
                                      weight_decay=cfg["arch_weight_decay"])
        self.proj = torch.zeros(N_EDGES, N_OPS)
        self.undecided = torch.ones(N_EDGES, dtype=torch.bool)

    def weights(self) -> torch.Tensor:
        return projected_weights(self.net.alphas, self.proj, self.undecided)

    def _batch(self, X, y):
        i = torch.randperm(len(y), generator=self.g)[:self.cfg["batch_size"]]
        return X[i], y[i]

    def step(self) -> float:
        """One first-order DARTS step: alphas on an architecture batch, then weights on a weight batch."""
        net = self.net
        net.train()
        xw, yw = self._batch(self.Xw, self.yw)
        xa, ya = self._batch(self.Xa, self.ya)
        self.w_opt.zero_grad()
        self.a_opt.zero_grad()
        F.cross_entropy(net(xa, self.weights()), ya).backward()
        self.a_opt.step()
        self.w_opt.zero_grad()
        self.a_opt.zero_grad()
        loss = F.cross_entropy(net(xw, self.weights()), yw)
        loss.backward()
        nn.utils.clip_grad_norm_(net.weight_parameters(), self.cfg["grad_clip"])
        self.w_opt.step()
        return float(loss)

    def search(self, steps: int) -> list[float]:
        """DARTS supernet training: ``steps`` steps, cosine learning rate lr -> lr_min."""
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=steps, eta_min=self.cfg["lr_min"])
        losses = []
        for _ in range(steps):
            losses.append(self.step())
            sched.step()
        return losses

    def score(self, weights: torch.Tensor) -> tuple[float, float]:
        return evaluate_mixture(self.net, weights, self.Xa, self.ya, self.cfg["batch_size"])

    def project(self, rng: np.random.Generator) -> dict:
        """Project one random undecided edge (``edge_decision random``) onto its most critical op."""
        remain = np.flatnonzero(self.undecided.numpy())
        edge = int(rng.choice(remain))
        op, table = select_op(self.score, self.weights().detach(), edge, self.cfg["proj_crit"])
        self.proj[edge] = 0.0
        self.proj[edge, op] = 1.0
        self.undecided[edge] = False
        return {"edge": edge, "op": op, "table": table}

    def pt_project(self, seed: int) -> tuple[tuple[int, ...], list[dict]]:
        """DARTS-PT's ``pt_project``: reset the weight optimizer (SGD, lr / 10, constant), then
        ``proj_intv * (n_edges - 1)`` fine-tuning blocks of ``tune_steps`` steps, projecting one edge at the start of
        blocks 0, proj_intv, ... and of the last block. Returns the selected cell and the projection log."""
        cfg = self.cfg
        self.w_opt = torch.optim.SGD(self.net.weight_parameters(), lr=cfg["lr"] / 10, momentum=cfg["momentum"],
                                     weight_decay=cfg["weight_decay"])
        rng = np.random.default_rng(int(seed))
        intv = int(cfg["proj_intv"])
        blocks = intv * (N_EDGES - 1)
        log = []
        for b in range(blocks):
            if b % intv == 0 or b == blocks - 1:
                log.append(self.project(rng))
            for _ in range(int(cfg["tune_steps"])):
                self.step()
        assert not bool(self.undecided.any()), "every edge must be projected"
        return tuple(int(o) for o in self.proj.argmax(1)), log


def run_supernet(seed: int, data: dict, cfg: dict) -> dict:
    """One supernet seed: DARTS search, argmax cell; DARTS-PT projection (with fine-tuning) from the same supernet."""
    from .supernet201 import NB201SuperNet

    torch.manual_seed(int(seed))
    X = torch.as_tensor(data["train"][0])
    net = NB201SuperNet(cfg["channels"], cfg["n_cells"], int(cfg.get("num_classes", 10)), int(X.shape[1]),
                        affine=False, track_running_stats=True)
    tr = DartsTrainer(net, data, cfg, seed)
    losses = tr.search(int(cfg["search_steps"]))
    alphas = net.alphas.detach().clone()
    argmax = argmax_cell(alphas)
    mix_acc, mix_loss = tr.score(torch.softmax(alphas, -1))
    argmax_acc, _ = tr.score(F.one_hot(torch.tensor(argmax), N_OPS).float())
    pt_tr = DartsTrainer(copy.deepcopy(net), data, cfg, seed + 10_000)
    pt_tr.a_opt.load_state_dict(tr.a_opt.state_dict())  # the architecture optimiser continues (checkpoint resume)
    pt_cell, log = pt_tr.pt_project(seed)
    pt_acc, _ = pt_tr.score(pt_tr.weights().detach())
    return {"seed": int(seed), "argmax": argmax, "pt": pt_cell, "alphas": alphas.numpy().round(6).tolist(),
            "softmax": torch.softmax(alphas, -1).numpy().round(6).tolist(),
            "search_loss_last": float(np.mean(losses[-20:])), "supernet_val_acc": mix_acc,
            "supernet_val_loss": mix_loss, "argmax_inherited_val_acc": argmax_acc, "pt_inherited_val_acc": pt_acc,
            "projection": log, "pt_order": [r["edge"] for r in log]}


# -------------------------------------------------------------------------------------------- standalone truth
def truth_recipe(gt: dict) -> dict:
    """The ground truth's training recipe (from its meta), for ``groundtruth.train_cell``."""
    m = gt["meta"]
    return {k: m[k] for k in ("channels", "cells_per_stage", "epochs", "batch_size", "lr", "momentum", "weight_decay")}


def true_accuracy(cell, gt: dict, data: dict, cache: dict, seeds=None) -> dict:
    """Per-seed standalone test/val accuracy of ``cell`` with the ground truth's recipe and training ``seeds`` (a
    subset of the ground truth's; default all): looked up when the cell is one of the ground truth's cells, else
    trained here (``groundtruth.train_cell``, same recipe and seeds). ``cache`` maps cell -> result."""
    from .groundtruth import train_cell

    cell = tuple(int(o) for o in cell)
    if cell in cache:
        return cache[cell]
    seeds = [int(s) for s in (gt["meta"]["seeds"] if seeds is None else seeds)]
    missing = sorted(set(seeds) - {int(s) for s in gt["meta"]["seeds"]})
    if missing:
        raise ValueError(f"truth seeds {missing} are not seeds of the ground truth {gt['meta']['seeds']}")
    rec = next((c for c in gt["cells"] if tuple(c["cell"]) == cell), None)
    if rec is not None:
        out = {"test": [float(rec["test_acc"][str(s)]) for s in seeds],
               "val": [float(rec["val_acc"][str(s)]) for s in seeds], "source": "groundtruth"}
    else:
        recipe = truth_recipe(gt)
        runs = [train_cell(cell, data, s, recipe) for s in seeds]
        out = {"test": [r["test_acc"] for r in runs], "val": [r["val_acc"] for r in runs], "source": "trained"}
    out["test_mean"] = float(np.mean(out["test"]))
    out["arch"] = space201.to_str(cell)
    cache[cell] = out
    return out
