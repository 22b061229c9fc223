"""EQ-Net: WDR-Loss vs scipy moments, GPG vs a hand computation and the progressive chain, the LSQ+ quantizer's grid
and gradients vs naive per-element loops, per-channel vs per-tensor tables, sampling rules, the params schema."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from reprolab.config import ParamError, load_params, read_params
from reprolab.nas import eqnet as E


def _net(seed=0):
    torch.manual_seed(seed)
    return E.EQCNN(1, 10, (4, 6, 6, 8), (1, 1, 2, 2))


def test_wdr_loss_matches_scipy_moments_without_first_layer():
    net = _net()
    got = float(E.wdr_loss(net, kurt_rate=0.015, skew_rate=1.0))
    ks, ss = [], []
    for m in net.qlayers()[1:]:  # official: the first layer is excluded
        w = m.weight.detach().numpy().ravel().astype(np.float64)
        n = w.size
        c = (n - 1) / n  # official moments use torch.std (unbiased): scipy (biased) x ((n-1)/n)^(k/2)
        ks.append(stats.kurtosis(w, fisher=False, bias=True) * c ** 2)
        ss.append(stats.skew(w, bias=True) * c ** 1.5)
    want = 0.015 * np.mean((np.array(ks) - 1.8) ** 2) + 1.0 * np.mean(np.array(ss) ** 2)
    assert got == pytest.approx(want, rel=1e-4)
    # including the first layer would differ
    w0 = net.qlayers()[0].weight.detach().numpy().ravel()
    assert abs(stats.kurtosis(w0, fisher=False) - 1.8) > 1e-3


def test_wdr_gradient_pulls_towards_uniform_shape():
    net = _net()
    w = net.qlayers()[2].layer.weight
    with torch.no_grad():  # heavy-tailed weights: kurtosis well above 1.8
        w.copy_(torch.distributions.StudentT(3.0).sample(w.shape) * 0.1)
    k0 = float(E.standardized_moment(w, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        E.wdr_loss(net).backward()
        opt.step()
    k1 = float(E.standardized_moment(w.detach(), 4))
    assert abs(k1 - 1.8) < abs(k0 - 1.8)


def test_gpg_loss_matches_hand_computation_and_detaches_teacher():
    rng = np.random.default_rng(0)
    s = torch.tensor(rng.normal(size=(5, 4)), requires_grad=True)
    t = torch.tensor(rng.normal(size=(5, 4)), requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 0])
    got = E.gpg_loss(s, t, y, alpha=0.5)
    S, T = s.detach().numpy(), t.detach().numpy()
    p = np.exp(T) / np.exp(T).sum(1, keepdims=True)
    logq = S - np.log(np.exp(S).sum(1, keepdims=True))
    kl = np.mean(np.sum(p * (np.log(p) - logq), 1))
    ce = -np.mean(logq[np.arange(5), y.numpy()])
    assert float(got) == pytest.approx(0.5 * kl + 0.5 * ce, rel=1e-10)
    got.backward()
    assert t.grad is None or torch.all(t.grad == 0)
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_supernet_step_chains_guidance_high_to_low(monkeypatch):
    """GPG: sub-network k is distilled from sub-network k-1's logits (not all from the biggest); the ablation uses CE."""
    net = _net()
    data = {"train": (torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))}
    E.calibrate(net, data["train"][0][:32])
    calls, outs = [], []
    orig_forward = E.EQCNN.forward

    def fwd(self, x):
        o = orig_forward(self, x)
        outs.append(o.detach().clone())
        return o

    def rec(student, teacher, y, alpha=0.5, T=1.0):
        calls.append((student.detach().clone(), teacher.detach().clone()))
        return E.F.cross_entropy(student, y)

    monkeypatch.setattr(E.EQCNN, "forward", fwd)
    monkeypatch.setattr(E, "gpg_loss", rec)
    tc = E.TrainCfg(steps=1, batch_size=32, num_subnet=4)
    E.train_supernet(net, data, tc, seed=0, wdr=True, gpg=True)
    assert len(outs) == 4 and len(calls) == 3
    for k, (stu, tea) in enumerate(calls):
        assert torch.equal(tea, outs[k]) and torch.equal(stu, outs[k + 1])
    calls.clear()
    E.train_supernet(_net(), data, tc, seed=0, wdr=False, gpg=False)
    assert calls == []


def _naive_grid(x, s, beta, neg, pos):
    levels = [k * (s + 1e-6) + beta for k in range(neg, pos + 1)]
    return torch.tensor([min(levels, key=lambda L: abs(float(v) - L)) for v in x.ravel()]).view_as(x)


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True), (8, False)])
def test_lsq_plus_output_is_nearest_grid_level(bits, sym):
    torch.manual_seed(bits)
    q = E.LSQPlusQuantizer("weight", 3)
    w = torch.randn(3, 2, 3, 3)
    q.init_from(w)
    q.set_params(bits, sym, channel_wise=False)
    out = q(w).detach().double()
    s = float(q.scale_sym_layer[0, bits - 2] if sym else q.scale_asym_layer[0, bits - 2])
    beta = 0.0 if sym else abs(float(q.beta_asym_layer[0, bits - 2]))  # official grad_scale returns |beta|
    neg, pos = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert torch.allclose(out, _naive_grid(w.double(), s, beta, neg, pos).double(), atol=1e-5)
    assert len(torch.unique(out.round(decimals=5))) <= 2 ** bits


def test_lsq_plus_gradients_match_naive_per_element_formula():
    torch.manual_seed(0)
    bits, neg, pos = 3, -4, 3
    x = torch.randn(50) * 2
    s = torch.tensor(0.37, requires_grad=True)
    b = torch.tensor(0.21, requires_grad=True)
    xx = x.clone().requires_grad_(True)
    g = 0.1
    out = E.lsq_plus(xx, E.grad_scale(s, g), E.grad_scale(b, g), neg, pos)
    out.sum().backward()
    ds, db, dx = 0.0, 0.0, []
    S = 0.37 + 1e-6
    for v in x.tolist():
        u = (v - 0.21) / S
        if neg <= u <= pos:  # inside: LSQ d/ds = round(u) - u, d/dbeta = 0, d/dx = 1
            ds += round(u) - u
            dx.append(1.0)
        else:  # clipped: d/ds = the bound, d/dbeta = 1, d/dx = 0
            ds += neg if u < neg else pos
            db += 1.0
            dx.append(0.0)
    assert float(s.grad) == pytest.approx(g * ds, rel=1e-4)
    assert float(b.grad) == pytest.approx(g * db, rel=1e-4)
    assert torch.allclose(xx.grad, torch.tensor(dx))


def test_activation_quantizer_unsigned_for_relu_inputs_and_official_grad_scale():
    q = E.LSQPlusQuantizer("act")
    x = torch.relu(torch.randn(8, 4, 5, 5))
    q.init_from(x)
    assert q.all_positive and q.thd == (0, 255)
    q.set_params(2, True)
    assert q.thd == (0, 3)
    out = q(x)
    assert (out >= 0).all() and len(torch.unique(out)) <= 4
    out.sum().backward()  # grad scale 1/sqrt(pos * numel) on the 2-bit column only
    gr = q.scale_sym_layer.grad
    assert gr[0, 0] != 0 and torch.all(gr[0, 1:] == 0)


def test_per_channel_table_quantizes_each_channel_with_its_own_scale():
    torch.manual_seed(0)
    w = torch.randn(2, 3, 3, 3)
    w[1] *= 20.0  # channel 1 has a 20x larger range
    q = E.LSQPlusQuantizer("weight", 2)
    q.init_from(w)
    sc = q.scale_sym_channel[:, 2]  # 4 bits
    assert sc[1] > 10 * sc[0]
    # the official 5-candidate per-channel search, by hand for channel 0
    neg, pos = -8, 7
    w0 = w[0].reshape(1, -1)
    best, want = 1e9, None
    for i in range(5):
        m = float(w0.abs().max()) * (1 - 0.01 * i)
        sc_i = 2 * m / (pos - neg)
        err = float(((torch.round(torch.clamp(w0 / sc_i, neg, pos)) * sc_i - w0).abs() ** 2.4).mean())
        if err < best:
            best, want = err, sc_i
    assert float(sc[0]) == pytest.approx(want, rel=1e-5)
    q.set_params(4, True, channel_wise=True)
    pc = q(w).detach()
    for c in range(2):
        ref = E.lsq_plus(w[c], sc[c].detach(), 0.0, neg, pos)
        assert torch.allclose(pc[c], ref, atol=1e-6)
    q.set_params(4, True, channel_wise=False)
    pt = q(w).detach()
    err = lambda a: float(((a[0] - w[0]) ** 2).mean())  # noqa: E731
    assert err(pc) < 0.2 * err(pt)  # per-tensor wastes channel 0's levels


def test_sampling_rules_follow_official():
    rng = np.random.default_rng(0)
    big = E.sample_config(5, rng, "biggest")
    assert all(c["w_bit"] == 8 and c["a_bit"] == 8 for c in big)
    for _ in range(20):
        small = E.sample_config(5, rng, "smallest")
        assert [c["w_bit"] for c in small] == [8, 2, 2, 2, 8]
        rnd = E.sample_config(5, rng, "random")
        assert rnd[0]["w_bit"] == rnd[-1]["a_bit"] == 8
        assert all(2 <= c["w_bit"] <= 8 for c in rnd)
    cfg = E.named_config(5, "3-pt-asym")
    assert [c["w_bit"] for c in cfg] == [8, 3, 3, 3, 8]
    assert not cfg[2]["channel_wise"] and not cfg[2]["w_sym"] and not cfg[2]["a_sym"]
    with pytest.raises(ValueError):
        E.parse_config("1-pc-sym")


def test_static_and_supernet_share_init_and_batches():
    net = _net()
    data = {"train": (torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))}
    E.calibrate(net, data["train"][:1][0][:32])
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    tc = E.TrainCfg(steps=3, batch_size=32)
    cfg = E.named_config(5, "4-pc-sym")
    la = E.train_static(a, data, tc, 1, cfg)
    lb = E.train_static(b, data, tc, 1, cfg)
    assert la == lb and math.isfinite(la[-1])


def test_schema_rejects_bad_params():
    params = read_params()
    load_params("eqnet", "quick", params)
    for key, bad in (("dataset", "cifar10"), ("eval_configs", ["2-pc-sym"]), ("bits", [1, 2]), ("alpha", 2.0)):
        p = copy.deepcopy(params)
        p["eqnet"][key] = bad
        with pytest.raises(ParamError):
            load_params("eqnet", "quick", p)


# --- added by the independent review (mutations that survived: per-channel grad scale, WDR never backpropagated,
# --- static arm on other batches than the supernet, evaluation without BN re-estimation)
def test_per_channel_scale_gradient_uses_official_grad_scale():
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3)
    q = E.LSQPlusQuantizer("weight", 3)
    q.init_from(w)
    bits, neg, pos = 3, -4, 3
    q.set_params(bits, True, channel_wise=True)
    q(w).sum().backward()
    got = q.scale_sym_channel.grad[:, bits - 2]
    gs = 2.0 / math.sqrt(pos * w.numel() / w.size(1))  # official base_lsq.py:240
    for c in range(3):
        S = float(q.scale_sym_channel[c, bits - 2]) + 1e-6
        ds = 0.0
        for v in w[c].ravel().tolist():
            u = v / S
            ds += (round(u) - u) if neg <= u <= pos else (neg if u < neg else pos)
        assert float(got[c]) == pytest.approx(gs * ds, rel=1e-4, abs=1e-7)


def _grads_of_one_supernet_step(monkeypatch, wdr, gpg):
    net = _net()
    g = torch.Generator().manual_seed(0)
    data = {"train": (torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))}
    E.calibrate(net, data["train"][0][:32])
    grads = []
    orig = torch.optim.Adam.step

    def step(self, *a, **k):
        grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None})
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    tc = E.TrainCfg(steps=1, batch_size=32, grad_clip=1e9)
    init = copy.deepcopy(net)
    E.train_supernet(net, data, tc, seed=0, wdr=wdr, gpg=gpg)
    return init, grads[0]


def test_wdr_gradient_reaches_the_weights_in_a_supernet_step(monkeypatch):
    init, g_on = _grads_of_one_supernet_step(monkeypatch, wdr=True, gpg=True)
    _, g_off = _grads_of_one_supernet_step(monkeypatch, wdr=False, gpg=True)
    ref = torch.autograd.grad(E.wdr_loss(init), [m.layer.weight for m in init.qlayers()], allow_unused=True)
    names = [n for n, _ in init.named_parameters() if n.endswith("layer.weight")]
    assert len(names) == len(ref)
    for n, r in zip(names, ref):
        diff = g_on[n] - g_off[n]
        r = torch.zeros_like(diff) if r is None else r
        assert torch.allclose(diff, r, atol=1e-6, rtol=1e-4), n
    assert any(float(r.abs().sum()) > 0 for r in ref if r is not None)


def test_static_arm_sees_the_supernet_batches(monkeypatch):
    net = _net()
    data = {"train": (torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,)))}
    E.calibrate(net, data["train"][0][:32])
    seen = []
    orig_forward = E.EQCNN.forward

    def fwd(self, x):
        seen.append(x.detach().clone())
        return orig_forward(self, x)

    monkeypatch.setattr(E.EQCNN, "forward", fwd)
    tc = E.TrainCfg(steps=2, batch_size=32)
    E.train_supernet(copy.deepcopy(net), data, tc, seed=3)
    sup = [seen[0], seen[tc.num_subnet]]  # first forward of each step
    seen.clear()
    E.train_static(copy.deepcopy(net), data, tc, 3, E.named_config(5, "2-pc-sym"))
    assert all(torch.equal(a, b) for a, b in zip(sup, seen))


def test_evaluate_re_estimates_bn_on_the_calibration_images():
    net = _net()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 1, 8, 8, generator=g)
    data = {"train": (X, torch.randint(0, 10, (80,), generator=g)), "test": (X[:20], torch.randint(0, 10, (20,), generator=g))}
    E.calibrate(net, X[:32])
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(1e-3)
    cfg = E.named_config(5, "4-pc-sym")
    E.evaluate(net, data, cfg, calib=48)
    with torch.no_grad():
        h = net.features[0](X[:48])  # first quantized conv at the same config
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-6) or \
        torch.allclose(bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-6)
