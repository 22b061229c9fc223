"""BigNAS: zero-init gamma, the sandwich step (max / min, detached in-place KD target, dropout only on the max child),
the exponential-then-constant LR schedule against a hand formula and AttentiveNAS's scheduler, optimizer groups."""
import copy
import math
from bisect import bisect_right

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import bignas as B

CFG = dict(stem_channels=8, stage_channels=[8, 16], stage_strides=[1, 2], depth_list=[1, 2], expand_ratio_list=[2, 3],
           ks_list=[3], width_mult_list=[0.5, 1.0], head_channels=16, dropout=0.0, lr=0.1, momentum=0.9,
           weight_decay=1e-5, warmup_steps=2, lr_decay_every=2, lr_gamma=0.5, lr_clamp=0.05, steps=8, batch_size=16,
           n_children=4, label_smoothing=0.1, grad_clip=None, zero_gamma=True, calib_batches=2)


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return B.build_supernet({**CFG, **kw})


def test_zero_gamma_makes_every_residual_block_the_identity():
    net = _net()
    x = torch.randn(4, 8, 6, 6)  # input of the second block of stage 0 (8 channels)
    res_blocks = [b for b in net.blocks if b.residual]
    assert res_blocks, "the space must have residual blocks"
    blk = net.blocks[1]
    assert blk.residual
    net.train()
    assert not torch.allclose(blk(x), x)  # mutation check: without zeroing the branch is not zero
    assert B.zero_last_bn_gamma(net) == len(res_blocks)
    for b in res_blocks:
        xi = torch.randn(4, b.point_linear.conv.max_out_channels, 6, 6)
        branch = b.point_linear(b.depth_conv(b.inverted_bottleneck(xi)))
        assert torch.count_nonzero(branch) == 0  # the residual branch outputs exactly 0 at init
        assert torch.equal(b(xi), xi)
    # non-residual blocks are untouched
    assert all(float(b.point_linear.bn.weight.abs().sum()) > 0 for b in net.blocks if not b.residual)
    # the standalone copies inherit the zero gamma (same initialisation rule)
    sub = net.get_active_subnet(net.min_config())
    assert all(float(b.point_linear.bn.weight.abs().sum()) == 0 for b in sub.blocks if b.residual)


def test_sandwich_configs_contain_max_first_and_min_last():
    net = _net()
    rng = np.random.default_rng(0)
    for _ in range(5):
        cs = B.step_configs(net, "bignas", 4, rng)
        assert len(cs) == 4 and cs[0] == net.max_config() and cs[-1] == net.min_config()
    cs = B.step_configs(net, "uniform", 4, np.random.default_rng(1))
    assert len(cs) == 4
    many = [B.step_configs(net, "uniform", 4, np.random.default_rng(s))[0] for s in range(50)]
    assert sum(c == net.max_config() for c in many) < 10  # uniform: the max child is not forced
    with pytest.raises(ValueError):
        B.step_configs(net, "spos", 4, rng)


def test_soft_ce_gradient_is_softmax_minus_teacher_probabilities():
    torch.manual_seed(0)
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    loss = B.soft_ce(s, t)
    loss.backward()
    p = torch.softmax(t.detach(), 1)
    assert torch.allclose(s.grad, (torch.softmax(s.detach(), 1) - p) / 5, atol=1e-6)
    assert t.grad is None or torch.count_nonzero(t.grad) == 0  # the teacher gets no gradient
    # value: KL(p || q) + H(p)
    q = torch.log_softmax(s.detach(), 1)
    want = ((p * (p.log() - q)).sum(1) + -(p * p.log()).sum(1)).mean()
    assert torch.allclose(loss.detach(), want, atol=1e-6)


def _reference_grads(net, x, y, configs, kd, ls):
    """Independent reference: each child's gradient with autograd.grad; the KD target from a separate no-grad
    forward of the max child (so certainly constant)."""
    params = [p for p in net.parameters()]
    total = [torch.zeros_like(p) for p in params]
    net.train()
    with torch.no_grad():
        ref = copy.deepcopy(net)
        ref.set_active_subnet(configs[0])
        teacher = ref(x)
    for j, c in enumerate(configs):
        net.set_active_subnet(c)
        out = net(x)
        if j == 0 or not kd:
            loss = F.cross_entropy(out, y, label_smoothing=ls)
        else:
            loss = -(torch.softmax(teacher, 1) * torch.log_softmax(out, 1)).sum(1).mean()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        total = [t + (g if g is not None else 0) for t, g in zip(total, gs)]
    return total


@pytest.mark.parametrize("kd", [True, False])
def test_sandwich_step_gradient_matches_reference(kd):
    net = _net(1)
    B.zero_last_bn_gamma(net)
    with torch.no_grad():  # give the zeroed gammas a value so every weight gets gradient
        for b in net.blocks:
            if b.residual:
                b.point_linear.bn.weight.fill_(0.5)
    torch.manual_seed(2)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    configs = B.step_configs(net, "bignas", 4, np.random.default_rng(3))
    want = _reference_grads(copy.deepcopy(net), x, y, configs, kd, 0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    B.supernet_step(net, x, y, configs, opt, kd=kd, label_smoothing=0.1, dropout=0.0, grad_clip=None)
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
    # a mutation (teacher NOT detached) would add the KD losses' gradient through the max child: it differs
    if kd:
        net2 = _net(1)
        net2.load_state_dict(net.state_dict())
        net2.zero_grad()
        net2.set_active_subnet(configs[0])
        t = net2(x)
        loss = F.cross_entropy(t, y, label_smoothing=0.1)
        for c in configs[1:]:
            net2.set_active_subnet(c)
            loss = loss - (torch.softmax(t, 1) * torch.log_softmax(net2(x), 1)).sum(1).mean()
        loss.backward()
        diff = max(float((p.grad - w).abs().max()) for p, w in zip(net2.parameters(), want) if p.grad is not None)
        assert diff > 1e-4


def test_dropout_only_while_the_max_child_runs():
    net = _net(0, dropout=0.3)
    seen = []
    net.dropout.register_forward_hook(lambda m, i, o: seen.append(m.p))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    configs = B.step_configs(net, "bignas", 4, np.random.default_rng(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    B.supernet_step(net, x, y, configs, opt, kd=True, label_smoothing=0.1, dropout=0.3, grad_clip=1.0)
    assert seen[0] == 0.3 and seen[-1] == 0.0
    assert seen[1:] == [0.3 if net.canonical(c) == net.max_config() else 0.0 for c in configs[1:]]
    assert net.dropout.p == 0.0  # evaluation never sees dropout


def _official_warmup_multistep(base, steps, warmup, every, gamma, clamp_pct, warmup_factor=0.001):
    """AttentiveNAS solver/lr_scheduler.py WarmupMultiStepLR.get_lr + build.py milestones, transcribed."""
    milestones = [warmup + (i + 1) * every for i in range((steps - warmup) // every)]
    out = []
    for it in range(steps):
        if it >= warmup:
            f = 1.0
        else:
            a = float(it) / float(warmup)
            f = warmup_factor * (1. - a) + a
        clamp_lr = base * clamp_pct
        out.append(max(clamp_lr if it > warmup else 0., base * f * gamma ** bisect_right(milestones, it)))
    return out


def test_lr_schedule_hand_formula_and_attentivenas():
    base, steps, W, every, g, clamp = 0.1, 60, 5, 3, 0.8, 0.05
    got = [B.bignas_lr(s, base, W, every, g, clamp, steps) for s in range(steps)]
    assert got == pytest.approx(_official_warmup_multistep(base, steps, W, every, g, clamp), rel=1e-12)
    # hand values
    assert got[0] == pytest.approx(base * 0.001)
    assert got[2] == pytest.approx(base * (0.001 * (1 - 2 / 5) + 2 / 5))
    assert got[5] == pytest.approx(base)  # end of warm-up, no decay yet
    assert got[8] == pytest.approx(base * g)  # one cycle done at step W + every
    assert got[14] == pytest.approx(base * g ** 3)
    k = math.ceil(math.log(clamp) / math.log(g))  # first cycle count under the clamp
    assert got[W + k * every] == pytest.approx(base * clamp)  # constant ending
    assert all(v == pytest.approx(base * clamp) for v in got[W + k * every:])
    assert all(a >= b for a, b in zip(got[W:], got[W + 1:]))  # non-increasing after warm-up


def test_optimizer_groups_no_decay_on_bn_and_bias():
    net = _net()
    opt = B.make_optimizer(net, CFG)
    wd_ids = {id(p) for p in opt.param_groups[0]["params"]}
    names = dict((id(p), n) for n, p in net.named_parameters())
    assert opt.param_groups[0]["weight_decay"] == CFG["weight_decay"] and opt.param_groups[1]["weight_decay"] == 0
    for pid in wd_ids:
        assert ".bn" not in names[pid] and not names[pid].endswith("bias")
    assert any(".conv.weight" in names[pid] for pid in wd_ids)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_children_spread_and_standalone_training_runs():
    net = _net(0, expand_ratio_list=[2, 3, 4], width_mult_list=[0.5, 0.75, 1.0])
    ch = B.child_configs(net)
    macs = B.child_macs(net, ch, 8)
    assert list(ch) == list(B.CHILDREN)
    assert macs["min"] < macs["small"] < macs["mid"] < macs["max"]
    torch.manual_seed(0)
    X, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    data = {"train": (X, y), "val": (X[:16], y[:16]), "test": (X[16:32], y[16:32])}
    cfg = {**CFG, "expand_ratio_list": [2, 3, 4], "width_mult_list": [0.5, 0.75, 1.0]}
    model, curve = B.train_standalone(ch["min"], data, cfg, 0)
    assert len(curve) == CFG["steps"] and all(np.isfinite(curve))
    r = B.evaluate_child(model, data, CFG)
    assert 0 <= r["test"] <= 1
    sup, curve = B.train_supernet("bignas", data, cfg, 0)
    r1 = B.evaluate_child(sup, data, cfg, ch["small"])
    r2 = B.evaluate_child(sup, data, cfg, ch["small"])
    assert r1 == r2  # deterministic; the supernet is not changed by evaluation


def test_train_supernet_maps_arm_to_sampling_and_kd(monkeypatch):
    """review fix: the arm -> (sandwich, in-place KD) mapping of the training loop (a mutation that trains the BigNAS
    arm without KD, or the ablation with KD, must fail)."""
    seen = []
    real = B.supernet_step

    def spy(net, x, y, configs, opt, **kw):
        seen.append((configs, kw["kd"], net.max_config(), net.min_config()))
        return real(net, x, y, configs, opt, **kw)

    monkeypatch.setattr(B, "supernet_step", spy)
    torch.manual_seed(0)
    X, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    data = {"train": (X, y), "val": (X, y), "test": (X, y)}
    cfg = {**CFG, "steps": 2, "warmup_steps": 0}
    B.train_supernet("bignas", data, cfg, 0)
    assert len(seen) == 2 and all(kd for _, kd, _, _ in seen)
    assert all(cs[0] == mx and cs[-1] == mn and len(cs) == CFG["n_children"] for cs, _, mx, mn in seen)
    seen.clear()
    B.train_supernet("uniform", data, cfg, 0)
    assert len(seen) == 2 and not any(kd for _, kd, _, _ in seen)
    with pytest.raises(ValueError):
        B.train_supernet("spos", data, cfg, 0)


def test_evaluate_child_recalibrates_bn_cumulatively():
    """review fix: evaluate_child must recalibrate BN (reset + cumulative average over the calibration batches, as
    AttentiveNAS reset_running_stats_for_calibration), whatever the supernet's running statistics are."""
    net = _net(3)
    with torch.no_grad():  # non-trivial weights, garbage running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.fill_(3.0)
                m.running_var.fill_(50.0)
    torch.manual_seed(4)
    X = torch.randn(64, 1, 8, 8)
    cfg = {**CFG, "calib_batches": 2, "batch_size": 16}
    config = net.min_config()
    # independent reference: reset, momentum None (cumulative average), train-mode forwards on the first 2 x 16 images
    ref = net.get_active_subnet(config)
    for m in ref.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for i in range(0, 32, 16):
            ref(X[i:i + 16])
    ref.eval()
    with torch.no_grad():
        pred = ref(X).argmax(1)
        stale = net.get_active_subnet(config).eval()(X).argmax(1)
    assert not torch.equal(pred, stale)  # the check has teeth: stale statistics predict differently
    data = {"train": (X, pred), "val": (X, pred), "test": (X, pred)}
    assert B.evaluate_child(net, data, cfg, config) == {"val": 1.0, "test": 1.0}
    assert B.evaluate_child(net, data, cfg, config, recalibrate=False)["test"] < 1.0


def test_standalone_copy_is_zero_gamma_initialised():
    """review fix: the standalone copies use the same zero-gamma rule as the supernet (lr 0: the init is kept)."""
    torch.manual_seed(0)
    X, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    data = {"train": (X, y), "val": (X, y), "test": (X, y)}
    cfg = {**CFG, "steps": 2, "lr": 0.0, "weight_decay": 0.0}
    net = _net()
    model, _ = B.train_standalone(net.max_config(), data, cfg, 0)
    res = [b for b in model.blocks if b.residual]
    assert res and all(torch.count_nonzero(b.point_linear.bn.weight) == 0 for b in res)
    assert all(torch.count_nonzero(b.point_linear.bn.weight) > 0 for b in model.blocks if not b.residual)
