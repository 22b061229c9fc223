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


# ------------------------------------------------------------------------------ constrained parameter sharing (Sec. 4.2)
def _tiny_task(n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (3 * n,), generator=g)
    dst = torch.randint(0, n, (3 * n,), generator=g)
    keep = src != dst
    src, dst = torch.cat([src[keep], dst[keep], torch.arange(n)]), torch.cat([dst[keep], src[keep], torch.arange(n)])
    pairs = torch.unique(torch.stack([src, dst]), dim=1)
    deg = torch.bincount(pairs[0], minlength=n).float()
    X = (torch.rand(n, d, generator=g) < 0.3).float() + 0.01
    y = torch.randint(0, 3, (n,), generator=g)
    y[:3] = torch.arange(3)
    a, b = n // 2, (3 * n) // 4
    split = {"train": torch.arange(0, a), "val": torch.arange(a, b), "test": torch.arange(b, n)}
    return A.GraphTask(X, y, pairs, deg[pairs[0]] ** -0.5 * deg[pairs[1]] ** -0.5, split, 3)


P = (0, 0, 0, 1, 1, 0, 0, 0, 1)  # gat,sum,relu,2 heads x 16 | gat,sum,relu,2 heads x n_classes


def _with(arch, cls, v):
    a = list(arch)
    a[A.MACRO_CLASSES.index(cls)] = v
    return tuple(a)


def test_homogeneous_layers_by_hand():
    """Which layers a one-class child may inherit, worked out by hand from the three constraints."""
    want = {"attention1": [1], "aggregator1": [1], "activation1": [1],  # layer 1 differs, layer 2 untouched (same input)
            "heads1": [], "hidden1": [],  # layer 1's weight shape AND layer 2's input dimension change
            "attention2": [0], "aggregator2": [0], "activation2": [0], "heads2": [0]}
    for cls, layers in want.items():
        child = _with(P, cls, 2)
        assert A.homogeneous_layers(P, child, 12, 3) == layers, cls
    assert A.homogeneous_layers(P, P, 12, 3) == [0, 1]
    # same shapes, different activation only: not homogeneous (constraint 2); different aggregator only: not either
    assert A.homogeneous_layers(P, _with(P, "activation1", 3), 12, 3) == [1]
    assert A.homogeneous_layers(P, _with(_with(P, "attention1", 1), "activation2", 1), 12, 3) == []


def test_inherit_copies_exactly_the_homogeneous_layers_and_never_bn_or_skip():
    torch.manual_seed(0)
    parent = A.MacroGNN(P, 12, 3, batch_norm=True, residual=True)
    for v in parent.state_dict().values():  # parameters and batch-norm buffers
        if v.is_floating_point():
            v.normal_()
    child_arch = _with(P, "activation2", 1)  # layer 1 homogeneous, layer 2 not
    torch.manual_seed(1)
    child = A.MacroGNN(child_arch, 12, 3, batch_norm=True, residual=True)
    before = {k: v.clone() for k, v in child.state_dict().items()}
    layers = A.homogeneous_layers(P, child_arch, 12, 3)
    n = A.inherit(child, parent, layers)
    assert layers == [0] and n == sum(p.numel() for p in parent.layers[0].parameters())
    after, par = child.state_dict(), parent.state_dict()
    for k in after:
        if k.startswith("layers.0."):
            assert torch.equal(after[k], par[k]), k
        else:  # layer 2, batch norms, skip linears: the child's own initialisation, untouched
            assert torch.equal(after[k], before[k]), k
            if after[k].is_floating_point():
                assert not torch.equal(after[k], par[k]), k


def test_inherit_rejects_non_homogeneous_layers():
    parent, child = A.MacroGNN(P, 12, 3), A.MacroGNN(_with(P, "hidden1", 0), 12, 3)
    with pytest.raises(ValueError):
        A.inherit(child, parent, [0])  # weight shapes differ
    parent2, child2 = A.MacroGNN(P, 12, 3), A.MacroGNN(_with(P, "aggregator1", 1), 12, 3)
    with pytest.raises(ValueError):
        A.inherit(child2, parent2, [0])  # sum has no pool layer, mean has one


def _naive_geolayer(layer, x, edges, gcn_norm):
    """GraphNAS GeoLayer.forward/message/update written as loops over edges (pool layers applied one after the other)."""
    n, H, C = x.size(0), layer.heads, layer.out_dim
    h = (x @ layer.weight).view(n, H, C)
    src, dst = edges.tolist()
    raw = []
    for e, (j, i) in enumerate(zip(src, dst)):
        if layer.attention == "gat":
            raw.append(torch.nn.functional.leaky_relu((torch.cat([h[i], h[j]], -1) * layer.att[0]).sum(-1), 0.2))
        elif layer.attention == "cos":
            raw.append((h[i] * layer.att[0, :, :C] * h[j] * layer.att[0, :, C:]).sum(-1))
    msgs = []
    for e, (j, i) in enumerate(zip(src, dst)):
        if layer.attention == "const":
            m = h[j]
        elif layer.attention == "gcn":
            m = gcn_norm[e] * h[j]
        else:  # softmax over the edges with the same edge_index[0] (pyg_gnn_layer.py:119)
            group = [f for f, s in enumerate(src) if s == j]
            z = torch.stack([raw[f] for f in group])
            alpha = torch.exp(raw[e] - z.max(0).values) / torch.exp(z - z.max(0).values).sum(0)
            m = h[j] * alpha.view(H, 1)
        if layer.pool is not None:
            m = layer.pool[1](layer.pool[0](m))
        msgs.append(m)
    out = torch.zeros(n, H, C)
    for i in range(n):
        inc = [msgs[e] for e, d in enumerate(dst) if d == i]
        if inc:
            st = torch.stack(inc)
            out[i] = {"sum": st.sum(0), "mean": st.mean(0), "max": st.max(0).values}[layer.aggregator]
    out = out.reshape(n, -1) if layer.concat else out.mean(1)
    return out + layer.bias


@pytest.mark.parametrize("attention", A.MACRO_SPACE["attention"])
@pytest.mark.parametrize("aggregator", A.MACRO_SPACE["aggregator"])
def test_geolayer_matches_naive_edge_loop(attention, aggregator):
    task = _tiny_task(n=12, d=5)
    torch.manual_seed(3)
    for concat in (True, False):
        layer = A.GeoLayer(5, 4, 2, concat, attention, aggregator).eval()
        with torch.no_grad():
            layer.bias.normal_()
            got = layer(task.X, task.edges, task.gcn_norm)
            want = _naive_geolayer(layer, task.X, task.edges, task.gcn_norm)
        assert torch.allclose(got, want, atol=1e-5), (attention, aggregator, concat)


def test_evaluator_child_starts_from_parent_weights_for_homogeneous_layers_only():
    task = _tiny_task()
    ev = A.TrainedEvaluator(task, seed=0, epochs=3, share=True, epochs_share=0)
    ev.query(P)
    parent = ev.best_model
    ev.query(_with(P, "activation2", 1))  # 0 epochs: the child as initialised
    child = ev.last_model
    assert ev.log[1]["inherited"] == [0] and ev.log[1]["epochs"] == 0 and ev.log[1]["parent"] == P
    for (k, a), (_, b) in zip(child.layers[0].named_parameters(), parent.layers[0].named_parameters()):
        assert torch.equal(a, b), k
    assert not torch.equal(child.layers[1].weight, parent.layers[1].weight)
    ev.query(_with(P, "hidden1", 0))  # nothing homogeneous: trained from scratch for `epochs`
    assert ev.log[2]["inherited"] == [] and ev.log[2]["epochs"] == 3
    scratch = A.TrainedEvaluator(task, seed=0, epochs=3, share=False)
    scratch.query(P)
    scratch.query(_with(P, "activation2", 1))
    assert scratch.log[1]["inherited"] == [] and scratch.log[1]["epochs"] == 3
    with pytest.raises(RuntimeError):  # a child must be one class away from the incumbent (its parent)
        scratch.query(_with(_with(P, "activation2", 2), "heads1", 2))


def test_sparse_and_dense_inputs_agree_and_training_learns():
    task = _tiny_task(n=60)
    torch.manual_seed(0)
    m = A.MacroGNN((1, 0, 0, 0, 1, 1, 0, 3, 0), 12, 3).eval()
    with torch.no_grad():
        a = m(task.X, task.edges, task.gcn_norm)
        b = m(task.X.to_sparse(), task.edges, task.gcn_norm)
    assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(0)
    m = A.MacroGNN((1, 0, 0, 0, 1, 1, 0, 3, 0), 12, 3, dropout=0.0)
    r = A.train_gnn(m, task, 80, lr=0.02)
    assert r["epoch"] >= 1 and 0.0 <= r["val_acc"] <= 1.0
    opt_out = torch.log_softmax(m(task.X, task.edges, task.gcn_norm), 1)
    assert float(torch.nn.functional.nll_loss(opt_out[task.split["train"]], task.y[task.split["train"]])) < 1.0


def test_kendall_tau():
    assert A.kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert A.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert A.kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0


def test_child_inherits_from_the_incumbent_not_from_the_last_evaluated_model():
    """Review 2026-12-07: a non-improving child evaluated in between must not become the next child's parent."""
    task = _tiny_task()
    ev = A.TrainedEvaluator(task, seed=0, epochs=3, share=True, epochs_share=0)
    assert ev.query(P) > 0  # the incumbent (3 epochs from scratch)
    incumbent = ev.best_model
    ev.query(_with(P, "attention1", 1))  # inherits layer 2 only, 0 epochs: val 0, stays a non-incumbent
    assert ev.best == P and ev.log[1]["inherited"] == [1]
    assert not torch.equal(ev.last_model.layers[0].weight, incumbent.layers[0].weight)
    ev.query(_with(P, "activation2", 1))  # parent = the incumbent P: layer 1 must be P's, not the last model's
    child = ev.last_model
    assert ev.log[2]["parent"] == P and ev.log[2]["inherited"] == [0]
    for (k, a), (_, b) in zip(child.layers[0].named_parameters(), incumbent.layers[0].named_parameters()):
        assert torch.equal(a, b), k


def test_train_gnn_reports_the_epoch_of_lowest_validation_loss():
    """GraphNAS run_model: the val/test accuracy reported are those of the epoch with the lowest validation loss
    (first on ties), checked against a naive loop that records every epoch."""
    task = _tiny_task(n=60)
    arch, epochs, kw = (1, 0, 0, 0, 1, 1, 0, 3, 0), 40, {"lr": 0.05, "weight_decay": 0.0}
    torch.manual_seed(0)
    m = A.MacroGNN(arch, 12, 3)
    opt = torch.optim.Adam(m.parameters(), **kw)
    hist = []
    for _ in range(epochs):
        m.train()
        loss = torch.nn.functional.nll_loss(torch.log_softmax(m(task.X, task.edges, task.gcn_norm), 1)[task.split["train"]],
                                            task.y[task.split["train"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.eval()
        with torch.no_grad():
            out = torch.log_softmax(m(task.X, task.edges, task.gcn_norm), 1)
        acc = {k: float((out.argmax(1)[task.split[k]] == task.y[task.split[k]]).double().mean()) for k in ("val", "test")}
        hist.append((float(torch.nn.functional.nll_loss(out[task.split["val"]], task.y[task.split["val"]])), acc))
    best = int(np.argmin([h[0] for h in hist]))
    assert best + 1 < epochs  # the lowest validation loss is not at the last epoch (random labels overfit)
    torch.manual_seed(0)
    r = A.train_gnn(A.MacroGNN(arch, 12, 3), task, epochs, **kw)
    assert r["epoch"] == best + 1
    assert r["val_acc"] == pytest.approx(hist[best][1]["val"]) and r["test_acc"] == pytest.approx(hist[best][1]["test"])


def test_shadow_estimate_is_the_one_step_sharing_estimate_and_leaves_the_search_unchanged():
    task = _tiny_task()
    moves = [None, ("activation2", 1), ("hidden1", 0), ("attention1", 1)]  # one class of the current incumbent
    plain = A.TrainedEvaluator(task, seed=1, epochs=3, share=False)
    shadow = A.TrainedEvaluator(task, seed=1, epochs=3, share=False, epochs_share=2, shadow=True)
    kids = []
    for mv in moves:
        a = P if mv is None else _with(plain.best, *mv)
        kids.append(a)
        assert plain.query(a) == shadow.query(a)  # the from-scratch estimates (and so the search) are unchanged
        assert plain.best == shadow.best
    assert [e["inherited_shadow"] for e in shadow.log] == [[], [0], [], [1]]
    assert shadow.log[0]["val_shadow"] == shadow.log[0]["val_acc"] and shadow.log[2]["val_shadow"] == shadow.log[2]["val_acc"]
    # child 1 by hand: its from-scratch initialisation, P's trained layer 1 copied in, 2 epochs
    parent = A.TrainedEvaluator(task, seed=1, epochs=3, share=False)
    parent.query(P)
    with torch.random.fork_rng():
        torch.manual_seed(10_000 * 1 + 1)
        m = A.MacroGNN(kids[1], 12, 3)
        with torch.no_grad():
            for a, b in zip(m.layers[0].parameters(), parent.best_model.layers[0].parameters()):
                a.copy_(b)
        want = A.train_gnn(m, task, 2)["val_acc"]
    assert shadow.log[1]["val_shadow"] == want
    with pytest.raises(ValueError):
        A.TrainedEvaluator(task, seed=1, epochs=3, share=True, shadow=True)
