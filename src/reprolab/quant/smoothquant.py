"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models (Xiao et al., 2022),
https://arxiv.org/abs/2211.10438. Follows the official ``smoothquant/smooth.py`` and ``calibration.py``
(mit-han-lab/smoothquant): for each norm -> linear(s) pair,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (paper eq. 4; max|W_j| over all linears fed by the norm)
    Y = (X diag(s)^-1) (diag(s) W)                      (paper eq. 3)

where ``max|X_j|`` is the per-channel input absmax on calibration text. ``diag(s)^-1`` is folded into the norm's
weight (and bias, for OPT's LayerNorm) and ``diag(s)`` into the input columns of the following linears, so the float
model computes the same function. Pairs: Llama-like ``input_layernorm -> q/k/v_proj`` and
``post_attention_layernorm -> gate/up_proj``; OPT ``self_attn_layer_norm -> q/k/v_proj`` and
``final_layer_norm -> fc1``.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .fake_quant import decoder_layers


@torch.no_grad()
def collect_act_stats(model: nn.Module, ids: torch.Tensor, seq_len: int) -> dict:
    """Run ``model`` on non-overlapping windows of ``ids`` (1, T) and record, for every ``nn.Linear``:

    ``channel_absmax[name]``: per-input-channel max|X_j| (C,) -- the SmoothQuant act scales;
    ``tensor_absmax[name]``: ``{"input": max|X|, "output": max|Y|}`` -- for static per-tensor quantization.
    """
    channel: dict[str, torch.Tensor] = {}
    tensor: dict[str, dict[str, float]] = {}

    def hook(m, inputs, output, name):
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()  # (tokens, C)
        cmax = x.amax(dim=0)  # (C,)
        channel[name] = cmax if name not in channel else torch.maximum(channel[name], cmax)
        y_max = output.detach().abs().max().item()
        prev = tensor.get(name, {"input": 0.0, "output": 0.0})
        tensor[name] = {"input": max(prev["input"], cmax.max().item()), "output": max(prev["output"], y_max)}

    hooks = [m.register_forward_hook(functools.partial(hook, name=n))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model.eval()
        T = ids.shape[1]
        if T < seq_len:
            raise ValueError(f"calibration text has {T} tokens, fewer than seq_len={seq_len}")
        for i in range(T // seq_len):
            model(ids[:, i * seq_len:(i + 1) * seq_len])  # (1, L)
    finally:
        for h in hooks:
            h.remove()
    return {"channel_absmax": channel, "tensor_absmax": tensor}


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (C,), clamped to >= 1e-5 as in the official code."""
    return (act_absmax.pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)  # (C,)


@torch.no_grad()
def smooth_ln_fcs(ln: nn.Module, fcs: list[nn.Linear], act_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Fold diag(s)^-1 into ``ln`` (weight, and bias if any: LayerNorm or RMSNorm) and diag(s) into ``fcs``.

    Returns s (C,). ``act_absmax`` (C,) is the input channel absmax shared by all ``fcs``.
    """
    C = ln.weight.numel()
    for fc in fcs:
        if not isinstance(fc, nn.Linear) or fc.in_features != C or act_absmax.numel() != C:
            raise ValueError(f"smooth_ln_fcs: norm width {C}, act scales {act_absmax.numel()}, linear {fc}")
    dtype, device = fcs[0].weight.dtype, fcs[0].weight.device
    weight_absmax = torch.stack([fc.weight.abs().amax(dim=0) for fc in fcs]).amax(dim=0)  # (C,) max over outputs
    s = smoothing_factors(act_absmax.to(device=device, dtype=dtype), weight_absmax, alpha)  # (C,)
    ln.weight.div_(s)
    if getattr(ln, "bias", None) is not None:
        ln.bias.div_(s)
    for fc in fcs:
        fc.weight.mul_(s.view(1, -1))  # (out, C) * (1, C)
    return s


def norm_linear_pairs(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear], str]]:
    """(pair name, norm, linears fed by it, the linear whose input stats to use) for every decoder layer."""
    pairs = []
    for name, layer in decoder_layers(model):
        attn = layer.self_attn
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if hasattr(layer, "mlp"):  # Llama-like: RMSNorm (weight only)
            pairs.append((f"{name}.input_layernorm", layer.input_layernorm, qkv, f"{name}.self_attn.q_proj"))
            pairs.append((f"{name}.post_attention_layernorm", layer.post_attention_layernorm,
                          [layer.mlp.gate_proj, layer.mlp.up_proj], f"{name}.mlp.gate_proj"))
        else:  # OPT: LayerNorm with bias
            pairs.append((f"{name}.self_attn_layer_norm", layer.self_attn_layer_norm, qkv, f"{name}.self_attn.q_proj"))
            pairs.append((f"{name}.final_layer_norm", layer.final_layer_norm, [layer.fc1], f"{name}.fc1"))
    return pairs


@torch.no_grad()
def smooth_lm(model: nn.Module, channel_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Smooth every norm -> linear pair of ``model`` in place; returns the factors s per pair name."""
    return {pair: smooth_ln_fcs(ln, fcs, channel_absmax[stat], alpha)
            for pair, ln, fcs, stat in norm_linear_pairs(model)}


@torch.no_grad()
def inject_outliers(model: nn.Module, frac: float = 0.005, factor: float = 64.0, seed: int = 0) -> torch.Tensor:
    """Make a function-preserving twin with outlier channels (in place); returns the chosen channel indices.

    The same ``ceil(frac * C)`` channels (as in large LLMs, outliers sit in a few fixed channels) of every norm
    are multiplied by ``factor`` and the matching input columns of the linears it feeds are divided by ``factor``:
    the float model computes the same function, but those activations are ``factor`` times larger.
    """
    pairs = norm_linear_pairs(model)
    C = pairs[0][1].weight.numel()
    n = max(1, int(torch.tensor(frac * C).ceil().item()))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(C, generator=g)[:n].sort().values  # (n,)
    for _, ln, fcs, _ in pairs:
        ln.weight[idx] *= factor
        if getattr(ln, "bias", None) is not None:
            ln.bias[idx] *= factor
        for fc in fcs:
            fc.weight[:, idx] /= factor
    return idx


@torch.no_grad()
def w8a8_copy(model: nn.Module, channel_absmax: dict[str, torch.Tensor] | None = None, alpha: float | None = None,
              act_quant: str = "per_tensor", weight_quant: str = "per_channel", quantize_bmm_input: bool = True,
              calib_ids: torch.Tensor | None = None, seq_len: int = 512,
              act_quant_by_layer: dict[str, str] | None = None, static_absmax: dict | None = None) -> nn.Module:
    """A W8A8 fake-quantized copy of ``model``: naive (``alpha=None``) or SmoothQuant (smoothed at ``alpha`` first).

    Static activation scales (``per_tensor_static``) are calibrated on ``calib_ids`` after smoothing, as the
    official pipeline does (smooth, then collect per-tensor scales of the smoothed float model), unless
    ``static_absmax`` is given (e.g. the stats of the unsmoothed model, reused for the naive arm).
    """
    from .fake_quant import quantize_model

    twin = copy.deepcopy(model)
    if alpha is not None:
        if channel_absmax is None:
            raise ValueError("SmoothQuant needs channel_absmax from collect_act_stats")
        smooth_lm(twin, channel_absmax, alpha)
    static = static_absmax
    if static is None and "per_tensor_static" in (act_quant, *(act_quant_by_layer or {}).values()):
        if calib_ids is None:
            raise ValueError("per_tensor_static needs calib_ids")
        static = collect_act_stats(twin, calib_ids, seq_len)["tensor_absmax"]
    return quantize_model(twin, weight_quant, act_quant, quantize_bmm_input, static,
                          act_quant_by_layer=act_quant_by_layer)


def outlier_ratio(channel_absmax: torch.Tensor) -> float:
    """max_j max|X_j| / median_j max|X_j|: how far the largest channel stands out (1 = flat)."""
    return (channel_absmax.max() / channel_absmax.median()).item()


def draw_windows(ids: torch.Tensor, seq_len: int, n_windows: int, seed: int) -> torch.Tensor:
    """``n_windows`` distinct non-overlapping windows of ``seq_len`` tokens of ``ids`` (1, T), drawn at random with
    ``seed`` from the T // seq_len aligned windows and concatenated in the drawn order: (1, n_windows * seq_len)."""
    import numpy as np

    n_all = ids.shape[1] // seq_len
    if not 1 <= n_windows <= n_all:
        raise ValueError(f"draw_windows: {n_windows} windows of {seq_len} tokens requested, the text has {n_all}")
    pick = np.random.default_rng(seed).choice(n_all, size=n_windows, replace=False)
    return torch.cat([ids[:, int(i) * seq_len:(int(i) + 1) * seq_len] for i in pick], dim=1)  # (1, n * L)


def draw_slice(ids: torch.Tensor, n_tokens: int, seed: int) -> torch.Tensor:
    """One contiguous slice of ``n_tokens`` tokens of ``ids`` (1, T) at a random offset drawn with ``seed``."""
    import numpy as np

    T = ids.shape[1]
    if not 1 <= n_tokens <= T:
        raise ValueError(f"draw_slice: {n_tokens} tokens requested, the text has {T}")
    start = int(np.random.default_rng(seed).integers(0, T - n_tokens + 1))
    return ids[:, start:start + n_tokens]  # (1, n_tokens)
