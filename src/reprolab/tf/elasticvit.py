"""ElasticViT: Conflict-aware Supernet Training for Deploying Fast Vision Transformer on Diverse Mobile Devices
(Tang et al., ICCV 2023, https://arxiv.org/abs/2303.09730). Official code: microsoft/Moonlit, folder ``ElasticViT``
(``process.py`` training step, ``models/model.py`` sampler and memory banks, ``util/loss_ops.py`` losses,
``configs/final_3min_space.yaml`` recipe); file:line of every departure in ``elasticvit.paper.yaml``.

Each training step trains ``modes = [uniform, uniform, uniform, min]`` (config ``sampling_mode``): three children drawn
by the sampler, then the min child, gradients accumulated, adaptive gradient clipping (AGC, factor 0.1), one AdamW step.

* **FLOPs tiers** ("banks", ``bank_flops_ranges``): target complexities F_0 < ... < F_{K-1}; tier b holds the
  subnets with F_b <= MACs <= F_b + 2 * flops_bound (the official offline "FLOPs tables": distinct archs in the window,
  drawn uniformly; here the whole window, enumerated exactly: the miniature space has 360 subnets).
* **Complexity-aware sampling** (``flops_sampling_method: adjacent_step``, ``get_bank_id``, process.py:104-116): one
  tier per step, a random walk: b_t = b_{t-1} + choice([-1, 0, 1]) ([0, 0, 1] at the bottom, [-1, 0, 0] at the top);
  every uniform child of the step comes from tier b_t. So the MACs of consecutive steps' children differ by at most one
  tier spacing + 2 * flops_bound, while the walk visits every tier. Baseline ``random`` (model.py:665-667): every
  child draws its tier uniformly at random (AttentiveNAS-style uniform over complexity).
* **Performance-aware sampling** (``model_sampling_method: preference``, model.py:672-702): one memory bank per tier
  (size ``bank_size``) of (subnet, -CE on a recent batch). With probability q (``bank_sampling_rate``, + ``sampling_rate
  _inc`` every sixth of training: train_eval_supernet.py:215-216) and a bank more than half full, the child is drawn
  from the bank with probabilities softmax(-CE) (``weighted_prob``); otherwise ``n_candidates`` (5) subnets are drawn
  from the tier and the one preferred by the **path preference rule** (``_importance_comparison``, model.py:166-253) is
  kept: against an anchor (the best subnet of the lowest tier's bank; the min subnet when the target is the lowest
  tier), diff = MACs(candidate with the anchor's width) - MACs(candidate with the anchor's depth); the smallest diff
  wins (wider-and-shallower growth from a good small subnet). A trained child not drawn from the bank enters its tier's
  bank (``bank_arch_update``, model.py:285-344; replaces the worst when full and better); the current tier's bank losses
  are refreshed every quarter epoch and every bank at each epoch start (``bank_loss_update``).
* **Losses**: the uniform children learn from the labels (label-smoothed CE; official: the two external teachers'
  soft labels, which this miniature lacks), the min child from the mean of the uniform children's softmax by the
  AlphaNet **alpha-divergence** (``AdaptiveLossSoft``, alpha in [-1, 1], importance weights clipped at 5).

The gradient conflict measure (the claim; same in every arm): every ``cos_every`` steps, the cosine between the
gradient of step t's sampled (uniform) children and that of step t-1's sampled children, both on step t's batch at the
current weights (label-smoothed CE as in training; the min child, the same in every arm, left out), so that batch noise
and the weight update cancel and only the sampler's choice of consecutive subnets differs. The whole-step cosine of
consecutive steps (different batches, min child included) is logged as context (``cos``).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.harness import batches, flat_grad, image_data, lr_at
from .tiny import TFConfig, TinyTransformer

ARMS = ("uniform", "complexity", "elasticvit")
# arm -> (flops_sampling_method, model_sampling_method, memory bank used)
ARM_FLAGS = {"uniform": ("random", "uniform", False), "complexity": ("adjacent_step", "uniform", False),
             "elasticvit": ("adjacent_step", "preference", True)}


# ---------------------------------------------------------------------------------------------------------- space
def load_data(dataset: str = "digits", size: int | None = None, split_seed: int = 0) -> dict:
    return image_data(dataset, split_seed=split_seed, size=size)


def build_supernet(cfg: dict, image_size: int) -> TinyTransformer:
    """The ViT supernet: largest embed, depth and MLP width of the space; heads = embed // head_dim (official
    ``num_heads`` overridden by ``head_dims``)."""
    e = max(cfg["embed_list"])
    tf = TFConfig(kind="vit", d_model=e, n_layers=max(cfg["depth_list"]), n_heads=e // cfg["head_dim"],
                  head_dim=cfg["head_dim"], mlp_hidden=max(cfg["mlp_ratio_list"]) * e, n_classes=10,
                  image_size=image_size, patch_size=cfg["patch_size"], in_channels=1)
    return TinyTransformer(tf)


def make_config(embed: int, ratios, head_dim: int) -> dict:
    """A child: embedding width, one MLP ratio per layer (depth = len(ratios)), heads tied to the width."""
    ratios = [int(r) for r in ratios]
    return {"embed": int(embed), "depth": len(ratios), "heads": [int(embed) // head_dim] * len(ratios),
            "mlp": [r * int(embed) for r in ratios]}


def ratios_of(config: dict) -> list[int]:
    return [m // config["embed"] for m in config["mlp"]]


def arch_key(config: dict) -> tuple:
    return (config["embed"], tuple(config["mlp"]))


def enumerate_configs(cfg: dict) -> list[dict]:
    """Every subnet of the space (embed x depth x per-layer MLP ratio), in a fixed order."""
    out = []
    for e in cfg["embed_list"]:
        for d in cfg["depth_list"]:
            for rs in itertools.product(cfg["mlp_ratio_list"], repeat=d):
                out.append(make_config(e, rs, cfg["head_dim"]))
    return out


def build_tiers(configs: list[dict], macs_fn, n_tiers: int, bound_frac: float) -> dict:
    """FLOPs tiers: targets F_b evenly spaced from the smallest subnet's MACs up to max - 2 * bound, bound =
    bound_frac * spacing; pools[b] = the subnets with F_b <= MACs <= F_b + 2 * bound (sorted by MACs, then key)."""
    macs = np.array([macs_fn(c) for c in configs], dtype=float)
    lo, hi = float(macs.min()), float(macs.max())
    spacing = (hi - lo) / ((n_tiers - 1) + 2 * bound_frac)
    bound = bound_frac * spacing
    targets = [lo + b * spacing for b in range(n_tiers)]
    pools = []
    for F_b in targets:
        idx = [i for i in range(len(configs)) if F_b - 1e-9 <= macs[i] <= F_b + 2 * bound + 1e-9]
        idx.sort(key=lambda i: (macs[i], arch_key(configs[i])))
        if not idx:
            raise ValueError(f"tier at {F_b:.0f} MACs is empty: raise bound_frac or lower n_tiers")
        pools.append([configs[i] for i in idx])
    return {"targets": targets, "bound": bound, "spacing": spacing, "pools": pools}


# ---------------------------------------------------------------------------------------------------------- sampler
def next_bank_id(current: int, n_banks: int, rng: np.random.Generator) -> int:
    """Complexity-aware random walk over tiers (official ``get_bank_id``, process.py:104-116)."""
    if current == 0:
        step = [0, 0, 1]
    elif current == n_banks - 1:
        step = [-1, 0, 0]
    else:
        step = [-1, 0, 1]
    return current + step[int(rng.integers(3))]


def preference_diff(cand: dict, anchor: dict, macs_fn, head_dim: int) -> float:
    """Path preference rule (``_importance_comparison``, model.py:166-253): MACs of the candidate with the anchor's
    width minus MACs of the candidate with the anchor's depth (layers added by repeating the candidate's first layer,
    removed from the front, as the official ``insert_ele`` / ``pop_ele`` at the stage offset). Smaller is preferred."""
    r = ratios_of(cand)
    width_swapped = make_config(anchor["embed"], r, head_dim)
    d_a = anchor["depth"]
    r_d = list(r)
    while len(r_d) < d_a:
        r_d.insert(0, r_d[0])
    while len(r_d) > d_a:
        r_d.pop(0)
    depth_swapped = make_config(cand["embed"], r_d, head_dim)
    return float(macs_fn(width_swapped) - macs_fn(depth_swapped))


def softmax_np(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    e = np.exp(x - x.max())
    return e / e.sum()


class ConflictAwareSampler:
    """Tier choice (``random`` | ``adjacent_step``), subnet choice (``uniform`` | ``preference``) and memory banks.

    ``begin_step()`` picks the step's tier (adjacent_step); ``sample()`` gives (config, tier, from_bank) for one
    uniform child; ``bank_insert`` / ``refresh`` maintain the banks from a loss function ``neg_ce(config) -> -CE``."""

    def __init__(self, tiers: dict, flops_mode: str, model_mode: str, use_bank: bool, rng: np.random.Generator,
                 macs_fn, head_dim: int, min_config: dict, bank_size: int = 8, bank_rate: float = 0.2,
                 n_candidates: int = 5):
        if flops_mode not in ("random", "adjacent_step"):
            raise ValueError(f"flops_mode={flops_mode!r}")
        if model_mode not in ("uniform", "preference"):
            raise ValueError(f"model_mode={model_mode!r}")
        self.tiers, self.pools, self.n = tiers, tiers["pools"], len(tiers["pools"])
        self.flops_mode, self.model_mode, self.use_bank, self.rng = flops_mode, model_mode, use_bank, rng
        self.macs_fn, self.head_dim, self.min_config = macs_fn, head_dim, min_config
        self.bank_size, self.bank_rate, self.n_candidates = bank_size, bank_rate, n_candidates
        self.banks: list[list[list]] = [[] for _ in range(self.n)]  # [config, -CE]
        self.current = 0
        self.tier_history: list[int] = []
        self.n_refresh_all = 0

    def begin_step(self) -> None:
        if self.flops_mode == "adjacent_step":
            self.current = next_bank_id(self.current, self.n, self.rng)

    def _draw(self, b: int) -> dict:
        pool = self.pools[b]
        return pool[int(self.rng.integers(len(pool)))]

    def best_in_bank(self, b: int, worst: bool = False):
        bank = self.banks[b]
        losses = [it[1] for it in bank]
        i = losses.index(min(losses) if worst else max(losses))
        return bank[i][0], losses[i], i

    def anchor(self, b: int) -> dict:
        """The best subnet of the lowest tier's bank when the target tier is above it, else the min subnet (official
        anchor bank: 150 / 50 MFLOPs if present, else bank 0; an empty anchor bank falls back to the min subnet)."""
        if b > 0 and self.banks[0]:
            return self.best_in_bank(0)[0]
        return self.min_config

    def sample(self) -> tuple[dict, int, bool]:
        b = int(self.rng.integers(self.n)) if self.flops_mode == "random" else self.current
        self.current = b
        self.tier_history.append(b)
        half = self.bank_size // 2
        if self.use_bank:
            if self.rng.random() < self.bank_rate and len(self.banks[b]) > half:
                bank = self.banks[b]
                p = softmax_np([it[1] for it in bank])
                return bank[int(self.rng.choice(len(bank), p=p))][0], b, True
        cands, diffs = [], []
        while len(cands) < self.n_candidates:
            c = self._draw(b)
            cands.append(c)
            if self.model_mode == "uniform":
                diffs.append(-1.0)
                break
            if len(self.banks[b]) < half:
                diffs.append(-1.0)
                break
            diffs.append(preference_diff(c, self.anchor(b), self.macs_fn, self.head_dim))
        return cands[diffs.index(min(diffs))], b, False

    def bank_insert(self, config: dict, b: int, neg_loss: float) -> None:
        bank = self.banks[b]
        if len(bank) < self.bank_size:
            bank.append([config, float(neg_loss)])
            return
        _, worst, i = self.best_in_bank(b, worst=True)
        if worst < neg_loss:
            bank[i] = [config, float(neg_loss)]

    def refresh(self, neg_ce, tiers=None) -> None:
        self.n_refresh_all += tiers is None
        for b in (range(self.n) if tiers is None else tiers):
            self.banks[b] = [[c, float(neg_ce(c))] for c, _ in self.banks[b]]


# ---------------------------------------------------------------------------------------------------------- losses
def f_divergence(q_logits: torch.Tensor, p_prob: torch.Tensor, alpha: float, iw_clip: float = 1e3):
    """AlphaNet f-divergence D_alpha(p || q) of student logits q against teacher probabilities p (official
    util/loss_ops.py:7-32): (loss per sample, surrogate whose gradient is the divergence's gradient)."""
    q_prob = F.softmax(q_logits, dim=1).detach()
    p_prob = p_prob.detach()
    q_log_prob = F.log_softmax(q_logits, dim=1)
    w = p_prob / q_prob
    if abs(alpha) < 1e-3:
        w = w.clamp(0, iw_clip)
        f, f_base, rho_f = -w.log(), 0.0, w.log() - 1.0
    elif abs(alpha - 1.0) < 1e-3:
        f, f_base, rho_f = w * w.log(), 0.0, w
    else:
        iw = torch.pow(w, alpha).clamp(0, iw_clip)
        f = iw / alpha / (alpha - 1.0)
        f_base = 1.0 / alpha / (alpha - 1.0)
        rho_f = iw / alpha + f_base
    loss = torch.sum(q_prob * (f - f_base), dim=1)
    grad_loss = -torch.sum(q_prob * rho_f * q_log_prob, dim=1)
    return loss, grad_loss


def alpha_divergence(student_logits: torch.Tensor, teacher_prob: torch.Tensor, alpha_min: float = -1.0,
                     alpha_max: float = 1.0, iw_clip: float = 5.0) -> torch.Tensor:
    """AdaptiveLossSoft (util/loss_ops.py:35-56): per sample the larger of D_{alpha_min} and D_{alpha_max}, mean."""
    l_left, g_left = f_divergence(student_logits, teacher_prob, alpha_min, iw_clip)
    l_right, g_right = f_divergence(student_logits, teacher_prob, alpha_max, iw_clip)
    ind = torch.gt(l_left, l_right).float()
    return (ind * g_left + (1.0 - ind) * g_right).mean()


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


def child_loss(logits: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """A sampled (uniform) child's loss: label-smoothed CE (official: the teachers' soft labels)."""
    return F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])


def min_child_loss(logits: torch.Tensor, child_probs: list, cfg: dict) -> torch.Tensor:
    """The min child's loss (process.py:256-260): alpha-divergence to the MEAN of the sampled children's softmax."""
    return alpha_divergence(logits, torch.stack(child_probs, 0).mean(0), cfg["alpha_min"], cfg["alpha_max"],
                            cfg["iw_clip"])


def children_grad(net: TinyTransformer, children: list, x: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Flat gradient of sum_c child_loss(child c) on (x, y) at the current weights; leaves ``.grad`` cleared."""
    net.zero_grad(set_to_none=True)
    for c in children:
        net.set_active_subnet(c)
        child_loss(net(x), y, cfg).backward()
    g = flat_grad(net.parameters()).clone()
    net.zero_grad(set_to_none=True)
    return g


@torch.no_grad()
def adaptive_clip_grad(parameters, clip_factor: float = 0.1, eps: float = 1e-3) -> None:
    """AGC (timm.utils.agc.adaptive_clip_grad, called at process.py:271): per output unit, the gradient norm is
    capped at clip_factor * max(||w_unit||, eps)."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps).mul(clip_factor)
        g = p.grad.detach()
        gn = unitwise_norm(g)
        p.grad.copy_(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


# ---------------------------------------------------------------------------------------------------------- training
def bank_rate_at(step: int, steps: int, rate0: float, inc: float, n_incs: int = 6) -> float:
    """q at a step: rate0 + inc * floor((step + 1) / period), period = steps // 6 (official: + inc at the start of
    epochs 99, 199, ... of 600, train_eval_supernet.py:215-216, i.e. rate0 + inc * floor((epoch + 1) / 100))."""
    period = max(1, steps // n_incs)
    return rate0 + inc * ((step + 1) // period)


def make_optimizer(net: nn.Module, cfg: dict) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only (timm create_optimizer: 1-D parameters and position / cls tokens
    without decay)."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos", "cls") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])


def setup(cfg: dict, image_size: int):
    """(supernet factory inputs) the enumerated space, the tiers and the min subnet."""
    net = build_supernet(cfg, image_size)
    configs = enumerate_configs(cfg)
    tiers = build_tiers(configs, net.macs, cfg["n_tiers"], cfg["bound_frac"])
    mn = min(configs, key=lambda c: (net.macs(c), arch_key(c)))
    mx = max(configs, key=lambda c: (net.macs(c), arch_key(c)))
    return configs, tiers, mn, mx


def train_supernet(arm: str, data: dict, cfg: dict, seed: int, tiers: dict, min_config: dict):
    """One supernet arm for ``cfg["steps"]`` steps. Returns (net, log) with per-step loss, tier of every uniform
    child, the same-batch cosine of consecutive steps' children (``cos_same``, every ``cos_every`` steps) and the
    whole-step cosine of consecutive steps (``cos``, context)."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    flops_mode, model_mode, use_bank = ARM_FLAGS[arm]
    image_size = int(data["train"][0].shape[-1])
    torch.manual_seed(seed)
    net = build_supernet(cfg, image_size)
    rng = np.random.default_rng(seed)
    sampler = ConflictAwareSampler(tiers, flops_mode, model_mode, use_bank, rng, net.macs, cfg["head_dim"],
                                   min_config, cfg["bank_size"], cfg["bank_sampling_rate"], cfg["n_candidates"])
    opt = make_optimizer(net, cfg)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(seed))
    steps, n_train = cfg["steps"], len(data["train"][1])
    steps_per_epoch = math.ceil(n_train / cfg["batch_size"])
    bank_update_steps = max(1, steps_per_epoch // 4)
    log = {"loss": [], "cos": [], "cos_same": [], "tiers": [], "bank_draws": 0, "refresh_all": 0}
    prev, prev_children = None, None
    cos_every = cfg.get("cos_every", 1)
    net.train()
    for step in range(steps):
        lr = lr_at(step, steps, cfg["lr"], "cosine", cfg["warmup_steps"])
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(it)
        measure = prev_children is not None and step % cos_every == 0
        g_prev = children_grad(net, prev_children, x, y, cfg) if measure else None
        opt.zero_grad(set_to_none=True)
        sampler.bank_rate = bank_rate_at(step, steps, cfg["bank_sampling_rate"], cfg["sampling_rate_inc"])
        batch_idx = step % steps_per_epoch

        @torch.no_grad()
        def neg_ce(c):
            net.set_active_subnet(c)
            return -float(F.cross_entropy(net(x), y))

        if use_bank and batch_idx == 0:
            sampler.refresh(neg_ce)  # bank_loss_update at each epoch start
        sampler.begin_step()
        probs, losses, children = [], [], []
        for _ in range(cfg["n_uniform"]):
            c, b, from_bank = sampler.sample()
            log["tiers"].append(b)
            log["bank_draws"] += int(from_bank)
            children.append(c)
            net.set_active_subnet(c)
            out = net(x)  # (B, K)
            loss = child_loss(out, y, cfg)
            if use_bank and not from_bank:
                if (batch_idx + 1) % bank_update_steps == 0 and (batch_idx + 1) != bank_update_steps * 4:
                    sampler.refresh(neg_ce, [b])
                # the child's plain CE on this batch (official recomputes it without grad: same weights, same batch)
                sampler.bank_insert(c, b, -float(F.cross_entropy(out.detach(), y)))
            probs.append(F.softmax(out.detach(), dim=-1))
            loss.backward()
            losses.append(float(loss.detach()))
        if measure:  # the sampled children's gradient vs the previous step's children, same batch and weights
            log["cos_same"].append(cosine(flat_grad(net.parameters()), g_prev))
        prev_children = children
        net.set_active_subnet(min_config)
        out = net(x)
        loss = min_child_loss(out, probs, cfg)
        loss.backward()
        losses.append(float(loss.detach()))
        g = flat_grad(net.parameters())
        if prev is not None:
            log["cos"].append(cosine(g, prev))
        prev = g
        adaptive_clip_grad(net.parameters(), cfg["agc_clip"])
        opt.step()
        log["loss"].append(float(np.mean(losses)))
    net.set_active_subnet(net.max_config())
    log["refresh_all"] = sampler.n_refresh_all
    log["banks"] = [[(arch_key(c), l) for c, l in bank] for bank in sampler.banks]
    return net, log


def train_standalone(config: dict, data: dict, cfg: dict, seed: int) -> tuple[nn.Module, list[float]]:
    """The child trained alone: the same-size network (``get_active_subnet`` of a fresh supernet with the same seed),
    label-smoothed CE, same optimiser, schedule, AGC, steps and batches."""
    image_size = int(data["train"][0].shape[-1])
    torch.manual_seed(seed)
    sup = build_supernet(cfg, image_size)
    sup.set_active_subnet(config)
    model = sup.get_active_subnet()
    opt = make_optimizer(model, cfg)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(seed))
    curve = []
    model.train()
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg["steps"], cfg["lr"], "cosine", cfg["warmup_steps"])
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg["label_smoothing"])
        loss.backward()
        adaptive_clip_grad(model.parameters(), cfg["agc_clip"])
        opt.step()
        curve.append(float(loss.detach()))
    return model, curve


# ---------------------------------------------------------------------------------------------------------- evaluation
def eval_subnets(tiers: dict, per_tier: int, seed: int) -> list[tuple[int, dict]]:
    """The fixed evaluation set: ``per_tier`` subnets drawn without replacement from every tier (fixed seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for b, pool in enumerate(tiers["pools"]):
        idx = rng.choice(len(pool), size=min(per_tier, len(pool)), replace=False)
        out += [(b, pool[int(i)]) for i in sorted(idx)]
    return out


@torch.no_grad()
def accuracy(net: TinyTransformer, config: dict | None, X: torch.Tensor, y: torch.Tensor) -> float:
    if config is not None:
        net.set_active_subnet(config)
    net.eval()
    acc = float((net(X).argmax(1) == y).float().mean())
    net.train()
    return acc


def best_per_tier(net: TinyTransformer, tiers: dict, data: dict) -> list[dict]:
    """Search proxy (context): per tier, the subnet with the best val accuracy among ALL the tier's subnets (first in
    pool order on ties), weights inherited; returns [{"index", "val", "test"}] per tier (test only for the pick)."""
    out = []
    for pool in tiers["pools"]:
        vals = [accuracy(net, c, *data["val"]) for c in pool]
        i = vals.index(max(vals))
        out.append({"index": i, "val": vals[i], "test": accuracy(net, pool[i], *data["test"])})
    return out


def conflict_probe(net: TinyTransformer, data: dict, tiers: dict, cfg: dict, seed: int) -> dict:
    """Premise check on a trained supernet: on ``probe_batches`` batches, the gradient cosine between two different
    lowest-tier subnets vs between a lowest-tier and a highest-tier subnet (same batch, label CE)."""
    rng = np.random.default_rng(seed + 10_000)
    it = batches(*data["train"], cfg["batch_size"], torch.Generator().manual_seed(seed + 10_000))
    low, high = tiers["pools"][0], tiers["pools"][-1]
    same, cross = [], []

    def grad_of(c, x, y):
        net.zero_grad(set_to_none=True)
        net.set_active_subnet(c)
        F.cross_entropy(net(x), y).backward()
        return flat_grad(net.parameters())

    for _ in range(cfg["probe_batches"]):
        x, y = next(it)
        i, j = rng.choice(len(low), size=2, replace=len(low) < 2)
        g_a, g_b = grad_of(low[int(i)], x, y), grad_of(low[int(j)], x, y)
        g_c = grad_of(high[int(rng.integers(len(high)))], x, y)
        same.append(cosine(g_a, g_b))
        cross.append(cosine(g_a, g_c))
    net.zero_grad(set_to_none=True)
    return {"same_tier": float(np.mean(same)), "cross_tier": float(np.mean(cross))}


__all__ = ["ARMS", "ARM_FLAGS", "ConflictAwareSampler", "adaptive_clip_grad", "alpha_divergence", "bank_rate_at",
           "best_per_tier", "build_supernet", "build_tiers", "child_loss", "children_grad", "conflict_probe",
           "enumerate_configs", "eval_subnets", "f_divergence", "make_config", "min_child_loss", "next_bank_id",
           "preference_diff", "setup", "train_standalone", "train_supernet"]
