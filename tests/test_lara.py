import torch; torch.set_num_threads(1)
"""LARA (arXiv:2306.05760): removal targets against a naive delete-and-rerun loop, the BA-Shapes generator's motifs,
fidelity and the metrics against direct computations."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph.lara import (EdgeGCN, LaraExplainer, fidelity, motif_auc, pgexplainer_scores,  # noqa: E402
                                 players_of, removal_targets, removal_values, train_explainer, train_pgexplainer)
from reprolab.graph.motifs import HOUSE_ROLES, ba_shapes, ba_shapes_directed  # noqa: E402


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


def _naive_prob(model, g, X, t, removed, cls, logit=False):
    """Delete every edge incident to the removed nodes in the WHOLE graph and rerun the model (``logit=True``: the
    raw output, the official imputer(...)[:, center, ori_pred_cls])."""
    u, v = g.edges()
    drop = torch.zeros(g.num_nodes(), dtype=torch.bool)
    drop[torch.as_tensor(removed, dtype=torch.int64)] = True
    eids = torch.nonzero(drop[u] | drop[v]).squeeze(1)
    g2 = dgl.remove_edges(g, eids)
    with torch.no_grad():
        out = model(g2, X)
        return float((out if logit else out.softmax(-1))[t, cls])


def test_ba_shapes_motif_counts_and_labels():
    d = ba_shapes(n_base=50, n_houses=7, m=3, noise_frac=0.0, seed=1)
    assert d.num_nodes == 50 + 35
    assert torch.bincount(d.y, minlength=4).tolist() == [50, 14, 14, 7]  # DGL's roles: middle, bottom, top
    motif = d.info["motif"]
    assert torch.bincount(motif[motif >= 0]).tolist() == [5] * 7
    assert int(d.info["gt_edge"].sum()) == 7 * 6 * 2  # 6 undirected edges per house, both directions
    u, v = d.graph.edges()
    for h in range(7):
        nodes = torch.nonzero(motif == h).squeeze(1)
        assert d.y[nodes].tolist() == list(HOUSE_ROLES)
        inside = (motif[u] == h) & (motif[v] == h)
        sub_deg = torch.bincount(u[inside] - nodes[0], minlength=5).tolist()
        assert sub_deg == [3, 3, 2, 2, 2]  # the house: middles 3, bottoms 2, roof top 2
        # exactly one edge leaves the house (noise_frac = 0)
        assert int(((motif[u] == h) & (motif[v] != h)).sum()) == 1


@pytest.mark.parametrize("seed", [0, 3])
def test_ba_shapes_is_dgl_bashapedataset(seed, tmp_path):
    """The generator against the pinned DGL's own dgl.data.BAShapeDataset: after DGL's renumbering (reverse
    Cuthill-McKee), the same directed edges and the same labels."""
    from dgl.data import BAShapeDataset
    ref = BAShapeDataset(num_base_nodes=60, num_base_edges_per_node=3, num_motifs=12, perturb_ratio=0.05, seed=seed,
                         raw_dir=str(tmp_path), force_reload=True, verbose=False)[0]
    src, dst, labels, motif, n = ba_shapes_directed(60, 12, 3, 0.05, seed)
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)
    g.ndata["label"] = torch.from_numpy(labels)
    ours = dgl.reorder_graph(g, node_permute_algo="rcmk", edge_permute_algo="dst", store_ids=False)
    edges = lambda h: set(zip(*[x.tolist() for x in h.edges()]))  # noqa: E731
    assert ours.num_nodes() == ref.num_nodes() and edges(ours) == edges(ref)
    assert torch.equal(ours.ndata["label"], ref.ndata["label"])
    d = ba_shapes(60, 12, 3, 0.05, seed=seed)  # the undirected version used here: both directions of DGL's edges
    assert d.graph.num_edges() == 2 * len({(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())})


def test_antithetic_targets_are_exact_shapley_for_two_players(setup):
    """n_perms=2, antithetic: one order and its reverse; for a node with 2 players that is every order, so the target
    equals the exact Shapley value of the removal game, computed here by enumerating subsets with a naive rerun."""
    d, g, model = setup
    X = d.X
    with torch.no_grad():
        pred = model(g, X).argmax(1)
    t = next(int(v) for v in range(d.num_nodes) if len(players_of(g, v, 1)) == 2)
    players = players_of(g, t, 1).tolist()
    cls = int(pred[t])
    # value of a coalition S of present players = f(G without the absent players)_t[c]
    v = lambda present: _naive_prob(model, g, X, t, [p for p in players if p not in present], cls)  # noqa: E731
    a, b = players
    shap = {a: 0.5 * (v([a]) - v([])) + 0.5 * (v([a, b]) - v([b])),
            b: 0.5 * (v([b]) - v([])) + 0.5 * (v([a, b]) - v([a]))}
    src, tgt, phi = removal_targets(model, g, X, [t], player_hops=1, n_layers=3, n_perms=2, seed=5, antithetic=True)
    for s_, p_ in zip(src.tolist(), phi.tolist()):
        assert abs(p_ - shap[s_]) < 1e-5
    with pytest.raises(ValueError):
        removal_targets(model, g, X, [t], player_hops=1, n_layers=3, n_perms=3, seed=5, antithetic=True)


def test_edgegcn_embed_and_edge_weight(setup):
    """embed=True is the input of the last layer; edge_weight (PGExplainer) and eweight (GNNExplainer) agree, and
    unit weights change nothing."""
    d, g, model = setup
    with torch.no_grad():
        h = d.X
        for i, layer in enumerate(model.layers[:-1]):
            h = layer(g, h if i == 0 else torch.relu(h))
        assert torch.allclose(model(g, d.X, embed=True), torch.relu(h))
        w = torch.rand(g.num_edges())
        assert torch.allclose(model(g, d.X, eweight=w), model(g, d.X, edge_weight=w))
        assert torch.allclose(model(g, d.X, edge_weight=torch.ones(g.num_edges())), model(g, d.X), atol=1e-5)


def test_pgexplainer_scores_are_its_edge_mask(setup):
    """dgl.nn.PGExplainer trains, and a player's score is the max of its explain_node edge mask over its edges."""
    d, g, model = setup
    exp = train_pgexplainer(model, g, d.X, list(range(6)), n_layers=3, hidden=8, epochs=2, lr=0.01, batch=3,
                            t0=5.0, t1=1.0, seed=0)
    t = 0
    players = players_of(g, t, 2)
    sc = pgexplainer_scores(exp, g, d.X, t, players, 1.0)
    _, mask, sg, _ = exp.explain_node(t, g, d.X, 1.0)
    nid = sg.ndata[dgl.NID].tolist()
    u, v = sg.edges()
    for s_, val in zip(players.tolist(), sc.tolist()):
        loc = nid.index(s_)
        inc = (u == loc) | (v == loc)
        assert abs(val - float(mask[inc].max())) < 1e-6
    assert torch.all((sc >= 0) & (sc <= 1))


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


def test_logit_removal_values_equal_naive_loop(setup):
    """target="logit" (the official removal value: the target GNN's raw output for the predicted class) against a
    naive whole-graph rerun per removal state; efficiency holds in logit units too."""
    d, g, model = setup
    X = d.X
    with torch.no_grad():
        pred = model(g, X).argmax(1)
    gen = torch.Generator().manual_seed(1)
    for t in [int(torch.nonzero(d.info["motif"] >= 0)[0]), 5]:
        players = players_of(g, t, 2)
        order = players[torch.randperm(len(players), generator=gen)]
        phi = removal_values(model, g, X, t, players, order, n_layers=3, target="logit")
        cls = int(pred[t])
        naive = []
        for s in players.tolist():
            k = order.tolist().index(s)
            naive.append(_naive_prob(model, g, X, t, order[:k], cls, True)
                         - _naive_prob(model, g, X, t, order[:k + 1], cls, True))
        assert torch.allclose(phi, torch.tensor(naive), atol=1e-4), t
        assert abs(float(phi.sum()) - (_naive_prob(model, g, X, t, [], cls, True)
                                      - _naive_prob(model, g, X, t, players, cls, True))) < 1e-4
    with pytest.raises(ValueError):
        removal_values(model, g, X, 5, players_of(g, 5, 1), players_of(g, 5, 1), n_layers=3, target="log")


def test_pgexplainer_selection_keeps_the_best_epoch(setup):
    """select_fn is called after every epoch and the returned explainer carries the best-scoring epoch's weights."""
    d, g, model = setup
    calls, states = [], []

    def sel(exp):
        states.append({k: v.clone() for k, v in exp.state_dict().items()})
        calls.append([3.0, 5.0, 1.0][len(calls)])
        return calls[-1]

    exp = train_pgexplainer(model, g, d.X, list(range(6)), n_layers=3, hidden=8, epochs=3, lr=0.05, batch=3,
                            t0=5.0, t1=1.0, seed=0, select_fn=sel)
    assert len(calls) == 3 and exp.best_epoch == 2 and exp.best_score == 5.0
    for k, v in exp.state_dict().items():
        assert torch.equal(v, states[1][k])
