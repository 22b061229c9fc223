"""Budget sweeps shared by the cafe and embcomp_bench notebooks: every (method, compression ratio, seed) arm trains
the same DLRM-lite with the same data order, epochs and optimizer; post-training methods (quantization, pruning)
reuse the trained full table of the same seed."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data import CTRData, ml100k_ctr, zipf_ctr_stream
from .model import POST_TRAINING, evaluate_post_training, lookup_throughput, run_arm


def load_ctr(name: str, cfg: dict) -> CTRData:
    """``ml100k`` (real; ``ml100k_train_rows`` > 0 keeps only the first rows of the training stream) or ``zipf_ctr``
    (the generator, parameters ``zipf_*`` of the paper's params section)."""
    if name == "ml100k":
        d = ml100k_ctr(cfg["ml100k_test_fraction"])
        n = cfg.get("ml100k_train_rows", 0)
        if n:
            d.x_train, d.y_train = d.x_train[:n], d.y_train[:n]
        return d
    if name == "zipf_ctr":
        return zipf_ctr_stream(cfg["zipf_n_samples"], cfg["zipf_n_fields"], cfg["zipf_ids_per_field"], cfg["zipf_alpha"],
                               cfg["zipf_latent_dim"], cfg["zipf_latent_scale"], cfg["zipf_bias_scale"],
                               cfg["zipf_base_logit"], cfg["zipf_drift_at"], cfg["zipf_drift_frac"],
                               cfg["zipf_test_fraction"], cfg["zipf_seed"])
    raise ValueError(f"unknown CTR dataset {name!r}; allowed: ml100k, zipf_ctr")


def sweep(data: CTRData, methods: list[str], ratios: list[float], cfg: dict, seeds: list[int],
          throughput_batch: int = 0) -> tuple[pd.DataFrame, dict]:
    """Rows (method, ratio, seed, auc, logloss, bytes, budget_bytes, feasible) and, if ``throughput_batch``,
    lookups/s per (method, ratio) for seed ``seeds[0]`` (wall-clock, kept apart from the metrics)."""
    rows, speed = [], {}
    xb = data.x_test[:throughput_batch] if throughput_batch else None
    for seed in seeds:
        full = run_arm("full", data, 1.0, cfg, seed)
        rows.append(_row(full, "full", 1.0, seed))
        if xb is not None and seed == seeds[0]:
            speed[("full", 1.0)] = lookup_throughput(full["model"].emb, xb)
        for r in ratios:
            for m in methods:
                if m in POST_TRAINING:
                    out = evaluate_post_training(m, full["model"], data, r)
                    emb = None if out is None else out["table"]
                else:
                    out = run_arm(m, data, r, cfg, seed)
                    emb = None if out is None else out["model"].emb
                rows.append(_row(out, m, r, seed))
                if xb is not None and seed == seeds[0] and emb is not None:
                    speed[(m, r)] = lookup_throughput(emb, xb)
    return pd.DataFrame(rows), speed


def _row(out: dict | None, method: str, ratio: float, seed: int) -> dict:
    if out is None:
        return {"method": method, "ratio": float(ratio), "seed": seed, "feasible": False, "auc": np.nan,
                "logloss": np.nan, "bytes": np.nan, "budget_bytes": np.nan, "auc_sel": np.nan, "auc_eval": np.nan}
    keep = {k: out[k] for k in ("auc", "logloss", "bytes", "budget_bytes", "auc_sel", "auc_eval")}
    extra = {k: out[k] for k in ("bits", "n_hot", "n_hash", "migrations", "demotions", "hot_used", "hot_threshold",
                                 "train_seconds", "sketch_seconds") if k in out}
    return {"method": method, "ratio": float(ratio), "seed": seed, "feasible": True, **keep, **extra}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean AUC (and bytes) per (method, ratio); infeasible cells stay NaN."""
    return (df.groupby(["method", "ratio"], as_index=False)
              .agg(auc=("auc", "mean"), auc_std=("auc", "std"), logloss=("logloss", "mean"), bytes=("bytes", "mean"),
                   budget_bytes=("budget_bytes", "mean"), feasible=("feasible", "all")))
