"""LLM-QFA (arXiv 2405.20202): group fake quant, decoupled QA-LoRA, the scheduler, the exact cached-block shortcut.

A tiny random Llama stands in for SmolLM2 so that the file runs in seconds; the notebook uses the real model.
"""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm import perplexity
from reprolab.paths import REPO_ROOT
from reprolab.quant.llm_qfa import (ConfigSampler, QFALinear, QFASupernet, average_bits, cache_hidden, layer_probs,
                                    mean_bits_distribution, named_config, perplexity_cached, schedule_mu,
                                    train_supernet)

V = 97


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def naive_group_quant(w, n_bits, g):
    """Per row, per group of g columns, element by element: asymmetric min-max grid holding 0."""
    out = torch.empty_like(w)
    maxq = 2 ** n_bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], g):
            vals = [float(v) for v in w[r, g0:g0 + g]]
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            scale = torch.tensor((hi - lo) / maxq)
            zero = torch.round(torch.tensor(-lo) / scale)
            for c in range(g0, g0 + g):
                out[r, c] = scale * (min(max(torch.round(w[r, c] / scale) + zero, 0), maxq) - zero)
    return out


def naive_forward(lin: QFALinear, x, bit):
    """y = x W_q^T + b + s * B A (group means of x), with loops over the groups."""
    y = x @ getattr(lin, f"wq{bit}").T
    i = lin.adapter_index(bit)
    A, B = lin.lora_A[i], lin.lora_B[i]
    pooled = torch.stack([x[..., k:k + lin.group_size].mean(-1) for k in range(0, x.shape[-1], lin.group_size)], -1)
    return y + lin.scaling * (pooled @ A.T @ B.T)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_fake_quant_matches_naive_loop(bits):
    lin = torch.nn.Linear(16, 5, bias=False)
    q = QFALinear(lin, bits=(2, 3, 4), group_size=4, r=2)
    ref = naive_group_quant(lin.weight.detach(), bits, 4)
    assert torch.allclose(getattr(q, f"wq{bits}"), ref, atol=1e-6)
    for r in range(5):
        for g0 in range(0, 16, 4):
            assert len(torch.unique(ref[r, g0:g0 + 4])) <= 2 ** bits


def test_decoupled_lora_picks_the_layer_bit_adapter_and_shared_does_not():
    torch.manual_seed(1)
    lin = torch.nn.Linear(8, 6)
    q = QFALinear(lin, bits=(2, 3, 4), group_size=4, r=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    for i in range(3):  # give every adapter distinct non-zero B
        q.lora_B[i].data = torch.randn(6, 3) * (i + 1)
    x = torch.randn(2, 5, 8)
    outs = {}
    for b in (2, 3, 4):
        q.bit = b
        outs[b] = q(x)
        assert torch.allclose(outs[b], naive_forward(q, x, b) + lin.bias, atol=1e-5)
    # different bits use different adapters: replacing the 3-bit adapter changes only the 3-bit output
    q.lora_B[1].data.zero_()
    q.bit = 2
    assert torch.allclose(q(x), outs[2])
    q.bit = 3
    assert torch.allclose(q(x), x @ q.wq3.T + lin.bias, atol=1e-5)
    # shared: the same adapter at every bit width
    s = QFALinear(lin, bits=(2, 3, 4), group_size=4, r=3, alpha=6.0, shared=True)
    assert len(s.lora_A) == 1 and len(q.lora_A) == 3
    assert {s.adapter_index(b) for b in (2, 3, 4)} == {0}
    # fp32 when no bit is set
    q.bit = None
    assert torch.allclose(q(x), lin(x), atol=1e-6)


def test_merge_into_zero_points_is_exact():
    """QA-LoRA merge: the adapter folded into each group's offset gives the same output; the grid keeps 2^b levels
    per group (a constant shift)."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(16, 4, bias=False)
    q = QFALinear(lin, bits=(2, 3, 4), group_size=4, r=2, alpha=4.0)
    q.lora_B[0].data = torch.randn(4, 2)
    q.bit = 2
    x = torch.randn(3, 16)
    w = q.merged_weight(2)
    assert torch.allclose(q(x), x @ w.T, atol=1e-5)
    for r in range(4):
        for g0 in range(0, 16, 4):
            assert len(torch.unique(w[r, g0:g0 + 4])) <= 4


def test_training_touches_only_the_active_adapters():
    model = tiny_llama()
    ids = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))
    h = cache_hidden(model, ids, n_top=1)
    net = QFASupernet(model, 1, bits=(2, 3, 4), group_size=8, r=2, alpha=2.0, seed=0)
    before = [p.detach().clone() for p in net.lora_parameters()]
    sampler = ConfigSampler("fixed", len(net.layers), (2, 3, 4), 3, config=[2] * len(net.layers))
    train_supernet(net, h, ids, sampler, 3, 2, 1e-2, seed=0)
    after = net.lora_parameters()
    for q_i, q in enumerate(net.layers):
        for bit_i in range(3):
            a0, b0 = before[q_i * 6 + bit_i], before[q_i * 6 + 3 + bit_i]
            a1, b1 = after[q_i * 6 + bit_i], after[q_i * 6 + 3 + bit_i]
            changed = not torch.equal(b0, b1)
            assert changed == (bit_i == 0), (q_i, bit_i)  # only the 2-bit adapters moved
            if bit_i:
                assert torch.equal(a0, a1)


def test_shared_arm_differs_only_by_sharing():
    """Same init draw for the first adapter, same sampled configurations, same batches."""
    model = tiny_llama()
    d = QFASupernet(model, 1, group_size=8, r=2, seed=3)
    s = QFASupernet(model, 1, group_size=8, r=2, shared=True, seed=3)
    assert d.layer_names == s.layer_names
    for qd, qs in zip(d.layers, s.layers):
        assert torch.equal(qd.lora_A[0], qs.lora_A[0]) and torch.equal(qd.wq2, qs.wq2)
        assert qd.scaling == qs.scaling and not qd.shared and qs.shared
    sa = ConfigSampler("scheduled", len(d.layers), n_steps=6, seed=5)
    sb = ConfigSampler("scheduled", len(s.layers), n_steps=6, seed=5)
    assert [sa.sample(t) for t in range(6)] == [sb.sample(t) for t in range(6)]


def test_cached_top_blocks_equal_full_model():
    model = tiny_llama()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    for n_top in (1, 2, 3):
        net = QFASupernet(model, n_top, group_size=8, r=2)
        net.set_config(None)
        h = cache_hidden(model, ids, n_top)
        with torch.no_grad():
            assert torch.allclose(net(h).logits, model(ids).logits, atol=1e-5)
        ref = perplexity(model, ids.reshape(1, -1), 16)
        assert math.isclose(perplexity_cached(net, h, ids), ref, rel_tol=1e-5)


def test_untrained_supernet_is_the_quantized_model():
    model = tiny_llama()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    net = QFASupernet(model, 2, group_size=8, r=2)
    h = cache_hidden(model, ids, 2)
    cfg = [2] * len(net.layers)
    net.set_config(cfg)
    with_lora = perplexity_cached(net, h, ids)
    net.set_config(cfg, use_lora=False)
    assert with_lora == perplexity_cached(net, h, ids)  # B = 0 at init


def test_scheduler_frequencies_match_exact_rule():
    bits = (2, 3, 4)
    # the target: a triangle wave 2 -> 4 -> 2
    assert schedule_mu(0, 8) == 2.0 and schedule_mu(4, 8) == 4.0 and schedule_mu(2, 8) == 3.0
    assert schedule_mu(6, 8) == 3.0 and schedule_mu(4, 8, n_cycles=2) == 2.0
    mu, sigma = 2.6, 0.5
    w = [math.exp(-(b - mu) ** 2 / (2 * sigma ** 2)) for b in bits]
    exact = torch.tensor([x / sum(w) for x in w], dtype=torch.float64)
    assert torch.allclose(layer_probs(mu, bits, sigma), exact)
    # empirical per-layer frequencies at a fixed step vs the exact law
    n_steps, step = 10, 3
    s = ConfigSampler("scheduled", 20, bits, n_steps, seed=0, sigma=sigma)
    p = layer_probs(schedule_mu(step, n_steps), bits, sigma)
    draws = torch.tensor([s.sample(step) for _ in range(2000)])  # (2000, 20)
    freq = torch.tensor([(draws == b).double().mean() for b in bits])
    assert torch.allclose(freq, p, atol=0.01)
    # distribution of the mean bit width (uniform sampling): exact DP vs brute-force enumeration for 3 layers
    p_u = torch.full((3,), 1 / 3, dtype=torch.float64)
    d = mean_bits_distribution(p_u, 3, bits)
    brute = {}
    for a in bits:
        for b in bits:
            for c in bits:
                brute[(a + b + c) / 3] = brute.get((a + b + c) / 3, 0) + 1 / 27
    assert d.keys() == brute.keys() and all(math.isclose(d[k], brute[k]) for k in d)
    # uniform sampling starves the extremes relative to the scheduler (28 layers, as quick)
    du = mean_bits_distribution(p_u, 28, bits)
    ds = mean_bits_distribution(layer_probs(2.0, bits, sigma), 28, bits)
    assert sum(v for k, v in du.items() if k <= 2.25) < 1e-3 < sum(v for k, v in ds.items() if k <= 2.25)
    # uniform sampler frequencies
    su = ConfigSampler("uniform", 10, bits, 5, seed=1)
    du_draws = torch.tensor([su.sample(0) for _ in range(1000)])
    assert all(abs((du_draws == b).double().mean().item() - 1 / 3) < 0.02 for b in bits)


def test_named_configs_and_average_bits():
    names = ["0.q_proj", "0.k_proj", "0.gate_proj", "0.down_proj"]
    assert named_config("uniform3", names) == [3, 3, 3, 3]
    assert named_config("attn4_mlp2", names) == [4, 4, 2, 2]
    assert named_config("attn2_mlp4", names) == [2, 2, 4, 4]
    assert average_bits([2, 4], [1, 3]) == 3.5
    with pytest.raises(ValueError):
        named_config("attn5", names)


def test_parameters_cell_is_tagged():
    nb = json.loads((REPO_ROOT / "notebooks" / "llm_qfa.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "profile" in "".join(tagged[0]["source"])


def test_bad_params_rejected():
    from reprolab.config import ParamError, load_params, read_params
    params = read_params()
    params["llm_qfa"] = {**params["llm_qfa"], "configs": ["uniform5"]}
    with pytest.raises(ParamError):
        load_params("llm_qfa", "smoke", params)


def test_inactive_adapters_stay_untouched_after_use():
    """An adapter trained earlier must not move while its bit width is inactive (no Adam-momentum drift)."""
    model = tiny_llama()
    ids = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))
    h = cache_hidden(model, ids, n_top=1)
    net = QFASupernet(model, 1, bits=(2, 3, 4), group_size=8, r=2, alpha=2.0, seed=0)
    n = len(net.layers)

    class TwoPhase(ConfigSampler):  # 2 steps at 2 bits, then 3 steps at 3 bits
        def sample(self, step):
            return [2] * n if step < 2 else [3] * n

    snap = {}
    train_supernet(net, h, ids, TwoPhase("uniform", n), 5, 2, 1e-2, seed=0,
                   eval_fn=lambda m: snap.setdefault("b2", [q.lora_B[0].detach().clone() for q in m.layers]),
                   eval_steps=(2,))
    for q, b2 in zip(net.layers, snap["b2"]):
        assert not torch.equal(b2, torch.zeros_like(b2))  # the 2-bit adapter did train in phase 1
        assert torch.equal(q.lora_B[0], b2)  # ... and stayed put during the 3-bit steps
        assert not torch.equal(q.lora_B[1], torch.zeros_like(q.lora_B[1]))


def test_fixed_sampler_returns_its_config():
    cfg = [2, 3, 4, 4, 2]
    s = ConfigSampler("fixed", 5, (2, 3, 4), 4, seed=0, config=cfg)
    assert all(s.sample(t) == cfg for t in range(4))


def test_mid_run_evaluation_does_not_change_training():
    """The checkpoint of the convergence gate: same losses with and without it; its value = a run stopped there."""
    model = tiny_llama()
    ids = torch.randint(0, V, (6, 8), generator=torch.Generator().manual_seed(4))
    h = cache_hidden(model, ids, n_top=1)

    def run(steps, with_eval):
        net = QFASupernet(model, 1, bits=(2, 3, 4), group_size=8, r=2, alpha=2.0, seed=1)
        cfg = [2] * len(net.layers)
        sampler = ConfigSampler("fixed", len(net.layers), (2, 3, 4), steps, config=cfg)

        def ev(m):
            m.set_config(cfg)
            return perplexity_cached(m, h, ids)
        log = train_supernet(net, h, ids, sampler, steps, 2, 1e-2, seed=7, eval_fn=ev if with_eval else None,
                             eval_steps=(2,))
        net.set_config(cfg)
        return log, perplexity_cached(net, h, ids)

    full, ppl_full = run(4, True)
    plain, ppl_plain = run(4, False)
    short, ppl_short = run(2, False)
    assert full["loss"] == plain["loss"] and ppl_full == ppl_plain
    assert full["evals"][2] == ppl_short and 2 not in plain["evals"]
