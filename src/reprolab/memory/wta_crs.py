"""Winner-Take-All Column-Row Sampling: memory-efficient backprop for linear layers.

Liu, Wang, Yuan, Zhong, Chen, Hu, Wang, Hu. "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of
Language Model", NeurIPS 2023. https://arxiv.org/abs/2305.15265 (official code: github.com/zirui-ray-liu/WTACRS,
``seq2seq/approxlinear/functional.py``, whose estimator this file follows).

A linear layer Y = X W^T + b with N = batch x tokens rows needs, for its weight gradient,

    grad_W = dY^T X = sum_i  g_i^T x_i            (g_i = dY[i], x_i = X[i]; a sum of N outer products)

so the forward normally keeps all of X. Column-row sampling keeps only k << N of the N pairs:

* probabilities  p_i  proportional to  ||x_i|| * ||g_i||   (||g_i|| is not known in the forward: the official code
  reuses the norm seen the last time the same example went through the layer, and uses ||x_i|| alone before that);
* CRS (Adelman et al. 2021): draw k indices i.i.d. from p, estimate  sum_t g_{i_t}^T x_{i_t} / (k p_{i_t});
* WTA-CRS: keep the |C| most probable pairs exactly ("winners"), then draw s = k - |C| indices i.i.d. from the
  residual distribution p_j / (1 - P_C) over j not in C, each weighted (1 - P_C) / (s p_j). |C| minimises
  (1 - P_C) / (k - |C|) (the variance bound of the paper's Theorem 2); winners are used only if that beats CRS's 1/k.

Both estimators are unbiased. The forward stores only the k sampled rows of X (pre-multiplied by their weights) and
their indices: that is the activation-memory saving. The input gradient dX = dY W stays exact.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLERS = ("wta_crs", "crs", "topk")


# ---------------------------------------------------------------------------------------------------------------
# Estimators on explicit (X, dY) pairs
# ---------------------------------------------------------------------------------------------------------------
def column_row_probs(x_norm: torch.Tensor, g_norm: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """p_i proportional to ||x_i|| ||g_i|| (or ||x_i|| alone when no gradient norm is known), smoothed by eps."""
    score = x_norm if g_norm is None or float(g_norm.sum()) == 0.0 else x_norm * g_norm  # (N,)
    score = score.double() + eps
    return score / score.sum()  # (N,) sums to 1 exactly (float64)


def deterministic_size(p: torch.Tensor, k: int) -> int:
    """|C| of WTA-CRS: argmin over c in [1, k-1] of (1 - P_c) / (k - c), used only if it beats CRS's 1/k."""
    if k <= 1:
        return 0
    top = torch.topk(p, k).values  # (k,) sorted descending
    P_c = torch.cumsum(top, 0)[: k - 1]  # (k-1,) mass of the c most probable pairs, c = 1..k-1
    c = torch.arange(1, k, dtype=p.dtype, device=p.device)
    score = (1.0 - P_c).clamp_min(0.0) / (k - c)  # (k-1,)
    best = int(torch.argmin(score))
    return best + 1 if float(score[best]) <= 1.0 / k else 0


def sample_pairs(p: torch.Tensor, k: int, sampler: str = "wta_crs",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (k,) and weights (k,) such that  sum_t w_t g_{i_t}^T x_{i_t}  estimates  sum_i g_i^T x_i.

    ``wta_crs`` and ``crs`` are unbiased; ``topk`` (keep the k most probable pairs, weight 1) is the biased
    deterministic ablation.
    """
    N = p.numel()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if k >= N:
        return torch.arange(N, device=p.device), torch.ones(N, dtype=p.dtype, device=p.device)
    if sampler == "topk":
        return torch.topk(p, k).indices, torch.ones(k, dtype=p.dtype, device=p.device)
    if sampler == "crs":
        idx = torch.multinomial(p, k, replacement=True, generator=generator)  # (k,)
        return idx, 1.0 / (k * p[idx])
    c = deterministic_size(p, k)
    if c == 0:
        return sample_pairs(p, k, "crs", generator)
    winners = torch.topk(p, c).indices  # (c,)
    residual = p.clone()
    residual[winners] = 0.0
    P_C = 1.0 - float(residual.sum())
    s = k - c
    drawn = torch.multinomial(residual, s, replacement=True, generator=generator)  # (s,)
    w_drawn = (1.0 - P_C) / (s * p[drawn])  # (s,)
    return torch.cat([winners, drawn]), torch.cat([torch.ones(c, dtype=p.dtype, device=p.device), w_drawn])


def estimate_weight_grad(x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w_t g_{i_t}^T x_{i_t}: x (N, d_in), g (N, d_out) -> (d_out, d_in)."""
    return (g[idx] * w.to(g.dtype)[:, None]).T @ x[idx]  # (d_out, d_in)


def crs_variance(x: torch.Tensor, g: torch.Tensor, p: torch.Tensor, k: int) -> float:
    """E||G_hat - G||_F^2 of CRS with k i.i.d. draws from p (closed form)."""
    x, g, p = x.double(), g.double(), p.double()
    a = x.pow(2).sum(1) * g.pow(2).sum(1)  # (N,) ||x_i||^2 ||g_i||^2 = ||g_i^T x_i||_F^2
    G = g.T @ x  # (d_out, d_in)
    return float(((a / p).sum() - G.pow(2).sum()) / k)


def wta_crs_variance(x: torch.Tensor, g: torch.Tensor, p: torch.Tensor, k: int) -> float:
    """E||G_hat - G||_F^2 of WTA-CRS with budget k (closed form; the winners C contribute no variance)."""
    N = p.numel()
    if k >= N:
        return 0.0
    c = deterministic_size(p, k)
    if c == 0:
        return crs_variance(x, g, p, k)
    x, g, p = x.double(), g.double(), p.double()
    rest = torch.ones(N, dtype=torch.bool, device=p.device)
    rest[torch.topk(p, c).indices] = False
    P_rest = p[rest].sum()  # 1 - P_C
    a = x[rest].pow(2).sum(1) * g[rest].pow(2).sum(1)  # (N-c,)
    G_rest = g[rest].T @ x[rest]  # (d_out, d_in)
    return float((P_rest * (a / p[rest]).sum() - G_rest.pow(2).sum()) / (k - c))


def empirical_variance(x: torch.Tensor, g: torch.Tensor, p: torch.Tensor, k: int, sampler: str, draws: int,
                       generator: torch.Generator | None = None) -> tuple[float, torch.Tensor]:
    """Monte-Carlo E||G_hat - G||_F^2 over ``draws`` samples, and the mean estimate (d_out, d_in)."""
    x, g = x.double(), g.double()
    G = g.T @ x
    total, mean = 0.0, torch.zeros_like(G)
    for _ in range(draws):
        idx, w = sample_pairs(p, k, sampler, generator)
        est = estimate_weight_grad(x, g, idx, w)
        total += float((est - G).pow(2).sum())
        mean += est / draws
    return total / draws, mean


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------
class GradNormCache:
    """Per-example, per-token ||dY_i|| of every approximated layer, remembered from the last time the example was
    seen (as the official code's ``Scheme`` does). Set ``batch_ids`` (B,) before each training forward; inputs
    must then have a fixed shape (B, L, d). With ``batch_ids`` None, layers sample with ||x_i|| alone."""

    def __init__(self, num_examples: int, seq_len: int):
        self.num_examples, self.seq_len = num_examples, seq_len
        self.batch_ids: torch.Tensor | None = None
        self.store: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        if self.batch_ids is None or key not in self.store:
            return None
        return self.store[key][self.batch_ids].reshape(-1)  # (B*L,)

    def put(self, key: str, g_norm: torch.Tensor) -> None:
        if self.batch_ids is None:
            return
        if key not in self.store:
            self.store[key] = torch.zeros(self.num_examples, self.seq_len)
        self.store[key][self.batch_ids] = g_norm.reshape(len(self.batch_ids), -1).float()


class _SampledLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        out = F.linear(x, weight, bias)
        d_in = x.shape[-1]
        X = x.detach().reshape(-1, d_in)  # (N, d_in)
        N = X.shape[0]
        k = min(N, max(layer.min_k, int(N * layer.keep_ratio)))
        g_norm = layer.cache.get(layer.cache_key) if layer.cache is not None else None
        p = column_row_probs(X.norm(dim=1), g_norm)  # (N,)
        idx, w = sample_pairs(p, k, layer.sampler, layer.generator)
        X_kept = X[idx] * w.to(X.dtype)[:, None]  # (k, d_in) sampled rows, pre-weighted
        ctx.save_for_backward(X_kept, idx, weight)
        ctx.has_bias, ctx.layer = bias is not None, layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        X_kept, idx, weight = ctx.saved_tensors
        G = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        grad_x = grad_out @ weight  # exact input gradient
        grad_w = G[idx].T @ X_kept  # (d_out, d_in) unbiased estimate of G^T X
        grad_b = G.sum(0) if ctx.has_bias else None
        layer = ctx.layer
        if layer.cache is not None:
            layer.cache.put(layer.cache_key, G.norm(dim=1))
        return grad_x, grad_w, grad_b, None


class WTACRSLinear(nn.Linear):
    """nn.Linear whose training forward saves only k = keep_ratio * N sampled rows of its input (WTA-CRS, CRS or
    biased top-k); evaluation and frozen weights use the plain layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, keep_ratio: float = 0.3,
                 sampler: str = "wta_crs", min_k: int = 1, cache: GradNormCache | None = None, cache_key: str = "",
                 generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        self.keep_ratio, self.sampler, self.min_k = keep_ratio, sampler, min_k
        self.cache, self.cache_key, self.generator = cache, cache_key, generator

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "WTACRSLinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, **kw)
        new.weight, new.bias = lin.weight, lin.bias
        return new

    def forward(self, x):
        if self.training and self.weight.requires_grad and torch.is_grad_enabled():
            return _SampledLinearFn.apply(x, self.weight, self.bias, self)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, keep_ratio={self.keep_ratio}, sampler={self.sampler}"


def apply_wta_crs(model: nn.Module, keep_ratio: float, sampler: str = "wta_crs", scope: str = "encoder.layer",
                  cache: GradNormCache | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Replace every nn.Linear whose qualified name contains ``scope`` by a WTACRSLinear sharing its parameters;
    return the replaced names (the official code approximates the transformer blocks' linear layers)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and scope in n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        setattr(parent, child, WTACRSLinear.from_linear(lin, keep_ratio=keep_ratio, sampler=sampler, cache=cache,
                                                        cache_key=name, generator=generator))
    return names


def capture_linear_io(model: nn.Module, run_backward, scope: str = "encoder.layer") -> dict[str, tuple]:
    """Run ``run_backward()`` (a forward + backward) and return, for each nn.Linear under ``scope``, its input rows
    X (N, d_in) and output-gradient rows dY (N, d_out): the real pairs whose outer products form grad_W."""
    store: dict[str, list] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and scope in name:
            def fwd(m, args, out, name=name):
                store.setdefault(name, [None, None])[0] = args[0].detach().reshape(-1, args[0].shape[-1])

            def bwd(m, gin, gout, name=name):
                store[name][1] = gout[0].detach().reshape(-1, gout[0].shape[-1])
            handles += [mod.register_forward_hook(fwd), mod.register_full_backward_hook(bwd)]
    try:
        run_backward()
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1]) for k, v in store.items() if v[1] is not None}


# ---------------------------------------------------------------------------------------------------------------
# Experiment helpers (used by notebooks/wta_crs.ipynb)
# ---------------------------------------------------------------------------------------------------------------
def variance_by_layer(io: dict[str, tuple], keep_ratios) -> dict[str, dict[str, list[float]]]:
    """Closed-form E||G_hat - G||^2 of CRS and WTA-CRS per layer and keep ratio, with the oracle probabilities
    p_i proportional to ||x_i|| ||g_i|| of the captured pairs; also ||G||^2 for scale."""
    out = {}
    for name, (x, g) in io.items():
        p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
        N = x.shape[0]
        ks = [max(1, int(N * r)) for r in keep_ratios]
        out[name] = {"crs": [crs_variance(x, g, p, k) for k in ks],
                     "wta_crs": [wta_crs_variance(x, g, p, k) for k in ks],
                     "winners": [deterministic_size(p, k) for k in ks],
                     "grad_sq_norm": float((g.double().T @ x.double()).pow(2).sum())}
    return out


def layer_pass_fraction(ratios, nonzero_rows, k: int, threshold: float) -> tuple[float, int]:
    """(fraction of layers whose WTA-CRS / CRS variance ratio is <= ``threshold``, number of trivial layers) at one probe.

    A layer whose output gradient has at most ``k`` non-zero rows is trivial: every pair with non-zero probability is a
    winner, so WTA-CRS has zero variance whatever the norms (in BERT's last block the pooler reads only the [CLS] rows).
    Trivial layers are left out of the denominator; with no non-trivial layer the fraction is 0.
    """
    r = np.asarray(ratios, dtype=float)  # (layers,)
    nontrivial = np.asarray(nonzero_rows) > k  # (layers,)
    frac = float((r[nontrivial] <= threshold).mean()) if nontrivial.any() else 0.0
    return frac, int((~nontrivial).sum())


def finetune_classifier(model: nn.Module, train: dict, test: dict, *, epochs: int, batch_size: int, lr: float,
                        seed: int, cache: GradNormCache | None = None, probe=None, probe_steps=(),
                        progress=None) -> dict:
    """AdamW fine-tuning of a sequence classifier on ``train`` (input_ids, attention_mask, labels), shuffled with
    ``seed``; ``probe(model)`` is called (weights untouched, grads cleared after) before the steps in
    ``probe_steps`` (-1 = after the last step). Returns the per-step training loss and the test accuracy."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(train["labels"])
    steps = epochs * (n // batch_size)
    losses, step = [], 0
    bar = progress(total=steps) if progress else None
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            if probe is not None and step in probe_steps:
                probe(model)
                opt.zero_grad(set_to_none=True)
            ids = perm[i:i + batch_size]  # (B,) example ids, also the keys of the gradient-norm cache
            if cache is not None:
                cache.batch_ids = ids
            model.train()
            out = model(input_ids=train["input_ids"][ids], attention_mask=train["attention_mask"][ids],
                        labels=train["labels"][ids])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
            step += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if probe is not None and -1 in probe_steps:
        probe(model)
        opt.zero_grad(set_to_none=True)
    if cache is not None:
        cache.batch_ids = None
    return {"losses": losses, "accuracy": accuracy(model, test)}


@torch.no_grad()
def accuracy(model: nn.Module, data: dict, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data["labels"]), batch_size):
        logits = model(input_ids=data["input_ids"][i:i + batch_size],
                       attention_mask=data["attention_mask"][i:i + batch_size]).logits  # (b, classes)
        correct += int((logits.argmax(-1) == data["labels"][i:i + batch_size]).sum())
    return correct / len(data["labels"])
