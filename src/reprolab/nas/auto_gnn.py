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
"""
from __future__ import annotations

import itertools
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
