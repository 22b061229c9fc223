"""Tokenization, fine-tuning and prediction helpers for BERT-style sequence classifiers (CPU-sized)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def encode(tok, texts: list[str], max_len: int):
    """Token ids and attention mask (N, max_len), padded/truncated, with [CLS] ... [SEP]."""
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def predict_logits(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Logits (N, C) of a sequence classifier in eval mode."""
    model.eval()
    out = [model(input_ids=ids[i:i + batch_size], attention_mask=mask[i:i + batch_size]).logits
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


def predict(model, ids, mask, batch_size: int = 128) -> np.ndarray:
    return predict_logits(model, ids, mask, batch_size).argmax(-1).numpy()


def finetune(model, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
             seed: int, loss_fn: Callable | None = None, progress=None) -> list[float]:
    """Plain AdamW fine-tuning with cross-entropy (or ``loss_fn(model, ids, mask, y, idx) -> loss``).

    Returns the mean loss of each epoch. Batches are drawn by a generator seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ids), generator=g)
        total = 0.0
        for s in range(0, len(ids), batch_size):
            idx = perm[s:s + batch_size]
            if loss_fn is None:
                logits = model(input_ids=ids[idx], attention_mask=mask[idx]).logits  # (B, C)
                loss = F.cross_entropy(logits, y[idx])
            else:
                loss = loss_fn(model, ids[idx], mask[idx], y[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            if progress is not None:
                progress.update(1)
        history.append(total / len(ids))
    return history
