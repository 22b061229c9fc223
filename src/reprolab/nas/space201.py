"""The NAS-Bench-201 cell space and a small torch NB-201 network.

Space (Dong & Yang, ICLR 2020; NASLib's encoding, which AnalogNAS-Bench uses): a cell is a DAG on 4 nodes with 6 edges,
each edge one of 5 operations, so 5**6 = 15,625 cells. A cell is a tuple of 6 op indices in NASLib's edge order
``EDGES = ((1,2),(1,3),(1,4),(2,3),(2,4),(3,4))`` (1-based nodes as in NASLib; node 1 is the cell input), i.e. 0-based
0->1, 0->2, 0->3, 1->2, 1->3, 2->3, and NASLib's op order ``OPS = (skip_connect, none, nor_conv_3x3, nor_conv_1x1,
avg_pool_3x3)`` (naslib/search_spaces/nasbench201/conversions.py: OP_NAMES / EDGE_LIST). ``to_str`` writes NB-201's
canonical string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (edges sorted by target node, as ``convert_op_indices_to_str``).

Network (NAS-Bench-201's ``TinyNetwork``, xautodl/models/cell_infers/tiny_network.py and cell_operations.py): stem
conv3x3 + BN, three stages of ``n_cells`` cells with C, 2C, 4C channels separated by a ResNet basic block of stride 2,
then BN-ReLU, global average pooling and a linear classifier. Ops: ``nor_conv_kxk`` = ReLU-Conv-BN, ``avg_pool_3x3`` =
AvgPool(3, stride 1, pad 1, count_include_pad=False), ``skip_connect`` = identity, ``none`` = zero. Node j of a cell is
the sum of op(i->j)(node i) over i < j; the output is node 3.
"""
from __future__ import annotations

import itertools
import re

import torch
from torch import nn

OPS = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")
EDGES = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))  # NASLib's EDGE_LIST (1-based: node 1 is the cell input)
EDGES0 = tuple((i - 1, j - 1) for i, j in EDGES)  # the same edges, 0-based (from, to)
N_EDGES, N_OPS = 6, 5
STR_ORDER = tuple(sorted(range(N_EDGES), key=lambda e: EDGES[e][1]))  # edge indices in NB-201 string order (stable)


def all_cells() -> list[tuple[int, ...]]:
    """All 15,625 cells as 6-tuples of op indices, in lexicographic order."""
    return list(itertools.product(range(N_OPS), repeat=N_EDGES))


def cell_index(cell) -> int:
    """Position of a cell in ``all_cells()`` (base-5 number, first edge most significant)."""
    idx = 0
    for op in cell:
        idx = idx * N_OPS + int(op)
    return idx


def to_str(cell) -> str:
    """NB-201 string, e.g. (2,2,0,2,3,2) -> ``|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|...``."""
    _check(cell)
    parts = [f"{OPS[cell[e]]}~{EDGES0[e][0]}" for e in STR_ORDER]
    return "|{}|+|{}|{}|+|{}|{}|{}|".format(*parts)


def from_str(s: str) -> tuple[int, ...]:
    """Inverse of ``to_str``."""
    nodes = s.split("+")
    if len(nodes) != 3:
        raise ValueError(f"not an NB-201 cell string: {s!r}")
    cell = [None] * N_EDGES
    for j, node in enumerate(nodes, start=1):
        items = [t for t in node.split("|") if t]
        if len(items) != j:
            raise ValueError(f"node {j} of {s!r} must have {j} inputs")
        for item in items:
            m = re.fullmatch(r"(\w+)~(\d)", item)
            if not m or m.group(1) not in OPS:
                raise ValueError(f"bad edge {item!r} in {s!r}; ops: {OPS}")
            cell[EDGES0.index((int(m.group(2)), j))] = OPS.index(m.group(1))
    return tuple(cell)


def _check(cell) -> None:
    if len(cell) != N_EDGES or any(not 0 <= int(o) < N_OPS for o in cell):
        raise ValueError(f"a cell is {N_EDGES} op indices in 0..{N_OPS - 1}; got {cell!r}")


def is_connected(cell) -> bool:
    """True when the cell output depends on its input (some input->output path has no ``none`` edge)."""
    _check(cell)
    reach = {0}
    for e in sorted(range(N_EDGES), key=lambda e: EDGES0[e]):  # sources before targets
        i, j = EDGES0[e]
        if i in reach and OPS[cell[e]] != "none":
            reach.add(j)
    return 3 in reach


def edit_distance(a, b) -> int:
    """Number of edges whose op differs (the NB-201 mutation distance)."""
    return sum(int(x != y) for x, y in zip(a, b))


def mutate(cell, rng) -> tuple[int, ...]:
    """NASLib's NB-201 mutation: one random edge gets a different random op (``rng``: numpy Generator)."""
    cell = list(cell)
    e = int(rng.integers(N_EDGES))
    cell[e] = int(rng.choice([o for o in range(N_OPS) if o != cell[e]]))
    return tuple(cell)


# ---------------------------------------------------------------------------------------------------------- network
class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, k, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out))


class Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.0)


def make_op(name: str, c: int) -> nn.Module:
    if name == "skip_connect":
        return nn.Identity()
    if name == "none":
        return Zero()
    if name == "nor_conv_3x3":
        return ReLUConvBN(c, c, 3, 1, 1)
    if name == "nor_conv_1x1":
        return ReLUConvBN(c, c, 1, 1, 0)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"op {name!r}; allowed: {OPS}")


class InferCell(nn.Module):
    """One NB-201 cell with fixed ops: node j = sum_{i<j} op_(i,j)(node i); output node 3."""

    def __init__(self, cell, c: int):
        super().__init__()
        _check(cell)
        self.cell = tuple(int(o) for o in cell)
        self.edges = nn.ModuleList([make_op(OPS[o], c) for o in self.cell])

    def forward(self, x):
        nodes = [x]
        for j in (1, 2, 3):
            nodes.append(sum(self.edges[e](nodes[EDGES0[e][0]]) for e in range(N_EDGES) if EDGES0[e][1] == j))
        return nodes[3]


class ResNetBasicBlock(nn.Module):
    """NB-201's reduction block: ReLUConvBN 3x3 stride 2, ReLUConvBN 3x3, shortcut AvgPool2d(2) + conv1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2, padding=0),
                                        nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False)) if stride == 2 else None

    def forward(self, x):
        res = x if self.downsample is None else self.downsample(x)
        return res + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """NB-201 ``TinyNetwork`` for one cell: stem, 3 stages x ``n_cells`` cells (C, 2C, 4C), 2 reduction blocks."""

    def __init__(self, cell, channels: int = 16, n_cells: int = 5, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.cell = tuple(int(o) for o in cell)
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        layers: list[nn.Module] = []
        for stage, width in enumerate((c, 2 * c, 4 * c)):
            if stage > 0:
                layers.append(ResNetBasicBlock(width // 2, width, 2))
            layers += [InferCell(cell, width) for _ in range(n_cells)]
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * c, num_classes)

    def forward(self, x):
        h = self.lastact(self.cells(self.stem(x)))
        return self.classifier(self.global_pooling(h).flatten(1))


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_flops(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one input of ``input_shape`` (C, H, W) (the usual NAS
    'FLOPs' = MACs convention of NB-201 / OFA; pooling, BN, additions not counted). Counted with forward hooks."""
    total = [0]

    def conv_hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total[0] += int(out.numel() // out.shape[0] * k)

    def lin_hook(mod, inp, out):
        total[0] += int(mod.in_features * mod.out_features)

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was)
    for h in hooks:
        h.remove()
    return total[0]
