"""GM-NAS: Generalizing Few-Shot NAS with Gradient Matching (Hu, Wang, Hong, Xu, Li, Lin & Luo, ICLR 2022),
https://arxiv.org/abs/2203.15207.

Few-shot NAS splits the one-shot supernet into sub-supernets, each holding a subset of the operations of one edge, so
that operations whose shared weights would pull in different directions stop sharing them. GM-NAS chooses the split
by gradient matching: on each candidate edge, the gradient of the OTHER shared weights is computed once per operation
of the edge (same minibatch, same path elsewhere); operations whose gradients disagree (low cosine similarity) are put
in different groups by a min-cut of the distance matrix, and the edge with the largest cut is split first.

Follows the official code, github.com/skhu101/GM-NAS, ``WS-GM/nasbench201/`` (function names in brackets), for the
RSPS (random single-path) supernet of NAS-Bench-201 (``exp_scripts/rsws-ws-201.sh``: ``--supernet_train rsws
--split_crit grad --split_num 2 --dis_metric cos --edge_crit grad --split_ckpts 20,40 --projection_warmup_epoch 50``):

* supernet training [train_search.py train, TinyNetworkWS._sample_single_path_theta]: each step one path, every edge
  drawn uniformly among the operations its encoding ``enc`` allows, redrawn until the cell is connected
  [check_connect]; cross-entropy, gradient clipping at 5, SGD (Nesterov with ``--fs_opt 1``), cosine learning rate to
  ``lr_min`` over the supernet's whole timeline (a sub-supernet continues its parent's timeline, optimiser and
  scheduler state).
* split [split_supernet]: at each checkpoint of ``split_steps`` every current supernet is split. For each unsplit edge
  ``eid`` and each of ``repeat`` draws (a fresh training minibatch and a fresh path): for every op k of the edge the
  path with ``eid`` set to k, one forward/backward, the gradient of the shared weights
  [TinyNetworkWS.get_split_gradients: every searched-cell edge except ``eid`` and the reduction blocks; not the stem,
  last BN or classifier]; distance matrix ``D[k, l] = 1 - cos(g_k, g_l)`` [utils.match_loss, dis_metric 'cos',
  eps 1e-6] averaged over the draws; partition [utils.mincut_split_201]: among the 10 partitions of the 5 ops into a
  pair and a triple, the one with the smallest within-group distance, its edge score = the cut (sum of cross-group
  distances); the edge with the largest score is split; each group gives a sub-supernet that inherits the weights and
  optimiser state and restricts the edge to its group.
* restart [--restart final, every official NB-201 command]: optional (``restart: final``): at the last split the
  sub-supernets are re-initialised (weights, optimiser, scheduler) and trained for the rest of the timeline; default
  ``none`` (inherit), see the registry's deviations.
* random split [split_crit 'fewshot', utils.random_split_201]: a random permutation of the 5 ops, first 2 vs the other
  3 (the same group sizes); here on the same edge that GM chose at the same node of the split tree.
* evaluation: each architecture belongs to exactly one leaf sub-supernet (the one whose encoding contains it) and is
  evaluated there (child with inherited weights, BN recalibrated; the repository's rule).

The one-shot baseline (SPOS / RSPS) is the same loop with no split, for the same total number of optimiser steps
(summed over the sub-supernets of the split arms).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import space201
from .harness import batches, evaluate_child, flat_grad
from .space201 import N_EDGES, N_OPS
from .supernet201 import NB201SuperNet, SearchCell

ARMS = ("oneshot", "random", "gm")


# ------------------------------------------------------------------------------------------------ gradient matching
def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> float:
    """<a, b> / (|a| |b| + eps) of two flattened gradients (the official 'cos' metric's similarity)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float((a * b).sum() / (a.norm() * b.norm() + eps))


def gm_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> float:
    """Official match_loss(dis_metric='cos'): 1 - cosine similarity."""
    return 1.0 - cosine_similarity(a, b, eps)


def shared_params(net: NB201SuperNet, eid: int) -> list[nn.Parameter]:
    """[get_split_gradients] the weights whose gradients are matched: every searched-cell edge except ``eid`` (all
    its ops) and the non-searched cells (reduction blocks) -- in module order."""
    params = []
    for cell in net.cells:
        if isinstance(cell, SearchCell):
            for e, edge in enumerate(cell.edges):
                if e != eid:
                    params += list(edge.parameters())
        else:
            params += list(cell.parameters())
    return params


def allowed_ops(enc: np.ndarray, e: int) -> list[int]:
    return [int(o) for o in np.flatnonzero(enc[e])]


def contains(enc: np.ndarray, cell) -> bool:
    """Whether the (sub-)supernet with encoding ``enc`` (6 x 5 booleans) contains ``cell``."""
    return all(bool(enc[e, int(o)]) for e, o in enumerate(cell))


def sample_path(enc: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
    """[_sample_single_path_theta] one op per edge, uniform among the allowed ones, redrawn until connected."""
    while True:
        cell = tuple(int(rng.choice(allowed_ops(enc, e))) for e in range(N_EDGES))
        if space201.is_connected(cell):
            return cell


def edge_distance_matrix(net: NB201SuperNet, enc: np.ndarray, eid: int, data_iter, repeat: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Mean over ``repeat`` (minibatch, path) draws of D[k, l] = 1 - cos(g_k, g_l), g_k the shared weights' gradient
    with op k on edge ``eid`` (hard one-hot, official ``--hard 1``). Leaves the weights' .grad set to None."""
    net.train()
    params = shared_params(net, eid)
    ops = allowed_ops(enc, eid)
    D = np.zeros((N_OPS, N_OPS))
    for _ in range(repeat):
        x, y = next(data_iter)
        path = list(sample_path(enc, rng))
        grads = []
        for k in ops:
            path[eid] = k
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x, tuple(path)), y).backward()
            grads.append(flat_grad(params).detach().clone())
        for a, k in enumerate(ops):
            for b, l in enumerate(ops):
                D[k, l] += gm_distance(grads[a], grads[b])
    net.zero_grad(set_to_none=True)
    return D / repeat


def mincut_split(D: np.ndarray) -> tuple[list[list[int]], float]:
    """[mincut_split_201] the partition of the 5 ops into a pair and a triple with the smallest within-group distance
    (upper triangle of D), scanning pairs (i < j) in order (first minimum kept); score = total - within = the cut."""
    D = np.asarray(D, dtype=float)
    n = D.shape[0]
    U = np.triu(D, 1)
    best, groups, score = math.inf, None, 0.0
    for i, j in itertools.combinations(range(n), 2):
        g1 = [i, j]
        g2 = [k for k in range(n) if k not in g1]
        within = U[i, j] + sum(U[a, b] for a, b in itertools.combinations(g2, 2))
        if within < best:
            best, groups, score = within, [g1, g2], float(U.sum() - within)
    return groups, score


def random_split(rng: np.random.Generator, n: int = N_OPS) -> list[list[int]]:
    """[random_split_201, split_num 2] a random permutation, its first 2 ops vs the rest (sorted within groups)."""
    perm = rng.permutation(n)
    return [sorted(int(o) for o in perm[:2]), sorted(int(o) for o in perm[2:])]


# ------------------------------------------------------------------------------------------------ supernets and splits
@dataclass
class Node:
    """One (sub-)supernet of the split tree: its network, optimiser, encoding and position on its timeline."""
    net: NB201SuperNet
    opt: torch.optim.Optimizer
    enc: np.ndarray  # (6, 5) bool: allowed ops per edge
    name: str = ""  # path in the split tree: "" root, "0", "01", ...
    step: int = 0  # optimiser steps on this supernet's timeline (parent's steps included)
    splits: list = field(default_factory=list)  # [(edge, groups, score)] from the root


def make_optimizer(net: NB201SuperNet, cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.weight_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                           weight_decay=cfg["weight_decay"], nesterov=bool(cfg["nesterov"]))


def new_root(seed: int, cfg: dict) -> Node:
    torch.manual_seed(seed)
    net = NB201SuperNet(cfg["channels"], cfg["n_cells"], num_classes=10, in_channels=1)
    return Node(net, make_optimizer(net, cfg), np.ones((N_EDGES, N_OPS), dtype=bool))


def split_node(node: Node, eid: int, groups, score: float, cfg: dict) -> list[Node]:
    """One sub-supernet per group: a copy of the weights (and BN statistics) and of the optimiser state, the edge
    ``eid`` restricted to the group, the timeline continued [train_search.py main, restart 'none']."""
    if not node.enc[eid].all():
        raise ValueError(f"edge {eid} was already split in node {node.name!r}")
    children = []
    for g, group in enumerate(groups):
        net = copy.deepcopy(node.net)
        opt = make_optimizer(net, cfg)
        opt.load_state_dict(node.opt.state_dict())
        enc = node.enc.copy()
        enc[eid] = False
        enc[eid, list(group)] = True
        children.append(Node(net, opt, enc, node.name + str(g), node.step,
                             node.splits + [(int(eid), [list(map(int, gr)) for gr in groups], float(score))]))
    return children


def restart_node(node: Node, seed: int, cfg: dict) -> Node:
    """[train_search.py main, --restart final] at the LAST split the sub-supernet keeps only its encoding: fresh
    weights, a fresh optimiser and a fresh scheduler (CosineAnnealingLR(T_max=total) from epoch 0, so ``step`` = 0);
    it is then trained for the rest of the timeline (official: projection_warmup_epoch)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, 7, _tag(node.name)]).generate_state(1)[0]))
    net = NB201SuperNet(cfg["channels"], cfg["n_cells"], num_classes=10, in_channels=1)
    return Node(net, make_optimizer(net, cfg), node.enc.copy(), node.name, 0, list(node.splits))


def lr_at(step: int, total: int, lr: float, lr_min: float) -> float:
    """CosineAnnealingLR(T_max=total, eta_min=lr_min) at ``step`` (stepped per optimiser step here, per epoch there)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / total))


def train_node(node: Node, data: dict, steps: int, total: int, cfg: dict, rng: np.random.Generator,
               data_iter) -> list[float]:
    """``steps`` RSPS steps on ``node`` (uniform connected path within its encoding, CE, clip, SGD step)."""
    net, opt = node.net, node.opt
    net.train()
    losses = []
    for _ in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(node.step, total, cfg["lr"], cfg["lr_min"])
        x, y = next(data_iter)
        path = sample_path(node.enc, rng)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x, path), y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.weight_parameters(), cfg["clip"])
        opt.step()
        node.step += 1
        losses.append(float(loss.detach()))
    return losses


def gm_choose(node: Node, data_iter, repeat: int, rng: np.random.Generator) -> dict:
    """[split_supernet, edge_crit 'grad'] distance matrix and min-cut of every unsplit edge; the edge with the largest
    cut (strictly above the previous best, starting at 0, scanning edges in order)."""
    out = {"edges": {}, "eid": None, "groups": None, "score": 0.0}
    for eid in range(N_EDGES):
        if not node.enc[eid].all():
            continue
        D = edge_distance_matrix(node.net, node.enc, eid, data_iter, repeat, rng)
        groups, score = mincut_split(D)
        out["edges"][eid] = {"D": D.tolist(), "groups": groups, "score": score}
        if score > out["score"] or out["eid"] is None:
            out.update(eid=eid, groups=groups, score=score)
    return out


def total_steps(split_steps, steps: int) -> int:
    """Optimiser steps of a split arm summed over its sub-supernets: each level doubles the supernets."""
    marks = [0, *split_steps, steps]
    return int(sum((2 ** k) * (marks[k + 1] - marks[k]) for k in range(len(marks) - 1)))


def _gen(seed: int, *tags) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0]))


def _rng(seed: int, *tags) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def _tag(name: str) -> int:
    return int("1" + name, 2) if name else 1  # node path "01" -> distinct int


def run_split_arm(arm: str, data: dict, seed: int, cfg: dict, edges_from: dict | None = None) -> dict:
    """Train the split tree of ``arm`` ('gm' or 'random'). Every node draws its paths and minibatches from generators
    seeded by (seed, node), so GM and random split share the root's trajectory up to the first split.
    ``edges_from``: for 'random', the GM run's {node name: edge} (same edge, random partition).
    Returns {"leaves": [Node], "log": {...}}."""
    if arm not in ("gm", "random"):
        raise ValueError(f"arm={arm!r}; split arms: gm, random")
    marks = [0, *cfg["split_steps"], cfg["steps"]]
    total = cfg["steps"]
    nodes = [new_root(seed, cfg)]
    log = {"choices": {}, "losses": {}}
    for level in range(len(marks) - 1):
        nxt = []
        for node in nodes:
            t = _tag(node.name)
            it = batches(*data["train"], cfg["batch_size"], _gen(seed, 1, t))
            log["losses"][node.name or "root"] = train_node(node, data, marks[level + 1] - marks[level], total, cfg,
                                                            _rng(seed, 2, t), it)
            if level == len(marks) - 2:
                nxt.append(node)
                continue
            if arm == "gm":
                mit = batches(*data["train"], cfg["batch_size"], _gen(seed, 3, t))
                ch = gm_choose(node, mit, cfg["repeat"], _rng(seed, 4, t))
                eid, groups, score = ch["eid"], ch["groups"], ch["score"]
            else:
                eid = int(edges_from[node.name]) if edges_from is not None else \
                    int(_rng(seed, 5, t).choice([e for e in range(N_EDGES) if node.enc[e].all()]))
                groups, score, ch = random_split(_rng(seed, 6, t)), 0.0, {}
            log["choices"][node.name] = {"eid": int(eid), "groups": groups, "edges": ch.get("edges", {})}
            if arm == "gm":
                log["choices"][node.name]["score"] = score
            kids = split_node(node, eid, groups, score, cfg)
            if cfg.get("restart", "none") == "final" and level == len(marks) - 3:
                kids = [restart_node(k, seed, cfg) for k in kids]
            nxt += kids
        nodes = nxt
    return {"leaves": nodes, "log": log}


def run_oneshot(data: dict, seed: int, cfg: dict, steps: int) -> dict:
    """One-shot RSPS supernet for ``steps`` steps (cosine over its own steps), same initialisation as the split arms."""
    node = new_root(seed, cfg)
    it = batches(*data["train"], cfg["batch_size"], _gen(seed, 1, 1))
    losses = train_node(node, data, steps, steps, cfg, _rng(seed, 2, 1), it)
    return {"leaves": [node], "log": {"losses": {"root": losses}}}


def leaf_of(leaves, cell) -> Node:
    hits = [n for n in leaves if contains(n.enc, cell)]
    if len(hits) != 1:
        raise RuntimeError(f"cell {cell} is in {len(hits)} sub-supernets (expected exactly 1)")
    return hits[0]


def rank_cells(leaves, cells, data: dict, calib: int) -> list[float]:
    """Validation accuracy of each cell as a child of the sub-supernet containing it (BN recalibrated)."""
    return [evaluate_child(leaf_of(leaves, c).net, tuple(c), data, "val", calib=calib) for c in cells]


def top_k_truth(pred, truth, k: int) -> float:
    """Mean true accuracy of the k cells with the highest predicted accuracy (ties: lower index first)."""
    pred, truth = np.asarray(pred, dtype=float), np.asarray(truth, dtype=float)
    order = np.lexsort((np.arange(len(pred)), -pred))
    return float(truth[order[:k]].mean())
