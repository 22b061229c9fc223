"""Variational Causal Inference (VCI): Wu et al., "Variational Causal Inference" / "Counterfactual generative
modeling with variational causal inference", arXiv 2209.05935 (official code: yulun-rayn/variational-causal-inference),
and the two baselines of its experiments: a conditional VAE and a CPA-like compositional autoencoder.

VCI (the official ``vci/model/model.py``, ``update``/``loss``):

* encoder q(z | y, x, t): MLP over [outcome embedding MLP(y) (ReLU), one-hot t, covariate embeddings] -> (mu, sigma)
* decoder p(y | z, t): MLP over [z, one-hot t] -> Normal(loc, softplus(.) + 1e-3) per gene
* loss (the paper's objective, Eq. 6 / Thm. 1; weights omega0=1, omega1=1.6, omega2=0.1 as in the official hparams):

    L = - E_{z~q(z|y,x,t)} log p(y | z, t)                                  (individual-specific likelihood, MC)
        + omega1 * [ - log p(y' | x, t') ]  with y' = E p(.|E q(z|y,x,t), t')  (covariate-specific likelihood:
              an adversarial discriminator D(y', t', x) vs real (y, t, x)  [dist_mode "discriminate"], or a Gaussian
              KDE against a real cell with the same (x, t')                  [dist_mode "match"])
        + omega2 * KL( q(z | y, x, t) || q(z | y'.detach(), x, t') )        (counterfactual posterior consistency)

  The KL is the official ``kldiv_normal`` by default (``kl_form: official``, ``vci/utils/math_utils.py:25-31``),
  which does NOT divide (mu1 - mu2)^2 by sigma2^2: -0.5 * sum(1 + log s1^2/s2^2 - (mu1-mu2)^2 - s1^2/s2^2). The exact
  Gaussian KL is selectable (``kl_form: exact``); with it the latent collapses to the group mean in this miniature
  (it penalises any factual/counterfactual latent difference by 1/sigma2^2). The "match" KDE averages the Gaussian
  log-kernel over ``kde_cells`` real training cells with the same (x, t') (official ``cf_samples=20``,
  ``vci/dataset/gene_dataset.py``; ``logprob`` weights each cell 1/size), and t' is drawn among the non-control
  perturbations other than t (official ``__getitem__``) unless ``cf_control: true``.

  There is no KL to a N(0, I) prior in VCI; the discriminator is updated on iterations not divisible by
  ``adversary_steps`` (official). The individual likelihood is a mean over genes (official ``.mean()``).
* cVAE baseline: the same encoder/decoder trained on the ELBO (per gene: mean NLL + KL(q || N(0, I)) / G).
* CPA-like baseline (Lotfollahi et al. 2023): deterministic basal latent z_b = enc(y), adversarial classifiers
  that remove t and x from z_b, and additive embeddings z = z_b + E_t[t] + E_x[x] decoded to Normal(loc, scale).

Counterfactual prediction (all three): encode the factual (y, t, x) to its posterior mean (CPA: z_b) and decode the
mean under t' (official ``predict``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """Linear layers with ReLU in between: the official ``vci.model.module.MLP`` (``vci/model/module.py:6-41``) without
    its BatchNorm1d after every hidden layer (``batch_norm=True`` by default, ``module.py:11, 21-23``): a deviation
    listed in the registry."""

    def __init__(self, sizes: list[int], final_act: str | None = None):
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2 or final_act == "relu":
                layers.append(nn.ReLU())
        super().__init__(*layers)


def logprob_normal(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; loc, scale^2) (official ``logprob_normal``)."""
    return -((x - loc) ** 2) / (2 * scale ** 2) - scale.log() - 0.5 * math.log(2 * math.pi)


def kl_normal(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor,
              form: str = "official") -> torch.Tensor:
    """Summed over the latent dimension, averaged over the batch.

    ``form="official"`` (the default, as the official code): ``kldiv_normal`` (``vci/utils/math_utils.py:25-31``),
    which does not divide (mu1 - mu2)^2 by s2^2: 0.5 * sum(s1^2/s2^2 + (mu1-mu2)^2 - 1 - log s1^2/s2^2). It is not
    the textbook KL: the mean mismatch is penalised the same whatever s2 is.
    ``form="exact"``: the textbook KL(N(mu1, s1^2) || N(mu2, s2^2)) = 0.5 * sum(s1^2/s2^2 + (mu1-mu2)^2/s2^2 - 1 -
    log s1^2/s2^2); as VCI's counterfactual term it collapses the latent to the group mean in this miniature.
    The two agree when s2 = 1 (the cVAE's KL to N(0, I))."""
    lv1, lv2 = 2 * s1.log(), 2 * s2.log()
    sq = (mu1 - mu2) ** 2
    if form == "exact":
        sq = sq / lv2.exp()
    elif form != "official":
        raise ValueError(f"kl form {form!r}; allowed: exact, official")
    return (-0.5 * (1 + lv1 - lv2 - sq - (lv1 - lv2).exp()).sum(1)).mean(0)


def split_normal(h: torch.Tensor, dim: int, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, softplus(raw) + eps) from a (B, 2*dim) output (official ``distributionize``, normal)."""
    return h[..., :dim], F.softplus(h[..., dim:]) + eps


class VCI(nn.Module):
    """Encoder q(z|y,x,t) and decoder p(y|z,t). ``encoder``/``decoder`` may be replaced (graphVCI) by modules with
    the same interface: encoder (B, d_in) -> (B, 2L); decoder (B, L + T) -> (B, 2G)."""

    def __init__(self, n_genes: int, n_treatments: int, n_types: int, latent: int = 32, width: int = 128,
                 depth: int = 2, outcome_emb: int = 128, covariate_emb: int = 16,
                 encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.G, self.T, self.L = n_genes, n_treatments, latent
        self.outcome_emb = MLP([n_genes, outcome_emb], final_act="relu")
        self.cov_emb = nn.Embedding(n_types, covariate_emb)
        d_in = outcome_emb + n_treatments + covariate_emb
        self.encoder = encoder if encoder is not None else MLP([d_in] + [width] * depth + [2 * latent])
        self.decoder = decoder if decoder is not None else MLP([latent + n_treatments] + [width] * depth + [2 * n_genes])

    def encode(self, y, t, c):
        h = torch.cat([self.outcome_emb(y), F.one_hot(t, self.T).float(), self.cov_emb(c)], -1)
        return split_normal(self.encoder(h), self.L)

    def decode(self, z, t):
        return split_normal(self.decoder(torch.cat([z, F.one_hot(t, self.T).float()], -1)), self.G)

    @torch.no_grad()
    def predict(self, y, t, c, t_cf):
        mu, _ = self.encode(y, t, c)
        return self.decode(mu, t_cf)[0]


class Discriminator(nn.Module):
    """D(y, t, x) -> logit of "real" (official dist_mode 'discriminate': own outcome/covariate embeddings)."""

    def __init__(self, n_genes, n_treatments, n_types, width=64, depth=2, outcome_emb=128, covariate_emb=16):
        super().__init__()
        self.T = n_treatments
        self.outcome_emb = MLP([n_genes, outcome_emb], final_act="relu")
        self.cov_emb = nn.Embedding(n_types, covariate_emb)
        self.net = MLP([outcome_emb + n_treatments + covariate_emb] + [width] * depth + [1])

    def forward(self, y, t, c):
        return self.net(torch.cat([self.outcome_emb(y), F.one_hot(t, self.T).float(), self.cov_emb(c)], -1))[:, 0]


class CPA(nn.Module):
    """CPA-like: z = enc(y) + E_t[t] + E_x[x]; adversaries predict t and x from enc(y)."""

    def __init__(self, n_genes, n_treatments, n_types, latent=32, width=128, depth=2, adv_width=64):
        super().__init__()
        self.G = n_genes
        self.enc = MLP([n_genes] + [width] * depth + [latent])
        self.dec = MLP([latent] + [width] * depth + [2 * n_genes])
        self.emb_t = nn.Embedding(n_treatments, latent)
        self.emb_c = nn.Embedding(n_types, latent)
        self.adv_t = MLP([latent, adv_width, adv_width, n_treatments])
        self.adv_c = MLP([latent, adv_width, adv_width, n_types])

    def decode(self, zb, t, c):
        return split_normal(self.dec(zb + self.emb_t(t) + self.emb_c(c)), self.G)

    @torch.no_grad()
    def predict(self, y, t, c, t_cf):
        return self.decode(self.enc(y), t_cf, c)[0]


def random_other(t: torch.Tensor, T: int, gen: torch.Generator, control: bool = True) -> torch.Tensor:
    """A uniformly random treatment different from t (the counterfactual t' of a training step). ``control=False``:
    among the non-control treatments 1..T-1 only (official ``GeneDataset.__getitem__`` redraws until t' is not a
    control); needs T >= 3."""
    if control:
        return (t + torch.randint(1, T, t.shape, generator=gen)) % T
    # t = 0: uniform on 1..T-1 (T-1 choices); t > 0: uniform on {1..T-1} minus {t} (T-2 choices)
    u = torch.rand(t.shape, generator=gen)
    k = torch.where(t == 0, (u * (T - 1)).long().clamp_max(T - 2), (u * (T - 2)).long().clamp_max(T - 3))
    tc = 1 + k  # 1..T-1 (t = 0) or 1..T-2 (t > 0)
    return torch.where((t > 0) & (tc >= t), tc + 1, tc)


class Trainer:
    """One arm's training loop; ``arm`` in {"vci", "cvae", "cpa"} picks the loss. Graph arms are VCI models."""

    def __init__(self, model: nn.Module, arm: str, cfg: dict, n_types: int, train_index: dict | None = None):
        self.model, self.arm, self.cfg = model, ("cpa" if arm == "cpa" else "cvae" if arm == "cvae" else "vci"), cfg
        ae_params = [p for n, p in model.named_parameters() if not n.startswith("adv_")]
        self.opt = torch.optim.Adam(ae_params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.it = 0
        if self.arm == "cpa":
            adv = list(model.adv_t.parameters()) + list(model.adv_c.parameters())
            self.opt_adv = torch.optim.Adam(adv, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        if self.arm == "vci" and cfg["dist_mode"] == "discriminate":
            self.disc = Discriminator(model.G, model.T, n_types, width=cfg["disc_width"],
                                      outcome_emb=cfg["outcome_emb"], covariate_emb=cfg["covariate_emb"])
            self.opt_disc = torch.optim.Adam(self.disc.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        if train_index is not None:  # (type, treatment) -> training rows, flattened for vectorized sampling
            self.n_treat = 1 + max(k[1] for k in train_index)
            keys = [(ci, ti) for ci in range(n_types) for ti in range(self.n_treat)]
            # groups without a training cell (the held-out groups of the ood split): the official match loss skips
            # those samples (GeneDataset.__getitem__ leaves cf_genes None, gene_dataset.py:278-280; loss_causality
            # keeps the notNone rows, model.py:520-526); their rows point at any cell of the treatment (never used)
            self.group_has = torch.tensor([len(train_index[k]) > 0 for k in keys])
            train_index = dict(train_index)
            for ci, ti in keys:
                if len(train_index[(ci, ti)]) == 0:
                    train_index[(ci, ti)] = torch.cat([train_index[(cj, ti)] for cj in range(n_types)])
            self.group_rows = torch.cat([train_index[k] for k in keys])
            self.group_count = torch.tensor([len(train_index[k]) for k in keys])
            self.group_start = torch.cumsum(self.group_count, 0) - self.group_count

    def sample_rows(self, c: torch.Tensor, t: torch.Tensor, gen: torch.Generator, k: int = 1) -> torch.Tensor:
        """``k`` uniformly random training rows per (c_i, t_i), with replacement: (B,) for k = 1, else (B, k) (the real
        cells the KDE of dist_mode "match" uses; official ``cf_samples``)."""
        g = c * self.n_treat + t
        cnt, start = self.group_count[g], self.group_start[g]
        if k > 1:
            cnt, start = cnt[:, None], start[:, None]
        u = torch.rand((len(g), k) if k > 1 else (len(g),), generator=gen)
        return self.group_rows[start + torch.minimum((u * cnt).long(), cnt - 1)]

    def step(self, y, t, c, gen: torch.Generator, Y_train: torch.Tensor | None = None) -> dict:
        m, cfg = self.model, self.cfg
        if self.arm == "cpa":
            zb = m.enc(y)
            # adversary update on the detached basal latent
            adv_loss = F.cross_entropy(m.adv_t(zb.detach()), t) + F.cross_entropy(m.adv_c(zb.detach()), c)
            self.opt_adv.zero_grad()
            adv_loss.backward()
            self.opt_adv.step()
            loc, scale = m.decode(zb, t, c)
            nll = -logprob_normal(y, loc, scale).mean()
            adv = F.cross_entropy(m.adv_t(zb), t) + F.cross_entropy(m.adv_c(zb), c)
            loss = nll - cfg["cpa_adv_weight"] * adv
            out = {"nll": nll.item(), "adv": adv.item()}
        else:
            mu, sigma = m.encode(y, t, c)
            S = cfg["mc_samples"]
            z = mu + sigma * torch.randn((S,) + mu.shape, generator=gen)  # (S, B, L)
            loc, scale = m.decode(z.reshape(-1, m.L), t.repeat(S))
            nll = -logprob_normal(y.repeat(S, 1), loc, scale).mean()  # individual-specific likelihood
            if self.arm == "cvae":
                kl = kl_normal(mu, sigma, torch.zeros_like(mu), torch.ones_like(sigma), "exact")  # = official at s2 = 1
                loss = nll + kl / m.G  # the ELBO per gene
                out = {"nll": nll.item(), "kl_prior": kl.item()}
            else:
                t_cf = random_other(t, m.T, gen, control=cfg["cf_control"])
                y_cf = m.decode(mu, t_cf)[0]  # y' = mean of p(y | E q(z|y,x,t), t')
                if cfg["dist_mode"] == "discriminate":
                    if self.it % cfg["adversary_steps"]:
                        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(self.disc(y, t, c), torch.ones(len(y)))
                                        + F.binary_cross_entropy_with_logits(self.disc(y_cf.detach(), t_cf, c),
                                                                             torch.zeros(len(y))))
                        self.opt_disc.zero_grad()
                        d_loss.backward()
                        self.opt_disc.step()
                    covar = F.binary_cross_entropy_with_logits(self.disc(y_cf, t_cf, c), torch.ones(len(y)))
                else:  # "match": Gaussian kernels around kde_cells real training cells with the same (x, t')
                    k = cfg["kde_cells"]
                    rows = self.sample_rows(c, t_cf, gen, k)  # (B,) or (B, k)
                    keep = self.group_has[c * self.n_treat + t_cf]  # samples with real cells of (x, t') (official)
                    target = Y_train[rows]  # (B, G) or (B, k, G)
                    pred = y_cf if k == 1 else y_cf[:, None].expand_as(target)
                    lp = logprob_normal(pred[keep], target[keep], torch.full_like(pred[keep], cfg["kde_std"]))
                    covar = -lp.mean() if bool(keep.any()) else y_cf.sum() * 0.0
                mu_cf, sigma_cf = m.encode(y_cf.detach(), t_cf, c)  # detach_pattern "full" (official default)
                kl = kl_normal(mu, sigma, mu_cf, sigma_cf, cfg["kl_form"])
                loss = cfg["omega0"] * nll + cfg["omega1"] * covar + cfg["omega2"] * kl
                out = {"nll": nll.item(), "covar": covar.item(), "kl_cf": kl.item()}
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.it += 1
        return out


def build_model(arm: str, n_genes: int, n_treatments: int, n_types: int, cfg: dict) -> nn.Module:
    kw = dict(latent=cfg["latent"], width=cfg["width"], depth=cfg["depth"])
    if arm == "cpa":
        return CPA(n_genes, n_treatments, n_types, adv_width=cfg["disc_width"], **kw)
    if arm in ("vci", "cvae"):
        return VCI(n_genes, n_treatments, n_types, outcome_emb=cfg["outcome_emb"],
                   covariate_emb=cfg["covariate_emb"], **kw)
    raise ValueError(f"unknown arm {arm!r}")


def train_arm(model: nn.Module, arm: str, data: dict, cfg: dict, seed: int, log_every: int = 0) -> list[dict]:
    """Minibatch training for ``cfg['steps']`` steps on the training cells' factual (y, t, x)."""
    gen = torch.Generator().manual_seed(seed)
    tr = data["train"]
    Y = torch.from_numpy(data["Y"][tr])
    t = torch.from_numpy(data["t"][tr]).long()
    c = torch.from_numpy(data["cell_type"][tr]).long()
    index = {(ci, ti): torch.nonzero((c == ci) & (t == ti))[:, 0]
             for ci in range(data["n_types"]) for ti in range(data["n_treatments"])}
    trainer = Trainer(model, arm, cfg, data["n_types"], train_index=index)
    model.train()
    log = []
    for s in range(cfg["steps"]):
        b = torch.randint(len(tr), (cfg["batch_size"],), generator=gen)
        out = trainer.step(Y[b], t[b], c[b], gen, Y_train=Y)
        if log_every and (s % log_every == 0 or s == cfg["steps"] - 1):
            log.append({"step": s, **out})
    model.eval()
    return log


@torch.no_grad()
def predict_all(model: nn.Module, data: dict, idx: np.ndarray) -> np.ndarray:
    """Predicted potential outcomes (n, T, G) of cells ``idx`` under every treatment, from their factual."""
    y = torch.from_numpy(data["Y"][idx])
    t = torch.from_numpy(data["t"][idx]).long()
    c = torch.from_numpy(data["cell_type"][idx]).long()
    return np.stack([model.predict(y, t, c, torch.full_like(t, k)).numpy()
                     for k in range(data["n_treatments"])], 1)


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (sklearn's r2_score for one output)."""
    ss_res = float(((y_true - y_pred) ** 2).sum())
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot


def evaluate(P: np.ndarray, data: dict, n_deg: int = 20) -> dict:
    """Counterfactual metrics of predictions P (n_test, T, G) of the test cells against their true potential
    outcomes ``data["Y_test_all"]``.

    * ``cf_mse``: mean over cells, counterfactual treatments t' != t into groups SEEN in training (the cell's type
      x and t' not a held-out group) and genes of (pred - truth)^2 (individual); ``cf_mse_ood`` (only when
      ``data["ood_groups"]`` is not empty) the same over the counterfactuals into the held-out groups; ``rec_mse`` the
      same at t' = t (factual reconstruction).
    * ``r2_deg`` / ``r2_all``: the papers' mean-expression R^2: for each (cell type x, perturbation k > 0) group seen
      in training, the mean predicted vs the mean true counterfactual of the test cells of type x not observed under
      k, over the top ``n_deg`` DEGs (largest |mean truth under k - mean truth under control| of those cells) or all
      genes, averaged over the groups.
    * ``r2_effect_deg``: the same over DEGs but for the effect (mean under k minus the cells' true control mean).
    * ``r2_deg_ood`` / ``r2_all_ood`` / ``r2_effect_deg_ood`` (only when ``data["ood_groups"]`` is not empty): the same
      over the held-out groups (never seen in training; the official ``ood`` split, ``gene_evaluate.py:153-158``).
    """
    idx = data["test"]
    Y_all, t, ct = data["Y_test_all"], data["t"][idx], data["cell_type"][idx]
    T = Y_all.shape[1]
    mask = np.ones(Y_all.shape[:2], bool)
    mask[np.arange(len(idx)), t] = False  # counterfactual treatments only
    ood = {tuple(g) for g in data.get("ood_groups", [])}
    into_ood = np.zeros_like(mask)  # counterfactuals into a held-out group (cell type x of the cell, t' = k)
    for x, k in ood:
        into_ood[ct == x, k] = True
    sq = ((P - Y_all) ** 2).mean(-1)  # (n_test, T): per cell and treatment, mean over genes (equal gene counts)
    cf_mse = float(sq[mask & ~into_ood].mean())  # counterfactuals into groups seen in training
    rec_mse = float(sq[~mask].mean())  # factual reconstruction
    extra = {"cf_mse_ood": float(sq[mask & into_ood].mean())} if ood else {}
    scores: dict[str, list[float]] = {}
    for x in range(data["n_types"]):
        for k in range(1, T):
            src = (ct == x) & (t != k)
            if src.sum() < 2:
                continue
            true_k, pred_k, ctrl = Y_all[src, k].mean(0), P[src, k].mean(0), Y_all[src, 0].mean(0)
            deg = np.argsort(-np.abs(true_k - ctrl), kind="stable")[:n_deg]
            sfx = "_ood" if (x, k) in ood else ""
            scores.setdefault("r2_deg" + sfx, []).append(r2(true_k[deg], pred_k[deg]))
            scores.setdefault("r2_all" + sfx, []).append(r2(true_k, pred_k))
            scores.setdefault("r2_effect_deg" + sfx, []).append(r2(true_k[deg] - ctrl[deg], pred_k[deg] - ctrl[deg]))
    return {"cf_mse": cf_mse, "rec_mse": rec_mse, **extra, **{k: float(np.mean(v)) for k, v in scores.items()}}


def reference_predictions(data: dict) -> dict[str, np.ndarray]:
    """Trivial references' predictions (n_test, T, G) of the test cells' potential outcomes, from training cells only.

    * ``group mean``: the training mean of the target (cell type x, perturbation k), which ignores the individual
      cell; for a held-out group (no training cell) the additive estimate: x's control mean plus k's mean shift from
      control in the other cell types (a population-level prediction, as CPA's additive embeddings).
    * ``no effect``: x's training control mean under every perturbation (ignores the cell and the perturbation).
    * ``identity``: the cell's factual under every perturbation.
    """
    tr, te = data["train"], data["test"]
    Y, ct, t = data["Y"][tr], data["cell_type"][tr], data["t"][tr]
    C, T = data["n_types"], data["n_treatments"]
    mean = np.full((C, T, Y.shape[1]), np.nan, np.float64)
    for x in range(C):
        for k in range(T):
            sel = (ct == x) & (t == k)
            if sel.any():
                mean[x, k] = Y[sel].mean(0)
    gm = mean.copy()
    for x in range(C):
        for k in range(T):
            if np.isnan(gm[x, k]).any():
                shifts = [mean[y, k] - mean[y, 0] for y in range(C) if y != x and not np.isnan(mean[y, k]).any()]
                gm[x, k] = mean[x, 0] + np.mean(shifts, 0)
    c_te = data["cell_type"][te]
    return {"group mean": gm[c_te].astype(np.float32),
            "no effect": np.repeat(mean[c_te, 0][:, None], T, 1).astype(np.float32),
            "identity": np.repeat(data["Y"][te][:, None], T, 1)}


def run_arms(data: dict, factories: dict[str, Callable[[], nn.Module]], cfg: dict, seeds, progress=None) -> dict:
    """Train every arm under every seed (same data, steps, batch size, learning rate; the seed fixes the init and
    the minibatch/MC/counterfactual draws) and evaluate on the test cells. Returns {arm: {metric: [per seed]}}
    plus the last seed's predictions under ``"_pred"``."""
    out: dict = {arm: {} for arm in factories}
    out["_pred"], out["_log"] = {}, {}
    jobs = [(arm, s) for s in seeds for arm in factories]
    for arm, s in (progress(jobs) if progress else jobs):
        torch.manual_seed(s)
        model = factories[arm]()
        base_arm = arm if arm in ("cpa", "cvae") else "vci"
        out["_log"][arm] = train_arm(model, base_arm, data, cfg, seed=s, log_every=max(1, cfg["steps"] // 20))
        P = predict_all(model, data, data["test"])
        for k, v in evaluate(P, data, cfg["n_deg"]).items():
            out[arm].setdefault(k, []).append(v)
        out["_pred"][arm] = P
        out.setdefault("_models", {})[arm] = model
    return out
