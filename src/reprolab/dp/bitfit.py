"""Differentially Private Bias-Term only Fine-tuning of Foundation Models (DP-BiTFiT; Bu, Wang, Zha, Karypis 2022).

https://arxiv.org/abs/2210.00036 ; official code: fastDP (awslabs/fast-differential-privacy, BiTFiT mode).
Only the biases (and a new task head) train. For a layer z = A W^T + b the per-sample bias gradient is
g_i(b) = B_i^T 1 = sum_t B_i[t]  (p,): clipping needs no activations and O(B T p) work, and the backward needs no
weight gradients. The engine (``bk.engine_clipped_sum``) takes that path automatically when a weight is frozen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TUNING = ("full", "bitfit")


def set_trainable(model: nn.Module, tuning: str, head: str = "classifier") -> int:
    """``bitfit``: biases + the head (modules named ``head``...) train; ``full``: everything but embedding tables
    (word embeddings are tied / position embeddings are broadcast over the batch: frozen in both). Returns the count."""
    if tuning not in TUNING:
        raise ValueError(f"tuning {tuning!r}; allowed: {', '.join(TUNING)}")
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if tuning == "full":
            p.requires_grad_(id(p) not in emb)
        else:
            p.requires_grad_(name.endswith("bias") or name.startswith(head))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def encode(tok, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded/truncated to ``max_len``: (N, max_len) each."""
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def classification_losses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of a sequence classifier: (B,)."""
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y, reduction="none")


@torch.no_grad()
def accuracy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    pred = torch.cat([model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).logits.argmax(-1)
                      for i in range(0, len(ids), batch)])
    return float((pred == y).float().mean())
