"""TT GNN embeddings (arXiv 2206.10581): the TT table against its dense einsum reconstruction, the orthogonal
initialisation, and the METIS / RCM orderings."""
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph.datasets import load_graph  # noqa: E402
from reprolab.graph.tt_embedding import (TTEmbedding, metis_order, order_locality, random_order,  # noqa: E402
                                         rcm_order, tt_param_count, tt_shapes, tt_to_dense)

torch.set_num_threads(1)


@pytest.mark.parametrize("dims,rank,n", [((2, 3, 2), 3, 150), ((4, 2), 5, 37), ((2, 2, 2, 2), 2, 300)])
def test_lookup_equals_dense_einsum_reconstruction(dims, rank, n):
    torch.manual_seed(0)
    tt = TTEmbedding(n, dims, rank, init="gaussian")
    dense = tt_to_dense(list(tt.cores))  # (prod n_k, prod d_k), one einsum over all cores
    assert dense.shape == (tt.num_rows, math.prod(dims))
    idx = torch.randint(0, n, (64,))
    assert torch.allclose(tt(idx), dense[idx], atol=1e-5)


def test_row_is_product_of_core_slices_naive_loop():
    torch.manual_seed(1)
    tt = TTEmbedding(60, (2, 3), 4, init="gaussian", row_factors=[6, 10])
    i = 47  # digits (4, 7) in radix (6, 10)
    assert [int(x) for x in tt.digits(torch.tensor([i]))] == [4, 7]
    G1, G2 = tt.cores[0].detach(), tt.cores[1].detach()
    row = torch.empty(6)
    for j1 in range(2):
        for j2 in range(3):
            row[j1 * 3 + j2] = (G1[:, 4, j1, :] @ G2[:, 7, j2, :]).squeeze()
    assert torch.allclose(tt(torch.tensor([i]))[0], row, atol=1e-6)


def test_orthogonal_init_cores_are_orthonormal_and_table_is_orthogonal():
    torch.manual_seed(2)
    n_rows = 8 * 8 * 8
    tt = TTEmbedding(n_rows, (2, 2, 2), 4, init="orthogonal", row_factors=[8, 8, 8])
    gain2 = float(tt.num_rows)
    for k, G in enumerate(tt.cores):
        a, n, d, b = G.shape
        U = G.detach().reshape(a * n, d * b)
        if k == 0:
            U = U / math.sqrt(gain2)
        assert U.shape[0] >= U.shape[1]  # tall here: columns orthonormal
        assert torch.allclose(U.T @ U, torch.eye(d * b), atol=1e-5)
    E = tt_to_dense(list(tt.cores)).detach()
    assert torch.allclose(E.T @ E, gain2 * torch.eye(8), atol=1e-3 * gain2)  # E^T E = N I (mean row sq. norm = d)


def test_gaussian_init_entries_have_unit_variance():
    torch.manual_seed(3)
    tt = TTEmbedding(4000, (4, 4, 4), 8, init="gaussian")
    E = tt(torch.arange(4000)).detach()
    assert abs(float(E.var()) - 1.0) < 0.25
    assert abs(float(E.mean())) < 0.1


def test_param_count_and_shapes():
    ns, rs = tt_shapes(8000, (4, 4, 4), 8, 1.1)
    assert math.prod(ns) >= 1.1 * 8000 and rs == [1, 8, 8, 1]
    tt = TTEmbedding(8000, (4, 4, 4), 8, slack=1.1)
    assert tt.num_parameters() == tt_param_count(8000, (4, 4, 4), 8, 1.1) == sum(
        rs[k] * ns[k] * 4 * rs[k + 1] for k in range(3))
    assert 8000 * 64 / tt.num_parameters() > 50


def _graph():
    return load_graph("hsbm", seed=0, n=1200, classes=8, groups=2, d=2, mean_degree=8.0, p_in=0.8, p_mid=0.15)


def test_metis_order_is_injective_and_aligned_with_leading_digit():
    data = _graph()
    g = data.graph
    ns = [8, 13, 13]
    new_id = metis_order(g, ns)
    assert len(set(new_id.tolist())) == g.num_nodes() and int(new_id.min()) >= 0 and int(new_id.max()) < math.prod(ns)
    # independent reference: the top-level METIS call itself; most nodes sit in the block of their part
    parts = dgl.metis_partition_assignment(g, ns[0]).numpy()
    first_digit = (new_id // (ns[1] * ns[2])).numpy()
    assert (first_digit == parts).mean() > 0.9
    # graph-aware: far more edges inside a leading-digit block than with a random order
    block = ns[1] * ns[2]
    assert order_locality(g, new_id, block) > 3 * order_locality(g, random_order(g.num_nodes(), 0), block)


def test_rcm_fallback_reduces_bandwidth():
    g = _graph().graph
    src, dst = g.edges()
    bw = lambda nid: float((nid[src] - nid[dst]).abs().float().mean())  # noqa: E731
    rcm = rcm_order(g)
    assert sorted(rcm.tolist()) == list(range(g.num_nodes()))
    assert bw(rcm) < 0.7 * bw(random_order(g.num_nodes(), 0))


def test_gradients_match_dense_reconstruction():
    torch.manual_seed(4)
    tt = TTEmbedding(90, (2, 3), 3, init="orthogonal")
    idx = torch.tensor([0, 5, 5, 89])
    w = torch.randn(4, 6)
    (tt(idx) * w).sum().backward()
    g_lookup = [c.grad.clone() for c in tt.cores]
    for c in tt.cores:
        c.grad = None
    (tt_to_dense(list(tt.cores))[idx] * w).sum().backward()
    for a, c in zip(g_lookup, tt.cores):
        assert torch.allclose(a, c.grad, atol=1e-5)


def test_metis_parts_is_a_low_cut_partition():
    from reprolab.graph.tt_embedding import metis_parts

    g = _graph().graph
    part = metis_parts(g, 8, tries=3)
    assert part.min() >= 0 and part.max() < 8 and len(np.unique(part)) == 8
    src_t, dst_t = g.edges()
    src, dst = src_t.numpy().copy(), dst_t.numpy().copy()
    rand = np.random.default_rng(12345).integers(0, 8, g.num_nodes())  # not seed 0: that would be y
    assert (part[src] != part[dst]).mean() < 0.5 * (rand[src] != rand[dst]).mean()


def test_early_stopping_is_a_prefix_of_the_full_run_and_stops_at_best_plus_patience():
    """train_featureless(patience=P) must replay the first epochs of the run without stopping exactly (deterministic
    full-batch training) and stop the first epoch at which the best validation epoch is P epochs old (reference: the
    full run's curve, scanned by hand)."""
    from reprolab.graph.graphdata import stratified_split
    from reprolab.graph.tt_embedding import FeaturelessSAGE, full_embedding, train_featureless

    d = _graph()
    g = dgl.add_self_loop(dgl.remove_self_loop(d.graph))
    split = stratified_split(d.y, (0.3, 0.2, 0.5), 0)

    def run(patience):
        torch.manual_seed(0)
        m = FeaturelessSAGE(full_embedding(d.num_nodes, 8), torch.arange(d.num_nodes), 16, d.num_classes, 2, 0.0)
        return train_featureless(m, g, d.y, split, epochs=60, lr=0.05, patience=patience)

    full, stopped = run(None), run(5)
    v = full["val_curve"]
    best, stop = 0, len(v)
    for ep in range(len(v)):  # the first epoch whose best-so-far (first maximum) is 5 epochs old
        if ep - best >= 5:
            stop = ep
            break
        if v[ep] > v[best]:
            best = ep
    assert stop < 60, "the test must exercise a stop"
    assert stopped["val_curve"] == v[:stop] and stopped["test_curve"] == full["test_curve"][:stop]
    b = int(np.argmax(v[:stop]))
    assert stopped["best_epoch"] == b + 1 and stopped["test_acc"] == full["test_curve"][b]
