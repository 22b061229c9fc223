"""A citation-graph generator calibrated to Cora's published statistics (offline stand-in for Cora / CiteSeer).

Cora is not available offline (see ENVIRONMENT.md); the real graph stays selectable online through
``reprolab.graph.datasets.load_graph("cora")``. This generator reproduces the *structure* that matters for subgraph
federated learning on citation graphs, each knob set from a published statistic of Cora, never from a result:

* **classes** (7) with Cora's class sizes (351, 217, 418, 818, 426, 298, 180 of 2,708 papers);
* **sub-topic communities** nested in the classes (``community_size`` papers each; Louvain finds about 100 communities
  in Cora, modularity about 0.8);
* **degree-corrected edges**: node weights ~ Pareto(``gamma``) so degrees are heavy tailed (Cora: mean degree 3.9,
  max 168); an edge stays in its source's community with probability ``p_comm``, else in its class with ``p_class``,
  else goes to another class (edge homophily = p_comm + p_class, Cora 0.81);
* **triadic closure**: a fraction ``closure`` of the edges closes a triangle (a random pair of neighbours of a random
  node), which gives citation graphs their clustering (Cora: average clustering coefficient 0.24);
* **bag-of-words features**: ``d`` (1,433) binary words, about ``words_per_node`` (18.2 in Cora) per paper, drawn from
  the paper's community vocabulary (``f_comm``), its class vocabulary (``f_class``) or Zipf-popular common words (the
  rest). Sub-topic communities therefore use *sparse, community-specific vocabularies*, as real sub-fields do.

:func:`graph_stats` measures the same statistics on any graph, so the notebook prints them beside Cora's.
"""
from __future__ import annotations

import os

import numpy as np
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")

from .graphdata import NodeData, graph_from_edges  # noqa: E402

# Published statistics of Cora (Sen et al. 2008; McCallum et al. 2000), as used to calibrate the generator.
CORA_CLASS_SIZES = (351, 217, 418, 818, 426, 298, 180)
CORA_STATS = {"nodes": 2708, "edges": 5278, "classes": 7, "features": 1433, "mean_degree": 3.90, "max_degree": 168,
              "edge_homophily": 0.81, "avg_clustering": 0.24, "louvain_modularity": 0.80, "words_per_node": 18.2,
              "feature_density": 0.0127}


def citation_like(n: int = 2708, d: int = 1433, class_sizes=CORA_CLASS_SIZES, community_size: int = 40,
                  mean_degree: float = 3.9, gamma: float = 2.5, p_comm: float = 0.72, p_class: float = 0.15,
                  closure: float = 0.12, words_per_node: float = 18.2, f_comm: float = 0.35, f_class: float = 0.3,
                  comm_vocab: int = 8, class_vocab: int = 60, max_weight: float = 150.0, seed: int = 0) -> NodeData:
    """A Cora-like citation graph (see the module docstring); ``info`` holds the parameters and the community ids."""
    if not (0 <= p_comm and 0 <= p_class and p_comm + p_class <= 1):
        raise ValueError(f"p_comm={p_comm}, p_class={p_class}: need both >= 0 and a sum <= 1")
    if not 0 <= closure < 1 or gamma <= 1 or f_comm + f_class > 1:
        raise ValueError(f"closure={closure} in [0, 1), gamma={gamma} > 1, f_comm + f_class <= 1 required")
    rng = np.random.default_rng(seed)
    sizes = np.asarray(class_sizes, dtype=np.float64)
    counts = np.floor(sizes / sizes.sum() * n).astype(int)
    counts[np.argmax(counts)] += n - counts.sum()
    y = np.repeat(np.arange(len(counts)), counts)
    # sub-topic communities inside each class
    comm = np.empty(n, dtype=np.int64)
    comm_class, c0 = [], 0
    for k, cnt in enumerate(counts):
        n_c = max(1, int(round(cnt / community_size)))
        idx = np.flatnonzero(y == k)
        comm[idx] = c0 + rng.integers(0, n_c, cnt)
        comm_class += [k] * n_c
        c0 += n_c
    n_comm = c0
    comm_class = np.asarray(comm_class)
    theta = np.minimum((1.0 - rng.random(n)) ** (-1.0 / (gamma - 1.0)), max_weight)  # Pareto weights, capped

    def pick(members: np.ndarray, k: int) -> np.ndarray:
        w = theta[members]
        return members[rng.choice(len(members), size=k, p=w / w.sum())]

    by_comm = [np.flatnonzero(comm == c) for c in range(n_comm)]
    by_class = [np.flatnonzero(y == k) for k in range(len(counts))]
    m_total = int(round(n * mean_degree / 2))
    m_sbm = int(round(m_total * (1 - closure)))
    src = pick(np.arange(n), m_sbm)
    u = rng.random(m_sbm)
    dst = np.empty(m_sbm, dtype=np.int64)
    for i, s in enumerate(src):
        if u[i] < p_comm:
            pool = by_comm[comm[s]]
        elif u[i] < p_comm + p_class:
            pool = by_class[y[s]]
        else:
            other = (y[s] + rng.integers(1, len(counts))) % len(counts)
            pool = by_class[other]
        dst[i] = pick(pool, 1)[0]
    # every paper cites or is cited at least once (Cora has no isolated node): attach isolated ones in their community
    deg = np.bincount(np.concatenate([src, dst]), minlength=n) - 2 * np.bincount(src[src == dst], minlength=n)
    iso = np.flatnonzero(deg == 0)
    src = np.concatenate([src, iso])
    dst = np.concatenate([dst, [pick(by_comm[comm[i]], 1)[0] for i in iso]]).astype(np.int64)
    # triadic closure: connect two neighbours of a node (closes a triangle)
    adj = [set() for _ in range(n)]
    for a, b in zip(src, dst):
        if a != b:
            adj[a].add(b)
            adj[b].add(a)
    extra = m_total - sum(len(s) for s in adj) // 2
    tries = 0
    while extra > 0 and tries < 50 * m_total:
        tries += 1
        v = pick(np.arange(n), 1)[0]
        if len(adj[v]) < 2:
            continue
        a, b = rng.choice(sorted(adj[v]), 2, replace=False)
        if b in adj[a]:
            continue
        adj[a].add(b)
        adj[b].add(a)
        extra -= 1
    pairs = np.array([(a, b) for a in range(n) for b in adj[a] if a < b], dtype=np.int64)
    g = graph_from_edges(pairs[:, 0], pairs[:, 1], n)
    # bag of words
    perm = rng.permutation(d)
    n_class_words = class_vocab * len(counts)
    n_comm_words = min(comm_vocab * n_comm, d - n_class_words - 50)
    class_words = perm[:n_class_words].reshape(len(counts), class_vocab)
    comm_pool = perm[n_class_words:n_class_words + n_comm_words]
    comm_words = [rng.choice(comm_pool, comm_vocab, replace=False) for _ in range(n_comm)]
    common = perm[n_class_words + n_comm_words:]
    zipf = 1.0 / np.arange(1, len(common) + 1)
    zipf /= zipf.sum()
    X = np.zeros((n, d), dtype=np.float32)
    n_words = np.clip(rng.poisson(words_per_node, n), 1, None)
    for i in range(n):
        k = n_words[i]
        src_kind = rng.choice(3, size=k, p=[f_comm, f_class, 1 - f_comm - f_class])
        k_comm, k_class = min(int((src_kind == 0).sum()), comm_vocab), int((src_kind == 1).sum())
        k_common = k - k_comm - k_class  # distinct words: a community's vocabulary caps its share
        w = np.concatenate([rng.choice(comm_words[comm[i]], k_comm, replace=False),
                            rng.choice(class_words[y[i]], min(k_class, class_vocab), replace=False),
                            rng.choice(common, min(k_common, len(common)), replace=False, p=zipf)]).astype(np.int64)
        X[i, w] = 1.0
    info = dict(generator="citation_like", n=n, d=d, community_size=community_size, communities=n_comm,
                mean_degree=mean_degree, gamma=gamma, p_comm=p_comm, p_class=p_class, closure=closure,
                words_per_node=words_per_node, f_comm=f_comm, f_class=f_class, comm_vocab=comm_vocab,
                class_vocab=class_vocab, max_weight=max_weight, seed=seed, community=comm, community_class=comm_class)
    return NodeData("citation_like", g, torch.from_numpy(X), torch.from_numpy(y), torch.zeros(n, dtype=torch.int64),
                    info)


def graph_stats(g, y, X, seed: int = 0) -> dict:
    """The statistics of CORA_STATS measured on a graph: nodes, undirected edges, degrees, edge homophily, average
    clustering (networkx), modularity of Louvain communities (networkx, seeded), words per node, feature density."""
    import networkx as nx

    src, dst = g.edges()
    keep = src < dst
    G = nx.Graph()
    G.add_nodes_from(range(g.num_nodes()))
    G.add_edges_from(zip(src[keep].tolist(), dst[keep].tolist()))
    deg = np.array([d for _, d in G.degree()])
    yy = np.asarray(y)
    e = np.array(G.edges()) if G.number_of_edges() else np.zeros((0, 2), int)
    comms = nx.community.louvain_communities(G, seed=seed)
    Xn = np.asarray(X)
    nnz = (Xn != 0).sum(1)
    return {"nodes": int(g.num_nodes()), "edges": int(G.number_of_edges()), "classes": int(yy.max() + 1),
            "features": int(Xn.shape[1]), "mean_degree": float(deg.mean()), "max_degree": int(deg.max()),
            "edge_homophily": float((yy[e[:, 0]] == yy[e[:, 1]]).mean()),
            "avg_clustering": float(nx.average_clustering(G)),
            "louvain_modularity": float(nx.community.modularity(G, comms)),
            "words_per_node": float(nnz.mean()), "feature_density": float(nnz.mean() / Xn.shape[1])}
