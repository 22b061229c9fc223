"""Exploring Learngene via Stage-wise Weight Sharing for Initializing Variable-sized Models (SWS; Xia, Zhu, Yang &
Geng, IJCAI 2024, https://arxiv.org/abs/2404.16897). Official code: github eddiexia98/SWS -- README (Aux-S / Des-S
commands), aux_models.py (``aux_deit_small_patch16_224_L16_33433`` with ``get_repeated_schedule_12``; MiniViT-style
weight multiplexing on DeiT), utils.py ``gene_tranfer_1`` (the descendant initialisation, called from main.py's
``--load-gene`` branch) and losses.py (file:line in the registry's deviations).

Two phases:

1. **learngene learning**: an auxiliary network (Aux-Net) of S stages; every stage is ONE transformer layer (its
   norms, attention and MLP: the official schedule shares ``norm1, norm2, attn_qkv, attn_proj, mlp_fc1, mlp_fc2``)
   applied ``stages[s]`` times in a row (official L16 = 3, 3, 4, 3, 3), trained by **soft distillation only**
   (``--distillation-type soft --distillation-alpha 1.0``, DeiT's tau 1) from a pretrained teacher. Here the kit's
   ``TFConfig.loops`` is the within-stage sharing (one ``Block`` per stage, applied ``stages[s]`` times).
2. **descendant initialisation**: a Des-Net of depth D takes layer i from the learngene layer of stage
   ``layers_source(D, S)[i]`` (the official 12-layer Des from the 16-layer Aux: ``0,0,0,1,1,1,2,2,3,3,4,4``, i.e. the
   D layers are split over the S stages in order, the first D mod S stages one layer longer), plus the Aux-Net's
   patch embedding, position embedding, final norm and head (official ``gene_tranfer_1``: ``pos_embed``,
   ``patch_embed``, ``norm`` -> ``fc_norm``, and the head when the Des-Net's task is the Aux-Net's, ``--data-set
   IMNET``); each copy is an independent tensor (the Des-Net is then fine-tuned "normally", without sharing).

Baselines (same fine-tuning loop, budget, seeds and lr grid): **scratch** (the kit's default initialisation) and the
**single shared layer** ablation (an Aux-Net with ONE stage of the same total depth: every Des layer copies the same
learngene layer). Scratch is also trained with the SAME total training MACs as the whole SWS route (learngene cost
amortised over the descendants + their fine-tuning: :func:`cost_matched_budget`), the paper's cost comparison.

Compute: multiply-accumulates (``TinyTransformer.macs``; recursive layers counted per application); one training
sample costs 3 x the forward MACs (forward + input and weight gradients); the teacher (frozen MobileNetV2 features on
every training image, computed once) is counted by torch's FLOP counter (MACs = FLOPs / 2).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..nas.harness import evaluate, image_data, train_model
# the same timm no-weight-decay rule and compute-matching interpolation as Deep Incubation: one copy serves both
from .deep_incubation import matching_compute as epochs_to_match
from .deep_incubation import no_decay_params
from .distill import logit_kd
from .tiny import TFConfig, TinyTransformer

SHARED = ("patch", "cls", "pos", "ln_f", "head")  # copied from the Aux-Net into every descendant


# ---------------------------------------------------------------------------------------------------------- data
def load_data(dataset: str = "digits", size: int | None = None, split_seed: int = 0) -> dict:
    """Real shipped images as the shared harness splits them (60/20/20 stratified, standardised)."""
    return image_data(dataset, split_seed=split_seed, size=size)


def steps_per_epoch(data: dict, batch_size: int) -> int:
    return int(math.ceil(len(data["train"][1]) / batch_size))


# ---------------------------------------------------------------------------------------------------------- teacher
def teacher_inputs(X: torch.Tensor, lo: float, hi: float, size: int) -> torch.Tensor:
    """Standardised grey images -> [0, 1] RGB at size x size (bilinear), MobileNetV2's input."""
    x = ((X - lo) / (hi - lo)).clamp(0, 1).repeat(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def teacher_features(encoder, data: dict, size: int, batch: int = 256) -> dict:
    """Frozen backbone embeddings of every split (train range fixes the [0, 1] rescaling)."""
    lo, hi = float(data["train"][0].min()), float(data["train"][0].max())
    out = {}
    for k, (X, _) in data.items():
        x = teacher_inputs(X, lo, hi, size)
        out[k] = torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy().astype(np.float64)
    return out


def fit_probe(feats: dict, data: dict, C: float, max_iter: int = 300) -> dict:
    """Linear probe = multinomial logistic regression on the standardised train features, sklearn's objective
    (C x summed cross-entropy + 0.5 ||W||^2, bias unpenalised) minimised by full-batch L-BFGS (strong Wolfe; float64;
    deterministic). Returns the teacher's logits of every split, its accuracies and the final objective."""
    Xtr = torch.as_tensor(feats["train"], dtype=torch.float64)
    mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
    Z = {k: (torch.as_tensor(f, dtype=torch.float64) - mu) / sd for k, f in feats.items()}
    y = data["train"][1]
    K = int(y.max()) + 1
    W = torch.zeros(Z["train"].shape[1], K, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        return C * F.cross_entropy(Z["train"] @ W + b, y, reduction="sum") + 0.5 * (W * W).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = {k: (z @ W + b).float() for k, z in Z.items()}
        obj = float(objective())
    acc = {k: float((logits[k].argmax(1) == data[k][1]).float().mean()) for k in feats}
    return {"logits": logits, "acc": acc, "objective": obj, "W": W.detach(), "b": b.detach(), "mu": mu, "sd": sd}


def teacher_macs(encoder, size: int) -> int:
    """Forward MACs of one image through the frozen backbone (torch FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        encoder(torch.zeros(1, 3, size, size))
    return int(fc.get_total_flops() // 2)


# ---------------------------------------------------------------------------------------------------------- networks
def tfconfig(cfg: dict, n_layers: int, image_size: int, loops=()) -> TFConfig:
    return TFConfig(kind="vit", d_model=cfg["d_model"], n_layers=int(n_layers), n_heads=cfg["n_heads"],
                    head_dim=cfg["head_dim"], mlp_hidden=cfg["mlp_hidden"], n_classes=cfg["n_classes"],
                    image_size=image_size, patch_size=cfg["patch_size"], in_channels=1, loops=tuple(loops),
                    pool=cfg.get("pool", "mean"))


def build_vit(cfg: dict, depth: int, image_size: int, seed: int) -> TinyTransformer:
    """A plain ViT of ``depth`` independent layers (the scratch arm and every descendant's shape)."""
    torch.manual_seed(int(seed))
    return TinyTransformer(tfconfig(cfg, depth, image_size))


def build_aux(cfg: dict, stages, image_size: int, seed: int) -> TinyTransformer:
    """The Aux-Net: one shared layer per stage, applied ``stages[s]`` times (stage-wise weight sharing)."""
    stages = [int(s) for s in stages]
    if not stages or min(stages) < 1:
        raise ValueError(f"stages={stages}: one positive layer count per stage")
    torch.manual_seed(int(seed))
    return TinyTransformer(tfconfig(cfg, len(stages), image_size, loops=stages))


def stage_lengths(depth: int, n_stages: int) -> list[int]:
    """Layers of each stage in a depth-``depth`` descendant (official ``--layers-source`` for 12 layers from 5
    stages: 3, 3, 2, 2, 2): the depth split in order, the first ``depth mod n_stages`` stages one layer longer."""
    if depth < n_stages:
        raise ValueError(f"depth={depth} < {n_stages} stages: every stage needs at least one layer")
    q, r = divmod(int(depth), int(n_stages))
    return [q + (1 if s < r else 0) for s in range(n_stages)]


def layers_source(depth: int, n_stages: int) -> list[int]:
    """The learngene (stage) each descendant layer is initialised from, e.g. (12, 5) -> 0,0,0,1,1,1,2,2,3,3,4,4."""
    return [s for s, n in enumerate(stage_lengths(depth, n_stages)) for _ in range(n)]


@torch.no_grad()
def expand(aux: TinyTransformer, depth: int, seed: int = 0) -> TinyTransformer:
    """A depth-``depth`` descendant initialised from the Aux-Net's learngenes: layer i = a copy of the learngene
    layer of stage ``layers_source(depth, S)[i]``; embedding, final norm and head copied; independent tensors."""
    c = aux.cfg
    torch.manual_seed(int(seed))
    des = TinyTransformer(TFConfig(**{**c.__dict__, "n_layers": int(depth), "loops": ()}))
    src = layers_source(depth, c.n_layers)
    for i, s in enumerate(src):
        des.blocks[i].load_state_dict(aux.blocks[s].state_dict())  # load_state_dict copies (no aliasing)
    for name in SHARED:
        mod_d, mod_a = getattr(des, name), getattr(aux, name)
        if isinstance(mod_d, torch.nn.Parameter):
            mod_d.copy_(mod_a)
        else:
            mod_d.load_state_dict(mod_a.state_dict())
    return des


def unique_params(model: TinyTransformer) -> int:
    """Stored parameters (each shared tensor once)."""
    return int(sum(p.numel() for p in model.parameters()))


def train_macs_per_sample(model: TinyTransformer) -> int:
    """Forward + backward (input and weight gradients = 2 x forward) MACs of one training image."""
    return 3 * int(model.macs())


# ---------------------------------------------------------------------------------------------------------- training
def _adamw(model, data, steps, loss_fn, lr, cfg, seed, warmup_steps):
    return train_model(model, data, int(steps), loss_fn, lr=float(lr), optimizer="adamw", betas=(0.9, 0.999),
                       weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=int(seed),
                       schedule="cosine", warmup_steps=int(warmup_steps), no_decay=no_decay_params(model))


def kd_loss_fn(teacher_train_logits: torch.Tensor, T: float):
    """Soft distillation only (DeiT ``DistillationLoss`` with alpha 1.0): the batch's ``y`` are row indices into
    the teacher's train logits (see :func:`train_aux`)."""
    def loss_fn(model, x, idx, step):
        return logit_kd(model(x), teacher_train_logits[idx], T)
    return loss_fn


def train_aux(aux: TinyTransformer, data: dict, teacher_train_logits: torch.Tensor, cfg: dict, seed: int) -> list:
    """Phase 1: the Aux-Net trained by soft KD from the teacher's logits on the training images (the labels are
    replaced by row indices so that every batch fetches its teacher logits)."""
    X = data["train"][0]
    kd_data = {"train": (X, torch.arange(len(X)))}
    steps = cfg["aux_epochs"] * steps_per_epoch(data, cfg["batch_size"])
    return _adamw(aux, kd_data, steps, kd_loss_fn(teacher_train_logits, cfg["kd_tau"]), cfg["aux_lr"], cfg, seed,
                  round(cfg["aux_warmup_frac"] * steps))


def ce_loss_fn(label_smoothing: float):
    def loss_fn(model, x, y, step):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    return loss_fn


def finetune(model: TinyTransformer, data: dict, cfg: dict, epochs: float, lr: float, seed: int) -> dict:
    """Phase 2 (and the scratch arm): ``epochs`` of plain supervised training (CE + label smoothing, AdamW, cosine,
    no warm-up: the official Des recipe); returns the accuracies and the loss curve."""
    steps = max(1, int(round(epochs * steps_per_epoch(data, cfg["batch_size"]))))
    curve = _adamw(model, data, steps, ce_loss_fn(cfg["label_smoothing"]), lr, cfg, seed, 0)
    return {"val": evaluate(model, data, "val"), "test": evaluate(model, data, "test"), "curve": curve,
            "steps": steps, "lr": float(lr)}


def tuned(make_model, data: dict, cfg: dict, epochs: float, seed: int) -> dict:
    """Fine-tune a fresh copy (``make_model()``) with every lr of ``cfg["lr_grid"]``; keep the one with the best
    validation accuracy (the earliest on ties). Every arm gets this same tuning budget."""
    best, grid = None, {}
    for lr in cfg["lr_grid"]:
        r = finetune(make_model(), data, cfg, epochs, lr, seed)
        grid[f"{lr:g}"] = {"val": r["val"], "test": r["test"]}
        if best is None or r["val"] > best["val"]:
            best = r
    return {**best, "grid": grid}


def _seed(seed: int, phase: int) -> int:
    return 1000 * int(seed) + int(phase)


def scratch_budgets(cfg: dict, matched_epochs: float | None = None) -> list:
    """Scratch budgets (epochs): the claims' ``ft_epochs``, the context ``scratch_epochs`` and the cost-matched one."""
    extra = set() if matched_epochs is None else {float(matched_epochs)}
    return sorted({cfg["ft_epochs"], *cfg["scratch_epochs"], *extra})


def run_seed(data: dict, teacher_logits: torch.Tensor, cfg: dict, seed: int,
             matched_epochs: float | None = None) -> dict:
    """Every arm for one seed: the stage-wise and the single-stage Aux-Nets (KD), and per descendant depth the SWS,
    single-layer and scratch arms after ``ft_epochs`` (lr tuned on val), the descendants before fine-tuning, and
    scratch at the longer ``scratch_epochs`` budgets and at ``matched_epochs`` (the SWS route's total cost, see
    :func:`cost_matched_budget`)."""
    size = int(data["train"][0].shape[-1])
    stages = [int(s) for s in cfg["stages"]]
    out = {"aux": {}, "arms": {}, "curves": {}}
    auxes = {"sws": build_aux(cfg, stages, size, _seed(seed, 1)),
             "single": build_aux(cfg, [sum(stages)], size, _seed(seed, 1))}
    for name, aux in auxes.items():
        out["curves"][f"aux_{name}"] = train_aux(aux, data, teacher_logits, cfg, _seed(seed, 2))
        out["aux"][name] = {s: evaluate(aux, data, s) for s in ("val", "test")}
    for depth in cfg["depths"]:
        d = int(depth)
        for name, aux in auxes.items():
            init = expand(aux, d, _seed(seed, 3))
            out["arms"][(name, d, 0)] = {s: evaluate(init, data, s) for s in ("val", "test")}
            out["arms"][(name, d, cfg["ft_epochs"])] = tuned(lambda: expand(aux, d, _seed(seed, 3)), data, cfg,
                                                              cfg["ft_epochs"], _seed(seed, 4 + d))
        for ep in scratch_budgets(cfg, matched_epochs):
            out["arms"][("scratch", d, ep)] = tuned(lambda: build_vit(cfg, d, size, _seed(seed, 100 + d)), data, cfg,
                                                    ep, _seed(seed, 4 + d))
    return out


def compute_plan(cfg: dict, data: dict, teacher_macs_per_image: int, matched_epochs: float | None = None) -> dict:
    """Training MACs: the teacher's feature pass over the training images, each Aux-Net's KD training, one
    fine-tuning run per depth and budget (a single lr; the grid multiplies every arm alike)."""
    size, B = int(data["train"][0].shape[-1]), cfg["batch_size"]
    spe, n_train = steps_per_epoch(data, B), len(data["train"][1])
    stages = [int(s) for s in cfg["stages"]]
    aux = build_aux(cfg, stages, size, 0)
    plan = {"teacher_features": int(teacher_macs_per_image) * n_train,
            "aux": cfg["aux_epochs"] * spe * B * train_macs_per_sample(aux)}
    for d in cfg["depths"]:
        m = build_vit(cfg, int(d), size, 0)
        for ep in scratch_budgets(cfg, matched_epochs):
            plan[f"train_d{d}_ep{ep:g}"] = max(1, int(round(ep * spe))) * B * train_macs_per_sample(m)
    return plan


def cost_matched_budget(cfg: dict, data: dict, teacher_macs_per_image: int) -> dict:
    """The scratch budget with the SAME total training MACs as the SWS route: the one-off learngene cost (the items of
    ``cfg["cost_match_items"]``: the teacher's feature pass and / or the stage-wise Aux-Net's KD training) amortised
    over the descendants, plus the SWS fine-tuning of every depth for ``ft_epochs``. Scratch trains EVERY depth for the
    same number of steps, so ``steps x sum_d B x train MACs(d)`` = the route's MACs (rounded to whole steps).
    Returns the route's MACs, the steps, the epochs (= steps / steps per epoch) and the unrounded epochs."""
    plan = compute_plan(cfg, data, teacher_macs_per_image)
    size, B = int(data["train"][0].shape[-1]), cfg["batch_size"]
    spe, ft = steps_per_epoch(data, B), cfg["ft_epochs"]
    route = sum(int(plan[k]) for k in cfg["cost_match_items"]) + sum(plan[f"train_d{d}_ep{ft:g}"] for d in cfg["depths"])
    per_step = sum(B * train_macs_per_sample(build_vit(cfg, int(d), size, 0)) for d in cfg["depths"])
    steps = max(1, int(round(route / per_step)))
    return {"route_macs": int(route), "steps": steps, "epochs": steps / spe, "epochs_exact": route / per_step / spe}


__all__ = ["load_data", "steps_per_epoch", "teacher_inputs", "teacher_features", "fit_probe", "teacher_macs",
           "tfconfig", "build_vit", "build_aux", "stage_lengths", "layers_source", "expand", "unique_params",
           "train_macs_per_sample", "no_decay_params", "kd_loss_fn", "train_aux", "finetune", "tuned", "scratch_budgets",
           "run_seed", "compute_plan", "cost_matched_budget", "epochs_to_match"]
