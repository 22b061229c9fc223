"""Grokking Tickets (arXiv 2310.19470) and the shared pruning masks: each piece against an independent reference."""
import numpy as np
import pytest
import torch
from torch import nn

from reprolab.pruning.grokking_tickets import (GrokMLP, masked_from_init, modular_addition_split, norm_ratio,
                                               pai_random_masks, scaled_from_init, ticket_masks, train, weights)
from reprolab.pruning.masks import (apply_masks, global_magnitude_masks, layerwise_magnitude_masks, masks_of,
                                    random_masks, remove_masks, rewind, sparsity_of)


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed=0, p=7, d_emb=12, d_model=5):
    torch.manual_seed(seed)
    return GrokMLP(p, d_emb, d_model)


def _numpy_global_mask(arrays, amount):
    """By hand: pool |w| of every array, remove the round(amount * N) smallest (no ties with continuous weights)."""
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    k = int(round(amount * flat.size))
    cut = np.sort(flat)[k - 1] if k else -np.inf
    return [np.abs(a) > cut for a in arrays]


@pytest.mark.parametrize("amount", [0.1, 0.4, 0.6, 0.9])
def test_global_magnitude_mask_matches_numpy_topk(amount):
    net = _net()
    ws = [m.weight.detach().numpy().copy() for m, _ in net.targets()]
    masks = global_magnitude_masks(net.targets(), amount, model=net)
    ref = _numpy_global_mask(ws, amount)
    for (key, m), r in zip(masks.items(), ref):
        assert np.array_equal(m.numpy(), r), key
    n = sum(w.size for w in ws)
    assert sum(int((~m).sum()) for m in masks.values()) == round(amount * n)  # exact count removed
    assert sparsity_of(masks) == pytest.approx(round(amount * n) / n)
    # the targets themselves are left unpruned
    assert not hasattr(net.embed, "weight_orig")


def test_layerwise_mask_matches_numpy_per_layer():
    net = _net(1)
    masks = layerwise_magnitude_masks(net.targets(), 0.5, model=net)
    for (m, _), (key, mask) in zip(net.targets(), masks.items()):
        w = m.weight.detach().numpy()
        (ref,) = _numpy_global_mask([w], 0.5)
        assert np.array_equal(mask.numpy(), ref), key


def test_random_mask_count_and_seed():
    net = _net(2)
    n = sum(m.weight.numel() for m, _ in net.targets())
    a = random_masks(net.targets(), 0.6, generator=torch.Generator().manual_seed(3), model=net)
    b = random_masks(net.targets(), 0.6, generator=torch.Generator().manual_seed(3), model=net)
    assert sum(int((~m).sum()) for m in a.values()) == round(0.6 * n)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # not a magnitude mask: the kept set is unrelated to |w|
    mag = global_magnitude_masks(net.targets(), 0.6, model=net)
    assert not all(torch.equal(a[k], mag[k]) for k in a)


def test_apply_rewind_keeps_mask_and_restores_init():
    net = _net(3)
    init = weights(net)
    with torch.no_grad():  # "train": move every weight
        for m, _ in net.targets():
            m.weight.add_(torch.randn_like(m.weight))
    masks = global_magnitude_masks(net.targets(), 0.6, model=net)
    apply_masks(net.targets(), masks, model=net)
    rewind(net.targets(), init, model=net)
    for (m, _), key in zip(net.targets(), masks):
        expect = init[key] * masks[key]  # the mask applied by hand to the initial weights
        assert torch.equal(m(), expect)
        assert torch.equal(m.weight_orig.detach(), init[key])
    assert all(torch.equal(masks_of(net.targets(), model=net)[k], masks[k]) for k in masks)
    remove_masks(net.targets())
    assert isinstance(net.embed.weight, nn.Parameter) and not hasattr(net.embed, "weight_mask")


def test_pruned_weights_get_no_gradient_and_stay_zero_in_training():
    torch.manual_seed(0)
    data = modular_addition_split(7, 0.5, 0)
    net = _net(4)
    init = weights(net)
    masks = global_magnitude_masks(net.targets(), 0.6, model=net)
    ticket = masked_from_init(init, masks, 7, 12, 5)
    train(ticket, data, lr=1e-2, weight_decay=1.0, max_steps=20, eval_every=5, test_target=2.0)
    for key, w in weights(ticket).items():
        assert torch.all(w[~masks[key]] == 0), key
        assert not torch.equal(w[masks[key]], init[key][masks[key]])  # the kept weights did train


def test_forward_equals_official_order():
    net = _net(5, p=11, d_emb=20, d_model=6)
    x = torch.tensor([(a, b) for a in range(11) for b in range(11)])
    torch.testing.assert_close(net(x), net.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_split_matches_official_gen_train_test():
    import random
    p, frac, seed = 11, 0.4, 2
    pairs = [(i, j) for i in range(p) for j in range(p) if i <= j]  # official data_module.py gen_train_test
    random.seed(seed)
    random.shuffle(pairs)
    div = int(frac * len(pairs))
    x_tr, y_tr, x_te, y_te = modular_addition_split(p, frac, seed)
    assert x_tr.tolist() == [list(t) for t in pairs[:div]] and x_te.tolist() == [list(t) for t in pairs[div:]]
    assert y_tr.tolist() == [(a + b) % p for a, b in pairs[:div]]


def test_norm_ratio_and_scaling():
    net = _net(6)
    init = weights(net)
    masks = ticket_masks(init, 0.6)
    c = norm_ratio(init, masks)
    by_hand = sum(np.linalg.norm((init[k] * masks[k]).numpy()) for k in init) / sum(
        np.linalg.norm(init[k].numpy()) for k in init)
    assert c == pytest.approx(by_hand, rel=1e-6) and 0 < c < 1
    dense = scaled_from_init(init, c, 7, 12, 5)
    got = sum(float(torch.linalg.norm(w)) for w in weights(dense).values())
    want = sum(float(torch.linalg.norm(init[k] * masks[k])) for k in init)
    assert got == pytest.approx(want, rel=1e-5)  # the dense init now has the ticket's summed L2 norm


def test_train_records_memorisation_and_stops():
    torch.manual_seed(0)
    data = modular_addition_split(11, 0.5, 0)
    net = _net(7, p=11, d_emb=32, d_model=16)
    run = train(net, data, lr=1e-2, weight_decay=0.0, max_steps=150, eval_every=5, test_target=2.0,
                snapshot_memorise=True)
    assert run.step_memorise is not None and run.train_acc[run.steps.index(run.step_memorise)] == 1.0
    assert all(a < 1.0 for s, a in zip(run.steps, run.train_acc) if s < run.step_memorise)
    assert "memorise" in run.snapshots and run.step_generalise is None and run.steps[-1] == 150
    m = pai_random_masks(weights(net), 0.6, seed=0)
    assert sparsity_of(m) == pytest.approx(0.6, abs=1e-2)


def test_masked_from_init_is_init_times_mask_by_hand():
    """The rewound ticket: every weight the network uses equals init * mask, computed by hand (not via rewind)."""
    net = _net(8)
    init = weights(net)
    with torch.no_grad():
        for m, _ in net.targets():
            m.weight.mul_(-3.0).add_(1.0)  # "trained" weights far from init
    trained = weights(net)
    masks = ticket_masks(trained, 0.6)
    ticket = masked_from_init(init, masks, 7, 12, 5)
    for n, (m, _) in zip(["embed", "inproj", "outproj", "unembed"], ticket.targets()):
        k = f"{n}.weight"
        by_hand = init[k].numpy() * masks[k].numpy()
        assert np.array_equal(m().detach().numpy(), by_hand), k
        assert np.array_equal(m.weight_orig.detach().numpy(), init[k].numpy()), k
    x = torch.tensor([(a, b) for a in range(7) for b in range(7)])
    ref = GrokMLP(7, 12, 5)
    with torch.no_grad():
        for n in ["embed", "inproj", "outproj", "unembed"]:
            getattr(ref, n).weight.copy_(init[f"{n}.weight"] * masks[f"{n}.weight"])
    torch.testing.assert_close(ticket(x), ref.forward_reference(x))


def test_magnitude_mask_of_pruned_module_reads_orig_times_mask_after_a_step():
    """After an optimiser step without a forward, ``module.weight`` is stale; masks must use orig * mask."""
    net = _net(9)
    first = global_magnitude_masks(net.targets(), 0.5, model=net)
    apply_masks(net.targets(), first, model=net)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    x = torch.tensor([(a, b) for a in range(7) for b in range(7)])
    loss = net(x).square().sum()
    loss.backward()
    opt.step()  # weight_orig moved; the attribute weight still holds the pre-step value
    now = [(m.weight_orig * m.weight_mask).detach().numpy() for m, _ in net.targets()]
    got = global_magnitude_masks(net.targets(), 0.7, model=net)
    for (key, g), r in zip(got.items(), _numpy_global_mask(now, 0.7)):
        assert np.array_equal(g.numpy(), r), key
    lay = layerwise_magnitude_masks(net.targets(), 0.7, model=net)
    for (key, g), w in zip(lay.items(), now):
        assert np.array_equal(g.numpy(), _numpy_global_mask([w], 0.7)[0]), key


def _by_hand_train(cfg, seed, n_steps):
    """The dense model trained from the seed's init for n_steps full-batch AdamW updates, in a plain loop."""
    import torch.nn.functional as F
    x_tr, y_tr, x_te, y_te = modular_addition_split(cfg["p"], cfg["frac_train"], seed, cfg["symmetric"])
    torch.manual_seed(seed)
    net = GrokMLP(cfg["p"], cfg["d_emb"], cfg["d_model"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98),
                            foreach=True)
    for _ in range(n_steps):
        opt.zero_grad()
        F.cross_entropy(net(x_tr).double(), y_tr).backward()
        opt.step()
    with torch.no_grad():
        te = float((net(x_te).argmax(-1) == y_te).double().mean())
    return {f"{n}.weight": getattr(net, n).weight.detach().clone() for n in
            ["embed", "inproj", "outproj", "unembed"]}, te


def test_run_seed_takes_each_mask_from_its_snapshot():
    from reprolab.pruning.grokking_tickets import run_seed
    cfg = dict(p=11, frac_train=0.5, symmetric=False, d_emb=24, d_model=12, lr=0.01, weight_decay=1.0,
               max_steps=400, eval_every=10, test_target=0.3, ticket_at_test_acc=0.4, prune_amount=0.6, arm_cap=0.7)
    out = run_seed(cfg, 3, keep=True)
    it = out["internals"]
    assert out["dense_grokked"]
    dense_step = out["arms"]["dense"]["step"]
    # the ticket: magnitude mask of the dense weights at the first evaluation with test acc >= ticket_at_test_acc
    w, te = _by_hand_train(cfg, 3, out["ticket_taken_at"])
    assert te >= cfg["ticket_at_test_acc"] and out["ticket_taken_at"] >= dense_step
    _, te_before = _by_hand_train(cfg, 3, out["ticket_taken_at"] - cfg["eval_every"])
    assert te_before < cfg["ticket_at_test_acc"]
    keys = list(w)
    for k, r in zip(keys, _numpy_global_mask([w[k].numpy() for k in keys], 0.6)):
        assert np.array_equal(it["masks"]["ticket"][k].numpy(), r), k
    # the memorisation-stage mask: weights halfway between memorisation and the dense 95% step
    # (this tiny net reaches the test target before 100% train accuracy: the rule's fallback, dense_step // 2)
    m0 = out["dense_step_memorise"]
    mem_step = (dense_step if m0 is None else m0 + dense_step) // 2
    assert out["mem_mask_taken_at"] == mem_step and 0 < mem_step < dense_step
    wm, _ = _by_hand_train(cfg, 3, mem_step)
    for k, r in zip(keys, _numpy_global_mask([wm[k].numpy() for k in keys], 0.6)):
        assert np.array_equal(it["masks"]["memorisation_mask"][k].numpy(), r), k
    # the norm ratio uses the ticket's mask on the init; the cap is ceil(arm_cap x dense step)
    init = it["init"]
    by_hand = sum(np.linalg.norm(init[k].numpy() * it["masks"]["ticket"][k].numpy()) for k in keys) / sum(
        np.linalg.norm(init[k].numpy()) for k in keys)
    assert out["norm_ratio"] == pytest.approx(by_hand, rel=1e-6)
    assert out["cap"] == max(cfg["eval_every"], int(np.ceil(cfg["arm_cap"] * dense_step)))
    for arm in ("ticket", "norm_matched", "pai_random", "memorisation_mask"):
        a = out["arms"][arm]
        assert a["step"] <= out["cap"] and (a["reached"] or a["step"] == out["cap"]), arm


def _tiny_linear(seed=0):
    """x (B, 3) -> W1 (4, 3) -> W2 (2, 4), no bias, no nonlinearity: scores have closed forms."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    return net, [(net[0], "weight"), (net[1], "weight")]


def test_snip_scores_every_weight_by_finite_differences():
    from reprolab.pruning.masks import snip_masks
    net, tg = _tiny_linear(1)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    loss = lambda: nn.functional.cross_entropy(net(x), y)
    ws = [m.weight.detach().numpy().copy() for m, _ in tg]
    ref_scores = []
    for li, (m, _) in enumerate(tg):  # exhaustive: every weight, central differences
        sc = np.zeros_like(ws[li])
        for idx in np.ndindex(*sc.shape):
            with torch.no_grad():
                m.weight[idx] = ws[li][idx] + 1e-6
                up = float(loss())
                m.weight[idx] = ws[li][idx] - 1e-6
                dn = float(loss())
                m.weight[idx] = ws[li][idx]
            sc[idx] = abs((up - dn) / 2e-6 * ws[li][idx])
        ref_scores.append(sc)
    for amount in (0.25, 0.5, 0.75):
        got = snip_masks(tg, loss, amount)
        flat = np.concatenate([s.ravel() for s in ref_scores])
        k = round(amount * flat.size)
        cut = np.sort(flat)[k - 1]
        for g, s in zip(got.values(), ref_scores):
            assert np.array_equal(g.numpy(), s > cut), amount
    assert all(np.array_equal(m.weight.detach().numpy(), w) for (m, _), w in zip(tg, ws))  # weights untouched


def test_synflow_iterative_matches_closed_form():
    from reprolab.pruning.masks import synflow_masks
    net, tg = _tiny_linear(2)
    ones = torch.ones(1, 3, dtype=torch.float64)
    w1, w2 = [m.weight.detach().numpy().copy() for m, _ in tg]
    n, amount, iters = w1.size + w2.size, 0.5, 3
    k1, k2 = np.ones_like(w1, bool), np.ones_like(w2, bool)
    for k in range(1, iters + 1):  # R = 1^T |W2| |W1| 1: dR/dW1[i,j] = sum_o |W2[o,i]|, dR/dW2[o,i] = sum_j |W1[i,j]|
        a1, a2 = np.abs(w1) * k1, np.abs(w2) * k2
        s1 = a2.sum(0)[:, None] * a1
        s2 = a1.sum(1)[None, :] * a2
        r = round(amount * n) if k == iters else round((1 - (1 - amount) ** (k / iters)) * n)
        cut = np.sort(np.concatenate([s1.ravel(), s2.ravel()]))[r - 1]
        k1, k2 = s1 > cut, s2 > cut
    got = list(synflow_masks(tg, lambda: net(ones), amount, iterations=iters).values())
    assert np.array_equal(got[0].numpy(), k1) and np.array_equal(got[1].numpy(), k2)
    assert int((~got[0]).sum() + (~got[1]).sum()) == round(amount * n)
    assert np.array_equal(net[0].weight.detach().numpy(), w1)  # restored, signs included
