"""A NAS-Bench-201 one-shot supernet: every edge holds all five operations; one network serves single-path (SPOS,
ENAS, random search with weight sharing) and mixture (DARTS) training.

Follows NAS-Bench-201's search models (D-X-Y/AutoDL-Projects, ``xautodl/models/cell_searchs/search_cells.py``
``NAS201SearchCell`` and ``search_model_darts.py`` ``TinyNetworkDarts``): the macro skeleton is the one of
:class:`reprolab.nas.space201.NB201Network` (stem conv + BN, three stages of ``n_cells`` cells with C, 2C, 4C channels,
ResNet reduction blocks, BN-ReLU, global pooling, linear); in every cell each of the 6 edges is a :class:`MixedOp`
holding the 5 candidate operations (``space201.OPS`` order, NASLib's); node j is the sum over i < j of the edge (i, j)
applied to node i; one architecture (a 6-tuple, or a (6, 5) weight matrix) is shared by all cells. As in NB-201's
search models, the candidate operations' BatchNorms are not affine by default (``affine=False``) while the stem and
reduction blocks keep affine BN. DARTS' architecture parameters are ``alphas`` (6 x 5, initialised ``1e-3 * randn``,
as ``TinyNetworkDarts.arch_parameters``); ``forward(x)`` without an architecture uses ``softmax(alphas)`` per edge.

Single path: ``forward(x, arch=(o0, ..., o5))`` runs only the chosen op of each edge (weights of other ops untouched).
Mixture: ``forward(x, arch=W)`` with W a (6, 5) tensor computes ``sum_k W[e, k] * op_k(x)`` on edge e (the caller
applies softmax, projection or masks, e.g. DARTS-PT's one-hot projected edges and masked ops). Where a weight is exactly
0 and the weights need no gradient, the op is skipped (same output, less compute).

``set_arch(arch)`` fixes the architecture used by ``forward(x)`` (so BN recalibration, ``nas.bn.set_running_statistics``,
can forward one child); ``extract(cell)`` returns a standalone :class:`space201.NB201Network` with the inherited weights
(the child of the supernet; its output equals the supernet's single-path output, tested).
"""
from __future__ import annotations

import torch
from torch import nn

from . import space201
from .space201 import EDGES0, N_EDGES, N_OPS, OPS


def _op(name: str, c: int, affine: bool, track: bool) -> nn.Module:
    """A candidate op with the same module layout as ``space201.make_op`` (so state dicts line up)."""
    if name in ("nor_conv_3x3", "nor_conv_1x1"):
        k = 3 if name == "nor_conv_3x3" else 1
        return nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(c, c, k, 1, k // 2, bias=False),
                             nn.BatchNorm2d(c, affine=affine, track_running_stats=track))
    return space201.make_op(name, c)


class MixedOp(nn.Module):
    """The 5 NB-201 operations of one edge (``space201.OPS`` order)."""

    def __init__(self, c: int, affine: bool = False, track_running_stats: bool = True):
        super().__init__()
        self.ops = nn.ModuleList([_op(name, c, affine, track_running_stats) for name in OPS])

    def forward(self, x, weights: torch.Tensor | None = None, op: int | None = None):
        if op is not None:
            return self.ops[int(op)](x)
        if weights is None or weights.shape != (N_OPS,):
            raise ValueError(f"MixedOp needs op=<int> or weights of shape ({N_OPS},)")
        skip_zero = not weights.requires_grad
        out = 0
        for w, layer in zip(weights, self.ops):
            if skip_zero and float(w) == 0.0:
                continue
            out = out + w * layer(x)
        return out if torch.is_tensor(out) else x.mul(0.0)


class SearchCell(nn.Module):
    """An NB-201 cell whose 6 edges are MixedOps (xautodl ``NAS201SearchCell``, NASLib edge order)."""

    def __init__(self, c: int, affine: bool = False, track_running_stats: bool = True):
        super().__init__()
        self.edges = nn.ModuleList([MixedOp(c, affine, track_running_stats) for _ in range(N_EDGES)])

    def forward(self, x, arch):
        single = not torch.is_tensor(arch)
        nodes = [x]
        for j in (1, 2, 3):
            terms = []
            for e in range(N_EDGES):
                i, t = EDGES0[e]
                if t != j:
                    continue
                terms.append(self.edges[e](nodes[i], op=arch[e]) if single else self.edges[e](nodes[i], weights=arch[e]))
            nodes.append(sum(terms))
        return nodes[3]


class NB201SuperNet(nn.Module):
    """One-shot supernet over the NB-201 cell space (macro of ``space201.NB201Network``)."""

    def __init__(self, channels: int = 8, n_cells: int = 1, num_classes: int = 10, in_channels: int = 1,
                 affine: bool = False, track_running_stats: bool = True):
        super().__init__()
        c = channels
        self.config = dict(channels=channels, n_cells=n_cells, num_classes=num_classes, in_channels=in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        layers: list[nn.Module] = []
        for stage, width in enumerate((c, 2 * c, 4 * c)):
            if stage > 0:
                layers.append(space201.ResNetBasicBlock(width // 2, width, 2))
            layers += [SearchCell(width, affine, track_running_stats) for _ in range(n_cells)]
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * c, num_classes)
        self.alphas = nn.Parameter(1e-3 * torch.randn(N_EDGES, N_OPS))
        self._arch = None

    # ---- parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "alphas"]

    # ---- architecture
    def set_arch(self, arch) -> None:
        """Architecture used by ``forward(x)``: a 6-tuple, a (6, 5) weight tensor, or None (softmax of alphas)."""
        self._arch = self._check(arch) if arch is not None else None

    @staticmethod
    def _check(arch):
        if torch.is_tensor(arch):
            if arch.shape != (N_EDGES, N_OPS):
                raise ValueError(f"arch weights must have shape ({N_EDGES}, {N_OPS}); got {tuple(arch.shape)}")
            return arch
        space201._check(arch)
        return tuple(int(o) for o in arch)

    def forward(self, x, arch=None):
        if arch is None:
            arch = self._arch if self._arch is not None else torch.softmax(self.alphas, dim=-1)
        else:
            arch = self._check(arch)
        h = self.stem(x)
        for layer in self.cells:
            h = layer(h, arch) if isinstance(layer, SearchCell) else layer(h)
        h = self.lastact(h)
        return self.classifier(self.global_pooling(h).flatten(1))

    # ---- children
    def genotype(self) -> tuple[int, ...]:
        """DARTS' discretisation: argmax of alphas on every edge (``TinyNetworkDarts.genotype``)."""
        return tuple(int(i) for i in self.alphas.detach().argmax(-1))

    @torch.no_grad()
    def extract(self, cell) -> space201.NB201Network:
        """The standalone child ``cell`` with the supernet's weights (and BN running statistics)."""
        cell = self._check(cell)
        cfg = self.config
        net = space201.NB201Network(cell, cfg["channels"], cfg["n_cells"], cfg["num_classes"], cfg["in_channels"])
        net.stem.load_state_dict(self.stem.state_dict())
        net.lastact.load_state_dict(self.lastact.state_dict())
        net.classifier.load_state_dict(self.classifier.state_dict())
        for src, dst in zip(self.cells, net.cells):
            if isinstance(src, SearchCell):
                for e in range(N_EDGES):
                    op_src, op_dst = src.edges[e].ops[cell[e]], dst.edges[e]
                    missing, unexpected = op_dst.load_state_dict(op_src.state_dict(), strict=False)
                    if unexpected or any(not k.endswith(("weight", "bias")) or not k.startswith("2.") for k in missing):
                        raise RuntimeError(f"state mismatch on edge {e}: missing {missing}, unexpected {unexpected}")
                    # a non-affine / untracked supernet BN becomes the identity affine map / batch statistics
                    bn_src = op_src[2] if isinstance(op_src, nn.Sequential) else None
                    if bn_src is not None and not bn_src.track_running_stats:
                        op_dst[2].track_running_stats = False
                        op_dst[2].running_mean = op_dst[2].running_var = None
                        op_dst[2].num_batches_tracked = None
            else:
                dst.load_state_dict(src.state_dict())
        net.train(self.training)
        return net
