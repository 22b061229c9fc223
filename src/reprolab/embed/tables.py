"""Embedding-table compression methods compared by embcomp_bench (arXiv 2311.15578) and cafe (arXiv 2312.03256).

Every table is initialised at the same scale (rows uniform in +-``init_scale``; QR's two factors at
+-sqrt(init_scale)), so that no method gains from a different initialisation. Every table maps global feature ids ``x`` (B, F) to embeddings (B, F, d) and reports ``nbytes()``: the bytes of the
tensors a deployment stores (fp32 rows, int8/int4 codes plus scales, pruned values plus indices), computed from the
tensors' sizes. Budgets are expressed as compression ratios r: budget bytes = full-table bytes / r.

* :class:`FullEmbedding` -- one fp32 row per feature (the uncompressed baseline).
* :class:`HashEmbedding` -- the hashing trick: row h(x) of an m-row table (Weinberger et al. 2009).
* :class:`QREmbedding` -- quotient-remainder trick (Shi et al. 2020): E_q[x // m] * E_r[x % m] (element-wise product).
* :class:`MDEmbedding` -- mixed-dimension embeddings (Ginart et al. 2021): features in popularity blocks, block k has
  dim d_k (alpha-power rule d_k proportional to mean block frequency^alpha) and a d_k x d projection; blocks whose
  dim rounds to 0 map to the zero vector.
* :func:`quantize_table` -- post-training uniform symmetric quantization with one fp32 scale per row (int8/int4/int2).
* :class:`QATEmbedding` -- the same format trained quantization-aware (fake quant in the forward, straight-through
  gradient), at the widest bit-width that fits the budget.
* :func:`prune_table` -- post-training global magnitude pruning, stored as fp32 values + int32 flat indices (COO).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .cafe import universal_hash

FP32 = 4


def full_bytes(n_features: int, dim: int) -> int:
    return n_features * dim * FP32


def _uniform(rows: int, dim: int, g: torch.Generator, scale: float | None = None) -> nn.Parameter:
    scale = scale if scale is not None else 1.0 / math.sqrt(max(dim, 1))
    return nn.Parameter((torch.rand(rows, dim, generator=g) * 2 - 1) * scale)


class FullEmbedding(nn.Module):
    def __init__(self, n_features: int, dim: int, seed: int = 0, init_scale: float | None = None):
        super().__init__()
        self.dim = dim
        self.weight = _uniform(n_features, dim, torch.Generator().manual_seed(seed), init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight[x]

    def nbytes(self) -> int:
        return self.weight.numel() * FP32


class HashEmbedding(nn.Module):
    def __init__(self, n_features: int, dim: int, rows: int, seed: int = 0, init_scale: float | None = None):
        super().__init__()
        self.dim, self.rows, self.seed = dim, int(rows), seed
        self.weight = _uniform(self.rows, dim, torch.Generator().manual_seed(seed), init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight[universal_hash(x, self.rows, self.seed + 1)]

    def nbytes(self) -> int:
        return self.weight.numel() * FP32


class QREmbedding(nn.Module):
    """E(x) = E_q[x // m] * E_r[x % m]; rows = m + ceil(N / m) (the paper's 'mult' operation)."""

    def __init__(self, n_features: int, dim: int, m: int, seed: int = 0, init_scale: float | None = None):
        super().__init__()
        self.dim, self.m = dim, int(m)
        g = torch.Generator().manual_seed(seed)
        # both factors at sqrt(init_scale), so the product has the same scale as the other tables' rows
        sq = math.sqrt(init_scale) if init_scale is not None else 1.0 / math.sqrt(math.sqrt(dim))
        self.q = _uniform(math.ceil(n_features / self.m), dim, g, scale=sq)
        self.r = _uniform(self.m, dim, g, scale=sq)

    @staticmethod
    def m_for_rows(n_features: int, rows: float) -> int | None:
        """Largest remainder size m with m + ceil(N/m) <= rows (None when even m = sqrt(N) does not fit)."""
        disc = rows * rows - 4 * n_features
        if disc < 0:
            return None
        m = int((rows + math.sqrt(disc)) / 2)
        while m > 1 and m + math.ceil(n_features / m) > rows:
            m -= 1
        return m if m + math.ceil(n_features / m) <= rows else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q[x // self.m] * self.r[x % self.m]

    def nbytes(self) -> int:
        return (self.q.numel() + self.r.numel()) * FP32


class MDEmbedding(nn.Module):
    """Mixed dimensions by popularity block (see module docstring). ``rank`` maps a feature to its popularity rank
    (0 = most frequent, from training counts); block k holds ranks [bounds[k], bounds[k+1])."""

    def __init__(self, n_features: int, dim: int, rank: np.ndarray, bounds: list[int], dims: list[int], seed: int = 0,
                 init_scale: float | None = None):
        super().__init__()
        self.dim, self.bounds, self.dims = dim, list(bounds), list(dims)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rank", torch.as_tensor(rank, dtype=torch.int64), persistent=False)
        self.tables = nn.ParameterList()
        self.projs = nn.ParameterList()
        for k, dk in enumerate(dims):
            n_k = bounds[k + 1] - bounds[k]
            self.tables.append(_uniform(n_k if dk else 0, dk, g, init_scale))
            self.projs.append(nn.Parameter(torch.randn(dk, dim, generator=g) / math.sqrt(max(dk, 1)) if dk
                                           else torch.zeros(0, dim)))

    @staticmethod
    def plan(counts: np.ndarray, dim: int, budget_bytes: float, n_blocks: int = 4, alpha: float = 0.3):
        """Popularity ranks, geometric block bounds and alpha-rule dims scaled to fit ``budget_bytes``.

        d_k = min(dim, floor(lam * f_k^alpha)) with f_k the mean count of block k; lam is the largest value (bisection)
        whose table + projection bytes fit the budget; then single dims are added greedily while they still fit."""
        n = len(counts)
        order = np.lexsort((np.arange(n), -counts))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        edges = np.unique(np.round(np.geomspace(max(1, n / 4 ** (n_blocks - 1) / 2), n, n_blocks)).astype(int))
        bounds = [0] + [int(e) for e in edges]
        bounds[-1] = n
        f = np.array([max(counts[order[bounds[k]:bounds[k + 1]]].mean(), 1e-9) for k in range(len(bounds) - 1)])

        def dims_for(lam):
            return [int(min(dim, math.floor(lam * fk ** alpha))) for fk in f]

        def cost(d):
            return sum(((bounds[k + 1] - bounds[k]) * dk + dk * dim) * FP32 for k, dk in enumerate(d))

        lo, hi = 0.0, 1e6
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(dims_for(mid)) <= budget_bytes else (lo, mid)
        d = dims_for(lo)
        changed = True
        while changed:  # spend what rounding left: +1 dim where it still fits, keeping dims non-increasing
            changed = False
            for k in range(len(d)):
                if d[k] < dim and (k == 0 or d[k] < d[k - 1]):
                    trial = d[:k] + [d[k] + 1] + d[k + 1:]
                    if cost(trial) <= budget_bytes:
                        d, changed = trial, True
        return rank, bounds, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank[x]  # (B, F)
        out = torch.zeros(*x.shape, self.dim)
        for k, dk in enumerate(self.dims):
            if not dk:
                continue
            m = (r >= self.bounds[k]) & (r < self.bounds[k + 1])
            out = out.index_put((m,), self.tables[k][r[m] - self.bounds[k]] @ self.projs[k])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.tables) * FP32 + sum(p.numel() for p in self.projs) * FP32


class QuantizedEmbedding(nn.Module):
    """Row-wise symmetric uniform quantization of a trained table: codes in [-(2^(b-1)-1), 2^(b-1)-1], one fp32
    scale per row; stored bytes = N d b / 8 + 4 N (codes packed at b bits)."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.bits, self.dim = int(bits), weight.shape[1]
        qmax = 2 ** (bits - 1) - 1
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
        self.register_buffer("codes", torch.round(weight / scale).clamp(-qmax, qmax).to(torch.int8))
        self.register_buffer("scale", scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes[x].float() * self.scale[x]

    def nbytes(self) -> int:
        n, d = self.codes.shape
        return math.ceil(n * d * self.bits / 8) + n * FP32


def quantize_table(weight: torch.Tensor, budget_bytes: float, bits_options=(8, 4, 2)) -> QuantizedEmbedding | None:
    """The widest bit-width whose quantized table fits the budget (None if even the narrowest does not)."""
    n, d = weight.shape
    for b in bits_options:
        if math.ceil(n * d * b / 8) + n * FP32 <= budget_bytes:
            return QuantizedEmbedding(weight.detach(), b)
    return None


def quant_bits_for(n: int, d: int, budget_bytes: float, bits_options=(8, 4, 2)) -> int | None:
    """The widest bit-width whose row-wise quantized table (codes + one fp32 scale per row) fits the budget."""
    for b in bits_options:
        if math.ceil(n * d * b / 8) + n * FP32 <= budget_bytes:
            return b
    return None


class QATEmbedding(nn.Module):
    """Quantization-aware training of a full table: fp32 master rows during training, and every lookup returns the
    row-wise symmetric ``bits``-bit quantized row (the :class:`QuantizedEmbedding` format: one fp32 scale per row,
    absmax / q_max) with a straight-through gradient (d out / d w = identity). Its forward is exactly the deployed
    table's, so evaluating the trained module is evaluating :meth:`export`; ``nbytes`` counts the deployed codes and
    scales (the fp32 master copy exists only during training)."""

    def __init__(self, n_features: int, dim: int, bits: int, seed: int = 0, init_scale: float | None = None):
        super().__init__()
        self.n_features, self.dim, self.bits = n_features, dim, int(bits)
        self.weight = _uniform(n_features, dim, torch.Generator().manual_seed(seed), init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[x]
        qmax = 2 ** (self.bits - 1) - 1
        with torch.no_grad():
            scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
            q = torch.round(w / scale).clamp(-qmax, qmax) * scale
        return q + (w - w.detach())  # value q exactly, gradient straight through to w

    def export(self) -> "QuantizedEmbedding":
        return QuantizedEmbedding(self.weight.detach(), self.bits)

    def nbytes(self) -> int:
        return math.ceil(self.n_features * self.dim * self.bits / 8) + self.n_features * FP32


class PrunedEmbedding(nn.Module):
    """Global magnitude pruning: keep the ``nnz`` largest |w|, stored as fp32 values + int32 flat indices."""

    def __init__(self, weight: torch.Tensor, nnz: int):
        super().__init__()
        self.shape = tuple(weight.shape)
        flat = weight.detach().reshape(-1)
        keep = torch.sort(torch.topk(flat.abs(), int(nnz), sorted=True).indices).values
        self.register_buffer("index", keep.to(torch.int32))
        self.register_buffer("values", flat[keep].clone())

    def dense(self) -> torch.Tensor:
        w = torch.zeros(self.shape[0] * self.shape[1])
        w[self.index.long()] = self.values
        return w.reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """COO lookup: binary search of the flat positions x*d + j in the sorted index (absent = pruned = 0)."""
        d = self.shape[1]
        q = (x.unsqueeze(-1) * d + torch.arange(d)).to(torch.int32)  # (B, F, d)
        pos = torch.searchsorted(self.index, q).clamp(max=self.index.numel() - 1)
        return torch.where(self.index[pos] == q, self.values[pos], 0.0)

    def nbytes(self) -> int:
        return self.values.numel() * FP32 + self.index.numel() * 4


def prune_table(weight: torch.Tensor, budget_bytes: float) -> PrunedEmbedding | None:
    nnz = int(budget_bytes // 8)
    return PrunedEmbedding(weight, nnz) if nnz >= 1 else None
