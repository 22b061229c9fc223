"""Neural Logic Machines over dense tensors and over sparse hyperedge sets (SpaLoc).

Paper: Xiao, Rong, Dong, Mao, ... "Sparse and Local Networks for Hypergraph Reasoning" (SpaLoc),
https://arxiv.org/abs/2303.05496 ; NLM: Dong et al., "Neural Logic Machines", https://arxiv.org/abs/1904.11694

A state is a list F[r] of predicate tensors of arity r = 0..B (a single example, no batch dimension):
dense  F[r]: (N,)*r + (C_r,)
sparse F[r]: (idx (m_r, r) long, sorted by key; feat (m_r, C_r)) -- only the hyperedges in the support E_r are held,
every other hyperedge is 0 ("absent"). Arity 0 and 1 are always full.

One NLM layer, for every output arity r: concat[expand(F[r-1]), F[r], max_last(F[r+1]), min_last(F[r+1])], then the
concatenation over all r! permutations of the r variables, then a linear map and a ReLU (NLM uses a sigmoid; the ReLU
keeps outputs >= 0, which the sparse semantics need, and trains much faster in our short budgets). SpaLoc multiplies each
output hyperedge by a sigmoid importance alpha (one per hyperedge); a Hoyer (L1/L2) loss on alpha pushes it to
sparsity; ``forward_sparse(prune_tau=...)`` can drop the hyperedges with alpha < prune_tau from the support of the next
layer, and ``NLM.consumed_nnz(tau)`` counts the hyperedges whose alpha clears tau (the official code evaluates unpruned
and counts, sparse_nlm.py:354-363). Only *consumed* outputs are gated for the loss: the last layer's outputs of an
arity without a head feed nothing, so their gates are left out of the Hoyer loss (else the loss is minimised for free on
dead outputs). Pruning and counting concern the intermediate layers (the paper regularises "the number of hyperedges in
intermediate layers"): the last layer's outputs are either dead or the candidates its heads score.

With the same weights, the sparse layer equals the dense layer on inputs that are zero outside the support
(all values are >= 0, so max over absent entries is max(0, present) and min is 0 unless the support is full).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn


def perms(r: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(r)))


def tuple_keys(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Integer key of each r-tuple (row of idx), in base n."""
    key = torch.zeros(idx.shape[0], dtype=torch.long)
    for j in range(idx.shape[1]):
        key = key * n + idx[:, j]
    return key


def lookup(keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of query keys in the sorted key array, and whether they are present."""
    pos = torch.searchsorted(keys, query).clamp(max=max(len(keys) - 1, 0))
    found = keys[pos] == query if len(keys) else torch.zeros_like(query, dtype=torch.bool)
    return pos, found


def gather_rows(feat: torch.Tensor, pos: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """feat[pos] where found, 0 elsewhere."""
    return feat[pos] * found.unsqueeze(-1).to(feat.dtype)


class NLMLayer(nn.Module):
    """One NLM layer; ``forward_dense`` and ``forward_sparse`` share the weights."""

    def __init__(self, in_dims: list[int], out_dims: list[int], gated: bool = False):
        super().__init__()
        self.B = len(in_dims) - 1
        self.in_dims, self.out_dims, self.gated = in_dims, out_dims, gated
        self.lin, self.gate = nn.ModuleList(), nn.ModuleList()
        for r in range(self.B + 1):
            width = self.input_width(r)
            self.lin.append(nn.Linear(width, out_dims[r]))
            self.gate.append(nn.Linear(width, 1) if gated and r >= 2 else nn.Identity())

    def input_width(self, r: int) -> int:
        w = self.in_dims[r]
        if r > 0:
            w += self.in_dims[r - 1]
        if r < self.B:
            w += 2 * self.in_dims[r + 1]
        return w * math.factorial(r)

    def _out(self, r: int, X: torch.Tensor):
        y = torch.relu(self.lin[r](X))
        if self.gated and r >= 2:
            alpha = torch.sigmoid(self.gate[r](X))  # (..., 1) importance of each hyperedge
            return y * alpha, alpha
        return y, None

    # ------------------------------------------------------------------ dense
    def forward_dense(self, F: list[torch.Tensor], n: int):
        out, alphas = [], []
        for r in range(self.B + 1):
            parts = []
            if r > 0:
                parts.append(F[r - 1].unsqueeze(r - 1).expand(*([n] * r), F[r - 1].shape[-1]))  # (N,)*r + (C,)
            parts.append(F[r])
            if r < self.B:
                parts += [F[r + 1].amax(dim=r), F[r + 1].amin(dim=r)]  # reduce the last variable
            X = torch.cat(parts, -1)  # (N,)*r + (C_in,)
            if r > 1:
                X = torch.cat([X.permute(*p, r) for p in perms(r)], -1)  # (N,)*r + (r! C_in,)
            y, a = self._out(r, X)
            out.append(y)
            alphas.append(a)
            self.floats = getattr(self, "floats", 0) + X.numel() + y.numel()
        return out, alphas

    # ------------------------------------------------------------------ sparse
    def forward_sparse(self, S: list, n: int, plan: dict | None = None):
        """S[r] = (idx (m, r), keys (m,), feat (m, C)) for r >= 1, S[0] = feat (C,). Returns the same structure.

        ``plan`` caches the index lookups, which depend only on the supports (shared by layers and steps)."""
        out, alphas = [], []

        def cached(key, fn):
            if plan is None:
                return fn()
            if key not in plan:
                plan[key] = fn()
                # keep the supports alive so that their id() (part of the key) is never reused by another tensor
                plan.setdefault("_alive", []).extend(t for t in S[1:] if isinstance(t, tuple))
            return plan[key]

        for r in range(self.B + 1):
            if r == 0:
                f1 = S[1][2]  # (N, C1), arity 1 is full
                X = torch.cat([S[0], f1.amax(0), f1.amin(0)], -1)  # (C_in,)
                y, a = self._out(0, X)
                out.append(y)
                alphas.append(a)
                self.floats = getattr(self, "floats", 0) + X.numel() + y.numel()
                continue
            idx, keys, feat = S[r]
            m = idx.shape[0]

            def expand_at(tuples):  # F[r-1] at the tuples' prefix (the expanded variable is the last one)
                if r == 1:
                    return S[0].expand(tuples.shape[0], -1)
                pidx, pkeys, pfeat = S[r - 1]
                return gather_rows(pfeat, *cached(("exp", id(pkeys), id(tuples)),
                                                  lambda: lookup(pkeys, tuple_keys(tuples[:, :-1], n))))

            parts = [feat]
            if r < self.B:
                cidx, ckeys, cfeat = S[r + 1]
                pos, found = cached(("red", id(keys), id(ckeys)),  # prefix row of each (r+1)-hyperedge
                                    lambda: lookup(keys, tuple_keys(cidx[:, :-1], n)))
                pos, cf = pos[found], cfeat[found]
                C = cf.shape[-1]
                mx = torch.zeros(m, C).scatter_reduce(0, pos.unsqueeze(-1).expand(-1, C), cf, "amax", include_self=True)
                mn = torch.full((m, C), float("inf")).scatter_reduce(0, pos.unsqueeze(-1).expand(-1, C), cf, "amin",
                                                                      include_self=True)
                count = torch.zeros(m, dtype=torch.long).scatter_add(0, pos, torch.ones_like(pos))
                mn = torch.where((count == n).unsqueeze(-1), mn, torch.zeros_like(mn))  # forall needs all n present
                parts += [mx, mn]
            rest = torch.cat(parts, -1)  # (m, C_r + 2 C_{r+1}): own and reduced features, 0 off the support
            if r == 1:
                X = torch.cat([expand_at(idx), rest], -1)  # (m, C_in)
            else:
                cols = []
                for p in perms(r):
                    inv = [p.index(k) for k in range(r)]
                    src = cached(("src", id(keys), p), lambda: idx[:, inv])  # lands here after X.permute(*p)
                    cols += [expand_at(src), gather_rows(rest, *cached(("perm", id(keys), p),
                                                                       lambda: lookup(keys, tuple_keys(src, n))))]
                X = torch.cat(cols, -1)  # (m, r! C_in)
            y, a = self._out(r, X)
            out.append((idx, keys, y))
            alphas.append(a)
            self.floats = getattr(self, "floats", 0) + X.numel() + y.numel()
        return out, alphas


class NLM(nn.Module):
    """A stack of NLM layers (with residual concatenation of the input predicates) and a linear head per arity."""

    def __init__(self, in_dims: list[int], hidden: int, depth: int, out_dims: list[int], gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        dims = list(in_dims)
        for _ in range(depth):
            self.layers.append(NLMLayer(dims, [hidden] * len(dims), gated))
            dims = [hidden + d0 for d0 in in_dims]
        self.heads = nn.ModuleList([nn.Linear(d, o) if o else nn.Identity() for d, o in zip(dims, out_dims)])
        self.out_dims = out_dims

    def reset_count(self):
        for layer in self.layers:
            layer.floats = 0
        self.support_sizes = []

    def _consumed(self, layer_i: int, alphas: list) -> list:
        """The gates of a layer whose outputs something reads (the last layer: only arities with a head). Their
        (layer, arity) are appended to ``self.alpha_meta`` (reset by each forward) for :func:`hoyer_official`."""
        last = layer_i == len(self.layers) - 1
        keep = [(r, x) for r, x in enumerate(alphas) if x is not None and (not last or self.out_dims[r])]
        self.alpha_meta = getattr(self, "alpha_meta", []) + [(layer_i, r) for r, _ in keep]
        return [x for _, x in keep]

    def consumed_nnz(self, tau: float = 0.0) -> int:
        """Hyperedges (arity >= 2) of the intermediate layers (each is read by the next layer) held in the last sparse
        forward whose importance is >= tau (tau = 0: all held ones; ungated models: all), summed over those layers. The
        last layer's outputs are left out: its head-less outputs feed nothing and its headed ones are the candidates the
        heads score (never pruned). With tau = prune_tau on an unpruned forward this is the official count of the
        hyperedges whose importance clears the threshold (SpaLoc sparse_nlm.py:363)."""
        return int(sum(m if a is None or tau <= 0 else int((a >= tau).sum())
                       for sizes in self.support_sizes[:-1] for m, a in sizes.values()))

    def count(self) -> int:
        return sum(getattr(layer, "floats", 0) for layer in self.layers)

    def forward_dense(self, F0: list[torch.Tensor], n: int):
        F, alphas = F0, []
        self.alpha_meta = []
        for i, layer in enumerate(self.layers):
            out, a = layer.forward_dense(F, n)
            alphas += self._consumed(i, a)
            F = [torch.cat([o, f0], -1) for o, f0 in zip(out, F0)]
        return [h(f) if o else None for h, f, o in zip(self.heads, F, self.out_dims)], alphas

    def forward_sparse(self, S0: list, n: int, prune_tau: float = 0.0, plan: dict | None = None):
        """Sparse forward; with prune_tau > 0 the hyperedges (arity >= 2) of intermediate layers whose importance is
        below it are dropped (SpaLoc sparsifies intermediate predicates; the last layer's outputs are the candidate
        tuples that the heads score, so they are kept)."""
        S, base, alphas = S0, S0, []  # base: the input predicates on the current supports (residual)
        self.alpha_meta = []
        plan = {} if plan is None else plan
        self.support_sizes = []
        for i, layer in enumerate(self.layers):
            out, a = layer.forward_sparse(S, n, plan)
            alphas += self._consumed(i, a)
            new_S, new_base, keep_idx = [torch.cat([out[0], S0[0]], -1)], [S0[0]], {}
            for r in range(1, len(out)):
                idx, keys, y = out[r]
                f0 = base[r][2]
                if r >= 2 and prune_tau > 0 and a[r] is not None and i < len(self.layers) - 1:
                    keep = a[r].squeeze(-1) >= prune_tau
                    keep_idx[r] = keep
                    idx, keys, y, f0 = idx[keep], keys[keep], y[keep], f0[keep]
                new_S.append((idx, keys, torch.cat([y, f0], -1)))
                new_base.append((idx, keys, f0))
            self.support_sizes.append({r: (int(new_S[r][0].shape[0]), None if a[r] is None else
                                           a[r].detach().squeeze(-1)[keep_idx[r]] if r in keep_idx else
                                           a[r].detach().squeeze(-1)) for r in range(2, len(new_S))})
            S, base = new_S, new_base
        heads = [self.heads[0](S[0])] + [(s[0], self.heads[r](s[2])) if self.out_dims[r] else None
                                         for r, s in enumerate(S[1:], start=1)]
        return heads, alphas, S


def hoyer(alphas: list[torch.Tensor]) -> torch.Tensor:
    """Mean normalised Hoyer measure ||a||_1 / (sqrt(m) ||a||_2) of the importance gates (1 = dense, -> 0 sparse)."""
    vals = [a.reshape(-1).sum() / (math.sqrt(a.numel()) * a.reshape(-1).norm() + 1e-8) for a in alphas if a.numel()]
    return torch.stack(vals).mean() if vals else torch.zeros(())


def hoyer_official(alphas: list[torch.Tensor], meta: list[tuple[int, int]], n: int, depth: int,
                   breadth: int) -> torch.Tensor:
    """The official SpaLoc sparsity loss (default ``--nlm-sparse-loss hoyer_square``, learn_graph_tasks.py:98-102):
    per gate tensor (layer d, arity r) HS = (sum a)^2 / sum a^2 (difflogic/nn/neural_logic/modules/sparse_tensor.py:236-240; 1 when it holds <= 1
    entry; a = the importances, >= 0), weighted by the multiplier m = n for layers d < depth - 1 with r != breadth and
    1 otherwise (sparse_nlm.py:368-371), normalised by the weighted space sizes n^r:
    sum m HS / (1e-6 + sum m n^r) (learn_graph_tasks.py:738-750). ``meta`` = (layer, arity) of each gate tensor
    (:attr:`NLM.alpha_meta`)."""
    num, den = torch.zeros(()), 1e-6
    for a, (d, r) in zip(alphas, meta):
        v = a.reshape(-1)
        hs = torch.ones(()) if v.numel() <= 1 else v.sum() ** 2 / (v ** 2).sum()
        m = 1 if (d == depth - 1 or r == breadth) else n
        num = num + m * hs
        den += m * n ** r
    return num / den


def sparse_from_dense(F: list[torch.Tensor], supports: list[torch.Tensor | None], n: int) -> list:
    """Sparse state holding the dense tensors' values on the given supports (idx (m, r)); None = full support."""
    S = [F[0]]
    for r in range(1, len(F)):
        idx = supports[r] if supports[r] is not None else torch.cartesian_prod(
            *[torch.arange(n)] * r).reshape(-1, r)
        keys = tuple_keys(idx, n)
        order = torch.argsort(keys)
        idx, keys = idx[order], keys[order]
        S.append((idx, keys, F[r][tuple(idx.T)]))
    return S


def dense_mask(supports: list, n: int, B: int) -> list[torch.Tensor]:
    """(N,)*r + (1,) 0/1 masks of the supports (for the equivalence test)."""
    masks = [torch.ones(1)]
    for r in range(1, B + 1):
        M = torch.zeros(*([n] * r), 1)
        if supports[r] is None:
            M[:] = 1
        else:
            M[tuple(supports[r].T)] = 1
        masks.append(M)
    return masks
