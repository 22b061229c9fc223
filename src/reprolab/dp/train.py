"""DP-SGD / DP-Adam training with Poisson subsampling and per-sample clipping (Abadi or AUTO-S).

One step (Abadi et al. 2016, https://arxiv.org/abs/1607.00133; Bu et al. 2022, https://arxiv.org/abs/2206.07136):
draw a Poisson batch (each example with probability q), compute per-sample gradients g_i, clip them with factors
C_i, sum, add N(0, (sigma * S)^2 I) and divide by the expected batch size q * N (not the realized one, so that the
sensitivity argument holds), then hand the result to an ordinary torch optimizer as ``p.grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from .clipping import add_gaussian_noise, clip_and_sum, clip_factors, sensitivity
from .ghost import ghost_clip_and_sum, ghost_forward_backward, ghost_norms
from .per_sample import Grads, per_sample_grads, per_sample_norms, trainable_params

OPTIMIZERS = ("sgd", "adam")
PER_SAMPLE_METHODS = ("vmap", "ghost")  # vmap: torch.func per-sample grads (any model); ghost: nn.Linear stacks


@dataclass
class DPConfig:
    clipping: str = "abadi"  # abadi | auto_s
    R: float = 1.0  # clipping threshold (Abadi only; AUTO-S absorbs it in lr)
    gamma: float = 0.01  # AUTO-S stability constant
    sigma: float = 1.0  # noise multiplier (from the accountant)
    sample_rate: float = 0.01  # Poisson rate q = expected batch size / N
    steps: int = 100  # number of DP steps (what the accountant was told)
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0  # SGD only
    per_sample: str = "vmap"  # vmap | ghost (same numbers; ghost is faster but only for nn.Linear on (B, d))


def poisson_batches(num_samples: int, sample_rate: float, steps: int,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches of opacus's UniformWithReplacementSampler: each example in each batch independently w.p. q."""
    sampler = UniformWithReplacementSampler(num_samples=num_samples, sample_rate=sample_rate,
                                            generator=generator, steps=steps)
    for idx in sampler:
        yield torch.as_tensor(idx, dtype=torch.long)  # (B_t,), B_t ~ Binomial(N, q)


def clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clipping: str, R: float = 1.0,
                gamma: float = 0.01, per_sample: str = "vmap", loss_fn: Callable = F.cross_entropy,
                ) -> tuple[Grads, torch.Tensor, torch.Tensor]:
    """sum_i C_i g_i (no noise). Returns ({name: param shape}, norms ||g_i|| (B,), losses (B,))."""
    if per_sample == "vmap":
        grads, losses = per_sample_grads(model, x, y, loss_fn)  # {name: (B, *shape)}, (B,)
        norms = per_sample_norms(grads)  # (B,)
        return clip_and_sum(grads, clip_factors(norms, clipping, R=R, gamma=gamma)), norms, losses
    if per_sample == "ghost":
        layers, losses = ghost_forward_backward(model, x, y, loss_fn)
        norms = ghost_norms(layers, model)  # (B,)
        return ghost_clip_and_sum(layers, model, clip_factors(norms, clipping, R=R, gamma=gamma)), norms, losses
    raise ValueError(f"per_sample {per_sample!r}; allowed: {', '.join(PER_SAMPLE_METHODS)}")


def private_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clipping: str, R: float, gamma: float,
                 sigma: float, expected_batch_size: float, generator: torch.Generator | None = None,
                 per_sample: str = "vmap", loss_fn: Callable = F.cross_entropy) -> tuple[Grads, dict]:
    """g_hat = (sum_i C_i g_i + sigma * S * z) / (q N). Returns ({name: param shape}, stats)."""
    if len(x) == 0:  # an empty Poisson batch still releases noise
        summed = {name: torch.zeros_like(p) for name, p in trainable_params(model).items()}
        stats = {"loss": float("nan"), "mean_norm": float("nan"), "frac_clipped": float("nan"), "batch": 0}
    else:
        summed, norms, losses = clipped_sum(model, x, y, clipping=clipping, R=R, gamma=gamma,
                                            per_sample=per_sample, loss_fn=loss_fn)
        stats = {"loss": losses.mean().item(), "mean_norm": norms.mean().item(),
                 "frac_clipped": (norms > R).float().mean().item() if clipping == "abadi" else 1.0,
                 "batch": len(x)}
    summed = {name: summed[name] for name in trainable_params(model)}  # parameter order: same noise draws per method
    noisy = add_gaussian_noise(summed, sigma * sensitivity(clipping, R), generator)
    return {name: g / expected_batch_size for name, g in noisy.items()}, stats


def make_optimizer(model: nn.Module, cfg: DPConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    raise ValueError(f"optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def dp_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg: DPConfig,
            expected_batch_size: float, generator: torch.Generator | None = None,
            loss_fn: Callable = F.cross_entropy) -> dict:
    """One DP update of ``model`` on the batch (x, y); returns the step's statistics."""
    g_hat, stats = private_grad(model, x, y, clipping=cfg.clipping, R=cfg.R, gamma=cfg.gamma, sigma=cfg.sigma,
                                expected_batch_size=expected_batch_size, generator=generator,
                                per_sample=cfg.per_sample, loss_fn=loss_fn)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = g_hat[name].to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def train_dp(model: nn.Module, X: torch.Tensor, y: torch.Tensor, cfg: DPConfig,
             generator: torch.Generator | None = None, loss_fn: Callable = F.cross_entropy) -> list[dict]:
    """Run ``cfg.steps`` DP steps on (X, y) with Poisson batches; ``generator`` drives sampling and noise."""
    model.train()
    optimizer = make_optimizer(model, cfg)
    expected_batch_size = cfg.sample_rate * len(X)
    history = []
    for idx in poisson_batches(len(X), cfg.sample_rate, cfg.steps, generator):
        history.append(dp_step(model, optimizer, X[idx], y[idx], cfg, expected_batch_size, generator, loss_fn))
    return history


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(X).argmax(dim=1) == y).float().mean().item()
