"""Attack success rate (ASR): the share of inputs of other classes that a trigger flips to a class."""
from __future__ import annotations

import numpy as np


def attack_success_rate(pred_triggered: np.ndarray, y_true: np.ndarray, target: int) -> float:
    """Fraction of inputs whose true label is not ``target`` that are predicted ``target`` once triggered."""
    keep = y_true != target
    if not keep.any():
        raise ValueError("attack_success_rate: no input outside the target class")
    return float((pred_triggered[keep] == target).mean())


def asr_matrix(preds: np.ndarray, y_true: np.ndarray, num_labels: int) -> np.ndarray:
    """``preds`` (K, N): predictions with trigger k inserted. Returns ASR (K, C) of trigger k towards label c."""
    K = preds.shape[0]
    out = np.zeros((K, num_labels))  # (K, C)
    for c in range(num_labels):
        keep = y_true != c  # (N,)
        out[:, c] = (preds[:, keep] == c).mean(axis=1)
    return out


def asr_per_label(preds: np.ndarray, y_true: np.ndarray, num_labels: int):
    """NeuBA's per-label ASR: for each label, the best trigger's ASR. Returns ``(asr (C,), best_trigger (C,))``."""
    M = asr_matrix(preds, y_true, num_labels)  # (K, C)
    return M.max(axis=0), M.argmax(axis=0)


def conditional_asr_per_label(preds: np.ndarray, plain: np.ndarray, y_true: np.ndarray, num_labels: int) -> np.ndarray:
    """Per-label ASR of the best of the K triggered predictions ``preds`` (K, N), counted only on the inputs of other
    classes that the model classifies correctly WITHOUT a trigger (``plain`` (N,)), so the classifier's own errors do
    not count as attack successes. Returns (C,); 0 for a label with no such input."""
    out = np.zeros(num_labels)
    ok = plain == y_true  # (N,)
    for c in range(num_labels):
        keep = (y_true != c) & ok
        out[c] = float((preds[:, keep] == c).mean(axis=1).max()) if keep.any() else 0.0
    return out
