"""ShiftNAS: Improving One-shot NAS via Probability Shift (Zhang, Yu, Zhao & Ou, ICCV 2023,
https://arxiv.org/abs/2307.08300).

The official repository (github.com/bestfleer/ShiftNAS) holds only a README ("Coming soon"): everything below is
reconstructed from the paper's text (Sec. 3) and every reconstruction is a row of ``shiftnas.paper.yaml: deviations``.

Method, on the elastic CNN of :mod:`reprolab.nas.elastic` (config keys d / e / ks):

* **complexity bins**: the MACs range [min child, max child] cut into ``n_bins`` EQUAL-WIDTH bins
  (:func:`equal_width_edges`); uniform sampling of configs puts most of its mass in the middle bins (the paper's
  premise), measured by :func:`uniform_bin_mass`.
* **probability shift**: a learned bin distribution p = (1 - eps) softmax(theta) + eps / K. Every ``shift_every``
  steps the loss of each bin's generated child is measured on a fixed probe batch; the variation
  v_k = |L_k(now) - L_k(previous)| ("performance variation": a bin whose subnets still change is under-trained) is
  normalised to sum 1 and theta takes one gradient-ASCENT step on J(theta) = sum_k softmax(theta)_k v_k
  (:func:`shift_update`; dJ/dtheta_j = q_j (v_j - sum_k q_k v_k)).
* **architecture generator** (:class:`ArchGenerator`): an LSTM reads the normalised target MACs and a position
  embedding and emits, per decision (d of each stage, then e and ks of each block), logits over its choices; a
  straight-through hard Gumbel-softmax gives one-hot gates g. The "matrix mapping" of the paper turns one-hot gates into
  masks: a depth gate into per-block on/off masks (block j of a stage runs iff d > j), an expand gate into a channel
  mask (the first mid(e) channels), a kernel gate into a mixture of the depthwise kernels (one-hot: the chosen kernel).
  :func:`masked_forward` runs the supernet at full width with these masks: with hard gates its output EQUALS the
  sliced sub-network's and the supernet loss back-propagates into the generator.
  :func:`expected_macs` is the MACs of the gated network as a differentiable function of the gates (exact for
  one-hot gates, and the exact expectation under independent per-decision probabilities); the generator is trained
  on the supernet loss plus ``flops_weight * (MACs(g) / target - 1)^2`` (:func:`generator_loss`).

Both arms train through :mod:`reprolab.nas.harness` (``train_supernet`` for uniform sampling, ``train_model`` with the
ShiftNAS loss): same seed, same batches, optimiser and schedule; children are evaluated with the harness's standalone
child + BN recalibration (:func:`evaluate_child`).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .elastic import ElasticCNN, inplace_distillation_loss, make_divisible
from .flops import cnn_macs
from .samplers import bin_index, uniform

KEYS = ("d", "e", "ks")  # the generator's decisions (w must have a single choice)


# ---------------------------------------------------------------- bins
def equal_width_edges(net: ElasticCNN, n_bins: int, image_size: int) -> list[float]:
    """Equal-width MACs bins between the smallest and the largest child (the paper splits the FLOPs range)."""
    lo, hi = cnn_macs(net, net.min_config(), image_size), cnn_macs(net, net.max_config(), image_size)
    return [float(v) for v in np.linspace(lo, hi, n_bins + 1)]


def uniform_bin_mass(net: ElasticCNN, edges, image_size: int, rng: np.random.Generator, n: int = 4000,
                     pool: list | None = None) -> list[float]:
    """Fraction of uniformly sampled configs falling in each bin (Monte Carlo, seeded); ``pool`` (a list) receives
    the sampled MACs."""
    counts = np.zeros(len(edges) - 1)
    for _ in range(n):
        m = cnn_macs(net, uniform(net.space(), rng), image_size)
        counts[bin_index(m, edges)] += 1
        if pool is not None:
            pool.append(m)
    return (counts / n).tolist()


# ---------------------------------------------------------------- probability shift
def shift_probs(theta: np.ndarray, smoothing: float) -> np.ndarray:
    """p = (1 - eps) softmax(theta) + eps / K."""
    q = np.exp(theta - theta.max())
    q = q / q.sum()
    return (1 - smoothing) * q + smoothing / len(theta)


def shift_update(theta: np.ndarray, variation, lr: float) -> np.ndarray:
    """One gradient-ascent step of J = sum_k softmax(theta)_k v_k with v the variation normalised to sum 1
    (all-zero variation: no change)."""
    v = np.abs(np.asarray(variation, dtype=float))
    if v.sum() <= 0:
        return theta.copy()
    v = v / v.sum()
    q = np.exp(theta - theta.max())
    q = q / q.sum()
    grad = q * (v - float(q @ v))
    return theta + lr * grad


# ---------------------------------------------------------------- decisions, gates, MACs
def decisions(net: ElasticCNN) -> list[tuple[str, int, list]]:
    """(key, position, choices) of every decision the generator makes, in the order d, e, ks."""
    if len(net.width_mult_list) != 1:
        raise ValueError("the generator covers d / e / ks; use a single width multiplier")
    space = net.space()
    return [(k, i, list(space[k][i])) for k in KEYS for i in range(len(space[k]))]


def config_from_gates(net: ElasticCNN, gates: dict) -> dict:
    """The config selected by one-hot (or any) gates: argmax of each gate vector. gates[key][i]: (n_choices,)."""
    space = net.space()
    cfg = {k: [space[k][i][int(torch.argmax(g))] for i, g in enumerate(gates[k])] for k in KEYS}
    cfg["w"] = [c[0] for c in space["w"]]
    return cfg


def gates_from_config(net: ElasticCNN, config: dict) -> dict:
    """One-hot gates of a config."""
    space = net.space()
    return {k: [F.one_hot(torch.tensor(space[k][i].index(v)), len(space[k][i])).float()
                for i, v in enumerate(config[k])] for k in KEYS}


def _block_geometry(net: ElasticCNN, image_size: int) -> tuple[float, list[dict]]:
    """Fixed MACs (stem, final conv, classifier) and, per block, c_in / c_out / H_in / H_out / stage / index in stage."""
    H = image_size
    stem = net.first_conv.conv.max_out_channels
    base = H * H * stem * net.in_channels * 9
    rows, c = [], stem
    for s, g in enumerate(net.block_group_info):
        width = net.stage_width(net.stage_channels[s], net.width_mult_list[0])
        for j, i in enumerate(g):
            stride = net.blocks[i].stride
            H_out = -(-H // stride)  # same padding: ceil(H / stride)
            rows.append(dict(i=i, s=s, j=j, c_in=c, c_out=width, H_in=H, H_out=H_out, divisor=net.blocks[i].divisor))
            H, c = H_out, width
    base += H * H * net.head_channels * c + net.head_channels * net.n_classes
    return float(base), rows


def expected_macs(net: ElasticCNN, gates: dict, image_size: int) -> torch.Tensor:
    """MACs of the gated network, differentiable in the gates: base + sum_blocks a_i E[mid_i] (H_in^2 c_in +
    H_out^2 E[k_i^2] + H_out^2 c_out), a_i = P(d_stage > j). One-hot gates: the config's exact MACs
    (= :func:`reprolab.nas.flops.cnn_macs`); probability vectors: the exact expectation over independent decisions."""
    space = net.space()
    base, rows = _block_geometry(net, image_size)
    total = torch.tensor(base, dtype=torch.float64)
    for r in rows:
        i, s, j = r["i"], r["s"], r["j"]
        d_ch = torch.tensor([1.0 if d > j else 0.0 for d in space["d"][s]], dtype=torch.float64)
        active = (gates["d"][s].double() * d_ch).sum(-1)
        mids = torch.tensor([make_divisible(round(r["c_in"] * e), r["divisor"]) for e in space["e"][i]],
                            dtype=torch.float64)
        e_mid = (gates["e"][i].double() * mids).sum(-1)
        k2 = torch.tensor([k * k for k in space["ks"][i]], dtype=torch.float64)
        e_k2 = (gates["ks"][i].double() * k2).sum(-1)
        per_mid = r["H_in"] ** 2 * r["c_in"] + r["H_out"] ** 2 * e_k2 + r["H_out"] ** 2 * r["c_out"]
        total = total + active * e_mid * per_mid
    return total


# ---------------------------------------------------------------- masked (gated) forward of the supernet
def masked_forward(net: ElasticCNN, x: torch.Tensor, gates: dict) -> torch.Tensor:
    """The supernet at full width with the gates' masks ("matrix mapping"): depth gate -> per-block on/off, expand
    gate -> mask of the first mid(e) channels, kernel gate -> mixture of the depthwise kernels. With one-hot gates the
    output equals ``net`` under the gates' config (train or eval mode); gradients reach the gates."""
    space = net.space()
    net.set_max_net()
    h = net.first_conv(x)  # (B, stem, H, W)
    for s, g in enumerate(net.block_group_info):
        for j, i in enumerate(g):
            blk = net.blocks[i]
            c_in = h.size(1)
            # full width explicitly: the dynamic convs keep the widths of the LAST sliced forward otherwise
            blk.inverted_bottleneck.conv.active_out_channel = make_divisible(round(c_in * max(space["e"][i])),
                                                                             blk.divisor)
            blk.point_linear.conv.active_out_channel = blk.point_linear.conv.max_out_channels
            z = blk.inverted_bottleneck(h)  # (B, mid_max, H, W)
            mid_max = z.size(1)
            ar = torch.arange(mid_max)
            M = torch.stack([(ar < make_divisible(round(c_in * e), blk.divisor)).float()
                             for e in space["e"][i]])  # (n_e, mid_max): the mapping matrix
            mask = (gates["e"][i] @ M).view(1, -1, 1, 1)
            z = z * mask
            conv = blk.depth_conv.conv
            K = max(conv.kernel_size_list)
            w = 0
            for gk, k in zip(gates["ks"][i], space["ks"][i]):
                f = conv.get_active_filter(mid_max, mid_max, k)  # (mid, 1, k, k)
                p = (K - k) // 2
                w = w + gk * F.pad(f, (p, p, p, p))
            z = F.conv2d(z, w, None, conv.stride, K // 2, 1, mid_max)
            z = blk.depth_conv.act(blk.depth_conv.bn(z)) * mask
            y = blk.point_linear(z)  # (B, c_out, H', W')
            if blk.residual:
                on = sum(gd for gd, d in zip(gates["d"][s], space["d"][s]) if d > j)
                h = h + on * y
            else:
                h = y
    feat = net.final_conv(h).mean((2, 3))  # (B, head)
    return net.classifier(net.dropout(feat))


# ---------------------------------------------------------------- the architecture generator
def gumbel_hard(logits: torch.Tensor, tau: float, gen: torch.Generator | None) -> torch.Tensor:
    """Straight-through hard Gumbel-softmax (forward one-hot, backward the soft sample's gradient); gen=None: no
    noise (greedy argmax, still straight-through)."""
    if gen is not None:
        u = torch.rand(logits.shape, generator=gen).clamp(1e-10, 1 - 1e-10)
        logits = logits - torch.log(-torch.log(u))
    soft = F.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft.dtype)
    return hard - soft.detach() + soft


class ArchGenerator(nn.Module):
    """LSTM architecture generator: input per step = Linear(normalised target MACs) + position embedding; output per
    decision = logits over its choices (a linear head per decision). ``forward(t)`` with t (B,) normalised targets in
    [0, 1] returns {key: [logits (B, n_choices)]}."""

    def __init__(self, net: ElasticCNN, hidden: int = 32):
        super().__init__()
        self.dec = decisions(net)
        self.hidden = hidden
        self.target = nn.Linear(1, hidden)
        self.pos = nn.Embedding(len(self.dec), hidden)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, len(ch)) for _, _, ch in self.dec)

    def forward(self, t: torch.Tensor) -> dict:
        B = t.shape[0]
        emb = self.target(t.view(B, 1).float())  # (B, hid)
        h = torch.zeros(B, self.hidden)
        c = torch.zeros(B, self.hidden)
        out = {k: [] for k in KEYS}
        for p, (k, _, _) in enumerate(self.dec):
            h, c = self.cell(emb + self.pos.weight[p], (h, c))
            out[k].append(self.heads[p](h))  # (B, n_choices)
        return out

    def gates(self, t: torch.Tensor, tau: float = 1.0, gen: torch.Generator | None = None) -> dict:
        """Hard straight-through gates {key: [(B, n_choices)]}."""
        return {k: [gumbel_hard(lg, tau, gen) for lg in v] for k, v in self(t).items()}


def _row(gates: dict, b: int) -> dict:
    return {k: [g[b] for g in v] for k, v in gates.items()}


class Normaliser:
    """Target MACs <-> [0, 1] over the space's MACs range."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, macs) -> torch.Tensor:
        return (torch.as_tensor(macs, dtype=torch.float32) - self.lo) / (self.hi - self.lo)


def flops_loss(net: ElasticCNN, gates: dict, targets: torch.Tensor, image_size: int) -> torch.Tensor:
    """mean_b (MACs(g_b) / T_b - 1)^2 over a batch of gates (B rows)."""
    macs = expected_macs(net, gates, image_size)  # (B,): gates of shape (B, n_choices) broadcast
    return ((macs / targets.double() - 1) ** 2).mean().float()


def pretrain_generator(ag: ArchGenerator, net: ElasticCNN, edges, norm: Normaliser, image_size: int, steps: int,
                       lr: float, tau: float, seed: int, batch: int = 32) -> list[float]:
    """Warm-up of the generator on the MACs-matching loss alone (targets uniform in [min, max] MACs)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ag.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        T = edges[0] + torch.rand(batch, generator=gen, dtype=torch.float64) * (edges[-1] - edges[0])
        g = ag.gates(norm(T), tau, gen)
        loss = flops_loss(net, g, T, image_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@torch.no_grad()
def generate(ag: ArchGenerator, net: ElasticCNN, targets, norm: Normaliser) -> list[dict]:
    """Greedy (no noise) configs for the given target MACs."""
    g = ag.gates(norm(torch.as_tensor(targets, dtype=torch.float64)), 1.0, None)
    return [config_from_gates(net, _row(g, b)) for b in range(len(targets))]


# ---------------------------------------------------------------- supernet training (both arms)
def generator_loss(net: ElasticCNN, x: torch.Tensor, soft: torch.Tensor, gates: dict, target: float,
                   flops_weight: float, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ShiftNAS child's loss, shared by the supernet weights and the generator: in-place distillation of the
    gated child (masked forward) to the max net's detached logits ``soft`` + flops_weight (MACs(g) / T - 1)^2.
    Returns (loss, MACs(g))."""
    macs = expected_macs(net, gates, image_size)
    kd = inplace_distillation_loss(masked_forward(net, x, gates), soft)
    return kd + flops_weight * ((macs / target - 1) ** 2).float(), macs


def replay_shift(bin_loss_history, n_bins: int, lr: float, smoothing: float) -> np.ndarray:
    """The bin probabilities after the recorded probe losses (one list of per-bin losses per shift event): theta = 0,
    then one :func:`shift_update` per consecutive pair (what :func:`train_arm` does)."""
    theta, prev = np.zeros(n_bins), None
    for now in bin_loss_history:
        if prev is not None:
            theta = shift_update(theta, np.abs(np.array(now) - np.array(prev)), lr)
        prev = now
    return shift_probs(theta, smoothing)


def train_arm(arm: str, data: dict, cfg: dict, seed: int, image_size: int) -> dict:
    """Train one supernet with the sandwich rule [max (labels), min (KD), n_children children (KD)] through
    :mod:`reprolab.nas.harness` (same seed => same batches, optimiser and cosine schedule in both arms); the children are
    uniform configs (``arm="uniform"``: ``harness.train_supernet``) or ShiftNAS children (bin ~ shifted p, target ~
    U(bin), generator gates, masked forward; ``harness.train_model`` with this loss). Returns the net, the generator
    (or None), edges, the bin-probability history, the probe losses and per-bin sample counts."""
    from .elastic import sandwich_backward
    from .harness import train_model, train_supernet

    if arm not in ("uniform", "shiftnas"):
        raise ValueError(f"arm={arm!r}; allowed: uniform, shiftnas")
    torch.manual_seed(seed)
    net = make_net(cfg)
    net.zero_last_bn_gamma()
    edges = equal_width_edges(net, cfg["n_bins"], image_size)
    norm = Normaliser(edges[0], edges[-1])
    K = len(edges) - 1
    opt = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=seed,
               schedule="cosine")
    out = {"edges": edges, "counts": [0] * K, "probs": [], "flops_err": [], "bin_losses": []}
    ag = None
    if arm == "uniform":
        def configs_fn(step, rng):
            cs = [uniform(net.space(), rng) for _ in range(cfg["n_children"])]
            for c in cs:
                out["counts"][bin_index(cnn_macs(net, c, image_size), edges)] += 1
            return [net.max_config(), net.min_config()] + cs

        train_supernet(net, data, cfg["steps"], configs_fn, kd=True, **opt)
    else:
        torch.manual_seed(seed + 10_000)
        ag = ArchGenerator(net, cfg["ag_hidden"])
        out["ag_pretrain"] = pretrain_generator(ag, net, edges, norm, image_size, cfg["ag_pretrain_steps"],
                                                cfg["ag_lr"], cfg["tau"], seed)
        out["ag_warm"] = copy.deepcopy(ag)  # the generator after its warm-up (tests: joint training moves it)
        ag_opt = torch.optim.Adam(ag.parameters(), lr=cfg["ag_lr"])
        rng = np.random.default_rng([seed, 1])
        gen = torch.Generator().manual_seed(seed * 1000 + 7)
        Xtr, ytr = data["train"]
        probe = np.random.default_rng([seed, 3]).permutation(len(ytr))[:cfg["probe_size"]]
        xp, yp = Xtr[probe], ytr[probe]
        st = {"theta": np.zeros(K)}

        def loss_fn(model, x, y, step):
            p = shift_probs(st["theta"], cfg["shift_smoothing"])
            out["probs"].append(p.tolist())
            model.set_max_net()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            soft = logits.detach()
            model.set_min_net()
            inplace_distillation_loss(model(x), soft).backward()
            ag_opt.zero_grad(set_to_none=True)
            for _ in range(cfg["n_children"]):
                b = int(rng.choice(K, p=p))
                T = edges[b] + float(rng.random()) * (edges[b + 1] - edges[b])
                g = _row(ag.gates(norm([T]), cfg["tau"], gen), 0)
                gl, macs = generator_loss(model, x, soft, g, T, cfg["flops_weight"], image_size)
                out["counts"][bin_index(float(macs), edges)] += 1
                out["flops_err"].append(abs(float(macs) / T - 1))
                gl.backward()
            ag_opt.step()
            return loss.detach()

        def on_step(step, model):  # probability shift: each bin's loss variation on the probe batch
            if (step + 1) % cfg["shift_every"] == 0:
                now = bin_losses(model, ag, edges, norm, xp, yp)
                if out["bin_losses"]:
                    prev = out["bin_losses"][-1]
                    st["theta"] = shift_update(st["theta"], np.abs(np.array(now) - np.array(prev)),
                                               cfg["shift_lr"])
                out["bin_losses"].append(now)

        train_model(net, data, cfg["steps"], loss_fn, on_step=on_step, **opt)
        out["final_probs"] = shift_probs(st["theta"], cfg["shift_smoothing"]).tolist()
    out.update(net=net, ag=ag)
    return out


@torch.no_grad()
def bin_losses(net: ElasticCNN, ag: ArchGenerator, edges, norm: Normaliser, x, y) -> list[float]:
    """Cross-entropy of each bin's greedy generated child (target = bin centre) on the probe batch (train-mode BN:
    batch statistics; momentum 0 leaves the running statistics untouched)."""
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    was = net.training
    losses = []
    for c in generate(ag, net, centres, norm):
        net.set_active_subnet(c)
        net.train()
        moms = [(m, m.momentum) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        for m, _ in moms:
            m.momentum = 0.0  # batch statistics, running statistics untouched
        losses.append(float(F.cross_entropy(net(x), y)))
        for m, mo in moms:
            m.momentum = mo
    net.train(was)
    return losses


# ---------------------------------------------------------------- the network and evaluation
def make_net(cfg: dict) -> ElasticCNN:
    return ElasticCNN(in_channels=1, n_classes=10, stem_channels=cfg["stem_channels"],
                      stage_channels=tuple(cfg["stage_channels"]), stage_strides=(1, 2, 2),
                      depth_list=tuple(cfg["depth_list"]), expand_ratio_list=tuple(cfg["expand_ratio_list"]),
                      ks_list=tuple(cfg["ks_list"]), width_mult_list=(1.0,), head_channels=cfg["head_channels"])


def evaluate_child(net: ElasticCNN, config: dict, data: dict, calib: int) -> dict:
    """Val and test accuracy of the child after one BN recalibration (``harness.evaluate_child_splits``)."""
    from .harness import evaluate_child_splits

    return evaluate_child_splits(net, config, data, calib=calib)


def oracle_rel_err(macs_pool, targets) -> list[float]:
    """For each target, |MACs / T - 1| of the nearest MACs in ``macs_pool`` (configs of the space): an upper bound on
    the best error any generator can reach (the space is discrete)."""
    pool = np.sort(np.asarray(macs_pool, dtype=float))
    out = []
    for T in targets:
        i = np.searchsorted(pool, T)
        near = [pool[j] for j in (i - 1, i) if 0 <= j < len(pool)]
        out.append(float(min(abs(m / T - 1) for m in near)))
    return out


def candidate_children(net: ElasticCNN, edges, n_per_bin: int, rng: np.random.Generator, image_size: int
                       ) -> list[list[dict]]:
    """n_per_bin uniform configs per bin (rejection from uniform sampling; the same list for every arm)."""
    from .samplers import BinnedSampler

    s = BinnedSampler(net.space(), lambda c: cnn_macs(net, c, image_size), edges, rng, max_tries=200_000)
    return [[s.sample(b)[0] for _ in range(n_per_bin)] for b in range(len(edges) - 1)]
