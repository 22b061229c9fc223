"""AutoDistil: relation scores / loss against naive loops (official truncation, scaling, padding), the teacher hook
reads the LAST layer's q/k/v (a tiny random BERT), the student loss reads the last ACTIVE layer, sub-space sampling
stays inside its sub-space (largest + smallest + distinct random), step allocation, the probe, data splits."""
import math
import random

import numpy as np
import pytest
import torch

from reprolab.tf import autodistil as A

CFG = dict(head_dim=4, seq_len=8, dropout=0.0, n_rel=3, relation_loss="mse", n_random=2, lr=1e-2, weight_decay=0.01,
           batch_size=4, schedule="cosine", warmup_steps=1, grad_clip=1.0)
SUBS = {"tiny": {"embed": [8, 12], "depth": [1], "heads": [2, 3], "mlp": [8, 16]},
        "small": {"embed": [16, 20], "depth": [1, 2], "heads": [3], "mlp": [16, 24]},
        "base": {"embed": [24], "depth": [2, 3], "heads": [3, 4], "mlp": [24, 32]}}


def _naive_scores(x, n_rel):
    B, T, W = x.shape
    d = W // n_rel
    out = torch.zeros(B, n_rel, T, T, dtype=torch.float64)
    for b in range(B):
        for a in range(n_rel):
            for i in range(T):
                for j in range(T):
                    xi = x[b, i, a * d:(a + 1) * d].double()
                    xj = x[b, j, a * d:(a + 1) * d].double()
                    out[b, a, i, j] = (xi * xj).sum() / math.sqrt(d)
    return out


def test_relation_scores_truncate_to_teacher_heads_and_scale_like_the_official_code():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 14)  # width 14, 3 relation heads -> d_r = 4, the last 2 columns unused
    s = A.relation_scores(x, 3)
    assert s.shape == (2, 3, 5, 5)
    assert torch.allclose(s.double(), _naive_scores(x, 3), atol=1e-5)
    x2 = x.clone()
    x2[..., 12:] = 100.0  # columns beyond n_rel * d_r never matter (official all_head_size_round)
    assert torch.equal(A.relation_scores(x2, 3), s)
    with pytest.raises(ValueError):
        A.relation_scores(torch.randn(1, 3, 2), 3)


def test_relation_mse_counts_only_real_token_pairs():
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 12), torch.randn(2, 6, 24)  # student / teacher widths differ
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ds, dt = _naive_scores(s, 3), _naive_scores(t, 3)
    num, cnt = 0.0, 0
    for b in range(2):
        for a in range(3):
            for i in range(6):
                for j in range(6):
                    if mask[b, i] and mask[b, j]:
                        num += float((ds[b, a, i, j] - dt[b, a, i, j]) ** 2)
                        cnt += 1
    got = float(A.relation_mse(s, t, 3, mask))
    assert got == pytest.approx(num / cnt, rel=1e-5)
    # mutation: without the mask (the official additive mask cancels: every pair counts) the value differs
    assert float(A.relation_mse(s, t, 3)) == pytest.approx(float((ds - dt).pow(2).mean()), rel=1e-5)
    assert abs(float(A.relation_mse(s, t, 3)) - got) > 1e-3
    # the teacher side is detached
    s.requires_grad_(True)
    t.requires_grad_(True)
    A.relation_mse(s, t, 3, mask).backward()
    assert t.grad is None and s.grad is not None


def test_relation_loss_sums_qq_kk_vv_and_the_kl_variant_matches_the_kit():
    from reprolab.tf.distill import relation_kd

    torch.manual_seed(2)
    sq = tuple(torch.randn(2, 5, 13) for _ in range(3))
    tq = tuple(torch.randn(2, 5, 24) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    want = sum(float(A.relation_mse(s, t, 3, mask)) for s, t in zip(sq, tq))
    assert float(A.relation_loss(sq, tq, 3, mask, "mse")) == pytest.approx(want, rel=1e-6)
    want_kl = sum(float(relation_kd(s[..., :12], t, 3, mask)) for s, t in zip(sq, tq))
    assert float(A.relation_loss(sq, tq, 3, mask, "kl")) == pytest.approx(want_kl, rel=1e-6)
    # per-head (B, h, T, d) inputs are merged head-major first
    ph = tuple(s[..., :12].reshape(2, 5, 3, 4).transpose(1, 2) for s in sq)
    assert float(A.relation_loss(ph, tq, 3, mask)) == pytest.approx(
        sum(float(A.relation_mse(s[..., :12], t, 3, mask)) for s, t in zip(sq, tq)), rel=1e-6)
    with pytest.raises(ValueError):
        A.relation_loss(sq, tq, 3, mask, "cosine")


def test_teacher_states_read_the_last_layer_query_key_value():
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=32, max_position_embeddings=16)).eval()
    ids = torch.randint(1, 50, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1, 5:] = False
    st = A.teacher_states(bert, ids, mask, layer=-1, batch_size=2)
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        h_in = out.hidden_states[-2]  # input of the last layer
        attn = bert.encoder.layer[2].attention.self
        for key, lin in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            assert torch.allclose(st[key].float(), lin(h_in), atol=2e-2)  # stored as float16
        # mutation: the second-to-last layer's query is different
        assert not torch.allclose(st["q"].float(), bert.encoder.layer[1].attention.self.query(out.hidden_states[-3]),
                                  atol=2e-2)
        w = mask.unsqueeze(-1).float()
        pooled = (out.last_hidden_state * w).sum(1) / w.sum(1)
    assert torch.allclose(st["pooled"], pooled, atol=1e-5)
    st1 = A.teacher_states(bert, ids, mask, layer=1)
    assert torch.allclose(st1["q"].float(), bert.encoder.layer[1].attention.self.query(out.hidden_states[1]), atol=2e-2)


def test_student_qkv_come_from_the_last_active_layer():
    torch.manual_seed(4)
    space = A.union_space(SUBS)
    net = A.init_superlm(space, CFG, 0, 30).eval()
    child = net.config_from(16, 2, 3, 16)
    net.set_active_subnet(child)
    x = torch.randint(0, 30, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    (q, k, v), h = A.student_qkv(net, x, mask)
    out = net(x, mask=mask, return_states=True)
    blk = net.blocks[1]
    z = blk.ln1(out["hidden"][1])  # input of the second (= last active) layer
    assert q.shape == (2, 6, 12)
    assert torch.allclose(q, blk.q(z, 12), atol=1e-6) and torch.allclose(v, blk.v(z, 12), atol=1e-6)
    assert not torch.allclose(q, net.blocks[0].q(net.blocks[0].ln1(out["hidden"][0]), 12), atol=1e-3)
    assert torch.equal(h, out["hidden"][-1])


def test_subspace_sampling_stays_inside_its_subspace():
    net = A.init_superlm(A.union_space(SUBS), CFG, 0, 30)
    for name, sp in SUBS.items():
        kids = A.space_children(net, sp)
        n = len(sp["embed"]) * len(sp["depth"]) * len(sp["heads"]) * len(sp["mlp"])
        assert len(kids) == n and all(A.in_space(c, sp) for c in kids)
        params = [net.n_params(c) for c in kids]
        assert params == sorted(params)
        assert kids[-1] == A.space_max(sp) and kids[0] == A.space_min(sp)
        for step in range(40):
            picks = A.sample_step(kids, step, seed=1)
            assert picks[0] == A.space_max(sp) and picks[1] == A.space_min(sp)
            assert len(picks) == 4 and all(A.in_space(c, sp) for c in picks)
            mids = [str(c) for c in picks[2:]]
            assert len(set(mids)) == 2 and all(c not in (kids[0], kids[-1]) for c in picks[2:])
        # a child of another sub-space is rejected
        other = [s for s in SUBS if s != name][0]
        assert not all(A.in_space(c, sp) for c in A.space_children(net, SUBS[other]))
    # deterministic per (seed, step), different across seeds
    kids = A.space_children(net, A.union_space(SUBS))
    assert A.sample_step(kids, 3, 0) == A.sample_step(kids, 3, 0)
    assert any(A.sample_step(kids, s, 0) != A.sample_step(kids, s, 1) for s in range(5))
    # the union space holds every sub-space's architectures
    assert all(A.in_space(c, A.union_space(SUBS)) for sp in SUBS.values() for c in A.space_children(net, sp))
    with pytest.raises(ValueError):
        A.sample_step(kids[:3], 0, 0)


def test_training_samples_only_subspace_children_and_step_allocation(monkeypatch):
    seen = []
    orig = A.TinyTransformer.set_active_subnet

    def spy(self, cfg):
        seen.append(self.validate_config(cfg))
        return orig(self, cfg)

    monkeypatch.setattr(A.TinyTransformer, "set_active_subnet", spy)
    torch.manual_seed(5)
    n = 12
    kd = {"ids": torch.randint(0, 30, (n, 8)), "mask": torch.ones(n, 8, dtype=torch.bool),
          "q": torch.randn(n, 8, 12).half(), "k": torch.randn(n, 8, 12).half(), "v": torch.randn(n, 8, 12).half()}
    net, losses = A.train_superlm(SUBS["tiny"], kd, CFG, 0, 3, 30)
    trained = [c for c in seen if c != net.max_config()]
    assert len(trained) >= 3 * 3 and all(A.in_space(c, SUBS["tiny"]) for c in trained)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert A.arm_steps("k3", 240, 3) == 80 and A.arm_steps("k3_full", 240, 3) == 240
    assert A.arm_steps("k1", 240, 3) == 240
    assert set(A.arm_spaces("k3", SUBS)) == set(SUBS) and set(A.arm_spaces("k1", SUBS)) == {"all"}
    assert A.superlm_for("k1", "tiny") == "all" and A.superlm_for("k3_full", "base") == "base"
    with pytest.raises(ValueError):
        A.arm_steps("k2", 240, 3)


def test_training_reduces_the_relation_loss_to_a_fixed_teacher():
    torch.manual_seed(6)
    n = 32
    ids = torch.randint(0, 20, (n, 8))
    mask = torch.ones(n, 8, dtype=torch.bool)
    # a learnable "teacher": q/k/v are fixed random projections of token embeddings
    emb = torch.randn(20, 12)
    kd = {"ids": ids, "mask": mask, **{k: (emb[ids] @ torch.randn(12, 12) / 3).half() for k in ("q", "k", "v")}}
    cfg = {**CFG, "batch_size": 8, "lr": 3e-2}
    child = A.space_max(SUBS["tiny"])
    init = A.init_superlm(SUBS["tiny"], cfg, 0, 20)
    before = A.evaluate_child(init, child, ids, mask, kd, cfg)["kd_loss"]
    net, _ = A.train_superlm(SUBS["tiny"], kd, cfg, 0, 15, 20)
    after = A.evaluate_child(net, child, ids, mask, kd, cfg)
    assert after["kd_loss"] < 0.7 * before
    assert after["features"].shape == (n, child["embed"]) and "kd_kl" in after


def test_probe_and_data_helpers():
    rng = np.random.RandomState(0)
    X = np.r_[rng.randn(30, 3) + 5, rng.randn(30, 3) - 5]
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    assert A.probe_accuracy(X[::2], y[::2], X[1::2], y[1::2]) == 1.0
    assert A.probe_accuracy(X[::2], rng.permutation(y[::2]), X[1::2], y[1::2]) < 0.9
    sub = A.probe_subset(np.repeat(np.arange(3), 10), 4, seed=0)
    assert len(sub) == 12 and np.bincount(np.repeat(np.arange(3), 10)[sub]).tolist() == [4, 4, 4]
    assert not np.array_equal(sub, A.probe_subset(np.repeat(np.arange(3), 10), 4, seed=1))
    s = A.split_sentences("One two three four five six. Short one. Seven eight nine ten eleven twelve!  Next", 6)
    assert s == ["One two three four five six.", "Seven eight nine ten eleven twelve!"]
    vocab = A.compact_vocab(torch.tensor([[5, 9, 2]]), torch.tensor([[9, 101]]))
    assert vocab.tolist() == [2, 5, 9, 101]
    assert A.remap(torch.tensor([[101, 2]]), vocab).tolist() == [[3, 0]]
    with pytest.raises(ValueError):
        A.remap(torch.tensor([[7]]), vocab)
    b = A.budget_children(SUBS)
    assert b["base"]["max"] == A.space_max(SUBS["base"]) and b["tiny"]["min"] == A.space_min(SUBS["tiny"])


def test_sentence_splits_are_disjoint_and_ordered():
    sp = A.text_splits(6)
    assert len(sp) == 6
    for parts in sp.values():
        tr, va, te = set(parts["train"]), set(parts["val"]), set(parts["test"])
        assert len(parts["test"]) >= 60
        assert not (set(parts["test"]) & tr) or len(set(parts["test"]) & tr) < 3  # repeated stock lines only
    S = A.build_sentences(64, 10, 10, 0)
    assert len(S["kd"][0]) == 64 and len(S["test"][0]) == 60 and np.bincount(S["test"][1]).tolist() == [10] * 6
    assert S == A.build_sentences(64, 10, 10, 0)


# ---------------------------------------------------------------------------------------------------- review additions
def test_token_blind_baseline_matches_a_naive_mean_and_is_the_best_constant():
    torch.manual_seed(7)
    tq = tuple(torch.randn(9, 5, 12) for _ in range(3))
    mask = torch.ones(9, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4, 2:] = False
    mus = A.relation_score_mean(tq, mask, 3, batch_size=4)
    for mu, t in zip(mus, tq):
        sc = _naive_scores(t, 3)
        for a, i, j in ((0, 0, 1), (2, 4, 4), (1, 2, 3)):
            vals = [float(sc[b, a, i, j]) for b in range(9) if mask[b, i] and mask[b, j]]
            assert float(mu[a, i, j]) == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-6)
    base = A.position_baseline_loss(mus, tq, mask, 3, batch_size=2)
    # == relation_loss "mse" of a student whose scores are the means, computed naively
    want = 0.0
    for mu, t in zip(mus, tq):
        sc = _naive_scores(t, 3)
        num, cnt = 0.0, 0
        for b in range(9):
            for a in range(3):
                for i in range(5):
                    for j in range(5):
                        if mask[b, i] and mask[b, j]:
                            num += float((sc[b, a, i, j] - mu[a, i, j]) ** 2)
                            cnt += 1
        want += num / cnt
    assert base == pytest.approx(want, rel=1e-5)
    # the mean is the best constant: moving it raises the loss
    assert A.position_baseline_loss(tuple(m + 0.1 for m in mus), tq, mask, 3) > base


def test_one_training_step_sums_the_gradients_of_the_four_sampled_children(monkeypatch):
    torch.manual_seed(8)
    n = 8
    kd = {"ids": torch.randint(0, 30, (n, 8)), "mask": torch.ones(n, 8, dtype=torch.bool),
          "q": torch.randn(n, 8, 12).half(), "k": torch.randn(n, 8, 12).half(), "v": torch.randn(n, 8, 12).half()}
    kd["mask"][0, 6:] = False
    got = {}

    def fake_train(model, data, steps, loss_fn, **kw):
        x, idx = data["train"]
        model.zero_grad()
        loss_fn(model, x, idx, 0)
        got["grads"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        return []

    monkeypatch.setattr(A, "train_model", fake_train)
    sp = SUBS["small"]
    net, _ = A.train_superlm(sp, kd, CFG, 3, 1, 30)
    ref = A.init_superlm(sp, CFG, 3, 30)
    picks = A.sample_step(A.space_children(ref, sp), 0, 3, CFG["n_random"])
    ref.zero_grad()
    tq = tuple(kd[k] for k in ("q", "k", "v"))
    for c in picks:
        ref.set_active_subnet(c)
        sq, _ = A.student_qkv(ref, kd["ids"], kd["mask"])
        A.relation_loss(sq, tq, CFG["n_rel"], kd["mask"], "mse").backward()
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]
    assert len(picks) == 4
    for g, w in zip(got["grads"], want):
        assert torch.allclose(g, w, atol=1e-5)


def test_evaluate_child_reports_the_training_loss_and_masked_mean_features():
    torch.manual_seed(9)
    n = 6
    ids = torch.randint(0, 30, (n, 8))
    mask = torch.ones(n, 8, dtype=torch.bool)
    mask[1, 4:] = False
    teacher = {k: torch.randn(n, 8, 12).half() for k in ("q", "k", "v")}
    net = A.init_superlm(SUBS["base"], CFG, 0, 30)
    child = A.space_min(SUBS["base"])
    out = A.evaluate_child(net, child, ids, mask, teacher, CFG, batch_size=4)
    net.set_active_subnet(child)
    with torch.no_grad():
        sq, h = A.student_qkv(net, ids, mask)
        tq = tuple(teacher[k] for k in ("q", "k", "v"))
        b1, b2 = slice(0, 4), slice(4, 6)
        mse = (4 * float(A.relation_loss(tuple(s[b1] for s in sq), tuple(t[b1] for t in tq), 3, mask[b1], "mse"))
               + 2 * float(A.relation_loss(tuple(s[b2] for s in sq), tuple(t[b2] for t in tq), 3, mask[b2], "mse"))) / n
    assert out["kd_loss"] == pytest.approx(mse, rel=1e-5)
    assert "kd_kl" in out and abs(out["kd_kl"] - out["kd_loss"]) > 1e-3
    w = mask.unsqueeze(-1).float()
    assert torch.allclose(out["features"], (h * w).sum(1) / w.sum(1), atol=1e-5)
    assert not torch.allclose(out["features"][1], h[1].mean(0), atol=1e-4)


def test_k1_space_is_the_union_and_k3_spaces_are_the_subspaces():
    assert A.arm_spaces("k1", SUBS) == {"all": A.union_space(SUBS)}
    assert A.union_space(SUBS)["embed"] == [8, 12, 16, 20, 24] and A.union_space(SUBS)["depth"] == [1, 2, 3]
    for arm in ("k3", "k3_full"):
        assert A.arm_spaces(arm, SUBS) == SUBS
