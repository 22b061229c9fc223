"""ViT-ResNAS (Liao, Karaman & Sze, 2021, https://arxiv.org/abs/2109.00642), in miniature.

Follows the official code, github.com/yilunliao/vit-search:

* **residual spatial reduction** (``SpatialReductionPatchEmbedding``, nets/vit_sr_supernet.py:59-173) between two
  stages: the token sequence is split into the class token and the patch grid; main path LayerNorm -> (patches) a
  3x3 convolution with stride 2, padding 1 (kernel ``patch_size + 1``, :85-87) + a NEW position embedding (:101, :142),
  (class token) a Linear ``in -> out`` (:95, :150); residual path: the UN-normalised patches average-pooled 2x2
  (:90, :131-136) and the un-normalised class token, both zero-padded from ``in`` to ``out`` channels (:98, :154-158);
  the two paths are summed (:160-161). ``residual=False`` drops the residual path (ablation arm);
* **the multi-stage ViT** (``FlexibleDistillVisionTransformerSR``, :185-360): linear patch embedding + class token +
  positions, stages of pre-LN transformer blocks (the issue-16 kit's :class:`reprolab.tf.tiny.Block`, unchanged), a
  reduction between stages, final LayerNorm on the class token, a Linear classifier (:396-440; no distillation token);
* **the supernet's search space** (supernet_config/sr_tiny_666.py): per stage an embedding width, per block a number of
  heads (attention channels / head_dim) and an MLP hidden width, and every second block of a stage skippable (layer
  choices ``[d, d, 0, 0]``: kept with probability 1/2); a child keeps the FIRST channels / heads (the official
  ``ChannelDrop`` masks keep the first ``num_channels_to_keep`` channels, nets/channel_drop.py:128-168);
* **multi-architectural sampling** (``ChannelDrop.forward_mask`` / ``set_mask``, nets/channel_drop.py:90-168): ONE
  forward/backward of the full-width supernet in which every example carries its own channel masks; the batch of B
  examples is split into K = B / ``example_per_arch`` sub-batches, example i taking architecture i mod K
  (``mask.repeat(example_per_arch, 1, 1)``); each elastic dimension (every ``ChannelDrop`` module) draws its K values
  from a balanced list (each choice repeated ``ceil(K / n)`` times, randomly permuted). ``single_arch`` (the
  baseline, ``--single-arch``) draws ONE value per dimension for the whole batch. Both arms run the same masked
  full-width forward, so they cost the same time per step (:func:`masks_for`, :meth:`ResNASViT.forward_masked`);
  masked LayerNorm normalises over each example's active channels only (nets/masked_layer_norm.py);
* **progressive warm-up** of the space (``ChannelDrop.set_mask`` :137-147, ``--num-warmup-epochs`` 30 of 120): only the
  largest choice at first, then the ``1 + floor(t (n - 1) / W)`` largest choices, all of them after ``W``;
* evaluation of a child without retraining: the sliced child (:meth:`ResNASViT.forward` with a config) equals the
  masked supernet with that child's masks (tested); transformers have no BatchNorm, so nothing is recalibrated.

Not implemented (registry deviations): channel "rewiring" (importance sorting during warm-up), the distillation token,
the conv patch stem, drop-path, DeiT augmentations, and the evolutionary search (the claims here are about the
architecture and the supernet training, judged on a fixed set of children).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import DynamicLayerNorm, DynamicLinear
from ..nas.harness import evaluate, image_data, train_model
from .tiny import Block, TFConfig, default_proj

ARMS = ("single", "multi")                       # claim 1: single-stage ViT vs multi-stage ViT (residual reduction)
DIAGNOSTIC_ARMS = ("multi_nores", "single_long")  # multi-stage without the reduction's residual path (ablation);
#                                                  single-stage ViT trained long_single_factor x the steps (budget check)
SAMPLINGS = ("multi_arch", "single_arch")       # claim 2: supernet sampling


# ------------------------------------------------------------------------------------------------------- modules
def masked_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """LayerNorm of x (B, T, C) over each example's active channels (mask (B, 1, C), 1 = active; inactive entries of
    x are 0); the output is 0 on inactive channels (official MaskedLayerNorm: biased variance, output * mask)."""
    n = mask.sum(-1, keepdim=True)
    mu = (x * mask).sum(-1, keepdim=True) / n
    var = (((x - mu) * mask) ** 2).sum(-1, keepdim=True) / n
    return ((x - mu) / torch.sqrt(var + eps) * weight + bias) * mask


class ResidualSpatialReduction(nn.Module):
    """Official ``SpatialReductionPatchEmbedding`` (one class token): halves the token grid and widens the tokens.

    ``forward(x, out)``: x (B, 1 + g*g, e_in) with e_in <= in_dim (first-channel slice) -> (B, 1 + (g/s)^2, out)."""

    def __init__(self, in_dim: int, out_dim: int, grid: int, residual: bool = True, stride: int = 2):
        super().__init__()
        if grid % stride:
            raise ValueError(f"token grid {grid} is not a multiple of the reduction stride {stride}")
        self.in_dim, self.out_dim, self.grid, self.stride, self.residual = in_dim, out_dim, grid, stride, residual
        self.norm = DynamicLayerNorm(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, stride + 1, stride=stride, padding=stride // 2)
        self.token = nn.Linear(in_dim, out_dim)
        self.pos = nn.Parameter(torch.zeros(1, (grid // stride) ** 2, out_dim))

    def _paths(self, x: torch.Tensor, y: torch.Tensor, out: int, e_in: int):
        """main path from the normalised y, residual path from the raw x (both (B, 1 + N, e_in))."""
        B, g, s = x.shape[0], self.grid, self.stride
        patches = y[:, 1:].transpose(1, 2).reshape(B, e_in, g, g)
        patches = F.conv2d(patches, self.conv.weight[:out, :e_in], self.conv.bias[:out], stride=s, padding=s // 2)
        patches = patches.flatten(2).transpose(1, 2) + self.pos[:, :, :out]
        cls = F.linear(y[:, :1], self.token.weight[:out, :e_in], self.token.bias[:out])
        main = torch.cat([cls, patches], 1)
        if not self.residual:
            return main
        pooled = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(B, e_in, g, g), s, s).flatten(2).transpose(1, 2)
        res = torch.cat([x[:, :1], pooled], 1)
        res = F.pad(res, (0, out - e_in)) if out >= e_in else res[..., :out]  # zero-pad channels (official :154-158)
        return main + res

    def forward(self, x: torch.Tensor, out: int | None = None) -> torch.Tensor:
        out = self.out_dim if out is None else out
        return self._paths(x, self.norm(x), out, x.size(-1))

    def forward_masked(self, x: torch.Tensor, m_in: torch.Tensor, m_out: torch.Tensor) -> torch.Tensor:
        """Full-width path with per-example channel masks (x zero outside m_in); output masked by m_out."""
        y = masked_layer_norm(x, self.norm.weight, self.norm.bias, m_in, self.norm.eps)
        return self._paths(x, y, self.out_dim, self.in_dim) * m_out


def masked_block(blk: Block, x: torch.Tensor, m_embed, m_heads, m_mlp, keep) -> torch.Tensor:
    """The kit's pre-LN ``Block`` at FULL width with per-example masks (official supernet Block.forward,
    nets/supernet_blocks.py:209-255): embedding channels ``m_embed`` (B, 1, D), attention channels ``m_heads``
    (B, 1, H*hd, whole heads), MLP hidden ``m_mlp`` (B, 1, M), block kept ``keep`` (B, 1, 1). Equals the sliced
    block (first channels / heads) of each example's child (tested)."""
    B, T, D = x.shape
    hd = blk.cfg.head_dim
    H = blk.cfg.n_heads
    y = masked_layer_norm(x, blk.ln1.weight, blk.ln1.bias, m_embed, blk.ln1.eps)
    q, k, v = (p(y, H * hd).view(B, T, H, hd).transpose(1, 2) for p in (blk.q, blk.k, blk.v))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * hd) * m_heads
    gate = m_embed * keep
    x = x + blk.drop(blk.o(a, D)) * gate
    y = masked_layer_norm(x, blk.ln2.weight, blk.ln2.bias, m_embed, blk.ln2.eps)
    act = F.gelu if blk.cfg.act == "gelu" else F.relu
    h = act(blk.fc1(y, blk.cfg.mlp_hidden)) * m_mlp
    return x + blk.drop(blk.fc2(h, D)) * gate


class ResNASViT(nn.Module):
    """Multi-stage ViT with residual spatial reduction (one stage = a plain single-stage ViT).

    ``stages``: list of {"dim", "heads", "mlp", "blocks"} (largest sizes); ``head_dim`` fixed (official 64).
    A child config: {"embed": [e per stage], "heads": [[h per block] per stage], "mlp": [[m ...] ...],
    "keep": [[0/1 ...] ...]}."""

    def __init__(self, stages: list[dict], head_dim: int, image_size: int, patch_size: int, n_classes: int = 10,
                 in_channels: int = 1, residual: bool = True):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.stages_spec = [dict(s) for s in stages]
        self.head_dim, self.image_size, self.patch_size = head_dim, image_size, patch_size
        self.n_classes, self.in_channels, self.residual = n_classes, in_channels, residual
        g = image_size // patch_size
        self.grids = [g // 2 ** i for i in range(len(stages))]
        if g % 2 ** (len(stages) - 1):
            raise ValueError(f"a {g}x{g} token grid cannot be halved {len(stages) - 1} times")
        d0 = stages[0]["dim"]
        self.patch = DynamicLinear(in_channels * patch_size ** 2, d0)
        self.cls = nn.Parameter(torch.zeros(1, 1, d0))
        self.pos = nn.Parameter(torch.zeros(1, g * g + 1, d0))
        self.stages = nn.ModuleList()
        for s in stages:
            tc = TFConfig(kind="vit", d_model=s["dim"], n_layers=s["blocks"], n_heads=s["heads"], head_dim=head_dim,
                          mlp_hidden=s["mlp"], n_classes=n_classes, image_size=image_size, patch_size=patch_size,
                          in_channels=in_channels)
            self.stages.append(nn.ModuleList(Block(tc, i, default_proj) for i in range(s["blocks"])))
        self.reductions = nn.ModuleList(
            ResidualSpatialReduction(stages[i - 1]["dim"], stages[i]["dim"], self.grids[i - 1], residual)
            for i in range(1, len(stages)))
        self.ln_f = DynamicLayerNorm(stages[-1]["dim"])
        self.head = DynamicLinear(stages[-1]["dim"], n_classes)
        self.reset_parameters()
        self.active = self.max_config()

    def reset_parameters(self):
        """Kit / ViT init: normal(0.02) Linear weights and position / class embeddings, zero biases, unit LN; the
        reduction's convolution keeps PyTorch's default (official _init_weights touches Linear and LN only)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in [self.pos, self.cls] + [r.pos for r in self.reductions]:
            nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------------------------------ configs
    def max_config(self) -> dict:
        S = self.stages_spec
        return {"embed": [s["dim"] for s in S], "heads": [[s["heads"]] * s["blocks"] for s in S],
                "mlp": [[s["mlp"]] * s["blocks"] for s in S], "keep": [[1] * s["blocks"] for s in S]}

    def validate(self, cfg: dict) -> dict:
        S = self.stages_spec
        out = {"embed": [int(e) for e in cfg["embed"]], "heads": [[int(h) for h in hs] for hs in cfg["heads"]],
               "mlp": [[int(m) for m in ms] for ms in cfg["mlp"]], "keep": [[int(k) for k in ks] for ks in cfg["keep"]]}
        for key in ("embed", "heads", "mlp", "keep"):
            if len(out[key]) != len(S):
                raise ValueError(f"config {key} needs one entry per stage ({len(S)})")
        for s, spec in enumerate(S):
            if not 1 <= out["embed"][s] <= spec["dim"]:
                raise ValueError(f"stage {s}: embed {out['embed'][s]} outside 1..{spec['dim']}")
            for key, top in (("heads", spec["heads"]), ("mlp", spec["mlp"]), ("keep", 1)):
                vals = out[key][s]
                if len(vals) != spec["blocks"] or any(not (0 if key == "keep" else 1) <= v <= top for v in vals):
                    raise ValueError(f"stage {s}: {key}={vals} (one per block, each <= {top})")
        return out

    def set_active(self, cfg: dict) -> None:
        self.active = self.validate(cfg)

    # ------------------------------------------------------------------------------------------ forward
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def forward(self, x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
        """Logits of the child ``cfg`` (default: the active one) by first-k slicing (a standalone child)."""
        cfg = self.active if cfg is None else self.validate(cfg)
        e = cfg["embed"][0]
        h = self.patch(self.patchify(x), e)
        h = torch.cat([self.cls[:, :, :e].expand(x.shape[0], -1, -1), h], 1) + self.pos[:, :, :e]
        for s, blocks in enumerate(self.stages):
            if s > 0:
                h = self.reductions[s - 1](h, cfg["embed"][s])
            for blk, nh, m, keep in zip(blocks, cfg["heads"][s], cfg["mlp"][s], cfg["keep"][s]):
                if keep:
                    blk.active_heads, blk.active_mlp = nh, m
                    h, _ = blk(h, False)
        return self.head(self.ln_f(h[:, 0]), self.n_classes)

    def forward_masked(self, x: torch.Tensor, masks: dict) -> torch.Tensor:
        """One full-width forward in which every example carries its own child's masks (:func:`masks_for`)."""
        me = masks["embed"]
        h = self.patch(self.patchify(x), self.stages_spec[0]["dim"])
        h = (torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1) + self.pos) * me[0]
        for s, blocks in enumerate(self.stages):
            if s > 0:
                h = self.reductions[s - 1].forward_masked(h, me[s - 1], me[s])
            for b, blk in enumerate(blocks):
                h = masked_block(blk, h, me[s], masks["heads"][s][b], masks["mlp"][s][b], masks["keep"][s][b])
        z = masked_layer_norm(h[:, :1], self.ln_f.weight, self.ln_f.bias, me[-1], self.ln_f.eps)[:, 0]
        return self.head(z, self.n_classes)

    # ------------------------------------------------------------------------------------------ accounting
    def macs(self, cfg: dict | None = None) -> int:
        """Multiply-accumulates of one image through a child: patch embedding, q/k/v/o, attention products, MLP,
        each reduction's convolution (3x3 x out positions) and class-token Linear, classifier (tested against
        torch's FlopCounterMode / 2)."""
        cfg = self.active if cfg is None else self.validate(cfg)
        hd, p = self.head_dim, self.patch_size
        n = self.grids[0] ** 2 * self.in_channels * p * p * cfg["embed"][0]
        for s in range(len(self.stages)):
            e = cfg["embed"][s]
            if s > 0:
                r, e_in = self.reductions[s - 1], cfg["embed"][s - 1]
                k = r.stride + 1
                n += (self.grids[s] ** 2) * k * k * e_in * e + e_in * e
            T = self.grids[s] ** 2 + 1
            for nh, m, keep in zip(cfg["heads"][s], cfg["mlp"][s], cfg["keep"][s]):
                if keep:
                    hq = nh * hd
                    n += T * (4 * e * hq + 2 * e * m) + 2 * T * T * hq
        return n + cfg["embed"][-1] * self.n_classes

    def n_params(self, cfg: dict | None = None) -> int:
        """Parameters a standalone child holds (counted from the slices it uses)."""
        cfg = self.active if cfg is None else self.validate(cfg)
        hd, p = self.head_dim, self.patch_size
        e0 = cfg["embed"][0]
        n = (self.in_channels * p * p + 1) * e0 + e0 + (self.grids[0] ** 2 + 1) * e0
        for s in range(len(self.stages)):
            e = cfg["embed"][s]
            if s > 0:
                r, e_in = self.reductions[s - 1], cfg["embed"][s - 1]
                k = r.stride + 1
                n += 2 * e_in + (k * k * e_in + 1) * e + (e_in + 1) * e + self.grids[s] ** 2 * e
            for nh, m, keep in zip(cfg["heads"][s], cfg["mlp"][s], cfg["keep"][s]):
                if keep:
                    hq = nh * hd
                    n += 3 * (e * hq + hq) + hq * e + e + e * m + m + m * e + e + 4 * e
        e = cfg["embed"][-1]
        return n + 2 * e + e * self.n_classes + self.n_classes


# ------------------------------------------------------------------------------------------------------- the space
def build_space(model: ResNASViT, embed_fracs, heads_choices, mlp_fracs, skip_every: int = 2) -> list[dict]:
    """The elastic units of the supernet (each an official ``ChannelDrop``), with their choices sorted DESCENDING:
    per stage an ``embed`` unit; per block a ``heads`` unit, an ``mlp`` unit and, for every ``skip_every``-th block
    (the 2nd, 4th, ... of a stage, official block_skip), a ``keep`` unit with the official layer choices
    [1, 1, 0, 0]. ``embed_fracs`` / ``mlp_fracs``: fractions of the stage's largest width; ``heads_choices``: heads
    removed from the stage's largest count (0 = all heads)."""
    units = []
    for s, spec in enumerate(model.stages_spec):
        units.append({"kind": "embed", "stage": s, "block": None,
                      "choices": sorted({max(1, int(round(f * spec["dim"]))) for f in embed_fracs}, reverse=True)})
        for b in range(spec["blocks"]):
            units.append({"kind": "heads", "stage": s, "block": b,
                          "choices": sorted({max(1, spec["heads"] - int(r)) for r in heads_choices}, reverse=True)})
            units.append({"kind": "mlp", "stage": s, "block": b,
                          "choices": sorted({max(1, int(round(f * spec["mlp"]))) for f in mlp_fracs}, reverse=True)})
            if skip_every and (b + 1) % skip_every == 0:
                units.append({"kind": "keep", "stage": s, "block": b, "choices": [1, 1, 0, 0]})
    return units


def config_from_values(model: ResNASViT, units: list[dict], values: list[int]) -> dict:
    cfg = model.max_config()
    for u, v in zip(units, values):
        if u["kind"] == "embed":
            cfg["embed"][u["stage"]] = int(v)
        else:
            cfg[u["kind"]][u["stage"]][u["block"]] = int(v)
    return cfg


def n_active_choices(n: int, step: int, warmup_steps: int) -> int:
    """Official progressive warm-up (ChannelDrop.set_mask): 1 + floor(t (n - 1) / W) largest choices, at most n."""
    if warmup_steps <= 0:
        return n
    return max(1, min(n, 1 + math.floor(step * (n - 1) / warmup_steps)))


def sample_archs(model: ResNASViT, units: list[dict], n_archs: int, rng: np.random.Generator, step: int = 0,
                 warmup_steps: int = 0) -> list[dict]:
    """``n_archs`` children, each unit drawn from a balanced list (official set_mask / forward_mask: the active
    choices cycled ``ceil(n_archs / n)`` times, randomly permuted, the first ``n_archs`` taken). ``n_archs`` = 1 is
    single-architecture sampling (a uniform draw per unit)."""
    per_unit = []
    for u in units:
        n = n_active_choices(len(u["choices"]), step, warmup_steps)
        pool = [u["choices"][i % n] for i in range(n * math.ceil(n_archs / n))]
        perm = rng.permutation(len(pool))
        per_unit.append([pool[i] for i in perm[:n_archs]])
    return [config_from_values(model, units, [vals[a] for vals in per_unit]) for a in range(n_archs)]


def masks_for(model: ResNASViT, configs: list[dict], assign: torch.Tensor) -> dict:
    """Per-example masks: example i uses ``configs[assign[i]]`` (first channels / heads kept)."""
    hd = model.head_dim

    def m(vals, width, unit=1):
        v = torch.tensor(vals, dtype=torch.long)
        return (torch.arange(width)[None, :] < (v * unit)[:, None]).float()[assign][:, None, :]

    out = {"embed": [], "heads": [], "mlp": [], "keep": []}
    for s, spec in enumerate(model.stages_spec):
        out["embed"].append(m([c["embed"][s] for c in configs], spec["dim"]))
        out["heads"].append([m([c["heads"][s][b] for c in configs], spec["heads"] * hd, hd)
                             for b in range(spec["blocks"])])
        out["mlp"].append([m([c["mlp"][s][b] for c in configs], spec["mlp"]) for b in range(spec["blocks"])])
        out["keep"].append([torch.tensor([float(c["keep"][s][b]) for c in configs])[assign][:, None, None]
                            for b in range(spec["blocks"])])
    return out


def assignment(batch: int, example_per_arch: int, single_arch: bool) -> tuple[int, torch.Tensor]:
    """(number of children K, child index per example): official ``mask.repeat(example_per_arch, 1, 1)`` gives
    example i the child i mod K, K = B // example_per_arch (1 when ``single_arch``)."""
    K = 1 if single_arch else max(1, batch // example_per_arch)
    return K, torch.arange(batch) % K


def supernet_loss(model: ResNASViT, x, y, configs, assign, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the batch, each example through its own child (one masked full-width pass)."""
    return F.cross_entropy(model.forward_masked(x, masks_for(model, configs, assign)), y,
                           label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------------------------- arms
def stages_of(arm: str, cfg: dict) -> list[dict]:
    if arm in ("single", "single_long"):
        return [dict(cfg["single_stage"])]
    if arm in ("multi", "multi_nores"):
        return [dict(s) for s in cfg["multi_stages"]]
    raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS + DIAGNOSTIC_ARMS)}")


def build_model(arm: str, cfg: dict, seed: int, image_size: int) -> ResNASViT:
    torch.manual_seed(seed)
    return ResNASViT(stages_of(arm, cfg), cfg["head_dim"], image_size, cfg["patch_size"], 10, 1,
                     residual=arm != "multi_nores")


def no_decay_params(model: nn.Module) -> list:
    """timm rule (DeiT code base): no weight decay on 1-D parameters, positions and the class token."""
    return [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith("pos") or n == "cls"]


def load_data(dataset: str = "mnist5k", size: int | None = 16, split_seed: int = 0) -> dict:
    return image_data(dataset, split_seed=split_seed, size=size)


def arm_lr(arm: str, cfg: dict) -> float:
    """Each arm's learning rate (chosen per arm on seed-0 validation accuracy; the supernets and the no-residual
    diagnostic use the multi-stage arm's)."""
    return cfg["lr_single"] if arm in ("single", "single_long") else cfg["lr_multi"]


def _opt(cfg: dict, model, seed: int, lr: float) -> dict:
    return dict(lr=lr, optimizer="adamw", weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"],
                seed=seed, schedule="cosine", warmup_steps=cfg["warmup_steps"], no_decay=no_decay_params(model),
                grad_clip=cfg["grad_clip"])


def train_arm(arm: str, data: dict, cfg: dict, seed: int):
    """A standalone network (claim 1): AdamW, cosine with warm-up, label smoothing; the same recipe, batches and
    initialisation seed for every arm. ``single_long``: the single-stage ViT with ``long_single_factor`` x the steps
    and warm-up steps (a diagnostic of claim 1's short budget, not a claim arm)."""
    if arm == "single_long":
        f = int(cfg["long_single_factor"])
        cfg = {**cfg, "steps": f * cfg["steps"], "warmup_steps": f * cfg["warmup_steps"]}
    model = build_model(arm, cfg, seed, int(data["train"][0].shape[-1]))
    ls = cfg["label_smoothing"]
    curve = train_model(model, data, cfg["steps"], lambda m, x, y, step: F.cross_entropy(m(x), y, label_smoothing=ls),
                        **_opt(cfg, model, seed, arm_lr(arm, cfg)))
    return model, curve


def train_supernet(sampling: str, data: dict, cfg: dict, seed: int):
    """The multi-stage supernet (largest child = the ``multi`` arm) trained with multi- or single-architecture
    sampling: the same initialisation, batches, optimiser, steps and the same masked full-width forward per step
    (equal sample-passes and equal compute); only how many children share a batch differs."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r}; allowed: {', '.join(SAMPLINGS)}")
    model = build_model("multi", cfg, seed, int(data["train"][0].shape[-1]))
    units = space_units(model, cfg)
    rng = np.random.default_rng(1_000 + seed)
    ls, single = cfg["label_smoothing"], sampling == "single_arch"
    warm = int(round(cfg["arch_warmup_frac"] * cfg["steps"]))
    n_children = []

    def loss_fn(m, x, y, step):
        K, assign = assignment(len(y), cfg["example_per_arch"], single)
        configs = sample_archs(m, units, K, rng, step, warm)
        n_children.append(K)
        return supernet_loss(m, x, y, configs, assign, ls)

    curve = train_model(model, data, cfg["steps"], loss_fn, **_opt(cfg, model, seed, arm_lr("multi", cfg)))
    return model, curve, n_children


def space_units(model: ResNASViT, cfg: dict) -> list[dict]:
    return build_space(model, cfg["embed_fracs"], cfg["heads_removed"], cfg["mlp_fracs"], cfg["skip_every"])


def eval_children(model: ResNASViT, cfg: dict, n_random: int, seed: int) -> list[dict]:
    """The FIXED evaluation set (the same for every seed and arm): the largest and the smallest child, then
    ``n_random`` uniform random children (rng ``seed``)."""
    units = space_units(model, cfg)
    rng = np.random.default_rng(seed)
    big = config_from_values(model, units, [u["choices"][0] for u in units])
    small = config_from_values(model, units, [u["choices"][-1] for u in units])
    rand = [config_from_values(model, units, [u["choices"][int(rng.integers(len(u["choices"])))] for u in units])
            for _ in range(n_random)]
    return [big, small] + rand


def evaluate_children(model: ResNASViT, children: list[dict], data: dict, splits=("val", "test")) -> list[dict]:
    """Accuracy of each child with the supernet's weights (no retraining; no BN to recalibrate)."""
    out = []
    keep = model.active
    for c in children:
        model.set_active(c)
        out.append({s: evaluate(model, data, s) for s in splits})
    model.active = keep
    return out


__all__ = ["ARMS", "DIAGNOSTIC_ARMS", "SAMPLINGS", "masked_layer_norm", "ResidualSpatialReduction", "masked_block",
           "ResNASViT", "build_space", "config_from_values", "n_active_choices", "sample_archs", "masks_for",
           "assignment", "supernet_loss", "stages_of", "arm_lr", "build_model", "no_decay_params", "load_data", "train_arm",
           "train_supernet", "space_units", "eval_children", "evaluate_children"]
