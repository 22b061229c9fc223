"""understanding_enas: hidden-state / edit-distance correlation, memory buffer, ENAS REINFORCE step, shared-weight
evaluation, and a tiny end-to-end run of the three arms."""
import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from reprolab.config import ParamError, load_params, read_params
from reprolab.nas import harness
from reprolab.nas import understanding_enas as U
from reprolab.nas.supernet201 import NB201SuperNet
from reprolab.paths import REPO_ROOT


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads spin-wait badly on the shared 2-core machine
    yield
    torch.set_num_threads(n)


def _naive_spearman(cells, H):
    dh, de = [], []
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            dh.append(float(np.linalg.norm(np.asarray(H[i]) - np.asarray(H[j]))))
            de.append(sum(int(a != b) for a, b in zip(cells[i], cells[j])))
    return spearmanr(dh, de).statistic


def test_hidden_edit_spearman_hand_examples():
    rng = np.random.default_rng(0)
    cells = [tuple(int(o) for o in rng.integers(5, size=6)) for _ in range(30)]
    # a hidden state that is the one-hot code of the cell: L2 distance = sqrt(2 * edit distance), a monotone map
    onehot = [np.eye(5)[list(c)].ravel() for c in cells]
    assert U.hidden_edit_spearman(cells, onehot) == pytest.approx(1.0)
    H = rng.normal(size=(30, 7))
    assert U.hidden_edit_spearman(cells, H) == pytest.approx(_naive_spearman(cells, H), abs=1e-12)
    # hidden states that ignore the architecture: Spearman near 0
    assert abs(U.hidden_edit_spearman(cells, H)) < 0.15


def test_hidden_edit_spearman_chain():
    cells = [(0,) * 6, (1, 0, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0), (1, 1, 1, 0, 0, 0)]
    H = [[3.0], [2.0], [1.0], [0.0]]
    # edit distances along the chain equal index gaps, so do |H_i - H_j|: Spearman +1
    assert U.hidden_edit_spearman(cells, H) == pytest.approx(1.0)
    Hrev = [[0.0], [10.0], [11.0], [11.5]]  # gaps 10, 1, 0.5: distances not monotone in edit distance
    assert U.hidden_edit_spearman(cells, Hrev) == pytest.approx(_naive_spearman(cells, Hrev))


def test_sample_matches_teacher_forcing_and_final_hidden():
    torch.manual_seed(0)
    ctrl = U.ENASController(hid=16)
    cell, logps, ents, h = ctrl.sample(np.random.default_rng(1))
    lg = ctrl.teacher_forced_logits(torch.tensor([cell]))
    want = torch.stack([torch.log_softmax(lg[k][0], 0)[cell[k]] for k in range(6)])
    assert torch.allclose(logps, want, atol=1e-6)
    p = [torch.softmax(lg[k][0], 0) for k in range(6)]
    assert torch.allclose(ents, torch.stack([-(q * q.log()).sum() for q in p]), atol=1e-6)
    # the final hidden state is the LSTM output of step 6, whose input is the embedding of decision 5
    x, hc = ctrl.zero_state()
    for k in range(6):
        hh, hc = ctrl.step(x, hc)
        x = ctrl.encoder(torch.tensor([cell[k]]))
    assert torch.allclose(h, hh[0], atol=1e-6)
    # logits are tanh-squashed: |logit| <= tanh_c
    assert all(float(lg[k].abs().max()) <= ctrl.tanh_c for k in range(6))


def test_supervised_loss_is_teacher_forced_cross_entropy():
    torch.manual_seed(2)
    ctrl = U.ENASController(hid=12)
    cells = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 4, 1, 0, 2, 3], [2, 2, 2, 2, 2, 2]])
    got = ctrl.supervised_loss(cells)
    losses = []
    for c in cells.tolist():  # naive loop, one architecture at a time
        x, hc = ctrl.zero_state()
        for k in range(6):
            h, hc = ctrl.step(x, hc)
            logits = ctrl.tanh_c * torch.tanh(ctrl.decoders[k](h)[0] / ctrl.temperature)
            if k >= 1:
                losses.append(-torch.log_softmax(logits, 0)[c[k]])
            x = ctrl.encoder(torch.tensor([c[k]]))
    assert torch.allclose(got, torch.stack(losses).mean(), atol=1e-6)
    # training on the loss makes the stored architectures more likely
    opt = torch.optim.Adam(ctrl.parameters(), lr=0.1)
    before = float(got)
    for _ in range(10):
        opt.zero_grad()
        ctrl.supervised_loss(cells).backward()
        opt.step()
    assert float(ctrl.supervised_loss(cells)) < before - 0.3


def test_memory_buffer_replays_stored_architectures():
    buf = U.MemoryBuffer(capacity=20, batch=5)
    rng = np.random.default_rng(0)
    first = [tuple(int(o) for o in rng.integers(5, size=6)) for _ in range(12)]
    buf.store(first, rng)
    assert buf.cells == first
    rep = buf.replay(rng)
    assert rep.shape == (5, 6)
    rows = [tuple(r) for r in rep.tolist()]
    assert all(r in first for r in rows)
    idx = [buf.cells.index(r) for r in rows]
    assert len(set(rows)) == len(rows) or len(set(idx)) < len(idx)  # drawn without replacement (positions)
    second = [(9,) * 6 for _ in range(12)]
    buf.store(second, rng)  # 12 < 20: appended
    assert len(buf.cells) == 24 and buf.cells[:12] == first
    third = [(7,) * 6 for _ in range(12)]
    buf.store(third, rng)  # full: the last `batch` entries replaced by `batch` new ones
    assert len(buf.cells) == 24 and buf.cells[:19] == (first + second)[:19] and buf.cells[19:] == [(7,) * 6] * 5
    small = U.MemoryBuffer(batch=100)
    small.store(first[:3], rng)
    assert sorted(map(tuple, small.replay(rng).tolist())) == sorted(first[:3])  # fewer than batch: all of them


def test_reinforce_step_gradient_matches_hand_computation():
    torch.manual_seed(3)
    ctrl = U.ENASController(hid=8)
    opt = torch.optim.SGD(ctrl.parameters(), lr=1.0)  # the step's parameter change is minus the gradient
    state = {}
    cell, logps, ents, _ = ctrl.sample(np.random.default_rng(0))
    adv = U.enas_reinforce_step(opt, logps, ents, 0.7, state, entropy_coeff=0.1)
    assert np.allclose(adv, 0.0)  # first step: baseline = reward
    b0 = state["baseline"].copy()
    cell, logps, ents, _ = ctrl.sample(np.random.default_rng(1))
    with torch.no_grad():  # hand gradient of the last decoder's bias, from the logits before the update
        lg = ctrl.teacher_forced_logits(torch.tensor([cell]))
        x, hc = ctrl.zero_state()
        for k in range(6):
            h, hc = ctrl.step(x, hc)
            x = ctrl.encoder(torch.tensor([cell[k]]))
        z = ctrl.decoders[5](h)[0]
    bias_before = ctrl.decoders[5].bias.detach().clone()
    R = 0.9
    rewards = R + 0.1 * ents.detach().double().numpy()
    want_adv = rewards - (0.95 * b0 + 0.05 * rewards)
    adv = U.enas_reinforce_step(opt, logps, ents, R, state, entropy_coeff=0.1, baseline_decay=0.95)
    assert np.allclose(adv, want_adv)
    p = torch.softmax(lg[5][0], 0)
    onehot = torch.zeros(5)
    onehot[cell[5]] = 1
    c, T = ctrl.tanh_c, ctrl.temperature
    grad = -float(adv[5]) * (onehot - p) * c * (1 - torch.tanh(z / T) ** 2) / T
    assert torch.allclose(bias_before - ctrl.decoders[5].bias.detach(), grad, atol=1e-6)


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (120,), generator=g)
    return {"train": (X[:60], y[:60]), "val": (X[60:90], y[60:90]), "test": (X[90:], y[90:])}


def test_child_val_acc_equals_extracted_child_with_recalibrated_bn():
    data = _tiny_data()
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    for cell in [(2, 3, 0, 2, 4, 3), (3, 2, 2, 0, 1, 2), (2, 2, 2, 2, 2, 2)]:  # a few single-path steps
        opt.zero_grad()
        F.cross_entropy(net(data["train"][0], cell), data["train"][1]).backward()
        opt.step()
    Xc = data["train"][0][:32]
    for cell in [(2, 3, 0, 2, 4, 3), (2, 2, 2, 2, 2, 2), (0, 1, 3, 4, 2, 0)]:
        ref = harness.evaluate_child(net, cell, data, "val", calib=32, method="cumulative")
        assert U.child_val_acc(net, cell, Xc, *data["val"]) == pytest.approx(ref, abs=1e-12)
    # the reward leaves running statistics untouched and uses batch statistics
    bn = net.stem[1]
    before = bn.running_mean.clone()
    r = U.minibatch_reward(net, (2, 2, 2, 2, 2, 2), *data["val"])
    assert torch.equal(before, bn.running_mean) and 0.0 <= r <= 1.0
    net.train()
    with torch.no_grad():
        want = float((net(data["val"][0], (2, 2, 2, 2, 2, 2)).argmax(1) == data["val"][1]).double().mean())
    assert r == pytest.approx(want)


def test_run_arm_tiny_is_deterministic_and_arms_differ():
    data = _tiny_data()
    cfg = load_params("understanding_enas", "smoke")
    cfg.update(epochs=2, shared_steps=3, controller_steps=4, n_candidates=3, calib=16, hidden_samples=6,
               entropy_samples=4, buffer_generate=5, buffer_batch=4, channels=4, batch_size=16, reward_batch=8,
               buffer_store_epoch=1, buffer_train_epoch=1)
    gt_cells = [(2, 2, 2, 2, 2, 2), (0, 0, 0, 0, 0, 0)]
    out = {arm: U.run_arm(arm, 0, data, cfg, gt_cells) for arm in U.ARMS}
    again = U.run_arm("enas_buffer", 0, data, cfg, gt_cells)
    for k in ("pick", "candidate_val", "entropy", "reward", "sup_loss", "spearman", "gt_val"):
        assert again[k] == out["enas_buffer"][k]
    assert out["random"]["entropy"] == [out["random"]["entropy"][0]]  # no controller phase
    assert len(out["enas"]["entropy"]) == 3 and len(out["enas"]["reward"]) == 8 and out["enas"]["sup_loss"] == []
    assert out["enas_buffer"]["buffer_size"] == 5 and len(out["enas_buffer"]["sup_loss"]) == 4  # stored and trained from epoch 1
    assert len(out["random"]["gt_val"]) == 2 and len(out["random"]["candidates"]) == 3
    # same init and batch order: ENAS with and without buffer agree until the buffer loss starts (epoch 1)
    assert out["enas"]["reward"][:4] == out["enas_buffer"]["reward"][:4]


def test_true_accuracy_reads_ground_truth_and_trains_others(monkeypatch):
    gt = {"meta": {}, "cells": [{"cell": (2,) * 6, "test_acc": {"0": 0.9, "1": 0.8}}]}
    calls = []

    def fake_train(cell, split, seed, cfg):
        calls.append((tuple(cell), seed))
        return {"test_acc": 0.5 + seed / 10}

    monkeypatch.setattr("reprolab.nas.groundtruth.train_cell", fake_train)
    cache = {}
    assert U.true_accuracy((2,) * 6, gt, None, [0, 1], cache) == (pytest.approx(0.85), False)
    assert U.true_accuracy((1,) * 6, gt, None, [0, 1], cache) == (pytest.approx(0.55), True)
    assert U.true_accuracy((1,) * 6, gt, None, [0, 1], cache)[0] == pytest.approx(0.55)
    assert calls == [((1,) * 6, 0), ((1,) * 6, 1)]  # cached


def test_params_schema_and_notebook_tag():
    cfg = load_params("understanding_enas", "quick")
    assert len(cfg["seeds"]) >= 5 and set(cfg["arms"]) == set(U.ARMS)
    params = read_params()
    bad = dict(params)
    bad["understanding_enas"] = {**params["understanding_enas"], "arms": ["random", "enas", "darts"]}
    with pytest.raises(ParamError):
        load_params("understanding_enas", "quick", bad)
    nb = nbformat.read(REPO_ROOT / "notebooks" / "understanding_enas.ipynb", as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_spearman_over_distinct_architectures():
    rng = np.random.default_rng(5)
    cells = [tuple(int(o) for o in rng.integers(5, size=6)) for _ in range(15)]
    H = rng.normal(size=(15, 4))
    rep = cells + cells[:10]  # repeated architectures carry identical hidden states
    Hrep = np.concatenate([H, H[:10]])
    uc, uh = U.distinct(rep, Hrep)
    assert uc == cells and np.array_equal(uh, H)
    assert U.hidden_edit_spearman(rep, Hrep, unique=True) == pytest.approx(_naive_spearman(cells, H), abs=1e-12)
    # with the repeats, the (0, 0) pairs inflate the correlation of hidden states that ignore the architecture
    assert U.hidden_edit_spearman(rep, Hrep) > U.hidden_edit_spearman(rep, Hrep, unique=True) + 0.05


def test_reinforce_step_adds_the_buffer_loss_gradient():
    torch.manual_seed(4)
    ctrl = U.ENASController(hid=8)
    ref = U.ENASController(hid=8)
    ref.load_state_dict(ctrl.state_dict())
    cells = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 4, 1, 0, 2, 3]])
    state = {"baseline": np.full(6, 0.3)}
    cell, logps, ents, _ = ctrl.sample(np.random.default_rng(0))
    before = [p.detach().clone() for p in ctrl.parameters()]
    adv = U.enas_reinforce_step(torch.optim.SGD(ctrl.parameters(), lr=1.0), logps, ents, 0.8, state,
                                extra_loss=ctrl.supervised_loss(cells))
    # autograd reference on an identical copy: sum(-log_prob * adv) + supervised loss
    lg = ref.teacher_forced_logits(torch.tensor([cell]))
    lp = torch.stack([torch.log_softmax(lg[k][0], 0)[cell[k]] for k in range(6)])
    loss = (-lp * torch.as_tensor(adv, dtype=lp.dtype)).sum() + ref.supervised_loss(cells)
    grads = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
    for b, p, g in zip(before, ctrl.parameters(), grads):
        want = torch.zeros_like(b) if g is None else g
        assert torch.allclose(b - p.detach(), want, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in torch.autograd.grad(ref.supervised_loss(cells), list(ref.encoder.parameters())))


def test_enas_shared_steps_draw_paths_from_the_controller(monkeypatch):
    data = _tiny_data()
    cfg = load_params("understanding_enas", "smoke")
    cfg.update(epochs=2, shared_steps=3, controller_steps=4, n_candidates=3, calib=16, hidden_samples=6,
               entropy_samples=4, channels=4, batch_size=16, reward_batch=8)
    calls = []
    orig = U.ENASController.sample

    def counting(self, rng):
        calls.append(1)
        return orig(self, rng)

    monkeypatch.setattr(U.ENASController, "sample", counting)
    E, S, K = cfg["epochs"], cfg["shared_steps"], cfg["controller_steps"]
    U.run_arm("random", 0, data, cfg, ())
    assert len(calls) == cfg["entropy_samples"]  # the initial entropy estimate only: random search never asks it
    calls.clear()
    U.run_arm("enas", 0, data, cfg, ())
    # entropy before + after every epoch, 2 x hidden_samples, one per controller step, one per SHARED step, candidates
    want = (E + 1) * cfg["entropy_samples"] + 2 * cfg["hidden_samples"] + E * K + E * S + cfg["n_candidates"]
    assert len(calls) == want
