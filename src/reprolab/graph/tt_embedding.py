"""Nimble GNN Embedding with Tensor-Train Decomposition, Yin, Zheng, Nisa, Faloutsos, Karypis, Vuduc (KDD 2022),
arXiv 2206.10581.

Featureless graphs give a GNN nothing but node ids, so each node gets a learnable embedding row: a table
E in R^{N x d} that dominates memory on large graphs. The paper stores E as a **tensor-train (TT) matrix** (TT-Rec
style): with N <= n_1 n_2 ... n_K and d = d_1 d_2 ... d_K, the row of node i with mixed-radix digits (i_1, ..., i_K)
(i = i_1 n_2...n_K + ... + i_K) and column j = (j_1, ..., j_K) is

    E[i, j] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_K[:, i_K, j_K, :]        (TT-matrix, eq. 2 of the paper)

with cores G_k in R^{r_{k-1} x n_k x d_k x r_k}, r_0 = r_K = 1: sum_k r_{k-1} n_k d_k r_k parameters instead of N d.
Two further pieces of the paper:

* **Orthogonal initialisation** (its Algorithm 1): each core, unfolded as U_k in R^{(r_{k-1} n_k) x (d_k r_k)}, is a
  random semi-orthogonal matrix (QR of a Gaussian matrix). When every U_k is tall (r_{k-1} n_k >= d_k r_k) the
  contraction gives E^T E = I exactly (left-orthogonal TT: the identity passes from core to core), i.e. the embedding
  table is itself a random orthogonal matrix, as in orthogonal initialisation of a full table, without ever being
  materialised. A gain on the first core sets the scale (here: mean squared row norm d, like N(0, 1) rows).
* **Graph-aware node ordering**: hierarchical METIS partitioning (``dgl.metis_partition_assignment``) relabels the
  nodes so that a partition's nodes get consecutive ids, hence share their leading digits and the same slices of the
  leading cores: nodes of one community share parameters, which is what lets TT match or beat the full table.

``TTEmbedding`` is the table; ``tt_to_dense`` the reference reconstruction; ``metis_order`` / ``random_order`` /
``rcm_order`` the orderings; ``FeaturelessSAGE`` the end-to-end model (embedding -> ``dgl.nn.SAGEConv`` layers).
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
from dgl.nn import SAGEConv  # noqa: E402


def tt_shapes(num_nodes: int, dim_factors: tuple[int, ...], rank: int, slack: float = 1.0
              ) -> tuple[list[int], list[int]]:
    """Row factors n_k with prod(n) >= slack * num_nodes and ranks [1, r, ..., r, 1].

    n_k = ceil(N^(1/K)) except that n_1 is raised to at least d_1 * r when possible, so that the first core can be
    exactly orthogonal (U_1 tall); the remaining factors then shrink to keep prod(n) close to N.
    """
    K = len(dim_factors)
    rows = math.ceil(slack * num_nodes)
    n1 = max(math.ceil(rows ** (1.0 / K)), dim_factors[0] * rank)
    n1 = min(n1, rows)
    rest = math.ceil((rows / n1) ** (1.0 / (K - 1))) if K > 1 else 1
    ns = [n1] + [rest] * (K - 1)
    while math.prod(ns) < rows:  # rounding guard
        ns[-1] += 1
    return ns, [1] + [rank] * (K - 1) + [1]


class TTEmbedding(nn.Module):
    """TT-matrix embedding table: ``forward(idx) -> (B, d)`` rows, never materialising the (N, d) table."""

    def __init__(self, num_nodes: int, dim_factors: tuple[int, ...], rank: int, init: str = "orthogonal",
                 row_factors: list[int] | None = None, slack: float = 1.0):
        super().__init__()
        ns, ranks = tt_shapes(num_nodes, dim_factors, rank, slack)
        if row_factors is not None:
            ns = list(row_factors)
            if math.prod(ns) < num_nodes:
                raise ValueError(f"row_factors {ns} hold {math.prod(ns)} < {num_nodes} rows")
        self.num_nodes, self.n, self.d, self.r = num_nodes, ns, list(dim_factors), ranks
        self.dim = math.prod(dim_factors)
        self.cores = nn.ParameterList(nn.Parameter(torch.empty(ranks[k], ns[k], dim_factors[k], ranks[k + 1]))
                                      for k in range(len(ns)))
        self.reset_parameters(init)

    @property
    def num_rows(self) -> int:
        return math.prod(self.n)

    def reset_parameters(self, init: str = "orthogonal") -> None:
        """``orthogonal``: the paper's Algorithm 1 (semi-orthogonal unfoldings, gain on core 1 so that the mean
        squared row norm is d); ``gaussian``: TT-Rec's i.i.d. N(0, s^2) cores with s chosen so that each entry of
        E has variance 1 (Var = prod_k r_k s^2 ... = 1 => s = (1 / prod_{k<K} r_k)^(1 / (2K)))."""
        with torch.no_grad():
            if init == "orthogonal":
                for G in self.cores:
                    a, n, dk, b = G.shape
                    U = torch.empty(a * n, dk * b)
                    nn.init.orthogonal_(U)  # semi-orthogonal: orthonormal columns if tall, rows if wide
                    G.copy_(U.reshape(a, n, dk, b))
                # E^T E = I (tall case) => sum of squared entries = d; scale to N_rows * d (N(0, 1) rows)
                self.cores[0].mul_(math.sqrt(self.num_rows))
            elif init == "gaussian":
                K = len(self.cores)
                s = (1.0 / math.prod(self.r[1:-1])) ** (1.0 / (2 * K))
                for G in self.cores:
                    G.normal_(0.0, s)
            else:
                raise ValueError(f"init={init!r}; allowed: orthogonal, gaussian")

    def digits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Mixed-radix digits (i_1, ..., i_K) of the row ids, i_1 most significant."""
        out, rem = [], idx.long()
        for k in range(len(self.n) - 1, -1, -1):
            out.append(rem % self.n[k])
            rem = torch.div(rem, self.n[k], rounding_mode="floor")
        return out[::-1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        digs = self.digits(idx)
        h = self.cores[0][0, digs[0]]  # (B, d_1, r_1)
        for k in range(1, len(self.cores)):
            G = self.cores[k][:, digs[k]]  # (r_{k-1}, B, d_k, r_k)
            h = torch.einsum("bpr,rbqs->bpqs", h, G)  # (B, D, d_k, r_k)
            h = h.reshape(h.shape[0], -1, h.shape[-1])  # (B, D * d_k, r_k)
        return h[..., 0]  # (B, d)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.cores)


def tt_to_dense(cores) -> torch.Tensor:
    """Reference: the full (prod n_k, prod d_k) table by one einsum over all cores (rows and columns row-major)."""
    K = len(cores)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rk, ik, jk = letters[:K + 1], letters[K + 1:2 * K + 1], letters[2 * K + 1:3 * K + 1]
    spec = ",".join(f"{rk[k]}{ik[k]}{jk[k]}{rk[k + 1]}" for k in range(K)) + "->" + ik + jk
    full = torch.einsum(spec, *cores)  # r_0 = r_K = 1 are summed away
    n, d = math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores)
    return full.reshape(n, d)


# ------------------------------------------------------------------------------------------------ node orderings
def random_order(num_nodes: int, seed: int = 0) -> torch.Tensor:
    """new_id[v]: a random relabelling (what a graph whose ids carry no structure looks like to TT)."""
    return torch.from_numpy(np.random.default_rng(seed).permutation(num_nodes))


def metis_parts(g: dgl.DGLGraph, k: int, tries: int = 10) -> np.ndarray:
    """``dgl.metis_partition_assignment(g, k)`` made reproducible: the lowest-edge-cut partition of ``tries`` calls.

    In this DGL 2.1.0 build repeated METIS calls on the same graph can return different partitions (seeding
    python/numpy/torch/dgl, OMP_NUM_THREADS=1 or a fresh process did not help). Keeping the partition with the
    smallest edge cut, ties broken by the smallest canonically relabelled assignment (parts renumbered by first
    appearance), turns that into a deterministic choice whenever the best partition is found in ``tries`` calls.
    """
    src, dst = g.edges()
    best_key, best = None, None
    for _ in range(tries):
        part = dgl.metis_partition_assignment(g, k).numpy()
        cut = int((part[src.numpy()] != part[dst.numpy()]).sum())
        _, first = np.unique(part, return_index=True)
        relabel = np.empty(part.max() + 1, dtype=np.int64)
        relabel[part[np.sort(first)]] = np.arange(len(first))
        canon = relabel[part]
        key = (cut, canon.tobytes())
        if best_key is None or key < best_key:
            best_key, best = key, part
    return best


def metis_order(g: dgl.DGLGraph, row_factors: list[int], sub_levels: str = "rcm") -> torch.Tensor:
    """new_id[v] in [0, prod(row_factors)) from METIS partitioning aligned with the TT digits.

    ``dgl.metis_partition_assignment`` splits the graph into n_1 parts; part p gets the block of ids whose first
    digit is p (capacity n_2...n_K). Inside a part:

    * ``sub_levels="metis"`` (the paper's hierarchical METIS): the part's induced subgraph is split into n_2 parts,
      each placed in the sub-block of its second digit, and so on; the last digit's slots take nodes in old-id order.
      In this DGL build METIS gave *different* sub-partitions of small subgraphs in different processes (k-way and
      recursive modes alike), which breaks byte-identical reruns, hence it is not the default;
    * ``sub_levels="rcm"`` (default, deterministic): the part's nodes are laid out in reverse Cuthill-McKee order of
      its induced subgraph (scipy), so neighbours get nearby ids and mostly share the second digit too.

    A (sub-)part larger than its block spills its extra nodes into the free slots of the enclosing block (METIS
    balances parts only approximately), so the padding prod(n) - N should leave some slack.
    """
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    n = g.num_nodes()
    K = len(row_factors)
    caps = [math.prod(row_factors[k + 1:]) for k in range(K)]  # ids spanned by one value of digit k
    new_id = np.full(n, -1, dtype=np.int64)
    used = np.zeros(math.prod(row_factors), dtype=bool)

    def place(nodes: np.ndarray, level: int, base: int) -> np.ndarray:
        """Place ``nodes`` in [base, base + caps[level - 1]) (level 0: everything); return those that did not fit."""
        leaf = level == K - 1 or len(nodes) <= 1
        if level >= 1 and sub_levels == "rcm" and not leaf:
            sg = dgl.node_subgraph(g, torch.from_numpy(nodes))
            nodes = nodes[reverse_cuthill_mckee(sg.adj_external(scipy_fmt="csr"), symmetric_mode=True)]
            leaf = True  # fill the part's whole block in RCM order
        if leaf:
            span = row_factors[level] * caps[level]
            free = base + np.flatnonzero(~used[base:base + span])
            k = min(len(free), len(nodes))
            new_id[nodes[:k]] = free[:k]
            used[free[:k]] = True
            return nodes[k:]
        k = row_factors[level]
        if len(nodes) <= k:
            part = np.arange(len(nodes))
        else:
            part = metis_parts(dgl.node_subgraph(g, torch.from_numpy(nodes)), k)
        spill = [place(nodes[part == p], level + 1, base + p * caps[level]) for p in range(k)]
        spill = np.concatenate(spill) if spill else np.empty(0, dtype=np.int64)
        span = k * caps[level]
        free = base + np.flatnonzero(~used[base:base + span])
        m = min(len(free), len(spill))
        new_id[spill[:m]] = free[:m]
        used[free[:m]] = True
        return spill[m:]

    left = place(np.arange(n), 0, 0)
    if len(left):  # pragma: no cover - impossible: level 0 spans all prod(n) >= N slots
        raise RuntimeError(f"{len(left)} nodes could not be placed")
    return torch.from_numpy(new_id)


def rcm_order(g: dgl.DGLGraph) -> torch.Tensor:
    """Fallback ordering without METIS: reverse Cuthill-McKee (scipy) keeps neighbours' ids close."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    perm = reverse_cuthill_mckee(g.adj_external(scipy_fmt="csr"), symmetric_mode=True)
    new_id = np.empty(g.num_nodes(), dtype=np.int64)
    new_id[perm] = np.arange(g.num_nodes())
    return torch.from_numpy(new_id)


def order_locality(g: dgl.DGLGraph, new_id: torch.Tensor, block: int) -> float:
    """Share of edges whose endpoints fall in the same block of ``block`` consecutive new ids (same leading digit)."""
    src, dst = g.edges()
    return float((torch.div(new_id[src], block, rounding_mode="floor")
                  == torch.div(new_id[dst], block, rounding_mode="floor")).float().mean())


# ------------------------------------------------------------------------------------------------ model
class FeaturelessSAGE(nn.Module):
    """Embedding (full ``nn.Embedding`` or ``TTEmbedding``) of the relabelled node ids, then GraphSAGE layers
    (``dgl.nn.SAGEConv``, mean aggregator) with ReLU and dropout in between; X is never used."""

    def __init__(self, embedding: nn.Module, new_id: torch.Tensor, hidden: int, out_feats: int, n_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = embedding
        self.register_buffer("new_id", new_id.long())
        dim = embedding.embedding_dim if isinstance(embedding, nn.Embedding) else embedding.dim
        dims = [dim] + [hidden] * (n_layers - 1) + [out_feats]
        self.layers = nn.ModuleList(SAGEConv(a, b, "mean") for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, g, X=None) -> torch.Tensor:
        h = self.embedding(self.new_id)  # (N, d); X unused: featureless
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = F.dropout(F.relu(h), self.dropout, self.training)
            h = layer(g, h)
        return h

    def embedding_parameters(self) -> int:
        return sum(p.numel() for p in self.embedding.parameters())


def full_embedding(num_nodes: int, dim: int) -> nn.Embedding:
    """The baseline: one learnable row per node, N(0, 1) init (``nn.Embedding``'s default)."""
    return nn.Embedding(num_nodes, dim)


def train_featureless(model: nn.Module, g, y: torch.Tensor, split: dict, *, epochs: int, lr: float,
                      weight_decay: float = 0.0, patience: int | None = None) -> dict:
    """Full-batch Adam on CE of the training nodes; returns the per-epoch validation/test accuracy curves and the
    test accuracy at the best validation epoch (first on ties). ``patience``: stop once the best validation accuracy
    is ``patience`` epochs old (early stopping on validation; the epochs are then chosen on validation, up to
    ``epochs``); None runs every epoch. The reported best epoch is the same as without stopping whenever the
    validation accuracy does not improve again after a ``patience``-epoch plateau."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    val_curve, test_curve = [], []
    best_val, best_at = -1.0, 0
    for ep in range(epochs):
        if patience is not None and ep - best_at >= patience:
            break
        model.train()
        loss = F.cross_entropy(model(g)[split["train"]], y[split["train"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(g).argmax(-1)
        val_curve.append(float((pred[split["val"]] == y[split["val"]]).float().mean()))
        test_curve.append(float((pred[split["test"]] == y[split["test"]]).float().mean()))
        if val_curve[-1] > best_val:
            best_val, best_at = val_curve[-1], ep
    best = int(np.argmax(val_curve))
    return {"val_curve": val_curve, "test_curve": test_curve, "best_epoch": best + 1, "val_acc": val_curve[best],
            "test_acc": test_curve[best]}


def tt_param_count(num_nodes: int, dim_factors, rank: int, slack: float = 1.0) -> int:
    """Parameters of the TT table ``tt_shapes`` picks for ``num_nodes`` rows: sum_k r_{k-1} n_k d_k r_k."""
    ns, rs = tt_shapes(num_nodes, tuple(dim_factors), rank, slack)
    return sum(rs[k] * ns[k] * dim_factors[k] * rs[k + 1] for k in range(len(ns)))


def make_arm(arm: str, num_nodes: int, cfg: dict) -> nn.Module:
    """The embedding of an arm: ``full`` or ``tt_<order>_<init>`` (order: random | metis | rcm; init: orth | gauss)."""
    dim_factors = tuple(cfg["dim_factors"])
    if arm == "full":
        return full_embedding(num_nodes, math.prod(dim_factors))
    _, _, init = arm.split("_")
    return TTEmbedding(num_nodes, dim_factors, cfg["tt_rank"], {"orth": "orthogonal", "gauss": "gaussian"}[init],
                       slack=cfg["slack"])


def node_order(arm: str, g: dgl.DGLGraph, emb: nn.Module, seed: int, sub_levels: str = "rcm") -> torch.Tensor:
    """new_id for an arm: the full table does not care (identity); TT arms use their ordering."""
    n = g.num_nodes()
    if arm == "full":
        return torch.arange(n)
    order = arm.split("_")[1]
    if order == "random":
        return random_order(n, seed)
    if order == "metis":
        return metis_order(g, emb.n, sub_levels)
    if order == "rcm":
        return rcm_order(g)
    raise ValueError(f"unknown ordering in arm {arm!r}")


def run_arm(arm: str, data, split: dict, seed: int, cfg: dict, epochs: int, orders: dict | None = None) -> dict:
    """Train FeaturelessSAGE with the arm's embedding (weights seeded by ``seed``); ``orders`` caches orderings."""
    g = dgl.add_self_loop(dgl.remove_self_loop(data.graph))
    torch.manual_seed(seed)
    emb = make_arm(arm, data.num_nodes, cfg)
    key = (arm.split("_")[1] if arm != "full" else "full", seed if "random" in arm else 0)
    if orders is not None and key in orders:
        new_id = orders[key]
    else:
        new_id = node_order(arm, data.graph, emb, seed, cfg.get("metis_sub_levels", "rcm"))
        if orders is not None:
            orders[key] = new_id
    model = FeaturelessSAGE(emb, new_id, cfg["hidden"], data.num_classes, cfg["n_layers"], cfg["dropout"])
    out = train_featureless(model, g, data.y, split, epochs=epochs, lr=cfg["lr"], patience=cfg.get("patience"))
    out["emb_params"] = model.embedding_parameters()
    out["emb_bytes"] = 4 * out["emb_params"]  # fp32
    out["gnn_params"] = sum(p.numel() for p in model.layers.parameters())
    if arm != "full":
        out["locality"] = order_locality(data.graph, new_id, math.prod(emb.n[1:]))
        out["row_factors"] = list(emb.n)
    return out
