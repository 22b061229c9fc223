"""EfficientTDNN: elastic kernel (transformation matrices), width / depth slicing == the extracted standalone child,
the progressive-shrinking spaces, AAM-softmax, MACs against a hook count, and the EER against sklearn / a brute-force
threshold sweep."""
import math

import numpy as np
import pytest
import torch
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from reprolab.tf import efficient_tdnn as E

CFG = dict(num_blocks=3, channels=32, kernel_max=5, catconv=64, embed=8, bottleneck=8, res2_scale=4, se_reduction=4,
           margin=0.2, aam_scale=30.0, stage_steps=2, lr=3e-3, weight_decay=2e-5, warmup_steps=1, batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread start-up dominates on the loaded CI machine
    yield
    torch.set_num_threads(n)


def _net(seed=0):
    torch.manual_seed(seed)
    net = E.build_supernet(CFG, 5, 6)
    with torch.no_grad():  # non-trivial transforms, BN parameters and running statistics
        for m in net.modules():
            if isinstance(m, E.DynamicConv1d):
                if m.k53 is not None:
                    m.k53.add_(0.3 * torch.randn(3, 3))
                if m.k31 is not None:
                    m.k31.add_(0.5)
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.3); m.running_var.uniform_(0.5, 2.0)
    return net


def test_kernel_transform_matches_a_hand_computation():
    torch.manual_seed(0)
    conv = E.DynamicConv1d(4, 6, 5)
    with torch.no_grad():
        conv.k53.copy_(torch.randn(3, 3)); conv.k31.copy_(torch.randn(1, 1))
    W = conv.conv.weight.detach()
    w3 = torch.einsum("oik,kj->oij", W[:, :, 1:4], conv.k53.detach())
    w1 = w3[:, :, 1:2] * conv.k31.detach()[0, 0]
    assert torch.allclose(conv.active_weight(None, None, 3), w3, atol=1e-6)
    assert torch.allclose(conv.active_weight(None, None, 1), w1, atol=1e-6)
    assert torch.equal(conv.active_weight(3, 2, 5), W[:3, :2])
    x = torch.randn(2, 4, 10)
    ref = torch.stack([sum(w3[:, :, j] @ torch.nn.functional.pad(x, (1, 1))[b, :, t + j] for j in range(3))
                       for b in range(2) for t in range(10)]).view(2, 10, 6).transpose(1, 2)
    assert torch.allclose(conv(x, None, None, 3), ref, atol=1e-5)
    with pytest.raises(ValueError):
        E.DynamicConv1d(4, 4, 3).active_weight(None, None, 5)


def test_res2_mid_indices_take_the_first_channels_of_every_group():
    blk = E.SERes2Block(16, 32, 3, 2, scale=4, se_reduction=4)
    assert blk.mid_indices(16).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    assert blk.mid_indices(32).tolist() == list(range(32))
    net = _net()  # concatenation: first trunk channels of each block's chunk; pooling: first catconv of mean and std
    assert net._cat_indices(2, 8).tolist() == list(range(8)) + list(range(32, 40))
    assert net._pool_indices(16).tolist() == list(range(16)) + list(range(64, 80))


@pytest.mark.parametrize("train", [False, True])
def test_child_equals_extracted_standalone(train):
    net = _net()
    rng = np.random.default_rng(1)
    x = torch.randn(6, 6, 12)
    cfgs = [net.sample_config("width2", rng) for _ in range(5)]
    cfgs += [net.validate({"depth": 1, "channels": [8, 8], "kernels": [1, 1], "catconv": 16}), net.max_config()]
    for c in cfgs:
        net.train(train)
        net.set_active_subnet(c)
        with torch.no_grad():
            a = net(x)
        sub = net.get_active_subnet(c).train(train)
        assert sub.max_config() == c
        with torch.no_grad():
            b = sub(x)
        assert torch.allclose(a, b, atol=1e-5), (c, (a - b).abs().max())
    # mutation check: a child differs from the max network
    net.eval(); net.set_active_subnet(cfgs[0])
    with torch.no_grad():
        a = net(x)
    net.set_active_subnet(None)
    with torch.no_grad():
        assert not torch.allclose(a, net(x), atol=1e-3)


def _bn(m, h):  # eval-mode BatchNorm with the module's running statistics
    return (h - m.running_mean[:, None]) / torch.sqrt(m.running_var[:, None] + m.eps) * m.weight[:, None] + m.bias[:, None]


def _crb(m, h, dil=1):  # Conv1d (same padding, no bias) -> ReLU -> BN, the official DynamicConv1dReLUBN
    w = m.conv.conv.weight
    return _bn(m.bn, torch.relu(torch.nn.functional.conv1d(h, w, padding=(w.shape[2] - 1) // 2 * dil, dilation=dil)))


def _reference_embedding(sub, x):
    """Naive forward of the official DynamicTDNN (dynamictdnn.py forward) on a standalone network, plain torch ops:
    dense-sum residuals, concatenation of the block outputs, 1x1 catconv + ReLU, attentive statistics pooling with
    alpha-weighted mean and std, BN, linear, BN."""
    out = _crb(sub.layer1, x)
    cat, sum_out = [], out
    for i, blk in enumerate(sub.blocks):
        dil = i + 2  # official: dilation in range(2, num_blocks + 2)
        h = _crb(blk.first_conv, out)
        sp = list(torch.split(h, h.shape[1] // blk.scale, 1))
        ys = []
        for j, rc in enumerate(blk.res_convs):
            ys.append(_crb(rc, sp[j] if j == 0 else sp[j] + ys[-1], dil))
        h = _crb(blk.last_conv, torch.cat(ys + sp[len(blk.res_convs):], 1))
        r, e = blk.se_reduce.linear, blk.se_expand.linear
        s = torch.sigmoid(torch.relu(h.mean(2) @ r.weight.T + r.bias) @ e.weight.T + e.bias)
        out = h * s[:, :, None] + sum_out
        cat.append(out)
        sum_out = sum_out + out
    h = torch.relu(torch.nn.functional.conv1d(torch.cat(cat, 1), sub.catconv.conv.weight))
    a = torch.tanh(torch.nn.functional.conv1d(h, sub.pool1.conv.weight))
    alpha = torch.softmax(torch.nn.functional.conv1d(a, sub.pool2.conv.weight), dim=2)
    mean = (alpha * h).sum(2)
    std = torch.sqrt(((alpha * h * h).sum(2) - mean * mean).clamp(min=1e-9))
    z = _bn(sub.bnpool, torch.cat([mean, std], 1)[:, :, None])[:, :, 0]
    lin = sub.linear.linear
    return _bn(sub.bnembed, (z @ lin.weight.T + lin.bias)[:, :, None])[:, :, 0]


def test_forward_equals_a_naive_reference_of_the_official_forward():
    net = _net().eval()
    x = torch.randn(3, 6, 9)
    rng = np.random.default_rng(2)
    for c in [net.max_config(), net.sample_config("width2", rng),
              net.validate({"depth": 2, "channels": [24, 16, 16], "kernels": [5, 3, 1], "catconv": 48})]:
        net.set_active_subnet(c)
        with torch.no_grad():
            got = net.embedding(x)
            want = _reference_embedding(net.get_active_subnet(c).eval(), x)
        assert torch.allclose(got, want, atol=1e-4), (c, (got - want).abs().max())


def test_evaluate_recomputes_batchnorm_statistics():
    net = _net()  # random BN parameters and running statistics
    torch.manual_seed(1)
    y = torch.arange(30) % 5
    X = torch.randn(30, 6, 8) + torch.randn(5, 6, 1)[y]  # speaker-dependent offsets: non-degenerate metrics
    data = {"train": (X, y), "test": (X + 0.3 * torch.randn_like(X), y)}
    r1 = E.evaluate(net, data, CFG)
    with torch.no_grad():  # stale running statistics must not matter: evaluate recalibrates on the training data
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.add_(3.0); m.running_var.mul_(7.0)
    assert E.evaluate(net, data, CFG) == r1


def test_progressive_shrinking_spaces():
    net = _net()
    sp = {st: net.space(st) for st in E.STAGES}
    assert sp["largest"] == {"depth": [3], "channels": [[32]] * 4, "kernels": [[5]] * 4, "catconv": [64]}
    assert sp["kernel"]["kernels"] == [[1, 3, 5]] * 4 and sp["kernel"]["depth"] == [3]
    assert sp["kernel"]["channels"] == [[32]] * 4
    assert sp["depth"]["depth"] == [1, 2, 3] and sp["depth"]["channels"] == [[32]] * 4
    assert sp["width1"]["channels"] == [[16, 24, 32]] * 4 and sp["width1"]["catconv"] == [32, 48, 64]
    assert sp["width2"]["channels"] == [[8, 16, 24, 32]] * 4  # make_divisible(0.25/0.35 * 32, 8) = 8, 16
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        c = net.sample_config("depth", rng)
        assert len(c["channels"]) == len(c["kernels"]) == c["depth"] + 1 and c["channels"] == [32] * (c["depth"] + 1)
        seen.add(c["depth"])
    assert seen == {1, 2, 3}


def test_aam_softmax_matches_the_formula():
    torch.manual_seed(0)
    head = E.AAMSoftmax(4, 3, 0.2, 30.0)
    e, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out = head(e, y)
    cos = head.cosine(e)
    for i in range(5):
        for j in range(3):
            c = float(cos[i, j])
            th = math.acos(max(-1, min(1, c)))
            if j == int(y[i]):
                want = 30 * (math.cos(th + 0.2) if th + 0.2 < math.pi else c - math.sin(math.pi - 0.2) * 0.2)
            else:
                want = 30 * c
            assert abs(float(out[i, j]) - want) < 1e-4


def test_macs_equal_torch_flop_counter_on_the_extracted_child():
    from torch.utils.flop_counter import FlopCounterMode

    net = _net()
    rng = np.random.default_rng(3)
    for c in [net.sample_config("width2", rng) for _ in range(2)] + [net.max_config()]:
        sub = net.get_active_subnet(c).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            sub.embedding(torch.randn(1, 6, 11))
        assert E.macs(net, c, 11) * 2 == fc.get_total_flops()  # conv + matmul FLOPs = 2 x MACs


def _official_eer(s, y):  # sugar/metrics.py calculate_eer
    fpr, tpr, _ = roc_curve(y, s, pos_label=1)
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


def test_eer_against_sklearn_and_a_threshold_sweep():
    rng = np.random.default_rng(0)
    for trial in range(5):
        y = (rng.random(400) < 0.3).astype(int)
        s = rng.normal(size=400) + 1.2 * y
        if trial == 1:
            s = np.round(s, 1)  # ties
        e = E.eer(s, y)
        assert abs(e - _official_eer(s, y)) < 1e-6
        # brute force: FAR and FRR at every threshold; the EER lies between the two rates where they cross
        th = np.r_[np.inf, np.unique(s)[::-1]]
        far = np.array([np.mean(s[y == 0] >= t) for t in th])
        frr = np.array([np.mean(s[y == 1] < t) for t in th])
        k = int(np.argmin(np.abs(far - frr)))
        assert min(far[k], frr[k]) - 1e-9 <= e <= max(far[k], frr[k]) + 0.02
    y = np.array([0, 0, 1, 1])
    assert E.eer(np.array([0.1, 0.2, 0.8, 0.9]), y) == 0.0
    assert E.eer(np.array([0.9, 0.8, 0.2, 0.1]), y) == 1.0
    with pytest.raises(ValueError):
        E.eer(np.array([0.1, 0.2]), np.array([1, 1]))


def test_trial_scores_pairs_and_labels():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    s, lab = E.trial_scores(emb, torch.tensor([0, 0, 1]))
    assert np.allclose(s, [1.0, 0.0, 0.0]) and lab.tolist() == [1, 0, 0]


def test_training_runs_and_scratch_keeps_its_architecture():
    torch.manual_seed(0)
    X = torch.randn(40, 6, 10)
    y = torch.arange(40) % 5
    data = {"train": (X, y), "test": (X[:20], y[:20])}
    stages_seen = []
    orig = E.DynamicTDNN.sample_config

    def spy(self, stage, rng):
        stages_seen.append(stage)
        return orig(self, stage, rng)

    E.DynamicTDNN.sample_config = spy
    try:
        net, curve = E.train_supernet(data, CFG, 0)
    finally:
        E.DynamicTDNN.sample_config = orig
    # progressive shrinking: the largest stage samples nothing, then one subnet per step in the official order
    assert stages_seen == [st for st in E.STAGES[1:] for _ in range(CFG["stage_steps"])]
    assert len(curve) == len(E.STAGES) * CFG["stage_steps"] and net.active == net.max_config()
    c = E.named_children(net, {"s": {"depth": 1, "width": 0.25, "kernel": 1}})["s"]
    assert c == {"depth": 1, "channels": [8, 8], "kernels": [1, 1], "catconv": 16}
    mob = E.named_children(net, {"m": {"depth": 2, "width": [0.75, 0.5, 0.5], "kernel": [5, 3, 3], "catconv": 0.5}})
    assert mob["m"] == {"depth": 2, "channels": [24, 16, 16], "kernels": [5, 3, 3], "catconv": 32}
    m1, c1 = E.train_scratch(c, data, CFG, 0)
    m2, c2 = E.train_scratch(c, data, CFG, 0)
    assert c1 == c2 and len(c1) == CFG["stage_steps"] and m1.max_config() == c  # one run = one stage's steps
    r = E.evaluate(m1, data, CFG)
    assert 0 <= r["acc"] <= 1 and 0 <= r["eer"] <= 1
