"""Fair Message Passing (FMP).

Zhimeng Jiang, Xiaotian Han, Chao Fan, Zirui Liu, Na Zou, Ali Mostafavi, Xia Hu,
"Chasing Fairness in Graphs: A GNN Architecture Perspective", AAAI 2024, https://arxiv.org/abs/2312.12369
(official code: github.com/zhimengj0326/FMP, ``fmp.py`` / ``fairgnn.py``).

FMP = an MLP that maps features to class logits, H = MLP(X) (N, C), followed by K unrolled primal-dual steps of

    min_F  lambda2/2 tr(F^T L F) + 1/2 ||F - H||^2 + h_fair(s^T softmax(F))

(graph smoothness + closeness to H + a penalty on the gap between the two sensitive groups' mean predicted
probabilities). One step, with gamma = 1/(1 + lambda2), beta = 1/(2 gamma), as in the official ``emp_forward``:

    Y     = gamma H + (1 - gamma) A_hat F                     aggregation (APPNP-like)
    z     = s softmax(Y) / (gamma s s^T)                      dual warm start (re-initialised every step)
    F_bar = Y - gamma J_sm(s^T z)^T (s^T z)                   tentative bias-mitigation (primal) step
    z     = Proj_lambda1(z + beta s softmax(F_bar))           dual ascent + projection
    F     = Y - gamma J_sm(s^T z)^T (s^T z)                   bias mitigation with the new dual

s (1, N) is the sensitive-attribute incident vector, +1/|S_1| on group-1 nodes and -1/|S_0| on group-0 nodes among
the nodes whose attribute the model may use (the training nodes in the official code, zero elsewhere), so
s softmax(F) is the difference of the groups' mean probability vectors. J_sm(u) = diag(softmax(u)) -
softmax(u) softmax(u)^T is the softmax Jacobian of each row; J_sm(u)^T v = p * v - <p, v> p with p = softmax(u).

Choices and where they come from:
- ``jacobian_at="dual"`` (official code): the Jacobian is evaluated at s^T z; ``"primal"`` evaluates it at Y, which is
  the exact gradient of <z, s softmax(F)> at F = Y.
- ``proj="l2sq"`` (official default, called ``L2_projection`` there): z <- 2 lambda1 / (2 lambda1 + beta) z, the
  proximal step of the conjugate of a squared-l2 penalty lambda1 ||.||^2; ``"linf"``: clamp to [-lambda1, lambda1]
  (projection onto the l_inf ball, conjugate of lambda1 ||.||_1); ``"l2"``: projection onto the l2 ball of radius
  lambda1 (conjugate of lambda1 ||.||_2).
- ``s_norm="group"`` (paper: difference of group centres); the official code divides both groups by the total count
  (``"total"``), which no longer measures the centre gap when the groups are unbalanced (its ``get_sen`` also
  rescales the ``sens`` tensor in place, so later runs in the same process see a different s).
- z is re-initialised from Y at every step (official code) rather than carried over from step to step.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from .models import MLP  # noqa: E402

PROJECTIONS = ("l2sq", "linf", "l2")
JACOBIAN_AT = ("dual", "primal")


def sensitive_incident_vector(sens: torch.Tensor, idx: torch.Tensor | None = None, norm: str = "group") -> torch.Tensor:
    """s (N,): +1/|S_1| on group-1 nodes of ``idx``, -1/|S_0| on its group-0 nodes, 0 elsewhere (norm="group");
    norm="total": +-1/|idx| (the official code)."""
    n = sens.shape[0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.arange(n) if idx is None else idx] = True
    g1, g0 = mask & (sens == 1), mask & (sens == 0)
    if not (bool(g1.any()) and bool(g0.any())):
        raise ValueError("sensitive_incident_vector: both sensitive groups need at least one node")
    s = torch.zeros(n, dtype=torch.float64)
    if norm == "group":
        s[g1], s[g0] = 1.0 / g1.sum(), -1.0 / g0.sum()
    elif norm == "total":
        s[g1], s[g0] = 1.0 / mask.sum(), -1.0 / mask.sum()
    else:
        raise ValueError(f"norm={norm!r}; allowed: group, total")
    return s.to(torch.get_default_dtype())


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of (N, C); computed over dim 0 of the transpose, ~5x faster on CPU for tiny C."""
    return torch.softmax(x.t().contiguous(), 0).t()


def gcn_norm(g) -> torch.Tensor:
    """D^{-1/2} (N, 1) of an undirected graph g (pass g with self loops: A + I)."""
    return g.in_degrees().clamp(min=1).float().pow(-0.5)[:, None]


def softmax_vjp(at: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise J_softmax(at)^T v = p * v - <p, v> p with p = softmax(at) (the Jacobian is symmetric)."""
    p = softmax_rows(at)  # (N, C)
    return p * v - (p * v).sum(-1, keepdim=True) * p


def project_dual(z: torch.Tensor, lambda1: float, beta: float, proj: str = "l2sq") -> torch.Tensor:
    """Proj_lambda1 of the dual variable z (C,) (see module docstring for the three options)."""
    if proj == "l2sq":
        return (2 * lambda1 / (2 * lambda1 + beta)) * z
    if proj == "linf":
        return z.clamp(-lambda1, lambda1)
    if proj == "l2":
        return z * torch.clamp(lambda1 / z.norm().clamp_min(1e-12), max=1.0)
    raise ValueError(f"proj={proj!r}; allowed: {', '.join(PROJECTIONS)}")


class FMPConv(nn.Module):
    """K unrolled FMP steps on logits H (N, C); parameter-free, differentiable end to end."""

    def __init__(self, K: int = 5, lambda1: float = 3.0, lambda2: float = 3.0, proj: str = "l2sq",
                 jacobian_at: str = "dual"):
        super().__init__()
        if proj not in PROJECTIONS or jacobian_at not in JACOBIAN_AT:
            raise ValueError(f"proj in {PROJECTIONS}, jacobian_at in {JACOBIAN_AT}; got {proj!r}, {jacobian_at!r}")
        if lambda1 < 0 or lambda2 < 0:
            raise ValueError("lambda1 and lambda2 must be >= 0")
        self.K, self.lambda1, self.lambda2, self.proj, self.jacobian_at = K, lambda1, lambda2, proj, jacobian_at
        self._cache: tuple = (None, None)  # (graph, D^{-1/2})

    def propagate(self, g, F: torch.Tensor) -> torch.Tensor:
        """A_hat F = D^{-1/2} A D^{-1/2} F of an undirected g (pass g with self loops), as GraphConv(norm="both")."""
        if self._cache[0] is not g:
            self._cache = (g, gcn_norm(g))
        d = self._cache[1].to(F.dtype)  # (N, 1)
        return d * dgl.ops.copy_u_sum(g, d * F)  # (N, C)

    def correction(self, Y: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """J_sm^T (s^T z): the gradient-like term of <z, s softmax(F)> that moves the group centres together."""
        u = s[:, None] * z[None, :]  # (N, C) = s^T z
        return softmax_vjp(u if self.jacobian_at == "dual" else Y, u)

    def forward(self, g, H: torch.Tensor, s: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """``trace`` (a list, optional) receives one dict per step: the group gap of softmax(Y) before the
        bias-mitigation step, the projection factor and ``step_bound``, the largest change of a logit difference that
        the step can make on any node: gamma max_i range(u_i) / 2 with u = s^T z (binary classes, where the softmax
        Jacobian is p(1-p) [[1, -1], [-1, 1]] and p(1-p) <= 1/4; gamma max_i range(u_i) for C > 2)."""
        gamma = 1.0 / (1.0 + self.lambda2)
        beta = 1.0 / (2.0 * gamma)
        F = H  # (N, C)
        for _ in range(self.K):
            Y = gamma * H + (1 - gamma) * self.propagate(g, F)  # (N, C) aggregation
            if self.lambda1 > 0:
                z = (s @ softmax_rows(Y)) / (gamma * (s @ s))  # (C,) dual warm start
                F_bar = Y - gamma * self.correction(Y, s, z)  # (N, C)
                z = project_dual(z + beta * (s @ softmax_rows(F_bar)), self.lambda1, beta, self.proj)
                F = Y - gamma * self.correction(Y, s, z)  # (N, C) bias mitigation
                if trace is not None:
                    u = s[:, None] * z[None, :]  # (N, C)
                    rng = float((u.max(1).values - u.min(1).values).max())
                    trace.append({"gap_Y": group_gap(Y, s), "step_bound": gamma * rng * (0.5 if Y.shape[1] == 2 else 1.0),
                                  "proj_factor": (2 * self.lambda1 / (2 * self.lambda1 + beta)) if self.proj == "l2sq"
                                  else float("nan")})
            else:
                F = Y
        return F

    def extra_repr(self) -> str:
        return (f"K={self.K}, lambda1={self.lambda1}, lambda2={self.lambda2}, proj={self.proj}, "
                f"jacobian_at={self.jacobian_at}")


class FMPNet(nn.Module):
    """H = MLP(X) then FMPConv; ``s`` is the sensitive incident vector (a buffer, built from the training split)."""

    def __init__(self, in_feats: int, hidden: int, n_classes: int, s: torch.Tensor, n_layers: int = 2,
                 dropout: float = 0.0, **fmp_kwargs):
        super().__init__()
        self.mlp = MLP(in_feats, hidden, n_classes, n_layers, dropout)
        self.fmp = FMPConv(**fmp_kwargs)
        self.register_buffer("s", s.float())

    def forward(self, g, X: torch.Tensor) -> torch.Tensor:
        return self.fmp(g, self.mlp(g, X), self.s)  # (N, C)


def group_gap(F: torch.Tensor, s: torch.Tensor) -> float:
    """|s softmax(F)|_1 / 2: the gap between the two groups' mean predicted probabilities (binary: of class 1)."""
    return float((s @ softmax_rows(F)).abs().sum() / 2)


def probe_gap_reduction(g, H: torch.Tensor, s: torch.Tensor, **fmp_kwargs) -> dict[str, float]:
    """Layer-only diagnostic: group gap of softmax(H), after FMP without fairness (lambda1 = 0) and after FMP."""
    with torch.no_grad():
        plain = FMPConv(**{**fmp_kwargs, "lambda1": 0.0})(g, H, s)
        fair = FMPConv(**fmp_kwargs)(g, H, s)
    return {"gap_H": group_gap(H, s), "gap_no_fair": group_gap(plain, s), "gap_fmp": group_gap(fair, s)}


def mitigation_shift(g, H: torch.Tensor, s: torch.Tensor, nodes: torch.Tensor, **fmp_kwargs) -> dict[str, float]:
    """What the bias-mitigation step does to trained logits H (binary classes): the logit difference d = F_1 - F_0
    after FMP and after the same propagation with lambda1 = 0, on ``nodes``. Returns the mean / max |shift| of d, the
    mean |d| (the margin the shift must overcome), the share of predictions it flips, the group gap of mean
    probabilities and the per-step bound (largest ``step_bound`` and ``gap_Y`` over the K steps, see
    :meth:`FMPConv.forward`)."""
    trace: list = []
    with torch.no_grad():
        plain = FMPConv(**{**fmp_kwargs, "lambda1": 0.0})(g, H, s)
        fair = FMPConv(**fmp_kwargs)(g, H, s, trace=trace)
    d0, d1 = (plain[:, 1] - plain[:, 0])[nodes], (fair[:, 1] - fair[:, 0])[nodes]
    return {"mean_abs_shift": float((d1 - d0).abs().mean()), "max_abs_shift": float((d1 - d0).abs().max()),
            "mean_abs_margin": float(d0.abs().mean()), "flipped": float(((d0 > 0) != (d1 > 0)).float().mean()),
            "gap_no_fair": group_gap(plain, s), "gap_fmp": group_gap(fair, s),
            "max_step_bound": max((t["step_bound"] for t in trace), default=0.0),
            "max_gap_Y": max((t["gap_Y"] for t in trace), default=0.0),
            "proj_factor": trace[0]["proj_factor"] if trace else float("nan")}


ARMS = ("mlp", "gcn", "gcn_reg", "fmp", "fmp_no_fair", "fmp_all_nodes")


def make_arms(cfg: dict, names=None, **fmp_overrides) -> dict:
    """Factories ``(data, split) -> (model, fair_reg)`` for the FMP comparison, all with the same width and depth.

    mlp / gcn: plain baselines; gcn_reg: GCN + cfg["gcn_reg_weight"] * statistical-parity regulariser (FMP repo's
    reg_gnn); fmp: MLP + FMP with s on the training nodes (official code); fmp_no_fair: lambda1 = 0 (the same
    propagation without the bias-mitigation step, i.e. APPNP); fmp_all_nodes: s on every node (sensitive attribute
    of test nodes used in the forward pass). ``fmp_overrides`` replace FMP keys (e.g. lambda1=30.0) for sweeps.
    """
    from .models import GCN

    names = list(names or ARMS)
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"arms: unknown {unknown}; allowed: {', '.join(ARMS)}")
    width = dict(hidden=cfg["hidden"], n_layers=cfg["n_layers"], dropout=cfg["dropout"])
    fmp_kw = dict(K=cfg["fmp_K"], lambda1=cfg["fmp_lambda1"], lambda2=cfg["fmp_lambda2"], proj=cfg["fmp_proj"],
                  jacobian_at=cfg["fmp_jacobian_at"])
    fmp_kw.update(fmp_overrides)

    def fmp(data, split, nodes="train", **over):
        s = sensitive_incident_vector(data.sens, split["train"] if nodes == "train" else None, cfg["fmp_s_norm"])
        return FMPNet(data.X.shape[1], n_classes=data.num_classes, s=s, **width, **{**fmp_kw, **over}), 0.0

    factories = {
        "mlp": lambda data, split: (MLP(data.X.shape[1], out_feats=data.num_classes, **width), 0.0),
        "gcn": lambda data, split: (GCN(data.X.shape[1], out_feats=data.num_classes, **width), 0.0),
        "gcn_reg": lambda data, split: (GCN(data.X.shape[1], out_feats=data.num_classes, **width),
                                        cfg["gcn_reg_weight"]),
        "fmp": fmp,
        "fmp_no_fair": lambda data, split: fmp(data, split, lambda1=0.0),
        "fmp_all_nodes": lambda data, split: fmp(data, split, nodes="all"),
    }
    return {n: factories[n] for n in names}
