"""Honeypot defence against data-poisoning backdoors during fine-tuning.

Tang et al., "Setting the Trap: Capturing and Defeating Backdoors in Pretrained Language Models through Honeypots",
NeurIPS 2023, arXiv:2310.18633.

A *honeypot* classifier f_H reads a lower-layer representation of the PLM (here: one fresh transformer block and a
linear head over the hidden states after layer ``layer``, detached so that it cannot shape the encoder). Lower layers carry enough to spot a trigger word but little
of the task, so f_H, trained with the generalized cross-entropy L_GCE = (1 - p_y^q) / q (which emphasizes samples it
already fits), overfits the poisoned samples first. The task classifier is trained with a weighted cross-entropy,
W(x) = sigmoid((l_H(x) - c) / tau) * CE(f(x), y), where l_H is f_H's (detached) cross-entropy: samples the honeypot
fits confidently (poison) get small weights. During ``warmup_steps`` only the honeypot learns. tau = 1 is the plain
sigmoid of the paper note; a smaller tau sharpens the gate (our choice, a parameter).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gce_loss(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu 2018), mean over the batch: (1 - p_y^q) / q. q -> 0 gives CE."""
    p_y = F.softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (B,)
    return ((1 - p_y.clamp_min(1e-12) ** q) / q).mean()


def sample_weights(loss_h: torch.Tensor, c: float, tau: float = 1.0) -> torch.Tensor:
    """W(x) = sigmoid((l_H(x) - c) / tau) from the honeypot's per-sample CE ``loss_h`` (B,); no gradient."""
    return torch.sigmoid((loss_h.detach() - c) / tau)


class Honeypot(nn.Module):
    """Honeypot module: one fresh transformer block over the (detached) hidden states after encoder layer ``layer``
    (0 = embeddings), then a linear classifier on its [CLS] vector."""

    def __init__(self, config, num_labels: int, layer: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        self.layer = layer
        self.block = BertLayer(config)
        self.head = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
        h = hidden_states[self.layer].detach()  # (B, T, d): no gradient into the PLM
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min  # (B, 1, 1, T)
        z = self.block(h, attention_mask=ext)[0]  # (B, T, d)
        return self.head(z[:, 0])  # (B, C)


def honeypot_finetune(model, honeypot: Honeypot, ids, mask, y, epochs: int, lr: float, batch_size: int, seed: int,
                      q: float, c: float, tau: float, warmup_steps: int, honeypot_lr: float | None = None,
                      progress=None) -> dict:
    """Fine-tune a ``BertForSequenceClassification`` with a honeypot. Returns per-step logs (losses, weights)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": honeypot.parameters(), "lr": honeypot_lr or lr}])
    log = {"task": [], "honeypot": [], "step_weights": []}
    step = 0
    for _ in range(epochs):
        model.train()
        honeypot.train()
        perm = torch.randperm(len(ids), generator=g)
        for s in range(0, len(ids), batch_size):
            idx = perm[s:s + batch_size]
            out = model.bert(input_ids=ids[idx], attention_mask=mask[idx], output_hidden_states=True)
            logits_h = honeypot(out.hidden_states, mask[idx])  # (B, C)
            loss_hp = gce_loss(logits_h, y[idx], q)
            if step < warmup_steps:
                loss, w = loss_hp, torch.zeros(len(idx))
            else:
                logits = model.classifier(model.dropout(out.pooler_output))  # (B, C)
                ce = F.cross_entropy(logits, y[idx], reduction="none")  # (B,)
                w = sample_weights(F.cross_entropy(logits_h, y[idx], reduction="none"), c, tau)  # (B,)
                loss = (w * ce).mean() + loss_hp
                log["task"].append((w * ce).mean().item())
            log["honeypot"].append(loss_hp.item())
            log["step_weights"].append((idx, w.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress.update(1)
    return log


@torch.no_grad()
def honeypot_weights(model, honeypot: Honeypot, ids, mask, y, c: float, tau: float, batch_size: int = 128):
    """Weights W(x) (N,) the current honeypot assigns to every training sample (eval mode)."""
    model.eval()
    honeypot.eval()
    out = []
    for s in range(0, len(ids), batch_size):
        hs = model.bert(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size],
                        output_hidden_states=True).hidden_states
        lh = F.cross_entropy(honeypot(hs, mask[s:s + batch_size]), y[s:s + batch_size], reduction="none")
        out.append(sample_weights(lh, c, tau))
    return torch.cat(out)


@torch.no_grad()
def layer_states(model, ids, mask, layer: int, batch_size: int = 128) -> torch.Tensor:
    """Hidden states (N, T, d) after encoder layer ``layer`` (0 = embeddings) of a BERT classifier, in eval mode."""
    model.eval()
    out = [model.bert(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size],
                      output_hidden_states=True).hidden_states[layer] for s in range(0, len(ids), batch_size)]
    return torch.cat(out)


def probe_layer(config, H_train: torch.Tensor, M_train, y_train, H_test: torch.Tensor, M_test, epochs: int, lr: float,
                batch_size: int, seed: int, q: float | None = None):
    """The premise check: a honeypot-shaped probe (a fresh transformer block + linear head, as ``Honeypot``) trained on
    FROZEN hidden states, with GCE(q) or, for ``q=None``, cross-entropy. Returns (test predictions (N_test,),
    per-sample training cross-entropy (N_train,)) in eval mode."""
    torch.manual_seed(seed)
    probe = Honeypot(config, int(y_train.max()) + 1, 0)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        probe.train()
        perm = torch.randperm(len(y_train), generator=g)
        for s in range(0, len(y_train), batch_size):
            i = perm[s:s + batch_size]
            logits = probe([H_train[i]], M_train[i])  # (B, C)
            loss = gce_loss(logits, y_train[i], q) if q else F.cross_entropy(logits, y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe.eval()
    with torch.no_grad():
        pred = probe([H_test], M_test).argmax(-1)
        ce = F.cross_entropy(probe([H_train], M_train), y_train, reduction="none")
    return pred.numpy(), ce.numpy()
