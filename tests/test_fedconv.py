"""FedConv (arXiv 2502.20639): the compression / dilation filters against torch.nn modules built as the official code
builds them and against a naive loop, MLR against the official formula, the learned weighted aggregation and HeteroFL's
masked aggregation against direct loops, the best-epoch selection and the bounded acceptance rule, the per-tier Flower
messages of configure_fit (no Ray), and the HeteroFL client's Scaler and label mask against a hand-computed Adam step."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reprolab.fed.fedconv as fc


def _filter(kshape, seed=0):
    return fc.init_filter(kshape, torch.Generator().manual_seed(seed))


def _official_filter_apply(P, f, transpose):
    """The official Base_Filter (federated_settings.py:46-172, kernel_number None) plus convolution()'s second MLR."""
    Conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    proj = Conv(1, 1, 1, 1, 0)
    comp = nn.utils.weight_norm(Conv(1, 1, tuple(f["v"].shape[2:]), stride=1, padding=0, bias=False))
    with torch.no_grad():
        proj.weight.copy_(f["a"])
        proj.bias.copy_(f["b"])
        comp.weight_g.copy_(f["g"].reshape(comp.weight_g.shape))
        comp.weight_v.copy_(f["v"])
    x = P.unsqueeze(0) if P.ndim == 2 else P.unsqueeze(0).unsqueeze(0)
    x = comp(proj(x))
    x = x.squeeze(0) if P.ndim == 2 else x.squeeze(0).squeeze(0)

    def official_mlr(z):
        return F.leaky_relu(z, negative_slope=0.001) - (F.relu(z) - 0.85 * F.relu(z))

    return official_mlr(official_mlr(x))


def test_mlr_is_the_official_leaky_decay_relu():
    x = torch.randn(1000, dtype=torch.float64)
    want = F.leaky_relu(x, 0.001) - (F.relu(x) - 0.85 * F.relu(x))
    torch.testing.assert_close(fc.mlr(x), want, rtol=0, atol=1e-15)
    assert fc.mlr(torch.tensor(2.0)) == pytest.approx(1.7) and fc.mlr(torch.tensor(-2.0)) == pytest.approx(-0.002)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape,small", [((7, 9), (5, 6)), ((8,), (6,)), ((10, 6), (10, 4)), ((3,), (3,))])
def test_filter_matches_official_modules_and_a_naive_loop(transpose, shape, small):
    torch.manual_seed(0)
    large = tuple(shape)
    src = torch.randn(*(small if transpose else large))
    f = _filter(fc.kernel_shape(large, small), seed=3)
    f["g"] = f["g"] * 1.7  # weight norm's magnitude differs from ||v||
    got = fc.apply_filter(src, f, transpose, mlr_times=2)
    want = _official_filter_apply(src, f, transpose)
    assert tuple(got.shape) == (large if transpose else small)
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6)
    # naive loop: z = a x + b; valid cross-correlation / transposed convolution with w = g v / ||v||; MLR twice
    z = (f["a"].item() * src + f["b"].item()).reshape(1, -1) if src.ndim == 1 else f["a"].item() * src + f["b"].item()
    w = (f["g"] * f["v"] / f["v"].norm())[0, 0]
    kh, kw = w.shape
    if transpose:
        out = torch.zeros(z.shape[0] + kh - 1, z.shape[1] + kw - 1)
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                out[i:i + kh, j:j + kw] += w * z[i, j]
    else:
        out = torch.zeros(z.shape[0] - kh + 1, z.shape[1] - kw + 1)
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = (w * z[i:i + kh, j:j + kw]).sum()
    out = torch.where(out > 0, 0.85 * 0.85 * out, 1e-6 * out)
    torch.testing.assert_close(got.reshape(out.shape), out, rtol=1e-4, atol=1e-6)


def test_compress_and_dilate_give_the_tier_shapes_and_heterofl_slices_match():
    sizes = [20, 16, 12, 5]
    params = fc.init_params(sizes, 0)
    for rate in (0.75, 0.5625):
        small = fc.param_shapes(sizes, rate)
        assert small == [(12, 20), (12,), (9, 12), (9,), (5, 9), (5,)] if rate == 0.75 else True
        filt = fc.filters_for(fc.param_shapes(sizes), small, torch.Generator().manual_seed(1))
        comp = fc.compress(params, filt)
        assert [tuple(c.shape) for c in comp] == small
        assert [fc.kernel_shape(L, s) for L, s in zip(fc.param_shapes(sizes), small)][0][1] == 1  # input kept
        dil = fc.dilate([c.detach() for c in comp], filt)
        assert [tuple(d.shape) for d in dil] == fc.param_shapes(sizes)
        sl = fc.slice_params(params, sizes, rate)
        assert [s.shape for s in sl] == small
        np.testing.assert_array_equal(sl[2], params[2][:small[2][0], :small[2][1]])
        np.testing.assert_array_equal(sl[4], params[4][:, :small[4][1]])
        assert fc.macs([s.shape for s in sl]) == fc.macs(small)


def test_weighted_parameter_against_a_direct_loop():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (3,)]
    K = 4
    thetas = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(K)]
    ws = [[torch.randn(s, dtype=torch.float32) for s in shapes] for _ in range(K)]
    n = [5, 1, 7, 3]
    got = fc.weighted_parameter(thetas, ws, n)
    for j, s in enumerate(shapes):
        want = np.zeros(s)
        for idx in np.ndindex(*s):
            want[idx] = sum(float(ws[k][j][idx]) * float(thetas[k][j][idx]) * n[k] for k in range(K)) / sum(n)
        np.testing.assert_allclose(got[j].numpy(), want, rtol=1e-5, atol=1e-6)


def test_heterofl_combine_against_a_naive_loop():
    sizes = [6, 8, 4]
    rng = np.random.default_rng(1)
    g = [rng.standard_normal(s).astype(np.float32) for s in fc.param_shapes(sizes)]
    rates = [1.0, 0.75, 0.5, 0.5]
    labels = [[0, 1, 2, 3], [1, 2], [3], [2, 3]]
    clients = [[rng.standard_normal(s).astype(np.float32) for s in fc.param_shapes(sizes, r)] for r in rates]
    got = fc.heterofl_combine(g, clients, labels)
    last = len(g) - 2
    for j, gj in enumerate(g):
        for idx in np.ndindex(*gj.shape):
            vals = [c[j][idx] for c, lab in zip(clients, labels)
                    if all(i < d for i, d in zip(idx, c[j].shape)) and (j < last or idx[0] in lab)]
            want = np.mean(vals) if vals else gj[idx]
            assert got[j][idx] == pytest.approx(want, rel=1e-5, abs=1e-6), (j, idx)
    # an output row held by no client keeps its value; a hidden unit beyond every small width takes tier 0's value
    assert np.isclose(got[0][7, 0], clients[0][0][7, 0])


def _scripted(monkeypatch, seq):
    it = iter(seq)
    monkeypatch.setattr(fc, "evaluate", lambda params, X, y: next(it))


def _toy_fit(epochs, early=0.0, seed=5):
    rng = np.random.default_rng(0)
    X = rng.random((16, 3)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    base = [torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2)]
    theta = {"s": torch.ones(1)}
    return fc.fit_filter(theta, lambda th: [base[0] * th["s"], base[1]], X, y, epochs=epochs, lr=0.1, batch_size=8,
                         seed=seed, early_floor=early)


def test_fit_filter_keeps_the_best_epoch_not_the_last(monkeypatch):
    _scripted(monkeypatch, [(0.5, 1.0), (0.7, 0.5), (0.6, 0.1)])  # scores 49, 69.5, 59.9
    r = _toy_fit(3)
    assert r["epoch"] == 1 and r["acc"] == 0.7 and len(r["history"]) == 3
    _scripted(monkeypatch, [(0.5, 1.0), (0.7, 0.5)])
    two = _toy_fit(2)  # the same seed: epoch 2 of the 3-epoch run is this run's last
    torch.testing.assert_close(r["theta"]["s"], two["theta"]["s"])
    _scripted(monkeypatch, [(0.5, 1.0), (0.6, 1.0), (0.9, 0.1)])
    last = _toy_fit(3)
    assert last["epoch"] == 2 and not torch.equal(last["theta"]["s"], r["theta"]["s"]), "a later epoch moved theta"
    _scripted(monkeypatch, [(0.5, 1.0), (0.3, 0.5), (0.9, 0.1)])
    early = _toy_fit(3, early=0.4)
    assert len(early["history"]) == 2 and early["epoch"] == 0


def test_acceptance_rule_restarts_a_bounded_number_of_times(monkeypatch):
    calls = []

    def reinit():
        calls.append(1)
        return {"s": torch.ones(1)}

    rng = np.random.default_rng(0)
    X, y = rng.random((8, 3)).astype(np.float32), rng.integers(0, 2, 8)
    base = torch.randn(2, 3)
    kw = dict(epochs=2, lr=0.1, batch_size=8, seed=0, early_floor=0.0)
    _scripted(monkeypatch, [(0.1, 2.0)] * 100)
    r = fc.accept({"s": torch.ones(1)}, reinit, lambda th: [base * th["s"], torch.zeros(2)], X, y, floor=0.4,
                  max_restarts=3, **kw)
    assert not r["accepted"] and r["restarts"] == 3 and len(calls) == 3
    calls.clear()
    _scripted(monkeypatch, [(0.1, 2.0), (0.2, 2.0), (0.3, 1.0), (0.5, 1.0)])
    r = fc.accept({"s": torch.ones(1)}, reinit, lambda th: [base * th["s"], torch.zeros(2)], X, y, floor=0.4,
                  max_restarts=3, **kw)
    assert r["accepted"] and r["restarts"] == 1 and r["acc"] == 0.5 and len(calls) == 1


HP = dict(shrinkage_ratio=0.75, server_epochs=1, lr_server=1e-3, batch_size=16, lr_filter=1e-3, lr_agg=1e-3,
          conv_epochs=1, deconv_epochs=1, agg_epochs=1, filter_passes=1, mlr_times=2, agg_init="randn", filter_init="official",
          floor_conv=0.0, floor_deconv=0.0, floor_agg=0.0, max_restarts=0, local_epochs=1, lr_client=1e-2, threads=1)


class _Proxy:
    def __init__(self, cid, k):
        self.cid, self.k = cid, k

    def get_properties(self, ins, timeout=None, group_id=None):
        class R:
            properties = {"partition_id": self.k}
        return R()


class _Manager:
    def __init__(self, proxies):
        self.p = proxies

    def wait_for(self, n, timeout=86400):
        return True

    def all(self):
        return {p.cid: p for p in self.p}

    def num_available(self):
        return len(self.p)


@pytest.mark.parametrize("arm", ["fedconv", "heterofl", "fedavg"])
def test_configure_fit_sends_each_tier_its_own_model_and_config(arm):
    from reprolab.distributed import flower as fl

    sizes, tiers, seed = [12, 8, 8, 4], [0, 1, 2, 1], 3
    rng = np.random.default_rng(0)
    public = (rng.random((32, 12)).astype(np.float32), rng.integers(0, 4, 32))
    init = fc.init_params(sizes, seed)
    server = fc.Server(arm, HP, sizes, tiers, public, seed)
    Strategy = fc.strategy_class()
    s = Strategy(server=server, num_clients=4, seed=seed, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=4,
                 min_available_clients=4, initial_parameters=fl.ndarrays_to_parameters(init))
    proxies = [_Proxy(f"c{k}", k) for k in (2, 0, 3, 1)]
    pairs = s.configure_fit(1, fl.ndarrays_to_parameters(init), _Manager(proxies))
    g, _ = fc.train_params(init, *public, epochs=1, lr=1e-3, batch_size=16, seed=fc.sub_seed(seed, 1, 1))
    assert len(pairs) == 4
    for client, ins in pairs:
        k = client.k
        t = tiers[k]
        got = fl.parameters_to_ndarrays(ins.parameters)
        rate = 0.75 ** t
        assert [a.shape for a in got] == fc.param_shapes(sizes, rate if arm != "fedavg" else 1.0)
        if arm == "heterofl":
            want = fc.slice_params(g, sizes, rate)
            assert ins.config["scaler"] and ins.config["label_mask"] and ins.config["rate"] == pytest.approx(rate)
        elif arm == "fedconv":
            want = g if t == 0 else [p.detach().numpy() for p in fc.compress(g, server.conv[t])]
            assert not ins.config["scaler"] and not ins.config["label_mask"] and ins.config["tier"] == t
        else:
            want = g
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    down = {r["partition"]: r["bytes"] for r in s.ledger if r["direction"] == "down"}
    assert sorted(down) == [0, 1, 2, 3]
    if arm != "fedavg":
        assert down[0] > down[1] > down[2] and down[1] == down[3]


def test_heterofl_client_scaler_and_label_mask_by_hand():
    sizes = [5, 6, 4]
    params = fc.init_params(sizes, 0)
    rate = 0.75
    small = fc.slice_params(params, sizes, rate)
    rng = np.random.default_rng(0)
    X = rng.random((8, 5)).astype(np.float32)
    y = np.array([0, 2, 2, 0, 2, 0, 0, 2])  # classes 1 and 3 absent
    hp = {"local_epochs": 1, "lr_client": 0.01, "batch_size": 8}
    cfg = {"rate": rate, "scaler": True, "label_mask": True}
    new, _ = fc.local_train(small, X, y, cfg, hp, seed=0, num_classes=4)
    # by hand: one full batch; logits = W2 relu((W1 x + b1) / rate) + b2, absent classes set to 0; Adam's first step
    # is -lr * g / (|g| + eps)
    P = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in small]
    Xt = torch.tensor(X, dtype=torch.float64)
    h = torch.clamp((Xt @ P[0].T + P[1]) / rate, min=0)
    logits = h @ P[2].T + P[3]
    logits = logits * torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    F.cross_entropy(logits, torch.tensor(y)).backward()
    for p0, p, got in zip(small, P, new):
        want = p0 - 0.01 * p.grad.numpy() / (np.abs(p.grad.numpy()) + 1e-8)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(new[2][[1, 3]], small[2][[1, 3]])  # rows of absent classes untouched
    np.testing.assert_array_equal(new[3][[1, 3]], small[3][[1, 3]])
    plain, _ = fc.local_train(small, X, y, {"rate": rate}, hp, seed=0, num_classes=4)
    assert not np.allclose(plain[2][[1, 3]], small[2][[1, 3]])
    assert not np.allclose(plain[0], new[0])


def test_fedconv_aggregation_leaves_out_a_failed_dilation(monkeypatch):
    sizes, tiers, seed = [12, 8, 4], [0, 1], 0
    rng = np.random.default_rng(0)
    public = (rng.random((16, 12)).astype(np.float32), rng.integers(0, 4, 16))
    hp = {**HP, "floor_deconv": 1.01, "agg_init": "ones", "max_restarts": 1}
    server = fc.Server("fedconv", hp, sizes, tiers, public, seed)
    g = fc.init_params(sizes, 1)
    res = [(0, [p.copy() for p in g], 10, [0, 1]), (1, fc.slice_params(g, sizes, 0.75), 30, [2])]
    out = server.aggregate(g, res, 1)
    assert server.stats["deconv_failed"] == 1 and server.stats["deconv_restarts"] == 1
    agg = [e for e in server.log if e["step"] == "aggregate"][0]
    assert agg["clients"] == 1
    assert [o.shape for o in out] == [p.shape for p in g]


@pytest.mark.parametrize("mlr_times", [1, 2])
def test_compress_and_dilate_apply_mlr_the_configured_number_of_times(mlr_times):
    """compress()/dilate() on a whole model against direct F.conv2d / F.conv_transpose2d + MLR^mlr_times per tensor
    (catches a dilation or compression that drops / adds an MLR)."""
    sizes = [12, 8, 6, 4]
    large, small = fc.param_shapes(sizes, 1.0), fc.param_shapes(sizes, 0.75)
    g = [torch.as_tensor(p) for p in fc.init_params(sizes, 3)]
    gen = torch.Generator().manual_seed(5)
    fs = fc.filters_for(large, small, gen)

    def direct(P, f, transpose):
        x = P.reshape(1, 1, 1, -1) if P.dim() == 1 else P[None, None]
        x = F.conv2d(x, f["a"], f["b"])
        w = f["g"] * f["v"] / f["v"].norm()
        x = F.conv_transpose2d(x, w) if transpose else F.conv2d(x, w)
        for _ in range(mlr_times):
            x = torch.where(x > 0, 0.85 * x, 0.001 * x)
        return x[0, 0].reshape(-1) if P.dim() == 1 else x[0, 0]

    comp = fc.compress(g, fs, mlr_times)
    for c, P, f, s in zip(comp, g, fs, small):
        assert tuple(c.shape) == s
        torch.testing.assert_close(c, direct(P, f, False))
    dil = fc.dilate([c.detach() for c in comp], fs, mlr_times)
    for d, c, f, L in zip(dil, comp, fs, large):
        assert tuple(d.shape) == L
        torch.testing.assert_close(d, direct(c.detach(), f, True))


def test_every_returned_model_is_trained_on_the_public_data_before_aggregation():
    """pre_train_client: the server trains each returned model on the public data (server_epochs of Adam lr_server)
    before aggregating; FedAvg's aggregate equals the weighted mean of those trained models computed directly."""
    sizes, tiers, seed = [12, 8, 4], [0, 0], 0
    rng = np.random.default_rng(1)
    public = (rng.random((16, 12)).astype(np.float32), rng.integers(0, 4, 16))
    server = fc.Server("fedavg", HP, sizes, tiers, public, seed)
    g = fc.init_params(sizes, 1)
    c0, c1 = fc.init_params(sizes, 2), fc.init_params(sizes, 3)
    out = server.aggregate(g, [(0, c0, 10, [0]), (1, c1, 30, [1])], 1)
    tr = [fc.train_params(c, *public, epochs=HP["server_epochs"], lr=HP["lr_server"], batch_size=HP["batch_size"],
                          seed=fc.sub_seed(seed, 1, 1000 + k))[0] for k, c in enumerate((c0, c1))]
    for j in range(len(g)):
        np.testing.assert_allclose(out[j], (10 * tr[0][j] + 30 * tr[1][j]) / 40, rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[j], (10 * c0[j] + 30 * c1[j]) / 40)


def test_pipeline_acceptance_premise_is_zero_unless_both_steps_pass_sometimes():
    log = [{"step": "compress", "accepted": False}, {"step": "compress", "accepted": True},
           {"step": "dilate", "accepted": False}, {"step": "dilate", "accepted": False},
           {"step": "aggregate", "accepted": True}]
    r = fc.pipeline_acceptance(log)
    assert r["compress"] == 0.5 and r["dilate"] == 0.0 and r["aggregate"] == 1.0 and r["premise"] == 0.0
    log[2]["accepted"] = True
    assert fc.pipeline_acceptance(log)["premise"] == 0.5
    assert fc.pipeline_acceptance([])["premise"] == 0.0
