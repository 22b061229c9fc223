"""Deep Incubation: the stage partition (official ``_register_modules``), module incubation keeps every meta stage
frozen and trains only the target module, assembly copies the modules exactly (and composes them: forward = hybrid 0's
stem and blocks -> hybrid 1's blocks -> ... -> the last hybrid's blocks and head), the MAC / compute counter against
torch's FLOP counter and a hand computation, the equal-compute E2E step count, the matching-compute interpolation."""
import copy
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


from reprolab.config import ParamError, load_params, read_params
from reprolab.tf import deep_incubation as D

CFG = dict(d_model=8, n_heads=1, head_dim=8, mlp_hidden=16, n_classes=10, patch_size=4, depths=[1, 2, 1],
           batch_size=16, lr=1e-2, weight_decay=0.05, label_smoothing=0.1, meta_steps=3, module_steps=3, ft_steps=2,
           warmup_frac_meta=0.0, warmup_frac_module=0.0, warmup_frac_ft=0.0, warmup_frac_e2e=0.0, ft_grad_clip=1.0)


torch.set_num_threads(1)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {"train": (X, y), "val": (X[:16], y[:16]), "test": (X[16:32], y[16:32])}


def test_stage_partition_follows_register_modules():
    m = D.build_vit(CFG, [1, 2, 1], 8, 0)
    names = D.stage_names(m, [1, 2, 1])
    flat = [n for s in names for n in s]
    assert sorted(flat) == sorted(n for n, _ in m.named_parameters()) and len(set(flat)) == len(flat)
    assert {"cls", "pos", "patch.linear.weight"} <= set(names[0])
    assert {"ln_f.weight", "head.linear.weight"} <= set(names[2])
    assert {n.split(".")[1] for n in names[1] if n.startswith("blocks")} == {"1", "2"}
    assert {n.split(".")[1] for n in names[0] if n.startswith("blocks")} == {"0"}
    assert not any(n.startswith(("ln_f", "head", "cls", "pos", "patch")) for n in names[1])
    # stage-local names: stage 1's second block is its local block 1
    st = D.stage_state(m, [1, 2, 1], 1)
    assert torch.equal(st["blocks.1.q.linear.weight"], m.blocks[2].q.linear.weight)


@pytest.fixture(scope="module")
def meta_and_data():
    data = _data()
    return D.train_meta(data, CFG, 0)[0], data


@pytest.mark.parametrize("i", [0, 1, 2])
def test_incubation_trains_only_the_target_module_and_keeps_meta_frozen(i, meta_and_data):
    meta, data = meta_and_data
    meta_before = {n: p.detach().clone() for n, p in meta.named_parameters()}
    K, hd = 3, D.hybrid_depths(CFG["depths"], i)
    fresh = D.build_vit(CFG, hd, 8, 1000 * 0 + 10 + i)  # the hybrid's initialisation (same seed as incubate_module)
    hyb, curve = D.incubate_module(meta, i, data, CFG, 0)
    assert len(curve) == CFG["module_steps"]
    for j in range(K):
        got = D.stage_state(hyb, hd, j)
        if j != i:  # every meta stage equals the trained meta model's, bit for bit, after the incubation steps
            want = D.stage_state(meta, D.meta_depths(K), j)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        else:  # the target module was trained (moved away from its initialisation)
            init = D.stage_state(fresh, hd, j)
            assert any(not torch.equal(got[k], init[k]) for k in init)
    # the meta model itself is untouched
    assert all(torch.equal(p, meta_before[n]) for n, p in meta.named_parameters())


def test_assembly_copies_modules_exactly_and_composes_them(meta_and_data):
    meta, data = meta_and_data
    hybrids = [D.incubate_module(meta, i, data, CFG, 0, steps=2)[0] for i in range(3)]
    target = D.assemble(hybrids, CFG, 8, 0)
    depths = CFG["depths"]
    for i, h in enumerate(hybrids):
        a, b = D.stage_state(target, depths, i), D.stage_state(h, D.hybrid_depths(depths, i), i)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = data["test"][0][:5]
    with torch.no_grad():
        h = hybrids[0].embed(x)  # stem of module 0
        for i, hyb in enumerate(hybrids):
            blocks = D.stage_blocks(D.hybrid_depths(depths, i))[i]
            for b in blocks:
                h, _ = hyb.blocks[b](h, False)
        want = hybrids[-1].pool_head(h)
        assert torch.allclose(target(x), want, atol=1e-6)


def test_part_macs_match_torch_flop_counter_and_hand_formula():
    m = D.build_vit(CFG, [1, 2, 1], 8, 0)
    parts = D.part_macs(m)
    # hand: T = 4 patches + CLS = 5, e = hq = 8, mlp 16: block = 5 (4*8*8 + 2*8*16) + 2*25*8
    assert parts == [4 * 16 * 8] + [5 * (4 * 64 + 2 * 128) + 2 * 25 * 8] * 4 + [8 * 10]
    assert sum(parts) == m.macs()
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 1, 8, 8))
    assert fc.get_total_flops() == 2 * sum(parts)


def test_training_cost_by_hand():
    depths = [1, 2, 1]
    m = D.build_vit(CFG, depths, 8, 0)
    E, b, H = 512, 2960, 80
    fwd = E + 4 * b + H
    assert D.train_cost_per_sample(m, depths) == 3 * fwd  # everything trained
    assert D.train_cost_per_sample(m, depths, 0) == 3 * fwd
    assert D.train_cost_per_sample(m, depths, 1) == fwd + 2 * (3 * b + H)  # stem + block 0 forward only
    assert D.train_cost_per_sample(m, depths, 2) == fwd + 2 * (b + H)
    plan = D.compute_plan(CFG, 8)
    meta_fwd, B = E + 3 * b + H, CFG["batch_size"]
    assert plan["meta"] == 3 * meta_fwd * CFG["meta_steps"] * B
    h1 = E + 4 * b + H  # hybrid of module 1: depths [1, 2, 1]
    assert plan["module1"] == (h1 + 2 * (3 * b + H)) * CFG["module_steps"] * B
    h2 = E + 3 * b + H  # hybrid of module 2: depths [1, 1, 1]
    assert plan["module2"] == (h2 + 2 * (b + H)) * CFG["module_steps"] * B
    assert plan["finetune"] == 3 * fwd * CFG["ft_steps"] * B
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    s = D.e2e_steps(plan["total"], CFG, 8)
    assert abs(s * B * 3 * fwd - plan["total"]) <= 0.5 * B * 3 * fwd


def test_matching_compute_interpolates_in_log_compute():
    assert D.matching_compute([1, 2, 4], [0.5, 0.7, 0.9], 0.4) == 1.0
    assert math.isinf(D.matching_compute([1, 2, 4], [0.5, 0.7, 0.9], 0.95))
    assert D.matching_compute([1, 2, 4], [0.5, 0.7, 0.9], 0.8) == pytest.approx(2 * math.sqrt(2))
    assert D.matching_compute([1, 2, 4], [0.5, 0.7, 0.9], 0.7) == pytest.approx(2.0)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    m = D.build_vit(CFG, [1, 1], 8, 0)
    nd = {id(p) for p in D.no_decay_params(m)}
    names = {n for n, p in m.named_parameters() if id(p) in nd}
    assert {"cls", "pos", "ln_f.weight", "ln_f.bias", "head.linear.bias", "blocks.0.ln1.weight"} <= names
    assert not any(n.endswith("linear.weight") for n in names)


def test_params_schema_rejects_bad_values():
    base = read_params()
    cfg = load_params("deep_incubation", "smoke", base)
    assert cfg["depths"] == [2, 2] and 1.0 in cfg["e2e_budgets"]
    params = copy.deepcopy(base)
    params["deep_incubation"]["dataset"] = "cifar10"
    with pytest.raises(ParamError):
        load_params("deep_incubation", "smoke", params)
    params = copy.deepcopy(base)
    params["deep_incubation"]["depths"] = [4]
    with pytest.raises(ParamError):
        load_params("deep_incubation", "smoke", params)


def test_phase_recipes_wired_as_configured(monkeypatch):
    """Every phase and E2E use the same loop, lr and batch; warm-up / clipping per phase as configured (review)."""
    calls = []

    def fake_train(model, data, steps, loss_fn, **kw):
        calls.append((steps, kw["warmup_steps"], kw["grad_clip"], kw["lr"], kw["batch_size"]))
        return [0.0] * steps

    monkeypatch.setattr(D, "train_model", fake_train)
    cfg = dict(CFG, meta_steps=10, module_steps=20, ft_steps=30, warmup_frac_meta=0.1, warmup_frac_module=0.2,
               warmup_frac_ft=0.3, warmup_frac_e2e=0.4)
    D.run_incubation(_data(), cfg, 0)
    D.run_e2e(_data(), cfg, 0, 50)
    assert calls == [(10, 1, None, 1e-2, 16)] + [(20, 4, None, 1e-2, 16)] * 3 + [(30, 9, 1.0, 1e-2, 16),
                                                                                  (50, 20, None, 1e-2, 16)]
    calls.clear()  # lr_incubation: the meta, module and FT phases use it, E2E keeps lr
    D.run_incubation(_data(), dict(cfg, lr_incubation=3e-2), 0)
    D.run_e2e(_data(), dict(cfg, lr_incubation=3e-2), 0, 50)
    assert [c[3] for c in calls] == [3e-2] * 5 + [1e-2]
