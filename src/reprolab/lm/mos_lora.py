"""MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards.

Wang, Chen, Chen, Dong, Xue, Jiang, Kong and Wu (ICLR 2025), https://arxiv.org/abs/2410.00938.
Follows the official code (github.com/Forence1999/MoS, ``modules/Tied_LoRA.py``, imported by ``finetune_trainer.py``
as ``share_lora_chunkwisely``):

* one global pool per module type (q, k, v, o, gate, up, down): ``A_pool`` holds ``valid_r * L * l`` shards of width
  ``d_in / l`` and ``B_pool`` as many of width ``d_out / l`` (``share_lora_tiedly``: ``pool_r = valid_param_lora_r *
  layer_num``, ``chunk_pool_r = pool_r * num_chunk_per_vec``), i.e. exactly the parameters of a rank-``valid_r`` LoRA on
  every layer;
* routing = a FIXED random index matrix per layer and per matrix (``reset_lora_parameters``): the last ``p * L`` shards
  of the pool are private, ``p`` per layer (shard privatisation); the layer draws its other ``r * l - p`` shards from
  the shared part without replacement (``torch.randperm(private_start)[:...]``: subset selection), with a separate
  draw for A and for B (pair dissociation); consecutive groups of ``l`` indices are concatenated into one rank vector
  (``transform_chunks``: vector sharding);
* delta W x = B A x * alpha / r; A shards kaiming-uniform with the fan of a whole vector (bound 1/sqrt(d_in)), B zero;
  the official ``lora_A_vec * lora_A_anti_vec`` is 1 x 1 (``init_lora_A_vec_value`` must be 1) and is left out.

``p`` counts shards here (the official ``valid_param_private_r`` counts rank vectors: p = private_r * l); the same
class with ``l = 1``, ``p = 0`` and identity routing is the paper's "pure sharing" baseline.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------- routing and shards
def mos_indices(layer: int, n_layers: int, r: int, l: int, valid_r: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """Shard indices (r * l,) of one layer's A (or B) into a pool of ``valid_r * n_layers * l`` shards.

    Official ``LoraLayer_reset_lora_parameters``: shared indices first (a random subset of the shared part), then the
    layer's ``p`` private shards, which sit at the end of the pool.
    """
    n_pool = valid_r * n_layers * l
    private_start = n_pool - p * n_layers
    need_shared = r * l - p
    if p < 0 or private_start < 0 or need_shared < 0:
        raise ValueError(f"p={p} private shards per layer do not fit a pool of {n_pool} shards with r*l={r * l}")
    if need_shared > private_start:
        raise ValueError(f"a layer needs {need_shared} shared shards but the shared pool holds {private_start}: "
                         f"raise valid_r or lower r")
    private = private_start + torch.arange(layer * p, (layer + 1) * p)
    shared = torch.randperm(private_start, generator=generator)[:need_shared]
    return torch.cat([shared, private]).long()


def gather_shards(pool: torch.Tensor, idx: torch.Tensor, l: int) -> torch.Tensor:
    """(r, l * w) low-rank matrix from a pool (n, w): vector j concatenates shards idx[j*l], ..., idx[j*l + l - 1].

    Official ``transform_chunks``: ``cat([mat[mask][i::l] for i in range(l)], dim=1)``.
    """
    return pool[idx].reshape(-1, l * pool.shape[1])  # (r, l*w)


class ShardPool(nn.Module):
    """The global A and B pools of one module type (trainable)."""

    def __init__(self, n_shards: int, d_in: int, d_out: int, l: int):
        super().__init__()
        if d_in % l or d_out % l:
            raise ValueError(f"l={l} must divide d_in={d_in} and d_out={d_out}")
        self.l = l
        self.A = nn.Parameter(torch.empty(n_shards, d_in // l))  # (n, d_in/l)
        self.B = nn.Parameter(torch.zeros(n_shards, d_out // l))  # (n, d_out/l); official Linear weight transposed
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) with fan = a whole vector (official dim=w*l)
        nn.init.uniform_(self.A, -bound, bound)


class MoSLinear(nn.Module):
    """A frozen linear plus a low-rank delta whose A and B are gathered from shared pools."""

    def __init__(self, base: nn.Linear, pool: ShardPool, idx_A: torch.Tensor, idx_B: torch.Tensor, r: int,
                 alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.pool, self.r = base, pool, r
        self.register_buffer("idx_A", idx_A.clone(), persistent=True)
        self.register_buffer("idx_B", idx_B.clone(), persistent=True)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = gather_shards(self.pool.A, self.idx_A, self.pool.l)  # (r, d_in)
        B = gather_shards(self.pool.B, self.idx_B, self.pool.l)  # (r, d_out)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        A, B = self.low_rank()
        return B.t() @ A * self.scaling  # (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.low_rank()
        return self.base(x) + (self.dropout(x) @ A.t()) @ B * self.scaling  # (..., d_out)


def _linear_dims(block: nn.Module, name: str) -> nn.Linear:
    for sub in ("self_attn", "mlp"):
        mod = getattr(getattr(block, sub), name, None)
        if mod is not None:
            return mod
    raise ValueError(f"no {name} in block {type(block).__name__}")


def _set_linear(block: nn.Module, name: str, new: nn.Module) -> None:
    for sub in ("self_attn", "mlp"):
        parent = getattr(block, sub)
        if hasattr(parent, name):
            setattr(parent, name, new)
            return


def apply_mos(blocks: nn.ModuleList, r: int, l: int, valid_r: int, p: int, alpha: float, dropout: float,
              seed: int, targets=TARGETS) -> nn.ModuleDict:
    """Replace the ``targets`` linears of ``blocks`` (in place) by MoS linears; return the pools (the trainables).

    The routing is drawn with ``seed`` in the official order (per layer, per module: A then B).
    """
    L = len(blocks)
    g = torch.Generator().manual_seed(seed)
    pools = nn.ModuleDict()
    for name in targets:
        base = _linear_dims(blocks[0], name)
        pools[name] = ShardPool(valid_r * L * l, base.in_features, base.out_features, l)
    for i, block in enumerate(blocks):
        for name in targets:
            base = _linear_dims(block, name)
            idx_A = mos_indices(i, L, r, l, valid_r, p, g)
            idx_B = mos_indices(i, L, r, l, valid_r, p, g)
            _set_linear(block, name, MoSLinear(base, pools[name], idx_A, idx_B, r, alpha, dropout))
    return pools


def apply_pure_sharing(blocks: nn.ModuleList, rank: int, alpha: float, dropout: float, targets=TARGETS) -> nn.ModuleDict:
    """The paper's pure-sharing baseline: one A/B pair of rank ``rank`` per module type, used by every layer."""
    pools = nn.ModuleDict()
    for name in targets:
        base = _linear_dims(blocks[0], name)
        pools[name] = ShardPool(rank, base.in_features, base.out_features, 1)
    ident = torch.arange(rank)
    for block in blocks:
        for name in targets:
            _set_linear(block, name, MoSLinear(_linear_dims(block, name), pools[name], ident, ident, rank, alpha, dropout))
    return pools


def lora_param_count(dims: list[tuple[int, int]], r: int) -> int:
    """Trainable parameters of a rank-r LoRA on linears of shapes (d_in, d_out): r * sum(d_in + d_out)."""
    return r * sum(a + b for a, b in dims)


# --------------------------------------------------------------------------------------------- the truncated model
def top_model(model: nn.Module, n_top: int) -> nn.Module:
    """A deep copy of a Llama-like causal LM that keeps only its top ``n_top`` decoder blocks.

    Called with ``inputs_embeds`` = the cached hidden states entering block ``n - n_top`` of the full model (and the
    default positions 0..T-1), it returns exactly the full model's logits: the lower blocks are frozen and unadapted,
    so their outputs never change during fine-tuning.
    """
    from .offsite import _set_blocks, decoder_block_list

    blocks = decoder_block_list(model)
    if not 1 <= n_top <= len(blocks):
        raise ValueError(f"n_top={n_top} must be in [1, {len(blocks)}]")
    top = copy.deepcopy(model)
    _set_blocks(top, nn.ModuleList(list(decoder_block_list(top))[len(blocks) - n_top:]))
    top.config.use_cache = False
    for prm in top.parameters():
        prm.requires_grad_(False)
    return top


@torch.no_grad()
def hidden_at(model: nn.Module, windows: torch.Tensor, layer: int, batch: int = 8) -> torch.Tensor:
    """Hidden states (N, T, d) entering decoder block ``layer`` of the full model for token windows (N, T)."""
    out = []
    for i in range(0, windows.shape[0], batch):
        hs = model(input_ids=windows[i:i + batch], output_hidden_states=True, use_cache=False).hidden_states
        out.append(hs[layer])
    return torch.cat(out)


@torch.no_grad()
def heldout_loss(top: nn.Module, h: torch.Tensor, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token NLL (nats) of the top model on cached states h (N, T, d) with targets ids (N, T)."""
    was = top.training
    top.eval()
    nll, n = 0.0, 0
    for i in range(0, h.shape[0], batch):
        logits = top(inputs_embeds=h[i:i + batch]).logits.float()  # (b, T, V)
        y = ids[i:i + batch]
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += y[:, 1:].numel()
    top.train(was)
    return nll / n


def train_adapter(top: nn.Module, params: list[nn.Parameter], h: torch.Tensor, ids: torch.Tensor, steps: int,
                  batch_size: int, lr: float, seed: int, warmup_ratio: float = 0.03, max_grad_norm: float = 0.3) -> list[float]:
    """AdamW (weight decay 0), linear schedule with warm-up, gradient clipping: the official trainer's settings
    (ft_*.sh: ``--warmup_ratio 0.03 --lr_scheduler_type linear --weight_decay 0.0 --max_grad_norm 0.3``).

    Batches: ``batch_size`` cached windows per step, drawn with ``seed`` (the same draws for every arm of a seed).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, h.shape[0], (steps, batch_size), generator=g)  # (S, B)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, math.ceil(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    top.train()
    losses = []
    for rows in order:
        out = top(inputs_embeds=h[rows], labels=ids[rows])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    top.eval()
    return losses


# --------------------------------------------------------------------------------------------- the four arms
ARMS = ("lora_full", "lora_equal", "pure_shared", "mos")


def build_arm(top: nn.Module, arm: str, cfg: dict, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A fresh adapted copy of ``top`` and its trainable parameters, for one arm and seed.

    ``lora_full`` / ``lora_equal``: PEFT's own LoRA (``peft.LoraConfig``) of rank ``lora_r`` / ``mos_valid_r``;
    ``pure_shared``: one A/B pair of rank ``n_top * mos_valid_r`` per module type shared by all adapted blocks;
    ``mos``: MoS with rank ``mos_r``, ``mos_l`` shards per vector, ``mos_private`` private shards per layer and a
    pool of ``mos_valid_r`` equivalent ranks per layer. All arms: alpha ``lora_alpha``, dropout ``lora_dropout``.
    """
    from .offsite import decoder_block_list

    torch.manual_seed(seed)  # the adapter initialisation of this seed
    model = copy.deepcopy(top)
    alpha, drop = cfg["lora_alpha"], cfg["lora_dropout"]
    if arm in ("lora_full", "lora_equal"):
        from peft import LoraConfig, get_peft_model

        r = cfg["lora_r"] if arm == "lora_full" else cfg["mos_valid_r"]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=drop, bias="none",
                                                 target_modules=list(TARGETS)))
    elif arm == "pure_shared":
        apply_pure_sharing(decoder_block_list(model), cfg["n_top"] * cfg["mos_valid_r"], alpha, drop)
    elif arm == "mos":
        apply_mos(decoder_block_list(model), cfg["mos_r"], cfg["mos_l"], cfg["mos_valid_r"], cfg["mos_private"],
                  alpha, drop, seed=seed)
    else:
        raise ValueError(f"arm: {arm!r}; allowed: {', '.join(ARMS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params
