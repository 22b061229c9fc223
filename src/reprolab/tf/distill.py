"""Distillation losses shared by the issue-16 transformer papers.

- :func:`logit_kd`: Hinton KD on logits of any shape (..., K) (wraps ``nas.elastic.inplace_distillation_loss``, so
  BigNAS-style in-place KD of a supernet's largest child and KD from an external teacher are the same function).
- :class:`HiddenProjector` + :func:`hidden_loss`: student hidden states mapped by a learned linear projection onto a
  teacher's (TinyBERT: MSE; DistilHuBERT / LightHuBERT-style: L1 minus log-sigmoid cosine).
- :func:`relation_logprobs` / :func:`relation_kd` / :func:`minilmv2_loss`: MiniLMv2 multi-head self-attention relation
  distillation (Wang et al. 2021, microsoft/unilm ``minilm``): queries, keys and values of one teacher layer and one
  student layer are split into the same number of relation heads A_r (independent of either model's attention
  heads), relations R = softmax(X_a X_a^T / sqrt(d_r)) per relation head, and the loss is the KL(R_teacher || R_student)
  averaged over relation heads and (non-padding) query positions, summed over Q-Q, K-K and V-V.
- :func:`hf_qkv_hooks`: capture a Hugging Face BERT layer's query / key / value projections (the real MiniLM teacher).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import inplace_distillation_loss

HIDDEN_KINDS = ("mse", "l1_cos")


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0, kind: str = "kl") -> torch.Tensor:
    """T^2 * mean KL(softmax(teacher/T) || softmax(student/T)) over every position of (..., K) logits; the teacher
    is detached."""
    K = student.size(-1)
    return inplace_distillation_loss(student.reshape(-1, K), teacher.reshape(-1, K), T, kind)


class HiddenProjector(nn.Module):
    """Learned linear maps from student hidden states (width ``d_student``; a narrower child uses the first columns)
    to ``n`` teacher layers of width ``d_teacher``."""

    def __init__(self, d_student: int, d_teacher: int, n: int = 1):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_student, d_teacher) for _ in range(n))

    def forward(self, h: torch.Tensor, i: int = 0) -> torch.Tensor:
        lin = self.maps[i]
        return F.linear(h, lin.weight[:, :h.size(-1)], lin.bias)


def hidden_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between projected student states ``pred`` and teacher states ``target`` (..., T, D) (detached):
    ``mse`` (TinyBERT) or ``l1_cos`` (DistilHuBERT: mean |pred - target| - mean log sigmoid(cos(pred, target)),
    lambda = 1). ``mask`` (..., T) selects the positions (e.g. masked frames)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(HIDDEN_KINDS)}")
    target = target.detach()
    if kind == "mse":
        per = (pred - target).pow(2).mean(-1)
    else:
        per = (pred - target).abs().mean(-1) - F.logsigmoid(F.cosine_similarity(pred, target, dim=-1))
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, d) per-head states -> (B, T, h * d) (head-major, as the projection produced them)."""
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)


def relation_logprobs(x: torch.Tensor, n_rel: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(X_a X_a^T / sqrt(d_r)) for each of ``n_rel`` relation heads: x (B, T, D) with D divisible by
    n_rel; ``mask`` (B, T) True = real token (keys masked out). Returns (B, n_rel, T, T)."""
    B, T, D = x.shape
    if D % n_rel:
        raise ValueError(f"width {D} is not divisible by n_rel={n_rel} relation heads")
    d = D // n_rel
    xr = x.view(B, T, n_rel, d).transpose(1, 2)  # (B, A, T, d)
    s = xr @ xr.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return F.log_softmax(s, dim=-1)


def relation_kd(student: torch.Tensor, teacher: torch.Tensor, n_rel: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(R_teacher || R_student) of one relation (e.g. Q-Q), averaged over relation heads and query positions
    (padding queries excluded). student (B, T, D_s), teacher (B, T, D_t): the widths may differ."""
    lt = relation_logprobs(teacher.detach(), n_rel, mask)
    ls = relation_logprobs(student, n_rel, mask)
    pt = lt.exp()
    kl = (pt * (lt - ls)).nan_to_num(0.0).sum(-1)  # (B, A, T); masked keys have pt = 0
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def minilmv2_loss(student_qkv, teacher_qkv, n_rel: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the Q-Q, K-K and V-V relation KLs. Each argument is (q, k, v), each (B, T, D) or per-head
    (B, h, T, d) (merged first)."""
    total = 0.0
    for s, t in zip(student_qkv, teacher_qkv):
        s = merge_heads(s) if s.dim() == 4 else s
        t = merge_heads(t) if t.dim() == 4 else t
        total = total + relation_kd(s, t, n_rel, mask)
    return total


def hf_qkv_hooks(bert_model, layer: int) -> tuple[dict, list]:
    """Register hooks on a Hugging Face BERT's ``encoder.layer[layer].attention.self.{query,key,value}``; after a
    forward pass ``store`` holds {"q", "k", "v"} (B, T, D). Returns (store, handles); call ``h.remove()`` on each."""
    base = getattr(bert_model, "bert", bert_model)
    attn = base.encoder.layer[layer].attention.self
    store: dict = {}
    handles = []
    for name, mod in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
        handles.append(mod.register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, o)))
    return store, handles


__all__ = ["logit_kd", "HiddenProjector", "hidden_loss", "merge_heads", "relation_logprobs", "relation_kd",
           "minilmv2_loss", "hf_qkv_hooks", "HIDDEN_KINDS"]
