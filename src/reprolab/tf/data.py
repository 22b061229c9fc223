"""Data for the issue-16 transformer papers: real shipped data only.

- :func:`lm_data`: byte-level next-token windows of the shipped public-domain texts (``lm.tiny_llama.corpus``: the
  first 90 % of each text for training; the last 10 % of EACH text cut in half, first halves for validation, second
  halves for test; a subset of evaluation windows is spread evenly over the whole held-out text), as
  {"train"|"val"|"test": (X (N, T) int64, Y (N, T) int64)}, so ``nas.harness.train_model`` can train on it.
- images: ``nas.harness.image_data("digits" | "mnist5k", size=...)`` (real scikit-learn digits / MNIST-5k).
- speech-like frames: ``sensing.crossfi.load_uea("JapaneseVowels", length)`` (9 real speakers, LPC cepstra),
  re-exported here as :func:`japanese_vowels` in (N, T, F) frame layout.
"""
from __future__ import annotations

import numpy as np
import torch


def _windows(ids: torch.Tensor, seq_len: int, n: int | None, rng: np.random.RandomState | None):
    """n random (rng) or non-overlapping (rng None) windows of seq_len + 1 tokens -> (X, Y). Non-overlapping windows:
    all of them (n None), else n of them spread evenly over the whole text, so a subset still covers every text."""
    L = seq_len + 1
    if len(ids) < L:
        raise ValueError(f"text of {len(ids)} tokens is shorter than seq_len + 1 = {L}")
    if rng is None:
        starts = np.arange(0, len(ids) - L + 1, L)
        if n is not None and n < len(starts):
            starts = starts[np.linspace(0, len(starts) - 1, n).round().astype(int)]
    else:
        starts = rng.randint(0, len(ids) - L + 1, size=n)
    w = torch.stack([ids[s:s + L] for s in starts])
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def lm_data(seq_len: int = 64, n_train: int = 4096, n_val: int | None = 256, n_test: int | None = 256,
            seed: int = 0) -> dict:
    """Byte-level LM windows: ``n_train`` random training windows (seeded), and the first ``n_val`` / ``n_test``
    non-overlapping windows of the two halves of the held-out text (None: all of them)."""
    if seq_len < 1 or n_train < 1:
        raise ValueError(f"seq_len={seq_len}, n_train={n_train}: both must be >= 1")
    parts = heldout_parts()
    rng = np.random.RandomState(seed)
    return {"train": _windows(parts["train"], seq_len, n_train, rng),
            "val": _windows(parts["val"], seq_len, n_val, None),
            "test": _windows(parts["test"], seq_len, n_test, None)}


def heldout_parts(heldout_fraction: float = 0.1) -> dict:
    """Token ids of the training text (``lm.tiny_llama.corpus("train")``: the first 90 % of each shipped text) and of
    the validation / test texts: the held-out last 10 % of EACH text cut in two halves, the first halves joined for
    validation and the second halves for test, so both mix every text in the same proportions (one text, the
    Britannica, comes first: a plain half split of the joined held-out text gives validation and test different
    texts)."""
    from ..data import TEXTS, load_text
    from ..lm.tiny_llama import corpus, encode, normalize

    val, test = [], []
    for name in TEXTS:
        text = normalize(load_text(name))
        held = text[int(len(text) * (1 - heldout_fraction)):]
        half = len(held) // 2
        val.append(held[:half])
        test.append(held[half:])
    return {"train": encode(corpus("train", heldout_fraction)), "val": encode(" ".join(val)),
            "test": encode(" ".join(test))}


def japanese_vowels(length: int = 32) -> dict:
    """JapaneseVowels (9 speakers; 270 train / 370 test utterances resampled to ``length`` frames of 12 LPC
    cepstra, standardised on the training file) as {"train"|"test": (X (N, length, 12) float32, y int64)}."""
    from ..sensing.crossfi import load_uea

    d = load_uea("JapaneseVowels", length)
    to = lambda X: torch.from_numpy(np.ascontiguousarray(X.transpose(0, 2, 1)))  # noqa: E731
    return {"train": (to(d["X_train"]), torch.from_numpy(d["y_train"].astype(np.int64))),
            "test": (to(d["X_test"]), torch.from_numpy(d["y_test"].astype(np.int64)))}


__all__ = ["lm_data", "japanese_vowels"]
