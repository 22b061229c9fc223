"""Full-batch node-classification trainer with model selection on the validation split.

Every arm of a comparison goes through ``train_node_classifier`` with the same budget (epochs, lr, weight decay) and
the same split; the reported test metrics are those of the epoch with the best validation accuracy (first one on
ties), never chosen on test.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from .graphdata import NodeData, stratified_split
from .metrics import group_report

__all__ = ["NodeData", "stratified_split", "dp_regularizer", "train_node_classifier", "run_arms", "summarize"]


def dp_regularizer(prob1: torch.Tensor, sens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Differentiable statistical-parity gap |E[p(y=1) | s=0] - E[p(y=1) | s=1]| on ``idx`` (FMP repo's reg_gnn)."""
    p, s = prob1[idx], sens[idx]
    return (p[s == 0].mean() - p[s == 1].mean()).abs()


def train_node_classifier(model: torch.nn.Module, data: NodeData, split: dict[str, torch.Tensor], *, epochs: int,
                          lr: float, weight_decay: float = 0.0, fair_reg: float = 0.0) -> dict[str, float]:
    """Train with Adam on cross-entropy (+ ``fair_reg`` * dp_regularizer) and return the selected epoch's metrics.

    Returns {acc, dsp, deo} on test, {val_acc, val_dsp, val_deo} and ``epoch`` (1-based) of the selected model;
    ``model`` is left holding the weights of that epoch.
    """
    g = data.graph_with_self_loops()
    X, y, sens = data.X, data.y, data.sens
    tr, va, te = split["train"], split["val"], split["test"]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best: dict[str, float] = {"val_acc": -1.0}
    for epoch in range(1, epochs + 1):
        model.train()
        logits = model(g, X)  # (N, C)
        loss = F.cross_entropy(logits[tr], y[tr])
        if fair_reg > 0:
            loss = loss + fair_reg * dp_regularizer(logits.softmax(-1)[:, 1], sens, tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(g, X)
        val = group_report(logits, y, sens, va)
        if val["acc"] > best["val_acc"]:
            best = {**group_report(logits, y, sens, te), "val_acc": val["acc"], "val_dsp": val["dsp"],
                    "val_deo": val["deo"], "epoch": epoch}
            state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    model.eval()
    return best


def run_arms(data: NodeData, arms: dict[str, Callable], seeds, *, fractions=(0.5, 0.25, 0.25), progress=None,
             **train_kwargs) -> list[dict]:
    """Train every arm on every seed: seed k fixes the split (shared by all arms) and the weight init.

    ``arms`` maps a name to ``factory(data, split) -> (model, fair_reg)``; returns one record per (arm, seed) with
    the selected epoch's metrics. ``progress`` wraps the (seed, arm) iterator (e.g. tqdm).
    """
    jobs = [(seed, name) for seed in seeds for name in arms]
    records, split, split_seed = [], None, None
    for seed, name in progress(jobs) if progress else jobs:
        if seed != split_seed:
            split, split_seed = stratified_split(data.y, fractions, seed), seed
        torch.manual_seed(seed)
        model, fair_reg = arms[name](data, split)
        out = train_node_classifier(model, data, split, fair_reg=fair_reg, **train_kwargs)
        records.append({"dataset": data.name, "arm": name, "seed": seed, **out})
    return records


def summarize(records: list[dict], metrics=("acc", "dsp", "deo", "val_acc", "epoch")) -> dict:
    """{dataset: {arm: {metric_mean, metric_std, n}}} over the seeds of ``run_arms`` records (std: ddof=1, 0 if n=1)."""
    import numpy as np

    def stats(values):
        v = np.asarray(values, dtype=float)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

    out: dict = {}
    for r in records:
        out.setdefault(r["dataset"], {}).setdefault(r["arm"], []).append(r)
    summary: dict = {}
    for ds, arms in out.items():
        for arm, rs in arms.items():
            entry = {"n": len(rs)}
            for m in metrics:
                entry[f"{m}_mean"], entry[f"{m}_std"] = stats([r[m] for r in rs])
            summary.setdefault(ds, {})[arm] = entry
    return summary
