"""PA&DA: Jointly Sampling PAth and DAta for Consistent NAS (Lu et al., CVPR 2023), https://arxiv.org/abs/2302.14772.

One-shot NAS on the NAS-Bench-201 cell space: a single-path (SPOS) supernet whose path (op per edge) and training data
are drawn by importance sampling instead of uniformly. Follows the official code, github.com/ShunLu91/PA-DA,
``nasbench201/train_panda_201.py`` (function names in brackets):

* PATH importance [operatio_gradient_norm_prob]: after each step, for every searched cell and every edge whose sampled op
  has weights (the two convolutions), the norm of that conv's gradient; summed per op over cells and divided by how
  many edges of the path use the op; the per-op running value is ``mean(old, new)`` (factor-1/2 EMA, reset to 0 every
  epoch). [sample_prob_with_grads_norm] at the end of epoch e: ``p_op = tau_e * g / sum(g) + (1 - tau_e) / 5`` with
  ``tau_e = e / epochs``; the six edges of the next paths are drawn independently from ``p_op``
  [path_importance_sampling]. Parameter-free ops get g = 0, so late in training they are drawn only through the
  uniform share.
* DATA importance: the per-sample gradient norm of the cross-entropy w.r.t. the logits, ``||softmax(z) - onehot(y)||``
  (the last-layer approximation), recorded per training example during the epoch (running ``mean(old, new)``);
  at the end of epoch e ``p_i = tau_e * s_i / sum(s) + (1 - tau_e) / N`` and the next epoch iterates (shuffled) over N
  indices drawn with replacement from p (examples not seen in the epoch have s_i = 0).
* The loss is the plain mean cross-entropy of the batch (the official code does NOT reweight by 1 / (N p));
  ``reweight=True`` gives the unbiased importance-weighted loss of the paper's derivation (an extra arm here).
* SGD (lr 0.05, momentum 0.9, weight decay 2.5e-4), cosine schedule stepped per epoch, gradient clipping at norm 5.

SPOS (the baseline) is the same loop with uniform paths and a plain shuffled epoch (``path_is=data_is=False``).
The gradient variance (the paper's premise and claim; no measuring code in the official repository) is measured by
:func:`gradient_variance`: at a checkpoint, K gradients of the arm's own training loss on (path, minibatch) pairs drawn
from the arm's current sampling distributions; variance = trace of their covariance, E||g - mean g||^2.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .harness import flat_grad
from .samplers import ImportanceSampler
from .space201 import N_EDGES, N_OPS, OPS
from .supernet201 import NB201SuperNet, SearchCell

PARAM_OPS = tuple(i for i, name in enumerate(OPS) if name.startswith("nor_conv"))  # ops with weights: (2, 3)
ARMS = {  # arm -> (path importance, data importance, reweight)
    "spos": (False, False, False),
    "pada": (True, True, False),
    "path_only": (True, False, False),
    "data_only": (False, True, False),
    "pada_is": (True, True, True),
}


# ------------------------------------------------------------------------------------------------ importance signals
def sample_grad_norm(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample norm of d CE_i / d logits_i = softmax(z_i) - onehot(y_i) (the official last-layer approximation)."""
    with torch.no_grad():
        p = F.softmax(logits, dim=1)  # (B, K)
        return torch.linalg.vector_norm(p - F.one_hot(y, p.shape[1]).to(p.dtype), dim=1)  # (B,)


def op_grad_norms(net: NB201SuperNet, arch) -> list[float]:
    """This step's per-op gradient-norm signal [operatio_gradient_norm_prob]: for each op with weights, the sum over
    searched cells and path edges using it of ||grad conv.weight|| (+ ||grad conv.bias|| where the conv has a bias),
    divided by the number of path edges using it; 0 for ops without weights or not on the path."""
    sums = [0.0] * N_OPS
    for cell in net.cells:
        if not isinstance(cell, SearchCell):
            continue
        for e in range(N_EDGES):
            o = int(arch[e])
            if o not in PARAM_OPS:
                continue
            conv = cell.edges[e].ops[o][1]
            sums[o] += float(conv.weight.grad.norm())
            if conv.bias is not None:
                sums[o] += float(conv.bias.grad.norm())
    arch = [int(o) for o in arch]
    return [s / arch.count(o) if s != 0.0 else 0.0 for o, s in enumerate(sums)]


def ema_half(old: float, new: float) -> float:
    """The official running value np.mean([old, new])."""
    return 0.5 * (old + new)


def update_path_norms(running: list[float], step_norms: list[float]) -> list[float]:
    """Official update: an op with a non-zero signal this step gets mean(old, new); the others keep their value."""
    return [ema_half(r, s) if s != 0.0 else r for r, s in zip(running, step_norms)]


def mix_probs(norms, tau: float) -> np.ndarray:
    """tau * norms / sum(norms) + (1 - tau) * uniform (the official smoothing of both distributions); uniform when all
    norms are 0."""
    g = np.asarray(norms, dtype=float)
    n = len(g)
    if g.sum() <= 0:
        return np.full(n, 1.0 / n)
    return ImportanceSampler(g, np.random.default_rng(0), smoothing=1.0 - tau).probs


def update_sample_norms(running: np.ndarray, indices, norms) -> np.ndarray:
    """Per-example running gradient norm of one epoch (official: first visit sets it, later visits mean(old, new))."""
    s = running.copy()
    for i, g in zip(indices, norms):
        s[i] = ema_half(s[i], g) if s[i] != 0 else g
    return s


# ------------------------------------------------------------------------------------------------ unbiased IS loss
def importance_weights(probs, idx) -> np.ndarray:
    """1 / (N p_i) for the drawn items ``idx`` of a distribution ``probs`` over N items."""
    probs = np.asarray(probs, dtype=float)
    return 1.0 / (len(probs) * probs[np.asarray(idx)])


def path_weight(op_probs, arch) -> float:
    """Importance weight of a path whose edges were drawn independently from ``op_probs``: prod_e 1 / (5 p(op_e))."""
    return float(np.prod(importance_weights(op_probs, [int(o) for o in arch])))


def weighted_loss(loss_per_sample: torch.Tensor, data_w=None, path_w: float = 1.0) -> torch.Tensor:
    """mean_i path_w * data_w_i * l_i: unbiased for the uniform mean loss over data and paths (``reweight=True``)."""
    w = torch.ones_like(loss_per_sample) if data_w is None else torch.as_tensor(data_w, dtype=loss_per_sample.dtype)
    return (path_w * w * loss_per_sample).mean()


# ------------------------------------------------------------------------------------------------ gradient variance
def gradient_variance(net: NB201SuperNet, X: torch.Tensor, y: torch.Tensor, op_probs, data_probs, *,
                      draws: int, batch_size: int, rng: np.random.Generator, reweight: bool = False) -> dict:
    """Trace of the covariance of the supernet's weight gradient over ``draws`` (path, minibatch) pairs drawn from
    the given distributions (paths: 6 edges iid from ``op_probs``; batch: ``batch_size`` indices with replacement from
    ``data_probs``), the loss being the arm's training loss. Works on a copy (BN statistics untouched).
    Returns {"var": E||g - g_bar||^2 (unbiased, K - 1), "mean_sq": ||g_bar||^2, "rel": var / mean_sq}."""
    m = copy.deepcopy(net)
    m.train()
    params = m.weight_parameters()
    grads = []
    for _ in range(draws):
        arch = tuple(int(o) for o in rng.choice(N_OPS, size=N_EDGES, p=op_probs))
        idx = rng.choice(len(y), size=batch_size, replace=True, p=data_probs)
        m.zero_grad(set_to_none=True)
        lps = F.cross_entropy(m(X[idx], arch), y[idx], reduction="none")
        if reweight:
            loss = weighted_loss(lps, importance_weights(data_probs, idx), path_weight(op_probs, arch))
        else:
            loss = lps.mean()
        loss.backward()
        grads.append(flat_grad(params).double())
    G = torch.stack(grads)  # (K, P)
    gbar = G.mean(0)
    var = float(((G - gbar) ** 2).sum(1).sum() / (len(G) - 1))
    msq = float((gbar ** 2).sum())
    return {"var": var, "mean_sq": msq, "rel": var / msq if msq > 0 else float("nan")}


# ------------------------------------------------------------------------------------------------ training
@dataclass
class TrainLog:
    loss: list = field(default_factory=list)  # mean training loss per epoch
    op_probs: list = field(default_factory=list)  # path distribution used in each epoch
    data_tv: list = field(default_factory=list)  # total variation of the data distribution from uniform, per epoch
    grad_var: dict = field(default_factory=dict)  # epoch -> gradient_variance(...)


def train_supernet(net: NB201SuperNet, data: dict, *, arm: str, epochs: int, batch_size: int, lr: float,
                   momentum: float, weight_decay: float, clip: float, seed: int, var_epochs=(), var_draws: int = 16,
                   var_batch: int | None = None) -> TrainLog:
    """Train ``net`` with the arm's sampling (``ARMS``); the official epoch loop of train_panda_201.py (SPOS:
    train_baselines_201.py --method spos). ``var_epochs``: after these epochs (1-based count of finished epochs), the
    gradient variance under the distributions of the NEXT epoch is measured on a copy with a separate generator."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    path_is, data_is, reweight = ARMS[arm]
    X, y = data["train"]
    n = len(y)
    rng = np.random.default_rng(seed)
    vrng = np.random.default_rng([seed, 7919])
    opt = torch.optim.SGD(net.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    op_probs = np.full(N_OPS, 1.0 / N_OPS)
    data_probs = np.full(n, 1.0 / n)
    running_idx = np.arange(n)
    log = TrainLog()
    for epoch in range(epochs):
        tau = epoch / epochs  # official: args.tau = args.path_tau = epoch / args.epochs
        net.train()
        path_norms = [0.0] * N_OPS
        seen_idx, seen_norm, losses = [], [], []
        order = running_idx[rng.permutation(n)] if data_is else rng.permutation(n)  # DataLoader(shuffle=True)
        log.op_probs.append(op_probs.tolist())
        log.data_tv.append(float(0.5 * np.abs(data_probs - 1.0 / n).sum()))
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            arch = tuple(int(o) for o in rng.choice(N_OPS, size=N_EDGES, p=op_probs))
            opt.zero_grad(set_to_none=True)
            logits = net(X[idx], arch)
            lps = F.cross_entropy(logits, y[idx], reduction="none")
            gn = sample_grad_norm(logits, y[idx])
            if reweight:
                loss = weighted_loss(lps, importance_weights(data_probs, idx), path_weight(op_probs, arch))
            else:
                loss = lps.mean()
            loss.backward()
            nn.utils.clip_grad_norm_(net.weight_parameters(), clip)
            opt.step()
            if path_is:
                path_norms = update_path_norms(path_norms, op_grad_norms(net, arch))
            seen_idx.extend(idx.tolist())
            seen_norm.extend(gn.tolist())
            losses.append(float(loss.detach()))
        sched.step()
        log.loss.append(float(np.mean(losses)))
        if path_is:
            op_probs = mix_probs(path_norms, tau)
        if data_is:
            s = update_sample_norms(np.zeros(n), seen_idx, seen_norm)
            data_probs = mix_probs(s, tau)
            running_idx = rng.choice(n, size=n, replace=True, p=data_probs)
        if epoch + 1 in set(var_epochs):
            log.grad_var[epoch + 1] = gradient_variance(net, X, y, op_probs, data_probs, draws=var_draws,
                                                        batch_size=var_batch or batch_size, rng=vrng,
                                                        reweight=reweight)
    return log


def rank_children(net: NB201SuperNet, cells, data: dict, calib: int = 1024) -> list[float]:
    """Validation accuracy of every cell as a child of ``net`` (inherited weights, BN recalibrated)."""
    from .harness import evaluate_child

    return [evaluate_child(net, tuple(c), data, "val", calib=calib) for c in cells]


def tv_from_uniform(p) -> float:
    p = np.asarray(p, dtype=float)
    return float(0.5 * np.abs(p - 1.0 / len(p)).sum())


def mean_log(xs) -> float:
    return float(np.mean([math.log(x) for x in xs]))
