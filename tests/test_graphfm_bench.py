"""graphfm_bench: each SSL loss against a naive reimplementation; sampled forward with full fanout = full forward."""
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph import ssl  # noqa: E402
from reprolab.graph.datasets import load_graph  # noqa: E402

CFG = dict(hidden=16, n_layers=2, mae_mask_rate=0.5, mae_gamma=2.0, bgrl_pred_hidden=16, bgrl_tau=0.9,
           bgrl_p_edge=[0.2, 0.4], bgrl_p_feat=[0.2, 0.1], cca_lambda=1e-3, cca_p_edge=0.3, cca_p_feat=0.3,
           lr=0.01, weight_decay=0.0, epochs=2, fanouts=[3, 3], batch_size=16)


def test_sce_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for gamma in (1.0, 2.0, 3.0):
        ref = sum((1 - float(x[i] @ z[i]) / (math.sqrt(float(x[i] @ x[i])) * math.sqrt(float(z[i] @ z[i])))) ** gamma
                  for i in range(7)) / 7
        assert float(ssl.sce_loss(x, z, gamma)) == pytest.approx(ref, rel=1e-5)
    assert float(ssl.sce_loss(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)  # scale-invariant, zero on the target


def test_cca_ssg_loss_matches_explicit_formula():
    g = torch.Generator().manual_seed(1)
    h1, h2 = torch.randn(9, 4, dtype=torch.float64, generator=g), torch.randn(9, 4, dtype=torch.float64, generator=g)
    N, D, lam = 9, 4, 0.3
    z = []
    for h in (h1, h2):  # explicit column standardisation with the unbiased std
        cols = []
        for d in range(D):
            col = [float(h[i, d]) for i in range(N)]
            m = sum(col) / N
            sd = math.sqrt(sum((c - m) ** 2 for c in col) / (N - 1))
            cols.append([(c - m) / sd for c in col])
        z.append(np.array(cols).T)
    z1, z2 = z
    inv = -sum(z1[i, d] * z2[i, d] for i in range(N) for d in range(D)) / N
    dec = 0.0
    for zz in (z1, z2):
        for a in range(D):
            for b in range(D):
                dec += ((a == b) - sum(zz[i, a] * zz[i, b] for i in range(N)) / N) ** 2
    assert float(ssl.cca_ssg_loss(h1, h2, lam)) == pytest.approx(inv + lam * dec, rel=1e-9)
    # invariance term = ||Z1 - Z2||_F^2 / (2N) - D (N - 1) / N (the paper's eq. 4 up to a constant and a factor)
    assert inv == pytest.approx(((z1 - z2) ** 2).sum() / (2 * N) - D * (N - 1) / N, rel=1e-9)


def test_bgrl_loss_and_ema_update():
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(6, 3, generator=g, requires_grad=True), torch.randn(6, 3, generator=g, requires_grad=True)
    ref = 2 - 2 * np.mean([float(p[i] @ t[i]) / (float(p[i].norm()) * float(t[i].norm())) for i in range(6)])
    loss = ssl.bgrl_loss(p, t)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert t.grad is None  # stop-gradient on the target
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [q.detach().clone() for q in target.parameters()]
    ssl.ema_update(target, online, 0.9)
    for b, o, q in zip(before, online.parameters(), target.parameters()):
        assert torch.allclose(q, 0.9 * b + 0.1 * o.detach())


def test_sampled_forward_with_full_fanout_equals_full_batch():
    d = load_graph("powerlaw", 0, n=120, d=6, mean_degree=4.0)
    torch.manual_seed(0)
    enc = ssl.SAGEEncoder(6, 8, n_layers=2).eval()
    with torch.no_grad():
        full = enc(ssl.full_graphs(d.graph, 2), d.X)
        seeds = torch.tensor([3, 17, 50, 99])
        inp, out, blocks = dgl.dataloading.NeighborSampler([-1, -1]).sample_blocks(d.graph, seeds)
        sub = enc(blocks, d.X[inp])
        assert torch.equal(out, seeds)
        assert torch.allclose(sub, full[seeds], atol=1e-5)
        # with a small fanout the result differs (the test can fail)
        inp2, _, blocks2 = dgl.dataloading.NeighborSampler([1, 1]).sample_blocks(d.graph, seeds)
        assert not torch.allclose(enc(blocks2, d.X[inp2]), full[seeds], atol=1e-3)


def test_graphmae_remask_and_mask_token():
    """Masked nodes see the [MASK] token at the input and zero codes at the decoder input; loss only on them."""
    d = load_graph("powerlaw", 0, n=60, d=5, mean_degree=4.0)
    torch.manual_seed(0)
    m = ssl.GraphMAE(5, 8, mask_rate=0.5)
    ids = torch.arange(60)
    l1 = m.loss(ssl.full_graphs(d.graph, 3), d.X, ids, torch.Generator().manual_seed(3), 60)
    # changing the features of masked nodes must not change the encoder input (they are replaced by the token)
    mask = torch.rand(60, generator=torch.Generator().manual_seed(3)) < 0.5
    X2 = d.X.clone()
    X2[mask] += 100.0
    enc_in = []
    h = m.encoder.layers[0].register_forward_pre_hook(lambda mod, args: enc_in.append(args[1][0].clone()))
    m.loss(ssl.full_graphs(d.graph, 3), X2, ids, torch.Generator().manual_seed(3), 60)
    h.remove()
    assert torch.allclose(enc_in[0][mask], m.mask_token.expand(int(mask.sum()), -1))
    assert torch.allclose(enc_in[0][~mask], d.X[~mask])
    assert l1.requires_grad and float(l1) > 0


@pytest.mark.parametrize("method", ssl.METHODS)
@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_pretrain_runs_and_lowers_nothing_nan(method, mode):
    d = load_graph("powerlaw", 0, n=80, d=6, mean_degree=4.0)
    torch.manual_seed(0)
    model = ssl.make_method(method, 6, CFG)
    out = ssl.pretrain(model, d.graph, d.X, mode, CFG, seed=0)
    assert out["steps"] == (2 if mode == "full" else 2 * math.ceil(80 / 16))
    assert all(np.isfinite(out["losses"]))


def test_split_edges_and_metrics():
    d = load_graph("powerlaw", 0, n=200, d=4, mean_degree=6.0)
    g_tr, pos, neg = ssl.split_edges(d.graph, 0.2, 0)
    E = d.graph.num_edges() // 2
    assert pos.shape[1] == neg.shape[1] == round(0.2 * E)
    assert g_tr.num_edges() == 2 * (E - pos.shape[1])
    assert not g_tr.has_edges_between(torch.from_numpy(pos[0]), torch.from_numpy(pos[1])).any()
    assert not d.graph.has_edges_between(torch.from_numpy(neg[0]), torch.from_numpy(neg[1])).any()
    # AUC of a perfect and of an anti-perfect scorer
    Z = np.eye(4)[[0, 0, 1, 2]]
    assert ssl.link_auc(Z, np.array([[0], [1]]), np.array([[0], [2]])) == 1.0
    assert ssl.link_auc(Z, np.array([[0], [2]]), np.array([[0], [1]])) == 0.0


@pytest.mark.parametrize("method", ["graphmae", "bgrl"])
def test_pretrain_max_steps_equals_the_same_steps_run_uncapped(method):
    """Equal-steps budget: a sampled run capped at k whole epochs' worth of steps is bit-identical to the uncapped run
    of k epochs (independent reference: the plain epoch loop), and a cap inside an epoch stops exactly there."""
    torch.set_num_threads(1)  # DGL's neighbour sampling is reproducible under dgl.seed with one OpenMP thread
    d = load_graph("powerlaw", 0, n=80, d=6, mean_degree=4.0)
    per_epoch = math.ceil(80 / CFG["batch_size"])
    runs = []
    for cfg, cap in ((dict(CFG, epochs=1), None), (dict(CFG, epochs=5), per_epoch)):
        torch.manual_seed(0)
        dgl.seed(3)
        model = ssl.make_method(method, 6, cfg)
        out = ssl.pretrain(model, d.graph, d.X, "sampled", cfg, seed=0, max_steps=cap)
        runs.append((out, [p.detach().clone() for p in model.encoder.parameters()]))
    assert runs[0][0]["steps"] == runs[1][0]["steps"] == per_epoch
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    torch.manual_seed(0)
    out = ssl.pretrain(ssl.make_method(method, 6, CFG), d.graph, d.X, "sampled", dict(CFG, epochs=5), seed=0,
                       max_steps=per_epoch + 1)
    assert out["steps"] == per_epoch + 1
