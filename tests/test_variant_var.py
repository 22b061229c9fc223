"""VARiant / VAR miniature: the residual quantiser against a naive per-pixel loop and an exact reconstruction, the
teacher-forcing input against its definition, the block-causal mask by hand and by perturbation, the subnet routing
against an independent masked formulation, equidistant layer selection and weight sharing, the KV-cache count and the
pass schedule by hand, the unigram NLL, the Frechet distance, and the params schema."""

import math

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.registry import paper_entry
from reprolab.tf import variant_var as V

SCALES = (1, 2, 4, 8)
CFG = dict(scales=list(SCALES), n_heads=2, head_dim=4, n_layers=4, mlp_ratio=2.0, sub_depth=2, n_full_scales=2)


def _naive_area(f, pn):
    """Block means by hand: (B, C, H, H) -> (B, C, pn, pn)."""
    B, C, H, _ = f.shape
    s = H // pn
    out = torch.zeros(B, C, pn, pn)
    for i in range(pn):
        for j in range(pn):
            out[:, :, i, j] = f[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s].mean((2, 3))
    return out


def _naive_encode(f, cb, scales):
    B, C, H, _ = f.shape
    rest, out = f.clone(), []
    for pn in scales:
        z = _naive_area(rest, pn)
        idx = torch.zeros(B, pn * pn, dtype=torch.long)
        code = torch.zeros(B, C, pn, pn)
        for b in range(B):
            for i in range(pn):
                for j in range(pn):
                    d = [float(((z[b, :, i, j] - cb[k]) ** 2).sum()) for k in range(len(cb))]
                    k = int(np.argmin(d))
                    idx[b, i * pn + j] = k
                    code[b, :, i, j] = cb[k]
        up = code if pn == H else F.interpolate(code, size=(H, H), mode="bicubic")
        rest = rest - up
        out.append(idx)
    return out, rest


def test_residual_quantiser_equals_naive_loop_and_f_hat_plus_rest_is_f():
    torch.manual_seed(0)
    f = torch.rand(3, 2, 8, 8)
    cb = torch.randn(7, 2) * 0.5
    q = V.ResidualQuantizer(cb, SCALES)
    idx = q.encode(f)
    ref, rest = _naive_encode(f, cb, SCALES)
    for a, b in zip(idx, ref):
        assert torch.equal(a, b)
    assert torch.allclose(q.decode(idx) + rest, f, atol=1e-5)  # f_hat + final residual = f


def test_dense_codebook_reconstructs_exactly_up_to_half_a_grid_step():
    torch.manual_seed(1)
    f = torch.rand(4, 1, 8, 8)
    step = 1e-3
    cb = torch.arange(-2.0, 2.0 + step / 2, step)[:, None]  # K = 4001 scalar codes
    q = V.ResidualQuantizer(cb, SCALES)
    err = (q.decode(q.encode(f)) - f).abs().max()
    assert err <= step / 2 + 1e-5


def test_teacher_input_is_downsampled_partial_reconstruction():
    torch.manual_seed(2)
    f = torch.rand(2, 1, 8, 8)
    q = V.ResidualQuantizer(torch.linspace(-1, 1, 9)[:, None], SCALES)
    idx = q.encode(f)
    x = q.teacher_input(idx)
    assert x.shape == (2, 4 + 16 + 64, 1)
    parts, start = [], 0
    for k in range(1, len(SCALES)):
        pn = SCALES[k]
        ref = _naive_area(q.decode(idx[:k]), pn).reshape(2, 1, -1).transpose(1, 2)
        assert torch.allclose(x[:, start:start + pn * pn], ref, atol=1e-5)
        start += pn * pn


def test_fit_codebook_is_seeded_and_shared_across_scales():
    torch.manual_seed(3)
    f = torch.rand(20, 1, 8, 8)
    a = V.fit_codebook(f, 6, SCALES, rounds=1, seed=0)
    b = V.fit_codebook(f, 6, SCALES, rounds=1, seed=0)
    assert a.shape == (6, 1) and torch.equal(a, b)


def test_block_causal_mask_by_hand():
    m = V.block_causal_mask((1, 2))  # 5 tokens: [s0, s1, s1, s1, s1]
    ref = torch.tensor([[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4, dtype=torch.bool)
    assert torch.equal(m, ref)
    lv = V.scale_levels(SCALES)
    M = V.block_causal_mask(SCALES)
    for i in range(len(lv)):
        for j in range(len(lv)):
            assert bool(M[i, j]) == (int(lv[j]) <= int(lv[i]))


def _model(seed=0):
    return V.build_model(CFG, K=5, c_vae=1, seed=seed).eval()


@pytest.mark.parametrize("mode", ["full", "sub"])
def test_a_token_never_sees_later_scales(mode):
    torch.manual_seed(4)
    m = _model()
    sub = None if mode == "full" else V.subnet_layers(4, 2)
    lab = torch.tensor([1, 7])
    x = torch.randn(2, 84, 1)
    base = m(lab, x, sub, 2)
    lv = V.scale_levels(SCALES)
    for k in range(1, 4):  # perturb the inputs of scale k (positions with level k) and later
        x2 = x.clone()
        x2[:, (lv[1:] >= k)] += 1.0
        out = m(lab, x2, sub, 2)
        keep = lv < k
        assert torch.allclose(out[:, keep], base[:, keep], atol=1e-6)
        assert not torch.allclose(out[:, ~keep], base[:, ~keep], atol=1e-4)


def _reference_routing(m, lab, x, sub, nE):
    """Independent formulation: run EVERY token through EVERY layer with the block-causal mask, then restore the
    late tokens' hidden states at the layers outside the subnet (they skip those layers)."""
    h = m.embed_inputs(lab, x)
    mask = m.mask[:h.shape[1], :h.shape[1]]
    for li, blk in enumerate(m.blocks):
        new, _ = blk(h, False, mask)
        if li not in sub:
            new = torch.cat([new[:, :nE], h[:, nE:]], 1)
        h = new
    return m.pool_head(h)


@pytest.mark.parametrize("nf", [0, 1, 2, 3])
def test_subnet_routing_equals_masked_reference(nf):
    torch.manual_seed(5)
    m = _model()
    sub = V.subnet_layers(4, 2)
    lab, x = torch.tensor([0, 3, 9]), torch.randn(3, 84, 1)
    nE = sum(p * p for p in SCALES[:nf])
    assert torch.allclose(m(lab, x, sub, nf), _reference_routing(m, lab, x, sub, nE), atol=1e-5)
    # every layer in the "subnet" == the full network
    assert torch.allclose(m(lab, x, [0, 1, 2, 3], nf), m(lab, x), atol=1e-6)


def test_subnet_layers_equidistant_first_and_last():
    assert V.subnet_layers(4, 2) == [0, 3]
    assert V.subnet_layers(8, 4) == [0, 2, 4, 7]
    assert V.subnet_layers(30, 16) == [math.floor(i * 29 / 15) for i in range(16)]
    assert V.subnet_layers(30, 8) == [0, 4, 8, 12, 16, 20, 24, 29]
    assert V.subnet_layers(5, 1) == [0]
    with pytest.raises(ValueError):
        V.subnet_layers(4, 5)


def test_subnet_is_weight_shared_same_tensors():
    """The subnet owns no weights: with every scale in the subnet (nf = 0) only layers 0 and 3 get gradients, and a
    change of layer 3's tensor changes the subnet's output; no extra copy of any block exists."""
    torch.manual_seed(6)
    m = _model()
    lab, x = torch.tensor([2, 5]), torch.randn(2, 84, 1)
    m(lab, x, [0, 3], 0).sum().backward()
    for li, blk in enumerate(m.blocks):
        g = sum(float(p.grad.abs().sum()) for p in blk.parameters() if p.grad is not None)
        assert (g > 0) == (li in (0, 3))
    assert len(m.blocks) == 4
    before = m(lab, x, [0, 3], 0).detach()
    with torch.no_grad():
        m.blocks[3].fc1.linear.weight.add_(0.5)
    assert not torch.allclose(m(lab, x, [0, 3], 0), before)


def test_kv_cache_count_by_hand():
    # D = 4, subnet 2 layers, scales 1,2,4,8 (1 + 4 + 16 + 64 = 85 tokens), first 2 scales full (5 tokens)
    assert V.kv_cache_entries(4, None, SCALES, 2, kv_width=1) == 2 * 4 * 85
    assert V.kv_cache_entries(4, [0, 3], SCALES, 2, kv_width=1) == 2 * (4 * 5 + 2 * 80)
    assert V.kv_cache_entries(4, [0, 3], SCALES, 2, kv_width=32) == 32 * 360
    assert V.kv_cache_entries(4, [0, 3], SCALES, 4) == 2 * 4 * 85


def test_pass_schedule_counts_and_order():
    s = V.full_pass_schedule(100, [[1, 0.2], [1, 0.6], [1, 1.0]])
    assert len(s) == 100
    assert sum(s[:33]) == 6 and sum(s[33:67]) == 20 and sum(s[67:]) == 33
    f = V.full_pass_schedule(100, [[1, 0.6]])
    assert sum(f) == 60
    assert f[:5] == [False, True, False, True, True]  # floor((t+1) 0.6) > floor(t 0.6)
    assert V.arm_schedule("full_only", {}, 7) == [True] * 7


def test_unigram_nll_by_hand():
    scales = (1, 2)
    train = torch.tensor([[0, 1, 1, 2, 2], [0, 1, 1, 1, 1]])
    test = torch.tensor([[1, 2, 2, 2, 2]])
    r = V.unigram_nll(train, test, 3, scales, 1)
    p0 = torch.tensor([3, 1, 1]) / 5.0  # scale 0: counts [2, 0, 0] + 1
    p1 = torch.tensor([1, 7, 3]) / 11.0  # scale 1: counts [0, 6, 2] + 1
    assert r["scale_1"] == pytest.approx(-math.log2(p0[1]))
    assert r["scale_2"] == pytest.approx(-math.log2(p1[2]))
    assert r["image"] == pytest.approx((-math.log2(p0[1]) - 4 * math.log2(p1[2])) / 5)


def test_token_nll_equals_per_token_cross_entropy():
    torch.manual_seed(7)
    m = _model()
    q = V.ResidualQuantizer(torch.linspace(-1, 1, 5)[:, None], SCALES)
    tokens = torch.randint(0, 5, (2, 85))
    lab = torch.tensor([4, 1])
    nll = V.token_nll(m, q, tokens, lab)
    logits = m(lab, q.teacher_input(q.split(tokens)))
    ref = -torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(nll, ref, atol=1e-6)


def test_sampling_is_seeded_and_in_codebook_span():
    m = _model()
    q = V.ResidualQuantizer(torch.linspace(0, 1, 5)[:, None], SCALES)
    lab = torch.arange(4)
    a = V.sample(m, q, lab, seed=3, sub=[0, 3], n_full_scales=2)
    b = V.sample(m, q, lab, seed=3, sub=[0, 3], n_full_scales=2)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    # re-encoding a sample with the same quantiser has zero residual at the last scale only if exact; at least finite
    assert torch.isfinite(a).all()


def test_frechet_distance_matches_scipy_sqrtm_and_survives_dead_units():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert V.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    a[:, 0] = 0.0  # a dead feature: singular covariance
    assert math.isfinite(V.frechet_distance(a, b))


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    shift = np.array([1.0, -2.0, 0.5])
    assert V.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert V.frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), abs=1e-6)
    b = a * 2.0  # covariance x 4: trace term = tr(S) + 4 tr(S) - 2 * 2 tr(S) = tr(S)
    assert V.frechet_distance(a, b) == pytest.approx(float(np.trace(np.cov(a, rowvar=False))) + float(((a.mean(0)) ** 2).sum()), rel=1e-6)


def test_params_schema_rejects_bad_values():
    schema = {"type": "object", "properties": paper_entry("variant_var")["params"]}
    jsonschema.validate({"sub_depth": 2, "dataset": "digits", "progressive_stages": [[1, 0.2], [1, 1.0]]}, schema)
    for bad in ({"dataset": "cifar"}, {"sub_depth": 0}, {"fixed_p_full": 1.5}, {"progressive_stages": [[1, 0.2, 3]]},
                {"scales": [1]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_class_cond_all_adds_the_class_embedding_to_every_token():
    torch.manual_seed(8)
    m = V.build_model({**CFG, "class_cond": "all"}, K=5, c_vae=1, seed=0)
    x = torch.randn(1, 84, 1)
    a, b = m.embed_inputs(torch.tensor([2]), x), m.embed_inputs(torch.tensor([6]), x)
    diff = (m.class_emb.weight[2] - m.class_emb.weight[6]).detach()
    assert torch.allclose(a - b, diff.expand(85, -1)[None], atol=1e-6)  # sos and every other token
    s = _model()  # class_cond sos: only the first token carries the class
    a, b = s.embed_inputs(torch.tensor([2]), x), s.embed_inputs(torch.tensor([6]), x)
    assert torch.allclose(a[:, 1:], b[:, 1:]) and not torch.allclose(a[:, 0], b[:, 0])
    with pytest.raises(ValueError):
        V.build_model({**CFG, "class_cond": "adaln"}, K=5, c_vae=1, seed=0)


def test_token_nll_routes_early_scales_full_and_late_scales_through_the_subnet():
    """token_nll(sub, nf) is the cross-entropy of model(labels, x, sub, nf) -- not of the all-subnet (nf = 0) pass."""
    torch.manual_seed(9)
    m = _model()
    q = V.ResidualQuantizer(torch.linspace(-1, 1, 5)[:, None], SCALES)
    tokens, lab = torch.randint(0, 5, (2, 85)), torch.tensor([3, 8])
    x = q.teacher_input(q.split(tokens))
    nll = V.token_nll(m, q, tokens, lab, [0, 3], 2)
    for nf, same in ((2, True), (0, False)):
        ref = -torch.log_softmax(m(lab, x, [0, 3], nf), -1).gather(-1, tokens[..., None])[..., 0]
        assert torch.allclose(nll, ref, atol=1e-6) == same


def test_arm_schedules_per_arm():
    cfg = {"progressive_stages": [[1, 0.2], [1, 0.6], [1, 1.0]], "fixed_p_full": 0.6}
    assert V.arm_schedule("fixed", cfg, 30) == V.full_pass_schedule(30, [[1, 0.6]])
    p = V.arm_schedule("progressive", cfg, 30)
    assert p == V.full_pass_schedule(30, cfg["progressive_stages"])
    assert sum(p[:10]) == 2 and sum(p[20:]) == 10  # 2:8 first, 10:0 last (full passes rise)
    assert V.arm_schedule("half", cfg, 4) == [True] * 4
    with pytest.raises(ValueError):
        V.arm_schedule("random", cfg, 4)


def test_train_arm_uses_the_full_network_exactly_on_full_pass_steps(monkeypatch):
    calls = []
    real = V.token_nll

    def spy(model, q, tokens, labels, sub=None, n_full_scales=0):
        calls.append((None if sub is None else list(sub), n_full_scales))
        return real(model, q, tokens, labels, sub, n_full_scales)

    monkeypatch.setattr(V, "token_nll", spy)
    q = V.ResidualQuantizer(torch.linspace(-1, 1, 5)[:, None], SCALES)
    torch.manual_seed(10)
    data = {"train": (torch.randint(0, 5, (16, 85)), torch.randint(0, 10, (16,)))}
    cfg = {**CFG, "progressive_stages": [[1, 0.2], [1, 1.0]], "fixed_p_full": 0.5, "steps": 10, "sub_depth": 2,
           "lr": 1e-3, "weight_decay": 0.0, "batch_size": 8, "warmup_steps": 0, "grad_clip": None}
    for arm in ("progressive", "fixed", "full_only"):
        calls.clear()
        _, _, sched = V.train_arm(arm, q, data, cfg, seed=0)
        assert len(calls) == 10 and sched == V.arm_schedule(arm, cfg, 10)
        assert calls == [(None if full else [0, 3], 2) for full in sched]
