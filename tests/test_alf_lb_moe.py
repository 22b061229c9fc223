"""ALF-LB (arXiv 2512.03915 / 2408.15664): the bias update, biased top-K, the LP and its dual, the online closed form
and the MoE layer, each against an independent reference (naive loops, brute force, scipy, Monte Carlo)."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import softmax

from reprolab.moe import alf_lb as A


def test_update_bias_matches_naive_loop_numpy_and_torch():
    rng = np.random.default_rng(0)
    load = rng.integers(0, 50, size=9).astype(float)
    load[3] = load.mean()  # an expert exactly at the mean gets no update
    b = rng.normal(size=9)
    want = b.copy()
    mean = sum(load) / len(load)
    for i in range(len(load)):
        if load[i] < mean:
            want[i] += 0.01
        elif load[i] > mean:
            want[i] -= 0.01
    np.testing.assert_allclose(A.update_bias(b, load, 0.01), want)
    got = A.update_bias(torch.tensor(b), torch.tensor(load), 0.01)
    np.testing.assert_allclose(got.numpy(), want)


def test_biased_topk_selects_with_bias_but_weights_without():
    torch.manual_seed(0)
    scores = torch.rand(20, 6)
    bias = torch.randn(6)
    idx, w = A.biased_topk(scores, bias, 2)
    for t in range(20):
        order = sorted(range(6), key=lambda i: -(scores[t, i] + bias[i]).item())[:2]
        assert set(idx[t].tolist()) == set(order)
        for j in range(2):
            assert w[t, j] == scores[t, idx[t, j]]  # unbiased gating weight
    idx0, _ = A.biased_topk(scores, None, 2)
    assert set(idx0[0].tolist()) == set(torch.topk(scores[0], 2).indices.tolist())
    assert not torch.equal(idx, idx0)  # this bias changes some selection


def test_max_vio_naive():
    load = [3, 7, 5, 5]
    mean = sum(load) / 4
    assert A.max_vio(load) == pytest.approx(max(load) / mean - 1)
    assert A.max_vio([4, 4, 4]) == 0.0


def test_switch_aux_loss_matches_megatron_formula_and_is_one_when_balanced():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(30, 5), -1)
    tokens = torch.bincount(torch.topk(probs, 2).indices.reshape(-1), minlength=5)
    want = (probs.sum(0) * tokens).sum() * 5 / (2 * 30 * 30)  # Megatron switch_load_balancing_loss_func, coeff 1
    assert A.switch_aux_loss(probs, tokens, 2).item() == pytest.approx(want.item(), rel=1e-6)
    uniform = torch.full((10, 5), 0.2)
    assert A.switch_aux_loss(uniform, torch.full((5,), 4), 2).item() == pytest.approx(1.0)


def brute_force_lp(gamma, k):
    """Best balanced integral assignment by enumeration (the LP is a transportation problem: integral optimum)."""
    T, E = gamma.shape
    L = T * k // E
    best = -np.inf
    for choice in itertools.product(list(itertools.combinations(range(E), k)), repeat=T):
        load = np.bincount(np.concatenate(choice), minlength=E)
        if np.all(load == L):
            best = max(best, sum(gamma[t, list(c)].sum() for t, c in enumerate(choice)))
    return best


def test_lp_optimum_matches_brute_force_and_strong_duality():
    rng = np.random.default_rng(3)
    gamma = rng.normal(size=(4, 4))
    V, x, b = A.lp_optimum(gamma, 2)
    assert V == pytest.approx(brute_force_lp(gamma, 2), abs=1e-9)
    assert np.allclose(x.sum(1), 2) and np.allclose(x.sum(0), 2)
    assert A.dual_value(gamma, b, 2, 2.0) == pytest.approx(V, abs=1e-9)  # strong duality at HiGHS's multipliers


def test_lp_optimum_k1_matches_linear_sum_assignment():
    rng = np.random.default_rng(4)
    T, E = 12, 4
    gamma = rng.normal(size=(T, E))
    slots = np.repeat(gamma, T // E, axis=1)  # each expert has L = T/E slots
    r, c = linear_sum_assignment(-slots)
    V, _, _ = A.lp_optimum(gamma, 1)
    assert V == pytest.approx(slots[r, c].sum(), abs=1e-9)


def test_dual_value_is_lagrangian_at_topk_and_upper_bounds_everything():
    rng = np.random.default_rng(5)
    gamma, b = rng.normal(size=(10, 5)), rng.normal(size=5)
    g = A.dual_value(gamma, b, 2, 4.0)
    x = A.route_topk(gamma, b, 2)
    assert A.lagrangian(gamma, x, b, 4.0) == pytest.approx(g)
    for _ in range(50):  # any other routing with 2 experts per token has a smaller Lagrangian
        y = np.zeros_like(x)
        for t in range(10):
            y[t, rng.choice(5, 2, replace=False)] = True
        assert A.lagrangian(gamma, y, b, 4.0) <= g + 1e-12
    V, _, _ = A.lp_optimum(gamma, 2)
    assert g >= V - 1e-9  # weak duality


def test_deterministic_run_preference_rule_and_monotone_checks_and_naive_replay():
    rng = np.random.default_rng(6)
    gamma = A.skewed_affinities(40, 4, 1.0, 0.3, rng)
    r = A.alf_lb_deterministic(gamma, 2, 0.01, 200)
    assert r["n_moves"] > 0 and r["pref_violations"] == 0
    assert r["g_increase_under_cond"] == 0 and r["step_bound_violations"] == 0
    b = np.zeros(4)  # naive replay of the bias sequence
    for _ in range(200):
        load = [sum(1 for t in range(40) if i in np.argsort(-(gamma[t] + b))[:2]) for i in range(4)]
        b = b + 0.01 * np.sign(np.mean(load) - np.array(load))
    np.testing.assert_allclose(r["b"], b)
    assert r["maxvio"][-1] < r["maxvio"][0]


def test_online_closed_form_against_monte_carlo():
    rng = np.random.default_rng(7)
    mu, b = np.array([0.3, -0.2, 0.5, -0.6]), np.array([0.1, 0.0, -0.3, 0.2])
    G = rng.gumbel(size=(400_000, 4))
    mc = (mu + b + G).max(1).mean() - b.mean()
    assert mc == pytest.approx(A.online_dual(mu, b) + np.euler_gamma, abs=5e-3)
    share = np.bincount((mu + b + G).argmax(1), minlength=4) / len(G)
    np.testing.assert_allclose(share, softmax(mu + b), atol=3e-3)
    b_star = -(mu - mu.mean())
    assert A.online_dual(mu, b_star) == pytest.approx(math.log(4) + mu.mean())
    assert A.online_dual(mu, b) > A.online_dual(mu, b_star)


def test_regret_bound_harmonic_and_fit():
    got = A.ogd_regret_bound([5], c=4.0, t0=2.0, mu_sc=0.5, D2=3.0, G2=0.75)[0]
    want = ((1 + 2) / 4 - 0.5) * 3 / 2 + 4 * 0.75 / 2 * sum(1 / (t + 2) for t in range(1, 6))
    assert got == pytest.approx(want)
    x = np.linspace(1, 10, 20)
    a, beta, r2 = A.fit_r2(x, 2 + 3 * x)
    assert (a, beta, r2) == pytest.approx((2, 3, 1))


def test_online_run_sign_rule_is_alf_update_and_regret_is_nonnegative():
    mu = np.array([0.4, -0.1, -0.3])
    out = A.online_run(mu, 16, 50, "sign", 1.0, 4.0, np.random.default_rng(0))
    assert np.all(out["inst_regret"] >= -1e-12)
    rng, b = np.random.default_rng(0), np.zeros(3)  # naive replay
    for t in range(1, 51):
        load = np.bincount(np.argmax(mu + b + rng.gumbel(size=(16, 3)), axis=1), minlength=3)
        b = b + 1.0 / (t + 4.0) * np.sign(load.mean() - load)
    np.testing.assert_allclose(out["b"], b)


@pytest.mark.parametrize("rule", ["grad", "const"])
def test_online_run_gradient_rules_match_naive_replay(rule):
    """The primal-dual gradient step b += u_t (1/E - share), u_t = c/(t + t0) ('grad') or c/(1 + t0) ('const'), and
    the exact pseudo-regret, replayed with plain Python loops from the same Gumbel draws."""
    mu = np.array([0.5, -0.2, 0.1, -0.4])
    E, n, T, c, t0 = 4, 16, 60, 3.0, 2.0
    out = A.online_run(mu, n, T, rule, c, t0, np.random.default_rng(5))
    rng, b = np.random.default_rng(5), [0.0] * E
    f_star = math.log(E) + sum(mu) / E
    for t in range(1, T + 1):
        f = math.log(sum(math.exp(mu[i] + b[i]) for i in range(E))) - sum(b) / E
        assert out["inst_regret"][t - 1] == pytest.approx(f - f_star, abs=1e-12)
        draws = mu + np.array(b) + rng.gumbel(size=(n, E))
        counts = [0] * E
        for row in draws:
            counts[max(range(E), key=lambda i: row[i])] += 1
        u = c / (t + t0) if rule == "grad" else c / (1 + t0)
        b = [b[i] + u * (1.0 / E - counts[i] / n) for i in range(E)]
    np.testing.assert_allclose(out["b"], b, atol=1e-12)
    assert abs(sum(b)) < 1e-12  # the gradient step keeps the biases on the zero-sum subspace


def test_lm_alf_step_lowers_bias_of_overloaded_and_raises_underloaded():
    """One ALF-LB training step of the LM: recompute the step's per-layer expert loads independently (same seed, same
    initial parameters, same batch) and check the bias moved by -u on every overloaded expert (the most loaded one
    included), +u on every underloaded one (the least loaded included), 0 at the mean."""
    from reprolab.moe.smile import batch

    cfg = dict(d_model=16, heads=2, d_ff=16, layers=2, ctx=12, n_experts=4, top_k=2, score_func="softmax", lr=1e-2,
               batch_size=3, steps=1, eval_every=1, val_windows=2)
    ids = torch.randint(0, 9, (400,), generator=torch.Generator().manual_seed(0))
    u = 0.01
    out = A.train_moe_lm("alf", ids[:300], ids[300:], 9, cfg, seed=4, bias_rate=u)
    torch.manual_seed(4)
    ref = A.TopKMoELM(9, 16, 2, 16, 2, 12, 4, 2, "none")
    x, _ = batch(ids[:300], 3, 12, torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, _, idxs = ref(x)
    for layer, idx in enumerate(idxs):
        load = torch.bincount(idx.reshape(-1), minlength=4).tolist()
        bias, mean = out["bias"][layer], sum(load) / 4
        assert max(load) > mean > min(load)  # there is an imbalance to correct
        assert bias[load.index(max(load))] == pytest.approx(-u)  # most loaded expert: bias lowered
        assert bias[load.index(min(load))] == pytest.approx(u)  # least loaded expert: bias raised
        for i in range(4):
            assert bias[i] == pytest.approx(u if load[i] < mean else (-u if load[i] > mean else 0.0))


@pytest.mark.parametrize("balance", ["none", "aux", "alf"])
def test_topk_moe_matches_naive_dense(balance):
    torch.manual_seed(0)
    layer = A.TopKMoE(d=6, h=5, E=4, k=2, balance=balance)
    layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(9, 6)
    with torch.no_grad():
        y, aux, idx = layer(x)
        p = F.softmax(x @ layer.router.weight.T, -1)
        sel = p + layer.expert_bias if balance == "alf" else p
        ex = layer.experts
        for t in range(9):
            top = torch.topk(sel[t], 2).indices
            assert set(top.tolist()) == set(idx[t].tolist())
            want = sum(p[t, e] * (F.gelu(x[t] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]) for e in top.tolist())
            torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)
        if balance == "aux":
            load = torch.bincount(idx.reshape(-1), minlength=4).float()
            assert aux.item() == pytest.approx(4 * (p.mean(0) * load / 18).sum().item(), rel=1e-5)
        else:
            assert aux.item() == 0.0


def test_arms_share_initial_parameters():
    models = []
    for balance in ("none", "aux", "alf"):
        torch.manual_seed(3)
        models.append(A.TopKMoELM(vocab=11, d=8, heads=2, h=8, layers=2, ctx=6, E=4, k=2, balance=balance))
    for a, b in zip(models[0].state_dict().values(), models[2].state_dict().values()):
        assert torch.equal(a, b)
