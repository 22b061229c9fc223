"""Balanced Mixture of SuperNets for Learning the CNN Pooling Architecture (Javan, Toews & Pedersoli, AutoML 2023),
https://arxiv.org/abs/2306.11982.

The search space is WHERE a ResNet downsamples: a chain of ``L`` layers (a conv-BN-ReLU stem, then ``L - 1`` residual
blocks with fixed channel widths), and a 2x2 max pooling placed before ``n_pool`` of the ``L - 1`` blocks, i.e.
C(L - 1, n_pool) pooling configurations (official ResNet20: L = 10, 2 poolings, 36 configurations, default [4, 3, 3] =
pooling before layers 4 and 7). A single supernet shares all its weights among the configurations; the paper trains a
MIXTURE of M supernets (no weights shared between them) and learns which supernet trains which configuration.

Follows the official code, github.com/mehravehj/Balanced-Mixture-of-SuperNets, ``experiments/Pooling Experiments/
resnet20/Balanced Mixture/`` (``main.py``, ``create_model.py``, ``utils/NAS_trainer.py`` [train_valid, validate_all],
``utils/search_space_design.py`` [create_search_space, model_prob_calculator, exp_moving_avg]):

* ASSIGNMENT: a matrix ``W`` (configurations x M) initialised to 1; ``p(m | a) = softmax_m(T_e * W[a])`` with a
  temperature ``T_e`` rising linearly from 1 to ``max_temperature`` over the epochs. BALANCING [train_valid]: at the
  start of an epoch the rows are repeatedly divided by the marginal ``p(m) = mean_a p(m | a)`` and renormalised until
  ``|KL(p(m) || uniform)| <= threshold``; the marginals of those iterations are kept for the epoch and re-applied to
  the current ``W`` at every step [model_prob_calculator], so every supernet gets an equal share of configurations.
* STEP: a configuration ``a`` drawn uniformly, a supernet ``m ~ p(m | a)``; one SGD step of supernet ``m`` with the
  pooling ``a`` on a training batch; then the accuracy of that (a, m) on a validation batch (batch statistics, no
  gradient) updates ``W[a, m] <- decay * W[a, m] + (1 - decay) * acc`` (decay 0.9).
* Every supernet has its own SGD (lr 0.1, momentum 0.9, wd 0) and CosineAnnealingLR(T_max = epochs + 1, eta_min 1e-3)
  stepped per epoch; BN without affine parameters [create_model.py].
* After training each configuration is scored by its validation accuracy on the supernet it is assigned to
  (argmax_m p(m | a), the final balanced probabilities); the best-scoring configuration is the search result.

Arms: ``single`` (M = 1: uniform single-path one-shot, the paper's "SPOS fully shared"), ``mixture`` (learned
balanced assignment) and ``random`` (ablation: a fixed random balanced partition of the configurations over the M
supernets, same steps).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bn import set_running_statistics
from .harness import batches, evaluate

ARMS = ("single", "mixture", "random")


# ------------------------------------------------------------------------------------------------ search space
def configurations(n_layers: int, n_pool: int) -> tuple[tuple[int, ...], ...]:
    """All pooling configurations [create_search_space]: tuples of length ``n_layers`` with a 1 before each layer that
    is preceded by a 2x2 max pooling; the stem (layer 0) never pools; ``n_pool`` poolings among the other layers;
    lexicographic order of the pooled positions (itertools.combinations), as the official code."""
    if not 0 <= n_pool <= n_layers - 1:
        raise ValueError(f"n_pool={n_pool} must be in [0, {n_layers - 1}]")
    out = []
    for pos in combinations(range(n_layers - 1), n_pool):
        p = [0] * (n_layers - 1)
        for i in pos:
            p[i] = 1
        out.append(tuple([0] + p))
    return tuple(out)


def layers_per_resolution(config) -> list[int]:
    """The paper's notation, e.g. (0,0,0,0,1,0,0,1,0,0) -> [4, 3, 3] (layers at each resolution)."""
    cuts = [i for i, p in enumerate(config) if p] + [len(config)]
    out, start = [], 0
    for c in cuts:
        out.append(c - start)
        start = c
    return out


# ------------------------------------------------------------------------------------------------ network
def _bn(c: int, track: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=False, track_running_stats=track)


class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU (the stem, official BasicConvBlock)."""

    def __init__(self, cin: int, cout: int, track: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = _bn(cout, track)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ResBlock(nn.Module):
    """Basic residual block (official ResBasicBlock, stride 1): conv-BN-ReLU-conv-BN + identity (1x1 conv-BN when the
    width changes), ReLU."""

    def __init__(self, cin: int, cout: int, track: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = _bn(cout, track)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _bn(cout, track)
        self.downsample = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _bn(cout, track))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class PoolingResNet(nn.Module):
    """The official ResNet20 pooling supernet (create_model.py), any depth / widths: ``channels[i]`` is the width of
    layer i (independent of where the poolings are). ``set_path(config)`` picks the pooling configuration; forward
    applies a 2x2 max pooling before every layer i with ``config[i] == 1``. ``track_running_stats=True`` (ours) lets
    a configuration's BN statistics be recalibrated before evaluation (training always uses batch statistics)."""

    def __init__(self, channels, num_classes: int = 10, in_channels: int = 1, track_running_stats: bool = True):
        super().__init__()
        channels = [int(c) for c in channels]
        self.channels = channels
        layers = [ConvBlock(in_channels, channels[0], track_running_stats)]
        layers += [ResBlock(channels[i - 1], channels[i], track_running_stats) for i in range(1, len(channels))]
        self.res = nn.ModuleList(layers)
        self.fc = nn.Linear(channels[-1], num_classes)
        self.pool: tuple[int, ...] | None = None

    def set_path(self, config) -> None:
        config = tuple(int(p) for p in config)
        if len(config) != len(self.res):
            raise ValueError(f"config of length {len(config)} for {len(self.res)} layers")
        self.pool = config

    def forward(self, x, config=None):
        pool = self.pool if config is None else tuple(config)
        if pool is None:
            raise RuntimeError("set_path(config) first")
        out = x  # (B, C_in, H, W)
        for c, layer in enumerate(self.res):
            if pool[c]:
                out = F.max_pool2d(out, kernel_size=2)
            out = layer(out)
        out = out.mean((2, 3))  # adaptive average pooling to 1x1 -> (B, C)
        return self.fc(out)


def standalone(channels, config, **kw) -> PoolingResNet:
    """A fresh network with the pooling configuration fixed (ground truth / baseline training)."""
    net = PoolingResNet(channels, **kw)
    net.set_path(config)
    return net


# ------------------------------------------------------------------------------------------------ balanced assignment
def kl_to_uniform(marginal: torch.Tensor) -> float:
    """The official balancing criterion: |sum_m p(m) log(p(m) / (1/M))| (KL of the model marginal from uniform)."""
    marginal = marginal.reshape(-1)
    u = 1.0 / marginal.numel()
    return float(abs((marginal * (marginal / u).log()).sum()))


def balance_marginals(weight_mat: torch.Tensor, temperature: float, threshold: float, max_iter: int = 1000):
    """[train_valid, top] p(m | a) = softmax(T * W) rows, then repeated division by the column marginal and row
    renormalisation until the marginal is within ``threshold`` (KL) of uniform. Returns (the list of marginals that
    were divided out, the balanced p(m | a))."""
    prob = F.softmax(weight_mat * temperature, dim=1)  # (A, M) conditional p(model | arch)
    marginal = prob.sum(0, keepdim=True) / prob.shape[0]  # (1, M)
    marginals = []
    it = 0
    while kl_to_uniform(marginal) > threshold and it < max_iter:
        marginals.append(marginal)
        prob = prob / marginal
        prob = prob / prob.sum(1, keepdim=True)
        marginal = prob.sum(0, keepdim=True) / prob.shape[0]
        it += 1
    return marginals, prob


def model_prob(weight_mat: torch.Tensor, marginals, temperature: float) -> torch.Tensor:
    """[model_prob_calculator] softmax(T * W) rows, then the epoch's marginals divided out in turn (rows renormalised
    after each): the balanced p(m | a) used to sample the supernet of a configuration."""
    prob = F.softmax(weight_mat * temperature, dim=1)  # (A, M)
    for m in marginals:
        prob = prob / m
        prob = prob / prob.sum(1, keepdim=True)
    return prob


def noise_free_spread(acc: np.ndarray) -> np.ndarray:
    """The spread of a ground truth WITHOUT its seed noise: ``acc`` (configurations x seeds) of standalone accuracies;
    for each seed j, the covariance over the configurations of seed j's accuracies with the mean of the other seeds'
    (= the between-configuration variance: the seeds' noises are independent), returned as a signed square root
    (an estimate of the std over configurations of the noise-free accuracy; negative = no spread at all). The raw
    std over configurations of one seed also contains that seed's noise, and would read the seed noise even if every
    configuration were equally good."""
    acc = np.asarray(acc, dtype=float)
    if acc.ndim != 2 or acc.shape[1] < 2:
        raise ValueError("need (configurations, seeds >= 2)")
    out = []
    for j in range(acc.shape[1]):
        rest = np.delete(acc, j, 1).mean(1)
        c = float(np.cov(acc[:, j], rest)[0, 1])
        out.append(math.copysign(math.sqrt(abs(c)), c))
    return np.array(out)


def random_partition(n_configs: int, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed random balanced assignment (ablation): configuration -> supernet, every supernet gets floor or ceil of
    n_configs / n_models configurations."""
    base = np.arange(n_configs) % n_models
    return rng.permutation(base)


def temperatures(epochs: int, t0: float, t_max: float) -> list[float]:
    """[main.py] linear temperature t0 -> t_max over the epochs (official: epochs + 1 values for range(epochs + 1))."""
    if epochs == 1:
        return [float(t0)]
    return [t0 + (t_max - t0) * e / (epochs - 1) for e in range(epochs)]


def cosine_lr(epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """CosineAnnealingLR(T_max = epochs, eta_min = min_lr) stepped per epoch: the lr during epoch ``epoch`` (0-based);
    the official run uses T_max = epochs + 1 for its epochs + 1 epochs, i.e. T_max = the number of epochs run."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# ------------------------------------------------------------------------------------------------ training
@dataclass
class MixtureLog:
    counts: np.ndarray  # (A, M) how often configuration a trained supernet m
    weight_mat: np.ndarray  # (A, M) final W
    prob: np.ndarray  # (A, M) final balanced p(m | a)
    assign: np.ndarray  # (A,) supernet each configuration is evaluated on
    loss: list = field(default_factory=list)  # mean training loss per epoch
    kl_start: list = field(default_factory=list)  # KL(marginal || uniform) before balancing, per epoch


def train_mixture(nets: list[PoolingResNet], configs, data: dict, *, arm: str, epochs: int, batch_size: int,
                  lr: float, min_lr: float, momentum: float, weight_decay: float, temperature: float,
                  max_temperature: float, ema_decay: float, threshold: float, init_logit: float = 1.0,
                  seed: int = 0) -> MixtureLog:
    """The official search loop [main.py + train_valid] for ``epochs`` epochs (one pass over data["train"] each):
    per batch a uniform configuration, a supernet from the arm's assignment, one SGD step of that supernet, and (arm
    ``mixture``) the EMA update of W with the validation-batch accuracy. ``single``: one supernet (M = 1);
    ``random``: the fixed random partition. Every arm draws its configurations, batches and (for sampling) the
    supernet with separate generators seeded by ``seed``, so the configuration and batch sequences are the same in
    every arm of a seed."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    A, M = len(configs), len(nets)
    if arm == "single" and M != 1:
        raise ValueError("arm 'single' takes exactly one supernet")
    rng = np.random.default_rng(seed)  # configuration draws: the same sequence in every arm of a seed
    rng_m = np.random.default_rng([seed, 1])  # supernet draws (mixture)
    gen = torch.Generator().manual_seed(int(seed))
    vgen = torch.Generator().manual_seed(int(seed) + 10_007)
    opts = [torch.optim.SGD(n.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay) for n in nets]
    W = torch.full((A, M), float(init_logit))
    counts = np.zeros((A, M), dtype=int)
    assign_fixed = random_partition(A, M, np.random.default_rng([seed, 2])) if arm == "random" else None
    temps = temperatures(epochs, temperature, max_temperature)
    Xtr, ytr = data["train"]
    n_batches = math.ceil(len(ytr) / batch_size)
    train_it = batches(Xtr, ytr, batch_size, gen)
    val_it = batches(*data["val"], batch_size, vgen)
    log = MixtureLog(counts, W.numpy(), np.full((A, M), 1.0 / M), np.zeros(A, dtype=int))
    for n in nets:
        n.train()
    for epoch in range(epochs):
        T = temps[epoch]
        for o in opts:
            for g in o.param_groups:
                g["lr"] = cosine_lr(epoch, epochs, lr, min_lr)
        marginals, prob = balance_marginals(W, T, threshold)
        log.kl_start.append(kl_to_uniform(F.softmax(W * T, dim=1).mean(0)))
        tot = 0.0
        for _ in range(n_batches):
            a = int(rng.integers(A))  # uniform configuration
            if arm == "mixture":
                p = model_prob(W, marginals, T)[a].double().numpy()
                m = int(rng_m.choice(M, p=p / p.sum()))
            elif arm == "random":
                m = int(assign_fixed[a])
            else:
                m = 0
            counts[a, m] += 1
            net, opt = nets[m], opts[m]
            net.set_path(configs[a])
            x, y = next(train_it)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            if arm == "mixture":  # official: model.eval() with track_running_stats=False = batch statistics
                xv, yv = next(val_it)
                with torch.no_grad():
                    acc = float((net(xv).argmax(1) == yv).float().mean())
                W[a, m] = ema_decay * W[a, m] + (1 - ema_decay) * acc
        log.loss.append(tot / n_batches)
    marginals, prob = balance_marginals(W, temps[-1], threshold)
    log.weight_mat = W.numpy().copy()
    log.prob = prob.numpy().copy()
    if arm == "random":
        log.assign = assign_fixed.copy()
    else:
        log.assign = prob.argmax(1).numpy().astype(int)
    return log


def evaluate_config(net: PoolingResNet, config, data: dict, split: str = "val", calib: int = 256) -> float:
    """Accuracy of ``config`` on ``net``: a copy with the pooling set, BN recalibrated on the first ``calib``
    training images (OFA recipe), eval mode."""
    sub = copy.deepcopy(net)
    sub.set_path(config)
    set_running_statistics(sub, [data["train"][0][:calib]], "ofa")
    return evaluate(sub, data, split)


def score_configs(nets, configs, assign, data: dict, calib: int = 256, split: str = "val") -> np.ndarray:
    """[validate_all] each configuration's accuracy on ``split`` on the supernet it is assigned to."""
    return np.array([evaluate_config(nets[int(assign[i])], c, data, split, calib) for i, c in enumerate(configs)])


def train_standalone(channels, config, data: dict, *, epochs: int, batch_size: int, lr: float, min_lr: float,
                     momentum: float, weight_decay: float, seed: int, calib: int = 256) -> dict:
    """Ground truth: ``config`` trained alone with the search's optimiser and schedule (official main_base.py
    trains a configuration alone with the same SGD / cosine recipe); val and test accuracy after BN
    recalibration."""
    torch.manual_seed(seed)
    net = standalone(channels, config)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    Xtr, ytr = data["train"]
    n_batches = math.ceil(len(ytr) / batch_size)
    it = batches(Xtr, ytr, batch_size, gen)
    net.train()
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(epoch, epochs, lr, min_lr)
        for _ in range(n_batches):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return {"val": evaluate_config(net, config, data, "val", calib),
            "test": evaluate_config(net, config, data, "test", calib)}
