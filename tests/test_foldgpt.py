"""FoldGPT (arXiv 2407.00928): block removal, folding, ShortGPT's BI, gates and the polarisation penalty.

A tiny random Llama stands in for SmolLM2 so that the file runs in seconds; the notebook uses the real model.
"""
import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm.foldgpt import (GatedBlock, block_influences, build_foldgpt, finetune, fold_blocks, last_block_states,
                                 lowest, norm_params, polarization_penalty, remove_blocks, share_groups, train_gates,
                                 unique_param_count)
from reprolab.lm.offsite import decoder_block_list

V = 101


def tiny_llama(n_layers=5, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, use_cache=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them differ per block so a shared norm would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, L)


def test_removal_equals_a_model_built_without_those_blocks(x):
    model = tiny_llama(5)
    keep = [0, 2, 4]
    cut = remove_blocks(model, [1, 3])
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    ref = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in keep:
                sd[k.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)] = v
        else:
            sd[k] = v
    ref.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(cut(x).logits, ref(x).logits)
        assert not torch.equal(cut(x).logits, model(x).logits)
    assert len(decoder_block_list(model)) == 5, "the original model is untouched"


def test_folding_identical_weights_reproduces_the_output_exactly(x):
    model = tiny_llama(4)
    blocks = decoder_block_list(model)
    with torch.no_grad():  # block 2 gets block 1's attention + MLP weights, but keeps its own (different) RMSNorms
        blocks[2].self_attn.load_state_dict(blocks[1].self_attn.state_dict())
        blocks[2].mlp.load_state_dict(blocks[1].mlp.state_dict())
        ref = model(x).logits
    n0 = unique_param_count(model)
    folded = fold_blocks(copy.deepcopy(model), [[1, 2]])
    fb = decoder_block_list(folded)
    assert fb[2].self_attn is fb[1].self_attn and fb[2].mlp is fb[1].mlp
    assert fb[2].input_layernorm is not fb[1].input_layernorm
    with torch.no_grad():
        assert torch.equal(folded(x).logits, ref)
    saved = sum(p.numel() for p in blocks[1].self_attn.parameters()) + sum(p.numel() for p in blocks[1].mlp.parameters())
    assert n0 - unique_param_count(folded) == saved


def test_folding_different_weights_changes_output_and_shares_the_first(x):
    model = tiny_llama(4)
    folded = fold_blocks(copy.deepcopy(model), [[1, 2]])
    with torch.no_grad():
        assert not torch.equal(folded(x).logits, model(x).logits)
    assert torch.equal(decoder_block_list(folded)[2].mlp.down_proj.weight,
                       decoder_block_list(model)[1].mlp.down_proj.weight)


def naive_bi(model, batches):
    """Per block: a Python loop over tokens of 1 - cos(block input, block output); the last block's output through the
    final norm (what HF's hidden_states hold, and what the official code uses)."""
    blocks = decoder_block_list(model)
    store = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(k, (i[0], o)))
             for k, b in enumerate(blocks)]
    bi = [0.0] * len(blocks)
    with torch.no_grad():
        for x in batches:
            model(x)
            for k in range(len(blocks)):
                h_in, h_out = store[k]
                if k == len(blocks) - 1:
                    h_out = model.model.norm(h_out)
                for b in range(x.shape[0]):
                    for t in range(x.shape[1]):
                        u, v = h_in[b, t].tolist(), h_out[b, t].tolist()
                        dot = sum(a * c for a, c in zip(u, v))
                        cos = dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v)))
                        bi[k] += 1 - cos
    for h in hooks:
        h.remove()
    return bi


def test_block_influence_matches_a_naive_cosine_loop(x):
    model = tiny_llama(4)
    batches = [x, x.flip(1)]
    got, ref = block_influences(model, batches), naive_bi(model, batches)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert lowest(got, 2) == sorted(sorted(range(4), key=lambda i: ref[i])[:2])


def test_polarization_penalty_hand_values():
    g = torch.tensor([1.0, 0.0, 0.5, 0.5])
    # ||g||_1 = 2, mean = 0.5, ||g - mean||_1 = 0.5 + 0.5 + 0 + 0 = 1
    assert polarization_penalty(g, 1.2).item() == pytest.approx(1.2 * 2 - 1.0)
    assert polarization_penalty(torch.tensor([0.3, 0.3]), 2.0).item() == pytest.approx(1.2)
    # pushing one gate to 0 and one to 1 (same L1 norm) LOWERS the penalty: polarisation is rewarded
    assert polarization_penalty(torch.tensor([0.0, 0.6]), 1.0) < polarization_penalty(torch.tensor([0.3, 0.3]), 1.0)


def test_gated_block_identity_and_removal(x):
    model = tiny_llama(4)
    blocks = decoder_block_list(model)
    with torch.no_grad():
        ref = model(x).logits
        gates = torch.nn.Parameter(torch.ones(4))
        model.model.layers = torch.nn.ModuleList([GatedBlock(b, gates, i) for i, b in enumerate(blocks)])
        assert torch.allclose(model(x).logits, ref, atol=1e-6)
        gates[2] = 0.0
        gated0 = model(x).logits
        model.model.layers = blocks
        assert torch.allclose(gated0, remove_blocks(model, [2])(x).logits, atol=1e-6)


def test_train_gates_learns_and_restores_the_model(x):
    model = tiny_llama(4)
    with torch.no_grad():
        ref = model(x).logits
    log = train_gates(model, [x] * 3, lr=0.1, lam=1.0, t=1.2)
    assert len(log["gates"]) == 4 and all(0.0 <= g <= 1.0 for g in log["gates"])
    assert any(g < 1.0 for g in log["gates"]), "the penalty must move the gates"
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in decoder_block_list(model))
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_share_groups_rule():
    gates = [1.0, 0.2, 0.3, 0.9, 0.1, 0.15, 1.0]
    survivors = [0, 1, 2, 3, 5, 6]  # block 4 removed
    # consecutive windows (positions) with mean gate: (0,1) .6, (1,2) .25, (2,3) .6, (3,4) .525, (4,5) .575
    assert share_groups(gates, survivors, 1) == [[1, 2]]
    assert share_groups(gates, survivors, 2) == [[1, 2], [3, 4]]
    assert share_groups(gates, survivors, 0) == []
    with pytest.raises(ValueError):
        share_groups(gates, survivors, 4)
    model = tiny_llama(7)
    folded, removed, groups = build_foldgpt(model, gates, 1, 2)
    assert removed == [4] and groups == [[1, 2], [3, 5]]
    assert len(decoder_block_list(folded)) == 6


def test_finetune_trains_only_norms_and_distils(x):
    model = tiny_llama(4)
    student = remove_blocks(model, [1])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    targets = last_block_states(model, [x, x])
    log = finetune(student, [x, x], targets, lr=1e-2, kd_weight=1.0)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("norm" in n for n in changed)
    assert log["trainable_params"] == sum(p.numel() for p in norm_params(student))
    assert len(log["kd_loss"]) == 2 and log["kd_loss"][0] > 0
    # the targets are the teacher's own last-block states: distilling the teacher to itself costs 0
    own = copy.deepcopy(model)
    log0 = finetune(own, [x], last_block_states(model, [x]), lr=0.0 + 1e-12, kd_weight=1.0)
    assert log0["kd_loss"][0] == pytest.approx(0.0, abs=1e-10)


def test_polarization_penalty_reaches_the_gates(x):
    """The penalty is part of the gate loss: with the same batches, lambda > 0 moves the gates differently from 0."""
    model = tiny_llama(4)
    g0 = train_gates(model, [x] * 3, lr=0.05, lam=0.0, t=1.2)["gates"]
    g1 = train_gates(model, [x] * 3, lr=0.05, lam=5.0, t=1.2)["gates"]
    assert g0 != g1
    assert sum(g1) < sum(g0), "a large L1-dominated penalty (t > 1) must push the gates down"


def test_gates_are_projected_to_the_unit_interval(x):
    """A penalty that pushes every gate up (negative lambda) must leave them clamped at exactly 1."""
    model = tiny_llama(4)
    g = train_gates(model, [x] * 2, lr=0.5, lam=-10.0, t=1.2)["gates"]
    assert max(g) == 1.0 and min(g) >= 0.0


def test_finetune_uses_the_lm_loss_and_each_batch_s_own_target(x):
    from reprolab.lm.offsite import kd_loss
    model = tiny_llama(4)
    # LM loss alone (no distillation) must train the norms
    student = remove_blocks(model, [1])
    before = [p.detach().clone() for p in norm_params(student)]
    finetune(student, [x], None, lr=1e-2, kd_weight=0.0)
    assert any(not torch.equal(p, b) for p, b in zip(norm_params(student), before))
    # the kd term of step i compares with the teacher state of batch i (not batch 0): lr ~ 0 keeps the student fixed
    xb = torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(7))
    student = remove_blocks(model, [1])
    targets = last_block_states(model, [x, xb])
    log = finetune(student, [x, xb], targets, lr=1e-12, kd_weight=1.0)
    ref = [kd_loss(t.float(), s.float()).item() for t, s in zip(targets, last_block_states(student, [x, xb]))]
    assert log["kd_loss"] == pytest.approx(ref, rel=1e-5)
