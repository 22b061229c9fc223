"""Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger (Bu, Wang, Zha, Karypis 2022).

https://arxiv.org/abs/2206.07136 . The experiment: DP-SGD with Abadi clipping tuned over a grid R x learning rate,
versus AUTO-S (C_i = 1 / (||g_i|| + 0.01), sensitivity 1) tuned over the learning rate only, at the same
(epsilon, delta), model, batch size, number of steps and seeds. Each method's cell is chosen on a validation split
carved from the training data (seed-mean accuracy); the test accuracy at that cell is reported per seed.
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


def split_validation(X: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(X_train, y_train, X_val, y_val): the last ``val_fraction`` of a seeded permutation of the training split is
    held out for hyperparameter selection (the test split is never used to choose a grid cell)."""
    perm = torch.from_numpy(np.random.default_rng(seed + 10_000).permutation(len(X)))
    n_val = int(round(val_fraction * len(X)))
    va, tr = perm[len(X) - n_val:], perm[: len(X) - n_val]
    return X[tr], y[tr], X[va], y[va]


def run_arm(data: tuple[torch.Tensor, ...], base: DPConfig, hidden: int, seed: int, **overrides) -> tuple[float, ...]:
    """Train one model from the seed's initialization with the seed's batches and noise.

    ``data`` = (X_train, y_train, X_eval1, y_eval1, X_eval2, y_eval2, ...); returns the accuracy on each evaluation
    split, in order (e.g. (validation, test))."""
    X_tr, y_tr = data[0], data[1]
    cfg = replace(base, **overrides)
    torch.manual_seed(seed)
    model = make_mlp(X_tr.shape[1], hidden, int(y_tr.max()) + 1)
    gen = torch.Generator().manual_seed(seed)  # same Poisson batches and noise draws for every arm of a seed
    train_dp(model, X_tr, y_tr, cfg, generator=gen)
    return tuple(accuracy(model, data[i], data[i + 1]) for i in range(2, len(data), 2))


def run_grid(data: tuple[torch.Tensor, ...], base: DPConfig, hidden: int, R_grid: list[float], lr_grid: list[float],
             auto_lr_grid: list[float], seeds: list[int], progress=lambda it: it) -> dict[str, np.ndarray]:
    """Accuracy of Abadi over R x lr and of AUTO-S over lr, for every seed and evaluation split of ``data``.

    Returns {"abadi": (S, len(R_grid), len(lr_grid), E), "auto_s": (S, len(auto_lr_grid), E)} with E evaluation
    splits (see ``run_arm``). ``progress`` wraps the list of runs (e.g. ``tqdm``).
    """
    n_eval = (len(data) - 2) // 2
    jobs = [("abadi", (s, i, j), dict(clipping="abadi", R=R, lr=lr), seed)
            for s, seed in enumerate(seeds) for i, R in enumerate(R_grid) for j, lr in enumerate(lr_grid)]
    jobs += [("auto_s", (s, j), dict(clipping="auto_s", lr=lr), seed)
             for s, seed in enumerate(seeds) for j, lr in enumerate(auto_lr_grid)]
    out = {"abadi": np.zeros((len(seeds), len(R_grid), len(lr_grid), n_eval)),
           "auto_s": np.zeros((len(seeds), len(auto_lr_grid), n_eval))}
    for arm, index, overrides, seed in progress(jobs):
        out[arm][index] = run_arm(data, base, hidden, seed, **overrides)
    return out


def summarize_grid(acc: dict[str, np.ndarray], R_grid: list[float], lr_grid: list[float],
                   auto_lr_grid: list[float], select: int = 0, report: int = -1) -> dict:
    """Select each method's cell on the seed-mean accuracy of evaluation split ``select`` (validation) and report the
    per-seed accuracy (in points) of split ``report`` (test) at that cell, with Abadi's sensitivity to R.

    ``acc`` is ``run_grid``'s output. Per-seed values at the selected cells are what the claim pairs by seed."""
    sel_abadi, sel_auto = acc["abadi"][..., select].mean(axis=0), acc["auto_s"][..., select].mean(axis=0)
    i, j = np.unravel_index(np.argmax(sel_abadi), sel_abadi.shape)
    k = int(np.argmax(sel_auto))
    abadi = 100 * acc["abadi"][..., report].mean(axis=0)  # (len(R), len(lr)): seed-mean reported accuracy
    auto = 100 * acc["auto_s"][..., report].mean(axis=0)  # (len(auto_lr),)
    abadi_seeds = 100 * acc["abadi"][:, i, j, report]  # (S,)
    auto_seeds = 100 * acc["auto_s"][:, k, report]  # (S,)
    best_lr_per_R = abadi.max(axis=1)  # (len(R),): Abadi when lr is tuned (here on the reported split) but R fixed
    return {
        "abadi_acc": abadi.tolist(), "auto_s_acc": auto.tolist(),
        "abadi_select_acc": (100 * sel_abadi).tolist(), "auto_s_select_acc": (100 * sel_auto).tolist(),
        "abadi_best_R": float(R_grid[i]), "abadi_best_lr": float(lr_grid[j]), "auto_s_best_lr": float(auto_lr_grid[k]),
        "abadi_selected_per_seed": abadi_seeds.tolist(), "auto_s_selected_per_seed": auto_seeds.tolist(),
        "abadi_selected_acc": float(abadi_seeds.mean()), "auto_s_selected_acc": float(auto_seeds.mean()),
        "gap_points": float(abadi_seeds.mean() - auto_seeds.mean()),  # Abadi - AUTO-S at the selected cells
        "abadi_best_over_lr_per_R": best_lr_per_R.tolist(),
        "abadi_R_spread_tuned_lr": float(best_lr_per_R.max() - best_lr_per_R.min()),
        "abadi_R_spread_at_best_lr": float(abadi[:, j].max() - abadi[:, j].min()),
        "auto_s_lr_spread": float(auto.max() - auto.min()),
        "abadi_selected_seed_std": float(abadi_seeds.std()), "auto_s_selected_seed_std": float(auto_seeds.std()),
        "abadi_best_cell_on_test": float(abadi.max()), "auto_s_best_cell_on_test": float(auto.max()),
    }
