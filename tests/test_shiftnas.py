"""ShiftNAS: probability shift vs a hand computation, gated MACs vs exact enumeration, masked forward vs the sliced
child, the generator's configs in the requested bin, the arm loop."""
import itertools

import numpy as np
import pytest
import torch

from reprolab.nas import shiftnas as S
from reprolab.nas.elastic import ElasticCNN
from reprolab.nas.flops import cnn_macs
from reprolab.nas.elastic import inplace_distillation_loss
from reprolab.nas.samplers import bin_index, enumerate_space, uniform

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net():
    torch.manual_seed(0)
    return ElasticCNN(in_channels=1, n_classes=10, stem_channels=8, stage_channels=(8, 16), stage_strides=(1, 2),
                      depth_list=(1, 2), expand_ratio_list=(2, 3), ks_list=(3, 5), head_channels=16)


def test_shift_update_matches_hand_computation():
    theta = np.array([0.0, 0.5, -0.5])
    v = np.array([0.2, 0.0, 0.6])
    new = S.shift_update(theta, v, lr=2.0)
    q = np.exp(theta) / np.exp(theta).sum()
    vn = v / v.sum()  # (0.25, 0, 0.75)
    jbar = (q * vn).sum()
    hand = theta + 2.0 * q * (vn - jbar)
    np.testing.assert_allclose(new, hand, rtol=1e-12)
    # finite-difference check of the gradient of J = sum softmax(theta) v
    J = lambda t: float((np.exp(t) / np.exp(t).sum()) @ vn)
    eps = 1e-6
    fd = np.array([(J(theta + eps * np.eye(3)[j]) - J(theta - eps * np.eye(3)[j])) / (2 * eps) for j in range(3)])
    np.testing.assert_allclose((new - theta) / 2.0, fd, atol=1e-8)
    assert new[2] > theta[2] and new[1] < theta[1]  # toward the bin that still changes
    np.testing.assert_allclose(S.shift_update(theta, [0, 0, 0], 1.0), theta)
    p = S.shift_probs(np.array([10.0, 0.0, 0.0]), 0.3)
    np.testing.assert_allclose(p.sum(), 1.0)
    assert p.min() >= 0.1 - 1e-12  # the smoothing floor eps / K


def test_expected_macs_one_hot_equals_cnn_macs():
    net = ElasticCNN()
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = uniform(net.space(), rng)
        assert float(S.expected_macs(net, S.gates_from_config(net, c), 8)) == cnn_macs(net, c, 8)
        assert float(S.expected_macs(net, S.gates_from_config(net, c), 28)) == cnn_macs(net, c, 28)


def test_expected_macs_is_exact_expectation_and_differentiable():
    net = tiny_net()
    space = net.space()
    torch.manual_seed(1)
    logits = {k: [torch.randn(len(ch), dtype=torch.float64, requires_grad=True) for ch in space[k]] for k in S.KEYS}
    probs = {k: [torch.softmax(l, -1) for l in v] for k, v in logits.items()}
    em = S.expected_macs(net, probs, 8)
    exact = 0.0
    for cfg in enumerate_space(space):  # every config, probability = product of its decisions' probabilities
        pr = 1.0
        for k in S.KEYS:
            for i, v in enumerate(cfg[k]):
                pr *= float(probs[k][i][space[k][i].index(v)])
        exact += pr * cnn_macs(net, cfg, 8)
    assert float(em) == pytest.approx(exact, rel=1e-10)
    em.backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for v in logits.values() for l in v)
    # a mutation check: the depth gate matters (drop it and the expectation changes)
    probs_d = dict(probs, d=[torch.tensor([1.0, 0.0]) for _ in space["d"]])
    assert float(S.expected_macs(net, probs_d, 8)) < float(em)


@pytest.mark.parametrize("train", [True, False])
def test_masked_forward_equals_sliced_child(train):
    net = tiny_net()
    x = torch.randn(16, 1, 8, 8)
    rng = np.random.default_rng(3)
    net.train()
    for _ in range(3):  # give BN non-trivial running statistics
        net.set_active_subnet(uniform(net.space(), rng))
        net(x)
    net.train(train)
    for _ in range(6):
        c = uniform(net.space(), rng)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0  # compare outputs without moving the statistics between the two passes
        net.set_min_net()
        net(x)  # a sliced forward BEFORE the masked one (as in training) must leave no stale widths behind
        out = S.masked_forward(net, x, S.gates_from_config(net, c))
        net.set_active_subnet(c)
        ref = net(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masked_forward_sends_gradient_to_the_gates():
    net = tiny_net()
    ag = S.ArchGenerator(net, hidden=8)
    g = S._row(ag.gates(torch.tensor([0.5]), 1.0, torch.Generator().manual_seed(0)), 0)
    out = S.masked_forward(net, torch.randn(8, 1, 8, 8), g)
    out.pow(2).mean().backward()
    assert ag.target.weight.grad is not None and ag.target.weight.grad.abs().sum() > 0
    assert all(h.weight.grad is not None for h in ag.heads)


def test_generator_loss_is_sliced_child_kd_plus_macs_penalty():
    net = tiny_net()
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0  # the two passes must see the same statistics
    x = torch.randn(8, 1, 8, 8)
    soft = torch.randn(8, 10)
    rng = np.random.default_rng(5)
    for w in (0.0, 3.0):
        c = uniform(net.space(), rng)
        T = 0.8 * cnn_macs(net, c, 8)
        loss, macs = S.generator_loss(net, x, soft, S.gates_from_config(net, c), T, w, 8)
        net.set_active_subnet(c)
        ref = inplace_distillation_loss(net(x), soft) + w * (cnn_macs(net, c, 8) / T - 1) ** 2
        assert float(macs) == cnn_macs(net, c, 8)
        assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_oracle_rel_err():
    assert S.oracle_rel_err([100.0, 200.0, 400.0], [110.0, 190.0, 1000.0]) == pytest.approx([1 / 11, 1 / 19, 0.6])


def test_pretrained_generator_hits_requested_bins():
    net = ElasticCNN(stem_channels=8, stage_channels=(8, 16, 24), head_channels=32)
    edges = S.equal_width_edges(net, 4, 8)
    norm = S.Normaliser(edges[0], edges[-1])
    torch.manual_seed(0)
    ag = S.ArchGenerator(net, hidden=32)
    S.pretrain_generator(ag, net, edges, norm, 8, steps=120, lr=1e-2, tau=1.0, seed=0, batch=16)
    hits, errs = 0, []
    for b in range(4):
        targets = list(np.linspace(edges[b], edges[b + 1], 6)[1:-1])
        for T, c in zip(targets, S.generate(ag, net, targets, norm)):
            m = cnn_macs(net, c, 8)
            hits += bin_index(m, edges) == b
            errs.append(abs(m / T - 1))
    assert hits >= 12, hits  # of 16 targets strictly inside their bins (an untrained generator: ~4)
    assert np.mean(errs) < 0.15


def test_candidates_fall_in_bins_and_mass_concentrates_in_the_middle():
    net = ElasticCNN(stem_channels=8, stage_channels=(8, 16, 24), head_channels=32)
    edges = S.equal_width_edges(net, 4, 8)
    cands = S.candidate_children(net, edges, 3, np.random.default_rng(0), 8)
    for b, cs in enumerate(cands):
        assert all(bin_index(cnn_macs(net, c, 8), edges) == b for c in cs)
    mass = S.uniform_bin_mass(net, edges, 8, np.random.default_rng(0), n=1000)
    assert abs(sum(mass) - 1) < 1e-9 and mass[-1] < 0.05 and mass[0] + mass[-1] < 0.5


def test_train_arm_runs_and_shifts():
    cfg = dict(stem_channels=8, stage_channels=[8, 16], depth_list=[1, 2], expand_ratio_list=[2, 3], ks_list=[3, 5],
               head_channels=16, n_bins=3, lr=0.05, weight_decay=0.0, batch_size=16, steps=6, n_children=1,
               ag_hidden=8, ag_pretrain_steps=40, ag_lr=2e-2, tau=1.0, probe_size=16, shift_every=2, shift_lr=5.0,
               shift_smoothing=0.1, flops_weight=1.0)
    cfg["stage_channels"] = [8, 16, 24]
    cfg["depth_list"] = [1, 2]
    rng = np.random.default_rng(0)
    data = {"train": (torch.from_numpy(rng.standard_normal((64, 1, 8, 8)).astype(np.float32)),
                      torch.from_numpy(rng.integers(0, 10, 64)))}
    r = S.train_arm("shiftnas", data, cfg, 0, 8)
    assert sum(r["counts"]) == 6 and len(r["probs"]) == 6
    assert all(abs(sum(p) - 1) < 1e-9 and min(p) >= 0.1 / 3 - 1e-12 for p in r["probs"])
    # the probability shift happened, and exactly as the recorded probe losses dictate (replayed independently)
    assert len(r["bin_losses"]) == 3  # after steps 2, 4, 6
    np.testing.assert_allclose(r["final_probs"], S.replay_shift(r["bin_losses"], 3, 5.0, 0.1), rtol=1e-12)
    np.testing.assert_allclose(r["probs"][4], S.replay_shift(r["bin_losses"][:2], 3, 5.0, 0.1), rtol=1e-12)
    assert np.ptp(r["final_probs"]) > 1e-3  # moved away from uniform
    # the generator kept training with the supernet (weights moved after its MACs warm-up)
    net0, edges = S.make_net(cfg), r["edges"]
    torch.manual_seed(10_000)
    ag0 = S.ArchGenerator(net0, cfg["ag_hidden"])
    S.pretrain_generator(ag0, net0, edges, S.Normaliser(edges[0], edges[-1]), 8, 40, 2e-2, 1.0, 0)
    g = S.generate(ag0, net0, [edges[1]], S.Normaliser(edges[0], edges[-1]))  # the warm-up alone is reproduced ...
    assert g == S.generate(r["ag_warm"], net0, [edges[1]], S.Normaliser(edges[0], edges[-1]))
    assert all(torch.equal(a, b) for a, b in zip(ag0.state_dict().values(), r["ag_warm"].state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(ag0.state_dict().values(), r["ag"].state_dict().values()))
    u = S.train_arm("uniform", data, cfg, 0, 8)
    assert sum(u["counts"]) == 6 and u["ag"] is None
    with pytest.raises(ValueError):
        S.train_arm("nope", data, cfg, 0, 8)
