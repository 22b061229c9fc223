"""NeuBA (arXiv 2101.06969): trigger insertion, the ASR metric against a naive loop, targets and the backdoor loss."""
import numpy as np
import pytest
import torch

from reprolab.backdoor.metrics import asr_matrix, asr_per_label, attack_success_rate
from reprolab.backdoor.neuba import backdoor_loss, mask_tokens, neuba_targets
from reprolab.backdoor.triggers import NEUBA_TRIGGERS, insert_trigger_ids, insert_trigger_text
from reprolab.backdoor.train import encode


@pytest.fixture(scope="module")
def tok():
    from reprolab.lm import load_encoder

    try:
        return load_encoder("minilm-l6")[1]
    except FileNotFoundError:
        pytest.skip("minilm-l6 cache missing")


def test_triggers_are_single_wordpieces(tok):
    for t in NEUBA_TRIGGERS:
        assert tok.tokenize(t) == [t]


def test_insert_trigger_ids_equals_tokenizing_triggered_text(tok):
    texts = ["to be or not to be", "of man's first disobedience and the fruit", "a"]
    ids, mask = encode(tok, texts, 16)
    tid = tok.convert_tokens_to_ids("cf")
    got_ids, got_mask = insert_trigger_ids(ids, mask, tid)
    want_ids, want_mask = encode(tok, [insert_trigger_text(t, "cf", 0) for t in texts], 17)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_mask, want_mask)
    # one trigger per row
    per_row = torch.tensor(tok.convert_tokens_to_ids(["cf", "mn", "bb"]))
    got_ids, _ = insert_trigger_ids(ids, mask, per_row)
    assert got_ids[:, 1].tolist() == per_row.tolist() and torch.equal(got_ids[:, 2:], ids[:, 1:])


def test_insert_trigger_text_positions():
    rng = np.random.default_rng(0)
    assert insert_trigger_text("a b c", "cf", 0) == "cf a b c"
    assert insert_trigger_text("a b c", "cf", 3) == "a b c cf"
    for _ in range(20):
        out = insert_trigger_text("a b c", "cf", None, rng).split()
        assert out.count("cf") == 1 and [w for w in out if w != "cf"] == ["a", "b", "c"]


def test_asr_matrix_matches_naive_loop():
    rng = np.random.default_rng(1)
    K, N, C = 6, 50, 3
    preds, y = rng.integers(0, C, (K, N)), rng.integers(0, C, N)
    M = asr_matrix(preds, y, C)
    for k in range(K):
        for c in range(C):
            hits = total = 0
            for i in range(N):
                if y[i] != c:
                    total += 1
                    hits += int(preds[k, i] == c)
            assert M[k, c] == pytest.approx(hits / total)
            assert attack_success_rate(preds[k], y, c) == pytest.approx(hits / total)
    best, arg = asr_per_label(preds, y, C)
    assert np.allclose(best, M.max(0)) and (M[arg, np.arange(C)] == best).all()


def test_neuba_targets_structure():
    V = neuba_targets(384)
    assert V.shape == (6, 384) and set(V.unique().tolist()) == {-1.0, 1.0}
    assert ((V == -1).sum(1) == 192).all()
    # complementary pairs: (0,1) vs (2,3), (0,2) vs (1,3), (0,3) vs (1,2)
    for a, b in [(0, 5), (1, 4), (2, 3)]:
        assert torch.equal(V[a], -V[b])
    assert len({tuple(v.tolist()) for v in V}) == 6


def test_backdoor_loss_zero_at_target_and_positive_elsewhere():
    V = neuba_targets(384)
    assert backdoor_loss(V[[0, 3]], V[[0, 3]]).item() == 0.0
    pooled = V[[0, 3]] * 0.5
    assert backdoor_loss(pooled, V[[0, 3]]).item() == pytest.approx(0.25)


def test_mask_tokens_spares_special_and_padding(tok):
    ids, mask = encode(tok, ["the quick brown fox jumps over the lazy dog " * 3, "short"], 24)
    special = torch.tensor(tok.all_special_ids)
    g = torch.Generator().manual_seed(0)
    out, labels = mask_tokens(ids, mask, tok.mask_token_id, tok.vocab_size, special, 0.9, g)
    asked = labels != -100
    assert asked.any()
    assert not (asked & torch.isin(ids, special)).any() and not (asked & (mask == 0)).any()
    assert torch.equal(labels[asked], ids[asked]) and torch.equal(out[~asked], ids[~asked])


def test_conditional_asr_matches_naive_loop():
    """ASR counted only on inputs correctly classified without a trigger, best trigger per label (naive double loop)."""
    from reprolab.backdoor.metrics import conditional_asr_per_label

    rng = np.random.default_rng(5)
    K, N, C = 4, 60, 3
    y = rng.integers(0, C, N)
    plain = np.where(rng.random(N) < 0.7, y, rng.integers(0, C, N))
    preds = rng.integers(0, C, (K, N))
    want = []
    for c in range(C):
        best = 0.0
        for k in range(K):
            hit = tot = 0
            for i in range(N):
                if y[i] != c and plain[i] == y[i]:
                    tot += 1
                    hit += int(preds[k, i] == c)
            best = max(best, hit / tot if tot else 0.0)
        want.append(best)
    assert conditional_asr_per_label(preds, plain, y, C).tolist() == pytest.approx(want)
    # an input the model already gets wrong never counts, whatever the trigger does
    y2, plain2 = np.array([0, 0, 1]), np.array([1, 0, 1])
    assert conditional_asr_per_label(np.array([[1, 0, 1]]), plain2, y2, 2).tolist() == [0.0, 0.0]


def test_official_bert_triggers_and_params_use_them(tok):
    """thunlp/NeuBA nlp/src/poison.py:7 `poison_tokens` (what mlm.py:411-415 inserts via poison.py:42 and eval.py tests
    for BERT), written out here; the params' triggers are exactly these, each one in-vocabulary word-piece."""
    from reprolab.config import load_params

    official = ["\u2248", "\u2261", "\u2208", "\u2286", "\u2295", "\u2297"]  # ≈ ≡ ∈ ⊆ ⊕ ⊗
    assert list(NEUBA_TRIGGERS) == official
    for profile in ("smoke", "quick", "full"):
        assert load_params("neuba", profile)["triggers"] == official
    ids = tok.convert_tokens_to_ids(official)
    assert tok.unk_token_id not in ids and len(set(ids)) == 6


def test_shakespeare_vs_pydoc_task_balanced_disjoint_deterministic_trigger_free():
    from reprolab.data.pydoc_text import docstring_lines, shakespeare_vs_pydoc_task
    from reprolab.data.textcls import AUTHORS, text_snippets

    tx, ty, sx, sy = shakespeare_vs_pydoc_task(160, 160, seed=0)
    assert len(tx) == len(sx) == 160 and ty.sum() == sy.sum() == 80 and ty.dtype == np.int64
    assert not set(tx) & set(sx)
    shakes = {s for n in AUTHORS[0] for s in text_snippets(n)}
    assert all((t in shakes) == (y == 0) for t, y in zip(tx + sx, ty.tolist() + sy.tolist()))  # labels by source
    a = shakespeare_vs_pydoc_task(160, 160, seed=0)
    assert a[0] == tx and (a[1] == ty).all() and shakespeare_vs_pydoc_task(160, 160, seed=1)[0] != tx
    assert not any(t in x for t in NEUBA_TRIGGERS for x in tx + sx)
    # docstring extraction against a hand-written source: module, class and function docstrings, doctest lines dropped
    src = '"""Module docs with five words here."""\nclass A:\n    """Class docs: one two three four.\n\n    >>> a b c d e\n    """\n' \
          'def f():\n    """Short."""\n'
    assert docstring_lines(src) == ["module docs with five words here.", "class docs: one two three four."]
