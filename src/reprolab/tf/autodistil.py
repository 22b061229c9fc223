"""AutoDistil: few-shot task-agnostic neural architecture search for distilling large language models (Xu et al.,
2022, https://arxiv.org/abs/2201.12507; official code microsoft/AutoDistil, ``Code/``).

The search space of student transformers is partitioned into K sub-spaces by size (tiny / small / base); one
weight-sharing SuperLM is trained per sub-space (few-shot NAS) with a TASK-AGNOSTIC objective: the self-attention
relation distillation of MiniLMv2 from the teacher's LAST layer into the student's last active layer. Followed here
(file:line in the registry's deviations):

* **relation loss** (``modeling_bert_v211_OneNas_KD_Pretrain_NoPrimer.py`` ``BertSelfAttention_v1.forward``): the
  queries (keys, values) of a layer, width W, are split into the TEACHER's number of heads A_r (12) of width
  ``W // A_r`` (the first ``A_r * (W // A_r)`` columns), and the relation scores are
  ``Q_a Q_a^T / sqrt(W // A_r)`` (pre-softmax); ``run_wiki_plus_book_NoAssist_RndSampl.py`` trains on
  ``MSE(QQ_s, QQ_t) + MSE(KK_s, KK_t) + MSE(VV_s, VV_t)`` of the last student and last teacher layer
  (``depth_lambda3 = 1``, logit and hidden-state terms weighted 0) — :func:`relation_loss` ``"mse"``; the paper's
  text (and MiniLMv2) state the KL between the softmaxed relations: ``"kl"`` (the kit's ``relation_kd``);
* **sub-space sampling** (``run_wiki_plus_book_NoAssist_RndSampl.py``, ``subs_para_range`` and
  ``subs_sampled = [subs_sorted[-1], subs_sorted[0]] + random.sample(subs_sorted[1:-1], 2)``): the sub-space's
  uniform architectures (same heads / feed-forward width in every layer) sorted by parameter count; every step
  accumulates the gradients of the largest, the smallest and two random other architectures, then one AdamW step;
* **K = 1 baseline**: ONE SuperLM over the union of the sub-spaces (one-shot NAS), the same recipe and the same TOTAL
  number of optimizer steps (each of the K SuperLMs gets ``steps // K``); the official per-SuperLM allocation
  (``k3_full``: every SuperLM as many steps as K = 1, K times the compute) is a reference arm, not a claim;
* **token-blind baseline** (:func:`relation_score_mean`, :func:`position_baseline_loss`): the mean teacher relation
  score per position pair, whatever the tokens -- the "majority class" of relation distillation that every arm must
  beat for its KD loss to count as learned.

Teacher: the real all-MiniLM-L6-v2 (BERT, 6 layers x 384, 12 heads); its last-layer queries / keys / values on every
sentence of the run are computed ONCE (no grad) and reused by every arm and seed. Students: ``tf.tiny.TinyTransformer``
encoders over the teacher's WordPiece tokens (ids remapped to the tokens that occur in the run: an exact shortcut, a
token that never occurs has an embedding row that is never read). Probe: which of the 6 shipped texts a sentence comes
from, a logistic-regression probe on the mean-pooled last hidden states (teacher and every extracted child alike).
"""
from __future__ import annotations

import itertools
import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..nas.harness import train_model
from .distill import hf_qkv_hooks, merge_heads, relation_kd
from .tiny import TFConfig, TinyTransformer

# K = 3 sub-space SuperLMs with equal TOTAL steps, K = 3 with the official per-SuperLM steps (reference), K = 1
ARMS = ("k3", "k3_full", "k1")
RELATION_LOSSES = ("mse", "kl")
DIMS = ("embed", "depth", "heads", "mlp")


# ---------------------------------------------------------------------------------------------------------- data
def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Sentences of a text: whitespace collapsed, split after . ! ? ; : followed by a space; at least ``min_words``."""
    text = re.sub(r"\s+", " ", text)
    out = [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", text)]
    return [s for s in out if len(s.split()) >= min_words]


def text_splits(min_words: int = 6, bounds=(0.8, 0.9)) -> dict:
    """{text: {"train", "val", "test": [sentences]}}: the first 80 % of each text's sentences (in order) for
    training, the next 10 % for validation and the last 10 % for test (no sentence is in two splits)."""
    from ..data import TEXTS, load_text

    out = {}
    for name in TEXTS:
        s = split_sentences(load_text(name), min_words)
        a, b = int(len(s) * bounds[0]), int(len(s) * bounds[1])
        out[name] = {"train": s[:a], "val": s[a:b], "test": s[b:]}
    return out


def _pick(rng: np.random.RandomState, items: list, n: int) -> list:
    if n > len(items):
        raise ValueError(f"asked for {n} sentences, only {len(items)} available")
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]


def build_sentences(n_kd: int, n_probe_pool: int, n_eval: int, data_seed: int = 0, min_words: int = 6) -> dict:
    """Sentences and labels (index of the text): ``kd`` n_kd random training sentences of all texts (unlabelled KD
    set), ``probe_pool`` n_probe_pool training sentences PER text (probe training subsets are drawn from it per seed),
    ``val`` / ``test`` n_eval sentences per text from the held-out 80-90 % / 90-100 % of each text."""
    sp = text_splits(min_words)
    names = list(sp)
    rng = np.random.RandomState(data_seed)
    pool = [(s, i) for i, n in enumerate(names) for s in sp[n]["train"]]
    kd = _pick(rng, pool, n_kd)
    out = {"kd": ([s for s, _ in kd], [i for _, i in kd]), "names": names}
    for split, n, part in (("probe_pool", n_probe_pool, "train"), ("val", n_eval, "val"), ("test", n_eval, "test")):
        xs, ys = [], []
        for i, name in enumerate(names):
            got = _pick(rng, sp[name][part], n)
            xs += got
            ys += [i] * n
        out[split] = (xs, ys)
    return out


def tokenize(tok, sentences: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] sentence [SEP], truncated / padded to ``seq_len``: (ids (N, T) int64, mask (N, T) bool)."""
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].bool()


def compact_vocab(*id_tensors: torch.Tensor) -> torch.Tensor:
    """The sorted distinct token ids of the run (the student's vocabulary; ``remap`` maps ids to their rank)."""
    return torch.unique(torch.cat([t.reshape(-1) for t in id_tensors]))


def remap(ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(vocab, ids)
    if not torch.equal(vocab[idx.clamp_max(len(vocab) - 1)], ids):
        raise ValueError("a token id is not in the compact vocabulary")
    return idx


# ---------------------------------------------------------------------------------------------------------- teacher
def teacher_layer(model, layer: int = -1) -> int:
    n = model.config.num_hidden_layers
    return layer % n


@torch.no_grad()
def teacher_states(model, ids: torch.Tensor, mask: torch.Tensor, layer: int = -1, batch_size: int = 64) -> dict:
    """The teacher's ``layer`` (default: the last) query / key / value projections {"q", "k", "v": (N, T, D)
    float16} and its mean-pooled (over real tokens) last hidden state {"pooled": (N, D) float32}, computed once."""
    model.eval()
    li = teacher_layer(model, layer)
    store, handles = hf_qkv_hooks(model, li)
    out = {"q": [], "k": [], "v": [], "pooled": []}
    try:
        for b in range(0, len(ids), batch_size):
            x, m = ids[b:b + batch_size], mask[b:b + batch_size]
            h = model(input_ids=x, attention_mask=m.long()).last_hidden_state
            for key in ("q", "k", "v"):
                out[key].append(store[key].to(torch.float16))
            w = m.unsqueeze(-1).float()
            out["pooled"].append((h * w).sum(1) / w.sum(1).clamp_min(1.0))
    finally:
        for hd in handles:
            hd.remove()
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------- relations
def relation_scores(x: torch.Tensor, n_rel: int) -> torch.Tensor:
    """Official relation scores: x (B, T, W) -> (B, n_rel, T, T) = X_a X_a^T / sqrt(d_r), d_r = W // n_rel, using
    the first n_rel * d_r columns (``BertSelfAttention_v1``: ``attention_head_size_adjusted = all_head_size //
    num_attention_heads_teacher``)."""
    B, T, W = x.shape
    d = W // n_rel
    if d < 1:
        raise ValueError(f"width {W} < n_rel={n_rel} relation heads")
    xr = x[..., :n_rel * d].reshape(B, T, n_rel, d).transpose(1, 2)
    return xr @ xr.transpose(-1, -2) / math.sqrt(d)


def relation_mse(student: torch.Tensor, teacher: torch.Tensor, n_rel: int, mask: torch.Tensor | None = None):
    """Mean squared difference of the relation scores of one relation (e.g. Q-Q), over relation heads and the
    (query, key) pairs of real tokens (padding pairs excluded; the official additive -10000 mask cancels in the
    difference, so there every pair counts)."""
    d = (relation_scores(student, n_rel) - relation_scores(teacher.detach(), n_rel)).pow(2)
    if mask is None:
        return d.mean()
    m = mask.to(d.dtype)
    pair = (m[:, :, None] * m[:, None, :])[:, None]  # (B, 1, T, T)
    return (d * pair).sum() / (pair.sum() * d.size(1)).clamp_min(1.0)


def relation_loss(student_qkv, teacher_qkv, n_rel: int, mask: torch.Tensor | None = None, kind: str = "mse"):
    """Sum over Q-Q, K-K, V-V of :func:`relation_mse` (``"mse"``, the official training loss) or of the MiniLMv2
    KL(R_teacher || R_student) of the softmaxed relations (``"kl"``, ``tf.distill.relation_kd`` after the same
    truncation). Each argument: (q, k, v), each (B, T, W) or per-head (B, h, T, d)."""
    if kind not in RELATION_LOSSES:
        raise ValueError(f"relation loss {kind!r}; allowed: {', '.join(RELATION_LOSSES)}")
    total = 0.0
    for s, t in zip(student_qkv, teacher_qkv):
        s = merge_heads(s) if s.dim() == 4 else s
        t = (merge_heads(t) if t.dim() == 4 else t).float()
        if kind == "mse":
            total = total + relation_mse(s, t, n_rel, mask)
        else:
            ds, dt = s.size(-1) // n_rel, t.size(-1) // n_rel
            total = total + relation_kd(s[..., :n_rel * ds], t[..., :n_rel * dt], n_rel, mask)
    return total


def relation_score_mean(teacher_qkv, mask: torch.Tensor, n_rel: int, batch_size: int = 256) -> tuple:
    """The TOKEN-BLIND relation predictor: per relation (Q-Q, K-K, V-V), relation head and (query, key) position pair,
    the mean teacher relation score over the real-token pairs of the given (KD) sentences. Returns a tuple of three
    (n_rel, T, T) tensors (0 where no sentence has that pair)."""
    out = []
    for t in teacher_qkv:
        num, cnt = 0.0, 0.0
        for b in range(0, len(t), batch_size):
            s = relation_scores(t[b:b + batch_size].float(), n_rel)
            m = mask[b:b + batch_size].float()
            pair = (m[:, :, None] * m[:, None, :])[:, None]
            num = num + (s * pair).sum(0)
            cnt = cnt + pair.sum(0)
        out.append(num / cnt.clamp_min(1.0))
    return tuple(out)


def position_baseline_loss(means: tuple, teacher_qkv, mask: torch.Tensor, n_rel: int, batch_size: int = 256) -> float:
    """The training loss (:func:`relation_loss` ``"mse"``: summed over Q-Q, K-K, V-V, mean over relation heads and
    real-token pairs) of a "student" whose relation scores are :func:`relation_score_mean` whatever the tokens: the
    analog of a majority-class / unigram baseline for relation distillation (a student must beat it to have learned
    anything beyond the positions)."""
    total = 0.0
    for mu, t in zip(means, teacher_qkv):
        num, cnt = 0.0, 0.0
        for b in range(0, len(t), batch_size):
            s = relation_scores(t[b:b + batch_size].float(), n_rel)
            m = mask[b:b + batch_size].float()
            pair = (m[:, :, None] * m[:, None, :])[:, None]
            num += float(((s - mu[None]) ** 2 * pair).sum())
            cnt += float(pair.sum()) * s.size(1)
        total += num / max(cnt, 1.0)
    return total


def student_qkv(net: TinyTransformer, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(q, k, v) of the active child's LAST active layer, each (B, T, heads * head_dim), and the last hidden state."""
    out = net(ids, mask=mask, return_states=True)
    return tuple(merge_heads(t) for t in out["qkv"][-1]), out["hidden"][-1]


# ---------------------------------------------------------------------------------------------------------- spaces
def union_space(subspaces: dict) -> dict:
    """The whole search space of the K = 1 baseline: per dimension, the union of the sub-spaces' choices."""
    return {d: sorted({v for sp in subspaces.values() for v in sp[d]}) for d in DIMS}


def space_max(space: dict) -> dict:
    d = max(space["depth"])
    return {"embed": max(space["embed"]), "depth": d, "heads": [max(space["heads"])] * d,
            "mlp": [max(space["mlp"])] * d}


def space_min(space: dict) -> dict:
    d = min(space["depth"])
    return {"embed": min(space["embed"]), "depth": d, "heads": [min(space["heads"])] * d,
            "mlp": [min(space["mlp"])] * d}


def model_config(space: dict, cfg: dict, vocab_size: int) -> TFConfig:
    """The SuperLM of a space: an encoder the size of the space's largest child (6-way pooled head, never trained by
    the task-agnostic loss; it keeps the forward from computing a vocabulary-sized token head)."""
    return TFConfig(kind="encoder", d_model=max(space["embed"]), n_layers=max(space["depth"]),
                    n_heads=max(space["heads"]), head_dim=cfg["head_dim"], mlp_hidden=max(space["mlp"]),
                    vocab_size=vocab_size, max_len=cfg["seq_len"], n_classes=6, dropout=cfg["dropout"])


def space_children(net: TinyTransformer, space: dict) -> list[dict]:
    """Every uniform architecture of the space (official ``subs_para_range``: product of depth, heads, hidden and
    intermediate choices), sorted by parameter count (stable: ties keep the product order)."""
    kids = [net.config_from(e, d, h, m) for d, h, e, m in
            itertools.product(space["depth"], space["heads"], space["embed"], space["mlp"])]
    return sorted(kids, key=lambda c: net.n_params(c))


def sample_step(children: list[dict], step: int, seed: int, n_random: int = 2) -> list[dict]:
    """The step's architectures: the largest, the smallest and ``n_random`` distinct others drawn uniformly
    (official: ``random.seed(global_step)``; here seeded by (seed, step) so that seeds differ)."""
    if len(children) < n_random + 2:
        raise ValueError(f"a sub-space needs at least {n_random + 2} architectures (has {len(children)})")
    rng = random.Random(seed * 1_000_003 + step)
    return [children[-1], children[0]] + rng.sample(children[1:-1], n_random)


def in_space(child: dict, space: dict) -> bool:
    return (child["embed"] in space["embed"] and child["depth"] in space["depth"]
            and all(h in space["heads"] for h in child["heads"]) and all(m in space["mlp"] for m in child["mlp"]))


# ---------------------------------------------------------------------------------------------------------- training
def _no_decay(net: torch.nn.Module) -> list:
    """Biases and LayerNorm weights (official ``no_decay = ['bias', 'LayerNorm.bias', 'LayerNorm.weight']``)."""
    return [p for n, p in net.named_parameters() if n.endswith("bias") or ".ln" in n or n.startswith("ln")]


def init_superlm(space: dict, cfg: dict, seed: int, vocab_size: int) -> TinyTransformer:
    """The SuperLM of ``space`` at initialisation (seeded: the same weights for the same space and seed)."""
    torch.manual_seed(seed)
    return TinyTransformer(model_config(space, cfg, vocab_size))


def train_superlm(space: dict, kd: dict, cfg: dict, seed: int, steps: int, vocab_size: int,
                  fixed_child: dict | None = None) -> tuple[TinyTransformer, list[float]]:
    """Train one SuperLM on ``space`` for ``steps`` AdamW steps with the relation loss from the cached teacher
    states ``kd`` = {"ids", "mask", "q", "k", "v"}; ``fixed_child``: train only that architecture (the standalone
    twin). Returns (net, mean loss over the step's children per step)."""
    net = init_superlm(space, cfg, seed, vocab_size)
    children = space_children(net, space)
    n_rel, kind = cfg["n_rel"], cfg["relation_loss"]

    def loss_fn(model, x, idx, step):
        mask = kd["mask"][idx]
        tq = tuple(kd[k][idx] for k in ("q", "k", "v"))
        picks = [fixed_child] if fixed_child is not None else sample_step(children, step, seed, cfg["n_random"])
        total = 0.0
        for c in picks:
            model.set_active_subnet(c)
            sq, _ = student_qkv(model, x, mask)
            loss = relation_loss(sq, tq, n_rel, mask, kind)
            loss.backward()  # gradients of the step's children accumulate (one optimizer step)
            total += float(loss.detach())
        model.set_active_subnet(model.max_config())
        return torch.tensor(total / len(picks))

    idx = torch.arange(len(kd["ids"]))
    losses = train_model(net, {"train": (kd["ids"], idx)}, steps, loss_fn, lr=cfg["lr"], optimizer="adamw",
                         weight_decay=cfg["weight_decay"], no_decay=_no_decay(net), batch_size=cfg["batch_size"],
                         seed=seed, schedule=cfg["schedule"], warmup_steps=cfg["warmup_steps"],
                         grad_clip=cfg["grad_clip"])
    net.eval()
    return net, losses


def arm_steps(arm: str, steps: int, k: int) -> int:
    """Optimizer steps of each SuperLM of an arm: ``k3`` equal TOTAL steps (steps // K each); ``k3_full`` (official
    allocation) and ``k1``: ``steps`` each."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}; allowed: {', '.join(ARMS)}")
    return steps // k if arm == "k3" else steps


def arm_spaces(arm: str, subspaces: dict) -> dict:
    """{SuperLM name: its space}: one per sub-space for the K = 3 arms, one over the union for K = 1."""
    return {"all": union_space(subspaces)} if arm == "k1" else dict(subspaces)


def superlm_for(arm: str, budget: str) -> str:
    """Which SuperLM of an arm holds the children of a budget."""
    return "all" if arm == "k1" else budget


# ---------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_child(net: TinyTransformer, child: dict, ids: torch.Tensor, mask: torch.Tensor, teacher: dict,
                   cfg: dict, batch_size: int = 128) -> dict:
    """Task-agnostic KD loss (the training loss, and the other relation loss as context) of a child on held-out
    sentences, weighted by batch size, and its mean-pooled last hidden states (probe features)."""
    net.eval()
    net.set_active_subnet(child)
    other = "kl" if cfg["relation_loss"] == "mse" else "mse"
    tot, tot_o, feats = 0.0, 0.0, []
    for b in range(0, len(ids), batch_size):
        x, m = ids[b:b + batch_size], mask[b:b + batch_size]
        tq = tuple(teacher[k][b:b + batch_size] for k in ("q", "k", "v"))
        sq, h = student_qkv(net, x, m)
        tot += float(relation_loss(sq, tq, cfg["n_rel"], m, cfg["relation_loss"])) * len(x)
        tot_o += float(relation_loss(sq, tq, cfg["n_rel"], m, other)) * len(x)
        w = m.unsqueeze(-1).float()
        feats.append((h * w).sum(1) / w.sum(1).clamp_min(1.0))
    net.set_active_subnet(net.max_config())
    return {"kd_loss": tot / len(ids), f"kd_{other}": tot_o / len(ids), "features": torch.cat(feats)}


def probe_accuracy(X_train, y_train, X_test, y_test, C: float = 1.0) -> float:
    """Test accuracy of a logistic-regression probe (features standardised on the probe's training set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    clf.fit(np.asarray(X_train, dtype=np.float64), np.asarray(y_train))
    return float((clf.predict(np.asarray(X_test, dtype=np.float64)) == np.asarray(y_test)).mean())


def probe_subset(y_pool, n_per_class: int, seed: int) -> np.ndarray:
    """Indices of a balanced probe-training subset of the probe pool (n_per_class per text), drawn per seed."""
    y_pool = np.asarray(y_pool)
    rng = np.random.RandomState(10_000 + seed)
    idx = [np.sort(rng.choice(np.flatnonzero(y_pool == c), n_per_class, replace=False)) for c in np.unique(y_pool)]
    return np.concatenate(idx)


def budget_children(subspaces: dict) -> dict:
    """The evaluated architectures of each budget (sub-space): its smallest and its largest (the same for every arm)."""
    return {b: {"min": space_min(sp), "max": space_max(sp)} for b, sp in subspaces.items()}


__all__ = ["ARMS", "RELATION_LOSSES", "split_sentences", "text_splits", "build_sentences", "tokenize",
           "compact_vocab", "remap", "teacher_states", "relation_scores", "relation_mse", "relation_loss",
           "relation_score_mean", "position_baseline_loss", "student_qkv", "union_space", "space_max", "space_min",
           "model_config", "init_superlm", "space_children", "sample_step", "in_space", "train_superlm", "arm_steps",
           "arm_spaces", "superlm_for", "evaluate_child", "probe_accuracy", "probe_subset", "budget_children"]
