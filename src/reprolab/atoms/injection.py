"""Knowledge injection from empirical interatomic potentials (EIPs) into a neural potential (Shui et al.,
NeurIPS 2022, https://arxiv.org/abs/2210.08047).

* Strategy 1, weak supervision (paper sec. 3.1): an auxiliary classifier, trained on the labelled configurations,
  predicts for every configuration which EIP is closest to the reference (smallest per-atom energy error); the
  unlabelled configurations get the energies of their predicted EIP, and the NN minimises
  L = mean_labelled (E_NN - E_ref)^2 + weak_weight * mean_unlabelled (E_NN - E_EIP(c))^2 (per-atom energies).
* Strategy 2, transfer learning (sec. 3.2): pre-train the NN on the EIP energies of the whole training pool (the
  EIP that is best on the labelled set), then fine-tune all its weights on the reference labels.
* Combined: pre-train as in 2, then fine-tune with the loss of 1.
* Baseline: the same NN trained on the reference labels only.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .bp import BPModel

ARMS = ("reference_only", "weak_supervision", "pretrain_finetune", "combined")


def config_features(G: torch.Tensor) -> np.ndarray:
    """Per-configuration classifier features: mean and std over atoms of the symmetry functions (C, 2D)."""
    return torch.cat([G.mean(1), G.std(1)], 1).numpy()


def best_eip_labels(E_ref: np.ndarray, E_eips: np.ndarray, n_atoms: int) -> np.ndarray:
    """Index of the EIP with the smallest per-atom energy error, per configuration. E_eips: (K, C)."""
    return np.abs(E_eips - E_ref[None]).argmin(0) if len(E_ref) else np.zeros(0, int)


def fit_eip_classifier(X: np.ndarray, y: np.ndarray, seed: int):
    """Multinomial logistic regression on standardised features; constant predictor if one class is present."""
    classes = np.unique(y)
    if len(classes) == 1:
        c = int(classes[0])
        return lambda Z: np.full(len(Z), c)
    with threadpool_limits(1):  # multi-threaded BLAS spins on a shared CPU
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed)).fit(X, y)
    return clf.predict


def train(model: BPModel, sets: list[tuple], epochs: int, lr: float, force_weight: float = 0.0, seed: int = 0):
    """Full-batch Adam on sum_s weight_s * [mean (E/N error)^2 + force_weight * mean (F error)^2].

    ``sets``: list of (G, J, E, F, weight); energies are totals, the loss uses per-atom energies.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = 0.0
        for G, J, E, F, w in sets:
            if len(G) == 0 or w == 0:
                continue
            n = G.shape[1]
            if force_weight > 0:
                Ep, Fp = model.energy_forces(G, J, create_graph=True)
                loss = loss + w * (((Ep - E) / n) ** 2).mean() + w * force_weight * ((Fp - F) ** 2).mean()
            else:
                loss = loss + w * (((model(G) - E) / n) ** 2).mean()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def _energy(model, G):
    return model(G)


def evaluate(model: BPModel, G, J, E, F) -> dict:
    """Energy MAE (meV/atom) and force-component MAE (eV/A) on a labelled set."""
    Ep, Fp = model.energy_forces(G, J)
    n = G.shape[1]
    return {"energy_mae_mev": float(((Ep.detach() - E).abs() / n).mean() * 1000),
            "force_mae": float((Fp.detach() - F).abs().mean())}


def run_arms(data: dict, labelled: np.ndarray, cfg: dict, seed: int, pretrained: dict | None = None) -> dict:
    """Train the four arms for one labelled subset and evaluate them on the test set.

    ``data``: G, J (train pool), E_ref, F_ref, E_eip (K, C), F_eip (K, C, N, 3), eip_names, test (G, J, E, F), mu, sigma.
    Every arm starts from the same initial weights (seeded) and gets the same epochs and learning rate.
    """
    G, J = data["G"], data["J"]
    n_atoms = G.shape[1]
    unl = np.setdiff1d(np.arange(len(G)), labelled)
    t = torch.as_tensor
    # weak labels: classifier trained on the labelled configurations only
    X = config_features(G)
    y = best_eip_labels(data["E_ref"][labelled] / n_atoms, data["E_eip"][:, labelled] / n_atoms, n_atoms)
    pick = fit_eip_classifier(X[labelled], y, seed)(X[unl])  # (U,)
    E_weak = data["E_eip"][pick, unl]
    F_weak = data["F_eip"][pick, unl]
    truth = best_eip_labels(data["E_ref"][unl] / n_atoms, data["E_eip"][:, unl] / n_atoms, n_atoms)
    # pre-training EIP: the one with the smallest energy MAE on the labelled set
    mae_eip = np.abs(data["E_eip"][:, labelled] - data["E_ref"][labelled][None]).mean(1)
    k_pt = int(mae_eip.argmin())
    J = J if J is not None else torch.zeros(len(G), 0)  # energies only (force_weight 0): no Jacobian needed
    L = (G[labelled], J[labelled], t(data["E_ref"][labelled]), t(data["F_ref"][labelled]), 1.0)
    U_weak = (G[unl], J[unl], t(E_weak), t(F_weak), cfg["weak_weight"])
    U_pt = (G, J, t(data["E_eip"][k_pt]), t(data["F_eip"][k_pt]), 1.0)  # the whole pool: EIP labels are cheap

    torch.manual_seed(seed)
    init = BPModel(G.shape[2], cfg["hidden"], cfg["layers"], data["mu"], data["sigma"])
    kw = dict(epochs=cfg["epochs"], force_weight=cfg["force_weight"], seed=seed)
    models = {}
    models["reference_only"] = train(copy.deepcopy(init), [L], lr=cfg["lr"], **kw)
    models["weak_supervision"] = train(copy.deepcopy(init), [L, U_weak], lr=cfg["lr"], **kw)
    key = (k_pt, seed)
    if pretrained is not None and key in pretrained:
        pre = pretrained[key]  # same pool, EIP and init: pre-training does not depend on the labelled subset
    else:
        pre = train(copy.deepcopy(init), [U_pt], lr=cfg["lr"], **{**kw, "epochs": cfg["pretrain_epochs"]})
        if pretrained is not None:
            pretrained[key] = pre
    models["pretrain_finetune"] = train(copy.deepcopy(pre), [L], lr=cfg["finetune_lr"], **kw)
    models["combined"] = train(copy.deepcopy(pre), [L, U_weak], lr=cfg["finetune_lr"], **kw)
    out = {arm: evaluate(m, *data["test"]) for arm, m in models.items()}
    out["pretrained_only"] = evaluate(pre, *data["test"])
    out["classifier_acc"] = float((pick == truth).mean()) if len(unl) else 0.0
    out["weak_label_mae_mev"] = float(np.abs(E_weak - data["E_ref"][unl]).mean() / n_atoms * 1000) if len(unl) else 0.0
    out["pretrain_eip"] = k_pt
    # the trivial predictor: the labelled cells' mean per-atom reference energy, for every configuration
    e_mean = float((data["E_ref"][labelled] / n_atoms).mean())
    out["trivial_test_mae_mev"] = float(np.abs(data["test"][2].numpy() / n_atoms - e_mean).mean() * 1000)
    out["trivial_pool_mae_mev"] = float(np.abs(data["E_ref"][unl] / n_atoms - e_mean).mean() * 1000) if len(unl) else 0.0
    return out


def build_dataset(cfg: dict) -> dict:
    """Generate the train pool and test set, label them with the reference and every EIP, and featurize them."""
    from .bp import featurize
    from .eip import label_configs, make_configs

    kw = dict(strain=cfg["strain"], rattle=tuple(cfg["rattle"]))
    pool = make_configs(cfg["n_pool"], cfg["seed"], **kw)
    test = make_configs(cfg["n_test"], cfg["seed"] + 1, **kw)
    E_ref, F_ref = label_configs(pool, cfg["reference"])
    E_te, F_te = label_configs(test, cfg["reference"])
    eip = [label_configs(pool, name) for name in cfg["eips"]]
    eip_test = [label_configs(test, name) for name in cfg["eips"]]
    G, J = featurize(pool, jacobian=cfg["force_weight"] > 0)
    Gt, Jt = featurize(test, jacobian=True)
    flat = G.reshape(-1, G.shape[2])
    t = torch.as_tensor
    return dict(G=G, J=J, E_ref=E_ref, F_ref=F_ref, E_eip=np.stack([e for e, _ in eip]),
                F_eip=np.stack([f for _, f in eip]), test=(Gt, Jt, t(E_te), t(F_te)), mu=flat.mean(0),
                sigma=flat.std(0) + 1e-8, eip_names=list(cfg["eips"]), pool=pool, test_configs=test,
                eip_test_mae_mev={n: float(np.abs(e - E_te).mean() / G.shape[1] * 1000) for n, (e, _) in zip(cfg["eips"], eip_test)},
                eip_test_force_mae={n: float(np.abs(f - F_te).mean()) for n, (_, f) in zip(cfg["eips"], eip_test)})


def learning_curve(data: dict, cfg: dict) -> dict:
    """run_arms for every budget and seed; the labelled subset of seed s is drawn with numpy seed s (nested: the
    subsets of one seed grow with the budget)."""
    out = {}
    for seed in cfg["seeds"]:
        order = np.random.default_rng(seed).permutation(len(data["G"]))
        pretrained: dict = {}
        for b in cfg["budgets"]:
            out[(b, seed)] = run_arms(data, np.sort(order[:b]), cfg, seed, pretrained)
    return out
