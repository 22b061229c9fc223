"""ReFresh / FreshGNN: neighbour-sampled GNN training with a gradient-admitted, staleness-bounded embedding cache.

Huang, Zheng, Karypis, Wang, Ren, Wipf, Guo (2023), "ReFresh: Reducing Memory Access from Exploiting Stable
Historical Embeddings for Graph Neural Network Training" (later FreshGNN), arXiv:2301.07482.

Mechanism (paper section 4):

1. **Historical embedding cache.** The public FreshGNN layout (``layout="official"``, ``SharedBufferCache``): the top
   hidden level h^{L-1} only, in one buffer that starts full of the hottest nodes' raw features and whose embedding
   writes displace them; a ring write head reset every ``staleness`` iterations; no admission during a warm-up. The
   first version of this module (``layout="all_levels"``, ``HistoryCache``): every hidden level l, each entry with the
   iteration it was admitted, no raw-feature cache, no warm-up.
2. **Pruned sampling** (``CachedNeighborSampler``, a ``dgl.dataloading.NeighborSampler``): sampling goes from the
   seeds outwards; a node whose h^l is cached and fresh is *not expanded* below level l, so the raw features of its
   subtree are never fetched. With an empty cache it samples exactly like ``NeighborSampler``.
3. **Gradient-based admission**: after backward, among the nodes whose h^l was computed this iteration, those with
   ||dL/dh^l_v|| below the batch ``admit_quantile``-quantile are admitted (a small gradient means the embedding is
   stable, so reusing it later costs little accuracy).
4. **Staleness bound**: an entry admitted at iteration a is used at iterations a+1 .. a+S and evicted after
   (``staleness`` = S; S = 0 disables the cache).

Memory access is counted as bytes of raw features fetched from the (host) feature store, plus cache reads reported
separately. Baselines: fresh sampling (no cache) and naive caches without the gradient criterion (admit everything /
random admission at the same rate) or without the staleness bound.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import SAGEConv  # noqa: E402

NO_BOUND = 10**9  # "no staleness bound"


class HistoryCache:
    """Embeddings h^l of one level: ``emb`` (N, dim), ``stamp`` (N,) admission iteration (-1 = empty).

    An entry admitted at iteration a is valid at iteration ``now`` iff 1 <= now - a <= staleness.
    """

    def __init__(self, n_nodes: int, dim: int, staleness: int):
        self.emb = torch.zeros(n_nodes, dim)
        self.stamp = torch.full((n_nodes,), -1, dtype=torch.int64)
        self.staleness = int(staleness)
        self.now = 0

    def valid(self, nodes: torch.Tensor) -> torch.Tensor:
        age = self.now - self.stamp[nodes]
        return (self.stamp[nodes] >= 0) & (age >= 1) & (age <= self.staleness)

    def admit(self, nodes: torch.Tensor, emb: torch.Tensor) -> None:
        self.emb[nodes] = emb.detach()
        self.stamp[nodes] = self.now

    def evict(self) -> int:
        """Drop the entries older than the bound; returns how many were dropped."""
        old = (self.stamp >= 0) & (self.now - self.stamp > self.staleness)
        self.stamp[old] = -1
        return int(old.sum())

    def size(self) -> int:
        return int((self.stamp >= 0).sum())

    def read(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.emb[nodes]


class SharedBufferCache:
    """The official FreshGNN ``HistoryCache`` layout (xxcclong/history-cache@1b0b1db hiscache/history_cache.py):
    one float buffer of ``buffer_floats`` shared by a raw-feature cache and an embedding cache of ONE hidden level.

    - ``fill`` (l. 115-133): the buffer starts full of raw features of the hottest nodes (the last
      ``buffer_floats // d`` of ``hot_order``, ascending hotness; official ``sorted_indices.dat``); feature slot i
      holds ``feat2full[i]`` (offset by the spare rows when every node fits, l. 129-131).
    - ``admit`` (``update_history``, l. 175-220): every ``staleness`` iterations the write head returns to 0 (l.
      179-180); admitted embeddings are written at the head (l. 200-202); the feature slots they overwrite are
      invalidated for good (l. 204-207, ``feat2full[begin:end]``), and so are the older embeddings whose slots are
      overwritten (l. 209-214). There is no per-entry age: an entry lives until the head passes its slot again.
    - the caller admits only nodes not already cached (``sub2embed == -1``, l. 194).
    Deviation: a write past the end of the buffer (an error in the official code) is truncated here.
    """

    def __init__(self, n_nodes: int, hid: int, d: int, buffer_floats: int, hot_order: torch.Tensor, staleness: int):
        self.n, self.hid, self.d = int(n_nodes), int(hid), int(d)
        self.staleness = int(staleness)
        self.emb_slots = int(buffer_floats) // self.hid
        self.feat_rows = int(buffer_floats) // self.d
        hot_order = torch.as_tensor(hot_order, dtype=torch.int64)
        cache_idx = hot_order if self.feat_rows >= self.n else hot_order[len(hot_order) - self.feat_rows:]
        offset = self.feat_rows - self.n if self.feat_rows > self.n else 0
        self.feat2full = cache_idx.clone()
        self.feat_slot = torch.full((self.n,), -1, dtype=torch.int64)
        self.feat_slot[cache_idx] = torch.arange(len(cache_idx)) + offset
        self.emb = torch.zeros(self.emb_slots, self.hid)
        self.emb_slot = torch.full((self.n,), -1, dtype=torch.int64)
        self.slot2node = torch.full((self.emb_slots,), -1, dtype=torch.int64)
        self.header = 0
        self.now = 0

    def valid(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.emb_slot[nodes] >= 0

    def read(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.emb[self.emb_slot[nodes].clamp(min=0)]

    def feature_hit(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.feat_slot[nodes] >= 0

    def new_iteration(self, glb_iter: int) -> None:
        """Official ``update_history`` start: the head returns to 0 every ``staleness`` iterations."""
        if self.staleness > 0 and glb_iter % self.staleness == 0:
            self.header = 0

    def admit(self, nodes: torch.Tensor, emb: torch.Tensor) -> int:
        k = min(len(nodes), self.emb_slots - self.header)
        if k <= 0:
            return 0
        nodes, emb = nodes[:k], emb[:k].detach()
        h0, h1 = self.header, self.header + k
        begin = h0 * self.hid // self.d
        end = -(-(h1 * self.hid) // self.d)  # ceil
        self.feat_slot[self.feat2full[begin:end]] = -1
        old = self.slot2node[h0:h1]
        old = old[old >= 0]
        area = self.emb_slot[old]
        drop = (area >= h0) & (area < h1)
        self.emb_slot[old[drop]] = -1
        self.emb[h0:h1] = emb
        self.emb_slot[nodes] = torch.arange(h0, h1)
        self.slot2node[h0:h1] = nodes
        self.header = h1
        return k

    def size(self) -> int:
        return int((self.emb_slot >= 0).sum())

    def feature_rows_cached(self) -> int:
        return int((self.feat_slot >= 0).sum())


def admit_by_gradient(nodes: torch.Tensor, grad_norm: torch.Tensor, quantile: float) -> torch.Tensor:
    """The nodes whose gradient norm is strictly below the batch ``quantile``-quantile (ReFresh's admission)."""
    if len(nodes) == 0:
        return nodes
    thr = torch.quantile(grad_norm.double(), quantile)
    return nodes[grad_norm.double() < thr]


class CachedNeighborSampler(dgl.dataloading.NeighborSampler):
    """``NeighborSampler`` that prunes the subtrees of cached nodes.

    ``caches``: {level l: HistoryCache of h^l}, levels 1 .. L-1. Block b (0 = input side) computes h^{b+1} of its
    dst nodes. Each block carries ``dstdata['compute']`` (h^{b+1} must be computed: needed and not cached),
    ``dstdata['cached']`` (needed and served from the cache) and ``srcdata['need']`` (h^b is needed). Raw features
    are needed only for ``blocks[0].srcdata['need']``.
    """

    def __init__(self, fanouts, caches: dict[int, HistoryCache] | None = None, **kwargs):
        super().__init__(fanouts, **kwargs)
        self.caches = caches or {}

    def sample_blocks(self, g, seed_nodes, exclude_eids=None):
        output_nodes = seed_nodes
        L = len(self.fanouts)
        need = torch.ones(len(seed_nodes), dtype=torch.bool)
        blocks = []
        for depth, fanout in enumerate(reversed(self.fanouts)):
            level = L - depth  # this block computes h^level of its dst nodes
            cache = self.caches.get(level) if level < L else None
            cached = need & cache.valid(seed_nodes) if cache is not None else torch.zeros_like(need)
            compute = need & ~cached
            frontier = g.sample_neighbors(seed_nodes[compute], fanout, edge_dir=self.edge_dir, prob=self.prob,
                                          replace=self.replace, output_device=self.output_device,
                                          exclude_edges=exclude_eids)
            block = dgl.to_block(frontier, seed_nodes)
            if dgl.EID in frontier.edata.keys():
                block.edata[dgl.EID] = frontier.edata[dgl.EID]
            block.dstdata["compute"] = compute
            block.dstdata["cached"] = cached
            src_need = torch.zeros(block.num_src_nodes(), dtype=torch.bool)
            src_need[:block.num_dst_nodes()] = compute  # SAGE's self term
            src_need[block.edges()[0].long()] = True  # sampled neighbours of computed nodes
            block.srcdata["need"] = src_need
            blocks.insert(0, block)
            seed_nodes, need = block.srcdata[dgl.NID], src_need
        return seed_nodes, output_nodes, blocks


class SAGE(nn.Module):
    """GraphSAGE-mean (``dgl.nn.SAGEConv``) over sampled blocks, or layer by layer on the whole graph."""

    def __init__(self, in_feats: int, hidden: int, n_classes: int, n_layers: int = 3):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [n_classes]
        self.layers = nn.ModuleList(SAGEConv(a, b, "mean") for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, blocks, x, caches: dict[int, HistoryCache] | None = None, keep_hidden: bool = False):
        """Logits of the output nodes; cached rows of h^l replaced by the cache (no gradient flows into them).
        ``keep_hidden``: also return [h^1, ..., h^{L-1}] (dst side, gradients retained) for admission."""
        h, hidden = x, []
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, (h, h[:block.num_dst_nodes()]))  # (n_dst, .)
            if i < len(self.layers) - 1:
                h = F.relu(h)
                level = i + 1
                if caches and level in caches:
                    cm = block.dstdata["cached"]
                    if bool(cm.any()):
                        stored = caches[level].read(block.dstdata[dgl.NID])
                        h = torch.where(cm[:, None], stored, h)
                if keep_hidden:
                    h.retain_grad()
                    hidden.append(h)
        return (h, hidden) if keep_hidden else h

    @torch.no_grad()
    def full_graph(self, g, X):
        """Exact inference with every neighbour (no sampling, no cache)."""
        h = X
        for i, layer in enumerate(self.layers):
            h = layer(g, h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h


@dataclass
class Policy:
    """One training arm. ``admit``: none | gradient | all | random; ``staleness`` in iterations.

    ``layout``: ``official`` (the public FreshGNN layout: the top hidden level h^{L-1} only, in a buffer of
    ``cache_budget`` x the raw-feature table's bytes that starts full of the hottest nodes' raw features, see
    ``SharedBufferCache``; no admission before ``warmup`` iterations) or ``all_levels`` (this repository's first
    version: a ``HistoryCache`` per hidden level, per-entry staleness, no raw-feature cache, no warm-up)."""

    name: str
    admit: str = "none"
    staleness: int = 0
    quantile: float = 0.5
    layout: str = "all_levels"
    warmup: int = 0
    cache_budget: float = 0.5


@dataclass
class Counters:
    feature_bytes: int = 0  # raw features fetched from the feature store
    feature_rows: int = 0
    cache_bytes: int = 0  # embeddings read from the cache
    cache_hits: int = 0
    computed: int = 0  # hidden-level rows computed (candidates for admission)
    admitted: int = 0
    iterations: int = 0
    cache_peak_rows: int = 0
    feature_cache_hits: int = 0  # raw-feature rows served by the official layout's feature cache
    static_cache_feature_bytes: int = 0  # what a static hot-feature cache of the same bytes alone would fetch
    feature_rows_cached_end: int = 0
    per_epoch_feature_bytes: list = field(default_factory=list)


def hot_order_by_degree(g) -> torch.Tensor:
    """Node ids in ascending hotness (in-degree; ties by id), the order of the official ``sorted_indices.dat`` read
    from its end (assumed degree-ranked)."""
    deg = g.in_degrees().to(torch.int64)
    return torch.as_tensor(np.lexsort((np.arange(len(deg)), deg.numpy())), dtype=torch.int64)


def train_sampled(model: SAGE, g, X, y, train_idx, policy: Policy, *, fanouts, batch_size: int, epochs: int, lr: float,
                  seed: int, on_epoch=None) -> Counters:
    """Mini-batch training with ``dgl.dataloading.DataLoader`` + ``CachedNeighborSampler`` under ``policy``.

    Fresh sampling is ``Policy('fresh')`` (no cache: the sampler then behaves exactly like NeighborSampler)."""
    L = len(model.layers)
    hid = model.layers[0].fc_neigh.out_features
    use_cache = policy.admit != "none" and policy.staleness > 0
    official = use_cache and policy.layout == "official"
    d = X.shape[1]
    hot = hot_order_by_degree(g)
    buffer_floats = int(policy.cache_budget * g.num_nodes() * d)
    static_hot = torch.zeros(g.num_nodes(), dtype=torch.bool)
    static_hot[hot[max(0, len(hot) - buffer_floats // d):]] = True
    if official:
        shared = SharedBufferCache(g.num_nodes(), hid, d, buffer_floats, hot, policy.staleness)
        caches = {L - 1: shared}
    elif use_cache:
        caches = {lvl: HistoryCache(g.num_nodes(), hid, policy.staleness) for lvl in range(1, L)}
    else:
        caches = {}
    sampler = CachedNeighborSampler(fanouts, caches)
    gen = torch.Generator().manual_seed(seed)
    loader = dgl.dataloading.DataLoader(g, train_idx, sampler, batch_size=batch_size, shuffle=True, drop_last=False,
                                        num_workers=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    c = Counters()
    it = 0
    for epoch in range(epochs):
        before = c.feature_bytes
        model.train()
        for caches_lvl in caches.values():
            caches_lvl.now = it + 1
        for input_nodes, output_nodes, blocks in loader:
            it += 1
            need = blocks[0].srcdata["need"]
            x = torch.zeros(len(input_nodes), d)
            x[need] = X[input_nodes[need]]  # raw features: from the store, or from the feature cache (same values)
            fetch = need
            if official:
                hit = need & shared.feature_hit(input_nodes)
                c.feature_cache_hits += int(hit.sum())
                c.cache_bytes += int(hit.sum()) * d * 4
                fetch = need & ~hit
            c.feature_rows += int(fetch.sum())
            c.feature_bytes += int(fetch.sum()) * d * X.element_size()
            c.static_cache_feature_bytes += int((need & ~static_hot[input_nodes]).sum()) * d * X.element_size()
            for b in blocks[:-1]:
                hits = int(b.dstdata["cached"].sum())
                c.cache_hits += hits
                c.cache_bytes += hits * hid * 4
            logits, hidden = model(blocks, x, caches, keep_hidden=True)
            loss = F.cross_entropy(logits, y[output_nodes])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if official:
                _admit_official(shared, policy, blocks[L - 2], hidden[L - 2], it - 1, gen, c)
                shared.now = it + 1
                c.cache_peak_rows = shared.emb_slots  # the whole buffer, in rows of h (its bytes are the budget)
                continue
            for lvl, cache in caches.items():
                b = blocks[lvl - 1]
                comp = b.dstdata["compute"]
                nodes = b.dstdata[dgl.NID][comp]
                h = hidden[lvl - 1][comp]
                c.computed += len(nodes)
                if policy.admit == "gradient":
                    gn = hidden[lvl - 1].grad[comp].norm(dim=1)
                    sel = admit_by_gradient(torch.arange(len(nodes)), gn, policy.quantile)
                elif policy.admit == "random":
                    k = int(round(policy.quantile * len(nodes)))  # the gradient rule's expected admission rate
                    sel = torch.randperm(len(nodes), generator=gen)[:k]
                else:  # all
                    sel = torch.arange(len(nodes))
                cache.admit(nodes[sel], h[sel])
                c.admitted += len(sel)
            it_next = it + 1
            for cache in caches.values():
                cache.now = it_next
                cache.evict()
            c.cache_peak_rows = max(c.cache_peak_rows, sum(cc.size() for cc in caches.values()))
        c.per_epoch_feature_bytes.append(c.feature_bytes - before)
        if on_epoch is not None:
            on_epoch(epoch, c)
    c.iterations = it
    if official:
        c.feature_rows_cached_end = shared.feature_rows_cached()
    model.eval()
    return c


def _admit_official(cache: SharedBufferCache, policy: Policy, block, h, glb_iter: int, gen, c: Counters) -> None:
    """Official ``update_history`` on the top hidden level: scores = ||dL/dh|| (gradient) or N(0, 1) draws (the
    official ``random`` method; ``all`` admits every uncached row); admit rows strictly below the batch
    ``quantile``-quantile of the scores that are not already cached; nothing before ``policy.warmup`` iterations
    (``start_history``, xxcclong/history-cache@bfef654 hiscache/history_cache.py:23,185; added in 87fe5e0)."""
    cached = block.dstdata["cached"]
    nodes = block.dstdata[dgl.NID]
    c.computed += int((~cached).sum())
    if glb_iter < policy.warmup:
        return
    cache.new_iteration(glb_iter)
    if policy.admit == "all":
        record = ~cached
    else:
        if policy.admit == "gradient":
            score = h.grad.norm(dim=1).double()
        else:
            score = torch.randn(len(nodes), generator=gen).double()
        record = (score < torch.quantile(score, policy.quantile)) & ~cached
    c.admitted += cache.admit(nodes[record], h[record])


def fresh_block_forward(model: SAGE, blocks, X, input_nodes):
    """Reference: the plain sampled forward on NeighborSampler blocks with every input feature fetched."""
    h = X[input_nodes]
    for i, (layer, block) in enumerate(zip(model.layers, blocks)):
        h = layer(block, (h, h[:block.num_dst_nodes()]))
        if i < len(model.layers) - 1:
            h = F.relu(h)
    return h


def accuracy(model: SAGE, g, X, y, idx) -> float:
    pred = model.full_graph(g, X).argmax(1)
    return float((pred[idx] == y[idx]).float().mean())


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    dgl.seed(seed)
