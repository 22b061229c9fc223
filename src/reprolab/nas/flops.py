"""FLOPs (multiply-accumulates), parameters and CPU latency of sub-networks.

Convention (OFA ``ofa/utils/flops_counter.py``, and ``reprolab.pruning.layer_lottery.count_flops``): "FLOPs" are
multiply-accumulates (MACs) of one image: a convolution costs H_out * W_out * C_out * (C_in / groups) * k_h * k_w,
a linear layer in * out per token; batch norm, activations, additions, pooling and biases are not counted.
Multiply by 2 for floating-point operations (``torch.utils.flop_counter`` counts 2 per MAC).

* :func:`cnn_macs` / :func:`cnn_params` analytic, from an ``ElasticCNN`` and a config (no forward pass: cheap
  enough for samplers and search).
* :func:`count_macs` hook-based on any module (conv and linear; linear layers count every token of (..., in)
  inputs, so it also serves transformers' projections; attention matmuls are not modules: use :func:`torch_macs`).
* :func:`torch_macs` ``torch.utils.flop_counter.FlopCounterMode`` / 2 (every aten matmul / conv, incl. attention).
* :func:`measure_latency` median wall time of repeated forward passes on this CPU: a TIMING (``res.timer`` /
  ``res.benchmark``, timings.json), never a metric.
"""
from __future__ import annotations

import torch
from torch import nn

from .elastic import make_divisible


def _out_size(h: int, k: int, stride: int) -> int:
    """Spatial output size of a conv with same padding k // 2 (odd k)."""
    return (h + 2 * (k // 2) - k) // stride + 1


def cnn_layer_shapes(net, config: dict | None, image_size: int) -> list[dict]:
    """Per weight layer of the ElasticCNN sub-network: kind, c_in, c_out, k, groups, h_out, w_out (forward order)."""
    cfg = net.validate_config(config if config is not None else net.active_config())
    H = image_size
    stem = net.first_conv.conv.max_out_channels
    rows = [dict(kind="conv", c_in=net.in_channels, c_out=stem, k=3, groups=1, h_out=H)]
    c = stem
    for s, g in enumerate(net.block_group_info):
        width = net.stage_width(net.stage_channels[s], cfg["w"][s])
        for i in g[:cfg["d"][s]]:
            blk = net.blocks[i]
            mid = make_divisible(round(c * cfg["e"][i]), blk.divisor)
            k = cfg["ks"][i]
            rows.append(dict(kind="conv", c_in=c, c_out=mid, k=1, groups=1, h_out=H))
            H = _out_size(H, k, blk.stride)
            rows.append(dict(kind="conv", c_in=mid, c_out=mid, k=k, groups=mid, h_out=H))
            rows.append(dict(kind="conv", c_in=mid, c_out=width, k=1, groups=1, h_out=H))
            c = width
    rows.append(dict(kind="conv", c_in=c, c_out=net.head_channels, k=1, groups=1, h_out=H))
    rows.append(dict(kind="linear", c_in=net.head_channels, c_out=net.n_classes, k=1, groups=1, h_out=1))
    return rows


def cnn_macs(net, config: dict | None = None, image_size: int = 28) -> int:
    """Analytic MACs of one image through the ElasticCNN sub-network of ``config`` (square images)."""
    tot = 0
    for r in cnn_layer_shapes(net, config, image_size):
        tot += r["h_out"] * r["h_out"] * r["c_out"] * (r["c_in"] // r["groups"]) * r["k"] * r["k"]
    return int(tot)


def cnn_params(net, config: dict | None = None) -> int:
    """Analytic parameter count of the standalone sub-network (conv weights, BN gamma/beta, classifier weight and
    bias; OFA's kernel transformation matrices are not part of a standalone subnet)."""
    tot = 0
    for r in cnn_layer_shapes(net, config, 8):
        w = r["c_out"] * (r["c_in"] // r["groups"]) * r["k"] * r["k"]
        tot += w + (r["c_out"] if r["kind"] == "linear" else 2 * r["c_out"])  # bias, or BN gamma + beta
    return int(tot)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on ``example`` (batch 1 for per-image MACs), counted by hooks on every nn.Conv2d
    (H_out W_out C_out C_in/groups k_h k_w) and nn.Linear (in * out per token). Modules that slice their weights
    (the Dynamic* ops) are not counted: count a standalone subnet."""
    total = [0]

    def conv_hook(m, inp, out):
        kh, kw = m.kernel_size
        total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
          for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in hs:
            h.remove()
        model.train(was)
    return int(total[0])


@torch.no_grad()
def torch_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs by ``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs / 2): every aten conv / matmul, including
    those of sliced weights and attention."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(example)
    finally:
        model.train(was)
    return int(fc.get_total_flops() // 2)


@torch.inference_mode()
def measure_latency(model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5,
                    threads: int | None = None) -> float:
    """Median seconds of ``repeats`` eval-mode forward passes on ``example`` after ``warmup`` passes (this CPU;
    ``threads`` sets torch's intra-op threads for the measurement and restores them). A timing: report it through
    ``res.timer`` / ``res.benchmark``, never in metrics.json."""
    from ..quant.int8_bench import median_seconds  # the repository's one timing loop (no_grad, warm-up, median)

    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was = model.training
    model.eval()
    try:
        return float(median_seconds(model, example, repeats, warmup))
    finally:
        model.train(was)
        torch.set_num_threads(prev)
