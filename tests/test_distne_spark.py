"""DistNE (distne_spark): partition, border subgraph, embedder, fusion and the Spark path against direct computations."""
import math

import networkx as nx
import numpy as np
import pytest

from reprolab.graph import distne_spark as D


def _graph(n=400, p=0.02, seed=0):
    g = nx.gnp_random_graph(n, p, seed=seed)
    return n, D.canonical_edges(np.array(list(g.edges()), dtype=np.int64), n), g


def test_balanced_partition_every_node_once_and_border_matches_networkx():
    n, E, g = _graph()
    part = D.balanced_bfs_partition(n, E, 4, seed=3)
    assert part.shape == (n,) and set(np.unique(part)) == {0, 1, 2, 3}  # every node in exactly one part
    assert np.bincount(part).max() <= math.ceil(n / 4)  # even-sized
    internal, cut, border = D.border_subgraph(E, part)
    # direct: cut edges and border nodes (neighbours across the cut) by a loop over networkx
    cut_direct = sorted((min(u, v), max(u, v)) for u, v in g.edges() if part[u] != part[v])
    border_direct = sorted(u for u in g.nodes() if any(part[v] != part[u] for v in g.neighbors(u)))
    assert sorted(map(tuple, cut.tolist())) == cut_direct
    assert border.tolist() == border_direct
    assert len(internal) + len(cut) == g.number_of_edges()


def test_recursive_partition_embeds_every_edge_once_and_splits_dims():
    n, E, _ = _graph(600, 0.015, 1)
    p = D.recursive_partition(n, E, 150, 16, max_levels=8, seed=0)
    assert len(p.levels) >= 2 and len(p.dropped) == 0
    counts = D.edge_coverage(p)
    assert len(counts) == len(E) and (counts == 1).all()
    assert D.coverage_share(p, E) == 1.0
    assert sum(p.dims) == 16
    for a, b in zip(p.levels[:-1], p.levels[1:]):  # the next level's graph is this level's border subgraph
        assert np.array_equal(b.nodes, a.border_nodes)
        assert len(b.internal) + len(b.cut) == len(a.cut)
    for lv in p.levels:
        assert np.bincount(lv.part).max() <= 150
    nb = D.recursive_partition(n, E, 150, 16, border=False, seed=0)
    assert len(nb.levels) == 1 and nb.dims == [16] and len(nb.dropped) == len(p.levels[0].cut)
    assert D.coverage_share(nb, E) == pytest.approx(1 - len(nb.dropped) / len(E))
    shallow = D.recursive_partition(n, E, 150, 16, max_levels=1, seed=0)  # depth cap: the cut is dropped, reported
    assert len(shallow.dropped) == len(p.levels[0].cut) and D.coverage_share(shallow, E) < 1.0


def test_spectral_embed_matches_dense_eigendecomposition():
    n, E, _ = _graph(300, 0.03, 2)  # > 200 nodes: the ARPACK path
    dim, T, tau = 8, 3, 2.0
    X = D.spectral_embed(n, E, dim, window=T, tau=tau, seed=0)
    A = np.zeros((n, n))
    A[E[:, 0], E[:, 1]] = A[E[:, 1], E[:, 0]] = 1.0
    s = 1 / np.sqrt(A.sum(1) + tau)
    M = s[:, None] * (A + tau / n) * s[None, :]
    lam, U = np.linalg.eigh(M)
    lam, U = lam[::-1][:dim], U[:, ::-1][:, :dim]
    f = np.clip(sum(lam ** r for r in range(1, T + 1)), 0, None)
    np.testing.assert_allclose(X @ X.T, (U * f) @ U.T, atol=1e-8)  # basis-free comparison


def test_fusion_is_concatenation_and_scores_sum_over_levels():
    n, E, _ = _graph(500, 0.02, 4)
    p = D.recursive_partition(n, E, 120, 12, seed=1)
    tasks = D.make_tasks(p, window=3, seed=0)
    res = D.run_tasks(tasks)
    Z = D.fuse(p, tasks, res)
    assert Z.shape == (n, 12)
    offs = np.concatenate([[0], np.cumsum(p.dims)])
    # direct: the score of a pair is the sum over levels of the dot products inside the part holding both nodes
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, n, (200, 2))
    loc = {}
    for t, r in zip(tasks, res):
        for i, v in enumerate(t["ids"]):
            loc[(t["level"], int(v))] = r["X"][i]
    for u, v in pairs:
        direct = sum(float(loc[(lvl, u)] @ loc[(lvl, v)]) for lvl in range(len(p.levels))
                     if (lvl, u) in loc and (lvl, v) in loc)
        assert abs(Z[u] @ Z[v] - direct) < 1e-12
    # a node absent from a level has zeros there
    for lvl, lv in enumerate(p.levels):
        absent = np.setdiff1d(np.arange(n), lv.nodes)
        assert not Z[absent, offs[lvl]:offs[lvl + 1]].any()


def test_link_auc_matches_sklearn_and_split_is_clean():
    from sklearn.metrics import roc_auc_score

    n, E, _ = _graph(300, 0.04, 5)
    tr, pos, neg = D.split_edges(E, n, 0.1, seed=0)
    keys = lambda e: set((e[:, 0] * n + e[:, 1]).tolist())  # noqa: E731
    assert keys(tr).isdisjoint(keys(pos)) and len(tr) + len(pos) == len(E)
    assert keys(neg).isdisjoint(keys(E)) and len(neg) == len(pos)
    deg_full = np.bincount(E.ravel(), minlength=n)
    deg_tr = np.bincount(tr.ravel(), minlength=n)
    assert (deg_tr[deg_full > 0] >= 1).all()
    Z = np.random.default_rng(1).standard_normal((n, 4))
    s = np.concatenate([(Z[pos[:, 0]] * Z[pos[:, 1]]).sum(1), (Z[neg[:, 0]] * Z[neg[:, 1]]).sum(1)])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert abs(D.link_auc(Z, pos, neg) - roc_auc_score(y, s)) < 1e-12
    cn = D.common_neighbours_auc(n, tr, pos, neg)
    assert 0.0 <= cn <= 1.0
    # negatives only among non-isolated nodes, never a forbidden pair
    E2 = E[(E < 250).all(1)]  # nodes 250..299 isolated
    tr2, pos2, neg2 = D.split_edges(E2, n, 0.1, seed=1, forbid=pos)
    live = np.flatnonzero(np.bincount(E2.ravel(), minlength=n))
    assert np.isin(neg2, live).all() and keys(neg2).isdisjoint(keys(pos) | keys(E2))
    # preferential attachment against sklearn on deg(u) * deg(v)
    pa = D.preferential_attachment_auc(n, tr, pos, neg)
    g = nx.Graph(list(map(tuple, tr.tolist())))
    g.add_nodes_from(range(n))
    sc = [p_ for _, _, p_ in nx.preferential_attachment(g, [tuple(e) for e in np.r_[pos, neg].tolist()])]
    assert abs(pa - roc_auc_score(y, sc)) < 1e-12


def test_border_dims_follow_graphx_subgraph_half_split():
    # GraphX subgraph(epred) keeps every vertex: ratio = |V| / (|V| + |V|) = 1/2 whatever the border's size
    assert D.border_dims(16, 10000, 3000) == (8, 8)  # int(0.5 * 16) = 8
    assert D.border_dims(15, 400, 7) == (8, 7)  # int(0.5 * 15) = 7, parts keep 8
    assert D.border_dims(8, 2500, 2400) == (4, 4)
    assert D.border_dims(3, 100, 10) == (1, 2)  # min_dim 2 for the border, parts keep >= 1
    assert D.border_dims(16, 100, 0) == (16, 0)  # no cut: no border
    n, E, _ = _graph(600, 0.015, 1)
    p = D.recursive_partition(n, E, 150, 16, max_levels=3, seed=0)
    assert p.dims == [8, 4, 4]  # 16 -> 8 + (8 -> 4 + (4: last level keeps its 4))


def _masked_direct(tasks, res, p, pairs):
    loc = {}
    for t, r in zip(tasks, res):
        for i, v in enumerate(t["ids"]):
            loc[(t["level"], int(v))] = (t["part"], r["X"][i])
    out = []
    for u, v in pairs:
        s = 0.0
        for lvl in range(len(p.levels)):
            a, b = loc.get((lvl, int(u))), loc.get((lvl, int(v)))
            if a is not None and b is not None and a[0] == b[0]:
                s += float(a[1] @ b[1])
        out.append(s)
    return np.array(out)


def test_masked_score_is_a_loop_over_same_part_levels_and_basis_independent():
    n, E, _ = _graph(500, 0.02, 4)
    p = D.recursive_partition(n, E, 120, 12, seed=1)
    tasks = D.make_tasks(p, window=3, seed=0)
    res = D.run_tasks(tasks)
    Z = D.fuse(p, tasks, res)
    pairs = np.random.default_rng(0).integers(0, n, (400, 2))
    s = D.pair_scores(Z, pairs, p)
    np.testing.assert_allclose(s, _masked_direct(tasks, res, p, pairs), atol=1e-12)
    # flip the signs of random eigenvectors of random parts: the masked score must not move, the plain dot must
    rng = np.random.default_rng(3)
    res2 = []
    for r in res:
        X = r["X"].copy()
        X[:, rng.random(X.shape[1]) < 0.5] *= -1.0
        res2.append({**r, "X": X})
    Z2 = D.fuse(p, tasks, res2)
    np.testing.assert_allclose(D.pair_scores(Z2, pairs, p), s, atol=1e-12)
    assert np.abs(D.pair_scores(Z2, pairs) - D.pair_scores(Z, pairs)).max() > 1e-3  # unmasked: basis-dependent
    tr, pos, neg = D.split_edges(E, n, 0.1, seed=0)
    assert D.link_auc(Z2, pos, neg, p) == D.link_auc(Z, pos, neg, p)
    # no-border arm: a pair across level-0 parts scores exactly 0
    nb = D.recursive_partition(n, E, 120, 12, border=False, seed=1)
    tn = D.make_tasks(nb, window=3, seed=0)
    Zn = D.fuse(nb, tn, D.run_tasks(tn))
    po = nb.levels[0].part_of(n)
    across = pairs[po[pairs[:, 0]] != po[pairs[:, 1]]]
    assert len(across) and not D.pair_scores(Zn, across, nb).any()


def test_metis_partitioner_every_node_once():
    n, E, _ = _graph(400, 0.02, 8)
    part = D.metis_partition(n, E, 4)
    assert part.shape == (n,) and set(np.unique(part)) == {0, 1, 2, 3}
    assert np.array_equal(part, D.metis_partition(n, E, 4))  # deterministic
    bfs = D.balanced_bfs_partition(n, E, 4, seed=0)
    cut = lambda q: int((q[E[:, 0]] != q[E[:, 1]]).sum())  # noqa: E731
    assert cut(part) < cut(bfs)  # a min-cut partitioner cuts fewer edges than BFS growth
    p = D.recursive_partition(n, E, 100, 16, partitioner="metis", max_levels=8, seed=0)
    assert (D.edge_coverage(p) == 1).all() or len(p.dropped) > 0


def test_spark_path_equals_in_process_path():
    n, E, _ = _graph(260, 0.03, 6)
    Z0, p0, _ = D.distne_embed(n, E, part_nodes=70, dim=8, window=3, seed=0)
    nb = 9000  # a 9000 x 16 float64 result (> 1 MiB): Spark fetches it through the block manager
    Eb = D.canonical_edges(np.random.default_rng(7).integers(0, nb, (20000, 2)), nb)
    Xb0, _ = D.whole_embed(nb, Eb, dim=16, window=3, seed=0)
    from reprolab.distributed.spark import spark_session

    spark = spark_session("local[2]", "test_distne")
    try:
        Z1, p1, cost = D.distne_embed(n, E, part_nodes=70, dim=8, window=3, seed=0, sc=spark.sparkContext)
        Xb1, _ = D.whole_embed(nb, Eb, dim=16, window=3, seed=0, sc=spark.sparkContext)
    finally:
        spark.stop()
    assert cost["tasks"] >= 4
    assert p0.dims == p1.dims
    assert np.abs(Z0 - Z1).max() <= 1e-12
    assert np.abs(Xb0 - Xb1).max() <= 1e-12
