"""Sliced Recursive Transformer (SReT; Shen, Liu & Xing, ECCV 2022, https://arxiv.org/abs/2111.05297), in miniature.

Follows the official code, github.com/szq0214/SReT (``SReT.py``; ``SReT_wo_slice.py`` is the same without slicing):

* **recursion** (``Transformer.__init__``, SReT.py:140-168): ``recursive_num`` blocks, each applied
  ``depth / recursive_num`` times in a row with the SAME weights (``RT.append(blocks[rn])`` for every loop);
* **learnable residual coefficients** (``LearnableCoefficient``, SReT.py:24-31, ``Transformer_Block.forward``
  SReT.py:124-128): ``x = a1 * x + a2 * attn(LN(x)); x = a3 * x + a4 * mlp(LN(x))`` with four scalars per block, each
  initialised to 1 (shared across the loops, since they belong to the shared block);
* **non-linear projection layers (NLL)** (``Non_proj``, SReT.py:52-65): after EVERY application of a block, a
  non-shared ``x = b1 * x + b2 * MLP(LN(x))`` (hidden ``np_mlp_ratio * dim``, GELU; its own two coefficients);
* **sliced group self-attention** (``Group_Attention``, SReT.py:67-104): the first application of a block splits the
  tokens into ``groups1`` contiguous groups (raster order) and attends inside each group; later applications use
  ``groups2`` groups after a random permutation of the tokens (``torch.randperm(N)``, undone after the attention;
  no permutation when ``groups2 == 1``). Official SReT_T: groups1 [8, 4, 1], groups2 [2, 1, 1] per stage. The
  permutation is drawn at training AND evaluation time (as the official code); here from the model's own seeded
  ``torch.Generator`` (``perm_seed``) so that evaluations are reproducible;
* no class token: global average pooling, then LayerNorm, then the classifier (``forward_features``, SReT.py:313-329);
* the official conv stem (``conv_embedding``, SReT.py:202-230), or its first convolution(s) only (``stem_strides`` has
  one stride per kept conv): on a 16 px image the full stem's receptive field covers most of the digit and the stem
  alone solves MNIST, leaving nothing to the blocks under test; the quick profile keeps one conv.

The network is the issue-16 kit's ``TinyTransformer(kind="vit")`` with its projections (``DynamicLinear`` q, k, v,
o, fc1, fc2), blocks replaced by :class:`SReTBlock` (a subclass of the kit's ``Block``). ``TFConfig.loops`` is the
recursion count per block. The plain ViT baseline is the same class with one loop, no NLL and fixed unit residual
coefficients (a standard pre-LN block).

Arms (:func:`arm_spec`): ``plain`` (L blocks), ``recursion`` (naive recursion: the same L blocks looped, learnable
coefficients; equal parameters up to 4 scalars a block), ``sret`` (recursion + NLL with a narrower feed-forward so that
the parameter count matches ``plain``; the official SReT without slicing), ``sliced`` (``sret`` + sliced group
attention) and ``deep`` (a plain ViT with L * loops distinct blocks: the same computation depth, loops x the block
parameters; a reference). Diagnostic arm ``stem``: the same network with NO transformer block (stem -> positions ->
pool -> LayerNorm -> head), to show how much of the task is left to the blocks whose depth / recursion is under test.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.harness import evaluate, image_data, train_model
from .tiny import Block, TFConfig, TinyTransformer

ARMS = ("plain", "recursion", "sret", "sliced", "deep")
DIAGNOSTIC_ARMS = ("stem",)  # the stem alone (no transformer block): how much of the task the blocks still have to do
ALL_ARMS = ARMS + DIAGNOSTIC_ARMS


# ------------------------------------------------------------------------------------------------------- modules
def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Self-attention inside ``groups`` contiguous token groups. q, k, v: (B, h, N, hd) -> (B, h, N, hd).
    Explicit ``softmax(q k^T / sqrt(hd)) v`` as the official ``Group_Attention`` (SReT.py:91-99)."""
    B, h, N, hd = q.shape
    if N % groups:
        raise ValueError(f"{N} tokens cannot be split into {groups} equal groups")
    n = N // groups
    q, k, v = (t.reshape(B, h, groups, n, hd) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * hd ** -0.5
    return (att.softmax(-1) @ v).reshape(B, h, N, hd)


class SReTBlock(Block):
    """The kit's pre-LN block with SReT's four learnable residual coefficients and sliced group attention."""

    def __init__(self, cfg: TFConfig, layer: int, proj_factory, learnable_coef: bool = True):
        super().__init__(cfg, layer, proj_factory)
        if learnable_coef:  # official: four LearnableCoefficient(), each nn.Parameter(torch.ones(1))
            self.coef = nn.Parameter(torch.ones(4))
        else:  # plain ViT: unit residual weights, not trained
            self.register_buffer("coef", torch.ones(4), persistent=False)

    def attention(self, x: torch.Tensor, groups: int = 1, perm: torch.Tensor | None = None):
        B, N, C = x.shape
        h, hd = self.active_heads, self.cfg.head_dim
        if perm is not None:
            x = x[:, perm]
        q, k, v = (p(x, h * hd).view(B, N, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = group_attention(q, k, v, groups).transpose(1, 2).reshape(B, N, h * hd)
        if perm is not None:
            y = y[:, torch.argsort(perm)]
        return self.o(y, C), q, k, v

    def forward(self, x: torch.Tensor, groups: int = 1, perm: torch.Tensor | None = None):
        c = self.coef
        a, q, k, v = self.attention(self.ln1(x), groups, perm)
        x = c[0] * x + c[1] * self.drop(a)
        act = F.gelu if self.cfg.act == "gelu" else F.relu
        m = self.fc2(act(self.fc1(self.ln2(x), self.active_mlp)), x.size(-1))
        x = c[2] * x + c[3] * self.drop(m)
        return x, (q, k, v)


class NonProj(nn.Module):
    """Official ``Non_proj`` (SReT.py:52-65): ``x = b1 * x + b2 * fc2(gelu(fc1(LN(x))))``, non-shared."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.coef = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coef[0] * x + self.coef[1] * self.fc2(F.gelu(self.fc1(self.norm(x))))


def stem_channels(dim: int, n_convs: int) -> tuple:
    """Output channels of the first ``n_convs`` convolutions of the official stem, the last one giving ``dim``:
    3 -> (dim/2, dim, dim) (official), 2 -> (dim/2, dim), 1 -> (dim,)."""
    if n_convs not in (1, 2, 3):
        raise ValueError(f"the conv stem has 1 to 3 convolutions, not {n_convs}")
    return ((dim,), (dim // 2, dim), (dim // 2, dim, dim))[n_convs - 1]


def conv_embedding(in_channels: int, dim: int, strides=(2, 2, 2)) -> nn.Sequential:
    """Official ``conv_embedding`` (SReT.py:202-230): three 3x3 convolutions (dim/2, dim, dim channels), each with
    BatchNorm and ReLU; official strides (2, 2, 2) on 224 px, here ``strides`` for a small image. One stride per
    convolution: ``len(strides)`` < 3 keeps only the first convolutions (:func:`stem_channels`), so that the stem's
    receptive field stays a small part of a small image (3 convs: 3 + 2 s1 + 2 s1 s2 px; 1 conv: 3 px)."""
    layers, cin = [], in_channels
    for s, cout in zip(strides, stem_channels(dim, len(strides))):
        layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=True), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers)


class SReTViT(TinyTransformer):
    """A single-stage (Sliced) Recursive ViT: patches -> [block_i applied loops_i times, NLL after each
    application] -> global average pool -> LayerNorm -> classifier. ``groups`` = (groups1, groups2)."""

    def __init__(self, cfg: TFConfig, nll_hidden: int = 0, learnable_coef: bool = True, groups=(1, 1),
                 perm_seed: int = 0, stem_strides=None):
        if cfg.kind != "vit":
            raise ValueError("SReTViT needs kind='vit'")
        super().__init__(cfg)
        d = cfg.d_model
        del self.cls  # no class token (official: global average pooling)
        self.stem_strides = tuple(int(s) for s in stem_strides) if stem_strides else None
        if self.stem_strides is not None:
            if len(self.stem_strides) not in (1, 2, 3) or int(np.prod(self.stem_strides)) != cfg.patch_size:
                raise ValueError(f"stem_strides={stem_strides}: 1 to 3 strides, product = patch_size {cfg.patch_size}")
            del self.patch
            self.stem = conv_embedding(cfg.in_channels, d, self.stem_strides)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_patches, d))
        self.blocks = nn.ModuleList(SReTBlock(cfg, i, self.proj_factory, learnable_coef) for i in range(cfg.n_layers))
        self.nll = nn.ModuleList(NonProj(d, nll_hidden) for _ in range(sum(cfg.loops))) if nll_hidden else None
        self.nll_hidden = int(nll_hidden)
        g1, g2 = (int(g) for g in groups)
        for g in (g1, g2):
            if g < 1 or cfg.n_patches % g:
                raise ValueError(f"groups={groups}: each must divide the {cfg.n_patches} tokens")
        self.groups = (g1, g2)
        self.perm_gen = torch.Generator().manual_seed(int(perm_seed))
        self.reset_parameters()

    def set_perm_seed(self, seed: int) -> None:
        self.perm_gen.manual_seed(int(seed))

    def schedule(self) -> list[tuple[int, int, int]]:
        """(block, loop, groups) of every application in order: loop 0 uses groups1, later loops groups2."""
        return [(li, r, self.groups[0] if r == 0 else self.groups[1])
                for li in range(self.active_depth) for r in range(self.cfg.loops[li])]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
            raise ValueError(f"image {tuple(x.shape[-2:])} != image_size={self.cfg.image_size}")
        if self.stem_strides is None:
            h = self.patch(self.patchify(x), self.active_embed)
        else:
            h = self.stem(x).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, h*w, d), row-major as patchify
        return self.drop(h + self.pos)

    def run_blocks(self, h: torch.Tensor, mask=None, return_states: bool = False):
        hidden, qkv = [h], []
        N = h.shape[1]
        for j, (li, r, g) in enumerate(self.schedule()):
            perm = torch.randperm(N, generator=self.perm_gen) if (r > 0 and g != 1) else None
            h, s = self.blocks[li](h, g, perm)
            if self.nll is not None:
                h = self.nll[j](h)
            if return_states and r == self.cfg.loops[li] - 1:
                hidden.append(h)
                qkv.append(s)
        return h, hidden, qkv

    def pool_head(self, h: torch.Tensor, mask=None) -> torch.Tensor:
        return self.head(self.ln_f(h.mean(1)))  # official: avgpool -> norm -> head

    def count_params(self) -> int:
        """Trainable parameters, counted from the module (each shared block once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def macs(self, cfg=None, seq_len=None) -> int:
        """Multiply-accumulates of one image (every matrix product: patch embedding, q/k/v/o, the group attention
        products, feed-forward, NLL, classifier); sliced attention costs 2 * N * (N / g) * h * hd per application."""
        c = self.cfg
        N, d, hq, m = c.n_patches, c.d_model, c.n_heads * c.head_dim, c.mlp_hidden
        if self.stem_strides is None:
            n = N * c.in_channels * c.patch_size ** 2 * d
        else:
            n, hw, cin = 0, c.image_size, c.in_channels
            for s_, cout in zip(self.stem_strides, stem_channels(d, len(self.stem_strides))):
                hw = (hw + 2 - 3) // s_ + 1
                n += hw * hw * cout * cin * 9
                cin = cout
        for _, _, g in self.schedule():
            n += N * (4 * d * hq + 2 * d * m) + 2 * N * (N // g) * hq
            n += 2 * N * d * self.nll_hidden
        return n + d * c.n_classes


# ------------------------------------------------------------------------------------------------------- arms
def arm_spec(arm: str, cfg: dict) -> dict:
    """The architecture of an arm: blocks, loops per block, feed-forward width, NLL width, coefficients, groups."""
    if arm not in ALL_ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ALL_ARMS)}")
    d = cfg["n_heads"] * cfg["head_dim"]  # official embed_dim = base_dim * heads
    L, R = cfg["n_blocks"], cfg["loops"]
    plain_mlp = int(round(cfg["mlp_ratio"] * d))
    spec = {"n_layers": L, "loops": 1, "mlp_hidden": plain_mlp, "nll_hidden": 0, "learnable_coef": False,
            "groups": (1, 1)}
    if arm == "recursion":
        spec.update(loops=R, learnable_coef=True)
    elif arm in ("sret", "sliced"):
        spec.update(loops=R, learnable_coef=True, mlp_hidden=int(round(cfg["sret_mlp_ratio"] * d)),
                    nll_hidden=int(round(cfg["np_mlp_ratio"] * d)))
        if arm == "sliced":
            spec["groups"] = (cfg["groups1"], cfg["groups2"])
    elif arm == "deep":
        spec.update(n_layers=L * R)
    elif arm == "stem":
        spec.update(n_layers=0)
    return spec


def build_model(arm: str, cfg: dict, seed: int, image_size: int) -> SReTViT:
    """The arm's network, initialised from ``seed`` (kit init: normal(0.02) linears and positions, unit LN)."""
    s = arm_spec(arm, cfg)
    L = max(1, s["n_layers"])  # the kit's TFConfig needs a layer; the stem arm drops it below
    tcfg = TFConfig(kind="vit", d_model=cfg["n_heads"] * cfg["head_dim"], n_layers=L,
                    n_heads=cfg["n_heads"], head_dim=cfg["head_dim"], mlp_hidden=s["mlp_hidden"], n_classes=10,
                    image_size=image_size, patch_size=int(np.prod(cfg["stem_strides"])), in_channels=1,
                    loops=(s["loops"],) * L, dropout=0.0)
    torch.manual_seed(seed)
    model = SReTViT(tcfg, s["nll_hidden"], s["learnable_coef"], s["groups"], perm_seed=seed,
                    stem_strides=cfg["stem_strides"])
    if s["n_layers"] == 0:  # stem arm: no transformer block at all (schedule() is empty, MACs / params without it)
        model.blocks, model.active_depth = nn.ModuleList(), 0
    return model


def no_decay_params(model: nn.Module) -> list:
    """timm ``create_optimizer`` (DeiT / SReT training code): no weight decay on 1-D parameters (biases, LayerNorm,
    the residual coefficients) and on the position embedding (``no_weight_decay``)."""
    return [p for n, p in model.named_parameters() if p.ndim <= 1 or n == "pos"]


def load_data(dataset: str = "mnist5k", size: int | None = 16, split_seed: int = 0) -> dict:
    """Real images (the shared harness's stratified 60/20/20 split, standardised, resized to ``size``)."""
    return image_data(dataset, split_seed=split_seed, size=size)


def train_arm(arm: str, data: dict, cfg: dict, seed: int) -> tuple[SReTViT, list[float]]:
    """Train one arm: AdamW, cosine with linear warm-up, label smoothing (the DeiT recipe SReT trains with), the
    same steps, batches (seeded) and initialisation seed for every arm."""
    size = int(data["train"][0].shape[-1])
    model = build_model(arm, cfg, seed, size)
    ls = cfg["label_smoothing"]

    def loss_fn(m, x, y, step):
        return F.cross_entropy(m(x), y, label_smoothing=ls)

    curve = train_model(model, data, cfg["steps"], loss_fn, lr=cfg["lr"], optimizer="adamw",
                        weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=seed,
                        schedule="cosine", warmup_steps=cfg["warmup_steps"], no_decay=no_decay_params(model),
                        grad_clip=cfg["grad_clip"])
    return model, curve


def evaluate_arm(model: SReTViT, data: dict, seed: int) -> dict:
    """val / test accuracy; the sliced arms' token permutations come from a generator reset to ``seed`` first."""
    out = {}
    for split in ("val", "test"):
        model.set_perm_seed(10_000 + seed)
        out[split] = evaluate(model, data, split)
    return out


def coefficients(model: SReTViT) -> dict:
    """The learned residual coefficients (blocks: a1..a4; NLL: b1, b2), for the notebook."""
    out = {}
    if len(model.blocks) and isinstance(model.blocks[0].coef, nn.Parameter):
        out["blocks"] = [[round(float(v), 4) for v in b.coef.detach()] for b in model.blocks]
    if model.nll is not None:
        out["nll"] = [[round(float(v), 4) for v in m.coef.detach()] for m in model.nll]
    return out


def unrolled_copy(model: SReTViT) -> SReTViT:
    """An equivalent network with one loop per block and each loop an independent deep copy of the shared block
    (for tests: recursion == unrolled copies with shared weights)."""
    c = model.cfg
    total = sum(c.loops)
    ucfg = replace(c, n_layers=total, loops=(1,) * total)
    u = SReTViT.__new__(SReTViT)
    nn.Module.__init__(u)
    u.cfg, u.proj_factory = ucfg, model.proj_factory
    u.pos, u.ln_f, u.head, u.drop, u.stem_strides = model.pos, model.ln_f, model.head, model.drop, model.stem_strides
    if model.stem_strides is None:
        u.patch = model.patch
    else:
        u.stem = model.stem
    u.active_embed, u.active_depth = model.active_embed, total
    u.blocks = nn.ModuleList(copy.deepcopy(model.blocks[li]) for li, _, _ in model.schedule())
    u.nll, u.nll_hidden, u.groups = model.nll, model.nll_hidden, (1, 1)
    u.perm_gen = torch.Generator().manual_seed(0)
    return u


__all__ = ["ARMS", "DIAGNOSTIC_ARMS", "ALL_ARMS", "stem_channels", "group_attention", "SReTBlock", "NonProj", "SReTViT", "arm_spec", "build_model",
           "no_decay_params", "load_data", "train_arm", "evaluate_arm", "coefficients", "unrolled_copy"]
