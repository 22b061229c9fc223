"""LETA: a generic, pre-trained vision explainer with rule-based transfer to downstream heads
(Wang et al., "Learning Transferable Attribution for Generic Vision Explainer", arXiv 2312.15359; official code
github.com/guanchuwang/TVE).

Pre-training (no labels, no downstream head): for an image x and a heatmap grid of g x g patches, the explainer
outputs two maps phi+(x), phi-(x) of shape (g*g, d), d the frozen encoder's embedding size. For a random centre
patch c with neighbourhood N_r(c) (the (2r+1) x (2r+1) square, clipped at the border) and mask M_c,

    L = || phi+(x)_c - f(x * M_c) ||^2 + || phi-(x)_c - f(x * (1 - M_c)) ||^2        (MSE, as in the official code)

so phi+_c predicts the embedding of the image that keeps only the neighbourhood of c and phi-_c the embedding of the
image that removes it.

Rule-based attribution for any downstream linear head h(z) = W z + b on the encoder's embedding, class y (no
downstream training):

    a_c = lambda_pos * h_y(phi+_c) - lambda_neg * h_y(phi-_c),   then (optionally) a (2r+1) average pooling
    ("heatmap_pooling" in the official code) and a per-image min-max normalisation to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_mobilenet_v2(path) -> nn.Module:
    """torchvision MobileNetV2 with the shipped ImageNet weights, frozen, in eval mode."""
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(path))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class Encoder(nn.Module):
    """The frozen backbone's embedding f(x): ImageNet normalisation, MobileNetV2 features, global average pool."""

    def __init__(self, mobilenet: nn.Module):
        super().__init__()
        self.features = mobilenet.features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.dim = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 3, H, W) in [0, 1] -> (B, 1280)
        return Fn.adaptive_avg_pool2d(self.features((x - self.mean) / self.std), 1).flatten(1)


def neighbourhood_masks(centres: torch.Tensor, grid: int, r: int) -> torch.Tensor:
    """Masks (B, g, g) that are 1 on the (2r+1)-square around each centre patch (flat index), clipped at borders."""
    cy, cx = centres // grid, centres % grid
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return (((yy[None] - cy[:, None, None]).abs() <= r) & ((xx[None] - cx[:, None, None]).abs() <= r)).float()


@torch.no_grad()
def pretrain_targets(encoder: Encoder, x: torch.Tensor, centres: torch.Tensor, grid: int, r: int,
                     batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets f(x * M_c) and f(x * (1 - M_c)), each (B, d)."""
    M = Fn.interpolate(neighbourhood_masks(centres, grid, r)[:, None], size=x.shape[-2:], mode="nearest")
    pos = torch.cat([encoder(x[i:i + batch] * M[i:i + batch]) for i in range(0, len(x), batch)])
    neg = torch.cat([encoder(x[i:i + batch] * (1 - M[i:i + batch])) for i in range(0, len(x), batch)])
    return pos, neg


class GenericExplainer(nn.Module):
    """phi+(x), phi-(x): (B, g*g, d). A frozen stem (the first ``stem_blocks`` MobileNetV2 blocks, as the official
    explainer starts from a pre-trained MAE backbone) and two trainable heads (a local 3x3 convolution plus a global
    context vector, so that phi-, which describes the whole image minus a patch, can see the whole image)."""

    def __init__(self, mobilenet: nn.Module, grid: int, dim: int, stem_blocks: int = 7, width: int = 128):
        super().__init__()
        self.stem = mobilenet.features[:stem_blocks]
        for p in self.stem.parameters():
            p.requires_grad_(False)
        c = self.stem[-1].out_channels if hasattr(self.stem[-1], "out_channels") else self.stem[-1].conv[-2].out_channels
        self.grid, self.dim = grid, dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.heads = nn.ModuleList([self._head(c, width, dim) for _ in range(2)])  # positive, negative

    @staticmethod
    def _head(c, w, d):
        return nn.ModuleDict({"local": nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.GELU()),
                              "glob": nn.Sequential(nn.Linear(c, w), nn.GELU()),
                              "mid": nn.Sequential(nn.Conv2d(2 * w, w, 1), nn.GELU()),
                              "proj": nn.Linear(w, d)})

    def stem_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.stem((x - self.mean) / self.std)
        return Fn.adaptive_avg_pool2d(h, self.grid)  # (B, c, g, g)

    def _hidden(self, head, h):
        loc = head["local"](h)
        glob = head["glob"](h.mean((2, 3)))[:, :, None, None].expand_as(loc)
        return head["mid"](torch.cat([loc, glob], 1)).flatten(2).transpose(1, 2)  # (B, g*g, w)

    def forward_features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi+ and phi- (B, g*g, d) from stem features h (B, c, g, g)."""
        pos, neg = (head["proj"](self._hidden(head, h)) for head in self.heads)
        return pos, neg

    def forward_at(self, h: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi+_c and phi-_c (B, d) at one patch per image (equal to forward_features(h)[:, c]; cheaper to train)."""
        out = []
        for head in self.heads:
            z = self._hidden(head, h)
            out.append(head["proj"](z.gather(1, centres[:, None, None].expand(-1, 1, z.shape[2]))[:, 0]))
        return out[0], out[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_features(self.stem_features(x))


def train_explainer(model: GenericExplainer, h: torch.Tensor, centres: torch.Tensor, t_pos: torch.Tensor,
                    t_neg: torch.Tensor, epochs: int, lr: float, batch: int, seed: int) -> list[float]:
    """Minimise the LETA loss on cached stem features h (N, c, g, g), centres (N,), targets (N, d); returns losses.
    The same routine trains the task-specific explainer when the targets are a head's logits (d = n_classes)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(h), generator=g)
        tot = 0.0
        for i in range(0, len(h), batch):
            b = perm[i:i + batch]
            pos, neg = model.forward_at(h[b], centres[b])
            loss = Fn.mse_loss(pos, t_pos[b]) + Fn.mse_loss(neg, t_neg[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss) * len(b)
        losses.append(tot / len(h))
    return losses


def leta_attribution(pos: torch.Tensor, neg: torch.Tensor, W: torch.Tensor, b: torch.Tensor, cls: torch.Tensor,
                     grid: int, r: int = 0, lambda_pos: float = 1.0, lambda_neg: float = 1.0,
                     pool: bool = True) -> torch.Tensor:
    """Rule-based attribution (B, g, g) for the linear head (W (K, d), b (K,)) and classes ``cls`` (B,):
    a_c = lambda_pos * h_cls(phi+_c) - lambda_neg * h_cls(phi-_c); optional (2r+1) average pooling; min-max to [0, 1]."""
    w, bias = W[cls], b[cls]  # (B, d), (B,)
    a = lambda_pos * (torch.einsum("bpd,bd->bp", pos, w) + bias[:, None]) \
        - lambda_neg * (torch.einsum("bpd,bd->bp", neg, w) + bias[:, None])
    a = a.view(-1, grid, grid)
    if pool and r > 0:
        a = Fn.avg_pool2d(a[:, None], 2 * r + 1, stride=1, padding=r, count_include_pad=False)[:, 0]
    return minmax(a)


def minmax(a: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of (B, g, g) maps to [0, 1] (constant maps become 0)."""
    lo = a.flatten(1).min(1).values[:, None, None]
    hi = a.flatten(1).max(1).values[:, None, None]
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def saliency_attribution(encoder: Encoder, W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, cls: torch.Tensor,
                         grid: int) -> torch.Tensor:
    """Plain gradient saliency (Simonyan et al., 2014): |d logit_cls / d x| summed over channels and each patch."""
    x = x.clone().requires_grad_(True)
    logit = (encoder(x) @ W.T + b).gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(logit, x)
    s = g.abs().sum(1, keepdim=True)  # (B, 1, H, W)
    return minmax(Fn.adaptive_avg_pool2d(s, grid)[:, 0])


def integrated_gradients_attribution(encoder: Encoder, W: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                                     cls: torch.Tensor, grid: int, steps: int = 16,
                                     return_raw: bool = False) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al., 2017) of logit_cls from the black image (MNIST's background, the
    deletion metric's fill value): IG = (x - 0) * mean over alpha of d logit_cls / d x at alpha * x, with ``steps``
    midpoint Riemann points; the signed sum over channels and each patch, min-max normalised per image.
    ``return_raw``: also return the pixel attributions (B, C, H, W), whose sum approximates
    logit_cls(x) - logit_cls(0) (completeness)."""
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        xa = (alpha * x).requires_grad_(True)
        logit = (encoder(xa) @ W.T + b).gather(1, cls[:, None]).sum()
        (g,) = torch.autograd.grad(logit, xa)
        total += g
    ig = x * total / steps  # (B, C, H, W)
    a = minmax(Fn.adaptive_avg_pool2d(ig.sum(1, keepdim=True), grid)[:, 0])
    return (a, ig) if return_raw else a


def rise_masks(n_masks: int, grid: int, p_keep: float, generator: torch.Generator) -> torch.Tensor:
    """RISE's random keep-masks (Petsiuk et al., 2018), drawn on the evaluation patch grid: (N, g, g), each patch kept
    independently with probability ``p_keep`` (1 = kept, 0 = set to the black fill)."""
    return (torch.rand(n_masks, grid, grid, generator=generator) < p_keep).float()


def rise_from_scores(scores: torch.Tensor, masks: torch.Tensor, p_keep: float, return_raw: bool = False):
    """RISE saliency from the explained class's scores of the masked images: S_p = sum_i s_i M_i(p) / (N p_keep),
    i.e. a Monte Carlo estimate of E[s | patch p kept]; ``scores`` (B, N), ``masks`` (N, g, g) -> (B, g, g), min-max
    normalised per image (``return_raw``: also the raw map)."""
    raw = torch.einsum("bn,nij->bij", scores, masks) / (len(masks) * p_keep)
    return (minmax(raw), raw) if return_raw else minmax(raw)


@torch.no_grad()
def rise_embeddings(encoder, x: torch.Tensor, masks: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Embeddings (B, N, d) of every image under every RISE mask (patches upsampled to pixels, black fill): computed
    once and shared by all the linear heads explained."""
    B, C, H, W = x.shape
    up = Fn.interpolate(masks[:, None], size=(H, W), mode="nearest")[:, 0]  # (N, H, W)
    imgs = (x[:, None] * up[None, :, None]).reshape(B * len(masks), C, H, W)
    z = torch.cat([encoder(imgs[i:i + batch]) for i in range(0, len(imgs), batch)])
    return z.view(B, len(masks), -1)
