"""A tiny byte-level Llama pre-trained from scratch at a short context, for the long-context papers (Self-Extend).

``python -m reprolab.lm.tiny_llama`` trains it deterministically (CPU, with the ``pretrain:`` parameters of the
``self_extend`` section of params.yaml) and writes one checkpoint per pre-training seed of ``pretrain.seeds``,
``models/tiny-llama-<context>/seed<k>/`` (the whole folder via a ``.partial`` folder renamed at the end): a
transformers ``LlamaForCausalLM`` plus ``pretrain.json`` (with the in-length passkey accuracy) each. ``--seeds k ...``
trains only those seeds and replaces only their folders (the same files: a checkpoint depends on its seed alone).
Cost: about 5 minutes per checkpoint on 2 free cores; on a shared machine far more (measured 1.7 CPU-s per step,
i.e. ~55 CPU-minutes for 2000 steps, with the 2 training threads competing with ~8 other runnable threads): train one
seed at a time (two 2-thread runs on 2 cores slow each other down several-fold); ``OMP_WAIT_POLICY=PASSIVE`` changes
no result.

Tokenizer: bytes (vocabulary 256) of whitespace-normalised ASCII text, so that every digit is one token.
Training data (labelled as generated where it is): random windows of the shipped public-domain texts
(``reprolab.data.load_text``, the first ``1 - heldout_fraction`` of each) mixed with synthetic passkey examples built
from the same text (:func:`passkey_example`): a random 5-digit key hidden at a random depth of filler text, then
"What is the pass key? The pass key is @<key>" (the key marked by ``MARK``; see ``NEEDLE``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..data import TEXTS, load_text
from ..paths import MODELS_DIR

# The paper's passkey prompt, with the key marked by MARK: a byte-level model this small cannot learn in budget to match
# the multi-byte context "pass key is " (a BPE LLM matches it as two tokens); after a unique byte, retrieval is plain
# induction (find the earlier MARK, copy what follows). MARK is removed from the shipped text.
MARK = "@"
NEEDLE = " The pass key is @{key}. Remember it. @{key} is the pass key."
# the official passkey filler (datamllab/LongLM, after Mohtashami & Jaggi's landmark-attention test)
REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("repeat", "text")
QUESTION = " What is the pass key? The pass key is @"
ANSWER = "{key}"


# ----------------------------------------------------------------------------------------------- bytes and corpus
def normalize(text: str) -> str:
    """Collapse whitespace to single spaces, drop non-ASCII characters and the passkey marker."""
    text = text.encode("ascii", errors="ignore").decode("ascii").replace(MARK, "")
    return re.sub(r"\s+", " ", text).strip()


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("ascii", errors="replace")


def corpus(split: str, heldout_fraction: float = 0.1) -> str:
    """The shipped texts, normalised: the first (train) or last (heldout) ``heldout_fraction`` of each, joined."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: {split!r}; allowed: train, heldout")
    parts = []
    for name in TEXTS:
        text = normalize(load_text(name))
        cut = int(len(text) * (1 - heldout_fraction))
        parts.append(text[:cut] if split == "train" else text[cut:])
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- passkey (generated)
def passkey_example(text: str, length: int, depth: float, key: int, rng: np.random.RandomState,
                    filler: str = "repeat") -> tuple[str, int]:
    """A passkey prompt of exactly ``length`` bytes ending with the answer, and the byte offset of the answer.

    Filler is the paper's repeated sentences (``filler="repeat"``, from a random phase) or a random contiguous span of
    ``text`` (``"text"``); the needle (key stated twice) is inserted after a fraction ``depth`` of the filler (snapped
    back to a space); the prompt ends "What is the pass key? The pass key is @<key>" (key marked by ``MARK``).
    """
    needle, answer = NEEDLE.format(key=key), ANSWER.format(key=key)
    n_filler = length - len(needle) - len(QUESTION) - len(answer)
    if n_filler < 1:
        raise ValueError(f"passkey: length {length} leaves no room for filler")
    if filler == "repeat":
        source = REPEAT_FILLER * (n_filler // len(REPEAT_FILLER) + 2)
        start = rng.randint(0, len(REPEAT_FILLER))
    elif filler == "text":
        source = text
        start = rng.randint(0, len(text) - n_filler)
    else:
        raise ValueError(f"passkey filler {filler!r}; allowed: {', '.join(FILLERS)}")
    filler = source[start:start + n_filler]
    cut = int(round(depth * n_filler))
    space = filler.rfind(" ", 0, cut)
    cut = space if (space > 0 and cut - space < 20) else cut
    prompt = filler[:cut] + needle + filler[cut:] + QUESTION + answer
    assert len(prompt) == length, (len(prompt), length)
    return prompt, length - len(answer)


def passkey_batch(text: str, length: int, depths, n_keys: int, seed: int, filler: str = "repeat"):
    """Evaluation set: ``n_keys`` random 5-digit keys at each depth. Returns (ids (N, L), answer_start, depths (N,))."""
    rng = np.random.RandomState(seed)
    rows, starts, ds = [], [], []
    for depth in depths:
        for _ in range(n_keys):
            prompt, start = passkey_example(text, length, float(depth), int(rng.randint(10000, 100000)), rng, filler)
            rows.append(encode(prompt))
            starts.append(start)
            ds.append(float(depth))
    assert len(set(starts)) == 1
    return torch.stack(rows), starts[0], np.array(ds)


@torch.no_grad()
def passkey_correct(model, ids: torch.Tensor, answer_start: int, batch_size: int = 8) -> np.ndarray:
    """Exact match of greedy decoding of the answer, one bool per row of ``ids`` (N, L).

    Greedy decoding reproduces the 5 answer digits exactly iff the argmax at each answer position,
    given the correct prefix, is the next answer byte; so one teacher-forced forward pass decides it.
    """
    out = []
    device = next(model.parameters()).device
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b:b + batch_size].to(device)  # (b, L)
        logits = model(x, use_cache=False).logits  # (b, L, V)
        pred = logits[:, answer_start - 1:-1].argmax(-1)  # (b, n_answer)
        out.append((pred == x[:, answer_start:]).all(-1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def byte_perplexity(model, text: str, length: int, n_windows: int) -> float:
    """Perplexity per byte over ``n_windows`` non-overlapping windows of ``length`` bytes from the start of ``text``."""
    ids = encode(text[:length * n_windows]).view(n_windows, length)  # (n, L)
    nll = 0.0
    ids = ids.to(next(model.parameters()).device)
    for row in ids:
        logits = model(row[None], use_cache=False).logits.float()  # (1, L, V)
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum").item()
    return math.exp(nll / (n_windows * (length - 1)))


# ----------------------------------------------------------------------------------------------- model and training
def tiny_llama_config(context: int, hidden: int, layers: int, heads: int, intermediate: int,
                      rope_theta: float = 10000.0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                       rope_theta=rope_theta, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, attn_implementation="eager")


def training_batch(text: str, context: int, batch: int, passkey_fraction: float, rng: np.random.RandomState,
                   passkey_min_len: int = 0):
    """(batch, context) byte ids and a 0/1 mask (batch, context) of the passkey answer bytes (0 on text rows).

    A passkey row starts with a passkey example of random length in [passkey_min_len, context] (the paper's repeated
    filler or shipped text with equal probability), continued by a random text window to fill the row."""
    rows, answer = [], torch.zeros(batch, context)
    for b in range(batch):
        if rng.rand() < passkey_fraction:
            filler = FILLERS[rng.randint(len(FILLERS))]
            m = rng.randint(passkey_min_len, context + 1) if passkey_min_len else context
            prompt, start = passkey_example(text, m, rng.rand(), int(rng.randint(10000, 100000)), rng, filler)
            tail = rng.randint(0, len(text) - context)
            rows.append(encode(prompt + (" " + text[tail:tail + context - m - 1] if m < context else "")))
            answer[b, start:m] = 1
        else:
            start = rng.randint(0, len(text) - context)
            rows.append(encode(text[start:start + context]))
    return torch.stack(rows), answer  # (batch, context), (batch, context)


def pretrain(context: int = 256, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 512,
             steps: int = 400, batch: int = 16, lr: float = 3e-3, warmup: int = 30, weight_decay: float = 0.1,
             passkey_fraction: float = 0.5, passkey_min_len: int = 0, heldout_fraction: float = 0.1,
             rope_theta: float = 10000.0, seed: int = 0, progress: bool = False, device: str = "cpu"):
    """Train the tiny Llama from scratch; returns (model in eval mode, log dict of losses).

    Loss: next-byte cross-entropy over all positions. Retrieval (an induction circuit) emerges abruptly, after a
    seed-dependent number of steps; ``answer_loss`` (the passkey answer bytes' cross-entropy) logs it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    text = corpus("train", heldout_fraction)
    model = LlamaForCausalLM(tiny_llama_config(context, hidden, layers, heads, intermediate, rope_theta)).to(device)
    model.config._attn_implementation = "sdpa"  # faster training; evaluation code picks its own attention
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, answer_losses = [], []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="pretrain tiny llama")
    model.train()
    for _ in it:
        x, answer = training_batch(text, context, batch, passkey_fraction, rng, passkey_min_len)  # (batch, context) x2
        x, answer = x.to(device), answer.to(device)
        logits = model(x).logits[:, :-1]  # (batch, context-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none").view_as(answer[:, 1:])  # (batch, context-1)
        loss = nll.mean()
        answer_nll = (nll * answer[:, 1:]).sum() / answer[:, 1:].sum().clamp(min=1)  # logged: retrieval progress
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(nll.mean().item())
        answer_losses.append(answer_nll.item())
    model.eval()
    model.config._attn_implementation = "eager"
    return model, {"loss": losses, "answer_loss": answer_losses}


def load_tiny_llama(name: str):
    """Load ``models/<name>/`` (written by this module's CLI) in eval mode with eager attention."""
    from transformers import LlamaForCausalLM

    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro tiny_llama` (python -m reprolab.lm.tiny_llama)")
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model.eval()


def pretrain_checkpoint(cfg: dict, seed: int, out: Path) -> float:
    """Pre-train one checkpoint with ``cfg`` (the ``pretrain:`` keys less threads/seeds) and ``seed``; write it and its
    ``pretrain.json`` to ``out``; return its in-length passkey accuracy (30 held-out prompts, fixed draw)."""
    model, log = pretrain(**cfg, seed=seed, progress=True)
    ids, start, _ = passkey_batch(corpus("heldout", cfg["heldout_fraction"]), cfg["context"], [0.1, 0.5, 0.9], 10,
                                  seed=12345)
    acc = float(passkey_correct(model, ids, start).mean())
    model.save_pretrained(out, safe_serialization=True)
    k = max(1, len(log["loss"]) // 20)
    every = lambda xs: [round(float(np.mean(xs[i:i + k])), 4) for i in range(0, len(xs), k)]  # noqa: E731
    info = {"pretrain": {**cfg, "seed": seed}, "passkey_acc_in_length": acc, f"loss_every_{k}_steps": every(log["loss"]),
            f"answer_loss_every_{k}_steps": every(log["answer_loss"]),
            "tokenizer": "bytes of whitespace-normalised ASCII text (reprolab.lm.tiny_llama.encode)"}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return acc


def main(argv=None) -> Path:
    from ..config import load_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", default="self_extend", help="params.yaml section whose `pretrain:` key is used")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--out", default="", help="output folder (default models/tiny-llama-<context>)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="train only these seeds of pretrain.seeds and replace only their seed<k>/ folders (the others "
                         "are kept); default: every seed of pretrain.seeds, replacing the whole output folder (the "
                         "DVC stage). Each checkpoint depends on its seed alone, so both give the same files")
    args = ap.parse_args(argv)
    cfg = dict(load_params(args.paper, args.profile)["pretrain"])
    torch.set_num_threads(cfg.pop("threads"))  # fixed: the float summation order, hence the weights, depend on it
    seeds = cfg.pop("seeds")
    cfg.pop("seed")  # the inline (smoke) pre-training seed
    out = Path(args.out) if args.out else MODELS_DIR / f"tiny-llama-{cfg['context']}"
    if args.seeds is not None:
        unknown = sorted(set(args.seeds) - set(seeds))
        if unknown:
            raise SystemExit(f"--seeds {unknown} not in pretrain.seeds {seeds}")
        out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:  # one checkpoint at a time, each via its own .partial folder beside `out`
            staging = out.with_name(f"{out.name}.seed{seed}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            t0 = time.perf_counter()
            acc = pretrain_checkpoint(cfg, seed, staging)
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s, in-length passkey accuracy {acc:.2f}")
            shutil.rmtree(out / f"seed{seed}", ignore_errors=True)
            staging.rename(out / f"seed{seed}")
        print(f"wrote {', '.join(f'seed{k}' for k in args.seeds)} in {out}")
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for seed in seeds:  # each checkpoint starts from torch.manual_seed(seed): independent of the others and the order
        t0 = time.perf_counter()
        acc = pretrain_checkpoint(cfg, seed, staging / f"seed{seed}")
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s, in-length passkey accuracy {acc:.2f}")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
