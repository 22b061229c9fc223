"""TangleNAS: Weight-Entanglement meets Gradient-Based Neural Architecture Search (Sukthanker, Krishnakumar, Safari,
Hutter; arXiv 2312.10440, https://arxiv.org/abs/2312.10440).

Official code: github automl/TangleNAS, nanoGPT space (``search_spaces/nanoGPT``):
``model_search.py`` (the entangled GPT: ``_init_arch_parameters`` :255-268, ``forward`` :276-315 incl. the depth
mixture, ``get_best_config`` :317-329 = argmax discretisation), ``mixed_operations/mixed_linear_emb_mlp.py``
(``MixedLinearV2``: W = sum_{e, r} w_{e,r} pad(W[:r e, :e]), the embed x mlp-ratio superposition),
``mixed_embedding.py``, ``mixed_layer_norm.py``, ``mixed_linear_head.py`` (the same padded-slice superposition for the
embedding tables, the LayerNorms and the LM head), ``optimizers/mixop/drnas.py`` (``DRNASMixOpV2``: joint weights of two
choices = outer product of their weights; ``forward_depth``: weighted sum of the hidden states at each depth choice),
``optimizers/sampler/drnas.py`` (weights = Dirichlet(elu(alpha) + 1).rsample() at every forward),
``architect.py`` :11-22 (arch optimiser Adam lr 3e-4, betas (0.5, 0.999), weight decay 1e-3),
``train_search.py`` :411-467 (first-order alternating updates: one architecture step on an "arch" batch (clip 5.0),
then one weight step on a "weights" batch; train_portion 0.5 splits the training data between them). The baseline:
``model_spos.py`` (``sample_random_config`` :202-208: uniform single-path sampling), ``train_spos.py``
(the same weight recipe on the same weight half) and ``spos_re.py`` (AutoFormer-style evolution: population 50,
top-10, 25 mutations (m_prob 0.2, s_prob 0.4), 25 crossovers, 50 generations, fitness = the supernet child's loss).

Here (miniature, issue 16) on the kit's causal ``TinyTransformer`` over bytes:

- :class:`EntangledLinear` (a ``proj_factory`` projection): its weight is ``W_mix = sum_c w_c pad(W[:out_c, :in_c])``
  over the joint choices c of the layer (q, k, v: embed x heads; o: heads x embed; fc1, fc2: embed x mlp ratio),
  ``w_c`` the outer product of the choices' weights (official ``preprocess_combi``). Computed as ``W * M`` with the
  mask ``M = sum_c w_c 1[r < out_c] 1[i < in_c]`` (the same tensor; tested against the explicit padded-slice loop).
- :class:`EntangledLayerNorm`, :meth:`TangleTransformer.embed` and the LM head superpose the embedding-width slices
  the same way; depth: the weighted sum of the hidden states after each depth choice (one pass through all blocks).
- Everything runs in ONE forward pass of the largest network (the entangled weights are formed once per step).

The heads choice uses the kit's fixed head width (AutoFormer convention; official nanoGPT: head width = embed / heads
and one attention call per head choice): see the registry's deviations.
"""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.harness import batches, train_model
from .tiny import TFConfig, TinyTransformer, lm_loss, lm_nll, unigram_nll

ARMS = ("tanglenas", "spos")
SAMPLERS = ("drnas", "darts")
ARCH_KEYS = ("embed", "depth", "heads", "ratio")


# ---------------------------------------------------------------------------------------------- the search space
def space_of(cfg: dict) -> dict:
    """{"embed", "depth", "heads", "ratio"}: the choices (official nanoGPT space: n_embd, n_layer, n_heads, mlp_ratio)."""
    return {"embed": sorted(cfg["embed_choices"]), "depth": sorted(cfg["depth_choices"]),
            "heads": sorted(cfg["heads_choices"]), "ratio": sorted(cfg["ratio_choices"])}


def tf_config(cfg: dict) -> TFConfig:
    """The supernet: the largest width, depth, heads and feed-forward width (max ratio x max embed)."""
    s = space_of(cfg)
    return TFConfig(kind="causal", d_model=max(s["embed"]), n_layers=max(s["depth"]), n_heads=max(s["heads"]),
                    head_dim=cfg["head_dim"], mlp_hidden=max(s["embed"]) * max(s["ratio"]), vocab_size=256,
                    max_len=cfg["seq_len"], dropout=0.0, bias=True)


def arch_to_child(arch: dict) -> dict:
    """A searched architecture {"embed", "depth", "heads": [per layer], "ratio": [per layer]} as a kit child config
    (feed-forward width = ratio x embed, official ``MLP``)."""
    d = int(arch["depth"])
    return {"embed": int(arch["embed"]), "depth": d, "heads": [int(h) for h in arch["heads"][:d]],
            "mlp": [int(r) * int(arch["embed"]) for r in arch["ratio"][:d]]}


def arch_key(arch: dict) -> tuple:
    """Official candidate tuple (``spos_re.py``): (depth, embed, *heads, *ratios)."""
    d = int(arch["depth"])
    return (d, int(arch["embed"]), *[int(h) for h in arch["heads"][:d]], *[int(r) for r in arch["ratio"][:d]])


def key_to_arch(key: tuple) -> dict:
    d = key[0]
    return {"embed": key[1], "depth": d, "heads": list(key[2:2 + d]), "ratio": list(key[2 + d:2 + 2 * d])}


def sample_arch(space: dict, rng: random.Random) -> dict:
    """Uniform single-path sample (official ``model_spos.sample_random_config``): depth and embed once, heads and
    mlp ratio per layer."""
    d = rng.choice(space["depth"])
    return {"embed": rng.choice(space["embed"]), "depth": d, "heads": [rng.choice(space["heads"]) for _ in range(d)],
            "ratio": [rng.choice(space["ratio"]) for _ in range(d)]}


def largest_arch(space: dict) -> dict:
    """The space's largest architecture (the supernet itself as a single path)."""
    d = max(space["depth"])
    return {"embed": max(space["embed"]), "depth": d, "heads": [max(space["heads"])] * d,
            "ratio": [max(space["ratio"])] * d}


# ---------------------------------------------------------------------------------------------- entangled modules
class ArchState:
    """The mixture weights of the current forward pass, shared by every entangled module of one network:
    {"embed": (n_e,), "depth": (n_d,), "heads": (L, n_h), "ratio": (L, n_r)}, rows on the simplex."""

    def __init__(self, space: dict, head_dim: int):
        self.space, self.head_dim = space, head_dim
        self.w: dict[str, torch.Tensor] = {}

    def combos(self, role: str, layer: int) -> tuple[torch.Tensor, list[int], list[int]]:
        """(joint weights (C,), out sizes, in sizes) of a projection's C joint choices; the joint weight of (a, b) is
        w_a * w_b (official ``preprocess_combi``: outer product, flattened row-major)."""
        E, hd = self.space["embed"], self.head_dim
        we = self.w["embed"]
        if role in ("q", "k", "v", "o"):
            H, wo = self.space["heads"], self.w["heads"][layer]
            w = (we[:, None] * wo[None, :]).reshape(-1)
            outs = [h * hd for _ in E for h in H] if role != "o" else [e for e in E for _ in H]
            ins = [e for e in E for _ in H] if role != "o" else [h * hd for _ in E for h in H]
        else:
            R, wo = self.space["ratio"], self.w["ratio"][layer]
            w = (we[:, None] * wo[None, :]).reshape(-1)
            outs = [r * e for e in E for r in R] if role == "fc1" else [e for e in E for _ in R]
            ins = [e for e in E for _ in R] if role == "fc1" else [r * e for e in E for r in R]
        return w, outs, ins

    def embed_mask(self, n: int) -> torch.Tensor:
        """m[c] = sum_i w_embed_i 1[c < e_i] (n,): the superposed padded slices of a width-n vector."""
        return _indicator(self.space["embed"], n, self.w["embed"].device).T @ self.w["embed"]


def _indicator(sizes, n: int, device=None) -> torch.Tensor:
    """(len(sizes), n) float, row c = 1[j < sizes[c]]."""
    s = torch.as_tensor(list(sizes), device=device)
    return (torch.arange(n, device=device)[None, :] < s[:, None]).float()


def superposition_mask(w: torch.Tensor, outs, ins, n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M (n_out, n_in), m_bias (n_out,)) with M = sum_c w_c 1[r < outs_c] 1[i < ins_c] and m_bias = sum_c w_c
    1[r < outs_c], so that W * M = sum_c w_c pad(W[:outs_c, :ins_c]) and b * m_bias = sum_c w_c pad(b[:outs_c])."""
    Io, Ii = _indicator(outs, n_out, w.device), _indicator(ins, n_in, w.device)
    return torch.einsum("c,co,ci->oi", w, Io, Ii), w @ Io


class EntangledLinear(nn.Module):
    """One weight of the largest size; its forward uses the superposition of every choice's padded first-k slice
    (official ``MixedLinearV2``), in one matrix product. Called ``proj(x, out_features)`` like the kit's
    ``DynamicLinear``; the output always has the full width (the padding of smaller choices is zero)."""

    def __init__(self, in_features: int, out_features: int, role: str, layer: int, state: ArchState,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.role, self.layer, self.state = (in_features, out_features, role,
                                                                                   layer, state)
        self.linear = nn.Linear(in_features, out_features, bias)  # names and init as the kit's DynamicLinear
        nn.init.normal_(self.linear.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def entangled_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, outs, ins = self.state.combos(self.role, self.layer)
        M, mb = superposition_mask(w, outs, ins, self.out_features, self.in_features)
        b = self.linear.bias
        return self.linear.weight * M, None if b is None else b * mb

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        W, b = self.entangled_weight()  # (out, in), (out,)
        return F.linear(x, W, b)


class EntangledLayerNorm(nn.Module):
    """LayerNorm over the full width with superposed gain and bias (official ``MixedLayerNormV2``)."""

    def __init__(self, d: int, state: ArchState, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.state, self.eps = state, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.state.embed_mask(x.size(-1))
        return F.layer_norm(x, (x.size(-1),), self.weight * m, self.bias * m, self.eps)


class _Factory:
    def __init__(self, state: ArchState):
        self.state = state

    def __call__(self, in_features, out_features, role, layer, bias=True):
        return EntangledLinear(in_features, out_features, role, layer, self.state, bias)


class TangleTransformer(TinyTransformer):
    """The entangled supernet: architecture parameters ``alpha`` (official ``_init_arch_parameters``: 1e-3 N(0, 1),
    embed (n_e,), depth (n_d,), heads (L, n_h), ratio (L, n_r)); at each forward the weights are drawn by the sampler
    (DrNAS: Dirichlet(elu(alpha) + 1).rsample(); DARTS: softmax(alpha)) unless fixed with :meth:`fix_weights`.
    In eval mode DrNAS uses the Dirichlet mean (deterministic)."""

    def __init__(self, tf: TFConfig, space: dict, sampler: str = "drnas"):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if max(space["embed"]) != tf.d_model or max(space["depth"]) != tf.n_layers or max(space["heads"]) != tf.n_heads \
                or max(space["ratio"]) * max(space["embed"]) != tf.mlp_hidden:
            raise ValueError("the supernet must be the space's largest architecture")
        state = ArchState(space, tf.head_dim)
        super().__init__(tf, _Factory(state))
        self.state, self.space, self.sampler = state, space, sampler
        for blk in self.blocks:
            blk.ln1, blk.ln2 = EntangledLayerNorm(tf.d_model, state), EntangledLayerNorm(tf.d_model, state)
        self.ln_f = EntangledLayerNorm(tf.d_model, state)
        L = tf.n_layers
        self.alpha = nn.ParameterDict({
            "embed": nn.Parameter(1e-3 * torch.randn(len(space["embed"]))),
            "depth": nn.Parameter(1e-3 * torch.randn(len(space["depth"]))),
            "heads": nn.Parameter(1e-3 * torch.randn(L, len(space["heads"]))),
            "ratio": nn.Parameter(1e-3 * torch.randn(L, len(space["ratio"])))})
        self.fixed: dict | None = None

    # ------------------------------------------------------------------ parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha[k] for k in ARCH_KEYS]

    def weight_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    # ------------------------------------------------------------------ mixture weights
    def fix_weights(self, weights: dict | None) -> None:
        """Use these mixture weights (e.g. one-hot) instead of sampling; None: back to the sampler."""
        self.fixed = weights

    def expected_weights(self) -> dict:
        """The deterministic distribution over each choice: softmax (DARTS) or the Dirichlet mean (DrNAS)."""
        out = {}
        for k in ARCH_KEYS:
            a = self.alpha[k]
            if self.sampler == "darts":
                out[k] = torch.softmax(a, -1)
            else:
                c = F.elu(a) + 1
                out[k] = c / c.sum(-1, keepdim=True)
        return out

    def draw_weights(self) -> dict:
        if self.fixed is not None:
            return self.fixed
        if self.sampler == "darts" or not self.training:
            return self.expected_weights()
        return {k: torch.distributions.Dirichlet(F.elu(self.alpha[k]) + 1).rsample() for k in ARCH_KEYS}

    def discretize(self) -> dict:
        """The argmax architecture (official ``get_best_config``): argmax embed and depth, per layer argmax heads and
        mlp ratio for the first ``depth`` layers."""
        s = self.space
        with torch.no_grad():
            d = s["depth"][int(self.alpha["depth"].argmax())]
            return {"embed": s["embed"][int(self.alpha["embed"].argmax())], "depth": d,
                    "heads": [s["heads"][int(i)] for i in self.alpha["heads"].argmax(-1)[:d]],
                    "ratio": [s["ratio"][int(i)] for i in self.alpha["ratio"].argmax(-1)[:d]]}

    # ------------------------------------------------------------------ forward (one pass of the largest network)
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        m = self.state.embed_mask(self.cfg.d_model)
        return self.tok.weight[x] * m + self.pos[:, :T] * m  # (B, T, d): official MixedEmbeddingV2 (tok and pos)

    def run_blocks(self, h, mask=None, return_states=False):
        depth_states, hidden, qkv = [], [h], []
        for li, blk in enumerate(self.blocks):
            h, s = blk(h, True, mask)
            if li + 1 in self.space["depth"]:
                depth_states.append(h)
            if return_states:
                hidden.append(h)
                qkv.append(s)
        wd = self.state.w["depth"]
        out = sum(w * z for w, z in zip(wd, depth_states))  # official forward_depth
        return out, hidden, qkv

    def pool_head(self, h, mask=None):
        h = self.ln_f(h)
        m = self.state.embed_mask(self.cfg.d_model)
        return F.linear(h, self.head.linear.weight * m, self.head.linear.bias)  # official MixedLinearHeadV2 (bias kept whole)

    def forward(self, x, mask=None, return_states=False):
        self.state.w = self.draw_weights()
        self.active_embed, self.active_depth = self.cfg.d_model, self.cfg.n_layers
        return super().forward(x, mask, return_states)

    def set_active_subnet(self, cfg):
        raise NotImplementedError("the entangled supernet runs every choice superposed; use fix_weights")

    def get_active_subnet(self):
        raise NotImplementedError("train the discretised architecture standalone (train_standalone)")


def one_hot_weights(space: dict, arch: dict, n_layers: int) -> dict:
    """Mixture weights that select ``arch`` (layers beyond its depth: the first choice, unused)."""
    def oh(choices, v):
        t = torch.zeros(len(choices))
        t[choices.index(v)] = 1.0
        return t
    d = arch["depth"]
    return {"embed": oh(space["embed"], arch["embed"]), "depth": oh(space["depth"], d),
            "heads": torch.stack([oh(space["heads"], arch["heads"][i] if i < d else space["heads"][0])
                                  for i in range(n_layers)]),
            "ratio": torch.stack([oh(space["ratio"], arch["ratio"][i] if i < d else space["ratio"][0])
                                  for i in range(n_layers)])}


def alpha_movement(model: TangleTransformer) -> float:
    """Mean over the choice rows (embed, depth, each layer's heads and ratio) of the total-variation distance of the
    expected mixture weights from uniform: 0 at uniform, the gate "alphas move" measures it after search."""
    tv = []
    with torch.no_grad():
        for k, p in model.expected_weights().items():
            p = p.reshape(-1, p.shape[-1])
            tv += (0.5 * (p - 1.0 / p.shape[-1]).abs().sum(-1)).tolist()
    return float(np.mean(tv))


def argmax_margins(model: TangleTransformer) -> dict:
    """Per choice row, the gap between the largest and the second-largest expected mixture weight (how decided the
    argmax pick is; 0 = a tie): {"embed": float, "depth": float, "heads": [per layer], "ratio": [per layer]}."""
    out = {}
    with torch.no_grad():
        for k, p in model.expected_weights().items():
            top2 = p.reshape(-1, p.shape[-1]).topk(2, -1).values
            m = (top2[:, 0] - top2[:, 1]).tolist()
            out[k] = [round(float(x), 6) for x in m] if p.dim() > 1 else round(float(m[0]), 6)
    return out


# ---------------------------------------------------------------------------------------------- training recipes
def _opt(cfg: dict, seed: int, params) -> dict:
    """The shared weight recipe (nanoGPT): AdamW, weight decay on matrices only, cosine with linear warm-up, clip."""
    params = list(params)
    return dict(params=params, no_decay=[p for p in params if p.dim() < 2], lr=cfg["lr"], optimizer="adamw",
                betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=seed,
                schedule="cosine", warmup_steps=cfg["warmup_steps"], grad_clip=cfg["grad_clip"])


def split_train(data: dict, train_portion: float) -> tuple[dict, tuple]:
    """(data with "train" = the weights' part, (X, Y) of the architecture's part): official train_portion split."""
    X, Y = data["train"]
    n = int(round(train_portion * len(X)))
    return {**data, "train": (X[:n], Y[:n])}, (X[n:], Y[n:])


def build_tangle(cfg: dict, seed: int) -> TangleTransformer:
    torch.manual_seed(seed)
    return TangleTransformer(tf_config(cfg), space_of(cfg), cfg["sampler"])


def build_spos(cfg: dict, seed: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(tf_config(cfg))


def train_tanglenas(data: dict, cfg: dict, seed: int):
    """First-order alternating search (official ``train_search.py``): each step, one architecture update on an arch
    batch (Adam, gradient-norm clip ``arch_grad_clip``), the weights' gradients of that pass discarded, then one
    weight update on a weights batch (the shared AdamW recipe). Returns (model, weight losses, arch losses,
    alpha-movement trajectory)."""
    model = build_tangle(cfg, seed)
    wdata, (Xa, Ya) = split_train(data, cfg["train_portion"])
    arch = model.arch_parameters()
    opt_a = torch.optim.Adam(arch, lr=cfg["arch_lr"], betas=tuple(cfg["arch_betas"]),
                             weight_decay=cfg["arch_weight_decay"])
    it_a = batches(Xa, Ya, cfg["batch_size"], torch.Generator().manual_seed(10_000 + seed))
    arch_losses, moves = [], []

    def loss_fn(m, x, y, step):
        xa, ya = next(it_a)
        la = lm_loss(m, xa, ya)
        grads = torch.autograd.grad(la, arch)  # only alpha's gradient (official zeroes the weights' grads after it)
        for p, g in zip(arch, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(arch, cfg["arch_grad_clip"])
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        arch_losses.append(float(la.detach()))
        moves.append(alpha_movement(m))
        return lm_loss(m, x, y)

    losses = train_model(model, wdata, cfg["steps"], loss_fn, **_opt(cfg, seed, model.weight_parameters()))
    for p in arch:
        p.grad = None
    return model, losses, arch_losses, moves


def train_spos(data: dict, cfg: dict, seed: int):
    """Single-path one-shot supernet (official ``train_spos.py``): each step one uniformly sampled child trained on
    a weights batch, the same recipe and weights half as TangleNAS."""
    model = build_spos(cfg, seed)
    wdata, _ = split_train(data, cfg["train_portion"])
    space, rng = space_of(cfg), random.Random(seed)

    def loss_fn(m, x, y, step):
        m.set_active_subnet(arch_to_child(sample_arch(space, rng)))
        return lm_loss(m, x, y)

    losses = train_model(model, wdata, cfg["steps"], loss_fn, **_opt(cfg, seed, model.parameters()))
    model.set_active_subnet(model.max_config())
    return model, losses


def mean_loss(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 512) -> float:
    """Mean next-byte cross-entropy (nats) over every target byte, eval mode (the kit's ``lm_nll``)."""
    return lm_nll(model, X, Y, batch_size)


def evolution_search(fitness, space: dict, rng: random.Random, population: int, select: int, mutation: int,
                     crossover: int, generations: int, m_prob: float, s_prob: float):
    """AutoFormer / official ``spos_re.py`` evolution (lower fitness = better): a random population; each generation
    keeps the top ``select`` of everything evaluated, makes ``mutation`` mutants (depth and embed re-drawn with
    ``s_prob`` (new layers get random heads / ratios), each layer's heads and ratio with ``m_prob``) and
    ``crossover`` children (two parents of equal depth, each gene from either), and fills up with random
    candidates; every candidate is evaluated once. Returns (best arch, {key: fitness} in evaluation order)."""
    seen: dict[tuple, float] = {}

    def add(cands):
        for c in cands:
            if c not in seen:
                seen[c] = float(fitness(key_to_arch(c)))

    def legal_batch(make, num):
        out, tries = [], 0
        while len(out) < num and tries < 10 * max(num, 1):
            tries += 1
            c = make()
            if c not in seen and c not in out:
                out.append(c)
        return out

    def top(k):
        return sorted(seen, key=lambda c: (seen[c], c))[:k]

    def mutate(parent):
        a = key_to_arch(parent)
        d, heads, ratio, e = a["depth"], list(a["heads"]), list(a["ratio"]), a["embed"]
        if rng.random() < s_prob:
            nd = rng.choice(space["depth"])
            if nd > d:
                ratio += rng.choices(space["ratio"], k=nd - d)
                heads += rng.choices(space["heads"], k=nd - d)
            heads, ratio, d = heads[:nd], ratio[:nd], nd
        for i in range(d):
            if rng.random() < m_prob:
                ratio[i] = rng.choice(space["ratio"])
        for i in range(d):
            if rng.random() < m_prob:
                heads[i] = rng.choice(space["heads"])
        if rng.random() < s_prob:
            e = rng.choice(space["embed"])
        return arch_key({"embed": e, "depth": d, "heads": heads, "ratio": ratio})

    def cross(parents):
        p1, p2 = rng.choice(parents), rng.choice(parents)
        for _ in range(50):
            if len(p1) == len(p2):
                break
            p1, p2 = rng.choice(parents), rng.choice(parents)
        if len(p1) != len(p2):
            return p1
        return tuple(a if rng.randint(0, 1) == 0 else b for a, b in zip(p1, p2))

    add(legal_batch(lambda: arch_key(sample_arch(space, rng)), population))
    for _ in range(generations):
        parents = top(select)
        cands = legal_batch(lambda: mutate(rng.choice(parents)), mutation)
        cands += [c for c in legal_batch(lambda: cross(parents), crossover) if c not in cands]
        add(cands)
        add(legal_batch(lambda: arch_key(sample_arch(space, rng)), population - len(cands)))
    return key_to_arch(top(1)[0]), seen


def spos_fitness(model: TinyTransformer, X: torch.Tensor, Y: torch.Tensor):
    """Fitness of a child = its mean loss on the given windows, in the SPOS supernet with inherited weights."""
    def fitness(arch):
        model.set_active_subnet(arch_to_child(arch))
        return mean_loss(model, X, Y)
    return fitness


def standalone_model(cfg: dict, arch: dict, seed: int) -> TinyTransformer:
    """The discretised architecture as its own network: a ``TinyTransformer`` of the child's embed / depth and its
    largest per-layer heads / feed-forward width, fixed to the child (unused slices never enter the forward)."""
    child = arch_to_child(arch)
    torch.manual_seed(seed)
    tf = replace(tf_config(cfg), d_model=child["embed"], n_layers=child["depth"], n_heads=max(child["heads"]),
                 mlp_hidden=max(child["mlp"]), loops=())
    m = TinyTransformer(tf)
    m.set_active_subnet(child)
    return m


def train_standalone(cfg: dict, arch: dict, data: dict, seed: int):
    """Retrain the picked architecture from scratch on ALL training windows (official ``train_base.py``), the same
    recipe for both arms' picks, ``retrain_steps`` steps."""
    m = standalone_model(cfg, arch, seed)
    losses = train_model(m, data, cfg["retrain_steps"], lambda mm, x, y, s: lm_loss(mm, x, y),
                         **_opt(cfg, seed, m.parameters()))
    return m, losses


def n_params_arch(cfg: dict, arch: dict) -> int:
    """Parameters of the architecture as a standalone network (kit ``n_params`` of the child)."""
    return TinyTransformer(tf_config(cfg)).n_params(arch_to_child(arch))


def unigram_loss(data: dict, split: str = "val") -> float:
    """Mean cross-entropy (nats) on ``split`` of the add-one byte unigram of the training targets."""
    return unigram_nll(data["train"][1], data[split][1])


# ---------------------------------------------------------------------------------------------- memory measurement
def training_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_opt_states: int = 2) -> dict:
    """Bytes of one training step, measured on CPU float32: the unique storages autograd saves for backward during
    the forward (``torch.autograd.graph.saved_tensors_hooks``; parameters themselves excluded) plus parameters,
    their gradients and ``n_opt_states`` optimiser states each (Adam: 2). Deterministic (shapes only): a byte COUNT
    (accounting), not a measured peak (allocator caching and transient buffers are not seen)."""
    pids = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in pids:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, x, y)
    del loss
    par = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    act = int(sum(seen.values()))
    return {"activations": act, "params": par, "total": act + par * (2 + n_opt_states)}


__all__ = ["ARMS", "SAMPLERS", "space_of", "tf_config", "arch_to_child", "arch_key", "key_to_arch", "sample_arch",
           "largest_arch", "argmax_margins", "ArchState", "superposition_mask", "EntangledLinear", "EntangledLayerNorm", "TangleTransformer",
           "one_hot_weights", "alpha_movement", "split_train", "build_tangle", "build_spos", "train_tanglenas",
           "train_spos", "mean_loss", "evolution_search", "spos_fitness", "standalone_model", "train_standalone",
           "n_params_arch", "unigram_loss", "training_step_memory"]
