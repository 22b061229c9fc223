"""Small, honest tasks built from the shipped public-domain texts (``reprolab.data.load_text``).

* :func:`author_passages`: which author wrote a fixed-length passage, Shakespeare (hamlet, tempest, macbeth) or
  Milton (paradise_lost, areopagitica); speaker names, stage directions and short lines are dropped, classes balanced.
* :func:`char_corpus`: a character-level token stream (vocabulary = the sorted characters of the text) for training
  a tiny language model from scratch, split into a training head and a held-out tail.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from ..data import load_text

SHAKESPEARE = ("hamlet", "tempest", "macbeth")
MILTON = ("paradise_lost", "areopagitica")


def clean_lines(text: str, min_words: int) -> list[str]:
    """Lines of verse or prose with at least ``min_words`` words: no stage directions ([...]), no speaker headings
    or titles (lines mostly in capitals), whitespace collapsed."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line)  # stage directions on one line
        line = re.sub(r"\[.*$", " ", line)  # ... or opening here
        line = re.sub(r"^.*\]", " ", line)  # ... or closing here
        line = " ".join(line.split())
        letters = [c for c in line if c.isalpha()]
        if len(line.split()) < min_words or not letters:
            continue
        if sum(c.isupper() for c in letters) > 0.5 * len(letters):
            continue
        out.append(line)
    return out


def author_passages(tok, n_per_class: int, seq_len: int, min_words: int, seed: int, test_fraction: float):
    """Balanced passages of exactly ``seq_len`` tokens ([CLS] + seq_len - 2 text tokens + [SEP], so no padding),
    label 0 = Shakespeare, 1 = Milton: each author's cleaned lines are joined, tokenized and cut into
    non-overlapping windows, of which ``n_per_class`` are drawn with ``seed``. Returns (train, test), each a dict
    of input_ids (n, seq_len), attention_mask (n, seq_len), labels (n,), and the decoded texts."""
    rng = np.random.default_rng(seed)
    body = seq_len - 2
    rows, labels = [], []
    for label, names in enumerate((SHAKESPEARE, MILTON)):
        text = " ".join(ln for name in names for ln in clean_lines(load_text(name), min_words))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        windows = [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
        if len(windows) < n_per_class:
            raise ValueError(f"only {len(windows)} passages for label {label}, {n_per_class} requested")
        pick = np.sort(rng.choice(len(windows), size=n_per_class, replace=False))
        rows += [[tok.cls_token_id, *windows[i], tok.sep_token_id] for i in pick]
        labels += [label] * n_per_class
    order = rng.permutation(len(rows))
    input_ids = torch.tensor([rows[i] for i in order], dtype=torch.long)  # (n, seq_len)
    y = torch.tensor([labels[i] for i in order], dtype=torch.long)  # (n,)
    n_test = int(round(len(rows) * test_fraction))

    def part(sl):
        return {"input_ids": input_ids[sl], "attention_mask": torch.ones_like(input_ids[sl]), "labels": y[sl],
                "texts": tok.batch_decode(input_ids[sl], skip_special_tokens=True)}
    return part(slice(n_test, None)), part(slice(0, n_test))


def char_corpus(names: tuple[str, ...], held_out_fraction: float):
    """Character-level ids of the concatenated texts: (train_ids, held_out_ids, vocab) with vocab the sorted list
    of characters; the held-out part is the last ``held_out_fraction`` of each text."""
    texts = [load_text(n) for n in names]
    vocab = sorted(set("".join(texts)))
    stoi = {c: i for i, c in enumerate(vocab)}
    train, held = [], []
    for t in texts:
        cut = int(len(t) * (1 - held_out_fraction))
        train += [stoi[c] for c in t[:cut]]
        held += [stoi[c] for c in t[cut:]]
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long), vocab


def lm_batches(ids: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int):
    """``steps`` random (batch_size, seq_len + 1) windows of ``ids`` from a seeded generator (inputs = [:, :-1])."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
        yield torch.stack([ids[s:s + seq_len + 1] for s in start.tolist()])  # (B, T+1)


def lm_eval_windows(ids: torch.Tensor, seq_len: int, n_windows: int) -> torch.Tensor:
    """``n_windows`` evenly spaced, non-random (n, seq_len + 1) windows of ``ids`` for a deterministic eval loss."""
    starts = torch.linspace(0, len(ids) - seq_len - 2, n_windows).long()
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
