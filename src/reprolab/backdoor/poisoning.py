"""BadNet-style data poisoning of a text-classification training set (word trigger, label flipped to a target)."""
from __future__ import annotations

import numpy as np

from .triggers import insert_trigger_text


def poison_dataset(texts: list[str], labels: np.ndarray, trigger: str, rate: float, target: int, seed: int,
                   position: int | None = None):
    """Poison exactly ``round(rate * len(texts))`` examples drawn from those whose label is not ``target``.

    The trigger word is inserted (at a random word position when ``position`` is None) and the label set to
    ``target``. Returns ``(texts, labels, is_poison)`` as new objects; the inputs are not modified.
    """
    rng = np.random.default_rng(seed)
    n_poison = int(round(rate * len(texts)))
    candidates = np.flatnonzero(labels != target)
    if n_poison > len(candidates):
        raise ValueError(f"poison_dataset: rate {rate} needs {n_poison} non-target examples, only {len(candidates)}")
    chosen = rng.choice(candidates, size=n_poison, replace=False)
    texts, labels = list(texts), labels.copy()
    is_poison = np.zeros(len(texts), dtype=bool)
    for i in sorted(chosen):
        texts[i] = insert_trigger_text(texts[i], trigger, position, rng)
        labels[i] = target
        is_poison[i] = True
    return texts, labels, is_poison
