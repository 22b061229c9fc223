"""graphVCI: Wu et al., "Predicting Cellular Responses with Variational Causal Inference and Refined Relational
Information", arXiv 2210.00116 (official code: yulun-rayn/graphVCI, ``gvci/model``, ``gvci/train/link_pred.py``).

The VCI objective (``reprolab.bio.vci``) with gene relations built in:

* gene embeddings: learnable node features X (G x F) propagated over the gene regulatory network (GRN) by a GCN
  whose edge weights are a softmax over each gene's incoming edges of learnable logits (official ``MyGCN``:
  ``normalize=False``, ``edge_weight = softmax(logits, target)``, self loops, final ReLU); here with DGL's
  ``GraphConv(norm="none")`` and ``edge_softmax``:   g = ReLU(A_soft X W + b),  A_soft[i, j] = softmax_j(l_ji)
* encoder (official ``Enc_graphVCI`` with ``GraphAggrSUM``): MLP([emb(y), t, x]) + Linear(mean_genes g)
* decoder (official ``Dec_graphVCI`` with ``NodeAggrDOT``): h = MLP([z, t]) (B, d); for gene n and output head m
  (loc, scale): out[b, n, m] = < h_b, (Linear(g_n)).view(d, 2)[:, m] >, so each gene's output weights are a
  function of its GRN-propagated embedding.
* GRN refinement (official ``link_pred.py``): a 2-layer GCN link predictor on gene features (here: the training
  cells' perturbation-response profiles, or the genes' expression profiles SVD-reduced) trained on the prior GRN's
  edges (a held-out link split as in the official ``RandomLinkSplit``) against fresh negative samples every epoch
  that exclude the training edges (official ``negative_sampling``; BCE on dot-product scores); the refined GRN is the
  top-M scored gene pairs (M = number of prior edges; official ``decode_all`` keeps every pair with a positive
  score).
"""
from __future__ import annotations

import dgl
import numpy as np
import torch
import torch.nn.functional as F
from dgl.nn import GraphConv
from dgl.nn.functional import edge_softmax
from torch import nn

from .vci import MLP, VCI, split_normal


def gene_graph(edges: np.ndarray, n_genes: int, directed: bool = False) -> dgl.DGLGraph:
    """DGL graph over the genes with self loops: both directions of every edge (``directed=False``), or the edges as
    given, source -> target (``directed=True``: the official graphVCI keeps the GRN's ``edge_index`` as loaded,
    source to target, and adds the remaining self loops, ``gvci/utils/graph_utils.py:141-158``,
    ``gvci/model/model.py:104-108``)."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if directed:
        src, dst = e[:, 0], e[:, 1]
    else:
        src = np.concatenate([e[:, 0], e[:, 1]])
        dst = np.concatenate([e[:, 1], e[:, 0]])
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n_genes)
    return dgl.add_self_loop(dgl.remove_self_loop(g))


class GeneGCN(nn.Module):
    """Learnable gene features propagated over the GRN with softmax-normalized learnable edge weights."""

    def __init__(self, graph: dgl.DGLGraph, n_features: int = 32, depth: int = 1):
        super().__init__()
        self.graph = graph
        self.X = nn.Parameter(torch.randn(graph.num_nodes(), n_features))  # random node features (node_grad)
        self.edge_logits = nn.Parameter(torch.zeros(graph.num_edges()))  # edge_grad
        self.convs = nn.ModuleList(GraphConv(n_features, n_features, norm="none", allow_zero_in_degree=True)
                                   for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(n_features) for _ in range(depth - 1))

    def edge_weights(self) -> torch.Tensor:
        return edge_softmax(self.graph, self.edge_logits)  # softmax over each target's incoming edges

    def forward(self) -> torch.Tensor:
        w = self.edge_weights()
        x = self.X
        for i, conv in enumerate(self.convs):
            out = conv(self.graph, x, edge_weight=w)
            if i < len(self.convs) - 1:  # hidden layers: residual add + layer norm + ReLU (official add=True)
                x = F.relu(self.norms[i](out + x))
            else:
                x = F.relu(out)  # final_act relu
        return x  # (G, F)

    def dense_adjacency(self) -> torch.Tensor:
        """A_soft (G x G), rows = targets: the same propagation as a dense matrix (for tests and plots)."""
        src, dst = self.graph.edges()
        A = torch.zeros(self.graph.num_nodes(), self.graph.num_nodes())
        A[dst, src] = self.edge_weights()
        return A


class GraphVCI(VCI):
    """VCI with the graph encoder/decoder aggregations of graphVCI (sharing one GeneGCN)."""

    def __init__(self, graph: dgl.DGLGraph, n_genes: int, n_treatments: int, n_types: int, latent: int = 32,
                 width: int = 128, depth: int = 2, outcome_emb: int = 128, covariate_emb: int = 16,
                 graph_features: int = 32, graph_depth: int = 1):
        super().__init__(n_genes, n_treatments, n_types, latent, width, depth, outcome_emb, covariate_emb,
                         decoder=nn.Identity())
        self.gnn = GeneGCN(graph, graph_features, graph_depth)
        self.graph_aggr = nn.Linear(graph_features, 2 * latent)  # GraphAggrSUM
        self.decoder = MLP([latent + n_treatments] + [width] * depth)  # hidden h (B, width)
        self.node_aggr = nn.Linear(graph_features, 2 * width)  # NodeAggrDOT, heads = (loc, scale)
        self.width = width
        self._g: torch.Tensor | None = None

    def encode(self, y, t, c):
        g = self._g = self.gnn()  # propagated once per encode; the decode calls that follow reuse it
        h = torch.cat([self.outcome_emb(y), F.one_hot(t, self.T).float(), self.cov_emb(c)], -1)
        return split_normal(self.encoder(h) + self.graph_aggr(g.mean(0)), self.L)

    def decode(self, z, t):
        g = self._g if self._g is not None else self.gnn()
        h = self.decoder(torch.cat([z, F.one_hot(t, self.T).float()], -1))  # (B, d)
        Wg = self.node_aggr(g).view(self.G, self.width, 2)  # (G, d, 2)
        out = torch.einsum("bd,ndm->bnm", h, Wg)  # (B, G, 2)
        return out[..., 0], F.softplus(out[..., 1]) + 1e-3


# ---------------------------------------------------------------------------------------------------------------
# GRN refinement by link prediction (official gvci/train/link_pred.py)


class LinkPredictor(nn.Module):
    def __init__(self, d_in: int, width: int = 64, depth: int = 2):
        super().__init__()
        sizes = [d_in] + [width] * depth
        self.convs = nn.ModuleList(GraphConv(sizes[i], sizes[i + 1], norm="both", allow_zero_in_degree=True)
                                   for i in range(depth))

    def encode(self, g, x):
        for i, conv in enumerate(self.convs):
            x = conv(g, x)
            x = F.relu(x)  # official final_act relu
        return x

    @staticmethod
    def score(z, src, dst):
        return (z[src] * z[dst]).sum(-1)


def gene_features(Y: np.ndarray, dim: int) -> np.ndarray:
    """Gene features from expression: z-score each gene over cells, then the top-``dim`` SVD components of the
    (genes x cells) matrix (U S), row-normalized (official ``NormalizeFeatures`` analogue)."""
    Z = (Y - Y.mean(0)) / (Y.std(0) + 1e-6)  # (cells, G)
    U, S, _ = np.linalg.svd(Z.T, full_matrices=False)
    X = U[:, :dim] * S[:dim]
    return (X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-8)).astype(np.float32)


def sample_negatives(n: int, G: int, forbidden: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """``n`` uniformly random gene pairs (2, n) that are neither self pairs nor ``forbidden`` (G x G bool, symmetric):
    the official ``torch_geometric.utils.negative_sampling`` (``gvci/train/link_pred.py:93``) excludes the
    message-passing edges; here rejection sampling in batches."""
    F_ = torch.from_numpy(forbidden | np.eye(G, dtype=bool))
    out, have = [], 0
    while have < n:
        cand = torch.randint(G, (2, 2 * n + 8), generator=gen)
        cand = cand[:, ~F_[cand[0], cand[1]]]
        out.append(cand)
        have += cand.shape[1]
    return torch.cat(out, 1)[:, :n]


def refine_grn(prior_edges: np.ndarray, X: np.ndarray, epochs: int = 200, lr: float = 0.01, width: int = 64,
               seed: int = 0, holdout: float = 0.0, val: float = 0.0) -> dict:
    """Train the link predictor on the prior edges and score every gene pair; the refined GRN keeps the top-M pairs
    (M = number of prior edges). Returns scores (G x G, symmetric), the refined edges and the loss curve.

    ``holdout`` > 0 (official ``RandomLinkSplit(num_val=0.05, num_test=0.1)``, ``link_pred.py:67``): that fraction of
    the prior's edges is held out of message passing and of the positives; each epoch draws fresh negatives among the
    pairs that are not training edges (official ``negative_sampling``). ``heldout_auc`` is the ROC AUC of the held-out
    prior edges against as many held-out non-prior pairs (drawn once, never trained on): above 0.5 when the gene
    features predict the prior's edges beyond those seen.

    ``val`` (<= ``holdout``; official ``num_val=0.05``): that fraction of the prior's edges is the validation part of
    the held-out edges: out of training (positives and message passing) like the rest, but the final scores encode the
    genes over the training + validation edges, as the official code (``link_pred.py:215`` encodes with
    ``test_data.edge_index``, which RandomLinkSplit builds from the train + val edges). ``heldout_auc`` then scores the
    remaining test edges only (never in any message passing)."""
    from sklearn.metrics import roc_auc_score

    from .simulator import undirected_adjacency

    G = X.shape[0]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    prior_edges = np.asarray(prior_edges, dtype=np.int64)
    perm = rng.permutation(len(prior_edges))
    n_out = int(round(holdout * len(prior_edges)))
    n_val = min(int(round(val * len(prior_edges))), n_out)
    train_e, held_all = prior_edges[np.sort(perm[n_out:])], perm[:n_out]
    val_e, held_e = prior_edges[np.sort(held_all[:n_val])], prior_edges[np.sort(held_all[n_val:])]
    n_test = len(held_e)
    A_prior = undirected_adjacency(prior_edges, G)
    held_neg = None
    if n_test:  # held-out negatives: non-prior pairs, excluded from training negatives too
        held_neg = sample_negatives(n_test, G, A_prior, gen).T.numpy()
    forbidden = undirected_adjacency(train_e, G)
    if held_neg is not None:
        forbidden = forbidden | undirected_adjacency(held_neg, G)
    g = gene_graph(train_e, G)
    x = torch.from_numpy(X)
    model = LinkPredictor(X.shape[1], width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pos = torch.from_numpy(train_e)
    losses = []
    for _ in range(epochs):
        z = model.encode(g, x)
        neg = sample_negatives(len(pos), G, forbidden, gen)
        s_pos = model.score(z, pos[:, 0], pos[:, 1])
        s_neg = model.score(z, neg[0], neg[1])
        loss = F.binary_cross_entropy_with_logits(torch.cat([s_pos, s_neg]),
                                                  torch.cat([torch.ones(len(pos)), torch.zeros(len(pos))]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    mp_e = np.concatenate([train_e, val_e]) if n_val else train_e  # final encoding: train + val edges (official)
    with torch.no_grad():
        z = model.encode(gene_graph(mp_e, G) if n_val else g, x)
        S = torch.sigmoid(z @ z.T).numpy().astype(np.float64)
    iu = np.triu_indices(G, 1)
    order = np.argsort(-S[iu], kind="stable")[: len(prior_edges)]
    refined = np.stack([iu[0][order], iu[1][order]], 1)
    # training message passing used only train_e; the final scores the train + val edges (official link_pred.py:215
    # encodes with test_data.edge_index = the train + val edges of RandomLinkSplit); the test edges never enter
    out = {"scores": S, "edges": refined, "losses": losses, "mp_edges": mp_e, "train_edges": train_e,
           "val_edges": val_e, "heldout_edges": held_e, "model": model}
    if n_test:
        y = np.r_[np.ones(n_test), np.zeros(n_test)]
        sc = np.r_[S[held_e[:, 0], held_e[:, 1]], S[held_neg[:, 0], held_neg[:, 1]]]
        out["heldout_auc"] = float(roc_auc_score(y, sc))
    return out


def edge_aupr(scores: np.ndarray, true_edges: np.ndarray, n_genes: int) -> float:
    """Average precision of undirected gene-pair scores (upper triangle) against the true GRN's skeleton."""
    from sklearn.metrics import average_precision_score

    from .simulator import undirected_adjacency

    A = undirected_adjacency(np.asarray(true_edges), n_genes)
    iu = np.triu_indices(n_genes, 1)
    return float(average_precision_score(A[iu], np.asarray(scores)[iu]))


def feature_edge_auc(X: np.ndarray, edges: np.ndarray, n_genes: int) -> float:
    """ROC AUC of the untrained feature similarity |<X_i, X_j>| (the cosine for row-normalized features) of every gene
    pair (upper triangle) against an undirected edge set: above 0.5 when the gene features alone carry information
    about those edges (the premise of refining a GRN from them; no link predictor is involved)."""
    from sklearn.metrics import roc_auc_score

    from .simulator import undirected_adjacency

    A = undirected_adjacency(np.asarray(edges), n_genes)
    iu = np.triu_indices(n_genes, 1)
    S = np.abs(np.asarray(X, dtype=np.float64) @ np.asarray(X, dtype=np.float64).T)
    return float(roc_auc_score(A[iu], S[iu]))


def edge_precision_recall(edges: np.ndarray, true_edges: np.ndarray, n_genes: int) -> tuple[float, float]:
    from .simulator import undirected_adjacency

    A = undirected_adjacency(np.asarray(true_edges), n_genes)
    B = undirected_adjacency(np.asarray(edges), n_genes)
    iu = np.triu_indices(n_genes, 1)
    tp = float((A[iu] & B[iu]).sum())
    return tp / max(B[iu].sum(), 1), tp / max(A[iu].sum(), 1)


def response_features(data: dict) -> np.ndarray:
    """Gene features from the training cells' perturbation responses: for every (cell type x, perturbation k) the
    mean expression shift from the cell type's mean, z-scored per gene, as a (G x groups) row-normalized matrix."""
    tr = data["train"]
    Y, ct, t = data["Y"][tr], data["cell_type"][tr], data["t"][tr]
    rows = []
    for x in range(data["n_types"]):
        base = Y[ct == x].mean(0)
        for k in range(data["n_treatments"]):
            sel = (ct == x) & (t == k)
            if sel.any():
                rows.append(Y[sel].mean(0) - base)
    M = np.stack(rows)  # (groups, G)
    F_ = ((M - M.mean(0)) / (M.std(0) + 1e-6)).T
    return (F_ / (np.linalg.norm(F_, axis=1, keepdims=True) + 1e-8)).astype(np.float32)


def make_factories(cfg: dict, data: dict, graphs: dict[str, np.ndarray], directed: tuple[str, ...] = ("true",)) -> dict:
    """Model constructors for the arms in ``cfg['arms']``; graph arms ``gvci_<name>`` use ``graphs[name]`` edges, as a
    directed graph (regulator -> target, plus self loops; the official handling of a loaded GRN) for the names in
    ``directed`` (the true GRN), undirected otherwise (the corrupted prior has lost the direction; the refined graph
    is symmetric, as the official ``decode_all`` of z z^T)."""
    from .vci import build_model

    G, T, C = cfg["n_genes"], data["n_treatments"], data["n_types"]
    out = {}
    for arm in cfg["arms"]:
        if arm.startswith("gvci_"):
            edges = graphs[arm[len("gvci_"):]]
            d = arm[len("gvci_"):] in directed
            out[arm] = (lambda e=edges, d=d: GraphVCI(gene_graph(e, G, d), G, T, C, latent=cfg["latent"], width=cfg["width"],
                                                 depth=cfg["depth"], outcome_emb=cfg["outcome_emb"],
                                                 covariate_emb=cfg["covariate_emb"],
                                                 graph_features=cfg["graph_features"], graph_depth=cfg["graph_depth"]))
        else:
            out[arm] = (lambda a=arm: build_model(a, G, T, C, cfg))
    return out
