"""CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models
(Zhang et al., SIGMOD 2024, arXiv 2312.03256). A port of the official HotSketch, HugoZHL/CAFE @c757c39
``ArtifactEvaluation/embeddings/sketch.cpp`` (class ``SS``), and of its use in ``sk_embedding_bag.py`` /
``init_embed.py`` / ``main.py``; line numbers below refer to that commit.

* :class:`HotSketch` -- ``n_buckets`` buckets of ``slots`` (4) slots, each (feature id, score, hot-row id). The
  update is the official one, **occurrence by occurrence in batch order** (``SS::Insert``, sketch.cpp:89-125):
  - if x is in its bucket (a slot with a nonzero score and id x): score += s; if the score reaches the threshold k,
    x is not hot yet and a free hot id remains, x is promoted to the hot id at the front of the FIFO queue
    (sketch.cpp:93-103); the slot then bubbles towards the front while its score exceeds its left neighbour's, so a
    bucket is kept sorted by score, descending (sketch.cpp:104-109);
  - else, if a slot is empty (score 0), x takes it with score s (sketch.cpp:113-119) -- a newcomer is never promoted
    at its first occurrence;
  - else, if the **last** slot is not hot, x replaces its id and inherits its score (score += s, SpaceSaving-style)
    (sketch.cpp:120-123); if the last slot is hot, the occurrence is dropped. The last slot is not re-sorted.
  - decay (``SS::decay``, sketch.cpp:76-88): at the start of each batch call (``batch_insert_val``, sketch.cpp:144),
    if the mass inserted since the last decay exceeds ``n_buckets * k * 10``, every hot feature whose decayed score
    falls below k is demoted (its hot id goes to the back of the queue), every score is multiplied by ``decay``.
* :class:`CafeEmbedding` -- hot features own a row of the hot table, the others share rows of a hash table
  (Sec. 4.1). After ``backward`` and **before** the optimizer step (main.py:375-377), each field's occurrences are
  inserted into the one shared sketch, field by field (init_embed.py:229-233), with score = the L2 norm of the
  occurrence's embedding gradient normalised per field to mean 1 (sk_embedding_bag.py:155-161); a promoted feature's
  hot row starts as a copy of its own hash row (the official sk_embedding_bag.py:178-180 copies
  ``weight_hash[input % hash_size]`` without the field offset that its lookup adds, so there the copied row is generally
  another bucket's: a quirk not ported, see the paper's deviations). Multi-level hash embedding (Sec. 4.4,
  ``levels=2``, full profile only): non-hot features with score >= ``medium_threshold`` use the sum of two hash rows.

Routing reads the hot-row id stored in the sketch; :attr:`CafeEmbedding.route_hot` is a per-feature copy of it
(updated at every promotion and demotion, checked against a bucket scan by the tests), so a lookup is one gather.
The sketch's bytes count in :meth:`CafeEmbedding.nbytes` (12 bytes per slot: id, score, hot-row id, as the official
``Bucket``, sketch.cpp:16-20).
"""
from __future__ import annotations

import time
from collections import deque

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
    """The official HotSketch (module docstring). Ids are int >= 0; -1 marks an empty slot / a non-hot slot.

    ``threshold``: the hot threshold k (None: never promote, never decay; a plain heavy-hitter sketch).
    ``n_hot``: hot rows that promotions can hand out (the official queue ``hot_id``)."""

    BYTES_PER_SLOT = 12  # int32 id + float32 score + int32 hot-row id (the official Bucket: val, cnt, dic)

    def __init__(self, n_buckets: int, slots: int = 4, decay: float = 1.0, seed: int = 0,
                 threshold: float | None = None, n_hot: int = 0):
        self.n_buckets, self.slots, self.decay, self.seed = int(n_buckets), int(slots), float(decay), seed
        self.threshold = threshold
        self._val = [[-1] * self.slots for _ in range(self.n_buckets)]
        self._cnt = [[0.0] * self.slots for _ in range(self.n_buckets)]
        self._dic = [[-1] * self.slots for _ in range(self.n_buckets)]
        self.free = deque(range(int(n_hot)))  # FIFO, as the official queue<uint32_t> hot_id
        self.mass = 0.0  # importance inserted since the last decay (the official `tot`)
        self.decays = 0

    # numpy views of the state (copies), for tests and reports
    @property
    def ids(self) -> np.ndarray:
        return np.array(self._val, dtype=np.int64).reshape(self.n_buckets, self.slots)

    @property
    def score(self) -> np.ndarray:
        return np.array(self._cnt, dtype=np.float64).reshape(self.n_buckets, self.slots)

    @property
    def hot(self) -> np.ndarray:
        return np.array(self._dic, dtype=np.int64).reshape(self.n_buckets, self.slots)

    def nbytes(self) -> int:
        return self.n_buckets * self.slots * self.BYTES_PER_SLOT

    def bucket(self, x: np.ndarray) -> np.ndarray:
        return universal_hash(np.asarray(x, dtype=np.int64), self.n_buckets, self.seed)

    def query(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, hot-row id) per id, by a scan of its bucket (``SS::query``); 0 and -1 for ids not tracked."""
        x = np.asarray(x, dtype=np.int64).ravel()
        uniq, inv = np.unique(x, return_inverse=True)
        s, h = np.zeros(len(uniq)), np.full(len(uniq), -1, dtype=np.int64)
        for n, (xi, b) in enumerate(zip(uniq.tolist(), self.bucket(uniq).tolist())):
            vals, cnts = self._val[b], self._cnt[b]
            for j in range(self.slots):
                if cnts[j] != 0 and vals[j] == xi:
                    s[n], h[n] = cnts[j], self._dic[b][j]
                    break
        return s[inv], h[inv]

    def maybe_decay(self) -> list[tuple[int, int]]:
        """The official trigger (``if (tot > s * k * 10) decay();``): the (id, hot row) pairs demoted."""
        if self.threshold is None or self.mass <= self.n_buckets * self.threshold * 10:
            return []
        return self.decay_now()

    def decay_now(self) -> list[tuple[int, int]]:
        """``SS::decay``: demote hot features whose decayed score is below the threshold, scale every score."""
        out, k, dr = [], self.threshold, self.decay
        for vals, cnts, dics in zip(self._val, self._cnt, self._dic):
            for j in range(self.slots):
                if dics[j] >= 0 and k is not None and cnts[j] * dr < k:
                    out.append((vals[j], dics[j]))
                    self.free.append(dics[j])
                    dics[j] = -1
                cnts[j] *= dr
        self.mass = 0.0
        self.decays += 1
        return out

    def insert(self, x: np.ndarray, s: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """One official ``batch_insert_val`` call: a decay check, then ``SS::Insert`` for each occurrence in order.

        Returns (demoted (id, row) pairs, promotions as (position in the batch, id, row))."""
        demoted = self.maybe_decay()
        x = np.asarray(x, dtype=np.int64).ravel()
        keys = self.bucket(x).tolist()
        k = self.threshold
        last = self.slots - 1
        free, V, C, D = self.free, self._val, self._cnt, self._dic
        promoted = []
        mass = 0.0
        for pos, (xi, b, v) in enumerate(zip(x.tolist(), keys, np.asarray(s, dtype=np.float64).ravel().tolist())):
            mass += v
            vals, cnts = V[b], C[b]
            try:
                i = vals.index(xi)
            except ValueError:
                i = -1
            if i >= 0 and cnts[i] == 0:  # an emptied slot with a stale id (score exactly 0): not a match
                i = -1
                for j in range(self.slots):
                    if cnts[j] != 0 and vals[j] == xi:
                        i = j
                        break
            if i >= 0:
                dics = D[b]
                cnts[i] += v
                if k is not None and cnts[i] >= k and free and dics[i] < 0:
                    dics[i] = free.popleft()
                    promoted.append((pos, xi, dics[i]))
                while i and cnts[i] > cnts[i - 1]:
                    cnts[i], cnts[i - 1] = cnts[i - 1], cnts[i]
                    vals[i], vals[i - 1] = vals[i - 1], vals[i]
                    dics[i], dics[i - 1] = dics[i - 1], dics[i]
                    i -= 1
                continue
            for j in range(self.slots):
                if cnts[j] == 0:
                    cnts[j], vals[j] = v, xi
                    break
            else:
                if D[b][last] < 0:
                    cnts[last] += v
                    vals[last] = xi
        self.mass += mass
        return demoted, promoted

    def set_hot(self, x: np.ndarray, rows: np.ndarray) -> None:
        """Mark tracked ids hot with the given rows (tests)."""
        for xi, r in zip(np.asarray(x).ravel().tolist(), np.asarray(rows).ravel().tolist()):
            b = int(self.bucket(np.int64(xi)))
            j = self._val[b].index(xi)
            self._dic[b][j] = int(r)

    def top(self, k: int) -> np.ndarray:
        """The k ids with the largest scores (ties broken by id), the sketch's heavy-hitter report."""
        flat_ids, flat_s = self.ids.ravel(), self.score.ravel()
        keep = flat_s != 0
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
        self.sketch = HotSketch(n_buckets, slots, decay, seed, threshold=hot_threshold, n_hot=self.n_hot)
        self.route_hot = np.full(n_features, -1, dtype=np.int64)  # feature -> hot row (a copy of the sketch's dic)
        self.row_owner = np.full(max(self.n_hot, 1), -1, dtype=np.int64)  # hot row -> feature (bookkeeping only)
        self._last = None
        self.migrations = 0  # promotions into the hot table
        self.demotions = 0
        self.sketch_seconds = 0.0  # wall clock spent in insert_grad (timings only, never metrics)

    @property
    def free_rows(self) -> deque:
        return self.sketch.free

    def nbytes(self) -> int:
        return (self.n_hot + self.n_hash) * self.dim * 4 + self.sketch.nbytes()

    def route(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hot row or -1, hash row 1, hash row 2 or -1) per id."""
        hot = self.route_hot[ids]
        h1 = universal_hash(ids, self.n_hash, self.seed + 1)
        h2 = np.full_like(h1, -1)
        if self.levels >= 2:
            score, _ = self.sketch.query(ids)
            medium = (hot < 0) & (score >= self.medium_threshold)
            h2 = np.where(medium, universal_hash(ids, self.n_hash, self.seed + 2), -1)
        return hot, h1, h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F) global ids -> (B, F, d)
        ids = x.reshape(-1).numpy()
        hot, h1, h2 = (torch.from_numpy(a) for a in self.route(ids))
        e = self.hash_weight[h1]
        if self.levels >= 2:
            e = e + torch.where((h2 >= 0).unsqueeze(1), self.hash_weight[h2.clamp(min=0)], 0.0)
        e = torch.where((hot >= 0).unsqueeze(1), self.hot_weight[hot.clamp(min=0)], e)  # (B*F, d)
        e = e.reshape(*x.shape, self.dim)
        if self.training and e.requires_grad:
            e.retain_grad()
            self._last = (x.numpy(), e)
        return e

    @torch.no_grad()
    def after_backward(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``insert_grad`` (called between backward and the optimizer step): per field, scores from the last
        forward's embedding gradients, one sketch batch call, demotions and promotions."""
        if self._last is None or self._last[1].grad is None:
            return
        t0 = time.perf_counter()
        x, e = self._last
        self._last = None
        gn = e.grad.norm(dim=-1).double().numpy()  # (B, F) per-occurrence gradient L2 norm
        if x.ndim == 1:
            x, gn = x[:, None], gn[:, None]
        for f in range(x.shape[1]):
            g = gn[:, f]
            tot = g.sum()
            s = g * len(g) / tot if tot > 0 else np.zeros_like(g)  # sk_embedding_bag.py:161 (0/0 -> no score)
            demoted, promoted = self.sketch.insert(x[:, f], s)
            for xi, r in demoted:
                self.route_hot[xi] = -1
                self.row_owner[r] = -1
                self.demotions += 1
            if promoted:
                self._promote(np.array([p[1] for p in promoted], dtype=np.int64),
                              np.array([p[2] for p in promoted], dtype=np.int64), optimizer)
        self.sketch_seconds += time.perf_counter() - t0

    def _promote(self, xs: np.ndarray, rs: np.ndarray, optimizer) -> None:
        self.route_hot[xs] = rs
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
    ids, score, hot = sk.ids, sk.score, sk.hot
    out = torch.zeros(*x.shape, emb.dim)
    for idx in np.ndindex(*x.shape):
        xi = int(x[idx])
        b = int(universal_hash(np.int64(xi), sk.n_buckets, sk.seed))
        hot_row, sc = -1, 0.0
        for j in range(sk.slots):
            if score[b, j] != 0 and ids[b, j] == xi:
                hot_row, sc = int(hot[b, j]), float(score[b, j])
        if hot_row >= 0:
            out[idx] = emb.hot_weight.data[hot_row]
            continue
        v = emb.hash_weight.data[int(universal_hash(np.int64(xi), emb.n_hash, emb.seed + 1))].clone()
        if emb.levels >= 2 and sc >= emb.medium_threshold:
            v += emb.hash_weight.data[int(universal_hash(np.int64(xi), emb.n_hash, emb.seed + 2))]
        out[idx] = v
    return out
