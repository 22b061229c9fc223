"""Balanced mixture of supernets: configuration enumeration, pooling network vs a naive build, balancing by hand,
the EMA assignment update and the training loop's bookkeeping."""
import math
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprolab.nas import balanced_mixture_supernets as B

torch.set_num_threads(1)


def test_configurations_complete_and_official_order():
    got = B.configurations(10, 2)
    assert len(got) == math.comb(9, 2) == 36  # official ResNet20 space
    # brute force: every 0/1 vector with a zero stem and exactly 2 poolings, nothing else
    want = {p for p in product((0, 1), repeat=10) if p[0] == 0 and sum(p) == 2}
    assert set(got) == want and len(set(got)) == len(got)
    assert got[0] == (0, 1, 1, 0, 0, 0, 0, 0, 0, 0) and got[-1] == (0,) * 8 + (1, 1)  # combinations order
    assert (0, 0, 0, 0, 1, 0, 0, 1, 0, 0) in got  # the official default [4, 3, 3]
    assert B.layers_per_resolution((0, 0, 0, 0, 1, 0, 0, 1, 0, 0)) == [4, 3, 3]
    assert len(B.configurations(7, 2)) == 15 and len(B.configurations(7, 0)) == 1
    with pytest.raises(ValueError):
        B.configurations(4, 4)


def _naive(net: B.PoolingResNet, config) -> nn.Sequential:
    """An independent build: nn.MaxPool2d modules inserted before the pooled layers, the same layer objects."""
    mods = []
    for c, layer in enumerate(net.res):
        if config[c]:
            mods.append(nn.MaxPool2d(2))
        mods.append(layer)
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc]
    return nn.Sequential(*mods)


@pytest.mark.parametrize("config", [(0, 1, 1, 0, 0), (0, 0, 1, 0, 1), (0, 0, 0, 1, 1), (0, 1, 0, 0, 1)])
def test_pooling_network_equals_naive_build(config):
    torch.manual_seed(0)
    net = B.PoolingResNet([4, 4, 8, 8, 8], num_classes=10, in_channels=1)
    net.set_path(config)
    x = torch.randn(5, 1, 8, 8)
    net.eval()
    naive = _naive(net, config).eval()
    assert torch.allclose(net(x), naive(x), atol=1e-6)
    net.train(), naive.train()
    assert torch.allclose(net(x), naive(x), atol=1e-6)
    # the pooled resolution really changes the output (a different configuration gives a different function)
    other = (0, 1, 1, 0, 0) if config != (0, 1, 1, 0, 0) else (0, 0, 0, 1, 1)
    assert not torch.allclose(net(x), net(x, other))
    # BN has no affine parameters (official); widths fixed per layer whatever the pooling
    assert all(not m.affine for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_kl_to_uniform_hand_computation():
    m = torch.tensor([0.5, 0.3, 0.2])
    want = 0.5 * math.log(0.5 * 3) + 0.3 * math.log(0.3 * 3) + 0.2 * math.log(0.2 * 3)
    assert B.kl_to_uniform(m) == pytest.approx(want, rel=1e-6)
    assert B.kl_to_uniform(torch.full((4,), 0.25)) == pytest.approx(0.0, abs=1e-9)


def test_balancing_one_iteration_by_hand_and_convergence():
    W = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])  # every configuration prefers supernet 0
    T = 1.0
    p = torch.softmax(W, 1)
    marg = p.mean(0, keepdim=True)
    q = p / marg
    q = q / q.sum(1, keepdim=True)  # one hand iteration
    marginals, prob = B.balance_marginals(W, T, threshold=10.0)  # threshold above the KL: no iteration
    assert marginals == [] and torch.allclose(prob, p)
    kl0 = B.kl_to_uniform(marg)
    assert kl0 > 0.01
    marginals, prob = B.balance_marginals(W, T, threshold=kl0 - 1e-9, max_iter=1)
    assert len(marginals) == 1 and torch.allclose(marginals[0], marg) and torch.allclose(prob, q)
    marginals, prob = B.balance_marginals(W, T, threshold=1e-8)
    assert torch.allclose(prob.sum(1), torch.ones(3), atol=1e-6)
    assert torch.allclose(prob.mean(0), torch.full((2,), 0.5), atol=1e-3)  # balanced marginal
    # the per-step recomputation re-applies the stored marginals to the same W: the same balanced matrix
    assert torch.allclose(B.model_prob(W, marginals, T), prob, atol=1e-6)
    # the ranking of configurations within a supernet is preserved (each row keeps its preference order)
    assert prob[0, 0] > prob[1, 0] > prob[2, 0]


def test_random_partition_balanced():
    rng = np.random.default_rng(0)
    a = B.random_partition(15, 4, rng)
    assert sorted(np.bincount(a, minlength=4).tolist()) == [3, 4, 4, 4]


def test_schedules_match_official():
    # main.py: temp = [(max - t) / epochs * i + t for i in range(epochs + 1)], run for epochs + 1 epochs
    E = 6
    assert B.temperatures(E, 1.0, 100.0) == pytest.approx([(100 - 1) / (E - 1) * i + 1 for i in range(E)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                                                       T_max=E, eta_min=1e-3)
    for e in range(E):
        assert B.cosine_lr(e, E, 0.1, 1e-3) == pytest.approx(sched.get_last_lr()[0])
        sched.optimizer.step(), sched.step()


def _tiny_data(n=64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return {"train": (X, y), "val": (X[:32], y[:32]), "test": (X[32:], y[32:])}


def test_train_mixture_bookkeeping_and_ema():
    data = _tiny_data()
    configs = B.configurations(4, 1)
    kw = dict(epochs=3, batch_size=16, lr=0.05, min_lr=1e-3, momentum=0.9, weight_decay=0.0, temperature=1.0,
              max_temperature=10.0, ema_decay=0.9, threshold=1e-4, seed=1)
    torch.manual_seed(0)
    nets = [B.PoolingResNet([4, 4, 4, 4], num_classes=3) for _ in range(2)]
    before = [p.detach().clone() for p in nets[1].parameters()]
    log = B.train_mixture(nets, configs, data, arm="mixture", **kw)
    assert log.counts.sum() == 3 * 4  # epochs x batches per epoch, one (configuration, supernet) each
    # W moves only where a pair was trained: EMA of accuracies in [0, 1] from init 1 stays in [0.9^k * 1, 1]
    untouched = log.counts == 0
    assert np.all(log.weight_mat[untouched] == 1.0) and np.all(log.weight_mat[~untouched] <= 1.0)
    assert np.all(log.weight_mat >= 0.0)
    if log.counts[:, 1].sum() == 0:
        assert all(torch.equal(a, b) for a, b in zip(before, nets[1].parameters()))
    assert np.allclose(log.prob.sum(1), 1.0) and log.assign.shape == (3,)
    # random arm: every configuration always trains its fixed supernet
    torch.manual_seed(0)
    nets = [B.PoolingResNet([4, 4, 4, 4], num_classes=3) for _ in range(2)]
    log = B.train_mixture(nets, configs, data, arm="random", **kw)
    for a in range(3):
        assert log.counts[a, 1 - log.assign[a]] == 0
    with pytest.raises(ValueError):
        B.train_mixture(nets, configs, data, arm="single", **kw)  # single takes one supernet
    with pytest.raises(ValueError):
        B.train_mixture(nets, configs, data, arm="bogus", **kw)


def test_train_mixture_deterministic_and_single_learns():
    data = _tiny_data()
    configs = B.configurations(4, 1)
    kw = dict(epochs=2, batch_size=16, lr=0.05, min_lr=1e-3, momentum=0.9, weight_decay=0.0, temperature=1.0,
              max_temperature=10.0, ema_decay=0.9, threshold=1e-4, seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        nets = [B.PoolingResNet([4, 4, 4, 4], num_classes=3) for _ in range(2)]
        log = B.train_mixture(nets, configs, data, arm="mixture", **kw)
        outs.append((log.counts.copy(), log.weight_mat.copy(), [p.detach().clone() for p in nets[0].parameters()]))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))
    sc = B.score_configs(nets, configs, log.assign, data, calib=32)
    assert sc.shape == (3,) and np.all((sc >= 0) & (sc <= 1))


def test_arms_share_configuration_draws():
    """Paired arms: the same seed gives every arm the same sequence of configurations (per-configuration step counts
    summed over supernets are equal), whatever the supernet draws consume."""
    data = _tiny_data()
    configs = B.configurations(5, 2)
    kw = dict(epochs=2, batch_size=16, lr=0.05, min_lr=1e-3, momentum=0.9, weight_decay=0.0, temperature=1.0,
              max_temperature=10.0, ema_decay=0.9, threshold=1e-4, seed=5)
    per_arm = {}
    for arm, M in (("single", 1), ("mixture", 3), ("random", 3)):
        torch.manual_seed(0)
        nets = [B.PoolingResNet([4, 4, 4, 4, 4], num_classes=3) for _ in range(M)]
        per_arm[arm] = B.train_mixture(nets, configs, data, arm=arm, **kw).counts.sum(1)
    assert np.array_equal(per_arm["single"], per_arm["mixture"])
    assert np.array_equal(per_arm["single"], per_arm["random"])


# ------------------------------------------------------------------ reviewer additions: the loop against closed forms
_KW = dict(batch_size=64, lr=0.0, min_lr=0.0, momentum=0.9, weight_decay=0.0, temperature=1.0, max_temperature=100.0,
           ema_decay=0.9, threshold=1e-4)


def _frozen_data(n=64, n_val=32, label=None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if label is None else torch.full((n,), label)
    return {"train": (X, y), "val": (X[:n_val], y[:n_val]), "test": (X[n_val:], y[n_val:])}


def _constant_net(cls: int) -> B.PoolingResNet:
    """All weights zero, the fc bias picks class ``cls``: predicts ``cls`` for every input and configuration."""
    net = B.PoolingResNet([4, 4, 4, 4], num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.fc.bias[cls] = 1.0
    return net


def test_ema_matches_closed_form_with_frozen_supernets():
    """lr = 0 freezes the supernets and the validation set fits in one batch, so every (a, m) always sees the same
    validation accuracy acc(a, m); the official EMA from W = 1 then gives W = d^k + (1 - d^k) acc after k visits."""
    data = _frozen_data()
    configs = B.configurations(4, 1)
    torch.manual_seed(0)
    nets = [B.PoolingResNet([4, 4, 4, 4], num_classes=3) for _ in range(2)]
    log = B.train_mixture(nets, configs, data, arm="mixture", epochs=12, seed=4, **_KW)
    Xv, yv = data["val"]
    for a, c in enumerate(configs):
        for m, net in enumerate(nets):
            net.train()
            with torch.no_grad():
                acc = float((net(Xv, c).argmax(1) == yv).float().mean())  # batch statistics, as the loop
            k = int(log.counts[a, m])
            want = 0.9 ** k + (1 - 0.9 ** k) * acc
            assert log.weight_mat[a, m] == pytest.approx(want, abs=1e-5), (a, m, k, acc)
    assert (log.counts > 0).sum() >= 4 and len({round(float(w), 4) for w in log.weight_mat.ravel()}) > 2


def _good_bad_run(epochs=60, seed=0):
    data = _frozen_data(label=0)  # every label 0: supernet 0 is always right, supernet 1 always wrong
    configs = B.configurations(4, 1)
    nets = [_constant_net(0), _constant_net(2)]
    log = B.train_mixture(nets, configs, data, arm="mixture", epochs=epochs, seed=seed, **_KW)
    return nets, configs, data, log


def test_balancing_feeds_the_worse_supernet_too():
    """Supernet 0 is right on every configuration and supernet 1 never: the unbalanced softmax(T W) would send
    almost every step to supernet 0 as T grows; the balanced p(m | a) keeps the marginal uniform, so supernet 1
    still gets about half of the steps and of the final assignment."""
    _, _, _, log = _good_bad_run()
    share = log.counts[:, 1].sum() / log.counts.sum()
    assert 0.3 <= share <= 0.7, share
    assert np.allclose(log.prob.mean(0), 0.5, atol=0.02)
    assert np.all(log.weight_mat[:, 0] == 1.0)  # accuracy 1 keeps W at its initial 1
    assert np.all(log.weight_mat[log.counts[:, 1] > 0, 1] < 1.0)
    # the unbalanced reference would have starved supernet 1 at the final temperature
    W = torch.tensor(log.weight_mat)
    assert float(torch.softmax(100.0 * W, 1)[:, 1].mean()) < 0.1


def test_final_assignment_is_argmax_of_balanced_prob():
    _, _, _, log = _good_bad_run(epochs=20, seed=2)
    T_last = B.temperatures(20, 1.0, 100.0)[-1]
    _, prob = B.balance_marginals(torch.tensor(log.weight_mat), T_last, 1e-4)
    assert np.allclose(log.prob, prob.numpy(), atol=1e-6)
    assert np.array_equal(log.assign, prob.argmax(1).numpy())


def test_scores_use_the_assigned_supernet():
    data = _frozen_data(label=0)
    configs = B.configurations(4, 1)
    nets = [_constant_net(0), _constant_net(2)]  # accuracy 1 and 0 on every configuration
    sc = B.score_configs(nets, configs, np.array([1, 0, 1]), data, calib=32)
    assert sc.tolist() == [0.0, 1.0, 0.0]
    sc = B.score_configs(nets, configs, np.array([0, 0, 1]), data, calib=32)
    assert sc.tolist() == [1.0, 1.0, 0.0]


def test_evaluate_config_recalibrates_bn():
    """Garbage running statistics must be replaced by the calibration images' exact statistics: evaluated on those
    same images, eval mode then equals the batch-statistics forward of the whole set."""
    data = _frozen_data(n=64, n_val=64)  # val = the 64 training images = the calibration images
    data["val"] = data["train"]
    torch.manual_seed(1)
    net = B.PoolingResNet([4, 4, 8, 8], num_classes=3)
    cfg = (0, 1, 0, 0)
    net.train()
    with torch.no_grad():  # centre the logits over the images so that the predicted class varies with the input
        net.fc.bias.sub_(net(data["train"][0], cfg).mean(0))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(50.0)
            m.running_var.fill_(1e-4)
    X = data["train"][0]
    net.train()
    with torch.no_grad():
        y = net(X, cfg).argmax(1)  # labels = the batch-statistics predictions: accuracy 1 with the right statistics
    data["train"] = data["val"] = (X, y)
    want = 1.0
    assert len(set(y.tolist())) == 3
    net.eval()
    with torch.no_grad():
        garbage = float((net(X, cfg).argmax(1) == y).float().mean())
    assert want != garbage  # the check can tell the two apart
    assert B.evaluate_config(net, cfg, data, "val", calib=64) == pytest.approx(want)


def test_noise_free_spread_against_hand_computation():
    acc = np.array([[0.90, 0.92, 0.91], [0.95, 0.94, 0.97], [0.80, 0.83, 0.81], [0.88, 0.86, 0.90]])
    got = B.noise_free_spread(acc)
    for j in range(3):
        r = np.delete(acc, j, 1).mean(1)
        x, z = acc[:, j], r
        c = ((x - x.mean()) * (z - z.mean())).sum() / (len(x) - 1)  # covariance by hand
        assert got[j] == pytest.approx(np.sign(c) * np.sqrt(abs(c)))
    # pure noise (no configuration effect): the raw std is the noise, the noise-free spread is near 0
    rng = np.random.default_rng(0)
    noise = 0.97 + 0.006 * rng.standard_normal((400, 3))
    assert noise.std(0).min() > 0.005
    assert np.abs(B.noise_free_spread(noise)).max() < 0.002
    # a real spread of std 0.01 plus the same noise is recovered
    real = 0.97 + 0.01 * rng.standard_normal((400, 1)) + 0.006 * rng.standard_normal((400, 3))
    assert np.allclose(B.noise_free_spread(real), 0.01, atol=0.002)
    with pytest.raises(ValueError):
        B.noise_free_spread(acc[:, :1])
