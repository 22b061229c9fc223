"""ElasticViT: FLOPs tiers against brute force, the complexity-aware random walk (bounded consecutive FLOPs gap, every
tier covered), performance-aware sampling (memory bank softmax draws, worst-replacement, path preference = argmin of an
independently computed rule), the AlphaNet alpha-divergence against autograd of its closed form, AGC against a loop."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.tf import elasticvit as E

CFG = dict(embed_list=[16, 24, 32], depth_list=[1, 2, 3, 4], mlp_ratio_list=[2, 3, 4], head_dim=8, patch_size=4,
           n_tiers=6, bound_frac=0.25)
ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def space():
    configs, tiers, mn, mx = E.setup(CFG, 8)
    net = E.build_supernet(CFG, 8)
    return configs, tiers, mn, mx, net


def _macs_by_hand(c, T=5, head_dim=8, n_cls=10, patch_in=16, n_patches=4):
    """Independent MAC count of a child (q,k,v,o projections, attention products, MLP, head, patch embedding)."""
    e = c["embed"]
    n = 0
    for h, m in zip(c["heads"], c["mlp"]):
        hq = h * head_dim
        n += T * (3 * e * hq + hq * e) + 2 * T * T * hq + T * (e * m + m * e)
    return n + e * n_cls + n_patches * patch_in * e


def test_space_enumeration_and_tiers_match_brute_force(space):
    configs, tiers, mn, mx, net = space
    assert len(configs) == 3 * (3 + 9 + 27 + 81)
    assert len({E.arch_key(c) for c in configs}) == len(configs)
    for c in configs[::17]:
        assert net.macs(c) == _macs_by_hand(c)
    macs = {E.arch_key(c): net.macs(c) for c in configs}
    assert macs[E.arch_key(mn)] == min(macs.values()) and macs[E.arch_key(mx)] == max(macs.values())
    t, bound = tiers["targets"], tiers["bound"]
    assert t[0] == min(macs.values()) and math.isclose(t[-1] + 2 * bound, max(macs.values()))
    assert np.allclose(np.diff(t), tiers["spacing"]) and math.isclose(bound, 0.25 * tiers["spacing"])
    for F_b, pool in zip(t, tiers["pools"]):
        want = {k for k, m in macs.items() if F_b - 1e-9 <= m <= F_b + 2 * bound + 1e-9}
        assert {E.arch_key(c) for c in pool} == want and len(pool) == len(want) > 0
    # heads are tied to the width and the configs run on the supernet
    assert all(c["heads"] == [c["embed"] // 8] * c["depth"] for c in configs)
    net.set_active_subnet(mx)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_bank_id_random_walk_is_adjacent_and_exact_at_the_edges():
    rng = np.random.default_rng(0)
    n, b, seq = 6, 0, []
    for _ in range(6000):
        nb = E.next_bank_id(b, n, rng)
        assert abs(nb - b) <= 1 and 0 <= nb < n
        seq.append((b, nb))
        b = nb
    stay0 = np.mean([nb == 0 for b0, nb in seq if b0 == 0])
    stay_mid = np.mean([nb == 2 for b0, nb in seq if b0 == 2])
    assert abs(stay0 - 2 / 3) < 0.06 and abs(stay_mid - 1 / 3) < 0.06  # official [0, 0, 1] / [-1, 0, 1]
    assert {nb for _, nb in seq} == set(range(n))


def _sampler(tiers, mn, net, flops_mode="adjacent_step", model_mode="uniform", use_bank=False, seed=0, **kw):
    return E.ConflictAwareSampler(tiers, flops_mode, model_mode, use_bank, np.random.default_rng(seed), net.macs, 8,
                                  mn, **kw)


def test_complexity_aware_sampling_bounds_the_consecutive_gap_and_covers_every_tier(space):
    configs, tiers, mn, mx, net = space
    bound_gap = tiers["spacing"] + 2 * tiers["bound"]
    s = _sampler(tiers, mn, net)
    prev, seen, gaps = None, set(), []
    for _ in range(1500):
        s.begin_step()
        step = [s.sample() for _ in range(3)]
        assert len({b for _, b, _ in step}) == 1  # every child of a step from the step's tier
        b = step[0][1]
        F_b = tiers["targets"][b]
        for c, _, _ in step:  # inside the tier's window
            assert F_b - 1e-9 <= net.macs(c) <= F_b + 2 * tiers["bound"] + 1e-9
        m = [net.macs(c) for c, _, _ in step]
        if prev is not None:
            gaps.append(max(abs(a - p) for a in m for p in prev))
        prev, seen = m, seen | {b}
    assert max(gaps) <= bound_gap + 1e-6
    assert seen == set(range(len(tiers["pools"])))
    # mutation check: the uniform (random tier) baseline breaks the bound
    u = _sampler(tiers, mn, net, flops_mode="random")
    prev, big = None, 0
    for _ in range(300):
        u.begin_step()
        m = [net.macs(u.sample()[0]) for _ in range(3)]
        if prev is not None:
            big += max(abs(a - p) for a in m for p in prev) > bound_gap
        prev = m
    assert big > 50


def _pref_by_hand(c, a):
    """Path preference written out: MACs(cand. with anchor width) - MACs(cand. with anchor depth, front layers
    repeated / removed)."""
    r = [m // c["embed"] for m in c["mlp"]]
    wide = E.make_config(a["embed"], r, 8)
    d = a["depth"]
    rd = r[-d:] if len(r) >= d else [r[0]] * (d - len(r)) + r
    deep = E.make_config(c["embed"], rd, 8)
    return _macs_by_hand(wide) - _macs_by_hand(deep)


def test_preference_diff_prefers_wide_and_shallow(space):
    configs, tiers, mn, mx, net = space
    anchor = E.make_config(16, [2, 2], 8)
    wide_shallow = E.make_config(32, [2, 2], 8)
    narrow_deep = E.make_config(16, [2, 2, 2, 2], 8)
    assert E.preference_diff(wide_shallow, anchor, net.macs, 8) < 0 < E.preference_diff(narrow_deep, anchor, net.macs, 8)
    rng = np.random.default_rng(1)
    for _ in range(200):
        c, a = configs[int(rng.integers(len(configs)))], configs[int(rng.integers(len(configs)))]
        assert E.preference_diff(c, a, net.macs, 8) == _pref_by_hand(c, a)


def test_performance_aware_picks_the_best_of_n_by_the_rule_and_the_bank(space):
    configs, tiers, mn, mx, net = space
    s = _sampler(tiers, mn, net, model_mode="preference", use_bank=True, bank_size=4, bank_rate=0.0, n_candidates=5)
    b = 3
    s.current = b
    pool = tiers["pools"][b]
    # bank of tier 0 holds the anchor (its best entry); tier b's bank more than half full
    s.banks[0] = [[tiers["pools"][0][0], -2.0], [tiers["pools"][0][-1], -0.5]]
    s.banks[b] = [[pool[0], -1.0], [pool[1], -1.2], [pool[2], -0.9]]
    anchor = tiers["pools"][0][-1]
    assert s.anchor(b) == anchor and s.anchor(0) == mn
    drawn = []
    orig = s._draw
    s._draw = lambda bb: drawn.append(orig(bb)) or drawn[-1]
    c, bb, from_bank = s.sample()
    assert bb == b and not from_bank and len(drawn) == 5
    diffs = [_pref_by_hand(x, anchor) for x in drawn]
    assert c == drawn[int(np.argmin(diffs))]
    # a bank less than half full (official `len(bank) < banks_size // 2`): the first candidate, no comparison
    s.banks[b] = s.banks[b][:1]
    drawn.clear()
    c, _, _ = s.sample()
    assert len(drawn) == 1 and c == drawn[0]
    # the uniform model mode never compares
    u = _sampler(tiers, mn, net, use_bank=False)
    u.banks[b] = [[pool[0], -1.0]] * 4
    u._draw = lambda bb: drawn.append(orig(bb)) or drawn[-1]
    drawn.clear()
    u.current = b
    u.sample()
    assert len(drawn) == 1


def test_bank_draws_follow_softmax_of_negative_loss_and_insert_replaces_the_worst(space):
    configs, tiers, mn, mx, net = space
    s = _sampler(tiers, mn, net, model_mode="preference", use_bank=True, bank_size=4, bank_rate=1.0, seed=3)
    pool = tiers["pools"][2]
    s.current = 2
    s.banks[2] = [[pool[i], v] for i, v in enumerate([-0.1, -1.0, -2.0])]
    counts = {}
    for _ in range(4000):
        c, _, fb = s.sample()
        assert fb
        counts[E.arch_key(c)] = counts.get(E.arch_key(c), 0) + 1
    p = np.exp([-0.1, -1.0, -2.0]); p /= p.sum()
    freq = [counts.get(E.arch_key(pool[i]), 0) / 4000 for i in range(3)]
    assert np.allclose(freq, p, atol=0.03)
    s.bank_insert(pool[3], 2, -5.0)  # not full: appended
    assert len(s.banks[2]) == 4
    s.bank_insert(pool[4], 2, -9.0)  # full and worse than the worst: rejected
    assert [E.arch_key(c) for c, _ in s.banks[2]].count(E.arch_key(pool[4])) == 0
    s.bank_insert(pool[5], 2, -0.5)  # better than the worst (-5.0): replaces it
    losses = sorted(l for _, l in s.banks[2])
    assert losses == sorted([-0.1, -1.0, -2.0, -0.5])
    s.refresh(lambda c: -3.0, [2])
    assert all(l == -3.0 for _, l in s.banks[2])


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 1.0])
def test_f_divergence_surrogate_gradient_equals_the_closed_form_gradient(alpha):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    p = F.softmax(torch.randn(5, 7), 1)
    loss, grad_loss = E.f_divergence(logits, p, alpha, iw_clip=1e9)
    q = F.softmax(logits, 1)
    if abs(alpha - 1) < 1e-3:
        closed = (p * (p / q).log()).sum(1)  # KL(p || q)
    else:
        closed = ((q ** (1 - alpha) * p ** alpha).sum(1) - 1) / (alpha * (alpha - 1))
    assert torch.allclose(loss, closed.detach(), atol=1e-5)
    g1, = torch.autograd.grad(closed.sum(), logits)
    g2, = torch.autograd.grad(grad_loss.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_adaptive_alpha_divergence_takes_the_larger_side_per_sample():
    torch.manual_seed(1)
    logits = torch.randn(6, 5, requires_grad=True)
    p = F.softmax(3 * torch.randn(6, 5), 1)
    loss = E.alpha_divergence(logits, p, -1.0, 1.0, 5.0)
    ll, gl = E.f_divergence(logits, p, -1.0, 5.0)
    lr, gr = E.f_divergence(logits, p, 1.0, 5.0)
    want = torch.stack([gl[i] if ll[i] > lr[i] else gr[i] for i in range(6)]).mean()
    assert torch.allclose(loss, want)
    # a perfect student has zero gradient
    lg = torch.log(p).clone().requires_grad_(True)
    g, = torch.autograd.grad(E.alpha_divergence(lg, p), lg)
    assert g.abs().max() < 1e-5


def test_agc_matches_a_per_row_loop():
    torch.manual_seed(2)
    lin = torch.nn.Linear(4, 3)
    lin.weight.grad = torch.randn(3, 4)
    lin.bias.grad = torch.randn(3)
    W, G, bG, bW = lin.weight.detach().clone(), lin.weight.grad.clone(), lin.bias.grad.clone(), lin.bias.detach().clone()
    E.adaptive_clip_grad(lin.parameters(), 0.1)
    for i in range(3):
        mx = 0.1 * max(float(W[i].norm()), 1e-3)
        want = G[i] if float(G[i].norm()) < mx else G[i] * mx / float(G[i].norm())
        assert torch.allclose(lin.weight.grad[i], want, atol=1e-6)
    mxb = 0.1 * max(float(bW.norm()), 1e-3)
    wantb = bG if float(bG.norm()) < mxb else bG * mxb / float(bG.norm())
    assert torch.allclose(lin.bias.grad, wantb, atol=1e-6)


def test_bank_rate_schedule():
    rates = [E.bank_rate_at(s, 60, 0.2, 0.15) for s in range(60)]
    assert rates[0] == 0.2 and rates[8] == 0.2 and math.isclose(rates[9], 0.35) and math.isclose(rates[59], 0.2 + 6 * 0.15)


def test_training_step_is_deterministic_and_logs_the_cosine(space):
    configs, tiers, mn, mx, net = space
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    data = {"train": (X, y)}
    cfg = {**CFG, "steps": 5, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 1,
           "label_smoothing": 0.1, "agc_clip": 0.1, "n_uniform": 3, "bank_size": 2, "bank_sampling_rate": 0.5,
           "sampling_rate_inc": 0.15, "n_candidates": 3, "alpha_min": -1.0, "alpha_max": 1.0, "iw_clip": 5.0}
    outs = []
    for _ in range(2):
        n1, log = E.train_supernet("elasticvit", data, cfg, 0, tiers, mn)
        outs.append((torch.nn.utils.parameters_to_vector(n1.parameters()), log))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1]["cos"] == outs[1][1]["cos"]
    log = outs[0][1]
    assert len(log["cos"]) == 4 and all(-1 <= c <= 1 for c in log["cos"]) and len(log["tiers"]) == 15
    assert max(abs(a - b) for a, b in zip(log["tiers"][3::3], log["tiers"][:-3:3])) <= 1  # adjacent tiers
    with pytest.raises(ValueError):
        E.train_supernet("spos", data, cfg, 0, tiers, mn)


def test_notebook_has_parameters_cell_and_schema_rejects_bad_params():
    nb = json.loads((ROOT / "notebooks" / "elasticvit.ipynb").read_text())
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    import yaml
    sec = yaml.safe_load((ROOT / "params.yaml").read_text())["elasticvit"]
    assert len({**sec, **sec["profiles"]["quick"]}["seeds"]) >= 3
    import jsonschema
    from reprolab.registry import paper_entry
    schema = paper_entry("elasticvit")["params"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("cifar10", schema["dataset"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(0, schema["n_candidates"])


def _wiring_cfg(**kw):
    return {**CFG, "steps": 12, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 1,
            "label_smoothing": 0.1, "agc_clip": 0.1, "n_uniform": 3, "bank_size": 2, "bank_sampling_rate": 1.0,
            "sampling_rate_inc": 0.0, "n_candidates": 3, "alpha_min": -1.0, "alpha_max": 1.0, "iw_clip": 5.0,
            "cos_every": 2, **kw}


def _rand_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"train": (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))}


def test_step_losses_against_hand_formulas():
    torch.manual_seed(4)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    logp = F.log_softmax(logits, 1)
    want = (0.9 * -logp[torch.arange(6), y] + 0.1 * -logp.mean(1)).mean()  # label smoothing 0.1 by hand
    assert torch.allclose(E.child_loss(logits, y, {"label_smoothing": 0.1}), want, atol=1e-6)
    probs = [F.softmax(torch.randn(6, 10), 1) for _ in range(3)]
    cfg = {"alpha_min": -1.0, "alpha_max": 1.0, "iw_clip": 5.0}
    mean_p = (probs[0] + probs[1] + probs[2]) / 3  # the MEAN of the sampled children's softmax
    assert torch.allclose(E.min_child_loss(logits, probs, cfg), E.alpha_divergence(logits, mean_p, -1.0, 1.0, 5.0))
    assert not torch.allclose(E.min_child_loss(logits, probs, cfg), E.alpha_divergence(logits, probs[-1], -1.0, 1.0, 5.0))


def test_children_grad_equals_autograd_of_the_summed_losses(space):
    configs, tiers, mn, mx, net = space
    torch.manual_seed(5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    kids = [configs[3], configs[100], configs[-1]]
    g = E.children_grad(net, kids, x, y, {"label_smoothing": 0.1})
    assert all(p.grad is None for p in net.parameters())
    params = list(net.parameters())
    total = torch.zeros(sum(p.numel() for p in params))
    for c in kids:
        net.set_active_subnet(c)
        gs = torch.autograd.grad(F.cross_entropy(net(x), y, label_smoothing=0.1), params, allow_unused=True)
        total += torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(gs, params)])
    assert torch.allclose(g, total, atol=1e-6)


def test_training_wiring_banks_refreshes_and_same_batch_cosine(space):
    configs, tiers, mn, mx, net = space
    data, cfg = _rand_data(), _wiring_cfg()
    _, log = E.train_supernet("elasticvit", data, cfg, 0, tiers, mn)
    entries = [l for bank in log["banks"] for _, l in bank]
    assert entries and all(l < 0 for l in entries)  # banks filled, with -CE
    assert log["bank_draws"] > 0 and log["refresh_all"] == math.ceil(12 / 8)  # one full refresh per epoch start
    assert len(log["cos_same"]) == 5 and len(log["cos"]) == 11  # steps 2, 4, ..., 10 (step 0 has no predecessor)
    for arm in ("uniform", "complexity"):
        _, lg = E.train_supernet(arm, data, cfg, 0, tiers, mn)
        assert lg["bank_draws"] == 0 and all(not b for b in lg["banks"]) and lg["refresh_all"] == 0
    # consecutive steps that train the same child on the same batch and weights: the same-batch cosine is exactly 1
    one = {**tiers, "pools": [[configs[50]], [configs[50]]], "targets": tiers["targets"][:2]}
    _, lg = E.train_supernet("uniform", data, cfg, 0, one, mn)
    assert np.allclose(lg["cos_same"], 1.0, atol=1e-5) and min(lg["cos"]) < 0.999


def test_best_per_tier_picks_by_val_and_reports_test(space):
    configs, tiers, mn, mx, net = space
    g = torch.Generator().manual_seed(7)
    data = {k: (torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)) for k in ("val", "test")}
    small = {**tiers, "pools": [p[:4] for p in tiers["pools"][:2]]}
    got = E.best_per_tier(net, small, data)
    for b, pool in enumerate(small["pools"]):
        vals = [E.accuracy(net, c, *data["val"]) for c in pool]
        i = int(np.argmax(vals))
        assert got[b]["index"] == i and got[b]["val"] == max(vals)
        assert got[b]["test"] == E.accuracy(net, pool[i], *data["test"])
