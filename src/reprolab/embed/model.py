"""A small DLRM-like CTR model over any compressed embedding table, its training loop, and table factories by budget.

Model (DLRM, Naumov et al. 2019, categorical fields only): embeddings e_f (B, F, d) -> [flatten(e), <e_f, e_g> for
f < g] -> MLP -> logit; binary cross-entropy, Adam. The same model, optimizer, data order, epochs and seeds are used for
every table, so only the embedding differs between arms.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .cafe import CafeEmbedding, HotSketch
from .data import CTRData
from .tables import (FullEmbedding, HashEmbedding, MDEmbedding, QATEmbedding, QREmbedding, full_bytes, prune_table,
                     quant_bits_for, quantize_table)

TRAINED = ("full", "hash", "qr", "mde", "qat", "cafe", "cafe_ml", "cafe_nosk")
POST_TRAINING = ("quant", "prune")


class DLRMLite(nn.Module):
    def __init__(self, emb: nn.Module, n_fields: int, dim: int, hidden: int = 64):
        super().__init__()
        self.emb, self.n_fields = emb, n_fields
        iu = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("iu", iu, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(n_fields * dim + iu.shape[1], hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F) -> logits (B,)
        e = self.emb(x)  # (B, F, d)
        dots = torch.bmm(e, e.transpose(1, 2))[:, self.iu[0], self.iu[1]]  # (B, F(F-1)/2)
        return self.mlp(torch.cat([e.flatten(1), dots], 1)).squeeze(1)


def cafe_sizes(budget_bytes: float, dim: int, hot_frac: float, slots_per_hot: float, slots: int) -> dict:
    """Split a byte budget: ``hot_frac`` of it to hot rows + sketch (``slots_per_hot`` sketch slots per hot row),
    the rest to the hash table. With ``slots_per_hot = slots = 4`` (one 4-slot bucket, 48 bytes, per hot row) and
    ``hot_frac = 1 - hash_rate`` this is the official sizing, ``init_embed.py``:
    ``hotn = totn * rate * (1 - hash_rate) * 4d / (4d + 48)`` and ``SS(k, lim=hotn)`` buckets."""
    H = int(hot_frac * budget_bytes // (dim * 4 + slots_per_hot * HotSketch.BYTES_PER_SLOT))
    n_buckets = max(1, math.ceil(slots_per_hot * H / slots))
    n_hash = int((budget_bytes - H * dim * 4 - n_buckets * slots * HotSketch.BYTES_PER_SLOT) // (dim * 4))
    return {"n_hot": H, "n_buckets": n_buckets, "n_hash": n_hash}


# The official per-compression settings on Criteo (HugoZHL/CAFE ArtifactEvaluation/tasks/criteo.json, "cafe"):
# compression ratio -> (cafe_sketch_threshold, cafe_hash_rate)
CRITEO_SCHEDULE = {2: (10, 0.7), 5: (10, 0.5), 10: (20, 0.5), 20: (30, 0.5), 50: (50, 0.3), 100: (100, 0.3),
                   200: (200, 0.2), 500: (500, 0.2), 1000: (500, 0.2), 2000: (500, 0.1), 5000: (500, 0.1),
                   10000: (500, 0.1)}


def cafe_settings(ratio: float, cfg: dict) -> tuple[float, float]:
    """(hot threshold, hash rate) for a compression ratio: the official Criteo schedule at the nearest listed ratio
    (log scale) when ``cafe_schedule`` is ``criteo``, else the fixed ``hot_threshold`` and ``hash_rate``."""
    if cfg.get("cafe_schedule", "criteo") == "criteo":
        r = min(CRITEO_SCHEDULE, key=lambda k: (abs(math.log(k / ratio)), k))
        return CRITEO_SCHEDULE[r]
    return cfg["hot_threshold"], cfg["hash_rate"]


def make_table(method: str, data: CTRData, dim: int, ratio: float, cfg: dict, seed: int = 0) -> nn.Module | None:
    """A trainable table for ``method`` within full bytes / ``ratio`` (None if the method cannot fit the budget)."""
    N = data.n_features
    budget = full_bytes(N, dim) / ratio
    init = cfg.get("init_scale")
    if method == "full":
        return FullEmbedding(N, dim, seed, init)
    if method == "hash":
        rows = int(budget // (dim * 4))
        return HashEmbedding(N, dim, rows, seed, init) if rows >= 1 else None
    if method == "qr":
        m = QREmbedding.m_for_rows(N, budget / (dim * 4))
        return QREmbedding(N, dim, m, seed, init) if m else None
    if method == "qat":  # quantization-aware training at the widest bit-width that fits (None below 1/16 of fp32)
        bits = quant_bits_for(N, dim, budget)
        return QATEmbedding(N, dim, bits, seed, init) if bits else None
    if method == "mde":
        counts = np.bincount(data.x_train.ravel(), minlength=N).astype(np.float64)
        rank, bounds, dims = MDEmbedding.plan(counts, dim, budget, cfg.get("mde_blocks", 4), cfg.get("mde_alpha", 0.3))
        return MDEmbedding(N, dim, rank, bounds, dims, seed, init) if any(dims) else None
    if method in ("cafe", "cafe_ml", "cafe_nosk"):
        threshold, hash_rate = cafe_settings(ratio, cfg)
        if method == "cafe_nosk":  # ablation: a free sketch (its bytes on top of the budget; NOT the official sizing)
            H = int((1 - hash_rate) * budget // (dim * 4))
            sz = {"n_hot": H, "n_buckets": max(1, math.ceil(cfg["slots_per_hot"] * H / cfg["slots"])),
                  "n_hash": int(budget // (dim * 4)) - H}
        else:  # the official sizing: the sketch's 12 bytes per slot are inside the budget
            sz = cafe_sizes(budget, dim, 1 - hash_rate, cfg["slots_per_hot"], cfg["slots"])
        if sz["n_hash"] < 1 or sz["n_hot"] < 1:
            return None
        return CafeEmbedding(N, dim, sz["n_hot"], sz["n_hash"], sz["n_buckets"], cfg["slots"], threshold,
                             cfg["decay"], levels=2 if method == "cafe_ml" else 1,
                             medium_threshold=cfg["medium_threshold"], init_scale=init, seed=seed)
    raise ValueError(f"unknown method {method!r}")


def post_training_table(method: str, full_weight: torch.Tensor, ratio: float) -> nn.Module | None:
    budget = full_weight.numel() * 4 / ratio
    if method == "quant":
        return quantize_table(full_weight, budget)
    if method == "prune":
        return prune_table(full_weight, budget)
    raise ValueError(f"unknown post-training method {method!r}")


def train(model: DLRMLite, data: CTRData, epochs: int, batch_size: int, lr: float) -> list[float]:
    """Adam on BCE; CAFE's sketch update and migration run after each backward, before the optimizer step (as the
    official main.py:375-377). Returns per-step losses."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    losses = []
    model.train()
    for _ in range(epochs):
        # time-ordered stream: batches in arrival order, as a deployed CTR model sees them (no look-ahead)
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(model.emb, "after_backward"):  # CAFE: insert_grad between backward and step (main.py:375-377)
                model.emb.after_backward(opt)
            opt.step()
            losses.append(float(loss))
    return losses


@torch.no_grad()
def evaluate(model: DLRMLite, x: np.ndarray, y: np.ndarray, batch_size: int = 8192) -> dict:
    model.eval()
    logits = torch.cat([model(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(y), batch_size)])
    p = torch.sigmoid(logits).numpy().astype(np.float64)
    yy = y.astype(np.float64)
    ll = -np.mean(yy * np.log(np.clip(p, 1e-7, 1)) + (1 - yy) * np.log(np.clip(1 - p, 1e-7, 1)))
    # two interleaved halves of the test rows: one to select (e.g. a winner), the other to measure it, independently
    return {"auc": float(roc_auc_score(yy, p)), "logloss": float(ll), "auc_sel": float(roc_auc_score(yy[0::2], p[0::2])),
            "auc_eval": float(roc_auc_score(yy[1::2], p[1::2]))}


def run_arm(method: str, data: CTRData, ratio: float, cfg: dict, seed: int) -> dict | None:
    """Build, train and evaluate one (method, budget) arm; None if the method cannot fit the budget."""
    torch.manual_seed(seed)
    emb = make_table(method, data, cfg["dim"], ratio, cfg, seed)
    if emb is None:
        return None
    model = DLRMLite(emb, data.n_fields, cfg["dim"], cfg["hidden"])
    t0 = time.perf_counter()
    losses = train(model, data, cfg["epochs"], cfg["batch_size"], cfg["lr"])
    train_seconds = time.perf_counter() - t0  # wall clock: for timings.json only
    out = evaluate(model, data.x_test, data.y_test)
    out.update(method=method, ratio=ratio, bytes=int(emb.nbytes()), budget_bytes=full_bytes(data.n_features, cfg["dim"]) / ratio,
               final_train_loss=float(np.mean(losses[-20:])), model=model)
    out["train_seconds"] = train_seconds
    if isinstance(emb, QATEmbedding):
        out["bits"] = emb.bits
    if isinstance(emb, CafeEmbedding):
        out.update(n_hot=emb.n_hot, n_hash=emb.n_hash, migrations=emb.migrations, demotions=emb.demotions,
                   hot_used=len(emb.hot_features()), hot_threshold=emb.hot_threshold,
                   sketch_seconds=emb.sketch_seconds)  # wall clock: timings only
    return out


def evaluate_post_training(method: str, full_model: DLRMLite, data: CTRData, ratio: float) -> dict | None:
    """Swap the trained full table for its quantized / pruned version (no retraining) and evaluate."""
    table = post_training_table(method, full_model.emb.weight.data, ratio)
    if table is None:
        return None
    orig = full_model.emb
    full_model.emb = table
    try:
        out = evaluate(full_model, data.x_test, data.y_test)
    finally:
        full_model.emb = orig
    out.update(method=method, ratio=ratio, bytes=int(table.nbytes()),
               budget_bytes=full_bytes(data.n_features, orig.dim) / ratio, table=table)
    if hasattr(table, "bits"):
        out["bits"] = table.bits
    return out


@torch.no_grad()
def lookup_throughput(emb: nn.Module, x: np.ndarray, repeats: int = 5) -> float:
    """Embedding lookups per second (ids per second) for an eval-mode forward on ``x`` (B, F); best of ``repeats``.
    Wall-clock: for timings.json only, never metrics."""
    emb.eval()
    xt = torch.from_numpy(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        emb(xt)
        best = min(best, time.perf_counter() - t)
    return xt.numel() / best
