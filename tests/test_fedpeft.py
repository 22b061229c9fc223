"""FedPEFT (arXiv 2210.01708): which parameters each arm trains and sends, the mean-pooling head, LoRA and prompt
tuning (peft) against hand computations on the bare pretrained encoder, local training as a hand Adam step, and the
Flower server's FedAvg and byte ledger (no Ray). The Flower engine end to end: test_distributed.py."""
import json

import numpy as np
import pytest
import torch

from reprolab.fed.fedpeft import (ARMS, build_model, count_params, get_trainable, local_train, set_trainable,
                                  trainable_names, work_task)
from reprolab.paths import REPO_ROOT

MODEL = "minilm-l6"
K = 3


def spec(**kw):
    return {"model_name": MODEL, "num_labels": K, "seed": 0, "lora_r": 4, "lora_alpha": 8,
            "lora_targets": ("query", "value"), "n_prompt": 3, "dropout": 0.0, **kw}


@pytest.fixture(scope="module")
def bert():
    """The bare pretrained encoder, loaded independently of the module under test."""
    from transformers import AutoModel, AutoTokenizer

    from reprolab.lm import model_source

    src = model_source(MODEL)
    return AutoModel.from_pretrained(src, add_pooling_layer=False).eval(), AutoTokenizer.from_pretrained(src)


def batch(tok, texts=("to be or not to be, that is the question", "of man's first disobedience", "a word")):
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_each_arm_trains_exactly_its_parameters(bert):
    enc, _ = bert
    base = dict(enc.named_parameters())
    n_base = sum(p.numel() for p in base.values())
    head = {"classifier.weight", "classifier.bias"}
    d, n_layers = enc.config.hidden_size, enc.config.num_hidden_layers
    for arm in ARMS:
        m = build_model(arm, **spec())
        names = set(trainable_names(m))
        n = count_params(m)["trainable"]
        if arm == "full":
            assert n == n_base + d * K + K
        elif arm == "head":
            assert names == head
        elif arm == "bias":
            want = {f"encoder.{k}" for k in base if k.endswith("bias")} | head
            assert names == want
            assert n == sum(base[k].numel() for k in base if k.endswith("bias")) + d * K + K
        elif arm == "lora":  # A (r, d) and B (d, r) on query and value in every layer
            assert n == n_layers * 2 * (4 * d + d * 4) + d * K + K
            assert all("lora_" in k for k in names - head)
        elif arm == "prompt":
            assert n == 3 * d + d * K + K
        # frozen tensors are the pretrained ones
        for k, p in m.named_parameters():
            if not p.requires_grad:
                key = k.replace("encoder.base_model.", "encoder.").replace(".base_layer", "")
                key = key[len("encoder."):]
                torch.testing.assert_close(p, base[key], rtol=0, atol=0)


def naive_mean_pool(h, mask):
    """Mean of the rows of h[i] where mask[i] == 1, example by example."""
    return torch.stack([h[i][mask[i].bool()].mean(0) for i in range(len(h))])


def test_mean_pooling_head_against_the_unpadded_encoder(bert):
    enc, tok = bert
    m = build_model("head", **spec())
    ids, mask = batch(tok)
    got = m.pooled(ids, mask)
    with torch.no_grad():  # each example alone, without any padding
        want = torch.stack([enc(input_ids=ids[i:i + 1, :int(mask[i].sum())]).last_hidden_state[0].mean(0)
                            for i in range(len(ids))])
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    logits = m(ids, mask)
    torch.testing.assert_close(logits, got @ m.classifier.weight.T + m.classifier.bias)


def test_lora_query_is_w_plus_scaled_ba(bert):
    m = build_model("lora", **spec())
    q = m.encoder.encoder.layer[0].attention.self.query
    torch.manual_seed(1)
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()  # B starts at 0 (LoRA's init): give it a value to test the path
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight  # (r, d), (d, r)
    W, b = q.base_layer.weight, q.base_layer.bias
    x = torch.randn(2, 5, W.shape[1])
    want = x @ W.T + b + (8 / 4) * (x @ A.T @ B.T)  # alpha / r = 2
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_prepends_virtual_tokens_and_pools_the_text(bert):
    enc, tok = bert
    m = build_model("prompt", **spec())
    P = m.encoder.prompt_encoder["default"].embedding.weight  # (n_prompt, d)
    ids, mask = batch(tok)
    word = enc.get_input_embeddings()(ids)  # (B, T, d)
    with torch.no_grad():
        x = torch.cat([P.unsqueeze(0).expand(len(ids), -1, -1), word], 1)  # (B, n + T, d)
        am = torch.cat([torch.ones(len(ids), 3, dtype=mask.dtype), mask], 1)
        h = enc(inputs_embeds=x, attention_mask=am).last_hidden_state[:, 3:]  # text positions
    torch.testing.assert_close(m.pooled(ids, mask).detach(), naive_mean_pool(h, mask), rtol=1e-4, atol=1e-5)
    # initialised from vocabulary embeddings (peft SAMPLE_VOCAB), not N(0, 1)
    assert float(P.std()) < 0.2


def test_local_training_is_one_adam_step_on_the_head(bert):
    _, tok = bert
    m = build_model("head", **spec())
    ids, mask = batch(tok)
    y = torch.tensor([0, 1, 2])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        z = m.pooled(ids, mask).double()  # (B, d) frozen features
    W, b = before["classifier.weight"].double(), before["classifier.bias"].double()
    p = torch.softmax(z @ W.T + b, 1)
    p[torch.arange(3), y] -= 1.0
    gW, gb = p.T @ z / 3, p.sum(0) / 3  # mean cross-entropy gradient
    lr = 0.01
    local_train(m, ids.numpy(), mask.numpy(), y.numpy(), epochs=1, batch_size=3, lr=lr, seed=0)
    after = m.state_dict()
    # Adam's first step: -lr * g / (|g| + eps) (bias-corrected moments)
    torch.testing.assert_close(after["classifier.weight"].double(), W - lr * gW / (gW.abs() + 1e-8), rtol=0, atol=1e-6)
    torch.testing.assert_close(after["classifier.bias"].double(), b - lr * gb / (gb.abs() + 1e-8), rtol=0, atol=1e-6)
    for k in before:
        if not k.startswith("classifier."):
            assert torch.equal(before[k], after[k]), k


def test_bias_arm_moves_only_biases_and_round_trips_its_message(bert):
    _, tok = bert
    m = build_model("bias", **spec())
    before = {k: v.clone() for k, v in m.named_parameters()}
    ids, mask = batch(tok)
    local_train(m, ids.numpy(), mask.numpy(), np.array([0, 1, 2]), epochs=1, batch_size=2, lr=1e-2, seed=0)
    moved = {k for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert moved and all(k.endswith(".bias") or k.startswith("classifier.") for k in moved)
    arrays = get_trainable(m)
    m2 = build_model("bias", **spec(seed=5))
    set_trainable(m2, arrays)
    for (k, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), k


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


def test_server_fedavg_and_ledger_against_a_direct_loop():
    from flwr.common import Code, FitRes, Status

    from reprolab.distributed.flower import message_bytes, ndarrays_to_parameters, parameters_to_ndarrays
    from reprolab.fed.fedpeft import _strategy_class

    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (7,)]
    ups = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    ns = [5, 17, 2]
    init = [np.zeros(s, np.float32) for s in shapes]
    strat = _strategy_class()(num_clients=3, seed=0, initial_parameters=ndarrays_to_parameters(init))
    cids = ["c2", "c0", "c1"]
    strat.partition_of = {c: k for k, c in enumerate(cids)}
    results = [(_Proxy(cids[k]), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ups[k]), ns[k], {"train_s": 0.1}))
               for k in (2, 0, 1)]  # out of order
    params, _ = strat.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(params)
    for j in range(len(shapes)):
        want = sum(n * u[j].astype(np.float64) for n, u in zip(ns, ups)) / sum(ns)
        np.testing.assert_allclose(got[j], want, rtol=1e-6)
    up = [r for r in strat.ledger if r["direction"] == "up"]
    assert [r["partition"] for r in up] == [0, 1, 2]
    one = message_bytes(ndarrays_to_parameters(ups[0]))
    assert all(r["bytes"] == one for r in up)
    # npy: a header of at most 128 bytes per tensor, then 4 bytes per float32
    assert 4 * 22 < one <= 4 * 22 + 128 * 3


def test_work_task_is_balanced_and_disjoint():
    works = ["hamlet", "paradise_lost", "areopagitica"]
    tr_x, tr_y, te_x, te_y = work_task(works, 30, 15, seed=3)
    assert np.bincount(tr_y).tolist() == [10, 10, 10] and np.bincount(te_y).tolist() == [5, 5, 5]
    assert not set(tr_x) & set(te_x)
    again = work_task(works, 30, 15, seed=3)
    assert again[0] == tr_x and np.array_equal(again[1], tr_y)


def test_notebook_has_a_parameters_cell():
    nb = json.loads((REPO_ROOT / "notebooks" / "fedpeft.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "profile" in "".join(tagged[0]["source"])


def test_inprocess_driver_is_fedavg_of_the_clients_local_training(bert):
    """drive_inprocess (the Flower client and strategy without Ray) against a direct loop: one round, two clients,
    each trains the head from the broadcast with its client seed; the server's model is their example-weighted mean."""
    from reprolab.distributed.flower import client_seed
    from reprolab.fed.fedpeft import run_arm

    _, tok = bert
    texts = ["to be or not to be", "of man's first disobedience", "a word", "the tempest", "fair is foul", "so on"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=12, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    y = np.array([0, 1, 2, 0, 1, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    sp = spec()
    hp = {"threads": 1, "local_epochs": 1, "batch_size": 2, "lr": {"head": 0.05}}
    out = run_arm("head", {"ids": ids, "mask": mask, "y": y, "parts": parts, "spec": sp}, hp, 0, num_clients=2,
                  rounds=1, test=(ids, mask, y), eval_rounds=[1], engine="inprocess")
    ups = []
    for k, idx in enumerate(parts):
        m = build_model("head", **sp)
        local_train(m, ids[idx], mask[idx], y[idx], epochs=1, batch_size=2, lr=0.05, seed=client_seed(0, k, 1))
        ups.append(get_trainable(m))
    avg = [(2 * a.astype(np.float64) + 4 * b) / 6 for a, b in zip(*ups)]
    m = build_model("head", **sp)
    set_trainable(m, avg)
    from reprolab.fed.fedpeft import evaluate

    assert out["curve"][-1]["acc"] == pytest.approx(evaluate(m, ids, mask, y)[1])
    assert out["curve"][-1]["loss"] == pytest.approx(evaluate(m, ids, mask, y)[0], rel=1e-5)
    n = 4 * (384 * K + K)  # float32 head, both ways, two clients
    assert [r["direction"] for r in out["ledger"]] == ["down", "down", "up", "up"]
    assert all(n < r["bytes"] <= n + 2 * 128 for r in out["ledger"])  # + one npy header per tensor
