"""FoldGPT: block removal plus grouped parameter sharing of the surviving blocks.

FoldGPT: Simple and Effective Large Language Model Compression Scheme (Liu et al., 2024),
https://arxiv.org/abs/2407.00928. No official code is public (searched: GitHub "FoldGPT", "2407.00928") and only the
abstract could be read offline, so this file is a RECONSTRUCTION whose fidelity to the paper is not established; it
implements the four elements the abstract names, with every choice it leaves open listed in ``foldgpt.paper.yaml``
deviations:

* gated block removal: every decoder block gets a learnable scalar gate g_l (init 1) on its residual branch,
  ``h_{l+1} = h_l + g_l * (block_l(h_l) - h_l)``; the gates are trained JOINTLY (so their ranking models the coupling
  between blocks) with the LM loss on calibration text plus a polarisation penalty
  ``R(g) = t * sum|g_l| - sum|g_l - mean(g)|`` (Zhuang et al., NeurIPS 2020), the model weights frozen, gates projected
  to [0, 1] after each step; the ``n_remove`` blocks with the smallest gates are removed;
* grouped parameter sharing ("folding"): groups of consecutive survivors share the attention and MLP weights of the
  group's first block, while every block keeps its OWN RMSNorms (re-adapted in the fine-tune);
* cure: a short fine-tune of the RMSNorm weights with the LM loss plus tail-layer distillation (normalised MSE
  between the compressed and the original model's last-block hidden states, the offsite ``kd_loss``).

Baselines: ShortGPT (icip-cas/ShortGPT ``shortgpt/metrics.py::block_influence``, ``shortgpt.py::compute_bi``:
BI_l = sum over tokens of 1 - cos(h_l, h_{l+1}), remove the lowest-BI blocks) and random removal.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .offsite import _set_blocks, decoder_block_list, kd_loss


# --------------------------------------------------------------------------------------------- ShortGPT
def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Official ``block_influence``: 1 - cos(h_in, h_out) per token, (B, L, d) x 2 -> (B*L,); NaN -> 0.5 similarity."""
    d = h_in.shape[-1]
    a, b = h_in.reshape(-1, d).double(), h_out.reshape(-1, d).double()  # (N, d)
    sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return 1 - sim.nan_to_num(nan=0.5)


@torch.no_grad()
def block_influences(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT's BI of every decoder block, summed over all tokens of ``batches`` (official ``compute_bi``)."""
    n = len(decoder_block_list(model))
    bi = [0.0] * n
    for x in batches:  # x: (B, L)
        hs = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states  # n + 1 of (B, L, d)
        # hidden_states[n] has the final norm applied in HF; the official code uses it as is (hiddens[i + 1])
        for i in range(n):
            bi[i] += block_influence(hs[i], hs[i + 1]).sum().item()
    return bi


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` smallest scores (stable: ties keep the lower index), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


# --------------------------------------------------------------------------------------------- building models
def remove_blocks(model: nn.Module, remove: list[int]) -> nn.Module:
    """A deep copy of ``model`` without the blocks ``remove`` (ShortGPT's ``del self.layers[i]``)."""
    out = copy.deepcopy(model)
    blocks = decoder_block_list(out)
    _set_blocks(out, nn.ModuleList([b for i, b in enumerate(blocks) if i not in set(remove)]))
    out.config.use_cache = False
    return out


def fold_blocks(model: nn.Module, groups: list[list[int]]) -> nn.Module:
    """Share weights inside each group of block positions (indices into ``model``'s current blocks).

    Every block of a group uses the attention and MLP modules of the group's FIRST block (the same ``nn.Module``, so
    the parameters are stored once); its ``input_layernorm`` / ``post_attention_layernorm`` stay its own. Modifies and
    returns ``model``.
    """
    blocks = decoder_block_list(model)
    for group in groups:
        root = blocks[group[0]]
        for j in group[1:]:
            blocks[j].self_attn = root.self_attn
            blocks[j].mlp = root.mlp
    return model


def unique_param_count(model: nn.Module) -> int:
    """Parameters stored (shared tensors and tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())  # nn.Module.parameters() deduplicates shared tensors


def norm_params(model: nn.Module) -> list[nn.Parameter]:
    """The RMSNorm weights of every block and the final norm (deduplicated): the fine-tune's trainable set."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if "norm" in name and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------- FoldGPT gates
def polarization_penalty(g: torch.Tensor, t: float) -> torch.Tensor:
    """Zhuang et al. (2020) polarisation regulariser: t * ||g||_1 - ||g - mean(g)||_1."""
    return t * g.abs().sum() - (g - g.mean()).abs().sum()


class GatedBlock(nn.Module):
    """``h + g[index] * (block(h) - h)``: a decoder block with a scalar gate on its whole residual branch."""

    def __init__(self, block: nn.Module, gates: nn.Parameter, index: int):
        super().__init__()
        self.block, self.gates, self.index = block, gates, index

    def forward(self, hidden_states, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return hidden_states + self.gates[self.index] * (out - hidden_states)


def train_gates(model: nn.Module, batches: list[torch.Tensor], lr: float, lam: float, t: float) -> dict:
    """Learn one gate per block of ``model`` (weights frozen) with LM + lam * R(g); returns gates and the log.

    The model is left unchanged (its blocks are wrapped for the run and restored). Adam on the gates, gates
    projected to [0, 1] after every step.
    """
    blocks = decoder_block_list(model)
    n = len(blocks)
    gates = nn.Parameter(torch.ones(n))
    inner = model.model
    wrapped = nn.ModuleList([GatedBlock(b, gates, i) for i, b in enumerate(blocks)])
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    inner.layers = wrapped  # config.num_hidden_layers unchanged
    opt = torch.optim.Adam([gates], lr=lr)
    log = {"lm_loss": [], "penalty": []}
    try:
        for x in batches:  # (B, L)
            lm = model(input_ids=x, labels=x, use_cache=False).loss
            pen = polarization_penalty(gates, t)
            (lm + lam * pen).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            log["lm_loss"].append(lm.item())
            log["penalty"].append(pen.item())
    finally:
        inner.layers = blocks
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    log["gates"] = gates.detach().tolist()
    return log


def share_groups(gates: list[float], survivors: list[int], n_share: int, group_size: int = 2) -> list[list[int]]:
    """Groups (positions into ``survivors``) of ``group_size`` CONSECUTIVE survivors that share weights.

    Greedy: candidate windows of ``group_size`` consecutive surviving blocks, taken in order of increasing mean gate
    (the least important first; ties: lower position), skipping windows that overlap a chosen one, until each chosen
    group has saved ``group_size - 1`` blocks' weights and ``n_share`` are saved in all. Raises if impossible.
    """
    if n_share == 0:
        return []
    if n_share % (group_size - 1):
        raise ValueError(f"n_share={n_share} is not a multiple of group_size - 1 = {group_size - 1}")
    m = len(survivors)
    cands = [list(range(s, s + group_size)) for s in range(m - group_size + 1)]
    mean_gate = lambda w: sum(gates[survivors[p]] for p in w) / len(w)
    cands.sort(key=lambda w: (mean_gate(w), w[0]))
    taken, groups = set(), []
    for w in cands:
        if len(groups) * (group_size - 1) == n_share:
            break
        if taken.isdisjoint(w):
            groups.append(w)
            taken.update(w)
    if len(groups) * (group_size - 1) != n_share:
        raise ValueError(f"cannot fold {n_share} blocks out of {m} survivors in groups of {group_size}")
    return sorted(groups)


def build_foldgpt(model: nn.Module, gates: list[float], n_remove: int, n_share: int, group_size: int = 2):
    """Remove the ``n_remove`` lowest-gate blocks, then fold ``n_share`` blocks' weights into shared groups.

    Returns ``(compressed model, removed indices, groups as ORIGINAL block indices)``.
    """
    removed = lowest(gates, n_remove)
    survivors = [i for i in range(len(gates)) if i not in set(removed)]
    groups = share_groups(gates, survivors, n_share, group_size)
    out = fold_blocks(remove_blocks(model, removed), groups)
    return out, removed, [[survivors[p] for p in g] for g in groups]


# --------------------------------------------------------------------------------------------- cure (fine-tune)
@torch.no_grad()
def last_block_states(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output of the last decoder block (before the final norm) for each batch: the distillation targets."""
    out = []
    last = decoder_block_list(model)[-1]
    cap = {}
    h = last.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        for x in batches:
            model.model(input_ids=x, use_cache=False)
            out.append(cap["h"].detach().clone())  # (B, L, d)
    finally:
        h.remove()
    return out


def finetune(model: nn.Module, batches: list[torch.Tensor], targets: list[torch.Tensor] | None, lr: float,
             kd_weight: float, max_grad_norm: float = 1.0) -> dict:
    """AdamW on the RMSNorm weights: LM loss + ``kd_weight`` * tail-layer distillation to ``targets``.

    ``targets[i]`` is the original model's last-block output on ``batches[i]`` (:func:`last_block_states`).
    """
    params = norm_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    last = decoder_block_list(model)[-1]
    cap = {}
    hook = last.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    log = {"lm_loss": [], "kd_loss": []}
    try:
        for i, x in enumerate(batches):
            out = model(input_ids=x, labels=x, use_cache=False)
            loss = out.loss
            if targets is not None and kd_weight > 0:
                kd = kd_loss(targets[i].float(), cap["h"].float())
                loss = loss + kd_weight * kd
                log["kd_loss"].append(kd.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad()
            log["lm_loss"].append(out.loss.item())
    finally:
        hook.remove()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    log["trainable_params"] = sum(p.numel() for p in params)
    return log
