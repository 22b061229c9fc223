"""Synthetic graphs with ground-truth motifs, for explainer benchmarks.

``ba_shapes`` is GNNExplainer's BA-Shapes (Ying et al., NeurIPS 2019, arXiv:1903.03894) built exactly as the pinned
DGL's ``dgl.data.BAShapeDataset.process`` builds it (``dgl/data/synthetic.py``; the test suite checks that the two
graphs are the same): a Barabasi-Albert base graph (``networkx.barabasi_albert_graph(n_base, m, seed)``),
``n_houses`` five-node "house" motifs, house ``h`` attached by one edge from its first node to base node
``h * floor(n_base / n_houses)``, then ``int(noise_frac * E)`` random non-self-loop edges not already present (``E``:
the directed edge count so far; ``np.random.seed(seed)`` then ``randint`` pairs, as DGL does). DGL returns a directed
graph (one direction per edge) renumbered by reverse Cuthill-McKee and without the house ids; here the graph is made
undirected (both directions) and the node ids are kept, so that each node's house is known. Labels are DGL's roles:
0 = base, 1 = house middle, 2 = house bottom, 3 = house top (the roof). Features are constant (ones), so a GNN can
only classify a node from the structure around it, and an explanation of a house node should point at the other
nodes (and edges) of its house.
"""
from __future__ import annotations

import math
import os

import networkx as nx
import numpy as np
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")

from .graphdata import NodeData, graph_from_edges  # noqa: E402

# house on local ids 0..4 (DGL's BAShapeDataset): 0-1 the middle (ceiling), 1-2 and 3-0 the walls, 2-3 the floor,
# 4 the roof top joined to 0 and 1; node 0 is attached to the base graph
HOUSE_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 0), (4, 1))
HOUSE_ROLES = (1, 1, 2, 2, 3)


def ba_shapes_directed(n_base: int = 300, n_houses: int = 80, m: int = 5, noise_frac: float = 0.01,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(src, dst, labels, motif, n): DGL's BA-Shapes edge list before its renumbering (one direction per edge)."""
    base = nx.barabasi_albert_graph(n_base, m, seed)
    src = [u for u, v in base.edges()]
    dst = [v for u, v in base.edges()]
    n = n_base
    labels = [0] * n_base
    motif = [-1] * n_base
    spacing = math.floor(n_base / n_houses)
    for h in range(n_houses):
        src += [n + a for a, b in HOUSE_EDGES]
        dst += [n + b for a, b in HOUSE_EDGES]
        labels += list(HOUSE_ROLES)
        motif += [h] * 5
        src.append(n)  # the house's node 0 joins the base graph
        dst.append(int(h * spacing))
        n += 5
    present = set(zip(src, dst))
    n_noise = int(len(src) * noise_frac)
    rs = np.random.RandomState(seed)  # the stream of DGL's np.random.seed(seed); np.random.randint(0, n)
    for _ in range(n_noise):
        while True:
            u, v = int(rs.randint(0, n)), int(rs.randint(0, n))
            if (u, v) not in present and u != v:
                break
        present.add((u, v))
        src.append(u)
        dst.append(v)
    return np.array(src), np.array(dst), np.array(labels), np.array(motif), n


def ba_shapes(n_base: int = 300, n_houses: int = 80, m: int = 5, noise_frac: float = 0.01, d: int = 10,
              seed: int = 0) -> NodeData:
    """BA-Shapes (DGL's construction, undirected, node ids kept). Node ids: base 0..n_base-1, then house h on
    n_base + 5h .. n_base + 5h + 4.

    ``info``: ``motif`` (N,) house index or -1 for base nodes, ``gt_edge`` (E,) bool, True for the 6 edges inside each
    house (both directions), and the generator's parameters.
    """
    src, dst, labels, motif, n = ba_shapes_directed(n_base, n_houses, m, noise_frac, seed)
    g = graph_from_edges(src, dst, n)
    u, v = g.edges()
    motif_t = torch.from_numpy(motif)
    mu, mv = motif_t[u], motif_t[v]
    gt_edge = (mu >= 0) & (mu == mv)
    info = dict(generator="ba_shapes (dgl.data.BAShapeDataset construction)", n_base=n_base, n_houses=n_houses, m=m,
                noise_frac=noise_frac, d=d, seed=seed, edges=g.num_edges() // 2, motif=motif_t, gt_edge=gt_edge)
    return NodeData("ba_shapes", g, torch.ones(n, d), torch.from_numpy(labels), torch.zeros(n, dtype=torch.int64), info)
