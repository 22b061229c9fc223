"""NAS foundation B (issues 15/16): elastic ops and the elastic CNN, elastic fake quantization, samplers, BN
recalibration, FLOPs and in-place distillation, each against an independent reference: hand-built nn.Conv2d /
nn.BatchNorm2d / nn.LayerNorm, naive loops, torch's own fake_quantize_* and FlopCounterMode, exact enumeration of a
tiny space with chi-square tests, and hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from reprolab.nas.bn import set_running_statistics
from reprolab.nas.elastic import (DynamicBatchNorm2d, DynamicConv2d, DynamicLayerNorm, DynamicLinear, ElasticCNN,
                                  QuantSpec, fake_quant_ste, inplace_distillation_loss, make_divisible,
                                  sandwich_step)
from reprolab.nas.flops import cnn_macs, cnn_params, count_macs, count_params, measure_latency, torch_macs
from reprolab.nas.samplers import (BinnedSampler, ImportanceSampler, bin_index, config_key, enumerate_space,
                                   max_config, min_config, sandwich, uniform)

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like_net(seed=0, **kw):
    """A small supernet whose weights, BN affine params, BN running stats and kernel matrices are all non-trivial."""
    torch.manual_seed(seed)
    args = dict(in_channels=1, n_classes=5, stem_channels=8, stage_channels=(8, 16), stage_strides=(1, 2),
                depth_list=(1, 2), expand_ratio_list=(2, 3), ks_list=(3, 5), width_mult_list=(0.5, 1.0),
                head_channels=16, divisor=4)
    args.update(kw)
    net = ElasticCNN(**args)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_matrix"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
    rng = np.random.default_rng(seed)
    net.train()
    with torch.no_grad():
        for _ in range(4):  # every channel's running stats move away from (0, 1)
            net.set_max_net()
            net(torch.randn(8, 1, 8, 8))
            net.set_active_subnet(net.sample_config(rng))
            net(torch.randn(8, 1, 8, 8))
    return net.eval()


# ---------------------------------------------------------------- get_active_subnet: exact equality
def test_subnet_output_equals_supernet_exactly():
    net = trained_like_net()
    rng = np.random.default_rng(1)
    x = torch.randn(6, 1, 8, 8)
    cfgs = [net.max_config(), net.min_config()] + [net.sample_config(rng) for _ in range(8)]
    for cfg in cfgs:
        net.set_active_subnet(cfg)
        with torch.no_grad():
            y_super = net(x)
        sub = net.get_active_subnet(cfg).eval()
        with torch.no_grad():
            y_sub = sub(x)
        assert torch.equal(y_super, y_sub), cfg
        assert not any(isinstance(m, (DynamicConv2d, DynamicLinear, DynamicBatchNorm2d)) for m in sub.modules())
        assert net.active_config() == net.validate_config(cfg)  # restored
    # the subnet owns copies: changing it leaves the supernet alone
    sub = net.get_active_subnet(net.max_config())
    with torch.no_grad():
        sub.classifier.weight.zero_()
    assert net.classifier.linear.weight.abs().sum() > 0


def test_subnet_equality_with_quantization():
    net = trained_like_net(seed=3)
    net.set_quant(QuantSpec(w_bits=3, a_bits=4, granularity="per_channel", symmetric=False))
    x = torch.randn(5, 1, 8, 8)
    cfg = net.sample_config(np.random.default_rng(0))
    net.set_active_subnet(cfg)
    with torch.no_grad():
        y_q = net(x)
        y_sub = net.get_active_subnet(cfg).eval()(x)
    assert torch.equal(y_q, y_sub)
    net.set_quant(None)
    with torch.no_grad():
        y_f = net(x)
    assert not torch.allclose(y_q, y_f)  # the quant hook does act


def test_elastic_depth_runs_first_d_blocks_and_changes_output():
    net = trained_like_net()
    cfg = net.max_config()
    assert net.active_blocks(cfg) == [0, 1, 2, 3]
    cfg["d"] = [1, 2]
    assert net.active_blocks(cfg) == [0, 2, 3]
    assert len(net.get_active_subnet(cfg).blocks) == 3
    # the skipped block's ks/e do not matter: canonical() merges such configs
    a, b = dict(cfg), dict(cfg)
    a["ks"], b["ks"] = [3, 3, 5, 5], [3, 5, 5, 5]
    assert net.canonical(a) == net.canonical(b)
    with pytest.raises(ValueError):
        net.set_active_subnet({**cfg, "ks": [7, 3, 3, 3]})
    with pytest.raises(ValueError):
        net.set_active_subnet({**cfg, "depth": [1, 1]})


# ---------------------------------------------------------------- dynamic ops against hand-built references
def naive_transformed_kernel(W, ks_list, k, mats):
    """OFA kernel transformation written as explicit loops: crop the centre, vec (row-major), multiply by M."""
    ks_list = sorted(ks_list)
    out = W.clone()
    for src, tgt in zip(ks_list[::-1][:-1], ks_list[::-1][1:]):
        if src <= k:
            break
        off = (src - tgt) // 2
        M = mats[f"{src}to{tgt}"]
        new = torch.zeros(out.shape[0], out.shape[1], tgt, tgt)
        for o in range(out.shape[0]):
            for i in range(out.shape[1]):
                v = out[o, i, off:off + tgt, off:off + tgt].reshape(-1)
                new[o, i] = (M @ v).reshape(tgt, tgt)
        out = new
    return out


def test_dynamic_conv_slicing_crop_and_kernel_transform():
    torch.manual_seed(0)
    # regular conv: first out/in channels, centre crop
    dc = DynamicConv2d(6, 10, kernel_size_list=(3, 5, 7), stride=2)
    x = torch.randn(2, 4, 9, 9)
    dc.active_out_channel, dc.active_kernel_size = 7, 3
    ref = nn.Conv2d(4, 7, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(dc.conv.weight[:7, :4, 2:5, 2:5])
    assert torch.allclose(dc(x), ref(x), atol=1e-6)
    # depthwise with OFA's transformation matrices (non-symmetric, so M vs M^T would differ)
    dw = DynamicConv2d(8, 8, kernel_size_list=(3, 5, 7), depthwise=True, kernel_transform=True)
    with torch.no_grad():
        for n, p in dw.named_parameters():
            if n.endswith("_matrix"):
                p.add_(0.5 * torch.randn_like(p))
    mats = {"7to5": dw.get_parameter("7to5_matrix").detach(), "5to3": dw.get_parameter("5to3_matrix").detach()}
    xd = torch.randn(2, 5, 9, 9)
    for k in (7, 5, 3):
        dw.active_kernel_size = k
        W = naive_transformed_kernel(dw.conv.weight.detach()[:5], (3, 5, 7), k, mats)
        ref = F.conv2d(xd, W, None, 1, k // 2, 1, 5)
        assert torch.allclose(dw(xd), ref, atol=1e-5), k
    # the matrices get gradients (they are trained with the weights)
    dw.active_kernel_size = 3
    dw(xd).sum().backward()
    assert dw.get_parameter("5to3_matrix").grad.abs().sum() > 0
    assert dw.get_parameter("7to5_matrix").grad.abs().sum() > 0


def test_dynamic_batchnorm_slices_stats_like_a_small_bn():
    torch.manual_seed(0)
    dbn = DynamicBatchNorm2d(10, momentum=0.2)
    with torch.no_grad():
        dbn.weight.copy_(torch.randn(10))
        dbn.bias.copy_(torch.randn(10))
        dbn.running_mean.copy_(torch.randn(10))
        dbn.running_var.copy_(torch.rand(10) + 0.5)
    ref = nn.BatchNorm2d(6, momentum=0.2)
    with torch.no_grad():
        for n in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, n).copy_(getattr(dbn, n)[:6])
    tail_mean, tail_var = dbn.running_mean[6:].clone(), dbn.running_var[6:].clone()
    x = torch.randn(4, 6, 5, 5) * 2 + 1
    dbn.train(), ref.train()
    assert torch.allclose(dbn(x), ref(x), atol=1e-6)
    assert torch.allclose(dbn.running_mean[:6], ref.running_mean) and torch.allclose(dbn.running_var[:6],
                                                                                      ref.running_var)
    assert torch.equal(dbn.running_mean[6:], tail_mean) and torch.equal(dbn.running_var[6:], tail_var)
    dbn.eval(), ref.eval()
    assert torch.allclose(dbn(x), ref(x), atol=1e-6)


def test_dynamic_linear_and_layernorm_for_transformers():
    torch.manual_seed(0)
    lin = DynamicLinear(12, 9)
    lin.active_out_features = 5
    x = torch.randn(2, 7, 8)  # (B, T, C)
    ref = x @ lin.linear.weight[:5, :8].T + lin.linear.bias[:5]
    assert torch.allclose(lin(x), ref, atol=1e-6)
    assert torch.equal(lin.get_active_subnet(8)(x), lin(x))
    ln = DynamicLayerNorm(12)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(12))
        ln.bias.copy_(torch.randn(12))
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight[:8] + ln.bias[:8]
    assert torch.allclose(ln(x), ref, atol=1e-5)
    assert torch.equal(ln.get_active_subnet(8)(x), ln(x))


def test_make_divisible_matches_ofa_values():
    # hand values of OFA's make_divisible(v, 8)
    assert [make_divisible(v, 8) for v in (3, 12, 16 * 3, 24 * 0.75, 37, 100)] == [8, 16, 48, 24, 40, 104]


# ---------------------------------------------------------------- elastic fake quantization
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_matches_torch_fake_quantize(symmetric, per_channel):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.2, 2, 6).view(6, 1, 1, 1) + 0.3
    for bits in (2, 4, 8):
        got = fake_quant_ste(w, bits, symmetric, 0 if per_channel else None)
        # independent reference: scales by a naive loop, quantization by torch's own kernel
        rows = [w[i] for i in range(6)] if per_channel else [w]
        scales, zps = [], []
        for r in rows:
            lo, hi = min(float(r.min()), 0.0), max(float(r.max()), 0.0)
            if symmetric:
                s = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1)
                z = 0
            else:
                s = (hi - lo) / (2 ** bits - 1)
                z = int(round(-lo / s))
            scales.append(s)
            zps.append(z)
        qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
        if per_channel:
            ref = torch.fake_quantize_per_channel_affine(w, torch.tensor(scales), torch.tensor(zps, dtype=torch.int32),
                                                         0, qmin, qmax)
        else:
            ref = torch.fake_quantize_per_tensor_affine(w, scales[0], zps[0], qmin, qmax)
        assert torch.allclose(got, ref, atol=1e-5), bits
        n_levels = len(torch.unique(got[0] if per_channel else got))
        assert n_levels <= 2 ** bits


def test_ste_and_lsq_gradients():
    x = torch.tensor([-3.0, -0.74, 0.1, 0.26, 0.9, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quant_ste(x, 3, symmetric=True, scale=s)  # codes in [-3, 3]
    y.sum().backward()
    # dy/dx: 1 inside [-1.5, 1.5], 0 where clipped (-3, 5)
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))
    # LSQ (Esser et al. 2020, eq. 3): dy/ds = round(x/s) - x/s inside, q_min / q_max outside
    v = x.detach() / 0.5
    inside = (v.abs() <= 3)
    expect = torch.where(inside, torch.round(v) - v, torch.sign(v) * 3).sum()
    assert math.isclose(float(s.grad), float(expect), abs_tol=1e-5)
    # dynamic scale: straight through everywhere
    z = torch.randn(10, requires_grad=True)
    fake_quant_ste(z, 2, symmetric=False).sum().backward()
    assert torch.equal(z.grad, torch.ones(10))
    with pytest.raises(ValueError):
        QuantSpec(granularity="per_row")


# ---------------------------------------------------------------- samplers on a tiny space, exact distributions
TINY = {"d": [[1, 2]], "e": [[2, 3, 4], [2, 4]], "ks": [[3, 5]]}  # 2 * 3 * 2 * 2 = 24 configs


def tiny_cost(cfg):
    return cfg["d"][0] * (cfg["e"][0] * cfg["ks"][0] ** 2 + cfg["e"][1])


def chi2_pvalue(samples, support, probs):
    idx = {config_key(c): j for j, c in enumerate(support)}
    counts = np.zeros(len(support))
    for c in samples:
        counts[idx[config_key(c)]] += 1
    keep = np.asarray(probs) > 0
    assert counts[~keep].sum() == 0  # never outside the support
    return stats.chisquare(counts[keep], np.asarray(probs)[keep] * len(samples)).pvalue


def test_uniform_frequencies_match_exact_distribution():
    rng = np.random.default_rng(0)
    support = enumerate_space(TINY)
    assert len(support) == 24
    samples = [uniform(TINY, rng) for _ in range(6000)]
    assert chi2_pvalue(samples, support, np.full(24, 1 / 24)) > 1e-3
    # a biased sampler (always the first choice of "e"[1]) is caught by the same test
    biased = [{**s, "e": [s["e"][0], 2]} for s in samples]
    assert chi2_pvalue(biased, support, np.full(24, 1 / 24)) < 1e-6


def test_sandwich_always_contains_max_and_min():
    rng = np.random.default_rng(0)
    for n in (0, 1, 3):
        for _ in range(20):
            cfgs = sandwich(TINY, rng, n_random=n)
            assert len(cfgs) == n + 2
            assert cfgs[0] == {"d": [2], "e": [4, 4], "ks": [5]} == max_config(TINY)
            assert cfgs[1] == {"d": [1], "e": [2, 2], "ks": [3]} == min_config(TINY)


def test_binned_rejection_matches_conditional_distribution():
    support = enumerate_space(TINY)
    costs = np.array([tiny_cost(c) for c in support])
    edges = [costs.min(), 40, 90, costs.max()]
    rng = np.random.default_rng(1)
    sampler = BinnedSampler(TINY, tiny_cost, edges, rng)
    for b in range(3):
        inbin = np.array([bin_index(c, edges) == b for c in costs], dtype=float)
        exact = inbin / inbin.sum()  # uniform configs conditioned on the bin
        samples = []
        for _ in range(3000):
            cfg, got_b = sampler.sample(bin=b)
            assert got_b == b and bin_index(tiny_cost(cfg), edges) == b
            samples.append(cfg)
        assert chi2_pvalue(samples, support, exact) > 1e-3
    # bins drawn from given probabilities
    sampler.set_probs([0.6, 0.3, 0.1])
    bins = np.array([sampler.sample()[1] for _ in range(3000)])
    assert stats.chisquare(np.bincount(bins, minlength=3), np.array([0.6, 0.3, 0.1]) * 3000).pvalue > 1e-3
    # per-bin mode: uniform among the pool's members of the bin
    per = BinnedSampler(TINY, tiny_cost, edges, np.random.default_rng(2), mode="per_bin", pool=support)
    inbin = np.array([bin_index(c, edges) == 2 for c in costs], dtype=float)
    samples = [per.sample(bin=2)[0] for _ in range(3000)]
    assert chi2_pvalue(samples, support, inbin / inbin.sum()) > 1e-3
    with pytest.raises(ValueError):
        BinnedSampler(TINY, tiny_cost, [5, 3], rng)


def test_importance_sampler_frequencies_and_unbiased_weights():
    w = np.array([5.0, 1.0, 0.0, 2.0, 2.0])
    s = ImportanceSampler(w, np.random.default_rng(0), smoothing=0.1)
    p = 0.9 * w / w.sum() + 0.1 / 5
    assert np.allclose(s.probs, p)
    idx, iw = s.sample(20000)
    assert stats.chisquare(np.bincount(idx, minlength=5), p * 20000).pvalue > 1e-3
    assert np.allclose(iw, 1 / (5 * p[idx]))
    f = np.array([1.0, -2.0, 4.0, 0.5, 3.0])  # per-path quantity
    assert math.isclose(float(np.sum(p * f / (5 * p))), f.mean())  # exact unbiasedness
    assert abs(np.mean(f[idx] * iw) - f.mean()) < 0.1
    with pytest.raises(ValueError):
        ImportanceSampler([0, 0], np.random.default_rng(0))


def test_net_sampling_and_binning_with_macs():
    net = trained_like_net()
    rng = np.random.default_rng(0)
    cost = lambda c: cnn_macs(net, c, 8)  # noqa: E731
    edges = BinnedSampler.quantile_edges(net.space(), cost, 3, rng, n_samples=200)
    assert edges[0] == cost(net.min_config()) and edges[-1] == cost(net.max_config())
    sampler = BinnedSampler(net.space(), cost, edges, rng)
    for b in range(3):
        cfg, _ = sampler.sample(b)
        assert edges[b] <= cost(cfg) <= edges[b + 1]


# ---------------------------------------------------------------- BN recalibration
def pre_bn_stats(model, x):
    """Exact per-channel mean and biased variance of every BN's input on x (hooks, eval mode)."""
    out = {}
    hs = [m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, (i[0].mean((0, 2, 3)),
                                                                          i[0].var((0, 2, 3), unbiased=False))))
          for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return out


def test_ofa_recalibration_equals_exact_pre_bn_statistics():
    net = trained_like_net()
    cfg = net.sample_config(np.random.default_rng(5))
    sub = net.get_active_subnet(cfg)
    x = torch.randn(64, 1, 8, 8) * 1.5 + 0.5
    done = set_running_statistics(sub, [x], method="ofa")
    assert len(done) == sum(isinstance(m, nn.BatchNorm2d) for m in sub.modules())
    exact = pre_bn_stats(sub, x)  # with the new stats in eval mode, every layer sees what calibration saw
    for name, m in sub.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.allclose(m.running_mean, exact[name][0], atol=1e-5), name
            assert torch.allclose(m.running_var, exact[name][1], rtol=1e-4, atol=1e-6), name
    # several unequal batches: the first BN (its input does not depend on BN) gets the size-weighted average
    xs = [torch.randn(n, 1, 8, 8) + i for i, n in enumerate((10, 30, 7))]
    set_running_statistics(sub, [(xx, None) for xx in xs], method="ofa")
    conv = sub.first_conv.conv
    with torch.no_grad():
        acts = [conv(xx) for xx in xs]
    n = np.array([10, 30, 7])
    mean = sum(a.mean((0, 2, 3)) * k for a, k in zip(acts, n)) / n.sum()
    var = sum(a.var((0, 2, 3), unbiased=False) * k for a, k in zip(acts, n)) / n.sum()
    assert torch.allclose(sub.first_conv.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(sub.first_conv.bn.running_var, var, rtol=1e-4)


def test_cumulative_recalibration_is_torch_momentum_none():
    net = trained_like_net()
    sub = net.get_active_subnet(net.min_config())
    xs = [torch.randn(n, 1, 8, 8) * (i + 1) for i, n in enumerate((12, 5, 20))]
    was = sub.training
    set_running_statistics(sub, xs, method="cumulative")
    assert sub.training == was and all(m.momentum == 0.1 for m in sub.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        acts = [sub.first_conv.conv(xx) for xx in xs]
    mean = sum(a.mean((0, 2, 3)) for a in acts) / 3  # equal weight per batch
    var = sum(a.var((0, 2, 3), unbiased=True) for a in acts) / 3  # unbiased
    assert torch.allclose(sub.first_conv.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(sub.first_conv.bn.running_var, var, rtol=1e-4)


def test_recalibrating_the_supernet_touches_only_active_channels():
    net = trained_like_net()
    cfg = net.min_config()
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in net.named_modules()
              if isinstance(m, nn.BatchNorm2d)}
    x = torch.randn(32, 1, 8, 8)
    ref = net.get_active_subnet(cfg)
    set_running_statistics(ref, [x], method="ofa")
    net.set_active_subnet(cfg)
    set_running_statistics(net, [x], method="ofa")
    sub = net.get_active_subnet(cfg)  # recalibrated in the supernet, then extracted
    for (n1, a), (n2, b) in zip(ref.named_modules(), sub.named_modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6), n1
    # the inactive channels (stage width 0.5 of 8/16 channels...) and skipped blocks keep their statistics
    bn = net.blocks[2].point_linear.bn  # stage 2, width 0.5 -> 8 of 16 channels active
    assert torch.equal(bn.running_mean[8:], before["blocks.2.point_linear.bn"][0][8:])
    assert not torch.equal(bn.running_mean[:8], before["blocks.2.point_linear.bn"][0][:8])
    skipped = net.blocks[1].point_linear.bn  # d = 1 in stage 1: block 1 is skipped
    assert torch.equal(skipped.running_var, before["blocks.1.point_linear.bn"][1])


# ---------------------------------------------------------------- FLOPs and parameters
def test_analytic_macs_and_params_match_hooks_and_torch_counter():
    net = trained_like_net()
    rng = np.random.default_rng(3)
    for cfg in [net.max_config(), net.min_config()] + [net.sample_config(rng) for _ in range(5)]:
        sub = net.get_active_subnet(cfg)
        x = torch.randn(1, 1, 8, 8)
        a = cnn_macs(net, cfg, 8)
        assert a == count_macs(sub, x) == torch_macs(sub, x)
        assert cnn_params(net, cfg) == count_params(sub)
    # a 28x28 input with strides: output sizes follow the conv arithmetic
    net28 = ElasticCNN(stage_channels=(8, 16, 16), stage_strides=(2, 2, 2), depth_list=(1,), expand_ratio_list=(2,),
                       ks_list=(3, 5, 7), stem_channels=8, head_channels=16)
    cfg = net28.sample_config(rng)
    sub = net28.get_active_subnet(cfg)
    assert cnn_macs(net28, cfg, 28) == torch_macs(sub, torch.randn(1, 1, 28, 28))
    # hand value: conv 1->4, 3x3 on 5x5 (same padding) = 25*4*9 MACs; linear 4->3 on 2 tokens = 24
    toy = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(2), nn.Linear(25, 3))
    assert count_macs(toy, torch.randn(1, 1, 5, 5)) == 25 * 4 * 9 + 4 * 25 * 3
    assert measure_latency(toy, torch.randn(1, 1, 5, 5), repeats=3, warmup=1) > 0


# ---------------------------------------------------------------- in-place distillation and the sandwich step
def test_inplace_distillation_hand_values():
    s = torch.zeros(1, 2, requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p = (0.75, 0.25)
    kl = inplace_distillation_loss(s, t)
    assert math.isclose(float(kl), 0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel_tol=1e-6)
    ce = inplace_distillation_loss(s, t, kind="soft_ce")
    assert math.isclose(float(ce), math.log(2.0), rel_tol=1e-6)
    kl.backward()
    assert t.grad is None  # the teacher is detached
    assert torch.allclose(s.grad, torch.tensor([[0.5 - 0.75, 0.5 - 0.25]]))  # q - p
    # temperature: T^2 KL(softmax(t/T) || softmax(s/T)); KL of identical logits is 0
    assert float(inplace_distillation_loss(t.detach(), t, T=4.0)) < 1e-7
    p = torch.softmax(torch.tensor([math.log(3.0) / 2, 0.0]), 0)
    want = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert math.isclose(float(inplace_distillation_loss(s, t, T=2.0)), want, rel_tol=1e-5)


def test_sandwich_step_updates_shared_weights():
    net = trained_like_net()
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    w0 = net.classifier.linear.weight.detach().clone()
    losses = sandwich_step(net, x, y, sandwich(net.space(), np.random.default_rng(0), n_random=2), opt)
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert not torch.equal(w0, net.classifier.linear.weight)
    net.zero_last_bn_gamma()
    assert all(float(b.point_linear.bn.weight.abs().sum()) == 0 for b in net.blocks if b.residual)


def test_dynamic_batchnorm_momentum_none_is_a_cumulative_average_on_a_slice():
    """OFA bn_forward with momentum None: factor 1 / num_batches_tracked on the sliced stats, as nn.BatchNorm2d(C,
    momentum=None) (the recalibration recipe of BigNAS / AttentiveNAS; the slice path, C < num_features)."""
    torch.manual_seed(0)
    dbn, ref = DynamicBatchNorm2d(10, momentum=None), nn.BatchNorm2d(6, momentum=None)
    dbn.train(), ref.train()
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3) * 3 + 2
        assert torch.allclose(dbn(x), ref(x), atol=1e-6)
    assert int(dbn.num_batches_tracked) == 3
    assert torch.allclose(dbn.running_mean[:6], ref.running_mean, atol=1e-6)
    assert torch.allclose(dbn.running_var[:6], ref.running_var, atol=1e-5)
    assert torch.equal(dbn.running_mean[6:], torch.zeros(4)) and torch.equal(dbn.running_var[6:], torch.ones(4))
