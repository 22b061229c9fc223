"""One small training / evaluation harness shared by the NAS papers (elastic CNN supernets, NB-201 supernets,
standalone children), so that every paper trains its method and its baseline with the same loop.

- :func:`image_data`: a real shipped image set split as the ground truth splits it (``groundtruth.load_split``), as
  torch tensors, optionally resized (``size``) for a cheaper image.
- :func:`batches`: an endless iterator of shuffled minibatches (a fresh permutation every epoch, torch Generator).
- :func:`train_model`: SGD (Nesterov momentum, weight decay, optional no-decay parameter set) with a cosine or constant
  learning rate and linear warm-up, for ``steps`` steps of a user ``loss_fn(model, x, y, step)``; when ``loss_fn``
  did its own backward (several children per step) it returns None or a detached loss and the loop only steps.
- :func:`train_supernet`: the BigNAS sandwich loop (``nas.elastic.sandwich_backward``) with a paper's ``configs_fn``.
- :func:`evaluate` / :func:`evaluate_child`: accuracy of a model, or of a supernet's child as a standalone network
  with its BN statistics recalibrated on training images (``nas.bn.set_running_statistics``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bn import recalibrated_subnet, standalone_child

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")


def image_data(dataset: str = "digits", split=(0.6, 0.2, 0.2), split_seed: int = 0, size: int | None = None) -> dict:
    """{"train"|"val"|"test": (X (N, 1, H, W) float32, y int64)} standardised with the train mean / std; ``size``
    resizes the images (bilinear, antialiased) to size x size."""
    from .groundtruth import load_split

    out = {}
    for k, (X, y) in load_split(dataset, split, split_seed).items():
        X = torch.from_numpy(X)
        if size is not None and size != X.shape[-1]:
            X = F.interpolate(X, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[k] = (X.contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return out


def batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
            drop_last: bool = False) -> Iterator:
    """Endless shuffled minibatches: one permutation per epoch; the last partial batch of an epoch is kept unless
    ``drop_last`` (then an epoch shorter than one batch still yields one, smaller, batch)."""
    n = len(y)
    stop = (n - batch_size + 1 if n >= batch_size else 1) if drop_last else n
    while True:
        perm = torch.randperm(n, generator=generator)
        for b in range(0, stop, batch_size):
            i = perm[b:b + batch_size]
            yield X[i], y[i]


def lr_at(step: int, steps: int, lr: float, schedule: str = "cosine", warmup_steps: int = 0) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warm-up, then cosine to 0 or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * t))


def train_model(model: nn.Module, data: dict, steps: int, loss_fn: Callable, *, lr: float, momentum: float = 0.9,
                nesterov: bool = True, weight_decay: float = 0.0, batch_size: int = 128, seed: int = 0,
                schedule: str = "cosine", warmup_steps: int = 0, params=None, no_decay=None,
                on_step: Callable | None = None, optimizer: str = "sgd", betas=(0.9, 0.999),
                grad_clip: float | None = None) -> list[float]:
    """Train ``model`` for ``steps`` SGD steps on ``data["train"]``; returns per-step losses (NaN when ``loss_fn``
    returned None). A returned loss that needs no gradient is only recorded (``loss_fn`` did its own backward). ``params``: the parameters to optimise (default all); ``no_decay``: parameters without weight
    decay (e.g. BN and biases). ``on_step(step, model)`` runs after each optimizer step. ``optimizer``: ``sgd``
    (Nesterov momentum) or ``adamw`` (``betas``; ``momentum`` / ``nesterov`` unused), the transformers' default;
    ``grad_clip``: clip the global gradient norm before each step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    params = list(model.parameters()) if params is None else list(params)
    nd = {id(p) for p in (no_decay or [])}
    groups = [{"params": [p for p in params if id(p) not in nd], "weight_decay": weight_decay}]
    if nd:
        groups.append({"params": [p for p in params if id(p) in nd], "weight_decay": 0.0})
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    gen = torch.Generator().manual_seed(int(seed))
    it = batches(*data["train"], batch_size, gen)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, schedule, warmup_steps)
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y, step)
        if loss is not None and loss.requires_grad:
            loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(float(loss.detach()) if loss is not None else float("nan"))
        if on_step is not None:
            on_step(step, model)
    return losses


def flat_grad(params) -> torch.Tensor:
    """The gradients of ``params`` as one flat vector; a parameter without a gradient counts as zeros (so vectors
    from different paths / children have the same length)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def ce_loss(model: nn.Module, x, y, step) -> torch.Tensor:
    """Plain cross-entropy ``loss_fn`` (standalone training)."""
    return F.cross_entropy(model(x), y)


def train_supernet(net, data: dict, steps: int, configs_fn: Callable, *, kd: bool = True, seed: int = 0,
                   label_smoothing: float = 0.0, **opt) -> list[float]:
    """BigNAS sandwich training: at each step ``configs_fn(step, rng)`` (rng: numpy Generator seeded with ``seed``)
    gives the children (first = the teacher when ``kd``), whose gradients ``nas.elastic.sandwich_backward``
    accumulates before one optimizer step. Returns the first child's loss per step; ``opt``: train_model's options."""
    from .elastic import sandwich_backward

    rng = np.random.default_rng(seed)

    def loss_fn(model, x, y, step):
        losses = sandwich_backward(model, x, y, configs_fn(step, rng), kd, label_smoothing)
        return torch.tensor(losses[0])  # needs no grad: train_model records it only

    return train_model(net, data, steps, loss_fn, seed=seed, **opt)


@torch.no_grad()
def evaluate(model: nn.Module, data: dict, split: str = "val", batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data[split]``."""
    X, y = data[split]
    was = model.training
    model.eval()
    correct = 0
    for b in range(0, len(y), batch_size):
        correct += int((model(X[b:b + batch_size]).argmax(1) == y[b:b + batch_size]).sum())
    model.train(was)
    return correct / len(y)


child = standalone_child  # a standalone copy of a supernet's child (nas.bn)


def evaluate_child_splits(net, config, data: dict, splits=("val", "test"), calib: int = 1024,
                          method: str = "ofa") -> dict[str, float]:
    """{split: accuracy} of the child ``config`` as a standalone network whose BN statistics were recalibrated ONCE
    on the first ``calib`` training images (one batch: OFA's recipe gives their exact mean / biased variance)."""
    sub = recalibrated_subnet(net, config, [data["train"][0][:calib]], method)
    return {s: evaluate(sub, data, s) for s in splits}


def evaluate_child(net, config, data: dict, split: str = "val", calib: int = 1024, method: str = "ofa") -> float:
    """Accuracy on ``split`` of the child ``config`` (:func:`evaluate_child_splits` for one split)."""
    return evaluate_child_splits(net, config, data, (split,), calib, method)[split]
