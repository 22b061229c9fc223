"""CrossFi (arXiv 2408.10919): each piece against an independent reference (naive loops, direct formulas)."""
import math

import numpy as np
import pytest
import torch

from reprolab.sensing.crossfi import (PairScore, WeightNet, make_task, mk_mmd, one_shot_accuracy, one_shot_confusion,
                                      prototypes, train_arm, weighted_mse, weighted_templates)


pytestmark = pytest.mark.usefixtures("float64")  # tests/conftest.py


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_pair_score_matches_naive_loop(heads):
    torch.manual_seed(0)
    s = PairScore(dim=6, hidden=8, heads=heads, method="attention")
    q, k = torch.randn(5, 6), torch.randn(3, 6)
    got = s(q, k)
    Wq, bq, Wk, bk = (t.detach().numpy() for t in (s.q_linear.weight, s.q_linear.bias, s.k_linear.weight,
                                                    s.k_linear.bias))
    d = 8 // heads
    for i in range(5):
        for j in range(3):
            a = Wq @ q[i].numpy() + bq
            b = Wk @ k[j].numpy() + bk
            total = sum(sum(a[h * d + m] * b[h * d + m] for m in range(d)) for h in range(heads))
            assert got[i, j].item() == pytest.approx(1 / (1 + math.exp(-total)), rel=1e-12)


def test_cosine_pair_score_is_shifted_cosine():
    q, k = torch.randn(4, 5), torch.randn(2, 5)
    got = PairScore(5, 5, 1, "cosine")(q, k)
    for i in range(4):
        for j in range(2):
            a, b = q[i].numpy(), k[j].numpy()
            cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            assert got[i, j].item() == pytest.approx((cos + 1) / 2, rel=1e-12)


def test_weighted_templates_match_naive_loop_with_empty_class():
    """full_shot.py:181-185 loop: template[label] += y * w; weights summed; empty class -> zero template."""
    rng = np.random.default_rng(1)
    emb, lab, w = rng.normal(size=(9, 4)), rng.integers(0, 3, 9), rng.random(9)
    K = 4  # class 3 is empty
    T, W = np.zeros((K, 4)), np.zeros((K, 1))
    for i in range(9):
        T[lab[i]] += emb[i] * w[i]
        W[lab[i]] += w[i]
    W[W == 0] += 1
    got = weighted_templates(torch.tensor(emb), torch.tensor(lab), torch.tensor(w), K).numpy()
    np.testing.assert_allclose(got, T / W, rtol=1e-12)
    assert np.all(got[3] == 0)


def test_one_support_template_ignores_its_weight():
    """One-shot: a class with one support sample has that sample as template, whatever Weight-Net says."""
    emb = torch.randn(3, 5)
    got = weighted_templates(emb, torch.tensor([0, 1, 2]), torch.tensor([0.1, 0.7, 0.95]), 3)
    torch.testing.assert_close(got, emb)


def test_weightnet_outputs_one_weight_per_sample():
    wn = WeightNet(batch=16)
    w = wn(torch.rand(10, 10))
    assert w.shape == (10,) and bool(((w > 0) & (w < 1)).all())


def test_protonet_prototypes_are_class_means():
    rng = np.random.default_rng(2)
    emb, lab = rng.normal(size=(12, 3)), np.repeat([0, 1, 2], 4)
    got = prototypes(torch.tensor(emb), torch.tensor(lab), 3).numpy()
    np.testing.assert_allclose(got, np.stack([emb[lab == c].mean(0) for c in range(3)]), rtol=1e-12)


def test_mk_mmd_matches_naive_double_sum():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(loc=0.5, size=(4, 3))
    bws = (0.5, 1.0, 2.0)

    def kmean(a, b, s):
        return sum(math.exp(-sum((a[i] - b[j]) ** 2) / (2 * s * s)) for i in range(len(a)) for j in range(len(b))) \
            / (len(a) * len(b))
    ref = np.mean([math.sqrt(max(0.0, kmean(x, x, s) - 2 * kmean(x, y, s) + kmean(y, y, s))) for s in bws])
    assert mk_mmd(torch.tensor(x), torch.tensor(y), bws).item() == pytest.approx(ref, rel=1e-10)
    assert mk_mmd(torch.tensor(x), torch.tensor(x), bws).item() == pytest.approx(0.0, abs=1e-6)


def test_mk_mmd_gradient_is_finite_where_the_estimate_is_zero():
    x = torch.randn(6, 3, requires_grad=True)
    mk_mmd(x, x.detach().clone()).backward()
    assert bool(torch.isfinite(x.grad).all())


def test_weighted_mse_matches_loop():
    s = torch.tensor([[0.9, 0.2], [0.4, 0.7]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ref = ((0.1 ** 2) * 3 + 0.2 ** 2 + 0.4 ** 2 + (0.3 ** 2) * 3) / 4
    assert weighted_mse(s, t, 3.0).item() == pytest.approx(ref, rel=1e-12)


def test_tasks_are_real_sktime_data_with_disjoint_new_classes():
    cd = make_task("jv_cross_session")
    assert cd["X_source"].shape == (270, 12, 32) and cd["X_target"].shape == (370, 12, 32) and cd["n_way"] == 9
    nc = make_task("jv_new_class", base_speakers=5)
    assert nc["n_source_classes"] == 5 and nc["n_way"] == 4 and len(nc["y_target"]) == 24 + 40 + 50 + 29
    bm = make_task("basic_motions")
    assert bm["X_source"].shape == (40, 6, 100) and bm["n_way"] == 4


def test_one_shot_protonet_equals_direct_nearest_support():
    """One-shot ProtoNet = nearest support embedding; check one episode against a direct computation."""
    torch.set_default_dtype(torch.float32)
    task = make_task("basic_motions")
    cfg = dict(batch_size=16, width=8, dim=8, heads=1, lr=1e-3, weight_decay=0.0, epochs=1, proto_shot=1,
               mmd_weight={"basic_motions": 0.0})
    m = train_arm("protonet", task, cfg, seed=0)
    X, y = task["X_target"], task["y_target"]
    acc = one_shot_accuracy(m, X, y, episodes=1, seed=5)
    rng = np.random.default_rng(5)
    sup = np.array([rng.choice(np.flatnonzero(y == c)) for c in range(4)])
    with torch.no_grad():
        Z = m["encoder"](torch.from_numpy(X)).numpy()
    q = np.setdiff1d(np.arange(len(y)), sup)
    pred = [int(np.argmin([np.linalg.norm(Z[i] - Z[s]) for s in sup])) for i in q]
    assert acc[0] == pytest.approx(np.mean(np.array(pred) == y[q]))


# ---- the Siamese arms' training and evaluation (review: mutations of the scorer choice and of the argmax passed) ----
TINY = dict(batch_size=16, width=8, dim=8, heads=2, lr=1e-3, weight_decay=0.01, epochs=1, proto_shot=1,
            mmd_weight={"basic_motions": 1.0})


@pytest.fixture(scope="module")
def bm_task():
    return make_task("basic_motions")


def _naive_attention(s, q, k):
    """Direct formula of the CSi-Net score, one pair at a time (numpy)."""
    Wq, bq, Wk, bk = (t.detach().double().numpy() for t in (s.q_linear.weight, s.q_linear.bias, s.k_linear.weight,
                                                             s.k_linear.bias))
    out = np.empty((len(q), len(k)))
    for i in range(len(q)):
        for j in range(len(k)):
            out[i, j] = 1 / (1 + math.exp(-float((Wq @ q[i] + bq) @ (Wk @ k[j] + bk))))
    return out


@pytest.mark.parametrize("arm", ["crossfi", "cosine_siamese"])
def test_each_siamese_arm_uses_its_own_scorer(arm, bm_task):
    torch.set_default_dtype(torch.float32)
    m = train_arm(arm, bm_task, TINY, seed=0)
    q, k = np.random.default_rng(0).normal(size=(5, 8)), np.random.default_rng(1).normal(size=(3, 8))
    with torch.no_grad():
        got = m["scorer"](torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32)).double().numpy()
    if arm == "crossfi":
        ref = _naive_attention(m["scorer"], q, k)
    else:
        ref = (q @ k.T / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(k, axis=1)[None] + 1) / 2
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arm", ["crossfi", "cosine_siamese"])
def test_one_shot_siamese_equals_direct_argmax_of_pair_scores(arm, bm_task):
    """One Siamese one-shot episode against a direct computation: each query takes the support of highest score."""
    torch.set_default_dtype(torch.float32)
    m = train_arm(arm, bm_task, TINY, seed=0)
    X, y = bm_task["X_target"], bm_task["y_target"]
    for seed in (5, 6, 7):
        acc = one_shot_accuracy(m, X, y, episodes=1, seed=seed)
        rng = np.random.default_rng(seed)
        sup = np.array([rng.choice(np.flatnonzero(y == c)) for c in range(4)])
        with torch.no_grad():
            Z = m["encoder"](torch.from_numpy(X))
            S = m["scorer"](Z, Z[sup]).numpy()
        q = np.setdiff1d(np.arange(len(y)), sup)
        pred = [max(range(4), key=lambda j: S[i, j]) for i in q]
        assert acc[0] == pytest.approx(np.mean(np.array(pred) == y[q]))
        conf = one_shot_confusion(m, X, y, episodes=1, seed=seed)
        assert conf.sum() == len(q) and np.trace(conf) / conf.sum() == pytest.approx(acc[0])


def test_every_arm_takes_the_same_number_of_optimiser_steps(bm_task, monkeypatch):
    torch.set_default_dtype(torch.float32)
    counts = {}
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        counts[current] = counts.get(current, 0) + 1
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    cfg = dict(TINY, epochs=2)
    for current in ("crossfi", "cosine_siamese", "protonet"):
        train_arm(current, bm_task, cfg, seed=0)
    n, B = len(bm_task["y_source"]), 16
    assert counts == {a: 2 * 2 * math.ceil(n / B) for a in ("crossfi", "cosine_siamese", "protonet")}


def test_weightnet_receives_a_gradient_in_the_template_phase(bm_task, monkeypatch):
    """Weight-Net is used only in the template phase: its parameters must get non-zero gradients and move."""
    import copy

    from reprolab.sensing import crossfi as cf
    torch.set_default_dtype(torch.float32)
    grads = []

    class Spy(cf.WeightNet):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.init = copy.deepcopy(self.state_dict())
            for p in self.parameters():
                p.register_hook(lambda g: grads.append(float(g.abs().sum())))
    monkeypatch.setattr(cf, "WeightNet", Spy)
    m = train_arm("crossfi", bm_task, dict(TINY, mmd_weight={"basic_motions": 0.0}), seed=0)
    assert len(grads) > 0 and max(grads) > 0
    moved = [not torch.equal(m["weightnet"].state_dict()[k], v) for k, v in m["weightnet"].init.items()]
    assert all(moved)
