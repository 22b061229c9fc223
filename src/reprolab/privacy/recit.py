"""Building blocks of ReCIT: reconstructing private text from LoRA gradients (PARTIAL implementation).

Xie et al., "ReCIT: Reconstructing Full Private Data from Gradient in Parameter-Efficient Fine-Tuning of Large
Language Models", arXiv:2504.20570.

Implemented here (tested): SYNTHETIC personal records (generated names and phone numbers from a fixed seed, never
real personal data); the LoRA gradient structure the filter relies on -- for h = W x + s B A x,
dL/dA = s B^T sum_t delta_t x_t^T and dL/dB = s sum_t delta_t (A x_t)^T, so the rows of dL/dA lie in the span of the
layer's inputs x_t; the span filter that scores every vocabulary token by the residual of its first-layer input
after projection on that row space (tokens of the batch have residual ~0 while the span is not saturated); and the
recovery metrics. NOT implemented: the Personal-Notes malicious fine-tuning, token pairing and the end-to-end attack
with its baselines (see the project report).
"""
from __future__ import annotations

import numpy as np
import torch

_SYL = ("ka", "lo", "mi", "ra", "ven", "tor", "sa", "li", "dan", "mer", "ko", "ri", "bel", "na", "tus", "zo")


def make_records(n: int, seed: int, digits: int = 8) -> list[dict]:
    """``n`` SYNTHETIC records {first, last, phone, text}: names are random syllable strings, phones random digits."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        first = "".join(rng.choice(_SYL, size=2)).capitalize()
        last = "".join(rng.choice(_SYL, size=3)).capitalize()
        phone = "".join(str(d) for d in rng.integers(0, 10, size=digits))
        out.append({"first": first, "last": last, "phone": phone,
                    "text": f"My name is {first} {last}. My phone number is {phone}."})
    return out


def lora_grads_by_formula(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """LoRA gradients from the layer inputs x (N, d_in) and output gradients delta (N, d_out):
    dA = s B^T delta^T x (r, d_in), dB = s delta^T (x A^T) (d_out, r)."""
    dA = scale * B.T @ delta.T @ x  # (r, d_in)
    dB = scale * delta.T @ (x @ A.T)  # (d_out, r)
    return dA, dB


def span_basis(G: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (k, d) of the row space of the stacked gradients G (m, d), singular values > rel_tol * max."""
    _, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    k = int((S > rel_tol * S[0]).sum())
    return Vh[:k]  # (k, d)


def span_filter_scores(G: torch.Tensor, X: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Relative residual ||x_v - P x_v|| / ||x_v|| (V,) of every candidate input x_v (rows of X (V, d)) after
    projection P on the row space of G (m, d). Tokens present in the batch score ~0 while the span is unsaturated."""
    Q = span_basis(G, rel_tol)  # (k, d)
    Xd = X.double()
    resid = Xd - (Xd @ Q.T) @ Q  # (V, d)
    return (resid.norm(dim=1) / Xd.norm(dim=1).clamp_min(1e-12)).float()


def token_recovery(pred: set, true: set) -> dict:
    """Precision, recall and F1 of a recovered token set against the true one."""
    tp = len(pred & true)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(true) if true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def exact_pii_recovery(recovered: list[dict], records: list[dict]) -> float:
    """Share of records whose (first, last, phone) triple appears among the recovered ones."""
    got = {(r["first"], r["last"], r["phone"]) for r in recovered}
    return float(np.mean([(r["first"], r["last"], r["phone"]) in got for r in records])) if records else 0.0
