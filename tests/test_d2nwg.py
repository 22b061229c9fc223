"""D2NWG (arXiv 2402.18153): the hand-written DDPM, VAE loss, dataset encoder, heads and task split against
independent references (closed forms, Gaussian conditioning by hand, naive loops, torch.distributions)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reprolab.weightspace.d2nwg import (EMA, EpsMLP, MLPDatasetEncoder, Schedule, WeightVAE, ddpm_loss, digit_pools,
                                        generate_latents, head_accuracy, make_beta_schedule, make_tasks, nearest_task,
                                        random_heads, sample_supports, support_set, task_embedding, train_conditional_ddpm,
                                        train_heads, vae_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_beta_schedule_is_ldm_linear():
    b = make_beta_schedule(1024, 0.0015, 0.0155)
    assert b[0].item() == pytest.approx(0.0015) and b[-1].item() == pytest.approx(0.0155)
    s = torch.sqrt(b)  # linear in sqrt(beta), not in beta (util.py make_beta_schedule 'linear')
    assert torch.allclose(s[1:] - s[:-1], (s[1] - s[0]).expand(1023), atol=1e-12)


def test_forward_closed_form_matches_iterated_chain():
    sched = Schedule(make_beta_schedule(50, 0.001, 0.2))
    # exact moments of the iterated chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, x_0 = 1.7 fixed
    m, v = 1.7, 0.0
    for t in range(50):
        m, v = math.sqrt(1 - sched.betas[t].item()) * m, (1 - sched.betas[t].item()) * v + sched.betas[t].item()
        ab = sched.alphas_cumprod[t].item()
        assert m == pytest.approx(math.sqrt(ab) * 1.7, rel=1e-10) and v == pytest.approx(1 - ab, rel=1e-10)
    # Monte Carlo: iterate with fresh noise and compare with q_sample at t = 49 (same distribution)
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000, 1), 1.7, dtype=torch.float64)
    for t in range(50):
        x = (1 - sched.betas[t]).sqrt() * x + sched.betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    x0 = torch.full((200_000, 1), 1.7, dtype=torch.float64)
    q = sched.q_sample(x0, torch.full((200_000,), 49), torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    assert x.mean().item() == pytest.approx(q.mean().item(), abs=0.01)
    assert x.var().item() == pytest.approx(q.var().item(), rel=0.02)


def test_posterior_matches_gaussian_conditioning_by_hand():
    sched = Schedule(make_beta_schedule(30, 0.001, 0.1))
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-1.1]], dtype=torch.float64)
    for t in range(1, 30):
        ab_prev, a = sched.alphas_cumprod[t - 1].item(), sched.alphas[t].item()
        # prior x_{t-1} | x_0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t | x_{t-1} ~ N(sqrt(a) x_{t-1}, 1 - a)
        prec = 1 / (1 - ab_prev) + a / (1 - a)
        mean = (math.sqrt(ab_prev) * 0.3 / (1 - ab_prev) + math.sqrt(a) * -1.1 / (1 - a)) / prec
        pm, pv, _ = sched.q_posterior(x0, xt, torch.tensor([t]))
        assert pm.item() == pytest.approx(mean, rel=1e-9) and pv.item() == pytest.approx(1 / prec, rel=1e-9)


def test_predict_x0_inverts_q_sample():
    sched = Schedule(make_beta_schedule(100))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    assert torch.allclose(sched.predict_x0(sched.q_sample(x0, t, noise), t, noise), x0, atol=1e-4)


def test_ancestral_sampler_with_exact_score_recovers_gaussian():
    """For data N(m, s^2) the optimal eps-predictor is known in closed form; the sampler must return N(m, s^2)."""
    m, s = 2.0, 0.5
    sched = Schedule(make_beta_schedule(200, 0.0015, 0.05))
    ab = sched.alphas_cumprod.float()

    def eps_exact(x, t):
        a = ab[t][:, None]
        var = a * s ** 2 + (1 - a)  # x_t ~ N(sqrt(a) m, var); E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / var
        return (1 - a).sqrt() * (x - a.sqrt() * m) / var

    x = sched.p_sample_loop(eps_exact, (40_000, 1), torch.Generator().manual_seed(2))
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(s, abs=0.02)


def test_trained_ddpm_recovers_gaussian_mixture_moments():
    """A small eps-MLP trained with ddpm_loss on a 1-D two-component mixture: sample moments and mode weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sched = Schedule(make_beta_schedule(100, 0.001, 0.1))
    from reprolab.weightspace.d2nwg import EpsMLP

    net = EpsMLP(1, 0, hidden=64, t_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)

    def data(n):
        comp = torch.rand(n, 1, generator=g) < 0.3
        return torch.where(comp, -2.0, 1.5) + 0.3 * torch.randn(n, 1, generator=g)

    for _ in range(600):
        opt.zero_grad()
        ddpm_loss(lambda z, t, c: net(z, t), sched, data(256), None, g).backward()
        opt.step()
    with torch.no_grad():
        x = sched.p_sample_loop(lambda z, t: net(z, t), (4000, 1), g)
    ref_mean, ref_var = 0.3 * -2.0 + 0.7 * 1.5, 0.09 + 0.3 * 0.7 * 3.5 ** 2
    assert x.mean().item() == pytest.approx(ref_mean, abs=0.15)
    assert x.var().item() == pytest.approx(ref_var, rel=0.15)
    assert (x < -0.25).float().mean().item() == pytest.approx(0.3, abs=0.06)  # left-mode weight


def test_conditional_training_and_generation_follow_the_condition():
    """The pipeline's stage-2 loop (encoder + eps-MLP trained jointly) on a toy where the support set decides the
    latent mode: task A (support features around +1) has latents around +1.5, task B (around -1) around -1.5.
    Generation conditioned on A / B must land on A's / B's mode; an unconditional generator (condition dropped in
    training or sampling) gives the mixture, mean ~0 for both, and fails."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sched = Schedule(make_beta_schedule(50, 0.001, 0.2))
    enc, eps = MLPDatasetEncoder(2, 2, 3, 4, 8), EpsMLP(2, 8, hidden=64, t_dim=16)

    def supports(sign):  # (B, k=2, n=2, d=3) class-grouped support features of task A (+1) or B (-1)
        return sign[:, None, None, None] + 0.3 * torch.randn(len(sign), 2, 2, 3, generator=g)

    def batch_fn():
        sign = torch.where(torch.rand(64, generator=g) < 0.5, 1.0, -1.0)
        return 1.5 * sign[:, None] + 0.2 * torch.randn(64, 2, generator=g), supports(sign)

    losses = train_conditional_ddpm(enc, eps, sched, batch_fn, 600, 3e-3, 0.99, g)
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    for sign in (1.0, -1.0):
        z = generate_latents(enc, eps, sched, supports(torch.full((300,), sign)), 2, g)
        assert z.mean().item() == pytest.approx(1.5 * sign, abs=0.35)
        assert (torch.sign(z) == sign).float().mean().item() > 0.9


def test_vae_loss_matches_manual_formula():
    torch.manual_seed(0)
    vae = WeightVAE(7, 3, 16)
    with torch.no_grad():
        vae.logvar.fill_(0.4)
    w = torch.randn(5, 7)
    loss = vae_loss(vae, w, 0.01, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    mu, lv = vae.encode(w)
    z = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=g)
    nll = ((w - vae.decode(z)).abs() / math.exp(0.4) + 0.4).sum() / 5
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / 5
    assert loss.item() == pytest.approx((nll + 0.01 * kl).item(), rel=1e-5)


def test_dataset_encoder_matches_naive_rearrange_and_sees_slot_order():
    torch.manual_seed(0)
    enc = MLPDatasetEncoder(n_classes=3, n_per_class=2, d=4, out_dim=5, emb_dim=6)
    x = torch.randn(2, 3, 2, 4)  # (B, c, n, d)
    ref = []
    for b in range(2):
        cols = torch.stack([x[b, c, n] for n in range(2) for c in range(3)], dim=1)  # 'c n d -> d (n c)'
        h = F.leaky_relu(cols @ enc.dense1.weight.T + enc.dense1.bias)  # (d, out_dim)
        ref.append(enc.dense2(h.reshape(-1)))
    assert torch.allclose(enc(x), torch.stack(ref), atol=1e-6)
    assert not torch.allclose(enc(x), enc(x[:, [1, 0, 2]]), atol=1e-3)  # relabelling the slots changes the condition


def test_tasks_are_distinct_ordered_tuples_and_heldout_disjoint():
    tr, ho = make_tasks(10, 5, 60, 10, seed=4)
    assert len(set(tr)) == 60 and len(set(ho)) == 10 and not set(tr) & set(ho)
    assert all(len(set(t)) == 5 and all(0 <= d < 10 for d in t) for t in tr + ho)
    assert make_tasks(10, 5, 60, 10, seed=4) == (tr, ho) and make_tasks(10, 5, 60, 10, seed=5) != (tr, ho)


def test_head_accuracy_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    k, d = 3, 4
    w, x, y = torch.randn(2, k * d + k, generator=g), torch.randn(20, d, generator=g), torch.randint(0, k, (20,))
    for m in range(2):
        lin = torch.nn.Linear(d, k)
        torch.nn.utils.vector_to_parameters(w[m], lin.parameters())  # [weight (k, d), bias (k)] order
        ref = (lin(x).argmax(1) == y).float().mean()
        assert head_accuracy(w, x, y, k)[m].item() == pytest.approx(ref.item())


def test_train_heads_are_independent_and_fit_each_task():
    g = torch.Generator().manual_seed(0)
    k, d, N = 2, 3, 60
    X = torch.randn(2, N, d, generator=g)
    Y = torch.stack([(X[0, :, 0] > 0).long(), (X[1, :, 1] < 0).long()])  # different rules per head
    w0 = random_heads(2, k, d, g)
    both = train_heads(X, Y, k, 200, 0.05, 0.0, w0)
    alone = train_heads(X[1:], Y[1:], k, 200, 0.05, 0.0, w0[1:])
    assert torch.allclose(both[1], alone[0], atol=1e-5)  # no coupling between heads
    assert head_accuracy(both[:1], X[0], Y[0], k).item() > 0.95 and head_accuracy(both[1:], X[1], Y[1], k).item() > 0.95


def test_random_heads_are_nn_linear_default_range():
    w = random_heads(1000, 5, 16, torch.Generator().manual_seed(0))
    assert w.abs().max().item() <= 0.25 and w.abs().max().item() > 0.24 and abs(w.mean().item()) < 0.01


def test_supports_are_class_grouped_distinct_and_vectorised_equals_loop_semantics():
    feats = np.arange(10 * 6 * 2, dtype=np.float32).reshape(60, 2)
    labels = np.repeat(np.arange(10), 6)
    pools = digit_pools(feats, labels)
    s = sample_supports(pools, torch.tensor([[7, 2, 9]]), 4, torch.Generator().manual_seed(0))  # (1, 3, 4, 2)
    for slot, dgt in enumerate([7, 2, 9]):
        rows = s[0, slot]
        assert all(labels[int(r[0]) // 2] == dgt for r in rows)  # every example is of the slot's digit
        assert len({int(r[0]) for r in rows}) == 4  # without replacement
    x, y = torch.from_numpy(feats), torch.from_numpy(labels)
    sup = support_set(x, y, 10, 3, torch.Generator().manual_seed(0))
    assert all((sup[c, :, 0] // 12 == c).all() for c in range(10))


def test_nearest_task_by_cosine_naive_loop():
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(7, 5, generator=g), torch.randn(5, generator=g)
    ref = max(range(7), key=lambda i: float(keys[i] @ q / (keys[i].norm() * q.norm())))
    assert nearest_task(q, keys) == ref
    sup = torch.randn(3, 4, 2, generator=g)
    assert torch.allclose(task_embedding(sup), torch.cat([sup[c].mean(0) for c in range(3)]))


def test_ema_warmup_decay():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, 0.999)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # n = 1: decay min(0.999, 2 / 11)
    assert ema.shadow[0].item() == pytest.approx(1 - 2 / 11)


def test_params_schema_rejects_bad_values():
    import copy

    from reprolab.config import ParamError, load_params, read_params

    params = read_params()
    load_params("d2nwg", "smoke", params=params)  # the shipped section is valid
    for key, value in [("n_way", 1), ("dataset", "cifar10"), ("timesteps", 0), ("kl_weight", -1.0), ("seeds", []),
                       ("n_train_tasks", 0)]:
        bad = copy.deepcopy(params)
        bad["d2nwg"][key] = value
        with pytest.raises(ParamError):
            load_params("d2nwg", "smoke", params=bad)
