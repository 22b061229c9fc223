import torch; torch.set_num_threads(1)
"""LARA (arXiv:2306.05760): removal targets against a naive delete-and-rerun loop, the BA-Shapes generator's motifs,
fidelity and the metrics against direct computations."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph.lara import (EdgeGCN, LaraExplainer, fidelity, motif_auc, players_of,  # noqa: E402
                                 removal_targets, removal_values, train_explainer)
from reprolab.graph.motifs import HOUSE_ROLES, ba_shapes  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    d = ba_shapes(n_base=40, n_houses=6, m=2, noise_frac=0.1, seed=3)
    g = d.graph_with_self_loops()
    model = EdgeGCN(d.X.shape[1], 8, 4, n_layers=3)
    with torch.no_grad():  # a non-trivial random model: perturb weights so predictions vary by structure
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.eval()
    return d, g, model


def _naive_prob(model, g, X, t, removed, cls):
    """Delete every edge incident to the removed nodes in the WHOLE graph and rerun the model."""
    u, v = g.edges()
    drop = torch.zeros(g.num_nodes(), dtype=torch.bool)
    drop[torch.as_tensor(removed, dtype=torch.int64)] = True
    eids = torch.nonzero(drop[u] | drop[v]).squeeze(1)
    g2 = dgl.remove_edges(g, eids)
    with torch.no_grad():
        return float(model(g2, X).softmax(-1)[t, cls])


def test_ba_shapes_motif_counts_and_labels():
    d = ba_shapes(n_base=50, n_houses=7, m=3, noise_frac=0.0, seed=1)
    assert d.num_nodes == 50 + 35
    assert torch.bincount(d.y, minlength=4).tolist() == [50, 7, 14, 14]
    motif = d.info["motif"]
    assert torch.bincount(motif[motif >= 0]).tolist() == [5] * 7
    assert int(d.info["gt_edge"].sum()) == 7 * 6 * 2  # 6 undirected edges per house, both directions
    u, v = d.graph.edges()
    for h in range(7):
        nodes = torch.nonzero(motif == h).squeeze(1)
        assert d.y[nodes].tolist() == list(HOUSE_ROLES)
        inside = (motif[u] == h) & (motif[v] == h)
        sub_deg = torch.bincount(u[inside] - nodes[0], minlength=5).tolist()
        assert sub_deg == [2, 3, 3, 2, 2]  # the house: roof top 2, middles 3, bottoms 2
        # exactly one edge leaves the house (noise_frac = 0)
        assert int(((motif[u] == h) & (motif[v] != h)).sum()) == 1


def test_removal_values_equal_naive_loop(setup):
    d, g, model = setup
    X = d.X
    with torch.no_grad():
        pred = model(g, X).argmax(1)
    gen = torch.Generator().manual_seed(0)
    for t in [int(torch.nonzero(d.info["motif"] >= 0)[0]), 5]:
        players = players_of(g, t, 2)
        order = players[torch.randperm(len(players), generator=gen)]
        phi = removal_values(model, g, X, t, players, order, n_layers=3)
        cls = int(pred[t])
        naive = []
        for s in players.tolist():
            k = order.tolist().index(s)
            naive.append(_naive_prob(model, g, X, t, order[:k], cls) - _naive_prob(model, g, X, t, order[:k + 1], cls))
        assert torch.allclose(phi, torch.tensor(naive), atol=1e-5), t
        # efficiency: the marginal contributions sum to f(G) - f(t alone)
        assert abs(float(phi.sum()) - (_naive_prob(model, g, X, t, [], cls)
                                      - _naive_prob(model, g, X, t, players, cls))) < 1e-5


def test_players_are_the_khop_ball(setup):
    d, g, _ = setup
    import networkx as nx
    G = nx.Graph()
    G.add_nodes_from(range(d.num_nodes))
    u, v = d.graph.edges()
    G.add_edges_from(zip(u.tolist(), v.tolist()))
    for t in (0, 3, d.num_nodes - 1):
        ball = sorted(k for k, dist in nx.single_source_shortest_path_length(G, t, cutoff=2).items() if k != t)
        assert players_of(g, t, 2).tolist() == ball


def test_targets_average_permutations(setup):
    d, g, model = setup
    src, tgt, phi = removal_targets(model, g, d.X, [0, 1], player_hops=1, n_layers=3, n_perms=3, seed=0)
    assert set(tgt.tolist()) == {0, 1}
    assert len(src) == len(players_of(g, 0, 1)) + len(players_of(g, 1, 1))


def test_fidelity_matches_direct_removal(setup):
    d, g, model = setup
    t = 0
    players = players_of(g, t, 2)
    scores = torch.arange(len(players), dtype=torch.float32)  # the last players rank first
    with torch.no_grad():
        cls = int(model(g, d.X).argmax(1)[t])
    k = int(np.ceil(0.5 * len(players)))
    top = players.flip(0)[:k]
    rest = players.flip(0)[k:]
    fp, fm = fidelity(model, g, d.X, t, players, scores, 0.5, n_layers=3)
    full = _naive_prob(model, g, d.X, t, [], cls)
    assert abs(fp - (full - _naive_prob(model, g, d.X, t, top, cls))) < 1e-5
    assert abs(fm - (full - _naive_prob(model, g, d.X, t, rest, cls))) < 1e-5


def test_motif_auc_against_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.integers(0, 5, 40).astype(np.float32))  # ties included
    y = torch.from_numpy(rng.random(40) < 0.3)
    assert abs(motif_auc(s, y) - roc_auc_score(y.numpy(), s.numpy())) < 1e-9


def test_explainer_fits_a_bilinear_target(setup):
    d, g, _ = setup
    torch.manual_seed(0)
    src = torch.randint(0, d.num_nodes, (300,))
    tgt = torch.randint(0, d.num_nodes, (300,))
    phi = (d.y[src] == d.y[tgt]).float()  # learnable from structure-dependent embeddings
    exp = LaraExplainer(d.X.shape[1], 16, n_layers=2)
    losses = train_explainer(exp, g, d.X, src, tgt, phi, epochs=25, lr=0.02, weight_decay=0.0, batch=100, seed=0)
    assert losses[-1] < 0.5 * losses[0]


def test_model_selection_keeps_the_best_epoch(setup):
    d, g, _ = setup
    src = torch.arange(20)
    tgt = torch.arange(20, 40)
    phi = torch.rand(20)
    snaps = []

    def select(expl):  # scores fall over time: the first evaluation must win
        snaps.append({k: v.clone() for k, v in expl.state_dict().items()})
        return -len(snaps)

    exp = LaraExplainer(d.X.shape[1], 8, n_layers=2)
    train_explainer(exp, g, d.X, src, tgt, phi, epochs=6, lr=0.05, weight_decay=0.0, batch=20, seed=0,
                    select_fn=select, eval_every=2)
    assert len(snaps) == 3
    assert all(torch.equal(v, snaps[0][k]) for k, v in exp.state_dict().items())
    assert not all(torch.equal(v, snaps[-1][k]) for k, v in exp.state_dict().items())


def test_official_logit_fidelity_matches_direct_removal(setup):
    """kind="logit": the official calc_fidelity_pairwise (logit differences, floor counts), against a naive rerun."""
    d, g, model = setup
    t = 0
    players = players_of(g, t, 2)
    M = len(players)
    scores = torch.arange(M, dtype=torch.float32)  # the last players rank first
    with torch.no_grad():
        cls = int(model(g, d.X).argmax(1)[t])
    rho = 0.6
    ranked = players.flip(0)
    top = ranked[:int(np.floor((1 - rho) * M))]  # Fid+: remove the floor((1 - rho) M) most important
    bottom = ranked[M - int(np.floor(rho * M)):]  # Fid-: remove the floor(rho M) least important
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    fp, fm = fidelity(model, g, d.X, t, players, scores, rho, n_layers=3, kind="logit")
    full = _naive_prob(model, g, d.X, t, [], cls)
    assert abs(fp - (logit(full) - logit(_naive_prob(model, g, d.X, t, top, cls)))) < 1e-4
    assert abs(fm - (logit(full) - logit(_naive_prob(model, g, d.X, t, bottom, cls)))) < 1e-4
