"""When Layers Play the Lottery (arXiv 2301.10835): each piece against an independent reference."""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprolab.pruning.layer_lottery import (ResNet, block_grad_norms, block_scores, choose_blocks, count_filters,
                                            count_flops, filter_fraction_for_flops, filter_keep, filter_scores,
                                            filters_removed, grasp_batch, grasp_scores, load_images, lr_at,
                                            prune_filters, remove_blocks, removable_blocks, run_seed)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed=0, blocks=(3, 3, 3), width=2, mids=None, dtype=torch.float64):
    return ResNet(1, 3, blocks, width, mids, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _batch(seed=0, n=12, side=4, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 1, side, side, generator=g, dtype=dtype), torch.arange(n) % classes


def _randomise_bn(net, seed=0):
    """BN statistics and affine parameters away from their initial values (as after training)."""
    g = torch.Generator().manual_seed(200 + seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)


# ---------------------------------------------------------------- GraSP against finite differences
def _half_loss(net, x, y, T):
    N = x.shape[0]
    return F.cross_entropy(net(x[: N // 2]) / T, y[: N // 2]) + F.cross_entropy(net(x[N // 2:]) / T, y[N // 2:])


def _grad(net, x, y, T, ws):
    return torch.autograd.grad(_half_loss(net, x, y, T), ws)


def test_grasp_per_weight_scores_match_finite_difference_hessian_gradient_product():
    """S = -theta * Hg with Hg = (grad L(theta + eps g) - grad L(theta - eps g)) / (2 eps), every weight of a tiny net
    (first-order gradients only: an independent route to the Hessian-gradient product)."""
    net = _net(1, blocks=(2, 2, 2))
    x, y = _batch(1)
    T = 2.0
    S = grasp_scores(net, x, y, T=T, reinit_linear=False)
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ws = [dict(net.named_modules())[n].weight for n in names]
    g = [t.detach() for t in _grad(net, x, y, T, ws)]
    eps = 1e-7  # small: a step must not cross a ReLU kink
    with torch.no_grad():
        saved = [w.detach().clone() for w in ws]
        for w, gi in zip(ws, g):
            w.add_(eps * gi)
    up = _grad(net, x, y, T, ws)
    with torch.no_grad():
        for w, s0, gi in zip(ws, saved, g):
            w.copy_(s0 - eps * gi)
    dn = _grad(net, x, y, T, ws)
    with torch.no_grad():
        for w, s0 in zip(ws, saved):
            w.copy_(s0)
    for n, w, a, b in zip(names, ws, up, dn):
        hg = (a - b) / (2 * eps)
        ref = -w.detach() * hg
        torch.testing.assert_close(S[n], ref, rtol=1e-4, atol=1e-9 * max(1.0, float(ref.abs().max()))), n
    assert any(float(S[n].abs().max()) > 0 for n in names)


def test_block_score_is_the_directional_derivative_of_the_gradient_norm():
    """Sum of S over a block = -d/de [1/2 ||grad L(theta with the block's convolutions scaled by 1 + e)||^2] at e = 0
    (central differences of plain first-order gradients); and, batch norm being scale-invariant, = ||g_block||^2."""
    net = _net(2)
    x, y = _batch(2, n=12)
    T = 3.0
    S = grasp_scores(net, x, y, T=T, reinit_linear=False)
    bs = block_scores(S, net)
    ws = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def half_sq_norm():
        return 0.5 * sum(float(t.square().sum()) for t in _grad(net, x, y, T, ws))

    eps = 1e-5
    for i, blk in enumerate(net.blocks):
        conv = [blk.conv1.weight, blk.conv2.weight]
        saved = [c.detach().clone() for c in conv]
        vals = []
        for e in (eps, -eps):
            with torch.no_grad():
                for c, s0 in zip(conv, saved):
                    c.copy_(s0 * (1 + e))
            vals.append(half_sq_norm())
        with torch.no_grad():
            for c, s0 in zip(conv, saved):
                c.copy_(s0)
        ref = -(vals[0] - vals[1]) / (2 * eps)
        assert float(bs[i]) == pytest.approx(ref, rel=1e-4, abs=1e-12), i
    # batch norm makes each convolution scale-invariant (up to BN's eps): sum of S over a block = ||g_block||^2
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    bs0 = block_scores(grasp_scores(net, x, y, T=T, reinit_linear=False), net)
    gn = block_grad_norms(net, x, y, T=T, reinit_linear=False)
    torch.testing.assert_close(bs0, gn, rtol=1e-6, atol=1e-14)


def test_grasp_reinitialises_only_a_copy_and_is_seeded():
    net = _net(3)
    before = copy.deepcopy(net.state_dict())
    x, y = _batch(3)
    a = grasp_scores(net, x, y, reinit_linear=True, seed=5)
    b = grasp_scores(net, x, y, reinit_linear=True, seed=5)
    c = grasp_scores(net, x, y, reinit_linear=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # original untouched (BN stats too)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc"], c["fc"])


def test_grasp_batch_takes_first_examples_of_each_class_in_class_order():
    x = torch.arange(20.0).reshape(20, 1, 1, 1)
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    xb, yb = grasp_batch(x, y, 3, 2)
    assert yb.tolist() == [0, 0, 1, 1, 2, 2]
    assert xb.flatten().tolist() == [1, 3, 2, 5, 0, 4]


# ---------------------------------------------------------------- block removal = identity path
def test_removable_blocks_and_removal_rule():
    net = _net(0, blocks=(5, 5, 5))
    assert removable_blocks(net) == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]  # not block 0, not 5 and 10
    imp = [0.0] * 12
    imp[:4] = [-4.0, -3.0, -2.0, -1.0]  # stage 1 least important: only three of its blocks may go
    assert choose_blocks(imp, net, 4) == [1, 2, 3, 6]  # then the earliest tied block of stage 2
    assert choose_blocks(list(range(12)), net, 9) == [1, 2, 3, 6, 7, 8, 11, 12, 13]
    with pytest.raises(ValueError, match="at most 9"):
        choose_blocks(list(range(12)), net, 10)
    with pytest.raises(ValueError):
        remove_blocks(net, [5])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_removed_block_equals_identity_path(mode):
    """The shallower network (weights transferred) computes what the dense network computes with those blocks'
    residual branches switched off -- at init by zeroing their weights (the zeroed-out scheme, Appendix A.1) and, after
    'training' (random BN statistics), by replacing the block with the identity."""
    net = _net(4)
    x, _ = _batch(4, n=8)
    removed = [2, 4, 7]
    small = remove_blocks(net, removed)
    assert small.blocks_per_stage == (2, 2, 2) and len(small.blocks) == 6
    zeroed = copy.deepcopy(net)
    with torch.no_grad():
        for i in removed:
            zeroed.blocks[i].conv2.weight.zero_()
    getattr(zeroed, mode)()
    getattr(small, mode)()
    torch.testing.assert_close(small(x), zeroed(x))  # BN(0) = beta = 0 at init: the branch adds nothing
    trained = copy.deepcopy(net)
    _randomise_bn(trained, 4)
    small = remove_blocks(trained, removed)
    kept = [i for i in range(len(net.blocks)) if i not in removed]
    for j, i in enumerate(kept):  # every kept layer inherits its weights and BN statistics
        for (k, a), b in zip(trained.blocks[i].state_dict().items(), small.blocks[j].state_dict().values()):
            assert torch.equal(a, b), (i, k)
    ident = copy.deepcopy(trained)
    for i in removed:
        ident.blocks[i].forward = types.MethodType(lambda self, h: h, ident.blocks[i])
    getattr(ident, mode)()
    getattr(small, mode)()
    torch.testing.assert_close(small(x), ident(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pruned_filters_equal_masked_channels(mode):
    """Removing conv1 filters = the dense network with those channels silenced after bn1 (gamma = beta = 0)."""
    net = _net(5, width=4)
    _randomise_bn(net, 5)
    x, _ = _batch(5, n=8)
    keep = {i: torch.tensor([j for j in range(m) if (i + j) % 3 != 0]) for i, m in enumerate(net.mids)}
    small = prune_filters(net, keep)
    assert small.mids == [len(keep[i]) for i in range(len(net.blocks))]
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for i, blk in enumerate(masked.blocks):
            gone = [j for j in range(blk.conv1.out_channels) if j not in keep[i].tolist()]
            blk.bn1.weight[gone] = 0
            blk.bn1.bias[gone] = 0
    getattr(masked, mode)()
    getattr(small, mode)()
    torch.testing.assert_close(small(x), masked(x))


# ---------------------------------------------------------------- FLOPs
def _hand_flops(side, w, blocks, mids, classes, in_ch=1):
    """By hand: conv = H_out W_out C_in C_out k^2 (official compute_flops), dense = in x out."""
    total = side * side * in_ch * w * 9  # stem
    c_in, h, k = w, side, 0
    for s, n in enumerate(blocks):
        c = w * 2 ** s
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            h_out = (h - 1) // stride + 1  # 3x3, padding 1
            m = mids[k]
            total += h_out * h_out * c_in * m * 9 + h_out * h_out * m * c * 9
            if stride != 1 or c_in != c:
                total += h_out * h_out * c_in * c  # 1x1 projection
            c_in, h, k = c, h_out, k + 1
    return total + c_in * classes


@pytest.mark.parametrize("side,blocks,width", [(8, (2, 2, 2), 4), (12, (5, 5, 5), 8), (7, (3, 3, 3), 2)])
def test_flops_counter_matches_hand_count(side, blocks, width):
    net = ResNet(1, 10, blocks, width)
    assert count_flops(net, side) == _hand_flops(side, width, blocks, net.mids, 10)
    mids = [max(1, m - (i % 3)) for i, m in enumerate(net.mids)]
    thin = ResNet(1, 10, blocks, width, mids)
    assert count_flops(thin, side) == _hand_flops(side, width, blocks, mids, 10)
    # a worked number: the 8x8, (2,2,2), width 4 net
    if side == 8 and blocks == (2, 2, 2):
        stem = 64 * 4 * 9
        s1 = 2 * 2 * (64 * 16 * 9)
        s2 = (16 * 4 * 8 * 9 + 16 * 64 * 9 + 16 * 4 * 8) + 2 * 16 * 64 * 9
        s3 = (4 * 8 * 16 * 9 + 4 * 256 * 9 + 4 * 8 * 16) + 2 * 4 * 256 * 9
        assert count_flops(net, 8) == stem + s1 + s2 + s3 + 16 * 10
    # filters: stem + every conv1 + every conv2 + the two projections
    assert count_filters(net) == width + sum(net.mids) + blocks[0] * 7 * width + 6 * width


def test_equal_block_cost_makes_the_speedup_a_count():
    """Residual blocks cost the same in every stage (resolution halves as width doubles): removing k of them saves
    k block costs wherever they are."""
    net = ResNet(1, 10, (5, 5, 5), 8)
    a = count_flops(remove_blocks(net, [1, 2, 3, 6, 7, 8, 11]), 12)
    b = count_flops(remove_blocks(net, [1, 6, 7, 11, 12, 13, 14]), 12)
    assert a == b
    per_block = 12 * 12 * 8 * 8 * 9 * 2
    assert count_flops(net, 12) - a == 7 * per_block


def test_filter_fraction_is_the_closest_achievable_flops():
    net = ResNet(1, 10, (5, 5, 5), 8)
    target = count_flops(remove_blocks(net, [1, 2, 3, 6, 7, 8, 11]), 12)
    q = filter_fraction_for_flops(net, target, 12)

    def flops_at(qq):
        mids = [m - r for m, r in zip(net.mids, filters_removed(net.mids, qq))]
        return _hand_flops(12, 8, (5, 5, 5), mids, 10)  # by hand, not with the counter under test

    got = flops_at(q)
    ok = [k / 1000 for k in range(1000) if all(r < m for r, m in zip(filters_removed(net.mids, k / 1000), net.mids))]
    best = min(abs(flops_at(qq) - target) for qq in ok)
    assert abs(got - target) <= best
    assert abs(got / target - 1) < 0.02


def test_filter_keep_removes_the_largest_scores():
    s = [torch.tensor([0.5, -1.0, 3.0, 2.0]), torch.tensor([1.0, 0.0, -2.0, 4.0, 0.1, 0.2, 0.3, 0.4])]
    keep = filter_keep(s, 0.5)
    assert keep[0].tolist() == [0, 1] and keep[1].tolist() == [1, 2, 4, 5]


def test_filter_scores_sum_the_removed_weights():
    net = _net(6, width=3)
    x, y = _batch(6)
    S = grasp_scores(net, x, y, reinit_linear=False)
    fs = filter_scores(S, net)
    blk = 4
    for j in range(net.mids[blk]):
        ref = float(S[f"blocks.{blk}.conv1"][j].sum() + S[f"blocks.{blk}.conv2"][:, j].sum())
        assert float(fs[blk][j]) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------- recipe, data, one seed
def test_lr_schedule_matches_official_preset():
    # main_prune_non_imagenet.py: {0: lr, int(0.5 n): lr/10, int(0.75 n): lr/100}
    assert [lr_at(e, 1.0, 6) for e in range(6)] == [1.0, 1.0, 1.0, 0.1, 0.01, 0.01]
    assert [lr_at(e, 1.0, 5) for e in range(5)] == [1.0, 1.0, 0.1, 0.01, 0.01]


def test_load_images_resizes_and_centres():
    x_tr, y_tr, x_te, y_te = load_images("digits", 4, 0.25, 0)
    assert x_tr.shape[1:] == (1, 4, 4) and len(x_tr) + len(x_te) == 1797
    torch.testing.assert_close(x_tr.mean(0), torch.zeros(1, 4, 4), atol=1e-5, rtol=0)
    from sklearn.datasets import load_digits
    d = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    tr = perm[int(round(0.25 * 1797)):]
    raw = (d.data[tr] / 16.0).reshape(-1, 8, 8)
    pooled = raw.reshape(-1, 4, 2, 4, 2).mean((2, 4))  # area resize 8 -> 4 = 2x2 means
    ref = pooled - pooled.mean(0)
    np.testing.assert_allclose(x_tr[:, 0].numpy(), ref, atol=1e-5)
    assert y_tr.tolist() == d.target[tr].tolist()
    with pytest.raises(ValueError):
        load_images("digits", 12, 0.25, 0)


CFG = dict(dataset="digits", image_size=8, test_fraction=0.75, blocks=3, width=2, n_remove=2,
           grasp_samples_per_class=4, grasp_T=200.0, epochs=1, batch_size=128, lr=0.1, momentum=0.9,
           weight_decay=1e-4)


def test_run_seed_arms_share_the_initialisation_and_are_deterministic():
    out = run_seed(CFG, 1, keep=True)
    init = out["internals"]["init"]
    dense = init["dense"]
    # the layer ticket removed the blocks with the largest GraSP scores, within the official rule
    cand = removable_blocks(dense)
    bs = out["block_scores"]
    want = choose_blocks([-bs[i] for i in cand], dense, 2)
    assert out["removed"]["layer_ticket"] == want
    top = sorted(cand, key=lambda i: -bs[i])
    assert want[0] == top[0]
    # every arm starts from the dense initial weights (kept layers / kept filters)
    for arm in ("layer_ticket", "random_layer"):
        kept = [i for i in range(len(dense.blocks)) if i not in out["removed"][arm]]
        for j, i in enumerate(kept):
            assert torch.equal(init[arm].blocks[j].conv1.weight, dense.blocks[i].conv1.weight)
        assert torch.equal(init[arm].fc.weight, dense.fc.weight)
    ft = init["filter_ticket"]
    assert torch.equal(ft.stem.weight, dense.stem.weight)
    assert abs(out["arms"]["filter_ticket"]["flops"] / out["arms"]["layer_ticket"]["flops"] - 1) < 0.1
    assert out["arms"]["layer_ticket"]["flops"] == out["arms"]["random_layer"]["flops"]
    again = run_seed(CFG, 1)
    for arm in out["arms"]:
        assert out["arms"][arm]["test_acc"] == again["arms"][arm]["test_acc"], arm
        assert out["arms"][arm]["curve"] == again["arms"][arm]["curve"], arm


def test_run_seed_rejects_an_impossible_removal_before_any_work():
    with pytest.raises(ValueError, match="n_remove"):
        run_seed({**CFG, "blocks": 3, "n_remove": 4, "dataset": "no-such-data"}, 0)
