"""Node-classification data with a sensitive attribute, and label-stratified splits."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402


@dataclass
class NodeData:
    """One graph: ``graph`` is symmetric without self loops; ``X`` (N, d) float32, ``y`` and ``sens`` (N,) int64."""

    name: str
    graph: dgl.DGLGraph
    X: torch.Tensor
    y: torch.Tensor
    sens: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes()

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def graph_with_self_loops(self) -> dgl.DGLGraph:
        """A + I, the graph every model in this package propagates on (GCN's renormalisation trick)."""
        return dgl.add_self_loop(dgl.remove_self_loop(self.graph))


def graph_from_edges(src: np.ndarray, dst: np.ndarray, n: int) -> dgl.DGLGraph:
    """Undirected simple graph: both directions, duplicates and self loops removed."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    keep = src != dst
    a, b = np.minimum(src[keep], dst[keep]), np.maximum(src[keep], dst[keep])
    pairs = np.unique(a * n + b)  # canonical undirected pairs, sorted
    a, b = pairs // n, pairs % n
    return dgl.graph((torch.from_numpy(np.concatenate([a, b])), torch.from_numpy(np.concatenate([b, a]))), num_nodes=n)


def stratified_split(y: torch.Tensor, fractions=(0.5, 0.25, 0.25), seed: int = 0) -> dict[str, torch.Tensor]:
    """Random train/val/test node indices, stratified by label (NIFTY uses 50/25/25 on German credit)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or len(fractions) != 3:
        raise ValueError(f"fractions: need three fractions summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    y_np = y.cpu().numpy()
    for c in np.unique(y_np):
        idx = rng.permutation(np.flatnonzero(y_np == c))
        n_tr, n_va = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_tr])
        parts["val"].append(idx[n_tr:n_tr + n_va])
        parts["test"].append(idx[n_tr + n_va:])
    return {k: torch.from_numpy(np.sort(np.concatenate(v))) for k, v in parts.items()}
