"""Per-sample gradients with ``torch.func`` (vmap over grad), the exact reference of the DP engine.

Used by DP-SGD with per-sample clipping (Abadi et al., https://arxiv.org/abs/1607.00133) and by automatic clipping
(Bu et al., "Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger",
https://arxiv.org/abs/2206.07136). Faster routes (hooks, ghost norm, book-keeping) must agree with this one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Grads = dict[str, torch.Tensor]


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached (the leaves torch.func differentiates)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                     ) -> tuple[Grads, torch.Tensor]:
    """g_i = grad_theta loss(f(x_i; theta), y_i) for every example i of the batch.

    Returns ({name: (B, *param.shape)}, losses (B,)). The model must act on each example independently
    (no BatchNorm in train mode), which is what DP requires anyway.
    """
    params = trainable_params(model)
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_i(p: dict, x_i: torch.Tensor, y_i: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x_i.unsqueeze(0),))  # (1, C)
        return loss_fn(out, y_i.unsqueeze(0))

    grads, losses = vmap(grad_and_value(loss_i), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses  # {name: (B, *shape)}, (B,)


def per_sample_norms(grads: Grads) -> torch.Tensor:
    """||g_i||_2 over all parameters together (all-layer / flat clipping): (B,)."""
    sq = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values()]  # each (B,)
    return torch.stack(sq, dim=1).sum(dim=1).sqrt()  # (B,)
