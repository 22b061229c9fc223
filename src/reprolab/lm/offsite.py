"""Offsite-Tuning: fine-tune a foundation model's adapter through a compressed emulator, then plug it back in.

Offsite-Tuning: Transfer Learning without Full Model (Xiao, Lin and Han, 2023), https://arxiv.org/abs/2302.04870.
Follows the official code (mit-han-lab/offsite-tuning, ``offsite_tuning/utils.py`` and ``run_clm.py``):

* adapter A = the bottom ``l_pad`` and top ``r_pad`` decoder blocks (e.g. 2 + 2); the middle blocks M are the part
  the model owner keeps private;
* emulator E* = the middle blocks after uniform layer drop, ``uniform_choose_layers``: student layer i is middle
  layer ``round(i * (n_middle - 1) / (n_student - 1))``;
* distillation (``train_module=student``, adapter frozen): loss = ``lm_weight * LM + kd_weight * KD`` with
  ``KD = mean(((h_M - h_E) / rms(h_M))^2)`` where h_M / h_E are the outputs of the full and of the emulated middle
  on the same input (``get_kd_loss``; the official distillation uses ``lm_weight=1``, ``kd_weight=30`` on the Pile);
* offsite tuning (``train_module=adapter``): only the adapter blocks are trained, through the frozen emulator,
  with the LM loss, AdamW and gradient clipping at 1.0; the embeddings, final norm and LM head stay frozen;
* plug-in: the tuned adapter blocks replace the bottom / top blocks of the full model (``load_adapter``).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn


# --------------------------------------------------------------------------------------------- layers and emulator
def decoder_block_list(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-like (``model.model.layers``) or OPT (``model.model.decoder.layers``) causal LM."""
    inner = model.model
    if hasattr(inner, "layers"):
        return inner.layers
    if hasattr(inner, "decoder") and hasattr(inner.decoder, "layers"):
        return inner.decoder.layers
    raise ValueError(f"unsupported model {type(model).__name__}: no decoder block list found")


def _set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    inner = model.model
    if hasattr(inner, "layers"):
        inner.layers = blocks
    else:
        inner.decoder.layers = blocks
    model.config.num_hidden_layers = len(blocks)  # Llama iterates over layers[:num_hidden_layers]
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[0]] * len(blocks)
    for i, block in enumerate(blocks):  # renumber, so a KV cache indexes the blocks it actually has
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i


def uniform_choose_layers(n_layers: int, n_student: int) -> list[int]:
    """Indices (into the ``n_layers`` middle blocks) that uniform layer drop keeps: round(i * stride)."""
    if not 1 <= n_student <= n_layers:
        raise ValueError(f"n_student={n_student} must be in [1, {n_layers}]")
    if n_student == 1:
        return [0]
    stride = (n_layers - 1) / (n_student - 1)
    return [round(i * stride) for i in range(n_student)]


def split_blocks(n_total: int, l_pad: int, r_pad: int) -> tuple[list[int], list[int], list[int]]:
    """(bottom adapter, middle, top adapter) block indices of a model with ``n_total`` blocks."""
    if l_pad < 0 or r_pad < 0 or l_pad + r_pad >= n_total:
        raise ValueError(f"l_pad={l_pad}, r_pad={r_pad} leave no middle blocks out of {n_total}")
    return list(range(l_pad)), list(range(l_pad, n_total - r_pad)), list(range(n_total - r_pad, n_total))


def build_emulator(model: nn.Module, l_pad: int, r_pad: int, n_student: int) -> nn.Module:
    """A deep copy of ``model`` whose blocks are bottom adapter + uniformly kept middle blocks + top adapter.

    ``emulator.offsite`` records the split: ``l_pad``, ``r_pad`` and ``kept`` (indices into the full model's blocks).
    """
    blocks = decoder_block_list(model)
    bottom, middle, top = split_blocks(len(blocks), l_pad, r_pad)
    kept = [middle[i] for i in uniform_choose_layers(len(middle), n_student)]
    emulator = copy.deepcopy(model)  # copies config too, so the owner's model is untouched
    full = decoder_block_list(emulator)
    _set_blocks(emulator, nn.ModuleList([full[i] for i in bottom + kept + top]))
    emulator.config.use_cache = False
    emulator.offsite = {"l_pad": l_pad, "r_pad": r_pad, "kept": kept, "n_full": len(blocks)}
    return emulator


def adapter_blocks(model: nn.Module, l_pad: int, r_pad: int) -> nn.ModuleList:
    """The adapter: bottom ``l_pad`` + top ``r_pad`` blocks (shared modules, not copies)."""
    blocks = decoder_block_list(model)
    return nn.ModuleList(list(blocks[:l_pad]) + list(blocks[len(blocks) - r_pad:]))


def emulator_blocks(emulator: nn.Module) -> nn.ModuleList:
    """The emulated middle blocks of an emulator built by :func:`build_emulator`."""
    blocks = decoder_block_list(emulator)
    l_pad, r_pad = emulator.offsite["l_pad"], emulator.offsite["r_pad"]
    return nn.ModuleList(list(blocks[l_pad:len(blocks) - r_pad]))


def set_trainable(model: nn.Module, module: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except those of ``module``; return the trainable ones."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def plug_in(model: nn.Module, emulator: nn.Module) -> nn.Module:
    """A deep copy of the full ``model`` with its bottom / top blocks replaced by the emulator's (tuned) adapter."""
    l_pad, r_pad = emulator.offsite["l_pad"], emulator.offsite["r_pad"]
    plugged = copy.deepcopy(model)
    adapter_blocks(plugged, l_pad, r_pad).load_state_dict(adapter_blocks(emulator, l_pad, r_pad).state_dict())
    return plugged


# --------------------------------------------------------------------------------------------- data and training
def lm_batches(ids: torch.Tensor, seq_len: int, batch_size: int, n_steps: int, seed: int) -> list[torch.Tensor]:
    """``n_steps`` batches (B, L) of random windows of the token stream ``ids`` (1, T), drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.shape[1] - seq_len + 1, (n_steps, batch_size), generator=g)  # (S, B)
    return [torch.stack([ids[0, s:s + seq_len] for s in row.tolist()]) for row in starts]


def kd_loss(h_teacher: torch.Tensor, h_student: torch.Tensor) -> torch.Tensor:
    """Official ``get_kd_loss``: MSE between hidden states (B, L, d), normalized by the teacher's RMS."""
    std = h_teacher.pow(2).mean().sqrt()
    return (h_teacher - h_student).div(std).pow(2).mean()


class _Capture:
    """Forward hook that keeps the (first) output of a module."""

    def __init__(self, module: nn.Module):
        self.out = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.out = output[0] if isinstance(output, tuple) else output

    def remove(self):
        self.handle.remove()


def train_lm(model: nn.Module, batches: list[torch.Tensor], params: list[nn.Parameter], lr: float,
             max_grad_norm: float = 1.0, teacher: nn.Module | None = None, kd_weight: float = 0.0,
             lm_weight: float = 1.0, progress=None, lr_lambda=None, on_step=None) -> dict:
    """AdamW on ``params`` with the LM loss (and, with ``teacher``, the emulator distillation loss).

    Distillation: ``model`` is an emulator; the teacher target is the output of the full model's last middle block
    (its input equals the emulator's middle input because the bottom adapter is frozen and shared by value).
    ``lr_lambda(step)``: a multiplier of ``lr`` per optimizer step (``LambdaLR``; None = constant, as before);
    ``on_step(step)`` is called after each update (e.g. a held-out evaluation), with the model left in train mode.
    Returns ``{"lm_loss": [...], "kd_loss": [...], "step_s": [...], "optimizer": opt}`` (step_s: wall-clock seconds).
    """
    for p in model.parameters():
        p.grad = None  # drop gradients left by an earlier phase (e.g. distillation before adapter tuning)
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None
    hooks = []
    if teacher is not None:
        info = model.offsite
        student_out = _Capture(decoder_block_list(model)[info["l_pad"] + len(info["kept"]) - 1])
        teacher_out = _Capture(decoder_block_list(teacher)[info["n_full"] - info["r_pad"] - 1])
        hooks = [student_out, teacher_out]
        teacher.eval()
    log = {"lm_loss": [], "kd_loss": [], "step_s": []}
    for x in (progress(batches) if progress else batches):  # x: (B, L)
        start = time.perf_counter()
        out = model(input_ids=x, labels=x, use_cache=False)
        loss = lm_weight * out.loss
        if teacher is not None:
            with torch.no_grad():
                teacher.model(input_ids=x, use_cache=False)  # fills teacher_out; no LM head needed
            kd = kd_loss(teacher_out.out.float(), student_out.out.float())
            loss = loss + kd_weight * kd
            log["kd_loss"].append(kd.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers allocated, so they can be counted
        if sched is not None:
            sched.step()
        log["step_s"].append(time.perf_counter() - start)
        log["lm_loss"].append(out.loss.item())
        if on_step is not None:
            on_step(len(log["lm_loss"]))
            model.train()
    for h in hooks:
        h.remove()
    model.eval()
    log["optimizer"] = opt
    return log


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of what training holds besides activations: the weights the trainer runs, gradients, AdamW moments.

    Gradients are counted for the parameters that require them (the current phase's trainable ones).

    Counted from the tensors themselves (tied weights once), so the numbers are deterministic.
    """
    seen, weights, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
        if p.requires_grad and p.grad is not None:  # a frozen block may keep a stale .grad from an earlier phase
            grads += p.grad.numel() * p.grad.element_size()
    opt_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                    for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"weights": weights, "grads": grads, "optimizer": opt_bytes, "total": weights + grads + opt_bytes,
            "trainable_params": trainable}


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one LM-loss forward on ``x`` (B, L).

    This is the activation memory a training step must hold at its peak (besides the training state above); it is
    counted from the saved tensors' storages (each storage once; parameters and buffers excluded), so it is
    deterministic. Frozen blocks that the gradient still has to cross (the emulator, in offsite tuning) keep what
    their backward needs; blocks below every trainable parameter keep nothing.
    """
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in own and s.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    del loss
    model.train(was_training)
    return sum(storages.values())
