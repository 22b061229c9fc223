"""Deep Incubation: Training Large Models by Divide-and-Conquering (Ni, Wang, Yu, Jiang, Cao & Huang, ICCV 2023,
https://arxiv.org/abs/2212.04129), following the official code github.com/LeapLabTHU/Deep-Incubation
(``main.py``, ``timm/models/vision_transformer.py``, ``TRAINING.md``; file:line in the registry's deviations).

A ViT of depth sum(depths) is cut into K **stages** (``VisionTransformer._register_modules``): stage 0 owns the patch
embedding, the class token and the position embedding plus its blocks; the last stage also owns the final LayerNorm
and the classifier head; the others own their blocks only. The recipe has three phases:

1. **meta model** (``--phase PT --divided_depths 1 1 1 1``): the same-width ViT with ONE block per stage, trained
   end to end;
2. **module incubation** (``--phase MT --idx i --divided_depths 1 .. L_i .. 1``): a *hybrid* network whose stage i
   is the (freshly initialised) target module and every other stage the trained meta stage
   (``module_incubation``, main.py:419-425); only stage i is optimised (``model2optimize = stages[idx]``,
   main.py:298-307), the meta stages stay fixed. The K incubations are independent (can run in parallel);
3. **assembly + fine-tuning** (``--phase FT``): the target network takes stage i from the i-th hybrid
   (``model_assemb``, main.py:411-416), then the whole network is fine-tuned (no warm-up, gradient clipping 1.0).

The end-to-end (E2E) baseline trains the same target network from scratch with the same loop.

Compute is counted in multiply-accumulates (MACs) of the kit's ``TinyTransformer.macs`` convention (projections,
attention products, patch embedding, head; no LayerNorm / softmax / GELU): one training sample through a network costs
its forward MACs plus 2 x the forward MACs of every part the backward pass goes through, i.e. every part at or after
the first trainable one (input and weight gradients: the official hybrid keeps ``requires_grad`` on the meta stages
AFTER the target, main.py:303-307, so their weight gradients are computed too; the stages before it get none).
Phase cost = steps x batch size x per-sample cost; the meta model's training is counted.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..nas.harness import evaluate, image_data, train_model
from .tiny import TFConfig, TinyTransformer

STEM = ("patch", "cls", "pos")  # stage 0 owns the embedding (vision_transformer.py _register_modules)
TOP = ("ln_f", "head")  # the last stage owns the final norm and the classifier


# ---------------------------------------------------------------------------------------------------------- data
def load_data(dataset: str = "digits", size: int | None = None, split_seed: int = 0) -> dict:
    """Real shipped images as the shared harness splits them (60/20/20 stratified, standardised)."""
    return image_data(dataset, split_seed=split_seed, size=size)


# ---------------------------------------------------------------------------------------------------------- networks
def build_vit(cfg: dict, depths, image_size: int, seed: int) -> TinyTransformer:
    """A ViT (``reprolab.tf.tiny``, kind "vit") with sum(depths) blocks, initialised from ``seed``."""
    torch.manual_seed(int(seed))
    tc = TFConfig(kind="vit", d_model=cfg["d_model"], n_layers=int(sum(depths)), n_heads=cfg["n_heads"],
                  head_dim=cfg["head_dim"], mlp_hidden=cfg["mlp_hidden"], n_classes=cfg["n_classes"],
                  image_size=image_size, patch_size=cfg["patch_size"], in_channels=1)
    return TinyTransformer(tc)


def stage_blocks(depths) -> list[range]:
    """Block indices of every stage."""
    off = np.cumsum([0, *depths])
    return [range(int(off[i]), int(off[i + 1])) for i in range(len(depths))]


def _stage_of(name: str, depths) -> tuple[int, str]:
    """(stage, stage-local name) of a parameter name of a ViT with these stage depths."""
    K = len(depths)
    head = name.split(".")[0]
    if head in STEM:
        return 0, name
    if head in TOP:
        return K - 1, name
    if head == "blocks":
        b = int(name.split(".")[1])
        for i, r in enumerate(stage_blocks(depths)):
            if b in r:
                rest = name.split(".", 2)[2]
                return i, f"blocks.{b - r.start}.{rest}"
    raise KeyError(f"parameter {name!r} belongs to no stage of depths {list(depths)}")


def stage_names(model: TinyTransformer, depths) -> list[list[str]]:
    """Parameter names (of ``model``) of every stage."""
    out = [[] for _ in depths]
    for name, _ in model.named_parameters():
        out[_stage_of(name, depths)[0]].append(name)
    return out


def stage_state(model: TinyTransformer, depths, i: int) -> dict:
    """Stage i's weights keyed by stage-local names (the official checkpoint's ``model_stages[i]``), cloned."""
    return {_stage_of(n, depths)[1]: p.detach().clone() for n, p in model.named_parameters()
            if _stage_of(n, depths)[0] == i}


def load_stage(model: TinyTransformer, depths, i: int, state: dict) -> None:
    """Copy a stage's weights (stage-local names) into stage i of ``model`` (``module.load_state_dict``): every
    parameter of the stage must be given, with the same shape."""
    mine = {_stage_of(n, depths)[1]: p for n, p in model.named_parameters() if _stage_of(n, depths)[0] == i}
    if set(mine) != set(state):
        raise KeyError(f"stage {i}: expected {sorted(mine)}, got {sorted(state)}")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(state[k])


def meta_depths(K: int) -> list[int]:
    return [1] * K


def hybrid_depths(depths, i: int) -> list[int]:
    """Stage depths of the hybrid network of module i: the target module's depth at i, one meta block elsewhere."""
    return [d if j == i else 1 for j, d in enumerate(depths)]


# ---------------------------------------------------------------------------------------------------------- compute
def part_macs(model: TinyTransformer) -> list[int]:
    """Forward MACs of one image through each part, in order: [embedding, block 1, ..., block n, head]
    (the ``TinyTransformer.macs`` convention; their sum equals ``model.macs()``)."""
    c = model.cfg
    T, e, hq, m = c.n_patches + 1, c.d_model, c.n_heads * c.head_dim, c.mlp_hidden
    block = T * (4 * e * hq + 2 * e * m) + 2 * T * T * hq
    return [c.n_patches * c.in_channels * c.patch_size ** 2 * e, *[block] * c.n_layers, e * c.n_classes]


def train_cost_per_sample(model: TinyTransformer, depths, trainable: int | None = None) -> int:
    """MACs of one training sample: forward of every part + 2 x forward (backward: input and weight gradients) of
    every part at or after the first part of stage ``trainable`` (None: the whole network is trained)."""
    parts = part_macs(model)
    first = 0 if not trainable else 1 + int(sum(depths[:trainable]))  # index in parts of stage's first part
    return int(sum(parts) + 2 * sum(parts[first:]))


# ---------------------------------------------------------------------------------------------------------- training
def no_decay_params(model: TinyTransformer) -> list:
    """timm ``add_weight_decay``: 1-D parameters (biases, norms) and ``no_weight_decay`` (pos / cls) get none."""
    return [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in ("pos", "cls")]


def make_loss(label_smoothing: float):
    def loss_fn(model, x, y, step):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    return loss_fn


def _train(model, data, cfg, steps: int, seed: int, warmup_frac: float, grad_clip, params=None) -> list[float]:
    params = list(model.parameters()) if params is None else list(params)
    nd = {id(p) for p in no_decay_params(model)}
    return train_model(model, data, int(steps), make_loss(cfg["label_smoothing"]), lr=cfg["lr"],
                       optimizer="adamw", betas=(0.9, 0.999), weight_decay=cfg["weight_decay"],
                       batch_size=cfg["batch_size"], seed=seed, schedule="cosine",
                       warmup_steps=int(round(warmup_frac * steps)), params=params,
                       no_decay=[p for p in params if id(p) in nd], grad_clip=grad_clip)


def incubation_cfg(cfg: dict) -> dict:
    """The config of the incubation's phases: ``lr_incubation`` (when given) replaces ``lr`` (the E2E arm's); every
    other setting is shared. Each arm's lr was chosen on val from the same grid (registry deviations)."""
    lr = cfg.get("lr_incubation")
    return dict(cfg, lr=cfg["lr"] if lr is None else lr)


def _seed(seed: int, phase: int) -> int:
    return 1000 * int(seed) + phase  # distinct, reproducible init / batch-order seeds per phase


def train_meta(data, cfg, seed: int) -> tuple[TinyTransformer, list[float]]:
    """Phase 1: the meta model (one block per stage) trained end to end."""
    K, cfg = len(cfg["depths"]), incubation_cfg(cfg)
    size = int(data["train"][0].shape[-1])
    meta = build_vit(cfg, meta_depths(K), size, _seed(seed, 1))
    curve = _train(meta, data, cfg, cfg["meta_steps"], _seed(seed, 1), cfg["warmup_frac_meta"], None)
    return meta, curve


def incubate_module(meta: TinyTransformer, i: int, data, cfg, seed: int, steps: int | None = None):
    """Phase 2 for module i: the hybrid (target module i + the meta stages), only stage i optimised; returns
    (hybrid, curve). The meta stages are frozen (``requires_grad`` off: the optimizer never sees them)."""
    depths, cfg = list(cfg["depths"]), incubation_cfg(cfg)
    K, hd = len(depths), hybrid_depths(depths, i)
    size = int(data["train"][0].shape[-1])
    hyb = build_vit(cfg, hd, size, _seed(seed, 10 + i))  # fresh target module (and throw-away meta copies)
    for j in range(K):
        if j != i:
            load_stage(hyb, hd, j, stage_state(meta, meta_depths(K), j))
    names = set(stage_names(hyb, hd)[i])
    for n, p in hyb.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in hyb.named_parameters() if n in names]
    curve = _train(hyb, data, cfg, cfg["module_steps"] if steps is None else steps, _seed(seed, 10 + i),
                   cfg["warmup_frac_module"], None, params=params)
    for p in hyb.parameters():
        p.requires_grad_(True)
    return hyb, curve


def assemble(hybrids: list[TinyTransformer], cfg, image_size: int, seed: int) -> TinyTransformer:
    """Phase 3a: the target network with stage i copied from hybrid i (``model_assemb``)."""
    depths = list(cfg["depths"])
    target = build_vit(cfg, depths, image_size, _seed(seed, 30))
    for i, h in enumerate(hybrids):
        load_stage(target, depths, i, stage_state(h, hybrid_depths(depths, i), i))
    return target


def run_incubation(data, cfg, seed: int) -> dict:
    """The whole recipe for one seed: accuracies of the meta model, every hybrid, the assembled network before and
    after fine-tuning, the training curves and the compute of every phase (MACs)."""
    depths = list(cfg["depths"])
    K = len(depths)
    size = int(data["train"][0].shape[-1])
    meta, c_meta = train_meta(data, cfg, seed)
    out = {"curves": {"meta": c_meta}, "acc": {}}
    out["acc"]["meta"] = {s: evaluate(meta, data, s) for s in ("val", "test")}
    hybrids = []
    for i in range(K):
        h, c = incubate_module(meta, i, data, cfg, seed)
        hybrids.append(h)
        out["curves"][f"module{i}"] = c
        out["acc"][f"hybrid{i}"] = {s: evaluate(h, data, s) for s in ("val", "test")}
    target = assemble(hybrids, cfg, size, seed)
    out["acc"]["assembled"] = {s: evaluate(target, data, s) for s in ("val", "test")}
    out["curves"]["finetune"] = _train(target, data, incubation_cfg(cfg), cfg["ft_steps"], _seed(seed, 40), cfg["warmup_frac_ft"],
                                       cfg["ft_grad_clip"])
    out["acc"]["incubation"] = {s: evaluate(target, data, s) for s in ("val", "test")}
    out["compute"] = compute_plan(cfg, size)
    out["model"] = target
    return out


def compute_plan(cfg, image_size: int) -> dict:
    """Training MACs of every incubation phase (steps x batch x per-sample cost) and their total (int)."""
    depths, B = list(cfg["depths"]), cfg["batch_size"]
    K = len(depths)
    meta = build_vit(cfg, meta_depths(K), image_size, 0)
    plan = {"meta": cfg["meta_steps"] * B * train_cost_per_sample(meta, meta_depths(K))}
    for i in range(K):
        h = build_vit(cfg, hybrid_depths(depths, i), image_size, 0)
        plan[f"module{i}"] = cfg["module_steps"] * B * train_cost_per_sample(h, hybrid_depths(depths, i), i)
    target = build_vit(cfg, depths, image_size, 0)
    plan["finetune"] = cfg["ft_steps"] * B * train_cost_per_sample(target, depths)
    plan["total"] = int(sum(plan.values()))
    return plan


def e2e_steps(compute: float, cfg, image_size: int) -> int:
    """Optimizer steps of E2E training of the target network that cost ``compute`` MACs (rounded)."""
    t = build_vit(cfg, cfg["depths"], image_size, 0)
    return max(1, int(round(compute / (cfg["batch_size"] * train_cost_per_sample(t, cfg["depths"])))))


def run_e2e(data, cfg, seed: int, steps: int) -> dict:
    """The E2E baseline: the target network trained from scratch for ``steps`` steps (same loop and batch; ``lr``)."""
    size = int(data["train"][0].shape[-1])
    model = build_vit(cfg, cfg["depths"], size, _seed(seed, 50))
    curve = _train(model, data, cfg, steps, _seed(seed, 50), cfg["warmup_frac_e2e"], None)
    cost = steps * cfg["batch_size"] * train_cost_per_sample(model, cfg["depths"])
    return {"acc": {s: evaluate(model, data, s) for s in ("val", "test")}, "curve": curve, "compute": int(cost),
            "steps": int(steps)}


def matching_compute(budgets, accs, target_acc: float) -> float:
    """The smallest compute (same unit as ``budgets``, increasing) at which the piecewise-linear (in log compute)
    curve of ``accs`` reaches ``target_acc``; inf when it never does, budgets[0] when the first point already does."""
    b, a = np.asarray(budgets, float), np.asarray(accs, float)
    if a[0] >= target_acc:
        return float(b[0])
    for k in range(1, len(b)):
        if a[k] >= target_acc:
            t = (target_acc - a[k - 1]) / (a[k] - a[k - 1])
            return float(math.exp(math.log(b[k - 1]) + t * (math.log(b[k]) - math.log(b[k - 1]))))
    return float("inf")


__all__ = ["load_data", "build_vit", "stage_blocks", "stage_names", "stage_state", "load_stage", "meta_depths",
           "hybrid_depths", "part_macs", "train_cost_per_sample", "no_decay_params", "incubation_cfg", "train_meta", "incubate_module",
           "assemble", "run_incubation", "compute_plan", "e2e_steps", "run_e2e", "matching_compute"]
