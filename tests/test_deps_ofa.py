"""DεpS (deps_ofa): the OFA-PS phase table, the ε warm-up factor, the delay, the OFA channel re-organisation and the
equivalence of the shrink-from-0 loop with the kit's BigNAS sandwich."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import deps_ofa as D
from reprolab.nas.elastic import ElasticCNN, sandwich_backward
from reprolab.nas.harness import lr_at, train_supernet

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(kt=False, seed=0):
    torch.manual_seed(seed)
    return ElasticCNN(1, 10, 8, (8, 16), (2, 1), (1, 2, 3), (2, 3, 4), (3, 5), head_channels=16, kernel_transform=kt)


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {"train": (X, y), "val": (X[:16], y[:16]), "test": (X[16:32], y[16:32])}


def test_ofa_ps_schedule_matches_hand_table():
    # 605 steps = the official epochs one to one: teacher 180, kernel 120+5, depth 25 / 120+5, expand 25 / 120+5
    s = D.ofa_ps_schedule(605)
    assert [(p.name, p.start, p.steps, p.warmup_steps, p.n_children) for p in s] == [
        ("teacher", 0, 180, 0, 1), ("kernel", 180, 125, 5, 1), ("depth_1", 305, 25, 0, 2),
        ("depth_2", 330, 125, 5, 2), ("expand_1", 455, 25, 0, 4), ("expand_2", 480, 125, 5, 4)]
    assert [round(p.lr_ratio * 2.6, 6) for p in s] == [2.6, 0.96, 0.08, 0.24, 0.08, 0.24]
    net = small_net()
    # which dimensions are elastic at which step (hand table; ks {3,5}, d {1,2,3}, e {2,3,4})
    table = {0: ("teacher", [5], [3], [4]), 179: ("teacher", [5], [3], [4]),
             180: ("kernel", [3, 5], [3], [4]), 304: ("kernel", [3, 5], [3], [4]),
             305: ("depth_1", [3, 5], [2, 3], [4]), 330: ("depth_2", [3, 5], [1, 2, 3], [4]),
             455: ("expand_1", [3, 5], [1, 2, 3], [3, 4]), 604: ("expand_2", [3, 5], [1, 2, 3], [2, 3, 4])}
    for step, (name, ks, d, e) in table.items():
        assert D.elastic_dims_at(net, s, step) == {"phase": name, "ks": ks, "d": d, "e": e}
    with pytest.raises(ValueError):
        D.elastic_dims_at(net, s, 605)
    # scaled: exact total, proportional phases
    s300 = D.ofa_ps_schedule(300)
    assert sum(p.steps for p in s300) == 300 and s300[-1].end == 300
    assert [p.steps for p in s300] == [89, 62, 13, 62, 12, 62]


def test_eps_warmup_factor_formula():
    T = 270
    T_d, T_w = D.deps_schedule(T, 150 / 270, 5 / 270)
    assert (T_d, T_w) == (150, 5)
    lr_fn = lambda s: lr_at(s, T, 0.1)  # noqa: E731
    for t in range(T):
        b = D.deps_beta(t, T_d, T_w, lr_fn)
        if t < 145:
            assert b == 0.0
        elif t < 150:
            want = (t - 145 + 1) / 5 * lr_fn(150) / lr_fn(t)  # official smallnet_warmup_adjust_learning_rate / lr
            assert b == pytest.approx(want)
            assert b * lr_fn(t) == pytest.approx((t - 144) / 5 * 0.5 * 0.1 * (1 + math.cos(math.pi * 150 / 270)))
        else:
            assert b == 1.0
    # the effective children lr rises linearly and reaches lr(T_d) exactly at the last warm-up step
    assert D.deps_beta(149, T_d, T_w, lr_fn) * lr_fn(149) == pytest.approx(lr_fn(150))
    with pytest.raises(ValueError):
        D.deps_schedule(100, 0.01, 0.5)


def test_shrinking_never_starts_before_the_delay():
    net, data = small_net(), toy_data()
    log = D.train_sandwich(net, data, 20, lr=0.05, seed=0, delay_frac=0.5, warmup_frac=0.1, batch_size=16)
    assert (log["T_d"], log["T_w"]) == (10, 2)
    assert log["children"] == [1] * 8 + [4] * 12  # teacher mode until T_d - T_w, then the 4-child sandwich
    assert all(b == 0 for b in log["beta"][:8]) and 0 < log["beta"][8] < log["beta"][9] and log["beta"][10:] == [1.0] * 10
    assert log["reorganized_at"] == 8 and log["grad_evals"] == 8 + 48


def test_teacher_mode_touches_only_the_max_net_path():
    """Before the delay only the full network trains: a pure teacher-mode run equals plain training of the max net."""
    data = toy_data()
    a = small_net()
    log = D.train_sandwich(a, data, 6, lr=0.05, seed=3, delay_frac=1.0, warmup_frac=0.0, batch_size=16)
    assert log["children"] == [1] * 6 and log["reorganized_at"] is None
    b = small_net()
    from reprolab.nas.harness import train_model

    def ce(model, x, y, step):
        model.set_max_net()
        return F.cross_entropy(model(x), y, label_smoothing=0.1)
    train_model(b, data, 6, ce, lr=0.05, weight_decay=3e-5, batch_size=16, seed=3, no_decay=D.no_decay_params(b))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_shrink_from_zero_equals_kit_bignas_sandwich():
    """BigNAS arm (delay 0) == harness.train_supernet with the same children: same weights after 5 steps."""
    data = toy_data()
    a = small_net()
    D.train_sandwich(a, data, 5, lr=0.05, seed=7, batch_size=16, reorganize=False)
    b = small_net()
    space = b.space()
    from reprolab.nas.samplers import uniform

    def configs_fn(step, rng):
        return [b.max_config(), b.min_config()] + [uniform(space, rng) for _ in range(2)]
    train_supernet(b, data, 5, configs_fn, kd=True, seed=7, label_smoothing=0.1, lr=0.05, weight_decay=3e-5,
                   batch_size=16, no_decay=D.no_decay_params(b))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_eps_beta_scales_children_gradients():
    """In the warm-up the children's gradient is beta x theirs: compare with an explicit weighted loss."""
    net = small_net()
    x, y = toy_data()["train"]
    x, y = x[:16], y[:16]
    rng = np.random.default_rng(0)
    cfgs = [net.min_config(), D.uniform(net.space(), rng)]
    beta = 0.3
    net.zero_grad()
    net.set_max_net()
    out = net(x)
    tot = F.cross_entropy(out, y, label_smoothing=0.1)
    for c in cfgs:
        net.set_active_subnet(c)
        s = net(x)
        p = F.softmax(out.detach(), 1)
        tot = tot + beta * (-(p * F.log_softmax(s, 1)).sum(1).mean())
    tot.backward()
    g_ref = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
    # the same through sandwich_backward's pieces: max CE + beta * KD
    net.zero_grad()
    net.set_max_net()
    out = net(x)
    F.cross_entropy(out, y, label_smoothing=0.1).backward()
    for c in cfgs:
        net.set_active_subnet(c)
        (beta * D._kd(net(x), out.detach())).backward()
    for r, p in zip(g_ref, net.parameters()):
        if r is not None:
            assert torch.allclose(r, p.grad, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1])
def test_reorganize_preserves_the_max_net_and_sorts(stage):
    net = small_net()
    net.eval()
    with torch.no_grad():
        for blk in net.blocks:  # distinct importances
            blk.point_linear.conv.conv.weight.mul_(torch.rand_like(blk.point_linear.conv.conv.weight) * 3)
            blk.inverted_bottleneck.bn.running_mean.normal_()
            blk.depth_conv.bn.weight.normal_()
    x = toy_data()["train"][0][:8]
    net.set_max_net()
    before = net(x)
    blk = net.blocks[1]
    imp = blk.point_linear.conv.conv.weight.abs().sum((0, 2, 3))
    order = D.middle_channel_order(blk, stage)
    # independent reference: stage 0 plain descending sort; stage 1 channels kept in their bands [0, w3) | [w3, w4)
    if stage == 0:
        ref = torch.argsort(imp, descending=True)
    else:
        w3 = 8 * round(round(8 * 3) / 8)  # make_divisible(round(8 * 3), 8) = 24
        lo, hi = imp[:w3], imp[w3:]
        ref = torch.cat([torch.argsort(lo, descending=True), w3 + torch.argsort(hi, descending=True)])
    assert torch.equal(order, ref)
    D.reorganize_middle_weights(net, stage)
    after = net(x)
    assert torch.allclose(before, after, atol=1e-5)
    new_imp = blk.point_linear.conv.conv.weight.abs().sum((0, 2, 3))
    assert torch.allclose(new_imp, imp[ref])


def test_ofa_ps_runs_phases_and_children():
    net, data = small_net(kt=True), toy_data()
    log = D.train_ofa_ps(net, data, 30, lr=0.05, seed=0, batch_size=16)
    steps = [p["steps"] for p in log["phases"]]
    assert sum(steps) == 30
    want = sum(s * c for s, c in zip(steps, [1, 1, 2, 2, 4, 4]))
    assert log["grad_evals"] == want and len(log["loss"]) == 30
    assert net.active_config() == net.max_config()


def test_eval_configs_are_shared_and_fixed():
    a, b = small_net(seed=0), small_net(seed=1)
    assert D.eval_configs(a, 3) == D.eval_configs(b, 3)
    assert D.eval_configs(a, 2)["min"] == a.min_config()


def test_deps_loop_equals_naive_reference():
    """DεpS over 8 steps (delay 4, warm-up 2: teacher mode, 2 ramp steps, full sandwich) against a naive loop written
    from the official train_one_epoch_deps / adjust_beta_value (multiply each child's gradient by beta, sum)."""
    from reprolab.nas.harness import batches
    from reprolab.nas.samplers import uniform

    data, steps, lr = toy_data(), 8, 0.05
    a = small_net()
    log = D.train_sandwich(a, data, steps, lr=lr, seed=5, delay_frac=0.5, warmup_frac=0.25, batch_size=16,
                           reorganize=False)
    assert (log["T_d"], log["T_w"]) == (4, 2)
    b = small_net()
    nd = {id(p) for p in D.no_decay_params(b)}
    opt = torch.optim.SGD([{"params": [p for p in b.parameters() if id(p) not in nd], "weight_decay": 3e-5},
                           {"params": [p for p in b.parameters() if id(p) in nd], "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    it = batches(*data["train"], 16, torch.Generator().manual_seed(5))
    rng = np.random.default_rng(5)
    b.train()
    for t in range(steps):
        cur = 0.5 * lr * (1 + math.cos(math.pi * t / steps))
        for g in opt.param_groups:
            g["lr"] = cur
        lr_Td = 0.5 * lr * (1 + math.cos(math.pi * 4 / steps))
        beta = 0.0 if t < 2 else ((t - 2 + 1) / 2 * lr_Td / cur if t < 4 else 1.0)
        x, y = next(it)
        opt.zero_grad()
        b.set_max_net()
        out = b(x)
        F.cross_entropy(out, y, label_smoothing=0.1).backward()
        if t >= 2:
            soft = F.softmax(out.detach(), 1)
            for cfg in [b.min_config()] + [uniform(b.space(), rng) for _ in range(2)]:
                b.set_active_subnet(cfg)
                (beta * -(soft * F.log_softmax(b(x), 1)).sum(1).mean()).backward()
        opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_ofa_ps_loss_equals_naive_reference():
    """OFA-PS over a 2-phase table (full net 3 steps, then elastic kernel 4 steps with 2 children per step) against a
    naive loop from the official progressive_shrinking.train_one_epoch: a fresh SGD per phase, uniform children of
    the phase's space, loss = kd_ratio * soft-CE(child, frozen full net in train mode) + CE (label smoothing)."""
    from reprolab.nas.harness import batches
    from reprolab.nas.samplers import uniform

    phases = (("teacher", 3, 0, 1.0, 1, 1, 1, 1), ("kernel", 4, 0, 0.5, 2, None, 1, 1))
    data, lr, kd = toy_data(), 0.05, 0.7
    a = small_net(kt=True)
    log = D.train_ofa_ps(a, data, 7, lr=lr, seed=3, batch_size=16, kd_ratio=kd, phases=phases)
    assert [p["steps"] for p in log["phases"]] == [3, 4] and log["grad_evals"] == 3 + 8
    b = small_net(kt=True)
    rng = np.random.default_rng(3)
    teacher = None
    for i, (name, n, _, ratio, nc, *_rest) in enumerate(phases):
        nd = {id(p) for p in D.no_decay_params(b)}
        opt = torch.optim.SGD([{"params": [p for p in b.parameters() if id(p) not in nd], "weight_decay": 3e-5},
                               {"params": [p for p in b.parameters() if id(p) in nd], "weight_decay": 0.0}],
                              lr=lr * ratio, momentum=0.9, nesterov=True)
        it = batches(*data["train"], 16, torch.Generator().manual_seed(3 * 1000 + i))
        if name == "kernel":
            teacher = __import__("copy").deepcopy(b)
            space = {"ks": [sorted(c) for c in b.space()["ks"]], "d": [[max(c)] for c in b.space()["d"]],
                     "e": [[max(c)] for c in b.space()["e"]], "w": [[max(c)] for c in b.space()["w"]]}
        b.train()
        for t in range(n):
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * ratio * (1 + math.cos(math.pi * t / n))
            x, y = next(it)
            opt.zero_grad()
            if teacher is None:
                b.set_max_net()
                F.cross_entropy(b(x), y, label_smoothing=0.1).backward()
            else:
                teacher.train()
                with torch.no_grad():
                    soft = F.softmax(teacher(x), 1)
                for _ in range(nc):
                    b.set_active_subnet(uniform(space, rng))
                    out = b(x)
                    (kd * -(soft * F.log_softmax(out, 1)).sum(1).mean()
                     + F.cross_entropy(out, y, label_smoothing=0.1)).backward()
            opt.step()
    for (n_, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n_


def test_ofa_budget_and_gate_snapshots():
    cfg = {"steps": 240, "ofa_steps_ratio": 605 / 270}
    assert D.ofa_steps(cfg) == 538 and D.ofa_steps({"steps": 240}) == 240
    net, data = small_net(), toy_data()
    log = D.train_sandwich(net, data, 10, lr=0.05, seed=0, delay_frac=0.5, warmup_frac=0.2, batch_size=16)
    snap = log["full_at_shrink"]  # the full net right before the first shrinking step (step 3)
    assert log["children"][:3] == [1, 1, 1] and log["children"][3] == 4
    assert not any(torch.equal(p, q) for p, q in zip(snap.parameters(), net.parameters()))
    o = small_net(kt=True)
    olog = D.train_ofa_ps(o, data, 20, lr=0.05, seed=0, batch_size=16)
    assert all(not p.requires_grad for p in olog["teacher"].parameters())
