"""Diffusion-Based Neural Network Weights Generation (D2NWG), Soro, Andreis, Lee, Hwang et al.,
arXiv 2402.18153 (https://arxiv.org/abs/2402.18153); official code github.com/sorobedio/DNNWG.

Three stages, as in the official code (README "Structure of the code"):

1. a VAE over flattened zoo weights (stage1/models/autoencoder.py VAENoDiscModel, loss
   stage1/modules/losses/CustomLosses.py Myloss: L1 / exp(logvar) + logvar (logvar learned) + kl_weight KL);
2. a dataset encoder (stage2/set_transformer/DatasetEmb.py MyMLPEncoder, the active one in
   stage2/configs/base_config.yaml):
   class-grouped support features (c, n, d) -> Linear over the n*c samples per feature -> leaky_relu -> Linear;
3. a latent DDPM with epsilon prediction (stage2/models/ddpm.py), the condition concatenated to the noisy latent
   (concat_mode), latents scaled by 1/std (scale_by_std), ancestral sampling with the posterior variance beta_tilde.

What is generated follows the official sampling script (mlp_sampling.py:370-380): a linear classifier head over frozen
features of a fixed feature extractor (there CLIP; here a PCA of the pixels, fitted on the image training pool).
Weight vectors are flattened with ``torch.nn.utils.parameters_to_vector``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------------
# DDPM: schedule, forward noising, posterior, ancestral sampling (stage2/models/ddpm.py register_schedule / p_sample)
# ----------------------------------------------------------------------------------------------------------------------


def make_beta_schedule(T: int, linear_start: float = 0.0015, linear_end: float = 0.0155) -> torch.Tensor:
    """The LDM 'linear' schedule (stage2/modules/util.py:21-25): linspace of the square roots, squared. (T,) float64."""
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=torch.float64) ** 2


class Schedule:
    """Fixed-variance DDPM quantities (float64 like the official numpy computation, used as float32 tensors)."""

    def __init__(self, betas: torch.Tensor):
        b = betas.double()
        a = 1.0 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        self.T = len(b)
        self.betas, self.alphas, self.alphas_cumprod, self.alphas_cumprod_prev = b, a, ab, ab_prev
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde) (ddpm.py:152-162, v_posterior = 0)
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_log_variance_clipped = torch.log(torch.clamp(self.posterior_variance, min=1e-20))
        self.coef1 = b * ab_prev.sqrt() / (1.0 - ab)
        self.coef2 = (1.0 - ab_prev) * a.sqrt() / (1.0 - ab)

    @staticmethod
    def _at(v: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype)[t].reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (closed form of the iterated forward chain)."""
        ab = self.alphas_cumprod
        return self._at(ab.sqrt(), t, x0) * x0 + self._at((1 - ab).sqrt(), t, x0) * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod
        return self._at((1 / ab).sqrt(), t, xt) * xt - self._at((1 / ab - 1).sqrt(), t, xt) * eps

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = self._at(self.coef1, t, xt) * x0 + self._at(self.coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    @torch.no_grad()
    def p_sample_loop(self, eps_fn, shape, generator: torch.Generator) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (ddpm.py:248-270, clip_denoised False as in LatentDiffusion)."""
        x = torch.randn(shape, generator=generator)
        for i in reversed(range(self.T)):
            t = torch.full((shape[0],), i, dtype=torch.long)
            x0 = self.predict_x0(x, t, eps_fn(x, t))
            mean, _, logvar = self.q_posterior(x0, x, t)
            noise = torch.randn(shape, generator=generator) if i > 0 else torch.zeros(shape)
            x = mean + (0.5 * logvar).exp() * noise
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the step (the UNet's timestep_embedding, stage2/modules/util.py). (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class EpsMLP(nn.Module):
    """Epsilon predictor eps(z_t, t, c) with the condition concatenated to the input (official: a UNet on 2-channel
    images [z_t, c], concat_mode True; here an MLP on [z_t, c, emb(t)])."""

    def __init__(self, z_dim: int, c_dim: int, hidden: int = 256, t_dim: int = 64):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(nn.Linear(z_dim + c_dim + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, z_dim))

    def forward(self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        parts = [z, timestep_embedding(t, self.t_dim)] + ([c] if c is not None else [])
        return self.net(torch.cat(parts, dim=-1))


def ddpm_loss(model, sched: Schedule, x0: torch.Tensor, c, generator: torch.Generator) -> torch.Tensor:
    """L_simple (ddpm.py:298-321, loss_type l2, original_elbo_weight 0): || eps - eps_theta(x_t, t, c) ||^2."""
    t = torch.randint(0, sched.T, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return F.mse_loss(model(sched.q_sample(x0, t, noise), t, c), noise)


class EMA:
    """LitEma (LDM): decay min(decay, (1 + n) / (10 + n)) over the number of updates n."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay, self.n = decay, 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, model.parameters()):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)


def train_conditional_ddpm(enc: nn.Module, eps: nn.Module, sched: Schedule, batch_fn, steps: int, lr: float,
                           ema_decay: float, generator: torch.Generator) -> list:
    """Stage 2 training (LatentDiffusion.p_losses + configure_optimizers, cond_stage_trainable True): the dataset
    encoder and the eps-predictor are optimised jointly by AdamW on L_simple with the condition enc(support); EMA of
    both, copied in at the end. ``batch_fn()`` returns (scaled latents (B, z), supports (B, k, n, d)). Returns losses."""
    joint = nn.ModuleList([enc, eps])
    opt = torch.optim.AdamW(joint.parameters(), lr=lr)
    ema = EMA(joint, ema_decay)
    losses = []
    for _ in range(steps):
        z0, sup = batch_fn()
        opt.zero_grad()
        loss = ddpm_loss(eps, sched, z0, enc(sup), generator)
        loss.backward()
        opt.step()
        ema.update(joint)
        losses.append(float(loss))
    ema.copy_to(joint)
    return losses


@torch.no_grad()
def generate_latents(enc: nn.Module, eps: nn.Module, sched: Schedule, sups: torch.Tensor, z_dim: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One latent per support set (LatentDiffusion.sample with cond = enc(sups)): (B, k, n, d) -> (B, z_dim)."""
    c = enc(sups)
    return sched.p_sample_loop(lambda zt, tt: eps(zt, tt, c), (len(sups), z_dim), generator)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: VAE over flattened weights
# ----------------------------------------------------------------------------------------------------------------------


class WeightVAE(nn.Module):
    """Gaussian VAE on weight vectors (official: conv VAE on the vector reshaped to an image; here an MLP)."""

    def __init__(self, in_dim: int, z_dim: int = 32, hidden: int = 256):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, in_dim))
        self.logvar = nn.Parameter(torch.zeros(()))  # Myloss's learned output log-variance, logvar_init 0

    def encode(self, w: torch.Tensor):
        mu, logvar = self.enc(w).chunk(2, dim=-1)
        return mu, torch.clamp(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to [-30, 20]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)


def vae_loss(vae: WeightVAE, w: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """Myloss (CustomLosses.py:13-32): sum(|w - w_hat| / exp(s) + s) / B + kl_weight sum(KL) / B, posterior sampled."""
    mu, logvar = vae.encode(w)
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator)
    rec = torch.abs(w - vae.decode(z))
    nll = (rec / torch.exp(vae.logvar) + vae.logvar).sum() / w.shape[0]
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum() / w.shape[0]
    return nll + kl_weight * kl


# ----------------------------------------------------------------------------------------------------------------------
# Dataset encoder (DatasetEmb.py MyMLPEncoder)
# ----------------------------------------------------------------------------------------------------------------------


class MLPDatasetEncoder(nn.Module):
    """x (B, c, n, d) class-grouped support features -> 'c n d -> d (n c)' -> Linear(n c -> out_dim) -> leaky_relu
    -> flatten (d out_dim) -> Linear(-> emb_dim). Ordered by class slot (not invariant to relabelling, like the
    official).
    """

    def __init__(self, n_classes: int, n_per_class: int, d: int, out_dim: int, emb_dim: int):
        super().__init__()
        self.dense1 = nn.Linear(n_classes * n_per_class, out_dim)
        self.dense2 = nn.Linear(d * out_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, c, n, d = x.shape
        h = x.permute(0, 3, 2, 1).reshape(B, d, n * c)  # (B, d, n c): rearrange 'c n d -> d (n c)'
        h = F.leaky_relu(self.dense1(h))  # (B, d, out_dim)
        return self.dense2(h.reshape(B, -1))  # (B, emb_dim)


# ----------------------------------------------------------------------------------------------------------------------
# Tasks, features, zoo
# ----------------------------------------------------------------------------------------------------------------------


def make_tasks(n_digits: int, k: int, n_train: int, n_heldout: int, seed: int) -> tuple[list, list]:
    """Ordered k-tuples of distinct digits: task (d_0..d_{k-1}) is the k-way problem 'label i = digit d_i'. The right
    head differs between tasks (row i is digit d_i's direction). Held-out tuples are disjoint from the training ones."""
    rng = np.random.default_rng(seed)
    all_tuples = list(itertools.permutations(range(n_digits), k))
    idx = rng.choice(len(all_tuples), size=n_train + n_heldout, replace=False)
    chosen = [tuple(int(v) for v in all_tuples[i]) for i in idx]
    return chosen[:n_train], chosen[n_train:]


def pca_features(X_fit: np.ndarray, X: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Frozen feature extractor: centred PCA fitted on X_fit (top ``dim`` right singular vectors), features of X
    standardised by the fitted components' scale. Returns (features of X, components)."""
    mu = X_fit.mean(0)
    _, s, Vt = np.linalg.svd(X_fit - mu, full_matrices=False)
    V = Vt[:dim].T
    scale = s[:dim] / np.sqrt(len(X_fit) - 1)
    return ((X - mu) @ V / scale).astype(np.float32), V


def task_data(feats: np.ndarray, labels: np.ndarray, task: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of the task's digits with label = slot of the digit in the tuple."""
    sel = np.isin(labels, task)
    lut = {dgt: i for i, dgt in enumerate(task)}
    return torch.from_numpy(feats[sel]), torch.tensor([lut[int(v)] for v in labels[sel]], dtype=torch.long)


def head_logits(w: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Batched linear heads: w (M, k d + k) flattened as parameters_to_vector([weight (k, d), bias (k)]); x (N, d)."""
    d = x.shape[1]
    W, b = w[:, : k * d].reshape(-1, k, d), w[:, k * d:]
    return torch.einsum("nd,mkd->mnk", x, W) + b[:, None, :]  # (M, N, k)


def head_accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Accuracy of each of M heads on (x, y). (M,)."""
    return (head_logits(w, x, k).argmax(-1) == y[None]).float().mean(1)


def random_heads(M: int, k: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear(d, k)'s default init (kaiming_uniform a=sqrt(5) -> U(-1/sqrt(d), 1/sqrt(d)) for weight and bias)."""
    bound = 1.0 / math.sqrt(d)
    return (torch.rand(M, k * d + k, generator=generator) * 2 - 1) * bound


def train_heads(X: torch.Tensor, Y: torch.Tensor, k: int, steps: int, lr: float, wd: float,
                w0: torch.Tensor) -> torch.Tensor:
    """Full-batch AdamW on the cross-entropy of each head on its own data, all M heads at once: X (M, N, d), Y (M, N).
    The loss is the sum over heads of each head's mean, so the problems are independent (Adam is per coordinate)."""
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd)
    M, N, d = X.shape
    for _ in range(steps):
        opt.zero_grad()
        W, b = w[:, : k * d].reshape(M, k, d), w[:, k * d:]
        logits = torch.baddbmm(b[:, None, :], X, W.transpose(1, 2))  # (M, N, k)
        loss = F.cross_entropy(logits.reshape(M * N, k), Y.reshape(-1), reduction="sum") / N
        loss.backward()
        opt.step()
    return w.detach()


def balanced_subset(x: torch.Tensor, y: torch.Tensor, k: int, n: int, generator: torch.Generator):
    """n random examples of each of the k classes (without replacement): (k n, d), (k n,)."""
    sup = support_set(x, y, k, n, generator)  # (k, n, d)
    return sup.reshape(k * n, -1), torch.arange(k).repeat_interleave(n)


def support_set(x: torch.Tensor, y: torch.Tensor, k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Class-grouped support (k, n, d): n random examples of each slot without replacement (mlp_sampling.py
    sample_cond)."""
    out = []
    for c in range(k):
        xc = x[y == c]
        out.append(xc[torch.randperm(len(xc), generator=generator)[:n]])
    return torch.stack(out)


def digit_pools(feats: np.ndarray, labels: np.ndarray, n_digits: int = 10) -> torch.Tensor:
    """Per-digit example pools of equal size (the smallest class count): (n_digits, n_min, d)."""
    n_min = min(int((labels == c).sum()) for c in range(n_digits))
    return torch.stack([torch.from_numpy(feats[labels == c][:n_min]) for c in range(n_digits)])


def sample_supports(pools: torch.Tensor, tasks: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Vectorised support_set: tasks (B, k) digit tuples -> (B, k, n, d), n distinct random examples per slot."""
    B, k = tasks.shape
    # the n smallest of uniform keys = the first n of a random permutation (argsort(-1)[..., :n]), via topk (cheaper)
    idx = torch.rand(B, k, pools.shape[1], generator=generator).topk(n, -1, largest=False, sorted=True).indices
    return pools[tasks[..., None], idx]


def task_embedding(support: torch.Tensor) -> torch.Tensor:
    """Fixed dataset embedding for the nearest-task baseline: class means in slot order, concatenated. (k d,)."""
    return support.mean(1).reshape(-1)


def nearest_task(query: torch.Tensor, keys: torch.Tensor) -> int:
    """Index of the key with the largest cosine similarity to the query."""
    return int(F.cosine_similarity(keys, query[None], dim=1).argmax())


# ----------------------------------------------------------------------------------------------------------------------
# One seed: zoo, VAE, encoder + latent DDPM, generation and baselines on held-out tasks
# ----------------------------------------------------------------------------------------------------------------------


def prepare_features(X: np.ndarray, y: np.ndarray, test_fraction: float, pca_dim: int, seed: int):
    """Stratified image train/test pools, and frozen PCA features fitted on the train pool only."""
    from sklearn.model_selection import train_test_split

    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, stratify=y, random_state=seed)
    f_tr, _ = pca_features(X_tr, X_tr, pca_dim)
    f_te, _ = pca_features(X_tr, X_te, pca_dim)
    return f_tr, y_tr, f_te, y_te


def run_seed(cfg: dict, seed: int, X: np.ndarray, y: np.ndarray) -> dict:
    """One seed = its own image split, feature extractor fit, task split, zoo, VAE, encoder + DDPM and samples."""
    k = cfg["n_way"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f_tr, y_tr, f_te, y_te = prepare_features(X, y, cfg["test_fraction"], cfg["pca_dim"], seed)
    d = f_tr.shape[1]
    P = k * d + k
    pools = digit_pools(f_tr, y_tr)  # (10, n_min, d): support sets and zoo training data come from the train pool
    train_tasks, held_tasks = make_tasks(10, k, cfg["n_train_tasks"], cfg["n_heldout_tasks"], seed)
    test = {t: task_data(f_te, y_te, t) for t in train_tasks + held_tasks}
    T_train = torch.tensor(train_tasks)  # (n_train, k)

    # --- zoo: zoo_per_task heads per training task, each from its own init on its own random balanced subset ---------
    owner = torch.arange(len(train_tasks)).repeat_interleave(cfg["zoo_per_task"])  # (M,)
    M, n_z = len(owner), cfg["zoo_n_per_class"]
    Xz = sample_supports(pools, T_train[owner], n_z, gen).reshape(M, k * n_z, d)  # (M, k n_z, d)
    Yz = torch.arange(k).repeat_interleave(n_z).expand(M, -1)
    zoo = train_heads(Xz, Yz, k, cfg["zoo_steps"], cfg["zoo_lr"], cfg["zoo_wd"], random_heads(M, k, d, gen))
    own_acc = lambda w: torch.stack([head_accuracy(w[i:i + 1], *test[train_tasks[int(owner[i])]], k)[0]
                                     for i in range(M)])
    zoo_acc_own = own_acc(zoo)
    zoo_mean = zoo.mean(0, keepdim=True)
    zoo_mean_acc_train = torch.stack([head_accuracy(zoo_mean, *test[t], k)[0] for t in train_tasks])

    # --- stage 1: VAE on the flattened zoo weights ------------------------------------------------------------------
    vae = WeightVAE(P, cfg["z_dim"], cfg["vae_hidden"])
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"])
    for _ in range(cfg["vae_steps"]):
        b = torch.randint(0, M, (cfg["batch_size"],), generator=gen)
        opt.zero_grad()
        vae_loss(vae, zoo[b], cfg["kl_weight"], gen).backward()
        opt.step()
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        mu, logvar = vae.encode(zoo)
        rec_acc = own_acc(vae.decode(mu))
    z_std = (0.5 * logvar).exp()
    scale = float(1.0 / (mu + z_std * torch.randn(mu.shape, generator=gen)).flatten().std())  # scale_by_std

    # --- stage 2: dataset encoder + latent DDPM, trained jointly (cond_stage_trainable True) ------------------------
    sched = Schedule(make_beta_schedule(cfg["timesteps"], cfg["linear_start"], cfg["linear_end"]))
    enc = MLPDatasetEncoder(k, cfg["n_support"], d, cfg["enc_out_dim"], cfg["cond_dim"])
    eps = EpsMLP(cfg["z_dim"], cfg["cond_dim"], cfg["ddpm_hidden"])

    def batch_fn():
        b = torch.randint(0, M, (cfg["batch_size"],), generator=gen)
        z0 = scale * (mu[b] + z_std[b] * torch.randn(mu[b].shape, generator=gen))  # posterior sample, scaled
        return z0, sample_supports(pools, T_train[owner[b]], cfg["n_support"], gen)  # (B, k, n, d)

    losses = train_conditional_ddpm(enc, eps, sched, batch_fn, cfg["ddpm_steps"], cfg["ddpm_lr"], cfg["ema_decay"], gen)

    # --- held-out tasks: generated (zero-shot) and baselines --------------------------------------------------------
    keys = torch.stack([task_embedding(sample_supports(pools, T_train[i:i + 1].expand(cfg["n_key_draws"], -1),
                                                       cfg["n_support"], gen).mean(0))
                        for i in range(len(train_tasks))])  # (n_train, k d)
    zoo_task_mean = torch.stack([zoo[owner == i].mean(0) for i in range(len(train_tasks))])
    K = cfg["n_samples"]
    per_task = {}
    for t in held_tasks:
        x_te, yy_te = test[t]
        sups = sample_supports(pools, torch.tensor([t] * K), cfg["n_support"], gen)  # (K, k, n, d): K condition draws
        with torch.no_grad():
            w_gen = vae.decode(generate_latents(enc, eps, sched, sups, cfg["z_dim"], gen) / scale)  # (K, P)
        acc_gen = head_accuracy(w_gen, x_te, yy_te, k)
        acc_gen_sup = torch.stack([head_accuracy(w_gen[i:i + 1], sups[i].reshape(-1, d),
                                                 torch.arange(k).repeat_interleave(cfg["n_support"]), k)[0]
                                   for i in range(K)])
        j = nearest_task(task_embedding(sups[0]), keys)
        per_task[str(t)] = {
            "generated": float(acc_gen.mean()),
            "generated_best_on_support": float(acc_gen[int(acc_gen_sup.argmax())]),
            "random": float(head_accuracy(random_heads(K, k, d, gen), x_te, yy_te, k).mean()),
            "zoo_mean": float(head_accuracy(zoo_mean, x_te, yy_te, k)[0]),
            "nearest": float(head_accuracy(zoo_task_mean[j:j + 1], x_te, yy_te, k)[0]),
            "nearest_task": list(train_tasks[j]),
        }
    # diagnostic: the same generation on seen (training) tasks, to separate fitting from generalisation
    seen = train_tasks[: cfg["n_heldout_tasks"]]
    sups = sample_supports(pools, torch.tensor(seen).repeat_interleave(K, 0), cfg["n_support"], gen)
    with torch.no_grad():
        w_seen = vae.decode(generate_latents(enc, eps, sched, sups, cfg["z_dim"], gen) / scale)
    acc_seen = [float(head_accuracy(w_seen[i * K:(i + 1) * K], *test[t], k).mean()) for i, t in enumerate(seen)]
    return {
        "generated_seen_tasks": float(np.mean(acc_seen)),
        "train_tasks": [list(t) for t in train_tasks], "heldout_tasks": [list(t) for t in held_tasks],
        "zoo_acc": float(zoo_acc_own.mean()), "zoo_mean_acc_train_tasks": float(zoo_mean_acc_train.mean()),
        "vae_rec_acc": float(rec_acc.mean()), "latent_scale": scale, "ddpm_loss": losses,
        "per_task": per_task, "arms": {a: float(np.mean([v[a] for v in per_task.values()])) for a in ARMS},
        "n_zoo": M, "n_params_head": P,
    }


ARMS = ("generated", "generated_best_on_support", "random", "zoo_mean", "nearest")
