"""spen (arXiv 2111.11840): Maron's basis against a naive partition basis, exact equivariance, ego-net batching."""
import os

import networkx as nx
import numpy as np
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
from reprolab.graph import wl_pairs as W  # noqa: E402
from reprolab.graph.spen import (  # noqa: E402
    SPEN, EquiLinear, build_batch, ego_nets, order2_elements, ops_2_to_2, partition_basis_2_to_2)


def op_matrices(m, normalize=False):
    """Each of the 15 ops as an (m*m, m*m) matrix, by applying it to the unit matrices."""
    E = torch.eye(m * m, dtype=torch.float64).reshape(m * m, 1, m, m)
    out = ops_2_to_2(E, normalize)[:, 0]  # (m*m inputs, 15, m, m)
    return out.permute(1, 2, 3, 0).reshape(15, m * m, m * m).numpy()


def test_basis_spans_maron_partition_basis():
    for m in (4, 5):
        ours = op_matrices(m).reshape(15, -1)
        ref = partition_basis_2_to_2(m).reshape(15, -1)
        assert np.linalg.matrix_rank(ours) == 15 and np.linalg.matrix_rank(ref) == 15
        assert np.linalg.matrix_rank(np.concatenate([ours, ref])) == 15  # same 15-dimensional space


def test_partition_basis_is_equivariant_reference():
    m = 4
    perm = np.random.default_rng(0).permutation(m)
    P = np.eye(m)[perm]
    Pk = np.kron(P, P)
    for B in partition_basis_2_to_2(m):
        assert np.allclose(Pk @ B @ Pk.T, B)


def test_layers_are_exactly_equivariant():
    torch.manual_seed(0)
    m, n = 7, 3
    perm = torch.randperm(m)
    X2 = torch.randn(n, 4, m, m, dtype=torch.float64)
    X1 = torch.randn(n, 4, m, dtype=torch.float64)
    p2 = lambda x: x[..., perm, :][..., :, perm]  # noqa: E731
    p1 = lambda x: x[..., perm]  # noqa: E731
    for (i, o) in [(2, 2), (2, 1), (1, 2), (1, 1), (2, 0), (1, 0)]:
        L = EquiLinear(i, o, 4, 3).double()
        x = X2 if i == 2 else X1
        xp = p2(x) if i == 2 else p1(x)
        y, yp = L(x), L(xp)
        want = {2: p2, 1: p1, 0: lambda t: t}[o](y)
        assert torch.max(torch.abs(yp - want)) < 1e-12


def test_spen_and_global_ign_are_invariant():
    torch.manual_seed(1)
    g = W.csl(13, 3)
    perm = np.random.default_rng(1).permutation(13)
    gp = nx.relabel_nodes(g, dict(enumerate(perm.tolist())))
    for k, order1 in ((1, True), (2, True), (None, False)):
        b = build_batch([g, gp], k)
        sizes = sorted(b["groups"])
        model = SPEN(4, 3, 2, sizes, k=k, order1=order1).double()
        b["pair_adj"], b["pair_is_diag"] = b["pair_adj"].double(), b["pair_is_diag"].double()
        out = model(b)
        assert torch.allclose(out[0], out[1], atol=1e-10)


def test_ego_nets_and_counts():
    g = W.csl(41, 3)
    nets = ego_nets(g, 1)
    assert all(len(s) == 5 for s in nets)
    # 1-hop ego-nets of CSL(41, s >= 3) are stars (no edges among the neighbours)
    assert all(g.subgraph(s).number_of_edges() == 4 for s in nets)
    assert order2_elements(g, 1) == 41 * 25 and order2_elements(g, None) == 41 ** 2
    b = build_batch([g], 2)
    n_pairs = len({(i, j) for s in ego_nets(g, 2) for i in s for j in s})
    assert b["n_pairs"] == n_pairs
    assert sum(int(grp["pairs"].numel()) for grp in b["groups"].values()) == order2_elements(g, 2)


def test_gin_gives_wl_equivalent_graphs_one_output():
    torch.manual_seed(0)
    g, h = W.two_triangles_vs_hexagon()
    model = W.make_gin(8, 2, 3).eval()
    out = model(W.dgl_batcher([g, h])([0, 1]))
    assert torch.allclose(out[0], out[1], atol=1e-5)


def test_cycle_and_csl_datasets():
    graphs, y = W.cycle_triangle_dataset(20, 12, seed=0)
    for g, lab in zip(graphs, y):
        assert all(d == 2 for _, d in g.degree) and g.number_of_nodes() == 12
        assert (min(len(c) for c in nx.connected_components(g)) == 3) == bool(lab)
    graphs, y = W.csl_dataset(per_class=2)
    assert len(graphs) == 20 and all(all(d == 4 for _, d in g.degree) for g in graphs)


def naive_one_layer_spen(model, g, k):
    """Loop reference of a 1-layer SPEN forward: per ego-net layer outputs, then the merge of nodes and pairs shared
    by several ego-nets as a MEAN over the ego-nets that contain them (official scatter mean), ELU, readout, mean."""
    g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    A = torch.tensor(nx.to_numpy_array(g, nodelist=sorted(g)), dtype=torch.float64)
    nets = ego_nets(g, k)
    layer = model.layers[0]
    s2, c2, s1, c1 = {}, {}, {}, {}
    for sub in nets:
        m = len(sub)
        Wl = model._weights(layer, m)
        x2 = torch.stack([A[sub][:, sub], torch.eye(m, dtype=torch.float64)])[None]  # (1, 2, m, m)
        y2, y1 = Wl["p2p2"](x2)[0], Wl["p2p1"](x2)[0]  # (D, m, m), (D, m)
        for a, i in enumerate(sub):
            s1[i] = s1.get(i, 0) + y1[:, a]
            c1[i] = c1.get(i, 0) + 1
            for b, j in enumerate(sub):
                s2[i, j] = s2.get((i, j), 0) + y2[:, a, b]
                c2[i, j] = c2.get((i, j), 0) + 1
    P = {key: torch.nn.functional.elu(s2[key] / c2[key]) for key in s2}
    X = {key: torch.nn.functional.elu(s1[key] / c1[key]) for key in s1}
    reads = []
    for sub in nets:
        Wr = model._weights(model.readout, len(sub))
        x2 = torch.stack([torch.stack([P[i, j] for j in sub], -1) for i in sub], -2)[None]  # (1, D, m, m)
        x1 = torch.stack([X[i] for i in sub], -1)[None]  # (1, D, m)
        reads.append(torch.nn.functional.elu(torch.cat([Wr["p2p0"](x2), Wr["p1p0"](x1)], 1))[0])
    return model.mlp(torch.stack(reads).mean(0))


def test_merge_step_matches_loop_reference():
    """Nodes / pairs shared by several ego-nets are merged by a mean (a sum instead fails this test)."""
    torch.manual_seed(3)
    g = nx.gnp_random_graph(8, 0.35, seed=2)
    for k in (1, 2):
        b = build_batch([g], k)
        b["pair_adj"], b["pair_is_diag"] = b["pair_adj"].double(), b["pair_is_diag"].double()
        model = SPEN(3, 2, 1, sorted(b["groups"]), k=k).double()
        with torch.no_grad():
            out, ref = model(b)[0], naive_one_layer_spen(model, g, k)
        assert torch.allclose(out, ref, atol=1e-10), (out, ref)
