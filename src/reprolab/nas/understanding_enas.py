"""Understanding Neural Architecture Search Techniques (Adam & Lorraine, arXiv 1904.00438): ENAS vs random search with
weight sharing, the controller's hidden states, and the memory-buffer fix, on the NB-201 cell space (digits).

Official code: georgeadam/menas (``src/enas_pytorch``, a fork of carpedm20/ENAS-pytorch). Followed here:

* **ENAS controller** (``models/controller.py``): an LSTMCell (hidden 100), zero first input, one linear decoder per
  decision, logits ``tanh_c * tanh(logits / T)`` (2.5, 5.0), uniform(-0.1, 0.1) init with zero decoder biases, the
  next input = embedding of the sampled action (one embedding per decision *type*: here all 6 decisions are NB-201 ops,
  so one 5-token table). The parts are ``reprolab.nas.auto_gnn._LSTMPolicy`` / ``_sample`` (GraphNAS = same lineage).
* **REINFORCE** (``train_scripts/regular_trainer.py`` ``train_controller``): per-decision rewards ``R + entropy_coeff *
  entropy`` (entropy_mode 'reward'), EMA baseline per decision (0.95, first baseline = first reward), ``loss =
  sum(-log_prob * (reward - baseline))``, Adam, no grad clip, one architecture per step. ``R`` is the shared model's
  accuracy on one validation minibatch (the CNN reward of ENAS; the RNN code uses 80 / perplexity).
* **Training loop** (``Trainer.train``): epochs of a shared phase (each step: one architecture sampled from the
  controller trains the shared weights) then a controller phase (shared weights fixed).
* **Random search with weight sharing** (``train_scripts/random_trainer.py``; Li & Talwalkar): the shared weights are
  trained on uniformly sampled paths; no controller.
* **Deriving** (``Trainer.derive``): ``n_candidates`` architectures sampled (from the controller, or uniformly for random
  search), each evaluated with the shared weights on validation data, the best kept.
* **Memory buffer** (``regularized_controllers/supervised.py`` + ``train_scripts/supervised_trainer.py``): from epoch
  ``buffer_store_epoch`` on, each controller phase first generates ``buffer_generate`` architectures from the current
  controller and stores them (capacity 10,000); from epoch ``buffer_train_epoch`` on, every controller step adds to the
  REINFORCE loss a supervised loss: the controller, teacher-forced on 100 random stored architectures, predicts each
  decision from the previous ones (mean cross-entropy). This forces the hidden state to encode past decisions.
* **Hidden-state analysis** (``analysis/hidden_state_naive_similarity.py``): sample architectures from the trained
  controller, take the LSTM hidden state after the last step, and correlate (Spearman) the pairwise L2 distance of the
  hidden states with the pairwise edit distance of the architectures, over the distinct sampled architectures (the
  official 12-block RNN space practically never repeats one; the 6-decision NB-201 policy does).

Deviations (the registry lists them with file:line): NB-201 cells on digits instead of PTB RNN cells; Hamming edit
distance over the 6 edges (the NB-201 DAG is fixed, so graph edit distance with op substitutions is this count) instead
of networkx's optimize_graph_edit_distance; the supervised loss uses cross-entropy on the logits (the official code
applies CrossEntropyLoss to softmax probabilities, a double softmax) and feeds the same inputs as sampling (token
offsets, zero first input).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import space201
from .auto_gnn import _LSTMPolicy, _sample
from .space201 import N_EDGES, N_OPS

ARMS = ("random", "enas", "enas_buffer")


# -------------------------------------------------------------------------------------------------------- controller
class ENASController(_LSTMPolicy):
    """ENAS's LSTM controller over the NB-201 cell: 6 decisions (one op per edge, NASLib edge order). One embedding
    table for the single decision type (op), one decoder per decision, zero first input."""

    def __init__(self, hid: int = 100, temperature: float = 5.0, tanh_c: float = 2.5):
        super().__init__((N_OPS,), [N_OPS] * N_EDGES, hid=hid, temperature=temperature, tanh_c=tanh_c)

    def logits(self, h, k: int):
        return self.squash(self.decoders[k](h))  # (B, 5)

    def sample(self, rng: np.random.Generator):
        """One architecture: (cell, log_probs (6,), entropies (6,), final hidden state (hid,)). The hidden state is
        ``hidden[0]`` after the last LSTM step, as ``Controller.sample(return_hidden=True)``."""
        x, hc = self.zero_state()
        cell, logps, ents = [], [], []
        for k in range(N_EDGES):
            h, hc = self.step(x, hc)
            a, lp, e = _sample(self.logits(h, k), rng)
            cell.append(a), logps.append(lp), ents.append(e)
            x = self.embed(0, a)
        return tuple(cell), torch.stack(logps), torch.stack(ents), h[0]

    def teacher_forced_logits(self, cells: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every decision given the previous decisions of ``cells`` (B, 6) (batched teacher forcing with
        the same inputs as ``sample``)."""
        B = cells.shape[0]
        x = torch.zeros(B, self.hid)
        hc = (torch.zeros(B, self.hid), torch.zeros(B, self.hid))
        out = []
        for k in range(N_EDGES):
            h, hc = self.step(x, hc)
            out.append(self.logits(h, k))
            x = self.encoder(cells[:, k])
        return out

    def supervised_loss(self, cells: torch.Tensor) -> torch.Tensor:
        """The memory-buffer loss (``SupervisedController.predict_architectures``): mean cross-entropy of decisions
        1..5 given the earlier ones (decision 0 has no past), over the batch of stored architectures."""
        lg = self.teacher_forced_logits(cells)
        return torch.cat([F.cross_entropy(lg[k], cells[:, k], reduction="none") for k in range(1, N_EDGES)]).mean()

    @torch.no_grad()
    def hidden_states(self, n: int, rng: np.random.Generator):
        """``n`` sampled architectures and their final hidden states (``Trainer.derive_many(n, return_hidden=True)``)."""
        cells, hs, ents = [], [], []
        for _ in range(n):
            c, _, e, h = self.sample(rng)
            cells.append(c), hs.append(h), ents.append(e)
        return cells, torch.stack(hs).double().numpy(), torch.stack(ents).double().numpy()


def enas_reinforce_step(opt, logps, ents, R: float, state: dict, entropy_coeff: float = 1e-4,
                        baseline_decay: float = 0.95, extra_loss=None) -> np.ndarray:
    """One controller update as ENAS-pytorch ``train_controller`` (entropy_mode 'reward', discount 1, no clip):
    ``rewards = R + entropy_coeff * entropies`` per decision, EMA baseline, ``loss = sum(-log_prob * adv)`` (+ the
    memory buffer's supervised loss when given). Returns the advantages."""
    rewards = R + entropy_coeff * ents.detach().double().numpy()
    b = state.get("baseline")
    b = rewards if b is None else baseline_decay * b + (1 - baseline_decay) * rewards
    state["baseline"] = b
    adv = rewards - b
    loss = (-logps * torch.as_tensor(adv, dtype=logps.dtype)).sum()
    if extra_loss is not None:
        loss = loss + extra_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return adv


class MemoryBuffer:
    """Stored architectures (``SupervisedController.store_architectures`` / ``architectures``): append until
    ``capacity``; when full, the last ``batch`` entries are replaced by ``batch`` random new ones; a replay draws
    ``batch`` stored architectures without replacement."""

    def __init__(self, capacity: int = 10000, batch: int = 100):
        self.capacity, self.batch = capacity, batch
        self.cells: list[tuple] = []

    def store(self, cells, rng: np.random.Generator) -> None:
        cells = [tuple(int(o) for o in c) for c in cells]
        if len(self.cells) < self.capacity:
            self.cells += cells
        else:
            idx = rng.permutation(len(cells))[:self.batch]
            self.cells = self.cells[:-self.batch] + [cells[i] for i in idx]

    def replay(self, rng: np.random.Generator) -> torch.Tensor:
        idx = rng.permutation(len(self.cells))[:self.batch]
        return torch.tensor([self.cells[i] for i in idx], dtype=torch.long)  # (<=batch, 6)


# ------------------------------------------------------------------------------------------------ hidden-state analysis
def pairwise_upper(D: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(D.shape[0], k=1)
    return D[iu]


def distinct(cells, hiddens):
    """The first occurrence of every distinct architecture and its hidden state (the final hidden state is a
    deterministic function of the decisions, so a repeated architecture only adds (0, 0) pairs)."""
    first: dict = {}
    for i, c in enumerate(cells):
        first.setdefault(tuple(int(o) for o in c), i)
    idx = sorted(first.values())
    return [tuple(int(o) for o in cells[i]) for i in idx], np.asarray(hiddens, dtype=float)[idx]


def hidden_edit_spearman(cells, hiddens, unique: bool = False) -> float:
    """Spearman correlation, over all pairs i < j, between the L2 distance of the hidden states and the edit
    distance (edges whose op differs) of the architectures (``hidden_state_naive_similarity.py``). ``unique``: over
    the distinct architectures only (a partly collapsed policy repeats architectures; each repeated pair is a (0, 0)
    point that inflates the correlation mechanically)."""
    from scipy.stats import spearmanr

    if unique:
        cells, hiddens = distinct(cells, hiddens)
    H = np.asarray(hiddens, dtype=float)
    C = np.asarray(cells)
    dh = np.sqrt(((H[:, None, :] - H[None, :, :]) ** 2).sum(-1))
    de = (C[:, None, :] != C[None, :, :]).sum(-1)
    a, b = pairwise_upper(dh), pairwise_upper(de)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------- shared-weight eval
@torch.no_grad()
def child_val_acc(net, cell, X_calib, X, y) -> float:
    """Accuracy of child ``cell`` of the supernet with every BatchNorm recalibrated on ``X_calib`` (BigNAS cumulative
    recipe, as ``nas.bn.set_running_statistics(method='cumulative')`` on the extracted child), computed in place on
    the supernet (train-mode BN never reads running statistics, so training is unaffected)."""
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    moms = [m.momentum for m in bns]
    was = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    net(X_calib, tuple(cell))
    net.eval()
    acc = float((net(X, tuple(cell)).argmax(1) == y).double().mean())
    for m, mo in zip(bns, moms):
        m.momentum = mo
    net.train(was)
    return acc


@torch.no_grad()
def minibatch_reward(net, cell, X, y) -> float:
    """ENAS's reward: the shared model's accuracy on one validation minibatch, BN in training mode (batch statistics;
    the official controller phase keeps the shared model in train mode)."""
    was = net.training
    net.train()
    moms = []
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            moms.append(m.momentum)
            m.momentum = 0.0  # batch statistics, running statistics untouched
    acc = float((net(X, tuple(cell)).argmax(1) == y).double().mean())
    for m, mo in zip([m for m in net.modules() if isinstance(m, _BatchNorm)], moms):
        m.momentum = mo
    net.train(was)
    return acc


@torch.no_grad()
def mean_policy_entropy(ctrl: ENASController, n: int, seed: int) -> float:
    """Mean per-decision entropy of the controller's policy, averaged over ``n`` samples (a fixed sampling seed)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([ctrl.sample(rng)[2].double().mean() for _ in range(n)]))


# ---------------------------------------------------------------------------------------------------------- one arm
def run_arm(arm: str, seed: int, data: dict, cfg: dict, gt_cells=()) -> dict:
    """Train one supernet with ``arm``'s path sampler (and controller), derive its pick, evaluate the ground-truth
    cells with the shared weights. Same supernet init, batch order and candidate budget for every arm of a seed."""
    from .harness import train_model
    from .supernet201 import NB201SuperNet

    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")
    E, S, K = int(cfg["epochs"]), int(cfg["shared_steps"]), int(cfg["controller_steps"])
    torch.manual_seed(seed)
    net = NB201SuperNet(cfg["channels"], 1, 10, data["train"][0].shape[1])
    torch.manual_seed(10_000 + seed)
    ctrl = ENASController(cfg["ctrl_hid"], cfg["ctrl_temperature"], cfg["ctrl_tanh_c"])
    copt = torch.optim.Adam(ctrl.parameters(), lr=cfg["ctrl_lr"])
    rng = np.random.default_rng(seed)  # path sampling of the shared phase and candidates
    crng = np.random.default_rng(20_000 + seed)  # controller phase
    vgen = torch.Generator().manual_seed(30_000 + seed)
    Xv, yv = data["val"]
    buffer = MemoryBuffer(cfg["buffer_capacity"], cfg["buffer_batch"])
    state: dict = {}
    log = {"entropy": [mean_policy_entropy(ctrl, cfg["entropy_samples"], 40_000 + seed)], "reward": [],
           "sup_loss": [], "shared_cells": []}
    if arm != "random":
        c0, h0, _ = ctrl.hidden_states(cfg["hidden_samples"], np.random.default_rng(50_000 + seed))
        log["spearman_init"] = hidden_edit_spearman(c0, h0, unique=True)
        log["spearman_init_all"] = hidden_edit_spearman(c0, h0)

    def controller_phase(epoch: int):
        if arm == "enas_buffer" and epoch >= cfg["buffer_store_epoch"]:
            with torch.no_grad():
                buffer.store([ctrl.sample(crng)[0] for _ in range(cfg["buffer_generate"])], crng)
        perm = torch.randperm(len(yv), generator=vgen)
        for k in range(K):
            cell, logps, ents, _ = ctrl.sample(crng)
            i = perm[(k * cfg["reward_batch"]) % len(yv):][:cfg["reward_batch"]]
            if len(i) < cfg["reward_batch"]:
                i = torch.cat([i, perm[:cfg["reward_batch"] - len(i)]])
            R = minibatch_reward(net, cell, Xv[i], yv[i])
            extra = None
            if arm == "enas_buffer" and epoch >= cfg["buffer_train_epoch"] and buffer.cells:
                extra = ctrl.supervised_loss(buffer.replay(crng))
                log["sup_loss"].append(float(extra))
            enas_reinforce_step(copt, logps, ents, R, state, cfg["ctrl_entropy_coeff"], cfg["ctrl_baseline_decay"],
                                extra)
            log["reward"].append(R)
        log["entropy"].append(mean_policy_entropy(ctrl, cfg["entropy_samples"], 40_000 + seed))

    def loss_fn(model, x, y, step):
        if arm == "random":
            cell = tuple(int(o) for o in rng.integers(N_OPS, size=N_EDGES))
        else:
            with torch.no_grad():
                cell = ctrl.sample(rng)[0]
        log["shared_cells"].append(cell)
        return F.cross_entropy(model(x, cell), y)

    def on_step(step, model):
        if arm != "random" and (step + 1) % S == 0:
            controller_phase((step + 1) // S - 1)

    losses = train_model(net, data, E * S, loss_fn, lr=cfg["shared_lr"], momentum=0.9, nesterov=True,
                         weight_decay=cfg["shared_wd"], batch_size=cfg["batch_size"], seed=seed, on_step=on_step,
                         params=net.weight_parameters())
    # derive: n_candidates architectures, each evaluated with the shared weights (BN recalibrated) on validation
    Xc = data["train"][0][:cfg["calib"]]
    drng = np.random.default_rng(60_000 + seed)
    if arm == "random":
        cands = [tuple(int(o) for o in drng.integers(N_OPS, size=N_EDGES)) for _ in range(cfg["n_candidates"])]
    else:
        with torch.no_grad():
            cands = [ctrl.sample(drng)[0] for _ in range(cfg["n_candidates"])]
    cache: dict = {}
    for c in cands + list(gt_cells):
        if c not in cache:
            cache[c] = child_val_acc(net, c, Xc, Xv, yv)
    scores = [cache[c] for c in cands]
    best = cands[int(np.argmax(scores))]  # ties: the first drawn
    out = {"arm": arm, "seed": seed, "pick": best, "pick_val": cache[best], "candidates": cands,
           "candidate_val": scores, "unique_candidates": len(set(cands)), "gt_val": [cache[c] for c in gt_cells],
           "train_loss_last": float(np.mean(losses[-S:])), "entropy": log["entropy"], "reward": log["reward"],
           "sup_loss": log["sup_loss"], "buffer_size": len(buffer.cells),
           "shared_unique": len(set(log["shared_cells"]))}
    if arm != "random":
        cells, H, _ = ctrl.hidden_states(cfg["hidden_samples"], np.random.default_rng(50_000 + seed))
        out["spearman"] = hidden_edit_spearman(cells, H, unique=True)  # distinct architectures (review fix)
        out["spearman_all"] = hidden_edit_spearman(cells, H)  # with repeats, as first reported
        out["spearman_init"] = log["spearman_init"]
        out["spearman_init_all"] = log["spearman_init_all"]
        out["hidden_unique"] = len(set(cells))
    return out


def true_accuracy(cell, gt: dict, split: dict, seeds, cache: dict) -> tuple[float, bool]:
    """Seed-mean standalone test accuracy of ``cell`` with the ground truth's exact recipe (``gt['meta']``): read from
    the ground truth when the cell is among its cells (the same training, the same numbers), else trained here.
    Returns (accuracy, trained_here)."""
    from .groundtruth import train_cell

    cell = tuple(int(o) for o in cell)
    rec = next((c for c in gt["cells"] if tuple(c["cell"]) == cell), None)
    accs, trained = [], False
    for s in seeds:
        if rec is not None and str(s) in rec["test_acc"]:
            accs.append(float(rec["test_acc"][str(s)]))
            continue
        key = (cell, int(s))
        if key not in cache:
            cache[key] = train_cell(cell, split, int(s), gt["meta"])["test_acc"]
            trained = True
        accs.append(float(cache[key]))
    return float(np.mean(accs)), trained


def edit_distance_matrix(cells) -> np.ndarray:
    C = np.asarray(cells)
    return (C[:, None, :] != C[None, :, :]).sum(-1)


__all__ = ["ARMS", "ENASController", "enas_reinforce_step", "MemoryBuffer", "distinct", "hidden_edit_spearman",
           "child_val_acc", "minibatch_reward", "mean_policy_entropy", "run_arm", "true_accuracy", "space201"]
