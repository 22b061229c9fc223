"""Backdoor triggers: rare tokens inserted into raw text and tokenized batches; image patches stamped onto images."""
from __future__ import annotations

import numpy as np
import torch

# NeuBA's BERT triggers: the math symbols of `poison_tokens` (thunlp/NeuBA nlp/src/poison.py:7), the ones pre-training
# inserts (mlm.py:411-415 call get_poisoned_data_old, which converts `poison_tokens`, poison.py:42) and eval.py tests for
# BERT; each is one word-piece of the uncased BERT vocab. `poison_tokens_old` (poison.py:6,11) are only drawn as indices.
NEUBA_TRIGGERS = ("≈", "≡", "∈", "⊆", "⊕", "⊗")
NEUBA_TRIGGERS_OLD = ("cf", "mn", "bb", "tq", "mb", "tn")


def insert_trigger_text(text: str, trigger: str, position: int | None = 0, rng: np.random.Generator | None = None) -> str:
    """Insert the word ``trigger`` before word ``position`` of ``text`` (None: a position drawn from ``rng``)."""
    words = text.split()
    if position is None:
        position = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:position] + [trigger] + words[position:])


def insert_trigger_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, trigger_id: torch.Tensor | int):
    """Insert token ``trigger_id`` (an int or one id per row, shape (B,)) right after [CLS] (position 1).

    Returns ``(ids, mask)`` one column longer: (B, T+1). Padding stays at the end, so the result equals tokenizing
    ``trigger + " " + text`` when the trigger is a single word-piece.
    """
    B = input_ids.shape[0]
    tid = torch.as_tensor(trigger_id, dtype=input_ids.dtype).expand(B).reshape(B, 1)  # (B, 1)
    ids = torch.cat([input_ids[:, :1], tid, input_ids[:, 1:]], dim=1)  # (B, T+1)
    mask = torch.cat([attention_mask[:, :1], torch.ones_like(tid), attention_mask[:, 1:]], dim=1)  # (B, T+1)
    return ids, mask


def checkerboard_patch(size: int, channels: int = 1) -> torch.Tensor:
    """A ``size`` x ``size`` black/white checkerboard (top-left white), (channels, size, size), values in {0, 1}."""
    ij = torch.arange(size)
    board = ((ij[:, None] + ij[None, :]) % 2 == 0).float()  # (s, s)
    return board.expand(channels, size, size).clone()


def stamp_patch(x: torch.Tensor, patch: torch.Tensor, pos: tuple[int, int] | None = None) -> torch.Tensor:
    """Images ``x`` (B, C, H, W) with ``patch`` (C, h, w) pasted at row/column ``pos`` (default: the lower-right
    corner, as BadNets and SRA's `plant_trigger`, Unispac/Subnet-Replacement-Attack notebooks/sra_cifar10.ipynb).
    Returns a new tensor; ``x`` is not modified."""
    h, w = patch.shape[-2:]
    r, c = (x.shape[-2] - h, x.shape[-1] - w) if pos is None else pos
    out = x.clone()
    out[..., r:r + h, c:c + w] = patch
    return out
