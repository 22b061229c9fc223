"""Search and rank code of reprolab.nas against independent references: exhaustive search on small spaces, the exact
ZDT1 front, hand-computed hypervolumes and rank statistics, brute-force Pareto fronts."""
import itertools

import numpy as np
import pytest

from reprolab.nas import rank as R
from reprolab.nas import search as SR


# ------------------------------------------------------------------------------------------------------ rank metrics
def test_rank_metrics_on_hand_examples():
    truth = [1, 2, 3, 4]
    assert R.kendall_tau([10, 20, 30, 40], truth) == pytest.approx(1.0)
    assert R.kendall_tau([4, 3, 2, 1], truth) == pytest.approx(-1.0)
    # one adjacent swap: 5 concordant, 1 discordant pair of 6 -> (5 - 1) / 6
    assert R.kendall_tau([1, 3, 2, 4], truth) == pytest.approx(4 / 6)
    # Spearman: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert R.spearman([1, 3, 2, 4], truth) == pytest.approx(0.8)
    assert R.topk_overlap([0.9, 0.1, 0.8, 0.2], [5, 6, 1, 0], 2) == pytest.approx(0.5)  # {0,2} vs {1,0}
    assert R.topk_overlap([0.9, 0.1, 0.8, 0.2], [5, 0, 6, 1], 2) == pytest.approx(1.0)
    assert R.regret(92.0, [90.0, 94.0, 93.0]) == pytest.approx(2.0)
    # best by pred is index 0 (truth 90); best truth 94 -> regret 4; among top-2 by pred {0, 2}: 93 -> regret 1
    assert R.best_found_regret([5, 1, 4], [90, 94, 93], 1) == pytest.approx(4.0)
    assert R.best_found_regret([5, 1, 4], [90, 94, 93], 2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        R.kendall_tau([1, 2], [1, 2, 3])


def test_top_k_ties_are_deterministic():
    assert list(R.top_k([1, 3, 3, 2], 2)) == [1, 2]


def test_rank_report_intervals_match_claims():
    from reprolab.claims import interval

    truth = np.arange(10.0)
    rng = np.random.default_rng(0)
    preds = [truth + rng.normal(0, s, 10) for s in (1.0, 2.0, 3.0)]
    rep = R.rank_report(preds, truth, k=3)
    taus = [R.kendall_tau(p, truth) for p in preds]
    assert rep["kendall_tau"]["per_seed"] == pytest.approx(taus)
    est, ci = interval(taus, "value")
    assert rep["kendall_tau"]["mean"] == pytest.approx(est) and rep["kendall_tau"]["ci95"] == pytest.approx(ci)
    assert ci[0] < est < ci[1]


# ------------------------------------------------------------------------------------------------- single objective
def _tiny_space(seed=0, n_edges=4, n_ops=4):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n_edges, n_ops))
    pair = rng.normal(scale=0.3, size=(n_ops, n_ops))  # a small interaction between edges 0 and 1

    def score(a):
        return float(sum(W[e, o] for e, o in enumerate(a)) + pair[a[0], a[1]])

    space = list(itertools.product(range(n_ops), repeat=n_edges))
    return space, score, n_edges, n_ops


def _mutate(n_edges, n_ops):
    def mutate(a, rng):
        a = list(a)
        e = int(rng.integers(n_edges))
        a[e] = int(rng.choice([o for o in range(n_ops) if o != a[e]]))
        return tuple(a)
    return mutate


def test_evolution_finds_the_exhaustive_optimum_and_beats_random_search():
    space, score, n_edges, n_ops = _tiny_space()
    best = max(space, key=score)  # exhaustive search: the reference
    sample = lambda rng: tuple(int(v) for v in rng.integers(n_ops, size=n_edges))
    re_regret, rs_regret = [], []
    for seed in range(8):
        re = SR.regularized_evolution(sample, _mutate(n_edges, n_ops), score, 80, np.random.default_rng(seed),
                                      population_size=10, sample_size=3)
        rs = SR.random_search(sample, score, 80, np.random.default_rng(seed))
        assert len(re.archs) == 80 and re.scores == [score(a) for a in re.archs]
        assert re.incumbent_trajectory()[-1] == pytest.approx(re.best_score)
        re_regret.append(score(best) - re.best_score)
        rs_regret.append(score(best) - rs.best_score)
    assert np.mean(re_regret) < np.mean(rs_regret)
    assert np.mean(np.array(re_regret) == 0) >= 0.75  # RE reaches the exhaustive optimum in most seeds


def test_evolution_mutates_the_best_of_the_tournament():
    """With population 1 and any sample size, every child is a one-edge mutation of the previous member."""
    space, score, n_edges, n_ops = _tiny_space(1)
    sample = lambda rng: tuple(int(v) for v in rng.integers(n_ops, size=n_edges))
    r = SR.regularized_evolution(sample, _mutate(n_edges, n_ops), score, 20, np.random.default_rng(0), 1, 2)
    for a, b in zip(r.archs, r.archs[1:]):
        assert sum(x != y for x, y in zip(a, b)) == 1
    # a tournament much larger than the population contains its best member (P(miss) = (4/5)**200): every child after
    # the initial population is a one-edge mutation of the best of the previous 5 members (aging: only those 5 live)
    r = SR.regularized_evolution(sample, _mutate(n_edges, n_ops), score, 40, np.random.default_rng(0), 5, 200)
    for t in range(5, 40):
        alive = list(range(t - 5, t))
        parent = r.archs[max(alive, key=lambda i: r.scores[i])]
        assert sum(x != y for x, y in zip(parent, r.archs[t])) == 1


def test_evolution_on_nb201_beats_random_search():
    from reprolab.nas.benchmarks import nb201_accuracy
    from reprolab.nas.space201 import mutate

    acc = nb201_accuracy()
    top = max(acc.values())
    re_best, rs_best = [], []
    for seed in range(5):
        re = SR.regularized_evolution(SR.nb201_sampler, mutate, acc.__getitem__, 150, np.random.default_rng(seed),
                                      population_size=20, sample_size=5)
        rs = SR.random_search(SR.nb201_sampler, acc.__getitem__, 150, np.random.default_rng(seed))
        re_best.append(re.best_score)
        rs_best.append(rs.best_score)
    assert np.mean(re_best) > np.mean(rs_best) and top - np.mean(re_best) < 1.0


# ---------------------------------------------------------------------------------------------- multi-objective
def test_hypervolume_against_hand_computation():
    F = np.array([[1, 3], [2, 2], [3, 1]])
    # staircase under (4, 4): 3*1 + 2*1 + 1*1 = 6
    assert SR.hypervolume(F, [4, 4]) == pytest.approx(6.0)
    # a dominated point and a point beyond the reference add nothing
    assert SR.hypervolume(np.vstack([F, [[3, 3], [5, 0]]]), [4, 4]) == pytest.approx(6.0)
    assert SR.hypervolume([[1, 1]], [3, 2]) == pytest.approx(2.0)
    assert SR.hypervolume([[5, 5]], [4, 4]) == 0.0


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(0)
    F = rng.integers(0, 6, size=(60, 2)).astype(float)
    brute = [i for i in range(len(F))
             if not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i]) for j in range(len(F)))]
    assert list(SR.pareto_front(F)) == brute


def test_nsga2_on_zdt1_reaches_the_exact_hypervolume():
    """ZDT1 (n=5): front f2 = 1 - sqrt(f1), f1 in [0, 1]; HV at ref (1.1, 1.1) = 0.1 + 2/3 + 0.11."""
    def zdt1(x):
        g = 1 + 9 * np.sum(x[1:]) / (len(x) - 1)
        return [x[0], g * (1 - np.sqrt(x[0] / g))]

    exact = 0.1 + 2 / 3 + 0.11
    out = SR.nsga2(zdt1, 5, 0.0, 1.0, pop_size=40, n_gen=120, seed=1, integer=False)
    hv = SR.hypervolume(out["front_F"], [1.1, 1.1])
    assert 0.97 * exact < hv <= exact + 1e-9
    assert out["n_evals"] == len(out["F"]) == 40 * 120


def test_nsga2_integer_matches_exhaustive_front():
    """A 4-variable integer space (5^4 = 625 points): NSGA-II's front hypervolume vs the exhaustive front's."""
    rng = np.random.default_rng(3)
    W = rng.uniform(size=(4, 5))
    cost = np.arange(5) ** 1.5

    def f(x):
        return [-float(sum(W[e, v] for e, v in enumerate(x))), float(sum(cost[v] for v in x))]

    allx = list(itertools.product(range(5), repeat=4))
    F = np.array([f(x) for x in allx])
    ref = F.max(0) + 1.0
    exact = SR.hypervolume(F[SR.pareto_front(F)], ref)
    out = SR.nsga2(f, 4, 0, 4, pop_size=30, n_gen=30, seed=0)
    assert out["X"].dtype.kind == "i" and out["X"].min() >= 0 and out["X"].max() <= 4
    assert SR.hypervolume(out["front_F"], ref) > 0.98 * exact


def test_dedup_and_sampler():
    rng = np.random.default_rng(0)
    cells = [SR.nb201_sampler(rng) for _ in range(5)]
    assert all(len(c) == 6 and all(0 <= o < 5 for o in c) for c in cells)
    assert SR.dedup([(1,), (2,), (1,)]) == [(1,), (2,)]
