"""Architecture samplers for weight-sharing supernets.

A *space* is a dict ``name -> list of choice lists`` (one choice list per position), e.g. ``ElasticCNN.space()``
= {"d": [[1, 2, 3]] * stages, "e": [[2, 3, 4]] * blocks, "ks": ..., "w": ...}; a *config* is a dict ``name -> list
of chosen values``. Any transformer space of the same shape works (e.g. {"d": [[2, 3, 4]], "heads": [[2, 4]] * L}).
All randomness comes from a ``numpy.random.Generator``.

* :func:`uniform`  independent uniform choice at every position (OFA ``sample_active_subnet``; SPOS uniform paths).
* :func:`sandwich` [max, min, n random] (BigNAS "sandwich rule"; AttentiveNAS ``num_arch_training``).
* :class:`BinnedSampler` complexity-binned sampling: draw a bin (uniform or from given / learned probabilities, as
  ShiftNAS), then an architecture in the bin by rejection from :func:`uniform` (AttentiveNAS ``sample_active_subnet
  _within_range``) or uniformly from a pool grouped by bin (``mode="per_bin"``).
* :class:`ImportanceSampler` importance sampling over a finite set of paths with given weights (PA&DA: weights =
  normalised gradient norms); returns the unbiasing weights 1 / (N p_i).
* :func:`enumerate_space` every config of a tiny space (exact distributions for tests).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

Space = dict[str, list[list]]


def uniform(space: Space, rng: np.random.Generator) -> dict:
    """One config: an independent uniform choice at every position."""
    return {k: [c[int(rng.integers(len(c)))] for c in choices] for k, choices in space.items()}


def max_config(space: Space) -> dict:
    return {k: [max(c) for c in choices] for k, choices in space.items()}


def min_config(space: Space) -> dict:
    return {k: [min(c) for c in choices] for k, choices in space.items()}


def sandwich(space: Space, rng: np.random.Generator, n_random: int = 2) -> list[dict]:
    """BigNAS sandwich rule: the largest, the smallest and ``n_random`` uniform configs (in that order; the largest
    first, so it can serve as the in-place distillation teacher)."""
    return [max_config(space), min_config(space)] + [uniform(space, rng) for _ in range(n_random)]


def config_key(config: dict) -> tuple:
    """A hashable key of a config (for counting)."""
    return tuple((k, tuple(config[k])) for k in sorted(config))


def enumerate_space(space: Space) -> list[dict]:
    """Every config of the space (product of all positions), in a fixed order. Only for tiny spaces."""
    names = sorted(space)
    flat = [(k, i) for k in names for i in range(len(space[k]))]
    out = []
    for combo in itertools.product(*[space[k][i] for k, i in flat]):
        cfg = {k: [] for k in names}
        for (k, _), v in zip(flat, combo):
            cfg[k].append(v)
        out.append(cfg)
    return out


def bin_index(cost: float, edges: Sequence[float]) -> int:
    """Index of the bin [edges[i], edges[i+1]) holding ``cost`` (the last bin is closed); -1 when outside."""
    edges = np.asarray(edges, dtype=float)
    if cost < edges[0] or cost > edges[-1]:
        return -1
    return int(min(np.searchsorted(edges, cost, side="right") - 1, len(edges) - 2))


class BinnedSampler:
    """Complexity-binned sampling.

    ``cost_fn(config) -> float`` (e.g. MACs from :func:`reprolab.nas.flops.cnn_macs`); ``edges`` the bin edges
    (len = bins + 1; :meth:`quantile_edges` makes equal-mass bins). ``sample(bin=None)`` draws the bin from
    ``probs`` (uniform by default; a learned bin distribution as in ShiftNAS can be set with :meth:`set_probs`), then
    an architecture inside it: ``mode="rejection"`` redraws :func:`uniform` until the cost falls in the bin (the
    distribution is the uniform-config distribution conditioned on the bin; ``max_tries`` then RuntimeError);
    ``mode="per_bin"`` picks uniformly among the members of ``pool`` in the bin (exact per-bin uniform).
    """

    def __init__(self, space: Space, cost_fn: Callable[[dict], float], edges: Sequence[float],
                 rng: np.random.Generator, probs: Sequence[float] | None = None, mode: str = "rejection",
                 pool: list[dict] | None = None, max_tries: int = 10_000):
        if mode not in ("rejection", "per_bin"):
            raise ValueError(f"mode={mode!r}; allowed: rejection, per_bin")
        self.space, self.cost_fn, self.rng, self.mode, self.max_tries = space, cost_fn, rng, mode, max_tries
        self.edges = [float(e) for e in edges]
        if any(b <= a for a, b in zip(self.edges[:-1], self.edges[1:])):
            raise ValueError("bin edges must increase")
        self.n_bins = len(self.edges) - 1
        self.set_probs(probs)
        self.members: list[list[dict]] | None = None
        if mode == "per_bin":
            if pool is None:
                raise ValueError("mode='per_bin' needs a pool of configs")
            self.members = [[] for _ in range(self.n_bins)]
            for cfg in pool:
                b = bin_index(cost_fn(cfg), self.edges)
                if b >= 0:
                    self.members[b].append(cfg)

    def set_probs(self, probs: Sequence[float] | None) -> None:
        p = np.full(self.n_bins, 1.0 / self.n_bins) if probs is None else np.asarray(probs, dtype=float)
        if p.shape != (self.n_bins,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probs must be {self.n_bins} non-negative numbers with a positive sum")
        self.probs = p / p.sum()

    @staticmethod
    def quantile_edges(space: Space, cost_fn: Callable[[dict], float], n_bins: int, rng: np.random.Generator,
                       n_samples: int = 2000) -> list[float]:
        """Bin edges at the quantiles of the cost of ``n_samples`` uniform configs (equal-mass bins), the min / max
        config's cost at the ends (assumes cost is monotone in every choice, true of MACs). Duplicate edges (very
        discrete costs) are dropped, so fewer than ``n_bins`` bins may come back."""
        costs = np.array([cost_fn(uniform(space, rng)) for _ in range(n_samples)])
        inner = np.quantile(costs, np.linspace(0, 1, n_bins + 1)[1:-1]).tolist()
        edges = [float(cost_fn(min_config(space)))] + [float(e) for e in inner] + [float(cost_fn(max_config(space)))]
        return sorted(set(edges))

    def sample(self, bin: int | None = None) -> tuple[dict, int]:
        """(config, bin)."""
        b = int(self.rng.choice(self.n_bins, p=self.probs)) if bin is None else int(bin)
        if self.mode == "per_bin":
            members = self.members[b]
            if not members:
                raise RuntimeError(f"bin {b} of the pool is empty")
            return members[int(self.rng.integers(len(members)))], b
        lo, hi = self.edges[b], self.edges[b + 1]
        last = b == self.n_bins - 1
        for _ in range(self.max_tries):
            cfg = uniform(self.space, self.rng)
            c = self.cost_fn(cfg)
            if lo <= c < hi or (last and c == hi):
                return cfg, b
        raise RuntimeError(f"no config in bin {b} [{lo}, {hi}) after {self.max_tries} tries")


class ImportanceSampler:
    """Importance sampling of paths (items 0..N-1) with probabilities proportional to ``weights`` (PA&DA: the
    normalised gradient norms of the paths), optionally mixed with uniform (``smoothing`` in [0, 1]: p = (1-s) w/sum w
    + s/N) so no path starves. ``sample(k)`` returns (indices, importance weights 1 / (N p_i)); the weighted mean of
    any per-path quantity f, mean_j f(i_j) / (N p_{i_j}), is unbiased for the uniform average (1/N) sum_i f(i).
    ``update(weights)`` replaces the weights (e.g. after each epoch)."""

    def __init__(self, weights: Sequence[float], rng: np.random.Generator, smoothing: float = 0.0):
        self.rng, self.smoothing = rng, float(smoothing)
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError("smoothing must be in [0, 1]")
        self.update(weights)

    def update(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=float)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights: a non-empty 1-D array of non-negative numbers with a positive sum")
        self.probs = (1 - self.smoothing) * w / w.sum() + self.smoothing / len(w)

    def sample(self, k: int = 1, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.probs), size=k, replace=replace, p=self.probs)
        return idx, 1.0 / (len(self.probs) * self.probs[idx])
