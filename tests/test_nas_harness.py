"""The NB-201 one-shot supernet and the shared NAS training harness, against independent references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import harness, space201
from reprolab.nas.elastic import ElasticCNN, inplace_distillation_loss
from reprolab.nas.supernet201 import MixedOp, NB201SuperNet


def _randomise_bn(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("affine", [False, True])
def test_extract_equals_single_path(affine):
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4, n_cells=2, in_channels=1, affine=affine)
    _randomise_bn(sup)
    x = torch.randn(3, 1, 8, 8)
    for cell in [(2, 2, 0, 2, 3, 2), (0, 1, 4, 3, 2, 0), (3, 3, 3, 3, 3, 3)]:
        sup.eval()
        child = sup.extract(cell).eval()
        assert child.cell == cell
        torch.testing.assert_close(child(x), sup(x, cell), rtol=0, atol=0)
        # the child is an NB201Network of the ground truth's family
        assert isinstance(child, space201.NB201Network)


def test_single_path_equals_one_hot_mixture_and_mixture_is_weighted_sum():
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4, n_cells=1).eval()
    x = torch.randn(2, 1, 8, 8)
    cell = (2, 0, 3, 1, 4, 2)
    onehot = F.one_hot(torch.tensor(cell), 5).float()
    torch.testing.assert_close(sup(x, onehot), sup(x, cell))
    # one MixedOp: the mixture is the weighted sum of the five ops, computed naively
    op = MixedOp(4).eval()
    h = torch.randn(2, 4, 5, 5)
    w = torch.softmax(torch.randn(5), 0)
    naive = sum(w[k] * op.ops[k](h) for k in range(5))
    torch.testing.assert_close(op(h, weights=w), naive)
    # a zero weight drops exactly that op
    w0 = w.clone()
    w0[2] = 0.0
    torch.testing.assert_close(op(h, weights=w0), naive - w[2] * op.ops[2](h))


def test_default_arch_is_softmax_alphas_and_set_arch():
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sup(x), sup(x, torch.softmax(sup.alphas, -1)))
    sup.set_arch((2, 2, 2, 2, 2, 2))
    torch.testing.assert_close(sup(x), sup(x, (2, 2, 2, 2, 2, 2)))
    assert sup.genotype() == tuple(int(i) for i in sup.alphas.argmax(-1))
    ids = {id(p) for p in sup.arch_parameters()}
    assert ids == {id(sup.alphas)} and not any(id(p) in ids for p in sup.weight_parameters())
    with pytest.raises(ValueError):
        sup(x, (5, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError):
        sup(x, torch.zeros(6, 4))


def test_single_path_touches_only_the_chosen_ops():
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4)
    sup(torch.randn(4, 1, 8, 8), (2, 2, 2, 2, 2, 2)).sum().backward()
    for cell in [m for m in sup.cells if hasattr(m, "edges")]:
        for e in cell.edges:
            assert e.ops[2][1].weight.grad is not None
            assert e.ops[3][1].weight.grad is None
    assert sup.alphas.grad is None


def test_bn_recalibration_through_set_arch_matches_extracted_child():
    from reprolab.nas.bn import set_running_statistics
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4)
    X = torch.randn(64, 1, 8, 8)
    cell = (2, 3, 0, 2, 4, 2)
    child = sup.extract(cell)
    set_running_statistics(child, [X])
    sup.set_arch(cell)
    set_running_statistics(sup, [X])
    torch.testing.assert_close(sup.eval()(X, cell), child.eval()(X))


def test_lr_schedule_and_batches():
    assert harness.lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert harness.lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert harness.lr_at(4, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05)
    assert harness.lr_at(55, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.5)))
    assert harness.lr_at(77, 100, 0.1, "constant") == 0.1
    with pytest.raises(ValueError, match="schedule"):
        harness.lr_at(0, 10, 0.1, "step")
    X, y = torch.arange(10).float()[:, None], torch.arange(10)
    it = harness.batches(X, y, 4, torch.Generator().manual_seed(0))
    ep = [next(it) for _ in range(3)]
    assert [len(b[1]) for b in ep] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in ep]).tolist()) == list(range(10))
    it = harness.batches(X, y, 4, torch.Generator().manual_seed(0), drop_last=True)
    ep2 = [next(it) for _ in range(4)]
    assert [len(b[1]) for b in ep2] == [4, 4, 4, 4]  # two full batches per epoch, the partial one dropped
    torch.testing.assert_close(ep2[0][1], ep[0][1])  # the same permutation stream
    small = harness.batches(X[:3], y[:3], 4, torch.Generator().manual_seed(0), drop_last=True)
    assert len(next(small)[1]) == 3  # an epoch shorter than one batch still yields it


def test_train_model_equals_manual_sgd_loop():
    torch.manual_seed(0)
    X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    data = {"train": (X, y)}
    m1 = torch.nn.Linear(3, 2)
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(m1.state_dict())
    harness.train_model(m1, data, 7, harness.ce_loss, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=8, seed=3)
    opt = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    it = harness.batches(X, y, 8, torch.Generator().manual_seed(3))
    for s in range(7):
        for g in opt.param_groups:
            g["lr"] = 0.5 * 0.1 * (1 + math.cos(math.pi * s / 7))
        xb, yb = next(it)
        opt.zero_grad()
        F.cross_entropy(m2(xb), yb).backward()
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


def test_train_supernet_is_the_sandwich_rule():
    """One step of train_supernet equals a hand-written sandwich: CE on the max child + KD of the others to its
    detached logits, gradients summed, one SGD step."""
    torch.manual_seed(0)
    kw = dict(stage_channels=(8, 8), stage_strides=(1, 2), depth_list=(1, 2), expand_ratio_list=(1, 2), ks_list=(3,),
              head_channels=16)
    a, b = ElasticCNN(**kw), ElasticCNN(**kw)
    b.load_state_dict(a.state_dict())
    X, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    data = {"train": (X, y)}
    cfgs = [a.max_config(), a.min_config()]
    harness.train_supernet(a, data, 1, lambda s, r: cfgs, kd=True, lr=0.1, momentum=0.0, batch_size=8, seed=0)
    b.set_active_subnet(cfgs[0])
    t = b(X)
    b.set_active_subnet(cfgs[1])
    loss = F.cross_entropy(t, y) + inplace_distillation_loss(b(X), t.detach())
    loss.backward()
    with torch.no_grad():
        for p in b.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_image_data_split_and_resize():
    d = harness.image_data("digits")
    assert [len(d[k][1]) for k in ("train", "val", "test")] == [1079, 359, 359]  # 1,797 images, 60/20/20
    assert d["train"][0].shape[1:] == (1, 8, 8) and d["train"][1].dtype == torch.int64
    assert abs(float(d["train"][0].mean())) < 1e-4
    d4 = harness.image_data("digits", size=4)
    assert d4["val"][0].shape[1:] == (1, 4, 4)
    torch.testing.assert_close(d4["val"][1], d["val"][1])


def test_evaluate_child_recalibrates_on_training_images():
    torch.manual_seed(0)
    sup = NB201SuperNet(channels=4)
    d = harness.image_data("digits")
    acc = harness.evaluate_child(sup, (2, 2, 2, 2, 2, 2), d, "val", calib=256)
    # reference: extract, recalibrate by hand with the exact batch statistics, evaluate
    from reprolab.nas.bn import set_running_statistics
    c = sup.extract((2, 2, 2, 2, 2, 2))
    set_running_statistics(c, [d["train"][0][:256]])
    assert acc == harness.evaluate(c, d, "val")
    assert 0.0 <= acc <= 1.0


def test_flat_grad_concatenates_and_zero_fills():
    a = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.ones(3))
    (a.sum() * 2).backward()
    g = harness.flat_grad([a, b])
    assert torch.equal(g, torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]))
