"""Compress, Then Prompt (arXiv 2305.11186): RTN quantizer, magnitude pruning, soft prompt vs peft prompt tuning.

A tiny random Llama stands in for SmolLM2 so that the file runs in seconds; the notebook uses the real model.
"""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm.compress import (compress_model, compressed_bits_per_weight, layer_sparsity, magnitude_prune,
                                  rtn_quantize)
from reprolab.lm.soft_prompt import SoftPromptLM, gap_closed, init_prompt_from_tokens, train_soft_prompt

V = 101


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))  # (B, L)


def naive_rtn(w, n_bits, group_size):
    """Element by element: GPTQ's asymmetric min-max grid per row and group (range widened to hold 0)."""
    out = torch.empty_like(w)
    maxq = 2 ** n_bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group_size):
            vals = [float(v) for v in w[r, g0:g0 + group_size]]
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            if lo == 0.0 and hi == 0.0:
                lo, hi = -1.0, 1.0
            scale = torch.tensor((hi - lo) / maxq, dtype=torch.float32)
            zero = torch.round(torch.tensor(-lo, dtype=torch.float32) / scale)
            for c in range(g0, g0 + group_size):
                q = min(max(torch.round(w[r, c] / scale) + zero, 0), maxq)
                out[r, c] = scale * (q - zero)
    return out


@pytest.mark.parametrize("n_bits,group_size", [(3, 8), (4, 16), (2, 4)])
def test_rtn_matches_naive_reference(n_bits, group_size):
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(n_bits))
    w[0, :group_size] = 0.0  # an all-zero group
    w[1, :group_size] = w[1, :group_size].abs() + 0.1  # an all-positive group: the range is widened to 0
    got = rtn_quantize(w, n_bits, group_size)
    ref = naive_rtn(w, n_bits, group_size)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    for r in range(5):
        for g0 in range(0, 16, group_size):
            assert len(torch.unique(got[r, g0:g0 + group_size])) <= 2 ** n_bits
    assert torch.equal(got[0, :group_size], torch.zeros(group_size))
    assert not torch.allclose(got, w)  # it does quantize


def test_rtn_error_shrinks_with_bits():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errs = [(rtn_quantize(w, b, 32) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4
    assert (rtn_quantize(w, 3, 32) - w).pow(2).mean() < (rtn_quantize(w, 3, 128) - w).pow(2).mean()


def test_magnitude_pruning_exact_sparsity_per_layer():
    model = tiny_llama()
    for s in (0.5, 0.6, 0.37):
        pruned = compress_model(model, n_bits=None, sparsity=s)
        from reprolab.quant.fake_quant import decoder_linears
        orig = {n: getattr(p, a).weight for n, (p, a, _) in decoder_linears(model).items()}
        for name, frac in layer_sparsity(pruned).items():
            numel = orig[name].numel()
            assert frac == int(s * numel) / numel, name  # exact count (no original weight is exactly zero)
        for name, (p, a, _) in decoder_linears(pruned).items():
            w_new, w_old = getattr(p, a).weight, orig[name]
            kept, dropped = w_old[w_new != 0].abs(), w_old[w_new == 0].abs()
            assert kept.min() >= dropped.max()  # the smallest magnitudes went
            assert torch.equal(w_new[w_new != 0], w_old[w_new != 0])
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)  # embeddings / head untouched
    w = torch.tensor([[3.0, -1.0, 2.0, -4.0]])
    assert torch.equal(magnitude_prune(w, 0.5), torch.tensor([[3.0, 0.0, 0.0, -4.0]]))


def test_quantize_after_prune_keeps_zeros():
    model = tiny_llama()
    both = compress_model(model, n_bits=3, group_size=16, sparsity=0.5)
    assert all(frac >= 0.5 for frac in layer_sparsity(both).values())
    assert compressed_bits_per_weight(None, 128, 0.0) == 16.0
    assert compressed_bits_per_weight(3, 128, 0.0) == 3.25
    assert compressed_bits_per_weight(4, 128, 0.5) == pytest.approx(0.5 * 4.25 + 1)


def test_zero_length_prompt_is_the_model(x):
    model = tiny_llama()
    lm = SoftPromptLM(model, torch.zeros(0, 32))
    with torch.no_grad():
        out, ref = lm(x, labels=x), model(input_ids=x, labels=x)
    assert torch.equal(out.logits, ref.logits)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    assert all(not p.requires_grad for p in model.parameters())


def test_soft_prompt_matches_peft_prompt_tuning(x):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    k = 4
    model = tiny_llama()
    P0 = init_prompt_from_tokens(model, torch.tensor([3, 5, 7, 11])) + 0.1 * torch.randn(k, 32)
    ours = SoftPromptLM(model, P0)
    loss = ours(x, labels=x)
    loss.loss.backward()
    peft_model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=k))
    emb = peft_model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(P0)
    ref = peft_model(input_ids=x, labels=x)
    ref.loss.backward()
    assert loss.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert torch.allclose(loss.logits, ref.logits[:, k:], atol=1e-5)
    assert torch.allclose(ours.P.grad, emb.weight.grad, atol=1e-6, rtol=1e-4)
    assert ours.P.grad.abs().sum() > 0


def test_prompt_gradient_matches_finite_differences(x):
    model = tiny_llama(torch.float64)
    lm = SoftPromptLM(model, 0.1 * torch.randn(3, 32, dtype=torch.float64))
    lm.P.data = lm.P.data.double()
    lm(x, labels=x).loss.backward()
    eps = 1e-3  # LlamaRMSNorm computes in float32 even for a float64 model, hence a large step and a 1% tolerance
    for (i, j) in [(0, 0), (1, 7), (2, 31)]:
        with torch.no_grad():
            lm.P[i, j] += eps
            up = lm(x, labels=x).loss.item()
            lm.P[i, j] -= 2 * eps
            down = lm(x, labels=x).loss.item()
            lm.P[i, j] += eps
        assert lm.P.grad[i, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_training_the_prompt_lowers_loss_and_gap_closed(x):
    model = tiny_llama()
    lm = SoftPromptLM(model, init_prompt_from_tokens(model, x[0, :4]))
    before = model.lm_head.weight.clone()
    losses = train_soft_prompt(lm, [x] * 15, lr=0.05)
    assert losses[-1] < losses[0]
    assert torch.equal(model.lm_head.weight, before)  # the model stays frozen
    assert gap_closed(10.0, 20.0, 15.0) == 0.5 and gap_closed(10.0, 20.0, 20.0) == 0.0
    assert math.isclose(gap_closed(10.0, 20.0, 8.0), 1.2)


def test_in_distribution_block_is_disjoint_from_every_training_window():
    """The premise gate and the in-distribution diagnostic score block I, the first eval_tokens of the training text's
    held-out part (the notebook's ids_t[:, cut:cut + eval_tokens]); no training window (lm_batches over the first
    1 - heldout_frac of the stream) may reach into it (checked by position, naively)."""
    from reprolab.lm.offsite import lm_batches
    T, heldout_frac, eval_tokens, seq_len = 1000, 0.1, 64, 32
    stream = torch.arange(T).unsqueeze(0)  # (1, T): token id = position
    cut = int(T * (1 - heldout_frac))
    block = stream[:, cut:cut + eval_tokens]  # (1, eval_tokens), as in the notebook
    assert block.shape[1] == eval_tokens and int(block[0, 0]) == cut  # starts right after the training part
    tail = set(block[0].tolist())
    assert eval_tokens <= T - cut
    for seed in range(5):
        for b in lm_batches(stream[:, :cut], seq_len, 4, 50, seed=seed):  # (B, L) windows of positions
            assert not (set(b.flatten().tolist()) & tail)
            assert int(b.max()) < cut


def test_premise_gate_statistic_is_the_loss_ratio_of_trained_to_initial_prompt(x):
    """The gate compares held-out perplexities of the trained and the initial prompt; its ratio < 1 exactly when
    the trained prompt's mean held-out NLL (an explicit per-token loop here) is lower."""
    from reprolab.lm import perplexity
    model = tiny_llama()
    P0 = init_prompt_from_tokens(model, x[0, :3])
    lm = SoftPromptLM(model, P0)
    train_soft_prompt(lm, [x] * 30, lr=5e-2)
    held = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(7))  # (1, T) held-out stream

    def naive_nll(P):  # mean next-token NLL over windows of 10, one position at a time
        m, tot, n = SoftPromptLM(model, P), 0.0, 0
        for w in range(4):
            win = held[:, 10 * w:10 * (w + 1)]
            logp = torch.log_softmax(m(win).logits[0].double(), -1)  # (L, V)
            for t in range(9):
                tot -= float(logp[t, win[0, t + 1]])
                n += 1
        return tot / n
    r = perplexity(SoftPromptLM(model, lm.P.detach()), held, 10) / perplexity(SoftPromptLM(model, P0), held, 10)
    assert r == pytest.approx(math.exp(naive_nll(lm.P.detach()) - naive_nll(P0)), rel=1e-5)


def test_on_step_callback_sees_every_step_and_leaves_training_unchanged(x):
    """The mid-training held-out diagnostic uses train_soft_prompt's on_step hook: it is called after each of the n
    steps (1-based), the prompt it sees at step s equals that of a run stopped after s steps, and scoring inside the
    hook (no_grad perplexity) does not change the losses or the final prompt."""
    from reprolab.lm import perplexity
    model = tiny_llama()
    P0 = init_prompt_from_tokens(model, x[0, :3])
    ref = SoftPromptLM(model, P0)
    ref_losses = train_soft_prompt(ref, [x] * 6, lr=5e-2)
    short = SoftPromptLM(model, P0)
    train_soft_prompt(short, [x] * 3, lr=5e-2)  # an independent run stopped after 3 steps
    lm, seen, at3 = SoftPromptLM(model, P0), [], {}

    def hook(step):
        seen.append(step)
        if step == 3:
            at3["P"] = lm.P.detach().clone()
            with torch.no_grad():
                at3["ppl"] = perplexity(lm, x, 8)
    losses = train_soft_prompt(lm, [x] * 6, lr=5e-2, on_step=hook)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert losses == ref_losses and torch.equal(lm.P, ref.P)
    assert torch.equal(at3["P"], short.P)
    with torch.no_grad():
        assert at3["ppl"] == perplexity(short, x, 8)
