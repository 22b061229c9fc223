"""LightHuBERT (Wang et al., Interspeech 2022, arXiv 2203.15610): a once-for-all speech transformer distilled from a
pretrained speech encoder, in miniature on real speech.

Official code: github.com/mechanicalsea/lighthubert (``lighthubert/lighthubert.py``: the supernet, its search spaces,
first-k slicing, one random subnet per forward, the span masking ``compute_mask_indices``, the linear prediction head
to the teacher's width). The repository ships the model only (no training script): the loss follows the paper's
description (the student sees masked input and regresses the teacher's hidden states at the masked frames).

Here:

- teacher: the real Whisper-base encoder (``reprolab.tf.speech.WhisperTeacher``, last layer only, 512-d, 50 states a
  second), run once per clip;
- student: :class:`LightStudent`, a ``reprolab.tf.tiny`` ``frames`` transformer over Whisper's 80-d log-mel frames
  stacked in pairs (100 -> 50 frames a second, aligned with the teacher's states), a LayerNorm on the stacked frames
  and an elastic projection (official ``layer_norm`` + ``post_extract_proj``), a learned mask embedding substituted at
  the masked frames after the projection (official ``apply_mask``), pre-LN blocks with elastic embed / heads / MLP /
  depth (first-k slicing from the kit), a final LayerNorm and a bias-free linear head to 512 (official
  ``layer_pred_heads``, ``layer_pred_num`` = the last layer only);
- :func:`compute_mask_indices`: the official span masking (static spans, ``mask_prob`` 0.65, ``mask_length`` 10,
  ``min_masks`` 2, overlapping spans, every row trimmed to the batch's smallest count) with a seeded generator;
- :func:`distill_loss`: mean squared error between the head's prediction and the teacher's states over the masked
  frames;
- :func:`sample_subnet`: the official ``sample_subnet`` rule (embed and depth once, heads and FFN ratio per layer,
  each uniformly; ``ffn = int(ratio * embed)``);
- :func:`train_student`: stage 1 (the full student) or the separately distilled student (a fixed architecture) or
  stage 2 (one sampled subnet per step), all through ``nas.harness.train_model`` (AdamW, warm-up + cosine);
- :func:`extract_subnet`: a standalone :class:`LightStudent` of a child's size with the first-k slices of the
  supernet's weights (its output equals the supernet child's: tested); :func:`n_params` counts a child's parameters
  as the official ``calc_sampled_param_num`` (prediction head excluded);
- :func:`qbe_accuracy`: the probe, cross-speaker query-by-example on the 527 prompts both Italian speakers read.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nas.elastic import DynamicLinear
from . import speech
from .tiny import TFConfig, TinyTransformer

TRAIN_VOICES = ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June", "ru_RU_f_IvrvoiceRU")
PROBE_VOICES = ("it_IT_m_Carlo", "it_IT_f_Menardi")
STACK = 2  # log-mel frames (100 a second) per student frame (50 a second, the teacher's rate)


# ---------------------------------------------------------------------------------------------- features
def stack_frames(mel: np.ndarray | torch.Tensor):
    """(T, 80) with T even -> (T / 2, 160): pairs of consecutive frames side by side (frame 2j then 2j + 1)."""
    return mel.reshape(mel.shape[0] // STACK, STACK * mel.shape[1])


def load_clips(voice: str, names, max_seconds: float, teacher=None) -> list[dict]:
    """Per clip: the stacked log-mel frames (T, 160) and, with a teacher, its states (T, 512) (same T)."""
    out = []
    for name in names:
        mel = speech.log_mel(speech.load_wave(voice, name, max_seconds))
        d = {"voice": voice, "name": name, "mel": mel, "x": stack_frames(mel)}
        if teacher is not None:
            d["t"] = teacher.encode(mel)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------- masking (official)
def compute_mask_indices(shape, mask_prob: float, mask_length: int, rng: np.random.Generator,
                         min_masks: int = 0, require_same_masks: bool = True) -> np.ndarray:
    """The official ``compute_mask_indices`` (lighthubert.py:28-162) for mask_type ``static``, no padding, overlapping
    spans, no mask dropout, drawing from ``rng`` instead of the global numpy state. Each row: ``num_mask = int(p * T /
    L + u)`` span starts drawn without replacement from [0, T - L), each masks L frames; with ``require_same_masks``
    every row keeps a random subset of its masked frames the size of the batch's smallest count."""
    bsz, sz = shape
    mask = np.full((bsz, sz), False)
    num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
    idcs = []
    for _ in range(bsz):
        lengths = np.full(num_mask, mask_length)
        if lengths.sum() == 0:
            lengths[0] = min(mask_length, sz - 1)
        min_len = int(lengths.min())
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        starts = rng.choice(sz - min_len, num_mask, replace=False)
        idc = (starts[:, None] + np.arange(int(lengths.max()))[None, :])[np.arange(int(lengths.max()))[None, :]
                                                                          < lengths[:, None]]
        idcs.append(np.unique(idc[idc < sz]))
    keep = min(len(m) for m in idcs)
    for i, idc in enumerate(idcs):
        if len(idc) > keep and require_same_masks:
            idc = rng.choice(idc, keep, replace=False)
        mask[i, idc] = True
    return mask


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 unmasked_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error over the masked frames (mean over masked frames and dimensions of (pred - target)^2), plus
    ``unmasked_weight`` times the same mean over the unmasked frames (HuBERT's pred_nomask_weight)."""
    m = mask.bool()
    loss = F.mse_loss(pred[m], target[m])
    if unmasked_weight and (~m).any():
        loss = loss + unmasked_weight * F.mse_loss(pred[~m], target[~m])
    return loss


# ---------------------------------------------------------------------------------------------- student
class LightStudent(TinyTransformer):
    """``frames`` TinyTransformer with LightHuBERT's pieces: input LayerNorm over the stacked frames, mask embedding,
    bias-free prediction head to the teacher's width. ``forward(x, mask_idx)`` -> {"x": last hidden state after the
    final LayerNorm (the representation the probe pools), "pred": the head's prediction (B, T, teacher_dim)}."""

    def __init__(self, cfg: TFConfig, teacher_dim: int = 512):
        super().__init__(cfg)
        self.teacher_dim = teacher_dim
        self.in_norm = nn.LayerNorm(cfg.frame_dim)
        self.mask_emb = nn.Parameter(torch.empty(cfg.d_model).uniform_())  # official: uniform_() (:444-446)
        self.pred_head = DynamicLinear(cfg.d_model, teacher_dim, bias=False)
        nn.init.normal_(self.pred_head.linear.weight, std=0.02)

    def forward(self, x: torch.Tensor, mask_idx: torch.Tensor | None = None):
        e = self.active_embed
        T = x.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"frames {T} > max_len={self.cfg.max_len}")
        h = self.frame(self.in_norm(x), e)
        if mask_idx is not None:
            h = torch.where(mask_idx[..., None].bool(), self.mask_emb[:e].to(h.dtype), h)
        h = self.drop(h + self.pos[:, :T, :e])
        h, _, _ = self.run_blocks(h)
        h = self.ln_f(h)
        return {"x": h, "pred": self.pred_head(h, self.teacher_dim)}


def student_config(cfg: dict) -> TFConfig:
    """The supernet's (largest) TFConfig from a params section."""
    return TFConfig(kind="frames", d_model=cfg["embed_dim"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                    head_dim=cfg["head_dim"], mlp_hidden=int(max(cfg["ffn_ratios"]) * cfg["embed_dim"]),
                    max_len=cfg["max_len"], n_classes=1, frame_dim=STACK * 80, dropout=0.0, act="gelu")


def child_config(embed: int, heads: int, ffn_ratio: float, depth: int) -> dict:
    return {"embed": int(embed), "depth": int(depth), "heads": [int(heads)] * depth,
            "mlp": [int(ffn_ratio * embed)] * depth}


def search_space(cfg: dict) -> dict:
    """Absolute choices from the params' fractions (official Base space: embed and heads {2/3, 5/6, 1}, ffn ratio
    {3.5, 4}, depth {12}; Small: embed / heads {1/2, 3/4, 1}, ratio {3, 3.5, 4}, depth {10, 11, 12})."""
    return {"embed": [int(round(f * cfg["embed_dim"])) for f in cfg["embed_fracs"]],
            "heads": [int(round(f * cfg["heads"])) for f in cfg["heads_fracs"]],
            "ffn_ratio": list(cfg["ffn_ratios"]),
            "depth": [int(d) for d in cfg["depths"]]}


def sample_subnet(space: dict, rng: random.Random) -> dict:
    """Official ``sample_subnet`` (lighthubert.py:297-332): depth and embed once, then per layer an FFN ratio
    (``ffn = int(ratio * embed)``) and a head count, each uniformly (atten_dim = heads * head_dim)."""
    depth = rng.choice(space["depth"])
    embed = rng.choice(space["embed"])
    mlp = [int(rng.choice(space["ffn_ratio"]) * embed) for _ in range(depth)]
    heads = [rng.choice(space["heads"]) for _ in range(depth)]
    return {"embed": embed, "depth": depth, "heads": heads, "mlp": mlp}


def extract_subnet(net: LightStudent, child: dict) -> LightStudent:
    """A standalone LightStudent of a uniform child's size whose weights are the first-k slices of ``net``'s."""
    net.set_active_subnet(child)
    sub = LightStudent(net.child_tfconfig(), net.teacher_dim)
    src = net.state_dict()
    with torch.no_grad():
        for name, p in sub.state_dict().items():
            p.copy_(src[name][tuple(slice(0, s) for s in p.shape)])
    net.set_active_subnet(net.max_config())
    return sub


def n_params(net: LightStudent, child: dict | None = None) -> int:
    """Parameters of a child as the official ``calc_sampled_param_num`` (lighthubert.py:575-588): every parameter
    the child uses, without the prediction head: input LayerNorm, projection, mask embedding, positions, blocks,
    final LayerNorm (accounting, tested against the extracted model)."""
    c = net.validate_config(child or net.max_config())
    e = c["embed"]
    kit = net.n_params(c, include_embedding=True)  # blocks, final LN, the kit's unused 1-class head, frame proj, pos
    return kit - (e + 1) + e + 2 * net.cfg.frame_dim  # minus the unused head, plus mask embedding and input LN


# ---------------------------------------------------------------------------------------------- training
def make_batch(clips: list[dict], idx, rng: np.random.Generator, max_frames: int, crop: str = "start"):
    """Crop every clip of the batch to the batch's shortest length (at most ``max_frames``), from its start
    (``crop="start"``: the teacher's states were computed once on the whole clip and carry its absolute positions,
    so the student's position j is the teacher's position j) or at a random offset (``"random"``, fairseq's
    cropping, where the teacher runs on the crop itself); returns (x (B, T, 160), teacher (B, T, 512))."""
    if crop not in ("start", "random"):
        raise ValueError(f"crop={crop!r}; allowed: start, random")
    L = min(min(len(clips[i]["x"]) for i in idx), max_frames)
    xs, ts = [], []
    for i in idx:
        c = clips[i]
        o = int(rng.integers(0, len(c["x"]) - L + 1)) if crop == "random" else 0
        xs.append(c["x"][o:o + L])
        ts.append(c["t"][o:o + L])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ts))


def length_buckets(clips: list[dict], batch_size: int) -> list[list[int]]:
    """Clips sorted by length (ties by index) and cut into consecutive batches of ``batch_size``: every batch holds
    clips of similar length, so cropping to the batch's shortest loses little (fairseq orders its batches by size)."""
    order = sorted(range(len(clips)), key=lambda i: (len(clips[i]["x"]), i))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def train_student(net: LightStudent, clips: list[dict], cfg: dict, steps: int, seed: int, stream: int,
                  space: dict | None = None) -> list[float]:
    """Distil ``net`` for ``steps`` steps on ``clips`` through ``nas.harness.train_model`` (AdamW, warm-up + cosine).
    ``space`` None: the active architecture (stage 1 / a separately distilled student); else stage 2: one subnet of
    ``space`` sampled uniformly per step (the official forward pre-hook, lighthubert.py:523-534). Batches: the
    length buckets of :func:`length_buckets` in a random order per epoch (``cfg["batching"] == "bucket"``) or
    ``batch_size`` random clips (``"random"``). ``stream`` keeps the crop / mask / subnet randomness of the arms of a
    seed apart and reproducible."""
    from ..nas.harness import train_model

    np_rng = np.random.default_rng([seed, stream])
    py_rng = random.Random(seed * 1000 + stream)
    fixed = net.active_config()
    if cfg["batching"] == "bucket":
        buckets = length_buckets(clips, cfg["batch_size"])
        ids, bs = torch.arange(len(buckets)), 1
    elif cfg["batching"] == "random":
        buckets, ids, bs = None, torch.arange(len(clips)), cfg["batch_size"]
    else:
        raise ValueError(f"batching={cfg['batching']!r}; allowed: bucket, random")

    def loss_fn(model, xb, _y, step):
        if space is not None:
            model.set_active_subnet(sample_subnet(space, py_rng))
        idx = buckets[int(xb[0])] if buckets is not None else xb.tolist()
        x, t = make_batch(clips, idx, np_rng, cfg["max_frames"], cfg["crop"])
        m = torch.from_numpy(compute_mask_indices(tuple(x.shape[:2]), cfg["mask_prob"], cfg["mask_length"], np_rng,
                                                  min_masks=2))
        return distill_loss(model(x, m)["pred"], t, m, cfg["unmasked_weight"])

    w = int(round(cfg["warmup_frac"] * steps))
    losses = train_model(net, {"train": (ids, ids)}, steps, loss_fn, lr=cfg["lr"], optimizer="adamw",
                         weight_decay=cfg["weight_decay"], batch_size=bs, seed=seed * 1000 + stream,
                         schedule="cosine", warmup_steps=w, grad_clip=cfg["grad_clip"])
    net.set_active_subnet(fixed)
    net.eval()
    return losses


@torch.no_grad()
def heldout_loss(net, clips: list[dict], cfg: dict, seed: int = 12345) -> float:
    """Masked distillation loss on held-out clips, one clip at a time (whole clip up to ``max_frames``), with the
    same masks for every model (seeded). ``net`` may be a constant vector (teacher_dim,): the loss of predicting it
    at every frame (e.g. the training clips' mean teacher state, the trivial reference)."""
    rng = np.random.default_rng(seed)
    const = not isinstance(net, nn.Module)
    if not const:
        net.eval()
    tot, n = 0.0, 0
    for c in clips:
        x = torch.from_numpy(c["x"][: cfg["max_frames"]])[None]
        t = torch.from_numpy(c["t"][: cfg["max_frames"]])[None]
        m = torch.from_numpy(compute_mask_indices((1, x.shape[1]), cfg["mask_prob"], cfg["mask_length"], rng,
                                                  min_masks=2))
        pred = torch.as_tensor(net, dtype=t.dtype).expand_as(t) if const else net(x, m)["pred"]
        tot += float(distill_loss(pred, t, m)) * int(m.sum())
        n += int(m.sum())
    return tot / n


def prepare_data(cfg: dict, teacher) -> dict:
    """The run's clips with their teacher states: ``train`` (clips_per_voice prompts of each training voice, drawn
    with ``seed``, at most max_seconds, at least min_frames states), ``heldout`` (heldout_per_voice further prompts of
    each voice) and ``probe`` = (Carlo's clips, Menardi's clips) of the shared prompts (the first probe_prompts, 0 =
    all 527), at most probe_seconds each."""
    rng = np.random.default_rng(cfg["seed"])
    train, held = [], []
    for v in cfg["train_voices"]:
        names = speech.asterisk_clips(v)
        order = rng.permutation(len(names))
        k, h = cfg["clips_per_voice"], cfg["heldout_per_voice"]
        train += load_clips(v, [names[i] for i in sorted(order[:k])], cfg["max_seconds"], teacher)
        held += load_clips(v, [names[i] for i in sorted(order[k:k + h])], cfg["max_seconds"], teacher)
    train = [c for c in train if len(c["x"]) >= cfg["min_frames"]]
    prompts = speech.shared_prompts()
    if cfg["probe_prompts"]:
        prompts = prompts[: cfg["probe_prompts"]]
    probe = tuple(load_clips(v, prompts, cfg["probe_seconds"], teacher) for v in PROBE_VOICES)
    return {"train": train, "heldout": held, "probe": probe, "prompts": prompts}


def probe_model(net: LightStudent, probe) -> dict:
    """Probe accuracy of a model's last hidden state (the claim) and of its predicted teacher states (details); one
    unmasked forward per clip."""
    net.eval()
    outs = []
    with torch.no_grad():
        for clips in probe:
            o = [net(torch.from_numpy(c["x"])[None]) for c in clips]
            outs.append(([d["x"][0].numpy() for d in o], [d["pred"][0].numpy() for d in o]))
    (ax, ap), (bx, bp) = outs
    return {"acc": qbe_accuracy(ax, bx)["mean"], "acc_pred": qbe_accuracy(ap, bp)["mean"]}


def subnet_child(cfg: dict) -> dict:
    s = cfg["subnet"]
    return child_config(int(round(s["embed_frac"] * cfg["embed_dim"])), int(round(s["heads_frac"] * cfg["heads"])),
                        s["ffn_ratio"], s["depth"])


def run_seed(data: dict, cfg: dict, seed: int) -> dict:
    """One seed: stage 1 (full student), stage 2 (once-for-all), the subnet extracted without retraining, the
    separately distilled student of the subnet's architecture (stage1 + stage2 steps). Probe accuracies, held-out
    masked losses and the training curves."""
    space, child = search_space(cfg), subnet_child(cfg)
    torch.manual_seed(10 * seed + 1)
    net = LightStudent(student_config(cfg))
    curves, out = {}, {}
    curves["stage1"] = train_student(net, data["train"], cfg, cfg["stage1_steps"], seed, 1)
    stage1 = LightStudent(student_config(cfg))
    stage1.load_state_dict(net.state_dict())
    out["stage1_full"] = stage1
    curves["stage2"] = train_student(net, data["train"], cfg, cfg["stage2_steps"], seed, 2, space=space)
    out["supernet_max"] = extract_subnet(net, net.max_config())
    out["supernet_subnet"] = extract_subnet(net, child)
    torch.manual_seed(10 * seed + 2)
    sep = LightStudent(net.child_tfconfig(child))
    curves["separate"] = train_student(sep, data["train"], cfg, cfg["stage1_steps"] + cfg["stage2_steps"], seed, 3)
    out["separate"] = sep
    rows = {name: {**probe_model(m, data["probe"]), "heldout_loss": heldout_loss(m, data["heldout"], cfg)}
            for name, m in out.items()}
    return {"rows": rows, "curves": curves}


# ---------------------------------------------------------------------------------------------- probe
def pool_thirds(states: np.ndarray) -> np.ndarray:
    """(T, D) -> (3 D): the means of three equal time thirds (``np.array_split``), concatenated."""
    return np.concatenate([p.mean(0) for p in np.array_split(states, 3, axis=0)])


def qbe_accuracy(states_a: list[np.ndarray], states_b: list[np.ndarray]) -> dict:
    """Cross-speaker query-by-example: clip i of speaker a and clip i of speaker b read the same prompt. Each clip is
    pooled (:func:`pool_thirds`), centred over the pooled vectors of both speakers, L2-normalised; every clip of one
    speaker retrieves its nearest clip of the other by cosine; top-1 accuracy per direction and their mean."""
    A = np.stack([pool_thirds(s) for s in states_a]).astype(np.float64)
    B = np.stack([pool_thirds(s) for s in states_b]).astype(np.float64)
    mu = np.concatenate([A, B]).mean(0)
    A, B = A - mu, B - mu
    A /= np.linalg.norm(A, axis=1, keepdims=True) + 1e-12
    B /= np.linalg.norm(B, axis=1, keepdims=True) + 1e-12
    S = A @ B.T
    n = len(A)
    a2b = float((S.argmax(1) == np.arange(n)).mean())
    b2a = float((S.argmax(0) == np.arange(n)).mean())
    return {"a_to_b": a2b, "b_to_a": b2a, "mean": (a2b + b2a) / 2}


__all__ = ["TRAIN_VOICES", "PROBE_VOICES", "stack_frames", "load_clips", "compute_mask_indices",
           "distill_loss", "LightStudent", "student_config", "child_config", "search_space", "sample_subnet",
           "extract_subnet", "n_params", "make_batch", "length_buckets", "train_student", "heldout_loss", "prepare_data",
           "probe_model", "subnet_child", "run_seed",
           "pool_thirds", "qbe_accuracy"]
