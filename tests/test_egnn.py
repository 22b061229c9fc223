"""EGNN (arXiv 2305.15529): the stitched model, its loss and the editors, against independent references."""
import os

import numpy as np
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph.egnn import (GCN, MLP, StitchedGNN, edit_gd, egnn_mlp_loss, fit_stitched_mlp,  # noqa: E402
                                 select_targets, train_full_batch)
from reprolab.graph.graphdata import graph_from_edges, stratified_split  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared CPU


def problem(n=40, C=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    src, dst = np.nonzero(np.triu(rng.random((n, n)) < 0.15, 1))
    g = dgl.add_self_loop(graph_from_edges(src, dst, n))
    y = torch.from_numpy(rng.integers(0, C, n))
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + y[:, None].float()
    return g, X, y


def test_stitched_logits_are_gnn_plus_mlp_and_gnn_is_frozen():
    g, X, y = problem()
    torch.manual_seed(0)
    gnn, mlp = GCN(5, 8, 3), MLP(5, 8, 3)
    st = StitchedGNN(gnn, mlp, g, X)
    with torch.no_grad():
        ref = gnn(g, X) + mlp(g, X)  # independent: the two models evaluated separately
        idx = torch.tensor([3, 7, 11])
        assert torch.allclose(st(g, X), ref, atol=1e-6)
        assert torch.allclose(st.fast_forward(X[idx], idx), ref[idx], atol=1e-6)
    assert all(not p.requires_grad for p in st.gnn.parameters())
    assert all(p.requires_grad for p in gnn.parameters()), "the caller's GNN must stay trainable (GD baseline)"


def test_egnn_loss_matches_manual_kl_direction():
    torch.manual_seed(1)
    out, gnn_logits, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    p = gnn_logits.softmax(-1)
    q = out.softmax(-1)
    ce = -torch.log(q[torch.arange(6), y]).mean()
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # KL(GNN || stitched), as in the official finetune_mlp
    got = egnn_mlp_loss(out, gnn_logits.log_softmax(-1), y, kl_weight=0.7)
    assert torch.allclose(got, ce + 0.7 * kl, atol=1e-6)
    assert not torch.allclose(got, ce + 0.7 * (q * (q.log() - p.log())).sum(-1).mean(), atol=1e-4)


def test_fit_reduces_loss_and_never_touches_gnn():
    g, X, y = problem()
    torch.manual_seed(0)
    gnn = GCN(5, 8, 3)
    st = StitchedGNN(gnn, MLP(5, 8, 3), g, X)
    before = {k: v.clone() for k, v in st.gnn.state_dict().items()}
    cache = st.gnn_out.clone()
    losses = fit_stitched_mlp(st, X, y, torch.arange(30), iters=60, batch_size=16, lr=0.01)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(torch.equal(before[k], v) for k, v in st.gnn.state_dict().items())
    assert torch.equal(cache, st.gnn_out)


def test_edit_flips_target_and_leaves_original_model_intact():
    g, X, y = problem()
    torch.manual_seed(0)
    gnn = GCN(5, 8, 3)
    split = stratified_split(y, (0.5, 0.25, 0.25), 0)
    train_full_batch(gnn, g, X, y, split, epochs=30, lr=0.01)
    with torch.no_grad():
        pred = gnn(g, X).argmax(-1)
    wrong = torch.nonzero(pred != y).squeeze(1)
    assert len(wrong) > 0
    t = int(wrong[0])
    orig = {k: v.clone() for k, v in gnn.state_dict().items()}
    edited, ok, steps = edit_gd(gnn, g, X, t, int(y[t]), lr=0.01, max_steps=500)
    assert ok and steps >= 1
    with torch.no_grad():
        assert int(edited(g, X)[t].argmax()) == int(y[t])
    assert all(torch.equal(orig[k], v) for k, v in gnn.state_dict().items()), "edits start from an untouched copy"
    # already-correct node: zero steps, success
    right = int(torch.nonzero(pred == y)[0])
    _, ok2, steps2 = edit_gd(gnn, g, X, right, int(y[right]), lr=0.01, max_steps=5)
    assert ok2 and steps2 == 0


def test_egnn_edit_changes_only_the_mlp():
    g, X, y = problem()
    torch.manual_seed(0)
    st = StitchedGNN(GCN(5, 8, 3), MLP(5, 8, 3), g, X)
    with torch.no_grad():
        pred = st(g, X).argmax(-1)
    t = 0
    target = int((pred[t] + 1) % 3)
    edited, ok, _ = edit_gd(st, g, X, t, target, lr=0.05, max_steps=500, stitched=True)
    assert ok
    assert all(torch.equal(a, b) for a, b in zip(st.gnn.parameters(), edited.gnn.parameters()))
    assert torch.equal(st.gnn_out, edited.gnn_out)
    assert any(not torch.equal(a, b) for a, b in zip(st.mlp.parameters(), edited.mlp.parameters()))


def test_targets_are_misclassified_validation_nodes():
    g, X, y = problem(n=60)
    torch.manual_seed(0)
    gnn = GCN(5, 8, 3)
    val = torch.arange(20, 60)
    with torch.no_grad():
        pred = gnn(g, X).argmax(-1)
    T = select_targets(gnn, g, X, y, val, 10, seed=0)
    assert len(T) == min(10, int((pred[val] != y[val]).sum()))
    assert all(int(t) in set(val.tolist()) and int(pred[t]) != int(y[t]) for t in T)


def test_egnn_edit_against_the_official_single_edit_loop():
    """Reference: the official loop transcribed (henryzhongsc/gnn_editing pipelines/seed_gnn/utils.py:133-166,
    single_edit: each step computes the logits, the CE loss and y_pred, then steps Adam, then checks y_pred, i.e. the
    prediction from BEFORE that step), on a plain copy of the MLP with logits = cached GNN row + MLP(x), dropout off.
    edit_gd follows the same rule: same step count, same success, same weights at the end; also with a step cap
    that cuts the loop at the flip (a flip made by the last allowed step is a failure)."""
    import copy

    import torch.nn.functional as F

    g, X, y = problem(seed=2)
    torch.manual_seed(0)
    gnn = GCN(5, 8, 3)
    split = stratified_split(y, (0.5, 0.25, 0.25), 0)
    train_full_batch(gnn, g, X, y, split, epochs=20, lr=0.01)
    st = StitchedGNN(gnn, MLP(5, 8, 3), g, X)
    with torch.no_grad():
        pred = st(g, X).argmax(-1)
        gnn_row = gnn.eval()(g, X)
    wrong = torch.nonzero(pred != y).squeeze(1)
    assert len(wrong) > 0
    for t in wrong[:3].tolist():
        edited, ok, steps = edit_gd(st, g, X, t, int(y[t]), lr=0.01, max_steps=300, stitched=True)
        assert ok and steps >= 1
        mlp = copy.deepcopy(st.mlp).eval()
        opt = torch.optim.Adam(mlp.parameters(), lr=0.01)
        success = False
        for step in range(1, 301):
            opt.zero_grad()
            out = gnn_row[t:t + 1] + mlp(None, X[t:t + 1])
            loss = F.cross_entropy(out, y[t:t + 1])
            y_pred = out.argmax(dim=-1)
            loss.backward()
            opt.step()
            success = bool(y_pred == y[t])
            if success:
                break
        assert success and step == steps and steps >= 2
        for a, b in zip(edited.mlp.parameters(), mlp.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
        # cap = steps - 1: the flip happens on the last allowed step, its prediction is never checked -> failure
        _, ok_cap, steps_cap = edit_gd(st, g, X, t, int(y[t]), lr=0.01, max_steps=steps - 1, stitched=True)
        assert not ok_cap and steps_cap == steps - 1
