"""Unstructured masks on top of ``torch.nn.utils.prune``: magnitude (global or layer-wise), random, SNIP, SynFlow,
rewinding.

A *target* is a ``(module, name)`` pair, as in ``torch.nn.utils.prune.global_unstructured``. Masks are returned as
plain ``{key: bool tensor}`` dicts (key ``"<module path>.<name>"``), so that a mask found on one network (a trained
one) can be applied to another (the same architecture at initialisation) -- the lottery-ticket recipe:

    masks = global_magnitude_masks(targets(trained), amount=0.6)   # prune 60% of the weights by |w|, globally
    apply_masks(targets(fresh), masks)                              # torch prune.custom_from_mask on each target
    rewind(targets(fresh), init_state)                              # weight_orig <- the initial weights, mask kept

``amount`` is the fraction *removed* (torch's convention: a float is rounded, ``round(amount * n)`` weights).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

Target = tuple[nn.Module, str]


def _keys(model: nn.Module | None, targets: Sequence[Target]) -> list[str]:
    if model is None:
        return [f"{i}.{name}" for i, (_, name) in enumerate(targets)]
    path = {id(m): p for p, m in model.named_modules()}
    return [f"{path[id(m)]}.{name}" if path[id(m)] else name for m, name in targets]


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    """The current (masked, if pruned) tensor of a target: ``<name>_orig * <name>_mask`` when pruned (the attribute
    ``<name>`` itself is only refreshed by prune's forward pre-hook, so it is stale after an optimiser step)."""
    if hasattr(module, name + "_orig"):
        return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).detach()
    return getattr(module, name).detach()


def _collect(targets: Sequence[Target], model: nn.Module | None) -> dict[str, torch.Tensor]:
    masks = {}
    for key, (m, name) in zip(_keys(model, targets), targets):
        masks[key] = getattr(m, name + "_mask").detach().bool().clone()
    return masks


def global_magnitude_masks(targets: Sequence[Target], amount: float, model: nn.Module | None = None) -> dict:
    """Masks that remove the ``amount`` fraction of all target weights with the smallest |w|, pooled over targets.

    Built with ``prune.global_unstructured(..., prune.L1Unstructured)`` on throw-away copies of the tensors, so the
    targets themselves are left unpruned. Keys name the targets inside ``model`` (or their index without it)."""
    holders = [_holder(_weight(m, n)) for m, n in targets]
    prune.global_unstructured([(h, "weight") for h in holders], pruning_method=prune.L1Unstructured, amount=amount)
    return dict(zip(_keys(model, targets), [h.weight_mask.bool().clone() for h in holders]))


def layerwise_magnitude_masks(targets: Sequence[Target], amount: float, model: nn.Module | None = None) -> dict:
    """Masks that remove the ``amount`` fraction of each target's weights with the smallest |w| (per layer)."""
    out = {}
    for key, (m, n) in zip(_keys(model, targets), targets):
        h = _holder(_weight(m, n))
        prune.l1_unstructured(h, "weight", amount=amount)
        out[key] = h.weight_mask.bool().clone()
    return out


def random_masks(targets: Sequence[Target], amount: float, generator: torch.Generator | None = None,
                 model: nn.Module | None = None) -> dict:
    """Pruning at initialisation with random scores: ``global_unstructured`` on i.i.d. normal scores (the official
    ``Rand`` pruner scores every weight with ``randn`` and thresholds globally), so the same count is removed as by
    :func:`global_magnitude_masks` at the same ``amount``."""
    holders = []
    for m, n in targets:
        w = _weight(m, n)
        holders.append(_holder(torch.randn(w.shape, generator=generator, dtype=w.dtype)))
    prune.global_unstructured([(h, "weight") for h in holders], pruning_method=prune.L1Unstructured, amount=amount)
    return dict(zip(_keys(model, targets), [h.weight_mask.bool().clone() for h in holders]))


def _global_from_scores(targets, scores: list, n_remove: int, model) -> dict:
    """Remove the ``n_remove`` lowest scores, pooled over targets (``global_unstructured`` L1 on the scores)."""
    holders = [_holder(sc) for sc in scores]
    prune.global_unstructured([(h, "weight") for h in holders], pruning_method=prune.L1Unstructured,
                              amount=int(n_remove))
    return dict(zip(_keys(model, targets), [h.weight_mask.bool().clone() for h in holders]))


def snip_masks(targets: Sequence[Target], loss_closure, amount: float, model: nn.Module | None = None) -> dict:
    """SNIP (Lee et al. 2019; official Grokking-Tickets pruner.py SNIP): score |dL/dw * w| at the current weights,
    ``loss_closure()`` returning the scalar loss of a batch; the ``amount`` fraction with the lowest scores is removed,
    globally. The targets must be unpruned parameters; their ``.grad`` is left untouched."""
    ws = [getattr(m, n) for m, n in targets]
    grads = torch.autograd.grad(loss_closure(), ws)
    scores = [(g * w).detach().abs() for g, w in zip(grads, ws)]
    n = sum(w.numel() for w in ws)
    return _global_from_scores(targets, scores, round(amount * n), model)


def synflow_masks(targets: Sequence[Target], output_closure, amount: float, iterations: int = 1,
                  model: nn.Module | None = None) -> dict:
    """SynFlow (Tanaka et al. 2020; official pruner.py SynFlow): with every target replaced by |w| (times the current
    mask), R = sum(output_closure()), score |dR/dw * w|; pruned iteratively to the kept fraction
    (1 - amount) ** (k / iterations), k = 1..iterations (exponential schedule), the last step removing exactly
    round(amount * N). Only the targets are linearised (the official code also takes |.| of every other parameter:
    give targets covering all of them). The targets are restored afterwards; they must be unpruned parameters."""
    ws = [getattr(m, n) for m, n in targets]
    saved = [w.detach().clone() for w in ws]
    n = sum(w.numel() for w in ws)
    keep = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    masks = None
    try:
        for k in range(1, iterations + 1):
            with torch.no_grad():
                for w, s0, km in zip(ws, saved, keep):
                    w.copy_(s0.abs() * km)
            grads = torch.autograd.grad(output_closure().sum(), ws)
            scores = [(g * w).detach().abs() for g, w in zip(grads, ws)]
            n_remove = round(amount * n) if k == iterations else round((1 - (1 - amount) ** (k / iterations)) * n)
            masks = _global_from_scores(targets, scores, n_remove, model)
            keep = list(masks.values())
    finally:
        with torch.no_grad():
            for w, s0 in zip(ws, saved):
                w.copy_(s0)
    return masks


def apply_masks(targets: Sequence[Target], masks: dict, model: nn.Module | None = None) -> None:
    """Attach each mask to its target with ``prune.custom_from_mask`` (adds ``<name>_orig`` and ``<name>_mask``)."""
    for key, (m, n) in zip(_keys(model, targets), targets):
        prune.custom_from_mask(m, n, masks[key].to(getattr(m, n).dtype))


def masks_of(targets: Sequence[Target], model: nn.Module | None = None) -> dict:
    """The masks currently attached to pruned targets."""
    return _collect(targets, model)


@torch.no_grad()
def rewind(targets: Sequence[Target], init: dict, model: nn.Module | None = None) -> None:
    """Reset every pruned target's ``<name>_orig`` to its initial value (``init[key]``); masks are kept."""
    for key, (m, n) in zip(_keys(model, targets), targets):
        getattr(m, n + "_orig").copy_(init[key])
        setattr(m, n, getattr(m, n + "_orig") * getattr(m, n + "_mask"))  # the pruned view, before the next forward


def remove_masks(targets: Iterable[Target]) -> None:
    """Make pruning permanent (``prune.remove``): the parameter becomes ``orig * mask``."""
    for m, n in targets:
        prune.remove(m, n)


def sparsity_of(masks: dict) -> float:
    """Fraction of weights removed, over all masks."""
    total = sum(v.numel() for v in masks.values())
    return float(sum((~v).sum().item() for v in masks.values()) / total)


def _holder(w: torch.Tensor) -> nn.Module:
    h = nn.Module()
    h.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return h
