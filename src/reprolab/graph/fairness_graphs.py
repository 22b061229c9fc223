"""Fairness benchmark graphs: German credit as a NIFTY-style similarity graph, and a name-based loader.

NIFTY (Agarwal et al., UAI 2021, arXiv 2102.13186) turns the German credit table into a graph: node = applicant,
similarity sim(i, j) = 1 / (1 + ||x_i - x_j||_2), and i links to every j != i with sim(i, j) > thresh * max_k sim(i, k)
(thresh = 0.8 in NIFTY); sensitive attribute = gender, label = good/bad credit. Here the numeric columns are z-scored
before the distance (NIFTY used raw values, where the loan amount dominates) and the graph is symmetrised (union).
"""
from __future__ import annotations

import numpy as np
import torch

from .generators import edge_homophily, fair_csbm
from .graphdata import NodeData, graph_from_edges

FAIR_GRAPHS = ("german_credit", "csbm", "pokec_z")
# UCI Statlog codes of attribute 9 (personal status and sex), used when the loader left them unmapped.
PERSONAL_STATUS = {"A91": "male : divorced/separated", "A92": "female : divorced/separated/married",
                   "A93": "male : single", "A94": "male : married/widowed", "A95": "female : single"}


def german_credit_table(df=None, sensitive: str = "gender", drop_sensitive: bool = False):
    """(X float32 (1000, d), y (credit good = 1), s, column names) from ``reprolab.data.load_german_credit``.

    sensitive: "gender" (female = 1, from personal_status; NIFTY) or "age" (age > 25 = 1).
    Categorical columns are one-hot, booleans 0/1, numeric columns z-scored. Like NIFTY, the sensitive column stays
    among the features unless ``drop_sensitive`` (then personal_status, resp. age, is removed).
    """
    import pandas as pd

    if sensitive not in ("gender", "age"):
        raise ValueError(f"sensitive={sensitive!r}; allowed: gender, age")
    if df is None:
        from reprolab.data import load_german_credit

        df = load_german_credit()
    df = df.copy()
    df["personal_status"] = df["personal_status"].map(lambda v: PERSONAL_STATUS.get(v, v))
    s = (df["personal_status"].str.startswith("female") if sensitive == "gender" else df["age"] > 25).astype(np.int64)
    y = df["credit"].astype(np.int64)
    feats = df.drop(columns=["credit"])
    if drop_sensitive:
        feats = feats.drop(columns=["personal_status" if sensitive == "gender" else "age"])
    numeric = [c for c in feats.columns if pd.api.types.is_numeric_dtype(feats[c]) and feats[c].dtype != bool]
    for c in numeric:
        feats[c] = (feats[c] - feats[c].mean()) / feats[c].std()
    feats = pd.get_dummies(feats, columns=[c for c in feats.columns if c not in numeric], dtype=np.float32)
    return feats.to_numpy(np.float32), y.to_numpy(), s.to_numpy(), list(feats.columns)


def similarity_edges(X: np.ndarray, thresh: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """NIFTY's build_relationship: directed pairs (i, j), j != i, with sim(i, j) > thresh * max_{k != i} sim(i, k)."""
    sq = (X ** 2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0))  # (n, n)
    sim = 1.0 / (1.0 + dist)
    np.fill_diagonal(sim, -np.inf)
    best = sim.max(1, keepdims=True)  # (n, 1) similarity to the nearest other node
    src, dst = np.nonzero(sim > thresh * best)
    return src, dst


def german_credit_graph(thresh: float = 0.8, sensitive: str = "gender", drop_sensitive: bool = False) -> NodeData:
    """German credit (1000 applicants) as a symmetric similarity graph without self loops (see module docstring)."""
    X, y, s, cols = german_credit_table(sensitive=sensitive, drop_sensitive=drop_sensitive)
    src, dst = similarity_edges(X, thresh)
    g = graph_from_edges(src, dst, len(y))
    y_t, s_t = torch.from_numpy(y), torch.from_numpy(s)
    info = dict(thresh=thresh, sensitive=sensitive, features=len(cols), edges=g.num_edges() // 2,
                mean_degree=g.num_edges() / len(y), sens_homophily=edge_homophily(g, s_t),
                label_homophily=edge_homophily(g, y_t), sens_rate=float(s.mean()), label_rate=float(y.mean()))
    return NodeData("german_credit", g, torch.from_numpy(X), y_t, s_t, info)


def load_fair_graph(name: str, **kwargs) -> NodeData:
    """``german_credit`` (offline), ``csbm`` (generator; kwargs go to ``fair_csbm``); ``pokec_z`` is online-only."""
    if name == "german_credit":
        return german_credit_graph(**kwargs)
    if name == "csbm":
        return fair_csbm(**kwargs)
    if name == "pokec_z":
        raise NotImplementedError("pokec_z needs the online FMP/NIFTY release and is not implemented offline; "
                                  f"allowed offline datasets: german_credit, csbm (of {', '.join(FAIR_GRAPHS)})")
    raise ValueError(f"dataset: unknown fair graph {name!r}; allowed: {', '.join(FAIR_GRAPHS)}")
