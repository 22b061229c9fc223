"""The MovieLens-100k movie knowledge graph (Freebase triples, KB4Rec links) shipped in the recbole 1.2.1 wheel.

Materialized into ``data/ml100k_kg/`` by ``python -m reprolab.data.materialize`` (source ``ml100k_kg``).
"""
from __future__ import annotations

import pandas as pd

from ..paths import DATA_DIR

ROOT = DATA_DIR / "ml100k_kg"


def _need(path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (python -m reprolab.data.materialize) first")
    return path


def load_ml100k_kg(relations: list[str] | None = None) -> pd.DataFrame:
    """Triples (head, relation, tail) as strings (Freebase MIDs), optionally restricted to some relation names."""
    df = pd.read_csv(_need(ROOT / "ml-100k.kg"), sep="\t", header=0, names=["head", "relation", "tail"], dtype=str)
    if relations is not None:
        df = df[df.relation.isin(relations)]
    return df.drop_duplicates().reset_index(drop=True)


def load_ml100k_titles() -> dict[str, str]:
    """Freebase MID -> MovieLens title for the linked movies."""
    link = pd.read_csv(_need(ROOT / "ml-100k.link"), sep="\t", header=0, names=["item", "entity"], dtype=str)
    item = pd.read_csv(_need(ROOT / "ml-100k.item"), sep="\t", header=0, usecols=[0, 1], names=["item", "title"],
                       dtype=str)
    merged = link.merge(item, on="item")
    return dict(zip(merged.entity, merged.title))
