"""BigNAS: Scaling Up Neural Architecture Search with Big Single-Stage Models (Yu et al., ECCV 2020,
https://arxiv.org/abs/2003.11142): one supernet whose children are accurate WITHOUT retraining or fine-tuning.

BigNAS has no official code; its recipe is implemented in facebookresearch/AttentiveNAS (followed here where BigNAS
is silent, file:line in the registry's deviations):

* **sandwich rule** (``train_attentive_nas.py:256-312``): every step accumulates the gradients of the largest child,
  ``n_children - 2`` uniformly random children and the smallest child, then ONE optimizer step (gradients clipped by
  value, ``grad_clip_value`` 1.0);
* **in-place distillation** (``KLLossSoft``, ``utils/loss_ops.py``): the largest child learns from the labels (label
  smoothing 0.1, ``CrossEntropyLossSmooth``), every other child from the largest child's DETACHED logits,
  ``-sum softmax(teacher) * log_softmax(student)`` (T = 1);
* **regularisation only on the largest child** (BigNAS Sec. 3.2; ``set_dropout_rate`` before the max child only):
  dropout before the classifier only while the max child runs. Weight decay (on conv/linear weights, not on BN and
  biases: ``solver/build.py``) is applied once per step by the optimizer; the largest child holds every shared
  weight, so this equals BigNAS's "weight decay on the largest child only";
* **zero-initialised last BN gamma** of every residual block (``zero_residual_block_bn_weights``): each block starts
  as the identity;
* **exponentially decaying LR with constant ending** (BigNAS Sec. 3.2; AttentiveNAS ``WarmupMultiStepLR`` with
  ``clamp_lr``): linear warm-up, then lr = base * gamma^(completed decay cycles), never below ``clamp * base``
  (BigNAS: 5% of the initial LR) — :func:`bignas_lr`;
* **BN recalibration** of every child before it is evaluated (``reset_running_stats_for_calibration``: reset,
  cumulative average over ``calib_batches`` training batches, ``nas.bn`` method ``"cumulative"``).

The ablation arm ("without sandwich rule and in-place distillation") trains the same supernet for the same steps with
the same number of children per step, drawn uniformly at random, all on the labels. Standalone references: each
evaluated child trained from scratch alone (the same initialisation rule, optimiser, schedule, steps and batch size).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import bn as nas_bn
from .elastic import ElasticCNN
from .flops import cnn_macs
from .harness import batches, image_data
from .samplers import max_config, min_config, uniform

ARMS = ("bignas", "uniform")  # supernet arms; "standalone" copies are trained by train_standalone
CHILDREN = ("min", "small", "mid", "max")  # the evaluated children, in increasing MACs


# ---------------------------------------------------------------------------------------------------------- data
def load_data(dataset: str = "digits", size: int | None = None, split_seed: int = 0,
              split=(0.6, 0.2, 0.2)) -> dict:
    """{"train"/"val"/"test": (X (N,1,H,W) float32, y int64) torch tensors}, standardised, stratified: the shared
    harness's ``image_data`` (the ground truth's split for the defaults)."""
    return image_data(dataset, split=tuple(split), split_seed=split_seed, size=size)


# ---------------------------------------------------------------------------------------------------------- space
def build_supernet(cfg: dict) -> ElasticCNN:
    """The elastic CNN of the run (kernel transformation off: AttentiveNAS ``KERNEL_TRANSFORM_MODE = None``, the
    centre crop of the largest kernel as BigNAS), max-child dropout ``dropout``."""
    return ElasticCNN(in_channels=1, n_classes=10, stem_channels=cfg["stem_channels"],
                      stage_channels=tuple(cfg["stage_channels"]), stage_strides=tuple(cfg["stage_strides"]),
                      depth_list=tuple(cfg["depth_list"]), expand_ratio_list=tuple(cfg["expand_ratio_list"]),
                      ks_list=tuple(cfg["ks_list"]), width_mult_list=tuple(cfg["width_mult_list"]),
                      head_channels=cfg["head_channels"], kernel_transform=False, dropout=cfg["dropout"])


def _mid(choices: list):
    """The middle choice of a sorted choice list (the lower middle of an even-length list)."""
    c = sorted(choices)
    return c[(len(c) - 1) // 2]


def child_configs(net: ElasticCNN) -> dict[str, dict]:
    """The evaluated children (a MACs spread): ``min``, ``max``, ``small`` (smallest depth, middle expand ratio and
    width, smallest kernel) and ``mid`` (largest depth, middle expand ratio and width, largest kernel)."""
    sp = net.space()
    mid_e = [_mid(c) for c in sp["e"]]
    mid_w = [_mid(c) for c in sp["w"]]
    small = {"d": [min(c) for c in sp["d"]], "e": mid_e, "ks": [min(c) for c in sp["ks"]], "w": mid_w}
    mid = {"d": [max(c) for c in sp["d"]], "e": mid_e, "ks": [max(c) for c in sp["ks"]], "w": mid_w}
    return {"min": min_config(sp), "small": net.canonical(small), "mid": net.canonical(mid), "max": max_config(sp)}


def zero_last_bn_gamma(net: nn.Module) -> int:
    """Zero the last BN gamma of every residual block (ElasticCNN or its StaticCNN child); returns how many."""
    n = 0
    with torch.no_grad():
        for blk in net.blocks:
            if blk.residual:
                blk.point_linear.bn.weight.zero_()
                n += 1
    return n


# ---------------------------------------------------------------------------------------------------------- schedule
def bignas_lr(step: int, base_lr: float, warmup_steps: int, decay_every: int, gamma: float, clamp: float,
              total_steps: int, warmup_factor: float = 0.001) -> float:
    """BigNAS "exponentially decaying LR with constant ending", as AttentiveNAS ``WarmupMultiStepLR``
    (``solver/lr_scheduler.py``, milestones of ``build_lr_scheduler`` 'warmup_exp_decay_lr', ``clamp_lr``).

    warm-up factor f = warmup_factor (1 - s / W) + s / W for s < W (linear), else 1; c = number of milestones
    W + (i + 1) * decay_every (i < (total - W) // decay_every) that are <= s; lr = f * base * gamma^c, and, after the
    warm-up (s > W), never below clamp * base."""
    f = 1.0
    if step < warmup_steps:
        a = step / warmup_steps
        f = warmup_factor * (1.0 - a) + a
    n_milestones = (total_steps - warmup_steps) // decay_every
    c = 0 if step < warmup_steps else min(n_milestones, (step - warmup_steps) // decay_every)
    lr = base_lr * f * gamma ** c
    return max(clamp * base_lr if step > warmup_steps else 0.0, lr)


def make_optimizer(net: nn.Module, cfg: dict) -> torch.optim.SGD:
    """SGD, Nesterov momentum; weight decay on weights, none on BN parameters and biases (AttentiveNAS
    ``solver/build.py``: names containing ".bn" or ".bias")."""
    wd, no_wd = [], []
    for name, p in net.named_parameters():
        (no_wd if (".bn" in name or ".bias" in name or name.endswith("bias")) else wd).append(p)
    return torch.optim.SGD([{"params": wd, "weight_decay": cfg["weight_decay"]},
                            {"params": no_wd, "weight_decay": 0.0}],
                           lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)


def _set_lr(opt: torch.optim.Optimizer, step: int, cfg: dict) -> float:
    lr = bignas_lr(step, cfg["lr"], cfg["warmup_steps"], cfg["lr_decay_every"], cfg["lr_gamma"], cfg["lr_clamp"],
                   cfg["steps"])
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------------------- losses
def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """In-place distillation loss (AttentiveNAS ``KLLossSoft``, T = 1, no label term): mean over the batch of
    -sum_k softmax(teacher)_k log_softmax(student)_k, teacher DETACHED."""
    p = F.softmax(teacher_logits.detach(), dim=1)  # (B, K)
    return -(p * F.log_softmax(student_logits, dim=1)).sum(1).mean()


def step_configs(net: ElasticCNN, arm: str, n_children: int, rng: np.random.Generator) -> list[dict]:
    """The children of one training step. bignas: [max, n-2 uniform, min] (AttentiveNAS order: the largest first as
    the teacher, the smallest last); uniform: n uniform children."""
    sp = net.space()
    if arm == "bignas":
        return [max_config(sp)] + [uniform(sp, rng) for _ in range(n_children - 2)] + [min_config(sp)]
    if arm == "uniform":
        return [uniform(sp, rng) for _ in range(n_children)]
    raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")


def supernet_step(net: ElasticCNN, x: torch.Tensor, y: torch.Tensor, configs: list[dict],
                  opt: torch.optim.Optimizer, *, kd: bool, label_smoothing: float, dropout: float,
                  grad_clip: float | None) -> list[float]:
    """One step (``train_attentive_nas.py:256-318``): gradients of every child accumulated, clip by value, one
    optimizer step. configs[0] learns from the labels (with ``kd`` it is the teacher, and it must be the max child);
    the others from the teacher's detached logits (``kd``) or the labels. Dropout only while the max child runs."""
    opt.zero_grad(set_to_none=True)
    top = max_config(net.space())
    losses, soft = [], None
    for j, c in enumerate(configs):
        net.set_active_subnet(c)
        if isinstance(net.dropout, nn.Dropout):
            net.dropout.p = dropout if net.canonical(c) == top else 0.0
        out = net(x)  # (B, K)
        if j == 0 or not kd:
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        else:
            loss = soft_ce(out, soft)
        if j == 0:
            soft = out.detach()
        loss.backward()
        losses.append(float(loss.detach()))
    if grad_clip:
        nn.utils.clip_grad_value_(net.parameters(), grad_clip)
    opt.step()
    if isinstance(net.dropout, nn.Dropout):
        net.dropout.p = 0.0
    return losses


def train_supernet(arm: str, data: dict, cfg: dict, seed: int) -> tuple[ElasticCNN, list[float]]:
    """Train one supernet arm for ``cfg["steps"]`` steps; returns the net and the per-step mean loss."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    net = build_supernet(cfg)
    if cfg["zero_gamma"]:
        zero_last_bn_gamma(net)
    opt = make_optimizer(net, cfg)
    rng = np.random.default_rng(seed)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(seed))
    kd = arm == "bignas"
    net.train()
    curve = []
    for step in range(cfg["steps"]):
        _set_lr(opt, step, cfg)
        x, y = next(it)
        configs = step_configs(net, arm, cfg["n_children"], rng)
        ls = supernet_step(net, x, y, configs, opt, kd=kd, label_smoothing=cfg["label_smoothing"],
                           dropout=cfg["dropout"], grad_clip=cfg["grad_clip"])
        curve.append(float(np.mean(ls)))
    net.set_max_net()
    return net, curve


def train_standalone(config: dict, data: dict, cfg: dict, seed: int) -> tuple[nn.Module, list[float]]:
    """One child trained from scratch alone: the child of a freshly initialised supernet (same seed, same
    zero-gamma rule), the same optimiser, schedule, steps, batch size, label smoothing and clipping; dropout only if
    the child is the max child (as in the supernet)."""
    torch.manual_seed(seed)
    net = build_supernet(cfg)
    if cfg["zero_gamma"]:
        zero_last_bn_gamma(net)
    is_max = net.canonical(config) == max_config(net.space())
    model = net.get_active_subnet(config)
    if isinstance(model.dropout, nn.Dropout):
        model.dropout.p = cfg["dropout"] if is_max else 0.0
    opt = make_optimizer(model, cfg)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(seed))
    model.train()
    curve = []
    for step in range(cfg["steps"]):
        _set_lr(opt, step, cfg)
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg["label_smoothing"])
        loss.backward()
        if cfg["grad_clip"]:
            nn.utils.clip_grad_value_(model.parameters(), cfg["grad_clip"])
        opt.step()
        curve.append(float(loss.detach()))
    return model, curve


# ---------------------------------------------------------------------------------------------------------- evaluation
def calib_batches(data: dict, cfg: dict) -> list[torch.Tensor]:
    """The first ``calib_batches`` x ``batch_size`` training images in a fixed order (the same for every child)."""
    X = data["train"][0]
    n = min(len(X), cfg["calib_batches"] * cfg["batch_size"])
    return [X[i:i + cfg["batch_size"]] for i in range(0, n, cfg["batch_size"])]


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(X).argmax(1) == y).float().mean())


def evaluate_child(model_or_net: nn.Module, data: dict, cfg: dict, config: dict | None = None,
                   recalibrate: bool = True) -> dict:
    """A child as a standalone module (``get_active_subnet`` of the supernet when ``config`` is given), BN
    recalibrated (cumulative, AttentiveNAS) on the calibration batches; val and test accuracy."""
    sub = model_or_net.get_active_subnet(config) if config is not None else copy.deepcopy(model_or_net)
    if recalibrate:
        nas_bn.set_running_statistics(sub, calib_batches(data, cfg), method="cumulative")
    return {"val": accuracy(sub, *data["val"]), "test": accuracy(sub, *data["test"])}


def child_macs(net: ElasticCNN, configs: dict[str, dict], image_size: int) -> dict[str, int]:
    return {k: cnn_macs(net, c, image_size) for k, c in configs.items()}
