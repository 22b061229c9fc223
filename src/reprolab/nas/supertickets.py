"""SuperTickets (You et al., ECCV 2022, arXiv 2207.03677): draw a sparse subnetwork (a "ticket") directly from a
supernet by pruning operations and weights *during* supernet training, instead of the pipeline
search -> train the found network -> prune -> retrain.

Official code: github RICE-EIC/SuperTickets (HR-NAS based). What is followed, with file:line:

- Weight pruning, ``train.py:566-604``: every ``prune_interval`` epochs a global magnitude pruning
  (``pruners/mag.py`` score |w|, ``pruners/pruner.py:_global_mask``) of all masked conv / linear weights
  (``prune_bias: False``, ``prune_batchnorm: False`` in every config) to the ratio
  ``min(target_ratio, ((epoch + 1) // prune_interval) / 10)`` (a +0.1 step per interval, capped at the target).
  Here: :func:`prune_ratio` with ``ratio_step`` 0.1, the interval counted in optimizer steps.
- Masks between events. The classification configs (``configs/cls_imagenet_g_0.9.yml:109``, ``reset_mask: False``)
  keep the masks from one event to the next (the forward multiplies by the mask, ``models/masked_layers.py``); the
  pruned weights then only receive the manual L2 term, which under RMSprop drives them towards 0 long before the next
  event, so the masks are in effect nested (gradual magnitude pruning). Here: hard masks, ``reactivate_frac = 0``
  (quick default).
- Iterative reactivation, ``train.py:630-631`` (``reset_mask``: ``pruner.alpha_mask(1)`` after a pruning event; the
  pruned weights kept their values, ``pruner.set_zeros`` is a no-op, so they come back with them and the next pruning
  event keeps those that grew under their gradients; the Cityscapes ``*_reset.yml`` configs). The paper describes it
  as reactivating the pruned weights with large gradients. Here: :func:`reactivate` (in :func:`weight_event`): after
  every pruning event but the last, the pruned weights whose |gradient| (dense gradient on one training batch)
  exceeds the ``1 - reactivate_frac`` quantile of the pruned weights' |gradient| come back with their stored values;
  ``reactivate_frac = 1`` is the official ``reset_mask`` (then training between events is dense).
- Operation pruning: HR-NAS' network slimming (``train.py:222-237, 515-534``; L1 penalty on BN scales, blocks whose
  scale falls under 1e-3 removed every ``eval_interval`` epochs). The NB-201 supernet of this kit scores its ops with
  DARTS architecture parameters instead (``nas.supernet201.NB201SuperNet.alphas``, first-order DARTS); every
  ``op_prune_interval`` steps each edge loses its alive op with the lowest alpha (:func:`prune_ops`) until one op per
  edge is left; pruned ops leave the mixture (masked softmax) and the weight-pruning pool.

The pipeline baseline (:func:`run_pipeline`): the same supernet and DARTS search without pruning, argmax cell, the
cell trained from scratch, global magnitude pruning to the same sparsity (``pruning.masks.global_magnitude_masks``),
retraining with the mask fixed.

Masks are hard: a pruned weight is held at 0 (its gradient is zeroed before and its value after every optimizer step;
the value it had when pruned is stashed for reactivation).
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.masks import global_magnitude_masks
from . import space201
from .bn import set_running_statistics
from .flops import count_macs
from .harness import batches, evaluate, lr_at
from .supernet201 import NB201SuperNet

_OP_RE = re.compile(r"\.edges\.(\d+)\.ops\.(\d+)\.")


# ------------------------------------------------------------------------------------------------ schedules / rules
def prune_ratio(event: int, ratio_step: float, target: float) -> float:
    """Sparsity of the ``event``-th pruning event (1-based): ``min(target, event * ratio_step)`` (train.py:568-572)."""
    return float(min(target, round(event * ratio_step, 10)))


def n_prune_events(ratio_step: float, target: float) -> int:
    """Number of pruning events until the target sparsity is reached."""
    return int(math.ceil(round(target / ratio_step, 10)))


def prune_ops(alphas: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """One op-pruning event: on every edge with more than one alive op, remove the alive op with the lowest alpha
    (first one on ties). Returns the new (6, 5) bool ``alive``."""
    alive = alive.clone()
    a = alphas.detach().masked_fill(~alive, float("inf"))
    for e in range(alive.shape[0]):
        if int(alive[e].sum()) > 1:
            alive[e, int(torch.argmin(a[e]))] = False
    return alive


def reactivate(masks: dict, grads: dict, frac: float) -> dict:
    """Iterative reactivation: the pruned entries (mask False) whose |grad| is strictly above the ``1 - frac``
    quantile (numpy 'linear') of the pruned entries' |grad|, pooled over all tensors, come back (mask True);
    ``frac >= 1`` reactivates every pruned weight (the official ``reset_mask``), ``frac <= 0`` none."""
    if frac >= 1:
        return {k: torch.ones_like(m) for k, m in masks.items()}
    if frac <= 0:
        return {k: m.clone() for k, m in masks.items()}
    pruned = torch.cat([grads[k].abs()[~m].flatten() for k, m in masks.items()])
    if pruned.numel() == 0:
        return {k: m.clone() for k, m in masks.items()}
    thr = float(np.quantile(pruned.double().numpy(), 1 - frac))
    return {k: m | (grads[k].abs() > thr) for k, m in masks.items()}


def weight_event(params: dict, pool: dict, ratio: float, frac: float, grads_fn, final: bool) -> tuple[dict, dict]:
    """One weight-pruning event (train.py:566-604): global magnitude masks over the weights of ``pool`` removing
    ``ratio`` of them; the pruned weights are set to 0 (hard masks) after their values are stored; unless ``final``,
    and only when ``frac > 0``, :func:`reactivate` on the gradients ``grads_fn(names)`` and the reactivated weights
    restored with their stored values (official ``reset_mask``: ``frac = 1``; the pruned weights were never zeroed
    there, ``pruner.set_zeros`` being a no-op). Returns (masks, log entry)."""
    masks = magnitude_masks(pool, ratio)
    stash = {n: params[n].detach().clone() for n in masks}
    _apply(masks, params)
    entry = {"event": "weights", "ratio": ratio, "sparsity": sparsity(masks)}
    if not final and frac > 0:
        back = reactivate(masks, grads_fn(list(masks)), frac)
        with torch.no_grad():
            for name, m in back.items():
                flip = m & ~masks[name]
                params[name][flip] = stash[name][flip]
        masks = back
        entry["after_reactivation"] = sparsity(masks)
    return masks, entry


def zero_fraction(model: nn.Module) -> float:
    """Measured sparsity of a standalone network: the fraction of exact zeros among its prunable (conv / linear)
    weights (counted on the weights themselves, not on the masks)."""
    ws = [m.weight.detach() for m in prunable(model).values()]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


# ------------------------------------------------------------------------------------------------------- helpers
def prunable(net: nn.Module, alive: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """{weight name: module} of the Conv2d / Linear layers whose weights are pruned (official: conv and linear
    weights, no biases, no BN); in a supernet only the ops still alive."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hit = _OP_RE.search(name + ".")
            if hit and alive is not None and not bool(alive[int(hit.group(1)), int(hit.group(2))]):
                continue
            out[name + ".weight"] = m
    return out


def magnitude_masks(modules: dict[str, nn.Module], ratio: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks removing ``ratio`` of the weights (pruning.masks, torch prune.L1Unstructured)."""
    names = list(modules)
    got = global_magnitude_masks([(modules[n], "weight") for n in names], amount=ratio)
    return {n: got[f"{i}.weight"] for i, n in enumerate(names)}


def sparsity(masks: dict) -> float:
    tot = sum(m.numel() for m in masks.values())
    return float(sum(int((~m).sum()) for m in masks.values()) / tot)


def child_masks(masks: dict, cell) -> dict:
    """Map supernet weight names to the extracted child's (``cells.i.edges.e.ops.o.1.weight`` -> ``cells.i.edges.e.1.weight``)."""
    out = {}
    for k, m in masks.items():
        hit = _OP_RE.search(k)
        if hit:
            e, o = int(hit.group(1)), int(hit.group(2))
            if o != cell[e]:
                raise ValueError(f"mask {k} belongs to op {o}, the cell has op {cell[e]} on edge {e}")
            k = _OP_RE.sub(f".edges.{e}.", k)
        out[k] = m
    return out


def effective_macs(model: nn.Module, masks: dict, image: int = 8) -> tuple[int, int]:
    """(dense MACs, MACs of the nonzero weights) of a standalone network: every conv / linear layer's MACs times the
    density of its mask (the usual sparse-FLOPs count)."""
    per = {}

    def hook(name):
        def h(m, inp, out):
            k = m.in_features if isinstance(m, nn.Linear) else (m.in_channels // m.groups) * math.prod(m.kernel_size)
            per[name] = int(out.numel() * k)
        return h

    hs = [m.register_forward_hook(hook(n + ".weight")) for n, m in model.named_modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, image, image))
    model.train(was)
    for h in hs:
        h.remove()
    dense = sum(per.values())
    eff = sum(v * (float(masks[k].float().mean()) if k in masks else 1.0) for k, v in per.items())
    return int(dense), int(round(eff))


def _apply(masks: dict, params: dict) -> None:
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(m)


def _sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def _set_lr(opt, step, steps, cfg):
    lr = cfg["lr_min"] + (lr_at(step, steps, cfg["lr"], "cosine") / cfg["lr"]) * (cfg["lr"] - cfg["lr_min"])
    for g in opt.param_groups:
        g["lr"] = lr


def _weight_step(model, opt, x, y, masks, params, cfg, forward):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(model, x), y)
    loss.backward()
    for k, m in masks.items():
        if params[k].grad is not None:
            params[k].grad.mul_(m)
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg["grad_clip"])
    opt.step()
    _apply(masks, params)
    return float(loss.detach())


def _arch_weights(net: NB201SuperNet, alive: torch.Tensor):
    if bool((alive.sum(1) == 1).all()):
        return tuple(int(i) for i in alive.float().argmax(1))
    return torch.softmax(net.alphas.masked_fill(~alive, float("-inf")), dim=-1)


def _loaders(data, cfg, seed):
    g = torch.Generator().manual_seed(int(seed))
    return batches(*data["train"], cfg["batch_size"], g), batches(*data["val"], cfg["batch_size"], g)


def _supernet(cfg, seed):
    torch.manual_seed(int(seed))
    return NB201SuperNet(cfg["channels"], cfg["n_cells"], 10, 1)


def _arch_opt(net, cfg):
    return torch.optim.Adam(net.arch_parameters(), lr=cfg["arch_lr"], betas=(0.5, 0.999),
                            weight_decay=cfg["arch_weight_decay"])


def _recal_eval(model, data, split="test"):
    m = copy.deepcopy(model)
    set_running_statistics(m, [data["train"][0]], "ofa")
    return evaluate(m, data, split)


def _train_fixed(model, data, steps, cfg, seed, masks=None):
    """Train a standalone network for ``steps`` SGD steps (cosine lr), mask fixed (hard) when given."""
    params = dict(model.named_parameters())
    masks = masks or {}
    _apply(masks, params)
    opt = _sgd(model.parameters(), cfg)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(int(seed)))
    model.train()
    losses = []
    for s in range(steps):
        _set_lr(opt, s, steps, cfg)
        x, y = next(it)
        losses.append(_weight_step(model, opt, x, y, masks, params, cfg, lambda m, x: m(x)))
    return losses


def epochs(steps: int, cfg: dict, n_train: int) -> float:
    return steps * cfg["batch_size"] / n_train


# ------------------------------------------------------------------------------------------------------ the arms
def run_supertickets(seed: int, data: dict, cfg: dict) -> dict:
    """One SuperTickets run: first-order DARTS supernet training with progressive op pruning (lowest alpha per edge
    every ``op_prune_interval`` steps) and progressive global magnitude weight pruning (``prune_interval``,
    ``ratio_step``, ``target_sparsity``) with reactivation after every event but the last; then the drawn ticket
    (extracted child + mask) fine-tuned ``ft_steps`` steps with the mask fixed."""
    steps, iv, oiv = cfg["st_steps"], cfg["prune_interval"], cfg["op_prune_interval"]
    K = n_prune_events(cfg["ratio_step"], cfg["target_sparsity"])
    n_ops = space201.N_OPS
    if oiv * (n_ops - 1) >= iv * K or iv * K > steps:
        raise ValueError("schedule: op pruning must end before the last weight-pruning event, which must fall "
                         f"within st_steps (op_prune_interval*{n_ops - 1} < prune_interval*{K} <= st_steps)")
    net = _supernet(cfg, seed)
    params = dict(net.named_parameters())
    alive = torch.ones(space201.N_EDGES, n_ops, dtype=torch.bool)
    opt = _sgd(net.weight_parameters(), cfg)
    aopt = _arch_opt(net, cfg)
    tr, va = _loaders(data, cfg, seed)
    masks: dict = {}
    log = []
    net.train()
    for s in range(steps):
        _set_lr(opt, s, steps, cfg)
        arch = _arch_weights(net, alive)
        if not isinstance(arch, tuple):  # first-order DARTS: alphas on a val batch, then weights on a train batch
            xv, yv = next(va)
            aopt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xv, arch=_arch_weights(net, alive)), yv).backward()
            aopt.step()
        x, y = next(tr)
        loss = _weight_step(net, opt, x, y, masks, params, cfg, lambda m, x: m(x, arch=_arch_weights(m, alive)))
        if (s + 1) % oiv == 0 and int(alive.sum()) > space201.N_EDGES:
            alive = prune_ops(net.alphas, alive)
            masks = {k: m for k, m in masks.items() if k in prunable(net, alive)}
            log.append({"step": s + 1, "event": "ops", "alive": int(alive.sum())})
        k = (s + 1) // iv
        if (s + 1) % iv == 0 and k <= K:
            ratio = prune_ratio(k, cfg["ratio_step"], cfg["target_sparsity"])
            fwd = (lambda m, x, a=alive: m(x, arch=_arch_weights(m, a)))
            masks, entry = weight_event(params, prunable(net, alive), ratio, cfg["reactivate_frac"],
                                        lambda names: _dense_grads(net, next(tr), fwd, names), final=k == K)
            log.append({"step": s + 1, **entry})
        if s == steps - 1 or (s + 1) % max(1, steps // 10) == 0:
            log.append({"step": s + 1, "event": "loss", "loss": loss})
    cell = tuple(int(i) for i in alive.float().argmax(1))
    assert bool((alive.sum(1) == 1).all())
    ticket = net.extract(cell)
    cm = child_masks(masks, cell)
    assert set(cm) == set(prunable(ticket)), "ticket masks do not cover the extracted network"
    acc_drawn = _recal_eval(ticket, data, "test")  # the ticket as drawn (no fine-tuning), BN recalibrated
    _train_fixed(ticket, data, cfg["ft_steps"], cfg, seed + 1000, cm)
    dense, eff = effective_macs(ticket, cm)
    return {"cell": cell, "arch": space201.to_str(cell), "test_acc": evaluate(ticket, data, "test"),
            "val_acc": evaluate(ticket, data, "val"), "test_acc_drawn": acc_drawn, "sparsity": zero_fraction(ticket),
            "macs_dense": dense, "macs_effective": eff, "steps": steps + cfg["ft_steps"], "log": log,
            "alphas": net.alphas.detach().tolist()}


def _dense_grads(model, batch, forward, names):
    """Gradient of the training loss on one batch w.r.t. the (masked) weights ``names``, pruned entries included."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    x, y = batch
    F.cross_entropy(forward(model, x), y).backward()
    out = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return out


def darts_search(seed: int, data: dict, cfg: dict):
    """The pipeline's search: the same supernet, init, optimisers and batches as SuperTickets, no pruning; returns
    (argmax cell, supernet)."""
    net = _supernet(cfg, seed)
    opt, aopt = _sgd(net.weight_parameters(), cfg), _arch_opt(net, cfg)
    tr, va = _loaders(data, cfg, seed)
    net.train()
    steps = cfg["search_steps"]
    for s in range(steps):
        _set_lr(opt, s, steps, cfg)
        xv, yv = next(va)
        aopt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xv), yv).backward()
        aopt.step()
        x, y = next(tr)
        _weight_step(net, opt, x, y, {}, {}, cfg, lambda m, x: m(x))
    return net.genotype(), net


def run_pipeline(seed: int, data: dict, cfg: dict) -> dict:
    """Search (DARTS, ``search_steps``) -> train the argmax cell from scratch (``train_steps``) -> global magnitude
    pruning to ``target_sparsity`` -> retrain with the mask fixed (``retrain_steps``). Also the premise's control: the
    dense network retrained for the same ``retrain_steps`` without pruning (not counted in the pipeline's steps)."""
    cell, _ = darts_search(seed, data, cfg)
    torch.manual_seed(int(seed) + 2000)
    model = space201.NB201Network(cell, cfg["channels"], cfg["n_cells"], 10, 1)
    _train_fixed(model, data, cfg["train_steps"], cfg, seed + 2000)
    dense_acc = evaluate(model, data, "test")
    ref = copy.deepcopy(model)  # the premise's control: the same retraining without pruning
    _train_fixed(ref, data, cfg["retrain_steps"], cfg, seed + 3000)
    dense_ref = evaluate(ref, data, "test")
    masks = magnitude_masks(prunable(model), cfg["target_sparsity"])
    _apply(masks, dict(model.named_parameters()))
    oneshot = _recal_eval(model, data, "test")
    _train_fixed(model, data, cfg["retrain_steps"], cfg, seed + 3000, masks)
    dense, eff = effective_macs(model, masks)
    return {"cell": cell, "arch": space201.to_str(cell), "test_acc": evaluate(model, data, "test"),
            "val_acc": evaluate(model, data, "val"), "dense_test_acc": dense_acc, "dense_retrained_test_acc": dense_ref,
            "pruned_no_retrain_acc": oneshot,
            "sparsity": zero_fraction(model), "macs_dense": dense, "macs_effective": eff,
            "steps": cfg["search_steps"] + cfg["train_steps"] + cfg["retrain_steps"]}
