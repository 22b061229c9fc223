"""SpaLoc: sparse NLM layers equal dense ones; the family-tree relations match their naive definitions."""
import numpy as np
import torch

from reprolab.reason.family import family_relations, generate_family_tree, hop_distances
from reprolab.reason.nlm import NLM, NLMLayer, dense_mask, sparse_from_dense
from reprolab.reason.spaloc import (dense_floats, dense_inputs, local_supports, make_model, predict, sample_subgraph,
                                    sparse_inputs, walk_counts)

torch.manual_seed(0)


def _random_supports(n, rng):
    idx2 = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    idx2 = idx2[torch.from_numpy(rng.random(len(idx2)) < 0.5)]
    k2 = set(map(tuple, idx2.tolist()))
    idx3 = torch.tensor([(a, b, c) for a in range(n) for b in range(n) for c in range(n)
                         if (a, b) in k2 and (b, c) in k2])
    return [None, None, idx2, idx3]


def test_sparse_layer_equals_dense_layer():
    n, dims = 6, [2, 3, 4, 2]
    F = [torch.rand(*([n] * r), dims[r]) for r in range(4)]
    layer = NLMLayer(dims, [5, 5, 5, 5], gated=True)
    # full support: identical to the dense NLM layer
    out, _ = layer.forward_dense(F, n)
    sout, _ = layer.forward_sparse(sparse_from_dense(F, [None] * 4, n), n)
    assert torch.allclose(out[0], sout[0], atol=1e-6)
    for r in range(1, 4):
        assert torch.allclose(out[r][tuple(sout[r][0].T)], sout[r][2], atol=1e-6)
    # partial support: identical to the dense layer on inputs that are zero off the support
    sup = _random_supports(n, np.random.default_rng(1))
    Fm = [f * m for f, m in zip(F, dense_mask(sup, n, 3))]
    out, _ = layer.forward_dense(Fm, n)
    sout, _ = layer.forward_sparse(sparse_from_dense(Fm, sup, n), n)
    for r in range(1, 4):
        assert torch.allclose(out[r][tuple(sout[r][0].T)], sout[r][2], atol=1e-6)


def test_sparse_net_equals_dense_net_with_full_support():
    rng = np.random.default_rng(0)
    tree = generate_family_tree(9, rng)
    model = make_model(4, 3, gated=True, seed=0)
    P = tree.parent_matrix()
    with torch.no_grad():
        dense, _ = model.forward_dense(dense_inputs(tree.male, P), 9)
        model.reset_count()
        E2 = torch.cartesian_prod(*[torch.arange(9)] * 2)  # full supports
        E3 = torch.cartesian_prod(*[torch.arange(9)] * 3)
        heads, _, _ = model.forward_sparse(sparse_inputs(tree.male, P, E2, E3), 9)
    idx, logits = heads[2]
    assert torch.allclose(dense[2][idx[:, 0], idx[:, 1]], logits, atol=1e-5)
    assert dense_floats(model, 9) == model.count()


def test_family_relations_match_naive_definitions():
    tree = generate_family_tree(40, np.random.default_rng(3))
    rel = family_relations(tree)
    n = tree.n
    parents = {y: {p for p in (tree.father[y], tree.mother[y]) if p >= 0} for y in range(n)}
    for x in range(n):
        for y in range(n):
            assert rel["parent"][x, y] == (x in parents[y])
            assert rel["grandparent"][x, y] == any(x in parents[z] for z in parents[y])
            sib = x != y and bool(parents[x] & parents[y])
            assert rel["sibling"][x, y] == sib
            uncle = bool(tree.male[x]) and any(x != z and bool(parents[x] & parents[z]) for z in parents[y])
            assert rel["uncle"][x, y] == uncle
    assert rel["grandparent"].any() and rel["uncle"].any() and rel["sibling"].any()


def test_hops_walks_and_sampler():
    tree = generate_family_tree(30, np.random.default_rng(4))
    P = tree.parent_matrix()
    A = P | P.T
    D = hop_distances(P, 3)
    import networkx as nx
    G = nx.from_numpy_array(A.astype(int))
    lengths = dict(nx.all_pairs_shortest_path_length(G, cutoff=3))
    for x in range(30):
        for y in range(30):
            assert D[x, y] == lengths[x].get(y, 4)
    W = walk_counts(A, 2)
    Ai = A.astype(int)
    assert np.array_equal(W, Ai + Ai @ Ai)
    nodes = sample_subgraph(A, 10, [2, 8, 16], np.random.default_rng(0))
    assert 1 <= len(nodes) <= 10 and len(set(nodes)) == len(nodes)


def test_predict_sparse_support_only():
    tree = generate_family_tree(25, np.random.default_rng(5))
    model = make_model(4, 2, gated=True, seed=0)
    with torch.no_grad():
        logits, floats, nnz = predict(model, tree.male, tree.parent_matrix(), True, 2)
    D = hop_distances(tree.parent_matrix(), 2)
    assert torch.all(logits[torch.from_numpy(D > 2)] == -30.0)
    assert floats > 0 and nnz > 0


# ---------------------------------------------------------------- Kinships / UMLS link prediction (spaloc_kg)
def _toy_kg(rng, n=12, n_rel=3, m=40):
    names = [f"e{i:02d}" for i in range(n)]
    trip = lambda k: [(names[rng.integers(n)], f"r{rng.integers(n_rel)}", names[rng.integers(n)]) for _ in range(k)]
    return {"train": trip(m), "valid": trip(5), "test": trip(8)}


def test_kg_index_and_relation_tensor_match_dict_lookup():
    from reprolab.reason.spaloc_kg import kg_index, relation_tensor
    splits = _toy_kg(np.random.default_rng(0))
    ids, ents, rels = kg_index(splits)
    T = relation_tensor(ids["train"], len(ents), len(rels))
    facts = set(splits["train"])
    for i, h in enumerate(ents):
        for j, t in enumerate(ents):
            for k, r in enumerate(rels):
                assert T[i, j, k] == ((h, r, t) in facts)
    assert [(ents[h], rels[r], ents[t]) for h, r, t in ids["test"]] == splits["test"]


def test_filtered_ranks_match_naive_loop():
    from reprolab.reason.spaloc_kg import filtered_ranks, rank_metrics
    rng = np.random.default_rng(1)
    n, R = 10, 3
    logits = torch.from_numpy(rng.integers(0, 4, size=(n, n, R)).astype(np.float32))  # many ties on purpose
    known = np.column_stack([rng.integers(n, size=60), rng.integers(R, size=60), rng.integers(n, size=60)])
    test = known[:15]
    ranks = filtered_ranks(logits, test, known)
    true = {tuple(x) for x in known.tolist()}
    for (h, r, t), got in zip(test.tolist(), ranks):
        s = logits[h, :, r].tolist()
        cands = [e for e in range(n) if e != t and (h, r, e) not in true]
        want = 1 + sum(s[e] > s[t] for e in cands) + 0.5 * sum(s[e] == s[t] for e in cands)
        assert got == want
    m = rank_metrics(np.array([1.0, 2.0, 20.0]))
    assert abs(m["mrr"] - (1 + 0.5 + 0.05) / 3) < 1e-12 and m["hits@10"] == 2 / 3 and m["hits@1"] == 1 / 3


def test_kg_sparse_equals_dense_on_full_support_and_local_predict():
    from reprolab.reason.spaloc_kg import dense_inputs, make_model, predict, relation_tensor, sparse_inputs
    rng = np.random.default_rng(2)
    n, R = 8, 3
    T = relation_tensor(np.column_stack([rng.integers(n, size=10), rng.integers(R, size=10), rng.integers(n, size=10)]),
                        n, R)
    model = make_model(R, 4, 2, gated=True, seed=0)
    with torch.no_grad():
        dense, _ = model.forward_dense(dense_inputs(T), n)
        E2, E3 = torch.cartesian_prod(*[torch.arange(n)] * 2), torch.cartesian_prod(*[torch.arange(n)] * 3)
        heads, _, _ = model.forward_sparse(sparse_inputs(T, E2, E3), n)
        idx, logits = heads[2]
        assert torch.allclose(dense[2][idx[:, 0], idx[:, 1]], logits, atol=1e-5)
        out, floats, nnz = predict(model, T, True, 1)
    D = hop_distances(T.any(-1), 1)
    assert torch.all(out[torch.from_numpy(D > 1)] == -30.0) and (D > 1).any()
    assert floats > 0 and nnz > 0


def _walks_naive(A, L):
    """Number of walks of length 0..L between every pair, by explicit enumeration (length 0: the identity)."""
    n = len(A)
    W = np.zeros((n, n))
    for x in range(n):
        stack = [(x, 0)]
        while stack:
            u, d = stack.pop()
            W[x, u] += 1
            if d < L:
                stack += [(v, d + 1) for v in np.flatnonzero(A[u])]
    return W


def test_information_sufficiency_matches_official_formula():
    """IS = (I + walks<=L in the subgraph) / (I + walks<=L in the full graph); 0/0 -> 1 (official get_IS)."""
    from reprolab.reason.spaloc import information_sufficiency

    tree = generate_family_tree(25, np.random.default_rng(6))
    A = (tree.parent_matrix() | tree.parent_matrix().T)
    nodes = np.sort(np.random.default_rng(0).choice(25, 12, replace=False))
    IS = information_sufficiency(A[np.ix_(nodes, nodes)], walk_counts(A, 2)[np.ix_(nodes, nodes)], 2)
    full, sub = _walks_naive(A, 2)[np.ix_(nodes, nodes)], _walks_naive(A[np.ix_(nodes, nodes)], 2)
    want = np.where(full == 0, 1.0, sub / np.where(full == 0, 1, full))
    assert np.allclose(IS, want)
    assert (IS <= 1 + 1e-12).all() and (IS >= 0).all()


def test_neighbor_sampler_size_and_truncation():
    from reprolab.reason.spaloc import sample_neighbor_subgraph

    tree = generate_family_tree(60, np.random.default_rng(7))
    A = tree.parent_matrix() | tree.parent_matrix().T
    for seed in range(5):
        nodes = sample_neighbor_subgraph(A, 20, [2, 8, 16], np.random.default_rng(seed))
        assert len(nodes) == 20 and len(set(nodes.tolist())) == 20 and (np.diff(nodes) > 0).all()
    # a graph smaller than the neighbourhood is filled up to the size with other nodes
    nodes = sample_neighbor_subgraph(np.zeros((30, 30), dtype=bool), 10, [2, 8], np.random.default_rng(0))
    assert len(nodes) == 10


def test_consumed_gates_and_nnz_exclude_dead_outputs():
    """The last layer's arity-3 outputs have no head: their gates are not in the Hoyer loss and pruning them (or not)
    leaves the consumed-hyperedge count unchanged; intermediate pruning lowers it; the last layer's headed outputs
    (the candidates the head scores) are never pruned."""
    tree = generate_family_tree(20, np.random.default_rng(8))
    P = tree.parent_matrix()
    depth = 3
    model = make_model(4, depth, gated=True, seed=0)
    E2, E3 = local_supports(P, 2)
    S = sparse_inputs(tree.male, P, E2, E3)
    with torch.no_grad():
        _, alphas, _ = model.forward_sparse(S, 20, 0.0)
        assert len(alphas) == 2 * (depth - 1) + 1  # arity 2 and 3 per layer, last layer arity 2 only
        full = model.consumed_nnz()
        assert full == (depth - 1) * (len(E2) + len(E3))  # intermediate layers only
        model.layers[-1].gate[3].bias.fill_(-100.0)  # every dead output pruned
        model.forward_sparse(S, 20, 0.5)
        n_dead_pruned = model.consumed_nnz()
        model.layers[-1].gate[3].bias.fill_(0.0)
        model.layers[0].gate[3].bias.fill_(-100.0)  # every arity-3 hyperedge of layer 0 pruned: consumed by layer 1
        model.forward_sparse(S, 20, 0.5)
        assert model.consumed_nnz() < n_dead_pruned
    model2 = make_model(4, depth, gated=True, seed=0)
    with torch.no_grad():
        model2.forward_sparse(S, 20, 0.0)
        model2.layers[-1].gate[3].bias.fill_(-100.0)
        model2.forward_sparse(S, 20, 0.999)
        kept = model2.consumed_nnz()
        model2.layers[-1].gate[3].bias.fill_(100.0)
        model2.forward_sparse(S, 20, 0.999)
    assert kept == model2.consumed_nnz()
    model3 = make_model(4, depth, gated=True, seed=0)
    with torch.no_grad():
        for layer in model3.layers[:-1]:  # intermediate layers keep everything
            layer.gate[2].bias.fill_(100.0)
            layer.gate[3].bias.fill_(100.0)
        model3.layers[-1].gate[2].bias.fill_(-100.0)  # every headed output has importance ~0: still scored
        heads, _, _ = model3.forward_sparse(S, 20, 0.5)
    assert len(heads[2][0]) == len(E2)


def test_neighbor_sampler_truncates_randomly_not_in_bfs_order():
    """Official SubgraphNeighborDataset.__sample_nodes__ (SpaLoc difflogic/dataset/graph/subgraph.py:191-232) keeps a
    RANDOM subset of the sampled neighbourhood (:230-231), not its first nodes in BFS order. On a path graph the
    neighbourhood of one seed is an interval; BFS-order truncation keeps a contiguous ball around the seed, random
    truncation keeps scattered nodes, and each sampled node survives with probability size / |neighbourhood|."""
    from reprolab.reason.spaloc import sample_neighbor_subgraph, sample_subgraph

    n = 80
    A = np.zeros((n, n), dtype=bool)
    A[np.arange(n - 1), np.arange(1, n)] = A[np.arange(1, n), np.arange(n - 1)] = True
    fan = [1, 6, 6, 6, 6]  # one seed; 6 draws (with replacement) of 2 neighbours reach both almost surely: radius 4
    contiguous = lambda s: bool((np.diff(s) == 1).all())  # noqa: E731
    rand = [sample_neighbor_subgraph(A, 5, fan, np.random.default_rng(s)) for s in range(300)]
    bfs = [sample_subgraph(A, 5, fan, np.random.default_rng(s)) for s in range(300)]
    assert all(len(s) == 5 for s in rand)
    assert np.mean([contiguous(s) for s in bfs]) > 0.95  # the earlier sampler: connected balls
    # a random 5-subset of a 9-node interval is contiguous with probability 5 / C(9, 5) = 0.04
    assert np.mean([contiguous(s) for s in rand]) < 0.15
    # the span of a random 5-subset of 9 consecutive nodes is 8 (both ends kept) with probability C(7,3)/C(9,5) = 0.28
    # (a little less here: near the path's ends the neighbourhood is shorter); BFS order never keeps the radius-4 ends
    spans = np.array([s[-1] - s[0] for s in rand])
    assert 0.15 < np.mean(spans == 8) < 0.42
    assert np.mean([s[-1] - s[0] == 8 for s in bfs]) == 0.0


def test_run_training_in_processes_equals_in_process():
    """Parallel (spawned, single-threaded) training gives bit-identical weights and losses to in-process training."""
    from reprolab.reason import spaloc

    tree = generate_family_tree(40, np.random.default_rng(9))
    rel = spaloc.family_relations(tree)
    A = tree.parent_matrix() | tree.parent_matrix().T
    W = walk_counts(A, 2)
    rng = np.random.default_rng(0)
    ex = [spaloc.subgraph_example(tree, rel, W, spaloc.sample(A, 10, [2, 4], rng, "neighbor"), 2, 0.3) for _ in range(4)]
    jobs = [{"make": (spaloc.make_model, dict(hidden=4, depth=2, gated=sparse, seed=s)),
             "train": (spaloc.train, dict(examples=ex, sparse=sparse, k_hop=2, steps=6, lr=0.01,
                                          hoyer_weight=1e-3 if sparse else 0.0, rng=None))}
            for s in (0, 1) for sparse in (True, False)]
    seq = spaloc.run_training(jobs, workers=1)
    par = spaloc.run_training(jobs, workers=2)
    for (sd1, l1, _), (sd2, l2, _) in zip(seq, par):
        assert l1 == l2
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_nnz_at_threshold_counts_important_intermediate_hyperedges():
    """On an unpruned forward, consumed_nnz(tau) = number of intermediate-layer gates >= tau (the official count of
    hyperedges whose importance clears the threshold), read off the returned gate tensors; tau = 0 counts all."""
    tree = generate_family_tree(20, np.random.default_rng(10))
    P = tree.parent_matrix()
    depth = 3
    model = make_model(4, depth, gated=True, seed=1)
    E2, E3 = local_supports(P, 2)
    with torch.no_grad():
        _, alphas, _ = model.forward_sparse(sparse_inputs(tree.male, P, E2, E3), 20, 0.0)
    inter = alphas[:2 * (depth - 1)]  # arity 2 and 3 of layers 0 .. depth-2
    for tau in (0.3, 0.5, 0.7):
        assert model.consumed_nnz(tau) == sum(int((a >= tau).sum()) for a in inter)
    assert model.consumed_nnz(0.0) == sum(a.numel() for a in inter) == (depth - 1) * (len(E2) + len(E3))
    assert 0 < model.consumed_nnz(0.5) < model.consumed_nnz(0.0)


def _official_sparsity_loss(alpha_by_layer, n, depth, breadth):
    """Transcription of the official loop (Guangxuan-Xiao/SpaLoc scripts/graph/learn_graph_tasks.py:736-750 with the
    stat of difflogic/nn/neural_logic/sparse_nlm.py:326-371 and SparseTensor.hoyer_square, sparse_tensor.py:236-240),
    batch of one: alpha_by_layer[d][order] = importance values (or None)."""
    stat = {"hoyer_square": [[0] * (breadth + 1) for _ in range(depth)],
            "multiplier": [[1] * (breadth + 1) for _ in range(depth)],
            "space_size": [[0] * (breadth + 1) for _ in range(depth)]}
    for d in range(depth):
        for order, t in enumerate(alpha_by_layer[d]):
            if t is None:
                continue
            v = t.abs()
            stat["hoyer_square"][d][order] += 1 if len(v) in (0, 1) else float(v.sum() ** 2 / (v ** 2).sum())
            stat["space_size"][d][order] += n ** order
            stat["multiplier"][d][order] = 1 if (d == depth - 1 or order == breadth) else n
    loss, loss_max = 0, 1e-6
    for d, row in enumerate(stat["hoyer_square"]):
        for order, v in enumerate(row):
            loss += v * stat["multiplier"][d][order]
            loss_max += stat["space_size"][d][order] * stat["multiplier"][d][order]
    return loss / loss_max


def test_sparsity_loss_official_matches_official_loop_on_a_gated_nlm():
    """hoyer_official on the gates of a sparse forward equals the transcribed official loop over the same gates
    (layer/arity bookkeeping included; the last layer's head-less arity is left out in both, as in our model)."""
    from reprolab.reason.spaloc import sparsity_loss

    rng = np.random.default_rng(3)
    n = 7
    tree = generate_family_tree(n, rng)
    P = tree.parent_matrix()
    model = make_model(hidden=4, depth=3, gated=True, seed=0)
    S = sparse_inputs(tree.male, P, *local_supports(P, 2))
    _, alphas, _ = model.forward_sparse(S, n)
    got = float(sparsity_loss(model, alphas, n, "official"))
    by_layer = [[None] * 4 for _ in range(3)]
    for a, (d, r) in zip(alphas, model.alpha_meta):
        by_layer[d][r] = a.detach().reshape(-1)
    assert {r for d, r in model.alpha_meta if d == 2} == {2}  # the last layer: only the headed arity
    ref = _official_sparsity_loss(by_layer, n, 3, 3)
    assert abs(got - ref) < 1e-6 * max(1.0, abs(ref))
    # a one-hot gate tensor has HS = 1, a constant one HS = its length
    v = torch.zeros(10); v[3] = 0.7
    from reprolab.reason.nlm import hoyer_official
    assert abs(float(hoyer_official([v], [(0, 3)], 5, 2, 3)) - 1 / (1e-6 + 125)) < 1e-9
    assert abs(float(hoyer_official([torch.full((10,), 0.4)], [(0, 2)], 5, 2, 3)) - 5 * 10 / (1e-6 + 5 * 25)) < 1e-6
