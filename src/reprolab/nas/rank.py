"""Rank metrics of NAS: how well a proxy (supernet accuracy, predictor, zero-cost score) ranks architectures against
ground truth. Kendall tau-b and Spearman rho come from ``scipy.stats``; top-k overlap and regret are defined here.
Per-seed values go to ``reprolab.claims.Verdicts`` (``v.claim(cid, method=[tau per seed], ...)``); ``over_seeds`` gives the
same point estimate and 95% t interval as the verdict machinery (``reprolab.claims.interval``).

Conventions: higher is better for both ``pred`` and ``truth`` (pass accuracies, or negate losses/latencies).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats


def _pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=float).ravel(), np.asarray(truth, dtype=float).ravel()
    if p.shape != t.shape or len(p) < 2:
        raise ValueError(f"pred and truth need the same length >= 2; got {p.shape} and {t.shape}")
    return p, t


def kendall_tau(pred, truth) -> float:
    """Kendall tau-b (``scipy.stats.kendalltau``; ties handled); nan if one side is constant."""
    p, t = _pair(pred, truth)
    return float(stats.kendalltau(p, t).statistic)


def spearman(pred, truth) -> float:
    """Spearman rho (``scipy.stats.spearmanr``); nan if one side is constant."""
    p, t = _pair(pred, truth)
    return float(stats.spearmanr(p, t).statistic)


def top_k(values, k: int) -> np.ndarray:
    """Indices of the k largest values (ties broken by the lower index, deterministic)."""
    v = np.asarray(values, dtype=float)
    return np.lexsort((np.arange(len(v)), -v))[:k]


def topk_overlap(pred, truth, k: int) -> float:
    """|top-k by pred ∩ top-k by truth| / k."""
    p, t = _pair(pred, truth)
    if not 1 <= k <= len(p):
        raise ValueError(f"k={k} outside 1..{len(p)}")
    return len(set(top_k(p, k).tolist()) & set(top_k(t, k).tolist())) / k


def precision_at_k(pred, truth, k: int) -> float:
    """Alias of ``topk_overlap`` (the NAS-Bench-Suite-Zero / NASLib name)."""
    return topk_overlap(pred, truth, k)


def regret(found_truth: float, truth) -> float:
    """Simple regret: best true value of the space (or subset) minus the true value of the architecture found."""
    return float(np.max(np.asarray(truth, dtype=float)) - float(found_truth))


def best_found_regret(pred, truth, k: int = 1) -> float:
    """Regret of the best (by truth) among the top-k by pred: max(truth) - max(truth[top-k by pred])."""
    p, t = _pair(pred, truth)
    return float(t.max() - t[top_k(p, k)].max())


def over_seeds(values: Sequence[float]) -> tuple[float, list[float] | None]:
    """(mean, 95% t interval) over seeds, exactly as ``reprolab.claims`` computes a 'value' statistic."""
    from ..claims import interval

    return interval([float(v) for v in values], "value")


def rank_report(pred_by_seed: Sequence, truth, k: int = 5) -> dict:
    """Per seed (one prediction vector per supernet/search seed) tau, rho, top-k overlap and regret of the top-1 by pred,
    each with its mean and 95% t interval over seeds. ``truth``: one vector (e.g. the ground truth's seed mean)."""
    rows = {"kendall_tau": [], "spearman": [], f"top{k}_overlap": [], "regret_top1": []}
    for pred in pred_by_seed:
        rows["kendall_tau"].append(kendall_tau(pred, truth))
        rows["spearman"].append(spearman(pred, truth))
        rows[f"top{k}_overlap"].append(topk_overlap(pred, truth, k))
        rows["regret_top1"].append(best_found_regret(pred, truth, 1))
    out = {}
    for name, vals in rows.items():
        est, ci = over_seeds(vals)
        out[name] = {"per_seed": vals, "mean": est, "ci95": ci}
    return out
