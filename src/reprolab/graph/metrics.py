"""Accuracy and group-fairness metrics for binary node classification (as in NIFTY, FairGNN and FMP).

delta_SP = |P(yhat=1 | s=0) - P(yhat=1 | s=1)|  (statistical parity)
delta_EO = |P(yhat=1 | y=1, s=0) - P(yhat=1 | y=1, s=1)|  (equal opportunity)
"""
from __future__ import annotations

import torch


def _subset(t: torch.Tensor, idx):
    return t if idx is None else t[idx]


def accuracy(pred: torch.Tensor, y: torch.Tensor, idx=None) -> float:
    return float((_subset(pred, idx) == _subset(y, idx)).float().mean())


def _positive_rate(pred: torch.Tensor, mask: torch.Tensor) -> float:
    if not bool(mask.any()):
        raise ValueError("fairness metric: a sensitive group is empty on this node subset")
    return float((pred[mask] == 1).float().mean())


def delta_sp(pred: torch.Tensor, sens: torch.Tensor, idx=None) -> float:
    """Statistical-parity gap of hard predictions ``pred`` (0/1) between the two groups of ``sens``."""
    p, s = _subset(pred, idx), _subset(sens, idx)
    return abs(_positive_rate(p, s == 0) - _positive_rate(p, s == 1))


def delta_eo(pred: torch.Tensor, y: torch.Tensor, sens: torch.Tensor, idx=None) -> float:
    """Equal-opportunity gap: the statistical-parity gap among the truly positive nodes (y = 1)."""
    p, t, s = _subset(pred, idx), _subset(y, idx), _subset(sens, idx)
    return abs(_positive_rate(p, (s == 0) & (t == 1)) - _positive_rate(p, (s == 1) & (t == 1)))


def group_report(logits: torch.Tensor, y: torch.Tensor, sens: torch.Tensor, idx=None) -> dict[str, float]:
    """{acc, dsp, deo} of argmax predictions on the nodes ``idx``."""
    pred = logits.argmax(-1)
    return {"acc": accuracy(pred, y, idx), "dsp": delta_sp(pred, sens, idx), "deo": delta_eo(pred, y, sens, idx)}
