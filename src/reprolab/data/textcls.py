"""A small, honest text-classification task built from the shipped public-domain texts.

Authorship of verse/prose snippets: label 0 = Shakespeare (Hamlet, The Tempest, Macbeth), label 1 = Milton
(Paradise Lost, Areopagitica). A snippet is ``lines_per_example`` consecutive qualifying lines (at least
``min_words`` words, not a speaker tag, stage direction or heading), lower-cased. Splits are disjoint and fixed by
the seed. Also a plain corpus of snippets (default: the Britannica entry) for continued pre-training.
"""
from __future__ import annotations

import re

import numpy as np

from . import load_text

AUTHORS = {0: ("hamlet", "tempest", "macbeth"), 1: ("paradise_lost", "areopagitica")}
LABEL_NAMES = ("shakespeare", "milton")
_SKIP = re.compile(r"^(\[|#|\*|enter\b|exit\b|exeunt\b|act\b|scene\b|p\.\d|http)", re.I)


def text_snippets(name: str, min_words: int = 5, lines_per_example: int = 2) -> list[str]:
    """Snippets of ``lines_per_example`` consecutive qualifying lines of the text ``name``, in text order."""
    lines = []
    for raw in load_text(name).splitlines():
        line = " ".join(raw.split())
        if len(line.split()) < min_words or _SKIP.match(line) or line.isupper():
            continue
        lines.append(line.lower())
    k = lines_per_example
    return [" ".join(lines[i:i + k]) for i in range(0, len(lines) - k + 1, k)]


def authorship_task(n_train: int, n_test: int, seed: int, min_words: int = 5, lines_per_example: int = 2):
    """Balanced authorship task: ``(train_texts, train_y, test_texts, test_y)`` with y int64 in {0, 1}.

    Each class draws ``(n_train + n_test) // 2`` snippets without replacement from its pooled texts; the first
    ``n_train // 2`` of each class go to train, the rest to test (disjoint). Order is shuffled by ``seed``.
    """
    pools = {label: [s for n in names for s in text_snippets(n, min_words, lines_per_example)]
             for label, names in AUTHORS.items()}
    return balanced_split(pools, n_train, n_test, seed, "authorship_task")


def balanced_split(pools: dict[int, list[str]], n_train: int, n_test: int, seed: int, task: str):
    """``(train_texts, train_y, test_texts, test_y)`` from one pool of snippets per label (K labels): each label draws
    ``n_train // K + n_test // K`` snippets without replacement (rng ``seed``), the first ``n_train // K`` to train,
    the rest to test (disjoint); each split is shuffled. ``task`` names the caller in the error for a too-small pool."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    K = len(pools)
    for label, pool in pools.items():
        n_tr, n_te = n_train // K, n_test // K
        if n_tr + n_te > len(pool):
            raise ValueError(f"{task}: asked for {n_tr + n_te} snippets of label {label}, only {len(pool)}")
        idx = rng.choice(len(pool), size=n_tr + n_te, replace=False)
        tr += [(pool[i], label) for i in idx[:n_tr]]
        te += [(pool[i], label) for i in idx[n_tr:]]
    out = []
    for split in (tr, te):
        order = rng.permutation(len(split))
        out += [[split[i][0] for i in order], np.array([split[i][1] for i in order], dtype=np.int64)]
    return tuple(out)


def pretrain_corpus(name: str = "britannica", min_words: int = 5, lines_per_example: int = 2) -> list[str]:
    """Snippets of a text used as unlabeled continued pre-training data."""
    return text_snippets(name, min_words, lines_per_example)
