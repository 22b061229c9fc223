"""ReCIT (arXiv 2504.20570): LoRA gradient formula vs autograd through peft, span filter vs least squares, memorisation
step, constrained decoding vs a naive loop, parsing and recovery metrics (synthetic records only)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from reprolab.privacy.recit import (exact_pii_recovery, lora_grads_by_formula, make_records, span_filter_scores,
                                    token_recovery)


class Toy(nn.Module):
    def __init__(self, d_in=12, d_out=10):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def test_lora_gradient_matches_formula_through_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # non-zero B, as after some rounds of tuning
    x = torch.randn(7, 12)  # (N, d_in): the known record's layer inputs
    out = model(x)  # (N, d_out)
    out.retain_grad()
    target = torch.randn(7, 10)
    ((out - target) ** 2).sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dA, dB = lora_grads_by_formula(x, out.grad, A.detach(), B.detach(), scale=8 / 4)
    assert torch.allclose(A.grad, dA, atol=1e-5) and torch.allclose(B.grad, dB, atol=1e-5)
    # the rows of dL/dA lie in the span of the inputs
    scores = span_filter_scores(A.grad, torch.cat([x, torch.randn(3, 12)]))
    assert (scores[:7] > -1).all()  # finite
    Q, _ = torch.linalg.qr(x.T.double())  # (d_in, N) basis of span{x_t}
    g = A.grad.double()
    assert (g - (g @ Q) @ Q.T).norm() < 1e-5 * g.norm()


def test_span_filter_separates_batch_tokens_when_unsaturated():
    torch.manual_seed(1)
    V, d = 300, 64
    X = torch.randn(V, d)
    batch = torch.tensor([3, 17, 42, 99, 250])
    G = torch.randn(12, len(batch)) @ X[batch]  # (12, d): gradient rows are combinations of the batch inputs
    s = span_filter_scores(G, X)
    assert s[batch].max() < 1e-5
    others = torch.ones(V, dtype=torch.bool)
    others[batch] = False
    assert s[others].min() > 0.3
    # saturated span (more distinct inputs than dimensions): every token passes, the filter carries no information
    G_sat = torch.randn(d, d)
    assert span_filter_scores(G_sat, X).max() < 1e-4


def test_recovery_metrics_vs_naive():
    recs = make_records(5, seed=0)
    assert recs == make_records(5, seed=0) and recs != make_records(5, seed=1)
    assert all(len(r["phone"]) == 8 and r["phone"].isdigit() and r["phone"] in r["text"] for r in recs)
    got = [recs[0], dict(recs[1], phone="00000000"), recs[3]]
    naive = sum(any(g["first"] == r["first"] and g["last"] == r["last"] and g["phone"] == r["phone"] for g in got)
                for r in recs) / len(recs)
    assert exact_pii_recovery(got, recs) == pytest.approx(naive) == pytest.approx(0.4)
    m = token_recovery({1, 2, 3, 9}, {1, 2, 3, 4, 5, 6})
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert token_recovery(set(), {1})["f1"] == 0.0


# ---------------------------------------------------------------- end-to-end pieces on a tiny random Llama
def _tiny_lm(seed=0, vocab=300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_filter_keeps_exactly_the_batch_tokens_on_a_peft_llama():
    from reprolab.privacy.recit import attach_lora, filter_tokens, first_layer_inputs

    pm = attach_lora(_tiny_lm(), r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj"], seed=0, init_b_std=0.5)
    ids = torch.tensor([[5, 17, 42, 99, 250, 17]])  # 5 distinct tokens <= 3r = 24 gradient rows
    pm.zero_grad()
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n}
    X = first_layer_inputs(pm)  # (V, d)
    # independent reference for the row space: least squares of each candidate on the batch tokens' own inputs
    sol = torch.linalg.lstsq(X[[5, 17, 42, 99, 250]].T.double(), X.T.double()).solution  # (5, V)
    resid_ref = (X.T.double() - X[[5, 17, 42, 99, 250]].T.double() @ sol).norm(dim=0) / X.norm(dim=1).double()
    kept, scores = filter_tokens(grads, X, tau=1e-3)
    assert set(kept.tolist()) == {5, 17, 42, 99, 250}
    assert torch.allclose(scores.double(), resid_ref, atol=1e-4)  # the gradient span IS span{x_t} here
    # only layer 0's gradients are used: a layer-1 gradient (different inputs) would break the statistic
    assert any("layers.1." in n for n in grads) and not any("layers.1." in n for n in grads if "layers.0." in n)


def test_gradient_applied_moves_and_restores_lora_weights():
    from reprolab.privacy.recit import attach_lora, gradient_applied, lora_params

    pm = attach_lora(_tiny_lm(1), r=4, alpha=8, targets=["q_proj", "v_proj"], seed=0, init_b_std=0.1)
    before = {n: p.detach().clone() for n, p in lora_params(pm).items()}
    grads = {n: torch.randn_like(p) for n, p in before.items()}
    with gradient_applied(pm, grads, eta=0.5):
        for n, p in lora_params(pm).items():
            assert torch.allclose(p, before[n] - 0.5 * grads[n])
    for n, p in lora_params(pm).items():
        assert torch.equal(p, before[n])
    with gradient_applied(pm, grads, eta=0.01, mode="sign"):  # Adam's first update: every weight moves by eta
        for n, p in lora_params(pm).items():
            assert torch.allclose((before[n] - p).abs(), torch.full_like(p, 0.01), atol=1e-6)
            assert torch.equal(torch.sign(before[n] - p), torch.sign(grads[n]))
    for n, p in lora_params(pm).items():
        assert torch.equal(p, before[n])


def test_constrained_greedy_matches_naive_recompute():
    from reprolab.privacy.recit import constrained_greedy

    model = _tiny_lm(2)
    prefix = torch.tensor([[1, 7, 9]])
    allowed = torch.tensor([3, 8, 20, 21, 50, 77])
    seq = constrained_greedy(model, prefix, [4, 11], allowed, max_new=6)
    for row, start in zip(seq, [4, 11]):  # naive: full forward pass every step, argmax over allowed ids
        cur = torch.cat([prefix[0], torch.tensor([start])])
        for _ in range(6):
            with torch.no_grad():
                logits = model(input_ids=cur[None]).logits[0, -1]
            cur = torch.cat([cur, allowed[logits[allowed].argmax()][None]])
        assert torch.equal(row, cur)
    assert set(seq[:, 4:].flatten().tolist()) <= set(allowed.tolist())


def test_parse_and_name_starts_with_the_smollm_tokenizer():
    from transformers import AutoTokenizer

    from reprolab.lm import model_source
    from reprolab.privacy.recit import name_start_tokens, parse_candidates

    tok = AutoTokenizer.from_pretrained(model_source("smollm2-135m"))
    rec = make_records(1, seed=3)[0]
    ids = tok(rec["text"], return_tensors="pt").input_ids
    got = parse_candidates(tok, torch.cat([ids, tok(" extra", return_tensors="pt", add_special_tokens=False).input_ids], 1), 8)
    assert [(g["first"], g["last"], g["phone"]) for g in got] == [(rec["first"], rec["last"], rec["phone"])]
    assert parse_candidates(tok, tok("My name is Bob. My phone", return_tensors="pt").input_ids, 8) == []
    starts = name_start_tokens(tok, ids[0])
    pieces = tok.convert_ids_to_tokens(starts)
    assert pieces and all(p.startswith("Ġ") and p[1].isupper() for p in pieces)
    assert tok.convert_ids_to_tokens(tok(" My", add_special_tokens=False).input_ids)[0] not in pieces  # template
    assert rec["first"].startswith(pieces[0][1:])


def _tiny_peft_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    from reprolab.privacy.recit import attach_lora

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return attach_lora(LlamaForCausalLM(cfg).eval(), r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"], seed=seed,
                       init_b_std=0.5)


def _grads_of_ids(pm, ids):
    pm.zero_grad()
    pm(input_ids=ids, labels=ids).loss.backward()
    g = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    pm.zero_grad(set_to_none=True)
    return g


def test_gradient_distance_matches_naive():
    from reprolab.privacy.recit import gradient_distance

    torch.manual_seed(3)
    g1 = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    g2 = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    tag = sum(float(np.sqrt(((g1[k].numpy() - g2[k].numpy()) ** 2).sum())) + 0.3 * float(np.abs(g1[k].numpy() - g2[k].numpy()).sum())
              for k in g1)
    cos = sum(1 - float(np.dot(g1[k].numpy().ravel(), g2[k].numpy().ravel())
                        / (np.linalg.norm(g1[k].numpy()) * np.linalg.norm(g2[k].numpy()))) for k in g1)
    assert gradient_distance(g1, g2, "tag", 0.3).item() == pytest.approx(tag, rel=1e-5)
    assert gradient_distance(g1, g2, "cos").item() == pytest.approx(cos, rel=1e-5)
    assert gradient_distance(g1, g1, "cos").item() == pytest.approx(0.0, abs=1e-5)


def test_gradient_of_embeds_equals_gradient_of_ids():
    from reprolab.privacy.recit import lora_gradient_of_embeds

    pm = _tiny_peft_llama()
    ids = torch.tensor([[5, 9, 2, 33]])
    ref = _grads_of_ids(pm, ids)
    emb = pm.get_base_model().get_input_embeddings().weight[ids].detach()
    got = lora_gradient_of_embeds(pm, emb, torch.ones_like(ids), ids, create_graph=False)
    assert all(torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)


@pytest.mark.parametrize("metric", ["cos", "tag"])
def test_inversion_loss_decreases_and_recovers_a_toy_sequence(metric):
    from reprolab.privacy.recit import gradient_distance, invert_gradient, lora_gradient_of_embeds

    pm = _tiny_peft_llama()
    ids = torch.tensor([[40, 11]])
    g_obs = _grads_of_ids(pm, ids)
    allowed = torch.tensor([11, 40])  # the 2-token vocabulary restriction
    out, losses = invert_gradient(pm, g_obs, [2], steps=150, lr=0.005, metric=metric, allowed=allowed, seed=0)
    assert losses[-1] < 0.8 * losses[0]
    assert out.tolist() == ids.tolist()
    # independent check: among all 2^2 sequences over the allowed tokens, the truth is the unique gradient match
    emb_table = pm.get_base_model().get_input_embeddings().weight.detach()
    import itertools
    d = {}
    for seq in itertools.product([11, 40], repeat=2):
        s = torch.tensor([seq])
        d[seq] = gradient_distance(g_obs, lora_gradient_of_embeds(pm, emb_table[s], torch.ones_like(s), s, False),
                                   metric).item()
    assert min(d, key=d.get) == tuple(ids[0].tolist())


def test_digit_accuracy_is_the_best_positionwise_match():
    from reprolab.privacy.recit import digit_accuracy

    rec = {"phone": "12345678"}
    assert digit_accuracy([], rec) == 0.0
    cands = [{"phone": "12000000"}, {"phone": "99345699"}, {"phone": "87654321"}]
    assert digit_accuracy(cands, rec) == 4 / 8  # "99345699" matches positions 3-6
    assert digit_accuracy([{"phone": "12345678"}], rec) == 1.0


def test_victim_update_is_local_adam_against_a_hand_written_adam():
    """The victim's client update (k local Adam steps on its batch) against Kingma & Ba's Algorithm 1 written out
    (torch's eps placement: theta -= lr * m_hat / (sqrt(v_hat) + eps)), with the gradients taken by hand at each step."""
    from reprolab.privacy.recit import lora_params, victim_update

    pm = _tiny_peft_llama(3)
    ids = torch.tensor([[3, 9, 27, 41, 9, 60], [5, 5, 12, 33, 48, 2]])
    batch = (ids, torch.ones_like(ids), ids.clone())
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    theta0 = {n: p.detach().clone() for n, p in lora_params(pm).items()}
    got = victim_update(pm, batch, [1, 3], lr)
    for n, p in lora_params(pm).items():  # the adapter is restored
        assert torch.equal(p, theta0[n])
    # hand-written Adam on a copy of the same model
    params = lora_params(pm)
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    ref = {}
    for t in range(1, 4):
        g = _grads_of_ids_masked(pm, batch)
        with torch.no_grad():
            for n, p in params.items():
                m[n] = b1 * m[n] + (1 - b1) * g[n]
                v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
                p -= lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
        ref[t] = {n: theta0[n] - p.detach() for n, p in params.items()}
        if t == 1:  # Adam's first update is lr * sign(g) wherever |g| >> eps
            for n in params:
                big = g[n].abs() > 1e-4  # then |m_hat / (sqrt(v_hat) + eps)| = 1 - O(eps / |g|)
                assert big.any() and torch.allclose(ref[1][n][big], lr * g[n].sign()[big], rtol=1e-3, atol=0)
    for k in (1, 3):
        for n in params:
            assert torch.allclose(got[k][n], ref[k][n], atol=1e-6, rtol=1e-4), (k, n)
    # the victim's model is theta_0 - 1 * g_eq
    from reprolab.privacy.recit import gradient_applied
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(theta0[n])
    with gradient_applied(pm, got[3], 1.0):
        for n, p in lora_params(pm).items():
            assert torch.allclose(p, theta0[n] - ref[3][n], atol=1e-6)


def _grads_of_ids_masked(pm, batch):
    ids, mask, labels = batch
    pm.zero_grad()
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    g = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    pm.zero_grad(set_to_none=True)
    return g


def test_digit_chance_against_naive_enumeration_and_monte_carlo():
    """Chance of the best-of-n digit match: exact enumeration over every joint outcome of n candidates' match counts
    (small case) and Monte Carlo with digit_accuracy itself on random phones (B = 4, 8)."""
    import itertools
    from math import comb

    from reprolab.privacy.recit import digit_accuracy, digit_chance

    d, n, p = 3, 2, 0.1
    pmf = [comb(d, j) * p ** j * (1 - p) ** (d - j) for j in range(d + 1)]
    naive = sum(pmf[a] * pmf[b] * max(a, b) / d for a, b in itertools.product(range(d + 1), repeat=n))
    assert abs(digit_chance(d, n, p) - naive) < 1e-12
    assert abs(digit_chance(8, 1) - 0.1) < 1e-12
    rng = np.random.default_rng(0)
    for B, approx in ((4, 0.21), (8, 0.265)):
        acc = []
        for _ in range(4000):
            rec = {"phone": "".join(map(str, rng.integers(0, 10, 8)))}
            cands = [{"phone": "".join(map(str, rng.integers(0, 10, 8)))} for _ in range(B)]
            acc.append(digit_accuracy(cands, rec))
        assert abs(np.mean(acc) - digit_chance(8, B)) < 0.01
        assert abs(digit_chance(8, B) - approx) < 0.01


def test_input_span_residual_vs_least_squares_and_lora_gradient():
    """The premise measure: residual of G's rows after least-squares projection on span(Xin) (numpy lstsq), ~0 for
    a LoRA-A gradient built from the same inputs, and the random-subspace value sqrt(1 - k/d) for random rows."""
    from reprolab.privacy.recit import input_span_residual

    g = torch.Generator().manual_seed(0)
    d, k = 64, 8
    Xin = torch.randn(k, d, generator=g, dtype=torch.float64)
    G = torch.randn(5, d, generator=g, dtype=torch.float64)
    coef, *_ = np.linalg.lstsq(Xin.numpy().T, G.numpy().T, rcond=None)
    ref = np.linalg.norm(G.numpy().T - Xin.numpy().T @ coef) / np.linalg.norm(G.numpy())
    assert abs(input_span_residual(G, Xin) - ref) < 1e-10
    A, B = torch.randn(4, d, generator=g), torch.randn(10, 4, generator=g)
    dA, _ = lora_grads_by_formula(Xin.float(), torch.randn(k, 10, generator=g), A, B, 2.0)
    assert input_span_residual(dA, Xin) < 1e-5
    big = torch.randn(400, d, generator=g, dtype=torch.float64)
    assert abs(input_span_residual(big, Xin) - np.sqrt(1 - k / d)) < 0.03


def test_victim_update_first_grad_is_the_gradient_at_theta0():
    from reprolab.privacy.recit import lora_params, victim_update

    pm = _tiny_peft_llama(3)
    ids = torch.tensor([[3, 9, 27, 41, 9, 60], [5, 5, 12, 33, 48, 2]])
    batch = (ids, torch.ones_like(ids), ids.clone())
    ref = _grads_of_ids_masked(pm, batch)
    g0, out = victim_update(pm, batch, [2], 1e-2, with_first_grad=True)
    plain = victim_update(pm, batch, [2], 1e-2)
    for n in lora_params(pm):
        assert torch.allclose(g0[n], ref[n], atol=1e-7)
        assert torch.equal(out[2][n], plain[2][n])



def test_span_of_a_padded_batch_left_padding_needs_the_pad_id():
    """Which ids the gradient's layer-0 LoRA-A rows are built from, for a padded batch (labels -100 on padding, as
    lm_batch). Right padding: pad positions carry no loss and come after every real token, so the rows lie in the span
    of the real ids alone. Left padding (SmolLM2's): the pad position just before the first real token predicts it
    (the causal LM's shift leaves that label unmasked), so its input passes the LoRA and the pad id is needed in the
    span; swapping the id there changes the gradient."""
    from reprolab.privacy.recit import first_layer_inputs, input_span_residual, layer0_rows

    pm = _tiny_peft_llama(3)
    X = first_layer_inputs(pm)
    BOS, PAD = 1, 2
    real = [[BOS, 3, 9, 27, 41, 9], [BOS, 5, 12, 33]]
    for side in ("right", "left"):
        rows = [r + [PAD] * (6 - len(r)) if side == "right" else [PAD] * (6 - len(r)) + r for r in real]
        ids = torch.tensor(rows)
        mask = (ids != PAD).long()
        labels = ids.masked_fill(mask == 0, -100)
        G = layer0_rows(_grads_of_ids_masked(pm, (ids, mask, labels)))
        attended = sorted(set(ids[mask.bool()].tolist()))
        with_pad = sorted(set(ids.flatten().tolist()))
        assert input_span_residual(G, X[with_pad]) < 1e-5
        swapped = ids.masked_fill(mask == 0, 50)
        G2 = layer0_rows(_grads_of_ids_masked(pm, (swapped, mask, labels)))
        if side == "right":
            assert input_span_residual(G, X[attended]) < 1e-5
            assert torch.allclose(G, G2, atol=1e-6)
        else:
            assert input_span_residual(G, X[attended]) > 1e-3
            assert not torch.allclose(G, G2, atol=1e-6)
