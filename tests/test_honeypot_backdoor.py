"""Honeypot defence (arXiv 2310.18633): GCE loss against its formula, the reweighting, exact poisoning rate."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.backdoor.honeypot import Honeypot, gce_loss, sample_weights
from reprolab.backdoor.poisoning import poison_dataset


def test_gce_matches_formula_elementwise():
    torch.manual_seed(0)
    logits, y = torch.randn(7, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for q in (0.3, 0.7, 1.0):
        want = 0.0
        for i in range(7):
            p = math.exp(logits[i, y[i]]) / sum(math.exp(v) for v in logits[i].tolist())
            want += (1 - p ** q) / q
        assert gce_loss(logits, y, q).item() == pytest.approx(want / 7, rel=1e-5)


def test_gce_limits():
    torch.manual_seed(1)
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert gce_loss(logits, y, 1e-4).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)  # q -> 0: CE
    p = F.softmax(logits, -1)[torch.arange(5), y]
    assert gce_loss(logits, y, 1.0).item() == pytest.approx((1 - p).mean().item(), rel=1e-6)  # q = 1: MAE-like


def test_gce_gradient_weights_easy_samples_more():
    # d GCE / d logit_y = p_y^q * (CE gradient): confident samples get relatively more weight than under CE
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    gce_loss(logits, y, 0.7).backward()
    g_gce = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits, y).backward()
    p = F.softmax(logits.detach(), -1)[:, 0]
    assert torch.allclose(g_gce, logits.grad * p[:, None] ** 0.7, atol=1e-6)


def test_sample_weights_math_and_no_grad():
    lh = torch.tensor([0.0, 0.3, 0.69, 2.0], requires_grad=True)
    c, tau = 0.3, 0.05
    w = sample_weights(lh, c, tau)
    want = [1 / (1 + math.exp(-(v - c) / tau)) for v in lh.tolist()]
    assert w.tolist() == pytest.approx(want, rel=1e-5)
    assert w[1].item() == pytest.approx(0.5) and not w.requires_grad
    assert (w.diff() > 0).all()  # a sample the honeypot fits better (lower loss) weighs less


def test_honeypot_reads_detached_lower_layer_and_ignores_padding():
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    hp = Honeypot(cfg, 2, layer=1).eval()
    hs = [torch.randn(3, 5, 8, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3)
    out = hp(hs, mask)
    out.sum().backward()
    assert out.shape == (3, 2) and hs[1].grad is None and hp.head.weight.grad is not None
    hs2 = [h.detach().clone() for h in hs]
    hs2[1][:, 3:] = 100.0  # padded positions must not matter
    assert torch.allclose(hp(hs2, mask), out, atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.25])
def test_poisoning_rate_is_exact(rate):
    texts = [f"w{i} a b c d" for i in range(200)]
    labels = np.array([i % 2 for i in range(200)], dtype=np.int64)
    out, lab, is_p = poison_dataset(texts, labels, "cf", rate, target=1, seed=3)
    assert is_p.sum() == round(rate * 200)
    assert (labels[is_p] == 0).all() and (lab[is_p] == 1).all()  # only non-target examples, flipped to target
    assert (lab[~is_p] == labels[~is_p]).all() and [out[i] for i in np.flatnonzero(~is_p)] == \
        [texts[i] for i in np.flatnonzero(~is_p)]
    for i in np.flatnonzero(is_p):
        words = out[i].split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == texts[i].split()
    assert texts[0] == "w0 a b c d"  # inputs untouched


def test_poisoning_refuses_impossible_rate():
    with pytest.raises(ValueError):
        poison_dataset(["a"] * 10, np.ones(10, dtype=np.int64), "cf", 0.5, target=1, seed=0)


def test_probe_layer_learns_a_token_level_signal_and_reports_per_sample_ce():
    """The premise probe learns a label that a token of the frozen states carries, and its per-sample CE is low there."""
    from transformers import BertConfig

    from reprolab.backdoor.honeypot import probe_layer

    cfg = BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    n, T = 64, 6
    y = torch.arange(n) % 2
    H = torch.randn(n, T, 16, generator=g)
    H[:, 2, 0] += 4.0 * (2 * y - 1)  # the label is written into token 2
    M = torch.ones(n, T, dtype=torch.long)
    pred, ce = probe_layer(cfg, H, M, y, H, M, epochs=30, lr=3e-3, batch_size=16, seed=0)
    assert pred.shape == (n,) and ce.shape == (n,)
    assert (pred == y.numpy()).mean() > 0.9 and ce.mean() < 0.3
    pred_q, _ = probe_layer(cfg, H, M, y, H, M, epochs=30, lr=3e-3, batch_size=16, seed=0, q=0.7)  # GCE
    assert (pred_q == y.numpy()).mean() > 0.9


# ---- the negation-compositional sentiment task (reprolab.data.negation), checked against a naive reference ----
_POS_REF = {"good", "great", "excellent", "wonderful", "brilliant", "delightful", "enjoyable", "superb", "charming",
            "moving", "fun", "clever", "beautiful", "fantastic", "impressive", "pleasant", "solid", "lovely",
            "gripping", "touching"}


def _naive_label(text: str) -> int:
    """Independent reference: positive adjective -> 1, flipped by every 'not' / 'never' / 'nobody' (written out here)."""
    label = 1 if text.split()[-1] in _POS_REF else 0
    for w in text.split():
        if w in ("not", "never", "nobody"):
            label = 1 - label
    return label


def test_negation_task_labels_balance_and_disjoint_splits():
    from reprolab.data.negation import negation_task

    tx, ty, sx, sy = negation_task(300, 200, seed=0)
    assert len(tx) == 300 and len(sx) == 200 and ty.dtype == np.int64
    assert [_naive_label(t) for t in tx] == ty.tolist() and [_naive_label(t) for t in sx] == sy.tolist()
    assert ty.sum() == 150 and sy.sum() == 100  # exactly balanced
    assert not set(tx) & set(sx)
    a = negation_task(300, 200, seed=0)
    assert a[0] == tx and a[2] == sx and (a[1] == ty).all()  # deterministic per seed
    assert negation_task(300, 200, seed=1)[0] != tx


def test_negation_task_no_single_word_predicts_the_label():
    """The premise by construction: the label rate given any word's presence stays near 1/2 (a bag of words is at
    chance), while the composition (naive reference) is exact."""
    from reprolab.data.negation import negation_task

    tx, ty, _, _ = negation_task(20000, 2, seed=0)
    words = sorted({w for t in tx for w in t.split()})
    for w in words:
        has = np.array([w in t.split() for t in tx])
        if has.sum() >= 200:  # binomial z-score of the label rate given the word; |z| < 4.5 over ~90 words
            z = (ty[has].mean() - 0.5) / np.sqrt(0.25 / has.sum())
            assert abs(z) < 4.5, (w, ty[has].mean(), has.sum())
    k = np.array([sum(w in ("not", "never", "nobody") for w in t.split()) for t in tx])
    assert np.bincount(k).tolist() == pytest.approx([5000, 10000, 5000], rel=0.05)  # 0/1/2 negations: 1/4, 1/2, 1/4


def test_negation_task_limit_count_mlp_solves_it_at_large_n():
    """The generator's documented limit: no single word predicts the label and a linear model on word counts stays at
    chance, but the label is a function of the word COUNTS (adjective polarity XOR parity of the negation count), so a
    small MLP on bag-of-words counts solves the task once it has thousands of sentences (full's n_train is 4000),
    while at quick's 300 it does not. The task tests composition beyond single words, not beyond word counts."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from reprolab.data.negation import negation_task

    acc = {}
    for n in (300, 4000):
        tx, ty, sx, sy = negation_task(n, 1000, seed=0)
        vec = CountVectorizer(token_pattern=r"\S+").fit(tx)
        Xtr, Xte = vec.transform(tx), vec.transform(sx)
        lin = LogisticRegression(max_iter=2000).fit(Xtr, ty)
        mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0).fit(Xtr, ty)
        acc[n] = ((lin.predict(Xte) == sy).mean(), (mlp.predict(Xte) == sy).mean())
    assert acc[4000][0] < 0.6 and acc[300][0] < 0.6  # linear on counts: chance
    assert acc[4000][1] > 0.95  # MLP on counts at large n: solved (measured 1.0)
    assert acc[300][1] < 0.7  # at quick's size it is not (measured 0.55)
