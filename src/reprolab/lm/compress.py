"""Weight compression of a causal LM: low-bit round-to-nearest (RTN) quantization with groups, magnitude pruning.

The compression side of "Compress, Then Prompt: Improving Accuracy-Efficiency Trade-off of LLM Inference with
Transferable Prompt" (Xu et al., 2023), https://arxiv.org/abs/2305.11186. The paper compresses with GPTQ and
SparseGPT; here the simpler data-free baselines those methods improve on:

* RTN: the asymmetric min-max grid of GPTQ's ``Quantizer`` (``sym=False``), one grid per ``group_size`` input
  columns of each output row: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``w_hat = scale * (q - zero)``, with min <= 0 <= max (the
  range always holds 0, so a zero weight stays exactly zero);
* magnitude pruning: in each linear layer, exactly ``floor(sparsity * numel)`` weights of smallest |w| are zeroed.

Only the decoder's linear layers are compressed (embeddings, norms and the LM head stay as they are), as in GPTQ.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.fake_quant import decoder_linears


@torch.no_grad()
def rtn_quantize(w: torch.Tensor, n_bits: int, group_size: int = 128) -> torch.Tensor:
    """Fake-quantized copy of ``w`` (out, in): per-row asymmetric min-max grids over groups of ``group_size`` columns.

    ``group_size <= 0`` means one grid per row (per-channel).
    """
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    if in_f % g:
        raise ValueError(f"in_features={in_f} is not a multiple of group_size={g}")
    maxq = 2 ** n_bits - 1
    wg = w.float().reshape(out_f, in_f // g, g)  # (out, groups, g)
    xmin = wg.amin(dim=-1, keepdim=True).clamp(max=0)  # (out, groups, 1)
    xmax = wg.amax(dim=-1, keepdim=True).clamp(min=0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(both_zero, -1.0), xmax.masked_fill(both_zero, 1.0)
    scale = (xmax - xmin) / maxq  # (out, groups, 1)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, maxq)  # integer codes in [0, 2^b - 1]
    return (scale * (q - zero)).reshape(out_f, in_f).to(w.dtype)  # (out, in)


@torch.no_grad()
def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Copy of ``w`` with exactly ``floor(sparsity * numel)`` smallest-magnitude entries set to zero."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    k = int(sparsity * w.numel())
    flat = w.reshape(-1).clone()
    if k:
        idx = torch.argsort(flat.abs(), stable=True)[:k]  # ties broken by position, so the count is exact
        flat[idx] = 0
    return flat.reshape(w.shape)


@torch.no_grad()
def compress_model(model: nn.Module, n_bits: int | None = None, group_size: int = 128,
                   sparsity: float = 0.0) -> nn.Module:
    """A compressed deep copy of ``model``: prune (if ``sparsity`` > 0), then RTN-quantize (if ``n_bits``)."""
    compressed = copy.deepcopy(model)
    for name, (parent, attr, _) in decoder_linears(compressed).items():
        lin = getattr(parent, attr)
        w = lin.weight.data  # (out, in)
        if sparsity > 0:
            w = magnitude_prune(w, sparsity)
        if n_bits is not None:
            w = rtn_quantize(w, n_bits, group_size)
        lin.weight.data.copy_(w)
    return compressed


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights of every decoder linear layer."""
    return {name: (getattr(p, a).weight == 0).float().mean().item() for name, (p, a, _) in decoder_linears(model).items()}


def compressed_bits_per_weight(n_bits: int | None, group_size: int, sparsity: float) -> float:
    """Storage estimate per decoder weight: codes plus an fp16 scale and zero per group; sparsity stored as a bitmask.

    Dense fp16 is 16; RTN b-bit with groups of g: ``b + 32 / g``; 50% unstructured sparsity in fp16 with a bitmask:
    ``0.5 * 16 + 1``. Quantization plus sparsity: ``(1 - s) * (b + 32 / g) + 1``.
    """
    per = 16.0 if n_bits is None else n_bits + 32.0 / group_size
    return per if sparsity <= 0 else (1 - sparsity) * per + 1.0
