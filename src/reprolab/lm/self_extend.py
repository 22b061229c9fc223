"""Self-Extend: LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning (Jin et al., ICML 2024).

https://arxiv.org/abs/2401.01325 · official code: datamllab/LongLM (``self_extend_patch/Llama.py``).

Self-Extend changes only the positions fed to RoPE inside attention, with no training. Between a query at position
i and a key at position j:

- neighbour attention (i - j < W, the neighbour window): ordinary RoPE positions i and j;
- grouped attention (i - j >= W): the floor positions j // G for the key and i // G + W - W // G for the query, so
  that the grouped relative position (i // G - j // G) + W - W // G continues the neighbour one near i - j = W and
  never exceeds (L - 1) // G + W - W // G, a distance seen in pre-training when (L_train - W) * G + W >= L.

Both logit maps are computed and merged by the distance mask before the softmax (official ``self_extend_forward``).
:func:`apply_self_extend` patches every ``LlamaAttention`` of a transformers 4.57 Llama in place;
:func:`remove_self_extend` restores it; :func:`rope_scaled` swaps in a scaled RoPE (dynamic NTK, the baseline).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, repeat_kv, rotate_half


def grouped_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, G: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped RoPE positions of queries and keys: (q_pos // G + W - W // G, k_pos // G) (official formula)."""
    return q_pos // G + W - W // G, k_pos // G


def self_extend_relative_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, G: int, W: int) -> torch.Tensor:
    """Relative position seen by RoPE for every (query, key) pair: (..., Tq, Tk).

    i - j inside the neighbour window (i - j < W), otherwise the grouped distance (i // G + W - W // G) - j // G.
    """
    rel = q_pos[..., :, None] - k_pos[..., None, :]  # (..., Tq, Tk)
    gq, gk = grouped_positions(q_pos, k_pos, G, W)
    rel_grouped = gq[..., :, None] - gk[..., None, :]  # (..., Tq, Tk)
    return torch.where(rel < W, rel, rel_grouped)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, d) by the RoPE angles whose cos/sin are (B, T, d)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _self_extend_forward(attn: LlamaAttention, rotary_emb: nn.Module, G: int, W: int):
    """A replacement for ``attn.forward`` (transformers 4.57 signature) computing Self-Extend attention eagerly."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache_position=None, position_ids=None, **kwargs):
        B, T, _ = hidden_states.shape
        d = attn.head_dim
        q = attn.q_proj(hidden_states).view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
        k = attn.k_proj(hidden_states).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = attn.v_proj(hidden_states).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        if position_ids is None:
            start = 0 if cache_position is None else int(cache_position[0])
            position_ids = torch.arange(start, start + T, device=q.device)[None]
        q_pos = position_ids  # (B or 1, T)
        if past_key_values is not None:  # keys are cached without rotation: their RoPE depends on the query
            k, v = past_key_values.update(k, v, attn.layer_idx, {"cache_position": cache_position})
            k_pos = torch.arange(k.shape[2], device=q.device)[None]  # (1, S) no left padding assumed
        else:
            k_pos = position_ids  # (B or 1, S=T)
        S = k.shape[2]

        # neighbour attention: the ordinary RoPE positions
        cos_q, sin_q = rotary_emb(v, q_pos)  # (B, T, d)
        cos_k, sin_k = rotary_emb(v, k_pos)  # (B, S, d)
        q_n, k_n = rope(q, cos_q, sin_q), rope(k, cos_k, sin_k)
        # grouped attention: floor(pos / G), queries shifted by W - W // G so that both regimes join at distance W
        gq_pos, gk_pos = grouped_positions(q_pos, k_pos, G, W)
        cos_gq, sin_gq = rotary_emb(v, gq_pos)
        cos_gk, sin_gk = rotary_emb(v, gk_pos)
        q_g, k_g = rope(q, cos_gq, sin_gq), rope(k, cos_gk, sin_gk)

        k_n, k_g = repeat_kv(k_n, attn.num_key_value_groups), repeat_kv(k_g, attn.num_key_value_groups)  # (B, H, S, d)
        v = repeat_kv(v, attn.num_key_value_groups)  # (B, H, S, d)
        logits_n = torch.matmul(q_n, k_n.transpose(2, 3)) * attn.scaling  # (B, H, T, S)
        logits_g = torch.matmul(q_g, k_g.transpose(2, 3)) * attn.scaling  # (B, H, T, S)

        rel = q_pos[..., :, None] - k_pos[..., None, :]  # (B or 1, T, S)
        logits = torch.where((rel < W)[:, None], logits_n, logits_g)  # (B, H, T, S): merge before the softmax
        if attention_mask is None:  # sdpa passes no mask for a plain causal batch
            logits = logits.masked_fill((rel < 0)[:, None], torch.finfo(logits.dtype).min)
        elif attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[:, :, :, :S], torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask[:, :, :, :S]
        weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, S)
        weights = nn.functional.dropout(weights, p=attn.attention_dropout if attn.training else 0.0,
                                        training=attn.training)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(B, T, -1)  # (B, T, H*d)
        return attn.o_proj(out), weights

    return forward


def llama_attentions(model: nn.Module) -> list[LlamaAttention]:
    return [m for m in model.modules() if isinstance(m, LlamaAttention)]


def apply_self_extend(model: nn.Module, group_size: int, window: int) -> nn.Module:
    """Patch every LlamaAttention of ``model`` (in place) with Self-Extend attention (group G, neighbour window W)."""
    if group_size < 1 or window < 1:
        raise ValueError(f"self_extend: group_size={group_size} and window={window} must be >= 1")
    rotary_emb = model.model.rotary_emb
    if getattr(rotary_emb, "rope_type", "default") != "default":
        raise ValueError("self_extend: expects plain RoPE (rope_type 'default'), got " + rotary_emb.rope_type)
    for attn in llama_attentions(model):
        attn.forward = _self_extend_forward(attn, rotary_emb, group_size, window)
        attn.self_extend = (group_size, window)
    return model


def remove_self_extend(model: nn.Module) -> nn.Module:
    for attn in llama_attentions(model):
        if "forward" in attn.__dict__:
            del attn.forward
            del attn.self_extend
    return model


@contextmanager
def self_extended(model: nn.Module, group_size: int, window: int):
    """``with self_extended(model, G, W): ...`` runs the model with Self-Extend attention, then restores it."""
    apply_self_extend(model, group_size, window)
    try:
        yield model
    finally:
        remove_self_extend(model)


@contextmanager
def rope_scaled(model: nn.Module, rope_scaling: dict | None):
    """Run ``model`` with a fresh RoPE built from ``rope_scaling`` (e.g. {"rope_type": "dynamic", "factor": 2.0},
    transformers' dynamic NTK scaling relative to ``max_position_embeddings``); the original RoPE is restored after."""
    original = model.model.rotary_emb
    config = copy.deepcopy(model.config)
    config.rope_scaling = rope_scaling
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(original.inv_freq.device)
    try:
        yield model
    finally:
        model.model.rotary_emb = original


# ----------------------------------------------------------------------------------------------- evaluation arms
ARMS = ("vanilla", "dynamic_ntk", "self_extend")


@contextmanager
def extension_arm(model: nn.Module, arm: str, group_size: int, window: int, ntk_factor: float):
    """Run ``model`` as one arm: vanilla RoPE, transformers' dynamic NTK scaling, or Self-Extend (G, W)."""
    if arm == "vanilla":
        yield model
    elif arm == "dynamic_ntk":
        with rope_scaled(model, {"rope_type": "dynamic", "factor": float(ntk_factor)}):
            yield model
    elif arm == "self_extend":
        with self_extended(model, group_size, window):
            yield model
    else:
        raise ValueError(f"arm {arm!r}; allowed: {', '.join(ARMS)}")


def passkey_set(tok, text: str, length: int, depths, n_keys: int, seed: int, filler: str = "repeat"):
    """Passkey prompts of exactly ``length`` tokens: (ids (N, length), answer_start, depth of each row (N,)).

    ``tok=None`` means the tiny model's bytes (:func:`reprolab.lm.tiny_llama.passkey_batch`); otherwise a Hugging Face
    tokenizer: needle, question and answer are tokenized separately and the filler is cut in tokens.
    """
    import numpy as np

    from .tiny_llama import ANSWER, NEEDLE, QUESTION, REPEAT_FILLER, passkey_batch

    if tok is None:
        return passkey_batch(text, length, depths, n_keys, seed, filler)

    def enc(s):
        return tok(s, add_special_tokens=False).input_ids

    rng = np.random.RandomState(seed)
    question = enc(QUESTION)
    source = enc(REPEAT_FILLER) if filler == "repeat" else enc(text)
    rows, starts, ds = [], [], []
    for depth in depths:
        for _ in range(n_keys):
            key = int(rng.randint(10000, 100000))
            needle, answer = enc(NEEDLE.format(key=key)), enc(ANSWER.format(key=key))
            n_filler = length - len(needle) - len(question) - len(answer)
            tiled = source * (n_filler // len(source) + 2)
            start = rng.randint(0, len(source))
            fill = tiled[start:start + n_filler]
            cut = int(round(float(depth) * n_filler))
            rows.append(torch.tensor(fill[:cut] + needle + fill[cut:] + question + answer))
            starts.append(length - len(answer))
            ds.append(float(depth))
    if len(set(starts)) != 1:
        raise ValueError("passkey: the tokenizer splits keys into different numbers of tokens")
    return torch.stack(rows), starts[0], np.array(ds)


def heldout_windows(n_all: int, n_windows: int, seed: int | None) -> list[int]:
    """Indices of ``n_windows`` aligned windows out of ``n_all``: the first ones (``seed=None``) or a seeded random
    draw without replacement."""
    import numpy as np

    n = min(n_windows, n_all)
    if seed is None:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).choice(n_all, size=n, replace=False)]


def heldout_perplexity(model: nn.Module, tok, text: str, length: int, n_windows: int, seed: int | None = None) -> float:
    """Perplexity over up to ``n_windows`` non-overlapping aligned windows of ``length`` tokens (bytes when ``tok`` is
    None) of ``text``: the first ones, or (``seed`` given) a random draw of them (:func:`heldout_windows`)."""
    from . import perplexity
    from .tiny_llama import byte_perplexity

    if tok is None:
        pick = heldout_windows(len(text) // length, n_windows, seed)
        return byte_perplexity(model, "".join(text[i * length:(i + 1) * length] for i in pick), length, len(pick))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    pick = heldout_windows(ids.shape[1] // length, n_windows, seed)
    ids = torch.cat([ids[:, i * length:(i + 1) * length] for i in pick], dim=1)  # (1, n * length)
    return perplexity(model, ids.to(next(model.parameters()).device), length)


def passes_bar(value: float, threshold: float) -> bool:
    """``value >= threshold`` as the verdict machinery decides it (``reprolab.claims.side``: bounds within relative 1e-9
    of the threshold count as equal), so that a mean of values exactly at the bar is admitted."""
    from ..claims import side

    return side(float(value), float(value), ">=", float(threshold)) == "pass"


def pool_checkpoints(in_length: dict, threshold: float) -> tuple[list, list]:
    """(admitted, pooled) pre-training checkpoints: every checkpoint whose in-length passkey accuracy (vanilla RoPE at
    the trained length, mean over evaluation seeds) passes the bar ``>= threshold`` is admitted, in the given order;
    none is left out for any other reason. The claims pool the admitted ones, or every checkpoint when none is admitted
    (then the in-length gate is computed over all and fails)."""
    admitted = [c for c, acc in in_length.items() if passes_bar(acc, threshold)]
    return admitted, (admitted or list(in_length))


def retrieving_per_seed(acc: dict, threshold: float) -> list[int]:
    """How many checkpoints retrieve in length, per evaluation seed: ``acc`` maps checkpoint -> [in-length passkey
    accuracy per evaluation seed] (same seed order for all); a checkpoint counts on a seed when its accuracy on that
    seed passes ``>= threshold``; divided by the number of checkpoints, the values of the gate
    ``enough_checkpoints_retrieve`` (one per evaluation seed)."""
    rows = list(acc.values())
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("retrieving_per_seed: one accuracy per evaluation seed for every checkpoint")
    return [sum(passes_bar(r[i], threshold) for r in rows) for i in range(len(rows[0]))]


def learns_text_checkpoints(ppl_1x: dict, reference: list) -> tuple[list, list]:
    """(passing, pooled) checkpoints for the perplexity claim: ``ppl_1x`` maps checkpoint -> [vanilla held-out perplexity
    at the trained length per evaluation seed], ``reference`` the unigram perplexity on the same windows per seed; a
    checkpoint passes when its ratio is < 1 on every evaluation seed (the gate ``learns_text``'s bar), in the given
    order. The claim pools the passing ones, or every checkpoint when none passes (then the gate fails)."""
    passing = [c for c, p in ppl_1x.items() if len(p) == len(reference) and all(a / b < 1.0 for a, b in zip(p, reference))]
    return passing, (passing or list(ppl_1x))


def exact_binomial_ci(k: int, n: int, level: float = 0.95) -> list[float]:
    """Clopper-Pearson (exact) interval of a binomial proportion k / n (``scipy.stats.binomtest(...).proportion_ci``)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]
