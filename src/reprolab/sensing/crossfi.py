"""CrossFi: A Cross Domain Wi-Fi Sensing Framework Based on Siamese Network (Zhao et al., 2024).

arXiv: https://arxiv.org/abs/2408.10919 ; official code: https://github.com/RS2002/CrossFi (model.py, func.py,
one_shot.py, full_shot.py, cross_class-one_shot.py).

The method, as the official code implements it:

- a Siamese encoder f (ResNet-18 there, a small 1-D CNN here) maps a sample to a 64-d embedding;
- **CSi-Net** scores a pair with attention instead of cosine (model.py:39-50):
  s(a, b) = sigmoid( sum_h (W_q a + b_q)_h . (W_k b + b_k)_h ), no 1/sqrt(d) scale; the cosine arm is (cos + 1) / 2
  (model.py:54-58);
- the pair loss is an MSE between s and the same-class indicator, positive pairs weighted by the number of classes
  (one_shot.py:66-75);
- **Weight-Net** reads the batch's B x B score matrix as an image and outputs one weight per sample (sigmoid); a class
  template is the weighted mean of that class's embeddings over two source batches (full_shot.py:159-185); a query is
  classified by the template of highest score and trained by the same weighted MSE against its one-hot label
  (full_shot.py:239-256);
- **MK-MMD** between source and (unlabelled) target embeddings: mean over five Gaussian bandwidths of
  sqrt(max(0, mean Kxx - 2 mean Kxy + mean Kyy)) (func.py:5-61), added with weight 1 (one_shot.py:13, 91);
- one-shot test: the template of each target class is its single support embedding (one_shot.py:141-160).

The baselines share the encoder, optimiser, steps and data: the **cosine Siamese** is the same pipeline with the
cosine score (the paper's ablation, ``--score cosine``); **ProtoNet** (Snell et al., 2017) trains episodes with a
softmax over negative squared Euclidean distances to class means and classifies a query by its nearest prototype.

Data here are real motion / speech sensing series that ship in sktime (no Wi-Fi CSI ships anywhere): see
:func:`load_uea` and :func:`make_task`.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARMS = ("crossfi", "cosine_siamese", "protonet")
TASKS = ("jv_cross_session", "jv_new_class", "basic_motions")


# --------------------------------------------------------------------------------------------------------------------
# data: UEA/UCR .ts files shipped inside the sktime wheel
# --------------------------------------------------------------------------------------------------------------------
def sktime_data_dir() -> str:
    import sktime.datasets

    return os.path.join(os.path.dirname(sktime.datasets.__file__), "data")


def _resample(series: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of one (C, T_i) series onto ``length`` evenly spaced points."""
    C, T = series.shape
    src = np.linspace(0.0, 1.0, T)
    dst = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(dst, src, series[c]) for c in range(C)])


def load_uea(name: str, length: int | None = None) -> dict:
    """A copy of :func:`_load_uea` (parsed once per process: sktime's .ts reader is slow)."""
    return {k: (v.copy() if isinstance(v, np.ndarray) else list(v)) for k, v in _load_uea(name, length).items()}


@functools.lru_cache(maxsize=8)
def _load_uea(name: str, length: int | None = None) -> dict:
    """Train and test files of a UEA set as float32 arrays (n, C, T) with integer labels 0..K-1 (sorted names).

    Unequal-length sets (JapaneseVowels: 7-29 frames) are resampled to ``length``. Channels are standardised with the
    training file's statistics.
    """
    from sktime.datasets import load_from_tsfile

    out, names = {}, None
    for split in ("TRAIN", "TEST"):
        X, y = load_from_tsfile(os.path.join(sktime_data_dir(), name, f"{name}_{split}.ts"),
                                return_data_type="nested_univ")
        rows = [np.stack([np.asarray(X.iloc[i, c], dtype=float) for c in range(X.shape[1])]) for i in range(len(X))]
        L = length or max(r.shape[1] for r in rows)
        arr = np.stack([_resample(r, L) if r.shape[1] != L else r for r in rows])  # (n, C, L)
        names = names or sorted(set(map(str, y)))
        out[split.lower()] = (arr, np.array([names.index(str(v)) for v in y]))
    mu = out["train"][0].mean(axis=(0, 2), keepdims=True)
    sd = out["train"][0].std(axis=(0, 2), keepdims=True) + 1e-8
    return {"X_train": ((out["train"][0] - mu) / sd).astype(np.float32), "y_train": out["train"][1],
            "X_test": ((out["test"][0] - mu) / sd).astype(np.float32), "y_test": out["test"][1], "classes": names}


def make_task(task: str, jv_length: int = 32, base_speakers: int = 5) -> dict:
    """Source (labelled, training) and target (one-shot episodes) of one task; labels re-indexed from 0.

    - ``jv_cross_session``: JapaneseVowels, 9 speakers; source = the training file, target = the test file (UCI page:
      "370 ... by the same 9 speakers in different opportunities"), 9-way one-shot: the cross-domain setting;
    - ``jv_new_class``: source = speakers 1..base_speakers of the training file; target = the other speakers in the
      test file: a one-shot task on speakers never seen in training (and from the other recording occasions);
    - ``basic_motions``: BasicMotions, 4 activities; source = the training file, target = the test file (the archive
      gives no subject ids, so the "domain" is only its train/test file split), 4-way one-shot.
    """
    if task.startswith("jv_"):
        d = load_uea("JapaneseVowels", jv_length)
    elif task == "basic_motions":
        d = load_uea("BasicMotions")
    else:
        raise ValueError(f"unknown task {task!r}; allowed: {TASKS}")
    Xs, ys, Xt, yt = d["X_train"], d["y_train"], d["X_test"], d["y_test"]
    names = list(d["classes"])
    if task == "jv_new_class":
        keep_s, keep_t = ys < base_speakers, yt >= base_speakers
        Xs, ys, Xt, yt = Xs[keep_s], ys[keep_s], Xt[keep_t], yt[keep_t] - base_speakers
        names = names[base_speakers:]
    return {"name": task, "X_source": Xs, "y_source": ys, "X_target": Xt, "y_target": yt, "target_classes": names,
            "n_source_classes": int(ys.max() + 1), "n_way": int(yt.max() + 1), "channels": int(Xs.shape[1])}


# --------------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Siamese encoder: three Conv1d-BN-ReLU blocks, global average pooling, a linear map to ``dim``."""

    def __init__(self, channels: int, width: int = 64, dim: int = 64):
        super().__init__()
        layers, c = [], channels
        for i in range(3):
            layers += [nn.Conv1d(c, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool1d(2))
            c = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(width, dim)

    def forward(self, x):  # x: (B, C, T)
        return self.fc(self.conv(x).mean(-1))  # (B, dim)


class PairScore(nn.Module):
    """CSi-Net's pair scorer (model.py Attention_Score): ``attention`` or ``cosine``; returns (n_q, n_k) in (0, 1)."""

    def __init__(self, dim: int = 64, hidden: int = 64, heads: int = 1, method: str = "attention"):
        super().__init__()
        if hidden % heads:
            raise ValueError("hidden must be a multiple of heads")
        self.method, self.heads, self.per_head = method, heads, hidden // heads
        self.q_linear = nn.Linear(dim, hidden)
        self.k_linear = nn.Linear(dim, hidden)

    def forward(self, q, k):  # q: (n_q, dim), k: (n_k, dim)
        if self.method == "attention":
            Q = self.q_linear(q).view(-1, self.heads, self.per_head).transpose(0, 1)  # (h, n_q, d_h)
            K = self.k_linear(k).view(-1, self.heads, self.per_head).transpose(0, 1)  # (h, n_k, d_h)
            return torch.sigmoid(torch.bmm(Q, K.transpose(1, 2)).sum(0))  # (n_q, n_k)
        if self.method == "cosine":
            return (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T + 1) / 2  # (n_q, n_k)
        raise ValueError(f"unknown score {self.method!r}")


class WeightNet(nn.Module):
    """Weight-Net: reads the (n, n) score matrix of a batch as a one-channel image, outputs ``batch`` weights in (0, 1).

    The official net is a ResNet-18 with one input channel and ``batch_size`` outputs (one_shot.py:252); here a small
    CNN with adaptive pooling (any n <= batch); the first n outputs weight the n samples (full_shot.py:177-183).
    """

    def __init__(self, batch: int, width: int = 8):
        super().__init__()
        self.batch = batch
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * width, batch))

    def forward(self, score):  # score: (n, n)
        n = score.shape[0]
        return torch.sigmoid(self.net(score[None, None]))[0, :n]  # (n,)


def weighted_templates(emb, labels, weights, n_class: int):
    """Class templates: sum_i w_i e_i / sum_i w_i over each class's samples; an empty class gets a zero template
    (full_shot.py:181-185: its weight sum 0 is replaced by 1)."""
    onehot = F.one_hot(labels, n_class).to(emb.dtype)  # (n, K)
    wsum = onehot.T @ weights[:, None]  # (K, 1)
    wsum = torch.where(wsum == 0, torch.ones_like(wsum), wsum)
    return (onehot * weights[:, None]).T @ emb / wsum  # (K, dim)


def prototypes(emb, labels, n_class: int):
    """ProtoNet prototypes: the mean embedding of each class (Snell et al., 2017, eq. 1)."""
    return weighted_templates(emb, labels, torch.ones(len(labels), dtype=emb.dtype), n_class)


def mk_mmd(x, y, bandwidths=(0.1, 0.5, 1.0, 2.0, 5.0)):
    """func.py mk_mmd_loss: mean over Gaussian kernels k(a,b)=exp(-|a-b|^2/(2 s^2)) of sqrt(max(0, biased MMD^2))."""
    def k(a, b, s):
        d2 = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1, keepdim=True).T - 2 * a @ b.T  # (n_a, n_b)
        return torch.exp(-d2 / (2 * s ** 2))
    total = 0.0
    for s in bandwidths:
        mmd2 = k(x, x, s).mean() - 2 * k(x, y, s).mean() + k(y, y, s).mean()
        pos = mmd2 > 0  # sqrt(max(0, .)) with a zero (not NaN) gradient where the estimate is <= 0
        total = total + torch.where(pos, torch.sqrt(torch.where(pos, mmd2, torch.ones_like(mmd2))), torch.zeros_like(mmd2))
    return total / len(bandwidths)


def weighted_mse(score, target, pos_weight: float):
    """one_shot.py:73-75: mean of (score - target)^2 with the positive entries multiplied by pos_weight."""
    loss = (score - target) ** 2
    return torch.where(target > 0.5, loss * pos_weight, loss).mean()


# --------------------------------------------------------------------------------------------------------------------
# training and one-shot evaluation
# --------------------------------------------------------------------------------------------------------------------
def _batches(n: int, batch: int, rng: np.random.Generator):
    """One epoch of shuffled index batches of size ``batch`` (the last one may be smaller)."""
    perm = rng.permutation(n)
    return [perm[i:i + batch] for i in range(0, n, batch)]


def _episode(y: np.ndarray, n_class: int, shot: int, size: int, rng: np.random.Generator):
    """ProtoNet training episode: ``shot`` support and (size/n_class - shot) queries per class (without replacement)."""
    q = max(1, size // n_class - shot)
    sup, qry = [], []
    for c in range(n_class):
        idx = rng.permutation(np.flatnonzero(y == c))
        sup.append(idx[:shot])
        qry.append(idx[shot:shot + q])
    return np.concatenate(sup), np.concatenate(qry)


def train_arm(arm: str, task: dict, cfg: dict, seed: int) -> dict:
    """Train one arm on the task's source data; every arm takes 2 x epochs x ceil(n/batch) optimiser steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    K = task["n_source_classes"]
    Xs, ys = torch.from_numpy(task["X_source"]), torch.from_numpy(task["y_source"]).long()
    Xt = torch.from_numpy(task["X_target"])
    B = min(cfg["batch_size"], len(ys))
    enc = Encoder(task["channels"], cfg["width"], cfg["dim"])
    scorer = PairScore(cfg["dim"], cfg["dim"], cfg["heads"], "cosine" if arm == "cosine_siamese" else "attention")
    wnet = WeightNet(B)
    params = list(enc.parameters()) + (list(scorer.parameters()) + list(wnet.parameters()) if arm != "protonet" else [])
    opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    mmd_w = float(cfg["mmd_weight"].get(task["name"], 0.0)) if isinstance(cfg["mmd_weight"], dict) else float(cfg["mmd_weight"])
    log = []

    def step(loss, emb):
        if mmd_w > 0:
            tgt = Xt[rng.choice(len(Xt), size=min(B, len(Xt)), replace=False)]
            loss = loss + mmd_w * mk_mmd(enc(tgt), emb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{arm}: non-finite training loss at step {len(log)}")
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(enc.parameters(), 3.0)  # one_shot.py:112
        opt.step()
        log.append(float(loss))

    def template_from_source():
        """full_shot.py:159-185: Weight-Net templates from two source batches (with gradient)."""
        T = torch.zeros(K, cfg["dim"])
        W = torch.zeros(K, 1)
        for _ in range(2):
            idx = torch.from_numpy(rng.choice(len(ys), size=B, replace=False))
            e = enc(Xs[idx])
            w = wnet(scorer(e, e))
            onehot = F.one_hot(ys[idx], K).float()
            T = T + (onehot * w[:, None]).T @ e
            W = W + onehot.T @ w[:, None]
        return T / torch.where(W == 0, torch.ones_like(W), W)

    for _ in range(cfg["epochs"]):
        enc.train()
        nb = len(_batches(len(ys), B, rng))
        if arm == "protonet":
            for _ in range(2 * nb):  # the same number of steps as the two Siamese phases
                s, q = _episode(task["y_source"], K, cfg["proto_shot"], B, rng)
                e = enc(Xs[np.concatenate([s, q])])
                P = prototypes(e[:len(s)], ys[s], K)
                logits = -((e[len(s):, None, :] - P[None]) ** 2).sum(-1)  # (n_q, K) squared distances, no sqrt
                step(F.cross_entropy(logits, ys[q]), e)
            continue
        for idx in _batches(len(ys), B, rng):  # pre_train: all pairs of a batch (one_shot.py:39-122)
            e = enc(Xs[idx])
            same = (ys[idx][:, None] == ys[idx][None, :]).float()
            step(weighted_mse(scorer(e, e), same, K), e)
        for idx in _batches(len(ys), B, rng):  # iteration: queries against templates (full_shot.py:131-297)
            T = template_from_source()
            e = enc(Xs[idx])
            step(weighted_mse(scorer(e, T), F.one_hot(ys[idx], K).float(), K), e)
    enc.eval()
    return {"arm": arm, "encoder": enc, "scorer": scorer, "weightnet": wnet, "loss": log}


def _one_shot_episodes(model: dict, X: np.ndarray, y: np.ndarray, episodes: int, seed: int):
    """Yield (query mask, predicted class) of each one-shot episode: one random support per class (its template),
    every other sample a query. CrossFi / cosine: highest pair score; ProtoNet: nearest prototype (Euclidean)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        Z = model["encoder"](torch.from_numpy(X))  # (n, dim)
    n_way = int(y.max() + 1)
    by_class = [np.flatnonzero(y == c) for c in range(n_way)]
    for _ in range(episodes):
        sup = np.array([rng.choice(ix) for ix in by_class])
        mask = np.ones(len(y), bool)
        mask[sup] = False
        Zq, T = Z[mask], Z[sup]
        with torch.no_grad():
            if model["arm"] == "protonet":
                pred = torch.cdist(Zq, T).argmin(1)
            else:
                pred = model["scorer"](Zq, T).argmax(1)
        yield mask, pred.numpy()


def one_shot_accuracy(model: dict, X: np.ndarray, y: np.ndarray, episodes: int, seed: int) -> np.ndarray:
    """Accuracy of each of ``episodes`` one-shot episodes (see :func:`_one_shot_episodes`)."""
    return np.array([float((pred == y[mask]).mean()) for mask, pred in _one_shot_episodes(model, X, y, episodes, seed)])


def one_shot_confusion(model: dict, X: np.ndarray, y: np.ndarray, episodes: int, seed: int) -> np.ndarray:
    """(n_way, n_way) counts of (true class, predicted class) over the queries of the same episodes as
    :func:`one_shot_accuracy` with the same seed."""
    n_way = int(y.max() + 1)
    conf = np.zeros((n_way, n_way), dtype=np.int64)
    for mask, pred in _one_shot_episodes(model, X, y, episodes, seed):
        np.add.at(conf, (y[mask], pred), 1)
    return conf


@torch.no_grad()
def pair_score_by_class(model: dict, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n_way, n_way) mean pair score s(a, b) over all pairs (a of class i, b of class j, a != b) of a Siamese arm."""
    Z = model["encoder"](torch.from_numpy(X))
    S = model["scorer"](Z, Z).numpy().copy()
    np.fill_diagonal(S, np.nan)
    n_way = int(y.max() + 1)
    return np.array([[float(np.nanmean(S[y == a][:, y == b])) for b in range(n_way)] for a in range(n_way)])
