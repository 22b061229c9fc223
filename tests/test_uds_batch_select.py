"""UDS selection against independent references: numpy SVD, naive loops, explicit DFT matrices, the full model."""
from collections import deque

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.select.sft import TopBlocks, per_example_loss, trunk_features
from reprolab.select.sft_data import LABELS, TASKS, instruction_mix
from reprolab.select.uds import (FastJLProjector, MaxLossSelector, RandomSelector, SketchMemory, UDSSelector,
                                 nuclear_norm, nuclear_norm_from_hidden, top_k)


def test_nuclear_norm_is_the_sum_of_numpy_singular_values():
    X = torch.randn(5, 7, 300)
    expected = [np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False).sum() for x in X]
    assert np.allclose(nuclear_norm(X).numpy(), expected, rtol=1e-5)
    # zero-padded rows (shorter responses) do not change it
    padded = torch.cat([X, torch.zeros(5, 3, 300)], 1)
    assert np.allclose(nuclear_norm(padded).numpy(), expected, rtol=1e-5)


def test_top_k_is_the_exact_top_k_of_a_known_score_vector():
    scores = torch.tensor([0.3, 2.0, -1.0, 2.0, 5.0, 0.0, 1.5, 2.0])
    assert top_k(scores, 3).tolist() == [1, 3, 4]  # 5.0, then the first two of the three tied 2.0s
    rng = np.random.RandomState(0)
    for _ in range(20):
        s = rng.randn(16)
        k = rng.randint(1, 16)
        assert top_k(torch.tensor(s), k).tolist() == sorted(np.argsort(-s)[:k].tolist())


def test_sketch_memory_distance_and_fifo_match_a_naive_loop():
    rng = np.random.RandomState(1)
    mem, naive = SketchMemory(size=5), deque(maxlen=5)
    z0 = torch.tensor(rng.randn(3, 4))
    assert mem.mean_distance(z0).tolist() == [0.0, 0.0, 0.0]  # empty memory: no diversity yet
    for step in range(4):
        z = torch.tensor(rng.randn(3, 4))
        got = mem.mean_distance(z)
        if naive:
            want = [np.mean([np.sqrt(((zi - q) ** 2).sum()) for q in naive]) for zi in z.numpy()]
            assert np.allclose(got.numpy(), want)
        mem.push(z[:2])
        naive.extend(z[:2].numpy())
        stored = sorted(map(tuple, mem.queue[:mem.count].numpy().round(8)))
        assert stored == sorted(map(tuple, np.array(naive).round(8)))


def test_fast_jl_sketch_matches_explicit_dft_matrices():
    L, V, r1, r2 = 6, 40, 3, 8
    proj = FastJLProjector(L, V, r1, r2, seed=3)
    X = torch.randn(2, 4, V)  # shorter than L: zero-padded
    got = proj.project(X).numpy()
    FV = np.exp(-2j * np.pi * np.outer(np.arange(V), np.arange(V)) / V)  # DFT matrix
    FL = np.exp(-2j * np.pi * np.outer(np.arange(L), np.arange(L)) / L)
    d1, d2, i1, i2 = proj.d1.numpy(), proj.d2.numpy(), proj.idx1.numpy(), proj.idx2.numpy()
    for b in range(2):
        x = np.zeros((L, V))
        x[:4] = X[b].numpy()
        right = ((x * d2) @ FV).real[:, i2] * np.sqrt(V / r2)  # (L, r2)
        left = (FL @ (right * d1[:, None])).real[i1] * np.sqrt(L / r1)  # (r1, r2)
        assert np.allclose(got[b], left, atol=1e-3)


def test_hidden_state_shortcut_equals_the_logits_path():
    torch.manual_seed(0)
    L, d, V = 7, 16, 500
    W = torch.randn(V, d)  # a frozen linear head
    H = torch.randn(4, 5, d)
    H[1, 3:] = 0  # a shorter sequence: zero rows past its end
    X = H @ W.T  # (4, 5, V) the logits
    svd = [np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False).sum() for x in X]
    assert np.allclose(nuclear_norm_from_hidden(H, W.T @ W).numpy(), svd, rtol=1e-4)
    proj = FastJLProjector(L, V, r1=4, r2=32, seed=1)
    assert torch.allclose(proj.project_hidden(H, proj.head_factor(W)), proj.project(X), rtol=1e-3, atol=1e-2)
    a, b = UDSSelector(L, V, r1=4, r2=32, alpha=1.0), UDSSelector(L, V, r1=4, r2=32, alpha=1.0)
    for step in range(3):
        H = torch.randn(8, 5, d)
        assert a.select(H @ W.T, 3).tolist() == b.select_hidden(H, W, 3).tolist()
    assert torch.allclose(a.memory.queue[:a.memory.count], b.memory.queue[:b.memory.count], rtol=1e-3, atol=1e-2)


def test_uds_prefers_utility_and_avoids_what_it_has_seen():
    V = 64
    X = torch.randn(6, 3, V)
    X[2] *= 3.0  # the largest nuclear norm
    sel = UDSSelector(3, V, alpha=0.0, r1=2, r2=16)
    assert 2 in sel.select(X, 1).tolist()
    # with diversity dominant, a duplicate of a remembered example loses to a fresh one of equal utility
    sel = UDSSelector(3, V, alpha=1e6, r1=2, r2=16)
    A, B = torch.randn(3, V), torch.randn(3, V)
    B = B / torch.linalg.svdvals(B).sum() * torch.linalg.svdvals(A).sum()
    sel.select(A[None], 1)  # A enters the memory
    assert sel.select(torch.stack([A, B]), 1).tolist() == [1]
    assert len(sel.memory.queue[:sel.memory.count]) == 2


def test_baseline_selectors():
    losses = torch.tensor([0.1, 3.0, 0.5, 2.0])
    assert MaxLossSelector().select(None, 2, losses).tolist() == [1, 3]
    idx = RandomSelector(0).select(None, 5, batch_size=16)
    assert len(set(idx.tolist())) == 5 and idx.max() < 16


def test_top_blocks_on_trunk_features_reproduce_the_full_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    examples = [{"ids": [3, 7, 9, 11, 4, 5], "n_prompt": 4, "key": "a"},
                {"ids": [8, 2, 6, 1, 9], "n_prompt": 3, "key": "b"},
                {"ids": [5, 5, 2, 7, 7, 8, 1, 2], "n_prompt": 5, "key": "c"}]
    feats = trunk_features(model, examples, n_blocks=2, batch_size=2)
    top = TopBlocks(model, 2)
    with torch.no_grad():
        logits, targets, mask = top.response_logits([feats[e["key"]] for e in examples], examples)
        for i, ex in enumerate(examples):
            full = model(torch.tensor([ex["ids"]])).logits[0]  # (T, V)
            a = len(ex["ids"]) - ex["n_prompt"]
            assert torch.allclose(logits[i, :a], full[ex["n_prompt"] - 1:-1], atol=1e-5)
            assert targets[i, :a].tolist() == ex["ids"][ex["n_prompt"]:] and mask[i].sum() == a
            assert (logits[i, a:] == 0).all()
        seq = top.sequence_logits([feats[e["key"]] for e in examples])  # (3, 8, V): what UDS scores
        for i, ex in enumerate(examples):
            T = len(ex["ids"])
            assert torch.allclose(seq[i, :T], model(torch.tensor([ex["ids"]])).logits[0], atol=1e-5)
            assert (seq[i, T:] == 0).all()
        ce = per_example_loss(logits, targets, mask)
        naive = [np.mean([-torch.log_softmax(logits[i, t], -1)[targets[i, t]].item()
                          for t in range(int(mask[i].sum()))]) for i in range(3)]
        assert np.allclose(ce.numpy(), naive, atol=1e-5)
    assert not any(p.requires_grad for p in top.buffers()) and all(p.requires_grad for p in top.parameters())


def test_whole_sequence_loss_equals_the_official_hugging_face_loss():
    """loss_on="sequence" is the official train_on_inputs=True loss: labels = input_ids (gfyddha/UDS finetune.py:155),
    shifted and token-averaged over the micro-batch by the Hugging Face model (UDSamplingTrainer.py:241-242)."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    examples = [{"ids": [3, 7, 9, 11, 4, 5], "n_prompt": 4, "key": "a"},
                {"ids": [8, 2, 6, 1, 9], "n_prompt": 3, "key": "b"},
                {"ids": [5, 5, 2, 7, 7, 8, 1, 2], "n_prompt": 5, "key": "c"}]
    feats = trunk_features(model, examples, n_blocks=1, batch_size=3)
    top = TopBlocks(model, 1)
    with torch.no_grad():
        logits, targets, mask = top.response_logits([feats[e["key"]] for e in examples], examples, "sequence")
        assert mask.sum() == sum(len(e["ids"]) - 1 for e in examples)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        ours = (nll * mask).sum() / mask.sum()  # the training loss of train_arm
        T = max(len(e["ids"]) for e in examples)  # the official batch: right-padded, labels -100 at padding
        ids = torch.tensor([e["ids"] + [0] * (T - len(e["ids"])) for e in examples])
        att = torch.tensor([[1] * len(e["ids"]) + [0] * (T - len(e["ids"])) for e in examples])
        labels = ids.masked_fill(att == 0, -100)
        official = model(input_ids=ids, attention_mask=att, labels=labels).loss
        assert torch.allclose(ours, official, atol=1e-5)
        per_ex = per_example_loss(logits, targets, mask)  # max-loss's score: each sequence's own mean
        for i, e in enumerate(examples):
            one = model(input_ids=torch.tensor([e["ids"]]), labels=torch.tensor([e["ids"]])).loss
            assert torch.allclose(per_ex[i], one, atol=1e-5)
        resp, _, rmask = top.response_logits([feats[e["key"]] for e in examples], examples)  # default: response
        assert rmask.sum() == sum(len(e["ids"]) - e["n_prompt"] for e in examples)
    with pytest.raises(ValueError):
        top.response_logits([feats["a"]], examples[:1], "prompt")


def test_instruction_mix_is_balanced_duplicated_and_noisy_as_asked():
    pool, evals = instruction_mix(n_unique=8, dominant_copies=3, label_noise=0.25, n_eval=6, seed=0)
    assert len(pool) == 8 * 3 + 8 * 3 and sum(e["noisy"] for e in pool) == 12
    for ex in pool:
        assert ex["noisy"] == (ex["label"] != ex["true_label"]) and ex["answer"] == LABELS[ex["task"]][ex["label"]]
    for t in TASKS:
        ev = [e for e in evals if e["task"] == t]
        assert len(ev) == 6 and not any(e["noisy"] for e in ev)
        counts = np.bincount([e["label"] for e in ev], minlength=len(LABELS[t]))
        assert counts.max() - counts.min() <= 1
    train_prompts = {e["prompt"] for e in pool}
    assert not train_prompts & {e["prompt"] for e in evals}, "held-out prompts never appear in the pool"


def test_no_claim_is_gated_on_uds_own_result_and_min_detectable_matches_the_claims_interval():
    """Gate principle: uds_learns is a diagnostic, required by no claim. The notebook's minimum detectable effect
    (t(0.975, n-1) x sd / sqrt(n) of the paired per-seed differences) is the half-width of reprolab.claims' interval."""
    import yaml
    from pathlib import Path

    from scipy import stats

    from reprolab.claims import interval

    entry = yaml.safe_load((Path(__file__).parents[1] / "src/reprolab/select/uds_batch_select.paper.yaml").read_text())
    assert "uds_learns" in entry["gates"]
    assert all("uds_learns" not in c.get("requires", []) for c in entry["claims"].values())
    d = np.array([3.0, -1.5, 6.25])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    est, (lo, hi) = interval(d, "difference")
    assert np.isclose(hi - est, half) and np.isclose(est - lo, half)


def test_timed_real_steps_with_the_trunk_train_exactly_like_the_cached_loop():
    """time_real_steps (the with-trunk wall-time benchmark) recomputes the trunk inside every step instead of reading
    the cache; reference: train_arm on cached trunk features over the same candidate batches (one epoch = the same
    steps) must end at the same weights, for full data, random and UDS alike."""
    from reprolab.select.sft import time_real_steps, train_arm

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    rng = np.random.RandomState(0)
    pool = [{"ids": rng.randint(1, 50, rng.randint(4, 9)).tolist(), "n_prompt": 2, "key": f"k{i}", "uid": i,
             "task": "t", "noisy": False} for i in range(8)]
    feats = trunk_features(model, pool, n_blocks=2)
    T = max(len(e["ids"]) for e in pool)
    make = {"full": lambda: None, "random": lambda: RandomSelector(3), "uds": lambda: UDSSelector(T, 50, seed=3)}
    timed = time_real_steps(model, pool, {a: f() for a, f in make.items()}, n_blocks=2, batch_size=4, k=1, lr=1e-2,
                            seed=5, n_steps=2)
    assert all(len(timed[a]) == 2 and min(timed[a]) > 0 for a in make)
    for arm, f in make.items():
        ref, _ = train_arm(model, feats, pool, f(), 2, 1, 4, 1, 1e-2, 5, True, loss_on="sequence")
        for (n, p), (_, q) in zip(timed["_tops"][arm].named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, q, atol=1e-5), (arm, n)
        assert any(not torch.equal(p, q) for p, q in zip(ref.parameters(), TopBlocks(model, 2).parameters()))
