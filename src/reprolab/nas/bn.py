"""Batch-norm recalibration of a sub-network (the BN statistics a weight-sharing supernet cannot share).

Two recipes, both of which write ONLY the active channels' running statistics of the given model and leave its
training mode, momentum and the inactive channels untouched (they forward a deep copy):

* ``method="ofa"``: Once-for-All ``set_running_statistics`` (mit-han-lab/once-for-all,
  ``ofa/imagenet_classification/elastic_nn/utils.py``): every BN normalises with the current batch's mean and biased
  variance, and its running mean / var become the batch-size-weighted averages of the per-batch mean / biased var
  (OFA's AverageMeter). With one batch holding all the data this is the exact mean and (biased) variance of the
  sub-network's pre-BN activations, and the eval-mode network reproduces the activations seen during calibration.
* ``method="cumulative"``: BigNAS / AttentiveNAS ``reset_running_stats_for_calibration``: reset the statistics,
  ``momentum=None`` (PyTorch's cumulative moving average: equal weight per batch, UNBIASED batch variance), train mode,
  forward the batches.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

METHODS = ("ofa", "cumulative")


def _bn_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def _inputs(batch):
    """The model input of a batch: a tensor, or the first element of a (x, y) tuple/list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def set_running_statistics(model: nn.Module, batches: Iterable, method: str = "ofa") -> dict[str, int]:
    """Recalibrate the running mean / var of every BatchNorm of ``model`` (a standalone subnet, or a supernet with
    its active config set) on ``batches`` (tensors or (x, y) pairs). Returns {bn name: channels recalibrated}."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    fwd = copy.deepcopy(model)
    bns = _bn_modules(fwd)
    if not bns:
        return {}
    acc: dict[str, dict] = {n: {"n": 0, "mean": None, "var": None} for n in bns}
    hooks = []
    if method == "ofa":
        for name, bn in bns.items():
            def lambda_forward(x, bn=bn, a=acc[name]):
                dims = [0] + list(range(2, x.dim()))
                mean = x.mean(dims)  # (C,)
                var = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dims)  # (C,) biased
                k = x.size(0)
                a["mean"] = mean * k if a["mean"] is None else a["mean"] + mean * k
                a["var"] = var * k if a["var"] is None else a["var"] + var * k
                a["n"] += k
                C = mean.numel()
                return F.batch_norm(x, mean, var, bn.weight[:C] if bn.weight is not None else None,
                                    bn.bias[:C] if bn.bias is not None else None, False, 0.0, bn.eps)
            bn.forward = lambda_forward
        fwd.eval()
    else:
        for name, bn in bns.items():
            bn.reset_running_stats()
            bn.momentum = None

            def rec(m, inp, out, a=acc[name]):
                a["n"] = inp[0].size(1)  # channels used
            hooks.append(bn.register_forward_hook(rec))
        fwd.train()
    for batch in batches:
        fwd(_inputs(batch))
    for h in hooks:
        h.remove()
    done: dict[str, int] = {}
    orig = _bn_modules(model)
    for name, bn in orig.items():
        a = acc[name]
        if method == "ofa":
            if a["n"] == 0:
                continue
            C = a["mean"].numel()
            bn.running_mean[:C].copy_(a["mean"] / a["n"])
            bn.running_var[:C].copy_(a["var"] / a["n"])
        else:
            C = a["n"]
            if C == 0:
                continue
            bn.running_mean[:C].copy_(bns[name].running_mean[:C])
            bn.running_var[:C].copy_(bns[name].running_var[:C])
        done[name] = int(C)
    return done


def standalone_child(supernet: nn.Module, config) -> nn.Module:
    """A standalone copy of the child ``config``: ``get_active_subnet`` (ElasticCNN) or ``extract`` (NB201SuperNet)."""
    if hasattr(supernet, "get_active_subnet"):
        return supernet.get_active_subnet(config)
    if hasattr(supernet, "extract"):
        return supernet.extract(config)
    raise TypeError(f"{type(supernet).__name__} has neither get_active_subnet nor extract")


def recalibrated_subnet(supernet: nn.Module, config, batches: Iterable, method: str = "ofa") -> nn.Module:
    """The standalone sub-network of ``config`` (:func:`standalone_child`) with its BN recalibrated, in eval mode;
    the supernet's statistics are untouched."""
    sub = standalone_child(supernet, config)
    set_running_statistics(sub, batches, method)
    return sub.eval()
