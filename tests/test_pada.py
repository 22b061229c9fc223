"""PA&DA: last-layer per-sample gradient norm, path importance, unbiased importance weights, variance, training loop."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import pada as P
from reprolab.nas.space201 import N_EDGES, N_OPS, OPS
from reprolab.nas.supernet201 import NB201SuperNet, SearchCell

torch.set_num_threads(1)


def test_sample_grad_norm_equals_autograd_per_sample():
    torch.manual_seed(0)
    z = torch.randn(7, 10)
    y = torch.randint(0, 10, (7,))
    got = P.sample_grad_norm(z, y)
    for i in range(7):
        zi = z[i:i + 1].clone().requires_grad_(True)
        F.cross_entropy(zi, y[i:i + 1]).backward()
        assert torch.allclose(got[i], zi.grad.norm(), atol=1e-6)


def _stepped_net(arch, seed=0):
    torch.manual_seed(seed)
    net = NB201SuperNet(4, 1, 10, 1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    F.cross_entropy(net(x, arch), y).backward()
    return net


def test_op_grad_norms_hand_computation():
    arch = (2, 2, 3, 0, 1, 4)  # conv3x3 on edges 0 and 1, conv1x1 on edge 2
    assert OPS[2] == "nor_conv_3x3" and OPS[3] == "nor_conv_1x1" and P.PARAM_OPS == (2, 3)
    net = _stepped_net(arch)
    cells = [c for c in net.cells if isinstance(c, SearchCell)]
    assert len(cells) == 3
    want3 = sum(float(c.edges[e].ops[2][1].weight.grad.norm()) for c in cells for e in (0, 1)) / 2
    want1 = sum(float(c.edges[2].ops[3][1].weight.grad.norm()) for c in cells) / 1
    got = P.op_grad_norms(net, arch)
    assert got[0] == got[1] == got[4] == 0.0
    assert got[2] == pytest.approx(want3, rel=1e-6) and got[3] == pytest.approx(want1, rel=1e-6)
    assert want3 > 0 and want1 > 0


def test_path_norm_running_update_and_probabilities_by_hand():
    run = [0.0] * 5
    run = P.update_path_norms(run, [0.0, 0.0, 4.0, 2.0, 0.0])  # official: mean([0, new]) on the first update
    assert run == [0.0, 0.0, 2.0, 1.0, 0.0]
    run = P.update_path_norms(run, [0.0, 0.0, 0.0, 5.0, 0.0])  # an op absent from this path keeps its value
    assert run == [0.0, 0.0, 2.0, 3.0, 0.0]
    p = P.mix_probs(run, tau=0.4)
    want = 0.4 * np.array([0, 0, 0.4, 0.6, 0]) + 0.6 * 0.2
    assert np.allclose(p, want) and p.sum() == pytest.approx(1.0)
    assert np.allclose(P.mix_probs([0.0] * 5, 0.9), 0.2)  # nothing recorded: uniform
    assert np.allclose(P.mix_probs(run, 0.0), 0.2)  # epoch 0 smoothing: uniform


def test_sample_norm_running_update_by_hand():
    s = P.update_sample_norms(np.zeros(4), [1, 2, 1, 1], [0.8, 0.3, 0.4, 1.0])
    assert np.allclose(s, [0.0, ((0.8 + 0.4) / 2 + 1.0) / 2, 0.3, 0.0])


def test_importance_weighted_loss_is_unbiased_exact_enumeration():
    rng = np.random.default_rng(0)
    # data: batches of 2 drawn with replacement from p over N = 5 examples, every pair enumerated
    N = 5
    p = rng.dirichlet(np.ones(N))
    losses = torch.tensor(rng.random(N))
    expect = 0.0
    for i, j in itertools.product(range(N), repeat=2):
        idx = [i, j]
        expect += p[i] * p[j] * float(P.weighted_loss(losses[idx], P.importance_weights(p, idx)))
    assert expect == pytest.approx(float(losses.mean()), rel=1e-12)
    # unweighted (the official loss) is biased under the same sampling
    biased = sum(p[i] * p[j] * float(losses[[i, j]].mean()) for i, j in itertools.product(range(N), repeat=2))
    assert abs(biased - float(losses.mean())) > 1e-3
    # paths: 6 edges iid from q, all 5**6 paths enumerated, any per-path value f
    q = np.array([0.05, 0.1, 0.5, 0.25, 0.1])
    f = rng.random((N_OPS,) * N_EDGES)
    e_w = sum(np.prod(q[list(a)]) * P.path_weight(q, a) * f[a] for a in itertools.product(range(N_OPS), repeat=N_EDGES))
    assert e_w == pytest.approx(f.mean(), rel=1e-9)


def test_gradient_variance_zero_for_a_deterministic_estimator_and_matches_naive():
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    X, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    one_path = np.eye(N_OPS)[2]
    one_example = np.eye(6)[3]
    r = P.gradient_variance(net, X, y, one_path, one_example, draws=3, batch_size=4, rng=np.random.default_rng(0))
    assert r["var"] == pytest.approx(0.0, abs=1e-12 * max(1.0, r["mean_sq"])) and r["mean_sq"] > 0
    # naive: the same draws, gradients one by one, unbiased per-coordinate variance summed
    q, d = np.full(N_OPS, 0.2), np.full(6, 1 / 6)
    r = P.gradient_variance(net, X, y, q, d, draws=4, batch_size=3, rng=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    gs = []
    for _ in range(4):
        arch = tuple(int(o) for o in rng.choice(N_OPS, size=N_EDGES, p=q))
        idx = rng.choice(6, size=3, replace=True, p=d)
        m = copy.deepcopy(net)
        m.train()
        F.cross_entropy(m(X[idx], arch), y[idx]).backward()
        gs.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                             for p in m.weight_parameters()]).double())
    naive = float(torch.stack(gs).var(0, unbiased=True).sum())
    assert r["var"] == pytest.approx(naive, rel=1e-6) and r["var"] > 0


def _tiny_data(n=40):
    g = torch.Generator().manual_seed(0)
    return {"train": (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))}


@pytest.mark.parametrize("arm", ["spos", "pada"])
def test_train_supernet_schedules_and_determinism(arm):
    data = _tiny_data()
    logs = []
    for _ in range(2):
        torch.manual_seed(1)
        net = NB201SuperNet(4, 1, 10, 1)
        logs.append((P.train_supernet(net, data, arm=arm, epochs=4, batch_size=16, lr=0.05, momentum=0.9,
                                      weight_decay=2.5e-4, clip=5.0, seed=3, var_epochs=(2,), var_draws=2),
                     [p.detach().clone() for p in net.parameters()]))
    (a, pa), (b, pb) = logs
    assert a.loss == b.loss and a.op_probs == b.op_probs and a.grad_var == b.grad_var
    assert all(torch.equal(x, z) for x, z in zip(pa, pb))
    E = 4
    assert np.allclose(a.op_probs[0], 0.2) and np.allclose(a.op_probs[1], 0.2)  # tau_0 = 0: epoch 1 still uniform
    if arm == "spos":
        assert all(np.allclose(p, 0.2) for p in a.op_probs) and all(t == 0 for t in a.data_tv)
    else:
        for e in (2, 3):  # probabilities used in epoch e were set at the end of epoch e - 1 with tau = (e - 1) / E
            tau = (e - 1) / E
            for o in (0, 1, 4):  # parameter-free ops only keep the uniform share
                assert a.op_probs[e][o] == pytest.approx((1 - tau) / 5)
            assert a.data_tv[e] > 0
    assert set(a.grad_var) == {2}


def test_unknown_arm_rejected():
    with pytest.raises(ValueError):
        P.train_supernet(NB201SuperNet(4, 1, 10, 1), _tiny_data(), arm="fairnas", epochs=1, batch_size=8, lr=0.1,
                         momentum=0.9, weight_decay=0.0, clip=5.0, seed=0)


def test_params_schema_rejects_bad_values():
    from reprolab.config import ParamError, load_params, read_params

    params = read_params()
    load_params("pada", "smoke", params=params)
    for key, value in (("arms", ["spos", "path_only"]), ("dataset", "cifar10"), ("var_draws", 1), ("gate_tv", 2.0)):
        bad = copy.deepcopy(params)
        bad["pada"][key] = value
        with pytest.raises(ParamError):
            load_params("pada", "smoke", params=bad)


def _reference_official_loop(net, X, y, *, arm, epochs, batch_size, lr, clip, seed):
    """Literal re-implementation of the official epoch loop (train_panda_201.py train(); SPOS: train_baselines_201.py),
    written independently of ``pada.train_supernet`` (only numpy / torch), with the same random-number stream."""
    use_is = arm == "pada"
    n = len(y)
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(net.weight_parameters(), lr=lr, momentum=0.9, weight_decay=2.5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    up_prob = np.ones(5) / 5
    ip_prob = up_prob
    initial_prob = np.ones(n) / n
    running = np.arange(n)
    probs_used = []
    for epoch in range(epochs):
        tau = epoch / epochs
        net.train()
        probs_used.append(np.array(ip_prob))
        path_grads_norm = [0.0] * 5
        train_grad_norm, train_idx = [], []
        order = running[rng.permutation(n)] if use_is else rng.permutation(n)
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            sampled_arch = [int(o) for o in rng.choice(5, size=6, p=ip_prob)]
            opt.zero_grad(set_to_none=True)
            logits = net(X[idx], tuple(sampled_arch))
            loss_per_sample = F.cross_entropy(logits, y[idx], reduction="none")
            with torch.no_grad():
                gn = torch.norm(F.softmax(logits, 1) - F.one_hot(y[idx], 10), dim=-1).numpy()
            loss_per_sample.mean().backward()
            torch.nn.utils.clip_grad_norm_(net.weight_parameters(), clip)
            opt.step()
            if use_is:  # operatio_gradient_norm_prob
                weights_norm = [[0.0] for _ in range(5)]
                for cell in net.cells:
                    if not isinstance(cell, SearchCell):
                        continue
                    for e in range(6):
                        o = sampled_arch[e]
                        if o in (2, 3):
                            weights_norm[o].append(cell.edges[e].ops[o][1].weight.grad.norm().item())
                for o, tmp in enumerate(weights_norm):
                    tmp = np.sum(tmp)
                    if tmp != 0.0:
                        tmp /= sampled_arch.count(o)
                        path_grads_norm[o] = np.mean([path_grads_norm[o], tmp])
            train_grad_norm.extend(gn)
            train_idx.extend(idx.tolist())
        sched.step()
        if use_is:  # sample_prob_with_grads_norm + the per-instance update of train()
            ip_prob = np.array(path_grads_norm) / np.sum(path_grads_norm) * tau + up_prob * (1 - tau)
            sgn = np.zeros(n)
            for i, g in zip(train_idx, train_grad_norm):
                sgn[i] = np.mean([sgn[i], g]) if sgn[i] != 0 else g
            new_prob = sgn / np.sum(sgn) * tau + (1 - tau) * initial_prob
            running = rng.choice(n, size=n, replace=True, p=new_prob)
    return probs_used


@pytest.mark.parametrize("arm", ["spos", "pada"])
def test_train_supernet_equals_literal_official_loop(arm):
    """Kills: data importance not used for the order, paths drawn uniformly, tau swapped, clipping after the step."""
    X, y = _tiny_data(48)["train"]
    out = []
    for fn in ("mine", "ref"):
        torch.manual_seed(2)
        net = NB201SuperNet(4, 1, 10, 1)
        if fn == "mine":
            log = P.train_supernet(net, {"train": (X, y)}, arm=arm, epochs=4, batch_size=16, lr=0.05, momentum=0.9,
                                   weight_decay=2.5e-4, clip=0.05, seed=5)
            probs = log.op_probs
        else:
            probs = _reference_official_loop(net, X, y, arm=arm, epochs=4, batch_size=16, lr=0.05, clip=0.05, seed=5)
        out.append((np.array(probs), [p.detach().clone() for p in net.weight_parameters()]))
    (pm, wm), (pr, wr) = out
    assert np.allclose(pm, pr, atol=1e-12)
    if arm == "pada":
        assert np.abs(pm[-1] - 0.2).max() > 0.05  # the path distribution did move
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(wm, wr))
