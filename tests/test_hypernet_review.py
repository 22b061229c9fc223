"""Task-conditioned hypernetwork for continual learning (hypernet_review, arXiv 2306.06955; von Oswald et al. 2020):
each piece against an independent reference (hand assembly, hand computation, finite differences, torch's Adam)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reprolab.cl.hypernet_review as hr

from reprolab.cl.hypernet_review import (ChunkedHypernetwork, adam_delta, batches, current_targets, forgetting,
                                         head, mlp_forward, mlp_shapes, n_weights, output_regulariser, split_tasks,
                                         train_finetune, train_hypernetwork, train_separate)
from reprolab.config import ParamError, load_params, read_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _hnet(seed=0, shapes=None, chunk_dim=7, T=3, layers=(4, 5), te=3, ce=2):
    torch.manual_seed(seed)
    shapes = shapes or mlp_shapes(4, [3], 4)  # 4*3 + 3 + 3*4 + 4 = 31 target weights
    return ChunkedHypernetwork(shapes, T, chunk_dim, list(layers), te, ce)


def _hand_generate(hnet, t, theta=None):
    """By hand, with numpy: every chunk separately through the hypernetwork MLP, concatenated, cut, reshaped."""
    th = [p.detach().double().numpy() for p in (theta or hnet.theta)]
    c, ws = th[0], th[1:]
    e = hnet.task_embs[t].detach().double().numpy()
    chunks = []
    for i in range(c.shape[0]):
        h = np.concatenate([e, c[i]])
        for k in range(0, len(ws), 2):
            h = ws[k] @ h + ws[k + 1]
            if k < len(ws) - 2:
                h = np.maximum(h, 0.0)
        chunks.append(h)
    flat = np.concatenate(chunks)
    out, pos = [], 0
    for s in hnet.target_shapes:
        n = int(np.prod(s))
        out.append(flat[pos:pos + n].reshape(s))
        pos += n
    return out


@pytest.mark.parametrize("chunk_dim", [1, 7, 10, 31, 40])
def test_generated_weights_match_hand_assembly(chunk_dim):
    hnet = _hnet(chunk_dim=chunk_dim)
    assert hnet.num_outputs == 31
    assert hnet.n_chunks == math.ceil(31 / chunk_dim)
    for t in range(3):
        gen = hnet(t)
        ref = _hand_generate(hnet, t)
        assert [list(w.shape) for w in gen] == hnet.target_shapes == [[3, 4], [3], [4, 3], [4]]
        for w, r in zip(gen, ref):
            np.testing.assert_allclose(w.detach().double().numpy(), r, rtol=1e-5, atol=1e-6)
    # all tasks in one pass give the same numbers
    flat = hnet.generate_flat([0, 1, 2]).detach().double().numpy()
    for t in range(3):
        np.testing.assert_allclose(flat[t], np.concatenate([r.ravel() for r in _hand_generate(hnet, t)]),
                                   rtol=1e-5, atol=1e-6)
    # different tasks get different weights (the task embedding conditions the output)
    assert not torch.allclose(hnet(0)[0], hnet(1)[0])


def test_chunking_pads_and_cuts_the_last_chunk():
    hnet = _hnet(chunk_dim=10)  # 4 chunks = 40 outputs, the last 9 are dropped
    assert hnet.n_chunks == 4 and sum(w.numel() for w in hnet(0)) == 31
    assert hnet.chunk_embs.shape == (4, 2) and hnet.layers[-2].shape == (10, 5)


def test_parameter_counts_by_hand():
    shapes = mlp_shapes(784, [100, 100], 10)
    assert n_weights(shapes) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10 == 89_610
    torch.manual_seed(0)
    hnet = ChunkedHypernetwork(shapes, 5, 8000, [10, 10], 96, 96)
    n_chunks = math.ceil(89_610 / 8000)
    theta = n_chunks * 96 + (192 * 10 + 10) + (10 * 10 + 10) + (10 * 8000 + 8000)
    assert hnet.n_chunks == 12 and hnet.n_theta() == theta and hnet.n_trainable() == theta + 5 * 96


def test_mlp_forward_matches_torch_modules():
    torch.manual_seed(1)
    shapes = mlp_shapes(6, [5, 4], 3)
    ws = [torch.randn(*s) for s in shapes]
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 3))
    with torch.no_grad():
        for lin, (w, b) in zip([net[0], net[2], net[4]], zip(ws[::2], ws[1::2])):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    x = torch.randn(8, 6)
    torch.testing.assert_close(mlp_forward(x, ws), net(x))


def test_regulariser_matches_hand_computation():
    hnet = _hnet(seed=3, chunk_dim=7, T=4)
    targets = current_targets(hnet, 3)
    torch.manual_seed(9)
    targets = targets + 0.1 * torch.randn_like(targets)  # targets away from the outputs
    assert targets.shape == (3, 31)
    dtheta = [0.05 * torch.randn_like(p) for p in hnet.theta]
    got = float(output_regulariser(hnet, 3, targets, dtheta))
    theta_new = [p.detach() + d for p, d in zip(hnet.theta, dtheta)]
    ref = 0.0
    for j in range(3):
        pred = _hand_generate(hnet, j, theta_new)
        ref += float(((targets[j].double().numpy() - np.concatenate([p.ravel() for p in pred])) ** 2).sum())
    ref /= 3  # official: the mean over the previous tasks
    assert got == pytest.approx(ref, rel=1e-5)
    # without a look-ahead and with the current outputs as targets the regulariser is exactly zero
    assert float(output_regulariser(hnet, 3, current_targets(hnet, 3))) == 0.0


def test_regulariser_gradient_matches_finite_differences():
    torch.set_default_dtype(torch.float64)
    try:
        hnet = _hnet(seed=5, chunk_dim=10, T=3)
        targets = current_targets(hnet, 2) + 0.3
        x, y = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])

        def loss_fn():
            task = F.cross_entropy(head(mlp_forward(x, hnet(2)), 1), y)
            return task + 0.7 * output_regulariser(hnet, 2, targets)

        hnet.zero_grad()
        loss_fn().backward()
        eps = 1e-6
        for p in [hnet.chunk_embs, hnet.layers[0], hnet.layers[-2], hnet.layers[-1], hnet.task_embs[2]]:
            flat = p.data.view(-1)
            for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
                old = flat[i].item()
                flat[i] = old + eps
                up = float(loss_fn())
                flat[i] = old - eps
                down = float(loss_fn())
                flat[i] = old
                assert p.grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
        # an old task's embedding gets no gradient from the current task's loss, only from the regulariser
        hnet.zero_grad()
        F.cross_entropy(head(mlp_forward(x, hnet(2)), 1), y).backward()
        assert hnet.task_embs[0].grad is None or float(hnet.task_embs[0].grad.abs().sum()) == 0.0
    finally:
        torch.set_default_dtype(torch.float32)


def test_adam_lookahead_equals_the_step_and_keeps_the_state():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.Adam(ps, lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        (sum((p ** 2).sum() for p in ps) + ps[0].sum() * step).backward()
        delta = adam_delta(opt)
        state = copy.deepcopy(opt.state_dict())
        before = [p.detach().clone() for p in ps]
        assert opt.state_dict()["state"].keys() == state["state"].keys()
        opt.step()
        for d, p, b in zip(delta, ps, before):
            torch.testing.assert_close(d, p.detach() - b, rtol=1e-5, atol=1e-7)
    # a fresh optimiser's first look-ahead is -lr * sign(grad) (Adam's first step), and leaves no state behind
    opt2 = torch.optim.Adam([ps[1]], lr=0.1)
    ps[1].grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    torch.testing.assert_close(adam_delta(opt2)[0], -0.1 * torch.sign(ps[1].grad) / (1 + 1e-8 / ps[1].grad.abs()))
    assert len(opt2.state) == 0


def test_forgetting_by_hand():
    acc = [[0.9], [0.8, 0.95], [0.7, 0.6, 1.0]]
    assert forgetting(acc) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.6)) / 2)


def test_split_tasks_and_batches():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 20)
    X = rng.random((200, 3)).astype(np.float32)
    tasks = split_tasks(X, y, 5, 0.25, seed=1)
    for t, task in enumerate(tasks):
        assert task["classes"] == (2 * t, 2 * t + 1)
        assert set(task["y_train"].tolist()) == {0, 1} and len(task["y_test"]) == 10 and len(task["y_train"]) == 30
        rows = lambda xs: {tuple(r) for r in xs.numpy().round(6)}  # noqa: E731
        assert not rows(task["x_train"]) & rows(task["x_test"])
        # the label is the digit minus 2t: each row comes from its class
        for xs, ys in ((task["x_train"], task["y_train"]), (task["x_test"], task["y_test"])):
            src = {tuple(r): int(c) for r, c in zip(X.round(6), y)}
            assert all(src[tuple(r)] == 2 * t + int(lbl) for r, lbl in zip(xs.numpy().round(6), ys))
    idx = list(batches(10, 4, 5, torch.Generator().manual_seed(0)))
    assert [len(i) for i in idx] == [4, 4, 4, 4, 4]
    assert len(set(torch.cat(idx[:2]).tolist())) == 8  # no repeat within an epoch


def _toy_tasks():
    """Two 2-class tasks on the same inputs with different rules."""
    X = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    y = np.zeros(400, dtype=np.int64)
    y[:200] = (X[:200, 0] > 0).astype(np.int64)  # task 0: digits 0/1 by the sign of x0
    y[200:] = 2 + (X[200:, 1] > 0).astype(np.int64)  # task 1: digits 2/3 by the sign of x1
    return split_tasks(X, y, 2, 0.25, seed=0)


def test_regulariser_protects_old_tasks_in_a_tiny_run():
    """A mutation check of the whole loop: with beta > 0 task 0's generated weights barely move while task 1 is
    learned; with beta = 0 (or a regulariser with a wrong sign or a dropped term) they move far more."""
    tasks = _toy_tasks()
    cfg = dict(hidden=[16], chunk_dim=40, hnet_layers=[16], te_dim=4, ce_dim=4, std_temb=1.0, std_cemb=1.0,
               beta=0.05, lookahead=True, lr=3e-3, lr_emb=3e-3, batch_size=32, n_iter=150)
    with_reg = train_hypernetwork(tasks, cfg, seed=0)
    without = train_hypernetwork(tasks, {**cfg, "beta": 0.0}, seed=0)
    ft = train_finetune(tasks, cfg, seed=0)
    sep = train_separate(tasks, cfg, seed=0)
    assert with_reg["acc"][0][0] > 0.85 and with_reg["acc"][1][1] > 0.85
    assert forgetting(with_reg["acc"]) < 0.05
    assert with_reg["weight_drift"][0] < 0.2 * without["weight_drift"][0]
    assert with_reg["weight_drift"][1] == 0.0  # the last task's weights are read right after it was learned
    assert sep["acc"][1] == [sep["acc"][0][0], sep["acc"][1][1]] and forgetting(sep["acc"]) == 0.0
    assert ft["acc"][0][0] > 0.85


def _toy_tasks_n(n_tasks):
    """``n_tasks`` 2-class tasks on the same kind of inputs, task t labelled by the sign of feature t."""
    X = np.random.default_rng(1).normal(size=(120 * n_tasks, 6)).astype(np.float32)
    y = np.zeros(len(X), dtype=np.int64)
    for t in range(n_tasks):
        rows = slice(120 * t, 120 * (t + 1))
        y[rows] = 2 * t + (X[rows, t] > 0).astype(np.int64)
    return split_tasks(X, y, n_tasks, 0.25, seed=0)


def _torch_generate(theta, e, shapes):
    """Target weights by hand: every chunk separately through the hypernetwork MLP, concatenated, cut, reshaped."""
    c, ws = theta[0], theta[1:]
    chunks = []
    for i in range(c.shape[0]):
        h = torch.cat([e, c[i]])
        for k in range(0, len(ws), 2):
            h = ws[k] @ h + ws[k + 1]
            if k < len(ws) - 2:
                h = torch.relu(h)
        chunks.append(h)
    flat = torch.cat(chunks)[: n_weights(shapes)]
    return [w.reshape(s) for w, s in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)], flat


@pytest.mark.usefixtures("float64")
def test_training_steps_match_a_hand_replay():
    """Every step of ``train_hypernetwork`` against a hand replay: theta <- Adam(grad task loss + beta * grad of
    1/t sum_j ||h(e_j, theta*) - h(e_j, theta + dTheta)||^2), dTheta = the Adam step of the task gradient alone
    (textbook Adam written out here, not ``adam_delta``), and the current task embedding <- its own Adam on the task
    gradient; earlier task embeddings stay fixed. A flipped look-ahead sign, an SGD look-ahead, chunk embeddings
    detached in the regulariser, a task-embedding optimiser that never steps or targets recomputed each step all
    change theta or the embeddings far beyond the tolerance."""
    tasks, seed = _toy_tasks_n(3), 0
    for task in tasks:  # double precision throughout: the comparison is exact up to rounding
        task["x_train"], task["x_test"] = task["x_train"].double(), task["x_test"].double()
    cfg = dict(hidden=[5], chunk_dim=9, hnet_layers=[6], te_dim=3, ce_dim=2, std_temb=1.0, std_cemb=1.0,
               beta=1.0, lookahead=True, lr=0.02, lr_emb=0.05, batch_size=16, n_iter=4)
    T, (b1, b2), eps = len(tasks), (0.9, 0.999), 1e-8
    shapes = mlp_shapes(6, cfg["hidden"], 2 * T)
    torch.manual_seed(seed)
    init = ChunkedHypernetwork(shapes, T, cfg["chunk_dim"], cfg["hnet_layers"], cfg["te_dim"], cfg["ce_dim"])
    theta = [p.detach().clone() for p in init.theta]
    embs = [e.detach().clone() for e in init.task_embs]
    emb_after = []

    def adam(p, g, m, v, step, lr, eps_hat=True):  # Kingma & Ba; returns the new p, m, v
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        if eps_hat:  # torch.optim.Adam: eps added to sqrt(v_hat)
            return p - lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps), m, v
        # official look-ahead (hypercl utils/optim_step.py adam_step): eps added to sqrt(v)
        return p - lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step) * m / (v.sqrt() + eps), m, v

    for t, task in enumerate(tasks):
        m = [torch.zeros_like(p) for p in theta]
        v = [torch.zeros_like(p) for p in theta]
        me, ve = torch.zeros_like(embs[t]), torch.zeros_like(embs[t])
        targets = [_torch_generate(theta, embs[j], shapes)[1].detach() for j in range(t)]  # theta* of task t
        for step, idx in enumerate(hr._task_batches(task, cfg, seed, t), start=1):
            th = [p.clone().requires_grad_() for p in theta]
            e = embs[t].clone().requires_grad_()
            logits = mlp_forward(task["x_train"][idx], _torch_generate(th, e, shapes)[0])[:, 2 * t:2 * t + 2]
            *g_th, g_e = torch.autograd.grad(F.cross_entropy(logits, task["y_train"][idx]), [*th, e])
            if t > 0:
                look = [adam(torch.zeros_like(p), g, mi, vi, step, cfg["lr"], False)[0] for p, g, mi, vi in
                        zip(theta, g_th, m, v)]  # dTheta: the step Adam would take on the task gradient alone
                th2 = [p.clone().requires_grad_() for p in theta]
                moved = [p + d for p, d in zip(th2, look)]
                reg = sum(((targets[j] - _torch_generate(moved, embs[j], shapes)[1]) ** 2).sum() for j in range(t))
                g_reg = torch.autograd.grad(cfg["beta"] * reg / t, th2)
                g_th = [a + b for a, b in zip(g_th, g_reg)]
            new = [adam(p, g, mi, vi, step, cfg["lr"]) for p, g, mi, vi in zip(theta, g_th, m, v)]
            theta, m, v = [n[0] for n in new], [n[1] for n in new], [n[2] for n in new]
            embs[t], me, ve = adam(embs[t], g_e, me, ve, step, cfg["lr_emb"])
        emb_after.append(embs[t].clone())

    hnet = train_hypernetwork(tasks, cfg, seed)["hnet"]
    for got, ref in zip(hnet.theta, theta):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-9, atol=1e-10)
    for t in range(T):
        # each embedding is its value right after its own task: trained then, untouched by the later tasks
        torch.testing.assert_close(hnet.task_embs[t].detach(), emb_after[t], rtol=1e-9, atol=1e-10)
        assert float((emb_after[t] - init.task_embs[t].detach()).abs().max()) > 1e-2  # it did move
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(theta, init.theta)) > 1e-2


def test_params_schema_rejects_bad_values():
    params = read_params()
    cfg = load_params("hypernet_review", "smoke", params)
    assert cfg["threshold_forgetting_difference"] == -0.15
    bad = copy.deepcopy(params)
    bad["hypernet_review"]["dataset"] = "cifar10"
    with pytest.raises(ParamError, match="dataset"):
        load_params("hypernet_review", "smoke", bad)
    bad = copy.deepcopy(params)
    bad["hypernet_review"]["profiles"]["quick"]["n_tasks"] = 6
    with pytest.raises(ParamError, match="n_tasks"):
        load_params("hypernet_review", "quick", bad)


def test_notebook_has_parameters_cell():
    import nbformat

    from reprolab.paths import NOTEBOOKS_DIR

    nb = nbformat.read(NOTEBOOKS_DIR / "hypernet_review.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "profile" in tagged[0].source
