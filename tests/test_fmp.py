"""FMP (arXiv 2312.12369) and the graph kit: each piece against an independent reference."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import APPNPConv, GraphConv  # noqa: E402

from reprolab.graph import accuracy, delta_eo, delta_sp, edge_homophily, fair_csbm, stratified_split  # noqa: E402
from reprolab.graph.fmp import FMPConv, project_dual, sensitive_incident_vector  # noqa: E402
from reprolab.graph.graphdata import graph_from_edges  # noqa: E402
from reprolab.paths import REPO_ROOT  # noqa: E402



pytestmark = pytest.mark.usefixtures("float64")  # tests/conftest.py


def small_problem(n=14, C=3, seed=0):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < 0.3, 1)
    src, dst = np.nonzero(upper)
    g = dgl.add_self_loop(graph_from_edges(src, dst, n))
    A = np.zeros((n, n))
    A[src, dst] = A[dst, src] = 1.0
    A += np.eye(n)
    dinv = 1.0 / np.sqrt(A.sum(1))
    A_hat = torch.tensor(dinv[:, None] * A * dinv[None, :])
    sens = torch.tensor(rng.integers(0, 2, n))
    sens[:2] = torch.tensor([0, 1])
    idx = torch.tensor(sorted(set(rng.choice(n, n // 2 + 2, replace=False).tolist()) | {0, 1}))
    H = torch.tensor(rng.standard_normal((n, C)) * 2)
    return g, A_hat, sens, idx, H


def dense_fmp(A_hat, H, s, K, lambda1, lambda2, proj, jacobian_at):
    """FMP written from the equations with a dense A_hat and per-row autograd softmax Jacobians."""
    gamma = 1 / (1 + lambda2)
    beta = 1 / (2 * gamma)
    S = s[None, :]  # (1, N)

    def jac_t(at_row, v_row):
        J = torch.autograd.functional.jacobian(lambda u: torch.softmax(u, 0), at_row)  # (C, C)
        return J.T @ v_row

    def correct(Y, z):
        U = S.T @ z[None, :]  # (N, C) = s^T z
        at = U if jacobian_at == "dual" else Y
        return torch.stack([jac_t(at[i], U[i]) for i in range(Y.shape[0])])

    def proj_fn(v):
        if proj == "linf":
            return torch.tensor([min(max(x, -lambda1), lambda1) for x in v.tolist()])
        if proj == "l2":
            r = float(torch.linalg.norm(v))
            return v if r <= lambda1 else v * lambda1 / r
        return v * 2 * lambda1 / (2 * lambda1 + beta)

    F = H.clone()
    for _ in range(K):
        Y = gamma * H + (1 - gamma) * A_hat @ F
        z = (S @ torch.softmax(Y, 1))[0] / (gamma * float(S @ S.T))
        F_bar = Y - gamma * correct(Y, z)
        z = proj_fn(z + beta * (S @ torch.softmax(F_bar, 1))[0])
        F = Y - gamma * correct(Y, z)
    return F


@pytest.mark.parametrize("proj,jacobian_at,lambda1", [("l2sq", "dual", 3.0), ("linf", "dual", 0.05),
                                                      ("l2", "primal", 0.05), ("l2sq", "primal", 30.0)])
def test_fmp_matches_dense_reference(proj, jacobian_at, lambda1):
    g, A_hat, sens, idx, H = small_problem()
    s = sensitive_incident_vector(sens, idx)
    conv = FMPConv(K=3, lambda1=lambda1, lambda2=2.0, proj=proj, jacobian_at=jacobian_at)
    got = conv(g, H, s)
    want = dense_fmp(A_hat, H, s, 3, lambda1, 2.0, proj, jacobian_at)
    assert torch.allclose(got, want, atol=1e-10)
    assert not torch.allclose(got, FMPConv(K=3, lambda1=0.0, lambda2=2.0)(g, H, s), atol=1e-4)  # the step acts


def test_propagation_is_graphconv_and_fmp_without_fairness_is_appnp():
    g, A_hat, sens, idx, H = small_problem(seed=1)
    conv = FMPConv(K=4, lambda1=0.0, lambda2=3.0)
    ref = GraphConv(3, 3, norm="both", weight=False, bias=False)(g, H)
    assert torch.allclose(conv.propagate(g, H), ref, atol=1e-12)
    assert torch.allclose(conv.propagate(g, H), A_hat @ H, atol=1e-12)
    appnp = APPNPConv(k=4, alpha=1 / (1 + 3.0))(g, H)  # H_{l+1} = (1 - alpha) A_hat H_l + alpha H_0
    assert torch.allclose(conv(g, H, sensitive_incident_vector(sens, idx)), appnp, atol=1e-12)


def test_primal_correction_is_the_gradient_of_the_fairness_term():
    g, A_hat, sens, idx, Y = small_problem(seed=2)
    s = sensitive_incident_vector(sens, idx)
    z = torch.tensor([0.7, -1.3, 0.4])
    Yv = Y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(z @ (s @ torch.softmax(Yv, 1)), Yv)  # d <z, s softmax(F)> / dF at F = Y
    assert torch.allclose(FMPConv(jacobian_at="primal").correction(Y, s, z), grad, atol=1e-12)


def test_incident_vector_is_difference_of_group_centres():
    g, A_hat, sens, idx, H = small_problem(seed=3)
    P = torch.softmax(H, 1)
    s = sensitive_incident_vector(sens, idx)
    g1 = [i for i in idx.tolist() if sens[i] == 1]
    g0 = [i for i in idx.tolist() if sens[i] == 0]
    want = sum(P[i] for i in g1) / len(g1) - sum(P[i] for i in g0) / len(g0)
    assert torch.allclose(s @ P, want, atol=1e-12)
    assert float(s.abs().sum()) == pytest.approx(2.0)
    assert set(torch.nonzero(s).flatten().tolist()) == set(idx.tolist())


def test_fmp_shrinks_the_group_gap_of_small_logits():
    data = fair_csbm(n=600, seed=1)
    g = data.graph_with_self_loops()
    s = sensitive_incident_vector(data.sens)
    H = 0.25 * (torch.randn(600, 2, generator=torch.Generator().manual_seed(0)) + torch.stack(
        [torch.zeros(600), 1.6 * data.sens - 0.8], 1))
    gap = lambda F: float((s @ torch.softmax(F, 1))[1])  # noqa: E731
    plain, fair = FMPConv(lambda1=0.0)(g, H, s), FMPConv(lambda1=30.0)(g, H, s)
    assert gap(fair) < 0.7 * gap(plain)


def test_projections_against_naive_and_optimality():
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = torch.tensor(rng.standard_normal(4) * 3)
        lam, beta = float(rng.uniform(0.1, 2)), float(rng.uniform(0.5, 3))
        p = project_dual(z, lam, beta, "linf")
        assert torch.allclose(p, torch.tensor([min(max(v, -lam), lam) for v in z.tolist()]))
        q = project_dual(z, lam, beta, "l2")
        assert float(q.norm()) <= lam + 1e-12
        for proj, P in (("linf", p), ("l2", q)):  # projection onto a convex set: <z - P, w - P> <= 0 for w in it
            for _ in range(10):
                w = torch.tensor(rng.uniform(-1, 1, 4))
                w = w.clamp(-lam, lam) if proj == "linf" else w * lam / max(float(w.norm()), lam)
                assert float((z - P) @ (w - P)) <= 1e-10
        # "l2sq" (official L2=True): argmin_v 1/2 ||v - z||^2 + beta/(4 lam) ||v||^2, found by gradient descent
        v = torch.zeros(4, requires_grad=True)
        opt = torch.optim.LBFGS([v], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((v - z) ** 2).sum() + beta / (4 * lam) * (v ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        assert torch.allclose(project_dual(z, lam, beta, "l2sq"), v.detach(), atol=1e-8)


def test_fairness_metrics_against_naive_loops():
    rng = np.random.default_rng(0)
    for _ in range(10):
        n = 200
        pred, y, s = (torch.tensor(rng.integers(0, 2, n)) for _ in range(3))
        idx = torch.tensor(rng.choice(n, 120, replace=False))

        def rate(cond):
            sel = [int(pred[i]) for i in idx.tolist() if cond(i)]
            return sum(sel) / len(sel)
        sp = abs(rate(lambda i: s[i] == 0) - rate(lambda i: s[i] == 1))
        eo = abs(rate(lambda i: s[i] == 0 and y[i] == 1) - rate(lambda i: s[i] == 1 and y[i] == 1))
        acc = sum(int(pred[i] == y[i]) for i in idx.tolist()) / len(idx)
        assert delta_sp(pred, s, idx) == pytest.approx(sp)
        assert delta_eo(pred, y, s, idx) == pytest.approx(eo)
        assert accuracy(pred, y, idx) == pytest.approx(acc)


@pytest.mark.parametrize("h_sens,h_label,label_gap", [(0.9, 0.7, 0.2), (0.6, 0.3, 0.5)])
def test_csbm_homophily_and_label_bias_match_parameters(h_sens, h_label, label_gap):
    data = fair_csbm(n=3000, mean_degree=12, h_sens=h_sens, h_label=h_label, label_gap=label_gap, seed=3)
    src, dst = data.graph.edges()
    assert not bool((src == dst).any())
    A = torch.zeros(3000, 3000, dtype=torch.bool)
    A[src, dst] = True
    assert torch.equal(A, A.T)
    # independent count over undirected pairs
    pairs = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())}
    same_s = sum(int(data.sens[a] == data.sens[b]) for a, b in pairs) / len(pairs)
    same_y = sum(int(data.y[a] == data.y[b]) for a, b in pairs) / len(pairs)
    assert same_s == pytest.approx(h_sens, abs=0.02) and same_y == pytest.approx(h_label, abs=0.02)
    assert edge_homophily(data.graph, data.sens) == pytest.approx(same_s)
    assert len(pairs) == pytest.approx(3000 * 12 / 2, rel=0.02)
    gap = float(data.y[data.sens == 1].float().mean() - data.y[data.sens == 0].float().mean())
    assert gap == pytest.approx(label_gap, abs=0.05)


def test_german_similarity_graph_is_nifty_rule_symmetric_without_self_loops():
    from reprolab.graph.fairness_graphs import german_credit_graph, similarity_edges

    X = np.random.default_rng(0).standard_normal((40, 5))
    got = set(zip(*similarity_edges(X, 0.8)))
    want = set()
    for i in range(40):  # NIFTY's build_relationship, one row at a time
        sims = [1 / (1 + np.linalg.norm(X[i] - X[j])) if j != i else -np.inf for j in range(40)]
        want |= {(i, j) for j in range(40) if j != i and sims[j] > 0.8 * max(sims)}
    assert got == {(int(a), int(b)) for a, b in want}

    data = german_credit_graph()
    src, dst = data.graph.edges()
    assert data.num_nodes == 1000 and not bool((src == dst).any())
    assert set(zip(src.tolist(), dst.tolist())) == set(zip(dst.tolist(), src.tolist()))
    assert int(data.graph.in_degrees().min()) >= 1
    assert int(data.sens.sum()) == 310 and int(data.y.sum()) == 700  # 310 women, 700 good credits (UCI)


def test_split_is_stratified_and_disjoint():
    y = torch.tensor([0] * 300 + [1] * 700)
    sp = stratified_split(y, seed=4)
    allidx = torch.cat(list(sp.values()))
    assert len(allidx) == 1000 and len(set(allidx.tolist())) == 1000
    assert float(y[sp["train"]].float().mean()) == pytest.approx(0.7, abs=0.005)


def test_unknown_and_online_datasets_raise():
    from reprolab.graph.fairness_graphs import load_fair_graph

    with pytest.raises(NotImplementedError, match="german_credit"):
        load_fair_graph("pokec_z")
    with pytest.raises(ValueError, match="allowed"):
        load_fair_graph("cora")


def test_notebook_has_parameters_cell():
    nb = json.loads((REPO_ROOT / "notebooks" / "fmp.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and 'paper: str = "fmp"' in "".join(tagged[0]["source"])


@pytest.mark.parametrize("scale", [0.05, 3.0])
def test_step_bound_holds_and_is_tight_for_small_logits(scale):
    """One FMP step (K = 1) against the dense reference: the change of every node's logit difference caused by the
    bias-mitigation step is <= the traced step_bound (binary softmax Jacobian p(1-p) <= 1/4), nearly attained when the
    logits are small (p ~ 1/2), and for balanced groups the bound is ~ proj x gap / 2 (the closed form)."""
    g, A_hat, _, _, _ = small_problem(n=40, C=2, seed=3)
    n = 40
    sens = torch.tensor([0, 1] * (n // 2))  # balanced groups, s on all nodes
    s = sensitive_incident_vector(sens)
    H = scale * (torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
                 + torch.stack([torch.zeros(n), 1.5 * sens - 0.75], 1))
    lam1, lam2 = 5.0, 3.0
    trace = []
    fair = FMPConv(K=1, lambda1=lam1, lambda2=lam2)(g, H, s, trace=trace)
    assert torch.allclose(fair, dense_fmp(A_hat, H, s, 1, lam1, lam2, "l2sq", "dual"))  # trace changes nothing
    plain = dense_fmp(A_hat, H, s, 1, 0.0, lam2, "l2sq", "dual")
    shift = ((fair[:, 1] - fair[:, 0]) - (plain[:, 1] - plain[:, 0])).abs()
    bound = trace[0]["step_bound"]
    assert float(shift.max()) <= bound * (1 + 1e-9)
    gamma, beta = 1 / (1 + lam2), (1 + lam2) / 2
    proj = 2 * lam1 / (2 * lam1 + beta)
    assert trace[0]["proj_factor"] == pytest.approx(proj)
    gap = float((s @ torch.softmax(gamma * H + (1 - gamma) * A_hat @ H, 1))[1])  # group gap of Y before the step
    assert trace[0]["gap_Y"] == pytest.approx(abs(gap))
    if scale < 1:
        assert float(shift.max()) > 0.95 * bound  # tight: p(1-p) ~ 1/4
        # closed form: z ~ proj (s p) / (gamma s s^T) (+ a beta-term of order 1/n), u_i = s_i z
        assert bound == pytest.approx(proj * abs(gap) / 2, rel=0.1)


def test_mitigation_shift_reports_the_flip_share_by_naive_count():
    data = fair_csbm(n=300, seed=2)
    g = data.graph_with_self_loops()
    s = sensitive_incident_vector(data.sens)
    H = torch.randn(300, 2, generator=torch.Generator().manual_seed(4)) * 0.3
    nodes = torch.arange(0, 300, 3)
    from reprolab.graph.fmp import mitigation_shift
    out = mitigation_shift(g, H, s, nodes, K=5, lambda1=30.0, lambda2=3.0)
    plain, fair = FMPConv(K=5, lambda1=0.0, lambda2=3.0)(g, H, s), FMPConv(K=5, lambda1=30.0, lambda2=3.0)(g, H, s)
    flips = sum(int((plain[i, 1] > plain[i, 0]) != (fair[i, 1] > fair[i, 0])) for i in nodes.tolist())
    assert out["flipped"] == pytest.approx(flips / len(nodes))
    assert out["mean_abs_shift"] == pytest.approx(float(((fair - plain)[nodes, 1] - (fair - plain)[nodes, 0]).abs().mean()))
    assert out["max_step_bound"] > 0 and out["proj_factor"] == pytest.approx(60 / (60 + 2))
