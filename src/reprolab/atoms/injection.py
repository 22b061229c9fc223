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
* Baseline: the EIP itself, calibrated: per EIP a least-squares scale and offset (E_ref ~ a E_EIP + b) fitted on the
  labelled cells; the arm is the EIP whose calibrated fit has the smallest energy MAE on the labelled cells (added
  after the review of issue 14: the SW-Vink stand-in is, on these near-harmonic cells, a rescaled Tersoff EIP).
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


def calibrate_eip(E_eip_lab: np.ndarray, E_ref_lab: np.ndarray) -> tuple[float, float]:
    """Least-squares scale a and offset b of E_ref ~ a * E_eip + b on the labelled cells (total energies)."""
    A = np.stack([np.asarray(E_eip_lab, float), np.ones(len(E_eip_lab))], 1)
    (a, b), *_ = np.linalg.lstsq(A, np.asarray(E_ref_lab, float), rcond=None)
    return float(a), float(b)


def calibrated_eip_arm(E_eip: np.ndarray, E_ref: np.ndarray, labelled: np.ndarray, E_eip_test: np.ndarray,
                       E_test: np.ndarray, n_atoms: int) -> dict:
    """The calibrated-EIP baseline: for each EIP k (rows of E_eip (K, C) / E_eip_test (K, T)) fit a, b on the
    labelled cells, pick the EIP with the smallest calibrated energy MAE on the labelled cells, and return its test
    energy MAE (meV/atom), its index and its a, b."""
    fits = [calibrate_eip(E_eip[k, labelled], E_ref[labelled]) for k in range(len(E_eip))]
    fit_mae = [np.abs(a * E_eip[k, labelled] + b - E_ref[labelled]).mean() for k, (a, b) in enumerate(fits)]
    k = int(np.argmin(fit_mae))
    a, b = fits[k]
    mae = float(np.abs(a * E_eip_test[k] + b - E_test).mean() / n_atoms * 1000)
    return {"energy_mae_mev": mae, "eip": k, "scale": a, "offset": b}


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
    """Energy MAE (meV/atom) and force-component MAE (eV/A) on a labelled set (no force MAE when F is None: a
    reference without forces)."""
    n = G.shape[1]
    if F is None:
        return {"energy_mae_mev": float(((_energy(model, G) - E).abs() / n).mean() * 1000)}
    Ep, Fp = model.energy_forces(G, J)
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
    # unlabelled cells whose reference label exists (all of them, or the reference subset): the diagnostics only
    unl_ref = np.setdiff1d(data.get("ref_idx", np.arange(len(G))), labelled)
    t = torch.as_tensor
    # weak labels: classifier trained on the labelled configurations only
    X = config_features(G)
    y = best_eip_labels(data["E_ref"][labelled] / n_atoms, data["E_eip"][:, labelled] / n_atoms, n_atoms)
    pick = fit_eip_classifier(X[labelled], y, seed)(X[unl])  # (U,)
    E_weak = data["E_eip"][pick, unl]
    F_weak = data["F_eip"][pick, unl]
    truth = best_eip_labels(data["E_ref"][unl_ref] / n_atoms, data["E_eip"][:, unl_ref] / n_atoms, n_atoms)
    pick_ref = pick[np.searchsorted(unl, unl_ref)]  # the classifier's choice on those cells
    # pre-training EIP: the one with the smallest energy MAE on the labelled set
    mae_eip = np.abs(data["E_eip"][:, labelled] - data["E_ref"][labelled][None]).mean(1)
    k_pt = int(mae_eip.argmin())
    J = J if J is not None else torch.zeros(len(G), 0)  # energies only (force_weight 0): no Jacobian needed
    L = (G[labelled], J[labelled], t(data["E_ref"][labelled]), t(data["F_ref"][labelled]), 1.0)
    U_weak = (G[unl], J[unl], t(E_weak), t(F_weak), cfg["weak_weight"])
    U_pt = (G, J, t(data["E_eip"][k_pt]), t(data["F_eip"][k_pt]), 1.0)  # the whole pool: EIP labels are cheap
    # the EIP itself as an arm, calibrated (scale + offset fitted on the labelled cells; review of issue 14); the raw
    # pre-training EIP's test error is kept as a diagnostic (eip_raw)
    n_te = data["test"][0].shape[1]
    eip_raw = float(np.abs(data["E_eip_test"][k_pt] - data["test"][2].numpy()).mean() / n_te * 1000)
    cal = calibrated_eip_arm(data["E_eip"], data["E_ref"], labelled, data["E_eip_test"], data["test"][2].numpy(), n_te)

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
    out["eip_itself"] = {"energy_mae_mev": cal["energy_mae_mev"]}
    out["eip_raw"] = {"energy_mae_mev": eip_raw}
    out["eip_calibration"] = {"eip": cal["eip"], "scale": cal["scale"], "offset": cal["offset"]}
    out["classifier_acc"] = float((pick_ref == truth).mean()) if len(unl_ref) else 0.0
    out["weak_label_mae_mev"] = (float(np.abs(data["E_eip"][pick_ref, unl_ref] - data["E_ref"][unl_ref]).mean() / n_atoms * 1000)
                                 if len(unl_ref) else 0.0)
    # the stronger premise of weak supervision (second review of issue 14): the weak labels must beat what the
    # reference-only NN already predicts on the same unlabelled referenced cells (else they only add noise to it)
    out["reference_only_pool_mae_mev"] = (float(((_energy(models["reference_only"], G[unl_ref])
                                                  - torch.as_tensor(data["E_ref"][unl_ref])).abs() / n_atoms).mean() * 1000)
                                          if len(unl_ref) else 0.0)
    out["pretrain_eip"] = k_pt
    # the trivial predictor: the labelled cells' mean per-atom reference energy, for every configuration
    e_mean = float((data["E_ref"][labelled] / n_atoms).mean())
    out["trivial_test_mae_mev"] = float(np.abs(data["test"][2].numpy() / n_atoms - e_mean).mean() * 1000)
    out["trivial_pool_mae_mev"] = float(np.abs(data["E_ref"][unl_ref] / n_atoms - e_mean).mean() * 1000) if len(unl_ref) else 0.0
    return out


def check_cfg(cfg: dict) -> None:
    """Refuse settings the code cannot honour, before any work (a ParamError, like reprolab.config's)."""
    from reprolab.config import ParamError

    if cfg["reference"] == "dft" and cfg["force_weight"] != 0:
        raise ParamError(f"eip_injection: force_weight must be 0 when reference is 'dft' (the DFT labels carry no "
                         f"forces); got force_weight={cfg['force_weight']!r}. Allowed: force_weight 0 with reference "
                         f"dft, any force_weight >= 0 with reference kumagai | sw | sw_vink | tersoff_ea")


def mixed_configs(n: int, seed: int, cfg: dict) -> list:
    """``n`` cells: a share ``wide_fraction`` (default 0) drawn with the wider, anharmonic ``wide_strain`` /
    ``wide_rattle`` (their own stream, seed + 10007), the rest with ``strain`` / ``rattle`` (stream ``seed``: with
    wide_fraction 0 exactly the cells of make_configs(n, seed)), shuffled together (stream seed + 20011) so that any
    prefix (the DFT-referenced subset) mixes both."""
    from .eip import make_configs

    n_wide = int(round(cfg.get("wide_fraction", 0.0) * n))
    cells = make_configs(n - n_wide, seed, strain=cfg["strain"], rattle=tuple(cfg["rattle"]))
    if n_wide == 0:
        return cells
    cells += make_configs(n_wide, seed + 10007, strain=cfg["wide_strain"], rattle=tuple(cfg["wide_rattle"]))
    return [cells[i] for i in np.random.default_rng(seed + 20011).permutation(n)]


def build_dataset(cfg: dict) -> dict:
    """Generate the train pool and test set, label them with the reference and every EIP, and featurize them.

    With ``reference: dft`` (:mod:`reprolab.atoms.dft`) only the first ``n_ref_pool`` pool cells and the test cells
    get reference energies (no forces); the other pool cells carry EIP labels only (E_ref is NaN there) and
    ``ref_idx`` lists the referenced pool cells, from which :func:`learning_curve` draws the labelled subsets."""
    from .bp import featurize
    from .eip import label_configs

    check_cfg(cfg)
    pool = mixed_configs(cfg["n_pool"], cfg["seed"], cfg)
    test = mixed_configs(cfg["n_test"], cfg["seed"] + 1, cfg)
    n_atoms = len(pool[0])
    dft_dropped = {"pool": 0, "test": 0}
    if cfg["reference"] == "dft":
        from . import dft

        dkw = dict(xc=cfg["dft_xc"], basis=cfg["dft_basis"], ke_cutoff=cfg.get("dft_ke_cutoff"),
                   smearing=cfg.get("dft_smearing", 0.0), level_shift=cfg.get("dft_level_shift", 0.0),
                   max_cycle=cfg.get("dft_max_cycle", 100))
        n_ref = min(cfg["n_ref_pool"], len(pool))
        E_sub, ok = dft.label_dft(pool[:n_ref], **dkw)
        ref_idx = np.arange(n_ref)[ok]  # non-converged SCFs are dropped (and counted), never labelled
        E_ref = np.full(len(pool), np.nan)
        E_ref[ref_idx] = E_sub[ok]
        F_ref = np.zeros((len(pool), n_atoms, 3))  # no reference forces (force_weight must be 0)
        E_te, ok_te = dft.label_dft(test, **dkw)
        test, E_te, F_te = [t for t, k in zip(test, ok_te) if k], E_te[ok_te], None
        dft_dropped = {"pool": int((~ok).sum()), "test": int((~ok_te).sum())}
        if len(ref_idx) < max(cfg.get("budgets", [0])) or not len(test):
            raise RuntimeError(f"too few converged DFT cells: {len(ref_idx)} pool, {len(test)} test ({dft_dropped} dropped)")
    else:
        ref_idx = np.arange(len(pool))
        E_ref, F_ref = label_configs(pool, cfg["reference"])
        E_te, F_te = label_configs(test, cfg["reference"])
    eip = [label_configs(pool, name) for name in cfg["eips"]]
    eip_test = [label_configs(test, name) for name in cfg["eips"]]
    G, J = featurize(pool, jacobian=cfg["force_weight"] > 0)
    Gt, Jt = featurize(test, jacobian=F_te is not None)
    flat = G.reshape(-1, G.shape[2])
    t = torch.as_tensor
    return dict(G=G, J=J, E_ref=E_ref, F_ref=F_ref, E_eip=np.stack([e for e, _ in eip]), ref_idx=ref_idx,
                F_eip=np.stack([f for _, f in eip]), test=(Gt, Jt, t(E_te), None if F_te is None else t(F_te)),
                E_eip_test=np.stack([e for e, _ in eip_test]), mu=flat.mean(0),
                sigma=flat.std(0) + 1e-8, eip_names=list(cfg["eips"]), pool=pool, test_configs=test,
                eip_test_mae_mev={n: float(np.abs(e - E_te).mean() / n_atoms * 1000) for n, (e, _) in zip(cfg["eips"], eip_test)},
                dft_dropped=dft_dropped,
                eip_test_force_mae=({} if F_te is None else
                                    {n: float(np.abs(f - F_te).mean()) for n, (_, f) in zip(cfg["eips"], eip_test)}))


def learning_curve(data: dict, cfg: dict) -> dict:
    """run_arms for every budget and seed; the labelled subset of seed s is drawn with numpy seed s (nested: the
    subsets of one seed grow with the budget)."""
    check_cfg(cfg)
    out = {}
    for seed in cfg["seeds"]:
        ref_idx = data.get("ref_idx", np.arange(len(data["G"])))
        order = ref_idx[np.random.default_rng(seed).permutation(len(ref_idx))]  # labelled cells: referenced ones
        pretrained: dict = {}
        for b in cfg["budgets"]:
            out[(b, seed)] = run_arms(data, np.sort(order[:b]), cfg, seed, pretrained)
    return out
