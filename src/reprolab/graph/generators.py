"""Synthetic graphs: a contextual stochastic block model (CSBM) with a binary sensitive group.

Nodes carry a sensitive attribute ``s`` and a label ``y`` whose base rate depends on ``s`` (``label_gap``); edges join
nodes of the same sensitive group with probability ``h_sens`` and of the same label with probability ``h_label``
(edge homophily); features are Gaussian around a label direction plus a weaker sensitive direction
(Deshpande et al., 2018 "Contextual stochastic block models", with the sensitive group of the fair-graph literature).
"""
from __future__ import annotations

import numpy as np
import torch

from .graphdata import NodeData, graph_from_edges


def edge_homophily(graph, attr: torch.Tensor) -> float:
    """Fraction of edges (u, v) with attr[u] == attr[v] (self loops, if any, are ignored)."""
    src, dst = graph.edges()
    keep = src != dst
    return float((attr[src[keep]] == attr[dst[keep]]).float().mean())


def fair_csbm(n: int = 2000, d: int = 16, p_sens: float = 0.5, label_gap: float = 0.2, mean_degree: float = 10.0,
              h_sens: float = 0.9, h_label: float = 0.7, mu_label: float = 1.0, mu_sens: float = 0.5,
              seed: int = 0) -> NodeData:
    """Sample a CSBM with a sensitive group.

    s ~ Bernoulli(p_sens); P(y=1 | s) = 0.5 + (s - 0.5) * label_gap.
    Each of the round(n * mean_degree / 2) edges picks a uniform source i, then a target uniform among the nodes whose
    (s, y) block is i's own or the opposite, independently with P(same s) = h_sens and P(same y) = h_label, so the
    expected edge homophily is exactly (h_sens, h_label) up to dropped self loops and duplicates.
    X = mu_label (2y-1) u_y + mu_sens (2s-1) u_s + N(0, I_d) with orthonormal directions u_y, u_s.
    """
    for name, v in (("p_sens", p_sens), ("h_sens", h_sens), ("h_label", h_label)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v} must lie in [0, 1]")
    if not 0.0 <= label_gap < 1.0:
        raise ValueError(f"label_gap={label_gap} must lie in [0, 1)")
    rng = np.random.default_rng(seed)
    s = (rng.random(n) < p_sens).astype(np.int64)  # (n,)
    y = (rng.random(n) < 0.5 + (s - 0.5) * label_gap).astype(np.int64)  # (n,)
    block = 2 * s + y  # (n,) in {0, 1, 2, 3}
    members = [np.flatnonzero(block == b) for b in range(4)]
    if any(len(m) == 0 for m in members):
        raise ValueError("fair_csbm: an (s, y) block is empty; increase n or lower label_gap")
    sizes = np.array([len(m) for m in members])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(members)

    m = int(round(n * mean_degree / 2))
    src = rng.integers(0, n, m)  # (m,)
    same_s = rng.random(m) < h_sens
    same_y = rng.random(m) < h_label
    t_s = np.where(same_s, s[src], 1 - s[src])
    t_y = np.where(same_y, y[src], 1 - y[src])
    t_block = 2 * t_s + t_y
    dst = flat[offsets[t_block] + (rng.random(m) * sizes[t_block]).astype(np.int64)]  # (m,)

    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    u_y, u_s = q[:, 0], q[:, 1]  # orthonormal (d,)
    X = mu_label * (2 * y - 1)[:, None] * u_y + mu_sens * (2 * s - 1)[:, None] * u_s + rng.standard_normal((n, d))

    g = graph_from_edges(src, dst, n)
    y_t, s_t = torch.from_numpy(y), torch.from_numpy(s)
    info = dict(n=n, d=d, p_sens=p_sens, label_gap=label_gap, mean_degree=mean_degree, h_sens=h_sens,
                h_label=h_label, mu_label=mu_label, mu_sens=mu_sens, seed=seed,
                edges=g.num_edges() // 2, sens_homophily=edge_homophily(g, s_t),
                label_homophily=edge_homophily(g, y_t))
    return NodeData("csbm", g, torch.tensor(X, dtype=torch.float32), y_t, s_t, info)
