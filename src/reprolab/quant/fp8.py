"""FP8 E4M3 quantizers of COAT: per-tensor and per-group scaling, and Dynamic Range Expansion.

Xi, Cai, Li, Han, Keutzer, Mao. "COAT: Compressing Optimizer States and Activation for Memory-Efficient FP8
Training", ICLR 2025. https://arxiv.org/abs/2410.19313 (official code: NVlabs/COAT; the optimizer kernel
``fp8_adamw_expand_cuda_kernel.cu`` is what :func:`quantize_dre` follows).

E4M3 (``torch.float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, largest finite value
448, smallest subnormal 2^-9. Casting float32 -> E4M3 in torch rounds to nearest, ties to even; values beyond
+-448 would become NaN, so every quantizer clamps first.

Dynamic Range Expansion (DRE). Per-group absmax scaling maps a group's maximum to 448, but a group whose values span
more than E4M3's range loses its small values (flushed to zero or to a couple of bits). DRE first applies
f(x) = sign(x) |x / sqrt(max min)|^k per group (max, min of |x| over the group), with the largest k (a multiple of
1/expand_min) such that the expanded group's range max^k/min^k fits E4M3's range R = 448^2 / 2:

    k = floor(expand_min * log2(R) / log2(max / min)) / expand_min

then quantizes with the usual absmax scale and inverts f after dequantizing. The group minimum skips zeros (the
official kernel's reductions do; a zero stays exactly zero under f). Groups narrower than R get k > 1
(expanded to use all of E4M3's exponents), wider groups get k < 1 (compressed so nothing underflows).
"""
from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0 ** -9
DRE_RANGE = E4M3_MAX ** 2 / 2  # the range the official kernel expands groups to (ratioUpperBound)
QUANT_MIN_VAL = 1e-30  # added to max and min as in the official kernel (fp8_adamw_expand_cuda_kernel.cu:15)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 (nearest, ties to even), saturating at +-448 instead of producing NaN."""
    x = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    # Under torch.use_deterministic_algorithms, new tensors are pre-filled with NaN, which torch 2.2 cannot do for
    # float8; the cast overwrites every element anyway, so the pre-fill is switched off around it.
    fill = torch._C._get_deterministic_fill_uninitialized_memory()
    torch._C._set_deterministic_fill_uninitialized_memory(False)
    try:
        return x.to(E4M3)
    finally:
        torch._C._set_deterministic_fill_uninitialized_memory(fill)


def e4m3_grid() -> torch.Tensor:
    """All finite E4M3 values, sorted (253 distinct: +-0 collapse, the two NaN codes are dropped)."""
    vals = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return torch.unique(vals[~vals.isnan()])


# ---------------------------------------------------------------------------------------------------------------
# Per-tensor and per-group absmax scaling
# ---------------------------------------------------------------------------------------------------------------
def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q E4M3 with x's shape, scale float32 scalar) with x ~ q * scale and max|x| -> 448."""
    scale = (x.detach().abs().max().float() / E4M3_MAX).clamp_min(1e-30)  # ()
    return to_e4m3(x / scale), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def _groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """x flattened and zero-padded to (n_groups, group_size); returns also the number of valid elements."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size), n


def quantize_per_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of ``group_size`` consecutive elements (of x flattened), each with its absmax scale.
    Returns q E4M3 (x.numel(),) and scales float32 (n_groups,)."""
    xg, n = _groups(x, group_size)  # (G, g)
    scale = (xg.abs().amax(1) / E4M3_MAX).clamp_min(1e-30)  # (G,)
    q = to_e4m3((xg / scale[:, None]).reshape(-1)[:n])  # (n,) own storage: no padding kept alive
    return q, scale


def dequantize_per_group(q: torch.Tensor, scale: torch.Tensor, shape, group_size: int,
                         dtype=torch.float32) -> torch.Tensor:
    qg, n = _groups(q.float(), group_size)  # (G, g)
    return (qg * scale[:, None]).reshape(-1)[:n].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Dynamic Range Expansion
# ---------------------------------------------------------------------------------------------------------------
def expansion_exponent(absmax: torch.Tensor, absmin: torch.Tensor, expand_min: int = 16,
                       max_k: float = 64.0) -> torch.Tensor:
    """k per group = floor(expand_min * log2(R) / log2(max / min)) / expand_min, kept in [1/expand_min, max_k]
    (max_k only guards groups whose values are all equal, where the formula gives infinity)."""
    ratio = absmax.double() / absmin.double()
    k = torch.floor(expand_min * math.log2(DRE_RANGE) / torch.log2(ratio)) / expand_min
    return k.nan_to_num(max_k, posinf=max_k).clamp(1.0 / expand_min, max_k).float()


def quantize_dre(x: torch.Tensor, group_size: int, expand_min: int = 16) -> dict[str, torch.Tensor]:
    """Per-group DRE + E4M3: q (x.numel(),) E4M3 and per group (n_groups,) float32: scale, k, sqrt_minmax."""
    xg, n = _groups(x, group_size)  # (G, g)
    valid = torch.arange(xg.numel(), device=xg.device).view_as(xg) < n  # padding must not set a group's minimum
    a = xg.abs().double()
    absmax = a.amax(1)  # (G,)
    # the minimum skips zeros, as the official kernel's reductions do ("Skip zero values when computing minimum"): a
    # single zero would otherwise drive k towards 1/expand_min and wipe out the group's precision; a group of zeros
    # gets min = max (k = max_k, every code 0)
    absmin = torch.where(valid & (a > 0), a, torch.full_like(a, math.inf)).amin(1)  # (G,)
    absmin = torch.where(torch.isinf(absmin), absmax, absmin)
    absmax, absmin = absmax + QUANT_MIN_VAL, absmin + QUANT_MIN_VAL
    k = expansion_exponent(absmax, absmin, expand_min)  # (G,)
    sqrt_minmax = (absmax * absmin).sqrt()  # (G,) centres the group at 1 before the power
    kd = k.double()[:, None]
    expanded = torch.sign(xg).double() * (a / sqrt_minmax[:, None]).pow(kd)  # (G, g)
    scale = ((absmax / sqrt_minmax).pow(k.double()) / E4M3_MAX)  # (G,) maps the expanded max to 448
    q = to_e4m3((expanded / scale[:, None]).reshape(-1)[:n])  # (n,) own storage
    return {"q": q, "scale": scale.float(), "k": k, "sqrt_minmax": sqrt_minmax.float()}


def dequantize_dre(state: dict[str, torch.Tensor], shape, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_dre`: sign(y) |y|^(1/k) * sqrt(max min) with y = q * scale."""
    qg, n = _groups(state["q"].float(), group_size)  # (G, g)
    y = qg.double() * state["scale"].double()[:, None]
    x = torch.sign(y) * y.abs().pow(1.0 / state["k"].double()[:, None]) * state["sqrt_minmax"].double()[:, None]
    return x.reshape(-1)[:n].reshape(shape).float()


def fake_quantize(x: torch.Tensor, mode: str, group_size: int = 128, expand_min: int = 16) -> torch.Tensor:
    """Quantize then dequantize: ``mode`` is 'tensor' (per-tensor), 'group' (per-group absmax) or 'dre'."""
    if mode == "tensor":
        return dequantize_per_tensor(*quantize_per_tensor(x), dtype=x.dtype)
    if mode == "group":
        return dequantize_per_group(*quantize_per_group(x, group_size), x.shape, group_size, x.dtype)
    if mode == "dre":
        return dequantize_dre(quantize_dre(x, group_size, expand_min), x.shape, group_size).to(x.dtype)
    raise ValueError(f"mode {mode!r}; allowed: tensor, group, dre")
