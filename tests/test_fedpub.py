"""FED-PUB (arXiv 2206.10206): the masked GCN against a hand-masked dense GCN, the local objective's gradient
(L1 on masks and the proximal term) against a hand computation, the similarity weights and the personalised
aggregation against direct loops, the Flower strategy (no Ray) against the direct server, Adam state persistence,
the model selection rule and the data pipeline (split, METIS clients, generator)."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.fed.fedpub import (MaskedGCN, adam_state, best_val_all, client_graphs, fedpub_server,  # noqa: E402
                                 load_adam_state, local_loss, make_optimizer, metis_parts, similarity_weights,
                                 split_nodes, weighted_models)

HP = dict(n_dims=4, dropout=0.0, lr=0.01, weight_decay=0.0, l1=1e-3, loc_l2=0.1, grad_through_regularisers=True,
          local_epochs=1, ft_steps=0, tau=3.0, agg_norm="exp", fedavg_weighting="uniform")


def small_graph(seed=0, n=7):
    rng = np.random.default_rng(seed)
    src, dst = [], []
    for i in range(n):
        for j in range(i + 1, n):
            if rng.random() < 0.4:
                src += [i, j]
                dst += [j, i]
    g = dgl.add_self_loop(dgl.graph((torch.tensor(src), torch.tensor(dst)), num_nodes=n))
    return g


def dense_gcn(g, X, model):
    """D^-1/2 (A + I) D^-1/2 by hand, then the official forward with W * prune(M) (dropout 0)."""
    n = g.num_nodes()
    A = torch.zeros(n, n, dtype=torch.float64)
    s, d = g.edges()
    A[d, s] = 1.0
    dinv = A.sum(1).pow(-0.5)
    A_hat = dinv[:, None] * A * dinv[None, :]

    def eff(layer):
        W = layer.weight.detach().double()
        if not model.masked:
            return W
        M = layer.mask.detach().double().clone()
        if not model.training:
            M[M.abs() < model.l1] = 0.0
        return W * M

    h = A_hat @ X.double() @ eff(model.conv1) + model.conv1.bias.detach().double()
    h = A_hat @ torch.relu(h) @ eff(model.conv2) + model.conv2.bias.detach().double()
    proxy = h
    out = torch.relu(h) @ eff(model.clsif) + model.clsif.bias.detach().double()
    return out, proxy


@pytest.mark.parametrize("train_mode", [True, False])
def test_masked_gcn_against_a_hand_masked_dense_gcn(train_mode):
    torch.manual_seed(0)
    g = small_graph()
    X = torch.rand(7, 5)
    model = MaskedGCN(5, 4, 3, masked=True, l1=0.05, dropout=0.0)
    with torch.no_grad():
        for m in model.masks():
            m.copy_(torch.randn_like(m))
            m.view(-1)[0] = 0.01  # below l1: pruned in eval mode only
    model.train(train_mode)
    want, want_proxy = dense_gcn(g, X, model)
    np.testing.assert_allclose(model(g, X).detach().double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(g, X, is_proxy=True).detach().double().numpy(), want_proxy.numpy(), rtol=1e-5,
                               atol=1e-6)
    # sparse bag-of-words input: the same output
    np.testing.assert_allclose(model(g, X.to_sparse()).detach().numpy(), model(g, X).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    # the mask matters: all-ones masks give a different output
    plain = MaskedGCN(5, 4, 3, masked=False, dropout=0.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("mask")}, strict=False)
    assert not np.allclose(plain(g, X).detach().numpy(), model(g, X).detach().numpy())


def test_local_objective_gradient_by_hand():
    """d/dtheta [CE + l1 sum|M| + loc_l2 sum ||theta - prev||_2]: the L1 adds l1 * sign(M) to every mask's gradient,
    the proximal term loc_l2 * (theta - prev) / ||theta - prev||_2 to every weight's and bias's gradient."""
    torch.manual_seed(1)
    g = small_graph(1)
    X, y = torch.rand(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    model = MaskedGCN(5, 4, 3, masked=True, l1=1e-3, dropout=0.0)
    with torch.no_grad():
        for m in model.masks():
            m.copy_(torch.randn_like(m))
    names = [k for k, _ in model.named_parameters()]
    prev = {k: p.detach() + 0.1 * torch.randn_like(p) for k, p in model.named_parameters() if not k.endswith("mask")}
    l1, loc = 0.01, 0.3

    def grads(**kw):
        model.zero_grad()
        local_loss(model, model(g, X), y, **kw).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    ce = grads(prev=None, l1=0.0, loc_l2=0.0)
    full = grads(prev=prev, l1=l1, loc_l2=loc)
    params = dict(model.named_parameters())
    for k in names:
        p = params[k].detach()
        if k.endswith(".mask"):
            want = ce[k] + l1 * torch.sign(p)
        else:
            diff = p - prev[k]
            want = ce[k] + loc * diff / diff.norm()
        torch.testing.assert_close(full[k], want, rtol=1e-5, atol=1e-7)
    # first round (prev None): no proximal term
    first = grads(prev=None, l1=l1, loc_l2=loc)
    for k in names:
        if not k.endswith(".mask"):
            torch.testing.assert_close(first[k], ce[k])
    # the official code literally (terms over the detached state_dict): the same loss value, CE gradients only
    lit = grads(prev=prev, l1=l1, loc_l2=loc, grad_through_regularisers=False)
    for k in names:
        torch.testing.assert_close(lit[k], ce[k])
    v1 = float(local_loss(model, model(g, X), y, prev, l1, loc))
    v2 = float(local_loss(model, model(g, X), y, prev, l1, loc, grad_through_regularisers=False))
    assert v1 == pytest.approx(v2, rel=1e-6)


def test_similarity_weights_against_a_direct_computation():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((5, 8))
    for tau in (1.0, 3.0, 10.0):
        got = similarity_weights(E, tau)
        for i in range(5):
            row = [np.exp(tau * (E[i] @ E[j]) / (np.linalg.norm(E[i]) * np.linalg.norm(E[j]))) for j in range(5)]
            np.testing.assert_allclose(got[i], np.array(row) / sum(row), rtol=1e-12)
    # scipy's cosine distance, as the official server uses it
    from scipy.spatial.distance import cosine

    S = np.array([[1 - cosine(E[i], E[j]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(similarity_weights(E, 1.0, "cosine"), S / S.sum(1, keepdims=True), rtol=1e-10)
    # larger tau concentrates weight on the most similar clients (self included)
    assert (np.diag(similarity_weights(E, 10.0)) > np.diag(similarity_weights(E, 1.0))).all()


def test_personalised_models_against_a_loop():
    rng = np.random.default_rng(1)
    K = 4
    uploads = [[rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32),
                rng.standard_normal(6).astype(np.float32)] for _ in range(K)]  # two arrays + the embedding
    personal, glob, alpha = fedpub_server(uploads, [1, 1, 1, 1], tau=3.0)
    want_alpha = similarity_weights(np.stack([u[-1] for u in uploads]), 3.0)
    np.testing.assert_allclose(alpha, want_alpha)
    for i in range(K):
        for a in range(2):
            want = sum(want_alpha[i, j] * uploads[j][a].astype(np.float64) for j in range(K))
            np.testing.assert_allclose(personal[i][a], want, rtol=1e-5)
        assert len(personal[i]) == 2  # the embedding is not a model array
    for a in range(2):
        np.testing.assert_allclose(glob[a], np.mean([u[a] for u in uploads], 0), rtol=1e-5)
    np.testing.assert_allclose(weighted_models([[np.ones(2)], [3 * np.ones(2)]], [0.25, 0.75])[0], [2.5, 2.5])


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


def test_flower_strategy_sends_each_client_its_personalised_model():
    """configure_fit/aggregate_fit of the FED-PUB strategy (Tracked, no Ray): after a round, the FitIns of each
    partition carries fedpub_server's personalised model for it; results arriving out of order are sorted."""
    from flwr.common import Code, FitIns, FitRes, Status

    from reprolab.distributed.flower import ndarrays_to_parameters, parameters_to_ndarrays
    from reprolab.fed.fedpub import _strategy_classes

    _, FedPub = _strategy_classes()
    rng = np.random.default_rng(2)
    K = 3
    init = [np.zeros((2, 2), np.float32)]
    strat = FedPub(num_clients=K, seed=0, tau=3.0, agg_norm="exp", fraction_fit=1.0, min_fit_clients=K,
                   min_available_clients=K, initial_parameters=ndarrays_to_parameters(init),
                   on_fit_config_fn=lambda r: {"round": r})
    cids = ["c5", "c1", "c9"]
    strat.partition_of = {c: k for k, c in enumerate(cids)}
    uploads = [[rng.standard_normal((2, 2)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
               for _ in range(K)]
    results = [(_Proxy(cids[k]), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(uploads[k]), 1,
                                        {"val_acc": 0.5, "test_acc": 0.5})) for k in (2, 0, 1)]
    strat.aggregate_fit(1, results, [])
    want, _, _ = fedpub_server(uploads, [1] * K, 3.0)

    class _Mgr:
        def num_available(self):
            return K

        def wait_for(self, n, timeout=0):
            return True

        def all(self):
            return {c: _Proxy(c) for c in cids}

        def sample(self, num_clients, min_num_clients=None, criterion=None):
            return [_Proxy(c) for c in cids]

    pairs = strat.configure_fit(2, ndarrays_to_parameters(init), _Mgr())
    assert len(pairs) == K
    for client, ins in pairs:
        assert isinstance(ins, FitIns)
        got = parameters_to_ndarrays(ins.parameters)
        np.testing.assert_allclose(got[0], want[strat.partition_of[client.cid]][0], rtol=1e-6)
    assert sorted(strat.records[1]) == [0, 1, 2]


def test_adam_state_round_trip_equals_uninterrupted_training():
    torch.manual_seed(0)
    X, y = torch.rand(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    g = dgl.add_self_loop(dgl.graph(([0, 1, 2], [1, 2, 3]), num_nodes=6))

    def step(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(g, X), y).backward()
        opt.step()

    torch.manual_seed(3)
    a = MaskedGCN(3, 4, 2, masked=True, dropout=0.0)
    b = MaskedGCN(3, 4, 2, masked=True, dropout=0.0)
    b.load_state_dict(a.state_dict())
    oa, ob = make_optimizer(a, HP), make_optimizer(b, HP)
    for _ in range(3):
        step(a, oa)
    step(b, ob)
    saved = adam_state(ob)
    b2 = MaskedGCN(3, 4, 2, masked=True, dropout=0.0)
    b2.load_state_dict(b.state_dict())
    ob2 = make_optimizer(b2, HP)
    load_adam_state(ob2, saved)
    step(b2, ob2)
    step(b2, ob2)
    for (k, p), q in zip(a.named_parameters(), b2.parameters()):
        torch.testing.assert_close(p, q, msg=k)


def test_client_round_keeps_its_masks_and_sends_no_mask():
    from reprolab.fed.fedpub import ClientGraph, client_round, proxy_graph

    torch.manual_seed(0)
    g = small_graph(2)
    cg = ClientGraph(g, torch.rand(7, 5).to_sparse(), torch.tensor([0, 1, 2, 0, 1, 2, 0]),
                     torch.tensor([1, 1, 1, 0, 0, 0, 0], dtype=torch.bool),
                     torch.tensor([0, 0, 0, 1, 1, 0, 0], dtype=torch.bool),
                     torch.tensor([0, 0, 0, 0, 0, 1, 1], dtype=torch.bool), np.arange(7))
    proxy = proxy_graph(5, 1, 0, block=20)
    model = MaskedGCN(5, 4, 3, masked=True)
    received = model.get_shared()
    hp = {**HP, "local_epochs": 2}
    out, state, met = client_round("fedpub", cg, received, None, hp, 5, 3, 1, 0, proxy)
    assert len(out) == len(received) + 1 and out[-1].shape == (4,)  # weights + the functional embedding
    masks1 = state[:3]
    assert not all(np.allclose(m, 1.0) for m in masks1)  # the masks trained
    # next round: other received weights; the masks start from the client's own, not from anything received
    received2 = [r + 1.0 for r in received]
    out2, state2, _ = client_round("fedpub", cg, received2, state, {**hp, "lr": 1e-12}, 5, 3, 2, 1, proxy)
    for m1, m2 in zip(masks1, state2[:3]):
        np.testing.assert_allclose(m1, m2, atol=1e-6)
    for o, r in zip(out2[:-1], received2):
        np.testing.assert_allclose(o, r, atol=1e-6)
    assert 0.0 <= met["mask_sparsity"] <= 1.0


def test_best_val_all_is_the_argmax_of_the_client_mean():
    val = np.array([[0.5, 0.7], [0.8, 0.6], [0.9, 0.5], [0.7, 0.7]])  # means 0.6, 0.7, 0.7, 0.7
    test = np.array([[0.1, 0.2], [0.3, 0.5], [0.9, 0.9], [1.0, 1.0]])
    acc, r = best_val_all(val, test)
    assert r == 1 and acc == pytest.approx(0.4)  # first maximum, as np.argmax


def test_split_and_metis_clients():
    s = split_nodes(1000, 0)
    assert s["train"].sum() == 200 and s["test"].sum() == 400 and s["val"].sum() == 400
    assert not (s["train"] & s["test"]).any() and (s["train"] | s["test"] | s["val"]).all()
    from reprolab.graph.citation_like import citation_like

    d = citation_like(n=300, d=200, class_vocab=10, comm_vocab=4, community_size=15, seed=0)
    parts = metis_parts(d.graph, 3)
    assert sorted(np.unique(parts)) == [0, 1, 2]
    cl = client_graphs(d.graph, d.X, d.y, split_nodes(300, 0), parts)
    assert sum(len(c.nodes) for c in cl) == 300
    src, dst = d.graph.edges()
    inside = sum(int((parts[src.numpy()] == parts[dst.numpy()]).sum()) for _ in [0])
    # every client's edges (minus self loops) are exactly the graph's edges inside its part
    assert sum(c.g.num_edges() - c.g.num_nodes() for c in cl) == inside


def test_generator_statistics_near_its_targets():
    from reprolab.graph.citation_like import citation_like, graph_stats

    d = citation_like(seed=0)
    st = graph_stats(d.graph, d.y.numpy(), d.X.numpy())
    assert st["nodes"] == 2708 and st["features"] == 1433 and st["classes"] == 7
    assert abs(st["mean_degree"] - 3.9) < 0.3
    assert abs(st["words_per_node"] - 18.2) < 1.5
    assert st["edge_homophily"] > 0.7
