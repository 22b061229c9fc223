"""Auto-GNN (Zhou et al., arXiv 1909.03184): the Reinforced Conservative Explorer (RCE) on NAS-Bench-Graph ground truth.

Auto-GNN searches GNN architectures with a *conservative* RL controller: instead of sampling a whole architecture from
scratch (GraphNAS), an **architecture-modification controller** reads the best architecture found so far and picks ONE
component class to change, then that class's **class controller** picks the new value; the child is evaluated and
replaces the best architecture when its validation accuracy is higher. Both controllers are trained with REINFORCE.

Here (miniature, CPU) the ground truth is NAS-Bench-Graph (``reprolab.nas.benchmarks``): an architecture is a tuple
``(link, op1, op2, op3, op4)`` of 5 *component classes* (9 link patterns, 9 GNN ops per node; the library's
``link_list`` / ``gnn_list`` order), queried by ``Bench.query`` (valid_acc to search on, test_acc to report). The
paper's classes (attention, aggregator, activation, heads, hidden units per layer) do not exist in that space; the
mapping is recorded in the registry's deviations.

Controller details follow GraphNAS (GraphNAS/GraphNAS ``graphnas/graphnas_controller.py`` SimpleNASController and
``graphnas/trainer.py`` train_controller) where Auto-GNN does not say otherwise: LSTMCell policy (hidden 100), logits
``tanh_c * tanh(logits / temperature)`` (2.5, 5.0), one reward PER DECISION = validation accuracy + ``entropy_coeff``
x that decision's entropy (``entropy_mode='reward'``, trainer.py:210), a moving-average baseline per decision (decay
0.95, first baseline = first reward), advantages scaled by ``scale(adv, last_k=10, scale_value=0.5)`` (the max over the
last 10 advantage vectors), loss = sum(-log_prob * adv), Adam (lr 3.5e-4), one architecture per controller step.
``GraphNASController`` (the whole architecture sampled token by token) is the non-conservative reference.

Second half (constrained parameter sharing, Sec. 4.2): the same RCE search over a miniature GraphNAS macro space whose
children are TRAINED GNNs (``MacroGNN`` of GraphNAS ``GeoLayer`` s) on a graph (``sharing_task``: the offline
``citation_like`` generator by default); ``TrainedEvaluator`` trains each child from scratch or lets it inherit the
homogeneous layers of its parent (``homogeneous_layers``, ``inherit``) and train fewer epochs; ``truth_accuracy`` is the
from-scratch ground truth the estimates are ranked against (``kendall_tau``).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .benchmarks import nbg_raw_keys
from .search import SearchResult, random_search, regularized_evolution

CLASSES = ("link", "op1", "op2", "op3", "op4")


# ------------------------------------------------------------------------------------------------------ ground truth
@dataclass
class Bench:
    """A lookup table over a product space: ``sizes[k]`` values per class; ``val``/``test`` map an architecture tuple
    to its accuracies. Tuples absent from the table are invalid (never evaluated; samplers reject them)."""
    sizes: tuple
    val: dict
    test: dict

    def valid(self, arch) -> bool:
        return tuple(arch) in self.val

    def query(self, arch) -> float:
        return self.val[tuple(arch)]

    def all_archs(self) -> list:
        return [a for a in itertools.product(*(range(s) for s in self.sizes)) if a in self.val]

    def sample(self, rng: np.random.Generator) -> tuple:
        """Uniform over the raw product space, rejecting invalid tuples (= uniform over the valid tuples)."""
        while True:
            a = tuple(int(rng.integers(s)) for s in self.sizes)
            if a in self.val:
                return a

    def mutate(self, arch, rng: np.random.Generator) -> tuple:
        """Change one uniformly drawn class to a different uniformly drawn value (the RE mutation; valid children)."""
        while True:
            k = int(rng.integers(len(self.sizes)))
            child = list(arch)
            child[k] = int((arch[k] + 1 + rng.integers(self.sizes[k] - 1)) % self.sizes[k])
            child = tuple(child)
            if child in self.val:
                return child


def nbg_bench(dataset: str) -> Bench:
    """NAS-Bench-Graph on ``dataset`` as a Bench over (link, op1..op4) with the library's list orders. Every raw tuple is
    keyed through the library's ``Arch.valid_hash`` (isomorphic cells share a record); the 9 raw tuples without a bench
    record (no valid GNN path) are invalid."""
    from .benchmarks import nbg_architecture_module, nbg_table

    mod = nbg_architecture_module()
    tb = nbg_table(dataset)
    rec = dict(zip(tb["hash"].astype(int), zip(tb["val_acc"].astype(float), tb["test_acc"].astype(float))))
    val, test = {}, {}
    for key, h in nbg_raw_keys():
        if h in rec:
            val[key], test[key] = rec[h]
    return Bench((len(mod.link_list),) + (len(mod.gnn_list),) * 4, val, test)


def name(arch) -> str:
    from .benchmarks import nbg_architecture_module

    mod = nbg_architecture_module()
    return f"link{mod.link_list[arch[0]]} ops[{', '.join(mod.gnn_list[o] for o in arch[1:])}]"


def expected_random_best(bench: Bench, n: int) -> tuple[float, float]:
    """Exact expectation of (valid_acc, test_acc) of random search's pick (the best by valid_acc among ``n`` uniform
    draws with replacement over the valid tuples; ties broken toward the earlier draw, i.e. uniformly among the tied)."""
    archs = bench.all_archs()
    v = np.array([bench.val[a] for a in archs])
    t = np.array([bench.test[a] for a in archs])
    N = len(archs)
    u, inv = np.unique(v, return_inverse=True)  # ascending distinct valid accuracies
    cnt = np.bincount(inv, minlength=len(u)).astype(float)
    tmean = np.bincount(inv, weights=t, minlength=len(u)) / cnt
    upto = np.cumsum(cnt)
    p = (upto / N) ** n - ((upto - cnt) / N) ** n  # P(max val == u)
    ev, et = float((p * u).sum()), float((p * tmean).sum())
    return float(ev), float(et)


# -------------------------------------------------------------------------------------------------------- controllers
class _LSTMPolicy(nn.Module):
    """GraphNAS SimpleNASController's parts: token embedding, LSTMCell, one linear decoder per decision."""

    def __init__(self, sizes: Sequence[int], n_out_heads: Sequence[int], hid: int = 100, temperature: float = 5.0,
                 tanh_c: float = 2.5):
        super().__init__()
        self.sizes, self.hid, self.temperature, self.tanh_c = tuple(sizes), hid, temperature, tanh_c
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        self.encoder = nn.Embedding(int(sum(self.sizes)), hid)
        self.lstm = nn.LSTMCell(hid, hid)
        self.decoders = nn.ModuleList(nn.Linear(hid, s) for s in n_out_heads)
        self.reset_parameters()

    def reset_parameters(self):  # GraphNAS: uniform(-0.1, 0.1) for every parameter, decoder biases zero
        for p in self.parameters():
            p.data.uniform_(-0.1, 0.1)
        for d in self.decoders:
            d.bias.data.fill_(0)

    def squash(self, logits):
        logits = logits / self.temperature
        return self.tanh_c * torch.tanh(logits)

    def step(self, x, hc):
        h, c = self.lstm(x, hc)
        return h, (h, c)

    def embed(self, k: int, value: int):
        return self.encoder(torch.tensor([int(self.offsets[k] + value)]))

    def zero_state(self):
        z = torch.zeros(1, self.hid)
        return z, (z.clone(), z.clone())


def _sample(logits, rng: np.random.Generator, mask=None):
    """Draw one action from softmax(logits) with a numpy generator (seeded, reproducible); returns action, log_prob,
    entropy (GraphNAS: entropy of the full distribution)."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)[0]
    p = logp.exp()
    probs = p.detach().double().numpy()
    a = int(rng.choice(len(probs), p=probs / probs.sum()))
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum()
    return a, logp[a], ent


class GraphNASController(_LSTMPolicy):
    """GraphNAS: the whole architecture sampled class by class (input of step k = embedding of the previous action)."""

    def __init__(self, sizes, **kw):
        super().__init__(sizes, sizes, **kw)

    def propose(self, best, rng, valid: Callable):
        while True:
            x, hc = self.zero_state()
            arch, logps, ents = [], [], []
            for k, s in enumerate(self.sizes):
                h, hc = self.step(x, hc)
                a, lp, e = _sample(self.squash(self.decoders[k](h)), rng)
                arch.append(a), logps.append(lp), ents.append(e)
                x = self.embed(k, a)
            if valid(tuple(arch)):
                return tuple(arch), torch.stack(logps), torch.stack(ents), None


class ConservativeController(_LSTMPolicy):
    """Auto-GNN's RCE. The architecture-modification controller reads the best architecture (embedding of each class's
    current value, one LSTM step per class) and gives one logit per class (a shared linear head on each step's hidden
    state); a class is drawn from the softmax over classes. The class controller of the drawn class (its own linear
    decoder on that class's hidden state) draws a NEW value (the current value is masked out). The child differs from
    the best architecture in exactly one class; log-probabilities of both decisions are summed for REINFORCE."""

    def __init__(self, sizes, **kw):
        super().__init__(sizes, list(sizes) + [1], **kw)

    def propose(self, best, rng, valid: Callable):
        x, hc = self.zero_state()
        hs = []
        for k, v in enumerate(best):
            x = self.embed(k, v)
            h, hc = self.step(x, hc)
            hs.append(h)
        class_logits = self.squash(torch.cat([self.decoders[-1](h) for h in hs], dim=1))
        n_k = len(self.sizes)
        for _ in range(1000):
            k, lp_k, e_k = _sample(class_logits, rng)
            mask = torch.ones(1, self.sizes[k], dtype=torch.bool)
            mask[0, best[k]] = False
            v, lp_v, e_v = _sample(self.squash(self.decoders[k](hs[k])), rng, mask)
            child = list(best)
            child[k] = v
            if valid(tuple(child)):
                return tuple(child), torch.stack([lp_k, lp_v]), torch.stack([e_k, e_v]), k
        raise RuntimeError(f"no valid one-class modification of {best} in 1000 draws ({n_k} classes)")


def _scale(value, history: list, last_k: int = 10, scale_value: float = 0.5):
    """GraphNAS trainer.scale: value * scale_value / max(history[-last_k:]) (unchanged when that max is 0; the max runs
    over every entry of the last ``last_k`` advantage vectors; a negative max flips the sign, as in GraphNAS)."""
    m = float(np.max(history[-last_k:]))
    return value if m == 0 else scale_value / m * value


def reinforce_step(opt, logps, ents, val: float, state: dict, entropy_coeff: float = 1e-4, baseline_decay: float = 0.95,
                   adv_scale: float = 0.5) -> np.ndarray:
    """One GraphNAS controller update (trainer.py:209-281, entropy_mode 'reward', discount 1, no grad clip): per-decision
    rewards ``val + entropy_coeff * entropy``, EMA baseline per decision (``state['baseline']``, None at first), advantage
    history ``state['history']`` for ``scale``; loss ``sum(-log_prob * adv)``. Returns the scaled advantages."""
    rewards = val + entropy_coeff * ents.detach().double().numpy()
    b = state.get("baseline")
    b = rewards if b is None else baseline_decay * b + (1 - baseline_decay) * rewards
    state["baseline"] = b
    adv = rewards - b
    state.setdefault("history", []).append(adv)
    adv = _scale(adv, state["history"], scale_value=adv_scale)
    loss = (-logps * torch.as_tensor(adv, dtype=logps.dtype)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return adv


def rl_search(kind: str, bench: Bench, n_evals: int, seed: int, lr: float = 3.5e-4, entropy_coeff: float = 1e-4,
              baseline_decay: float = 0.95, hid: int = 100, temperature: float = 5.0, tanh_c: float = 2.5,
              adv_scale: float = 0.5) -> SearchResult:
    """``kind`` 'rce' (Auto-GNN) or 'graphnas'. Evaluation 1 is a uniformly random architecture (the first best one);
    each further evaluation is one controller proposal followed by one REINFORCE update. Every evaluation counts.
    ``lr=0`` gives the same search with a frozen (never updated) controller: the 'rce_frozen' reference."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cls = {"rce": ConservativeController, "graphnas": GraphNASController}[kind]
    ctrl = cls(bench.sizes, hid=hid, temperature=temperature, tanh_c=tanh_c)
    opt = torch.optim.Adam(ctrl.parameters(), lr=lr)
    res = SearchResult()
    best = bench.sample(rng)
    best_val = bench.query(best)
    res.add(best, best_val)
    res.classes = [None]
    state: dict = {}
    while len(res.scores) < n_evals:
        child, logps, ents, k = ctrl.propose(best, rng, bench.valid)
        val = bench.query(child)
        res.add(child, val)
        res.classes.append(k)
        reinforce_step(opt, logps, ents, val, state, entropy_coeff, baseline_decay, adv_scale)
        if val > best_val:  # the conservative explorer moves only on an improvement
            best, best_val = child, val
    return res


def run_search(method: str, bench: Bench, n_evals: int, seed: int, cfg: dict | None = None) -> SearchResult:
    """One search: 'random', 'evolution' (regularized evolution, ``reprolab.nas.search``), 'rce', 'graphnas',
    'rce_frozen' (RCE with the controller never updated: lr 0, same seed; isolates what the learning adds)."""
    cfg = cfg or {}
    if method == "random":
        return random_search(bench.sample, bench.query, n_evals, np.random.default_rng(seed))
    if method == "evolution":
        return regularized_evolution(bench.sample, bench.mutate, bench.query, n_evals, np.random.default_rng(seed),
                                     population_size=cfg.get("re_population", 10), sample_size=cfg.get("re_sample", 3))
    keys = ("lr", "entropy_coeff", "baseline_decay", "hid", "temperature", "tanh_c", "adv_scale")
    kw = {k: cfg[f"ctrl_{k}"] for k in keys if f"ctrl_{k}" in cfg}
    if method == "rce_frozen":
        method, kw["lr"] = "rce", 0.0
    return rl_search(method, bench, n_evals, seed, **kw)


def incumbent_test(res: SearchResult, bench: Bench) -> list[float]:
    """Test accuracy of the best-by-validation architecture after each evaluation (ties: the earlier one)."""
    out, best_i = [], 0
    for i, s in enumerate(res.scores):
        if s > res.scores[best_i]:
            best_i = i
        out.append(bench.test[tuple(res.archs[best_i])])
    return out


def synthetic_bench(sizes=(4, 4, 4), seed: int = 0, noise: float = 0.0) -> Bench:
    """A tiny table for tests: additive per-class effects (distinct values), test = val + noise."""
    rng = np.random.default_rng(seed)
    eff = [rng.normal(size=s) for s in sizes]
    val, test = {}, {}
    for a in itertools.product(*(range(s) for s in sizes)):
        v = float(sum(e[x] for e, x in zip(eff, a)))
        val[a], test[a] = v, v + noise * float(rng.normal())
    return Bench(tuple(sizes), val, test)


# ===================================================================================================================
# Second half: constrained parameter sharing (Auto-GNN Sec. 4.2) on trained GNNs.
#
# The search space is a miniature of GraphNAS's macro space (GraphNAS/GraphNAS graphnas/search_space.py:10-17): a
# 2-layer GNN, per layer the attention type, aggregator, activation, number of heads and hidden units (the last layer's
# hidden units are the number of classes, graphnas/utils/model_utils.py:82), built like GraphNAS's GeoLayer
# (graphnas_variants/macro_graphnas/pyg/pyg_gnn_layer.py) in plain torch. A child inherits the trained weights of a
# layer of its parent (the best architecture it was mutated from) only when that layer is HOMOGENEOUS (same weight
# shapes = same input/output dimension and heads, same attention type, same aggregator, same activation); batch-norm
# and skip-connection (residual linear) parameters are never inherited. See ``homogeneous_layers`` / ``inherit``.
# ===================================================================================================================
MACRO_SPACE = {"attention": ("gat", "gcn", "cos", "const"), "aggregator": ("sum", "mean", "max"),
               "activation": ("relu", "elu", "tanh", "linear"), "heads": (1, 2, 4), "hidden": (8, 16, 32)}
LAYER_CLASSES = ("attention", "aggregator", "activation", "heads", "hidden")
MACRO_CLASSES = tuple(f"{c}{l}" for l in (1, 2) for c in LAYER_CLASSES)[:-1]  # layer 2's hidden = number of classes
MACRO_SIZES = tuple(len(MACRO_SPACE[c[:-1]]) for c in MACRO_CLASSES)
_ACTS = {"relu": torch.relu, "elu": torch.nn.functional.elu, "tanh": torch.tanh, "linear": lambda x: x}


def decode(arch, n_classes: int) -> list[dict]:
    """Index tuple (MACRO_CLASSES order) -> per-layer dicts {attention, aggregator, activation, heads, hidden, in/out}."""
    vals = [MACRO_SPACE[c[:-1]][i] for c, i in zip(MACRO_CLASSES, arch)]
    l1 = dict(zip(LAYER_CLASSES, vals[:5]))
    l2 = dict(zip(LAYER_CLASSES, vals[5:] + [n_classes]))
    return [l1, l2]


def layer_specs(arch, in_dim: int, n_classes: int) -> list[dict]:
    """Per layer: the layer's choices plus its input dimension and whether heads are concatenated (GraphNAS
    pyg_gnn.py:33-46: input of layer 2 = heads x hidden of layer 1; the last layer averages its heads)."""
    l1, l2 = decode(arch, n_classes)
    l1 = {**l1, "in": in_dim, "concat": True}
    l2 = {**l2, "in": l1["heads"] * l1["hidden"], "concat": False}
    return [l1, l2]


class GeoLayer(nn.Module):
    """GraphNAS's GeoLayer (pyg_gnn_layer.py) in plain torch on an edge list with self loops: x W -> (N, heads, out);
    messages x_j weighted by the attention type ('gat': leaky_relu(a.[x_i||x_j]), 'cos': sum(a_l x_i * a_r x_j), both
    softmax-normalised over the edges grouped by edge_index[0] as pyg_gnn_layer.py:119, then attention dropout; 'gcn':
    D^-1/2 (A+I) D^-1/2 weights; 'const': 1, dropout on x_j); 'mean'/'max' aggregators pass each message through the
    two-linear pool layer (out -> 128 -> out, no nonlinearity, pyg_gnn_layer.py:54-61,125-127); aggregation at
    edge_index[1]; concat or mean over heads; bias."""

    def __init__(self, in_dim, out_dim, heads, concat, attention, aggregator, dropout=0.6, pool_dim=128):
        super().__init__()
        self.in_dim, self.out_dim, self.heads, self.concat = in_dim, out_dim, heads, concat
        self.attention, self.aggregator, self.dropout = attention, aggregator, dropout
        self.weight = nn.Parameter(torch.empty(in_dim, heads * out_dim))
        self.att = nn.Parameter(torch.empty(1, heads, 2 * out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim))
        self.pool = nn.Sequential(nn.Linear(out_dim, pool_dim), nn.Linear(pool_dim, out_dim)) \
            if aggregator in ("mean", "max") else None
        nn.init.xavier_uniform_(self.weight)  # PyG glorot = uniform(+-sqrt(6 / (fan_in + fan_out)))
        a = (6.0 / (self.att.size(-2) + self.att.size(-1))) ** 0.5
        nn.init.uniform_(self.att, -a, a)
        if self.pool is not None:
            for lin in self.pool:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x, edges, gcn_norm):
        src, dst = edges  # edge_index[0], edge_index[1]; source_to_target: x_j = x[src], x_i = x[dst]
        n = x.size(0)
        h = (torch.sparse.mm(x, self.weight) if x.is_sparse else x @ self.weight).view(n, self.heads, self.out_dim)
        xj, xi = h[src], h[dst]
        if self.attention == "const":
            msg = nn.functional.dropout(xj, self.dropout, self.training)
        elif self.attention == "gcn":
            msg = gcn_norm.view(-1, 1, 1) * xj
        else:
            if self.attention == "gat":
                alpha = nn.functional.leaky_relu((torch.cat([xi, xj], -1) * self.att).sum(-1), 0.2)
            else:  # cos
                wl, wr = self.att[..., :self.out_dim], self.att[..., self.out_dim:]
                alpha = (xi * wl * xj * wr).sum(-1)
            alpha = _segment_softmax(alpha, src, n)
            alpha = nn.functional.dropout(alpha, self.dropout, self.training)
            msg = xj * alpha.unsqueeze(-1)
        if self.pool is not None:  # Linear(128 <- out) then Linear(out <- 128), no nonlinearity between them: the same
            l1, l2 = self.pool  # affine map computed as ONE out x out matrix (exact; 128/out x fewer flops per edge)
            msg = msg @ (l2.weight @ l1.weight).t() + (l2.weight @ l1.bias + l2.bias)
        idx = dst.view(-1, 1, 1).expand_as(msg)
        out = torch.zeros(n, self.heads, self.out_dim, dtype=msg.dtype)
        if self.aggregator == "sum":
            out = out.scatter_add(0, idx, msg)
        else:
            out = out.scatter_reduce(0, idx, msg, reduce="mean" if self.aggregator == "mean" else "amax",
                                     include_self=False)
        out = out.reshape(n, -1) if self.concat else out.mean(1)
        return out + self.bias


def _segment_softmax(alpha, index, n):
    """Softmax of ``alpha`` (E, heads) over the entries sharing ``index`` (torch_geometric.utils.softmax)."""
    idx = index.view(-1, 1).expand_as(alpha)
    amax = torch.full((n, alpha.size(1)), float("-inf"), dtype=alpha.dtype).scatter_reduce(
        0, idx, alpha, reduce="amax", include_self=True)
    e = (alpha - amax[index]).exp()
    s = torch.zeros(n, alpha.size(1), dtype=alpha.dtype).scatter_add(0, idx, e)
    return e / (s[index] + 1e-16)


def _dropout(x, p: float, training: bool):
    """F.dropout; on a sparse (COO) input it drops stored entries only (zeros stay zero: the same distribution)."""
    if not x.is_sparse:
        return nn.functional.dropout(x, p, training)
    if not training or p == 0:
        return x
    return torch.sparse_coo_tensor(x.indices(), nn.functional.dropout(x.values(), p, True), x.shape).coalesce()


class MacroGNN(nn.Module):
    """GraphNAS's macro GraphNet (pyg_gnn.py:9-76): per layer dropout -> [batch norm] -> act(GeoLayer [+ skip linear]);
    ``batch_norm``/``residual`` off as GeoCitationManager.build_gnn (pyg_gnn_model_manager.py:61-62) unless asked."""

    def __init__(self, arch, in_dim: int, n_classes: int, dropout: float = 0.6, batch_norm: bool = False,
                 residual: bool = False):
        super().__init__()
        self.arch, self.specs = tuple(arch), layer_specs(arch, in_dim, n_classes)
        self.dropout = dropout
        self.layers = nn.ModuleList(GeoLayer(s["in"], s["hidden"], s["heads"], s["concat"], s["attention"],
                                             s["aggregator"], dropout) for s in self.specs)
        self.bns = nn.ModuleList(nn.BatchNorm1d(s["in"], momentum=0.5) for s in self.specs) if batch_norm else None
        self.fcs = nn.ModuleList(nn.Linear(s["in"], s["hidden"] * (s["heads"] if s["concat"] else 1))
                                 for s in self.specs) if residual else None

    def forward(self, x, edges, gcn_norm):
        for i, (s, layer) in enumerate(zip(self.specs, self.layers)):
            x = _dropout(x, self.dropout, self.training)
            if x.is_sparse and (self.bns is not None or self.fcs is not None):
                x = x.to_dense()
            if self.bns is not None:
                x = self.bns[i](x)
            h = layer(x, edges, gcn_norm)
            if self.fcs is not None:
                h = h + self.fcs[i](x)
            x = _ACTS[s["activation"]](h)
        return x


def homogeneous_layers(parent_arch, child_arch, in_dim: int, n_classes: int) -> list[int]:
    """Indices of the layers the child may inherit from the parent (Auto-GNN Sec. 4.2): identical weight shapes (input
    dimension, output dimension, heads), identical attention type and aggregator (GraphNAS's sharing key
    f"{att_type}_{agg_type}_{in}_{out}_{heads}", pyg_gnn_layer.py:184) and identical activation function."""
    keys = ("in", "hidden", "heads", "attention", "aggregator", "activation", "concat")
    p, c = layer_specs(parent_arch, in_dim, n_classes), layer_specs(child_arch, in_dim, n_classes)
    return [l for l in range(len(c)) if all(p[l][k] == c[l][k] for k in keys)]


def inherit(child: MacroGNN, parent: MacroGNN, layers: Sequence[int]) -> int:
    """Copy the GeoLayer parameters (weight, attention vector, bias, pool layer) of ``layers`` from the parent into the
    child; batch-norm and skip-connection parameters are never copied (Sec. 4.2). Returns the number of copied
    parameters (elements)."""
    n = 0
    with torch.no_grad():
        for l in layers:
            src, dst = dict(parent.layers[l].named_parameters()), dict(child.layers[l].named_parameters())
            if src.keys() != dst.keys():
                raise ValueError(f"layer {l}: parameter sets differ, not homogeneous")
            for k, p in dst.items():
                if p.shape != src[k].shape:
                    raise ValueError(f"layer {l}.{k}: shape {tuple(p.shape)} vs {tuple(src[k].shape)}")
                p.copy_(src[k])
                n += p.numel()
    return n


@dataclass
class GraphTask:
    """Row-normalised features (GraphNAS NormalizeFeatures), an edge list with self loops, GCN weights, a split."""
    X: torch.Tensor
    y: torch.Tensor
    edges: torch.Tensor
    gcn_norm: torch.Tensor
    split: dict
    n_classes: int

    @classmethod
    def from_nodedata(cls, data, split: dict) -> "GraphTask":
        g = data.graph_with_self_loops()
        src, dst = g.edges()
        edges = torch.stack([src, dst]).long()
        deg = torch.bincount(src, minlength=data.num_nodes).float()
        dis = deg.pow(-0.5)
        X = data.X.float()
        X = (X / X.sum(1, keepdim=True).clamp_min(1e-12)).to_sparse().coalesce()  # bag of words: sparse
        return cls(X, data.y.long(), edges, dis[src] * dis[dst], split, data.num_classes)


def train_gnn(model: MacroGNN, task: GraphTask, epochs: int, lr: float = 0.005, weight_decay: float = 5e-4) -> dict:
    """GraphNAS run_model (gnn_model_manager.py:149-200): full-batch Adam on NLL of log_softmax; after every epoch an
    eval pass; the reported val/test accuracy are those of the epoch with the lowest validation loss (first on ties).
    Returns {val_acc, test_acc, epoch, epochs}; ``model`` keeps its final weights (as GraphNAS)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    tr, va, te = task.split["train"], task.split["val"], task.split["test"]
    best = {"val_loss": float("inf"), "val_acc": 0.0, "test_acc": 0.0, "epoch": 0}
    for ep in range(1, epochs + 1):
        model.train()
        out = torch.log_softmax(model(task.X, task.edges, task.gcn_norm), 1)
        loss = nn.functional.nll_loss(out[tr], task.y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            out = torch.log_softmax(model(task.X, task.edges, task.gcn_norm), 1)
        vl = float(nn.functional.nll_loss(out[va], task.y[va]))
        if vl < best["val_loss"]:
            pred = out.argmax(1)
            best = {"val_loss": vl, "val_acc": float((pred[va] == task.y[va]).double().mean()),
                    "test_acc": float((pred[te] == task.y[te]).double().mean()), "epoch": ep}
    return {"val_acc": best["val_acc"], "test_acc": best["test_acc"], "epoch": best["epoch"], "epochs": epochs}


def _arch_seed(arch, k: int) -> int:
    return int(sum(int(v) * 7 ** i for i, v in enumerate(arch)) * 31 + 1_000_003 * (k + 1))


def truth_accuracy(arch, task: GraphTask, epochs: int, k_seeds: int, cache: dict, **train_kw) -> float:
    """Ground truth on the generated graph: mean TEST accuracy of the architecture trained from scratch for ``epochs``
    over ``k_seeds`` initialisations that no search arm uses (seeds depend on the architecture only; cached)."""
    arch = tuple(arch)
    if arch not in cache:
        accs = []
        for k in range(k_seeds):
            with torch.random.fork_rng():
                torch.manual_seed(_arch_seed(arch, k))
                m = MacroGNN(arch, task.X.size(1), task.n_classes, **train_kw.get("model", {}))
                accs.append(train_gnn(m, task, epochs, **train_kw.get("opt", {}))["test_acc"])
        cache[arch] = float(np.mean(accs))
    return cache[arch]


class TrainedEvaluator:
    """The ``bench`` handed to ``rl_search`` when children are TRAINED: ``sample``/``valid`` over the macro space and
    ``query(arch)`` = validation accuracy after training. It mirrors rl_search's incumbent rule (the best architecture
    changes only on a strictly higher validation accuracy) to know each child's parent (= the incumbent it was mutated
    from) and keeps the incumbent's trained model. ``share=False``: every child trained from scratch for ``epochs``.
    ``share=True`` (constrained parameter sharing): the child inherits the parent's homogeneous layers and trains
    ``epochs_share`` epochs when it inherited at least one layer, else it trains from scratch for ``epochs``; the
    first architecture is always trained from scratch. ``log`` records per evaluation the architecture, parent,
    inherited layers, epochs trained and the accuracies.
    ``shadow=True`` (from-scratch arm only; review 2026-12-07): a paired SAME-children diagnostic that never feeds the
    search. Each child that has a homogeneous layer with its incumbent parent is ALSO trained the sharing way (same
    initialisation as its from-scratch training, the parent's homogeneous layers inherited from the incumbent's
    from-scratch-trained model, ``epochs_share`` epochs) and ``log[i]['val_shadow']`` is that validation accuracy; a
    child with no homogeneous layer (and the first architecture) keeps its from-scratch estimate, as the method
    would. The torch RNG is forked, so the search and the from-scratch estimates are unchanged by it."""

    def __init__(self, task: GraphTask, seed: int, epochs: int, share: bool = False, epochs_share: int | None = None,
                 model_kw: dict | None = None, opt_kw: dict | None = None, shadow: bool = False):
        if shadow and share:
            raise ValueError("shadow is the from-scratch arm's paired diagnostic (share=False)")
        self.task, self.seed, self.epochs, self.share, self.shadow = task, seed, epochs, share, shadow
        self.shadow_wall = 0.0  # seconds spent on the shadow trainings (a timing, never a metric)
        self.epochs_share = epochs if epochs_share is None else epochs_share
        self.model_kw, self.opt_kw = model_kw or {}, opt_kw or {}
        self.sizes = MACRO_SIZES
        self.best = self.best_val = self.best_model = None
        self.log: list[dict] = []

    def valid(self, arch) -> bool:
        return True

    def sample(self, rng: np.random.Generator) -> tuple:
        return tuple(int(rng.integers(s)) for s in self.sizes)

    def query(self, arch) -> float:
        arch = tuple(arch)
        i = len(self.log)
        with torch.random.fork_rng():
            torch.manual_seed(10_000 * self.seed + i)  # same init stream in both arms
            model = MacroGNN(arch, self.task.X.size(1), self.task.n_classes, **self.model_kw)
            layers, n_copied, epochs = [], 0, self.epochs
            if self.best is not None:
                if sum(a != b for a, b in zip(arch, self.best)) != 1:
                    raise RuntimeError(f"child {arch} is not a one-class modification of the incumbent {self.best}")
                if self.share:
                    layers = homogeneous_layers(self.best, arch, self.task.X.size(1), self.task.n_classes)
                    if layers:
                        n_copied = inherit(model, self.best_model, layers)
                        epochs = self.epochs_share
            r = train_gnn(model, self.task, epochs, **self.opt_kw)
        self.last_model = model
        self.log.append({"arch": arch, "parent": self.best, "inherited": layers, "copied": n_copied,
                         "epochs": epochs, **{k: r[k] for k in ("val_acc", "test_acc", "epoch")}})
        if self.shadow:
            sh_layers = [] if self.best is None else homogeneous_layers(self.best, arch, self.task.X.size(1),
                                                                         self.task.n_classes)
            val_sh = r["val_acc"]
            if sh_layers:
                t0 = time.perf_counter()
                with torch.random.fork_rng():
                    torch.manual_seed(10_000 * self.seed + i)  # the from-scratch child's initialisation
                    m_sh = MacroGNN(arch, self.task.X.size(1), self.task.n_classes, **self.model_kw)
                    inherit(m_sh, self.best_model, sh_layers)
                    val_sh = train_gnn(m_sh, self.task, self.epochs_share, **self.opt_kw)["val_acc"]
                self.shadow_wall += time.perf_counter() - t0
            self.log[-1].update(val_shadow=val_sh, inherited_shadow=sh_layers)
        if self.best is None or r["val_acc"] > self.best_val:
            self.best, self.best_val, self.best_model = arch, r["val_acc"], model
        return r["val_acc"]


def macro_name(arch, n_classes: int = 7) -> str:
    return " | ".join(f"{s['attention']},{s['aggregator']},{s['activation']},h{s['heads']}x{s['hidden']}"
                      for s in decode(arch, n_classes))


def sharing_task(cfg: dict) -> GraphTask:
    """The graph of the sharing experiment: ``share_dataset`` 'citation_like' (offline generator calibrated to Cora,
    ``share_generator`` keyword arguments, seed ``share_graph_seed``) or a real Planetoid graph (online, DGL), with a
    label-stratified train/val/test split ``share_split`` (seeded by ``share_graph_seed``)."""
    from ..graph.graphdata import stratified_split

    name = cfg.get("share_dataset", "citation_like")
    gseed = cfg.get("share_graph_seed", 0)
    if name == "citation_like":
        from ..graph.citation_like import citation_like

        data = citation_like(seed=gseed, **(cfg.get("share_generator") or {}))
    else:  # pragma: no cover - needs the internet
        from ..graph.datasets import load_graph

        data = load_graph(name)
    split = stratified_split(data.y, tuple(cfg.get("share_split", (0.2, 0.3, 0.5))), seed=gseed)
    return GraphTask.from_nodedata(data, split)


def sharing_search(task: GraphTask, seed: int, share: bool, cfg: dict) -> tuple[SearchResult, TrainedEvaluator]:
    """One RCE search (``rl_search`` 'rce', GraphNAS controller settings ``ctrl_*``) of ``share_evals`` evaluations
    whose children are trained on ``task``: from scratch (``share_epochs``) or with constrained parameter sharing
    (homogeneous layers inherited from the parent, ``share_epochs_child`` epochs). The from-scratch arm also records
    the paired one-step sharing estimate of its own children (``shadow``) unless ``share_paired_diagnostic`` is false."""
    ev = TrainedEvaluator(task, seed, cfg["share_epochs"], share=share, epochs_share=cfg["share_epochs_child"],
                          model_kw={"dropout": cfg.get("share_dropout", 0.6)},
                          opt_kw={"lr": cfg.get("share_lr", 0.005), "weight_decay": cfg.get("share_weight_decay", 5e-4)},
                          shadow=(not share) and cfg.get("share_paired_diagnostic", True))
    keys = ("lr", "entropy_coeff", "baseline_decay", "hid", "temperature", "tanh_c", "adv_scale")
    kw = {k: cfg[f"ctrl_{k}"] for k in keys if f"ctrl_{k}" in cfg}
    res = rl_search("rce", ev, cfg["share_evals"], seed, **kw)
    return res, ev


def kendall_tau(x, y) -> float:
    """Kendall tau-b (scipy) of two sequences; 0.0 when undefined (a constant sequence)."""
    from scipy.stats import kendalltau

    t = kendalltau(np.asarray(x, float), np.asarray(y, float)).statistic
    return 0.0 if not np.isfinite(t) else float(t)
