"""Offsite-Tuning (arXiv 2302.04870): emulator construction, adapter plug-in, gradient isolation, KD loss.

A tiny random Llama (8 blocks) stands in for SmolLM2 so that the file runs in seconds; the notebook uses the real model.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprolab.lm.offsite import (adapter_blocks, build_emulator, decoder_block_list, emulator_blocks, kd_loss,
                                 lm_batches, plug_in, saved_activation_bytes, set_trainable, split_blocks, train_lm,
                                 training_state_bytes, uniform_choose_layers)

N_LAYERS, L_PAD, R_PAD = 8, 2, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, L)


def test_uniform_choose_layers_matches_official_rule():
    # official: stride = (n - 1) / (k - 1); keep round(i * stride) -- Python's round (banker's) as upstream
    assert uniform_choose_layers(26, 9) == [0, 3, 6, 9, 12, 16, 19, 22, 25]
    assert uniform_choose_layers(20, 8) == [round(i * 19 / 7) for i in range(8)]
    assert uniform_choose_layers(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_choose_layers(7, 1) == [0]
    with pytest.raises(ValueError):
        uniform_choose_layers(4, 5)
    assert split_blocks(30, 2, 2) == ([0, 1], list(range(2, 28)), [28, 29])


def test_emulator_keeps_the_right_blocks(model):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=3)
    middle = list(range(L_PAD, N_LAYERS - R_PAD))  # [2, 3, 4, 5]
    assert emu.offsite["kept"] == [middle[0], middle[2], middle[3]]  # round(i * 1.5) = 0, 2, 3 (round(1.5)=2)
    full, blocks = decoder_block_list(model), decoder_block_list(emu)
    expected = [0, 1] + emu.offsite["kept"] + [6, 7]
    assert len(blocks) == len(expected) == emu.config.num_hidden_layers
    for b, i in zip(blocks, expected):
        for (n, p), (_, q) in zip(b.named_parameters(), full[i].named_parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n  # a copy, not the owner's tensor
    assert model.config.num_hidden_layers == N_LAYERS  # the owner's model is untouched


def test_emulator_without_drop_equals_full_model(model, x):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=N_LAYERS - L_PAD - R_PAD)  # drop ratio 0
    with torch.no_grad():
        assert torch.equal(emu(x).logits, model(x).logits)
        dropped = build_emulator(model, L_PAD, R_PAD, n_student=2)
        assert not torch.allclose(dropped(x).logits, model(x).logits)  # and the test can fail


def test_gradients_reach_only_the_adapter(model, x):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    params = set_trainable(emu, adapter_blocks(emu, L_PAD, R_PAD))
    emu(input_ids=x, labels=x).loss.backward()
    trainable = {id(p) for p in params}
    assert len(trainable) == sum(1 for _ in adapter_blocks(emu, L_PAD, R_PAD).parameters())
    for name, p in emu.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # bottom blocks too: backprop crosses E*
        else:
            assert p.grad is None and not p.requires_grad, name
    for p in emulator_blocks(emu).parameters():
        assert p.grad is None


def test_plug_in_carries_the_tuned_adapter(model, x):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    batches = lm_batches(torch.randint(0, 97, (1, 200)), seq_len=12, batch_size=2, n_steps=3, seed=0)
    train_lm(emu, batches, set_trainable(emu, adapter_blocks(emu, L_PAD, R_PAD)), lr=1e-2)
    plugged = plug_in(model, emu)
    full, tuned, new = decoder_block_list(model), decoder_block_list(emu), decoder_block_list(plugged)
    pairs = {0: 0, 1: 1, 6: len(tuned) - 2, 7: len(tuned) - 1}  # full index -> emulator index
    for i in range(N_LAYERS):
        ref = tuned[pairs[i]] if i in pairs else full[i]
        for (n, p), (_, q) in zip(new[i].named_parameters(), ref.named_parameters()):
            assert torch.equal(p, q), (i, n)
        if i in pairs:  # training changed the adapter, so the plug-in differs from the owner's blocks
            assert not torch.equal(new[i].mlp.down_proj.weight, full[i].mlp.down_proj.weight)
    assert torch.equal(plugged.lm_head.weight, model.lm_head.weight)


def test_kd_loss_and_distillation_target(model, x):
    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    naive = sum(((t[b, i, j] - s[b, i, j]) ** 2).item() for b in range(2) for i in range(5) for j in range(8))
    naive /= 80 * (t ** 2).mean().item()
    assert kd_loss(t, s).item() == pytest.approx(naive, rel=1e-5)
    # an emulator that keeps every middle block reproduces the teacher: the KD term is exactly zero
    emu = build_emulator(model, L_PAD, R_PAD, n_student=N_LAYERS - L_PAD - R_PAD)
    log = train_lm(emu, [x], set_trainable(emu, emulator_blocks(emu)), lr=0.0, teacher=model, kd_weight=30.0)
    assert log["kd_loss"] == [0.0]
    emu2 = build_emulator(model, L_PAD, R_PAD, n_student=2)
    log2 = train_lm(emu2, [x], set_trainable(emu2, emulator_blocks(emu2)), lr=0.0, teacher=model, kd_weight=30.0)
    assert log2["kd_loss"][0] > 0


def test_training_state_bytes_counts_adamw(model, x):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    params = set_trainable(emu, adapter_blocks(emu, L_PAD, R_PAD))
    log = train_lm(emu, [x], params, lr=1e-3)
    state = training_state_bytes(emu, log["optimizer"])
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in emu.parameters())  # tied embedding counted once by .parameters()
    assert state["trainable_params"] == n_train
    assert state == {"weights": 4 * n_all, "grads": 4 * n_train, "optimizer": 8 * n_train,
                     "total": 4 * n_all + 12 * n_train, "trainable_params": n_train}


class _TwoLinear(torch.nn.Module):
    """tanh(W2 tanh(W1 x)) summed: autograd saves exactly x (for W1's grad), tanh(W1 x) and tanh(W2 h)."""

    def __init__(self, d):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)

    def forward(self, input_ids, labels=None, use_cache=False):
        class Out:
            pass
        out = Out()
        out.loss = torch.tanh(self.l2(torch.tanh(self.l1(input_ids)))).sum()
        return out


def test_saved_activation_bytes_counts_what_backward_needs():
    torch.manual_seed(0)
    d, n = 8, 5
    net, x = _TwoLinear(d), torch.randn(n, d)
    # by hand: x (n, d) for dW1, h = tanh(W1 x) for tanh' and dW2, and y = tanh(W2 h) for tanh'; weights excluded
    assert saved_activation_bytes(net, x) == 3 * n * d * 4
    net.l1.weight.requires_grad_(False)  # nothing below l2 needs a gradient: x is no longer saved
    assert saved_activation_bytes(net, x) == 2 * n * d * 4


def test_offsite_step_saves_fewer_activations_than_full_ft(model, x):
    full = build_emulator(model, L_PAD, R_PAD, n_student=N_LAYERS - L_PAD - R_PAD)
    set_trainable(full, full)
    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    set_trainable(emu, adapter_blocks(emu, L_PAD, R_PAD))
    a_full, a_emu = saved_activation_bytes(full, x), saved_activation_bytes(emu, x)
    assert 0 < a_emu < a_full
    # a block's saved activations do not depend on its weights: per-block cost equal, so the ratio tracks depth
    per_block = (a_full - a_emu) / (N_LAYERS - (L_PAD + R_PAD + 2))
    assert per_block > 0 and a_emu > (L_PAD + R_PAD + 2) * per_block * 0.5


# ------------------------------------------------------------------ the offsite_emulator stage (reprolab.lm.offsite_emulator)
def test_cosine_with_warmup_matches_transformers_scheduler():
    # the official run uses get_scheduler("cosine") (run_clm.py:288-293, opt.sh:18-19): pin against transformers itself
    from transformers import get_cosine_schedule_with_warmup
    from reprolab.lm.offsite_emulator import cosine_with_warmup

    for warmup, total in ((0, 10), (3, 17), (20, 400)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        for step in range(total + 1):
            assert cosine_with_warmup(step, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
            opt.step()
            sched.step()


def test_train_lm_applies_the_schedule(model, x):
    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    seen = []
    log = train_lm(emu, [x] * 4, set_trainable(emu, emulator_blocks(emu)), lr=0.5, teacher=model, kd_weight=30.0,
                   lr_lambda=lambda s: 1.0 / (1 + s), on_step=seen.append)
    assert seen == [1, 2, 3, 4]
    assert log["optimizer"].param_groups[0]["lr"] == pytest.approx(0.5 / 5)  # after 4 scheduler steps


def test_heldout_kd_matches_a_naive_hidden_state_reference(model, x):
    from reprolab.lm.offsite_emulator import heldout_losses

    emu = build_emulator(model, L_PAD, R_PAD, n_student=2)
    got = heldout_losses(emu, model, x)  # x: 2 windows
    kd, lm = [], []
    with torch.no_grad():
        for w in x:
            w = w[None]
            # hidden_states[i] is the input of block i: the output of the last middle block is hidden_states[n - r_pad]
            t = model(w, output_hidden_states=True).hidden_states[N_LAYERS - R_PAD]
            s = emu(w, output_hidden_states=True).hidden_states[L_PAD + 2]
            kd.append((((t - s) ** 2).mean() / (t ** 2).mean()).item())
            logits = emu(w).logits[0, :-1]
            lm.append(torch.nn.functional.cross_entropy(logits, w[0, 1:]).item())
    assert got["kd_loss"] == pytest.approx(sum(kd) / 2, rel=1e-5)
    assert got["lm_loss"] == pytest.approx(sum(lm) / 2, rel=1e-5)


def test_distill_emulator_trains_only_the_middle_and_round_trips(model, tmp_path):
    from reprolab.lm.offsite_emulator import distill_emulator, load_emulator, save_emulator

    ids = torch.randint(0, 97, (1, 400), generator=torch.Generator().manual_seed(2))
    emu, log = distill_emulator(model, ids[:, :300], ids[:, 300:], l_pad=L_PAD, r_pad=R_PAD, n_student=2, steps=30,
                                batch_size=2, seq_len=12, lr=3e-3, warmup=3, lm_weight=1.0, kd_weight=30.0, seed=0,
                                eval_every=10, eval_windows=4)
    assert [c["step"] for c in log["heldout"]] == [0, 10, 20, 30] and log["heldout_windows"] == 4
    assert log["heldout"][-1]["kd_loss"] < log["heldout"][0]["kd_loss"]  # the emulator's own held-out KD comes down
    full, blocks = decoder_block_list(model), decoder_block_list(emu)
    for i, j in ((0, 0), (1, 1), (6, 4), (7, 5)):  # the adapter blocks stay the owner's
        for (n, p), (_, q) in zip(blocks[j].named_parameters(), full[i].named_parameters()):
            assert torch.equal(p, q), (i, n)
    assert not torch.equal(blocks[2].mlp.down_proj.weight, full[emu.offsite["kept"][0]].mlp.down_proj.weight)
    assert torch.equal(emu.lm_head.weight, model.lm_head.weight)
    model.config.name_or_path = "tiny"
    save_emulator(emu, {"params": {"model": "tiny", "l_pad": L_PAD, "r_pad": R_PAD, "n_student": 2}}, tmp_path / "e")
    back, info = load_emulator(model, tmp_path / "e", l_pad=L_PAD, r_pad=R_PAD, n_student=2, model_name="tiny")
    x = ids[:, :12]
    with torch.no_grad():
        assert torch.equal(back(x).logits, emu(x).logits)
    assert info["offsite"]["kept"] == emu.offsite["kept"]
    with pytest.raises(ValueError):
        load_emulator(model, tmp_path / "e", l_pad=L_PAD, r_pad=R_PAD, n_student=3)
