"""Auto-GNN (RCE) on NAS-Bench-Graph: controller gradient, one-class moves, tiny-table search, exact random search."""
import itertools

import numpy as np
import pytest
import torch

from reprolab.nas import auto_gnn as A
from reprolab.nas.search import random_search


def test_reinforce_gradient_matches_hand_computation():
    torch.manual_seed(0)
    ctrl = A.ConservativeController((3, 4, 5), hid=8)
    best = (1, 2, 3)
    child, logp, ent, k = ctrl.propose(best, np.random.default_rng(3), lambda a: True)
    adv = 0.37
    assert logp.shape == (2,) and ent.shape == (2,)  # one log-prob / entropy per decision (class, then value)
    (-logp.sum() * adv).backward()
    # hand: the class controller k's logits l = c tanh(z / T), z = W h_k + b, current value masked out
    with torch.no_grad():
        x, hc = ctrl.zero_state()
        for j, v in enumerate(best):
            h, hc = ctrl.step(ctrl.embed(j, v), hc)
            if j == k:
                hk = h
        z = ctrl.decoders[k](hk)[0]
        c, T = ctrl.tanh_c, ctrl.temperature
        l = c * torch.tanh(z / T)
        l[best[k]] = -float("inf")
        p = torch.softmax(l, 0)
        onehot = torch.zeros_like(p)
        onehot[child[k]] = 1
        want = -adv * (onehot - p) * c * (1 - torch.tanh(z / T) ** 2) / T
        want[best[k]] = 0.0
    assert torch.allclose(ctrl.decoders[k].bias.grad, want, atol=1e-6)
    # the class head's bias: d(-adv log p_k)/db = -adv * sum_j (1[j==k] - q_j) * dl_j/db over the class logits
    with torch.no_grad():
        x, hc = ctrl.zero_state()
        zs = []
        for j, v in enumerate(best):
            h, hc = ctrl.step(ctrl.embed(j, v), hc)
            zs.append(ctrl.decoders[-1](h)[0, 0])
        zs = torch.stack(zs)
        q = torch.softmax(c * torch.tanh(zs / T), 0)
        oh = torch.zeros_like(q)
        oh[k] = 1
        want_head = (-adv * (oh - q) * c * (1 - torch.tanh(zs / T) ** 2) / T).sum()
    assert torch.allclose(ctrl.decoders[-1].bias.grad[0], want_head, atol=1e-6)


def test_conservative_explorer_changes_exactly_one_class():
    torch.manual_seed(1)
    ctrl = A.ConservativeController((9, 9, 9, 9, 9), hid=16)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        best = tuple(int(v) for v in rng.integers(9, size=5))
        child, _, _, k = ctrl.propose(best, rng, lambda a: True)
        diff = [i for i in range(5) if child[i] != best[i]]
        assert diff == [k]
        seen.add(k)
    assert seen == set(range(5))


def test_rce_search_moves_only_on_improvement_and_finds_optimum():
    b = A.synthetic_bench((4, 4, 4), seed=0)
    opt = max(b.val.values())
    found = []
    for seed in range(10):
        res = A.rl_search("rce", b, 40, seed, hid=16)
        assert len(res.scores) == 40
        best, best_val = res.archs[0], res.scores[0]
        for a, s in zip(res.archs[1:], res.scores[1:]):  # every child is one class away from the incumbent
            assert sum(x != y for x, y in zip(a, best)) == 1
            if s > best_val:
                best, best_val = a, s
        found.append(res.best_score == opt)
    assert np.mean(found) >= 0.9  # additive table: one-class hill climbing reaches the optimum


def test_expected_random_best_equals_enumeration_and_simulation():
    b = A.synthetic_bench((2, 3), seed=4, noise=0.5)
    archs = b.all_archs()
    n = 3
    ev = et = 0.0
    for seq in itertools.product(archs, repeat=n):  # every ordered draw, equally likely
        i = int(np.argmax([b.val[a] for a in seq]))
        ev += b.val[seq[i]] / len(archs) ** n
        et += b.test[seq[i]] / len(archs) ** n
    got = A.expected_random_best(b, n)
    assert got == pytest.approx((ev, et), abs=1e-12)
    sims = [A.incumbent_test(random_search(b.sample, b.query, n, np.random.default_rng(s)), b)[-1] for s in range(4000)]
    assert np.mean(sims) == pytest.approx(et, abs=0.03)


def test_invalid_tuples_rejected_and_mutation_one_class():
    b = A.synthetic_bench((3, 3, 3), seed=2)
    del b.val[(0, 0, 0)], b.test[(0, 0, 0)]
    rng = np.random.default_rng(0)
    assert all(b.sample(rng) != (0, 0, 0) for _ in range(500))
    for _ in range(200):
        c = b.mutate((0, 0, 1), rng)
        assert c != (0, 0, 0) and sum(x != y for x, y in zip(c, (0, 0, 1))) == 1


def test_nbg_bench_matches_table():
    from reprolab.nas.benchmarks import nbg_architecture_module, nbg_table

    try:
        tb = nbg_table("cora")
    except FileNotFoundError:
        pytest.skip("NAS-Bench-Graph data not materialized")
    b = A.nbg_bench("cora")
    mod = nbg_architecture_module()
    assert len(b.val) == 9 ** 5 - 9
    for _, r in tb.sample(50, random_state=0).iterrows():
        key = (mod.link_list.index(list(r.link)),) + tuple(mod.gnn_list.index(o) for o in r.ops)
        assert b.val[key] == r.val_acc and b.test[key] == r.test_acc


def test_reinforce_step_matches_graphnas_trainer_loop():
    """reinforce_step against a transliteration of GraphNAS trainer.py:209-272 (per-decision rewards, EMA baseline per
    decision, scale by the max of the last 10 advantage vectors), and one Adam step moves log-probs the right way."""
    rng = np.random.default_rng(0)
    vals = rng.uniform(0.5, 0.9, size=25)
    ents = rng.uniform(0.5, 2.0, size=(25, 2))
    coeff, decay = 1e-4, 0.95
    baseline, history, want = None, [], []
    for v, e in zip(vals, ents):
        rewards = v + coeff * e
        baseline = rewards if baseline is None else decay * baseline + (1 - decay) * rewards
        adv = rewards - baseline
        history.append(adv)
        m = np.max(history[-10:])
        want.append(adv if m == 0 else 0.5 / m * adv)
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    state = {}
    for i, (v, e) in enumerate(zip(vals, ents)):
        before = w.detach().clone()
        got = A.reinforce_step(opt, w * 1.0, torch.tensor(e), float(v), state, coeff, decay, 0.5)
        np.testing.assert_allclose(got, want[i], rtol=1e-12, atol=1e-15)
        # loss = sum(-logp * adv) with logp = w: gradient descent moves w along +adv (rewarded decisions gain prob)
        np.testing.assert_allclose((w.detach() - before).numpy(), 0.1 * np.asarray(want[i]), rtol=1e-5, atol=1e-9)


def test_rce_controller_learns_to_avoid_a_punished_class():
    """End to end through rl_search: on a table where class 0 decides everything (its best value gives +1, others
    +-0.01), once the incumbent holds the best class-0 value every class-0 modification is punished; a learning
    controller (lr 0.01) then rarely picks class 0, a frozen one (lr 0) keeps picking it. Kills a flipped loss sign or
    a zeroed advantage in the update."""
    sizes = (3, 6, 6)
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=6) * 0.01, rng.normal(size=6) * 0.01
    val = {a: (1.0 if a[0] == 2 else 0.0) + e1[a[1]] + e2[a[2]] for a in itertools.product(*(range(s) for s in sizes))}
    b = A.Bench(sizes, val, dict(val))

    def frac0(lr):
        return np.mean([np.mean([k == 0 for k in A.rl_search("rce", b, 150, s, lr=lr, hid=16).classes[75:]])
                        for s in range(3)])

    assert frac0(0.01) < 0.12
    assert frac0(0.0) > 0.2
