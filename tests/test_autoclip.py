"""Automatic clipping (arXiv 2206.07136): the AUTO-S factor, its R-independence, and the experiment's pieces."""
import numpy as np
import pytest
import torch
from torch import nn

from reprolab.config import load_params
from reprolab.dp import clip_factor_auto_s, clip_factors, clipped_sum, private_grad, sensitivity
from reprolab.dp.autoclip import dp_schedule, load_split, run_grid, split_validation, summarize_grid
from reprolab.dp.train import DPConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster, and does not spin on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_auto_s_factor_formula():
    norms = torch.tensor([0.0, 1e-3, 0.5, 1.0, 7.0, 1e4])
    C = clip_factor_auto_s(norms)  # the paper's eq. and fastDP: 1 / (||g_i|| + 0.01)
    torch.testing.assert_close(C, 1.0 / (norms + 0.01))
    assert (C * norms < 1).all(), "every clipped per-sample gradient has norm < 1 (sensitivity 1)"
    torch.testing.assert_close(C[-1] * norms[-1], torch.tensor(1e4 / (1e4 + 0.01)))  # large norms -> norm 1
    torch.testing.assert_close(clip_factors(norms, "auto_s", R=123.0), C)  # R plays no role
    assert sensitivity("auto_s", R=123.0) == 1.0 and sensitivity("abadi", R=0.3) == 0.3
    # Abadi for comparison: min(1, R/||g||)
    torch.testing.assert_close(clip_factors(norms[2:], "abadi", R=1.0), torch.tensor([1.0, 1.0, 1 / 7.0, 1e-4]),
                               rtol=1e-5, atol=1e-6)


def test_small_R_abadi_is_auto_v_times_R():
    """The paper's observation behind AUTO-S: when R < min ||g_i||, Abadi's private gradient / R equals the
    normalized (gamma = 0) one, noise included, so R only rescales the learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    R = 1e-3
    _, norms, _ = clipped_sum(model, x, y, clipping="abadi", R=R)
    assert (norms > 100 * R).all()
    kw = dict(gamma=0.0, sigma=0.8, expected_batch_size=8.0)
    g_abadi, _ = private_grad(model, x, y, clipping="abadi", R=R, generator=torch.Generator().manual_seed(1), **kw)
    g_auto, _ = private_grad(model, x, y, clipping="auto_s", R=R, generator=torch.Generator().manual_seed(1), **kw)
    for n in g_auto:
        torch.testing.assert_close(g_abadi[n] / R, g_auto[n], rtol=1e-4, atol=1e-6)


def test_split_is_fixed_and_balanced():
    a = load_split("mnist5k", 0.2, 0)
    b = load_split("mnist5k", 0.2, 0)
    assert [t.shape[0] for t in a] == [4000, 4000, 1000, 1000] and a[0].shape[1] == 784
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert 0.0 <= a[0].min() and a[0].max() <= 1.0
    counts = np.bincount(a[1].numpy(), minlength=10)
    assert counts.min() > 300, "labels must span the ten digits"
    d = load_split("digits", 0.2, 0)
    assert d[0].shape == (1438, 64) and d[2].shape == (359, 64)


def test_dp_schedule_spends_the_budget():
    s = dp_schedule(4000, 256, 10, 3.0, 1e-5)
    assert s["sample_rate"] == 256 / 4000 and s["steps"] == 156 and 1.0 < s["sigma"] < 2.5


def test_validation_split_is_disjoint_and_fixed():
    X_tr, y_tr, _, _ = load_split("digits", 0.2, 0)
    a = split_validation(X_tr, y_tr, 0.125, 0)
    b = split_validation(X_tr, y_tr, 0.125, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    n_val = round(0.125 * len(X_tr))
    assert len(a[2]) == n_val and len(a[0]) == len(X_tr) - n_val
    rows = {tuple(r.tolist()) for r in X_tr}
    tr_rows, va_rows = [{tuple(r.tolist()) for r in t} for t in (a[0], a[2])]
    assert tr_rows | va_rows <= rows and len(a[0]) + len(a[2]) == len(X_tr)
    # every training row lands in exactly one of the two parts (digits has a few duplicate images, so count rows)
    assert sorted(map(tuple, torch.cat([a[0], a[2]]).tolist())) == sorted(map(tuple, X_tr.tolist()))


def test_summary_selects_on_validation_and_reports_test():
    """Independent reference: a hand-made grid where the validation and test optima differ."""
    S, nR, nL = 3, 2, 3
    acc = {"abadi": np.zeros((S, nR, nL, 2)), "auto_s": np.zeros((S, nL, 2))}
    acc["abadi"][:, 0, 2, 0] = 0.9  # best on validation: R index 0, lr index 2
    acc["abadi"][:, 1, 0, 1] = 0.95  # best on test: another cell (must NOT be chosen)
    acc["abadi"][:, 0, 2, 1] = [0.80, 0.82, 0.84]
    acc["auto_s"][:, 1, 0] = 0.9
    acc["auto_s"][:, 1, 1] = [0.79, 0.80, 0.81]
    s = summarize_grid(acc, [0.1, 1.0], [0.01, 0.1, 1.0], [0.01, 0.1, 1.0])
    assert (s["abadi_best_R"], s["abadi_best_lr"], s["auto_s_best_lr"]) == (0.1, 1.0, 0.1)
    np.testing.assert_allclose(s["abadi_selected_per_seed"], [80, 82, 84])
    np.testing.assert_allclose(s["auto_s_selected_per_seed"], [79, 80, 81])
    assert s["gap_points"] == pytest.approx(2.0)


def test_tiny_grid_runs_and_summarizes():
    cfg = load_params("autoclip", "smoke")
    X_tr, y_tr, X_te, y_te = load_split("digits", cfg["test_fraction"], cfg["seed"])
    data = (*split_validation(X_tr[:300], y_tr[:300], 0.2, 0), X_te[:100], y_te[:100])
    s = dp_schedule(240, 30, 1, 3.0, 1e-5)
    base = DPConfig(sigma=s["sigma"], sample_rate=s["sample_rate"], steps=s["steps"], momentum=0.9,
                    per_sample="ghost")
    acc = run_grid(data, base, 16, [0.1, 1.0], [0.3], [0.3, 1.0], [0])
    assert acc["abadi"].shape == (1, 2, 1, 2) and acc["auto_s"].shape == (1, 2, 2)
    summary = summarize_grid(acc, [0.1, 1.0], [0.3], [0.3, 1.0])
    assert summary["gap_points"] == pytest.approx(summary["abadi_selected_acc"] - summary["auto_s_selected_acc"])
    again = run_grid(data, base, 16, [0.1, 1.0], [0.3], [0.3, 1.0], [0])
    assert np.array_equal(acc["abadi"], again["abadi"]), "a run is a deterministic function of its seed"
