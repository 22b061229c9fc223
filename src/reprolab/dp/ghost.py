"""Per-sample clipping without materializing per-sample gradients, for stacks of ``nn.Linear`` on (B, d) inputs.

For a linear layer z_i = W a_i + b with per-sample output gradient d_i = dL_i/dz_i, the per-sample gradient is the
outer product d_i a_i^T, so (Goodfellow 2015, https://arxiv.org/abs/1510.01799; ghost clipping, Li et al. 2021,
https://arxiv.org/abs/2110.05679):

    ||g_i(W)||^2 = ||d_i||^2 ||a_i||^2,      ||g_i(b)||^2 = ||d_i||^2,

and the clipped sum is one matmul on the stored activations and output gradients (the book-keeping idea of
Bu et al. 2022, https://arxiv.org/abs/2210.00038):  sum_i C_i g_i(W) = (C * D)^T A,  sum_i C_i g_i(b) = (C * D)^T 1.
Exact (not an approximation); ``per_sample.per_sample_grads`` is the reference it is tested against.
Sequence inputs (B, T, d), Embedding and LayerNorm layers are not handled here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .per_sample import Grads


def _check_supported(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    covered = {f"{name}.{pn}" if name else pn for name, m in linears for pn, _ in m.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable <= covered:
        raise NotImplementedError(f"ghost clipping handles nn.Linear only; unsupported parameters: "
                                  f"{sorted(trainable - covered)}")
    return linears


def ghost_forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           loss_fn: Callable = F.cross_entropy) -> tuple[dict, torch.Tensor]:
    """One forward and one backward (to the layer outputs only) storing A (B, d_in) and D (B, d_out) per layer.

    ``loss_fn`` follows ``F.cross_entropy``'s signature (it must accept ``reduction="none"``).
    Returns ({layer name: (A, D)}, losses (B,)).
    """
    linears = _check_supported(model)
    store: dict[str, list] = {}
    handles = []
    for name, mod in linears:
        def hook(m, inp, out, name=name):
            if name in store:
                raise NotImplementedError(f"layer {name!r} is applied twice; ghost clipping needs single use")
            a = inp[0]
            if a.dim() != 2:
                raise NotImplementedError(f"layer {name!r} got a {a.dim()}-D input; ghost clipping needs (B, d)")
            store[name] = [a.detach(), out]  # (B, d_in), (B, d_out)
        handles.append(mod.register_forward_hook(hook))
    try:
        out = model(x)  # (B, C)
    finally:
        for h in handles:
            h.remove()
    losses = loss_fn(out, y, reduction="none")  # (B,)
    names = list(store)
    D = torch.autograd.grad(losses.sum(), [store[n][1] for n in names])  # per-sample dL_i/dz_i, each (B, d_out)
    return {n: (store[n][0], d) for n, d in zip(names, D)}, losses.detach()


def ghost_norms(layers: dict, model: nn.Module) -> torch.Tensor:
    """||g_i|| over all parameters from the stored (A, D): (B,)."""
    mods = dict(model.named_modules())
    sq = 0.0
    for name, (A, D) in layers.items():
        mod = mods[name]
        d2 = D.pow(2).sum(dim=1)  # (B,)
        if mod.weight.requires_grad:
            sq = sq + d2 * A.pow(2).sum(dim=1)  # (B,)
        if mod.bias is not None and mod.bias.requires_grad:
            sq = sq + d2
    return torch.as_tensor(sq).sqrt()  # (B,)


def ghost_clip_and_sum(layers: dict, model: nn.Module, factors: torch.Tensor) -> Grads:
    """sum_i C_i g_i per parameter from the stored (A, D), without per-sample gradients."""
    mods = dict(model.named_modules())
    summed: Grads = {}
    for name, (A, D) in layers.items():
        mod, prefix = mods[name], f"{name}." if name else ""
        CD = factors[:, None] * D  # (B, d_out)
        if mod.weight.requires_grad:
            summed[prefix + "weight"] = CD.T @ A  # (d_out, d_in)
        if mod.bias is not None and mod.bias.requires_grad:
            summed[prefix + "bias"] = CD.sum(dim=0)  # (d_out,)
    return summed
