"""DARTS-PT (perturbation-based selection) against independent references: masking, projection choice, argmax,
first-order DARTS step, the projection schedule, the standalone truth lookup."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.nas import darts_pt as D
from reprolab.nas import space201
from reprolab.nas.supernet201 import MixedOp, NB201SuperNet

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(channels=2, n_cells=1, lr=0.025, lr_min=0.001, momentum=0.9, weight_decay=3e-4, grad_clip=5.0,
           arch_lr=3e-3, arch_weight_decay=1e-3, batch_size=8, search_steps=3, proj_crit="acc", proj_intv=2,
           tune_steps=1)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    return {"train": (X, y), "val": (X.flip(0) * 0.5, y.flip(0)), "test": (X, y)}


def test_mask_op_zeroes_exactly_that_weight_and_mixture_drops_that_op():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(6, 5), -1)
    m = D.mask_op(w, 3, 2)
    diff = (m != w).nonzero().tolist()
    assert diff == [[3, 2]] and float(m[3, 2]) == 0.0
    assert float(w[3, 2]) > 0  # the input is not modified
    mix = MixedOp(4).train()
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        got = mix(x, weights=m[3])
        want = sum(float(m[3, k]) * mix.ops[k](x) for k in range(5) if k != 2)  # naive sum without the masked op
    assert torch.allclose(got, want, atol=1e-6)


def test_projected_weights_one_hot_rows_and_no_gradient_to_decided_alphas():
    alphas = torch.randn(6, 5, requires_grad=True)
    proj = torch.zeros(6, 5)
    proj[1, 4] = 1.0
    undecided = torch.ones(6, dtype=torch.bool)
    undecided[1] = False
    w = D.projected_weights(alphas, proj, undecided)
    assert torch.equal(w[1], proj[1])
    assert torch.allclose(w[[0, 2, 3, 4, 5]], torch.softmax(alphas, -1)[[0, 2, 3, 4, 5]])
    (w * torch.randn(6, 5)).sum().backward()
    assert torch.count_nonzero(alphas.grad[1]) == 0 and torch.count_nonzero(alphas.grad[0]) > 0


def test_select_op_keeps_the_op_whose_removal_hurts_most():
    # hand-built supernet score: removing op o of edge 2 costs drop[o] accuracy and adds loss[o]
    drop = {0: 0.10, 1: 0.00, 2: 0.30, 3: 0.05, 4: 0.20}
    extra_loss = {0: 0.4, 1: 0.0, 2: 0.1, 3: 0.9, 4: 0.2}
    w0 = torch.softmax(torch.randn(6, 5), -1)

    def score(w):
        removed = [o for o in range(5) if float(w[2, o]) == 0.0]
        assert len(removed) == 1 and torch.equal(w[[0, 1, 3, 4, 5]], w0[[0, 1, 3, 4, 5]])
        o = removed[0]
        return 0.9 - drop[o], 0.3 + extra_loss[o]

    op, table = D.select_op(score, w0, 2, "acc")
    assert op == 2  # largest accuracy drop (lowest accuracy after removal)
    assert [r["op"] for r in table] == list(D.OFFICIAL_ITER)
    op, _ = D.select_op(score, w0, 2, "loss")
    assert op == 3  # largest loss after removal
    # ties: the first op in the official order (none, skip, conv1x1, conv3x3, avg) wins, as the strict '<' there
    op, _ = D.select_op(lambda w: (0.5, 1.0), w0, 2, "acc")
    assert op == space201.OPS.index("none")
    with pytest.raises(ValueError):
        D.select_op(score, w0, 2, "bogus")


def test_argmax_cell_matches_naive_loop_and_official_tie_break():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float32)
        naive = tuple(int(max(range(5), key=lambda o: float(a[e, o]))) for e in range(6))
        assert D.argmax_cell(a) == naive
    assert D.argmax_cell(torch.zeros(6, 5)) == (space201.OPS.index("none"),) * 6
    assert D.count_skips((0, 0, 2, 0, 1, 4)) == 3


def test_evaluate_mixture_matches_manual_batches_and_leaves_bn_stats():
    torch.manual_seed(0)
    net = NB201SuperNet(channels=2)
    X, y = _data(20)["val"]
    w = torch.softmax(torch.randn(6, 5), -1)
    before = copy.deepcopy(net.state_dict())
    acc, loss = D.evaluate_mixture(net, w, X, y, batch_size=8)
    ref = copy.deepcopy(net).train()
    correct, tot = 0, 0.0
    with torch.no_grad():
        for i in (0, 8, 16):
            out = ref(X[i:i + 8], w)
            correct += int((out.argmax(1) == y[i:i + 8]).sum())
            tot += float(F.cross_entropy(out, y[i:i + 8], reduction="sum"))
    assert acc == correct / 20 and loss == pytest.approx(tot / 20, rel=1e-6)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _adam_alpha_step(net, x, y):
    opt = torch.optim.Adam([net.alphas], lr=CFG["arch_lr"], betas=(0.5, 0.999), weight_decay=CFG["arch_weight_decay"])
    net.train()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    return net.alphas.detach()


def test_first_order_step_updates_alphas_on_the_architecture_batch_only():
    torch.manual_seed(0)
    data = _data()
    net = NB201SuperNet(channels=2)
    init = copy.deepcopy(net)
    tr = D.DartsTrainer(net, data, CFG, seed=3)
    tr.step()
    # reference: the same draws (weight batch first, then architecture batch), one Adam step on the val-batch loss
    g = torch.Generator().manual_seed(3)
    iw = torch.randperm(24, generator=g)[:8]
    ia = torch.randperm(24, generator=g)[:8]
    want = _adam_alpha_step(copy.deepcopy(init), data["val"][0][ia], data["val"][1][ia])
    assert torch.allclose(net.alphas, want, atol=1e-7)
    wrong = _adam_alpha_step(copy.deepcopy(init), data["train"][0][iw], data["train"][1][iw])  # mutation: train batch
    assert not torch.allclose(net.alphas, wrong, atol=1e-5)
    assert not torch.equal(net.stem[0].weight, init.stem[0].weight)  # the weights moved too


def test_pt_project_projects_every_edge_once_on_schedule():
    torch.manual_seed(0)
    net = NB201SuperNet(channels=2)
    tr = D.DartsTrainer(net, _data(), CFG, seed=0)
    calls = []
    orig = tr.step
    tr.step = lambda: calls.append(1) or orig()
    old_opt = tr.w_opt
    cell, log = tr.pt_project(seed=1)
    intv = CFG["proj_intv"]
    # the weight optimiser is reset to SGD at lr / 10, constant (projection.py reset_optimizer)
    assert tr.w_opt is not old_opt and isinstance(tr.w_opt, torch.optim.SGD)
    assert all(g["lr"] == pytest.approx(CFG["lr"] / 10) for g in tr.w_opt.param_groups)
    assert len(calls) == intv * 5 * CFG["tune_steps"]  # proj_intv * (n_edges - 1) blocks
    assert sorted(r["edge"] for r in log) == list(range(6))  # each edge once
    assert tuple(r["op"] for r in sorted(log, key=lambda r: r["edge"])) == cell
    assert torch.equal(tr.weights().detach(), F.one_hot(torch.tensor(cell), 5).float())
    for r in log:  # each projection kept the op of lowest accuracy-after-removal (first in official order on ties)
        accs = [t["acc"] for t in r["table"]]
        assert r["op"] == r["table"][int(np.argmin(accs))]["op"]
    # with proj_intv = 1 the official schedule would leave an edge undecided: the schema forbids it
    bad = D.DartsTrainer(NB201SuperNet(channels=2), _data(), {**CFG, "proj_intv": 1}, seed=0)
    bad.step, bad.score = (lambda: 0.0), (lambda w: (0.5, 1.0))  # schedule only
    with pytest.raises(AssertionError):
        bad.pt_project(seed=1)


def test_true_accuracy_looks_up_ground_truth_cells_and_trains_the_others():
    data = {k: (v[0].numpy(), v[1].numpy()) for k, v in _data(30).items()}
    known = (2, 2, 0, 2, 3, 2)
    gt = {"meta": {"seeds": [0, 1], "channels": 2, "cells_per_stage": 1, "epochs": 1, "batch_size": 16, "lr": 0.1,
                   "momentum": 0.9, "weight_decay": 0.0},
          "cells": [{"cell": known, "test_acc": {"0": 0.5, "1": 0.7}, "val_acc": {"0": 0.4, "1": 0.6}}]}
    cache = {}
    r = D.true_accuracy(known, gt, data, cache)
    assert r["source"] == "groundtruth" and r["test"] == [0.5, 0.7] and r["test_mean"] == pytest.approx(0.6)
    other = (0, 0, 0, 0, 0, 0)
    r2 = D.true_accuracy(other, gt, data, cache, seeds=[1])
    from reprolab.nas.groundtruth import train_cell
    want = train_cell(other, data, 1, D.truth_recipe(gt))
    assert r2["source"] == "trained" and r2["test"] == [want["test_acc"]]
    assert D.true_accuracy(other, gt, data, cache) is r2  # cached
    with pytest.raises(ValueError):
        D.true_accuracy((1, 1, 1, 1, 1, 1), gt, data, {}, seeds=[7])
