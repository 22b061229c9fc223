"""Phase-transition model zoo (arXiv 2504.18072) and the shared landscape tools: each piece against an exact reference."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from reprolab.weightspace.landscape import (batched_cka, bezier_point, fit_bezier, fit_bezier_many, flat,
                                            hessian_trace, hvp,
                                            linear_cka, linear_path, loss_and_error, mode_connectivity,
                                            module_forward)
from reprolab.weightspace.phase_model_zoo import (MLP, assign_phase, average_aligned, crossfit_phase, mlp_forward,
                                                  mlp_forward_many, mlp_weights,
                                                  permute_mlp, phase_summary, seed_pairs, train_model, train_seeds,
                                                  weight_matching)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed=0, d_in=3, width=4, d_out=3):
    torch.manual_seed(seed)
    return MLP(d_in, width, d_out, depth=2)


def _data(n=20, d_in=3, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, d_out, (n,), generator=g)


def _full_hessian(model, X, y):
    theta0 = flat(model)
    f = module_forward(model)
    return torch.autograd.functional.hessian(lambda th: nn.functional.cross_entropy(f(th, X), y), theta0)


# ------------------------------------------------------------------------------------------------------ Hessian
def test_hvp_equals_full_hessian_times_v_over_batches():
    model = _tiny()
    X, y = _data()
    H = _full_hessian(model, X, y)
    v = [torch.randn_like(p) for p in model.parameters()]
    # two unequal batches: the batch-size-weighted mean of H_b v is H v of the mean loss (PyHessian's dataloader rule)
    hv = hvp(model, [(X[:7], y[:7]), (X[7:], y[7:])], v)
    ref = H @ parameters_to_vector(v)
    assert torch.allclose(parameters_to_vector(hv), ref, atol=1e-5)


def test_hutchinson_trace_converges_to_exact_trace():
    model = _tiny(1)
    X, y = _data(seed=1)
    exact = float(torch.trace(_full_hessian(model, X, y)))
    est, samples = hessian_trace(model, [(X, y)], max_iter=3000, tol=0.0, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 3000
    se = np.std(samples) / np.sqrt(len(samples))
    assert abs(est - exact) < 4 * se + 1e-6
    # each Rademacher sample is unbiased: the mean of v^T H v over all 2^P sign vectors is tr(H); check by the
    # identity E[v^T H v] = tr(H) + sum_{i != j} H_ij E[v_i v_j] with E[v_i v_j] = 0, i.e. samples differ from tr(H)
    assert np.std(samples) > 0


@pytest.mark.parametrize("tol", [0.3, 0.05, 1e-3])
def test_hutchinson_stops_by_pyhessian_rule(tol):
    """PyHessian hessian.trace: stop at the first probe where |mean - previous mean| / (previous mean + 1e-6) < tol."""
    model = _tiny(2)
    X, y = _data(seed=2)
    _, samples = hessian_trace(model, [(X, y)], max_iter=60, tol=tol, generator=torch.Generator().manual_seed(1))
    prev, stop = 0.0, None
    for k in range(len(samples)):
        mean = float(np.mean(samples[:k + 1]))
        if abs(mean - prev) / (prev + 1e-6) < tol:
            stop = k + 1
            break
        prev = mean
    assert len(samples) == (stop if stop is not None else 60)
    assert stop is None or stop == len(samples)


# ----------------------------------------------------------------------------------------------------------- CKA
def _naive_cka(X, Y):
    n = len(X)
    Hc = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ Hc @ B @ Hc)  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_linear_cka_matches_gram_formula_and_invariances():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30, 5)), rng.normal(size=(30, 4))
    assert linear_cka(X, Y) == pytest.approx(_naive_cka(X, Y), rel=1e-10)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(X @ Q, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)  # orthogonal transform
    assert linear_cka(3.7 * X, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)  # isotropic scale
    assert linear_cka(X + 5.0, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)  # translation (centred)
    assert linear_cka(X, X) == pytest.approx(1.0)
    A = rng.normal(size=(5, 5))  # a general (non-orthogonal) map changes it
    assert abs(linear_cka(X @ A, Y) - linear_cka(X, Y)) > 1e-3


def test_batched_cka_is_mean_over_batches():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(25, 3)), rng.normal(size=(25, 3))
    want = np.mean([linear_cka(X[:10], Y[:10]), linear_cka(X[10:20], Y[10:20]), linear_cka(X[20:], Y[20:])])
    assert batched_cka(X, Y, 10, 10) == pytest.approx(want)
    assert batched_cka(X, Y, 10, 1) == pytest.approx(linear_cka(X[:10], Y[:10]))


# --------------------------------------------------------------------------------------------- mode connectivity
def test_mode_connectivity_of_known_curves():
    ts = np.linspace(0, 1, 5)
    bump = 1.0 + 2.0 * ts * (1 - ts) * 4  # ends 1, peak 3 at t = 0.5: a barrier of 2
    assert mode_connectivity(bump) == pytest.approx(-2.0)
    dip = 2.0 - 4 * ts * (1 - ts)  # ends 2, middle 1: better in the middle, mc = +1
    assert mode_connectivity(dip) == pytest.approx(1.0)
    assert mode_connectivity([0.3, 0.3, 0.3]) == 0.0
    # the official rule picks the largest |deviation|, with its sign
    assert mode_connectivity([1.0, 0.8, 1.5, 1.0]) == pytest.approx(-0.5)


def test_linear_path_of_quadratic_and_bezier_ends():
    a, b = torch.tensor([-1.0]), torch.tensor([1.0])
    vals = linear_path(lambda th: float(1 - th[0] ** 2), a, b, [0.0, 0.25, 0.5, 1.0])
    assert vals == pytest.approx([0.0, 0.75, 1.0, 0.0])  # f(x) = 1 - x^2 on x = -1 + 2t
    assert mode_connectivity(linear_path(lambda th: float(th[0] ** 2), a, b, np.linspace(0, 1, 5))) == pytest.approx(1.0)
    m = torch.tensor([5.0])
    assert torch.equal(bezier_point(0.0, a, m, b), a) and torch.equal(bezier_point(1.0, a, m, b), b)
    assert float(bezier_point(0.5, a, m, b)) == pytest.approx(0.25 * -1 + 0.5 * 5 + 0.25 * 1)


def test_fit_bezier_finds_a_path_around_a_barrier():
    """Two minima of a loss with a wall on the straight line between them: the trained bend goes around it."""
    # a "model" whose logits depend on theta (2,) so that the loss is low at (+-1, 0) and high near the origin
    X = torch.zeros(64, 1)
    y = torch.zeros(64, dtype=torch.long)

    def fwd(th, X):
        wall = 4.0 * torch.exp(-(th[0] ** 2 + (th[1] + 0.15) ** 2) / 0.1)  # bump just off the straight line
        basin = (th[0] ** 2 - 1) ** 2 + 0.1 * th[1] ** 2
        z = (wall + basin).expand(len(X))
        return torch.stack([-z, z], 1)

    a, b = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])
    f = lambda th: loss_and_error(fwd, th, X, y)[0]  # noqa: E731
    ts = np.linspace(0, 1, 11)
    lin = mode_connectivity(linear_path(f, a, b, ts))
    bend = fit_bezier(fwd, a, b, X, y, epochs=60, batch_size=64, lr=0.05, weight_decay=0.0,
                      generator=torch.Generator().manual_seed(0))
    from reprolab.weightspace.landscape import bezier_path
    bez = mode_connectivity(bezier_path(f, a, bend, b, ts))
    assert lin < -5.0 and bez > lin + 4.0  # measured: about -7.7 straight, -1.6 along the trained curve


# ------------------------------------------------------------------------------------------------ weight matching
def test_weight_matching_recovers_a_hidden_permutation_and_keeps_the_function():
    torch.manual_seed(0)
    model = MLP(5, 7, 3)
    ws = mlp_weights(model)
    true = [torch.randperm(7), torch.randperm(7)]
    wb = permute_mlp(ws, true)
    X = torch.randn(11, 5)
    mb = MLP(5, 7, 3)
    from reprolab.weightspace.phase_model_zoo import load_weights
    load_weights(mb, wb)
    assert torch.allclose(mb(X), model(X), atol=1e-6)  # permuting hidden units keeps the function
    perms = weight_matching(ws, wb, generator=torch.Generator().manual_seed(0))
    back = permute_mlp(wb, perms)
    for w0, w1 in zip(ws, back):
        assert torch.equal(w0, w1)  # aligned exactly back onto the reference


def test_weight_matching_objective_beats_identity_and_random_perms():
    torch.manual_seed(1)
    wa, wb = mlp_weights(MLP(4, 6, 3)), mlp_weights(MLP(4, 6, 3))
    perms = weight_matching(wa, wb, generator=torch.Generator().manual_seed(0))
    score = lambda ws: sum(float((a * b).sum()) for a, b in zip(wa, ws))  # noqa: E731
    best = score(permute_mlp(wb, perms))
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        assert best >= score(permute_mlp(wb, [torch.randperm(6, generator=g), torch.randperm(6, generator=g)])) - 1e-9


def test_weight_matching_is_the_brute_force_optimum_for_one_hidden_layer():
    """One hidden layer: one permutation, one linear assignment of <W1a, P W1b> + <W2a, W2b P^T>, so coordinate
    descent must reach the maximum over all 5! permutations (both layers' terms count)."""
    import itertools
    for seed in range(3):
        torch.manual_seed(10 + seed)
        wa, wb = mlp_weights(MLP(3, 5, 4, depth=1)), mlp_weights(MLP(3, 5, 4, depth=1))
        score = lambda ws: sum(float((a * b).sum()) for a, b in zip(wa, ws))  # noqa: E731
        best = max(score(permute_mlp(wb, [torch.tensor(p)])) for p in itertools.permutations(range(5)))
        got = score(permute_mlp(wb, weight_matching(wa, wb, generator=torch.Generator().manual_seed(0))))
        assert got == pytest.approx(best, abs=1e-6)


def test_average_aligned_is_half_sum_of_reference_and_aligned():
    ma, mb = _tiny(0, 4, 5, 3), _tiny(1, 4, 5, 3)
    avg, wb = average_aligned(ma, mb, torch.Generator().manual_seed(0))
    for a, w, b in zip(mlp_weights(ma), avg, wb):
        assert torch.allclose(w, 0.5 * (a + b))
    plain, same = average_aligned(ma, mb, align=False)
    for a, w, b in zip(mlp_weights(ma), plain, mlp_weights(mb)):
        assert torch.allclose(w, 0.5 * (a + b))


# -------------------------------------------------------------------------------------------------------- training
def test_train_seeds_equals_separate_runs():
    X, y = _data(n=37, d_in=6, d_out=4, seed=3)
    cfg = {"depth": 2, "epochs": 3, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    together = train_seeds(X, y, 5, 8, [3, 7], cfg)
    for s, m in zip([3, 7], together):
        alone = train_model(X, y, 5, 8, s, cfg)
        for w0, w1 in zip(mlp_weights(alone), mlp_weights(m)):
            assert torch.allclose(w0, w1, atol=1e-5), s


def test_fit_bezier_many_equals_separate_fits():
    """K bends trained together (batched forward, summed loss) = K fit_bezier runs with the same generators."""
    X, y = _data(n=29, d_in=4, d_out=3, seed=5)
    ms = [_tiny(s, 4, 5, 3) for s in range(4)]
    shapes = [tuple(l.weight.shape) for l in ms[0].layers]
    a = torch.stack([flat(ms[0]), flat(ms[2])])
    b = torch.stack([flat(ms[1]), flat(ms[3])])
    kw = dict(epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-3)
    many = fit_bezier_many(lambda th, X: mlp_forward_many(th, X, shapes), a, b, X, y,
                           [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)], **kw)
    for k, gs in enumerate((7, 8)):
        one = fit_bezier(lambda th, X: mlp_forward(th, X, shapes), a[k], b[k], X, y,
                         generator=torch.Generator().manual_seed(gs), **kw)
        assert torch.allclose(many[k], one, atol=1e-5), k
        assert not torch.allclose(one, 0.5 * (a[k] + b[k]), atol=1e-3)  # the bend moved
    # the weight-decay term counts: without it the bend differs
    nowd = fit_bezier_many(lambda th, X: mlp_forward_many(th, X, shapes), a, b, X, y,
                           [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
                           **dict(kw, weight_decay=0.0))
    assert not torch.allclose(nowd, many, atol=1e-5)


def test_mlp_forward_matches_module():
    m = _tiny(4, 6, 5, 3)
    X = torch.randn(9, 6)
    shapes = [tuple(l.weight.shape) for l in m.layers]
    assert torch.allclose(mlp_forward(flat(m), X, shapes), m(X), atol=1e-6)
    assert torch.allclose(module_forward(m)(flat(m), X), m(X))
    th = torch.stack([flat(m), flat(_tiny(5, 6, 5, 3))])
    Xs = torch.randn(2, 9, 6)
    many = mlp_forward_many(th, Xs, shapes)
    for k in range(2):
        assert torch.allclose(many[k], mlp_forward(th[k], Xs[k], shapes), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- phase rule
@pytest.mark.parametrize("loss,mc,cka,want", [
    (1.0, -0.1, 0.5, "I"), (1.0, 0.05, 0.5, "II"), (1.0, -0.005, 0.5, "II"),
    (0.01, -0.1, 0.99, "III"), (0.01, 0.0, 0.5, "IV-A"), (0.01, -0.005, 0.95, "IV-B")])
def test_assign_phase_table(loss, mc, cka, want):
    assert assign_phase(loss, mc, cka, loss_threshold=0.1, mc_eps=0.01, cka_threshold=0.9) == want


def test_seed_pairs_and_phase_summary():
    assert seed_pairs([0, 1, 2, 3]) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError):
        seed_pairs([0, 1, 2])
    cfg = {"loss_threshold": 0.1, "mc_eps": 0.01, "cka_threshold": 0.9}
    P = lambda loss, mc, cka, avg, ends: {"ends_train_loss": loss, "mc_bezier_train_error": mc, "cka": cka,  # noqa
                                          "avg_test_acc": avg, "ends_test_acc": ends, "avg_test_loss": 0.0,
                                          "ends_test_loss": 0.0, "plain_avg_test_acc": 0.0}
    # cell A: pairs 2-3 and 4-5 say IV (mc ~ 0), pair 0-1 alone says III: for 0-1 the cell is IV (cross-fitted)
    cell_a = {"per_pair": {"0-1": P(0.01, -0.2, 0.95, 0.9, 0.8), "2-3": P(0.01, 0.0, 0.95, 0.5, 0.5),
                           "4-5": P(0.01, -0.004, 0.95, 0.5, 0.5)}}
    # cell B: the other pairs say III, pair 0-1 alone says IV: for 0-1 it is III
    cell_b = {"per_pair": {"0-1": P(0.01, 0.0, 0.95, 0.6, 0.9), "2-3": P(0.01, -0.1, 0.95, 0.5, 0.5),
                           "4-5": P(0.01, -0.03, 0.95, 0.5, 0.5)}}
    # cell C: high loss everywhere, positive mc: II
    cell_c = {"per_pair": {k: P(1.0, 0.05, 0.3, 0.3, 0.2) for k in ("0-1", "2-3", "4-5")}}
    cells = [cell_a, cell_b, cell_c]
    assert crossfit_phase(cell_a, "0-1", cfg) == "IV-B" and crossfit_phase(cell_b, "0-1", cfg) == "III"
    assert crossfit_phase(cell_a, "4-5", cfg) == "III"  # mean of 0-1 and 2-3: mc -0.1
    s = phase_summary(cells, ["0-1", "2-3", "4-5"], cfg)["0-1"]
    assert s["n_cells_low"] == 1 and s["n_cells_high"] == 1
    assert s["low_avg_test_acc"] == pytest.approx(0.9) and s["low_ends_test_acc"] == pytest.approx(0.8)
    assert s["high_avg_test_acc"] == pytest.approx(0.6) and s["high_ends_test_acc"] == pytest.approx(0.9)
    assert s["n_distinct_phases_pair"] == 3  # IV, III, II
    # a looser cut moves cell B (others' mean mc -0.065) only when mc_eps > 0.065
    assert phase_summary(cells, ["0-1", "2-3", "4-5"], cfg, mc_eps=0.1)["0-1"]["n_cells_low"] == 2
