"""Self-supervised GNN pre-training harness after the GraphFM benchmark (Xu et al., "GraphFM: A Comprehensive Benchmark for
Graph Foundation Model", arXiv 2406.08310, code NYUSHCS/GraphFM): three pre-training methods, trained full-batch or on DGL neighbour-sampled
blocks, evaluated frozen by a linear probe (node classification), held-out-edge link prediction (AUC) and k-means
clustering (NMI).

Methods (each a loss on the same encoder, ``SAGEEncoder``):

- **GraphMAE** (Hou et al., KDD 2022, arXiv 2205.10803): mask a fraction ``mask_rate`` of the nodes' input features
  with a learnable [MASK] token, encode, map the codes with a linear encoder-to-decoder layer, *re-mask* the masked
  nodes' codes (set them to zero), decode with one GNN layer and score only the masked nodes with the scaled cosine
  error  SCE = 1/|M| sum_{i in M} (1 - x_i . z_i / (|x_i| |z_i|))^gamma   (paper eq. 2).
- **BGRL** (Thakoor et al., ICLR 2022, arXiv 2102.06514): two augmented views (edge dropping + feature masking), an
  online encoder with a predictor q and a target encoder that is an exponential moving average of the online one,
  phi <- tau phi + (1 - tau) theta; loss = 2 - 2 cos(q(h1), sg(h2~)) symmetrised over the two views.
- **CCA-SSG** (Zhang et al., NeurIPS 2021, arXiv 2106.12484): two augmented views through one encoder, column-
  standardised Z1, Z2 (N x D), loss = ||Z1 - Z2||_F^2 / N + lambda (||Z1^T Z1 / N - I||_F^2 + ||Z2^T Z2 / N - I||_F^2)
  (paper eq. 4). As in the official code the invariance term is -tr(Z1^T Z2)/N, which equals ||Z1 - Z2||_F^2 / (2N)
  minus the constant D (N - 1) / N (each column standardised with the unbiased std has squared norm N - 1).

The encoder takes a *list of graphs*, one per layer: ``[g] * L`` for full-batch training, the blocks of
``dgl.dataloading.NeighborSampler`` for mini-batches. Its layers are ``dgl.nn.SAGEConv`` (mean aggregator), which
only normalise by destination in-degrees, so a sampled forward with full fanout equals the full-batch forward on the
seed nodes (tested).
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import SAGEConv  # noqa: E402

METHODS = ("graphmae", "bgrl", "ccassg")


# ----------------------------------------------------------------------------------------------------------- encoder
class SAGEEncoder(nn.Module):
    """``n_layers`` SAGEConv(mean) layers with PReLU between (and after, as in BGRL/GraphMAE encoders)."""

    def __init__(self, in_feats: int, hidden: int, n_layers: int = 2, last_act: bool = True):
        super().__init__()
        dims = [in_feats] + [hidden] * n_layers
        self.layers = nn.ModuleList(SAGEConv(a, b, "mean") for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(nn.PReLU() for _ in range(n_layers))
        self.last_act = last_act
        self.hidden = hidden

    def forward(self, graphs, X: torch.Tensor) -> torch.Tensor:
        h = X  # (N_src, d)
        for i, (layer, g) in enumerate(zip(self.layers, graphs)):
            h = layer(g, (h, h[:g.num_dst_nodes()]))  # (N_dst, hidden)
            if i < len(self.layers) - 1 or self.last_act:
                h = self.acts[i](h)
        return h


def full_graphs(g: dgl.DGLGraph, n_layers: int) -> list:
    return [g] * n_layers


# ----------------------------------------------------------------------------------------------------- augmentations
def drop_edges(g: dgl.DGLGraph, p: float, gen: torch.Generator) -> dgl.DGLGraph:
    """Keep each edge independently with probability 1 - p (a graph or a block; node sets unchanged)."""
    if p <= 0:
        return g
    src, dst = g.edges()
    keep = torch.rand(src.shape[0], generator=gen) >= p
    if g.is_block:
        return dgl.create_block((src[keep], dst[keep]), num_src_nodes=g.num_src_nodes(),
                                num_dst_nodes=g.num_dst_nodes())
    return dgl.graph((src[keep], dst[keep]), num_nodes=g.num_nodes())


def mask_features(X: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero a random fraction p of the feature *columns* (the same columns for every node, as in BGRL/GRACE)."""
    if p <= 0:
        return X
    keep = (torch.rand(X.shape[1], generator=gen) >= p).to(X.dtype)
    return X * keep


# ------------------------------------------------------------------------------------------------------------ losses
def sce_loss(x: torch.Tensor, z: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """GraphMAE's scaled cosine error: mean_i (1 - cos(x_i, z_i))^gamma."""
    cos = (F.normalize(x, dim=-1) * F.normalize(z, dim=-1)).sum(-1)  # (M,)
    return (1.0 - cos).pow(gamma).mean()


def bgrl_loss(p: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
    """BGRL: 2 - 2 mean_i cos(p_i, h~_i), with the target detached (stop-gradient)."""
    return 2.0 - 2.0 * F.cosine_similarity(p, h_target.detach(), dim=-1).mean()


def cca_ssg_loss(h1: torch.Tensor, h2: torch.Tensor, lambd: float) -> torch.Tensor:
    """CCA-SSG (official code): -tr(Z1^T Z2)/N + lambd (||I - Z1^T Z1/N||^2 + ||I - Z2^T Z2/N||^2), Z standardised."""
    N = h1.shape[0]
    z1 = (h1 - h1.mean(0)) / h1.std(0)  # (N, D)
    z2 = (h2 - h2.mean(0)) / h2.std(0)
    c = z1.T @ z2 / N  # (D, D)
    c1 = z1.T @ z1 / N
    c2 = z2.T @ z2 / N
    iden = torch.eye(c.shape[0], dtype=h1.dtype)
    return -torch.diagonal(c).sum() + lambd * ((iden - c1).pow(2).sum() + (iden - c2).pow(2).sum())


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """BGRL target update phi <- tau phi + (1 - tau) theta, parameter by parameter."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(tau).add_(po.detach(), alpha=1.0 - tau)


# ----------------------------------------------------------------------------------------------------------- methods
class GraphMAE(nn.Module):
    """Encoder + [MASK] token + encoder-to-decoder linear + one-layer SAGE decoder (paper Fig. 2)."""

    def __init__(self, in_feats: int, hidden: int, n_layers: int = 2, mask_rate: float = 0.5, gamma: float = 2.0):
        super().__init__()
        self.encoder = SAGEEncoder(in_feats, hidden, n_layers)
        self.mask_token = nn.Parameter(torch.zeros(1, in_feats))
        self.enc2dec = nn.Linear(hidden, hidden, bias=False)
        self.decoder = SAGEConv(hidden, in_feats, "mean")
        self.mask_rate, self.gamma = mask_rate, gamma
        self.extra_layers = 1  # the decoder needs one more hop

    def loss(self, graphs, X: torch.Tensor, node_ids: torch.Tensor, gen: torch.Generator, n_total: int):
        """``graphs``: encoder layers' graphs + the decoder's; ``node_ids``: global ids of the input nodes, so the
        mask (drawn over all n_total nodes) is the same node set whether the step is full-batch or sampled."""
        masked_global = torch.rand(n_total, generator=gen) < self.mask_rate  # (n_total,)
        m_in = masked_global[node_ids]  # (N_src,)
        x = torch.where(m_in[:, None], self.mask_token.expand_as(X), X)  # [MASK] token on masked nodes
        enc_graphs, dec_graph = graphs[:-1], graphs[-1]
        h = self.enc2dec(self.encoder(enc_graphs, x))  # (N_dec_src, hidden)
        m_dec_src = m_in[:h.shape[0]]
        h = h.masked_fill(m_dec_src[:, None], 0.0)  # re-mask
        z = self.decoder(dec_graph, (h, h[:dec_graph.num_dst_nodes()]))  # (N_out, d)
        m_out = m_in[:z.shape[0]]
        if not bool(m_out.any()):
            return z.sum() * 0.0
        return sce_loss(X[:z.shape[0]][m_out], z[m_out], self.gamma)


class BGRL(nn.Module):
    def __init__(self, in_feats: int, hidden: int, n_layers: int = 2, pred_hidden: int = 256, tau: float = 0.99,
                 p_edge: tuple = (0.2, 0.4), p_feat: tuple = (0.2, 0.1)):
        super().__init__()
        self.encoder = SAGEEncoder(in_feats, hidden, n_layers)
        self.target = copy.deepcopy(self.encoder)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.predictor = nn.Sequential(nn.Linear(hidden, pred_hidden), nn.PReLU(), nn.Linear(pred_hidden, hidden))
        self.tau, self.p_edge, self.p_feat = tau, p_edge, p_feat
        self.extra_layers = 0

    def loss(self, graphs, X, node_ids, gen, n_total):
        views = []
        for pe, pf in zip(self.p_edge, self.p_feat):
            views.append(([drop_edges(g, pe, gen) for g in graphs], mask_features(X, pf, gen)))
        (g1, x1), (g2, x2) = views
        p1, p2 = self.predictor(self.encoder(g1, x1)), self.predictor(self.encoder(g2, x2))
        with torch.no_grad():
            t1, t2 = self.target(g1, x1), self.target(g2, x2)
        return bgrl_loss(p1, t2) + bgrl_loss(p2, t1)

    def after_step(self):
        ema_update(self.target, self.encoder, self.tau)


class CCASSG(nn.Module):
    def __init__(self, in_feats: int, hidden: int, n_layers: int = 2, lambd: float = 1e-3,
                 p_edge: float = 0.3, p_feat: float = 0.3):
        super().__init__()
        self.encoder = SAGEEncoder(in_feats, hidden, n_layers, last_act=False)
        self.lambd, self.p_edge, self.p_feat = lambd, p_edge, p_feat
        self.extra_layers = 0

    def loss(self, graphs, X, node_ids, gen, n_total):
        h1 = self.encoder([drop_edges(g, self.p_edge, gen) for g in graphs], mask_features(X, self.p_feat, gen))
        h2 = self.encoder([drop_edges(g, self.p_edge, gen) for g in graphs], mask_features(X, self.p_feat, gen))
        return cca_ssg_loss(h1, h2, self.lambd)


def make_method(name: str, in_feats: int, cfg: dict) -> nn.Module:
    h, L = cfg["hidden"], cfg["n_layers"]
    if name == "graphmae":
        return GraphMAE(in_feats, h, L, mask_rate=cfg["mae_mask_rate"], gamma=cfg["mae_gamma"])
    if name == "bgrl":
        return BGRL(in_feats, h, L, pred_hidden=cfg["bgrl_pred_hidden"], tau=cfg["bgrl_tau"],
                    p_edge=tuple(cfg["bgrl_p_edge"]), p_feat=tuple(cfg["bgrl_p_feat"]))
    if name == "ccassg":
        return CCASSG(in_feats, h, L, lambd=cfg["cca_lambda"], p_edge=cfg["cca_p_edge"], p_feat=cfg["cca_p_feat"])
    raise ValueError(f"method {name!r}; allowed: {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------------------- training
def sampled_batches(g: dgl.DGLGraph, fanouts: list, batch_size: int, gen: torch.Generator):
    """One epoch of (input_nodes, blocks) from ``dgl.dataloading.NeighborSampler`` over shuffled seed nodes."""
    sampler = dgl.dataloading.NeighborSampler(fanouts)
    perm = torch.randperm(g.num_nodes(), generator=gen)
    for i in range(0, len(perm), batch_size):
        input_nodes, _, blocks = sampler.sample_blocks(g, perm[i:i + batch_size])
        yield input_nodes, blocks


def step_closure(model: nn.Module, g: dgl.DGLGraph, X: torch.Tensor, mode: str, cfg: dict, gen: torch.Generator):
    """A zero-argument loss function for one training step (used for the memory measurement)."""
    L = cfg["n_layers"] + model.extra_layers
    if mode == "full":
        ids = torch.arange(g.num_nodes())
        return lambda: model.loss(full_graphs(g, L), X, ids, gen, g.num_nodes())
    fanouts = list(cfg["fanouts"]) + [cfg["fanouts"][-1]] * model.extra_layers
    input_nodes, blocks = next(sampled_batches(g, fanouts, cfg["batch_size"], gen))
    return lambda: model.loss(blocks, X[input_nodes], input_nodes, gen, g.num_nodes())


def pretrain(model: nn.Module, g: dgl.DGLGraph, X: torch.Tensor, mode: str, cfg: dict, seed: int,
             progress=None, max_steps: int | None = None) -> dict:
    """Train ``model`` for ``cfg['epochs']`` epochs (full: one step an epoch; sampled: one step per seed batch), or
    until ``max_steps`` optimiser steps if given (the last epoch may then stop part way: equal-steps comparisons).

    Returns {losses (per epoch mean), steps, seconds, nodes_per_s (seed nodes processed per second)}."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                           weight_decay=cfg["weight_decay"])
    L = cfg["n_layers"] + model.extra_layers
    fanouts = list(cfg["fanouts"]) + [cfg["fanouts"][-1]] * model.extra_layers
    losses, steps, seen, t0 = [], 0, 0, time.perf_counter()
    epochs = range(cfg["epochs"])
    for _ in progress(epochs) if progress else epochs:
        if max_steps is not None and steps >= max_steps:
            break
        model.train()
        if mode == "full":
            batches = [(torch.arange(g.num_nodes()), full_graphs(g, L))]
        else:
            batches = sampled_batches(g, fanouts, cfg["batch_size"], gen)
        ep = []
        for input_nodes, graphs in batches:
            Xb = X if mode == "full" else X[input_nodes]
            loss = model.loss(graphs, Xb, input_nodes, gen, g.num_nodes())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if hasattr(model, "after_step"):
                model.after_step()
            ep.append(float(loss))
            steps += 1
            seen += g.num_nodes() if mode == "full" else graphs[-1].num_dst_nodes()
            if max_steps is not None and steps >= max_steps:
                break
        losses.append(float(np.mean(ep)))
    secs = time.perf_counter() - t0
    return {"losses": losses, "steps": steps, "seconds": secs, "nodes_per_s": seen / secs}


@torch.no_grad()
def embed(encoder: nn.Module, g: dgl.DGLGraph, X: torch.Tensor) -> torch.Tensor:
    """Frozen full-graph embeddings (N, hidden)."""
    encoder.eval()
    return encoder(full_graphs(g, len(encoder.layers)), X)


# -------------------------------------------------------------------------------------------------------- evaluation
def split_edges(g: dgl.DGLGraph, frac: float, seed: int):
    """Hold out ``frac`` of the undirected edges: returns (train graph, pos (2, E_test), neg (2, E_test)).

    Negatives are uniform node pairs that are not edges of the full graph and not self loops."""
    rng = np.random.default_rng(seed)
    src, dst = (t.numpy() for t in g.edges())
    und = src < dst
    a, b = src[und], dst[und]
    perm = rng.permutation(len(a))
    n_test = int(round(frac * len(a)))
    te, tr = perm[:n_test], perm[n_test:]
    n = g.num_nodes()
    g_train = dgl.graph((torch.from_numpy(np.concatenate([a[tr], b[tr]])),
                         torch.from_numpy(np.concatenate([b[tr], a[tr]]))), num_nodes=n)
    existing = set((a * n + b).tolist())
    neg = []
    while len(neg) < n_test:
        u, v = rng.integers(0, n, 2)
        if u != v and min(u, v) * n + max(u, v) not in existing:
            neg.append((u, v))
    return g_train, np.stack([a[te], b[te]]), np.array(neg).T


def linear_probe(Z: np.ndarray, y: np.ndarray, split: dict, C: float = 1.0) -> float:
    """Test accuracy of an L2-regularised logistic regression on standardised frozen embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, te = split["train"], split["test"]
    sc = StandardScaler().fit(Z[tr])
    clf = LogisticRegression(C=C, max_iter=2000).fit(sc.transform(Z[tr]), y[tr])
    return float((clf.predict(sc.transform(Z[te])) == y[te]).mean())


def link_auc(Z: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC-AUC of the cosine similarity of the two endpoints' embeddings, held-out edges vs non-edges."""
    from sklearn.metrics import roc_auc_score

    Zn = Z / (np.linalg.norm(Z, axis=1, keepdims=True) + 1e-12)
    s = lambda e: (Zn[e[0]] * Zn[e[1]]).sum(1)  # noqa: E731
    return float(roc_auc_score(np.r_[np.ones(pos.shape[1]), np.zeros(neg.shape[1])], np.r_[s(pos), s(neg)]))


def cluster_nmi(Z: np.ndarray, y: np.ndarray, seed: int) -> float:
    """NMI between k-means (k = number of classes) on standardised embeddings and the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.preprocessing import StandardScaler

    k = int(y.max()) + 1
    pred = KMeans(k, n_init=10, random_state=seed).fit_predict(StandardScaler().fit_transform(Z))
    return float(normalized_mutual_info_score(y, pred))


def evaluate(Z: torch.Tensor, y: torch.Tensor, split: dict, pos, neg, seed: int, C: float = 1.0) -> dict:
    Zn, yn = Z.numpy().astype(np.float64), y.numpy()
    return {"node_acc": linear_probe(Zn, yn, {k: v.numpy() for k, v in split.items()}, C),
            "link_auc": link_auc(Zn, pos, neg), "cluster_nmi": cluster_nmi(Zn, yn, seed)}
