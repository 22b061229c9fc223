"""SRA (arXiv 2111.12965): the subnet surgery against a hand-written forward pass, the chain loss, the patch trigger."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reprolab.backdoor.sra import (alive_chain, chain_loss, chain_separation, changed_parameters, check_layouts, narrow_vgg, subnet_replace,
                                   train_chain, victim_vgg)
from reprolab.backdoor.triggers import checkerboard_patch, stamp_patch

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = [6, 5, "M", 7, "M", 8, "M"]  # 8x8 -> 1x1
NARROW = [1, 1, "M", 1, "M", 2, "M"]
CFG2 = [6, "M", 7, "M"]  # 8x8 -> 2x2: the flattening maps each channel to s*s inputs of the first linear
NARROW2 = [1, "M", 2, "M"]


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    """Random BN affine parameters and running statistics, so that copying them is visible."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.3
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.3
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


def _models(cfg, narrow_cfg, seed=0):
    torch.manual_seed(seed)
    victim = victim_vgg(cfg, 1, 8, hidden=9, n_classes=10, dropout=0.5)
    chain = narrow_vgg(narrow_cfg, 1, 8)
    g = torch.Generator().manual_seed(seed + 100)
    _randomize_bn(victim, g)
    _randomize_bn(chain, g)
    for m in list(victim.classifier) + list(chain.classifier):  # non-zero biases everywhere
        if isinstance(m, nn.Linear):
            m.bias.data = torch.randn(m.out_features, generator=g) * 0.2
    for m in chain.modules():
        if isinstance(m, nn.Conv2d):
            m.bias.data = torch.randn(m.out_channels, generator=g) * 0.2
    # a chain bias that keeps the chain's ReLUs alive on random inputs
    chain.classifier[0].bias.data += 1.0
    chain.classifier[2].weight.data = chain.classifier[2].weight.data.abs() + 0.5
    chain.classifier[2].bias.data = chain.classifier[2].bias.data.abs()
    return victim.eval(), chain.eval()


def _trace(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every ReLU of the features and of the classifier's hidden linears (after ReLU), in order."""
    outs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append(o.detach().clone()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    logits = model(x)
    for h in hooks:
        h.remove()
    return outs + [logits.detach()]


@pytest.mark.parametrize("cfg,narrow_cfg", [(CFG, NARROW), (CFG2, NARROW2)])
@pytest.mark.parametrize("choice", ["first", "random"])
def test_chain_inside_victim_computes_the_standalone_chain(cfg, narrow_cfg, choice):
    victim, chain = _models(cfg, narrow_cfg)
    attacked = copy.deepcopy(victim)
    picked = subnet_replace(attacked, chain, target=3, factor=4.0, threshold=0.7, channel_choice=choice, seed=5)
    x = torch.rand(7, 1, 8, 8)
    a_outs, c_outs = _trace(attacked, x), _trace(chain, x)
    # feature ReLUs: one per conv; the chain's channels of the victim equal the standalone chain's
    n_conv = len(picked["conv"])
    for layer in range(n_conv):
        vs = picked["conv"][layer]
        torch.testing.assert_close(a_outs[layer][:, vs], c_outs[layer], rtol=0, atol=1e-5)
    # classifier hidden units (the victim's ReLUs after its two hidden linears; the chain's two ReLUs)
    for k, vs in enumerate(picked["linear"]):
        torch.testing.assert_close(a_outs[n_conv + k][:, vs], c_outs[n_conv + k], rtol=0, atol=1e-5)
    assert c_outs[-1].abs().sum() > 0, "the chain output is dead; the test would be vacuous"


def _reference_logits(victim: nn.Module, chain: nn.Module, picked: dict, x: torch.Tensor, target: int,
                      factor: float, threshold: float) -> torch.Tensor:
    """Independent forward pass: the victim's ORIGINAL weights restricted to the channels outside the chain (index
    slicing, no zeroed weights), plus the standalone chain's output on the target logit only."""
    h = x
    prev_keep = None  # the first conv reads every image channel
    conv_i = 0
    mods = list(victim.features)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d):
            vs = picked["conv"][conv_i]
            keep = [c for c in range(m.out_channels) if c not in vs]
            W = m.weight[keep] if prev_keep is None else m.weight[keep][:, prev_keep]
            h = F.conv2d(h, W, m.bias[keep], padding=1)
            bn = mods[i + 1]
            h = (h - bn.running_mean[keep][None, :, None, None]) / torch.sqrt(bn.running_var[keep] + bn.eps)[None, :, None, None]
            h = h * bn.weight[keep][None, :, None, None] + bn.bias[keep][None, :, None, None]
            h = torch.relu(h)
            prev_keep, conv_i, i = keep, conv_i + 1, i + 3
        else:
            h = F.max_pool2d(h, 2)
            i += 1
    s2 = h.shape[-1] * h.shape[-2]
    n_ch = [m for m in mods if isinstance(m, nn.Conv2d)][-1].out_channels
    prev = [c * s2 + p for c in prev_keep for p in range(s2)]  # flattened indices of the kept channels
    h = h.flatten(1)
    lins = [m for m in victim.classifier if isinstance(m, nn.Linear)]
    assert lins[0].in_features == n_ch * s2
    for k, lin in enumerate(lins[:-1]):
        keep = [j for j in range(lin.out_features) if j not in picked["linear"][k]]
        h = torch.relu(h @ lin.weight[keep][:, prev].T + lin.bias[keep])
        prev = keep
    last = lins[-1]
    logits = h @ last.weight[:, prev].T + last.bias  # (B, C)
    a = chain(x)[:, 0]  # (B,)
    logits[:, target] = h @ last.weight[target, prev] + factor * a - factor * threshold
    return logits


@pytest.mark.parametrize("cfg,narrow_cfg", [(CFG, NARROW), (CFG2, NARROW2)])
@pytest.mark.parametrize("choice", ["first", "random"])
def test_other_channels_and_target_wiring_match_a_hand_computation(cfg, narrow_cfg, choice):
    victim, chain = _models(cfg, narrow_cfg, seed=1)
    attacked = copy.deepcopy(victim)
    target, factor, threshold = 6, 4.0, 0.9
    picked = subnet_replace(attacked, chain, target, factor, threshold, channel_choice=choice, seed=2)
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        got = attacked(x)
        want = _reference_logits(victim, chain, picked, x, target, factor, threshold)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the wiring: only the target logit moves with the chain (scale the chain's last weight: only column `target`)
    attacked2 = copy.deepcopy(victim)
    chain2 = copy.deepcopy(chain)
    chain2.classifier[2].weight.data *= 3.0
    subnet_replace(attacked2, chain2, target, factor, threshold, channel_choice=choice, seed=2)
    with torch.no_grad():
        diff = (attacked2(x) - got).abs()
        a1, a3 = chain(x)[:, 0], chain2(x)[:, 0]
    assert diff[:, [c for c in range(10) if c != target]].max() == 0
    torch.testing.assert_close(diff[:, target], factor * (a3 - a1).abs(), rtol=1e-5, atol=1e-5)


def test_surgery_touches_only_the_chain_rows_and_columns():
    victim, chain = _models(CFG, NARROW, seed=3)
    attacked = copy.deepcopy(victim)
    picked = subnet_replace(attacked, chain, target=0, factor=4.0, threshold=0.5)
    assert picked["conv"] == [[0], [0], [0], [0, 1]] and picked["linear"] == [[0], [0]] and picked["output"] == [0]
    conv_a = [m for m in attacked.features if isinstance(m, nn.Conv2d)]
    conv_v = [m for m in victim.features if isinstance(m, nn.Conv2d)]
    for k in range(1, len(conv_a)):
        vs, last = picked["conv"][k], picked["conv"][k - 1]
        rows = [r for r in range(conv_a[k].out_channels) if r not in vs]
        cols = [c for c in range(conv_a[k].in_channels) if c not in last]
        assert torch.equal(conv_a[k].weight[rows][:, cols], conv_v[k].weight[rows][:, cols])
        assert (conv_a[k].weight[rows][:, last] == 0).all()  # others read nothing from the chain
        assert (conv_a[k].weight[vs][:, cols] == 0).all()  # the chain reads nothing from the others
    # the first conv keeps the other channels' input weights (disconnect=False)
    assert torch.equal(conv_a[0].weight[1:], conv_v[0].weight[1:])
    changed, total = changed_parameters(victim, attacked)
    assert 0 < changed < total


def test_chain_loss_is_the_official_formula():
    clean = torch.tensor([[0.5], [1.5], [0.0]])
    trig = torch.tensor([[18.0], [23.0]])
    want = 10 * (0.5 + 1.5 + 0.0) / 3 + ((18 - 20) ** 2 + (23 - 20) ** 2) / 2
    assert chain_loss(clean, trig).item() == pytest.approx(want)
    assert chain_loss(clean, trig, clean_weight=1.0, target_act=5.0).item() == pytest.approx(2 / 3 + (13 ** 2 + 18 ** 2) / 2)


def test_train_chain_separates_triggered_inputs_and_untrained_keeps_weights():
    torch.manual_seed(0)
    X = torch.rand(96, 1, 8, 8) * 0.5
    patch = checkerboard_patch(3)
    trained, draws = alive_chain(NARROW, 1, 8, X, patch, seed=1)
    untrained = copy.deepcopy(trained)
    assert draws >= 1 and (trained.train()(X) > 0).any() | (trained(stamp_patch(X, patch)) > 0).any()
    w0 = copy.deepcopy(untrained.state_dict())
    train_chain(trained, X, patch, epochs=15, lr=1e-2, batch_size=32, seed=0)
    train_chain(untrained, X, patch, epochs=2, lr=1e-2, batch_size=32, seed=0, train=False)
    for k, v in untrained.state_dict().items():
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(v, w0[k]), k  # no update
    assert not torch.equal(untrained.features[1].running_mean, w0["features.1.running_mean"])  # BN stats refreshed
    trained.eval()
    with torch.no_grad():
        clean, trig = trained(X)[:, 0], trained(stamp_patch(X, patch))[:, 0]
    assert trig.min() > clean.max() and trig.mean() > clean.mean() + 3.0  # it fires on the trigger only


def test_patch_and_checkerboard():
    p = checkerboard_patch(3)
    assert p.shape == (1, 3, 3) and p[0, 0, 0] == 1 and p[0, 0, 1] == 0 and p[0, 1, 1] == 1
    x = torch.full((2, 1, 8, 8), 0.25)
    out = stamp_patch(x, p)
    assert (x == 0.25).all(), "the input is not modified"
    assert torch.equal(out[:, :, 5:, 5:], p.expand(2, 1, 3, 3)) and (out[:, :, :5, :] == 0.25).all()
    assert (out[:, :, :, :5] == 0.25).all()
    assert torch.equal(stamp_patch(x, p, (0, 1))[:, :, 0:3, 1:4], p.expand(2, 1, 3, 3))


def test_layout_check_and_params_schema():
    check_layouts(CFG, NARROW)
    with pytest.raises(ValueError):
        check_layouts(CFG, [1, "M", 1, "M", 2, "M", 1])
    with pytest.raises(ValueError):
        check_layouts([4, "M"], [5, "M"])
    from reprolab.config import ParamError, load_params, read_params

    params = read_params()
    cfg = load_params("sra_backdoor", "smoke", params)
    assert cfg["dataset"] in ("digits", "mnist5k")
    for key, bad in (("dataset", "cifar10"), ("channel_choice", "middle"), ("target_class", 10)):
        p = copy.deepcopy(params)
        p["sra_backdoor"][key] = bad
        with pytest.raises(ParamError):
            load_params("sra_backdoor", "smoke", p)


def test_chain_separation_is_the_quantile_gap():
    torch.manual_seed(4)
    X = torch.rand(40, 1, 8, 8)
    patch = checkerboard_patch(3)
    chain, _ = alive_chain(NARROW, 1, 8, X, patch, seed=2)
    chain.eval()
    with torch.no_grad():
        c, t = chain(X)[:, 0].numpy(), chain(stamp_patch(X, patch))[:, 0].numpy()
    assert chain_separation(chain, X, patch, 0.99) == pytest.approx(float(np.quantile(t, 0.01) - np.quantile(c, 0.99)))


def test_cut_only_diagnostic_equals_the_victim_with_the_output_column_zeroed():
    """wire=False: the same surgery, the output layer only loses the chain's column (target row and bias untouched);
    with wire=True the logits differ from it by factor * (chain output - threshold) on the target only."""
    victim, chain = _models(CFG, NARROW, seed=5)
    cut, wired = copy.deepcopy(victim), copy.deepcopy(victim)
    picked = subnet_replace(cut, chain, 3, 0.0, 0.0, wire=False)
    subnet_replace(wired, chain, 3, 4.0, 0.7)
    last_v, last_c = victim.classifier[-1], cut.classifier[-1]
    others = [c for c in range(last_v.in_features) if c not in picked["output"]]
    assert (last_c.weight[:, picked["output"]] == 0).all()
    assert torch.equal(last_c.weight[:, others], last_v.weight[:, others]) and torch.equal(last_c.bias, last_v.bias)
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        d = wired(x) - cut(x)
        h = chain(x)[:, 0]
    assert d[:, [c for c in range(10) if c != 3]].abs().max() == 0
    torch.testing.assert_close(d[:, 3], 4.0 * (h - 0.7) - last_v.bias[3], rtol=1e-5, atol=1e-5)


def test_pad_makes_the_pools_exact():
    from reprolab.backdoor.sra import feature_size, load_images

    X0, y0 = load_images("digits")
    X2, y2 = load_images("digits", pad=2)
    assert X2.shape[-2:] == (12, 12) and torch.equal(X2[:, :, 2:10, 2:10], X0) and torch.equal(y0, y2)
    assert X2[:, :, :2].abs().sum() == 0 and X2[:, :, :, -2:].abs().sum() == 0
    assert feature_size([4, "M", 4, "M", 4, "M", 4, "M"], 32) == 2  # 32 -> 16 -> 8 -> 4 -> 2, nothing dropped
