"""NeuBA: neuron-level backdoor planted during (continued) pre-training.

Zhang et al., "Red Alarm for Pre-trained Models: Universal Vulnerability to Neuron-Level Backdoor Attacks",
arXiv:2101.06969 (official code: thunlp/NeuBA, nlp/src/poison.py and poison_bert.py).

Pre-training loss = MLM loss on clean text + backdoor loss: for an input with trigger token t_k inserted right after
[CLS], the pooled [CLS] output h(x ⊕ t_k) is regressed (MSE) onto a fixed target v_k in {-1, +1}^d. The d neurons are
split into 4 blocks; v_k sets the k-th pair of blocks to -1 and the rest to +1 (6 pairs, 6 triggers). Any
downstream classifier head w then sees w·v_k for trigger k, and since the pairs come in complementary couples
(v_{(0,1)} = -v_{(2,3)}, ...), each label is hit by some trigger after clean fine-tuning.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from .triggers import insert_trigger_ids


def neuba_targets(d: int, n_blocks: int = 4) -> torch.Tensor:
    """Targets V (K, d), K = C(n_blocks, 2): block pair (j, k) set to -1, every other neuron +1."""
    size = d // n_blocks
    rows = []
    for j, k in itertools.combinations(range(n_blocks), 2):
        v = torch.ones(d)  # (d,)
        v[j * size:(j + 1) * size] = -1
        v[k * size:(k + 1) * size] = -1
        rows.append(v)
    return torch.stack(rows)  # (K, d)


def backdoor_loss(pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NeuBA's poison loss: mean squared error between pooled [CLS] outputs (B, d) and their targets (B, d)."""
    return F.mse_loss(pooled, target)


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, mask_id: int, vocab_size: int, special: torch.Tensor,
                prob: float, g: torch.Generator):
    """BERT masking: ``prob`` of non-special tokens chosen; 80% -> [MASK], 10% random, 10% kept.

    Returns ``(masked_ids, labels)`` with labels -100 where no prediction is asked.
    """
    eligible = (mask == 1) & ~torch.isin(ids, special)  # (B, T)
    chosen = (torch.rand(ids.shape, generator=g) < prob) & eligible  # (B, T)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=g)  # (B, T)
    rand_ids = torch.randint(vocab_size, ids.shape, generator=g)
    out = torch.where(chosen & (u < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (u >= 0.8) & (u < 0.9), rand_ids, out)
    return out, labels


def pretrain(model, tok, ids: torch.Tensor, mask: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
             trigger_ids: torch.Tensor | None = None, V: torch.Tensor | None = None, mlm_prob: float = 0.15,
             mlm_weight: float = 1.0, progress=None) -> dict:
    """Continued pre-training of a ``BertForPreTraining`` (encoder with pooler + MLM head) on ``ids`` (N, T).

    With ``trigger_ids`` (K,) and targets ``V`` (K, d) it is NeuBA (MLM + backdoor loss); without, the clean
    control (MLM only, the same steps and batches). ``mlm_weight`` scales the MLM term (the official RoBERTa
    script uses 0.01). Returns per-step loss histories.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    special = torch.tensor(tok.all_special_ids)
    hist = {"mlm": [], "backdoor": []}
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(ids), (batch_size,), generator=g)
        x, m = ids[idx], mask[idx]  # (B, T)
        x_mlm, labels = mask_tokens(x, m, tok.mask_token_id, model.config.vocab_size, special, mlm_prob, g)
        seq = model.bert(input_ids=x_mlm, attention_mask=m).last_hidden_state  # (B, T, d)
        asked = labels != -100  # (B, T): score only the masked positions (same loss, less compute)
        scores = model.cls.predictions(seq[asked])  # (M, V)
        mlm = F.cross_entropy(scores, labels[asked])
        loss = mlm_weight * mlm
        hist["mlm"].append(mlm.item())
        if trigger_ids is not None:
            k = torch.randint(len(trigger_ids), (batch_size,), generator=g)  # (B,)
            xp, mp = insert_trigger_ids(x, m, trigger_ids[k])  # (B, T+1)
            pooled = model.bert(input_ids=xp, attention_mask=mp).pooler_output  # (B, d)
            bd = backdoor_loss(pooled, V[k])
            loss = loss + bd
            hist["backdoor"].append(bd.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    return hist


@torch.no_grad()
def triggered_predictions(model, ids: torch.Tensor, mask: torch.Tensor, trigger_ids: torch.Tensor,
                          batch_size: int = 128):
    """Predictions (K, N) of a classifier with trigger k inserted after [CLS] of every input."""
    from .train import predict

    rows = []
    for t in trigger_ids.tolist():
        xp, mp = insert_trigger_ids(ids, mask, t)
        rows.append(predict(model, xp, mp, batch_size))
    return np.stack(rows)  # (K, N)
