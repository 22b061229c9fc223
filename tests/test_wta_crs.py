"""WTA-CRS (arXiv 2305.15265): unbiasedness, variance (closed form vs Monte Carlo, WTA-CRS < CRS on a skewed
distribution), the autograd layer against nn.Linear, and the saved-activation meter against hand counts."""
import itertools

import pytest
import torch
from torch import nn

from reprolab.memory.meter import SavedTensorMeter, peak_memory_bytes, step_memory, tensor_bytes
from reprolab.memory.wta_crs import (GradNormCache, WTACRSLinear, apply_wta_crs, column_row_probs, crs_variance,
                                     deterministic_size, empirical_variance, estimate_weight_grad, sample_pairs,
                                     wta_crs_variance)


def skewed_pairs(N=48, d_in=6, d_out=5, seed=0):
    """Column-row pairs whose norms are heavy-tailed (a few rows carry most of the mass), as in the paper's Fig. 2."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(2.0 * torch.randn(N, 1, generator=gen))  # log-normal row scales
    x = torch.randn(N, d_in, generator=gen, dtype=torch.float64) * scale
    g = torch.randn(N, d_out, generator=gen, dtype=torch.float64) * scale.sqrt()
    return x, g


def mean_and_stderr(x, g, p, k, sampler, draws, seed):
    gen = torch.Generator().manual_seed(seed)
    ests = torch.stack([estimate_weight_grad(x, g, *sample_pairs(p, k, sampler, gen)) for _ in range(draws)])
    return ests.mean(0), ests.std(0) / draws ** 0.5


@pytest.mark.parametrize("sampler", ["wta_crs", "crs"])
def test_estimator_is_unbiased(sampler):
    x, g = skewed_pairs()
    p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
    k = 12
    if sampler == "wta_crs":
        assert 0 < deterministic_size(p, k) < k  # the test exercises both the winners and the sampled part
    mean, se = mean_and_stderr(x, g, p, k, sampler, draws=3000, seed=1)
    G = g.T @ x
    z = (mean - G) / se.clamp_min(1e-12)
    # 30 entries, each z ~ N(0, 1) if unbiased: |z| < 4.5 for all of them fails with probability < 1e-3
    assert z.abs().max() < 4.5, z.abs().max()


def test_unbiasedness_check_can_fail():
    """The same check flags the biased deterministic top-k estimator, so the unbiasedness test has teeth."""
    x, g = skewed_pairs()
    p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
    gen = torch.Generator().manual_seed(0)
    wta = torch.stack([estimate_weight_grad(x, g, *sample_pairs(p, 12, "wta_crs", gen)) for _ in range(3000)])
    topk = estimate_weight_grad(x, g, *sample_pairs(p, 12, "topk"))
    z = (topk - g.T @ x) / (wta.std(0) / 3000 ** 0.5)
    assert z.abs().max() > 4.5


def test_deterministic_size_matches_brute_force():
    for seed, k in itertools.product(range(5), (2, 5, 12, 30)):
        x, g = skewed_pairs(seed=seed)
        p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
        q = sorted(p.tolist(), reverse=True)
        best_c, best = 0, 1.0 / k  # c = 0 is CRS, whose bound is 1/k
        for c in range(1, k):
            score = (1 - sum(q[:c])) / (k - c)
            if score < best - 1e-15:
                best_c, best = c, score
        assert deterministic_size(p, k) == best_c


def test_closed_form_variance_matches_monte_carlo():
    x, g = skewed_pairs()
    p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
    gen = torch.Generator().manual_seed(3)
    for sampler, closed in (("crs", crs_variance), ("wta_crs", wta_crs_variance)):
        emp, _ = empirical_variance(x, g, p, 12, sampler, 4000, gen)
        assert emp == pytest.approx(closed(x, g, p, 12), rel=0.1)


def test_wta_crs_variance_below_crs_on_skewed_pairs():
    x, g = skewed_pairs()
    p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
    for k in (6, 12, 24):
        assert wta_crs_variance(x, g, p, k) < 0.7 * crs_variance(x, g, p, k)
    gen = torch.Generator().manual_seed(5)
    v_crs, _ = empirical_variance(x, g, p, 12, "crs", 1000, gen)
    v_wta, _ = empirical_variance(x, g, p, 12, "wta_crs", 1000, gen)
    assert v_wta < v_crs
    # on uniform norms there is nothing to win: WTA-CRS falls back to CRS
    ones = torch.ones(40, 3, dtype=torch.float64)
    pu = column_row_probs(ones.norm(dim=1), ones.norm(dim=1))
    assert deterministic_size(pu, 10) == 0


def test_layer_matches_linear_and_is_unbiased_through_autograd():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    layer = WTACRSLinear.from_linear(lin, keep_ratio=0.25, generator=torch.Generator().manual_seed(0))
    scale = torch.exp(1.5 * torch.randn(2, 10, 1))
    x = (torch.randn(2, 10, 6) * scale).double()
    lin.double(), layer.double()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(2, 10, 4, dtype=torch.float64)
    (lin(x1) * gy).sum().backward()
    exact_w, exact_b = lin.weight.grad.clone(), lin.bias.grad.clone()
    draws, acc = 2000, []
    for _ in range(draws):
        layer.zero_grad()
        x2.grad = None
        out = layer(x2)
        assert torch.allclose(out, lin(x))
        (out * gy).sum().backward()
        acc.append(layer.weight.grad.clone())
        assert torch.allclose(x2.grad, x1.grad)  # input gradient stays exact
        assert torch.allclose(layer.bias.grad, exact_b)
    acc = torch.stack(acc)
    z = (acc.mean(0) - exact_w) / (acc.std(0) / draws ** 0.5).clamp_min(1e-12)
    assert z.abs().max() < 4.5
    layer.eval()
    assert torch.equal(layer(x), lin(x))


def test_grad_norm_cache_feeds_the_next_visit():
    torch.manual_seed(0)
    cache = GradNormCache(num_examples=5, seq_len=3)
    layer = WTACRSLinear(4, 2, keep_ratio=0.5, cache=cache, cache_key="l")
    x = torch.randn(2, 3, 4)
    cache.batch_ids = torch.tensor([1, 3])
    assert cache.get("l") is None
    gy = torch.randn(2, 3, 2)
    (layer(x) * gy).sum().backward()
    assert torch.allclose(cache.store["l"][[1, 3]], gy.norm(dim=-1))
    assert torch.equal(cache.store["l"][[0, 2, 4]], torch.zeros(3, 3))
    assert torch.allclose(cache.get("l"), gy.norm(dim=-1).reshape(-1))


def test_meter_counts_saved_rows_exactly():
    """nn.Linear saves its whole input; WTACRSLinear saves k rows + k int64 indices; parameters never count."""
    torch.manual_seed(0)
    N, d_in, d_out, keep = 40, 16, 8, 0.25
    model = nn.Sequential(nn.Linear(d_in, d_out))
    x = torch.randn(N, d_in)
    with SavedTensorMeter(model) as meter:
        model(x).sum()
    assert meter.bytes_by_kind() == {"Linear": N * d_in * 4}
    apply_wta_crs(model, keep, scope="0")
    with SavedTensorMeter(model) as meter:
        model(x).sum()
    k = int(N * keep)
    assert meter.bytes_by_kind() == {"WTACRSLinear": k * d_in * 4 + k * 8}


def test_meter_counts_shared_storage_once_and_peak_is_deterministic():
    torch.manual_seed(0)
    q, k = nn.Linear(8, 8), nn.Linear(8, 8)
    h = torch.randn(32, 8, requires_grad=True)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = q, k

        def forward(self, h):
            return (self.q(h) * self.k(h)).sum()

    model = Two()
    with SavedTensorMeter(model) as meter:
        model(h)
    # h is saved by both linears (counted once); the product saves both outputs (32 x 8 floats each)
    assert meter.total_bytes == 32 * 8 * 4 * 3
    out = step_memory(model, lambda: model(h))
    assert out["saved_bytes"] == meter.total_bytes
    peaks = {peak_memory_bytes(lambda: model(h).backward()) for _ in range(3)}
    model.zero_grad(set_to_none=True)
    assert len(peaks) == 1 and peaks.pop() >= meter.total_bytes
    assert tensor_bytes([h, h[:2], {"a": h}]) == 32 * 8 * 4


def test_layer_pass_fraction_against_a_naive_loop_and_trivial_layers_have_zero_variance():
    from reprolab.memory.wta_crs import layer_pass_fraction

    ratios, rows, k, th = [0.5, 0.9, 0.0, 0.7, 0.0], [100, 100, 3, 50, 4], 4, 0.7
    kept = [r for r, n in zip(ratios, rows) if n > k]  # naive: drop layers with <= k non-zero gradient rows
    assert layer_pass_fraction(ratios, rows, k, th) == (sum(r <= th for r in kept) / len(kept), 2)
    assert layer_pass_fraction([0.1, 0.2], [1, 2], 4, th) == (0.0, 2)  # nothing non-trivial: 0, not a pass
    # why a layer with <= k non-zero gradient rows is trivial: every pair with p > 0 is a winner, so zero variance
    torch.manual_seed(0)
    N, k = 64, 8
    x, g = torch.randn(N, 5, dtype=torch.float64), torch.zeros(N, 3, dtype=torch.float64)
    g[torch.randperm(N)[:k]] = torch.randn(k, 3, dtype=torch.float64)  # k non-zero rows (the [CLS] rows)
    p = column_row_probs(x.norm(dim=1), g.norm(dim=1))
    v_wta, v_crs = wta_crs_variance(x, g, p, k), crs_variance(x, g, p, k)
    assert v_crs > 0 and v_wta <= 1e-6 * v_crs  # zero up to column_row_probs' eps on the zero rows


def test_held_out_probe_batch_shares_no_passage_with_training():
    """The variance claim probes the seed's first test passages: none of them may be a training passage (checked
    row by row against every training row) and the two splits partition the drawn passages."""
    from reprolab.lm import load_encoder
    from reprolab.memory.text_tasks import author_passages
    try:
        tok = load_encoder("minilm-l6")[1]
    except Exception as e:  # pragma: no cover - the model cache is a DVC output
        pytest.skip(f"minilm-l6 not available: {e}")
    for seed in (0, 1):
        train, test = author_passages(tok, 24, 32, 3, seed, 0.25)
        probe = test["input_ids"][:16]  # (16, 32): the notebook's held-out probe batch (probe_batch <= n_test)
        train_rows = {tuple(r) for r in train["input_ids"].tolist()}
        assert not any(tuple(r) in train_rows for r in probe.tolist())
        assert len(train["labels"]) + len(test["labels"]) == 2 * 24
