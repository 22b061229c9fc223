"""DεpS: Delayed ε-Shrinking for Faster Once-For-All Training (Annavajjala, Khare et al., ECCV 2024,
https://arxiv.org/abs/2407.06167), against Once-for-All progressive shrinking (OFA-PS, Cai et al. 2020,
https://arxiv.org/abs/1908.09791) and BigNAS-style shrinking from step 0, on the shared elastic CNN.

Official code followed:
- DεpS: github.com/gatech-sysml/DepS (commit cadd456) ``deps/imagenet_classification/elastic_nn/training/deps.py`` (``train_one_epoch_deps``,
  ``adjust_beta_value``, ``smallnet_warmup_adjust_learning_rate``), ``.../training/bignas.py``
  (``train_one_epoch_bignas``), ``parse_args.py`` and the README's MobileNetV3 command (``--teacher_warmup 150`` of
  ``--n_epochs 270``, ``--smallnet_warmup 5``, ``--dynamic_batch_size 4``, ``--inplace_distillation``,
  ``--gradient_aggregation sum``, ``--reorganize_weights``, temperature 1, label smoothing 0.1).
- OFA-PS: mit-han-lab/once-for-all ``train_ofa_net.py`` (phases, per-phase epochs / lr / children per step),
  ``ofa/imagenet_classification/elastic_nn/training/progressive_shrinking.py`` (``train_one_epoch``: uniform children of
  the phase's space, KD from the frozen full network in train mode, ``kd_ratio * KD + CE``),
  ``.../modules/dynamic_layers.py`` (``re_organize_middle_weights``).

DεpS in one step ``t`` of ``T`` (delay ``T_d`` = 150/270 T, warm-up ``T_w`` = 5/270 T):
  * ``t < T_d - T_w`` ("teacher mode"): only the full (max) network, cross-entropy;
  * otherwise a sandwich of max, min and 2 uniform children; the max net on the labels, the others on the max net's
    detached soft labels (in-place KD); the children's gradients are multiplied by ``beta(t)`` and summed with the
    max net's ("sum" aggregation) - the ε warm-up:
        beta(t) = ((t - (T_d - T_w) + 1) / T_w) * lr(T_d) / lr(t)   for T_d - T_w <= t < T_d,
        beta(t) = 1                                                  for t >= T_d,
    i.e. the children's EFFECTIVE learning rate beta(t) lr(t) rises linearly from ~0 to lr(T_d);
  * at the first shrinking step the middle (expanded) channels are re-sorted by importance (OFA's re-organisation).
BigNAS (shrink from step 0) is the same loop with T_d = T_w = 0 and no re-organisation (DεpS repo ``bignas.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .elastic import ElasticCNN, inplace_distillation_loss, make_divisible
from .harness import lr_at, train_model
from .samplers import uniform

# ---------------------------------------------------------------- OFA progressive shrinking: the official phase table
# (name, epochs including warm-up, warm-up epochs, lr / full-net lr, children per step, #largest ks, d, e choices;
#  None = every choice). train_ofa_net.py:43-83 (epochs, base lr per GPU, dynamic_batch_size, lists); the full
# network (teacher) is trained first for 180 epochs at lr 2.6 (OFA paper Sec. 4 / Fig. 3: batch 2048 on 32 GPUs, so
# the phases' lr are 32 x base lr: kernel 0.96, depth/expand phase 1 0.08, phase 2 0.24).
OFA_PHASES = (
    ("teacher", 180, 0, 1.0, 1, 1, 1, 1),
    ("kernel", 125, 5, 0.96 / 2.6, 1, None, 1, 1),
    ("depth_1", 25, 0, 0.08 / 2.6, 2, None, 2, 1),
    ("depth_2", 125, 5, 0.24 / 2.6, 2, None, None, 1),
    ("expand_1", 25, 0, 0.08 / 2.6, 4, None, None, 2),
    ("expand_2", 125, 5, 0.24 / 2.6, 4, None, None, None),
)
ARMS = ("deps", "ofa_ps", "bignas")


@dataclass(frozen=True)
class Phase:
    name: str
    start: int  # first step (global)
    steps: int
    warmup_steps: int
    lr_ratio: float
    n_children: int
    n_ks: int | None
    n_d: int | None
    n_e: int | None

    @property
    def end(self) -> int:
        return self.start + self.steps


def _largest_remainder(weights, total: int) -> list[int]:
    """Integers proportional to ``weights`` summing exactly to ``total`` (ties to the earlier phase)."""
    w = np.asarray(weights, dtype=float)
    raw = w / w.sum() * total
    out = np.floor(raw).astype(int)
    rest = total - int(out.sum())
    order = sorted(range(len(w)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return [int(v) for v in out]


def ofa_ps_schedule(total_steps: int, phases=OFA_PHASES) -> list[Phase]:
    """OFA-PS scaled to ``total_steps``: each phase gets steps in proportion to its official epochs (warm-up included),
    its warm-up in proportion to its own warm-up epochs."""
    steps = _largest_remainder([p[1] for p in phases], total_steps)
    out, start = [], 0
    for (name, ep, wu, ratio, nc, nks, nd, ne), s in zip(phases, steps):
        out.append(Phase(name, start, s, int(round(s * wu / ep)), ratio, nc, nks, nd, ne))
        start += s
    return out


def _top(choices: list, n: int | None) -> list:
    c = sorted(choices)
    return c if n is None else c[-min(n, len(c)):]


def phase_space(net: ElasticCNN, phase: Phase) -> dict:
    """The space OFA-PS samples in ``phase``: the ``n`` largest choices of ks / d / e (width fixed at its max)."""
    sp = net.space()
    return {"ks": [_top(c, phase.n_ks) for c in sp["ks"]], "d": [_top(c, phase.n_d) for c in sp["d"]],
            "e": [_top(c, phase.n_e) for c in sp["e"]], "w": [[max(c)] for c in sp["w"]]}


def elastic_dims_at(net: ElasticCNN, schedule: list[Phase], step: int) -> dict:
    """{dim: sorted allowed choices of position 0} of the OFA-PS phase holding global ``step`` (for tests / plots)."""
    for ph in schedule:
        if ph.start <= step < ph.end:
            sp = phase_space(net, ph)
            return {"phase": ph.name, **{k: sp[k][0] for k in ("ks", "d", "e")}}
    raise ValueError(f"step {step} outside the schedule")


# ---------------------------------------------------------------- DεpS schedule and ε warm-up
def deps_schedule(total_steps: int, delay_frac: float, warmup_frac: float) -> tuple[int, int]:
    """(T_d, T_w): the delay (``--teacher_warmup``, official 150/270 of training) and the subnet warm-up
    (``--smallnet_warmup``, official 5/270); shrinking (the sandwich) starts at T_d - T_w."""
    T_d = int(round(delay_frac * total_steps))
    T_w = int(round(warmup_frac * total_steps))
    if delay_frac > 0 and warmup_frac > 0:
        T_w = max(1, T_w)
    if T_w > T_d:
        raise ValueError(f"subnet warm-up ({T_w} steps) longer than the delay ({T_d} steps)")
    return T_d, T_w


def deps_beta(step: int, T_d: int, T_w: int, lr_fn) -> float:
    """The children's gradient multiplier (official ``adjust_beta_value``, multipliers 1): 0 before T_d - T_w, then
    ``(step - (T_d - T_w) + 1) / T_w * lr(T_d) / lr(step)`` until T_d, then 1. ``lr_fn(step)`` is the schedule."""
    start = T_d - T_w
    if step < start:
        return 0.0
    if step < T_d:
        return (step - start + 1) / T_w * lr_fn(T_d) / lr_fn(step)
    return 1.0


# ---------------------------------------------------------------- OFA re-organisation of the middle channels
def _permute_bn(bn, idx: torch.Tensor) -> None:
    """OFA ``adjust_bn_according_to_idx``: reorder gamma, beta, running mean and var."""
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.data = torch.index_select(t.data, 0, idx)


@torch.no_grad()
def middle_channel_order(blk, expand_ratio_stage: int) -> torch.Tensor:
    """The permutation OFA's ``DynamicMBConvLayer.re_organize_middle_weights`` applies: middle channels sorted by the
    L1 norm of their point-linear weights, descending; for ``expand_ratio_stage`` k > 0 the channels beyond the width
    of the (k)-th largest expand ratio are first pushed down by multiples of 1e5 (they keep their bands)."""
    importance = blk.point_linear.conv.conv.weight.abs().sum((0, 2, 3)).clone()  # (mid,)
    if expand_ratio_stage > 0:
        exp = sorted(blk.expand_ratio_list, reverse=True)
        widths = [make_divisible(round(blk.inverted_bottleneck.conv.max_in_channels * e), blk.divisor) for e in exp]
        right, base = len(importance), -len(widths) * 1e5
        for i in range(expand_ratio_stage + 1):
            left = widths[i]
            importance[left:right] += base
            base += 1e5
            right = left
    return torch.sort(importance, dim=0, descending=True)[1]


@torch.no_grad()
def reorganize_middle_weights(net: ElasticCNN, expand_ratio_stage: int = 0) -> None:
    """Apply :func:`middle_channel_order` to every MBConv block (expand conv rows + BN, depthwise conv + BN,
    point-linear input columns); the max network computes the same function afterwards."""
    for blk in net.blocks:
        idx = middle_channel_order(blk, expand_ratio_stage)
        pl, dc, ib = blk.point_linear.conv.conv, blk.depth_conv.conv.conv, blk.inverted_bottleneck.conv.conv
        pl.weight.data = torch.index_select(pl.weight.data, 1, idx)
        _permute_bn(blk.depth_conv.bn, idx)
        dc.weight.data = torch.index_select(dc.weight.data, 0, idx)
        _permute_bn(blk.inverted_bottleneck.bn, idx)
        ib.weight.data = torch.index_select(ib.weight.data, 0, idx)


# ---------------------------------------------------------------- the three trainings
def _kd(out, soft_logits, T: float = 1.0):
    """Official ``T^2 * cross_entropy_loss_with_soft_target(out, softmax(teacher / T), T)``."""
    return inplace_distillation_loss(out, soft_logits, T, kind="soft_ce")


def no_decay_params(net) -> list:
    """OFA ``no_decay_keys = "bn#bias"``: BN parameters and biases get no weight decay."""
    return [p for n, p in net.named_parameters() if ".bn." in n or n.endswith("bias")]


def train_sandwich(net: ElasticCNN, data: dict, steps: int, *, lr: float, seed: int, delay_frac: float = 0.0,
                   warmup_frac: float = 0.0, n_random: int = 2, label_smoothing: float = 0.1, temperature: float = 1.0,
                   reorganize: bool = True, weight_decay: float = 3e-5, batch_size: int = 64,
                   momentum: float = 0.9) -> dict:
    """DεpS (``delay_frac`` > 0) or BigNAS (``delay_frac`` = 0): one cosine schedule over ``steps``; see the module
    docstring. Returns a log: per-step loss of the max net, beta, children trained, gradient evaluations and, for
    DεpS, ``full_at_shrink`` (a copy of the network right before its first shrinking step)."""
    T_d, T_w = deps_schedule(steps, delay_frac, warmup_frac)
    start = T_d - T_w
    lr_fn = lambda s: lr_at(s, steps, lr, "cosine", 0)  # noqa: E731
    rng = np.random.default_rng(seed)
    space = net.space()
    log = {"beta": [], "children": [], "T_d": T_d, "T_w": T_w, "reorganized_at": None}

    def loss_fn(model, x, y, step):
        beta = deps_beta(step, T_d, T_w, lr_fn)
        log["beta"].append(beta)
        model.set_max_net()
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        if step < start:  # teacher mode: the full network alone
            log["children"].append(1)
            return loss
        loss.backward()
        soft = out.detach()
        configs = [net.min_config()] + [uniform(space, rng) for _ in range(n_random)]
        for cfg in configs:
            model.set_active_subnet(cfg)
            (beta * _kd(model(x), soft, temperature)).backward()  # "sum" aggregation, children scaled by beta
        model.set_max_net()
        log["children"].append(1 + len(configs))
        return loss.detach()

    def on_step(step, model):  # re-organise right before the first shrinking step (official: epoch start)
        if delay_frac > 0 and step + 1 == start < steps:  # the full net DεpS starts shrinking from (for a gate)
            log["full_at_shrink"] = copy.deepcopy(model)
        if reorganize and delay_frac > 0 and step + 1 == start < steps:
            reorganize_middle_weights(model, len(net.expand_ratio_list) - 2)
            log["reorganized_at"] = start

    if delay_frac > 0 and start == 0:
        log["full_at_shrink"] = copy.deepcopy(net)
    if reorganize and delay_frac > 0 and start == 0:
        reorganize_middle_weights(net, len(net.expand_ratio_list) - 2)
        log["reorganized_at"] = 0
    log["loss"] = train_model(net, data, steps, loss_fn, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              batch_size=batch_size, seed=seed, schedule="cosine", no_decay=no_decay_params(net),
                              on_step=on_step)
    log["grad_evals"] = int(sum(log["children"]))
    return log


def train_ofa_ps(net: ElasticCNN, data: dict, steps: int, *, lr: float, seed: int, kd_ratio: float = 1.0,
                 label_smoothing: float = 0.1, reorganize: bool = True, weight_decay: float = 3e-5,
                 batch_size: int = 64, momentum: float = 0.9, phases=OFA_PHASES) -> dict:
    """OFA progressive shrinking scaled to ``steps``: the full net first, then kernel, depth (2 phases), expand
    (2 phases), each a fresh SGD run with its own cosine schedule and warm-up; children drawn uniformly from the
    phase's space; loss ``kd_ratio * KD(frozen full net, train mode) + CE``; middle channels re-organised at the start
    of each expand phase (stage = number of allowed expand ratios - 2). ``log["teacher"]``: the frozen full net."""
    sched = ofa_ps_schedule(steps, phases)
    rng = np.random.default_rng(seed)
    log = {"phases": [], "children": [], "loss": []}
    teacher = None
    for i, ph in enumerate(sched):
        log["phases"].append({"name": ph.name, "start": ph.start, "steps": ph.steps, "warmup": ph.warmup_steps,
                              "lr": lr * ph.lr_ratio, "children": ph.n_children})
        if ph.steps == 0:
            continue
        if ph.name == "teacher":
            def loss_fn(model, x, y, step):
                model.set_max_net()
                log["children"].append(1)
                return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        else:
            if teacher is None and kd_ratio > 0:
                teacher = copy.deepcopy(net)
                teacher.set_max_net()
                teacher.dropout = torch.nn.Identity()  # official teacher: dropout_rate=0
                for p in teacher.parameters():
                    p.requires_grad_(False)
            if "teacher" not in log:  # the full network after its phase (evaluated for a gate)
                log["teacher"] = teacher if teacher is not None else copy.deepcopy(net)
            if ph.name.startswith("expand") and reorganize:
                n_e = len(_top(net.expand_ratio_list, ph.n_e))
                reorganize_middle_weights(net, n_e - 2)
            space = phase_space(net, ph)

            def loss_fn(model, x, y, step, space=space, ph=ph):
                soft = None
                if teacher is not None:
                    teacher.train()  # official: args.teacher_model.train()
                    with torch.no_grad():
                        soft = teacher(x).detach()
                tot = 0.0
                for _ in range(ph.n_children):
                    model.set_active_subnet(uniform(space, rng))
                    out = model(x)
                    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
                    if soft is not None:
                        loss = kd_ratio * _kd(out, soft) + loss
                    loss.backward()
                    tot += float(loss.detach())
                model.set_max_net()
                log["children"].append(ph.n_children)
                return torch.tensor(tot / ph.n_children)
        log["loss"] += train_model(net, data, ph.steps, loss_fn, lr=lr * ph.lr_ratio, momentum=momentum,
                                   weight_decay=weight_decay, batch_size=batch_size, seed=seed * 1000 + i,
                                   schedule="cosine", warmup_steps=ph.warmup_steps, no_decay=no_decay_params(net))
    net.set_max_net()
    log["grad_evals"] = int(sum(log["children"]))
    return log


def build_net(cfg: dict, kernel_transform: bool) -> ElasticCNN:
    """The elastic CNN of the run (OFA: kernel transformation matrices on, ``dy_conv_scaling_mode=1``; DεpS and
    BigNAS: off, ``dy_conv_scaling_mode=-1``, DεpS parse_args.py)."""
    return ElasticCNN(in_channels=1, n_classes=10, stem_channels=cfg["stem_channels"],
                      stage_channels=tuple(cfg["stage_channels"]), stage_strides=tuple(cfg["stage_strides"]),
                      depth_list=tuple(cfg["depth_list"]), expand_ratio_list=tuple(cfg["expand_list"]),
                      ks_list=tuple(cfg["ks_list"]), head_channels=cfg["head_channels"],
                      kernel_transform=kernel_transform, dropout=cfg["dropout"])


def ofa_steps(cfg: dict) -> int:
    """OFA-PS's total steps: ``ofa_steps_ratio`` x ``steps`` (default 605/270: OFA's official 180 + 425 epochs against
    DεpS's 270, the budgets the paper compares; 1.0 = equal steps)."""
    return int(round(cfg.get("ofa_steps_ratio", 1.0) * cfg["steps"]))


def train_arm(arm: str, data: dict, cfg: dict, seed: int) -> tuple[ElasticCNN, dict]:
    """Build the supernet (torch seed = ``seed``: every arm starts from the same weights) and train one arm
    (DεpS and BigNAS for ``steps``, OFA-PS for :func:`ofa_steps`)."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    net = build_net(cfg, kernel_transform=(arm == "ofa_ps"))
    common = dict(lr=cfg["lr"], seed=seed, label_smoothing=cfg["label_smoothing"], weight_decay=cfg["weight_decay"],
                  batch_size=cfg["batch_size"], momentum=cfg["momentum"])
    if arm == "ofa_ps":
        log = train_ofa_ps(net, data, ofa_steps(cfg), kd_ratio=cfg["kd_ratio"], **common)
    elif arm == "deps":
        log = train_sandwich(net, data, cfg["steps"], delay_frac=cfg["delay_frac"], warmup_frac=cfg["warmup_frac"],
                             n_random=cfg["n_random"], temperature=cfg["temperature"], reorganize=cfg["reorganize"],
                             **common)
    else:
        log = train_sandwich(net, data, cfg["steps"], delay_frac=0.0, warmup_frac=0.0, n_random=cfg["n_random"],
                             temperature=cfg["temperature"], reorganize=False, **common)
    return net, log


@torch.no_grad()
def evaluate_children(net: ElasticCNN, configs: dict, data: dict, calib: int = 1024) -> dict:
    """{name: {"val", "test"}}: each child standalone (``get_active_subnet``), BN recalibrated on the first ``calib``
    training images (OFA ``set_running_statistics``), accuracy on val and test."""
    from .harness import evaluate_child_splits

    return {name: evaluate_child_splits(net, cfg, data, calib=calib) for name, cfg in configs.items()}


def eval_configs(net: ElasticCNN, n_mid: int, seed: int = 12345) -> dict:
    """The children evaluated for every arm: max, min and ``n_mid`` uniform children from a fixed generator."""
    rng = np.random.default_rng(seed)
    out = {"max": net.max_config(), "min": net.min_config()}
    for j in range(n_mid):
        out[f"mid{j}"] = uniform(net.space(), rng)
    return out
