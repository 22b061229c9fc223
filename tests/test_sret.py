"""SReT: sliced group attention against a naive per-group loop, recursion against unrolled copies with shared weights,
the learnable residual coefficients and NLL against their formulas, the parameter and MAC accounting against an
analytic count and torch's FlopCounterMode, the arms' equal parameter counts, and the params schema."""

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reprolab.registry import paper_entry
from reprolab.tf import sret as S
from reprolab.tf.tiny import Block, TFConfig, default_proj

CFG = dict(n_heads=2, head_dim=8, n_blocks=2, loops=2, mlp_ratio=4.0, sret_mlp_ratio=2.0, np_mlp_ratio=1.0,
           groups1=4, groups2=2, stem_strides=[2, 1, 1], steps=3, batch_size=8, lr=1e-3, weight_decay=0.05,
           warmup_steps=1, label_smoothing=0.1, grad_clip=None)


def _naive_group_attention(q, k, v, groups):
    B, h, N, hd = q.shape
    n = N // groups
    out = torch.zeros_like(q)
    for b in range(B):
        for hh in range(h):
            for g in range(groups):
                sl = slice(g * n, (g + 1) * n)
                for i in range(g * n, (g + 1) * n):
                    s = torch.stack([q[b, hh, i] @ k[b, hh, j] for j in range(g * n, (g + 1) * n)]) / hd ** 0.5
                    w = torch.exp(s - s.max())
                    out[b, hh, i] = (w / w.sum()) @ v[b, hh, sl]
    return out


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_attention_equals_naive_per_group_loop(groups):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    assert torch.allclose(S.group_attention(q, k, v, groups), _naive_group_attention(q, k, v, groups), atol=1e-5)


def _cfg(**kw):
    base = dict(kind="vit", d_model=16, n_layers=2, n_heads=2, head_dim=8, mlp_hidden=32, n_classes=10,
                image_size=8, patch_size=2, loops=(2, 2))
    base.update(kw)
    return TFConfig(**base)


def test_sliced_block_with_permutation_equals_per_group_sdpa_on_permuted_tokens():
    torch.manual_seed(1)
    blk = S.SReTBlock(_cfg(), 0, default_proj)
    x = torch.randn(3, 16, 16)
    perm = torch.randperm(16)
    y, _ = blk(x, groups=2, perm=perm)
    # independent reference: permute, attend in 2 contiguous groups with torch SDPA, un-permute, residual + MLP
    xl = blk.ln1(x)[:, perm]
    q, k, v = (p(xl, 16).view(3, 16, 2, 8).transpose(1, 2) for p in (blk.q, blk.k, blk.v))
    parts = [F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s]) for s in (slice(0, 8), slice(8, 16))]
    a = torch.cat(parts, 2).transpose(1, 2).reshape(3, 16, 16)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(16)
    a = blk.o(a[:, inv], 16)
    h = x + a
    ref = h + blk.fc2(F.gelu(blk.fc1(blk.ln2(h), 32)), 16)
    assert torch.allclose(y, ref, atol=1e-5)
    # a different permutation gives a different output (the groups really change), groups=1 is permutation-invariant
    y2, _ = blk(x, groups=2, perm=torch.roll(perm, 3))
    assert not torch.allclose(y, y2, atol=1e-4)
    assert torch.allclose(blk(x, 1, perm)[0], blk(x, 1, None)[0], atol=1e-5)


def test_unsliced_block_with_unit_coefficients_equals_kit_block():
    torch.manual_seed(2)
    cfg = _cfg()
    blk = S.SReTBlock(cfg, 0, default_proj, learnable_coef=False)
    ref = Block(cfg, 0, default_proj)
    ref.load_state_dict(blk.state_dict())
    x = torch.randn(2, 16, 16)
    assert torch.allclose(blk(x)[0], ref(x, causal=False)[0], atol=1e-5)
    assert "coef" not in dict(blk.named_parameters())  # the plain ViT trains no coefficient


def test_learnable_residual_coefficients_follow_the_official_formula_and_learn():
    torch.manual_seed(3)
    blk = S.SReTBlock(_cfg(), 0, default_proj)
    assert isinstance(blk.coef, torch.nn.Parameter) and torch.equal(blk.coef.detach(), torch.ones(4))
    with torch.no_grad():
        blk.coef.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    x = torch.randn(2, 16, 16)
    a = blk.attention(blk.ln1(x))[0]
    h = 0.5 * x + 2.0 * a
    ref = -1.0 * h + 3.0 * blk.fc2(F.gelu(blk.fc1(blk.ln2(h), 32)), 16)
    y = blk(x)[0]
    assert torch.allclose(y, ref, atol=1e-5)
    y.sum().backward()
    assert blk.coef.grad is not None and (blk.coef.grad.abs() > 0).all()
    nll = S.NonProj(16, 16)
    with torch.no_grad():
        nll.coef.copy_(torch.tensor([0.7, -0.3]))
    assert torch.allclose(nll(x), 0.7 * x - 0.3 * nll.fc2(F.gelu(nll.fc1(nll.norm(x)))), atol=1e-6)


@pytest.mark.parametrize("arm", ["recursion", "sret"])
def test_recursion_equals_unrolled_copies_with_shared_weights(arm):
    torch.manual_seed(4)
    m = S.build_model(arm, CFG, seed=0, image_size=8)
    for b in m.blocks:  # non-trivial coefficients
        with torch.no_grad():
            b.coef.copy_(torch.tensor([0.9, 1.1, 0.8, 1.2]))
    u = S.unrolled_copy(m)
    assert len(u.blocks) == 4 and len(m.blocks) == 2
    x = torch.randn(4, 1, 8, 8)
    m.eval(), u.eval()
    assert torch.allclose(m(x), u(x), atol=1e-5)
    # the gradient of a shared block is the sum of the gradients of its unrolled copies
    m(x).pow(2).sum().backward()
    u(x).pow(2).sum().backward()
    for li, blk in enumerate(m.blocks):
        copies = [u.blocks[j] for j, (l2, _, _) in enumerate(m.schedule()) if l2 == li]
        for name, p in blk.named_parameters():
            ref = sum(dict(c.named_parameters())[name].grad for c in copies)
            assert torch.allclose(p.grad, ref, atol=1e-5), name
    # loops really reuse the module: one block object per layer, applied loops times
    assert [l for l, _, _ in m.schedule()] == [0, 0, 1, 1]


def test_schedule_uses_groups1_first_and_permuted_groups2_after():
    m = S.build_model("sliced", CFG, seed=0, image_size=8)
    assert m.schedule() == [(0, 0, 4), (0, 1, 2), (1, 0, 4), (1, 1, 2)]
    calls = []
    for b in m.blocks:
        orig = b.forward
        def spy(x, g=1, perm=None, _orig=orig):
            calls.append((g, perm is not None))
            return _orig(x, g, perm)
        b.forward = spy
    m(torch.randn(2, 1, 8, 8))
    assert calls == [(4, False), (2, True), (4, False), (2, True)]
    # evaluation is reproducible once the permutation generator is reset
    m.eval()
    x = torch.randn(5, 1, 8, 8)
    m.set_perm_seed(7)
    a = m(x)
    m.set_perm_seed(7)
    assert torch.equal(a, m(x))


def _analytic_params(d, L, m, nll, coef, n_tokens, stem=(2, 1, 1)):
    hq = d  # heads * head_dim = d
    block = 4 * (d * hq + hq) + (d * m + m) + (m * d + d) + 2 * 2 * d + (4 if coef else 0)
    conv = 0
    cin = 1
    for cout in (d // 2, d, d):
        conv += cin * cout * 9 + cout + 2 * cout  # conv weight + bias + BN affine
        cin = cout
    return L * block + conv + n_tokens * d + 2 * d + (d * 10 + 10) + nll


def test_parameter_counts_analytic_and_equal_across_arms():
    d, L, R = 16, 2, 2
    counts = {a: S.build_model(a, CFG, 0, 8).count_params() for a in S.ARMS}
    nll = R * L * (2 * d + (d * d + d) + (d * d + d) + 2)
    assert counts["plain"] == _analytic_params(d, L, 4 * d, 0, False, 16)
    assert counts["recursion"] == counts["plain"] + 4 * L  # weight sharing: only the coefficients are new
    assert counts["sret"] == _analytic_params(d, L, 2 * d, nll, True, 16)
    assert counts["sliced"] == counts["sret"]  # slicing adds nothing
    assert counts["deep"] == _analytic_params(d, L * R, 4 * d, 0, False, 16)
    assert abs(counts["sret"] / counts["plain"] - 1) < 0.03


@pytest.mark.parametrize("arm", list(S.ARMS))
def test_macs_equal_torch_flop_counter(arm):
    m = S.build_model(arm, CFG, 0, 8).eval()
    x = torch.randn(1, 1, 8, 8)
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert fc.get_total_flops() == 2 * m.macs()


def test_slicing_saves_attention_macs_only():
    sret, sliced = (S.build_model(a, CFG, 0, 8) for a in ("sret", "sliced"))
    N, hq, L = 16, 16, 2
    full = 2 * N * N * hq
    expect = L * ((full - full // 4) + (full - full // 2))  # loop 1: 4 groups, loop 2: 2 groups
    assert sret.macs() - sliced.macs() == expect


def test_training_runs_and_no_decay_groups():
    torch.manual_seed(0)
    X = torch.randn(40, 1, 8, 8)
    y = torch.arange(40) % 10
    data = {"train": (X, y), "val": (X[:20], y[:20]), "test": (X[20:], y[20:])}
    model, curve = S.train_arm("sliced", data, CFG, seed=0)
    assert len(curve) == CFG["steps"] and all(c == c for c in curve)
    nd = {id(p) for p in S.no_decay_params(model)}
    names = {n for n, p in model.named_parameters() if id(p) in nd}
    assert "pos" in names and "blocks.0.coef" in names and "blocks.0.q.linear.bias" in names
    assert "blocks.0.q.linear.weight" not in names and "stem.0.weight" not in names
    r1, r2 = S.evaluate_arm(model, data, 0), S.evaluate_arm(model, data, 0)
    assert r1 == r2


def test_params_schema_rejects_bad_values():
    schema = {"type": "object", "properties": paper_entry("sret")["params"]}
    for bad in ({"stem_strides": [2, 3, 1]}, {"stem_strides": []}, {"stem_strides": [2, 1, 1, 1]}, {"groups1": 0},
                {"dataset": "cifar"}, {"loops": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_bad_groups_rejected():
    with pytest.raises(ValueError):
        S.build_model("sliced", {**CFG, "groups1": 3}, 0, 8)  # 16 tokens are not 3 equal groups


def test_application_order_block_then_nll_against_a_hand_written_sequence():
    """Official order (SReT.py:163-166): block0, NLL0, block0, NLL1, block1, NLL2, block1, NLL3 (a hand-written
    sequence, independent of run_blocks)."""
    torch.manual_seed(5)
    m = S.build_model("sret", CFG, seed=0, image_size=8).eval()
    for b in m.blocks:
        with torch.no_grad():
            b.coef.copy_(torch.tensor([0.9, 1.3, 0.7, 1.1]))
    for n in m.nll:
        with torch.no_grad():
            n.coef.copy_(torch.tensor([0.8, 1.4]))
    x = torch.randn(3, 1, 8, 8)
    h = m.embed(x)
    for blk, nll in ((0, 0), (0, 1), (1, 2), (1, 3)):
        h = m.nll[nll](m.blocks[blk](h)[0])
    assert torch.allclose(m(x), m.head(m.ln_f(h.mean(1))), atol=1e-5)


@pytest.mark.parametrize("strides", [[2], [2, 1], [2, 1, 1]])
def test_stem_arm_and_short_stems_accounting(strides):
    cfg = {**CFG, "stem_strides": strides}
    d = 16
    stem = S.build_model("stem", cfg, 0, 8).eval()
    assert len(stem.blocks) == 0 and stem.schedule() == [] and S.coefficients(stem) == {}
    x = torch.randn(2, 1, 8, 8)
    # no block: embed -> mean -> LN -> head
    assert torch.allclose(stem(x), stem.head(stem.ln_f(stem.embed(x).mean(1))), atol=1e-6)
    conv, cin = 0, 1
    for cout in S.stem_channels(d, len(strides)):
        conv += cin * cout * 9 + cout + 2 * cout
        cin = cout
    assert stem.count_params() == conv + 16 * d + 2 * d + d * 10 + 10
    for arm in ("stem", "plain", "sliced"):
        m = S.build_model(arm, cfg, 0, 8).eval()
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(1, 1, 8, 8))
        assert fc.get_total_flops() == 2 * m.macs(), arm
    assert S.stem_channels(24, 1) == (24,) and S.stem_channels(24, 3) == (12, 24, 24)
