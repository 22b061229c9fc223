"""graphVCI (arXiv 2210.00116): the DGL gene propagation against a dense matrix computation, the dot-product
decoder against a per-gene loop, the GRN refinement and its AUPR."""
import numpy as np
import pytest
import torch

from reprolab.bio.graph_vci import GeneGCN, GraphVCI, edge_aupr, gene_graph, refine_grn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EDGES = np.array([[0, 1], [1, 2], [2, 3], [0, 4], [4, 5], [1, 5]])


def test_gene_graph_is_symmetric_with_self_loops():
    g = gene_graph(EDGES, 7)
    src, dst = (x.numpy() for x in g.edges())
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert all((j, i) in pairs for i, j in pairs)
    assert all((i, i) in pairs for i in range(7)) and g.num_edges() == 2 * len(EDGES) + 7


def test_propagation_equals_dense_matrix():
    torch.manual_seed(0)
    gcn = GeneGCN(gene_graph(EDGES, 7), n_features=5, depth=1)
    with torch.no_grad():
        gcn.edge_logits.normal_()
    # independent dense reference: A[i, j] = exp(l_ji) / sum_{k -> i} exp(l_ki), then ReLU(A X W + b)
    src, dst = (x.numpy() for x in gcn.graph.edges())
    logits = gcn.edge_logits.detach().numpy()
    A = np.zeros((7, 7))
    for e in range(len(src)):
        A[dst[e], src[e]] = np.exp(logits[e]) / np.exp(logits[dst == dst[e]]).sum()
    np.testing.assert_allclose(A.sum(1), 1.0, rtol=1e-6)
    conv = gcn.convs[0]
    X = gcn.X.detach().numpy()
    ref = np.maximum(A @ X @ conv.weight.detach().numpy() + conv.bias.detach().numpy(), 0)
    np.testing.assert_allclose(gcn().detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gcn.dense_adjacency().detach().numpy(), A, rtol=1e-5, atol=1e-7)


def test_two_layer_propagation_equals_dense():
    torch.manual_seed(1)
    gcn = GeneGCN(gene_graph(EDGES, 7), n_features=4, depth=2)
    A = gcn.dense_adjacency().detach()
    c0, c1 = gcn.convs
    h = torch.relu(gcn.norms[0](A @ gcn.X @ c0.weight + c0.bias + gcn.X))  # residual + layer norm + ReLU
    ref = torch.relu(A @ h @ c1.weight + c1.bias)
    torch.testing.assert_close(gcn(), ref, rtol=1e-5, atol=1e-6)


def test_dot_decoder_equals_per_gene_loop():
    torch.manual_seed(0)
    m = GraphVCI(gene_graph(EDGES, 7), 7, 3, 2, latent=4, width=6, outcome_emb=8, covariate_emb=2, graph_features=5)
    z, t = torch.randn(3, 4), torch.tensor([0, 2, 1])
    m._g = None
    loc, scale = m.decode(z, t)
    g = m.gnn()
    h = m.decoder(torch.cat([z, torch.nn.functional.one_hot(t, 3).float()], -1))
    for n in range(7):
        w = m.node_aggr(g[n]).view(6, 2)
        torch.testing.assert_close(loc[:, n], h @ w[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scale[:, n], torch.nn.functional.softplus(h @ w[:, 1]) + 1e-3, rtol=1e-5, atol=1e-6)
    # the encoder adds the graph summary Linear(mean_n g_n) to the MLP output (GraphAggrSUM)
    y, c = torch.rand(3, 7), torch.tensor([0, 1, 0])
    mu, _ = m.encode(y, t, c)
    hin = torch.cat([m.outcome_emb(y), torch.nn.functional.one_hot(t, 3).float(), m.cov_emb(c)], -1)
    torch.testing.assert_close(mu, (m.encoder(hin) + m.graph_aggr(g.mean(0)))[:, :4])


def test_aupr_of_binary_prior_has_closed_form():
    rng = np.random.default_rng(0)
    G = 30
    true = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if rng.random() < 0.1])
    iu = np.triu_indices(G, 1)
    A = np.zeros((G, G))
    A[true[:, 0], true[:, 1]] = 1
    scores = np.zeros((G, G))
    keep = true[: len(true) // 2]
    fake = np.array([[i, j] for i, j in zip(*iu) if A[i, j] == 0][:10])
    scores[keep[:, 0], keep[:, 1]] = scores[fake[:, 0], fake[:, 1]] = 1.0
    prec, rec, base = len(keep) / (len(keep) + len(fake)), len(keep) / len(true), len(true) / len(iu[0])
    assert abs(edge_aupr(scores, true, G) - (rec * prec + (1 - rec) * base)) < 1e-9
    assert edge_aupr(A + A.T, true, G) == 1.0


def test_refinement_recovers_edges_the_features_explain():
    """Two modules whose genes are all linked (cliques); the prior lost 40% of the true edges and got random cross
    edges. With features that identify the modules, the link predictor's scores must beat the prior's AUPR."""
    rng = np.random.default_rng(0)
    G = 20
    mod = np.repeat([0, 1], 10)
    true = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if mod[i] == mod[j]])
    kept = true[rng.permutation(len(true))[: int(0.6 * len(true))]]
    cross = np.array([[i, j] for i in range(10) for j in range(10, 20)])[rng.permutation(100)[:10]]
    prior = np.concatenate([kept, cross])
    X = (np.eye(2)[mod] + 0.05 * rng.standard_normal((G, 2))).astype(np.float32)
    out = refine_grn(prior, X, epochs=150, lr=0.02, width=16, seed=0)
    P = np.zeros((G, G))
    P[prior[:, 0], prior[:, 1]] = 1
    assert edge_aupr(out["scores"], true, G) > edge_aupr(P + P.T, true, G)
    assert out["edges"].shape == prior.shape


def test_negatives_avoid_forbidden_pairs_and_heldout_split():
    from reprolab.bio.graph_vci import sample_negatives
    from reprolab.bio.simulator import undirected_adjacency

    rng = np.random.default_rng(0)
    G = 15
    edges = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if rng.random() < 0.4])
    A = undirected_adjacency(edges, G)
    neg = sample_negatives(500, G, A, torch.Generator().manual_seed(0)).numpy()
    assert neg.shape == (2, 500)
    assert not A[neg[0], neg[1]].any() and (neg[0] != neg[1]).all()
    # module toy (as above): the held-out prior edges are predictable from the features (AUC > 0.5)
    mod = np.repeat([0, 1], 10)
    true = np.array([[i, j] for i in range(20) for j in range(i + 1, 20) if mod[i] == mod[j]])
    X = (np.eye(2)[mod] + 0.05 * rng.standard_normal((20, 2))).astype(np.float32)
    out = refine_grn(true, X, epochs=150, lr=0.02, width=16, seed=0, holdout=0.2)
    assert out["heldout_auc"] > 0.9 and out["edges"].shape == true.shape


def test_feature_edge_auc_equals_pairwise_count():
    """The premise gate's AUC against a naive Mann-Whitney count over (edge, non-edge) pairs (ties count 1/2)."""
    from reprolab.bio.graph_vci import feature_edge_auc

    rng = np.random.default_rng(3)
    G = 12
    X = rng.standard_normal((G, 3))
    X[:4] = np.round(X[:4], 0)  # some ties
    edges = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if rng.random() < 0.3])
    E = {(int(a), int(b)) for a, b in edges}
    pos, neg = [], []
    for i in range(G):
        for j in range(i + 1, G):
            s = abs(float(X[i] @ X[j]))
            (pos if (i, j) in E else neg).append(s)
    naive = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
    assert abs(feature_edge_auc(X, edges, G) - naive) < 1e-12
    # features that identify two modules, edges inside the modules: AUC 1
    mod = np.repeat([0, 1], 6)
    inside = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if mod[i] == mod[j]])
    assert feature_edge_auc(np.eye(2)[mod], inside, G) == 1.0


def test_directed_gene_graph_keeps_the_direction():
    """Official graphVCI: the loaded GRN's edge_index source -> target plus the remaining self loops
    (gvci/utils/graph_utils.py:141-158)."""
    g = gene_graph(EDGES, 7, directed=True)
    src, dst = (x.numpy() for x in g.edges())
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert pairs == {tuple(e) for e in EDGES.tolist()} | {(i, i) for i in range(7)}


def test_refinement_message_passing_excludes_heldout_edges():
    rng = np.random.default_rng(1)
    G = 20
    edges = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if rng.random() < 0.2])
    X = rng.standard_normal((G, 4)).astype(np.float32)
    out = refine_grn(edges, X, epochs=5, lr=0.01, width=8, seed=0, holdout=0.2)
    mp = {tuple(e) for e in out["mp_edges"].tolist()}
    held = {tuple(e) for e in out["heldout_edges"].tolist()}
    assert held and not (mp & held) and mp | held == {tuple(e) for e in edges.tolist()}


def test_refinement_final_scores_use_train_and_val_edges_like_the_official_code():
    """Official RandomLinkSplit(num_val=0.05, num_test=0.1): training message passing over the train edges; the final
    scores (link_pred.py:215) encode over test_data.edge_index = train + val edges; the test edges never enter."""
    import torch

    rng = np.random.default_rng(2)
    G = 30
    edges = np.array([[i, j] for i in range(G) for j in range(i + 1, G) if rng.random() < 0.2])
    X = rng.standard_normal((G, 4)).astype(np.float32)
    out = refine_grn(edges, X, epochs=5, lr=0.01, width=8, seed=0, holdout=0.15, val=0.05)
    tr, va, te = ({tuple(e) for e in out[k].tolist()} for k in ("train_edges", "val_edges", "heldout_edges"))
    assert len(va) == round(0.05 * len(edges)) and len(te) == round(0.15 * len(edges)) - len(va)
    assert tr | va | te == {tuple(e) for e in edges.tolist()} and not (tr & va) and not (tr & te) and not (va & te)
    assert {tuple(e) for e in out["mp_edges"].tolist()} == tr | va
    with torch.no_grad():  # recompute the final scores by hand over the train + val graph
        z = out["model"].encode(gene_graph(np.array(sorted(tr | va)), G), torch.from_numpy(X))
        S = torch.sigmoid(z @ z.T).numpy()
    np.testing.assert_allclose(out["scores"], S, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and they differ from scores over the train edges only (the val edges matter)
        z0 = out["model"].encode(gene_graph(out["train_edges"], G), torch.from_numpy(X))
    assert not np.allclose(torch.sigmoid(z0 @ z0.T).numpy(), out["scores"])
