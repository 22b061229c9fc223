"""LLM-QFA: a once-for-all quantization-aware supernet with decoupled QA-LoRA and a resource-balancing scheduler.

One QuantLLM for ALL: Fine-tuning Quantized LLMs Once for Efficient Deployments (Yi, Xu, Chang, Tang, Meng, Zhang
and Li, 2024), https://arxiv.org/abs/2405.20202. No official LLM-QFA code was found (searched the code, issue and
page corpora for "LLM-QFA", "One QuantLLM for ALL", 2405.20202); the adapter follows the official QA-LoRA code the
paper builds on (yuhuixu1993/qa-lora, ``peft_utils.py`` and ``merge.py``):

* every quantized linear layer l holds a frozen fake-quantized weight ``W_q^(b)`` per bit width b in ``bits``
  (round-to-nearest on GPTQ's asymmetric min-max grid with groups of ``group_size`` input columns,
  :func:`reprolab.lm.compress.rtn_quantize`; the paper quantizes with GPTQ);
* QA-LoRA adapter: ``y = W_q x + s * B A pool(x)`` with ``pool`` the mean over each group of ``group_size`` input
  features (``torch.nn.AvgPool1d(group_size)``, peft_utils.py:54,84), ``A`` (r, in/g) Xavier-uniform, ``B`` (out, r)
  zero (peft_utils.py:57-59), ``s = alpha / r``; so the adapter merges into the zero points of every group
  (merge.py) and the merged model stays quantized;
* **decoupled** weights (the paper's answer to weight-sharing interference): one adapter per (layer, bit width); a
  configuration (one bit width per layer) activates, in each layer, the adapter of its bit width. The ablation
  ``shared=True`` keeps one adapter per layer for all bit widths, everything else identical;
* **resource-balanced sampling**: uniform sampling of per-layer bit widths concentrates the average bit width at
  the middle (a sum of independent draws), so the extreme configurations are rarely trained. The non-parametric
  scheduler moves a target average bit width ``mu_t`` across [min(bits), max(bits)] with a triangle wave, and draws
  each layer's bit width from a Gaussian kernel centred on it, ``p_t(b) ~ exp(-(b - mu_t)^2 / (2 sigma^2))``,
  i.e. a mixture of Gaussians over time whose means cover the resource range evenly. The exact shape of the paper's
  schedule could not be checked against code (none released); see the registry's deviations.

Compute shortcut (exact): only the top ``n_top`` decoder blocks are quantized and adapted; the lower blocks stay
fp32 and frozen, so their output hidden states are computed once (:func:`cache_hidden`) and the top blocks run on
them (:func:`top_model`, fed ``inputs_embeds``). A test checks the logits equal the full model's.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..lm.compress import rtn_quantize
from ..lm.offsite import _set_blocks, decoder_block_list

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------- the supernet layer
class QFALinear(nn.Module):
    """A frozen linear layer with one fake-quantized weight and one QA-LoRA adapter per bit width.

    ``self.bit``: the active bit width (``None`` = the fp32 weight, no adapter). ``self.use_lora``: False evaluates
    the quantized weight alone.
    """

    def __init__(self, linear: nn.Linear, bits=(2, 3, 4), group_size: int = 32, r: int = 8, alpha: float = 2.0,
                 shared: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if in_f % group_size:
            raise ValueError(f"in_features={in_f} is not a multiple of group_size={group_size}")
        self.bits, self.group_size, self.r, self.scaling, self.shared = tuple(bits), group_size, r, alpha / r, shared
        self.register_buffer("weight", linear.weight.detach().clone(), persistent=False)  # (out, in) fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        for b in self.bits:
            self.register_buffer(f"wq{b}", rtn_quantize(linear.weight.detach(), b, group_size), persistent=False)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for i in range(len(self.bits)):  # one draw per bit width even when shared: the arms differ only by sharing
            a = torch.empty(r, in_f // group_size)  # (r, in/g)
            bound = math.sqrt(6.0 / (r + in_f // group_size))  # xavier_uniform_ (peft_utils.py:58), seeded draw
            a.uniform_(-bound, bound, generator=generator)
            if shared and i > 0:
                continue  # the shared adapter is the decoupled arm's first (lowest-bit) one
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(out_f, r)))  # (out, r): zero, so training starts at W_q
        self.bit: int | None = None
        self.use_lora = True

    def adapter_index(self, bit: int) -> int:
        """Which adapter a bit width uses: its own (decoupled) or the single shared one."""
        return 0 if self.shared else self.bits.index(bit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.bit is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, getattr(self, f"wq{self.bit}"), self.bias)  # (..., out)
        if self.use_lora:
            i = self.adapter_index(self.bit)
            xp = x.reshape(*x.shape[:-1], -1, self.group_size).mean(-1)  # (..., in/g): QA-LoRA's AvgPool1d
            y = y + (xp @ self.lora_A[i].T @ self.lora_B[i].T) * self.scaling
        return y

    @torch.no_grad()
    def merged_weight(self, bit: int) -> torch.Tensor:
        """The deployed weight at ``bit``: the adapter folded into each group's zero point (QA-LoRA merge.py).

        ``s * B A pool(x) = sum_groups (s * B A / g)[:, group] * sum(x_group)``: a per-(row, group) constant added to
        every weight of the group, i.e. a shift of the group's zero point; the grid stays ``2^b`` levels.
        """
        i = self.adapter_index(bit)
        delta = (self.lora_B[i] @ self.lora_A[i]) * self.scaling / self.group_size  # (out, in/g)
        return getattr(self, f"wq{bit}") + delta.repeat_interleave(self.group_size, dim=1)  # (out, in)


# --------------------------------------------------------------------------------------------- the supernet
def top_model(model: nn.Module, n_top: int) -> nn.Module:
    """A deep copy of ``model`` that keeps only its top ``n_top`` decoder blocks (run it with ``inputs_embeds`` =
    the cached input of block ``n - n_top``)."""
    blocks = decoder_block_list(model)
    if not 1 <= n_top <= len(blocks):
        raise ValueError(f"n_top={n_top} must be in [1, {len(blocks)}]")
    # the lower blocks are dropped and the (frozen) embeddings / LM head shared, not copied: saves memory
    shared = list(blocks)[:len(blocks) - n_top] + [model.get_input_embeddings(), model.get_output_embeddings()]
    top = copy.deepcopy(model, memo={id(m): m for m in shared if m is not None})
    top_blocks = decoder_block_list(top)
    _set_blocks(top, nn.ModuleList(list(top_blocks)[len(top_blocks) - n_top:]))
    top.config.use_cache = False
    for p in top.parameters():
        p.requires_grad_(False)  # frozen (the shared embeddings / LM head of ``model`` too; never trained here)
    return top


@torch.no_grad()
def cache_hidden(model: nn.Module, ids: torch.Tensor, n_top: int, batch: int = 8) -> torch.Tensor:
    """The input hidden states (N, L, d) of block ``n - n_top`` of ``model`` for windows ``ids`` (N, L)."""
    n = len(decoder_block_list(model))
    outs = []
    for i in range(0, ids.shape[0], batch):
        out = model.model(input_ids=ids[i:i + batch], output_hidden_states=True, use_cache=False)
        outs.append(out.hidden_states[n - n_top])  # hidden_states[k] = input of block k
    return torch.cat(outs)


class QFASupernet(nn.Module):
    """The top ``n_top`` blocks of a causal LM with every linear layer replaced by a :class:`QFALinear`.

    ``layer_names``: the quantized layers in order (block index within the top, projection name);
    ``layer_sizes``: their weight counts (for the parameter-weighted average bit width).
    """

    def __init__(self, model: nn.Module, n_top: int, bits=(2, 3, 4), group_size: int = 32, r: int = 8,
                 alpha: float = 2.0, shared: bool = False, seed: int = 0):
        super().__init__()
        self.top = top_model(model, n_top)
        self.bits = tuple(bits)
        g = torch.Generator().manual_seed(seed)
        self.layers: list[QFALinear] = []
        self.layer_names: list[str] = []
        for k, block in enumerate(decoder_block_list(self.top)):
            for parent in (block.self_attn, block.mlp):
                for name in LINEAR_NAMES:
                    if hasattr(parent, name):
                        q = QFALinear(getattr(parent, name), bits, group_size, r, alpha, shared, generator=g)
                        setattr(parent, name, q)
                        self.layers.append(q)
                        self.layer_names.append(f"{k}.{name}")
        self.layer_sizes = [q.weight.numel() for q in self.layers]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for q in self.layers for p in list(q.lora_A) + list(q.lora_B)]

    def set_config(self, config, use_lora: bool = True) -> None:
        """Activate one bit width per layer (a sequence of ``len(layers)`` ints), or fp32 everywhere (None)."""
        config = [None] * len(self.layers) if config is None else list(config)
        if len(config) != len(self.layers):
            raise ValueError(f"config has {len(config)} bit widths for {len(self.layers)} layers")
        for q, b in zip(self.layers, config):
            if b is not None and b not in self.bits:
                raise ValueError(f"bit width {b} not in {self.bits}")
            q.bit, q.use_lora = b, use_lora

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None):  # h: (B, L, d) cached states
        return self.top(inputs_embeds=h, labels=labels, use_cache=False)


def average_bits(config, sizes) -> float:
    """Parameter-weighted average bit width of a configuration (the resource level; per-group scales excluded)."""
    return float(sum(b * n for b, n in zip(config, sizes)) / sum(sizes))


def named_config(name: str, layer_names: list[str], bits=(2, 3, 4)) -> list[int]:
    """The evaluation configurations: ``uniform<b>``, ``attn4_mlp2`` (attention 4-bit, MLP 2-bit), ``attn2_mlp4``."""
    if name.startswith("uniform"):
        return [int(name[len("uniform"):])] * len(layer_names)
    table = {"attn4_mlp2": (4, 2), "attn2_mlp4": (2, 4), "attn3_mlp2": (3, 2), "attn2_mlp3": (2, 3)}
    if name not in table:
        raise ValueError(f"configuration {name!r}; allowed: uniform<b>, {', '.join(table)}")
    a, m = table[name]
    return [a if n.split(".")[1] in ATTN else m for n in layer_names]


# --------------------------------------------------------------------------------------------- samplers
def schedule_mu(step: int, n_steps: int, bits=(2, 3, 4), n_cycles: int = 1) -> float:
    """Target average bit width at ``step``: a triangle wave from min(bits) up to max(bits) and back, ``n_cycles``
    times over ``n_steps`` (mu_0 = min(bits))."""
    lo, hi = min(bits), max(bits)
    period = n_steps / n_cycles
    u = (step % period) / period  # in [0, 1)
    return lo + (hi - lo) * (1.0 - abs(2.0 * u - 1.0))


def layer_probs(mu: float, bits=(2, 3, 4), sigma: float = 0.5) -> torch.Tensor:
    """p(b) ~ exp(-(b - mu)^2 / (2 sigma^2)) over ``bits`` (one layer's sampling distribution at target mu)."""
    b = torch.tensor(bits, dtype=torch.float64)
    w = torch.exp(-(b - mu) ** 2 / (2 * sigma ** 2))
    return w / w.sum()


class ConfigSampler:
    """Draws a configuration per training step. ``kind``: ``fixed`` (a separate QA run: always ``config``),
    ``uniform`` (each layer iid uniform over ``bits``), ``scheduled`` (the paper's resource-balanced scheduler)."""

    def __init__(self, kind: str, n_layers: int, bits=(2, 3, 4), n_steps: int = 1, seed: int = 0, config=None,
                 sigma: float = 0.5, n_cycles: int = 1):
        if kind not in ("fixed", "uniform", "scheduled"):
            raise ValueError(f"sampler kind {kind!r}")
        if kind == "fixed" and (config is None or len(config) != n_layers):
            raise ValueError("a fixed sampler needs a config with one bit width per layer")
        self.kind, self.n_layers, self.bits, self.n_steps = kind, n_layers, tuple(bits), n_steps
        self.config, self.sigma, self.n_cycles = config, sigma, n_cycles
        self.g = torch.Generator().manual_seed(seed)

    def probs(self, step: int) -> torch.Tensor:
        """Per-layer sampling distribution over ``bits`` at ``step`` (same for every layer)."""
        if self.kind == "uniform":
            return torch.full((len(self.bits),), 1.0 / len(self.bits), dtype=torch.float64)
        if self.kind == "scheduled":
            return layer_probs(schedule_mu(step, self.n_steps, self.bits, self.n_cycles), self.bits, self.sigma)
        p = torch.zeros(len(self.bits), dtype=torch.float64)
        return p

    def sample(self, step: int) -> list[int]:
        if self.kind == "fixed":
            return list(self.config)
        idx = torch.multinomial(self.probs(step).float(), self.n_layers, replacement=True, generator=self.g)
        return [self.bits[i] for i in idx.tolist()]


def mean_bits_distribution(p: torch.Tensor, n_layers: int, bits=(2, 3, 4)) -> dict[float, float]:
    """Exact distribution of the (unweighted) mean bit width of ``n_layers`` iid layers with per-layer law ``p``
    (a convolution; dynamic programming over the sum of bit widths)."""
    dist = {0: 1.0}
    for _ in range(n_layers):
        new: dict[int, float] = {}
        for s, ps in dist.items():
            for b, pb in zip(bits, p.tolist()):
                new[s + b] = new.get(s + b, 0.0) + ps * pb
        dist = new
    return {s / n_layers: v for s, v in sorted(dist.items())}


# --------------------------------------------------------------------------------------------- training, evaluation
def train_supernet(net: QFASupernet, h: torch.Tensor, ids: torch.Tensor, sampler: ConfigSampler, n_steps: int,
                   batch_size: int, lr: float, seed: int, max_grad_norm: float = 0.3, eval_fn=None,
                   eval_steps=()) -> dict:
    """AdamW (weight decay 0, constant lr: qalora.py:191-197) on the adapters, one sampled configuration per step.

    ``h`` (N, L, d) / ``ids`` (N, L): the cached pool of training windows; each step takes ``batch_size`` windows
    drawn with ``seed`` (the same sequence for every arm of a seed). Gradients are set to None between steps, so an
    adapter that the step's configuration does not use is not touched (AdamW skips parameters without gradient).
    Returns the per-step loss, configuration and its average bit width; with ``eval_fn`` (called as
    ``eval_fn(net)`` after each step count in ``eval_steps``, in eval mode, without touching the optimizer or any
    random stream) also ``log["evals"][steps] = eval_fn(net)``: a mid-run checkpoint of the same run.
    """
    params = net.lora_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    log = {"loss": [], "avg_bits": [], "configs": [], "evals": {}}
    net.train()
    for step in range(n_steps):
        idx = torch.randint(0, h.shape[0], (batch_size,), generator=g)
        cfg = sampler.sample(step)
        net.set_config(cfg)
        out = net(h[idx], labels=ids[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        log["loss"].append(out.loss.item())
        log["avg_bits"].append(average_bits(cfg, net.layer_sizes))
        log["configs"].append(cfg)
        if eval_fn is not None and step + 1 in eval_steps:
            net.eval()
            log["evals"][step + 1] = eval_fn(net)
            net.train()
    net.eval()
    return log


@torch.no_grad()
def perplexity_cached(net: QFASupernet, h: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean token NLL) over the windows (N, L) of ``ids``, their block inputs ``h`` (N, L, d); the same
    quantity as :func:`reprolab.lm.perplexity` over the same windows (L - 1 predictions per window)."""
    nll, count = 0.0, 0
    for i in range(ids.shape[0]):
        logits = net(h[i:i + 1]).logits.float()  # (1, L, V)
        nll += F.cross_entropy(logits[0, :-1], ids[i, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)
