"""Loss-landscape measurements shared by the weight-space papers (issue 17).

Follows the metrics of Yang et al., "Taxonomizing local versus global structure in neural network loss landscapes"
(arXiv 2107.11228) as implemented in the official Phase-Transition Model Zoo code (ModelZoos/PhaseTransitionModelZoo,
``src/ptmz/loss_landscape/``):

- :func:`hessian_trace`: Hutchinson's estimator with Rademacher probes and Hessian-vector products averaged over data
  batches (PyHessian ``hessian.trace`` with ``dataloader_hv_product``, same stopping rule);
- :func:`linear_cka`: linear CKA in feature space (Kornblith et al.; ``CKA_utils.feature_space_linear_cka``);
- :func:`mode_connectivity`: the signed ``mc`` of a curve's values (``curve_fitting.compute_mc``; negative = barrier);
- :func:`linear_path` and :func:`bezier_path`: evaluate a loss/error along the straight line or a quadratic Bezier curve
  between two weight vectors; :func:`fit_bezier` trains the bend (``curve_fitting.compute_curve_pair``).

Weights are handled as flat vectors (``torch.nn.utils.parameters_to_vector``); the path tools take a
``forward(theta, X)`` callable (:func:`module_forward` wraps any module with ``torch.func.functional_call``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector


# ---------------------------------------------------------------------------------------------------------- helpers
def param_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(n, p.shape) for n, p in model.named_parameters()]


def unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat vector (P,) -> {name: tensor} in ``model.named_parameters()`` order (views, differentiable)."""
    out, i = {}, 0
    for n, s in param_shapes(model):
        k = int(np.prod(s)) if len(s) else 1
        out[n] = theta[i:i + k].view(s)
        i += k
    if i != theta.numel():
        raise ValueError(f"vector has {theta.numel()} entries, the model {i}")
    return out


def call_with(model: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's output with its parameters replaced by the flat vector ``theta``."""
    return functional_call(model, unflatten(model, theta), (x,))


def flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def module_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """forward(theta, X): the module's output at the flat parameters ``theta`` (the form the path tools take)."""
    return lambda theta, X: call_with(model, theta, X)


@torch.no_grad()
def loss_and_error(forward: Callable, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, error rate in [0, 1]) of ``forward(theta, X)`` on (X, y)."""
    out = forward(theta, X)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) != y).float().mean())


# ------------------------------------------------------------------------------------------------------ Hessian trace
def hvp(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], v: Sequence[torch.Tensor],
        criterion: Callable = nn.functional.cross_entropy) -> list[torch.Tensor]:
    """Hessian-vector product of the loss averaged over ``batches`` (weighted by batch size, as PyHessian's
    ``dataloader_hv_product``): sum_b n_b H_b v / sum_b n_b, by double back-propagation."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    n_tot = 0
    for xb, yb in batches:
        loss = criterion(model(xb), yb)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=list(v))
        acc = [a + h.detach() * xb.shape[0] for a, h in zip(acc, hv)]
        n_tot += xb.shape[0]
    return [a / n_tot for a in acc]


def hessian_trace(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], max_iter: int = 100,
                  tol: float = 1e-3, generator: torch.Generator | None = None,
                  criterion: Callable = nn.functional.cross_entropy) -> tuple[float, list[float]]:
    """Hutchinson's estimate of tr(H) = E_v[v^T H v] with Rademacher v, as PyHessian ``hessian.trace``: draw probes
    until the running mean changes by less than ``tol`` (relative) or ``max_iter`` probes. Returns (mean, samples)."""
    params = [p for p in model.parameters() if p.requires_grad]
    samples: list[float] = []
    trace = 0.0
    for _ in range(max_iter):
        v = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        hv = hvp(model, batches, v, criterion)
        samples.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
        mean = float(np.mean(samples))
        if abs(mean - trace) / (trace + 1e-6) < tol:  # PyHessian's rule (hessian.py trace)
            break
        trace = mean
    return float(np.mean(samples)), samples


# --------------------------------------------------------------------------------------------------------------- CKA
def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA between feature matrices X (n, p) and Y (n, q): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),
    columns centred (Kornblith et al. 2019, feature-space form)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    X = X - X.mean(0, keepdims=True)
    Y = Y - Y.mean(0, keepdims=True)
    num = np.linalg.norm(X.T @ Y) ** 2
    den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(num / den) if den > 0 else 0.0


def batched_cka(F1: np.ndarray, F2: np.ndarray, batch_size: int, num_batches: int) -> float:
    """Mean of :func:`linear_cka` over consecutive batches (official CKA.py: per batch, then averaged)."""
    vals = []
    for b in range(num_batches):
        s = slice(b * batch_size, (b + 1) * batch_size)
        if len(F1[s]) < 2:
            break
        vals.append(linear_cka(F1[s], F2[s]))
    return float(np.mean(vals))


# ------------------------------------------------------------------------------------------------- mode connectivity
def mode_connectivity(values: Sequence[float]) -> float:
    """Signed mc of a curve of losses/errors v(t_0..t_T) (official curve_fitting.compute_mc, mode "min"):
    t* = argmax_t |v(t) - (v_0 + v_T)/2|, mc = (v_0 + v_T)/2 - v(t*). Negative: a barrier (the middle is worse than
    the ends); positive: the middle is better (typical of under-trained ends); about zero: well connected."""
    v = np.asarray(values, dtype=float)
    mid = 0.5 * (v[0] + v[-1])
    i = int(np.argmax(np.abs(v - mid)))
    return float(mid - v[i])


def bezier_point(t: float | torch.Tensor, theta0: torch.Tensor, theta_m: torch.Tensor,
                 theta1: torch.Tensor) -> torch.Tensor:
    """Quadratic Bezier curve (official curves.Bezier with num_bends=3): (1-t)^2 th0 + 2 t (1-t) th_m + t^2 th1."""
    return (1 - t) ** 2 * theta0 + 2 * t * (1 - t) * theta_m + t ** 2 * theta1


def linear_path(f: Callable[[torch.Tensor], float], theta0: torch.Tensor, theta1: torch.Tensor,
                ts: Iterable[float]) -> list[float]:
    """f((1 - t) theta0 + t theta1) for every t."""
    return [f((1 - t) * theta0 + t * theta1) for t in ts]


def bezier_path(f: Callable[[torch.Tensor], float], theta0: torch.Tensor, theta_m: torch.Tensor,
                theta1: torch.Tensor, ts: Iterable[float]) -> list[float]:
    return [f(bezier_point(float(t), theta0, theta_m, theta1)) for t in ts]


def curve_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Official curve_fitting.learning_rate_schedule: constant to half, linear decay to 1% at 90%, then 1%."""
    alpha = epoch / epochs
    if alpha <= 0.5:
        factor = 1.0
    elif alpha <= 0.9:
        factor = 1.0 - (alpha - 0.5) / 0.4 * 0.99
    else:
        factor = 0.01
    return factor * base_lr


def fit_bezier(forward: Callable, theta0: torch.Tensor, theta1: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
               epochs: int = 10, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
               weight_decay: float = 5e-4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Train the bend of a quadratic Bezier curve with fixed ends (official compute_curve_pair, Garipov et al.):
    bend initialised at the midpoint (init_linear), each mini-batch at t ~ U(0, 1), loss = cross-entropy +
    0.5 wd ||theta(t)||^2, SGD with momentum and the official per-epoch schedule. Returns the bend (P,)."""
    theta_m = (0.5 * (theta0 + theta1)).clone().requires_grad_(True)
    opt = torch.optim.SGD([theta_m], lr=lr, momentum=momentum)
    n = len(X)
    for epoch in range(1, epochs + 1):
        for g in opt.param_groups:
            g["lr"] = curve_lr(lr, epoch, epochs)
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            t = float(torch.rand(1, generator=generator))
            th = bezier_point(t, theta0, theta_m, theta1)
            loss = nn.functional.cross_entropy(forward(th, X[idx]), y[idx]) + 0.5 * weight_decay * (th ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return theta_m.detach()


def fit_bezier_many(forward_many: Callable, theta0: torch.Tensor, theta1: torch.Tensor, X: torch.Tensor,
                    y: torch.Tensor, generators: Sequence[torch.Generator], epochs: int = 10, batch_size: int = 128,
                    lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.Tensor:
    """:func:`fit_bezier` for K independent curves at once (ends ``theta0``/``theta1`` of shape (K, P), one generator
    per curve, drawn in the same order as :func:`fit_bezier`): ``forward_many(Theta (K, P), Xb (K, B, d))`` returns
    (K, B, C); the loss is the sum of the curves' losses (disjoint bends, elementwise SGD), so every bend gets the
    same updates as its own :func:`fit_bezier` run. Returns the bends (K, P)."""
    K = theta0.shape[0]
    if len(generators) != K:
        raise ValueError("one generator per curve")
    theta_m = (0.5 * (theta0 + theta1)).clone().requires_grad_(True)
    opt = torch.optim.SGD([theta_m], lr=lr, momentum=momentum)
    n = len(X)
    for epoch in range(1, epochs + 1):
        for g in opt.param_groups:
            g["lr"] = curve_lr(lr, epoch, epochs)
        perms = torch.stack([torch.randperm(n, generator=g) for g in generators])  # (K, n)
        for i in range(0, n, batch_size):
            idx = perms[:, i:i + batch_size]  # (K, B)
            t = torch.stack([torch.rand(1, generator=g) for g in generators])  # (K, 1)
            th = (1 - t) ** 2 * theta0 + 2 * t * (1 - t) * theta_m + t ** 2 * theta1  # (K, P)
            out = forward_many(th, X[idx])  # (K, B, C)
            loss = (nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1),
                                                reduction="sum") / idx.shape[1]
                    + 0.5 * weight_decay * (th ** 2).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return theta_m.detach()
