"""MoS (arXiv 2410.00938): shard gathering, routing, MoS == LoRA at full privatisation, peft's LoRA delta, counts.

A tiny random Llama stands in for SmolLM2 so that the file runs in seconds; the notebook uses the real model.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm.mos_lora import (TARGETS, MoSLinear, ShardPool, apply_mos, apply_pure_sharing, build_arm,
                                  gather_shards, heldout_loss, hidden_at, lora_param_count, mos_indices, top_model)
from reprolab.lm.offsite import decoder_block_list

V = 97


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def official_transform_chunks(mat, mask, l):
    """modules/Tied_LoRA.py::transform_chunks, verbatim in logic."""
    mat = mat[mask]
    return torch.cat([mat[i::l] for i in range(l)], dim=1)


def test_gather_shards_matches_official_and_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(24, 5, generator=g)
    for l, r in ((1, 6), (2, 4), (3, 5), (4, 6)):
        idx = torch.randperm(24, generator=g)[: r * l]
        got = gather_shards(pool, idx, l)
        assert got.shape == (r, 5 * l)
        assert torch.equal(got, official_transform_chunks(pool, idx, l))
        for j in range(r):  # naive: vector j = shards idx[j*l .. j*l+l-1] side by side
            ref = torch.cat([pool[int(idx[j * l + i])] for i in range(l)])
            assert torch.equal(got[j], ref)


def test_routing_subset_private_and_dissociation():
    L, r, l, valid_r, p = 6, 3, 2, 2, 1
    g = torch.Generator().manual_seed(0)
    n_pool = valid_r * L * l
    private_start = n_pool - p * L
    seen_private = []
    for layer in range(L):
        a = mos_indices(layer, L, r, l, valid_r, p, g)
        b = mos_indices(layer, L, r, l, valid_r, p, g)
        assert len(a) == r * l and len(set(a.tolist())) == r * l  # without replacement
        assert a[-p:].tolist() == list(range(private_start + layer * p, private_start + (layer + 1) * p))
        assert torch.equal(a[-p:], b[-p:])  # the private shards are the layer's own, for A and B
        assert (a[:-p] < private_start).all() and (b[:-p] < private_start).all()  # shared from the shared part
        seen_private += a[-p:].tolist()
    assert len(set(seen_private)) == L * p  # no two layers share a private shard
    # pair dissociation: A's and B's shared draws differ (for some layer)
    g = torch.Generator().manual_seed(1)
    draws = [(mos_indices(i, L, r, l, valid_r, p, g), mos_indices(i, L, r, l, valid_r, p, g)) for i in range(L)]
    assert any(not torch.equal(a, b) for a, b in draws)
    with pytest.raises(ValueError):
        mos_indices(0, 2, 8, 2, 1, 1, g)  # a layer needs more shared shards than the pool holds


def test_mos_with_full_private_routing_equals_peft_lora():
    """valid_r = r and every shard private (p = r * l): each layer owns r whole vectors, i.e. plain LoRA of rank r."""
    model = tiny_llama()
    r, l, alpha = 2, 2, 8.0
    mos = copy.deepcopy(model)
    pools = apply_mos(decoder_block_list(mos), r=r, l=l, valid_r=r, p=r * l, alpha=alpha, dropout=0.0, seed=0)
    for pool in pools.values():
        torch.nn.init.normal_(pool.B, std=0.1)  # non-zero B so that the delta is not trivially 0
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                 target_modules=list(TARGETS)))
    for (i, block), pblock in zip(enumerate(decoder_block_list(mos)), decoder_block_list(peft_model.base_model.model)):
        for name in TARGETS:
            m = getattr(block.self_attn, name, None) or getattr(block.mlp, name)
            pl = getattr(pblock.self_attn, name, None) or getattr(pblock.mlp, name)
            assert isinstance(m, MoSLinear)
            assert m.idx_A.tolist() == list(range(i * r * l, (i + 1) * r * l))  # the layer's own block of the pool
            A, B = m.low_rank()
            with torch.no_grad():
                pl.lora_A["default"].weight.copy_(A)  # (r, d_in)
                pl.lora_B["default"].weight.copy_(B.t())  # (d_out, r)
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_mos, out_peft = mos(x).logits, peft_model(input_ids=x).logits
        assert not torch.allclose(out_mos, model(x).logits, atol=1e-4)  # the adapters do change the output
    assert torch.allclose(out_mos, out_peft, atol=1e-6, rtol=0)


def test_mos_forward_is_base_plus_scaled_BA():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False)
    pool = ShardPool(10, 8, 6, 2)
    torch.nn.init.normal_(pool.B, generator=g)
    idx_A, idx_B = torch.randperm(10, generator=g)[:6], torch.randperm(10, generator=g)[:6]
    m = MoSLinear(base, pool, idx_A, idx_B, r=3, alpha=6.0)
    x = torch.randn(4, 8, generator=g)
    A = torch.stack([torch.cat([pool.A[idx_A[2 * j]], pool.A[idx_A[2 * j + 1]]]) for j in range(3)])  # (3, 8)
    B = torch.stack([torch.cat([pool.B[idx_B[2 * j]], pool.B[idx_B[2 * j + 1]]]) for j in range(3)])  # (3, 6)
    ref = base(x) + x @ A.t() @ B * (6.0 / 3)
    assert torch.allclose(m(x), ref, atol=1e-6)
    assert torch.allclose(m.delta_weight(), B.t() @ A * 2.0, atol=1e-6)
    # the pools receive the gradient of every layer that uses them (sharing)
    m(x).sum().backward()
    assert pool.A.grad is not None and pool.A.grad[idx_A].abs().sum() > 0
    unused = sorted(set(range(10)) - set(idx_A.tolist()))
    assert pool.A.grad[unused].abs().sum() == 0


def test_mos_init_zero_delta_and_A_bound():
    model = tiny_llama()
    blocks = decoder_block_list(copy.deepcopy(model))
    pools = apply_mos(blocks, r=2, l=2, valid_r=1, p=1, alpha=16, dropout=0.0, seed=0)
    for name, pool in pools.items():
        assert torch.count_nonzero(pool.B) == 0  # delta starts at 0 (B = 0), as LoRA
        d_in = pool.A.shape[1] * pool.l
        assert pool.A.abs().max() <= 1 / d_in ** 0.5  # kaiming-uniform(a=sqrt 5) bound with the whole-vector fan


def test_peft_lora_delta_is_B_A_x_scaling():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=False))
    pm = get_peft_model(copy.deepcopy(lin), LoraConfig(r=3, lora_alpha=12, lora_dropout=0.0, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(pm(x), lin(x) + x @ A.t() @ B.t() * (12 / 3), atol=1e-5)


def test_parameter_counts_match_hand_count():
    model = tiny_llama()
    top = top_model(model, 3)
    d, f, kv = 32, 48, 16  # hidden, intermediate, k/v width (2 kv heads x 8)
    per_rank_per_layer = (d + d) + (d + kv) * 2 + (d + d) + 2 * (d + f) + (f + d)  # q, k, v, o, gate, up, down
    cfg = {"lora_alpha": 16, "lora_dropout": 0.0, "lora_r": 8, "mos_valid_r": 1, "n_top": 3, "mos_r": 2, "mos_l": 2,
           "mos_private": 1}
    count = {arm: sum(p.numel() for p in build_arm(top, arm, cfg, seed=0)[1])
             for arm in ("lora_full", "lora_equal", "pure_shared", "mos")}
    assert count["lora_full"] == 8 * 3 * per_rank_per_layer
    assert count["lora_equal"] == 1 * 3 * per_rank_per_layer
    assert count["pure_shared"] == count["mos"] == count["lora_equal"]  # equal-parameter arms
    assert count["mos"] * 8 == count["lora_full"]
    dims = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)] * 3
    assert lora_param_count(dims, 8) == count["lora_full"]


def test_pure_sharing_uses_one_pair_everywhere():
    blocks = decoder_block_list(copy.deepcopy(tiny_llama()))
    pools = apply_pure_sharing(blocks, rank=4, alpha=8, dropout=0.0)
    torch.nn.init.normal_(pools["q_proj"].B)
    deltas = [b.self_attn.q_proj.delta_weight() for b in blocks]
    assert all(torch.equal(deltas[0], w) for w in deltas[1:])


def test_top_model_on_cached_states_is_exact():
    model = tiny_llama()
    x = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    top = top_model(model, 2)
    h = hidden_at(model, x, layer=2)  # entering block 2 of 4
    with torch.no_grad():
        full = model(x).logits
        got = top(inputs_embeds=h).logits
    assert torch.allclose(full, got, atol=1e-5)
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)).item()
    assert abs(heldout_loss(top, h, x) - ref) < 1e-5
    assert all(not p.requires_grad for p in top.parameters())


def test_apply_mos_routing_dissociated_private_and_seeded():
    """Through apply_mos / build_arm (what the notebook runs): A and B are routed separately (pair dissociation), the
    private tails are the layer's own and the same for A and B, and each seed draws its own routing."""
    model = tiny_llama()
    top = top_model(model, 4)
    cfg = {"lora_alpha": 16, "lora_dropout": 0.0, "lora_r": 8, "mos_valid_r": 1, "n_top": 4, "mos_r": 2, "mos_l": 2,
           "mos_private": 1}

    def routing(seed):
        m, _ = build_arm(top, "mos", cfg, seed=seed)
        return [(mod.idx_A.clone(), mod.idx_B.clone()) for mod in m.modules() if isinstance(mod, MoSLinear)]

    r0, r1 = routing(0), routing(1)
    assert len(r0) == 4 * len(TARGETS)
    assert any(not torch.equal(a[:-1], b[:-1]) for a, b in r0)  # A and B draw different shared shards somewhere
    for k, (a, b) in enumerate(r0):
        layer = k // len(TARGETS)
        private_start = 1 * 4 * 2 - 1 * 4
        assert a[-1].item() == b[-1].item() == private_start + layer  # the layer's own private shard
    assert any(not torch.equal(a0, a1) for (a0, _), (a1, _) in zip(r0, r1))  # the routing depends on the seed
    assert routing(0)[0][0].tolist() == r0[0][0].tolist()  # and is reproducible
