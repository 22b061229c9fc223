"""A Model Zoo on Phase Transitions in Neural Networks (Schürholt, Meynent, Zhou, Lu, Yang, Borth),
arXiv 2504.18072, https://arxiv.org/abs/2504.18072; official code ModelZoos/PhaseTransitionModelZoo.

A zoo over a load x temperature grid (load-like: model width; temperature-like: batch size at a fixed learning rate and
a fixed number of epochs, as the official ResNet zoos), several seeds per cell; per cell the loss-landscape metrics of
Yang et al. (train loss, Hessian trace, Bezier mode connectivity ``mc`` between seeds, CKA between seeds' logits), a
phase per cell by the taxonomy's rule, and a downstream task: averaging two seeds' weights after permutation alignment
(weight matching, as the official ``align_models`` with rebasin's PermutationCoordinateDescent).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from reprolab.weightspace.landscape import (batched_cka, bezier_path, fit_bezier_many, flat, hessian_trace,
                                            linear_path, loss_and_error, mode_connectivity)

PHASES = ("I", "II", "III", "IV-A", "IV-B")  # Yang et al.; IV-A and IV-B both "phase IV" (trained, connected)
COARSE = {"I": "I", "II": "II", "III": "III", "IV-A": "IV", "IV-B": "IV"}


class MLP(nn.Module):
    """in -> width -> ... -> width -> out, ReLU, no biases (official ``model::use_bias False``), Kaiming-uniform init."""

    def __init__(self, d_in: int, width: int, d_out: int, depth: int = 2):
        super().__init__()
        dims = [d_in] + [width] * depth + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        for m in self.layers:
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")

    def forward(self, x):
        for i, m in enumerate(self.layers):
            x = m(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x  # (B, d_out) logits


# ------------------------------------------------------------------------------------------------ weight matching
def permute_mlp(weights: list[torch.Tensor], perms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply hidden-unit permutations: W_l <- P_l W_l P_{l-1}^T (rows of layer l, columns of layer l+1)."""
    out = [w.clone() for w in weights]
    for l, p in enumerate(perms):
        out[l] = out[l][p, :]
        out[l + 1] = out[l + 1][:, p]
    return out


def weight_matching(wa: list[torch.Tensor], wb: list[torch.Tensor], max_iter: int = 100,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Git Re-Basin weight matching (Ainsworth et al.; official git_re_basin.weight_matching): coordinate descent over
    the hidden layers in random order, each a linear assignment maximising sum_l <W_a, P W_b> over the two matrices
    the permutation touches, until no layer improves. Returns perms such that permute_mlp(wb, perms) ~ wa."""
    L = len(wa) - 1
    perms = [torch.arange(wa[l].shape[0]) for l in range(L)]
    for _ in range(max_iter):
        progress = False
        for l in torch.randperm(L, generator=generator).tolist():
            prev = wb[l] if l == 0 else wb[l][:, perms[l - 1]]  # (w, in) with the input side already permuted
            nxt = wb[l + 1] if l + 1 == L else wb[l + 1][perms[l + 1], :]  # (out, w) with its output side permuted
            A = wa[l] @ prev.T + wa[l + 1].T @ nxt  # (w, w): A[i, j] = similarity of unit i of a and unit j of b
            _, ci = linear_sum_assignment(A.numpy(), maximize=True)
            ci = torch.as_tensor(ci)
            old = float(A[torch.arange(len(ci)), perms[l]].sum())
            new = float(A[torch.arange(len(ci)), ci].sum())
            if new > old + 1e-12:
                progress = True
            perms[l] = ci
        if not progress:
            break
    return perms


def mlp_weights(model: MLP) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.layers]


def load_weights(model: MLP, ws: list[torch.Tensor]) -> MLP:
    with torch.no_grad():
        for m, w in zip(model.layers, ws):
            m.weight.copy_(w)
    return model


def average_aligned(ma: MLP, mb: MLP, generator: torch.Generator | None = None, align: bool = True
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(uniform average of a and the aligned b, aligned b's weights) (official average_models: align, then 1/n each)."""
    wa, wb = mlp_weights(ma), mlp_weights(mb)
    if align:
        wb = permute_mlp(wb, weight_matching(wa, wb, generator=generator))
    return [0.5 * (a + b) for a, b in zip(wa, wb)], wb


# ------------------------------------------------------------------------------------------------------- training
def train_model(X: torch.Tensor, y: torch.Tensor, width: int, batch_size: int, seed: int, cfg: dict) -> MLP:
    """One zoo member (official NNmodule): SGD momentum 0.9, weight decay, OneCycleLR(max_lr=lr) over a fixed number
    of epochs, shuffled mini-batches of ``batch_size``; the seed sets init and data order. (Reference for
    :func:`train_seeds`, which trains several seeds at once and is tested equal to this loop.)"""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLP(X.shape[1], width, int(y.max()) + 1, cfg["depth"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    steps = (len(X) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], epochs=cfg["epochs"], steps_per_epoch=steps)
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def train_seeds(X: torch.Tensor, y: torch.Tensor, width: int, batch_size: int, seeds: list[int], cfg: dict
                ) -> list[MLP]:
    """:func:`train_model` for several seeds at once: the seeds' weights stacked (S, out, in), batched matmuls, the
    sum of the seeds' mean losses (their parameters are disjoint, so each gets its own gradient) and one SGD/OneCycle
    optimiser (momentum and weight decay act elementwise): the same updates as separate runs, ~S x fewer Python steps."""
    d_out = int(y.max()) + 1
    inits, gens = [], []
    for s in seeds:
        torch.manual_seed(s)
        inits.append(MLP(X.shape[1], width, d_out, cfg["depth"]))
        gens.append(torch.Generator().manual_seed(s))
    W = [torch.stack([m.layers[l].weight.detach() for m in inits]).clone().requires_grad_(True)
         for l in range(len(inits[0].layers))]  # each (S, out, in)
    opt = torch.optim.SGD(W, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    steps = (len(X) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], epochs=cfg["epochs"], steps_per_epoch=steps)
    for _ in range(cfg["epochs"]):
        perms = torch.stack([torch.randperm(len(X), generator=g) for g in gens])  # (S, N)
        for i in range(0, len(X), batch_size):
            idx = perms[:, i:i + batch_size]  # (S, B)
            h = X[idx]  # (S, B, d)
            for l, w in enumerate(W):
                h = torch.bmm(h, w.transpose(1, 2))  # (S, B, out)
                if l < len(W) - 1:
                    h = torch.relu(h)
            # sum over seeds of each seed's mean loss (all seeds' batches have the same size)
            loss = nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]), y[idx].reshape(-1),
                                               reduction="sum") / idx.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return [load_weights(m, [w[k].detach() for w in W]) for k, m in enumerate(inits)]


def mlp_forward(theta: torch.Tensor, X: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """The :class:`MLP` as a function of its flat weight vector (parameters_to_vector order), without module calls."""
    i, h = 0, X
    for l, (o, n) in enumerate(shapes):
        w = theta[i:i + o * n].view(o, n)
        i += o * n
        h = h @ w.T
        if l < len(shapes) - 1:
            h = torch.relu(h)
    return h


def mlp_forward_many(theta: torch.Tensor, X: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`mlp_forward` for K weight vectors (K, P) on K input batches (K, B, d) -> (K, B, d_out), batched matmuls."""
    i, h = 0, X
    for l, (o, n) in enumerate(shapes):
        w = theta[:, i:i + o * n].reshape(-1, o, n)
        i += o * n
        h = torch.bmm(h, w.transpose(1, 2))
        if l < len(shapes) - 1:
            h = torch.relu(h)
    return h


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    out = model(X)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


# ------------------------------------------------------------------------------------------------------ phase rule
def assign_phase(train_loss: float, mc: float, cka: float, loss_threshold: float, mc_eps: float,
                 cka_threshold: float) -> str:
    """The taxonomy (Yang et al. 2021; official README's table): high train loss -> I (mc < -eps, a barrier) or II
    (otherwise); low train loss -> III (barrier) or IV (no barrier), split by CKA into IV-A (< threshold, dissimilar)
    and IV-B (similar)."""
    if train_loss > loss_threshold:
        return "I" if mc < -mc_eps else "II"
    if mc < -mc_eps:
        return "III"
    return "IV-B" if cka >= cka_threshold else "IV-A"


# ---------------------------------------------------------------------------------------------------- the zoo
def seed_pairs(seeds: list[int]) -> list[tuple[int, int]]:
    """Disjoint consecutive pairs (s0, s1), (s2, s3), ...: independent units for the averaging claims."""
    if len(seeds) % 2:
        raise ValueError("seeds must have an even length (disjoint pairs)")
    return [(seeds[i], seeds[i + 1]) for i in range(0, len(seeds), 2)]


def _hessian_batches(X, y, cfg):
    """The official hessian_batch_size x hessian_number_batches first training samples as ONE batch: PyHessian's
    dataloader_hv_product averages H_b v weighted by batch size, which equals H v of the mean loss over all of them."""
    n = cfg["hessian_batch_size"] * cfg["hessian_num_batches"]
    return [(X[:n], y[:n])]


def cell_metrics(data: dict, width: int, batch_size: int, cfg: dict) -> dict:
    """Train the cell's models (one per seed), then per model: train/test loss and accuracy, Hessian trace; per
    disjoint seed pair: Bezier and linear mc (train error), CKA of test logits, and the aligned (and plain) average."""
    Xtr, ytr, Xte, yte = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    d_out = int(ytr.max()) + 1
    models = dict(zip(cfg["seeds"], train_seeds(Xtr, ytr, width, batch_size, cfg["seeds"], cfg)))
    shapes = [tuple(m.weight.shape) for m in models[cfg["seeds"][0]].layers]
    fwd = lambda th, X: mlp_forward(th, X, shapes)  # noqa: E731
    h_batches = _hessian_batches(Xtr, ytr, cfg)
    per_model = {}
    for s, m in models.items():
        trl, tra = evaluate(m, Xtr, ytr)
        tel, tea = evaluate(m, Xte, yte)
        tr, _ = hessian_trace(m, h_batches, cfg["hessian_max_iter"], cfg["hessian_tol"],
                              torch.Generator().manual_seed(10_000 + s))
        per_model[s] = {"train_loss": trl, "train_acc": tra, "test_loss": tel, "test_acc": tea, "hessian_trace": tr}
    ts = np.linspace(0.0, 1.0, cfg["curve_num_points"])
    err_tr = lambda th: loss_and_error(fwd, th, Xtr, ytr)[1]  # noqa: E731
    loss_tr = lambda th: loss_and_error(fwd, th, Xtr, ytr)[0]  # noqa: E731
    new = lambda ws: load_weights(MLP(Xtr.shape[1], width, d_out, cfg["depth"]), ws)  # noqa: E731
    per_pair = {}
    pairs_ab = seed_pairs(cfg["seeds"])
    # the bends of all pairs trained at once (fit_bezier_many: the same updates as one fit_bezier run per pair)
    bends = fit_bezier_many(lambda th, X: mlp_forward_many(th, X, shapes),
                            torch.stack([flat(models[a]) for a, _ in pairs_ab]),
                            torch.stack([flat(models[b]) for _, b in pairs_ab]), Xtr, ytr,
                            [torch.Generator().manual_seed(20_000 + 97 * a + b) for a, b in pairs_ab],
                            cfg["curve_epochs"], cfg["curve_batch_size"], cfg["curve_lr"], cfg["curve_momentum"],
                            cfg["curve_weight_decay"])
    for k, (a, b) in enumerate(pairs_ab):
        ma, mb = models[a], models[b]
        th_a, th_b = flat(ma), flat(mb)
        th_m = bends[k]
        bez_err = bezier_path(err_tr, th_a, th_m, th_b, ts)
        bez_loss = bezier_path(loss_tr, th_a, th_m, th_b, ts)
        lin_err = linear_path(err_tr, th_a, th_b, ts)
        with torch.no_grad():
            fa, fb = ma(Xte).numpy(), mb(Xte).numpy()
        cka = batched_cka(fa, fb, cfg["cka_batch_size"], cfg["cka_num_batches"])
        w_avg, wb_aligned = average_aligned(ma, mb, torch.Generator().manual_seed(30_000 + a))
        w_plain, _ = average_aligned(ma, mb, align=False)
        with torch.no_grad():
            align_err = float((new(wb_aligned)(Xte) - mb(Xte)).abs().max())
        avl, ava = evaluate(new(w_avg), Xte, yte)
        pll, pla = evaluate(new(w_plain), Xte, yte)
        per_pair[f"{a}-{b}"] = {
            "mc_bezier_train_error": mode_connectivity(bez_err), "mc_bezier_train_loss": mode_connectivity(bez_loss),
            "mc_linear_train_error": mode_connectivity(lin_err), "bezier_train_error": bez_err,
            "linear_train_error": lin_err, "cka": cka,
            "avg_test_acc": ava, "avg_test_loss": avl, "plain_avg_test_acc": pla, "plain_avg_test_loss": pll,
            "ends_test_acc": 0.5 * (per_model[a]["test_acc"] + per_model[b]["test_acc"]),
            "ends_test_loss": 0.5 * (per_model[a]["test_loss"] + per_model[b]["test_loss"]),
            "ends_train_loss": 0.5 * (per_model[a]["train_loss"] + per_model[b]["train_loss"]),
            "ends_hessian_trace": 0.5 * (per_model[a]["hessian_trace"] + per_model[b]["hessian_trace"]),
            "align_max_logit_change": align_err,
        }
    pairs = list(per_pair.values())
    agg = {k: float(np.mean([per_model[s][k] for s in cfg["seeds"]]))
           for k in ("train_loss", "train_acc", "test_loss", "test_acc", "hessian_trace")}
    agg.update({k: float(np.mean([p[k] for p in pairs]))
                for k in ("mc_bezier_train_error", "mc_bezier_train_loss", "mc_linear_train_error", "cka")})
    agg["phase"] = assign_phase(agg["train_loss"], agg["mc_bezier_train_error"], agg["cka"], cfg["loss_threshold"],
                                cfg["mc_eps"], cfg["cka_threshold"])
    for p in pairs:
        p["phase"] = assign_phase(p["ends_train_loss"], p["mc_bezier_train_error"], p["cka"], cfg["loss_threshold"],
                                  cfg["mc_eps"], cfg["cka_threshold"])
    return {"width": width, "batch_size": batch_size, "per_model": {str(s): v for s, v in per_model.items()},
            "per_pair": per_pair, "mean": agg, "n_params": int(sum(p.numel() for p in models[cfg["seeds"][0]].parameters()))}


def run_zoo(data: dict, cfg: dict, progress=None) -> list[dict]:
    """Every (width, batch size) cell of the grid, in a fixed order."""
    grid = list(itertools.product(cfg["widths"], cfg["batch_sizes"]))
    it = progress(grid) if progress else grid
    return [cell_metrics(data, w, b, cfg) for w, b in it]


def split_digits(X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> dict:
    """A stratified train/test split (fixed by ``seed``), as float32 / int64 tensors."""
    from sklearn.model_selection import train_test_split

    Xa, Xb, ya, yb = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    t = torch.as_tensor
    return {"X_train": t(Xa), "y_train": t(ya), "X_test": t(Xb), "y_test": t(yb)}


def crossfit_phase(cell: dict, pair: str, cfg: dict, mc_eps: float | None = None) -> str:
    """The cell's phase for seed pair ``pair`` from the OTHER pairs' metrics only (cross-fitting: a pair never takes
    part in choosing the cells on which its own averaging gain is measured): mean over the other pairs of their
    endpoints' train loss, Bezier mc (train error) and CKA, then :func:`assign_phase`. With a single pair there is no
    other pair and the pair's own metrics are used (smoke only; flagged by the caller)."""
    others = [v for k, v in cell["per_pair"].items() if k != pair] or [cell["per_pair"][pair]]
    m = lambda key: float(np.mean([o[key] for o in others]))  # noqa: E731
    return assign_phase(m("ends_train_loss"), m("mc_bezier_train_error"), m("cka"), cfg["loss_threshold"],
                        cfg["mc_eps"] if mc_eps is None else mc_eps, cfg["cka_threshold"])


def phase_summary(cells: list[dict], pairs: list[str], cfg: dict, low: tuple[str, ...] = ("IV",),
                  high: tuple[str, ...] = ("I", "III"), mc_eps: float | None = None) -> dict:
    """Per seed pair: mean over the cells of the low-/high-barrier phase of the averaged model's and the endpoints'
    mean test accuracy and loss, the number of such cells and the number of distinct coarse phases in the grid; the
    cells' phases for a pair are cross-fitted (:func:`crossfit_phase`: from the other pairs' metrics)."""
    out = {}
    for pk in pairs:
        lab = [COARSE[crossfit_phase(c, pk, cfg, mc_eps)] for c in cells]
        row = {"n_distinct_phases_pair": len(set(lab))}
        for name, group in (("low", low), ("high", high)):
            sel = [c["per_pair"][pk] for c, ph in zip(cells, lab) if ph in group]
            row[f"n_cells_{name}"] = len(sel)
            for k in ("avg_test_acc", "ends_test_acc", "avg_test_loss", "ends_test_loss", "plain_avg_test_acc"):
                row[f"{name}_{k}"] = float(np.mean([s[k] for s in sel])) if sel else float("nan")
        out[pk] = row
    return out


def numeric_record(obj):
    """A copy for details.json (numbers only): phase labels -> their index in PHASES (key ``phase_code``), NaN dropped."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "phase":
                out["phase_code"] = PHASES.index(v)
            elif not (isinstance(v, float) and np.isnan(v)):
                out[k] = numeric_record(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [numeric_record(v) for v in obj]
    return obj
