"""COAT: FP8 optimizer states with Dynamic Range Expansion, and mixed-granularity FP8 activations.

Xi, Cai, Li, Han, Keutzer, Mao. "COAT: Compressing Optimizer states and Activation for Memory-Efficient FP8
Training", ICLR 2025. https://arxiv.org/abs/2410.19313 (official code: NVlabs/COAT).

* :class:`FP8AdamW`: AdamW whose first and second moments m, v live in E4M3 between steps, one float32 scale per
  group of ``qgroup_size`` (128) consecutive elements, and with ``expansion=True`` the per-group exponent k and
  sqrt(max min) of Dynamic Range Expansion (``reprolab.quant.fp8.quantize_dre``). Each step dequantizes, does the
  AdamW update in float32, and quantizes again (as the official fused CUDA kernel does).
* Mixed-granularity activations: inputs of linear layers are stored (and used by the simulated FP8 GEMM) as E4M3 with
  one per-tensor scale; inputs of the non-linear layers (RMSNorm, SwiGLU) with per-group scales (``group_size``
  consecutive elements along the hidden dimension). Backward dequantizes what was stored.

On a CPU none of this is faster: FP8 GEMMs need FP8 tensor cores (H100/H200). Here the FP8 arithmetic is simulated
(quantize then compute in float32) while the stored tensors really are 1-byte E4M3, so the bytes are exact.
"""
from __future__ import annotations

import math
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fp8 import (dequantize_dre, dequantize_per_group, dequantize_per_tensor, quantize_dre,
                         quantize_per_group, quantize_per_tensor)


# ---------------------------------------------------------------------------------------------------------------
# FP8 optimizer states
# ---------------------------------------------------------------------------------------------------------------
class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction as torch.optim.AdamW) with E4M3 moments."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 qgroup_size: int = 128, expansion: bool = True, expand_min: int = 16):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.qgroup_size, self.expansion, self.expand_min = qgroup_size, expansion, expand_min

    def _store(self, state: dict, name: str, x: torch.Tensor) -> None:
        if self.expansion:
            for key, val in quantize_dre(x, self.qgroup_size, self.expand_min).items():
                state[f"{name}_{key}"] = val
        else:
            state[f"{name}_q"], state[f"{name}_scale"] = quantize_per_group(x, self.qgroup_size)

    def _load(self, state: dict, name: str, shape) -> torch.Tensor:
        if self.expansion:
            parts = {key: state[f"{name}_{key}"] for key in ("q", "scale", "k", "sqrt_minmax")}
            return dequantize_dre(parts, shape, self.qgroup_size)
        return dequantize_per_group(state[f"{name}_q"], state[f"{name}_scale"], shape, self.qgroup_size)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    m, v = torch.zeros_like(g), torch.zeros_like(g)
                else:
                    m, v = self._load(state, "exp_avg", p.shape), self._load(state, "exp_avg_sq", p.shape)
                state["step"] += 1
                t = float(state["step"])
                m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                self._store(state, "exp_avg", m)
                self._store(state, "exp_avg_sq", v)
        return loss


def fp8_state_bytes(numel: int, qgroup_size: int = 128, expansion: bool = True) -> int:
    """Exact bytes FP8AdamW keeps for one parameter of ``numel`` elements: two E4M3 moments, per group a float32
    scale (plus k and sqrt(max min) with expansion), and the float32 step counter."""
    groups = -(-numel // qgroup_size)
    per_moment = numel + groups * 4 * (3 if expansion else 1)
    return 2 * per_moment + 4


def fake_quantized_state(state: dict, qgroup_size: int = 128, expansion: bool = True) -> None:
    """Replace a torch.optim.AdamW state's exp_avg / exp_avg_sq by their FP8 round trip (the reference that
    :class:`FP8AdamW` must match)."""
    from ..quant.fp8 import fake_quantize

    for name in ("exp_avg", "exp_avg_sq"):
        state[name].copy_(fake_quantize(state[name], "dre" if expansion else "group", qgroup_size))


# ---------------------------------------------------------------------------------------------------------------
# FP8 activations
# ---------------------------------------------------------------------------------------------------------------
class _TensorQuantCache:
    """Per-tensor E4M3 copy of the last linear input, reused while the same tensor feeds the next linear layers
    (q/k/v share their input, as do gate/up): the quantized activation is stored once, as in COAT's fused kernels."""

    def __init__(self):
        self.ref, self.version, self.value = None, None, None

    def get(self, x: torch.Tensor):
        if self.ref is not None and self.ref() is x and self.version == x._version:
            return self.value
        self.value = quantize_per_tensor(x)
        self.ref, self.version = weakref.ref(x), x._version
        return self.value


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache):
        x_q, x_s = cache.get(x)  # E4M3 with x's shape, per-tensor scale
        w_q, w_s = quantize_per_tensor(weight)
        out = F.linear(dequantize_per_tensor(x_q, x_s), dequantize_per_tensor(w_q, w_s), bias)  # simulated FP8 GEMM
        ctx.save_for_backward(x_q, x_s, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_q, x_s, weight = ctx.saved_tensors
        w_q, w_s = quantize_per_tensor(weight)
        G = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        X = dequantize_per_tensor(x_q, x_s).reshape(-1, x_q.shape[-1])  # (N, d_in)
        grad_x = grad_out @ dequantize_per_tensor(w_q, w_s)
        grad_w = G.T @ X  # (d_out, d_in)
        return grad_x, grad_w, (G.sum(0) if ctx.has_bias else None), None


class FP8Linear(nn.Linear):
    """nn.Linear computing with E4M3 per-tensor input and weight, storing only the E4M3 input for backward."""

    def __init__(self, in_features, out_features, bias=True, cache: _TensorQuantCache | None = None):
        super().__init__(in_features, out_features, bias)
        self.cache = cache or _TensorQuantCache()

    @classmethod
    def from_linear(cls, lin: nn.Linear, cache=None) -> "FP8Linear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, cache)
        new.weight, new.bias = lin.weight, lin.bias
        return new

    def forward(self, x):
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.cache)


def _group_fake(x: torch.Tensor, group_size: int):
    q, s = quantize_per_group(x, group_size)
    return q, s, dequantize_per_group(q, s, x.shape, group_size, x.dtype)


class _FP8RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, group_size):
        q, s, xh = _group_fake(x, group_size)
        ctx.save_for_backward(q, s, weight)
        ctx.shape, ctx.eps, ctx.group_size = x.shape, eps, group_size
        return _rms_norm(xh, weight, eps)

    @staticmethod
    def backward(ctx, grad_out):
        q, s, weight = ctx.saved_tensors
        with torch.enable_grad():
            xh = dequantize_per_group(q, s, ctx.shape, ctx.group_size).requires_grad_()
            w = weight.detach().requires_grad_()
            gx, gw = torch.autograd.grad(_rms_norm(xh, w, ctx.eps), (xh, w), grad_out)
        return gx, gw, None, None


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class FP8RMSNorm(nn.Module):
    """RMSNorm whose input is stored per-group E4M3 (COAT's non-linear-layer granularity)."""

    def __init__(self, norm: nn.Module, group_size: int):
        super().__init__()
        self.weight, self.variance_epsilon, self.group_size = norm.weight, norm.variance_epsilon, group_size

    def forward(self, x):
        return _FP8RMSNormFn.apply(x, self.weight, self.variance_epsilon, self.group_size)


class _FP8SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, group_size):
        qg, sg, gh = _group_fake(gate, group_size)
        qu, su, uh = _group_fake(up, group_size)
        ctx.save_for_backward(qg, sg, qu, su)
        ctx.shape, ctx.group_size = gate.shape, group_size
        return F.silu(gh) * uh

    @staticmethod
    def backward(ctx, grad_out):
        qg, sg, qu, su = ctx.saved_tensors
        gh = dequantize_per_group(qg, sg, ctx.shape, ctx.group_size)
        uh = dequantize_per_group(qu, su, ctx.shape, ctx.group_size)
        sig = torch.sigmoid(gh)
        silu = gh * sig
        d_silu = sig * (1 + gh * (1 - sig))
        return grad_out * uh * d_silu, grad_out * silu, None


def _fp8_mlp_forward(self, x):
    return self.down_proj(_FP8SwiGLUFn.apply(self.gate_proj(x), self.up_proj(x), self.fp8_group_size))


def apply_coat_activations(model: nn.Module, group_size: int = 16) -> int:
    """Make every decoder layer of a Hugging Face Llama store FP8 activations: linear layers per-tensor E4M3
    (FP8Linear), RMSNorm and the SwiGLU product per-group E4M3. Embedding, final norm, attention core and lm_head
    stay in float32. Returns the number of replaced linear layers."""
    n = 0
    for layer in model.model.layers:
        cache = _TensorQuantCache()  # one per decoder layer: q/k/v share an input, so do gate/up
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, FP8Linear.from_linear(child, cache))
                    n += 1
        layer.input_layernorm = FP8RMSNorm(layer.input_layernorm, group_size)
        layer.post_attention_layernorm = FP8RMSNorm(layer.post_attention_layernorm, group_size)
        layer.mlp.fp8_group_size = group_size
        layer.mlp.forward = types.MethodType(_fp8_mlp_forward, layer.mlp)
    return n


# ---------------------------------------------------------------------------------------------------------------
# Experiment helpers (used by notebooks/coat_fp8.ipynb)
# ---------------------------------------------------------------------------------------------------------------
def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int, max_len: int, seed: int):
    """A small LlamaForCausalLM built from a transformers config, initialised with ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of (B, T+1) windows."""
    logits = model(input_ids=windows[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    tot = 0.0
    for i in range(0, len(windows), batch_size):
        tot += float(lm_loss(model, windows[i:i + batch_size])) * len(windows[i:i + batch_size])
    model.train()
    return tot / len(windows)


def train_lm(model, optimizer, batches, eval_windows, eval_every: int, progress=None) -> dict:
    """Train on an iterable of (B, T+1) windows; returns per-step training losses and (step, eval loss) pairs."""
    model.train()
    losses, evals = [], []
    for step, win in enumerate(progress(batches) if progress else batches, start=1):
        loss = lm_loss(model, win)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss)
        if not math.isfinite(loss):
            losses.append(float("nan"))
            break
        losses.append(loss)
        if step % eval_every == 0:
            evals.append((step, eval_loss(model, eval_windows)))
    return {"losses": losses, "evals": evals}


def relative_errors(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Errors of a quantized copy y of x: mean squared per-element relative error over x != 0, the normalised
    MSE sum (y-x)^2 / sum x^2, and the fraction of non-zero elements flushed to zero."""
    nz = x != 0
    rel = ((y[nz] - x[nz]) / x[nz]).double()
    return {"relative_mse": float(rel.pow(2).mean()),
            "normalised_mse": float((y - x).double().pow(2).sum() / x.double().pow(2).sum()),
            "flushed_to_zero": float((y[nz] == 0).double().mean())}
