"""LM-GNN, stage-wise: graph-aware fine-tuning of a BERT-style LM, then a relational GNN on its embeddings.

Ioannidis, Song, Kim, ... Karypis, "Efficient and effective training of language and graph neural network models",
arXiv 2206.10781 (Amazon; the method behind GraphStorm's LM+GNN).

Stage 1 (graph-aware LM fine-tuning, :func:`finetune_link`): the LM encodes the text of both endpoints of an edge
(mean-pooled token states, L2-normalised: e_u = LM(t_u) / ||LM(t_u)||) and is trained on *link prediction* with a
dot-product decoder s(u, v) = e_u . e_v / tau. Default loss (``loss="infonce"``, :func:`link_infonce_loss`): the
contrastive loss of GraphStorm (``LinkPredictContrastiveLossFunc``, python/graphstorm/model/loss_func.py:808-880, with
its default L2 normalisation of the embeddings for this loss, config/argument.py:2801-2804), with the other B - 1
targets of the batch as the negatives of each source (in-batch negatives, as sentence-transformers'
MultipleNegativesRankingLoss that trained all-MiniLM-L6-v2, scale 20 = 1/tau at tau = 0.05):
    L = -1/B sum_i log( exp(s(u_i, v_i)) / sum_{j in C_i} exp(s(u_i, v_j)) ),
where C_i is i and the candidates j that are valid negatives of u_i: candidates whose target is the positive target
v_i itself (the same edge target drawn twice), the source u_i itself, or a known training edge (u_i, v_j) are masked
out (:func:`inbatch_false_negatives`; GraphStorm's ``inbatch_joint`` sampler removes only the pair i = j,
dataloading/sampler.py:392-440).
``loss="bce"`` (:func:`link_bce_loss`, the first version): BCE on s with one rolled in-batch negative and no bias.
``ft_layers`` < number of layers fine-tunes only the top layers: the frozen lower layers' token states are computed
once for every node and cached (:class:`NodeEncoder`), which is exact (the same numbers as the full forward) and
makes a CPU fine-tuning step and the re-encoding of all nodes ``ft_layers / n_layers`` as expensive.
Stage 2: the LM is frozen, every node is embedded once, and an RGCN (``dgl.nn.RelGraphConv``, one weight per
relation and direction, self loop) is trained on the node-classification task (:class:`RGCN`).

Baselines: the LM alone (frozen or stage-1 embeddings + MLP) and the same RGCN on *frozen* LM embeddings.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import RelGraphConv  # noqa: E402

from .code_graph import EDGE_TYPES, CodeGraph  # noqa: E402
from .models import MLP  # noqa: E402,F401  (the shared MLP; notebooks use lm_gnn.MLP)


# --------------------------------------------------------------------------------------------------------- LM side
def mean_pool(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: average of the token states over non-padding tokens (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, T, 1)
    return (last_hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


def embed_batch(model, tok, texts: list[str], max_len: int) -> torch.Tensor:
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return F.normalize(mean_pool(out.last_hidden_state, enc["attention_mask"]), dim=-1)  # (B, H)


@torch.no_grad()
def encode_texts(model, tok, texts: list[str], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """Frozen, L2-normalised embeddings (N, H) of ``texts`` (the LM in eval mode)."""
    model.eval()
    return torch.cat([embed_batch(model, tok, texts[i:i + batch_size], max_len)
                      for i in range(0, len(texts), batch_size)])


def link_bce_loss(e_src: torch.Tensor, e_dst: torch.Tensor, tau: float) -> torch.Tensor:
    """Stage-1 loss: BCE on s = e_u . e_v / tau for the B positive pairs and B in-batch negatives (u_i, v_{i+1})."""
    pos = (e_src * e_dst).sum(-1) / tau  # (B,)
    neg = (e_src * e_dst.roll(1, dims=0)).sum(-1) / tau  # (B,)
    return 0.5 * (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                  + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))


def inbatch_false_negatives(src: np.ndarray, dst: np.ndarray, known: set | None = None) -> np.ndarray:
    """(B, B) boolean mask of the in-batch candidates (row i = source src[i], column j = candidate target dst[j])
    that are not valid negatives of row i: the same node as the row's own target (``dst[j] == dst[i]``, a duplicate
    of the positive), the source itself (``dst[j] == src[i]``, a constant score of 1 / tau), or a known edge
    (``(src[i], dst[j])`` in ``known``, a set of (u, v) pairs; pass both directions for an undirected check). The
    diagonal (the positive) is never masked."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    mask = (dst[None, :] == dst[:, None]) | (dst[None, :] == src[:, None])
    if known:
        mask |= np.array([[(int(u), int(v)) in known for v in dst] for u in src], dtype=bool).reshape(mask.shape)
    np.fill_diagonal(mask, False)
    return mask


def link_infonce_loss(e_src: torch.Tensor, e_dst: torch.Tensor, tau: float, mask=None) -> torch.Tensor:
    """Stage-1 loss (GraphStorm's contrastive loss with in-batch negatives): cross-entropy of the B x B score matrix
    e_src e_dst^T / tau with the diagonal (the edge) as the target of each row. ``mask`` (B, B) boolean, True =
    excluded from the row's softmax (false negatives, :func:`inbatch_false_negatives`); the diagonal must be False."""
    logits = e_src @ e_dst.t() / tau  # (B, B)
    if mask is not None:
        logits = logits.masked_fill(torch.as_tensor(mask, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(e_src)))


LINK_LOSSES = {"infonce": link_infonce_loss, "bce": link_bce_loss}


class NodeEncoder:
    """Embeds nodes by index with a BERT-style ``model`` whose top ``ft_layers`` transformer layers are trainable.

    The texts are tokenised once (``max_len`` tokens). With ``ft_layers`` equal to the number of layers the whole
    model runs on every call (full fine-tuning). Otherwise the embeddings and the lower layers are frozen
    (``requires_grad=False``) and their output token states are computed once, in eval mode, for every node
    (:meth:`build_cache`, which also returns the frozen embeddings of all nodes); each call then runs only the top
    layers on the cached states. Batches are trimmed to their longest text, as the per-batch padding of
    :func:`encode_texts`."""

    def __init__(self, model, tok, texts: list[str], max_len: int, ft_layers: int):
        layers = model.encoder.layer
        if not 1 <= ft_layers <= len(layers):
            raise ValueError(f"ft_layers={ft_layers}: between 1 and {len(layers)}")
        self.model, self.n_lower = model, len(layers) - ft_layers
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]  # (N, max_len)
        self.cache = None
        if self.n_lower:
            for p in model.embeddings.parameters():
                p.requires_grad_(False)
            for layer in layers[:self.n_lower]:
                for p in layer.parameters():
                    p.requires_grad_(False)

    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _trim(self, idx):
        m = self.mask[idx]
        T = int(m.sum(1).max())
        return m[:, :T], T

    @torch.no_grad()
    def build_cache(self, batch_size: int = 64) -> torch.Tensor:
        """Frozen embeddings (N, H) of every node; caches the lower layers' token states when ``ft_layers`` < all."""
        self.model.eval()
        n, out, states = len(self.ids), [], []
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            m, T = self._trim(idx)
            o = self.model(input_ids=self.ids[idx, :T], attention_mask=m, output_hidden_states=True)
            out.append(F.normalize(mean_pool(o.last_hidden_state, m), dim=-1))
            if self.n_lower:
                h = torch.zeros(len(idx), self.ids.shape[1], o.hidden_states[self.n_lower].shape[-1])
                h[:, :T] = o.hidden_states[self.n_lower]
                states.append(h)
        if self.n_lower:
            self.cache = torch.cat(states)  # (N, max_len, H) input of the first trainable layer
        return torch.cat(out)

    def __call__(self, idx) -> torch.Tensor:
        """L2-normalised embeddings (B, H) of the nodes ``idx`` (with autograd through the trainable layers)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        m, T = self._trim(idx)
        if not self.n_lower:
            o = self.model(input_ids=self.ids[idx, :T], attention_mask=m)
            return F.normalize(mean_pool(o.last_hidden_state, m), dim=-1)
        if self.cache is None:
            raise RuntimeError("NodeEncoder: call build_cache() first")
        h = self.cache[idx, :T]
        ext = self.model.get_extended_attention_mask(m, m.shape)  # (B, 1, 1, T) additive
        for layer in self.model.encoder.layer[self.n_lower:]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return F.normalize(mean_pool(h, m), dim=-1)

    @torch.no_grad()
    def encode_all(self, batch_size: int = 64) -> torch.Tensor:
        self.model.eval()
        n = len(self.ids)
        return torch.cat([self(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def finetune_link(encoder: NodeEncoder, pairs: np.ndarray, *, batch_size: int, lr: float, epochs: int, tau: float,
                  seed: int, loss: str = "infonce", mask_false_negatives: bool = True, known: set | None = None,
                  stats: dict | None = None, progress=None) -> list[float]:
    """Stage 1: fine-tune the trainable layers of ``encoder`` in place on link prediction over ``pairs`` (P, 2)
    node-index pairs with the loss ``loss`` (``LINK_LOSSES``); returns the per-step losses. Pairs are shuffled with
    ``seed``; AdamW (weight decay 0.01), constant learning rate. With ``loss="infonce"`` and
    ``mask_false_negatives``, the in-batch candidates that are duplicates of the positive target, the source itself
    or a ``known`` edge are removed from each row's softmax (:func:`inbatch_false_negatives`). ``stats`` (a dict, if
    given) receives the counts: candidates (off-diagonal), masked, rows_with_duplicate_target, masked_known_edge and
    the mean log(number of remaining candidates) (the loss of a constant score)."""
    loss_fn = LINK_LOSSES[loss]
    if stats is not None:
        stats.update(rows=0, candidates=0, masked=0, rows_with_duplicate_target=0, masked_known_edge=0,
                     log_candidates_sum=0.0)
    gen = np.random.default_rng(seed)
    opt = torch.optim.AdamW(encoder.trainable(), lr=lr, weight_decay=0.01)
    encoder.model.train()
    losses = []
    for _ in range(epochs):
        order = gen.permutation(len(pairs))
        steps = range(0, len(order) - 1, batch_size)
        for i in progress(steps) if progress else steps:
            b = pairs[order[i:i + batch_size]]
            if len(b) < 2:
                continue
            e = encoder(np.concatenate([b[:, 0], b[:, 1]]))
            if loss == "infonce":
                mask = inbatch_false_negatives(b[:, 0], b[:, 1], known) if mask_false_negatives else None
                value = loss_fn(e[:len(b)], e[len(b):], tau, mask)
                if stats is not None:
                    dup = (b[None, :, 1] == b[:, None, 1]) & ~np.eye(len(b), dtype=bool)
                    full = inbatch_false_negatives(b[:, 0], b[:, 1], known)
                    kept = (~mask if mask is not None else np.ones_like(full)).sum(1)
                    stats["rows"] += len(b)
                    stats["candidates"] += len(b) * (len(b) - 1)
                    stats["masked"] += int(full.sum())
                    stats["rows_with_duplicate_target"] += int(dup.any(1).sum())
                    stats["masked_known_edge"] += int((full & ~dup & (b[None, :, 1] != b[:, None, 0])).sum())
                    stats["log_candidates_sum"] += float(np.log(kept).sum())
            else:
                value = loss_fn(e[:len(b)], e[len(b):], tau)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(float(value))
    encoder.model.eval()
    return losses


# -------------------------------------------------------------------------------------------------------- GNN side
def relational_graph(cg: CodeGraph) -> tuple[dgl.DGLGraph, list[str]]:
    """Homogeneous DGL graph with ``edata['etype']`` (each relation and its reverse) and ``edata['norm']`` =
    1 / (in-degree of the destination within the relation), the RGCN normalisation c_{i,r} = |N_i^r|."""
    src, dst, et, names = [], [], [], []
    for t in EDGE_TYPES:
        e = np.asarray(cg.edges[t], dtype=np.int64).reshape(-1, 2)
        for rev in (False, True):
            names.append(t if not rev else f"rev_{t}")
            s, d = (e[:, 1], e[:, 0]) if rev else (e[:, 0], e[:, 1])
            src.append(s)
            dst.append(d)
            et.append(np.full(len(s), len(names) - 1))
    src, dst, et = (torch.from_numpy(np.concatenate(a)) for a in (src, dst, et))
    g = dgl.graph((src, dst), num_nodes=cg.num_nodes)
    g.edata["etype"] = et
    key = dst * len(names) + et
    _, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
    g.edata["norm"] = (1.0 / counts[inv].float()).unsqueeze(1)  # (E, 1)
    return g, names


class RGCN(nn.Module):
    """Schlichtkrull et al.: h_i' = W_0 h_i + sum_r sum_{j in N_i^r} W_r h_j / |N_i^r|, ``n_layers`` layers."""

    def __init__(self, in_feats: int, hidden: int, out_feats: int, num_rels: int, n_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [out_feats]
        self.layers = nn.ModuleList(RelGraphConv(a, b, num_rels, self_loop=True) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, g, X):
        h = X
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = F.dropout(F.relu(h), self.dropout, self.training)
            h = layer(g, h, g.edata["etype"], g.edata["norm"])
        return h


def module_split(cg: CodeGraph, fractions=(0.5, 0.2, 0.3), seed: int = 0) -> dict[str, torch.Tensor]:
    """Split the *labelled* nodes by their defining module: all nodes of one file land in the same part, so a test
    function never has a labelled sibling in the same module (containment alone cannot give its label away)."""
    def module_of(i):
        q, k = cg.qualnames[i], cg.kinds[i]
        parts = q.split(".")
        return q if k == "module" else ".".join(parts[:len(parts) - (2 if k == "method" else 1)])

    labelled = [i for i, lab in enumerate(cg.labels) if lab is not None]
    mods = sorted({module_of(i) for i in labelled})
    rng = np.random.default_rng(seed)
    mods = [mods[j] for j in rng.permutation(len(mods))]
    n_tr, n_va = int(round(fractions[0] * len(mods))), int(round(fractions[1] * len(mods)))
    part = {m: ("train" if j < n_tr else "val" if j < n_tr + n_va else "test") for j, m in enumerate(mods)}
    out = {k: [] for k in ("train", "val", "test")}
    for i in labelled:
        out[part[module_of(i)]].append(i)
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}


def train_classifier(model: nn.Module, g, X: torch.Tensor, y: torch.Tensor, split: dict, *, epochs: int, lr: float,
                     weight_decay: float) -> dict:
    """Full-batch Adam on cross-entropy over ``split['train']``; returns test accuracy / macro-F1 at the epoch of best
    validation accuracy (first one on ties)."""
    from sklearn.metrics import f1_score

    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    tr, va, te = split["train"], split["val"], split["test"]
    best = {"val_acc": -1.0}
    for epoch in range(1, epochs + 1):
        model.train()
        loss = F.cross_entropy(model(g, X)[tr], y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(g, X).argmax(-1)
        val = float((pred[va] == y[va]).float().mean())
        if val > best["val_acc"]:
            best = {"val_acc": val, "acc": float((pred[te] == y[te]).float().mean()),
                    "macro_f1": float(f1_score(y[te].numpy(), pred[te].numpy(), average="macro")), "epoch": epoch}
            state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return best
