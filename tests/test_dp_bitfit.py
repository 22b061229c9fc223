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
