"""One small, elastic transformer family for the elastic / shared / distilled transformer papers (issue 16).

``TinyTransformer(TFConfig(kind=...))`` is a pre-LN transformer in four input flavours:

- ``causal``: a decoder-only language model over token ids (causal mask; the head predicts the next token);
- ``encoder``: a bidirectional encoder over token ids (BERT-style; ``n_classes`` > 0 adds a pooled classifier,
  otherwise the head predicts tokens, e.g. for masked-LM);
- ``vit``: a Vision Transformer over (B, C, H, W) images (non-overlapping patches, a CLS token, a classifier);
- ``frames``: a speech-style encoder over (B, T, F) feature frames (a linear frame projection, mean pooling).

Elastic dimensions, after AutoFormer / HAT / LightHuBERT (a child uses the FIRST-k slice of every weight):
``embed`` (embedding width), ``depth`` (the first d layers), ``heads`` (per layer; the first h heads, the head width
``head_dim`` fixed as in AutoFormer) and ``mlp`` (per layer hidden width of the feed-forward). The projections
q, k, v, o, fc1, fc2 are built by a pluggable ``proj_factory(in_features, out_features, role, layer)``
(default :class:`reprolab.nas.elastic.DynamicLinear`; called with ``bias`` as a fifth argument), so a paper can swap in atom-shared (MASA) or
mixture (Mixture-of-Supernets) projections; any projection is called ``proj(x, out_features)``.
``TFConfig.loops`` repeats a layer's block with its weights shared (recursion, SReT).

``set_active_subnet(cfg)`` / ``sample_config`` / ``max_config`` / ``min_config`` choose a child;
``get_active_subnet()`` returns a standalone ``TinyTransformer`` of the child's size with the inherited weights
(its output equals the supernet child's: tested). ``forward(x, return_states=True)`` also returns every layer's
hidden state and its attention queries / keys / values (for hidden-state and MiniLMv2 distillation).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import DynamicLayerNorm, DynamicLinear

KINDS = ("causal", "encoder", "vit", "frames")
ROLES = ("q", "k", "v", "o", "fc1", "fc2")


@dataclass
class TFConfig:
    kind: str = "causal"
    d_model: int = 64          # the largest embedding width
    n_layers: int = 4          # the largest depth
    n_heads: int = 4           # the largest number of heads
    head_dim: int = 16         # fixed head width (q/k/v width = heads * head_dim)
    mlp_hidden: int = 256      # the largest feed-forward width
    vocab_size: int = 256      # causal / encoder
    max_len: int = 128         # causal / encoder / frames: positions; vit: derived from image and patch size
    n_classes: int = 0         # encoder / vit / frames: classifier outputs (encoder: 0 -> token head)
    image_size: int = 16       # vit
    patch_size: int = 4        # vit
    in_channels: int = 1       # vit
    frame_dim: int = 12        # frames: features per frame
    loops: tuple = ()          # per layer number of recursive applications (default 1 each)
    dropout: float = 0.0
    bias: bool = True
    act: str = "gelu"
    pool: str = "auto"         # "cls" (vit), "mean" (frames, encoder classifier) or "auto"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.act not in ("gelu", "relu"):
            raise ValueError(f"act={self.act!r}; allowed: gelu, relu")
        if self.pool not in ("auto", "cls", "mean"):
            raise ValueError(f"pool={self.pool!r}; allowed: auto, cls, mean")
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.kind in ("vit", "frames") and self.n_classes < 1:
            raise ValueError(f"n_classes={self.n_classes}: kind={self.kind!r} needs a classifier (n_classes >= 1)")
        loops = tuple(self.loops) or (1,) * self.n_layers
        if len(loops) != self.n_layers or min(loops) < 1:
            raise ValueError(f"loops={self.loops!r}: one positive count per layer ({self.n_layers})")
        self.loops = loops

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def resolved_pool(self) -> str:
        if self.pool != "auto":
            return self.pool
        return "cls" if self.kind == "vit" else "mean"


def default_proj(in_features: int, out_features: int, role: str, layer: int, bias: bool = True) -> nn.Module:
    return DynamicLinear(in_features, out_features, bias)


class Block(nn.Module):
    """Pre-LN transformer block with elastic width, heads and feed-forward width."""

    def __init__(self, cfg: TFConfig, layer: int, proj_factory: Callable):
        super().__init__()
        d, hq, hid = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.mlp_hidden
        self.cfg, self.layer = cfg, layer
        self.ln1, self.ln2 = DynamicLayerNorm(d), DynamicLayerNorm(d)
        self.q = proj_factory(d, hq, "q", layer, cfg.bias)
        self.k = proj_factory(d, hq, "k", layer, cfg.bias)
        self.v = proj_factory(d, hq, "v", layer, cfg.bias)
        self.o = proj_factory(hq, d, "o", layer, cfg.bias)
        self.fc1 = proj_factory(d, hid, "fc1", layer, cfg.bias)
        self.fc2 = proj_factory(hid, d, "fc2", layer, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.active_heads, self.active_mlp = cfg.n_heads, hid

    def attention(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None):
        """x (B, T, C) -> (attention output (B, T, C), q, k, v each (B, h, T, head_dim))."""
        B, T, C = x.shape
        h, hd = self.active_heads, self.cfg.head_dim
        q, k, v = (p(x, h * hd).view(B, T, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn_mask = None
        if mask is not None:  # (B, T) True = keep
            attn_mask = mask[:, None, None, :].bool()
            if causal:
                attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and mask is None)
        y = y.transpose(1, 2).reshape(B, T, h * hd)
        return self.o(y, C), q, k, v

    def forward(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None):
        a, q, k, v = self.attention(self.ln1(x), causal, mask)
        x = x + self.drop(a)
        act = F.gelu if self.cfg.act == "gelu" else F.relu
        x = x + self.drop(self.fc2(act(self.fc1(self.ln2(x), self.active_mlp)), x.size(-1)))
        return x, (q, k, v)


class TinyTransformer(nn.Module):
    def __init__(self, cfg: TFConfig, proj_factory: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.proj_factory = proj_factory or default_proj
        d = cfg.d_model
        if cfg.kind in ("causal", "encoder"):
            self.tok = nn.Embedding(cfg.vocab_size, d)
            self.pos = nn.Parameter(torch.zeros(1, cfg.max_len, d))
        elif cfg.kind == "vit":
            self.patch = DynamicLinear(cfg.in_channels * cfg.patch_size ** 2, d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.zeros(1, cfg.n_patches + 1, d))
        else:
            self.frame = DynamicLinear(cfg.frame_dim, d)
            self.pos = nn.Parameter(torch.zeros(1, cfg.max_len, d))
        self.blocks = nn.ModuleList(Block(cfg, i, self.proj_factory) for i in range(cfg.n_layers))
        self.ln_f = DynamicLayerNorm(d)
        n_out = cfg.n_classes if cfg.n_classes > 0 else cfg.vocab_size
        self.head = DynamicLinear(d, n_out)
        self.drop = nn.Dropout(cfg.dropout)
        self.active_embed, self.active_depth = d, cfg.n_layers
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init (GPT-2 / ViT)
    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        if hasattr(self, "cls"):
            nn.init.normal_(self.cls, std=0.02)

    # ------------------------------------------------------------------------------------------ elastic interface
    def max_config(self) -> dict:
        c = self.cfg
        return {"embed": c.d_model, "depth": c.n_layers, "heads": [c.n_heads] * c.n_layers,
                "mlp": [c.mlp_hidden] * c.n_layers}

    def config_from(self, embed: int, depth: int, heads: int, mlp: int) -> dict:
        """A uniform child: the same heads / feed-forward width in every active layer."""
        return {"embed": embed, "depth": depth, "heads": [heads] * depth, "mlp": [mlp] * depth}

    def validate_config(self, cfg: dict) -> dict:
        c = self.cfg
        embed, depth = int(cfg["embed"]), int(cfg["depth"])
        heads, mlp = list(cfg["heads"]), list(cfg["mlp"])
        if not 1 <= embed <= c.d_model:
            raise ValueError(f"embed={embed} outside 1..{c.d_model}")
        if not 1 <= depth <= c.n_layers:
            raise ValueError(f"depth={depth} outside 1..{c.n_layers}")
        if len(heads) < depth or len(mlp) < depth:
            raise ValueError(f"heads / mlp need one value per active layer (depth {depth})")
        if any(not 1 <= h <= c.n_heads for h in heads[:depth]):
            raise ValueError(f"heads={heads[:depth]}: each in 1..{c.n_heads}")
        if any(not 1 <= m <= c.mlp_hidden for m in mlp[:depth]):
            raise ValueError(f"mlp={mlp[:depth]}: each in 1..{c.mlp_hidden}")
        return {"embed": embed, "depth": depth, "heads": [int(h) for h in heads[:depth]],
                "mlp": [int(m) for m in mlp[:depth]]}

    def set_active_subnet(self, cfg: dict) -> None:
        cfg = self.validate_config(cfg)
        self.active_embed, self.active_depth = cfg["embed"], cfg["depth"]
        for blk, h, m in zip(self.blocks, cfg["heads"], cfg["mlp"]):
            blk.active_heads, blk.active_mlp = h, m

    def active_config(self) -> dict:
        d = self.active_depth
        return {"embed": self.active_embed, "depth": d, "heads": [b.active_heads for b in self.blocks[:d]],
                "mlp": [b.active_mlp for b in self.blocks[:d]]}

    @staticmethod
    def sample_config(space: dict, rng: random.Random) -> dict:
        """A random child of ``space`` = {"embed": [...], "depth": [...], "heads": [...], "mlp": [...]}: embedding
        width and depth once, heads and feed-forward width per layer (AutoFormer's sampling)."""
        embed, depth = rng.choice(space["embed"]), rng.choice(space["depth"])
        return {"embed": embed, "depth": depth, "heads": [rng.choice(space["heads"]) for _ in range(depth)],
                "mlp": [rng.choice(space["mlp"]) for _ in range(depth)]}

    @staticmethod
    def space_min(space: dict) -> dict:
        d = min(space["depth"])
        return {"embed": min(space["embed"]), "depth": d, "heads": [min(space["heads"])] * d,
                "mlp": [min(space["mlp"])] * d}

    @staticmethod
    def space_max(space: dict) -> dict:
        d = max(space["depth"])
        return {"embed": max(space["embed"]), "depth": d, "heads": [max(space["heads"])] * d,
                "mlp": [max(space["mlp"])] * d}

    def child_tfconfig(self, cfg: dict | None = None) -> TFConfig:
        """The ``TFConfig`` of a standalone network the size of a (uniform-heads, uniform-width) child."""
        cfg = self.validate_config(cfg or self.active_config())
        if len(set(cfg["heads"])) > 1 or len(set(cfg["mlp"])) > 1:
            raise ValueError("a standalone TinyTransformer has one head count and one feed-forward width; "
                             f"child has heads={cfg['heads']} mlp={cfg['mlp']}")
        return replace(self.cfg, d_model=cfg["embed"], n_layers=cfg["depth"], n_heads=cfg["heads"][0],
                       mlp_hidden=cfg["mlp"][0], loops=tuple(self.cfg.loops[:cfg["depth"]]))

    def get_active_subnet(self) -> "TinyTransformer":
        """A standalone network of the active child's size whose weights are the first-k slices of this one's
        (requires the default projections and a uniform child)."""
        if self.proj_factory is not default_proj:
            raise ValueError("get_active_subnet needs the default (sliced) projections")
        sub = TinyTransformer(self.child_tfconfig(), self.proj_factory)
        src = self.state_dict()
        with torch.no_grad():
            for name, p in sub.state_dict().items():
                p.copy_(src[name][tuple(slice(0, s) for s in p.shape)])
        return sub.to(next(self.parameters()).device)

    def n_params(self, cfg: dict | None = None, include_embedding: bool = True) -> int:
        """Parameters of a child (default: the active one), counted from the shapes it slices (accounting)."""
        cfg = self.validate_config(cfg or self.active_config())
        c, e = self.cfg, cfg["embed"]
        b = 1 if c.bias else 0
        n = 0
        for h, m in zip(cfg["heads"], cfg["mlp"]):
            hq = h * c.head_dim
            n += 3 * (e * hq + b * hq) + (hq * e + b * e) + (e * m + b * m) + (m * e + b * e) + 4 * e
        n += 2 * e  # final LN
        n_out = c.n_classes if c.n_classes > 0 else c.vocab_size
        n += e * n_out + n_out
        if include_embedding:
            if c.kind in ("causal", "encoder"):
                n += c.vocab_size * e + c.max_len * e
            elif c.kind == "vit":
                n += (c.in_channels * c.patch_size ** 2 + 1) * e + (c.n_patches + 2) * e
            else:
                n += (c.frame_dim + 1) * e + c.max_len * e
        return n

    def macs(self, cfg: dict | None = None, seq_len: int | None = None) -> int:
        """Multiply-accumulates of one sequence through a child (projections, attention products, head)."""
        cfg = self.validate_config(cfg or self.active_config())
        c, e = self.cfg, cfg["embed"]
        T = seq_len or (c.n_patches + 1 if c.kind == "vit" else c.max_len)
        n = 0
        for li, (h, m) in enumerate(zip(cfg["heads"], cfg["mlp"])):
            hq = h * c.head_dim
            per = T * (4 * e * hq + 2 * e * m) + 2 * T * T * hq
            n += per * c.loops[li]
        n_out = c.n_classes if c.n_classes > 0 else c.vocab_size
        n += (e * n_out) if c.n_classes > 0 else T * e * n_out
        if c.kind == "vit":
            n += c.n_patches * c.in_channels * c.patch_size ** 2 * e
        elif c.kind == "frames":
            n += T * c.frame_dim * e
        return n

    # ------------------------------------------------------------------------------------------ forward
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C * p * p), patches in row-major order."""
        p = self.cfg.patch_size
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        e, kind = self.active_embed, self.cfg.kind
        if kind in ("causal", "encoder"):
            T = x.shape[1]
            if T > self.cfg.max_len:
                raise ValueError(f"sequence length {T} > max_len={self.cfg.max_len}")
            h = self.tok.weight[:, :e][x] + self.pos[:, :T, :e]
        elif kind == "vit":
            if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
                raise ValueError(f"image {tuple(x.shape[-2:])} != image_size={self.cfg.image_size}")
            h = self.patch(self.patchify(x), e)
            h = torch.cat([self.cls[:, :, :e].expand(x.shape[0], -1, -1), h], 1) + self.pos[:, :, :e]
        else:
            T = x.shape[1]
            if T > self.cfg.max_len:
                raise ValueError(f"frames {T} > max_len={self.cfg.max_len}")
            h = self.frame(x, e) + self.pos[:, :T, :e]
        return self.drop(h)

    def run_blocks(self, h: torch.Tensor, mask: torch.Tensor | None = None, return_states: bool = False):
        causal = self.cfg.kind == "causal"
        hidden, qkv = [h], []
        for li, blk in enumerate(self.blocks[:self.active_depth]):
            for _ in range(self.cfg.loops[li]):
                h, s = blk(h, causal, mask)
            if return_states:
                hidden.append(h)
                qkv.append(s)
        return h, hidden, qkv

    def pool_head(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_f(h)
        c = self.cfg
        if c.n_classes > 0:
            if c.resolved_pool == "cls":
                h = h[:, 0]
            elif mask is not None:
                w = mask.to(h.dtype).unsqueeze(-1)
                h = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
            else:
                h = h.mean(1)
        return self.head(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_states: bool = False):
        """``x``: token ids (B, T) (causal / encoder), images (B, C, H, W) (vit) or frames (B, T, F) (frames);
        ``mask`` (B, T) True = a real token / frame (padding masked out of attention and pooling).
        Returns the logits, or with ``return_states`` a dict {"logits", "hidden": [embeddings, layer 1, ...],
        "qkv": [(q, k, v) per layer, each (B, h, T, head_dim)]} (recursive layers report their last loop)."""
        h = self.embed(x)
        if mask is not None and self.cfg.kind == "vit":
            raise ValueError("mask is not used for kind='vit'")
        h, hidden, qkv = self.run_blocks(h, mask, return_states)
        logits = self.pool_head(h, mask)
        if return_states:
            return {"logits": logits, "hidden": hidden, "qkv": qkv}
        return logits


def lm_loss(model: TinyTransformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal model: x (B, T) inputs, y (B, T) targets."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def lm_nll(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over every target of (X, Y), in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for b in range(0, len(X), batch_size):
        logits = model(X[b:b + batch_size])
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), Y[b:b + batch_size].reshape(-1),
                                     reduction="sum"))
        n += Y[b:b + batch_size].numel()
    model.train(was)
    return nll / n


def unigram_nll(train_targets: torch.Tensor, eval_targets: torch.Tensor, vocab: int = 256) -> float:
    """Mean cross-entropy (nats) on ``eval_targets`` of the add-one-smoothed unigram of ``train_targets``: the
    floor a language model must beat."""
    counts = torch.bincount(train_targets.reshape(-1), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_targets.reshape(-1)].mean())


def config_dict(cfg: TFConfig) -> dict:
    d = asdict(cfg)
    d["loops"] = list(cfg.loops)
    return d


__all__ = ["TFConfig", "TinyTransformer", "Block", "default_proj", "lm_loss", "lm_nll", "unigram_nll", "config_dict", "KINDS", "ROLES"]
