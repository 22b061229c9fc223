"""Editable Graph Neural Network (EGNN), Liu, Jiang, Chen, Hu et al., arXiv 2305.15529.

Model editing: a trained node classifier mispredicts node i; change the model so that node i gets label y_i, while the
predictions on every other node stay as they were. The paper's observation: plain gradient descent (GD) on the loss of
the edited node alone works for an MLP (little accuracy drop elsewhere) but wrecks a GNN (up to 50% drop), because
neighbour aggregation spreads the weight change to the whole graph. EGNN (the paper's eq. for the stitched model)

    f_EGNN(x_i) = GNN_frozen(G, X)_i + MLP(x_i)                                          (stitched logits)

keeps the GNN frozen and edits only the MLP, so an edit cannot propagate. Before any edit the MLP is fitted (the official
code: ``finetune_mlp``, 100 Adam steps on random batches of training nodes) with

    L = CE(GNN_i + MLP(x_i), y_i) + KL(softmax(GNN_i) || softmax(GNN_i + MLP(x_i)))      (locality term)

(``F.kl_div(log_prob, log_gnn, log_target=True, reduction="batchmean")`` as in the official code), which teaches the MLP
to stay close to the GNN's predictions. An edit is then repeated Adam steps on CE(GNN_i + MLP(x_i), y_i) of the target
node only, until its argmax equals the desired label or ``max_steps`` is reached.

The GD baselines (``edit_gd``) take the same Adam steps on all parameters of a GNN (full-graph forward) or of a plain MLP.
Every edit here is *independent*: it starts from a fresh copy of the same trained model (the paper's "independent"
setting), and the accuracy drop is measured on the test nodes (never edited: targets come from the validation split).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")

from .models import GCN, MLP  # noqa: E402


def train_full_batch(model: nn.Module, g, X: torch.Tensor, y: torch.Tensor, split: dict, *, epochs: int, lr: float,
                     weight_decay: float = 0.0) -> dict:
    """Adam on CE of the training nodes, full batch; keep the epoch of best validation accuracy (first on ties)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, state = {"val_acc": -1.0}, None
    for epoch in range(1, epochs + 1):
        model.train()
        loss = F.cross_entropy(model(g, X)[split["train"]], y[split["train"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(g, X).argmax(-1)
        va = float((pred[split["val"]] == y[split["val"]]).float().mean())
        if va > best["val_acc"]:
            best = {"val_acc": va, "test_acc": float((pred[split["test"]] == y[split["test"]]).float().mean()),
                    "epoch": epoch}
            state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    model.eval()
    return best


class StitchedGNN(nn.Module):
    """EGNN's model: frozen GNN logits plus an MLP on the node's own features, ``logits = GNN(G, X) + MLP(X)``.

    ``gnn_out`` caches the frozen GNN's logits of every node (the official ``fast_forward``), so an edit step costs
    one MLP forward on the edited node, with no message passing.
    """

    def __init__(self, gnn: nn.Module, mlp: nn.Module, g, X: torch.Tensor):
        super().__init__()
        self.gnn, self.mlp = copy.deepcopy(gnn), mlp  # a copy: the caller's GNN stays trainable (GD baseline)
        for p in self.gnn.parameters():
            p.requires_grad_(False)
        self.gnn.eval()
        with torch.no_grad():
            self.register_buffer("gnn_out", gnn(g, X).detach())  # (N, C)

    def fast_forward(self, X_idx: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.gnn_out[idx] + self.mlp(None, X_idx)  # (B, C)

    def forward(self, g, X: torch.Tensor) -> torch.Tensor:
        return self.gnn_out + self.mlp(None, X)  # (N, C); g unused: the GNN part is cached and frozen


def egnn_mlp_loss(out: torch.Tensor, log_gnn: torch.Tensor, y: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """CE(out, y) + kl_weight * KL(softmax(GNN) || softmax(out)), batch mean; ``log_gnn`` = log_softmax(GNN logits).

    ``F.kl_div(input=log q, target=log p, log_target=True)`` computes sum p (log p - log q): p = GNN, q = stitched.
    """
    ce = F.cross_entropy(out, y)
    kl = F.kl_div(F.log_softmax(out, -1), log_gnn, log_target=True, reduction="batchmean")
    return ce + kl_weight * kl


def fit_stitched_mlp(model: StitchedGNN, X: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor, *, iters: int,
                     batch_size: int, lr: float, kl_weight: float = 1.0, seed: int = 0) -> list[float]:
    """The official ``finetune_mlp``: ``iters`` Adam steps, each on ``batch_size`` training nodes drawn with
    replacement, loss CE(GNN + MLP, y) + kl_weight * KL(GNN || GNN + MLP). Returns the loss per step."""
    rng = np.random.default_rng(seed)
    log_gnn = F.log_softmax(model.gnn_out[train_idx], -1)  # (T, C)
    opt = torch.optim.Adam(model.mlp.parameters(), lr=lr)
    losses = []
    model.mlp.train()
    for _ in range(iters):
        b = torch.from_numpy(rng.choice(len(train_idx), batch_size))
        idx = train_idx[b]
        loss = egnn_mlp_loss(model.fast_forward(X[idx], idx), log_gnn[b], y[idx], kl_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.mlp.eval()
    return losses


def edit_gd(model: nn.Module, g, X: torch.Tensor, idx: int, label: int, *, lr: float, max_steps: int,
            params=None, stitched: bool = False) -> tuple[nn.Module, bool, int]:
    """One independent edit: a deep copy of ``model`` takes Adam steps on CE(logits_idx, label) over ``params``
    (names of parameters to edit; None = all trainable) with the official stopping rule: stop one step after
    argmax logits_idx == label (the prediction is taken before each step), or after ``max_steps``.

    ``stitched``: use ``fast_forward`` (EGNN, MLP only, no propagation); else a full-graph forward (GD on a GNN/MLP).
    Dropout is off (eval mode) so that an edit is deterministic. Returns (edited copy, success, steps taken).
    """
    m = copy.deepcopy(model)
    m.eval()
    named = dict(m.named_parameters())
    chosen = [p for n, p in named.items() if p.requires_grad and (params is None or n in params)]
    for p in m.parameters():
        p.requires_grad_(any(p is q for q in chosen))
    opt = torch.optim.Adam(chosen, lr=lr)
    i = torch.tensor([idx])
    target = torch.tensor([label])

    def logits_of_target():
        return m.fast_forward(X[i], i) if stitched else m(g, X)[i]  # (1, C)

    with torch.no_grad():
        if int(logits_of_target().argmax(-1)) == label:
            return m, True, 0
    # The official single_edit loop (henryzhongsc/gnn_editing pipelines/seed_gnn/utils.py:141-159): each step takes
    # the logits, the loss and the prediction, steps Adam, then stops if that prediction (from BEFORE the step) was
    # right: one Adam step after the flip, counted in `steps`; a flip made by the last allowed step is a failure.
    # (The pre-check above is the official bef_edit_check, utils.py:113-129 / edit(), 0 steps.)
    for step in range(1, max_steps + 1):
        out = logits_of_target()
        loss = F.cross_entropy(out, target)
        right = int(out.argmax(-1)) == label
        opt.zero_grad()
        loss.backward()
        opt.step()
        if right:
            return m, True, step
    return m, False, max_steps


@torch.no_grad()
def accuracy_on(model: nn.Module, g, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    model.eval()
    return float((model(g, X).argmax(-1)[idx] == y[idx]).float().mean())


def select_targets(model: nn.Module, g, X: torch.Tensor, y: torch.Tensor, val_idx: torch.Tensor, n: int,
                   seed: int = 0) -> torch.Tensor:
    """The official ``select_edit_target_nodes`` ("wrong2correct"): up to ``n`` validation nodes that ``model``
    misclassifies, in a seeded random order; each is edited towards its true label."""
    with torch.no_grad():
        pred = model(g, X).argmax(-1)
    wrong = val_idx[pred[val_idx] != y[val_idx]]
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(wrong)))
    return wrong[perm[:n]]


def run_edits(model: nn.Module, g, X, y, targets, test_idx, *, lr: float, max_steps: int, stitched: bool = False,
              params=None) -> dict:
    """Independent edits of every target from the same ``model``; per edit: success, steps, test accuracy after."""
    base = accuracy_on(model, g, X, y, test_idx)
    out = {"success": [], "steps": [], "test_acc": [], "drop": []}
    for t in targets.tolist():
        edited, ok, steps = edit_gd(model, g, X, t, int(y[t]), lr=lr, max_steps=max_steps, stitched=stitched,
                                    params=params)
        acc = accuracy_on(edited, g, X, y, test_idx)
        out["success"].append(bool(ok))
        out["steps"].append(steps)
        out["test_acc"].append(acc)
        out["drop"].append(base - acc)
    out["base_test_acc"] = base
    return out


__all__ = ["GCN", "MLP", "StitchedGNN", "accuracy_on", "edit_gd", "egnn_mlp_loss", "editing_experiment", "fit_stitched_mlp", "run_edits", "select_targets",
           "train_full_batch"]


def editing_experiment(data, seed: int, cfg: dict, progress=None) -> dict:
    """One seed of the paper's independent-editing evaluation on ``data`` (a ``NodeData``).

    Trains a GCN (``reprolab.graph.models.GCN``) and an MLP with the same width/depth/budget on one stratified split,
    fits EGNN's stitched MLP on the frozen GCN, then runs ``n_edits`` independent edits per arm:
    ``gd_gnn`` (all GCN weights, full-graph forward), ``gd_mlp`` (the MLP's own misclassified validation nodes),
    ``egnn`` (MLP of the stitched model only) and, if ``ablation_no_kl``, ``egnn_no_kl`` (stitched MLP fitted with
    CE only). Drops are in accuracy points against the frozen GCN (``gd_gnn``, ``egnn*``) or the MLP (``gd_mlp``).
    """
    from .graphdata import stratified_split

    g = data.graph_with_self_loops()
    X, y = data.X, data.y
    split = stratified_split(y, tuple(cfg["split"]), seed)
    C, d = data.num_classes, X.shape[1]
    arch = dict(n_layers=cfg["n_layers"], dropout=cfg["dropout"])
    torch.manual_seed(seed)
    gnn = GCN(d, cfg["hidden"], C, **arch)
    train_gnn = train_full_batch(gnn, g, X, y, split, epochs=cfg["epochs"], lr=cfg["lr"])
    torch.manual_seed(seed)
    mlp = MLP(d, cfg["hidden"], C, **arch)
    train_mlp = train_full_batch(mlp, g, X, y, split, epochs=cfg["epochs"], lr=cfg["lr"])
    stitched = {}
    for name, kl in [("egnn", cfg["kl_weight"])] + ([("egnn_no_kl", 0.0)] if cfg.get("ablation_no_kl") else []):
        torch.manual_seed(seed)
        st = StitchedGNN(gnn, MLP(d, cfg["hidden"], C, **arch), g, X)
        fit_stitched_mlp(st, X, y, split["train"], iters=cfg["mlp_iters"], batch_size=cfg["mlp_batch"],
                         lr=cfg["edit_lr"], kl_weight=kl, seed=seed)
        stitched[name] = st
    targets_gnn = select_targets(gnn, g, X, y, split["val"], cfg["n_edits"], seed)
    targets_mlp = select_targets(mlp, g, X, y, split["val"], cfg["n_edits"], seed)
    gnn_acc = accuracy_on(gnn, g, X, y, split["test"])
    arms = {"gd_gnn": (gnn, targets_gnn, False), "gd_mlp": (mlp, targets_mlp, False),
            **{k: (v, targets_gnn, True) for k, v in stitched.items()}}
    y_test = y[split["test"]]
    majority = float(torch.bincount(y_test, minlength=C).max()) / len(y_test)  # the trivial predictor's accuracy
    out = {"seed": seed, "gnn_test_acc": gnn_acc, "mlp_test_acc": accuracy_on(mlp, g, X, y, split["test"]),
           "test_majority_rate": majority,
           "gnn_epoch": train_gnn["epoch"], "mlp_epoch": train_mlp["epoch"], "arms": {}}
    for name, (model, targets, st) in (progress(arms.items()) if progress else arms.items()):
        r = run_edits(model, g, X, y, targets, split["test"], lr=cfg["edit_lr"], max_steps=cfg["max_edit_steps"],
                      stitched=st)
        ref = gnn_acc if name != "gd_mlp" else r["base_test_acc"]
        r["drop_points"] = [100.0 * (ref - a) for a in r["test_acc"]]  # vs the frozen GCN (official) or the MLP
        r["drop_vs_own_points"] = [100.0 * dr for dr in r["drop"]]  # vs the arm's own pre-edit model
        out["arms"][name] = r
    return out
