"""ExSSNeT (arXiv 2210.10209): supermask, exclusive weight update and KNN transfer against hand computations."""
import math

import numpy as np
import pytest
import torch

from reprolab.pruning.exssnet import (ARMS, GetSubnet, MaskedLeNet, MultitaskMaskLinear, Task, changed_old_weights,
                                      editable_weight_masks, forgetting, knn_best_index, knn_predict,
                                      knn_task_accuracies, mask_count_error, run_sequence, score_transfer, split_tasks)

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_get_subnet(scores, k):
    """Verbatim logic of the official module_util.get_subnet (full sort)."""
    out = scores.clone()
    _, idx = scores.flatten().sort()
    j = int((1 - k) * scores.numel())
    flat_out = out.flatten()
    flat_out[idx[:j]] = 0
    flat_out[idx[j:]] = 1
    return flat_out.view_as(scores)


@pytest.mark.parametrize("k", [0.02, 0.05, 0.1, 0.5, 1.0])
def test_topk_mask_matches_official_sort(k):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 53, generator=g).abs()
    ours = GetSubnet.apply(s, k)
    assert torch.equal(ours, _official_get_subnet(s, k))
    n = s.numel()
    assert int(ours.sum()) == n - int((1 - k) * n)
    # by hand: the kept entries are exactly the largest ones
    kept = s[ours.bool()]
    dropped = s[~ours.bool()]
    if len(dropped):
        assert kept.min() > dropped.max()


def test_supermask_forward_and_straight_through_gradient_by_hand():
    """A 2x3 layer, density 0.5: y = x (W * M)^T with M the top-3 |scores|; dL/ds = dL/dM (straight through),
    dL/dW = dL/dW_eff * M, computed by hand for L = sum(y * c)."""
    layer = MultitaskMaskLinear(3, 2, num_tasks=1, density=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]))
        layer.scores[0].copy_(torch.tensor([[0.9, -0.1, 0.3], [-0.8, 0.2, 0.7]]))  # |s| top 3: 0.9, 0.8, 0.7
    M = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    c = torch.tensor([[2.0, -1.0]])
    y = layer(x)
    assert torch.allclose(y, torch.tensor([[1.0 * 1, 0.5 * 1 + (-1.0) * 3]]))  # [[1, -2.5]]
    (y * c).sum().backward()
    g_eff = c.T @ x  # dL/dW_eff (2, 3): c_i x_j
    # d|s|/ds = sign(s); the mask's gradient is passed through unchanged: dL/ds = g_eff * W * sign(s)
    s = torch.tensor([[0.9, -0.1, 0.3], [-0.8, 0.2, 0.7]])
    expect_s = g_eff * layer.weight.detach() * s.sign()
    assert torch.allclose(layer.scores[0].grad, expect_s)
    assert torch.allclose(layer.weight.grad, g_eff * M)


def test_signed_constant_init_and_independent_scores():
    torch.manual_seed(0)
    layer = MultitaskMaskLinear(50, 20, num_tasks=3, density=0.1)
    std = math.sqrt(2.0) / math.sqrt(50)
    assert torch.allclose(layer.weight.abs(), torch.full((20, 50), std))
    assert not torch.equal(layer.scores[0], layer.scores[1])
    bound = 1 / math.sqrt(50)  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(layer.scores[2].abs().max()) <= bound


def _toy_tasks(n_tasks=3, d=12, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        centers = torch.randn(2, d, generator=g) * 2
        def draw(m):
            yy = torch.arange(m) % 2
            return (centers[yy] + torch.randn(m, d, generator=g)).float(), yy.long()
        xtr, ytr = draw(n)
        xva, yva = draw(32)
        xte, yte = draw(32)
        tasks.append(Task((2 * t, 2 * t + 1), xtr, ytr, xva, yva, xte, yte))
    return tasks


CFG = dict(hidden=[16, 8], density=0.3, batch_size=32, mask_epochs=2, weight_epochs=2, num_topk=5,
           lr_grid=[0.01], check_frozen=True)


def test_exclusive_mask_is_current_and_not_union_of_old():
    torch.manual_seed(1)
    net = MaskedLeNet(10, (8, 6), 2, num_tasks=3, density=0.4)
    for lay, ex in zip(net.layers, editable_weight_masks(net, 2, exclusive=True)):
        m0, m1, m2 = (lay.mask(i) for i in range(3))
        assert torch.equal(ex, m2 & ~(m0 | m1))  # by hand
        assert int((m2 & (m0 | m1)).sum()) > 0  # the masks do overlap here, so exclusivity removes something
    for lay, orig in zip(net.layers, editable_weight_masks(net, 2, exclusive=False)):
        assert torch.equal(orig, lay.mask(2))
    for lay, ex in zip(net.layers, editable_weight_masks(net, 0, exclusive=True)):
        assert torch.equal(ex, lay.mask(0))


def test_exclusive_training_leaves_old_mask_weights_bit_identical():
    tasks = _toy_tasks()
    run = run_sequence(tasks, "exssnet_noknn", CFG, 0.01, seed=0)  # check_frozen asserts after every step too
    assert changed_old_weights(run) == 0
    # the weights that moved during task 2 are all inside M_2 AND NOT (M_0 OR M_1)
    for l_idx in range(3):
        moved = run.weights_after[2][l_idx] != run.weights_after[1][l_idx]
        allowed = run.masks[2][l_idx] & ~(run.masks[0][l_idx] | run.masks[1][l_idx])
        assert not bool((moved & ~allowed).any())
    assert np.all(forgetting(run.test) == 0.0)
    assert mask_count_error(run) == 0


def test_non_exclusive_training_does_change_old_weights():
    """The mutation check: without exclusivity (SSNeT) later tasks overwrite weights of earlier masks."""
    tasks = _toy_tasks()
    run = run_sequence(tasks, "ssnet", CFG, 0.01, seed=0)
    assert changed_old_weights(run) > 0


def test_supsup_never_changes_weights():
    tasks = _toy_tasks()
    run = run_sequence(tasks, "supsup", CFG, 0.01, seed=0)
    for w_t in run.weights_after:
        for a, b in zip(w_t, run.weights_after[0]):
            assert torch.equal(a, b)


def test_knn_predict_by_hand():
    train_x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0], [6.0, 5.0], [5.0, 6.0]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    x = torch.tensor([[0.2, 0.3], [5.5, 5.5], [3.0, 3.0]])
    # k = 3 by hand: (0.2, 0.3) -> neighbours (0,0), (0,1), (5,5): votes 0, 0, 1 -> 0; (5.5, 5.5) -> the three class-1
    # points -> 1; (3, 3) -> distances 4.24, 3.61, 2.83, 3.61, 3.61: (5,5) plus two of the ties -> class 1 either way
    pred = knn_predict(train_x, train_y, x, k=3)
    assert pred.tolist() == [0, 1, 1]
    assert knn_predict(train_x, train_y, x[:1], k=5).tolist() == [1]  # all five points: majority class 1


def test_knn_transfer_picks_the_nearest_task_by_hand():
    """Three earlier 'tasks' whose subnetworks embed the new data differently: only task 1's embedding separates the
    classes; the KNN accuracies (computed by hand with numpy) pick task 1 and its scores are copied."""
    torch.manual_seed(0)
    net = MaskedLeNet(4, (6, 3), 2, num_tasks=4, density=1.0)
    g = torch.Generator().manual_seed(3)
    n = 60
    yy = (torch.arange(n) % 2).long()
    x = torch.randn(n, 4, generator=g) * 0.1 + 1.0  # positive: no ReLU zeros, so no distance ties
    x[:, 0] += yy.float() * 3.0  # the class signal lives in input feature 0
    with torch.no_grad():  # each earlier task's subnetwork keeps one first-layer weight, set by hand
        net.layers[0].weight.zero_()
        net.layers[0].weight[0, 0] = 1.0  # hidden 0 <- feature 0 (the signal)
        net.layers[0].weight[1, 1] = 1.0  # hidden 1 <- feature 1 (noise)
        net.layers[0].weight[2, 2] = 1.0  # hidden 2 <- feature 2 (noise)
        net.layers[1].weight.zero_()
        net.layers[2].weight.zero_()  # the logits carry no signal: the KNN must use the second layer's output
        for h in range(3):
            net.layers[1].weight[h, h] = 1.0
        net.layers[0].density = 0.03  # int(0.97 * 24) = 23 dropped: exactly one of the 24 first-layer weights kept
        order = {0: (1, 1), 1: (0, 0), 2: (2, 2)}  # task 1 keeps the signal weight (0, 0)
        for t, (i, j) in order.items():
            net.layers[0].scores[t].fill_(0.01)
            net.layers[0].scores[t][i, j] = 1.0
    xs, ys = [x] * 3, [yy] * 3
    accs = knn_task_accuracies(net, xs, ys, k=5)
    # by hand: embed, split 66/34, 5-NN majority
    ref = []
    for t, (i, j) in order.items():
        h = np.zeros((n, 3))
        h[:, i] = np.maximum(x.numpy()[:, j] * 1.0, 0)
        cut = int(n * 0.66)
        d = np.sqrt(((h[cut:, None] - h[None, :cut]) ** 2).sum(-1))
        votes = yy.numpy()[:cut][np.argsort(d, axis=1, kind="stable")[:, :5]]
        pred = (votes.sum(1) >= 3).astype(int)
        ref.append(float((pred == yy.numpy()[cut:]).mean()))
    assert np.allclose(accs, ref)
    assert knn_best_index(accs, 2) == 1 == int(np.argmax(ref))
    score_transfer(net, 1, 3)
    for lay in net.layers:
        assert torch.equal(lay.scores[3], lay.scores[1])
    assert knn_best_index(np.array([0.5, 0.4]), 2) is None  # nothing beats chance -> no transfer


def test_split_tasks_disjoint_and_relabelled():
    rng = np.random.default_rng(0)
    X = rng.random((200, 5)).astype(np.float32)
    y = np.repeat(np.arange(10), 20)
    tasks = split_tasks(X, y, 5, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in tasks:
        assert len(t.y_train) + len(t.y_val) + len(t.y_test) == 40
        assert set(t.y_train.tolist()) == {0, 1}
    assert ARMS == ("supsup", "ssnet", "exssnet_noknn", "exssnet")


def test_forgetting_by_hand():
    acc = np.array([[0.9, np.nan, np.nan], [0.8, 0.7, np.nan], [0.6, 0.75, 0.95]])
    # task 0: 0.9 right after, 0.6 at the end -> 0.3 forgotten; task 1: 0.7 -> 0.75 -> -0.05 (backward transfer)
    assert np.allclose(forgetting(acc), [0.3, -0.05])


def _fake_run(masks, weights):
    from reprolab.pruning.exssnet import SequenceRun

    T = len(masks)
    run = SequenceRun(np.zeros((T, T)), np.zeros((T, T)), density=0.5)
    run.masks = [[torch.tensor(m, dtype=torch.bool)] for m in masks]
    run.weights_after = [[torch.tensor(w, dtype=torch.float32)] for w in weights]
    return run


def test_changed_old_weights_counts_every_earlier_mask_by_hand():
    from reprolab.pruning.exssnet import old_weight_pairs

    # one layer of 4 weights, 3 tasks. M_0 = {0}, M_1 = {1}, M_2 = {2, 3}; task 2 (the last) changes weights 0 and 3.
    masks = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    w0 = [1.0, 1.0, 1.0, 1.0]
    weights = [w0, w0, [5.0, 1.0, 1.0, 7.0]]
    run = _fake_run(masks, weights)
    # j = 0: used {0}: weight 0 changed -> 1; j = 1: used {0, 1} (M_0 OR M_1): weight 0 changed -> 1. Total 2.
    assert changed_old_weights(run) == 2
    assert old_weight_pairs(run) == 1 + 2


def test_kkt_arm_transfers_scores_and_supsup_gets_both_phases(monkeypatch):
    import reprolab.pruning.exssnet as E

    calls = []
    real = E.score_transfer

    def spy(model, src, dst):
        before = [m.scores[dst].detach().clone() for m in model.layers]
        real(model, src, dst)
        calls.append((src, dst))
        for m, b in zip(model.layers, before):
            assert torch.equal(m.scores[dst], m.scores[src]) and not torch.equal(b, m.scores[dst])

    monkeypatch.setattr(E, "score_transfer", spy)
    tasks = _toy_tasks()
    run = run_sequence(tasks, "exssnet", CFG, 0.01, seed=0)
    assert sorted(run.knn_choice) == [1, 2]  # KNN is run before every task after the first
    assert [d for _, d in calls] == [t for t, s in sorted(run.knn_choice.items()) if s is not None]
    assert calls, "the toy tasks are separable: some earlier subnetwork beats chance"
    n_calls = len(calls)
    run = run_sequence(tasks, "exssnet_noknn", CFG, 0.01, seed=0)
    assert run.knn_choice == {} and len(calls) == n_calls  # no transfer without KKT
    sup = run_sequence(tasks, "supsup", CFG, 0.01, seed=0)
    assert len(sup.curves["0_mask"]) == CFG["mask_epochs"] + CFG["weight_epochs"]
    assert "0_weights" not in sup.curves


def test_normalize_matches_official_avalanche_constants():
    from reprolab.pruning.exssnet import MNIST_MEAN, MNIST_STD, load_dataset

    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)
    Xr, _ = load_dataset("digits", normalize=False)
    Xn, _ = load_dataset("digits", normalize=True)
    assert Xr.min() == 0.0 and Xr.max() == 1.0
    assert abs(float(Xn.mean())) < 1e-5 and abs(float(Xn.std()) - 1.0) < 1e-4
