"""Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger (Bu, Wang, Zha, Karypis 2022).

https://arxiv.org/abs/2206.07136 . The experiment: DP-SGD with Abadi clipping tuned over a grid R x learning rate,
versus AUTO-S (C_i = 1 / (||g_i|| + 0.01), sensitivity 1) tuned over the learning rate only, at the same
(epsilon, delta), model, batch size, number of steps and seeds.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..data import ONLINE_CACHE, load_mnist5k
from .accountant import noise_multiplier
from .train import DPConfig, accuracy, train_dp

DATASETS = ("mnist5k", "digits", "mnist")


def load_split(dataset: str, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(X_train, y_train, X_test, y_test) as float32 features in [0, 1] and int64 labels, split with a fixed seed.

    mnist5k and digits are offline; mnist (torchvision, online) uses its own 60k/10k split and ignores
    ``test_fraction``.
    """
    if dataset == "mnist":
        from torchvision.datasets import MNIST

        tr, te = (MNIST(ONLINE_CACHE / "mnist", train=t, download=True) for t in (True, False))
        to_x = lambda d: d.data.reshape(len(d.data), -1).float() / 255.0  # noqa: E731  (N, 784)
        return to_x(tr), tr.targets.long(), to_x(te), te.targets.long()
    if dataset == "mnist5k":
        X, y = load_mnist5k()  # (5000, 784) in [0, 1]
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)  # (1797, 64) in [0, 1]
    else:
        raise ValueError(f"dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    perm = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(test_fraction * len(X)))
    te, tr = perm[:n_test], perm[n_test:]
    t = torch.from_numpy
    return t(X[tr]), t(y[tr]), t(X[te]), t(y[te])


def make_mlp(d_in: int, hidden: int, n_classes: int = 10) -> nn.Module:
    """d_in -> hidden -> n_classes with tanh (DP-friendly: bounded activations, as in Papernot et al. 2021)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def dp_schedule(n_train: int, batch_size: int, epochs: int, epsilon: float, delta: float,
                accountant: str = "rdp") -> dict:
    """Poisson rate q = B / N, steps = epochs / q, and the noise multiplier that spends (epsilon, delta)."""
    q = batch_size / n_train
    steps = int(round(epochs / q))
    return {"sample_rate": q, "steps": steps, "sigma": noise_multiplier(epsilon, delta, q, steps, accountant)}


def run_arm(data: tuple[torch.Tensor, ...], base: DPConfig, hidden: int, seed: int, **overrides) -> float:
    """Train one model from the seed's initialization with the seed's batches and noise; return test accuracy."""
    X_tr, y_tr, X_te, y_te = data
    cfg = replace(base, **overrides)
    torch.manual_seed(seed)
    model = make_mlp(X_tr.shape[1], hidden, int(y_tr.max()) + 1)
    gen = torch.Generator().manual_seed(seed)  # same Poisson batches and noise draws for every arm of a seed
    train_dp(model, X_tr, y_tr, cfg, generator=gen)
    return accuracy(model, X_te, y_te)


def run_grid(data: tuple[torch.Tensor, ...], base: DPConfig, hidden: int, R_grid: list[float], lr_grid: list[float],
             auto_lr_grid: list[float], seeds: list[int], progress=lambda it: it) -> dict[str, np.ndarray]:
    """Test accuracy of Abadi over R x lr and of AUTO-S over lr, for every seed.

    Returns {"abadi": (S, len(R_grid), len(lr_grid)), "auto_s": (S, len(auto_lr_grid))}. ``progress`` wraps the
    list of runs (e.g. ``tqdm``).
    """
    jobs = [("abadi", (s, i, j), dict(clipping="abadi", R=R, lr=lr), seed)
            for s, seed in enumerate(seeds) for i, R in enumerate(R_grid) for j, lr in enumerate(lr_grid)]
    jobs += [("auto_s", (s, j), dict(clipping="auto_s", lr=lr), seed)
             for s, seed in enumerate(seeds) for j, lr in enumerate(auto_lr_grid)]
    out = {"abadi": np.zeros((len(seeds), len(R_grid), len(lr_grid))),
           "auto_s": np.zeros((len(seeds), len(auto_lr_grid)))}
    for arm, index, overrides, seed in progress(jobs):
        out[arm][index] = run_arm(data, base, hidden, seed, **overrides)
    return out


def summarize_grid(acc: dict[str, np.ndarray], R_grid: list[float], lr_grid: list[float],
                   auto_lr_grid: list[float]) -> dict:
    """Seed-averaged accuracies (in points), the best arm of each method and Abadi's sensitivity to R."""
    abadi = 100 * acc["abadi"].mean(axis=0)  # (len(R), len(lr))
    auto = 100 * acc["auto_s"].mean(axis=0)  # (len(auto_lr),)
    i, j = np.unravel_index(np.argmax(abadi), abadi.shape)
    k = int(np.argmax(auto))
    best_lr_per_R = abadi.max(axis=1)  # (len(R),): Abadi when lr is tuned but R is fixed
    return {
        "abadi_acc": abadi.tolist(), "auto_s_acc": auto.tolist(),
        "abadi_best_acc": float(abadi[i, j]), "abadi_best_R": float(R_grid[i]), "abadi_best_lr": float(lr_grid[j]),
        "auto_s_best_acc": float(auto[k]), "auto_s_best_lr": float(auto_lr_grid[k]),
        "gap_points": float(auto[k] - abadi[i, j]),
        "abadi_best_over_lr_per_R": best_lr_per_R.tolist(),
        "abadi_R_spread_tuned_lr": float(best_lr_per_R.max() - best_lr_per_R.min()),
        "abadi_R_spread_at_best_lr": float(abadi[:, j].max() - abadi[:, j].min()),
        "auto_s_lr_spread": float(auto.max() - auto.min()),
        "abadi_best_acc_seed_std": float(100 * acc["abadi"][:, i, j].std()),
        "auto_s_best_acc_seed_std": float(100 * acc["auto_s"][:, k].std()),
    }
