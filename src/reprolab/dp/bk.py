"""Book-keeping (BK) per-sample clipping for transformers: instantiation, ghost norm, mixed rule, GhostClip, BK.

Bu, Wang, Zha, Karypis 2022, "Differentially Private Optimization on Large Model at Small Cost"
(https://arxiv.org/abs/2210.00038); official code: fastDP (awslabs/fast-differential-privacy,
``supported_layers_grad_samplers.py``, clipping modes 'MixOpt', 'MixGhostClip', 'BK-MixOpt').

A layer with activation A_i (T, d) and output gradient B_i (T, p) (B_i = dL_i/dz_i, z = A W^T + b) has the
per-sample gradients  g_i(W) = B_i^T A_i  (p, d)  and  g_i(b) = B_i^T 1  (p,).  Its squared norm is either

* instantiated:  ||B_i^T A_i||_F^2                          (O(B T p d) time, B p d memory), or
* ghost norm:    <A_i A_i^T, B_i B_i^T>  (Goodfellow 2015; Li et al. 2021)  (O(B T^2 (p + d)) time, B T^2 memory),

and the mixed rule picks the ghost norm iff 2 T^2 <= p d (the paper's "layerwise decision"). Embedding layers
(one-hot A) use the ghost norm  sum_{t,s} [x_t = x_s] b_t . b_s;  LayerNorm / RMSNorm weights (elementwise, p = d)
are instantiated: g_i(gamma) = sum_t B_i[t] * x_hat_i[t].

Engines, all giving sum_i C_i g_i (C_i from Abadi or AUTO-S clipping):

* ``instantiate`` (opacus-style): per-sample gradients of every layer materialized, then clipped and summed;
* ``ghostclip`` (Li et al. 2021): ghost norms in a first backward, then a SECOND backward of sum_i C_i L_i;
* ``bk`` (BK-MixOpt): one backward to the layer outputs; norms by the mixed rule; the clipped gradient is assembled
  from the book-kept (A, B) as  A^T diag(C) B  (an einsum), with no second backward and no per-sample gradients;
* ``nonprivate``: the plain gradient of sum_i L_i (the cost reference).

Limitations (raised, not silently wrong): a layer applied twice per forward (including tied weights) and an
Embedding whose index tensor lacks the batch dimension (BERT's position embeddings) are unsupported: freeze them.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .clipping import clip_factors
from .per_sample import Grads

ENGINES = ("nonprivate", "instantiate", "ghostclip", "bk")
NORM_RULES = ("mixed", "ghost", "instantiate")


def layer_kind(mod: nn.Module) -> str | None:
    """'linear' | 'embedding' | 'layernorm' | 'rmsnorm' for the layers the engine handles, else None."""
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, nn.LayerNorm):
        return "layernorm"
    if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "weight"):
        return "rmsnorm"
    return None


def dp_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning trainable parameters; raises if one is unsupported or a parameter is shared (tied)."""
    out, owners = [], {}
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if layer_kind(mod) is None:
            raise NotImplementedError(f"layer {name!r} ({type(mod).__name__}) has trainable parameters; "
                                      f"supported: Linear, Embedding, LayerNorm, RMSNorm")
        for p in own:
            if id(p) in owners:
                raise NotImplementedError(f"parameter shared by {owners[id(p)]!r} and {name!r} (tied weights): "
                                          f"freeze it")
            owners[id(p)] = name
        out.append((name, mod))
    return out


def _activation(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What the per-sample gradient needs from the input: A (B, T, d), ids (B, T) or x_hat (B, T, d); None when
    only the bias trains."""
    kind = layer_kind(mod)
    if kind != "embedding" and (getattr(mod, "weight", None) is None or not mod.weight.requires_grad):
        return None  # bias only (BiTFiT): g_i(b) = B_i^T 1 needs no activation
    x = x.detach()
    if kind == "embedding":
        return x if x.dim() == 2 else x[:, None]  # (B, T)
    if x.dim() == 2:
        x = x[:, None]  # (B, 1, d)
    elif x.dim() > 3:
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d)
    if kind == "layernorm":
        return F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)  # x_hat (B, T, d)
    if kind == "rmsnorm":
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # x_hat (B, T, d)
    return x  # linear: A (B, T, d)


@contextlib.contextmanager
def record_layers(model: nn.Module):
    """Forward hooks storing, per DP layer, (module, activation, output); yields the dict they fill."""
    taps: dict[str, list] = {}
    handles = []
    for name, mod in dp_layers(model):
        def hook(m, inp, out, name=name):
            if name in taps:
                raise NotImplementedError(f"layer {name!r} is applied twice in one forward")
            x = inp[0] if inp else None
            taps[name] = [m, _activation(m, x), out]
        handles.append(mod.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def use_ghost(T: int, p: int, d: int, rule: str = "mixed") -> bool:
    """The paper's layerwise rule: ghost norm iff 2 T^2 <= p d (``rule`` may force either way)."""
    if rule == "mixed":
        return 2 * T * T <= p * d
    if rule in NORM_RULES:
        return rule == "ghost"
    raise ValueError(f"rule {rule!r}; allowed: {', '.join(NORM_RULES)}")


def _per_sample_param_grads(mod: nn.Module, a: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Instantiated per-sample gradients {param name: (B, *shape)} of one layer from (activation, output grad)."""
    kind, out = layer_kind(mod), {}
    if kind == "linear":
        if mod.weight.requires_grad:
            out["weight"] = torch.einsum("btp,btd->bpd", G, a)  # (B, p, d)
        if mod.bias is not None and mod.bias.requires_grad:
            out["bias"] = G.sum(dim=1)  # (B, p)
    elif kind == "embedding":
        Bn, V = a.shape[0], mod.num_embeddings
        gw = torch.zeros(Bn, V, G.shape[-1], dtype=G.dtype)  # (B, V, p)
        gw.scatter_add_(1, a[..., None].expand(-1, -1, G.shape[-1]), G)
        out["weight"] = gw
    else:  # layernorm / rmsnorm
        if mod.weight is not None and mod.weight.requires_grad:
            out["weight"] = (G * a).sum(dim=1)  # (B, d)
        if getattr(mod, "bias", None) is not None and mod.bias.requires_grad:
            out["bias"] = G.sum(dim=1)  # (B, d)
    return out


def layer_sq_norms(mod: nn.Module, a: torch.Tensor, G: torch.Tensor, rule: str = "mixed") -> tuple[torch.Tensor, int]:
    """sum over the layer's trainable parameters of ||g_i||^2: (B,), and the bytes of the temporaries it made."""
    kind = layer_kind(mod)
    sq, tmp = torch.zeros(G.shape[0], dtype=torch.float32), 0
    if kind == "linear" and mod.weight.requires_grad:
        T, p, d = G.shape[1], G.shape[2], a.shape[2]
        if use_ghost(T, p, d, rule):
            gram = (a @ a.transpose(1, 2)) * (G @ G.transpose(1, 2))  # (B, T, T)
            sq = sq + gram.sum(dim=(1, 2))
            tmp += 2 * gram.numel() * gram.element_size()
        else:
            gw = torch.einsum("btp,btd->bpd", G, a)  # (B, p, d)
            sq = sq + gw.pow(2).sum(dim=(1, 2))
            tmp += gw.numel() * gw.element_size()
        if mod.bias is not None and mod.bias.requires_grad:
            sq = sq + G.sum(dim=1).pow(2).sum(dim=1)
    elif kind == "linear":  # bias only
        sq = sq + G.sum(dim=1).pow(2).sum(dim=1)  # ||B_i^T 1||^2, O(B T p)
    elif kind == "embedding" and mod.weight.requires_grad:
        same = (a[:, :, None] == a[:, None, :]).to(G.dtype)  # (B, T, T): [x_t = x_s]
        gram = (G @ G.transpose(1, 2)) * same  # (B, T, T)
        sq = sq + gram.sum(dim=(1, 2))
        tmp += 2 * gram.numel() * gram.element_size()
    else:
        for g in _per_sample_param_grads(mod, a, G).values():  # (B, d): cheap, O(B T d)
            sq = sq + g.pow(2).sum(dim=1)
    return sq, tmp


def book_kept_sum(mod: nn.Module, a: torch.Tensor, G: torch.Tensor, C: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i C_i g_i of one layer from the book-kept (activation, output grad): A^T diag(C) B, no per-sample grads."""
    kind, out = layer_kind(mod), {}
    CG = C.to(G.dtype)[:, None, None] * G  # (B, T, p): diag(C) B
    if kind == "linear":
        if mod.weight.requires_grad:
            out["weight"] = CG.reshape(-1, CG.shape[-1]).T @ a.reshape(-1, a.shape[-1])  # (p, d)
        if mod.bias is not None and mod.bias.requires_grad:
            out["bias"] = CG.sum(dim=(0, 1))  # (p,)
    elif kind == "embedding":
        gw = torch.zeros_like(mod.weight)  # (V, p)
        gw.index_add_(0, a.reshape(-1), CG.reshape(-1, CG.shape[-1]))
        out["weight"] = gw
    else:
        if mod.weight is not None and mod.weight.requires_grad:
            out["weight"] = (CG * a).sum(dim=(0, 1))  # (d,)
        if getattr(mod, "bias", None) is not None and mod.bias.requires_grad:
            out["bias"] = CG.sum(dim=(0, 1))  # (d,)
    return out


def engine_clipped_sum(model: nn.Module, losses_fn: Callable[[nn.Module], torch.Tensor], engine: str = "bk", *,
                       clipping: str = "abadi", R: float = 1.0, gamma: float = 0.01, rule: str = "mixed",
                       ) -> tuple[Grads, torch.Tensor, dict]:
    """sum_i C_i g_i over the batch by one engine; ``losses_fn(model) -> (B,)`` runs the forward on the batch.

    Returns ({param name: shape}, per-sample norms (B,) (empty for ``nonprivate``), stats) where stats holds
    ``extra_bytes``: bytes the engine stores beyond non-private training, an analytic memory count:

    * ``bk`` and ``instantiate`` keep every layer's output gradient B (and, for LayerNorm / RMSNorm, the normalized
      input x_hat, a new tensor) until the clipped sum is assembled, plus the largest one-layer temporary (Gram
      matrices or one layer's instantiated gradient; ``bk``) or the per-sample gradients of all layers (``instantiate``);
    * ``ghostclip`` (Li et al. 2021) computes each layer's norm during the first backward and discards its B: it needs
      one layer's B, x_hat and temporary at a time (the largest such sum), then a second backward. (This
      implementation computes the norms after the backward, for simplicity; its analytic count is the per-layer one.)
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}; allowed: {', '.join(ENGINES)}")
    names = {id(p): n for n, p in model.named_parameters()}
    if engine == "nonprivate":
        losses = losses_fn(model)  # (B,)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(losses.sum(), params)
        return {names[id(p)]: g for p, g in zip(params, grads)}, torch.empty(0), {"extra_bytes": 0}
    with record_layers(model) as taps:
        losses = losses_fn(model)  # (B,)
    order = list(taps)
    outs = [taps[n][2] for n in order]
    Gs = torch.autograd.grad(losses.sum(), outs, retain_graph=engine == "ghostclip")  # one backward, each (B, ..., p)
    extra = 0
    layers = []
    kept: dict[str, int] = {}  # per layer: bytes of its book-kept B (or sum_t B) and of a new activation (x_hat)
    for n, G in zip(order, Gs):
        mod, a = taps[n][0], taps[n][1]
        G = G.reshape(G.shape[0], -1, G.shape[-1]) if G.dim() != 3 else G  # (B, T, p)
        if G.shape[0] != losses.shape[0]:
            raise NotImplementedError(f"layer {n!r}: output batch {G.shape[0]} != {losses.shape[0]} (broadcast "
                                      f"input such as position embeddings): freeze it")
        if a is None:  # bias only: book-keep sum_t B_i[t] (B, 1, p), not B_i
            G = G.sum(dim=1, keepdim=True)
        kept[n] = G.numel() * G.element_size()
        if a is not None and layer_kind(mod) in ("layernorm", "rmsnorm"):  # x_hat: a new tensor, not a saved one
            kept[n] += a.numel() * a.element_size()
        layers.append((n, mod, a, G))
    sq, peak_tmp, peak_layer = torch.zeros(losses.shape[0]), 0, 0
    psg: dict[str, torch.Tensor] = {}
    for n, mod, a, G in layers:
        if engine == "instantiate":
            for pn, g in _per_sample_param_grads(mod, a, G).items():  # kept until the sum: opacus's storage
                psg[f"{n}.{pn}" if n else pn] = g
                sq = sq + g.reshape(g.shape[0], -1).pow(2).sum(dim=1)
                extra += g.numel() * g.element_size()
        else:
            s, tmp = layer_sq_norms(mod, a, G, "ghost" if engine == "ghostclip" else rule)
            sq, peak_tmp = sq + s, max(peak_tmp, tmp)  # temporaries live one layer at a time
            peak_layer = max(peak_layer, kept[n] + tmp)
    if engine == "ghostclip":
        extra += peak_layer  # one layer's B, x_hat and temporary at a time
    else:
        extra += sum(kept.values()) + peak_tmp  # every layer's B (and x_hat) kept until the clipped sum
    norms = sq.sqrt()  # (B,)
    C = clip_factors(norms, clipping, R=R, gamma=gamma)  # (B,)
    summed: Grads = {}
    if engine == "instantiate":
        summed = {k: torch.einsum("b,b...->...", C.to(g.dtype), g) for k, g in psg.items()}
    elif engine == "ghostclip":  # second backward of sum_i C_i L_i
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((C.detach() * losses).sum(), params)
        summed = {names[id(p)]: g for p, g in zip(params, grads)}
    else:  # bk: A^T diag(C) B from the book-kept factors
        for n, mod, a, G in layers:
            for pn, g in book_kept_sum(mod, a, G, C).items():
                summed[f"{n}.{pn}" if n else pn] = g
    return summed, norms.detach(), {"extra_bytes": int(extra)}


def naive_clipped_sum(model: nn.Module, losses_fn: Callable[[nn.Module, slice], torch.Tensor], batch_size: int, *,
                      clipping: str = "abadi", R: float = 1.0, gamma: float = 0.01) -> tuple[Grads, torch.Tensor]:
    """Reference: one backward per example i (``losses_fn(model, slice(i, i+1))``), clip, sum."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(batch_size):
        g = torch.autograd.grad(losses_fn(model, slice(i, i + 1)).sum(), list(params.values()))
        norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
        C = clip_factors(norm[None], clipping, R=R, gamma=gamma)[0]
        for n, x in zip(params, g):
            total[n] += C * x
        norms.append(norm)
    return total, torch.stack(norms)


def opacus_clipped_sum(model: nn.Module, losses_fn: Callable[[nn.Module], torch.Tensor], *, clipping: str = "abadi",
                       R: float = 1.0, gamma: float = 0.01) -> tuple[Grads, torch.Tensor, dict]:
    """opacus's per-sample gradients (GradSampleModule hooks; functorch for layers it lacks, e.g. RMSNorm),
    clipped with the same factors and summed. ``model`` is wrapped in place and unwrapped after."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    layers = [m for _, m in dp_layers(model)]
    was = [m.training for m in layers]
    for m in layers:  # opacus hooks fire only in training mode; dropout elsewhere stays as the caller set it
        m.training = True
    try:
        losses = losses_fn(gsm)  # (B,)
        losses.sum().backward()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        psg = {n: p.grad_sample for n, p in params.items()}  # (B, *shape)
        norms = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in psg.values()], 1).sum(1).sqrt()
        C = clip_factors(norms, clipping, R=R, gamma=gamma)
        summed = {n: torch.einsum("b,b...->...", C, g) for n, g in psg.items()}
        extra = sum(g.numel() * g.element_size() for g in psg.values())
    finally:
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        gsm._close()
        for m, t in zip(layers, was):
            m.training = t
    return summed, norms.detach(), {"extra_bytes": int(extra)}


def causal_lm_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token loss L_i = mean_t CE(logits_i[t], ids_i[t+1]) of a causal LM: (B, T) -> (B,)."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(ids.shape[0], -1).mean(dim=1)  # (B,)


def relative_error(a: Grads, b: Grads) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / max(den, 1e-30)) ** 0.5
