"""SWS learngene: the official layers-source rule, the Aux-Net shares one layer per stage (forward = a naive loop over
the stage's repeats; the shared layer's gradient = the sum over its applications in an untied copy), the expansion
copies each stage's learngene into exactly its layers (equal, independent tensors; depth = Aux depth reproduces the
Aux-Net), the probe against scikit-learn, the KD batches see their own teacher logits, the lr selection, the cost
counter and the parameter schema."""
import copy

import numpy as np
import pytest
import torch

from reprolab.config import ParamError, load_params, read_params
from reprolab.tf import sws_learngene as S

torch.set_num_threads(1)
CFG = dict(d_model=8, n_heads=2, head_dim=4, mlp_hidden=16, n_classes=10, patch_size=4, pool="mean",
           stages=[2, 1, 3], depths=[3, 4, 6], aux_epochs=1, aux_lr=1e-3, aux_warmup_frac=0.0, kd_tau=1.0,
           batch_size=16, ft_epochs=1, scratch_epochs=[2], lr_grid=[1e-3, 3e-3], weight_decay=0.05,
           label_smoothing=0.1)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return {"train": (X, y), "val": (X[:16], y[:16]), "test": (X[16:32], y[16:32])}


def test_layers_source_is_the_official_rule():
    assert S.layers_source(12, 5) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]  # README --layers-source
    assert S.layers_source(9, 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert S.layers_source(4, 3) == [0, 0, 1, 2]
    assert S.stage_lengths(16, 5) == [4, 3, 3, 3, 3] and sum(S.stage_lengths(7, 3)) == 7
    with pytest.raises(ValueError):
        S.layers_source(2, 3)


def test_aux_net_shares_one_layer_per_stage():
    aux = S.build_aux(CFG, [2, 1, 3], 8, 0)
    assert len(aux.blocks) == 3 and list(aux.cfg.loops) == [2, 1, 3]
    # stored parameters: three layers, not six
    one_layer = sum(p.numel() for p in aux.blocks[0].parameters())
    plain = S.build_vit(CFG, 6, 8, 0)
    assert S.unique_params(plain) - S.unique_params(aux) == 3 * one_layer
    # forward = embed, then a naive loop applying stage s's single layer stages[s] times
    x = _data()["train"][0][:5]
    h = aux.embed(x)
    for blk, reps in zip(aux.blocks, [2, 1, 3]):
        for _ in range(reps):
            h, _ = blk(h, False)
    torch.testing.assert_close(aux(x), aux.pool_head(h))
    # the shared layer's gradient is the sum of the gradients of its applications in an untied 6-layer copy
    untied = S.expand(aux, 6)
    # untied copy with aux's exact stage assignment (2, 1, 3 -- not the balanced rule): build it by hand
    for i, s in enumerate([0, 0, 1, 2, 2, 2]):
        untied.blocks[i].load_state_dict(aux.blocks[s].state_dict())
    torch.testing.assert_close(untied(x), aux(x))
    aux(x).square().sum().backward()
    untied(x).square().sum().backward()
    for s, layers in {0: [0, 1], 1: [2], 2: [3, 4, 5]}.items():
        for (n, p), *copies in zip(aux.blocks[s].named_parameters(),
                                   *[untied.blocks[i].parameters() for i in layers]):
            torch.testing.assert_close(p.grad, sum(c.grad for c in copies), rtol=1e-5, atol=1e-7, msg=n)


def test_expand_copies_each_learngene_into_exactly_its_layers():
    aux = S.build_aux(CFG, [3, 3, 3], 8, 0)
    with torch.no_grad():  # make the three learngenes clearly different
        for s, blk in enumerate(aux.blocks):
            for p in blk.parameters():
                p.add_(0.1 * (s + 1))
    des = S.expand(aux, 5, seed=7)
    src = S.layers_source(5, 3)
    assert src == [0, 0, 1, 1, 2]
    for i, s in enumerate(src):
        for (n, pd), (_, pa) in zip(des.blocks[i].named_parameters(), aux.blocks[s].named_parameters()):
            assert torch.equal(pd, pa), (i, n)
            assert pd.data_ptr() != pa.data_ptr()
        for t in range(3):  # and not equal to another stage's learngene
            if t != s:
                assert not torch.equal(des.blocks[i].q.linear.weight, aux.blocks[t].q.linear.weight)
    for n in ("cls", "pos", "patch.linear.weight", "ln_f.weight", "head.linear.weight", "head.linear.bias"):
        assert torch.equal(dict(des.named_parameters())[n], dict(aux.named_parameters())[n]), n
    # layers of the same stage are independent tensors after expansion (fine-tuning unties them)
    with torch.no_grad():
        des.blocks[0].fc1.linear.weight.add_(1.0)
    assert not torch.equal(des.blocks[0].fc1.linear.weight, des.blocks[1].fc1.linear.weight)
    assert not torch.equal(des.blocks[0].fc1.linear.weight, aux.blocks[0].fc1.linear.weight)
    # a descendant with the Aux-Net's own stage lengths computes exactly the Aux-Net
    x = _data()["train"][0][:4]
    torch.testing.assert_close(S.expand(aux, 9)(x), aux(x))
    assert not torch.allclose(S.expand(aux, 6)(x), aux(x))


def test_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 1.5
    y = rng.integers(0, 3, 90)
    X = centres[y] + rng.normal(size=(90, 6)) * 3.0
    data = {"train": (None, torch.tensor(y)), "test": (None, torch.tensor(y))}
    feats = {"train": X * 5 + 2, "test": X * 5 + 2}
    r = S.fit_probe(feats, data, C=0.3, max_iter=200)
    Z = (X * 5 + 2 - r["mu"].numpy()) / r["sd"].numpy()
    ref = LogisticRegression(C=0.3, tol=1e-10, max_iter=5000).fit(Z, y)
    np.testing.assert_allclose(r["W"].numpy().T, ref.coef_, atol=2e-4)
    np.testing.assert_allclose(r["b"].numpy(), ref.intercept_, atol=2e-4)
    assert r["acc"]["train"] == pytest.approx(ref.score(Z, y))


def test_kd_batches_see_their_own_teacher_logits():
    data = _data(40)
    aux = S.build_aux(CFG, [1, 2], 8, 0)
    with torch.no_grad():
        own = aux(data["train"][0])
    cfg = dict(CFG, aux_lr=1e-12, weight_decay=0.0, aux_epochs=2)
    losses = S.train_aux(aux, data, own, cfg, seed=3)  # teacher = the model itself: zero KD iff rows are aligned
    assert len(losses) == 2 * S.steps_per_epoch(data, 16) and max(losses) < 1e-7
    shuffled = own[torch.roll(torch.arange(40), 1)]
    assert min(S.train_aux(S.build_aux(CFG, [1, 2], 8, 0), data, shuffled, cfg, seed=3)) > 1e-5
    x = torch.randn(5, 10)
    t = torch.randn(40, 10)
    idx = torch.tensor([3, 0, 7, 7, 1])
    ref = torch.sum(torch.softmax(t[idx], 1) * (torch.log_softmax(t[idx], 1) - torch.log_softmax(x, 1)), 1).mean()
    loss = S.kd_loss_fn(t, 1.0)(lambda _: x, None, idx, 0)
    torch.testing.assert_close(loss, ref)


def test_tuned_keeps_the_best_validation_lr():
    data = _data()
    r = S.tuned(lambda: S.build_vit(CFG, 3, 8, 0), data, dict(CFG, lr_grid=[1e-5, 1e-3, 3e-2]), 1, seed=0)
    vals = {k: g["val"] for k, g in r["grid"].items()}
    best = max(vals.values())
    assert r["val"] == best and vals[f"{r['lr']:g}"] == best
    assert list(vals)[[v == best for v in vals.values()].index(True)] == f"{r['lr']:g}"  # earliest on ties
    assert r["steps"] == S.steps_per_epoch(data, 16) == 3


def test_cost_counter_counts_every_application():
    aux = S.build_aux(CFG, [2, 1, 3], 8, 0)
    assert aux.macs() == S.build_vit(CFG, 6, 8, 0).macs()
    c = aux.cfg
    T, e, hq, m = c.n_patches + 1, c.d_model, c.n_heads * c.head_dim, c.mlp_hidden
    block = T * (4 * e * hq + 2 * e * m) + 2 * T * T * hq
    assert aux.macs() == 6 * block + c.n_patches * 16 * e + e * 10
    assert S.train_macs_per_sample(aux) == 3 * aux.macs()
    data = _data()
    plan = S.compute_plan(dict(CFG, stages=[2, 1, 3]), data, teacher_macs_per_image=100)
    assert plan["teacher_features"] == 100 * 48
    assert plan["aux"] == 1 * 3 * 16 * 3 * aux.macs()
    assert plan["train_d4_ep2"] == 6 * 16 * 3 * S.build_vit(CFG, 4, 8, 0).macs()


def test_epochs_to_match():
    assert S.epochs_to_match([1, 10], [0.5, 0.9], 0.4) == 1.0
    assert S.epochs_to_match([1, 10], [0.5, 0.9], 0.95) == float("inf")
    assert S.epochs_to_match([1, 10, 100], [0.5, 0.7, 0.9], 0.8) == pytest.approx(10 ** 1.5)


def test_params_schema():
    base = read_params()
    cfg = load_params("sws_learngene", "quick", base)
    assert cfg["depths"] == [3, 6, 9] and cfg["threshold_beats_scratch"] == 0.05
    for bad in ({"depths": [3, 6]}, {"teacher_model": "resnet"}, {"lr_grid": []}, {"stages": [0, 3]},
                {"cost_match_items": ["student"]}):
        params = copy.deepcopy(base)
        params["sws_learngene"].update(bad)
        with pytest.raises(ParamError):
            load_params("sws_learngene", "quick", params)


def test_no_decay_is_the_timm_rule():
    m = S.build_vit(CFG, 2, 8, 0)
    nd = {id(p) for p in S.no_decay_params(m)}
    for n, p in m.named_parameters():
        exempt = p.ndim <= 1 or n in ("pos", "cls")  # biases, LayerNorm weights / biases, position / class tokens
        assert (id(p) in nd) == exempt, n
    assert any(id(p) not in nd for p in m.parameters()) and any(id(p) in nd for p in m.parameters())


def test_cost_matched_budget_equals_the_sws_route():
    data = _data()
    cfg = dict(CFG, stages=[2, 1, 3], aux_epochs=4, cost_match_items=["teacher_features", "aux"])
    spe, B = S.steps_per_epoch(data, 16), 16
    per_step = sum(B * 3 * S.build_vit(cfg, d, 8, 0).macs() for d in cfg["depths"])
    # without the learngene cost the route is the SWS fine-tuning itself: the same steps as ft_epochs
    r0 = S.cost_matched_budget(dict(cfg, cost_match_items=[]), data, teacher_macs_per_image=10 ** 6)
    assert r0["steps"] == spe * cfg["ft_epochs"] and r0["epochs"] == cfg["ft_epochs"]
    r = S.cost_matched_budget(cfg, data, teacher_macs_per_image=10 ** 6)
    route = 10 ** 6 * 48 + 4 * spe * B * 3 * S.build_aux(cfg, [2, 1, 3], 8, 0).macs() + r0["route_macs"]
    assert r["route_macs"] == route and abs(r["steps"] * per_step - route) <= per_step / 2
    assert r["epochs"] == r["steps"] / spe and S.scratch_budgets(cfg, r["epochs"]) == sorted({1, 2, r["epochs"]})
    plan = S.compute_plan(cfg, data, 10 ** 6, r["epochs"])
    assert sum(plan[f"train_d{d}_ep{r['epochs']:g}"] for d in cfg["depths"]) == r["steps"] * per_step
