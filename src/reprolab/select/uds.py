"""UDS: Utility-Diversity Aware Online Batch Selection for LLM Supervised Fine-tuning (Zou et al., 2025).

Official code: https://github.com/gfyddha/UDS (``UDSamplingTrainer.py``). For every incoming batch of B examples, one
forward pass without gradients gives each example's logits matrix X_i (L x V); then

- utility   u_i = ||X_i||_* = sum of the singular values of X_i (the nuclear norm: large for confident *and*
  varied predictions over the sequence, i.e. informative, intra-sample-diverse data);
- diversity d_i = mean_m ||S(X_i) - q_m||_2 over a FIFO memory {q_m} of the sketches of recently selected examples,
  where S is a fast Johnson-Lindenstrauss sketch: random +-1 signs, FFT, random subsampling, on both sides of X_i
  (V -> r2 = 128 columns, L -> r1 = 8 rows), i.e. an (r1 x r2) summary of X_i;
- score     s_i = u_i + alpha * d_i (alpha = 2.5e-3); the top-K examples get the backward pass and their sketches
  enter the memory (1024 entries).

No reference model and no validation set are needed, and only K of B examples are back-propagated.

When the logits come from a frozen linear head, X = H W^T with hidden states H (L x d) and head W (V x d), both
scores are computed exactly without forming X (:meth:`UDSSelector.select_hidden`): the singular values of X are the
square roots of the eigenvalues of the L x L Gram matrix H (W^T W) H^T, and the sketch is linear in X, so
S(X) = P_L H (W^T P_V) with the cosine (real-FFT) matrices P of :class:`FastJLProjector`. Same numbers, no L x V
matrix per example.
"""
from __future__ import annotations

import numpy as np
import torch


def nuclear_norm(logits: torch.Tensor) -> torch.Tensor:
    """Utility: ||X_i||_* for every example: (B, L, V) -> (B,)."""
    return torch.linalg.svdvals(logits.float()).sum(-1)  # (B, min(L, V)) -> (B,)


def nuclear_norm_from_hidden(H: torch.Tensor, WtW: torch.Tensor) -> torch.Tensor:
    """||H W^T||_* from hidden states H (B, L, d) and W^T W (d, d): sum of sqrt(eig(H W^T W H^T)). (B,)"""
    G = (H.float() @ WtW.float() @ H.float().transpose(1, 2)).double()  # (B, L, L) Gram matrix of the logits rows
    return torch.linalg.eigvalsh(G).clamp(min=0).sqrt().sum(-1).float()


def _cos_matrix(rows: torch.Tensor, n: int, cols: torch.Tensor) -> torch.Tensor:
    """Real part of the DFT matrix restricted to ``rows`` x ``cols``: cos(2 pi r c / n), angles reduced exactly."""
    phase = (rows.long()[:, None] * cols.long()[None, :]) % n  # (R, C) integers: no float error in r * c
    return torch.cos(2 * torch.pi * phase.double() / n).float()


class FastJLProjector:
    """Sketch S(X) of an (L, V) matrix as in the official ``FastJLProjector``: (B, L, V) -> (B, r1, r2).

    Right side: X * d2 (random signs over V), FFT over V (real part), keep r2 random columns, scale sqrt(V / r2).
    Left side: rows * d1 (random signs over L), FFT over L (real part), keep r1 random rows, scale sqrt(L / r1).
    Shorter inputs are zero-padded to L rows (as the official code pads logits to the maximum sequence length).
    """

    def __init__(self, L: int, V: int, r1: int = 8, r2: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.L, self.V, self.r1, self.r2 = L, V, r1, r2
        self.d2 = torch.randint(0, 2, (V,), generator=g).float() * 2 - 1  # (V,)
        self.idx2 = torch.randint(0, V, (r2,), generator=g)  # (r2,)
        self.d1 = torch.randint(0, 2, (L,), generator=g).float() * 2 - 1  # (L,)
        self.idx1 = torch.randint(0, L, (r1,), generator=g)  # (r1,)
        self.scale_r, self.scale_l = (V / r2) ** 0.5, (L / r1) ** 0.5

    def project(self, X: torch.Tensor) -> torch.Tensor:
        B, L, V = X.shape
        if L > self.L or V != self.V:
            raise ValueError(f"sketch: got (L, V) = ({L}, {V}); the projector takes L <= {self.L} and V = {self.V}")
        dev = X.device
        X = torch.cat([X.float(), X.new_zeros(B, self.L - L, V)], 1) if L < self.L else X.float()  # (B, L, V)
        X = torch.fft.fft(X * self.d2.to(dev), dim=-1).real[..., self.idx2.to(dev)] * self.scale_r  # (B, L, r2)
        X = torch.fft.fft(X * self.d1.to(dev)[None, :, None], dim=1).real[:, self.idx1.to(dev)]  # (B, r1, r2)
        X = X * self.scale_l
        return X.contiguous()

    def head_factor(self, W: torch.Tensor) -> torch.Tensor:
        """W^T P_V (d, r2), with P_V[v, j] = d2[v] cos(2 pi v idx2[j] / V) * sqrt(V / r2): the right transform of
        :meth:`project` applied to the head, so that the right-transformed logits are H @ head_factor(W)."""
        P_V = self.d2[:, None] * _cos_matrix(torch.arange(self.V), self.V, self.idx2) * self.scale_r  # (V, r2)
        return W.float().T @ P_V.to(W.device)  # (d, r2)

    def project_hidden(self, H: torch.Tensor, head_factor: torch.Tensor) -> torch.Tensor:
        """Sketch of the logits H W^T without forming them: (B, L, d) -> (B, r1, r2), equal to ``project(H @ W.T)``."""
        B, L, d = H.shape
        P_L = _cos_matrix(self.idx1, self.L, torch.arange(self.L)) * self.d1[None, :] * self.scale_l  # (r1, L_max)
        return P_L[:, :L].to(H.device) @ (H.float() @ head_factor)  # (B, r1, r2)


class SketchMemory:
    """FIFO memory of the sketches of selected examples (official ``repr_queue``)."""

    def __init__(self, size: int = 1024):
        self.size, self.queue, self.ptr, self.count = size, None, 0, 0

    def mean_distance(self, z: torch.Tensor) -> torch.Tensor:
        """Diversity: mean L2 distance of each sketch (B, D) to the stored ones; zeros while the memory is empty."""
        if self.count == 0:
            return z.new_zeros(z.shape[0])
        return torch.cdist(z, self.queue[:self.count], p=2).mean(1)  # (B, count) -> (B,)

    def push(self, z: torch.Tensor) -> None:
        if self.queue is None:
            self.queue = z.new_zeros(self.size, z.shape[1])
        idx = torch.arange(self.ptr, self.ptr + z.shape[0], device=z.device) % self.size
        self.queue[idx] = z
        self.ptr = int((self.ptr + z.shape[0]) % self.size)
        self.count = min(self.size, self.count + z.shape[0])


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order (ties broken towards the lower index)."""
    order = torch.from_numpy(np.lexsort((np.arange(len(scores)), -scores.detach().double().cpu().numpy())))
    return order[:k].sort().values


class UDSSelector:
    """Score a batch's logits with utility + alpha * diversity, return the top-k and remember their sketches."""

    name = "uds"
    needs = "hidden"  # hidden states + frozen head (exact shortcut); ``select`` also takes logits directly

    def __init__(self, L: int, V: int, alpha: float = 2.5e-3, r1: int = 8, r2: int = 128, memory: int = 1024,
                 seed: int = 0):
        self.alpha = alpha
        self.projector = FastJLProjector(L, V, r1, r2, seed)
        self.memory = SketchMemory(memory)
        self.last, self._head = {}, None

    def _pick(self, utility: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
        diversity = self.memory.mean_distance(z)  # (B,)
        score = utility + self.alpha * diversity  # (B,)
        idx = top_k(score, k)
        self.memory.push(z[idx.to(z.device)])
        self.last = {"utility": utility, "diversity": diversity, "score": score}
        return idx

    @torch.no_grad()
    def select(self, logits: torch.Tensor, k: int, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k of a batch's logits (B, L, V) (rows past a sequence's end zero)."""
        return self._pick(nuclear_norm(logits), self.projector.project(logits).flatten(1), k)

    @torch.no_grad()
    def select_hidden(self, H: torch.Tensor, W: torch.Tensor, k: int) -> torch.Tensor:
        """Same scores for logits H W^T from hidden states H (B, L, d) (zero rows past each end) and a frozen head W."""
        if self._head is None or self._head[0] is not W:
            self._head = (W, W.float().T @ W.float(), self.projector.head_factor(W))  # cached: the head is frozen
        _, WtW, factor = self._head
        return self._pick(nuclear_norm_from_hidden(H, WtW), self.projector.project_hidden(H, factor).flatten(1), k)


class MaxLossSelector:
    """Baseline: back-propagate the k examples with the largest current loss (online hard-example mining)."""

    name = "max_loss"
    needs = "losses"

    def select(self, logits, k: int, losses: torch.Tensor | None = None) -> torch.Tensor:
        return top_k(losses, k)


class RandomSelector:
    """Baseline: k examples uniformly at random (no scoring forward pass)."""

    name = "random"
    needs = None

    def __init__(self, seed: int = 0):
        self.rng = np.random.RandomState(seed)

    def select(self, logits, k: int, losses=None, batch_size: int | None = None) -> torch.Tensor:
        return torch.from_numpy(np.sort(self.rng.choice(batch_size, k, replace=False)))
