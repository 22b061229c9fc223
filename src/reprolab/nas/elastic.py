"""Elastic (weight-sharing, "once-for-all") networks: dynamic ops, an elastic CNN, standalone subnets, elastic
fake quantization and in-place distillation.

Follows Once-for-All (Cai et al., ICLR 2020, https://arxiv.org/abs/1908.09791), official code
github.com/mit-han-lab/once-for-all: ``ofa/imagenet_classification/elastic_nn/modules/dynamic_op.py``
(DynamicSeparableConv2d, DynamicConv2d, DynamicBatchNorm2d, DynamicLinear), ``dynamic_layers.py``
(DynamicMBConvLayer.get_active_subnet, copy_bn), ``networks/ofa_mbv3.py`` (set_active_subnet, sample_active_subnet,
runtime_depth), ``ofa/utils/common_tools.py`` (make_divisible, sub_filter_start_end), with BigNAS (Yu et al. 2020,
https://arxiv.org/abs/2003.11142) / AttentiveNAS vocabulary for what OFA lacks (elastic stage width "w", sandwich
rule, in-place distillation, zero-initialised last BN gamma).

Conventions (OFA): a sub-network takes the FIRST k output channels / input channels / features of every weight
(channel slicing), the CENTRE k x k crop of a depthwise kernel (optionally passed through OFA's learned kernel
transformation matrices "7to5_matrix", "5to3_matrix"), and the FIRST d blocks of each stage (elastic depth).
Config keys (OFA): ``ks`` (kernel per block), ``e`` (expand ratio per block), ``d`` (depth per stage); plus ``w``
(width multiplier per stage, BigNAS "elastic width"). ``ks``/``e`` list every block, active or not, as OFA does.

Departures from OFA, all deliberate and small:
* ``DynamicBatchNorm2d`` subclasses ``nn.BatchNorm2d`` (OFA wraps one in ``.bn``), so generic BN code (recalibration,
  zero-init gamma, weight-decay filters) sees it; slicing and the momentum rule are OFA's ``bn_forward``.
* one ``DynamicConv2d`` covers OFA's DynamicConv2d (channel slicing) and DynamicSeparableConv2d (depthwise, elastic
  kernel): ``depthwise=True`` and a ``kernel_size_list``.
* the first block of every stage has no shortcut (OFA: shortcut only when stride 1 and equal widths; BigNAS uses a
  1x1 projection when widths differ); later blocks of a stage have an identity shortcut.
* ``DynamicLinear`` slices the LAST dimension (x.size(-1)), so it serves transformers ((B, T, C) inputs) as well.
* the elastic-quantization hook (``QuantSpec``) is not OFA's: it is the EQ-Net-style space (bit width, per-tensor /
  per-channel granularity, symmetric / asymmetric) with min-max/absmax scales and a straight-through round; pass a
  learnable ``scale``/``offset`` to :func:`fake_quant_ste` for LSQ/LSQ+ (autograd gives LSQ's step-size gradient).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fake_quant import q_max

CONFIG_KEYS = ("d", "e", "ks", "w")
GRANULARITIES = ("per_tensor", "per_channel")


# ---------------------------------------------------------------- OFA utilities (ofa/utils/common_tools.py)
def make_divisible(v: float, divisor: int = 8, min_val: int | None = None) -> int:
    """OFA/TF ``make_divisible``: nearest multiple of ``divisor`` (at least ``min_val``), never below 90% of v."""
    min_val = divisor if min_val is None else min_val
    new_v = max(min_val, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def sub_filter_start_end(kernel_size: int, sub_kernel_size: int) -> tuple[int, int]:
    """[start, end) of the centre ``sub_kernel_size`` crop of a ``kernel_size`` kernel."""
    center, dev = kernel_size // 2, sub_kernel_size // 2
    return center - dev, center + dev + 1


def _val2list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


# ---------------------------------------------------------------- elastic fake quantization (EQ-Net-style hook)
@dataclass(frozen=True)
class QuantSpec:
    """One layer's quantization config. ``w_bits``/``a_bits`` None = float; ``granularity`` applies to weights (per
    output channel or per tensor); activations are quantized per tensor (dynamic, per call)."""
    w_bits: int | None = 8
    a_bits: int | None = None
    granularity: str = "per_channel"
    symmetric: bool = True

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        for b in (self.w_bits, self.a_bits):
            if b is not None and not (2 <= int(b) <= 16):
                raise ValueError(f"bit width {b} outside 2..16")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quant_range(n_bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric [-(2^(b-1)-1), 2^(b-1)-1] (as ``reprolab.quant.fake_quant.q_max``), asymmetric
    [0, 2^b - 1]."""
    return (-q_max(n_bits), q_max(n_bits)) if symmetric else (0, 2 ** n_bits - 1)


def minmax_scale(x: torch.Tensor, n_bits: int, symmetric: bool, ch_axis: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic (scale, zero_point) from the tensor (detached): symmetric absmax / q_max with zero point 0; asymmetric
    (max - min) / (2^b - 1) over a range that includes 0, zero point round(-min / scale). ``ch_axis`` None: one scale
    per tensor; else one per slice along that axis (shape broadcastable to x)."""
    x = x.detach()
    if ch_axis is None:
        lo, hi = x.min(), x.max()
    else:
        dims = [d for d in range(x.dim()) if d != ch_axis % x.dim()]
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()).clamp(min=1e-8) / q_max(n_bits)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo).clamp(min=1e-8) / (2 ** n_bits - 1)
    return scale, torch.round(-lo / scale)


def fake_quant_ste(x: torch.Tensor, n_bits: int, symmetric: bool = True, ch_axis: int | None = None,
                   scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize x with a straight-through round: ``(clamp(round(x/s) + z, lo, hi) - z) * s``.

    ``scale=None``: dynamic min-max / absmax scale (:func:`minmax_scale`, zero point z). A given ``scale`` (e.g. a
    learnable ``nn.Parameter``) gives LSQ: ``clamp(round_ste(x/s), lo, hi) * s``, whose autograd gradient in s is
    LSQ's; an ``offset`` beta gives LSQ+: ``clamp(round_ste((x-beta)/s), lo, hi) * s + beta``. Gradient in x: 1
    inside the clipping range, 0 outside (clamp's gradient).
    """
    lo, hi = quant_range(n_bits, symmetric)
    if scale is None:
        s, z = minmax_scale(x, n_bits, symmetric, ch_axis)
        return (torch.clamp(round_ste(x / s) + z, lo, hi) - z) * s
    beta = 0.0 if offset is None else offset
    return torch.clamp(round_ste((x - beta) / scale), lo, hi) * scale + beta


def quantize_weight(w: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """The weight as the layer uses it under ``spec`` (output channel = axis 0)."""
    if spec is None or spec.w_bits is None:
        return w
    return fake_quant_ste(w, spec.w_bits, spec.symmetric, 0 if spec.granularity == "per_channel" else None)


def quantize_act(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """The input activation under ``spec`` (dynamic, per tensor)."""
    if spec is None or spec.a_bits is None:
        return x
    return fake_quant_ste(x, spec.a_bits, spec.symmetric, None)


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight and input are fake-quantized by ``self.quant`` (a :class:`QuantSpec` or None)."""
    quant: QuantSpec | None = None

    def forward(self, x):
        return self._conv_forward(quantize_act(x, self.quant), quantize_weight(self.weight, self.quant), self.bias)


class QLinear(nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantized by ``self.quant`` (a :class:`QuantSpec` or None)."""
    quant: QuantSpec | None = None

    def forward(self, x):
        return F.linear(quantize_act(x, self.quant), quantize_weight(self.weight, self.quant), self.bias)


# ---------------------------------------------------------------- dynamic ops (OFA dynamic_op.py)
class DynamicConv2d(nn.Module):
    """Conv2d with elastic output channels (first k), input channels (x.size(1)) and kernel (centre crop).

    ``depthwise=True`` is OFA's DynamicSeparableConv2d (groups = active channels, out = in). ``kernel_transform``
    registers OFA's per-step kernel transformation matrices (identity-initialised, trained with the weights): the
    k_small kernel is ``M_{big->small} @ vec(centre crop of the next larger kernel)``, applied from the largest kernel
    down (OFA ``get_active_filter``). ``quant``: a :class:`QuantSpec` applied to the active weight and the input.
    """

    def __init__(self, max_in_channels: int, max_out_channels: int, kernel_size_list=1, stride: int = 1,
                 depthwise: bool = False, bias: bool = False, kernel_transform: bool = False):
        super().__init__()
        self.max_in_channels, self.max_out_channels = max_in_channels, max_out_channels
        self.kernel_size_list = sorted(set(_val2list(kernel_size_list)))
        if any(k % 2 == 0 for k in self.kernel_size_list):
            raise ValueError("kernel sizes must be odd (same padding)")
        if depthwise and max_in_channels != max_out_channels:
            raise ValueError("a depthwise conv has as many output as input channels")
        self.stride, self.depthwise = stride, depthwise
        K = max(self.kernel_size_list)
        self.conv = nn.Conv2d(max_in_channels, max_out_channels, K, stride, padding=K // 2,
                              groups=max_in_channels if depthwise else 1, bias=bias)  # weight (out, in/g, K, K)
        self.kernel_transform = bool(kernel_transform) and len(self.kernel_size_list) > 1
        if self.kernel_transform:
            for small, large in zip(self.kernel_size_list[:-1], self.kernel_size_list[1:]):
                self.register_parameter(f"{large}to{small}_matrix", nn.Parameter(torch.eye(small ** 2)))
        self.active_out_channel = max_out_channels
        self.active_kernel_size = K
        self.quant: QuantSpec | None = None

    def get_active_filter(self, out_channel: int, in_channel: int, kernel_size: int | None = None) -> torch.Tensor:
        """The (out, in/groups, k, k) weight of the active sub-conv (a view, or the transformed kernel)."""
        k = self.active_kernel_size if kernel_size is None else kernel_size
        if k not in self.kernel_size_list:
            raise ValueError(f"kernel {k} not in {self.kernel_size_list}")
        w = self.conv.weight[:out_channel] if self.depthwise else self.conv.weight[:out_channel, :in_channel]
        K = max(self.kernel_size_list)
        if not self.kernel_transform or k == K:
            s, e = sub_filter_start_end(K, k)
            return w[:, :, s:e, s:e]
        filt = w  # start from the largest kernel; shrink one step at a time
        for i in range(len(self.kernel_size_list) - 1, 0, -1):
            src, tgt = self.kernel_size_list[i], self.kernel_size_list[i - 1]
            if src <= k:
                break
            s, e = sub_filter_start_end(src, tgt)
            crop = filt[:, :, s:e, s:e].contiguous()  # (out, in, tgt, tgt)
            mat = getattr(self, f"{src}to{tgt}_matrix")  # (tgt^2, tgt^2)
            filt = F.linear(crop.view(-1, tgt * tgt), mat).view(crop.shape)
        return filt

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C_in, H, W)
        in_ch = x.size(1)
        out_ch = in_ch if self.depthwise else self.active_out_channel
        w = quantize_weight(self.get_active_filter(out_ch, in_ch).contiguous(), self.quant)
        b = None if self.conv.bias is None else self.conv.bias[:out_ch]
        k = self.active_kernel_size
        return F.conv2d(quantize_act(x, self.quant), w, b, self.stride, k // 2, 1, in_ch if self.depthwise else 1)

    def get_active_subnet(self, in_channel: int) -> nn.Conv2d:
        """A standalone ``nn.Conv2d`` (``QConv2d`` when a quant spec is active) holding copies of the active weights."""
        out_ch = in_channel if self.depthwise else self.active_out_channel
        k = self.active_kernel_size
        cls = QConv2d if self.quant is not None else nn.Conv2d
        sub = cls(in_channel, out_ch, k, self.stride, padding=k // 2, groups=in_channel if self.depthwise else 1,
                  bias=self.conv.bias is not None).to(self.conv.weight.device)
        if self.quant is not None:
            sub.quant = self.quant
        with torch.no_grad():
            sub.weight.copy_(self.get_active_filter(out_ch, in_channel))
            if self.conv.bias is not None:
                sub.bias.copy_(self.conv.bias[:out_ch])
        return sub


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the first C = x.size(1) channels: sliced weight, bias and running stats (OFA bn_forward; the
    running-stat update writes into the slice; momentum None = cumulative average 1/num_batches_tracked)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        C = x.size(1)
        if C == self.num_features:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean[:C] if self.running_mean is not None else None,
                            self.running_var[:C] if self.running_var is not None else None,
                            self.weight[:C], self.bias[:C], self.training or not self.track_running_stats,
                            factor, self.eps)

    def get_active_subnet(self, num_features: int) -> nn.BatchNorm2d:
        """A standalone ``nn.BatchNorm2d(num_features)`` with the first channels' affine and running stats (OFA
        copy_bn)."""
        sub = nn.BatchNorm2d(num_features, self.eps, self.momentum).to(self.weight.device)
        with torch.no_grad():
            sub.weight.copy_(self.weight[:num_features])
            sub.bias.copy_(self.bias[:num_features])
            sub.running_mean.copy_(self.running_mean[:num_features])
            sub.running_var.copy_(self.running_var[:num_features])
            sub.num_batches_tracked.copy_(self.num_batches_tracked)
        return sub


class DynamicLinear(nn.Module):
    """Linear layer with elastic in (x.size(-1)) and out (``active_out_features``) features, first-k slicing of
    weight (out, in) and bias; works on (..., C) inputs, so a transformer's Q/K/V/MLP projections can use it."""

    def __init__(self, max_in_features: int, max_out_features: int, bias: bool = True):
        super().__init__()
        self.max_in_features, self.max_out_features = max_in_features, max_out_features
        self.linear = nn.Linear(max_in_features, max_out_features, bias)
        self.active_out_features = max_out_features
        self.quant: QuantSpec | None = None

    def get_active_weight(self, out_features: int, in_features: int) -> torch.Tensor:
        return self.linear.weight[:out_features, :in_features]

    def get_active_bias(self, out_features: int) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[:out_features]

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:  # x (..., C_in)
        out = self.active_out_features if out_features is None else out_features
        w = quantize_weight(self.get_active_weight(out, x.size(-1)).contiguous(), self.quant)
        return F.linear(quantize_act(x, self.quant), w, self.get_active_bias(out))

    def get_active_subnet(self, in_features: int, out_features: int | None = None) -> nn.Linear:
        out = self.active_out_features if out_features is None else out_features
        cls = QLinear if self.quant is not None else nn.Linear
        sub = cls(in_features, out, self.linear.bias is not None).to(self.linear.weight.device)
        if self.quant is not None:
            sub.quant = self.quant
        with torch.no_grad():
            sub.weight.copy_(self.get_active_weight(out, in_features))
            if self.linear.bias is not None:
                sub.bias.copy_(self.get_active_bias(out))
        return sub


class DynamicLayerNorm(nn.LayerNorm):
    """LayerNorm over the first C = x.size(-1) features (for elastic embedding width in transformers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., C)
        C = x.size(-1)
        w = None if self.weight is None else self.weight[:C]
        b = None if self.bias is None else self.bias[:C]
        return F.layer_norm(x, (C,), w, b, self.eps)

    def get_active_subnet(self, num_features: int) -> nn.LayerNorm:
        sub = nn.LayerNorm(num_features, self.eps, self.elementwise_affine).to(self.weight.device)
        if self.elementwise_affine:
            with torch.no_grad():
                sub.weight.copy_(self.weight[:num_features])
                sub.bias.copy_(self.bias[:num_features])
        return sub


def active_depth(blocks, d: int):
    """Elastic depth: the first d blocks of a stage (OFA ``runtime_depth``)."""
    if not 1 <= d <= len(blocks):
        raise ValueError(f"depth {d} outside 1..{len(blocks)}")
    return list(blocks)[:d]


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hswish": nn.Hardswish(), "silu": nn.SiLU()}[name]


# ---------------------------------------------------------------- MBConv block (OFA DynamicMBConvLayer)
class DynamicMBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand (in -> mid) + BN + act, depthwise k x k (stride) + BN + act, 1x1 project
    (mid -> out) + BN; identity shortcut when ``residual``. mid = make_divisible(round(in * e), divisor) (OFA)."""

    def __init__(self, max_in: int, max_out: int, ks_list, expand_ratio_list, stride: int, residual: bool,
                 divisor: int = 8, act: str = "relu", kernel_transform: bool = True):
        super().__init__()
        self.ks_list, self.expand_ratio_list = sorted(_val2list(ks_list)), sorted(_val2list(expand_ratio_list))
        self.stride, self.residual, self.divisor, self.act = stride, residual, divisor, act
        max_mid = make_divisible(round(max_in * max(self.expand_ratio_list)), divisor)
        self.inverted_bottleneck = nn.Sequential(OrderedDict(
            conv=DynamicConv2d(max_in, max_mid), bn=DynamicBatchNorm2d(max_mid), act=_act(act)))
        self.depth_conv = nn.Sequential(OrderedDict(
            conv=DynamicConv2d(max_mid, max_mid, self.ks_list, stride, depthwise=True,
                               kernel_transform=kernel_transform),
            bn=DynamicBatchNorm2d(max_mid), act=_act(act)))
        self.point_linear = nn.Sequential(OrderedDict(
            conv=DynamicConv2d(max_mid, max_out), bn=DynamicBatchNorm2d(max_out)))
        self.active_kernel_size = max(self.ks_list)
        self.active_expand_ratio = max(self.expand_ratio_list)
        self.active_out_channel = max_out

    def active_middle_channel(self, in_channel: int) -> int:
        return make_divisible(round(in_channel * self.active_expand_ratio), self.divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C_in, H, W)
        self.inverted_bottleneck.conv.active_out_channel = self.active_middle_channel(x.size(1))
        self.depth_conv.conv.active_kernel_size = self.active_kernel_size
        self.point_linear.conv.active_out_channel = self.active_out_channel
        y = self.point_linear(self.depth_conv(self.inverted_bottleneck(x)))
        return x + y if self.residual else y

    def get_active_subnet(self, in_channel: int) -> "StaticMBConv":
        mid, out = self.active_middle_channel(in_channel), self.active_out_channel
        self.inverted_bottleneck.conv.active_out_channel = mid
        self.depth_conv.conv.active_kernel_size = self.active_kernel_size
        self.point_linear.conv.active_out_channel = out
        ib = nn.Sequential(OrderedDict(conv=self.inverted_bottleneck.conv.get_active_subnet(in_channel),
                                       bn=self.inverted_bottleneck.bn.get_active_subnet(mid), act=_act(self.act)))
        dw = nn.Sequential(OrderedDict(conv=self.depth_conv.conv.get_active_subnet(mid),
                                       bn=self.depth_conv.bn.get_active_subnet(mid), act=_act(self.act)))
        pl = nn.Sequential(OrderedDict(conv=self.point_linear.conv.get_active_subnet(mid),
                                       bn=self.point_linear.bn.get_active_subnet(out)))
        return StaticMBConv(ib, dw, pl, self.residual)


class StaticMBConv(nn.Module):
    """A standalone MBConv block (plain nn.Conv2d / nn.BatchNorm2d)."""

    def __init__(self, inverted_bottleneck: nn.Module, depth_conv: nn.Module, point_linear: nn.Module, residual: bool):
        super().__init__()
        self.inverted_bottleneck, self.depth_conv, self.point_linear = inverted_bottleneck, depth_conv, point_linear
        self.residual = residual

    def forward(self, x):
        y = self.point_linear(self.depth_conv(self.inverted_bottleneck(x)))
        return x + y if self.residual else y


class StaticCNN(nn.Module):
    """The standalone sub-network returned by :meth:`ElasticCNN.get_active_subnet` (no weight sharing)."""

    def __init__(self, first_conv: nn.Module, blocks: list[nn.Module], final_conv: nn.Module, classifier: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.first_conv, self.blocks, self.final_conv = first_conv, nn.ModuleList(blocks), final_conv
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = classifier

    def features(self, x):
        x = self.first_conv(x)
        for blk in self.blocks:
            x = blk(x)
        return self.final_conv(x).mean((2, 3))  # (B, head)

    def forward(self, x):  # x (B, C, H, W)
        return self.classifier(self.dropout(self.features(x)))  # (B, n_classes)


# ---------------------------------------------------------------- the elastic CNN (OFA MobileNetV3-like, small)
class ElasticCNN(nn.Module):
    """A small OFA-style MobileNet supernet for 8x8 / 28x28 grey or 32x32 colour images.

    first_conv 3x3 (in -> stem) + BN + act; stages s = 0..S-1 of up to max(depth_list) MBConv blocks (first block of a
    stage: stride ``stage_strides[s]``, no shortcut; others: stride 1, identity shortcut), stage width
    make_divisible(stage_channels[s] * w, divisor); final 1x1 conv (-> head_channels) + BN + act; global average
    pool; dropout; linear classifier. Elastic: d (per stage), e and ks (per block), w (per stage).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, stem_channels: int = 16,
                 stage_channels=(16, 24, 32), stage_strides=(1, 2, 2), depth_list=(1, 2, 3),
                 expand_ratio_list=(2, 3, 4), ks_list=(3, 5), width_mult_list=(1.0,), head_channels: int = 64,
                 divisor: int = 8, act: str = "relu", kernel_transform: bool = True, dropout: float = 0.0):
        super().__init__()
        if len(stage_channels) != len(stage_strides):
            raise ValueError("stage_channels and stage_strides differ in length")
        self.in_channels, self.n_classes, self.divisor, self.act = in_channels, n_classes, divisor, act
        self.depth_list, self.expand_ratio_list = sorted(_val2list(depth_list)), sorted(_val2list(expand_ratio_list))
        self.ks_list, self.width_mult_list = sorted(_val2list(ks_list)), sorted(_val2list(width_mult_list))
        self.stage_channels, self.stage_strides = list(stage_channels), list(stage_strides)
        self.head_channels, self.dropout_rate = head_channels, dropout
        self.first_conv = nn.Sequential(OrderedDict(
            conv=DynamicConv2d(in_channels, stem_channels, 3), bn=DynamicBatchNorm2d(stem_channels), act=_act(act)))
        max_d = max(self.depth_list)
        blocks, self.block_group_info, c_in = [], [], stem_channels
        for c, s in zip(self.stage_channels, self.stage_strides):
            c_max = self.stage_width(c, max(self.width_mult_list))
            self.block_group_info.append(list(range(len(blocks), len(blocks) + max_d)))
            for i in range(max_d):
                blocks.append(DynamicMBConv(c_in if i == 0 else c_max, c_max, self.ks_list, self.expand_ratio_list,
                                            s if i == 0 else 1, residual=i > 0, divisor=divisor, act=act,
                                            kernel_transform=kernel_transform))
            c_in = c_max
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = nn.Sequential(OrderedDict(
            conv=DynamicConv2d(c_in, head_channels, 1), bn=DynamicBatchNorm2d(head_channels), act=_act(act)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = DynamicLinear(head_channels, n_classes)
        self.runtime_depth = [max_d] * len(self.stage_channels)
        self.active_width_mult = [max(self.width_mult_list)] * len(self.stage_channels)

    # ---- the space
    def stage_width(self, base: int, mult: float) -> int:
        return make_divisible(base * mult, self.divisor)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def space(self) -> dict[str, list[list]]:
        """Choices per position: {"d": per stage, "e"/"ks": per block, "w": per stage} (the samplers' input)."""
        S, B = len(self.stage_channels), self.n_blocks
        return {"d": [list(self.depth_list)] * S, "e": [list(self.expand_ratio_list)] * B,
                "ks": [list(self.ks_list)] * B, "w": [list(self.width_mult_list)] * S}

    def max_config(self) -> dict:
        return {k: [max(c) for c in v] for k, v in self.space().items()}

    def min_config(self) -> dict:
        return {k: [min(c) for c in v] for k, v in self.space().items()}

    def sample_config(self, rng: np.random.Generator) -> dict:
        """Independent uniform choice at every position (OFA ``sample_active_subnet``)."""
        from .samplers import uniform
        return uniform(self.space(), rng)

    def validate_config(self, config: dict) -> dict:
        space = self.space()
        cfg = {k: list(config.get(k, [max(c) for c in space[k]])) for k in CONFIG_KEYS}
        for k, choices in space.items():
            if len(cfg[k]) != len(choices):
                raise ValueError(f"config[{k!r}] has {len(cfg[k])} entries, expected {len(choices)}")
            for i, (v, ch) in enumerate(zip(cfg[k], choices)):
                if v not in ch:
                    raise ValueError(f"config[{k!r}][{i}] = {v} not in {ch}")
        extra = set(config) - set(CONFIG_KEYS)
        if extra:
            raise ValueError(f"unknown config keys {sorted(extra)}; allowed: {CONFIG_KEYS}")
        return cfg

    def active_blocks(self, config: dict | None = None) -> list[int]:
        """Indices of the blocks a config runs (the first d of every stage)."""
        d = self.runtime_depth if config is None else self.validate_config(config)["d"]
        return [i for g, dd in zip(self.block_group_info, d) for i in active_depth(g, dd)]

    def canonical(self, config: dict) -> dict:
        """The config with the ks/e of blocks that elastic depth skips set to the max (configs that define the same
        sub-network become equal)."""
        cfg = self.validate_config(config)
        act = set(self.active_blocks(cfg))
        for k, top in (("e", max(self.expand_ratio_list)), ("ks", max(self.ks_list))):
            cfg[k] = [v if i in act else top for i, v in enumerate(cfg[k])]
        return cfg

    def set_active_subnet(self, config: dict) -> None:
        """Activate a sub-network (OFA ``set_active_subnet``)."""
        cfg = self.validate_config(config)
        self.runtime_depth, self.active_width_mult = list(cfg["d"]), list(cfg["w"])
        for s, g in enumerate(self.block_group_info):
            width = self.stage_width(self.stage_channels[s], cfg["w"][s])
            for i in g:
                blk = self.blocks[i]
                blk.active_kernel_size, blk.active_expand_ratio = cfg["ks"][i], cfg["e"][i]
                blk.active_out_channel = width

    def set_max_net(self) -> None:
        self.set_active_subnet(self.max_config())

    def set_min_net(self) -> None:
        self.set_active_subnet(self.min_config())

    def active_config(self) -> dict:
        return {"d": list(self.runtime_depth), "e": [b.active_expand_ratio for b in self.blocks],
                "ks": [b.active_kernel_size for b in self.blocks], "w": list(self.active_width_mult)}

    # ---- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        x = self.first_conv(x)
        for i in self.active_blocks():
            x = self.blocks[i](x)
        return self.final_conv(x).mean((2, 3))  # (B, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))  # (B, n_classes)

    # ---- standalone subnet (OFA get_active_subnet, preserve_weight=True)
    def get_active_subnet(self, config: dict | None = None) -> StaticCNN:
        """A standalone ``StaticCNN`` with copies of the active weights and BN statistics; in eval mode its output
        equals the supernet's under that config. The supernet's active config is restored afterwards."""
        before = self.active_config()
        if config is not None:
            self.set_active_subnet(config)
        try:
            stem_c = self.first_conv.conv.max_out_channels
            first = nn.Sequential(OrderedDict(conv=self.first_conv.conv.get_active_subnet(self.in_channels),
                                              bn=self.first_conv.bn.get_active_subnet(stem_c), act=_act(self.act)))
            blocks, c = [], stem_c
            for i in self.active_blocks():
                blocks.append(self.blocks[i].get_active_subnet(c))
                c = self.blocks[i].active_out_channel
            final = nn.Sequential(OrderedDict(conv=self.final_conv.conv.get_active_subnet(c),
                                              bn=self.final_conv.bn.get_active_subnet(self.head_channels),
                                              act=_act(self.act)))
            clf = self.classifier.get_active_subnet(self.head_channels)
            sub = StaticCNN(first, blocks, final, clf, self.dropout_rate)
        finally:
            self.set_active_subnet(before)
        sub.train(self.training)
        return sub

    # ---- BigNAS / EQ-Net helpers
    def zero_last_bn_gamma(self) -> None:
        """BigNAS: zero-initialise the last BN gamma of every residual block (each block starts as the identity)."""
        with torch.no_grad():
            for blk in self.blocks:
                if blk.residual:
                    blk.point_linear.bn.weight.zero_()

    def quant_layers(self) -> list[nn.Module]:
        """Every weight layer in forward order (first conv, per block expand/depthwise/project, final conv,
        classifier): the positions of a per-layer quantization config."""
        out = [self.first_conv.conv]
        for blk in self.blocks:
            out += [blk.inverted_bottleneck.conv, blk.depth_conv.conv, blk.point_linear.conv]
        return out + [self.final_conv.conv, self.classifier]

    def set_quant(self, specs: QuantSpec | list[QuantSpec | None] | None) -> None:
        """Set one :class:`QuantSpec` for all layers, one per layer of :meth:`quant_layers`, or None (float)."""
        layers = self.quant_layers()
        specs = [specs] * len(layers) if specs is None or isinstance(specs, QuantSpec) else list(specs)
        if len(specs) != len(layers):
            raise ValueError(f"{len(specs)} quant specs for {len(layers)} layers")
        for layer, spec in zip(layers, specs):
            layer.quant = spec


# ---------------------------------------------------------------- in-place distillation (BigNAS) and sandwich step
def inplace_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0,
                              kind: str = "kl") -> torch.Tensor:
    """BigNAS in-place distillation: the largest child's soft labels (DETACHED) supervise the others.

    ``kind="kl"``: T^2 * mean_batch KL(p_T || q_T), p_T = softmax(teacher / T), q_T = softmax(student / T).
    ``kind="soft_ce"``: T^2 * mean_batch (-sum p_T log q_T), OFA's ``cross_entropy_loss_with_soft_target`` (same
    gradient as "kl"; larger by the teacher's entropy). T = 1 in BigNAS and OFA.
    """
    if kind not in ("kl", "soft_ce"):
        raise ValueError(f"kind={kind!r}; allowed: kl, soft_ce")
    p = F.softmax(teacher_logits.detach() / T, dim=-1)  # (B, K)
    log_q = F.log_softmax(student_logits / T, dim=-1)  # (B, K)
    if kind == "kl":
        per = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(-1)
    else:
        per = -(p * log_q).sum(-1)
    return per.mean() * T ** 2


def sandwich_backward(net: ElasticCNN, x: torch.Tensor, y: torch.Tensor, configs: list[dict], kd: bool = True,
                      label_smoothing: float = 0.0) -> list[float]:
    """Accumulate the gradients of one BigNAS sandwich (no optimizer step): configs[0] is the teacher (the max net in
    the sandwich rule) trained on the labels; the others on the in-place distillation loss to its detached logits
    (``kd=True``) or on the labels. Returns the per-config losses."""
    losses, soft = [], None
    for j, cfg in enumerate(configs):
        net.set_active_subnet(cfg)
        out = net(x)
        if j == 0 or not kd:
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        else:
            loss = inplace_distillation_loss(out, soft)
        if j == 0:
            soft = out.detach()
        loss.backward()
        losses.append(float(loss.detach()))
    return losses


def sandwich_step(net: ElasticCNN, x: torch.Tensor, y: torch.Tensor, configs: list[dict],
                  optimizer: torch.optim.Optimizer, kd: bool = True, label_smoothing: float = 0.0) -> list[float]:
    """One BigNAS step: gradients of every config in ``configs`` accumulated (:func:`sandwich_backward`), then one
    optimizer step. Returns the per-config losses."""
    optimizer.zero_grad(set_to_none=True)
    losses = sandwich_backward(net, x, y, configs, kd, label_smoothing)
    optimizer.step()
    return losses
