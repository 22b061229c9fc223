"""Weight Compander (arXiv 2306.16993): the compander and its parametrization against hand formulas and naive loops.

These tests pin the STAND-IN compander f(v) = alpha tanh(beta v / alpha) (see the registry's deviations), not the
paper's equation, which could not be read offline: they check that the code computes this formula, not that the
formula is the paper's."""
import copy
import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from reprolab.config import ParamError, load_params, read_params
from reprolab.paths import REPO_ROOT
from reprolab.pruning import weight_compander as wc

pytestmark = pytest.mark.usefixtures("one_thread")


def _f_hand(v: float, a: float, b: float) -> float:
    """The formula written out with the math module: a tanh(b v / a)."""
    return a * math.tanh(b * v / a)


@pytest.mark.parametrize("a,b", [(0.5, 2.0), (1.0, 1.5), (0.2, 3.0)])
def test_compander_values_odd_bounded(a, b):
    vs = [-3.0, -0.7, -0.05, 0.0, 0.01, 0.3, 2.5, 40.0]
    got = wc.compander(torch.tensor(vs, dtype=torch.float64), a, b)
    assert got.tolist() == pytest.approx([_f_hand(v, a, b) for v in vs], rel=1e-12, abs=1e-15)
    t = torch.linspace(-10, 10, 201, dtype=torch.float64)
    assert torch.equal(wc.compander(-t, a, b), -wc.compander(t, a, b))  # odd
    assert float(wc.compander(t, a, b).abs().max()) <= a  # bounded by alpha (saturation)
    assert float(wc.compander(torch.tensor(1e3, dtype=torch.float64), a, b)) == pytest.approx(a)  # reaches it
    # expansion near zero: |f(v)| > |v| for small v when beta > 1, compression for large v
    assert abs(float(wc.compander(torch.tensor(0.01 * a, dtype=torch.float64), a, b))) > 0.01 * a
    assert abs(float(wc.compander(torch.tensor(5.0 * a, dtype=torch.float64), a, b))) < 5.0 * a


@pytest.mark.parametrize("v0", [-1.3, -0.2, 0.0, 0.05, 0.8])
def test_derivatives_autograd_vs_finite_differences(v0):
    a, b, h = 0.6, 2.5, 1e-6
    v = torch.tensor(v0, dtype=torch.float64, requires_grad=True)
    al = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    be = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    wc.compander(v, al, be).backward()
    fd_v = (_f_hand(v0 + h, a, b) - _f_hand(v0 - h, a, b)) / (2 * h)
    fd_a = (_f_hand(v0, a + h, b) - _f_hand(v0, a - h, b)) / (2 * h)
    fd_b = (_f_hand(v0, a, b + h) - _f_hand(v0, a, b - h)) / (2 * h)
    assert float(v.grad) == pytest.approx(fd_v, rel=1e-7, abs=1e-9)
    assert float(al.grad) == pytest.approx(fd_a, rel=1e-6, abs=1e-9)  # the learnable hyper-parameters
    assert float(be.grad) == pytest.approx(fd_b, rel=1e-6, abs=1e-9)
    # and the closed form f'(v) = beta sech^2(beta v / alpha), f'(0) = beta
    assert float(v.grad) == pytest.approx(b / math.cosh(b * v0 / a) ** 2, rel=1e-12)


def test_inverse_round_trip():
    a, b = 0.4, 2.0
    w = torch.linspace(-0.39, 0.39, 101, dtype=torch.float64)
    assert torch.allclose(wc.compander(wc.compander_inverse(w, a, b), a, b), w, atol=1e-12)


def _mlp(seed, p=0.0):
    torch.manual_seed(seed)
    return wc.MLP(6, [5, 4], 3, p)


def test_parametrization_forward_equals_hand_network():
    torch.manual_seed(0)
    x = torch.rand(7, 6)
    plain = _mlp(1)
    w0 = [layer.weight.detach().clone() for layer in plain.layers]
    net = _mlp(1)
    comps = wc.add_compander(net, alpha_mult=3.0, beta=2.0)
    # right_inverse: the reparametrised network starts from exactly the same weights and function
    for layer, w in zip(net.layers, w0):
        assert parametrize.is_parametrized(layer, "weight")
        assert torch.allclose(layer.weight, w, atol=1e-6)
    assert torch.allclose(net(x), plain(x), atol=1e-5)
    # move V and the hyper-parameters, then compare with a network written out by hand from V
    with torch.no_grad():
        for layer, c in zip(net.layers, comps):
            layer.parametrizations.weight.original.add_(0.3 * torch.randn_like(layer.weight))
            c.log_alpha.add_(0.2)
            c.log_beta.sub_(0.1)
    h = x.numpy().astype(np.float64)
    for i, (layer, c) in enumerate(zip(net.layers, comps)):
        V = layer.parametrizations.weight.original.detach().numpy().astype(np.float64)
        a, b = float(np.exp(c.log_alpha.item())), float(np.exp(c.log_beta.item()))
        W = np.vectorize(lambda t: _f_hand(t, a, b))(V)  # elementwise, by hand
        h = h @ W.T + layer.bias.detach().numpy()
        if i < len(net.layers) - 1:
            h = np.maximum(h, 0.0)
    net.eval()
    assert np.allclose(net(x).detach().numpy(), h, atol=1e-5)
    # alpha of layer l is alpha_mult / sqrt(fan_in) at registration
    fresh = wc.add_compander(_mlp(1), alpha_mult=3.0, beta=2.0)
    assert [float(c.alpha) for c in fresh] == pytest.approx([3 / math.sqrt(6), 3 / math.sqrt(5), 3 / math.sqrt(4)])


def test_gradient_through_parametrization_is_chain_rule():
    """dL/dV = f'(V) * dL/dW: a dropped derivative term (the expansion/saturation of the gradient) fails this."""
    torch.manual_seed(3)
    x, y = torch.rand(9, 6), torch.randint(0, 3, (9,))
    net = _mlp(2)
    wc.add_compander(net, alpha_mult=2.0, beta=3.0)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    gV = net.layers[0].parametrizations.weight.original.grad.clone()
    # the same loss with W as a free leaf
    V = net.layers[0].parametrizations.weight.original.detach()
    c = net.layers[0].parametrizations.weight[0]
    a, b = float(c.alpha), float(c.beta)
    W = wc.compander(V, a, b).clone().requires_grad_(True)
    h = torch.relu(x @ W.T + net.layers[0].bias)
    h = torch.relu(net.layers[1](h))
    torch.nn.functional.cross_entropy(net.layers[2](h), y).backward()
    fprime = b / torch.cosh(b * V / a) ** 2
    assert torch.allclose(gV, fprime * W.grad, atol=1e-7)


def test_near_zero_fraction_matches_loop():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 5, generator=g), 3 * torch.randn(2, 7, generator=g)]
    tau = 0.3
    small = total = 0
    for w in ws:
        rms = math.sqrt(sum(float(t) ** 2 for t in w.flatten()) / w.numel())
        for t in w.flatten():
            small += abs(float(t)) < tau * rms
            total += 1
    assert wc.near_zero_fraction(ws, tau) == pytest.approx(small / total)


def test_select_uses_seed_mean_validation_and_first_tie():
    cells = ["a", "b", "c"]
    val = {0: [0.5, 0.9, 0.7], 1: [0.9, 0.6, 0.8]}  # means 0.7, 0.75, 0.75
    assert wc.select(cells, val) == 1


def test_split_is_disjoint_and_complete():
    X, y = np.arange(50, dtype=np.float32).reshape(25, 2), np.arange(25) % 3
    Xtr, ytr, Xva, yva, Xte, yte = wc.split_data(X, y, 10, 5, seed=4)
    ids = np.concatenate([Xtr[:, 0].numpy(), Xva[:, 0].numpy(), Xte[:, 0].numpy()]) / 2
    assert sorted(ids.astype(int).tolist()) == list(range(25)) and (len(Xtr), len(Xva), len(Xte)) == (10, 5, 10)
    with pytest.raises(ValueError):
        wc.split_data(X, y, 20, 5, seed=0)


def _tiny_cfg(**kw):
    cfg = {"hidden": [8], "n_classes": 3, "momentum": 0.9, "batch_size": 8, "epochs": 3,
           "learn_hyper": True, "near_zero_tau": 0.1}
    cfg.update(kw)
    return cfg


def _tiny_data():
    g = np.random.default_rng(0)
    X = g.random((60, 6)).astype(np.float32)
    y = (X[:, 0] * 3).astype(np.int64).clip(0, 2)
    return wc.split_data(X, y, 30, 15, seed=0)


def test_train_one_deterministic_and_learns_hyperparameters():
    d = _tiny_data()
    r1 = wc.train_one(d, _tiny_cfg(), 0, 1e-3, 0.2, 0.1, wc=(3.0, 2.0))
    r2 = wc.train_one(d, _tiny_cfg(), 0, 1e-3, 0.2, 0.1, wc=(3.0, 2.0))
    assert r1 == r2
    a0 = [3.0 / math.sqrt(6), 3.0 / math.sqrt(8)]
    assert r1["alpha"] != pytest.approx(a0)  # learned
    frozen = wc.train_one(d, _tiny_cfg(learn_hyper=False), 0, 1e-3, 0.2, 0.1, wc=(3.0, 2.0))
    assert frozen["alpha"] == pytest.approx(a0) and frozen["beta"] == pytest.approx([2.0, 2.0])
    base = wc.train_one(d, _tiny_cfg(), 0, 1e-3, 0.2, 0.1)
    assert base["alpha"] == [] and 0.0 <= base["near_zero"] <= 1.0


def test_schema_rejects_bad_params(tmp_path):
    # only this paper's registry file (other papers' files do not matter here)
    (tmp_path / "pruning").mkdir()
    (tmp_path / "pruning" / "weight_compander.paper.yaml").write_bytes(
        (REPO_ROOT / "src/reprolab/pruning/weight_compander.paper.yaml").read_bytes())
    params = read_params(registry_dir=tmp_path)
    cfg = load_params("weight_compander", "smoke", params)
    for key, bad in [("dataset", "cifar10"), ("alpha_init", 0.5), ("dropout_grid", [1.0]), ("lr_grid", [0.0]),
                     ("beta_init", 0.0)]:
        p = copy.deepcopy(params)
        p["weight_compander"][key] = bad
        with pytest.raises(ParamError):
            load_params("weight_compander", "smoke", p)
    for prof in ("smoke", "quick", "full"):
        c = load_params("weight_compander", prof, params)
        cells = wc.grid_cells(c)  # the one grid both arms are tuned over: every (wd, dropout, lr) combination
        assert len(cells) == len(c["wd_grid"]) * len(c["dropout_grid"]) * len(c["lr_grid"]) == len(set(cells)), prof


# ---------------------------------------------------------------- added after the review (mutations that survived)
def test_optimizer_no_weight_decay_on_hyperparameters():
    """log alpha / log beta sit in a group with weight_decay 0; every other tensor (V, biases) gets wd; none twice."""
    cfg = _tiny_cfg()
    model, comps = wc.build_model(6, cfg, 0, 0.2, wc=(3.0, 2.0))
    opt = wc.make_optimizer(model, comps, cfg, 5e-3, 0.07)
    hyper = {id(t) for c in comps for t in (c.log_alpha, c.log_beta)}
    seen = []
    for g in opt.param_groups:
        assert g["lr"] == 0.07 and g["momentum"] == 0.9
        for t in g["params"]:
            seen.append(id(t))
            assert g["weight_decay"] == (0.0 if id(t) in hyper else 5e-3)
    assert sorted(seen) == sorted(id(t) for t in model.parameters()) and hyper <= set(seen)
    # behaviour: with zero loss gradient, one step leaves log alpha, log beta unchanged (no decay) but shrinks V
    before = [float(c.log_alpha) for c in comps] + [float(c.log_beta) for c in comps]
    V0 = model.layers[0].parametrizations.weight.original.detach().clone()
    opt.zero_grad()
    (0.0 * sum(layer.weight.sum() for layer in model.layers)).backward()
    opt.step()
    assert [float(c.log_alpha) for c in comps] + [float(c.log_beta) for c in comps] == before
    assert torch.allclose(model.layers[0].parametrizations.weight.original, V0 * (1 - 0.07 * 5e-3))


def test_accuracy_is_deterministic_in_eval_mode():
    """Evaluation has dropout off: with p = 0.9 two calls agree, and equal a hand forward pass without dropout."""
    torch.manual_seed(0)
    net = _mlp(5, p=0.9)
    X, y = torch.rand(200, 6), torch.randint(0, 3, (200,))
    net.train()  # accuracy must switch to eval itself
    a1, a2 = wc.accuracy(net, X, y), wc.accuracy(net, X, y)
    h = X
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            h = h @ layer.weight.T + layer.bias
            if i < len(net.layers) - 1:
                h = torch.relu(h)
    assert a1 == a2 == pytest.approx(float((h.argmax(-1) == y).double().mean()))


def test_train_one_arms_share_init_and_batch_order():
    """The WC and baseline networks of a seed start from the same effective weights (= the plain seeded MLP) and see
    the same batches and dropout masks: with f ~ identity (huge alpha, beta 1, frozen) they train to the same weights."""
    d, cfg = _tiny_data(), _tiny_cfg()
    init_b = wc.train_one(d, _tiny_cfg(epochs=0), 3, 1e-3, 0.3, 0.1, keep_weights=True)["weights"]
    init_w = wc.train_one(d, _tiny_cfg(epochs=0), 3, 1e-3, 0.3, 0.1, wc=(2.0, 2.5), keep_weights=True)["weights"]
    torch.manual_seed(3)
    plain = wc.MLP(6, [8], 3, 0.3)
    for wb, ww, layer in zip(init_b, init_w, plain.layers):
        assert torch.equal(wb, layer.weight.detach())
        assert torch.allclose(ww, wb, atol=1e-6)
    frozen = _tiny_cfg(learn_hyper=False)
    b = wc.train_one(d, frozen, 3, 1e-3, 0.3, 0.1, keep_weights=True)
    w = wc.train_one(d, frozen, 3, 1e-3, 0.3, 0.1, wc=(1e5, 1.0), keep_weights=True)
    for wb, ww in zip(b["weights"], w["weights"]):
        assert torch.allclose(ww, wb, atol=1e-4)
    assert w["test_acc"] == b["test_acc"]


def test_static_control_matches_loop():
    g = torch.Generator().manual_seed(1)
    ws, alphas = [torch.randn(3, 4, generator=g), 0.1 * torch.randn(5, 2, generator=g)], [0.7, 0.05]
    out = wc.static_control(ws, alphas)
    for w, a, o in zip(ws, alphas, out):
        for t, u in zip(w.flatten(), o.flatten()):
            assert float(u) == pytest.approx(a * math.tanh(float(t) / a), rel=1e-5, abs=1e-7)
