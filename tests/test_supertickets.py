"""SuperTickets (nas.supertickets): the rules against hand formulas / naive loops, and a tiny end-to-end run."""
import numpy as np
import pytest
import torch

from reprolab.nas import space201
from reprolab.nas import supertickets as S
from reprolab.nas.flops import count_macs
from reprolab.nas.supernet201 import NB201SuperNet


def test_prune_ratio_matches_official_epoch_formula():
    # train.py:566-572 for the official ImageNet / COCO configs: every `interval` epochs,
    # ratio = (epoch + 1) // interval / 10, capped at target_ratio
    for target, interval, n_epochs in ((0.9, 25, 350), (0.8, 15, 210), (0.95, 25, 430), (0.3, 15, 210)):
        got = []
        want = []
        for epoch in range(n_epochs):
            if (epoch + 1) % interval == 0:
                r = (epoch + 1) // interval / 10
                want.append(target if r > target else r)
                got.append(S.prune_ratio((epoch + 1) // interval, 0.1, target))
        assert np.allclose(got, want)
        # the target is reached after n_prune_events events and never exceeded
        K = S.n_prune_events(0.1, target)
        assert S.prune_ratio(K, 0.1, target) == pytest.approx(target)
        assert S.prune_ratio(K - 1, 0.1, target) < target
    assert S.n_prune_events(0.1, 0.8) == 8 and S.n_prune_events(0.1, 0.95) == 10 and S.n_prune_events(0.2, 0.8) == 4


def _naive_reactivate(masks, grads, frac):
    pruned = [abs(float(g)) for k in masks for g, m in zip(grads[k].flatten(), masks[k].flatten()) if not m]
    thr = np.quantile(np.array(pruned), 1 - frac)
    out = {}
    for k in masks:
        flat = [bool(m) or bool(abs(float(g)) > thr) for g, m in zip(grads[k].flatten(), masks[k].flatten())]
        out[k] = torch.tensor(flat).view_as(masks[k])
    return out


def test_reactivation_restores_exactly_the_pruned_weights_with_large_gradients():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(6, 5, generator=g) > 0.6, "b": torch.rand(40, generator=g) > 0.3}
    grads = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(40, generator=g)}
    grads["a"][masks["a"]] *= 100.0  # huge gradients on KEPT weights must not change anything
    for frac in (0.1, 0.25, 0.5, 0.9):
        got = S.reactivate(masks, grads, frac)
        want = _naive_reactivate(masks, grads, frac)
        for k in masks:
            assert torch.equal(got[k], want[k])
            assert bool((got[k] | ~masks[k]).all())  # kept weights stay kept
        n_pruned = sum(int((~m).sum()) for m in masks.values())
        n_back = sum(int((got[k] & ~masks[k]).sum()) for k in masks)
        assert abs(n_back - frac * n_pruned) <= 1  # distinct gradients: the fraction asked for
        # every reactivated weight has a larger |grad| than every pruned weight left pruned
        back = torch.cat([grads[k].abs()[got[k] & ~masks[k]] for k in masks])
        left = torch.cat([grads[k].abs()[~got[k]] for k in masks])
        assert float(back.min()) > float(left.max())
    assert all(bool(m.all()) for m in S.reactivate(masks, grads, 1.0).values())  # official reset_mask
    assert all(torch.equal(a, masks[k]) for k, a in S.reactivate(masks, grads, 0.0).items())


def test_op_pruning_removes_the_lowest_alive_alpha_per_edge():
    alphas = torch.tensor([[0.5, -1.0, 0.2, 0.3, 0.1]] * 6)
    alphas[1] = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])  # tie between op 0 and op 1: the first goes
    alive = torch.ones(6, 5, dtype=torch.bool)
    alive[2] = torch.tensor([True, False, True, True, True])  # op 1 already dead: op 4 (0.1) goes now
    alive[3] = torch.tensor([False, False, False, True, False])  # one op left: untouched
    new = S.prune_ops(alphas, alive)
    assert not bool(new[0, 1]) and int(new[0].sum()) == 4
    assert not bool(new[1, 0]) and bool(new[1, 1])
    assert not bool(new[2, 4]) and int(new[2].sum()) == 3
    assert torch.equal(new[3], alive[3])
    assert int((alive & ~new).sum()) == 5 and not bool((new & ~alive).any())
    # four events leave exactly the argmax-ordered survivor of every edge
    a = alive.clone()
    a[:] = True
    for _ in range(4):
        a = S.prune_ops(alphas, a)
    assert torch.equal(a.float().argmax(1), torch.tensor([0, 4, 0, 0, 0, 0]))


def test_magnitude_masks_remove_the_smallest_weights_globally():
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    mods = S.prunable(net)
    masks = S.magnitude_masks(mods, 0.7)
    w = torch.cat([m.weight.detach().abs().flatten() for m in mods.values()])
    k = round(0.7 * w.numel())
    thr = torch.sort(w).values[k - 1]
    for n, m in mods.items():
        assert torch.equal(masks[n], m.weight.detach().abs() > thr)
    assert S.sparsity(masks) == pytest.approx(k / w.numel())
    # dead ops leave the pool
    alive = torch.zeros(6, 5, dtype=torch.bool)
    alive[:, 3] = True
    names = S.prunable(net, alive)
    assert all(".ops.3." in n for n in names if ".ops." in n) and any(".ops.3." in n for n in names)


def test_child_masks_and_effective_macs():
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    cell = (3, 2, 1, 3, 0, 4)
    alive = torch.zeros(6, 5, dtype=torch.bool)
    alive[range(6), list(cell)] = True
    masks = S.magnitude_masks(S.prunable(net, alive), 0.5)
    child = net.extract(cell)
    cm = S.child_masks(masks, cell)
    assert set(cm) == set(S.prunable(child))
    dense, eff = S.effective_macs(child, {k: torch.ones_like(v) for k, v in cm.items()})
    assert dense == eff == count_macs(child, torch.zeros(1, 1, 8, 8))
    # hand count: a half-density classifier saves half its MACs, nothing else pruned
    half = {k: torch.ones_like(v) for k, v in cm.items()}
    half["classifier.weight"][:, ::2] = False
    d2, e2 = S.effective_macs(child, half)
    assert d2 == dense and e2 == dense - child.classifier.weight.numel() // 2


def test_tiny_supertickets_and_pipeline_runs():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.arange(96) % 10
    data = {"train": (X[:64], y[:64]), "val": (X[64:80], y[64:80]), "test": (X[80:], y[80:])}
    cfg = dict(channels=4, n_cells=1, batch_size=32, lr=0.05, lr_min=0.001, momentum=0.9, weight_decay=3e-4,
               grad_clip=5.0, arch_lr=3e-3, arch_weight_decay=1e-3, st_steps=10, prune_interval=2,
               op_prune_interval=1, ratio_step=0.2, target_sparsity=0.8, reactivate_frac=0.5, ft_steps=2,
               search_steps=3, train_steps=3, retrain_steps=2)
    r = S.run_supertickets(0, data, cfg)
    assert r["sparsity"] == pytest.approx(0.8, abs=1e-3)
    ev = [e for e in r["log"] if e["event"] == "weights"]
    assert [e["ratio"] for e in ev] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert all(e["after_reactivation"] < e["sparsity"] for e in ev[:-1]) and "after_reactivation" not in ev[-1]
    assert [e["alive"] for e in r["log"] if e["event"] == "ops"] == [24, 18, 12, 6]
    assert r["steps"] == 12
    r2 = S.run_supertickets(0, data, cfg)
    assert r2["test_acc"] == r["test_acc"] and r2["cell"] == r["cell"]  # deterministic
    p = S.run_pipeline(0, data, cfg)
    assert p["sparsity"] == pytest.approx(0.8, abs=1e-3) and p["steps"] == 8
    bad = dict(cfg, op_prune_interval=3)  # op pruning would end after the last weight pruning
    with pytest.raises(ValueError):
        S.run_supertickets(0, data, bad)


def test_hard_masks_hold_during_training():
    torch.manual_seed(0)
    model = space201.NB201Network((3, 3, 3, 3, 3, 3), 4, 1, 10, 1)
    masks = S.magnitude_masks(S.prunable(model), 0.6)
    g = torch.Generator().manual_seed(0)
    data = {"train": (torch.randn(64, 1, 8, 8, generator=g), torch.arange(64) % 10)}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    cfg = dict(batch_size=32, lr=0.05, lr_min=0.0, momentum=0.9, weight_decay=1e-3, grad_clip=5.0)
    S._train_fixed(model, data, 4, cfg, 0, masks)
    params = dict(model.named_parameters())
    for k, m in masks.items():
        assert bool((params[k][~m] == 0).all())
        assert not torch.equal(params[k][m], before[k][m])


def test_weight_event_restores_reactivated_weights_with_their_stored_values():
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    params = dict(net.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    pool = S.prunable(net)
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(params[n].shape, generator=g) for n in pool}
    # final event: pruned weights are exactly 0, kept ones untouched, no gradient asked for
    m, e = S.weight_event(params, pool, 0.5, 1.0, lambda names: pytest.fail("no reactivation at the last event"), True)
    assert "after_reactivation" not in e and e["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for n in pool:
        assert bool((params[n][~m[n]] == 0).all()) and torch.equal(params[n][m[n]], before[n][m[n]])
    with torch.no_grad():
        for n in pool:
            params[n].copy_(before[n])
    # reset (frac 1, official reset_mask): every weight back with its stored value
    m, e = S.weight_event(params, pool, 0.5, 1.0, lambda names: grads, False)
    assert e["after_reactivation"] == 0.0 and all(bool(x.all()) for x in m.values())
    for n in pool:
        assert torch.equal(params[n], before[n])
    # frac 0.3: the reactivated weights come back with their stored (nonzero) values, the rest stay 0
    m0 = S.magnitude_masks(pool, 0.5)
    m, e = S.weight_event(params, pool, 0.5, 0.3, lambda names: grads, False)
    want = S.reactivate(m0, grads, 0.3)
    n_back = 0
    for n in pool:
        assert torch.equal(m[n], want[n])
        back = m[n] & ~m0[n]
        n_back += int(back.sum())
        assert torch.equal(params[n][back], before[n][back]) and bool((params[n][back] != 0).all())
        assert bool((params[n][~m[n]] == 0).all())
    assert n_back > 0
    # frac 0 (official cls_imagenet, reset_mask False): no gradient asked for, masks stay the magnitude masks
    m, e = S.weight_event(params, pool, 0.6, 0.0, lambda names: pytest.fail("frac 0 needs no gradient"), False)
    assert "after_reactivation" not in e and e["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_masked_softmax_gives_dead_ops_exactly_zero_weight():
    torch.manual_seed(0)
    net = NB201SuperNet(4, 1, 10, 1)
    with torch.no_grad():
        net.alphas.copy_(torch.randn(6, 5))
    alive = torch.rand(6, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    alive[:, 2] = True
    alive[0] = torch.tensor([False, True, True, False, False])
    w = S._arch_weights(net, alive)
    assert bool((w[~alive] == 0).all()) and torch.allclose(w.sum(1), torch.ones(6))
    for e in range(6):
        a = net.alphas[e][alive[e]].detach()
        assert torch.allclose(w[e][alive[e]], torch.exp(a) / torch.exp(a).sum())
    one = torch.zeros(6, 5, dtype=torch.bool)
    one[range(6), [1, 2, 3, 4, 0, 3]] = True
    assert S._arch_weights(net, one) == (1, 2, 3, 4, 0, 3)  # one op per edge: the single path


def _tiny():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.arange(96) % 10
    data = {"train": (X[:64], y[:64]), "val": (X[64:80] + 3.0, (y[64:80] + 3) % 10), "test": (X[80:], y[80:])}
    cfg = dict(channels=4, n_cells=1, batch_size=16, lr=0.05, lr_min=0.001, momentum=0.9, weight_decay=3e-4,
               grad_clip=5.0, arch_lr=3e-3, arch_weight_decay=1e-3, st_steps=10, prune_interval=2,
               op_prune_interval=1, ratio_step=0.2, target_sparsity=0.8, reactivate_frac=0.0, ft_steps=2,
               search_steps=3, train_steps=3, retrain_steps=2)
    return data, cfg


def test_first_alpha_step_uses_the_val_batch(monkeypatch):
    torch.set_num_threads(1)
    data, cfg = _tiny()
    got = []
    orig = S._arch_opt

    def spy(net, c):
        opt = orig(net, c)
        step = opt.step

        def st(*a, **k):
            if not got:
                got.append(net.alphas.grad.detach().clone())
            return step(*a, **k)
        opt.step = st
        return opt
    monkeypatch.setattr(S, "_arch_opt", spy)
    S.run_supertickets(0, data, cfg)
    # hand computation: the same init, the first val batch of the shared generator (drawn before the train batch)
    net = S._supernet(cfg, 0)
    g = torch.Generator().manual_seed(0)
    tr = S.batches(*data["train"], cfg["batch_size"], g)
    va = S.batches(*data["val"], cfg["batch_size"], g)
    xv, yv = next(va)
    net.train()
    torch.nn.functional.cross_entropy(net(xv, arch=torch.softmax(net.alphas, -1)), yv).backward()
    assert torch.allclose(got[0], net.alphas.grad, atol=1e-6)
    x, y = next(tr)
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x, arch=torch.softmax(net.alphas, -1)), y).backward()
    assert not torch.allclose(got[0], net.alphas.grad, atol=1e-4)


def test_final_networks_hold_the_target_sparsity_in_their_weights():
    torch.set_num_threads(1)
    data, cfg = _tiny()
    r = S.run_supertickets(0, data, cfg)
    p = S.run_pipeline(0, data, cfg)
    # measured on the weights of the final (fine-tuned / retrained) networks, not on the masks
    assert r["sparsity"] == pytest.approx(0.8, abs=2e-3) and p["sparsity"] == pytest.approx(0.8, abs=2e-3)
    ev = [e for e in r["log"] if e["event"] == "weights"]
    assert [e["sparsity"] for e in ev] == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=2e-3)
    assert all("after_reactivation" not in e for e in ev)  # frac 0: nested masks, no reactivation
    model = space201.NB201Network((3, 3, 3, 3, 3, 3), 4, 1, 10, 1)
    assert S.zero_fraction(model) == 0.0
    with torch.no_grad():
        model.classifier.weight.zero_()
    n = sum(m.weight.numel() for m in S.prunable(model).values())
    assert S.zero_fraction(model) == pytest.approx(model.classifier.weight.numel() / n)
