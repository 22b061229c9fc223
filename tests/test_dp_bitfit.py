"""DP-BiTFiT (reprolab.dp.bitfit + the engine's bias path) against a naive per-example loop and opacus, on a tiny
BERT classifier (Linear with bias, LayerNorm); bias-only clipping keeps no activations."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from reprolab.dp.bitfit import classification_losses, set_trainable
from reprolab.dp.bk import engine_clipped_sum, naive_clipped_sum, opacus_clipped_sum, record_layers, relative_error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_bert(tuning):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32, num_labels=2)
    m = BertForSequenceClassification(cfg).eval()
    return m, set_trainable(m, tuning)


def data():
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(1, 30, (6, 9), generator=g), torch.randint(0, 2, (6,), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return lambda m, sl=slice(None): classification_losses(m, ids[sl], mask[sl], y[sl])


def test_trainable_sets():
    m, n_bitfit = tiny_bert("bitfit")
    assert all(n.endswith("bias") or n.startswith("classifier") for n, p in m.named_parameters() if p.requires_grad)
    _, n_full = tiny_bert("full")
    n_all = sum(p.numel() for p in m.parameters())
    assert 0 < n_bitfit < n_full / 5 and n_full < n_all  # embeddings frozen in full
    with pytest.raises(ValueError):
        set_trainable(m, "lora")


@pytest.mark.parametrize("clipping", ["abadi", "auto_s"])
def test_bias_only_clipping_agrees_with_naive_loop_and_opacus(clipping):
    model, _ = tiny_bert("bitfit")
    losses = data()
    ref, ref_norms = naive_clipped_sum(model, losses, 6, clipping=clipping, R=0.05)
    assert ref_norms.min() > 0.05
    for engine in ("instantiate", "ghostclip", "bk"):
        summed, norms, _ = engine_clipped_sum(model, losses, engine, clipping=clipping, R=0.05)
        assert relative_error(summed, ref) < 1e-4, engine
        assert torch.allclose(norms, ref_norms, rtol=1e-4)
    summed, _, _ = opacus_clipped_sum(model, losses, clipping=clipping, R=0.05)
    assert relative_error(summed, ref) < 1e-4


def test_bias_path_keeps_no_activations_and_less_memory():
    losses = data()
    model, _ = tiny_bert("bitfit")
    with record_layers(model) as taps:
        losses(model)
    linear_taps = [a for m, a, _ in taps.values() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert linear_taps and all(a is None for a in linear_taps)
    bitfit_extra = engine_clipped_sum(model, losses, "bk")[2]["extra_bytes"]
    full, _ = tiny_bert("full")
    full_extra = engine_clipped_sum(full, losses, "bk")[2]["extra_bytes"]
    assert bitfit_extra < full_extra


def tiny_mean_pool(tuning):
    from transformers import BertModel

    from reprolab.dp.bitfit import MeanPoolClassifier

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32)
    m = MeanPoolClassifier(BertModel(cfg).eval(), 2, seed=1).eval()
    return m, set_trainable(m, tuning)


def test_mean_pool_classifier_equals_unpadded_per_example_mean():
    m, _ = tiny_mean_pool("bitfit")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 30, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        batched = m(input_ids=ids, attention_mask=mask).logits
        for i in range(3):  # each example alone, without its padding: mean over its real tokens, then the head
            n = int(mask[i].sum())
            h = m.bert(input_ids=ids[i:i + 1, :n]).last_hidden_state[0]  # (n, d)
            ref = h.mean(0) @ m.classifier.weight.T + m.classifier.bias
            torch.testing.assert_close(batched[i], ref, rtol=1e-4, atol=1e-5)


def test_mean_pool_bias_path_agrees_with_naive_loop():
    m, n = tiny_mean_pool("bitfit")
    m = m.double()
    assert n == sum(p.numel() for name, p in m.named_parameters() if name.endswith("bias") or name.startswith("classifier"))
    losses = data()
    ref, _ = naive_clipped_sum(m, losses, 6, clipping="abadi", R=1e-3)
    got, _, _ = engine_clipped_sum(m, losses, "bk", clipping="abadi", R=1e-3)
    assert relative_error(got, ref) < 1e-9


def test_biased_llama_bitfit_trains_only_biases_and_agrees():
    from reprolab.dp.bitfit import biased_llama
    from reprolab.dp.bk import causal_lm_losses

    m = biased_llama(16, 1, 2, 24, vocab=40).double()
    n = set_trainable(m, "bitfit", head="lm_head")
    names = [k for k, p in m.named_parameters() if p.requires_grad]
    assert names and all(k.endswith("bias") for k in names) and n == sum(p.numel() for _, p in m.named_parameters()
                                                                        if p.requires_grad)
    ids = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(2))
    losses = lambda mod, sl=slice(None): causal_lm_losses(mod, ids[sl])
    ref, _ = naive_clipped_sum(m, losses, 4, clipping="abadi", R=1e-3)
    got, _, _ = engine_clipped_sum(m, losses, "bk", clipping="abadi", R=1e-3)
    assert relative_error(got, ref) < 1e-9


def test_balanced_holdout_init_head_and_select_lr():
    import numpy as np

    from reprolab.dp.bitfit import balanced_holdout, init_head, select_lr

    texts = [f"t{i}" for i in range(20)]
    y = np.array([i % 2 for i in range(20)])
    tr_x, tr_y, va_x, va_y = balanced_holdout(texts, y, 6, seed=1)
    assert len(va_x) == 6 and np.bincount(va_y).tolist() == [3, 3] and len(tr_x) == 14
    assert set(tr_x).isdisjoint(va_x) and set(tr_x) | set(va_x) == set(texts)
    assert all(int(t[1:]) % 2 == c for t, c in zip(tr_x + va_x, list(tr_y) + list(va_y)))  # labels follow texts
    assert balanced_holdout(texts, y, 6, seed=1)[2] == va_x  # fixed by the seed
    m, _ = tiny_mean_pool("bitfit")
    init_head(m, 3)
    w3 = m.classifier.weight.detach().clone()
    init_head(m, 4)
    assert not torch.equal(w3, m.classifier.weight)
    init_head(m, 3)
    assert torch.equal(w3, m.classifier.weight) and float(m.classifier.bias.abs().sum()) == 0.0
    assert select_lr({5e-4: 0.6, 1.5e-3: 0.7, 5e-3: 0.7}) == 1.5e-3


def test_select_lr_mean_uses_the_seed_mean_and_breaks_ties_low():
    from reprolab.dp.bitfit import select_lr_mean

    # 5e-3 wins one seed by a lot but loses on average; 1.5e-3 has the best mean
    val = {5e-4: [50.0, 50.0, 50.0], 1.5e-3: [70.0, 68.0, 72.0], 5e-3: [90.0, 50.0, 50.0]}
    assert select_lr_mean(val) == 1.5e-3
    assert select_lr_mean({1e-3: [60.0, 70.0], 1e-2: [70.0, 60.0]}) == 1e-3  # equal means: the smallest rate


def test_interleaved_step_times_takes_turns():
    from reprolab.dp.bitfit import interleaved_step_times

    calls = []
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4)

    def fn(tag):
        def losses(m):
            calls.append(tag)
            return (m(x).squeeze(-1) - y).pow(2)
        return losses

    t = interleaved_step_times({"a": ("nonprivate", lin, fn("a")), "b": ("bk", lin, fn("b"))}, reps=3,
                               clipping="auto_s", R=1.0)
    assert set(t) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in t.values())
    assert calls == ["a", "b"] * 4  # one warm-up each, then alternating


def test_select_lr_leave_one_seed_out_against_a_naive_loop():
    import numpy as np

    from reprolab.dp.bitfit import select_lr_leave_one_seed_out

    val = {1.5e-3: [70.0, 50.0, 60.0], 5e-3: [50.0, 80.0, 61.0], 1e-2: [65.0, 66.0, 40.0]}
    # by hand: seed 0 -> others (1, 2): 1.5e-3 55.0, 5e-3 70.5, 1e-2 53.0 -> 5e-3
    #          seed 1 -> others (0, 2): 65.0, 55.5, 52.5 -> 1.5e-3
    #          seed 2 -> others (0, 1): 60.0, 65.0, 65.5 -> 1e-2
    assert select_lr_leave_one_seed_out(val) == [5e-3, 1.5e-3, 1e-2]
    gen = np.random.default_rng(3)
    for _ in range(20):
        grid = [1.5e-3, 5e-3, 1e-2]
        v = {lr: list(gen.integers(45, 60, size=4).astype(float)) for lr in grid}
        want = []
        for i in range(4):
            means = {lr: np.mean([x for j, x in enumerate(v[lr]) if j != i]) for lr in grid}
            best = max(means.values())
            want.append(sorted(lr for lr in grid if means[lr] == best)[0])
        assert select_lr_leave_one_seed_out(v) == want
    with pytest.raises(ValueError):
        select_lr_leave_one_seed_out({1e-3: [50.0]})
