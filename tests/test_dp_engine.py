"""DP engine (reprolab.dp) against independent references: a naive per-example loop, opacus's GradSampleModule
and DPOptimizer, an exact RDP computation for the subsampled Gaussian, and plain SGD."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from reprolab.dp import (DPConfig, clip_and_sum, clip_factors, clipped_sum, dp_step, epsilon_spent, make_optimizer,
                         noise_multiplier, per_sample_grads, per_sample_norms, poisson_batches, private_grad,
                         train_dp)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster, and does not spin on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(seed=0, d=12, h=8, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def batch(shape, c=3, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, *shape, generator=g), torch.randint(0, c, (n,), generator=g)


def naive_clipped_sum(model, x, y, style, R=1.0, gamma=0.01):
    """One backward per example, clip with the paper's formula, sum: the reference."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
        C = min(1.0, R / (norm + 1e-6)) if style == "abadi" else 1.0 / (norm + gamma)
        for n in total:
            total[n] += C * g[n]
        norms.append(norm)
    return total, torch.tensor(norms)


@pytest.mark.parametrize("style", ["abadi", "auto_s"])
@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_clipped_sum_matches_naive_loop(style, method):
    model = mlp()
    x, y = batch((12,))
    R = float(naive_clipped_sum(model, x, y, style)[1].median())  # clips some examples and not others
    ref, ref_norms = naive_clipped_sum(model, x, y, style, R=R)
    assert (ref_norms > R).any() and (ref_norms < R).any()
    summed, norms, losses = clipped_sum(model, x, y, clipping=style, R=R, per_sample=method)
    torch.testing.assert_close(norms, ref_norms.float(), rtol=1e-5, atol=1e-6)
    for n in ref:
        torch.testing.assert_close(summed[n], ref[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, F.cross_entropy(model(x), y, reduction="none").detach())


@pytest.mark.parametrize("style", ["abadi", "auto_s"])
def test_vmap_on_a_cnn_matches_naive_loop(style):
    model = cnn()
    x, y = batch((1, 6, 6), c=4)
    ref, _ = naive_clipped_sum(model, x, y, style, R=0.3)
    summed, _, _ = clipped_sum(model, x, y, clipping=style, R=0.3, per_sample="vmap")
    for n in ref:
        torch.testing.assert_close(summed[n], ref[n], rtol=1e-5, atol=1e-6)


def test_ghost_refuses_unsupported_layers():
    with pytest.raises(NotImplementedError):
        clipped_sum(cnn(), *batch((1, 6, 6), c=4), clipping="abadi", per_sample="ghost")


@pytest.mark.parametrize("make,shape,c", [(mlp, (12,), 3), (cnn, (1, 6, 6), 4)])
def test_per_sample_grads_match_opacus_grad_sample_module(make, shape, c):
    model = make()
    x, y = batch(shape, c=c)
    ours, _ = per_sample_grads(model, x, y)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    for n, p in gsm._module.named_parameters():
        torch.testing.assert_close(ours[n], p.grad_sample, rtol=1e-5, atol=1e-6)


def test_abadi_sum_matches_opacus_dp_optimizer():
    model = mlp()
    x, y = batch((12,), n=9)
    R = 0.4
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=R,
                      expected_batch_size=len(x), loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.clip_and_accumulate()
    grads, _ = per_sample_grads(model, x, y)
    ours = clip_and_sum(grads, clip_factors(per_sample_norms(grads), "abadi", R=R))
    for n, p in gsm._module.named_parameters():
        torch.testing.assert_close(ours[n], p.summed_grad, rtol=1e-5, atol=1e-6)


def test_private_grad_noise_std_and_scale():
    """Empty-signal check: with a zero model output gradient the release is pure noise of std sigma * S / (qN)."""
    model = mlp(d=4, h=64, c=3)
    x, y = batch((4,), n=1)
    g_hat, _ = private_grad(model, x[:0], y[:0], clipping="abadi", R=2.0, gamma=0.01, sigma=1.5,
                            expected_batch_size=10.0, generator=torch.Generator().manual_seed(0))
    flat = torch.cat([v.flatten() for v in g_hat.values()])
    assert abs(flat.std().item() - 1.5 * 2.0 / 10.0) < 0.03
    g_hat, _ = private_grad(model, x[:0], y[:0], clipping="auto_s", R=2.0, gamma=0.01, sigma=1.5,
                            expected_batch_size=10.0, generator=torch.Generator().manual_seed(0))
    flat = torch.cat([v.flatten() for v in g_hat.values()])
    assert abs(flat.std().item() - 1.5 / 10.0) < 0.015  # AUTO-S: sensitivity 1, R plays no role


def test_dp_step_without_noise_or_clipping_is_sgd():
    model, ref = mlp(), mlp()
    x, y = batch((12,), n=8)
    cfg = DPConfig(clipping="abadi", R=1e6, sigma=0.0, lr=0.3, per_sample="ghost")
    dp_step(model, make_optimizer(model, cfg), x, y, cfg, expected_batch_size=len(x))
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_poisson_batches_rate_and_reproducibility():
    sizes = [len(b) for b in poisson_batches(500, 0.1, 200, torch.Generator().manual_seed(3))]
    assert abs(np.mean(sizes) - 50) < 2 and np.std(sizes) > 3  # Binomial(500, 0.1): mean 50, sd 6.7
    a = [b.tolist() for b in poisson_batches(100, 0.2, 3, torch.Generator().manual_seed(5))]
    b = [b.tolist() for b in poisson_batches(100, 0.2, 3, torch.Generator().manual_seed(5))]
    assert a == b


def _rdp_subsampled_gaussian_integer(q, sigma, alpha):
    """Exact RDP of the Poisson-subsampled Gaussian at integer order alpha (Mironov, Talwar, Zhang 2019, eq. 3)."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma ** 2)
             for k in range(alpha + 1)]
    m = max(terms)
    return (m + math.log(sum(math.exp(t - m) for t in terms))) / (alpha - 1)


@pytest.mark.parametrize("eps,q,steps", [(3.0, 0.064, 156), (1.0, 0.01, 1000)])
def test_noise_multiplier_matches_opacus_and_spends_at_most_epsilon(eps, q, steps):
    delta = 1e-5
    sigma = noise_multiplier(eps, delta, q, steps, "rdp")
    assert sigma == get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                         accountant="rdp")
    acc = RDPAccountant()  # independent path: one step at a time
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    spent = acc.get_epsilon(delta)
    assert eps - 0.02 <= spent <= eps
    assert spent == pytest.approx(epsilon_spent(sigma, q, steps, delta, "rdp"), rel=1e-9)
    # exact integer-order RDP with the same RDP -> (eps, delta) conversion (Balle et al. 2020) as opacus
    ref = min(steps * _rdp_subsampled_gaussian_integer(q, sigma, a) - (math.log(delta) + math.log(a)) / (a - 1)
              + math.log((a - 1) / a) for a in range(2, 64))
    assert spent <= ref + 1e-6 and spent >= ref - 0.1  # opacus also tries fractional orders: a little tighter
    assert epsilon_spent(sigma, q, steps, delta, "prv") <= spent + 1e-6  # PRV is tighter than RDP
    assert noise_multiplier(eps, delta, q, steps, "prv") <= sigma


def test_train_dp_learns_without_noise():
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    cfg = DPConfig(clipping="auto_s", sigma=0.0, sample_rate=0.05, steps=40, lr=0.5, momentum=0.9, per_sample="ghost")
    train_dp(model, X, y, cfg, generator=torch.Generator().manual_seed(0))
    assert (model(X).argmax(1) == y).float().mean() > 0.85
