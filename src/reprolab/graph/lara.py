"""LARA: Efficient GNN Explanation via Learning Removal-based Attribution (Rao et al., 2023).

arXiv:2306.05760; official code: the ``GraphSampling/LARA.py`` module of the authors' release (PyG). The pieces:

1. **Removal-based attribution (the targets).** For a node ``t`` explained with the class ``c = argmax f(G)_t``
   predicted on the whole graph, and its players (the nodes within ``player_hops`` of ``t``), take an order ``pi`` of
   the players and remove them one at a time (a removed node loses all its edges). The attribution of player ``s`` is
   the drop of the predicted-class probability when ``s`` is removed after its predecessors in ``pi``:

       phi_pi(s -> t) = f(G \\ pi_<s)_t[c] - f(G \\ pi_<=s)_t[c],

   i.e. a permutation marginal contribution (the official code adds players in a random order, which is the same
   thing read backwards); averaging over random orders is a Monte Carlo Shapley estimate of the players' removal
   value, and ``sum_s phi_pi(s -> t) = f(G)_t[c] - f(t alone)_t[c]`` for every order. Targets are computed for
   training nodes only.
2. **The explainer**, a GNN (``n_layers`` GraphConv, layer outputs concatenated, official ``Explainer``): two linear
   heads ``W`` and ``p`` and a bilinear score ``score(s -> t) = <p(h_s), W(h_t)>``, fitted by MSE to the targets.
3. **Deployment**: one explainer forward pass scores every (player, node) pair of every node to explain.

Baselines here: ``dgl.nn.GNNExplainer`` (per-node mask optimisation, edge mask -> node score = max over the node's
edges), ``dgl.nn.PGExplainer`` (amortised: an MLP on edge embeddings trained once on training nodes) and gradient
saliency (``||d f_t[c] / d x_s||``). Fidelity+ / Fidelity- at a sparsity ``rho``: remove (resp.
keep only) the top ``ceil((1 - rho) M)`` of the ``M`` players and measure the drop of ``f_t[c]``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import GNNExplainer, GraphConv, PGExplainer  # noqa: E402


class EdgeGCN(nn.Module):
    """The GNN to explain: ``n_layers`` GraphConv (norm="both") on a graph with self loops, optional edge weights
    (the ``eweight`` keyword that ``dgl.nn.GNNExplainer`` passes, or ``edge_weight`` from ``dgl.nn.PGExplainer``);
    ``embed=True`` returns the last hidden layer (the node embeddings ``dgl.nn.PGExplainer`` reads)."""

    def __init__(self, in_feats: int, hidden: int, n_classes: int, n_layers: int = 3):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [n_classes]
        self.layers = nn.ModuleList(GraphConv(a, b, norm="both", allow_zero_in_degree=True)
                                    for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, graph, feat, eweight=None, embed=False, edge_weight=None):
        w = eweight if eweight is not None else edge_weight
        h = feat  # (N, d)
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = F.relu(h)
                if embed and i == len(self.layers) - 1:
                    return h  # (N, hidden)
            h = layer(graph, h, edge_weight=w)
        return h  # (N, C)


def train_gcn(model: nn.Module, g, X, y, train_idx, *, epochs: int, lr: float, weight_decay: float) -> None:
    """Full-batch Adam on cross-entropy (GNNExplainer's BA-Shapes recipe); leaves the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        loss = F.cross_entropy(model(g, X)[train_idx], y[train_idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def players_of(g, t: int, player_hops: int) -> torch.Tensor:
    """Global ids of the nodes within ``player_hops`` of ``t`` (``t`` excluded), sorted."""
    sg, _ = dgl.khop_in_subgraph(g, int(t), player_hops)
    nodes = sg.ndata[dgl.NID]
    return torch.sort(nodes[nodes != int(t)]).values


def _removed_graph(sg, removed_local: torch.Tensor):
    """``sg`` with every edge incident to a removed node dropped (node ids kept, so the layout is unchanged)."""
    u, v = sg.edges()
    drop = torch.zeros(sg.num_nodes(), dtype=torch.bool)
    drop[removed_local] = True
    keep = ~(drop[u] | drop[v])
    return dgl.edge_subgraph(sg, keep, relabel_nodes=False, store_ids=False)


@torch.no_grad()
def removal_values(model: nn.Module, g, X, t: int, players: torch.Tensor, order: torch.Tensor, n_layers: int,
                   cls: int | None = None, target: str = "prob") -> torch.Tensor:
    """phi_pi(s -> t) for the players in ``order`` (a permutation of ``players``), returned aligned with ``players``.

    ``target="logit"`` (the official value: ``LARA.py`` ``__get_subgraph__`` reads
    ``imputer(...)[:, center, ori_pred_cls]``, the target GNN's raw output for the predicted class) uses the model's
    raw output f_t[c]; ``target="prob"`` (this repository's first version) its softmax probability.

    Exact for an ``n_layers`` GCN: the model runs on the (n_layers + 1)-hop in-subgraph of ``t`` (one more hop than
    the receptive field so that every node's degree, hence GraphConv's normalisation, is the full graph's). The
    ``M + 1`` removal states are batched into one forward pass.
    """
    sg, center = dgl.khop_in_subgraph(g, int(t), n_layers + 1)
    gid = sg.ndata[dgl.NID]
    local = {int(v): i for i, v in enumerate(gid)}
    feat = X[gid]
    if cls is None:
        cls = int(model(sg, feat)[center].argmax())
    order_local = torch.tensor([local[int(s)] for s in order], dtype=torch.int64)
    n, M = sg.num_nodes(), len(order)
    rank = torch.full((n,), M, dtype=torch.int64)  # position in the removal order; M = never removed
    rank[order_local] = torch.arange(M)
    u, w = sg.edges()
    last = torch.minimum(rank[u], rank[w])  # edge (u, w) survives in states k = 0 .. last (k = number removed)
    reps = last + 1
    state = torch.repeat_interleave(torch.arange(len(u)), reps)  # edge id per copy
    k = torch.arange(int(reps.sum())) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)  # its state
    bg = dgl.graph((u[state] + k * n, w[state] + k * n), num_nodes=(M + 1) * n)  # the M + 1 states, batched
    if target not in ("prob", "logit"):
        raise ValueError(f"removal target {target!r}; allowed: prob, logit")
    prob = model(bg, feat.repeat(M + 1, 1))  # ((M+1) n, C) raw outputs (logits)
    if target == "prob":
        prob = prob.softmax(-1)
    v = prob[torch.arange(M + 1) * n + int(center), cls]  # (M+1,)
    phi_order = v[:-1] - v[1:]  # removing order[k] moves from state k to state k+1
    pos = {int(s): k for k, s in enumerate(order)}
    return torch.stack([phi_order[pos[int(s)]] for s in players])


def removal_targets(model: nn.Module, g, X, nodes, *, player_hops: int, n_layers: int, n_perms: int,
                    seed: int, antithetic: bool = False,
                    target: str = "prob") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, tgt, phi): for each node ``t`` in ``nodes`` and each of its players ``s``, phi averaged over
    ``n_perms`` random removal orders (Monte Carlo Shapley of the removal value).

    ``antithetic=True`` (the official ``GraphSampler``): the orders come in pairs, a random order and its reverse
    (``__init_permu__`` flips the stored permutation), so ``n_perms`` must be even; with 2 players one pair covers both
    orders and the average is the exact Shapley value."""
    if antithetic and n_perms % 2:
        raise ValueError(f"antithetic orders come in pairs: n_perms must be even, got {n_perms}")
    gen = torch.Generator().manual_seed(seed)
    src, tgt, val = [], [], []
    for t in nodes:
        t = int(t)
        players = players_of(g, t, player_hops)
        if len(players) == 0:
            continue
        phi = torch.zeros(len(players))
        order = None
        for k in range(n_perms):
            if antithetic and k % 2 == 1:
                order = order.flip(0)
            else:
                order = players[torch.randperm(len(players), generator=gen)]
            phi += removal_values(model, g, X, t, players, order, n_layers, target=target)
        src.append(players)
        tgt.append(torch.full((len(players),), t))
        val.append(phi / n_perms)
    return torch.cat(src), torch.cat(tgt), torch.cat(val)


class LaraExplainer(nn.Module):
    """The official ``Explainer``: GraphConv stack, concatenated layer outputs h, score(s, t) = <p(h_s), W(h_t)>."""

    def __init__(self, in_feats: int, hidden: int, n_layers: int = 3, dropout: float = 0.0):
        super().__init__()
        dims = [in_feats] + [hidden] * n_layers
        self.convs = nn.ModuleList(GraphConv(a, b, norm="both", allow_zero_in_degree=True)
                                   for a, b in zip(dims[:-1], dims[1:]))
        self.W = nn.Linear(n_layers * hidden, hidden)
        self.p = nn.Linear(n_layers * hidden, hidden)
        self.dropout = dropout

    def embed(self, g, X) -> tuple[torch.Tensor, torch.Tensor]:
        hs, h = [], X
        for conv in self.convs:
            h = F.dropout(F.relu(conv(g, h)), self.dropout, self.training)
            hs.append(h)
        h = torch.cat(hs, 1)  # (N, L * hidden)
        return self.W(h), self.p(h)  # target side, source side

    def forward(self, g, X, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        hw, hp = self.embed(g, X)
        return (hp[src] * hw[tgt]).sum(-1)  # (P,) score(s -> t)


def train_explainer(explainer: LaraExplainer, g, X, src, tgt, phi, *, epochs: int, lr: float, weight_decay: float,
                    batch: int, seed: int, select_fn=None, eval_every: int = 10) -> list[float]:
    """MSE between the explainer's scores and the removal targets; mini-batches of pairs, full-graph embeddings.

    ``select_fn(explainer) -> float`` (optional): the official code's model selection, evaluated every
    ``eval_every`` epochs (validation Fidelity+); the explainer ends with the best-scoring weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(explainer.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    best, best_state = -float("inf"), None
    for epoch in range(epochs):
        explainer.train()
        perm = torch.randperm(len(phi), generator=gen)
        tot = 0.0
        for i in range(0, len(phi), batch):
            b = perm[i:i + batch]
            loss = F.mse_loss(explainer(g, X, src[b], tgt[b]), phi[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss) * len(b)
        losses.append(tot / len(phi))
        if select_fn is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            explainer.eval()
            score = float(select_fn(explainer))
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in explainer.state_dict().items()}
                explainer.selected_epoch = epoch + 1
    if best_state is not None:
        explainer.load_state_dict(best_state)
    explainer.eval()
    return losses


@torch.no_grad()
def lara_scores(explainer: LaraExplainer, g, X, nodes, players: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Deployment: one explainer forward for all ``nodes``; returns {t: scores aligned with players[t]}."""
    hw, hp = explainer.embed(g, X)
    return {int(t): hp[players[int(t)]] @ hw[int(t)] for t in nodes}


def _player_scores_from_edge_mask(g, sg, edge_mask: torch.Tensor, players: torch.Tensor) -> torch.Tensor:
    """A player's score from an edge mask on the subgraph ``sg`` of ``g``: the max mask over its incident edges (0 for
    players outside ``sg``)."""
    u, v = sg.edges()
    node_score = torch.zeros(sg.num_nodes())
    node_score = node_score.scatter_reduce(0, u.long(), edge_mask, reduce="amax")
    node_score = node_score.scatter_reduce(0, v.long(), edge_mask, reduce="amax")
    lookup = torch.zeros(g.num_nodes())
    lookup[sg.ndata[dgl.NID].long()] = node_score
    return lookup[players]


def gnnexplainer_scores(model: nn.Module, g, X, t: int, players: torch.Tensor, *, n_layers: int, epochs: int,
                        lr: float) -> torch.Tensor:
    """``dgl.nn.GNNExplainer`` edge mask for node ``t``; a player's score is the max mask over its edges."""
    exp = GNNExplainer(model, num_hops=n_layers, lr=lr, num_epochs=epochs, log=False)
    _, sg, _, edge_mask = exp.explain_node(int(t), g, X)
    return _player_scores_from_edge_mask(g, sg, edge_mask, players)


def train_pgexplainer(model: nn.Module, g, X, nodes, *, n_layers: int, hidden: int, epochs: int, lr: float,
                     batch: int, t0: float, t1: float, seed: int, select_fn=None) -> PGExplainer:
    """``dgl.nn.PGExplainer`` (Luo et al. 2020, the paper's amortised competitor) trained on ``nodes`` (training
    nodes): Adam, mini-batches of ``batch`` nodes, temperature annealed as in the PGExplainer paper,
    t(e) = t0 * (t1 / t0) ** (e / epochs); DGL's default size and entropy coefficients.

    ``select_fn(exp) -> float`` (optional): evaluated after every epoch (validation Fidelity+, as LARA's model
    selection); the explainer ends with the best-scoring weights, and ``exp.best_score`` / ``exp.best_epoch`` say
    which."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    exp = PGExplainer(model, hidden, num_hops=n_layers, explain_graph=False)
    opt = torch.optim.Adam(exp.parameters(), lr=lr)
    nodes = torch.as_tensor(list(nodes), dtype=torch.int64)
    best, best_epoch, best_state = -float("inf"), 0, None
    for e in range(epochs):
        temp = t0 * (t1 / t0) ** (e / epochs)
        perm = nodes[torch.randperm(len(nodes), generator=gen)]
        for i in range(0, len(perm), batch):
            loss = exp.train_step_node(perm[i:i + batch].tolist(), g, X, temp)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if select_fn is not None:
            score = float(select_fn(exp))
            if best_state is None or score > best:
                best, best_epoch, best_state = score, e + 1, {k: v.clone() for k, v in exp.state_dict().items()}
    if best_state is not None:
        exp.load_state_dict(best_state)
        exp.best_score, exp.best_epoch = best, best_epoch
    return exp


@torch.no_grad()
def pgexplainer_scores(exp: PGExplainer, g, X, t: int, players: torch.Tensor, temperature: float) -> torch.Tensor:
    """The trained PGExplainer's edge mask on the ``num_hops`` in-subgraph of ``t``; a player's score is the max mask
    over its edges (as for GNNExplainer)."""
    _, edge_mask, sg, _ = exp.explain_node(int(t), g, X, temperature)
    return _player_scores_from_edge_mask(g, sg, edge_mask, players)


def saliency_scores(model: nn.Module, g, X, t: int, players: torch.Tensor, *, n_layers: int) -> torch.Tensor:
    """Gradient saliency: ``||d f_t[c] / d x_s||_2`` on the exact computation subgraph of ``t``."""
    sg, center = dgl.khop_in_subgraph(g, int(t), n_layers + 1)
    gid = sg.ndata[dgl.NID]
    feat = X[gid].clone().requires_grad_(True)
    prob = model(sg, feat).softmax(-1)[int(center)]
    prob[prob.argmax()].backward()
    lookup = torch.zeros(g.num_nodes())
    lookup[gid] = feat.grad.norm(dim=1)
    return lookup[players]


LOGIT_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the logit (a float32 softmax can reach 1.0)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS))


@torch.no_grad()
def fidelity(model: nn.Module, g, X, t: int, players: torch.Tensor, scores: torch.Tensor, sparsity: float,
             n_layers: int, kind: str = "prob") -> tuple[float, float]:
    """(Fidelity+, Fidelity-) of one explanation at a sparsity ``rho`` (the share of players kept).

    ``kind="prob"`` (this repository's first definition): the drop of the full-graph class probability of ``t`` when
    the top ``ceil((1 - rho) M)`` players are removed (+), or when all other players are removed (-).
    ``kind="logit"`` (the official ``calc_fidelity_pairwise``): logit(p) - logit(p') instead of p - p', with the top
    ``floor((1 - rho) M)`` players removed (+) and the bottom ``floor(rho M)`` players removed (-); the caller skips
    nodes with fewer than 2 players, as the official code does.
    """
    sg, center = dgl.khop_in_subgraph(g, int(t), n_layers + 1)
    gid = sg.ndata[dgl.NID]
    local = {int(v): i for i, v in enumerate(gid)}
    feat = X[gid]
    prob = model(sg, feat).softmax(-1)[int(center)]
    cls = int(prob.argmax())
    M = len(players)
    order = torch.argsort(scores, descending=True, stable=True)
    if kind == "prob":
        k = max(1, math.ceil((1.0 - sparsity) * M))
        removed_plus, removed_minus = order[:k], order[k:]
    elif kind == "logit":
        removed_plus = order[:int(math.floor((1.0 - sparsity) * M + 1e-9))]
        removed_minus = order[M - int(math.floor(sparsity * M + 1e-9)):]
    else:
        raise ValueError(f"fidelity kind {kind!r}; allowed: prob, logit")
    to_local = lambda idx: torch.tensor([local[int(players[i])] for i in idx], dtype=torch.int64)  # noqa: E731
    p_plus = model(_removed_graph(sg, to_local(removed_plus)), feat).softmax(-1)[int(center), cls]
    p_minus = model(_removed_graph(sg, to_local(removed_minus)), feat).softmax(-1)[int(center), cls]
    if kind == "prob":
        return float(prob[cls] - p_plus), float(prob[cls] - p_minus)
    return float(_logit(prob[cls]) - _logit(p_plus)), float(_logit(prob[cls]) - _logit(p_minus))


def motif_auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """ROC AUC of player scores against ground-truth membership (ties count one half); NaN if one class only."""
    pos, neg = scores[truth], scores[~truth]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def precision_at_k(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of the top-k scored players that belong to the ground-truth motif."""
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    return float(truth[top].float().mean())


def random_scores(players: torch.Tensor, seed: int) -> torch.Tensor:
    """The random explainer (a floor for every metric)."""
    return torch.from_numpy(np.random.default_rng(seed).random(len(players)).astype(np.float32))
