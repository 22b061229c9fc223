"""Subgraph Permutation Equivariant Networks (SPEN; later "Local Permutation Equivariant Graph Networks", LPEGN).

Mitton & Murray-Smith, https://arxiv.org/abs/2111.11840; official code github.com/JoshuaMitton/LPEGN
(``lpegn/models/equivariant_gnn.py``, ``lpegn/layers/equivariant_linear.py``).

Every node's k-hop ego-net is a small dense graph; one SPEN layer applies, inside every ego-net, the linear
permutation-equivariant maps of Maron et al. (2019) between order-2 (pair) and order-1 (node) features:
2->2 (15 basis ops), 1->2 (5), 2->1 (5), 1->1 (2), with one set of weights per ego-net size (the official
``degree_mapping``). Outputs of the order-2 and order-1 streams are concatenated (official: ``torch.cat`` of
p2p2 with p1p2 and of p2p1 with p1p1), then every pair (i, j) and node i shared by several ego-nets gets the mean over
the ego-nets that contain it (official ``subgraphs_to_graph`` / ``subnodes_to_nodes``, scatter ``reduce="mean"``):
this is how ego-nets exchange information. The readout applies 2->0 and 1->0 maps per ego-net, a mean over the
ego-nets of a graph, and an MLP. The global 2-IGN (Maron et al. 2019) applies the same 2->2 maps to the whole n x n
adjacency tensor.

Basis ops follow the official ``ops_2_to_2`` and its ``normalization='inf'`` (sums divided by m or m^2).
"""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------------------------- Maron basis ops
def ops_2_to_2(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The 15 basis ops of order-2 -> order-2 equivariant linear maps. x: (N, D, m, m) -> (N, D, 15, m, m)."""
    m = x.shape[-1]
    diag = torch.diagonal(x, dim1=-2, dim2=-1)  # (N, D, m)
    sum_diag = diag.sum(-1, keepdim=True)  # (N, D, 1)
    rows = x.sum(-1)  # (N, D, m): sum of row i
    cols = x.sum(-2)  # (N, D, m): sum of column i
    tot = rows.sum(-1, keepdim=True)  # (N, D, 1)
    f = (1.0 / m, 1.0 / m ** 2) if normalize else (1.0, 1.0)
    e = lambda v: v[..., :, None].expand(*v.shape, m)  # noqa: E731  value i in row i
    ops = [
        torch.diag_embed(diag),  # 1 diag
        torch.diag_embed(sum_diag.expand_as(diag)) * f[0],  # 2 sum of diag on diag
        torch.diag_embed(rows) * f[0],  # 3 row sums on diag
        torch.diag_embed(cols) * f[0],  # 4 col sums on diag
        torch.diag_embed(tot.expand_as(diag)) * f[1],  # 5 total on diag
        e(cols) * f[0],  # 6 col sum i on row i
        e(rows) * f[0],  # 7 row sum i on row i
        e(cols).transpose(-1, -2) * f[0],  # 8 col sum i on col i
        e(rows).transpose(-1, -2) * f[0],  # 9 row sum i on col i
        x,  # 10 identity
        x.transpose(-1, -2),  # 11 transpose
        e(diag),  # 12 diag i on row i
        e(diag).transpose(-1, -2),  # 13 diag i on col i
        sum_diag[..., None].expand_as(x) * f[0],  # 14 sum of diag everywhere
        tot[..., None].expand_as(x) * f[1],  # 15 total everywhere
    ]
    return torch.stack(ops, dim=2)


def ops_2_to_1(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    m = x.shape[-1]
    diag = torch.diagonal(x, dim1=-2, dim2=-1)
    f = (1.0 / m, 1.0 / m ** 2) if normalize else (1.0, 1.0)
    return torch.stack([diag, diag.sum(-1, keepdim=True).expand_as(diag) * f[0], x.sum(-1) * f[0], x.sum(-2) * f[0],
                        x.sum((-1, -2))[..., None].expand_as(diag) * f[1]], dim=2)  # (N, D, 5, m)


def ops_1_to_2(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    m = x.shape[-1]
    s = x.sum(-1, keepdim=True)  # (N, D, 1)
    f = 1.0 / m if normalize else 1.0
    return torch.stack([torch.diag_embed(x), torch.diag_embed(s.expand_as(x)) * f,
                        x[..., None, :].expand(*x.shape[:-1], m, m), x[..., :, None].expand(*x.shape, m),
                        s[..., None].expand(*x.shape, m) * f], dim=2)  # (N, D, 5, m, m)


def ops_1_to_1(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    m = x.shape[-1]
    return torch.stack([x, x.sum(-1, keepdim=True).expand_as(x) * (1.0 / m if normalize else 1.0)], dim=2)


def ops_2_to_0(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    m = x.shape[-1]
    diag = torch.diagonal(x, dim1=-2, dim2=-1)
    f = (1.0 / m, 1.0 / m ** 2) if normalize else (1.0, 1.0)
    return torch.stack([diag.sum(-1) * f[0], x.sum((-1, -2)) * f[1]], dim=2)  # (N, D, 2)


def ops_1_to_0(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return (x.sum(-1) * (1.0 / x.shape[-1] if normalize else 1.0))[:, :, None]  # (N, D, 1)


_OPS = {(2, 2): (ops_2_to_2, 15), (2, 1): (ops_2_to_1, 5), (1, 2): (ops_1_to_2, 5), (1, 1): (ops_1_to_1, 2),
        (2, 0): (ops_2_to_0, 2), (1, 0): (ops_1_to_0, 1)}


class EquiLinear(nn.Module):
    """sum_b coeffs[d, s, b] op_b(x)[d] + bias (and a diagonal bias for 2->2), as the official equi_*_to_* layers."""

    def __init__(self, in_order: int, out_order: int, d_in: int, d_out: int, normalize: bool = True):
        super().__init__()
        self.fn, nb = _OPS[(in_order, out_order)]
        self.out_order, self.normalize = out_order, normalize
        self.coeffs = nn.Parameter(torch.randn(d_in, d_out, nb) * math.sqrt(2.0 / (d_in + d_out)))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.diag_bias = nn.Parameter(torch.zeros(d_out)) if (in_order, out_order) == (2, 2) else None

    def forward(self, x):
        ops = self.fn(x, self.normalize)
        if self.out_order == 2:
            out = torch.einsum("dsb,ndbij->nsij", self.coeffs, ops) + self.bias[:, None, None]
            if self.diag_bias is not None:
                out = out + torch.diag_embed(self.diag_bias[:, None].expand(-1, x.shape[-1]))
            return out
        if self.out_order == 1:
            return torch.einsum("dsb,ndbi->nsi", self.coeffs, ops) + self.bias[:, None]
        return torch.einsum("dsb,ndb->ns", self.coeffs, ops) + self.bias


# ---------------------------------------------------------------------------- naive basis (tests): partitions of [4]
def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        for k in range(len(p)):
            yield p[:k] + [[first] + p[k]] + p[k + 1:]
        yield [[first]] + p


def partition_basis_2_to_2(m: int) -> np.ndarray:
    """The 15 indicator tensors B[i, j, k, l] of equality patterns (partitions of {i, j, k, l}) (Maron et al. 2019,
    Theorem 1): out[i, j] = sum_{k, l} B[i, j, k, l] x[k, l]. Returns (15, m*m, m*m) matrices."""
    out = []
    idx = np.indices((m,) * 4).reshape(4, -1).T  # all (i, j, k, l)
    for part in set_partitions([0, 1, 2, 3]):
        block = np.zeros(4, dtype=int)
        for b, members in enumerate(part):
            block[members] = b
        ok = np.ones(len(idx), dtype=bool)
        for a in range(4):
            for c in range(a + 1, 4):
                same = idx[:, a] == idx[:, c]
                ok &= same if block[a] == block[c] else ~same
        B = ok.reshape((m,) * 4).astype(float)
        out.append(B.reshape(m * m, m * m))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ ego-net batching
def ego_nets(g: nx.Graph, k: int) -> list[list[int]]:
    """Sorted node lists of the k-hop ego-nets (centre included) of every node (nodes relabelled 0..n-1, sorted)."""
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    return [sorted(nx.single_source_shortest_path_length(g, v, cutoff=k)) for v in range(g.number_of_nodes())]


def build_batch(graphs: list[nx.Graph], k: int | None) -> dict:
    """Index tensors of a batch: global nodes, global pair ids, per ego-net-size groups (k=None: the whole graph)."""
    node_off, pair_index, groups = 0, {}, {}
    n_nodes, A_pairs, graph_of_node = [], [], []
    for gi, g in enumerate(graphs):
        g = nx.convert_node_labels_to_integers(g, ordering="sorted")
        n = g.number_of_nodes()
        subs = ego_nets(g, k) if k is not None else [list(range(n))]
        for sub in subs:
            m = len(sub)
            ids = np.empty((m, m), dtype=np.int64)
            for a, i in enumerate(sub):
                for b, j in enumerate(sub):
                    key = (node_off + i, node_off + j)
                    pid = pair_index.get(key)
                    if pid is None:
                        pid = pair_index[key] = len(pair_index)
                        A_pairs.append(1.0 if g.has_edge(i, j) else 0.0)
                    ids[a, b] = pid
            grp = groups.setdefault(m, {"pairs": [], "nodes": [], "graph": []})
            grp["pairs"].append(ids)
            grp["nodes"].append(np.array(sub) + node_off)
            grp["graph"].append(gi)
        graph_of_node += [gi] * n
        node_off += n
    pair_keys = np.array(list(pair_index.keys()), dtype=np.int64).reshape(-1, 2)
    return {
        "n_graphs": len(graphs), "n_nodes": node_off, "n_pairs": len(pair_index),
        "pair_adj": torch.tensor(A_pairs), "pair_is_diag": torch.tensor(pair_keys[:, 0] == pair_keys[:, 1]).float(),
        "groups": {m: {"pairs": torch.tensor(np.stack(v["pairs"])), "nodes": torch.tensor(np.stack(v["nodes"])),
                       "graph": torch.tensor(v["graph"])} for m, v in sorted(groups.items())},
    }


def _scatter_mean(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of rows of src (E, D) per index (E,) into (size, D)."""
    out = torch.zeros(size, src.shape[1], dtype=src.dtype).index_add_(0, index, src)
    cnt = torch.zeros(size, dtype=src.dtype).index_add_(0, index, torch.ones_like(index, dtype=src.dtype))
    return out / cnt.clamp(min=1)[:, None]


class SPEN(nn.Module):
    """SPEN on k-hop ego-nets; k=None with ``order1=False`` is a global 2-IGN (Maron et al. 2019)."""

    def __init__(self, hidden: int, n_classes: int, n_layers: int, sizes, k: int | None = 1, order1: bool = True,
                 normalize: bool = True):
        super().__init__()
        self.k, self.order1, self.sizes = k, order1, sorted(set(int(s) for s in sizes))
        d_in2, d_in1 = 2, 1  # pair channels [adjacency, identity]; node channel [1]
        self.layers = nn.ModuleList()
        for layer in range(n_layers):
            per_size = nn.ModuleDict()
            for s in self.sizes:
                mods = {"p2p2": EquiLinear(2, 2, d_in2, hidden, normalize)}
                if order1:
                    mods.update(p2p1=EquiLinear(2, 1, d_in2, hidden, normalize))
                    if layer > 0:  # official layer 1 uses the order-2 input only
                        mods.update(p1p2=EquiLinear(1, 2, d_in1, hidden, normalize),
                                    p1p1=EquiLinear(1, 1, d_in1, hidden, normalize))
                per_size[str(s)] = nn.ModuleDict(mods)
            self.layers.append(per_size)
            width = 2 * hidden if (order1 and layer > 0) else hidden
            d_in2, d_in1 = width, (2 * hidden if layer > 0 else hidden) if order1 else 0
        self.readout = nn.ModuleDict()
        for s in self.sizes:
            mods = {"p2p0": EquiLinear(2, 0, d_in2, hidden, normalize)}
            if order1:
                mods["p1p0"] = EquiLinear(1, 0, d_in1, hidden, normalize)
            self.readout[str(s)] = nn.ModuleDict(mods)
        r = 2 * hidden if order1 else hidden
        self.mlp = nn.Sequential(nn.Linear(r, 2 * hidden), nn.ELU(), nn.Linear(2 * hidden, n_classes))

    def _weights(self, layer_dict: nn.ModuleDict, m: int) -> nn.ModuleDict:
        key = str(m) if str(m) in layer_dict else str(min(self.sizes, key=lambda s: abs(s - m)))
        return layer_dict[key]

    def forward(self, batch: dict, saved_bytes: list | None = None) -> torch.Tensor:
        P = torch.stack([batch["pair_adj"], batch["pair_is_diag"]], 1)  # (n_pairs, 2) global pair features
        X = torch.ones(batch["n_nodes"], 1) if self.order1 else None  # (n_nodes, 1)
        for li, layer in enumerate(self.layers):
            outs2, idx2, outs1, idx1 = [], [], [], []
            for m, grp in batch["groups"].items():
                W = self._weights(layer, m)
                x2 = P[grp["pairs"]].permute(0, 3, 1, 2)  # (S, D, m, m)
                y2 = [W["p2p2"](x2)]
                if self.order1:
                    x1 = X[grp["nodes"]].permute(0, 2, 1)  # (S, D, m)
                    y1 = [W["p2p1"](x2)]
                    if "p1p2" in W:
                        y2.append(W["p1p2"](x1))
                        y1.append(W["p1p1"](x1))
                    outs1.append(torch.cat(y1, 1).permute(0, 2, 1).reshape(-1, sum(t.shape[1] for t in y1)))
                    idx1.append(grp["nodes"].reshape(-1))
                y2 = torch.cat(y2, 1)  # (S, D', m, m)
                outs2.append(y2.permute(0, 2, 3, 1).reshape(-1, y2.shape[1]))
                idx2.append(grp["pairs"].reshape(-1))
            # nodes and pairs shared by several ego-nets: mean over the ego-nets that contain them (official scatter mean)
            P = nn.functional.elu(_scatter_mean(torch.cat(outs2), torch.cat(idx2), batch["n_pairs"]))
            if self.order1:
                X = nn.functional.elu(_scatter_mean(torch.cat(outs1), torch.cat(idx1), batch["n_nodes"]))
        reads, gids = [], []
        for m, grp in batch["groups"].items():
            W = self._weights(self.readout, m)
            x2 = P[grp["pairs"]].permute(0, 3, 1, 2)
            r = [W["p2p0"](x2)]
            if self.order1:
                r.append(W["p1p0"](X[grp["nodes"]].permute(0, 2, 1)))
            reads.append(nn.functional.elu(torch.cat(r, 1)))
            gids.append(grp["graph"])
        g = _scatter_mean(torch.cat(reads), torch.cat(gids), batch["n_graphs"])  # mean over the ego-nets of a graph
        return self.mlp(g)


def spen_batcher(graphs: list[nx.Graph], k: int | None):
    """idx -> batch dict (built once per distinct index tuple and cached)."""
    cache: dict = {}

    def batch(idx):
        key = tuple(int(i) for i in idx)
        if key not in cache:
            cache[key] = build_batch([graphs[i] for i in key], k)
        return cache[key]

    return batch


def subgraph_sizes(graphs: list[nx.Graph], k: int | None) -> list[int]:
    if k is None:
        return sorted({g.number_of_nodes() for g in graphs})
    return sorted({len(s) for g in graphs for s in ego_nets(g, k)})


# ------------------------------------------------------------------------------------------------ memory accounting
def order2_elements(g: nx.Graph, k: int | None) -> int:
    """Entries of one order-2 channel: sum over ego-nets of m^2 (SPEN) or n^2 (global 2-IGN)."""
    if k is None:
        return g.number_of_nodes() ** 2
    return sum(len(s) ** 2 for s in ego_nets(g, k))


def saved_activation_bytes(model: nn.Module, batch) -> int:
    """Bytes of the tensors autograd saves for the backward pass during one forward (measured, not counted)."""
    total = [0]
    seen: set = set()

    def pack(t):
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen and t.numel() > 0:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
        out.sum().backward()
    return total[0]
