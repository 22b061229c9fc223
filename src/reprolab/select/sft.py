"""Supervised fine-tuning of the last blocks of a causal LM with online batch selection (the UDS miniature).

To fit a CPU budget the bottom ``n_layers - n_blocks`` decoder layers stay frozen and their outputs are computed
once per distinct sequence (:func:`trunk_features`); every arm then trains a fresh copy of the top ``n_blocks``
blocks and the final norm (:class:`TopBlocks`) with the tied LM head frozen. The SFT loss (and max-loss's score)
covers either the whole sequence (``loss_on="sequence"``: the official ``train_on_inputs=True``, labels = input_ids,
gfyddha/UDS finetune.py:155, run_mmlu.sh:20) or the response positions only (``loss_on="response"``: the prompt is
masked, as with ``train_on_inputs=False``); UDS scores the logits of the whole sequence, as the official trainer does.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn


def tokenize_examples(tok, examples: list[dict]) -> None:
    """Add ``ids`` (prompt + answer token ids) and ``n_prompt`` to every example (in place).

    The answer is followed by a newline, so that the response has an end marker (at least 2 tokens)."""
    for ex in examples:
        p = tok(ex["prompt"], add_special_tokens=False).input_ids
        a = tok(ex["answer"] + "\n", add_special_tokens=False).input_ids
        ex["ids"], ex["n_prompt"] = p + a, len(p)


def _rope(model, T: int, like: torch.Tensor):
    return model.model.rotary_emb(like, torch.arange(T, device=like.device)[None])


@torch.no_grad()
def trunk_features(model, examples: list[dict], n_blocks: int, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Output of the frozen bottom layers for every distinct example: {key: (T, d)}; key = ``uid`` (or index)."""
    layers = model.model.layers[:len(model.model.layers) - n_blocks]
    todo = {}
    for i, ex in enumerate(examples):
        todo.setdefault(ex.get("key", i), ex["ids"])
    keys = sorted(todo, key=lambda k: (len(todo[k]), k))
    out = {}
    for b in range(0, len(keys), batch_size):
        chunk = keys[b:b + batch_size]
        T = max(len(todo[k]) for k in chunk)
        ids = torch.tensor([todo[k] + [0] * (T - len(todo[k])) for k in chunk],
                           device=model.lm_head.weight.device)  # (b, T) right-padded
        h = model.model.embed_tokens(ids)  # (b, T, d)
        pe = _rope(model, T, h)
        for layer in layers:  # causal attention: real tokens never see the right padding
            h = layer(h, attention_mask=None, position_embeddings=pe)
        for k, row in zip(chunk, h):
            out[k] = row[:len(todo[k])].clone()  # (T_k, d)
    return out


class TopBlocks(nn.Module):
    """A trainable copy of the top ``n_blocks`` decoder layers and the final norm; the LM head is frozen and shared."""

    def __init__(self, model, n_blocks: int):
        super().__init__()
        self.layers = copy.deepcopy(model.model.layers[-n_blocks:])
        self.norm = copy.deepcopy(model.model.norm)
        self.requires_grad_(True)  # the source model may be frozen
        self.register_buffer("head", model.lm_head.weight.detach(), persistent=False)  # (V, d) tied, not trained
        object.__setattr__(self, "_model", model)  # for RoPE only (not a submodule)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pe = _rope(self._model, h.shape[1], h)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_embeddings=pe)
        return self.norm(h)  # (B, T, d)

    def sequence_hidden(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Final hidden states of every sequence (B, T_max, d), rows past a sequence's end exactly zero; the logits
        UDS scores (the whole sequence's, as in the official trainer, whatever the loss mask) are these @ head.T."""
        T = max(f.shape[0] for f in feats)
        h = torch.stack([torch.cat([f, f.new_zeros(T - f.shape[0], f.shape[1])]) for f in feats])  # (B, T, d)
        lens = torch.tensor([f.shape[0] for f in feats], device=h.device)
        return self(h) * (torch.arange(T, device=h.device)[None] < lens[:, None])[..., None]  # (B, T, d)

    def sequence_logits(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits at every position: (B, T_max, V), rows past a sequence's end exactly zero."""
        return self.sequence_hidden(feats) @ self.head.T

    def response_logits(self, feats: list[torch.Tensor], examples: list[dict], loss_on: str = "response"):
        """Logits at the loss positions: (B, A, V) zero-padded, targets (B, A), mask (B, A).

        ``loss_on="response"``: the response tokens only (the prompt masked); ``"sequence"``: every next-token
        prediction of the sequence (tokens 1..T-1), as the official run (``train_on_inputs=True``, labels =
        input_ids, shifted inside the Hugging Face loss)."""
        if loss_on not in ("response", "sequence"):
            raise ValueError(f"loss_on must be 'response' or 'sequence', not {loss_on!r}")
        T = max(f.shape[0] for f in feats)
        h = torch.stack([torch.cat([f, f.new_zeros(T - f.shape[0], f.shape[1])]) for f in feats])  # (B, T, d)
        hidden = self(h)  # (B, T, d)
        start = [1 if loss_on == "sequence" else ex["n_prompt"] for ex in examples]  # first target position
        A = max(len(ex["ids"]) - s for ex, s in zip(examples, start))
        sel = hidden.new_zeros(len(examples), A, hidden.shape[-1])  # (B, A, d)
        targets = torch.zeros(len(examples), A, dtype=torch.long, device=h.device)
        mask = torch.zeros(len(examples), A, device=h.device)
        for i, (ex, s) in enumerate(zip(examples, start)):
            a = len(ex["ids"]) - s
            sel[i, :a] = hidden[i, s - 1:len(ex["ids"]) - 1]  # position t predicts token t + 1
            targets[i, :a] = torch.tensor(ex["ids"][s:], device=h.device)
            mask[i, :a] = 1
        logits = (sel @ self.head.T) * mask[..., None]  # (B, A, V); padded rows are exactly zero
        return logits, targets, mask


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each example's loss tokens (response, or whole sequence): (B,)."""
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, A)
    return (nll * mask).sum(1) / mask.sum(1)


def length_grouped_order(lengths, batch_size: int, rng: np.random.RandomState, mega: int = 50) -> list[int]:
    """Hugging Face's ``group_by_length`` order (as the official UDS run uses): a random permutation cut into
    megabatches of ``mega * batch_size``, each sorted by decreasing length, so that a batch holds similar lengths."""
    perm = rng.permutation(len(lengths))
    size = mega * batch_size
    return [int(j) for b in range(0, len(perm), size) for j in sorted(perm[b:b + size], key=lambda j: -lengths[j])]


def train_step(top: TopBlocks, opt, batch: list[dict], f: list[torch.Tensor], selector, k: int, loss_on: str,
               log: dict) -> None:
    """One optimizer step on a candidate batch with trunk outputs ``f``: score (a forward pass without gradients over
    all candidates, for max-loss and UDS), pick ``k`` (all for ``selector=None``), back-propagate them; updates ``log``."""
    if selector is None:  # full data: every example of the batch
        idx = torch.arange(len(batch))
    elif selector.needs is None:
        idx = selector.select(None, k, batch_size=len(batch))
    else:  # one forward pass without gradients over all candidates, then score
        with torch.no_grad():
            if selector.needs == "hidden":  # UDS: scores of the logits hidden @ head.T, computed exactly
                idx = selector.select_hidden(top.sequence_hidden(f), top.head, k)
            else:
                logits, targets, mask = top.response_logits(f, batch, loss_on)
                idx = selector.select(logits, k, per_example_loss(logits, targets, mask))
        log["fwd_tokens"] += sum(len(ex["ids"]) for ex in batch)
    chosen = [batch[i] for i in idx.tolist()]
    logits, targets, mask = top.response_logits([f[i] for i in idx.tolist()], chosen, loss_on)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (k, A)
    loss = (nll * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    log["fwd_tokens"] += sum(len(ex["ids"]) for ex in chosen)
    log["bwd_tokens"] += sum(len(ex["ids"]) for ex in chosen)
    log["loss"].append(loss.item())
    log["selected"] += [(ex["task"], ex["noisy"], ex["uid"]) for ex in chosen]


def time_real_steps(model, pool: list[dict], selectors: dict, n_blocks: int, batch_size: int, k: int, lr: float,
                    seed: int, n_steps: int, group_by_length: bool = True, loss_on: str = "sequence") -> dict:
    """Wall time of ``n_steps`` real training steps per arm, the frozen trunk included: for each of the first
    ``n_steps`` candidate batches (the order of :func:`train_arm` with ``seed``), every arm of ``selectors``
    ({name: selector or None for full data}, each with its own fresh :class:`TopBlocks` and AdamW) runs the trunk's
    forward over all B candidates (no cache, as a real run does) and then its step; the arms are interleaved batch by
    batch, so a change of load on a shared machine hits them alike. Returns {name: [seconds per step]} and, under
    ``"_tops"``, the trained blocks (for tests)."""
    rng = np.random.RandomState(seed)
    lengths = [len(ex["ids"]) for ex in pool]
    order = length_grouped_order(lengths, batch_size, rng) if group_by_length else rng.permutation(len(pool))
    arms = {}
    for name in selectors:
        torch.manual_seed(seed)
        top = TopBlocks(model, n_blocks)
        arms[name] = (top, torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=0.0))
    log = {"selected": [], "loss": [], "fwd_tokens": 0, "bwd_tokens": 0}
    secs = {name: [] for name in selectors}
    for b in range(0, min(n_steps * batch_size, len(order) - batch_size + 1), batch_size):
        batch = [pool[i] for i in order[b:b + batch_size]]
        for name, selector in selectors.items():
            top, opt = arms[name]
            start = time.perf_counter()
            feats = trunk_features(model, batch, n_blocks, batch_size=len(batch))  # the real step's trunk forward
            train_step(top, opt, batch, [feats[ex.get("key", i)] for i, ex in enumerate(batch)], selector, k,
                       loss_on, log)
            secs[name].append(time.perf_counter() - start)
    secs["_tops"] = {name: arms[name][0].eval() for name in selectors}
    return secs


def train_arm(model, feats: dict, pool: list[dict], selector, n_blocks: int, epochs: int, batch_size: int, k: int,
              lr: float, seed: int, group_by_length: bool = True, progress=None, loss_on: str = "response",
              on_epoch=None):
    """Fine-tune a fresh :class:`TopBlocks` over ``epochs`` passes of candidate batches of ``batch_size`` (same order
    for every arm, from ``seed``), back-propagating the ``k`` examples picked by ``selector`` (all of them if None).

    With ``group_by_length`` the candidate batches hold examples of similar length (:func:`length_grouped_order`).
    ``loss_on`` ("response" | "sequence") sets the tokens of the SFT loss (a token mean over the back-propagated
    examples, as the Hugging Face loss of the official trainer) and of max-loss's per-example score.
    ``on_epoch(epoch, top)`` is called after every pass (e.g. a learning-curve evaluation; ``top`` is left in train
    mode afterwards).
    Returns (top, log) with the selected examples' tasks/noise flags, counted forward/backward tokens, the tokens of
    all candidates (which every arm of a real run forwards through the frozen trunk) and wall time."""
    torch.manual_seed(seed)
    top = TopBlocks(model, n_blocks)
    opt = torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.RandomState(seed)
    log = {"selected": [], "loss": [], "fwd_tokens": 0, "bwd_tokens": 0, "candidate_tokens": 0}
    t0 = time.perf_counter()
    lengths = [len(ex["ids"]) for ex in pool]
    for epoch in range(epochs):
        order = length_grouped_order(lengths, batch_size, rng) if group_by_length else rng.permutation(len(pool))
        for b in range(0, len(order) - batch_size + 1, batch_size):
            batch = [pool[i] for i in order[b:b + batch_size]]
            f = [feats[ex["key"]] for ex in batch]
            log["candidate_tokens"] += sum(len(ex["ids"]) for ex in batch)  # what a real run forwards through the trunk
            train_step(top, opt, batch, f, selector, k, loss_on, log)
            if progress is not None:
                progress.update(1)
        if on_epoch is not None:
            on_epoch(epoch + 1, top.eval())
            top.train()
    log["wall_s"] = time.perf_counter() - t0
    return top.eval(), log


@torch.no_grad()
def evaluate(top: TopBlocks, feats: dict, examples: list[dict], batch_size: int = 32) -> dict:
    """Held-out response loss and first-answer-token accuracy (greedy, over the whole vocabulary), per task."""
    rows = []
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        logits, targets, mask = top.response_logits([feats[ex["key"]] for ex in batch], batch)
        losses = per_example_loss(logits, targets, mask)
        correct = logits[:, 0].argmax(-1) == targets[:, 0]
        rows += [(ex["task"], float(l), bool(c)) for ex, l, c in zip(batch, losses, correct)]
    tasks = sorted({r[0] for r in rows})
    per_task = {t: {"loss": float(np.mean([r[1] for r in rows if r[0] == t])),
                    "acc": float(np.mean([r[2] for r in rows if r[0] == t]))} for t in tasks}
    return {"acc": float(np.mean([per_task[t]["acc"] for t in tasks])),  # task-balanced
            "loss": float(np.mean([per_task[t]["loss"] for t in tasks])), "per_task": per_task}
