"""Mixture-of-Supernets: the mixture projection against a naive sum of sliced experts (layer- and neuron-wise), router
outputs on the simplex, m = 1 reducing exactly to HAT slicing (projection and whole network), the architecture
encoding reaching every router, the sandwich step, perplexity and the unigram reference against hand computations."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from reprolab.nas.elastic import DynamicLinear
from reprolab.tf import mixture_of_supernets as M
from reprolab.tf.tiny import TFConfig, TinyTransformer, lm_loss

TF = TFConfig(kind="causal", d_model=16, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=32, max_len=12)
CFG = dict(d_model=16, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=32, seq_len=12, embed_choices=[8, 16],
           depth_choices=[1, 2], heads_choices=[1, 2], mlp_choices=[16, 32],
           subnets={"min": [8, 1, 1, 16], "max": [16, 2, 2, 32]}, n_experts=2, router_hidden=8, router_dropout=0.1,
           lr=1e-2, betas=[0.9, 0.98], weight_decay=0.0, batch_size=8, warmup_steps=1, grad_clip=None,
           sandwich=True, steps=3)


def _enc():
    return torch.tensor([0.5, 1.0, 0.25, 0.5])


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_mixture_equals_naive_sum_of_sliced_experts(mode):
    torch.manual_seed(0)
    p = M.MoSLinear(6, 10, 3, mode, bias=True, hidden=5)
    with torch.no_grad():
        p.bias.normal_()
    p.eval()
    p.arch.copy_(_enc())
    x = torch.randn(4, 7, 5)  # input width 5 of max 6
    out = 7
    a = p.alphas(out)
    # naive: loop over experts (and output neurons), slice each expert, weight, sum
    W = torch.zeros(out, 5)
    b = torch.zeros(out)
    for k in range(3):
        if mode == "layer":
            W += a[k] * p.weight[k, :out, :5]
            b += a[k] * p.bias[k, :out]
        else:
            for i in range(out):
                W[i] += a[i, k] * p.weight[k, i, :5]
                b[i] += a[i, k] * p.bias[k, i]
    ref = x @ W.T + b
    torch.testing.assert_close(p(x, out), ref)
    # the slice of the full mixture equals the mixture of slices (layer-wise only: neuron-wise alphas depend on out)
    if mode == "layer":
        Wf, bf = p.mixed(10, 6)
        torch.testing.assert_close(p(x, out), F.linear(x, Wf[:out, :5], bf[:out]))
    # mutation check: dropping an expert changes the output
    with torch.no_grad():
        p.weight[1].zero_()
    assert not torch.allclose(p(x, out), ref)


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_router_weights_sum_to_one_and_depend_on_the_architecture(mode):
    torch.manual_seed(1)
    p = M.MoSLinear(6, 10, 2, mode, hidden=16)
    p.eval()
    outs = []
    for enc in (_enc(), torch.tensor([1.0, 0.5, 1.0, 1.0])):
        p.arch.copy_(enc)
        a = p.alphas(7)
        assert a.shape == ((2,) if mode == "layer" else (7, 2))
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
        outs.append(a)
    assert not torch.allclose(outs[0], outs[1])  # routed by the architecture
    if mode == "neuron":  # per-neuron alphas: first-k slice of the router's elastic last layer
        p.arch.copy_(_enc())
        torch.testing.assert_close(p.alphas(4), p.alphas(7)[:4])


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_one_expert_is_exactly_plain_slicing(mode):
    torch.manual_seed(2)
    p = M.MoSLinear(6, 10, 1, mode, hidden=4)
    d = DynamicLinear(6, 10)
    with torch.no_grad():
        p.bias.normal_()
        d.linear.weight.copy_(p.weight[0])
        d.linear.bias.copy_(p.bias[0])
    x = torch.randn(3, 4)
    for out in (3, 10):
        torch.testing.assert_close(p(x, out), d(x, out))


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_one_expert_network_equals_hat_network(mode):
    torch.manual_seed(3)
    mos = M.MoSTransformer(TF, n_experts=1, mode=mode, hidden=4)
    hat = TinyTransformer(TF)
    src = mos.state_dict()
    with torch.no_grad():
        for name, t in hat.state_dict().items():
            if ".fc1." in name or ".fc2." in name:
                base = name.replace(".linear.weight", ".weight").replace(".linear.bias", ".bias")
                t.copy_(src[base][0])
            else:
                t.copy_(src[name])
    x = torch.randint(0, 256, (2, 12))
    mos.eval(), hat.eval()
    for child in (mos.max_config(), {"embed": 8, "depth": 1, "heads": [1], "mlp": [16]},
                  {"embed": 16, "depth": 2, "heads": [2, 1], "mlp": [16, 32]}):
        mos.set_active_subnet(child)
        hat.set_active_subnet(child)
        torch.testing.assert_close(mos(x), hat(x))


def test_arch_encoding_reaches_every_router_and_layerwise_router_is_shared():
    mos = M.MoSTransformer(TF, n_experts=2, mode="layer", hidden=4)
    child = {"embed": 8, "depth": 2, "heads": [1, 2], "mlp": [16, 32]}
    mos.set_active_subnet(child)
    want = torch.tensor([8 / 16, 2 / 2, 24 / 32, 1.5 / 2])
    torch.testing.assert_close(M.arch_encoding(TF, child), want)
    layers = mos.mos_layers()
    assert len(layers) == 2 * TF.n_layers  # fc1 and fc2 of every layer; attention stays sliced
    assert all(isinstance(getattr(b, r), DynamicLinear) for b in mos.blocks for r in ("q", "k", "v", "o"))
    for m in layers:
        torch.testing.assert_close(m.arch, want)
    for b in mos.blocks:
        assert b.fc1.router is b.fc2.router  # one arch_expert per layer
    assert mos.blocks[0].fc1.router is not mos.blocks[1].fc1.router
    neu = M.MoSTransformer(TF, n_experts=2, mode="neuron", hidden=4)
    assert neu.blocks[0].fc1.router is not neu.blocks[0].fc2.router
    # router init is torch's default (not the kit's normal 0.02 that TinyTransformer.reset_parameters applies)
    w = mos.blocks[0].fc1.router.net[0].weight
    assert float(w.abs().max()) > 0.1  # kaiming-uniform bound 1/sqrt(4) = 0.5; normal(0.02) would stay < 0.1


def test_sandwich_step_gradient_is_the_mean_over_children():
    torch.manual_seed(4)
    net = TinyTransformer(TF)
    x = torch.randint(0, 256, (3, 12))
    y = torch.randint(0, 256, (3, 12))
    space = M.space_of(CFG)
    cs = M.step_configs(space, random.Random(0))
    assert cs[1] == TinyTransformer.space_max(space) and cs[2] == TinyTransformer.space_min(space)
    net.zero_grad()
    loss = M.sandwich_step(net, x, y, cs)
    g = net.head.linear.weight.grad.clone()
    ref_loss, ref = 0.0, torch.zeros_like(g)
    for c in cs:
        net.zero_grad()
        net.set_active_subnet(c)
        lo = lm_loss(net, x, y)
        lo.backward()
        ref_loss += float(lo) / 3
        ref += net.head.linear.weight.grad / 3
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(g, ref)
    assert len(M.step_configs(space, random.Random(0), sandwich=False)) == 1


def test_perplexity_and_unigram_match_hand_computation():
    torch.manual_seed(5)
    net = TinyTransformer(TF)
    X = torch.randint(0, 256, (5, 12))
    Y = torch.randint(0, 256, (5, 12))
    with torch.no_grad():
        logits = net(X)
    ref = math.exp(float(F.cross_entropy(logits.reshape(-1, 256), Y.reshape(-1))))
    assert M.perplexity(net, X, Y, batch_size=2) == pytest.approx(ref, rel=1e-5)
    data = {"train": (X, torch.zeros(5, 12, dtype=torch.long)), "val": (X, torch.zeros(2, 3, dtype=torch.long))}
    # byte 0 seen 60 times, add-one smoothing over 256 bytes: p0 = 61 / 316
    assert M.unigram_perplexity(data) == pytest.approx(316 / 61)
    assert M.gap_reduction(1.0, 4.0) == pytest.approx(0.75)
    assert M.gap_reduction(1.0, 0.0) == 0.0


def test_training_is_deterministic_and_subnets_validated(tmp_path):
    from reprolab.tf.data import lm_data
    data = lm_data(12, 64, 8, 8, 0)
    m1, l1 = M.train_supernet("mos_neuron", data, CFG, 0)
    m2, l2 = M.train_supernet("mos_neuron", data, CFG, 0)
    assert l1 == l2
    c = M.subnets(CFG)["min"]
    assert M.perplexity(m1, *data["val"], c) == M.perplexity(m2, *data["val"], c)
    s, ls = M.train_standalone(c, data, CFG, 0)
    tf = M.tf_config(CFG)
    assert M._child_tf(tf, c) == TinyTransformer(tf).child_tfconfig(c)
    assert s.cfg.d_model == 8 and s.cfg.n_layers == 1 and len(ls) == CFG["steps"]
    M.check_space(CFG)
    with pytest.raises(ValueError):
        M.check_space({**CFG, "subnets": {"bad": [12, 1, 1, 16]}})
    with pytest.raises(ValueError):
        M.build_supernet("spos", CFG, 0)


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_router_and_every_expert_receive_gradients(mode):
    torch.manual_seed(6)
    mos = M.MoSTransformer(TF, n_experts=2, mode=mode, hidden=8)
    x = torch.randint(0, 256, (2, 12))
    mos.zero_grad()
    M.sandwich_step(mos, x, x, M.step_configs(M.space_of(CFG), random.Random(1)))
    for p in mos.mos_layers():
        assert p.weight.grad is not None and float(p.weight.grad[0].abs().sum()) > 0
        assert float(p.weight.grad[1].abs().sum()) > 0
        assert all(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in p.router.parameters()
                   if q.dim() == 2)


@pytest.mark.parametrize("sandwich", [True, False])
def test_train_supernet_steps_use_the_sandwich_children(monkeypatch, sandwich):
    from reprolab.tf.data import lm_data
    data = lm_data(12, 32, 4, 4, 0)
    seen = []
    real = M.sandwich_step

    def spy(model, x, y, configs):
        seen.append([dict(c) for c in configs])
        return real(model, x, y, configs)

    monkeypatch.setattr(M, "sandwich_step", spy)
    cfg = {**CFG, "steps": 2, "sandwich": sandwich}
    M.train_supernet("hat", data, cfg, 7)
    rng, space = random.Random(7), M.space_of(cfg)
    want = [M.step_configs(space, rng, sandwich) for _ in range(2)]
    assert seen == want
    assert [len(c) for c in seen] == ([3, 3] if sandwich else [1, 1])
    if sandwich:  # the largest and the smallest child every step (official train.py:273-276)
        assert all(c[1] == TinyTransformer.space_max(space) and c[2] == TinyTransformer.space_min(space) for c in seen)


def test_arch_encoding_averages_active_layers_only():
    child = {"embed": 16, "depth": 1, "heads": [1, 2], "mlp": [16, 32]}  # layer 2 inactive (official [:layer_num])
    torch.testing.assert_close(M.arch_encoding(TF, child), torch.tensor([1.0, 0.5, 0.5, 0.5]))


def test_reduction_of_means_is_the_inverted_paired_t_test():
    from reprolab.claims import interval
    gm = [1.0, 0.6, 1.3, 0.9, 0.4]
    gh = [2.0, 2.6, 1.8, 3.1, 2.2]
    est, (lo, hi) = M.reduction_of_means(gm, gh)
    assert est == pytest.approx(1 - sum(gm) / sum(gh))
    # brute force: R is inside iff the t interval of gap_m - (1 - R) gap_h contains 0
    inside = []
    for i in range(-2000, 2001):
        r = i / 1000
        _, (a, b) = interval([x - (1 - r) * y for x, y in zip(gm, gh)], "difference")
        if a <= 0 <= b:
            inside.append(r)
    assert lo == pytest.approx(min(inside), abs=2e-3) and hi == pytest.approx(max(inside), abs=2e-3)
    assert M.reduction_of_means([1.0, 2.0, 0.5], [0.5, -0.4, 0.1])[1] is None  # HAT gap ~0: unbounded
