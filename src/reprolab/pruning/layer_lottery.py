"""When Layers Play the Lottery, all Tickets Win at Initialization (Jordao, de Araujo, Maia, Pedrini), arXiv:2301.10835.

https://arxiv.org/abs/2301.10835 -- the authors' repository github.com/arturjordao/LayerLottery holds only a README
("The source code will be released soon"), so the pieces follow the authors' own layer-pruning framework
github.com/arturjordao/DeepPruning (``PruningMultipleStructures/``: ``template_architectures.py`` ResNet,
``rebuild_layers.py`` which blocks may go and how a pruned network inherits the kept weights, ``rebuild_filters.py``
filter removal, ``utils/custom_functions.py`` FLOPs) and the official GraSP code github.com/alecwangcq/GraSP
(``pruner/GraSP.py`` scores, ``main_prune_non_imagenet.py`` training recipe).

Algorithm 2 of the paper (winning tickets at initialisation):

1. score every removable residual block of the untrained network with a data-driven criterion (GraSP);
2. remove the ``n_remove`` least important blocks -- really remove them: a shallower network is built and inherits the
   initial weights of the kept layers (paper, Appendix A.1);
3. train the subnetwork with the standard recipe for as many epochs as the dense network.

Controls: random block removal (the official ``random`` criterion) and the *filter ticket* of the standard structured
lottery ticket: GraSP filter scores at initialisation, the same fraction of the first convolution's filters removed in
every block (official ``rebuild_filters.rebuild_network``), the fraction chosen to give the filter ticket the layer
ticket's FLOPs.

GraSP (Wang et al. 2020) scores a weight by S = -theta * (H g) with H g the Hessian-gradient product of the loss at
temperature T; it removes the *largest* scores. A structure's score here is the sum of the scores of the weights its
removal deletes (first-order Taylor estimate of the change of the gradient norm). Note: a convolution followed by
batch normalisation in training mode is scale-invariant, so the sum of S over its weights equals ||g||^2 of those
weights exactly (Euler's theorem; checked in the tests): the GraSP block criterion removes the blocks whose weights
have the largest gradient norm.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATASETS = ("mnist5k", "digits", "mnist")
ARMS = ("dense", "layer_ticket", "random_layer", "filter_ticket")


# ---------------------------------------------------------------- data
def load_images(dataset: str, image_size: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(X_train (N, 1, s, s), y_train, X_test, y_test): a real image set (``reprolab.data.images.load_image_set``),
    split by a seeded permutation, resized to ``image_size`` by area averaging (never upsampled), and centred by the
    per-pixel training mean (official DeepPruning ``cifar_resnet_data``: x -= mean(x_train, axis=0))."""
    from reprolab.data.images import load_image_set

    X, y = load_image_set(dataset)  # (N, d) float32 in [0, 1]
    side = int(round(math.sqrt(X.shape[1])))
    if side * side != X.shape[1] or image_size > side:
        raise ValueError(f"image_size {image_size} must be <= the native side {side} of {dataset}")
    perm = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(test_fraction * len(X)))
    te, tr = perm[:n_test], perm[n_test:]
    imgs = torch.from_numpy(X).reshape(-1, 1, side, side)  # (N, 1, side, side)
    if image_size != side:
        imgs = F.interpolate(imgs, size=(image_size, image_size), mode="area")
    x_tr, x_te = imgs[tr], imgs[te]
    mean = x_tr.mean(0, keepdim=True)  # (1, 1, s, s)
    return x_tr - mean, torch.from_numpy(y[tr]).long(), x_te - mean, torch.from_numpy(y[te]).long()


# ---------------------------------------------------------------- model (DeepPruning template_architectures.ResNet)
def he_normal_(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keras ``he_normal``: truncated normal at +-2 std, std = sqrt(2 / fan_in) / 0.8796 (variance-preserving)."""
    fan_in = w[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        t = torch.empty(w.shape).normal_(generator=generator) if generator is not None else torch.randn(w.shape)
        while True:  # resample the tails (as Keras' truncated normal does)
            bad = t.abs() > 2
            if not bad.any():
                break
            t[bad] = torch.empty(int(bad.sum())).normal_(generator=generator)
        w.copy_(t * std)
    return w


class Block(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut (a 1x1 strided projection without BN where the shape
    changes, as in the template), then ReLU. ``mid`` is the first convolution's number of filters (filter pruning)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=True) if (stride != 1 or c_in != c_out) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, c_in, H, W)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (B, c_out, H', W')
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(s + y)  # y_i = f_i(y_{i-1}) + y_{i-1} (paper Eq. 2)


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016) as in DeepPruning's template: a 3x3 stem, three stages of ``blocks[s]`` residual
    blocks with ``width * 2**s`` channels (the first block of stages 2 and 3 halves the resolution), global average
    pooling and a linear classifier. ``mids``: per-block filters of the first convolution (default: the stage width)."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, blocks=(5, 5, 5), width: int = 16, mids=None,
                 generator: torch.Generator | None = None, init: bool = True):
        super().__init__()
        self.blocks_per_stage = tuple(int(b) for b in blocks)
        self.width = width
        self.stem = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stage_of, self.downsample = [], []
        layers, c_in, k = [], width, 0
        for s, n in enumerate(self.blocks_per_stage):
            c = width * 2 ** s
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                layers.append(Block(c_in, c if mids is None else int(mids[k]), c, stride))
                self.stage_of.append(s)
                self.downsample.append(stride != 1 or c_in != c)
                c_in, k = c, k + 1
        self.blocks = nn.ModuleList(layers)
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules() if init else ():  # init=False: a shell whose weights are copied in next
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                he_normal_(m.weight, generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def mids(self) -> list[int]:
        return [blk.conv1.out_channels for blk in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, in_ch, H, W)
        h = F.relu(self.stem_bn(self.stem(x)))
        for blk in self.blocks:
            h = blk(h)
        return self.fc(h.mean((2, 3)))  # (B, n_classes)


# ---------------------------------------------------------------- FLOPs (DeepPruning custom_functions.compute_flops)
def count_flops(net: nn.Module, image_size: int, in_ch: int = 1) -> int:
    """Multiply-accumulates of one forward pass, counted as the official ``compute_flops``: every convolution
    H_out * W_out * C_in * C_out * k_h * k_w, every dense layer in * out; batch norm, ReLU, additions, pooling and
    biases are not counted. Shapes are read from a forward pass (hooks)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total[0] += out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * m.out_channels * kh * kw
        else:
            total[0] += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_ch, image_size, image_size))
    finally:
        for h in hs:
            h.remove()
        net.train(was)
    return int(total[0])


def count_filters(net: ResNet) -> int:
    """Filters of every convolution (official ``count_filters``: the sum of Conv2D ``filters``)."""
    return int(sum(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)))


# ---------------------------------------------------------------- which blocks may go (rebuild_layers.py)
def removable_blocks(net: ResNet) -> list[int]:
    """Official ``add_to_pruneResNet``: every block whose input and output shapes agree, except the very first block;
    the downsampling blocks (first of stages 2 and 3) stay."""
    return [i for i in range(1, len(net.blocks)) if not net.downsample[i]]


def choose_blocks(importance, net: ResNet, n_remove: int) -> list[int]:
    """Official ``new_blocks``: visit the removable blocks from the least important up and remove one whenever its stage
    would still keep at least two blocks (``num_blocks[stage] - 1 > 1``), until ``n_remove`` are gone.
    ``importance``: one number per ``removable_blocks(net)`` entry (lower = removed first). Ties go to the earlier block."""
    cand = removable_blocks(net)
    if len(importance) != len(cand):
        raise ValueError(f"{len(importance)} scores for {len(cand)} removable blocks")
    left = list(net.blocks_per_stage)
    removed = []
    for j in sorted(range(len(cand)), key=lambda j: (float(importance[j]), j)):
        if len(removed) == n_remove:
            break
        s = net.stage_of[cand[j]]
        if left[s] - 1 > 1:
            left[s] -= 1
            removed.append(cand[j])
    if len(removed) < n_remove:
        raise ValueError(f"cannot remove {n_remove} blocks: at most {len(removed)} (two blocks stay in every stage)")
    return sorted(removed)


def remove_blocks(net: ResNet, removed) -> ResNet:
    """A new, shallower network without the ``removed`` blocks; every kept layer inherits its weights and batch-norm
    statistics (official ``transfer_weightsResNet``; paper Appendix A.1, Figure 2)."""
    removed = set(int(i) for i in removed)
    if any(net.downsample[i] or i == 0 for i in removed):
        raise ValueError("the first block and the downsampling blocks cannot be removed")
    kept = [i for i in range(len(net.blocks)) if i not in removed]
    per_stage = [sum(1 for i in kept if net.stage_of[i] == s) for s in range(len(net.blocks_per_stage))]
    new = ResNet(net.stem.in_channels, net.fc.out_features, per_stage, net.width, [net.mids[i] for i in kept],
                 init=False).to(next(net.parameters()).dtype)
    new.stem.load_state_dict(net.stem.state_dict())
    new.stem_bn.load_state_dict(net.stem_bn.state_dict())
    for j, i in enumerate(kept):
        new.blocks[j].load_state_dict(net.blocks[i].state_dict())
    new.fc.load_state_dict(net.fc.state_dict())
    return new


def prune_filters(net: ResNet, keep: dict) -> ResNet:
    """A new network whose block ``i`` keeps only the first-convolution filters ``keep[i]`` (a sorted index tensor):
    conv1's rows, bn1's entries and conv2's input channels are sliced (official ``rebuild_resnet``); all other weights
    are copied."""
    mids = [len(keep[i]) if i in keep else m for i, m in enumerate(net.mids)]
    new = ResNet(net.stem.in_channels, net.fc.out_features, net.blocks_per_stage, net.width, mids,
                 init=False).to(next(net.parameters()).dtype)
    new.load_state_dict({k: v for k, v in net.state_dict().items() if ".conv1." not in k and ".bn1." not in k
                         and ".conv2." not in k}, strict=False)
    with torch.no_grad():
        for i, (old, blk) in enumerate(zip(net.blocks, new.blocks)):
            idx = keep.get(i, torch.arange(old.conv1.out_channels))
            blk.conv1.weight.copy_(old.conv1.weight[idx])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(blk.bn1, name).copy_(getattr(old.bn1, name)[idx])
            blk.bn1.num_batches_tracked.copy_(old.bn1.num_batches_tracked)
            blk.conv2.weight.copy_(old.conv2.weight[:, idx])
    return new


# ---------------------------------------------------------------- GraSP (alecwangcq/GraSP pruner/GraSP.py)
def grasp_batch(x: torch.Tensor, y: torch.Tensor, n_classes: int, samples_per_class: int):
    """Official ``GraSP_fetch_data``: the first ``samples_per_class`` examples of every class in the given order,
    concatenated class by class (so the two halves GraSP uses hold different classes, as in the official code)."""
    xs, ys = [], []
    for c in range(n_classes):
        idx = torch.nonzero(y == c).flatten()[:samples_per_class]
        if len(idx) < samples_per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples")
        xs.append(x[idx])
        ys.append(y[idx])
    return torch.cat(xs), torch.cat(ys)


def _scored(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _grasp_copy(net: nn.Module, reinit_linear: bool, seed: int) -> tuple[nn.Module, list]:
    """The copy GraSP scores (its mode kept) and its scored modules; with ``reinit_linear`` the linear layers are
    re-initialised with Xavier normal from a generator seeded by ``seed`` (official ``reinit=True``)."""
    net = copy.deepcopy(net)
    mods = _scored(net)
    if reinit_linear:
        gen = torch.Generator().manual_seed(20_000 + seed)
        for _, m in mods:
            if isinstance(m, nn.Linear):
                fan_in, fan_out = m.weight.shape[1], m.weight.shape[0]
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out)))
    return net, mods


def grasp_scores(net: nn.Module, x: torch.Tensor, y: torch.Tensor, T: float = 200.0, reinit_linear: bool = True,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """S = -theta * Hg for the weight of every Conv2d and Linear, keyed by module name (official GraSP.py:49-140).

    On a copy of the network (its mode kept: training mode uses batch statistics): the linear layers are re-initialised
    with Xavier normal (``reinit=True``, seeded here), the batch is split in two halves, g = sum of the halves' gradients
    of the cross entropy of logits / T (detached), then for each half z = g . grad(L_half) (with graph) is
    back-propagated and the products accumulate: Hg = d(g . grad(L_1 + L_2)) / d theta."""
    net, mods = _grasp_copy(net, reinit_linear, seed)
    ws = [m.weight for _, m in mods]
    N = x.shape[0]
    halves = [(x[: N // 2], y[: N // 2]), (x[N // 2:], y[N // 2:])]
    g = None
    for xb, yb in halves:
        gp = torch.autograd.grad(F.cross_entropy(net(xb) / T, yb), ws)
        g = list(gp) if g is None else [a + b for a, b in zip(g, gp)]
    g = [t.detach() for t in g]
    hg = [torch.zeros_like(w) for w in ws]
    for xb, yb in halves:
        gf = torch.autograd.grad(F.cross_entropy(net(xb) / T, yb), ws, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(g, gf))
        for acc, h in zip(hg, torch.autograd.grad(z, ws)):
            acc += h
    return {n: (-w.detach() * h).detach() for (n, _), w, h in zip(mods, ws, hg)}


def block_scores(scores: dict, net: ResNet) -> torch.Tensor:
    """GraSP score of each block: sum of S over both of its 3x3 convolutions (the weights its removal deletes; the
    projection shortcut of a downsampling block is never removed). Higher = removed first (GraSP removes the largest)."""
    return torch.stack([scores[f"blocks.{i}.conv1"].sum() + scores[f"blocks.{i}.conv2"].sum()
                        for i in range(len(net.blocks))])


def filter_scores(scores: dict, net: ResNet) -> list[torch.Tensor]:
    """GraSP score of every first-convolution filter j of every block: sum of S over conv1[j] and over conv2[:, j]
    (the weights removing that filter deletes). Higher = removed first."""
    return [scores[f"blocks.{i}.conv1"].sum((1, 2, 3)) + scores[f"blocks.{i}.conv2"].sum((0, 2, 3))
            for i in range(len(net.blocks))]


def block_grad_norms(net: nn.Module, x: torch.Tensor, y: torch.Tensor, T: float = 200.0, reinit_linear: bool = True,
                     seed: int = 0) -> torch.Tensor:
    """||dL/dtheta_block||^2 over both 3x3 convolutions of every block, L = L_half1 + L_half2 at temperature T, on the
    same re-initialised copy as :func:`grasp_scores` -- with batch norm in training mode this equals the GraSP block
    score (scale invariance); shown beside it as a diagnostic."""
    net, _ = _grasp_copy(net, reinit_linear, seed)
    N = x.shape[0]
    loss = F.cross_entropy(net(x[: N // 2]) / T, y[: N // 2]) + F.cross_entropy(net(x[N // 2:]) / T, y[N // 2:])
    ws = [w for b in net.blocks for w in (b.conv1.weight, b.conv2.weight)]
    gs = torch.autograd.grad(loss, ws)
    return torch.stack([gs[2 * i].square().sum() + gs[2 * i + 1].square().sum() for i in range(len(net.blocks))])


# ---------------------------------------------------------------- filter ticket at equal FLOPs
def filters_removed(mids, q: float) -> list[int]:
    """Official ``rebuild_filters.rebuild_network``: round(q * n) filters go from every allowed layer (Python round)."""
    return [round(q * m) for m in mids]


def filter_fraction_for_flops(net: ResNet, target: int, image_size: int, grid: int = 1000) -> float:
    """The fraction q (on a grid of 1/grid) whose uniform filter removal gives FLOPs closest to ``target`` (ties: the
    smaller q). FLOPs depend only on how many filters each block keeps, not on which."""
    best, best_q, seen = None, 0.0, {}
    for k in range(grid):
        q = k / grid
        rm = tuple(filters_removed(net.mids, q))
        if any(r >= m for r, m in zip(rm, net.mids)):
            break
        if rm not in seen:
            mids = [m - r for m, r in zip(net.mids, rm)]
            shell = ResNet(net.stem.in_channels, net.fc.out_features, net.blocks_per_stage, net.width, mids, init=False)
            seen[rm] = count_flops(shell, image_size, net.stem.in_channels)
        d = abs(seen[rm] - target)
        if best is None or d < best:
            best, best_q = d, q
    return best_q


def filter_keep(fscores: list[torch.Tensor], q: float) -> dict[int, torch.Tensor]:
    """Per block, the sorted indices of the filters kept: the round(q * n) with the largest GraSP score go."""
    keep = {}
    for i, s in enumerate(fscores):
        r = round(q * len(s))
        order = torch.argsort(s, descending=True, stable=True)  # largest score first
        keep[i] = torch.sort(order[r:]).values
    return keep


# ---------------------------------------------------------------- training (GraSP main_prune_non_imagenet.train_once)
def lr_at(epoch: int, lr: float, epochs: int) -> float:
    """Official preset schedule: lr until epochs/2, then lr/10, then lr/100 from 3*epochs/4 (int() of each)."""
    if epoch >= int(epochs * 0.75):
        return lr * 0.01
    if epoch >= int(epochs * 0.5):
        return lr * 0.1
    return lr


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = net.training
    net.eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    net.train(was)
    return correct / len(x)


def train(net: nn.Module, data, *, epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
          order_seed: int) -> dict:
    """SGD with momentum and weight decay, the preset step schedule, cross entropy; the same minibatch order for every
    arm of a seed (``order_seed``). Returns per-epoch test accuracy, final train/test accuracy and the wall seconds of
    each epoch (kept out of metrics: wall clock goes to timings.json)."""
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(order_seed)
    curve, seconds = [], []
    net.train()
    for ep in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(ep, lr, epochs)
        perm = torch.randperm(len(x_tr), generator=gen)
        t0 = time.perf_counter()
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
        curve.append(accuracy(net, x_te, y_te))
    return {"test_acc": curve[-1], "train_acc": accuracy(net, x_tr, y_tr), "curve": curve, "seconds": seconds}


# ---------------------------------------------------------------- one seed, every arm
def run_seed(cfg: dict, seed: int, keep: bool = False) -> dict:
    """Dense network, GraSP layer ticket, random layer ticket and GraSP filter ticket at the layer ticket's FLOPs, all
    from the same initial weights, trained with the same recipe, epochs and minibatch order.

    Returns per arm: test/train accuracy, accuracy curve, FLOPs, parameters, filters, blocks; the block scores and the
    removed blocks; ``seconds`` (per-arm epoch wall times, for timings.json only). ``keep``: also the networks at
    initialisation, for the tests."""
    if not 1 <= cfg["n_remove"] <= 3 * (cfg["blocks"] - 2):
        raise ValueError(f"n_remove {cfg['n_remove']}: between 1 and 3 x (blocks - 2) = {3 * (cfg['blocks'] - 2)} "
                         "(the first block and the downsampling blocks stay, every stage keeps two blocks)")
    data = load_images(cfg["dataset"], cfg["image_size"], cfg["test_fraction"], seed)
    x_tr, y_tr = data[0], data[1]
    n_classes = int(y_tr.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    dense0 = ResNet(1, n_classes, [cfg["blocks"]] * 3, cfg["width"], generator=gen)
    order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(30_000 + seed))
    xg, yg = grasp_batch(x_tr[order], y_tr[order], n_classes, cfg["grasp_samples_per_class"])
    S = grasp_scores(dense0, xg, yg, cfg["grasp_T"], reinit_linear=True, seed=seed)
    bs = block_scores(S, dense0)  # (n_blocks,)
    cand = removable_blocks(dense0)
    removed = {"layer_ticket": choose_blocks([-float(bs[i]) for i in cand], dense0, cfg["n_remove"])}
    rng = np.random.default_rng(40_000 + seed)
    removed["random_layer"] = choose_blocks(rng.random(len(cand)).tolist(), dense0, cfg["n_remove"])
    nets = {"dense": copy.deepcopy(dense0),
            "layer_ticket": remove_blocks(dense0, removed["layer_ticket"]),
            "random_layer": remove_blocks(dense0, removed["random_layer"])}
    target = count_flops(nets["layer_ticket"], cfg["image_size"])
    q = filter_fraction_for_flops(dense0, target, cfg["image_size"])
    nets["filter_ticket"] = prune_filters(dense0, filter_keep(filter_scores(S, dense0), q))
    out = {"seed": seed, "block_scores": bs.tolist(), "removed": removed, "filter_fraction": q,
           "block_grad_norms": block_grad_norms(dense0, xg, yg, cfg["grasp_T"], True, seed).tolist(),
           "n_train": len(x_tr), "n_test": len(data[2]), "arms": {}, "seconds": {}}
    if keep:
        out["internals"] = {"init": {k: copy.deepcopy(v) for k, v in nets.items()}, "scores": S, "data": data,
                            "grasp_batch": (xg, yg)}
    for arm in ARMS:
        net = nets[arm]
        stats = {"flops": count_flops(net, cfg["image_size"]), "params": int(sum(p.numel() for p in net.parameters())),
                 "filters": count_filters(net), "blocks": list(net.blocks_per_stage)}
        r = train(net, data, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                  momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], order_seed=50_000 + seed)
        out["seconds"][arm] = r.pop("seconds")
        out["arms"][arm] = {**stats, **r}
    return out
