"""DistNE: Large-Scale Network Embedding in Apache Spark (Wenqing Lin, KDD 2021), https://arxiv.org/abs/2106.10620.

No official code is public. The method here follows the paper's description (abstract, Fig. 1, section titles) and the
one public re-implementation written from the paper (lunaticfoxy/NetworkEmbedding, Scala/GraphX, commit 40c9938:
``src/main/scala/com/alp/struct/NetworkEmbedding.scala`` ``randomPartitioning`` lines 32-79, ``mergePartitionedVector``
lines 94-117), in three phases:

1. **Recursive partition** (driver). A worker holds at most ``part_nodes`` nodes. Level 0: the graph is split into
   k = ceil(n / part_nodes) even-sized parts (``partitioner="bfs"``: balanced multi-source BFS growth, one node per
   part per round, so the parts grow side by side as in the GraphX Pregel label growth of NetworkEmbedding.scala:40-66;
   ``partitioner="metis"``: METIS, a min-cut partitioner, as a sensitivity check). The edges across parts form the
   **border subgraph** G_B (the cut edges and their endpoints, the border nodes). G_B is partitioned again the same
   way (level 1), its own cut edges form the next border subgraph, and so on until a border subgraph fits one worker:
   then it is one part.
   Every edge of G lies inside exactly one part of exactly one level (``coverage_share``), unless the depth cap or the
   dimension budget stops the recursion first: the last level's cut edges are then dropped and reported.
2. **Parallel embedding**: every part of every level is one Spark task (``sc.parallelize(tasks, len(tasks))``); the
   per-part embedder runs inside the task. Level l gets ``dims[l]`` dimensions: the border subgraph takes the share
   |V_B| / (|V_l| + |V_B|) of the level's dimensions (NetworkEmbedding.scala:71-72) where |V_B| is the vertex count of
   the GraphX ``subgraph(epred=...)`` (line 68-69), which keeps EVERY vertex of the level: |V_B| = |V_l|, so the border
   gets half of the level's dimensions (``border_dims``), the parts the other half.
3. **Fusion at linear cost**: a node's embedding is the concatenation of its vectors at every level (zeros at the
   levels where it is not a border node; NetworkEmbedding.scala:104-112 zero-pads and sums), plus the part id of every
   level. Parts are embedded independently into the same columns, so the coordinates of two different parts live in
   unrelated bases (any eigenvector's sign, any rotation inside a repeated eigenvalue): a raw dot product across
   parts carries no information, only an accident of the basis. The score of a pair is therefore the MASKED
   dot product (``pair_scores``): the sum over levels of the dot products of the level's vectors, counted only at the
   levels where both nodes lie in the same part. It is invariant to any orthogonal change of basis inside any part
   (tested with sign flips), and still linear in the number of levels. The whole-graph arm is one part: plain dot.

The per-part embedder is a matrix-factorisation embedding (the paper's section 3 covers random-walk and MF methods):
the top ``dim`` eigenpairs of the regularised normalised adjacency A_tau = (D + tau)^-1/2 (A + tau/n 11^T)
(D + tau)^-1/2 (regularised spectral embedding, Qin & Rohe 2013: tiny components do not crowd the top of the spectrum),
each eigenvector scaled by sqrt(sum_{r=1..T} lambda^r) so that X X^T approximates the T-step proximity
sum_r A_tau^r (the NetMF view of DeepWalk with window T, without the log). Deterministic: ARPACK with a seeded start;
each eigenvector's sign is fixed (largest-magnitude entry positive) only as a reproducible tie-break: under masked
scoring both nodes of a scored pair flip together, so the sign cannot change any score.

Baselines: the same embedder on the whole graph (one task), partitioning WITHOUT border subgraphs (level 0 only, all
dimensions, cut edges dropped, same fusion and masked scoring), and the degree-only heuristics preferential attachment
(deg(u) deg(v)) and common neighbours.
"""
from __future__ import annotations

import math
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh


# ----------------------------------------------------------------------------------------------- graph utilities
def canonical_edges(edges: np.ndarray, n: int) -> np.ndarray:
    """(m, 2) int64, u < v, unique, sorted, no self loops."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    a, b = np.minimum(e[:, 0], e[:, 1]), np.maximum(e[:, 0], e[:, 1])
    key = np.unique(a * n + b)
    return np.stack([key // n, key % n], 1)


def adjacency(n: int, edges: np.ndarray) -> sp.csr_matrix:
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    r = np.concatenate([e[:, 0], e[:, 1]])
    c = np.concatenate([e[:, 1], e[:, 0]])
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n))


def split_edges(edges: np.ndarray, n: int, test_frac: float, seed: int, *, nodes: np.ndarray | None = None,
                forbid: np.ndarray | None = None):
    """Hold out ``test_frac`` of the edges (each endpoint keeps >= 1 training edge) and as many non-edges, drawn
    uniformly among ``nodes`` (default: the non-isolated nodes of ``edges``; an isolated node has no held-out edge, so a
    negative on it would be a free point for any degree signal) and avoiding the pairs in ``forbid``.

    Returns (train_edges, test_pos, test_neg), all (m, 2) int64 with u < v.
    """
    rng = np.random.default_rng(seed)
    edges = canonical_edges(edges, n)
    deg = np.bincount(edges.ravel(), minlength=n)
    want = int(round(test_frac * len(edges)))
    test = np.zeros(len(edges), dtype=bool)
    for i in rng.permutation(len(edges)):
        if test.sum() >= want:
            break
        u, v = edges[i]
        if deg[u] > 1 and deg[v] > 1:
            test[i] = True
            deg[u] -= 1
            deg[v] -= 1
    if nodes is None:
        nodes = np.flatnonzero(np.bincount(edges.ravel(), minlength=n))
    nodes = np.asarray(nodes, dtype=np.int64)
    existing = set((edges[:, 0] * n + edges[:, 1]).tolist())
    if forbid is not None and len(forbid):
        f = canonical_edges(forbid, n)
        existing |= set((f[:, 0] * n + f[:, 1]).tolist())
    neg: list[tuple[int, int]] = []
    while len(neg) < int(test.sum()):
        u, v = (int(nodes[x]) for x in rng.integers(0, len(nodes), 2))
        a, b = min(u, v), max(u, v)
        if a != b and a * n + b not in existing:
            existing.add(a * n + b)
            neg.append((a, b))
    return edges[~test], edges[test], np.asarray(neg, dtype=np.int64).reshape(-1, 2)


# ------------------------------------------------------------------------------------------ phase 1: partition
def balanced_bfs_partition(n: int, edges: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Even-sized parts grown side by side: k random seeds, then, round by round, each part not yet full
    (``ceil(n / k)`` nodes) takes the next unassigned node of its BFS queue (or a random unassigned node when its
    queue is empty). Returns part[v] in 0..k-1."""
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    A = adjacency(n, edges)
    indptr, indices = A.indptr, A.indices
    cap = math.ceil(n / k)
    order = np.random.default_rng(seed).permutation(n)
    ptr = 0  # next candidate in `order` for a fresh seed
    part = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    queues = [deque() for _ in range(k)]
    left = n
    while left:
        for p in range(k):
            if sizes[p] >= cap or not left:
                continue
            node = -1
            q = queues[p]
            while q:
                c = q.popleft()
                if part[c] < 0:
                    node = c
                    break
            if node < 0:
                while part[order[ptr]] >= 0:
                    ptr += 1
                node = int(order[ptr])
            part[node] = p
            sizes[p] += 1
            left -= 1
            nb = indices[indptr[node]:indptr[node + 1]]
            q.extend(nb[part[nb] < 0].tolist())
    return part


def metis_partition(n: int, edges: np.ndarray, k: int, seed: int = 0, tries: int = 20) -> np.ndarray:
    """METIS (``reprolab.graph.tt_embedding.metis_parts``: the lowest-cut of ``tries`` DGL METIS calls, deterministic)
    into k parts; a min-cut sensitivity check for the BFS growth (``seed`` unused: METIS is seeded internally)."""
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    import dgl
    import torch

    from .tt_embedding import metis_parts

    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    g = dgl.graph((torch.from_numpy(np.r_[e[:, 0], e[:, 1]]), torch.from_numpy(np.r_[e[:, 1], e[:, 0]])), num_nodes=n)
    part = np.asarray(metis_parts(g, k, tries=tries), dtype=np.int64)
    _, first = np.unique(part, return_index=True)  # parts renumbered by first appearance (canonical ids)
    relabel = np.empty(part.max() + 1, dtype=np.int64)
    relabel[part[np.sort(first)]] = np.arange(len(first))
    return relabel[part]


PARTITIONERS = {"bfs": balanced_bfs_partition, "metis": metis_partition}


@dataclass
class Level:
    """One level of the recursion: the graph it partitions (global node ids), the parts, what each part keeps."""
    nodes: np.ndarray  # global ids of this level's graph (sorted)
    part: np.ndarray  # part of each node of `nodes`
    internal: np.ndarray  # (m_i, 2) global edges inside a part: embedded at this level
    cut: np.ndarray  # (m_c, 2) global edges across parts: the border subgraph (next level's graph)
    dim: int = 0
    k: int = 1

    @property
    def border_nodes(self) -> np.ndarray:
        return np.unique(self.cut.ravel())

    def part_of(self, n: int) -> np.ndarray:
        """part[v] for every global node v, -1 where v is not in this level's graph."""
        out = np.full(n, -1, dtype=np.int64)
        out[self.nodes] = self.part
        return out


def border_subgraph(edges: np.ndarray, part_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(internal edges, cut edges, border nodes) of a partition; ``part_of`` maps a node id to its part (array)."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    cross = part_of[e[:, 0]] != part_of[e[:, 1]]
    cut = e[cross]
    return e[~cross], cut, np.unique(cut.ravel())


def border_dims(dim: int, n_level: int, n_border: int, min_dim: int = 2) -> tuple[int, int]:
    """(dims of the level's parts, dims left for its border subgraph), NetworkEmbedding.scala:68-74: the border takes
    int(|V_B| / (|V_l| + |V_B|) * dim) with |V_B| the vertex count of GraphX ``subgraph(epred=...)``, which keeps every
    vertex of the level's graph: |V_B| = |V_l|, i.e. int(dim / 2). ``n_border`` (the endpoints of the cut edges) only
    decides whether there is a border at all."""
    if n_border == 0:
        return dim, 0
    n_graphx = n_level  # subgraph(epred) keeps all vertices (NetworkEmbedding.scala:68-69)
    d_b = int(n_graphx / (n_level + n_graphx) * dim)
    d_b = min(max(d_b, min_dim), dim - 1)
    return dim - d_b, d_b


@dataclass
class Partition:
    n: int
    levels: list[Level] = field(default_factory=list)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    @property
    def dims(self) -> list[int]:
        return [lv.dim for lv in self.levels]


def recursive_partition(n: int, edges: np.ndarray, part_nodes: int, dim: int, *, border: bool = True,
                        max_levels: int = 4, min_dim: int = 2, seed: int = 0, partitioner: str = "bfs") -> Partition:
    """DistNE's phase 1: a worker holds at most ``part_nodes`` nodes, so a level with |V_l| nodes has
    ceil(|V_l| / part_nodes) parts. ``border=False``: level 0 only (the no-border baseline), cut edges dropped."""
    edges = canonical_edges(edges, n)
    cap = int(part_nodes)
    out = Partition(n)
    nodes, E, d = np.arange(n), edges, dim
    for lvl in range(max_levels):
        kk = max(1, math.ceil(len(nodes) / cap))
        local = np.full(n, -1, dtype=np.int64)
        local[nodes] = np.arange(len(nodes))
        part = PARTITIONERS[partitioner](len(nodes), local[E], kk, seed + 1000 * lvl)
        part_of = np.full(n, -1, dtype=np.int64)
        part_of[nodes] = part
        internal, cut, bnodes = border_subgraph(E, part_of)
        d_part, d_b = border_dims(d, len(nodes), len(bnodes), min_dim)
        last = (not border) or kk == 1 or lvl == max_levels - 1 or len(cut) == 0 or d_b < 1
        if last:  # the cut edges of the last level are dropped (none when the level fits one worker)
            out.levels.append(Level(nodes, part, internal, cut, d, kk))
            out.dropped = cut
            break
        out.levels.append(Level(nodes, part, internal, cut, d_part, kk))
        nodes, E, d = bnodes, cut, d_b
    return out


def edge_coverage(p: Partition) -> np.ndarray:
    """How many parts (over all levels) embed each edge of the original graph, as counts over the union of edges
    (the dropped cut edges of the last level count as a second copy, so that any drop or duplicate shows)."""
    all_e = np.concatenate([lv.internal for lv in p.levels] + [p.dropped])
    return np.unique(all_e[:, 0] * p.n + all_e[:, 1], return_counts=True)[1]


def coverage_share(p: Partition, edges: np.ndarray) -> float:
    """Share of ``edges`` that lie inside exactly one part of one level with at least one dimension (none dropped)."""
    keys = [lv.internal[:, 0] * p.n + lv.internal[:, 1] for lv in p.levels if lv.dim > 0]
    k, c = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
    e = canonical_edges(edges, p.n)
    once = set(k[c == 1].tolist())
    return float(sum(int(x) in once for x in (e[:, 0] * p.n + e[:, 1])) / max(len(e), 1))


def edge_kind_auc(Z: np.ndarray, pos: np.ndarray, neg: np.ndarray, part: np.ndarray,
                  p: "Partition | None" = None) -> dict:
    """AUC of the held-out edges inside one level-0 part and across parts (``part``: the level-0 part of every node),
    each against all the non-edges; scores masked by ``p`` (None: plain dot product, the whole-graph arm)."""
    same = part[pos[:, 0]] == part[pos[:, 1]]
    return {"inside_parts": link_auc(Z, pos[same], neg, p) if same.any() else float("nan"),
            "across_parts": link_auc(Z, pos[~same], neg, p) if (~same).any() else float("nan"),
            "share_across": float((~same).mean())}


# ------------------------------------------------------------------------------------ phase 2: embed (one task a part)
def spectral_embed(n: int, edges: np.ndarray, dim: int, *, window: int = 3, tau: float | None = None,
                   seed: int = 0) -> np.ndarray:
    """(n, dim) MF embedding of one (sub)graph in local ids: X = U sqrt(sum_{r<=T} Lambda^r) of the regularised
    normalised adjacency's top eigenpairs (see the module docstring). Isolated nodes: the regulariser alone."""
    X = np.zeros((n, dim))
    if dim == 0 or n < 2:
        return X
    A = adjacency(n, edges)
    deg = np.asarray(A.sum(1)).ravel()
    if tau is None:
        tau = max(float(deg.mean()), 1e-3)
    s = 1.0 / np.sqrt(deg + tau)

    def mv(x):
        x = np.asarray(x).reshape(n, -1)
        y = s[:, None] * x
        return s[:, None] * (A @ y + (tau / n) * y.sum(0, keepdims=True))

    kk = min(dim, n - 1)
    if n <= max(200, 4 * dim):
        M = mv(np.eye(n))
        lam, U = np.linalg.eigh((M + M.T) / 2)
        lam, U = lam[::-1][:kk], U[:, ::-1][:, :kk]
    else:
        op = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        lam, U = eigsh(op, k=kk, which="LA", v0=v0, tol=1e-9)
        o = np.argsort(-lam)
        lam, U = lam[o], U[:, o]
    f = np.clip(sum(lam ** r for r in range(1, window + 1)), 0.0, None)
    # a fixed sign per eigenvector, only a reproducible tie-break: masked scores (pair_scores) cannot depend on it
    U = U * np.where(U[np.abs(U).argmax(0), np.arange(kk)] < 0, -1.0, 1.0)
    X[:, :kk] = U * np.sqrt(f)
    return X


def embed_task(task: dict) -> dict:
    """Run inside a Spark task (or in-process): the embedding of one part, with its peak traced memory and time."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        tracemalloc.start()
        t0 = time.perf_counter()
        X = spectral_embed(task["n"], task["edges"], task["dim"], window=task["window"], tau=task.get("tau"),
                           seed=task["seed"])
        sec = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"level": task["level"], "part": task["part"], "X": X, "peak_bytes": int(peak), "seconds": sec}


def make_tasks(p: Partition, *, window: int = 3, tau: float | None = None, seed: int = 0) -> list[dict]:
    """One task per part of every level: the part's nodes (global ids), its internal edges in local ids, its dims."""
    tasks = []
    for lvl, lv in enumerate(p.levels):
        part_of = np.full(p.n, -1, dtype=np.int64)
        part_of[lv.nodes] = lv.part
        e_part = part_of[lv.internal[:, 0]] if len(lv.internal) else np.zeros(0, dtype=np.int64)
        for q in range(lv.k):
            ids = lv.nodes[lv.part == q]
            local = np.full(p.n, -1, dtype=np.int64)
            local[ids] = np.arange(len(ids))
            e = lv.internal[e_part == q]
            tasks.append({"level": lvl, "part": q, "ids": ids, "n": len(ids), "edges": local[e], "dim": lv.dim,
                          "window": window, "tau": tau, "seed": seed + 7919 * lvl + q})
    return tasks


def _strip(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != "ids"}  # the node ids stay on the driver


def run_tasks(tasks: list[dict], sc=None) -> list[dict]:
    """Embed every part: one Spark task each (``sc`` a SparkContext), or in this process (``sc=None``)."""
    payload = [_strip(t) for t in tasks]
    if sc is None:
        return [embed_task(t) for t in payload]
    return sc.parallelize(payload, max(1, len(payload))).map(embed_task).collect()


# ----------------------------------------------------------------------------------------------- phase 3: fuse
def fuse(p: Partition, tasks: list[dict], results: list[dict]) -> np.ndarray:
    """Concatenate every level's vectors (zeros where a node is absent from a level): (n, sum(dims)), linear cost."""
    offs = np.concatenate([[0], np.cumsum(p.dims)])
    Z = np.zeros((p.n, int(offs[-1])))
    by_key = {(r["level"], r["part"]): r["X"] for r in results}
    for t in tasks:
        lvl = t["level"]
        Z[t["ids"], offs[lvl]:offs[lvl + 1]] = by_key[(lvl, t["part"])]
    return Z


def pair_scores(Z: np.ndarray, pairs: np.ndarray, p: "Partition | None" = None) -> np.ndarray:
    """Score of each pair. ``p`` None: the plain dot product (one part, the whole-graph arm). Otherwise the masked dot
    product: sum over levels l of <Z_u^l, Z_v^l>, counted only where u and v lie in the same part of level l (the only
    levels where their coordinates share a basis); linear in the number of levels."""
    e = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if p is None:
        return np.einsum("ij,ij->i", Z[e[:, 0]], Z[e[:, 1]])
    offs = np.concatenate([[0], np.cumsum(p.dims)]).astype(int)
    s = np.zeros(len(e))
    for lvl, lv in enumerate(p.levels):
        po = lv.part_of(p.n)
        same = (po[e[:, 0]] == po[e[:, 1]]) & (po[e[:, 0]] >= 0)
        a, b = offs[lvl], offs[lvl + 1]
        s += np.where(same, np.einsum("ij,ij->i", Z[e[:, 0], a:b], Z[e[:, 1], a:b]), 0.0)
    return s


def auc_of_scores(sp_: np.ndarray, sn: np.ndarray) -> float:
    """ROC AUC, positives against negatives (Mann-Whitney, ties count one half)."""
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([sp_, sn]))
    n1, n0 = len(sp_), len(sn)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def link_auc(Z: np.ndarray, pos: np.ndarray, neg: np.ndarray, p: "Partition | None" = None) -> float:
    """ROC AUC of the pair scores (``pair_scores``: masked by ``p`` for a partitioned arm), held-out edges against
    non-edges."""
    return auc_of_scores(pair_scores(Z, pos, p), pair_scores(Z, neg, p))


def preferential_attachment_auc(n: int, train: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """The degree-only reference: score deg(u) * deg(v) in the training graph."""
    deg = np.bincount(np.asarray(train, dtype=np.int64).ravel(), minlength=n).astype(float)
    return auc_of_scores(deg[pos[:, 0]] * deg[pos[:, 1]], deg[neg[:, 0]] * deg[neg[:, 1]])


def common_neighbours_auc(n: int, train: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """The trivial heuristic reference: number of common neighbours in the training graph."""
    A = adjacency(n, train)
    A.data[:] = 1.0

    def cn(e):
        return np.asarray(A[e[:, 0]].multiply(A[e[:, 1]]).sum(1)).ravel()

    return auc_of_scores(cn(pos), cn(neg))


def distne_embed(n: int, train: np.ndarray, *, part_nodes: int, dim: int, border: bool = True, max_levels: int = 4,
                 window: int = 3, tau: float | None = None, seed: int = 0, sc=None,
                 partitioner: str = "bfs") -> tuple[np.ndarray, Partition, dict]:
    """The three phases; returns (fused embedding, partition, cost dict: seconds per phase, peak task memory).
    Score pairs with ``pair_scores(Z, pairs, partition)`` / ``link_auc(Z, pos, neg, partition)`` (masked)."""
    t0 = time.perf_counter()
    p = recursive_partition(n, train, part_nodes, dim, border=border, max_levels=max_levels, seed=seed,
                            partitioner=partitioner)
    tasks = make_tasks(p, window=window, tau=tau, seed=seed)
    t1 = time.perf_counter()
    res = run_tasks(tasks, sc)
    t2 = time.perf_counter()
    Z = fuse(p, tasks, res)
    t3 = time.perf_counter()
    cost = {"partition_s": t1 - t0, "embed_s": t2 - t1, "fuse_s": t3 - t2, "total_s": t3 - t0,
            "peak_task_bytes": max(r["peak_bytes"] for r in res), "tasks": len(tasks),
            "task_seconds": [r["seconds"] for r in res]}
    return Z, p, cost


def whole_embed(n: int, train: np.ndarray, *, dim: int, window: int = 3, tau: float | None = None, seed: int = 0,
                sc=None) -> tuple[np.ndarray, dict]:
    """The reference: the same embedder on the whole training graph, all ``dim`` dimensions, as one task."""
    t0 = time.perf_counter()
    task = {"level": 0, "part": 0, "ids": np.arange(n), "n": n, "edges": canonical_edges(train, n), "dim": dim,
            "window": window, "tau": tau, "seed": seed}
    r = run_tasks([task], sc)[0]
    return r["X"], {"total_s": time.perf_counter() - t0, "peak_task_bytes": r["peak_bytes"], "tasks": 1}


def partition_stats(p: Partition, m_train: int) -> dict:
    """Sizes of every level (nodes, parts, dims, internal / cut edges) and the level-0 cut fraction."""
    return {"levels": [{"nodes": int(len(lv.nodes)), "parts": int(lv.k), "dim": int(lv.dim),
                        "internal_edges": int(len(lv.internal)), "cut_edges": int(len(lv.cut)),
                        "max_part_nodes": int(np.bincount(lv.part).max())} for lv in p.levels],
            "cut_fraction_level0": float(len(p.levels[0].cut) / max(m_train, 1)),
            "dropped_fraction": float(len(p.dropped) / max(m_train, 1))}


def load_edges(dataset: str, seed: int, **gen) -> tuple[int, np.ndarray, dict]:
    """(n, canonical edges, info) of a graph of reprolab.graph.datasets (``powerlaw`` generator or an online loader)."""
    from .datasets import load_graph

    d = load_graph(dataset, seed=seed, **(gen if dataset == "powerlaw" else {}))
    src, dst = d.graph.edges()
    n = d.graph.num_nodes()
    return n, canonical_edges(np.stack([src.numpy(), dst.numpy()], 1), n), dict(d.info)
