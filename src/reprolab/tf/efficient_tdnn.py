"""EfficientTDNN: Efficient Architecture Search for Speaker Recognition (Wang et al., arXiv 2103.13581): an
ECAPA-style TDNN supernet with elastic kernel, depth and width, trained by progressive shrinking, whose subnets are
used without retraining at several MAC budgets.

Follows the official code, github.com/mechanicalsea/sugar (file:line in the registry's deviations):

* ``sugar/models/dynamictdnn.py`` ``DynamicTDNN``: ``layer1`` (Conv1d-ReLU-BN, kernel 5) -> ``num_blocks``
  SE-Res2-dilated TDNN blocks (1x1 Conv-ReLU-BN -> Res2 (``scale`` groups, kernel k, dilation 2, 3, ...) -> 1x1
  Conv-ReLU-BN -> squeeze-excitation) with DENSE-SUM residuals (``out = block(out) + sum_out; sum_out = sum_out + out``)
  -> concatenation of every active block's output -> 1x1 ``catconv`` + ReLU -> attentive statistics pooling -> BN ->
  linear -> BN (the speaker embedding). Config (official order): ``(depth, channels, kernels, catconv)`` with
  ``channels = [trunk, mid_1, ..., mid_depth]`` and ``kernels = [layer1, block_1, ..., block_depth]``; here a dict
  {"depth", "channels", "kernels", "catconv"}.
* elastic width: FIRST-k output / input channels (``TOPK``), except the Res2 middle (the first ``mid/scale`` channels
  of EACH of the ``scale`` groups, ``_module_configs`` of ``DynamicSERes2DilatedTDNNBlock``), the concatenation (the
  first ``trunk`` channels of each block's chunk) and the pooled statistics (the first ``catconv`` of the mean half
  and of the std half); widths are ``_make_divisible(rate * channels, 8)``.
* elastic kernel (``sugar/modules/dynamicarch.py`` ``DynamicConv1d.weight``): the centre crop of the larger kernel
  passed through a learned transformation matrix shared by the layer (``k53`` 3x3, ``k31`` 1x1, initialised to the
  identity): 5 -> 3 is ``W[:, :, 1:-1] @ k53``, 3 -> 1 is ``(...)[:, :, 1:-1] @ k31``.
* elastic depth: the first ``depth`` blocks.
* progressive shrinking (``scripts/train_vox2_veri.py``: tasks supernet -> kernel -> depth -> width phase 1 ->
  width phase 2): the largest network first, then one uniformly sampled subnet per step (``dynamic_walks`` 1,
  ``TDNNPath.sample``: every dimension independently uniform) from a space that grows stage by stage: kernels
  {1, 3, 5}; + depth {D-2, D-1, D}; + width {0.5, 0.75, 1}; + width {0.25, 0.35, 0.5, 0.75, 1}.
* loss: AAM-softmax (``sugar/loss/aamsoftmax.py``, margin 0.2, scale 30) on the embedding; its class matrix is shared
  by every subnet.
* a subnet is used without retraining: extracted as a standalone network with inherited (kernel-transformed, sliced)
  weights (``clone``), its BatchNorm statistics recomputed on training utterances (``batch_forward``).

The from-scratch arm trains each evaluated architecture alone in ONE training run of the same length as one
progressive-shrinking stage (the official ``--specific-tdnn`` path: one run of the training script, whose every stage is
one run with the same ``--epochs``), with the same optimiser, schedule, batches and seed as the supernet's first stage.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas import bn as nas_bn
from ..nas.elastic import make_divisible
from ..nas.harness import train_model

STAGES = ("largest", "kernel", "depth", "width1", "width2")  # progressive-shrinking order (official tasks)
WIDTHS1 = (0.5, 0.75, 1.0)
WIDTHS2 = (0.25, 0.35, 0.5, 0.75, 1.0)
KERNELS = (1, 3, 5)


# ---------------------------------------------------------------------------------------------------------- ops
def _take(w: torch.Tensor, dim: int, sel) -> torch.Tensor:
    """First ``sel`` entries along ``dim`` (int) or the entries ``sel`` (LongTensor); None = all."""
    if sel is None:
        return w
    if isinstance(sel, int):
        return w.narrow(dim, 0, sel)
    return w.index_select(dim, sel)


class DynamicConv1d(nn.Module):
    """Official ``DynamicConv1d`` (no bias, 'same' padding): channel slicing and the elastic kernel through learned
    transformation matrices k53 (3x3) and k31 (1x1) on the centre crop, identity-initialised."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        if kernel_size not in (1, 3, 5):
            raise ValueError(f"kernel_size={kernel_size}; allowed: 1, 3, 5")
        self.kernel_size, self.dilation = kernel_size, dilation
        self.conv = nn.Conv1d(cin, cout, kernel_size, padding=(kernel_size - 1) // 2 * dilation, dilation=dilation,
                              bias=False)
        self.k53 = nn.Parameter(torch.eye(3)) if kernel_size > 3 else None
        self.k31 = nn.Parameter(torch.eye(1)) if kernel_size > 1 else None

    def active_weight(self, out_sel=None, in_sel=None, k: int | None = None) -> torch.Tensor:
        k = self.kernel_size if k is None else k
        if k > self.kernel_size or k not in (1, 3, 5):
            raise ValueError(f"active kernel {k} for a kernel-{self.kernel_size} layer")
        w = _take(_take(self.conv.weight, 1, in_sel), 0, out_sel)  # (out, in, K)
        if self.kernel_size > 3 and k < 5:
            w = w[:, :, 1:-1] @ self.k53
        if self.kernel_size > 1 and k < 3:
            w = w[:, :, 1:-1] @ self.k31
        return w

    def forward(self, x, out_sel=None, in_sel=None, k: int | None = None):  # x (B, C_in_active, T)
        k = self.kernel_size if k is None else k
        return F.conv1d(x, self.active_weight(out_sel, in_sel, k), None, 1, (k - 1) // 2 * self.dilation,
                        self.dilation)


class DynamicBN1d(nn.BatchNorm1d):
    """BatchNorm1d over the selected channels. All channels: the plain ``nn.BatchNorm1d`` (so ``nas.bn`` recalibration
    works on an extracted child). A proper subset in training: batch statistics, running statistics untouched (every
    evaluated child is recalibrated); in eval: the selected running statistics."""

    def forward(self, x, sel=None):
        if sel is None or (sel if isinstance(sel, int) else sel.numel()) == self.num_features:
            return super().forward(x)  # every channel (sorted indices): the plain BatchNorm1d
        w, b = _take(self.weight, 0, sel), _take(self.bias, 0, sel)
        if self.training:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        return F.batch_norm(x, _take(self.running_mean, 0, sel), _take(self.running_var, 0, sel), w, b, False, 0.0,
                            self.eps)


class DynamicLinear1(nn.Module):
    """Linear with selectable output / input features (official ``DynamicLinear``)."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=bias)

    def forward(self, x, out_sel=None, in_sel=None):
        w = _take(_take(self.linear.weight, 1, in_sel), 0, out_sel)
        b = None if self.linear.bias is None else _take(self.linear.bias, 0, out_sel)
        return F.linear(x, w, b)


class ConvReLUBN(nn.Module):
    """Official ``DynamicConv1dReLUBN``: bn(relu(conv(x)))."""

    def __init__(self, cin, cout, kernel_size=1, dilation=1):
        super().__init__()
        self.conv = DynamicConv1d(cin, cout, kernel_size, dilation)
        self.bn = DynamicBN1d(cout)

    def forward(self, x, out_sel=None, in_sel=None, k=None):
        return self.bn(F.relu(self.conv(x, out_sel, in_sel, k)), out_sel)


class SERes2Block(nn.Module):
    """Official ``DynamicSERes2DilatedTDNNBlock``: 1x1 -> Res2 (scale groups, kernel k, dilation) -> 1x1 -> SE."""

    def __init__(self, channels: int, mid: int, kernel_size: int, dilation: int, scale: int, se_reduction: int):
        super().__init__()
        if mid % scale or channels % se_reduction:
            raise ValueError(f"mid {mid} % scale {scale} and channels {channels} % reduction {se_reduction} must be 0")
        self.channels, self.mid, self.scale, self.red = channels, mid, scale, se_reduction
        self.first_conv = ConvReLUBN(channels, mid)
        self.res_convs = nn.ModuleList(
            ConvReLUBN(mid // scale, mid // scale, kernel_size, dilation) for _ in range(max(1, scale - 1)))
        self.last_conv = ConvReLUBN(mid, channels)
        self.se_reduce = DynamicLinear1(channels, channels // se_reduction)
        self.se_expand = DynamicLinear1(channels // se_reduction, channels)

    def mid_indices(self, mid: int) -> torch.Tensor:
        """The active middle channels: the first mid/scale of each of the scale groups (official _module_configs)."""
        if mid % self.scale:
            raise ValueError(f"mid {mid} not divisible by scale {self.scale}")
        return torch.arange(self.mid).view(self.scale, -1)[:, :mid // self.scale].flatten()

    def forward(self, x, c: int, mid: int, k: int):  # x (B, c, T)
        idx = self.mid_indices(mid)
        out = self.first_conv(x, idx, c)
        wa = mid // self.scale
        spx = torch.split(out, wa, 1)
        outs, sp = [], None
        for i, conv in enumerate(self.res_convs):
            sp = conv(spx[i] if i == 0 else spx[i] + sp, wa, wa, k)
            outs.append(sp)
        if self.scale > 1:
            outs.append(spx[len(self.res_convs)])
        out = self.last_conv(torch.cat(outs, 1), c, idx)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(out.mean(2), c // self.red, c)), c, c // self.red))
        return out * s.unsqueeze(2)


class AAMSoftmax(nn.Module):
    """Official ``sugar/loss/aamsoftmax.py`` (easy_margin False): logits s * cos(theta + m) for the label, s * cos
    otherwise; W (embed, classes) xavier-normal."""

    def __init__(self, n_embed: int, n_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.m, self.s = float(margin), float(scale)
        self.W = nn.Parameter(torch.empty(n_embed, n_classes))
        nn.init.xavier_normal_(self.W, gain=1)

    def cosine(self, emb):
        return F.normalize(emb, dim=1) @ F.normalize(self.W, dim=0)

    def forward(self, emb, y):
        cos = self.cosine(emb)
        sine = torch.sqrt((1.0 - cos * cos).clamp(0, 1))
        phi = cos * math.cos(self.m) - sine * math.sin(self.m)
        th, mm = math.cos(math.pi - self.m), math.sin(math.pi - self.m) * self.m
        phi = torch.where(cos - th > 0, phi, cos - mm)
        one = F.one_hot(y, cos.size(1)).to(cos.dtype)
        return self.s * (one * phi + (1 - one) * cos)


class DynamicTDNN(nn.Module):
    """The EfficientTDNN supernet (or, built at a child's sizes, a standalone network). ``channels``: [trunk, mid_1,
    .., mid_D]; ``kernels``: [layer1, block_1, .., block_D]. The AAM-softmax head is part of the module (``head``)."""

    def __init__(self, in_feats: int = 12, n_classes: int = 9, depth: int = 3, channels=(64, 64, 64, 64),
                 kernels=(5, 5, 5, 5), catconv: int = 192, embed: int = 32, bottleneck: int = 32, scale: int = 4,
                 se_reduction: int = 4, margin: float = 0.2, aam_scale: float = 30.0):
        super().__init__()
        channels, kernels = list(channels), list(kernels)
        if len(channels) != depth + 1 or len(kernels) != depth + 1:
            raise ValueError("channels and kernels need depth + 1 entries")
        self.in_feats, self.depth, self.channels, self.kernels = in_feats, depth, channels, kernels
        self.catconv_channels, self.embed, self.scale = catconv, embed, scale
        self.layer1 = ConvReLUBN(in_feats, channels[0], kernels[0])
        self.blocks = nn.ModuleList(SERes2Block(channels[0], channels[i + 1], kernels[i + 1], i + 2, scale,
                                                se_reduction) for i in range(depth))
        self.catconv = DynamicConv1d(channels[0] * depth, catconv)
        self.pool1 = DynamicConv1d(catconv, bottleneck)  # attentive statistics pooling (official linear1 / linear2)
        self.pool2 = DynamicConv1d(bottleneck, catconv)
        self.bnpool = DynamicBN1d(2 * catconv)
        self.linear = DynamicLinear1(2 * catconv, embed)
        self.bnembed = nn.BatchNorm1d(embed)
        self.head = AAMSoftmax(embed, n_classes, margin, aam_scale)
        self.hparams = dict(in_feats=in_feats, n_classes=n_classes, embed=embed, bottleneck=bottleneck, scale=scale,
                            se_reduction=se_reduction, margin=margin, aam_scale=aam_scale)
        self.active = self.max_config()

    # ------------------------------------------------------------------ configs
    def max_config(self) -> dict:
        return {"depth": self.depth, "channels": list(self.channels), "kernels": list(self.kernels),
                "catconv": self.catconv_channels}

    def space(self, stage: str = "width2") -> dict:
        """The official ``space`` of a progressive-shrinking stage: choices per dimension (kernels per layer, depth,
        channels per layer [trunk, mid_1..mid_D], catconv)."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; allowed: {', '.join(STAGES)}")
        i = STAGES.index(stage)
        ks = [[k for k in KERNELS if k <= kk] if i >= 1 else [kk] for kk in self.kernels]
        ds = [self.depth + d for d in (-2, -1, 0) if self.depth + d >= 1] if i >= 2 else [self.depth]
        rates = WIDTHS2 if i >= 4 else WIDTHS1 if i >= 3 else (1.0,)
        ch = [sorted({make_divisible(r * c, 8) for r in rates}) for c in self.channels]
        cat = sorted({make_divisible(r * self.catconv_channels, 8) for r in rates})
        return {"depth": ds, "channels": ch, "kernels": ks, "catconv": cat}

    def sample_config(self, stage: str, rng: np.random.Generator) -> dict:
        """Official ``TDNNPath.sample``: every dimension independently uniform; channels / kernels cut to depth + 1."""
        sp = self.space(stage)
        d = int(rng.choice(sp["depth"]))
        ch = [int(rng.choice(c)) for c in sp["channels"]]
        ks = [int(rng.choice(k)) for k in sp["kernels"]]
        cat = int(rng.choice(sp["catconv"]))
        return {"depth": d, "channels": ch[:d + 1], "kernels": ks[:d + 1], "catconv": cat}

    def validate(self, cfg: dict) -> dict:
        d = int(cfg["depth"])
        if not 1 <= d <= self.depth or len(cfg["channels"]) != d + 1 or len(cfg["kernels"]) != d + 1:
            raise ValueError(f"bad config {cfg}")
        for c, cm in zip(cfg["channels"], self.channels):
            if not 1 <= c <= cm:
                raise ValueError(f"channels {cfg['channels']} exceed {self.channels}")
        for k, km in zip(cfg["kernels"], self.kernels):
            if k not in KERNELS or k > km:
                raise ValueError(f"kernels {cfg['kernels']} not allowed under {self.kernels}")
        if not 1 <= cfg["catconv"] <= self.catconv_channels:
            raise ValueError(f"catconv {cfg['catconv']} > {self.catconv_channels}")
        return {"depth": d, "channels": [int(c) for c in cfg["channels"]], "kernels": [int(k) for k in cfg["kernels"]],
                "catconv": int(cfg["catconv"])}

    def set_active_subnet(self, cfg: dict | None) -> None:
        self.active = self.max_config() if cfg is None else self.validate(cfg)

    # ------------------------------------------------------------------ forward
    def _cat_indices(self, d: int, c: int) -> torch.Tensor:
        return torch.arange(self.channels[0] * self.depth).view(self.depth, -1)[:d, :c].flatten()

    def _pool_indices(self, cat: int) -> torch.Tensor:
        return torch.arange(2 * self.catconv_channels).view(2, -1)[:, :cat].flatten()

    def embedding(self, x: torch.Tensor) -> torch.Tensor:  # x (B, F, T) -> (B, embed)
        a = self.active
        d, c, cat = a["depth"], a["channels"][0], a["catconv"]
        out = self.layer1(x, c, None, a["kernels"][0])
        cat_out, sum_out = [], out
        for i in range(d):
            out = self.blocks[i](out, c, a["channels"][i + 1], a["kernels"][i + 1]) + sum_out
            cat_out.append(out)
            sum_out = sum_out + out
        h = F.relu(self.catconv(torch.cat(cat_out, 1), cat, self._cat_indices(d, c)))
        alpha = torch.softmax(self.pool2(torch.tanh(self.pool1(h, None, cat)), cat, None), dim=2)
        mean = (alpha * h).sum(2)
        std = torch.sqrt(((alpha * h ** 2).sum(2) - mean ** 2).clamp(min=1e-9))
        pidx = self._pool_indices(cat)
        z = self.bnpool(torch.cat([mean, std], 1), pidx)
        return self.bnembed(self.linear(z, None, pidx))

    def forward(self, x):  # cosine similarity to each class centre (identification scores)
        return self.head.cosine(self.embedding(x))

    # ------------------------------------------------------------------ extraction (official clone)
    @torch.no_grad()
    def get_active_subnet(self, cfg: dict | None = None) -> "DynamicTDNN":
        """A standalone DynamicTDNN at the child's sizes with the inherited weights (kernel-transformed, sliced)."""
        a = self.max_config() if cfg is None else self.validate(cfg)
        d, c, cat = a["depth"], a["channels"][0], a["catconv"]
        sub = DynamicTDNN(self.in_feats, depth=d, channels=a["channels"], kernels=a["kernels"], catconv=cat,
                          **{k: v for k, v in self.hparams.items() if k != "in_feats"})

        def conv(dst: DynamicConv1d, src: DynamicConv1d, out_sel, in_sel, k):
            dst.conv.weight.copy_(src.active_weight(out_sel, in_sel, k))

        def bn(dst: nn.BatchNorm1d, src: nn.BatchNorm1d, sel):
            for n in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, n).copy_(_take(getattr(src, n), 0, sel))

        def lin(dst: DynamicLinear1, src: DynamicLinear1, out_sel, in_sel):
            dst.linear.weight.copy_(_take(_take(src.linear.weight, 1, in_sel), 0, out_sel))
            if src.linear.bias is not None:
                dst.linear.bias.copy_(_take(src.linear.bias, 0, out_sel))

        conv(sub.layer1.conv, self.layer1.conv, c, None, a["kernels"][0])
        bn(sub.layer1.bn, self.layer1.bn, c)
        for i in range(d):
            s, t = self.blocks[i], sub.blocks[i]
            mid, k = a["channels"][i + 1], a["kernels"][i + 1]
            idx, wa = s.mid_indices(mid), mid // s.scale
            conv(t.first_conv.conv, s.first_conv.conv, idx, c, None)
            bn(t.first_conv.bn, s.first_conv.bn, idx)
            for tc, sc in zip(t.res_convs, s.res_convs):
                conv(tc.conv, sc.conv, wa, wa, k)
                bn(tc.bn, sc.bn, wa)
            conv(t.last_conv.conv, s.last_conv.conv, c, idx, None)
            bn(t.last_conv.bn, s.last_conv.bn, c)
            lin(t.se_reduce, s.se_reduce, c // s.red, c)
            lin(t.se_expand, s.se_expand, c, c // s.red)
        conv(sub.catconv, self.catconv, cat, self._cat_indices(d, c), None)
        conv(sub.pool1, self.pool1, None, cat, None)
        conv(sub.pool2, self.pool2, cat, None, None)
        pidx = self._pool_indices(cat)
        bn(sub.bnpool, self.bnpool, pidx)
        lin(sub.linear, self.linear, None, pidx)
        sub.bnembed.load_state_dict(self.bnembed.state_dict())
        sub.head.W.copy_(self.head.W)
        return sub.train(self.training)


# ---------------------------------------------------------------------------------------------------------- MACs
def macs(net: DynamicTDNN, cfg: dict | None, T: int) -> int:
    """Multiply-accumulates of a child for a T-frame utterance: every convolution (C_in * C_out * k * T) and linear
    layer (in * out) incl. the squeeze-excitation and the attentive pooling; BN, activations, the statistics and the
    AAM head excluded (the official ``count_ops`` also counts BN as 2 ops per element: omitted)."""
    a = net.max_config() if cfg is None else net.validate(cfg)
    d, c, cat, F_ = a["depth"], a["channels"][0], a["catconv"], net.in_feats
    b = net.hparams["bottleneck"]
    m = F_ * c * a["kernels"][0] * T
    for i in range(d):
        mid, k, s = a["channels"][i + 1], a["kernels"][i + 1], net.scale
        wa = mid // s
        m += 2 * c * mid * T + max(1, s - 1) * wa * wa * k * T + 2 * c * (c // net.blocks[i].red)
    m += d * c * cat * T + 2 * cat * b * T + 2 * cat * net.embed
    return int(m)


# ---------------------------------------------------------------------------------------------------------- metrics
def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate of target (label 1) vs non-target (0) trials, as the official ``calculate_eer``: the ROC
    (sklearn ``roc_curve`` semantics: thresholds at every distinct score) linearly interpolated, EER = the point where
    FPR = 1 - TPR (= FNR)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise ValueError("need both target and non-target trials")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score (descending)
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / N]
    fnr = np.r_[1.0, 1.0 - tp / P]
    g = fnr - fpr  # decreasing from 1 to -1 (non-increasing)
    j = int(np.flatnonzero(g <= 0)[0])
    if g[j] == 0:
        return float(fpr[j])
    # interpolate between points j-1 (g > 0) and j (g < 0): fpr + t dfpr = fnr + t dfnr
    t = g[j - 1] / (g[j - 1] - g[j])
    return float(fpr[j - 1] + t * (fpr[j] - fpr[j - 1]))


def trial_scores(emb: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-speaker labels of every unordered pair of held-out utterances."""
    e = F.normalize(emb.double(), dim=1)
    S = (e @ e.T).numpy()
    iu = np.triu_indices(len(y), 1)
    yy = y.numpy()
    return S[iu], (yy[:, None] == yy[None, :])[iu].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------- training
def build_supernet(cfg: dict, n_classes: int, in_feats: int) -> DynamicTDNN:
    D = cfg["num_blocks"]
    return DynamicTDNN(in_feats, n_classes, D, [cfg["channels"]] * (D + 1), [cfg["kernel_max"]] * (D + 1),
                       cfg["catconv"], cfg["embed"], cfg["bottleneck"], cfg["res2_scale"], cfg["se_reduction"],
                       cfg["margin"], cfg["aam_scale"])


def build_standalone(config: dict, cfg: dict, n_classes: int, in_feats: int) -> DynamicTDNN:
    """A network built at the child's sizes (fresh initialisation), as the official ``specfic_tdnn``."""
    return DynamicTDNN(in_feats, n_classes, config["depth"], config["channels"], config["kernels"], config["catconv"],
                       cfg["embed"], cfg["bottleneck"], cfg["res2_scale"], cfg["se_reduction"], cfg["margin"],
                       cfg["aam_scale"])


def _train_stage(net: DynamicTDNN, data: dict, cfg: dict, seed: int, stage_i: int, sampler) -> list[float]:
    """One training call (one stage): ``stage_steps`` AdamW steps, warm-up + cosine, batches seeded by (seed, stage).
    ``sampler(rng)`` returns the config of each step (None = the network's full size)."""
    rng = np.random.default_rng([seed, stage_i])

    def loss_fn(model, x, y, step):
        model.set_active_subnet(sampler(rng))
        return F.cross_entropy(model.head(model.embedding(x), y), y)

    curve = train_model(net, data, cfg["stage_steps"], loss_fn, lr=cfg["lr"], optimizer="adamw",
                        weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=seed * 1000 + stage_i,
                        schedule="cosine", warmup_steps=cfg["warmup_steps"])
    net.set_active_subnet(None)
    return curve


def train_supernet(data: dict, cfg: dict, seed: int, stages=STAGES) -> tuple[DynamicTDNN, list[float]]:
    """Progressive shrinking: the stages in order, each a fresh optimiser and schedule (the official script is run
    once per task, from the previous task's weights)."""
    torch.manual_seed(seed)
    X, y = data["train"]
    net = build_supernet(cfg, int(y.max()) + 1, X.shape[1])
    curve = []
    for i, st in enumerate(stages):
        if st not in STAGES:
            raise ValueError(f"stage={st!r}; allowed: {', '.join(STAGES)}")
        sampler = (lambda rng: None) if st == "largest" else (lambda rng, st=st: net.sample_config(st, rng))
        curve += _train_stage(net, data, cfg, seed, i, sampler)
    return net, curve


def train_scratch(config: dict, data: dict, cfg: dict, seed: int, n_calls: int = 1
                  ) -> tuple[DynamicTDNN, list[float]]:
    """The architecture trained alone from scratch (official ``--specific-tdnn`` without initial weights ->
    ``specfic_tdnn``): ONE run of the training script, i.e. ``n_calls`` (default 1) training calls of ``stage_steps``
    steps each, the same optimiser, schedule, batches and seeds as the supernet's first stage(s)."""
    torch.manual_seed(seed)
    X, y = data["train"]
    net = build_standalone(config, cfg, int(y.max()) + 1, X.shape[1])
    curve = []
    for i in range(n_calls):
        curve += _train_stage(net, data, cfg, seed, i, lambda rng: None)
    return net, curve


@torch.no_grad()
def evaluate(model: DynamicTDNN, data: dict, cfg: dict) -> dict:
    """BN statistics recomputed (cumulative average, ``nas.bn``) on the training utterances in batches of
    ``batch_size``; then on the held-out utterances: speaker-identification accuracy (nearest AAM class centre)
    and the verification EER of cosine scores over all pairs."""
    m = copy.deepcopy(model)
    Xtr = data["train"][0]
    nas_bn.set_running_statistics(m, [Xtr[i:i + cfg["batch_size"]] for i in range(0, len(Xtr), cfg["batch_size"])],
                                  method="cumulative")
    m.eval()
    X, y = data["test"]
    emb = m.embedding(X)
    acc = float((m.head.cosine(emb).argmax(1) == y).float().mean())
    s, lab = trial_scores(emb, y)
    return {"acc": acc, "eer": eer(s, lab)}


def named_children(net: DynamicTDNN, names: dict) -> dict[str, dict]:
    """The evaluated children, from params: {name: {"depth", "width", "kernel"[, "catconv"]}}. ``width``: one rate for
    every layer or a list of depth + 1 rates [trunk, mid_1, ..]; ``kernel``: one size for every layer (capped at the
    supernet's) or a list [layer1, block_1, ..]; ``catconv``: its rate (default: the trunk's width rate). Widths are
    ``make_divisible(rate * C, 8)`` as the official space."""
    out = {}
    for name, spec in names.items():
        d = int(spec["depth"])
        w, k = spec["width"], spec["kernel"]
        rates = [float(r) for r in w] if isinstance(w, (list, tuple)) else [float(w)] * (d + 1)
        ks = [int(x) for x in k] if isinstance(k, (list, tuple)) else [min(int(k), kk) for kk in net.kernels[:d + 1]]
        if len(rates) != d + 1 or len(ks) != d + 1:
            raise ValueError(f"child {name!r}: width / kernel lists need depth + 1 = {d + 1} entries")
        cat = float(spec.get("catconv", rates[0]))
        out[name] = net.validate({"depth": d, "channels": [make_divisible(r * c, 8) for r, c in zip(rates, net.channels)],
                                  "kernels": ks, "catconv": make_divisible(cat * net.catconv_channels, 8)})
    return out


def load_data(length: int) -> dict:
    """Real JapaneseVowels (``tf.data.japanese_vowels``) in the TDNN layout {"train"|"test": (X (N, 12, length), y)}."""
    from .data import japanese_vowels

    d = japanese_vowels(length)
    return {k: (X.transpose(1, 2).contiguous(), y) for k, (X, y) in d.items()}
