"""Weight Compander: A Simple Weight Reparameterization for Regularization (Cakaj, Mehnert, Yang), arXiv:2306.16993.

https://arxiv.org/abs/2306.16993 -- no official code is public (Papers with Code lists none; no repository found).
Every weight matrix W of the network is reparametrised as W = f(V): the optimiser updates V, the forward pass uses
f(V). The compander f is odd and bounded: it saturates large |v| (a weight cannot grow past alpha, "restricting the
magnitude of the weights") and has slope beta > 1 at zero (small weights are expanded, "forcing them away from
zero"); alpha and beta are learnable per layer ("we extend our method to learn the hyperparameters"). WC is used *on
top of* weight decay and dropout.

**The compander used here** (the paper's own equation could not be read offline, see the registry's deviations)::

    f(v) = alpha * tanh(beta * v / alpha)          # odd; |f| < alpha; f'(0) = beta; f(v) ~ beta v near 0

implemented with ``torch.nn.utils.parametrize`` (``Compander`` is the parametrization; its ``right_inverse`` makes
the network start from exactly the weights of the un-reparametrised network with the same seed).

The experiment: an MLP on a small real image set (scikit-learn digits, 300 training images), SGD with momentum,
weight decay and dropout. Both arms are tuned over the SAME grid, weight decay x dropout x learning rate
(``grid_cells``), on a validation split, each arm choosing its own cell by seed-mean validation accuracy; WC adds the
compander with ONE default initial (alpha, beta) (``alpha_init``, ``beta_init``), learned during training and never
searched (the paper's learned hyper-parameters "avoid hyperparameter search"). The learning rate is in the grid because
near zero f scales the effective step on W by about beta^2 at a fixed learning rate. The test split is used only for
the reported numbers.

The near-zero claim is tested against a static control: the baseline's trained weights passed through
alpha tanh(W / alpha) with WC's learned alpha (``static_control``), so that the part of the effect produced by the
bound of f alone (saturating the tails lowers the RMS) is not credited to WC's training.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

ARMS = ("baseline", "wc")


# ---------------------------------------------------------------- the compander
def compander(v: torch.Tensor, alpha, beta) -> torch.Tensor:
    """f(v) = alpha * tanh(beta * v / alpha): odd, |f(v)| < alpha, f'(0) = beta."""
    return alpha * torch.tanh(beta * v / alpha)


def compander_inverse(w: torch.Tensor, alpha, beta, margin: float = 1e-6) -> torch.Tensor:
    """v with f(v) = w, for |w| < alpha (|w| is clipped to (1 - margin) alpha first)."""
    r = torch.clamp(w / alpha, -1 + margin, 1 - margin)
    return alpha / beta * torch.atanh(r)


class Compander(nn.Module):
    """The parametrization W = f(V) with learnable alpha, beta (stored as logarithms: both stay positive).

    ``register_parametrization(layer, "weight", Compander(a, b))`` keeps V in
    ``layer.parametrizations.weight.original`` and recomputes ``layer.weight = f(V)`` at every access."""

    def __init__(self, alpha: float, beta: float, learnable: bool = True):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=learnable)
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)), requires_grad=learnable)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return compander(v, self.alpha, self.beta)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compander_inverse(w, self.alpha, self.beta)


# ---------------------------------------------------------------- model
class MLP(nn.Module):
    """d_in -> hidden[0] -> ... -> n_classes, ReLU, dropout ``p`` after every hidden activation (PyTorch init)."""

    def __init__(self, d_in: int, hidden: list[int], n_classes: int, p: float):
        super().__init__()
        dims = [d_in, *hidden, n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, d_in)
        for layer in self.layers[:-1]:
            x = F.dropout(F.relu(layer(x)), self.p, self.training)  # (B, hidden)
        return self.layers[-1](x)  # (B, n_classes)


def add_compander(model: MLP, alpha_mult: float, beta: float, learnable: bool = True) -> list[Compander]:
    """Reparametrise every weight matrix (not the biases) as W = f(V). alpha of layer l is ``alpha_mult`` times that
    layer's init bound 1/sqrt(fan_in), so that every initial weight lies inside (-alpha, alpha) when alpha_mult > 1
    and the network's initial function is unchanged (``right_inverse``)."""
    comps = []
    for layer in model.layers:
        bound = 1.0 / math.sqrt(layer.in_features)  # nn.Linear's kaiming_uniform(a=sqrt 5) bound
        comp = Compander(alpha_mult * bound, beta, learnable)
        parametrize.register_parametrization(layer, "weight", comp)
        comps.append(comp)
    return comps


def effective_weights(model: MLP) -> list[torch.Tensor]:
    """The weights the forward pass uses (f(V) under WC), one (out, in) matrix per layer."""
    with torch.no_grad():
        return [layer.weight.detach().clone() for layer in model.layers]


def near_zero_fraction(weights: list[torch.Tensor], tau: float) -> float:
    """Fraction of all weights with |w| < tau * RMS(w) of their own layer (scale-free: WC's alpha rescales layers)."""
    small = sum(int((w.abs() < tau * w.pow(2).mean().sqrt()).sum()) for w in weights)
    return small / sum(w.numel() for w in weights)


# ---------------------------------------------------------------- data
def split_data(X: np.ndarray, y: np.ndarray, n_train: int, n_val: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded permutation: the first n_train images train, the next n_val validate, all the rest test."""
    if n_train + n_val >= len(X):
        raise ValueError(f"n_train + n_val = {n_train + n_val} leaves no test images (N = {len(X)})")
    perm = np.random.default_rng(seed).permutation(len(X))
    parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    out = []
    for idx in parts:
        out += [torch.from_numpy(X[idx]).float(), torch.from_numpy(y[idx]).long()]
    return tuple(out)  # X_tr, y_tr, X_va, y_va, X_te, y_te


# ---------------------------------------------------------------- training
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in evaluation mode (dropout off)."""
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(-1) == y).double().mean())


def build_model(d_in: int, cfg: dict, seed: int, p: float,
                wc: tuple[float, float] | None = None) -> tuple[MLP, list[Compander]]:
    """The seed's MLP (the same initial effective weights for both arms: V = f^{-1}(W0) under WC) and its companders."""
    torch.manual_seed(seed)
    model = MLP(d_in, list(cfg["hidden"]), int(cfg["n_classes"]), p)
    comps = add_compander(model, *wc, learnable=cfg["learn_hyper"]) if wc else []
    return model, comps


def make_optimizer(model: MLP, comps: list[Compander], cfg: dict, wd: float, lr: float) -> torch.optim.SGD:
    """SGD with momentum: weight decay ``wd`` on the weights (V under WC) and biases; none on log alpha, log beta."""
    hyper = [t for c in comps for t in (c.log_alpha, c.log_beta)]
    ids = {id(t) for t in hyper}
    base = [t for t in model.parameters() if id(t) not in ids]
    groups = [{"params": base, "weight_decay": wd}]
    if cfg["learn_hyper"] and hyper:
        groups.append({"params": hyper, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"])


def train_one(data: tuple[torch.Tensor, ...], cfg: dict, seed: int, wd: float, p: float, lr: float,
              wc: tuple[float, float] | None = None, keep_model: bool = False, keep_weights: bool = False) -> dict:
    """Train one MLP from the seed's initialisation (the same for every arm and cell) and batch order.

    SGD with momentum and learning rate ``lr``; weight decay ``wd`` (coupled L2, on the optimised tensors: V under WC,
    and the biases); dropout ``p``; ``wc`` = (alpha_mult, beta) adds the compander (alpha, beta learnable, no weight
    decay on them). ``keep_weights`` returns the trained effective weights (for the static control)."""
    X_tr, y_tr, X_va, y_va, X_te, y_te = data
    model, comps = build_model(X_tr.shape[1], cfg, seed, p, wc)
    opt = make_optimizer(model, comps, cfg, wd, lr)
    g = torch.Generator().manual_seed(seed)
    n, bs = len(X_tr), int(cfg["batch_size"])
    for _ in range(int(cfg["epochs"])):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(X_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    W = effective_weights(model)
    out = {"train_acc": accuracy(model, X_tr, y_tr), "val_acc": accuracy(model, X_va, y_va),
           "test_acc": accuracy(model, X_te, y_te), "near_zero": near_zero_fraction(W, cfg["near_zero_tau"]),
           "alpha": [float(c.alpha) for c in comps], "beta": [float(c.beta) for c in comps]}
    if keep_model:
        out["model"] = model
    if keep_model or keep_weights:
        out["weights"] = W
    return out


def grid_cells(cfg: dict) -> list[tuple[float, float, float]]:
    """(weight decay, dropout, learning rate) cells: the grid of BOTH arms."""
    return list(itertools.product(cfg["wd_grid"], cfg["dropout_grid"], cfg["lr_grid"]))


def static_control(weights: list[torch.Tensor], alphas: list[float]) -> list[torch.Tensor]:
    """alpha_l tanh(W_l / alpha_l) per layer: the bound of the compander applied to (the baseline's) trained weights,
    without any training under WC -- the near-zero fraction this leaves is what f's shape alone explains."""
    return [a * torch.tanh(w / a) for w, a in zip(weights, alphas)]


def select(cells: list, val: dict) -> int:
    """Index of the cell with the best seed-mean validation accuracy (``val[seed][cell]``); first one on ties."""
    means = [np.mean([val[s][i] for s in val]) for i in range(len(cells))]
    return int(np.argmax(means))


def run_arm_grid(datas: dict, cfg: dict, cells: list, make_kw) -> dict:
    """Train every cell for every seed: ``{seed: [result per cell]}``; ``make_kw(cell)`` -> train_one kwargs."""
    return {s: [train_one(d, cfg, s, **make_kw(c)) for c in cells] for s, d in datas.items()}
