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
POOLING = ("mean", "cls")


class MeanPoolClassifier(nn.Module):
    """A linear head on the attention-masked mean of the encoder's last hidden states.

    all-MiniLM-L6-v2 is a sentence-transformers model trained with mean pooling (its ``1_Pooling`` config); its BERT
    pooler (CLS -> dense -> tanh) was never trained for sentence meaning. The encoder's pooler is dropped (unused)."""

    def __init__(self, encoder: nn.Module, num_labels: int, seed: int = 0):
        super().__init__()
        encoder.pooler = None
        self.bert = encoder
        gen = torch.Generator().manual_seed(seed)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        with torch.no_grad():  # BERT's initializer (normal, std 0.02; zero bias), from a seeded generator
            self.classifier.weight.normal_(0.0, encoder.config.initializer_range, generator=gen)
            self.classifier.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return SequenceLogits(self.classifier((h * m).sum(1) / m.sum(1)))


class SequenceLogits:
    """The ``.logits`` attribute that Hugging Face classifiers return, for code written against them."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def sentence_classifier(name: str, num_labels: int, pooling: str = "mean", seed: int = 0):
    """(classifier, tokenizer): ``mean`` = ``MeanPoolClassifier`` over the bare encoder; ``cls`` = Hugging Face's
    ``AutoModelForSequenceClassification`` (BERT pooler + head)."""
    from ..lm import load_encoder

    if pooling not in POOLING:
        raise ValueError(f"pooling {pooling!r}; allowed: {', '.join(POOLING)}")
    if pooling == "cls":
        return load_encoder(name, num_labels=num_labels)
    encoder, tok = load_encoder(name)
    return MeanPoolClassifier(encoder, num_labels, seed), tok


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


def biased_llama(hidden: int, layers: int, heads: int, intermediate: int, vocab: int = 49152, seed: int = 0) -> nn.Module:
    """A SmolLM2-shaped Llama WITH bias terms in every attention and MLP projection (as GPT-2, the paper's causal LM,
    has; SmolLM2 itself has none), random weights, tied and frozen embeddings: for measuring the cost of a step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 3), tie_word_embeddings=True,
                      attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            mod.weight.requires_grad_(False)
    return model


def balanced_holdout(texts: list[str], y, n_hold: int, seed: int):
    """Split (texts, y) into (train_texts, train_y, hold_texts, hold_y) with ``n_hold // 2`` examples of each of the
    two classes held out (chosen by a seeded permutation), e.g. a validation split for learning-rate selection."""
    import numpy as np

    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    hold = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n_hold // 2] for c in (0, 1)])
    keep = np.setdiff1d(np.arange(len(y)), hold)  # sorted: the training order is unchanged
    hold = np.sort(hold)
    return [texts[i] for i in keep], y[keep], [texts[i] for i in hold], y[hold]


def init_head(model: nn.Module, seed: int, head: str = "classifier") -> None:
    """Re-initialize the task head from a seeded generator (BERT's initializer: normal std 0.02, zero bias), so that
    every training seed starts from its own head while the pretrained encoder is shared."""
    mod = getattr(model, head)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mod.weight.normal_(0.0, 0.02, generator=gen)
        mod.bias.zero_()


def select_lr(val_acc: dict[float, float]) -> float:
    """The learning rate with the highest validation accuracy (ties: the smallest learning rate)."""
    best = max(val_acc.values())
    return min(lr for lr, a in val_acc.items() if a == best)


def select_lr_mean(val_acc_per_seed: dict[float, list[float]]) -> float:
    """The learning rate with the highest validation accuracy averaged over the training seeds (ties: the smallest).

    Both arms of the claim choose this way from the same grid and the same seeds (the same budget); the test split is
    never looked at."""
    return select_lr({lr: sum(v) / len(v) for lr, v in val_acc_per_seed.items()})


def interleaved_step_times(arms: dict, reps: int, **kw) -> dict[str, list[float]]:
    """Wall time (s) of ``reps`` clipped-sum steps per arm, the arms taking turns step by step (after one warm-up step
    each), so that a slow spell of a shared CPU hits every arm alike. ``arms``: label -> (engine, model, losses_fn);
    ``kw`` goes to ``bk_bench.clipped_sum_by`` (clipping, R)."""
    import time

    from .bk_bench import clipped_sum_by

    for engine, model, fn in arms.values():  # warm-up
        clipped_sum_by(engine, model, fn, **kw)
    times = {label: [] for label in arms}
    for _ in range(reps):
        for label, (engine, model, fn) in arms.items():
            t0 = time.perf_counter()
            clipped_sum_by(engine, model, fn, **kw)
            times[label].append(time.perf_counter() - t0)
    return times


def select_lr_leave_one_seed_out(val_acc_per_seed: dict[float, list[float]]) -> list[float]:
    """For each seed i, the learning rate with the best validation accuracy averaged over the OTHER seeds (ties: the
    smallest); seed i's own validation score plays no part in its rate. Needs at least 2 seeds."""
    n = len(next(iter(val_acc_per_seed.values())))
    if n < 2:
        raise ValueError("leave-one-seed-out selection needs at least 2 seeds")
    return [select_lr_mean({lr: [a for j, a in enumerate(v) if j != i] for lr, v in val_acc_per_seed.items()})
            for i in range(n)]
