"""A Complete Expressiveness Hierarchy for Subgraph GNNs via Subgraph Weisfeiler-Lehman Tests.

Zhang, Feng, Du, He, ICML 2023, https://arxiv.org/abs/2302.07090; official code github.com/subgraph23/SWL.

Two parts:

1. **Exact colour refinement** (``refine_pair``): 1-WL, the subgraph WL tests SWL(A, Pool) of the paper (colour
   chi(u, v) of node v in the node-marked subgraph G^u) for the aggregation schemes of the official ``main_zinc.py``
   (SWL_VS/SV = {uL}, PSWL_VS/SV = {uL, vv}, GSWL = {uL, vG}, SSWL = {uL, vL}), the localized 2-FWL tests LFWL(2)
   (w in N(v)) and SLFWL(2) (w in N(u) u N(v)), and 2-FWL (as github.com/zml72062/fwl2_family wl2base.py). Atomic aggregations (paper Def. 2.2, official
   ``src/utils.py``):

       uu: chi(u, u)        vv: chi(v, v)        uG: {{chi(u, w): w in V}}       vG: {{chi(w, v): w in V}}
       uL: {{chi(u, w): w in N(v)}}              vL: {{chi(w, v): w in N(u)}}

   chi^{t+1}(u, v) = hash(chi^t(u, v), agg_1(u, v), ..., agg_k(u, v)), chi^0(u, v) = (label(v), 1[u = v])
   (node marking). The graph colour is VS: {{ {{chi(u, v): v}} : u }} or SV: {{ {{chi(u, v): u}} : v }}.
   Hashing is exact: a multiset is its sorted array of colour ids, and the two graphs of a pair share one colour
   dictionary (``np.unique`` over the stacked signatures of both graphs), refined until the joint number of colours
   stops growing.

2. **SSWL-GNN** (``SubgraphGNN``): the official ``GNN`` of ``src/model.py`` on dense pair tensors h(u, v): distance
   encoding of d(u, v) (max_dis), per-aggregation GIN updates sum_A MLP_A((1 + eps_A) h + agg_A(h)), BatchNorm + ReLU,
   a final pooling layer (uG for VS) and a mean over all (u, v), then an MLP.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from torch import nn

# scheme name -> (aggregations, pooling), as in the official main_zinc.py (pool "uG" = VS, "vG" = SV)
SUBGRAPH_SCHEMES = {
    "SWL_VS": (("uL",), "VS"),
    "SWL_SV": (("uL",), "SV"),
    "PSWL_VS": (("uL", "vv"), "VS"),
    "PSWL_SV": (("uL", "vv"), "SV"),
    "GSWL": (("uL", "vG"), "VS"),
    "SSWL": (("uL", "vL"), "VS"),
}
HIERARCHY = ("WL", "SWL_VS", "SWL_SV", "PSWL_VS", "PSWL_SV", "GSWL", "SSWL", "LFWL", "SLFWL", "FWL2")
# inclusions weak <= strong of the paper's hierarchy (Theorems 4.4 / 7.1, Section 5). SWL(SV) vs PSWL(VS) and SSWL vs
# LFWL(2) are incomparable pairs (the paper's Figure 4/5 and Figure 8/9 Fuerer pairs separate each in both directions),
# reported both ways as diagnostics; SSWL and LFWL(2) are both checked below SLFWL(2) (see the deviations)
INCLUSIONS = (("WL", "SWL_VS"), ("SWL_VS", "SWL_SV"), ("SWL_VS", "PSWL_VS"), ("SWL_SV", "PSWL_SV"),
              ("PSWL_VS", "PSWL_SV"), ("PSWL_SV", "GSWL"), ("GSWL", "SSWL"), ("SSWL", "SLFWL"), ("LFWL", "SLFWL"),
              ("SLFWL", "FWL2"))


# ------------------------------------------------------------------------------------------------ graph utilities
def graph_arrays(g: nx.Graph) -> dict:
    """Dense adjacency, padded neighbour lists and integer node labels (attribute ``label``, default 0)."""
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    n = g.number_of_nodes()
    A = np.zeros((n, n), dtype=bool)
    for a, b in g.edges:
        if a != b:
            A[a, b] = A[b, a] = True
    deg = A.sum(1)
    dmax = int(deg.max()) if n else 0
    nbr = -np.ones((n, max(dmax, 1)), dtype=np.int64)
    for v in range(n):
        w = np.flatnonzero(A[v])
        nbr[v, :len(w)] = w
    labels = np.array([int(g.nodes[v].get("label", 0)) for v in range(n)], dtype=np.int64)
    return {"n": n, "A": A, "nbr": nbr, "labels": labels}


def _relabel(sigs: list[np.ndarray]) -> list[np.ndarray]:
    """Shared canonical colour ids for the signature rows of several graphs (exact: equal rows <-> equal ids)."""
    width = max(s.shape[-1] for s in sigs)
    flat = [np.pad(s.reshape(-1, s.shape[-1]), ((0, 0), (0, width - s.shape[-1])), constant_values=-2) for s in sigs]
    _, inv = np.unique(np.concatenate(flat), axis=0, return_inverse=True)
    inv = inv.ravel()
    out, k = [], 0
    for s in sigs:
        m = int(np.prod(s.shape[:-1]))
        out.append(inv[k:k + m].reshape(s.shape[:-1]))
        k += m
    return out


def _pad_sorted(x: np.ndarray, mask: np.ndarray | None, width: int) -> np.ndarray:
    """Sorted multiset along the last axis (masked entries -> -1), padded with -1 to ``width``."""
    if mask is not None:
        x = np.where(mask, x, -1)
    x = np.sort(x, axis=-1)
    if x.shape[-1] < width:
        x = np.concatenate([np.full(x.shape[:-1] + (width - x.shape[-1],), -1, dtype=x.dtype), x], axis=-1)
    return x


# -------------------------------------------------------------------------------------------------------- 1-WL
def _n_colours(cols: list[np.ndarray]) -> int:
    return len(np.unique(np.concatenate([c.ravel() for c in cols])))


def _to_fixpoint(cols: list[np.ndarray], step, max_iter: int) -> list[np.ndarray]:
    """Apply the refinement `step` (shared colour ids across the graphs) until the number of colours stops growing
    (refinement never merges colours, so an unchanged count is a stable partition), or max_iter rounds."""
    n_col = _n_colours(cols)
    for _ in range(max_iter):
        cols = step(cols)
        k = _n_colours(cols)
        if k == n_col:
            break
        n_col = k
    return cols


def wl_refine(graphs: list[dict], max_iter: int | None = None) -> list[np.ndarray]:
    cols = _relabel([G["labels"][:, None] for G in graphs])
    dmax = max(G["nbr"].shape[1] for G in graphs)

    def step(cols):
        sigs = []
        for G, c in zip(graphs, cols):
            nb = c[np.maximum(G["nbr"], 0)]  # (n, d)
            sigs.append(np.concatenate([c[:, None], _pad_sorted(nb, G["nbr"] >= 0, dmax)], axis=1))
        return _relabel(sigs)

    return _to_fixpoint(cols, step, max_iter or sum(G["n"] for G in graphs) + 1)


# ----------------------------------------------------------------------------------------------- subgraph WL
def _subgraph_signature(G: dict, c: np.ndarray, aggs, dmax: int, nmax: int) -> np.ndarray:
    n, nbr = G["n"], G["nbr"]
    mask = nbr >= 0
    parts = [c[:, :, None]]  # chi(u, v)
    for a in aggs:
        if a == "uu":
            parts.append(np.broadcast_to(np.diag(c)[:, None, None], (n, n, 1)))
        elif a == "vv":
            parts.append(np.broadcast_to(np.diag(c)[None, :, None], (n, n, 1)))
        elif a == "uG":  # {{chi(u, w): w}} for every v
            parts.append(np.broadcast_to(_pad_sorted(c, None, nmax)[:, None, :], (n, n, nmax)))
        elif a == "vG":  # {{chi(w, v): w}}
            parts.append(np.broadcast_to(_pad_sorted(c.T, None, nmax)[None, :, :], (n, n, nmax)))
        elif a == "uL":  # {{chi(u, w): w in N(v)}}: c[u, nbr[v, j]]
            x = c[:, np.maximum(nbr, 0)]  # (u, v, j)
            parts.append(_pad_sorted(x, mask[None, :, :], dmax))
        elif a == "vL":  # {{chi(w, v): w in N(u)}}: c[nbr[u, j], v]
            x = c[np.maximum(nbr, 0), :].transpose(0, 2, 1)  # (u, v, j)
            parts.append(_pad_sorted(x, mask[:, None, :], dmax))
        else:
            raise ValueError(f"unknown aggregation {a!r}")
    return np.concatenate(parts, axis=2)


def subgraph_refine(graphs: list[dict], aggs, max_iter: int | None = None) -> list[np.ndarray]:
    """Stable colours chi(u, v) of SWL(aggs) on every graph, with one shared colour dictionary."""
    init = []
    for G in graphs:
        n = G["n"]
        eye = np.eye(n, dtype=np.int64)
        init.append(np.stack([np.broadcast_to(G["labels"][None, :], (n, n)), eye], axis=2))
    cols = _relabel(init)
    dmax = max(G["nbr"].shape[1] for G in graphs)
    nmax = max(G["n"] for G in graphs)
    return _to_fixpoint(cols, lambda cols: _relabel([_subgraph_signature(G, c, aggs, dmax, nmax)
                                                     for G, c in zip(graphs, cols)]),
                        max_iter or sum(G["n"] ** 2 for G in graphs) + 1)


# --------------------------------------------------------------------------------------------------- 2-FWL family
def fwl_refine(graphs: list[dict], local: str | None = None, max_iter: int | None = None) -> list[np.ndarray]:
    """2-FWL (local=None), LFWL(2) (local="v": w in N(v)) or SLFWL(2) (local="uv": w in N(u) u N(v)).

    chi^0(u, v) = (label(u), label(v), 1[u = v], A[u, v]); chi(u, v) <- hash(chi(u, v), {{(chi(u, w), chi(w, v))}}).
    """
    init = []
    for G in graphs:
        n, L = G["n"], G["labels"]
        init.append(np.stack([np.broadcast_to(L[:, None], (n, n)), np.broadcast_to(L[None, :], (n, n)),
                              np.eye(n, dtype=np.int64), G["A"].astype(np.int64)], axis=2))
    cols = _relabel(init)
    nmax = max(G["n"] for G in graphs)
    dmax = max(G["nbr"].shape[1] for G in graphs)

    def step(cols):
        K = _n_colours(cols) + 1
        sigs = []
        for G, c in zip(graphs, cols):
            n = G["n"]
            if local == "v":
                nb = np.maximum(G["nbr"], 0)
                # (u, v, j): chi(u, w) K + chi(w, v), w = nbr[v, j]. (Before the review this read c[nb, :].transpose(2,
                # 0, 1), i.e. chi(w, u): wrong for LFWL, whose w-set N(v) is not symmetric in u, v; found by the naive
                # reference on the paper's fig8 pair. 2-FWL / SLFWL below use chi(v, w) for chi(w, v), equivalent there
                # because their w-sets are symmetric, so chi(u, v) determines chi(v, u).)
                pair = c[:, nb] * K + c[nb, np.arange(n)[:, None]][None, :, :]
                ms = _pad_sorted(pair, (G["nbr"] >= 0)[None, :, :], dmax)
            else:
                pair = c[:, :, None] * K + c.T[None, :, :]  # (u, w, v) -> transpose to (u, v, w)
                pair = pair.transpose(0, 2, 1)  # pair[u, v, w] = chi(u, w) K + chi(w, v)
                mask = None
                if local == "uv":
                    mask = G["A"][:, None, :] | G["A"][None, :, :]  # w in N(u) or w in N(v)
                ms = _pad_sorted(pair, mask, nmax)
            sigs.append(np.concatenate([c[:, :, None], ms], axis=2))
        return _relabel(sigs)

    return _to_fixpoint(cols, step, max_iter or sum(G["n"] ** 2 for G in graphs) + 1)


# ---------------------------------------------------------------------------------------------- graph invariants
def _graph_colours(per_graph: list[np.ndarray]) -> list[np.ndarray]:
    """Histogram (sorted array) of the colours of each graph."""
    return [np.sort(c.ravel()) for c in per_graph]


def _pool(cols: list[np.ndarray], pool: str) -> list[np.ndarray]:
    rows = [np.sort(c if pool == "VS" else c.T, axis=1) for c in cols]  # per u (VS) or per v (SV): the inner multiset
    inner = _relabel(rows)  # shared ids of the inner multisets
    return _graph_colours(inner)


def distinguishes(test: str, g: nx.Graph, h: nx.Graph) -> bool:
    """Whether ``test`` (one of HIERARCHY) tells g and h apart, refining both with one colour dictionary."""
    G, H = graph_arrays(g), graph_arrays(h)
    if G["n"] != H["n"]:
        return True
    if test == "WL":
        fin = _graph_colours(wl_refine([G, H]))
    elif test in SUBGRAPH_SCHEMES:
        aggs, pool = SUBGRAPH_SCHEMES[test]
        fin = _pool(subgraph_refine([G, H], aggs), pool)
    elif test in ("FWL2", "LFWL", "SLFWL"):
        fin = _graph_colours(fwl_refine([G, H], local={"FWL2": None, "LFWL": "v", "SLFWL": "uv"}[test]))
    else:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(HIERARCHY)}")
    return not np.array_equal(fin[0], fin[1])


def hierarchy_table(pairs: dict[str, tuple[nx.Graph, nx.Graph]], tests=HIERARCHY) -> dict[str, dict[str, bool]]:
    return {name: {t: distinguishes(t, g, h) for t in tests} for name, (g, h) in pairs.items()}


def inclusion_report(table: dict[str, dict[str, bool]], inclusions=INCLUSIONS) -> dict:
    """For each inclusion a <= b: violations (a distinguishes, b does not) and strictness witnesses (b, not a)."""
    out = {}
    for a, b in inclusions:
        viol = [p for p, r in table.items() if r[a] and not r[b]]
        wit = [p for p, r in table.items() if r[b] and not r[a]]
        out[f"{a} <= {b}"] = {"violations": viol, "witnesses": wit}
    return out


# ------------------------------------------------------------------------------------------ naive references (tests)
def naive_subgraph_wl(graphs: list[nx.Graph], aggs, pool: str, rounds: int) -> list:
    """Slow reference: Python dicts and tuples, one shared dictionary, a fixed number of rounds."""
    gs = [nx.convert_node_labels_to_integers(g, ordering="sorted") for g in graphs]
    table: dict = {}

    def h(x):
        return table.setdefault(x, len(table))

    chi = [{(u, v): h(("init", g.nodes[v].get("label", 0), u == v)) for u in g for v in g} for g in gs]
    for _ in range(rounds):
        new = []
        for g, c in zip(gs, chi):
            d = {}
            for u in g:
                for v in g:
                    sig = [c[u, v]]
                    for a in aggs:
                        if a == "uu":
                            sig.append(c[u, u])
                        elif a == "vv":
                            sig.append(c[v, v])
                        elif a == "uG":
                            sig.append(tuple(sorted(c[u, w] for w in g)))
                        elif a == "vG":
                            sig.append(tuple(sorted(c[w, v] for w in g)))
                        elif a == "uL":
                            sig.append(tuple(sorted(c[u, w] for w in g.neighbors(v))))
                        elif a == "vL":
                            sig.append(tuple(sorted(c[w, v] for w in g.neighbors(u))))
                    d[u, v] = h(tuple(map(lambda s: s if not isinstance(s, tuple) else ("ms",) + s, sig)))
            new.append(d)
        chi = new
    out = []
    for g, c in zip(gs, chi):
        if pool == "VS":
            inner = [tuple(sorted(c[u, v] for v in g)) for u in g]
        else:
            inner = [tuple(sorted(c[u, v] for u in g)) for v in g]
        out.append(tuple(sorted(h(("pool",) + x) for x in inner)))
    return out


def naive_fwl2(graphs: list[nx.Graph], rounds: int) -> list:
    gs = [nx.convert_node_labels_to_integers(g, ordering="sorted") for g in graphs]
    table: dict = {}

    def h(x):
        return table.setdefault(x, len(table))

    chi = [{(u, v): h(("init", g.nodes[u].get("label", 0), g.nodes[v].get("label", 0), u == v, g.has_edge(u, v)))
            for u in g for v in g} for g in gs]
    for _ in range(rounds):
        chi = [{(u, v): h((c[u, v], tuple(sorted((c[u, w], c[w, v]) for w in g)))) for u in g for v in g}
               for g, c in zip(gs, chi)]
    return [tuple(sorted(c.values())) for c in chi]


def naive_local_fwl2(graphs: list[nx.Graph], rounds: int, local: str) -> list:
    """Slow reference for LFWL(2) (local="v": w in N(v)) and SLFWL(2) (local="uv": w in N(u) u N(v))."""
    gs = [nx.convert_node_labels_to_integers(g, ordering="sorted") for g in graphs]
    table: dict = {}

    def h(x):
        return table.setdefault(x, len(table))

    def ws(g, u, v):
        if local == "v":
            return list(g.neighbors(v))
        return sorted(set(g.neighbors(u)) | set(g.neighbors(v)))

    chi = [{(u, v): h(("init", g.nodes[u].get("label", 0), g.nodes[v].get("label", 0), u == v, g.has_edge(u, v)))
            for u in g for v in g} for g in gs]
    for _ in range(rounds):
        chi = [{(u, v): h((c[u, v], tuple(sorted((c[u, w], c[w, v]) for w in ws(g, u, v))))) for u in g for v in g}
               for g, c in zip(gs, chi)]
    return [tuple(sorted(c.values())) for c in chi]


# ---------------------------------------------------------------------------------------------------- SSWL-GNN
def shortest_path_matrix(g: nx.Graph, max_dis: int) -> np.ndarray:
    """d(u, v) clamped to max_dis; unreachable pairs get max_dis + 1 (the official code clamps inf to max_dis)."""
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    n = g.number_of_nodes()
    D = np.full((n, n), max_dis + 1, dtype=np.int64)
    for u, dist in nx.all_pairs_shortest_path_length(g):
        for v, d in dist.items():
            D[u, v] = min(d, max_dis)
    return D


def dense_batcher(graphs: list[nx.Graph], max_dis: int):
    """idx -> (A (B, n, n), D (B, n, n), mask (B, n)), graphs zero-padded to the batch's largest size."""
    As, Ds = [], []
    for g in graphs:
        G = graph_arrays(g)
        As.append(torch.tensor(G["A"], dtype=torch.float32))
        Ds.append(torch.tensor(shortest_path_matrix(g, max_dis)))

    def batch(idx):
        n = max(As[i].shape[0] for i in idx)
        A = torch.zeros(len(idx), n, n)
        D = torch.full((len(idx), n, n), max_dis + 1, dtype=torch.long)
        M = torch.zeros(len(idx), n)
        for k, i in enumerate(idx):
            m = As[i].shape[0]
            A[k, :m, :m], D[k, :m, :m], M[k, :m] = As[i], Ds[i], 1.0
        return A, D, M

    return batch


class _MLP(nn.Sequential):
    """Official MLP: Linear, BatchNorm, ReLU, Linear (src/model.py MLP)."""

    def __init__(self, idim: int, odim: int, hdim: int | None = None, norm: bool = True):
        hdim = hdim or idim
        super().__init__(nn.Linear(idim, hdim), nn.BatchNorm1d(hdim) if norm else nn.Identity(), nn.ReLU(),
                         nn.Linear(hdim, odim))


def aggregate_dense(h: torch.Tensor, A: torch.Tensor, M: torch.Tensor, agg: str) -> torch.Tensor:
    """One atomic aggregation on dense pair features h (B, n, n, d) (padding masked by M (B, n))."""
    pm = (M[:, :, None] * M[:, None, :])[..., None]  # (B, n, n, 1) valid pairs
    h = h * pm
    if agg == "uL":  # sum_{w in N(v)} h(u, w)
        return torch.einsum("buwd,bwv->buvd", h, A)
    if agg == "vL":  # sum_{w in N(u)} h(w, v)
        return torch.einsum("buw,bwvd->buvd", A, h)
    if agg == "uG":  # sum_w h(u, w)
        return h.sum(2, keepdim=True).expand_as(h) * pm
    if agg == "vG":  # sum_w h(w, v)
        return h.sum(1, keepdim=True).expand_as(h) * pm
    if agg == "uu":
        return torch.diagonal(h, dim1=1, dim2=2).permute(0, 2, 1)[:, :, None, :].expand_as(h) * pm
    if agg == "vv":
        return torch.diagonal(h, dim1=1, dim2=2).permute(0, 2, 1)[:, None, :, :].expand_as(h) * pm
    raise ValueError(agg)


class SubgraphGNN(nn.Module):
    """The official subgraph GNN (src/model.py GNN) on dense pair tensors.

    encode: h0(u, v) = Embedding(d(u, v)) (distance encoding; unlabelled graphs, no atom encoder);
    layer:  h <- ReLU(BN(sum_{A in scheme} MLP_A((1 + eps_A) h + agg_A(h))));
    pool:   h(u, v) <- MLP(agg_pool(h)) (no GIN term), mean over all valid (u, v), prediction MLP (hdim = 2 d).
    """

    def __init__(self, hidden: int, n_classes: int, n_layers: int, aggs=("uL", "vL"), pool: str = "uG",
                 max_dis: int = 5):
        super().__init__()
        self.aggs, self.pool_agg = tuple(aggs), pool
        self.embed_d = nn.Embedding(max_dis + 2, hidden)
        self.eps = nn.ParameterList(nn.ParameterDict({a: nn.Parameter(torch.zeros(1)) for a in self.aggs})
                                    for _ in range(n_layers))
        self.mlps = nn.ModuleList(nn.ModuleDict({a: _MLP(hidden, hidden) for a in self.aggs}) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(n_layers))
        self.pool_mlp = _MLP(hidden, hidden)
        self.pool_norm = nn.BatchNorm1d(hidden)
        self.predict = _MLP(hidden, n_classes, hdim=2 * hidden, norm=False)

    @staticmethod
    def _rows(x, valid, fn):
        """Apply ``fn`` (a module over (N, d) rows, e.g. with BatchNorm) to the valid pairs only."""
        out = torch.zeros(x.shape[:-1] + (fn[-1].out_features if isinstance(fn, nn.Sequential) else x.shape[-1],),
                          dtype=x.dtype)
        out[valid] = fn(x[valid])
        return out

    def forward(self, batch):
        A, D, M = batch
        valid = (M[:, :, None] * M[:, None, :]) > 0  # (B, n, n)
        h = self.embed_d(D) * valid[..., None]  # (B, n, n, d)
        for eps, mlps, norm in zip(self.eps, self.mlps, self.norms):
            s = 0
            for a in self.aggs:
                s = s + self._rows((1 + eps[a]) * h + aggregate_dense(h, A, M, a), valid, mlps[a])
            out = torch.zeros_like(h)
            out[valid] = torch.relu(norm(s[valid]))
            h = out
        p = self._rows(aggregate_dense(h, A, M, self.pool_agg), valid, self.pool_mlp)
        out = torch.zeros_like(p)
        out[valid] = torch.relu(self.pool_norm(p[valid]))
        g = out.sum((1, 2)) / valid.sum((1, 2))[:, None]  # global mean pool over (u, v)
        return self.predict(g)
