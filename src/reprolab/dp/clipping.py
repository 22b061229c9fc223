"""Per-sample clipping factors C_i and the Gaussian mechanism on the clipped sum.

The private gradient is  g_hat = ( sum_i C_i g_i + sigma * S * N(0, I) ) / B,  with S the sensitivity of the sum:

* Abadi (https://arxiv.org/abs/1607.00133):  C_i = min(1, R / ||g_i||),  S = R.
* AUTO-S (Bu et al., "Automatic Clipping", https://arxiv.org/abs/2206.07136, eq. 4.1):
  C_i = 1 / (||g_i|| + gamma) with stability constant gamma = 0.01, S = 1 (R is absorbed in the learning rate).
  gamma = 0 gives AUTO-V (pure per-sample normalization).

Stability constants follow the peers: opacus and fastDP use ||g_i|| + 1e-6 for Abadi, fastDP uses 0.01 for AUTO-S.
"""
from __future__ import annotations

import torch

from .per_sample import Grads

CLIPPING_STYLES = ("abadi", "auto_s")
ABADI_EPS = 1e-6
AUTO_S_GAMMA = 0.01


def clip_factor_abadi(norms: torch.Tensor, R: float, eps: float = ABADI_EPS) -> torch.Tensor:
    """C_i = min(1, R / (||g_i|| + eps)): (B,) -> (B,)."""
    return (R / (norms + eps)).clamp(max=1.0)


def clip_factor_auto_s(norms: torch.Tensor, gamma: float = AUTO_S_GAMMA) -> torch.Tensor:
    """C_i = 1 / (||g_i|| + gamma): (B,) -> (B,). ||C_i g_i|| < 1 for every gamma > 0."""
    return 1.0 / (norms + gamma)


def clip_factors(norms: torch.Tensor, style: str, R: float = 1.0, gamma: float = AUTO_S_GAMMA) -> torch.Tensor:
    if style == "abadi":
        return clip_factor_abadi(norms, R)
    if style == "auto_s":
        return clip_factor_auto_s(norms, gamma)
    raise ValueError(f"clipping style {style!r}; allowed: {', '.join(CLIPPING_STYLES)}")


def sensitivity(style: str, R: float = 1.0) -> float:
    """L2 sensitivity S of sum_i C_i g_i to adding or removing one example: R for Abadi, 1 for AUTO-S."""
    if style == "abadi":
        return float(R)
    if style == "auto_s":
        return 1.0
    raise ValueError(f"clipping style {style!r}; allowed: {', '.join(CLIPPING_STYLES)}")


def clip_and_sum(grads: Grads, factors: torch.Tensor) -> Grads:
    """sum_i C_i g_i for each parameter: {name: (B, *shape)}, (B,) -> {name: shape}."""
    return {name: torch.einsum("b,b...->...", factors, g) for name, g in grads.items()}


def add_gaussian_noise(summed: Grads, std: float, generator: torch.Generator | None = None) -> Grads:
    """summed + N(0, std^2 I), independently for every coordinate."""
    return {name: s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            for name, s in summed.items()}
