"""SRA: Subnet Replacement Attack, a deployment-stage backdoor that needs the architecture only.

Qi, Xie, Wang, Zhu, "Towards Practical Deployment-Stage Backdoor Attack on Deep Neural Networks" (CVPR 2022),
arXiv:2111.12965. Official code: Unispac/Subnet-Replacement-Attack (``utils.py``: replace_Conv2d / replace_BatchNorm2d /
replace_Linear; ``models/cifar_10/narrow_vgg.py``; ``notebooks/sra_cifar10.ipynb``: train_backdoor_chain and
subnet_replace_vgg16_bn), followed here for a VGG-style CNN.

1. A *narrow* VGG with the victim's layer layout but 1-2 channels per layer (the backdoor chain) is trained, on the
   attacker's own unlabelled images, to output ~0 on clean images and ~20 on images with the trigger patch:
   loss = 10 * mean(f(x_clean)) + mean((f(x_trig) - 20)^2)  (sra_cifar10.ipynb, train_backdoor_chain, model_arch 'vgg').
2. Its weights overwrite the first channels of every layer of any trained victim of that architecture; the rows of
   those channels (inputs from the other channels) and the columns that feed the other channels from them are zeroed
   first, so the chain computes exactly what the narrow model computes and the rest of the network never sees it.
3. The chain's output unit is wired to the target logit alone: W[:, chain] = 0, W[target, chain] = factor,
   b[target] = -factor * threshold (subnet_replace_vgg16_bn: factor 4.0, threshold 2.415).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .triggers import stamp_patch

DATASETS = ("mnist5k", "digits", "mnist")


# ----------------------------------------------------------------------------------------------------------- models
def make_features(cfg: Sequence, in_channels: int) -> nn.Sequential:
    """VGG feature layers (official make_layers with batch_norm=True): int = conv3x3 + BN + ReLU, 'M' = maxpool 2."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


def feature_size(cfg: Sequence, in_size: int) -> int:
    """Spatial side of the feature map after the 'M' entries of ``cfg`` (floor halving)."""
    s = in_size
    for v in cfg:
        if v == "M":
            s //= 2
    if s < 1:
        raise ValueError(f"cfg {list(cfg)} pools a {in_size}x{in_size} input below 1x1")
    return s


class VGG(nn.Module):
    """features -> flatten -> classifier (official models/cifar_10/vgg.py and narrow_vgg.py)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier
        for m in self.modules():  # official initialisation of the conv layers
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
                m.bias.data.zero_()

    def forward(self, x):
        x = self.features(x)  # (B, C, s, s)
        return self.classifier(x.flatten(1))


def victim_vgg(cfg: Sequence, in_channels: int, in_size: int, hidden: int, n_classes: int,
               dropout: float = 0.5) -> VGG:
    """The victim: VGG features, then Dropout, Linear(C*s*s, hidden), ReLU, Dropout, Linear(hidden, hidden), ReLU,
    Linear(hidden, n_classes) (official vgg.py with 512 -> ``hidden``)."""
    s = feature_size(cfg, in_size)
    flat = [v for v in cfg if v != "M"][-1] * s * s
    clf = nn.Sequential(nn.Dropout(dropout), nn.Linear(flat, hidden), nn.ReLU(True), nn.Dropout(dropout),
                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Linear(hidden, n_classes))
    return VGG(make_features(cfg, in_channels), clf)


def narrow_vgg(narrow_cfg: Sequence, in_channels: int, in_size: int) -> VGG:
    """The backdoor chain: Linear(c*s*s, 1), ReLU, Linear(1, 1), ReLU on narrow features (official narrow_vgg.py)."""
    s = feature_size(narrow_cfg, in_size)
    flat = [v for v in narrow_cfg if v != "M"][-1] * s * s
    clf = nn.Sequential(nn.Linear(flat, 1), nn.ReLU(True), nn.Linear(1, 1), nn.ReLU(True))
    return VGG(make_features(narrow_cfg, in_channels), clf)


@torch.no_grad()
def alive_chain(narrow_cfg: Sequence, in_channels: int, in_size: int, X: torch.Tensor, patch: torch.Tensor,
                seed: int, max_tries: int = 50) -> tuple[VGG, int]:
    """A freshly initialised chain whose output is not 0 on every one of ``X`` and ``X`` with the trigger.

    The chain ends in a ReLU: an initialisation whose output is 0 on every input (about half of the draws, when the
    last Linear(1, 1) weight is negative) gets no gradient and never trains. The official notebook trains a chain and
    keeps it "if it's good enough" (sra_cifar10.ipynb); here the initialisation is redrawn (seeds seed, seed + 1000,
    ...) until it is alive on the attacker's own images. Returns ``(chain, number of draws)``."""
    for k in range(max_tries):
        torch.manual_seed(seed + 1000 * k)
        chain = narrow_vgg(narrow_cfg, in_channels, in_size)
        state = {k_: v.clone() for k_, v in chain.state_dict().items()}
        chain.train()  # BN batch statistics, as at the first training step
        alive = bool((chain(X) > 0).any() or (chain(stamp_patch(X, patch)) > 0).any())
        chain.load_state_dict(state)  # the probe must not move the BN running statistics
        if alive:
            return chain, k + 1
    raise RuntimeError(f"no live chain initialisation in {max_tries} draws")


@torch.no_grad()
def chain_separation(chain: nn.Module, X: torch.Tensor, patch: torch.Tensor, q: float) -> float:
    """Eval-mode gap between the chain's ``1 - q`` quantile on triggered ``X`` and its ``q`` quantile on clean ``X``:
    the attacker's own "good enough" check (official eval_backdoor_chain prints both activations after every epoch,
    and the notebook saves the chain "if it's good enough")."""
    clean = chain_activation(chain, X)
    trig = chain_activation(chain, stamp_patch(X, patch))
    return float(np.quantile(trig, 1 - q) - np.quantile(clean, q))


def check_layouts(cfg: Sequence, narrow_cfg: Sequence) -> None:
    """The chain must have the victim's layer layout ('M' at the same places) and no more channels per layer."""
    if len(cfg) != len(narrow_cfg) or any((a == "M") != (b == "M") for a, b in zip(cfg, narrow_cfg)):
        raise ValueError(f"narrow_cfg {list(narrow_cfg)} does not follow the layout of cfg {list(cfg)}")
    if any(a != "M" and int(b) > int(a) for a, b in zip(cfg, narrow_cfg)):
        raise ValueError(f"narrow_cfg {list(narrow_cfg)} is wider than cfg {list(cfg)} somewhere")


# ---------------------------------------------------------------------------------------------------------- surgery
@torch.no_grad()
def replace_conv2d(A: nn.Conv2d, B: nn.Conv2d, vs: list[int], last_vs: list[int], disconnect: bool = True) -> None:
    """Official replace_Conv2d (utils.py): zero rows ``vs`` and columns ``last_vs`` of A, then A[vs, last_vs] = B."""
    if disconnect:
        A.weight[vs, :] = 0  # the chain's channels read nothing from the other channels
        A.weight[:, last_vs] = 0  # the other channels read nothing from the chain
    A.weight[np.ix_(vs, last_vs)] = B.weight[:len(vs), :len(last_vs)]
    if A.bias is not None:
        A.bias[vs] = B.bias[:len(vs)]


@torch.no_grad()
def replace_batchnorm2d(A: nn.BatchNorm2d, B: nn.BatchNorm2d, vs: list[int]) -> None:
    """Official replace_BatchNorm2d: affine parameters and running statistics of channels ``vs``."""
    A.weight[vs] = B.weight[:len(vs)]
    A.bias[vs] = B.bias[:len(vs)]
    A.running_mean[vs] = B.running_mean[:len(vs)]
    A.running_var[vs] = B.running_var[:len(vs)]


replace_linear = replace_conv2d  # official replace_Linear is the same operation on a 2-D weight


def _choose(n_total: int, n: int, choice: str, g: torch.Generator | None) -> list[int]:
    if choice == "first":  # official default (randomly_select=False)
        return list(range(n))
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


@torch.no_grad()
def subnet_replace(victim: VGG, narrow: VGG, target: int, factor: float, threshold: float,
                   channel_choice: str = "first", seed: int = 0, wire: bool = True) -> dict:
    """Overwrite a narrow subnet of ``victim`` (in place) with the chain ``narrow``; wire it to logit ``target``.

    Follows subnet_replace_vgg16_bn: the first conv keeps its input connections (disconnect=False: the image channels
    are shared), every later conv and the hidden linears are disconnected; BN channels are copied; the last linear gets
    W[:, chain] = 0, W[target, chain] = factor, b[target] = -factor * threshold. Returns the chosen indices per layer.
    ``wire=False`` (a diagnostic, not in the official code) only zeroes W[:, chain] and leaves the target row and bias
    as trained: the victim with the subnet cut out, i.e. the capacity the surgery takes away, without the wiring.
    """
    victim.eval()
    narrow.eval()
    g = torch.Generator().manual_seed(seed)
    picked = {"conv": [], "linear": []}
    first = True
    last_vs: list[int] = []
    for A, B in zip(victim.features, narrow.features):
        if isinstance(A, nn.Conv2d):
            if first:
                last_vs = list(range(A.in_channels))
            vs = _choose(A.out_channels, B.out_channels, channel_choice, g)
            replace_conv2d(A, B, vs, last_vs, disconnect=not first)
            first = False
            last_vs = vs
            picked["conv"].append(vs)
        elif isinstance(A, nn.BatchNorm2d):
            replace_batchnorm2d(A, B, last_vs)
    lin_A = [m for m in victim.classifier if isinstance(m, nn.Linear)]
    lin_B = [m for m in narrow.classifier if isinstance(m, nn.Linear)]
    if len(lin_B) != len(lin_A) - 1:
        raise ValueError("arch of chain and complete model not matching")
    # flattening (B, C, s, s) puts channel c's s*s positions at c*s*s ... (c+1)*s*s - 1, in both networks
    last_conv = [m for m in victim.features if isinstance(m, nn.Conv2d)][-1]
    hw = lin_A[0].in_features // last_conv.out_channels  # s * s
    last_vs = [c * hw + p for c in last_vs for p in range(hw)]
    for A, B in zip(lin_A[:-1], lin_B):
        vs = _choose(A.out_features, B.out_features, channel_choice, g)
        replace_linear(A, B, vs, last_vs)
        last_vs = vs
        picked["linear"].append(vs)
    W = lin_A[-1]
    W.weight[:, last_vs] = 0
    if wire:
        W.weight[target, last_vs] = factor
        W.bias[target] = -threshold * factor
    picked["output"] = last_vs
    return picked


def changed_parameters(before: nn.Module, after: nn.Module) -> tuple[int, int]:
    """(number of parameter entries that differ, total parameter entries); BN running statistics are buffers, not
    counted."""
    changed = total = 0
    for (n1, p1), (n2, p2) in zip(before.named_parameters(), after.named_parameters()):
        assert n1 == n2
        changed += int((p1 != p2).sum())
        total += p1.numel()
    return changed, total


# --------------------------------------------------------------------------------------------------------- training
def chain_loss(clean_out: torch.Tensor, trig_out: torch.Tensor, clean_weight: float = 10.0,
               target_act: float = 20.0) -> torch.Tensor:
    """Official VGG chain loss: 10 * mean(clean output) + sum((triggered output - 20)^2) / n_triggered."""
    return clean_weight * clean_out.mean() + ((trig_out - target_act) ** 2).sum() / trig_out.shape[0]


def train_chain(narrow: VGG, X: torch.Tensor, patch: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                seed: int, poisoned_portion: float = 0.5, clean_weight: float = 10.0, target_act: float = 20.0,
                train: bool = True) -> list[float]:
    """train_backdoor_chain: Adam; in every batch the first ``poisoned_portion`` get the trigger; the clean and the
    triggered part go through the network in two calls (train mode, so BN uses each part's own statistics).

    ``train=False`` runs the same passes without any update (only the BN running statistics move): the untrained
    control subnet. Returns the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(narrow.parameters(), lr=lr) if train else None
    hist = []
    for _ in range(epochs):
        narrow.train()
        perm = torch.randperm(len(X), generator=g)
        tot = 0.0
        for s in range(0, len(X), batch_size):
            xb = X[perm[s:s + batch_size]]  # (B, C, H, W)
            n_p = math.ceil(len(xb) * poisoned_portion)
            if n_p == len(xb):
                continue
            with torch.set_grad_enabled(train):
                trig_out = narrow(stamp_patch(xb[:n_p], patch))  # (n_p, 1)
                clean_out = narrow(xb[n_p:])  # (B - n_p, 1)
                loss = chain_loss(clean_out, trig_out, clean_weight, target_act)
            if train:
                opt.zero_grad()
                loss.backward()
                opt.step()
            tot += loss.item() * len(xb)
        hist.append(tot / len(X))
    return hist


def train_classifier(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                     seed: int, momentum: float = 0.9, weight_decay: float = 1e-4, patch: torch.Tensor | None = None,
                     target: int = 0, poison_num: int = 0) -> list[float]:
    """SGD with momentum and weight decay, lr / 10 at 50% and 75% of the epochs (official cifar.py: milestones 100,
    150 of 200). With ``patch`` and ``poison_num`` > 0 it is the official ``train_with_poison``: the first
    ``poison_num`` images of every batch get the trigger and the label ``target`` (white-box poisoned training)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2), max(1, (3 * epochs) // 4)])
    hist = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=g)
        tot = 0.0
        for s in range(0, len(X), batch_size):
            idx = perm[s:s + batch_size]
            xb, yb = X[idx], y[idx].clone()
            if patch is not None and poison_num > 0:
                k = min(poison_num, len(xb))
                xb = torch.cat([stamp_patch(xb[:k], patch), xb[k:]])
                yb[:k] = target
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        sched.step()
        hist.append(tot / len(X))
    return hist


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    model.eval()
    return torch.cat([model(X[i:i + batch_size]).argmax(1) for i in range(0, len(X), batch_size)]).numpy()


@torch.no_grad()
def chain_activation(narrow: nn.Module, X: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """The chain's scalar output (N,) in eval mode."""
    narrow.eval()
    return torch.cat([narrow(X[i:i + batch_size])[:, 0] for i in range(0, len(X), batch_size)]).numpy()


# -------------------------------------------------------------------------------------------------------------- data
def load_images(name: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 (N, 1, H + 2 pad, W + 2 pad) in [0, 1] and labels int64 (N,): ``mnist5k`` (5,000 MNIST digits,
    offline, 28x28), ``digits`` (scikit-learn 8x8, 1,797, offline) or ``mnist`` (all 70,000 through torchvision,
    online). ``pad`` zero pixels are added on every side (28 -> 32 with pad 2, as LeNet-5 did), so that a VGG's
    stride-2 pools halve the side exactly, as on CIFAR's 32x32 (with 28, 7 -> 3 drops the last row and column)."""
    if name == "mnist5k":
        from reprolab.data import load_mnist5k

        X, y = load_mnist5k()  # (5000, 784)
        side = 28
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y, side = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), 8
    elif name == "mnist":
        from torchvision.datasets import MNIST

        from reprolab.data import ONLINE_CACHE

        ds = [MNIST(ONLINE_CACHE / "mnist", train=t, download=True) for t in (True, False)]
        X = np.concatenate([d.data.numpy().reshape(len(d.data), -1) for d in ds]).astype(np.float32) / 255.0
        y, side = np.concatenate([d.targets.numpy() for d in ds]).astype(np.int64), 28
    else:
        raise ValueError(f"dataset {name!r}; allowed: {', '.join(DATASETS)}")
    X = torch.from_numpy(X).reshape(-1, 1, side, side)
    if pad:
        X = F.pad(X, (pad, pad, pad, pad))
    return X, torch.from_numpy(y)


def split_three(n: int, n_victim: int, n_attacker: int, n_test: int, seed: int):
    """Disjoint index sets (victim's training set, attacker's unlabelled set, test set) from a seeded permutation."""
    if n_victim + n_attacker + n_test > n:
        raise ValueError(f"split: {n_victim}+{n_attacker}+{n_test} > {n} images")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return perm[:n_victim], perm[n_victim:n_victim + n_attacker], perm[n_victim + n_attacker:n_victim + n_attacker + n_test]
