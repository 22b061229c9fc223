"""Self-Extend attention against independent references: the unpatched model, a naive per-pair loop, generation."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm.self_extend import (exact_binomial_ci, grouped_positions, heldout_perplexity, heldout_windows,
                                     learns_text_checkpoints, rope_scaled, self_extend_relative_positions,
                                     self_extended)
from reprolab.lm.tiny_llama import ANSWER, passkey_correct, passkey_example


def tiny_llama(attn="eager", max_pos=64, seed=0, sharp=8.0):
    """A random tiny Llama (GQA: 4 query heads, 2 key/value heads); q/k weights scaled by ``sharp`` so that attention
    is far from uniform and depends visibly on positions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_pos, rope_theta=10000.0,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharp)
            layer.self_attn.k_proj.weight.mul_(sharp)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [1, 5, 1000])
def test_group_size_one_is_the_original_attention(attn, window):
    model = tiny_llama(attn)
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with self_extended(model, 1, window):
            out = model(ids).logits
        after = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.equal(after, ref), "remove_self_extend must restore the original attention"


def test_grouping_changes_the_output_beyond_the_window():
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with self_extended(model, 4, 8):
            out = model(ids).logits
    assert torch.allclose(out[:, :8], ref[:, :8], atol=1e-5), "positions < W only see neighbour attention"
    assert not torch.allclose(out[:, 8:], ref[:, 8:], atol=1e-3)


@pytest.mark.parametrize("G,W", [(1, 3), (2, 4), (3, 4), (4, 8), (8, 6)])
def test_relative_positions_match_a_naive_loop(G, W):
    T = 37
    pos = torch.arange(T)
    rel = self_extend_relative_positions(pos, pos, G, W)
    for i in range(T):
        for j in range(T):
            expected = i - j if i - j < W else (i // G + W - W // G) - j // G
            assert rel[i, j].item() == expected, (i, j)
    gq, gk = grouped_positions(pos, pos, G, W)
    assert gq.tolist() == [i // G + W - W // G for i in range(T)] and gk.tolist() == [j // G for j in range(T)]
    # the grouped distances never exceed (T - 1) // G + W - W // G, which is what extends the context
    causal = rel[torch.tril(torch.ones(T, T, dtype=torch.bool))]
    assert causal.max().item() <= (T - 1) // G + W - W // G


def test_patched_attention_equals_a_naive_per_pair_computation():
    G, W, T = 3, 4, 21
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, T, 32)
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad(), self_extended(model, G, W):
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask, position_ids=pos)
    # naive: for every (i, j), rotate q_i by the Self-Extend relative position (RoPE: <R_a q, R_b k> = <R_{a-b} q, k>)
    d, H, Hkv = 8, 4, 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).double() / d))  # (d/2,)
    with torch.no_grad():
        q = attn.q_proj(x)[0].view(T, H, d).double()
        k = attn.k_proj(x)[0].view(T, Hkv, d).double()
        v = attn.v_proj(x)[0].view(T, Hkv, d).double()
        heads = torch.zeros(T, H, d, dtype=torch.float64)
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(T):
                logits = []
                for j in range(i + 1):
                    r = i - j if i - j < W else (i // G + W - W // G) - j // G
                    ang = r * inv_freq
                    c, s = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
                    qh = q[i, h]
                    q_rot = qh * c + torch.cat([-qh[d // 2:], qh[:d // 2]]) * s
                    logits.append(float(q_rot @ k[j, kv]) / math.sqrt(d))
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                heads[i, h] = (p[:, None] * v[:i + 1, kv]).sum(0)
        ref = attn.o_proj(heads.reshape(1, T, H * d).float())
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_cached_generation_matches_full_recompute():
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 30))
    with torch.no_grad(), self_extended(model, 4, 6):
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)[0, 30:]
        seq = ids
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert gen.tolist() == seq[0, 30:].tolist()


def test_dynamic_ntk_only_acts_beyond_the_trained_length():
    model = tiny_llama(max_pos=16)
    short, long = torch.randint(0, 61, (1, 16)), torch.randint(0, 61, (1, 40))
    with torch.no_grad():
        ref_s, ref_l = model(short).logits, model(long).logits
        with rope_scaled(model, {"rope_type": "dynamic", "factor": 2.0}):
            ntk_s, ntk_l = model(short).logits, model(long).logits
    assert torch.allclose(ntk_s, ref_s, atol=1e-6)
    assert not torch.allclose(ntk_l, ref_l, atol=1e-2)


def test_passkey_prompt_and_exact_match_scoring():
    rng = np.random.RandomState(0)
    text = "lorem ipsum dolor sit amet " * 40
    prompt, start = passkey_example(text, 300, 0.4, 54321, rng, "text")
    assert len(prompt) == 300 and prompt[start:] == ANSWER.format(key=54321) and prompt.count("54321") == 3
    ids = torch.tensor([list(prompt.encode()), list(prompt.encode())])
    ids[1, -1] = ord("0")  # a wrong last digit

    class Oracle(torch.nn.Module):  # predicts the true next byte of row 0 everywhere
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, use_cache=False):
            nxt = torch.cat([ids[0, 1:], ids[0, :1]])
            return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, 256).float()[None].expand(len(x), -1, -1))

    assert passkey_correct(Oracle(), ids, start).tolist() == [True, False]


def test_heldout_windows_draw_and_perplexity_reference():
    assert heldout_windows(10, 3, None) == [0, 1, 2] and heldout_windows(2, 5, None) == [0, 1]
    pick = heldout_windows(50, 8, seed=3)
    assert len(set(pick)) == 8 and all(0 <= i < 50 for i in pick) and pick == heldout_windows(50, 8, seed=3)
    assert pick != heldout_windows(50, 8, seed=4)
    # byte perplexity of the drawn windows equals a naive per-window computation
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    text = "".join(chr(32 + (7 * i) % 90) for i in range(16 * 20))
    L, n = 16, 3
    got = heldout_perplexity(model, None, text, L, n, seed=5)
    nll = 0.0
    with torch.no_grad():
        for i in heldout_windows(len(text) // L, n, 5):
            row = torch.tensor(list(text[i * L:(i + 1) * L].encode()))
            logits = model(row[None]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
    assert got == pytest.approx(math.exp(nll / (n * (L - 1))), rel=1e-5)


def test_pool_checkpoints_admits_by_in_length_accuracy():
    from reprolab.lm.self_extend import pool_checkpoints

    assert pool_checkpoints({"seed1": 0.9, "seed2": 1.0, "seed3": 0.1}, 0.8) == (["seed1", "seed2"], ["seed1", "seed2"])
    assert pool_checkpoints({"seed1": 0.8}, 0.8) == (["seed1"], ["seed1"])  # >= the bar
    assert pool_checkpoints({"seed0": 0.2, "seed4": 0.0}, 0.8) == ([], ["seed0", "seed4"])  # none: all, the gate fails


def test_admission_admits_exactly_the_checkpoints_whose_gate_value_passes():
    """Every declared checkpoint whose mean in-length accuracy is >= the bar is admitted, and no other: checked against
    a naive comparison on per-seed accuracies drawn like real ones (k correct of n prompts), ties at the bar included
    (a mean of values exactly at the bar can round below it in floating point)."""
    from reprolab.lm.self_extend import pool_checkpoints

    rng = np.random.default_rng(0)
    n_prompts, th = 20, 0.8
    for trial in range(200):
        k = rng.integers(1, 8)  # declared checkpoints
        acc = {f"seed{i}": [int(c) / n_prompts for c in rng.choice([0, 3, 15, 16, 17, 19, 20], size=3)]
               for i in range(k)}
        if trial % 5 == 0:  # exactly at the bar on every seed
            acc["seed0"] = [0.8, 0.8, 0.8]
        means = {c: float(np.mean(v)) for c, v in acc.items()}
        admitted, pooled = pool_checkpoints(means, th)
        naive = [c for c in acc if sum(round(a * n_prompts) for a in acc[c]) >= th * n_prompts * len(acc[c])]
        assert admitted == naive  # same order as declared
        assert pooled == (naive or list(acc))
        if trial % 5 == 0:
            assert "seed0" in admitted


def test_retrieving_per_seed_counts_checkpoints_at_the_bar():
    from reprolab.lm.self_extend import retrieving_per_seed

    acc = {"seed0": [1.0, 0.75, 0.8], "seed1": [0.0, 0.0, 0.85], "seed2": [0.95, 0.8, 0.1]}
    assert retrieving_per_seed(acc, 0.8) == [2, 1, 2]  # naive count per seed, 0.8 counts
    assert retrieving_per_seed({"a": [0.2, 0.3]}, 0.8) == [0, 0]
    with pytest.raises(ValueError):
        retrieving_per_seed({"a": [1.0, 1.0], "b": [1.0]}, 0.8)


def test_enough_checkpoints_gate_reads_not_testable_below_the_share():
    """The registry gate on the share of retrieving checkpoints: 2 of 7 on every seed passes 0.25, 1 of 7 fails
    (the passkey claims then read not testable here), a mix straddles (inconclusive)."""
    from reprolab.claims import Verdicts
    from reprolab.config import load_params

    cfg = load_params("self_extend", "quick")
    assert cfg["min_retrieving_share"] == 0.25 and len(cfg["pretrain"]["seeds"]) == 7
    status = {}
    for name, counts in (("two", [2, 2, 2]), ("one", [1, 1, 1]), ("mixed", [1, 3, 2])):
        v = Verdicts("self_extend", cfg)
        status[name] = v.gate("enough_checkpoints_retrieve", [n / 7 for n in counts])["status"]
        v.gate("retrieves_in_length", [1.0, 1.0, 0.95])
        v.gate("learns_text", [2.0, 2.1, 2.2], [4.0, 4.0, 4.0])
        for cid, vals in (("passkey_beyond_context", [0.95, 0.9, 0.92]), ("vanilla_fails_beyond_context", [0.0, 0.05, 0.0])):
            v.claim(cid, vals)
        v.claim("ppl_flat_beyond_context", [2.0, 2.1, 2.2], [2.0, 2.0, 2.1])
        verdict = v.finalize()["claims"]["passkey_beyond_context"]["verdict"]
        status[name] = (status[name], verdict)
    assert status == {"two": ("passed", "held"), "one": ("failed", "not testable here"),
                      "mixed": ("uncertain", "inconclusive")}


def test_tiny_llama_cli_trains_only_the_given_seeds(tmp_path, monkeypatch):
    """--seeds k replaces only seed<k>/ (the other checkpoints stay) and refuses seeds outside pretrain.seeds."""
    from reprolab.lm import tiny_llama

    small = dict(context=128, hidden=16, layers=1, heads=2, intermediate=32, steps=2, batch=2, lr=3e-3, warmup=2,
                 weight_decay=0.1, passkey_fraction=0.5, passkey_min_len=0, heldout_fraction=0.1, rope_theta=10000.0,
                 seed=0, seeds=[3, 4], threads=1)
    monkeypatch.setattr("reprolab.config.load_params", lambda paper, profile: {"pretrain": dict(small)})
    out = tmp_path / "tiny"
    (out / "seed9").mkdir(parents=True)
    (out / "seed9" / "keep").write_text("x")
    tiny_llama.main(["--out", str(out), "--seeds", "4"])
    assert sorted(p.name for p in out.iterdir()) == ["seed4", "seed9"]
    assert json.loads((out / "seed4" / "pretrain.json").read_text())["pretrain"]["seed"] == 4
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(SystemExit):
        tiny_llama.main(["--out", str(out), "--seeds", "5"])


def test_tiny_llama_checkpoints_do_not_depend_on_the_other_seeds(tmp_path, monkeypatch):
    """The stage trains one checkpoint per pre-training seed; each must equal a lone run of that seed."""
    from reprolab.lm import tiny_llama

    cfg = dict(context=128, hidden=16, layers=1, heads=2, intermediate=32, steps=2, batch=2, lr=3e-3, warmup=2,
               weight_decay=0.1, passkey_fraction=0.5, passkey_min_len=0, heldout_fraction=0.1, rope_theta=10000.0)
    torch.set_num_threads(1)
    tiny_llama.pretrain_checkpoint(cfg, 5, tmp_path / "a" / "seed5")
    tiny_llama.pretrain_checkpoint(cfg, 7, tmp_path / "b" / "seed7")
    tiny_llama.pretrain_checkpoint(cfg, 5, tmp_path / "b" / "seed5")
    a = (tmp_path / "a" / "seed5" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "seed5" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "b" / "seed7" / "model.safetensors").read_bytes()
    info = json.loads((tmp_path / "b" / "seed7" / "pretrain.json").read_text())
    assert info["pretrain"]["seed"] == 7 and 0.0 <= info["passkey_acc_in_length"] <= 1.0


def test_exact_binomial_ci_matches_beta_quantiles_and_the_review_numbers():
    from scipy.stats import beta

    for k, n in [(57, 60), (19, 20), (0, 20), (20, 20), (3, 10)]:
        lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)  # Clopper-Pearson from the beta distribution
        hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
        assert exact_binomial_ci(k, n) == pytest.approx([lo, hi], abs=1e-9)
    assert [round(v, 3) for v in exact_binomial_ci(57, 60)] == [0.861, 0.990]
    assert [round(v, 3) for v in exact_binomial_ci(19, 20)] == [0.751, 0.999]


def test_learns_text_checkpoints_pass_only_below_the_unigram_on_every_seed():
    ref = [10.0, 20.0]
    passing, pooled = learns_text_checkpoints({"a": [5.0, 5.0], "b": [5.0, 20.0], "c": [9.9, 19.9]}, ref)
    assert passing == ["a", "c"] and pooled == ["a", "c"]
    passing, pooled = learns_text_checkpoints({"a": [11.0, 5.0], "b": [10.0, 25.0]}, ref)
    assert passing == [] and pooled == ["a", "b"]
