"""CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models
(Zhang et al., SIGMOD 2024, arXiv 2312.03256). Semantics follow the official HotSketch, HugoZHL/CAFE
``ArtifactEvaluation/embeddings/sketch.cpp`` (class ``SS``) and ``sk_embedding_bag.py``.

* :class:`HotSketch` -- the paper's sketch (Sec. 4.2): ``n_buckets`` buckets of ``slots`` slots, each slot holding
  (feature id, importance score, hot-row id). Insert(x, s) (``SS::Insert``): if x is in its bucket, score += s; else
  fill an empty slot with score s; else, if the slot with the smallest score is **not hot**, x replaces it and
  inherits its score (s_min + s, SpaceSaving-style, which gives the heavy-hitter guarantee); a hot slot is never
  evicted by a newcomer (``if (!bucket[key].dic[3])``). Decay (Sec. 4.3, ``SS::decay``): when the importance mass
  inserted since the last decay exceeds ``n_buckets * threshold * 10`` (checked at the start of a batch, as
  ``batch_insert_val`` does), every score is multiplied by ``decay`` and a hot feature whose decayed score falls
  below ``threshold`` is demoted (its hot row is freed).
* :class:`CafeEmbedding` -- hot features own a unique row of the hot table; the others share rows of a hash table
  (Sec. 4.1). The importance score of a feature occurrence is the L2 norm of the gradient of its embedding,
  normalised so the batch's scores average 1 (``sk_embedding_bag.py``: ``grad_norm * N / sum(grad_norm)``).
  Migration (Sec. 4.3): a feature already in the sketch whose score reaches ``hot_threshold`` is promoted while free
  hot rows remain (``SS::Insert``: ``cnt >= k && !hot_id.empty() && !dic``); its hot row starts as a copy of its
  hash row (``insert_grad``: ``weight_h[dic[x]] = weight_hash[...]``). No forced swaps: a full hot table admits a
  feature only after a demotion frees a row. Multi-level hash embedding (Sec. 4.4, ``levels=2``): non-hot features
  with score >= ``medium_threshold`` (medium features) are the sum of two hash rows, cold features use one.

Routing goes through the sketch (the hot-row id is stored in the slot), so the sketch is the only index and its
bytes count in :meth:`CafeEmbedding.nbytes` (12 bytes per slot: id, score, hot-row id, as the official ``Bucket``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

P31 = 2_147_483_647  # 2^31 - 1, prime modulus for the universal hashes


def universal_hash(x: np.ndarray | torch.Tensor, m: int, seed: int):
    """h(x) = ((a x + b) mod p) mod m with (a, b) fixed by ``seed`` (Carter-Wegman). Works on numpy and torch."""
    rng = np.random.default_rng(10_007 + seed)
    a, b = int(rng.integers(1, P31)), int(rng.integers(0, P31))
    return ((x * a + b) % P31) % m


class HotSketch:
    """Bucketed top-k sketch of importance scores (see module docstring). Ids are int >= 0; -1 marks an empty slot.

    ``threshold``: the hot threshold k, used by the mass-triggered decay (None: never decay)."""

    BYTES_PER_SLOT = 12  # int32 id + float32 score + int32 hot-row id (the official Bucket: val, cnt, dic)

    def __init__(self, n_buckets: int, slots: int = 4, decay: float = 1.0, seed: int = 0,
                 threshold: float | None = None):
        self.n_buckets, self.slots, self.decay, self.seed = int(n_buckets), int(slots), float(decay), seed
        self.threshold = threshold
        self.ids = np.full((self.n_buckets, self.slots), -1, dtype=np.int64)
        self.score = np.zeros((self.n_buckets, self.slots), dtype=np.float64)
        self.hot = np.full((self.n_buckets, self.slots), -1, dtype=np.int64)
        self.mass = 0.0  # importance inserted since the last decay (the official `tot`)
        self.decays = 0

    def nbytes(self) -> int:
        return self.n_buckets * self.slots * self.BYTES_PER_SLOT

    def bucket(self, x: np.ndarray) -> np.ndarray:
        return universal_hash(np.asarray(x, dtype=np.int64), self.n_buckets, self.seed)

    def locate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket, slot, found) for each id; slot is meaningless where not found."""
        x = np.asarray(x, dtype=np.int64)
        bk = self.bucket(x)
        match = self.ids[bk] == x[:, None]  # (n, slots)
        return bk, match.argmax(1), match.any(1)

    def query(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, hot-row id) per id; score 0 and hot -1 for ids not in the sketch."""
        bk, sl, found = self.locate(x)
        return (np.where(found, self.score[bk, sl], 0.0), np.where(found, self.hot[bk, sl], -1))

    def maybe_decay(self) -> list[int]:
        """The official trigger (``if (tot > s * k * 10) decay();``): returns the hot rows freed by demotion."""
        if self.threshold is None or self.mass <= self.n_buckets * self.threshold * 10:
            return []
        return self.decay_now()

    def decay_now(self) -> list[int]:
        """``SS::decay``: demote hot features whose decayed score is below the threshold, scale every score."""
        freed = []
        if self.threshold is not None:
            demote = (self.hot >= 0) & (self.score * self.decay < self.threshold)
            freed = self.hot[demote].tolist()
            self.hot[demote] = -1
        self.score *= self.decay
        self.mass = 0.0
        self.decays += 1
        return freed

    def insert(self, x: np.ndarray, s: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Insert a batch of (id, score) pairs (duplicates summed first; absent ids in increasing id order).

        Returns (hot rows freed by a decay triggered at the start of the batch, the ids that entered the sketch in
        this batch with a single occurrence). A decay runs *before* the batch, as in the official
        ``batch_insert_val``. The official code inserts occurrence by occurrence, so a newcomer's second occurrence in
        the same batch already finds it (and may promote it); a newcomer seen once cannot be promoted before its next
        batch: the second return value lists those."""
        freed = self.maybe_decay()
        x = np.asarray(x, dtype=np.int64)
        uniq, inv, occ = np.unique(x, return_inverse=True, return_counts=True)
        tot = np.bincount(inv, weights=np.asarray(s, dtype=np.float64), minlength=len(uniq))
        self.mass += float(tot.sum())
        bk, sl, found = self.locate(uniq)
        np.add.at(self.score, (bk[found], sl[found]), tot[found])
        new = []
        ids, score, hot = self.ids, self.score, self.hot
        for xi, si, b, o in zip(uniq[~found].tolist(), tot[~found].tolist(), bk[~found].tolist(),
                                occ[~found].tolist()):
            row = ids[b]
            empty = np.flatnonzero(row < 0)
            if len(empty):
                j, base = int(empty[0]), 0.0
            else:
                j = int(score[b].argmin())
                if hot[b, j] >= 0:  # a hot slot is never evicted by a newcomer: the newcomer is dropped
                    continue
                base = float(score[b, j])
            ids[b, j], score[b, j], hot[b, j] = xi, base + si, -1
            if o == 1:
                new.append(xi)
        return freed, np.asarray(new, dtype=np.int64)

    def set_hot(self, x: np.ndarray, rows: np.ndarray) -> None:
        bk, sl, found = self.locate(x)
        assert found.all(), "only ids in the sketch can be hot"
        self.hot[bk, sl] = rows

    def top(self, k: int) -> np.ndarray:
        """The k ids with the largest scores (ties broken by id), the sketch's heavy-hitter report."""
        flat_ids, flat_s = self.ids.ravel(), self.score.ravel()
        keep = flat_ids >= 0
        order = np.lexsort((flat_ids[keep], -flat_s[keep]))
        return flat_ids[keep][order[:k]]


class CafeEmbedding(nn.Module):
    """Hot table (``n_hot`` x d) + hash table (``n_hash`` x d), routed by a :class:`HotSketch` (module docstring)."""

    def __init__(self, n_features: int, dim: int, n_hot: int, n_hash: int, n_buckets: int, slots: int = 4,
                 hot_threshold: float = 1.0, decay: float = 0.99, levels: int = 1, medium_threshold: float = 0.5,
                 init_scale: float | None = None, seed: int = 0):
        super().__init__()
        self.n_features, self.dim, self.n_hot, self.n_hash = n_features, dim, int(n_hot), int(n_hash)
        self.hot_threshold, self.levels, self.medium_threshold = hot_threshold, int(levels), medium_threshold
        self.seed = seed
        scale = init_scale if init_scale is not None else 1.0 / np.sqrt(dim)
        g = torch.Generator().manual_seed(seed)
        self.hot_weight = nn.Parameter((torch.rand(max(self.n_hot, 1), dim, generator=g) * 2 - 1) * scale)
        self.hash_weight = nn.Parameter((torch.rand(self.n_hash, dim, generator=g) * 2 - 1) * scale)
        self.sketch = HotSketch(n_buckets, slots, decay, seed, threshold=hot_threshold)
        self.free_rows = list(range(self.n_hot))[::-1]  # stack; pop() gives the lowest free row
        self.row_owner = np.full(max(self.n_hot, 1), -1, dtype=np.int64)  # hot row -> feature (bookkeeping only)
        self._last = None
        self.migrations = 0  # promotions into the hot table
        self.demotions = 0

    def nbytes(self) -> int:
        return (self.n_hot + self.n_hash) * self.dim * 4 + self.sketch.nbytes()

    def route(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hot row or -1, hash row 1, hash row 2 or -1) per id, read from the sketch."""
        score, hot = self.sketch.query(ids)
        h1 = universal_hash(ids, self.n_hash, self.seed + 1)
        h2 = np.full_like(h1, -1)
        if self.levels >= 2:
            medium = (hot < 0) & (score >= self.medium_threshold)
            h2 = np.where(medium, universal_hash(ids, self.n_hash, self.seed + 2), -1)
        return hot, h1, h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F) global ids -> (B, F, d)
        ids = x.reshape(-1).numpy()
        hot, h1, h2 = (torch.from_numpy(a) for a in self.route(ids))
        is_hot = (hot >= 0).unsqueeze(1)
        e_hash = self.hash_weight[h1] + torch.where((h2 >= 0).unsqueeze(1), self.hash_weight[h2.clamp(min=0)], 0.0)
        e = torch.where(is_hot, self.hot_weight[hot.clamp(min=0)], e_hash)  # (B*F, d)
        e = e.reshape(*x.shape, self.dim)
        if self.training and e.requires_grad:
            e.retain_grad()
            self._last = (ids, e)
        return e

    @torch.no_grad()
    def after_backward(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Importance scores from the last forward's embedding gradients, then sketch update and migration."""
        if self._last is None or self._last[1].grad is None:
            return
        ids, e = self._last
        self._last = None
        gn = e.grad.reshape(-1, self.dim).norm(dim=1).double().numpy()  # per-occurrence gradient L2 norm
        tot = gn.sum()
        s = gn * len(gn) / tot if tot > 0 else np.ones_like(gn)  # normalised: mean 1 per occurrence
        freed, new = self.sketch.insert(ids, s)
        for r in freed:  # demoted by the decay: the row goes back to the free list
            self._free(int(r))
        if self.n_hot:
            cand = np.unique(ids)
            self._migrate(cand[~np.isin(cand, new)], optimizer)

    def _free(self, r: int) -> None:
        self.row_owner[r] = -1
        self.free_rows.append(r)
        self.demotions += 1

    def _migrate(self, cand: np.ndarray, optimizer) -> None:
        """Promote the candidates (ids of this batch, except newcomers seen once) whose score reached the
        threshold, best first, while free hot rows remain."""
        if not self.free_rows or not len(cand):
            return
        score, hot = self.sketch.query(cand)
        want = (hot < 0) & (score >= self.hot_threshold)
        cand, cs = cand[want], score[want]
        if not len(cand):
            return
        order = np.lexsort((cand, -cs))[:len(self.free_rows)]
        xs = cand[order].astype(np.int64)
        rs = np.array([self.free_rows.pop() for _ in range(len(xs))], dtype=np.int64)
        self.sketch.set_hot(xs, rs)
        self.row_owner[rs] = xs
        h1 = torch.from_numpy(universal_hash(xs, self.n_hash, self.seed + 1))
        rt = torch.from_numpy(rs)
        self.hot_weight.data[rt] = self.hash_weight.data[h1]  # migration: start from the shared hash row
        if optimizer is not None:  # a new owner must not inherit the previous owner's Adam moments
            st = optimizer.state.get(self.hot_weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][rt] = 0.0
        self.migrations += len(xs)

    def hot_features(self) -> np.ndarray:
        return np.sort(self.row_owner[self.row_owner >= 0])


def naive_cafe_lookup(emb: CafeEmbedding, x: torch.Tensor) -> torch.Tensor:
    """Reference lookup: a Python loop over ids with an explicit scan of the sketch bucket (used by the tests)."""
    sk = emb.sketch
    out = torch.zeros(*x.shape, emb.dim)
    for idx in np.ndindex(*x.shape):
        xi = int(x[idx])
        b = int(universal_hash(np.int64(xi), sk.n_buckets, sk.seed))
        hot_row, score = -1, 0.0
        for j in range(sk.slots):
            if sk.ids[b, j] == xi:
                hot_row, score = int(sk.hot[b, j]), float(sk.score[b, j])
        if hot_row >= 0:
            out[idx] = emb.hot_weight.data[hot_row]
            continue
        v = emb.hash_weight.data[int(universal_hash(np.int64(xi), emb.n_hash, emb.seed + 1))].clone()
        if emb.levels >= 2 and score >= emb.medium_threshold:
            v += emb.hash_weight.data[int(universal_hash(np.int64(xi), emb.n_hash, emb.seed + 2))]
        out[idx] = v
    return out
