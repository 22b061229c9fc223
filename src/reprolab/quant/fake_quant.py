"""INT8 absmax fake quantization (W8A8) as in SmoothQuant.

SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models (Xiao et al., 2022),
https://arxiv.org/abs/2211.10438. Follows the official ``smoothquant/fake_quant.py`` (mit-han-lab/smoothquant):
symmetric absmax INT8, ``Delta = max|X| / (2^(N-1) - 1)``, ``Q(X) = round(X / Delta) * Delta`` (paper eq. 1), with

* weights: per-output-channel (``per_channel``) or ``per_tensor`` scales;
* activations: ``per_token`` (dynamic, one scale per row), ``per_tensor`` (dynamic, one scale per call) or
  ``per_tensor_static`` (one scale fixed from calibration data, the paper's O3 setting).

Only the decoder's linear layers are quantized (the embedding, norms and LM head stay in floating point), and
optionally the outputs of q/k/v (a stand-in for INT8 inputs of the attention BMMs, as the official code does).
Weights are stored de-quantized (fake quant): the arithmetic runs in float, the rounding error is INT8's.
"""
from __future__ import annotations

import torch
from torch import nn

ACT_QUANTS = ("per_token", "per_tensor", "per_tensor_static")
WEIGHT_QUANTS = ("per_channel", "per_tensor")


def q_max(n_bits: int = 8) -> int:
    """Largest code of a signed symmetric ``n_bits`` integer: 127 for INT8."""
    return 2 ** (n_bits - 1) - 1


def absmax_scale(absmax: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Step size Delta = max|X| / q_max, clamped away from zero (as the official code: 1e-5 before the division)."""
    return absmax.clamp(min=1e-5) / q_max(n_bits)


def fake_quantize(x: torch.Tensor, delta: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """round(x / Delta) * Delta, with codes clipped to [-q_max, q_max] (only a static Delta can clip)."""
    qm = q_max(n_bits)
    return torch.clamp(torch.round(x / delta), -qm, qm) * delta


@torch.no_grad()
def weight_scales_per_channel(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Delta of each output channel of w (out, in): (out, 1)."""
    return absmax_scale(w.abs().amax(dim=-1, keepdim=True), n_bits)  # (out, 1)


@torch.no_grad()
def quantize_weight_per_channel_absmax(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """w (out, in) -> fake-quantized copy with one Delta per output row."""
    return fake_quantize(w, weight_scales_per_channel(w, n_bits), n_bits)  # (out, in)


@torch.no_grad()
def quantize_weight_per_tensor_absmax(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """w (out, in) -> fake-quantized copy with a single Delta."""
    return fake_quantize(w, absmax_scale(w.abs().max(), n_bits), n_bits)


@torch.no_grad()
def quantize_activation_per_token_absmax(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """x (..., C) -> fake-quantized copy with one dynamic Delta per token (row)."""
    return fake_quantize(x, absmax_scale(x.abs().amax(dim=-1, keepdim=True), n_bits), n_bits)  # (..., C)


@torch.no_grad()
def quantize_activation_per_tensor_absmax(x: torch.Tensor, n_bits: int = 8,
                                          absmax: float | torch.Tensor | None = None) -> torch.Tensor:
    """x (..., C) -> fake-quantized copy with one Delta for the whole tensor.

    ``absmax=None``: dynamic (Delta from this tensor); a number: static (Delta from calibration, values beyond clip).
    """
    amax = x.abs().max() if absmax is None else torch.as_tensor(absmax, dtype=x.dtype, device=x.device)
    return fake_quantize(x, absmax_scale(amax, n_bits), n_bits)


class W8A8Linear(nn.Module):
    """A linear layer computing ``Q(X) Q(W)^T + b`` with fake INT8 weights and activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_quant: str = "per_token",
                 quantize_output: bool = False, n_bits: int = 8):
        super().__init__()
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant={act_quant!r}; allowed: {', '.join(ACT_QUANTS)}")
        self.in_features, self.out_features, self.n_bits = in_features, out_features, n_bits
        self.act_quant_name, self.quantize_output = act_quant, quantize_output
        self.weight_quant_name = "per_channel"
        self.register_buffer("weight", torch.zeros(out_features, in_features))  # (out, in), de-quantized
        self.register_buffer("weight_scales", torch.ones(out_features, 1))  # (out, 1) Delta_W
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # calibrated absmax of the input / output, used only by per_tensor_static
        self.register_buffer("input_absmax", torch.tensor(float("nan")))
        self.register_buffer("output_absmax", torch.tensor(float("nan")))

    def _quant(self, x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        if self.act_quant_name == "per_token":
            return quantize_activation_per_token_absmax(x, self.n_bits)
        if self.act_quant_name == "per_tensor":
            return quantize_activation_per_tensor_absmax(x, self.n_bits)
        if torch.isnan(absmax):
            raise RuntimeError("per_tensor_static needs calibrated absmax (see quantize_model(static_absmax=...))")
        return quantize_activation_per_tensor_absmax(x, self.n_bits, absmax=absmax)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_x = self._quant(x, self.input_absmax)  # (..., in)
        y = nn.functional.linear(q_x, self.weight, self.bias)  # (..., out)
        return self._quant(y, self.output_absmax) if self.quantize_output else y

    @staticmethod
    def from_float(module: nn.Linear, weight_quant: str = "per_channel", act_quant: str = "per_token",
                   quantize_output: bool = False, input_absmax: float | None = None,
                   output_absmax: float | None = None, n_bits: int = 8) -> "W8A8Linear":
        """Quantize a float ``nn.Linear`` (the module itself is left untouched)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(module).__name__}")
        if weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"weight_quant={weight_quant!r}; allowed: {', '.join(WEIGHT_QUANTS)}")
        new = W8A8Linear(module.in_features, module.out_features, module.bias is not None, act_quant,
                         quantize_output, n_bits)
        w = module.weight.detach().float()  # (out, in)
        if weight_quant == "per_channel":
            delta = weight_scales_per_channel(w, n_bits)  # (out, 1)
        else:
            delta = absmax_scale(w.abs().max(), n_bits).expand(w.shape[0], 1)  # (out, 1)
        new.weight_scales.copy_(delta)
        new.weight.copy_(fake_quantize(w, delta, n_bits))
        new.weight_quant_name = weight_quant
        if module.bias is not None:
            new.bias.copy_(module.bias.detach().float())
        if input_absmax is not None:
            new.input_absmax.fill_(float(input_absmax))
        if output_absmax is not None:
            new.output_absmax.fill_(float(output_absmax))
        return new.to(module.weight.device)

    def int8_weight(self) -> torch.Tensor:
        """The INT8 codes of the weight (out, in), recovered exactly from the de-quantized weight."""
        return torch.round(self.weight / self.weight_scales).to(torch.int8)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"weight_quant={self.weight_quant_name}, act_quant={self.act_quant_name}, "
                f"quantize_output={self.quantize_output}")


def decoder_linears(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Names of the decoder's linear layers to quantize -> (parent module, attribute, is a q/k/v projection).

    Llama-like (``LlamaDecoderLayer``: q/k/v/o_proj, gate/up/down_proj) and OPT (``OPTDecoderLayer``: q/k/v/out_proj,
    fc1, fc2). The LM head and embeddings are not quantized (as in the official code).
    """
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for name, layer in decoder_layers(model):
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[f"{name}.self_attn.{proj}"] = (attn, proj, True)
        o = "o_proj" if hasattr(attn, "o_proj") else "out_proj"
        out[f"{name}.self_attn.{o}"] = (attn, o, False)
        if hasattr(layer, "mlp"):  # Llama / Mistral
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{name}.mlp.{proj}"] = (layer.mlp, proj, False)
        else:  # OPT
            for fc in ("fc1", "fc2"):
                out[f"{name}.{fc}"] = (layer, fc, False)
    return out


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every decoder layer of a Llama-like or OPT causal LM."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LlamaDecoderLayer, OPTDecoderLayer))]
    if not layers:
        raise ValueError(f"unsupported model {type(model).__name__}: expected Llama-like or OPT decoder layers")
    return layers


@torch.no_grad()
def quantize_model(model: nn.Module, weight_quant: str = "per_channel", act_quant: str = "per_tensor",
                   quantize_bmm_input: bool = False, static_absmax: dict | None = None, n_bits: int = 8,
                   act_quant_by_layer: dict[str, str] | None = None) -> nn.Module:
    """Replace every decoder linear layer by a :class:`W8A8Linear` (in place; returns ``model``).

    ``quantize_bmm_input`` also fake-quantizes the q/k/v outputs (the inputs of the attention BMMs).
    ``static_absmax`` maps a layer name to ``{"input": absmax, "output": absmax}`` (from
    :func:`reprolab.quant.smoothquant.collect_act_stats`); required for ``per_tensor_static``.
    ``act_quant_by_layer`` overrides ``act_quant`` for linears whose attribute name is a key (e.g. ``{"down_proj":
    "per_token"}``), for ablations.
    """
    by_layer = act_quant_by_layer or {}
    if "per_tensor_static" in (act_quant, *by_layer.values()) and static_absmax is None:
        raise ValueError("act_quant='per_tensor_static' needs static_absmax from calibration")
    for name, (parent, attr, is_qkv) in decoder_linears(model).items():
        stats = (static_absmax or {}).get(name, {})
        setattr(parent, attr, W8A8Linear.from_float(
            getattr(parent, attr), weight_quant, by_layer.get(attr, act_quant),
            quantize_output=quantize_bmm_input and is_qkv,
            input_absmax=stats.get("input"), output_absmax=stats.get("output"), n_bits=n_bits))
    return model
