"""Small DGL node classifiers with one call signature, ``model(g, X) -> logits (N, C)``.

``g`` is expected to carry self loops (``NodeData.graph_with_self_loops``), so ``GraphConv(norm="both")`` computes
A_hat X = D^{-1/2} (A + I) D^{-1/2} X (Kipf & Welling, 2017).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
from dgl.nn import GraphConv  # noqa: E402


class MLP(nn.Module):
    """``n_layers`` linear layers with ReLU (and dropout) in between; ignores the graph."""

    def __init__(self, in_feats: int, hidden: int, out_feats: int, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [out_feats]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, g, X: torch.Tensor) -> torch.Tensor:
        h = X  # (N, d)
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = F.dropout(F.relu(h), self.dropout, self.training)
            h = layer(h)
        return h  # (N, out)


class GCN(nn.Module):
    """``n_layers`` ``dgl.nn.GraphConv`` layers (symmetric normalisation) with ReLU and dropout in between."""

    def __init__(self, in_feats: int, hidden: int, out_feats: int, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [out_feats]
        self.layers = nn.ModuleList(GraphConv(a, b, norm="both") for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, g, X: torch.Tensor) -> torch.Tensor:
        h = X  # (N, d)
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = F.dropout(F.relu(h), self.dropout, self.training)
            h = layer(g, h)  # (N, hidden|out) = A_hat h W
        return h
