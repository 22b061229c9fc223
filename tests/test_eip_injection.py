"""EIP knowledge injection (arXiv 2210.08047): the NN potential, its descriptors, the EIP labels and the strategies."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from reprolab.atoms.bp import BPModel, SymFuncs, descriptors, featurize, neighbours
from reprolab.atoms.eip import EIPS, eip_calculator, make_configs
from reprolab.atoms.injection import best_eip_labels, fit_eip_classifier, learning_curve, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sw_by_hand(pos, p):
    """Stillinger & Weber (PRB 31, 5262) written out: sum_{i<j} phi2 + sum_i sum_{j<k} phi3 (non-periodic)."""
    eps, sig, A, B, P, a, lam, gam = (p[k] for k in ("epsilon", "sigma", "A", "B", "p", "a", "lambda1", "gamma"))
    n, E = len(pos), 0.0
    d = lambda i, j: np.linalg.norm(pos[j] - pos[i])  # noqa: E731
    for i in range(n):
        for j in range(i + 1, n):
            r = d(i, j)
            if r < a * sig:
                E += A * eps * (B * (sig / r) ** P - 1.0) * np.exp(sig / (r - a * sig))
    for i in range(n):
        for j in range(n):
            for k in range(j + 1, n):
                if i in (j, k):
                    continue
                rij, rik = d(i, j), d(i, k)
                if rij < a * sig and rik < a * sig:
                    cos = np.dot(pos[j] - pos[i], pos[k] - pos[i]) / (rij * rik)
                    E += lam * eps * (cos + 1 / 3) ** 2 * np.exp(gam * sig / (rij - a * sig)) * np.exp(gam * sig / (rik - a * sig))
    return E


@pytest.mark.parametrize("name", ["sw", "sw_vink"])
def test_sw_calculator_equals_hand_formula(name):
    pos2 = np.array([[0.0, 0.0, 0.0], [2.3, 0.1, 0.0]])
    pos3 = np.array([[0.0, 0.0, 0.0], [2.35, 0.0, 0.0], [0.7, 2.2, 0.3]])
    for pos in (pos2, pos3):
        at = Atoms("Si" * len(pos), positions=pos + 10.0, cell=[30, 30, 30], pbc=False)
        at.calc = eip_calculator(name)
        assert at.get_potential_energy() == pytest.approx(_sw_by_hand(pos, EIPS[name][1]), rel=1e-9, abs=1e-9)
    # the 3-atom energy is not the sum of pair energies (the three-body term is on)
    pair = _sw_by_hand(pos3, {**EIPS[name][1], "lambda1": 0.0})
    assert abs(_sw_by_hand(pos3, EIPS[name][1]) - pair) > 1e-3


def test_eip_forces_are_minus_energy_gradient():
    at = make_configs(1, 3)[0]
    at.calc = eip_calculator("kumagai")
    F = at.get_forces()
    h, k = 1e-5, (2, 1)
    for s in (+1, -1):
        b = at.copy(); b.calc = eip_calculator("kumagai"); b.positions[k] += s * h
        if s > 0:
            ep = b.get_potential_energy()
        else:
            em = b.get_potential_energy()
    assert -(ep - em) / (2 * h) == pytest.approx(F[k], abs=1e-5)


def test_nn_forces_match_finite_differences():
    torch.manual_seed(0)
    at = make_configs(1, 5)[0]
    G, J = featurize([at])
    model = BPModel(G.shape[2], hidden=8, mu=G[0].mean(0), sigma=G[0].std(0) + 1e-3)
    E, F = model.energy_forces(G, J)
    assert torch.allclose(E[0], model.energy_from_positions(at))
    pos0 = torch.as_tensor(at.positions, dtype=torch.float64)
    h = 1e-5
    for a, x in [(0, 0), (3, 2), (7, 1)]:
        dp = torch.zeros_like(pos0); dp[a, x] = h
        fd = -(model.energy_from_positions(at, pos0 + dp) - model.energy_from_positions(at, pos0 - dp)) / (2 * h)
        assert float(F[0, a, x]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_descriptors_invariant_to_rotation_translation_permutation():
    at = make_configs(1, 7)[0]
    sf = SymFuncs()
    G = descriptors(torch.as_tensor(at.positions), torch.as_tensor(at.cell.array), neighbours(at, sf.rc))
    rot = at.copy()
    rot.rotate(37, (1, 2, 3), rotate_cell=True)
    rot.translate([0.3, -1.1, 2.0])
    Gr = descriptors(torch.as_tensor(rot.positions), torch.as_tensor(rot.cell.array), neighbours(rot, sf.rc))
    torch.testing.assert_close(Gr, G, rtol=1e-9, atol=1e-9)
    perm = np.random.default_rng(0).permutation(len(at))
    pa = at[perm]
    Gp = descriptors(torch.as_tensor(pa.positions), torch.as_tensor(pa.cell.array), neighbours(pa, sf.rc))
    torch.testing.assert_close(Gp, G[perm], rtol=1e-9, atol=1e-9)
    # the ideal crystal: every atom is equivalent; a rattled one is not
    ideal = bulk("Si", "diamond", a=5.431, cubic=True)
    Gi = descriptors(torch.as_tensor(ideal.positions), torch.as_tensor(ideal.cell.array), neighbours(ideal, sf.rc))
    assert torch.allclose(Gi, Gi[:1].expand_as(Gi)) and not torch.allclose(G, G[:1].expand_as(G))
    # radial G2 at the ideal crystal: 4 nearest neighbours at a*sqrt(3)/4, 12 at a/sqrt(2) (hand count; the
    # second shell, 3.84 A, lies just beyond rc = 3.8 A)
    r1, r2 = 5.431 * np.sqrt(3) / 4, 5.431 / np.sqrt(2)
    fc = lambda r: 0.5 * (np.cos(np.pi * r / sf.rc) + 1) if r < sf.rc else 0.0  # noqa: E731
    g2 = [4 * np.exp(-sf.eta_r * (r1 - rs) ** 2) * fc(r1) + 12 * np.exp(-sf.eta_r * (r2 - rs) ** 2) * fc(r2) for rs in sf.rs]
    np.testing.assert_allclose(Gi[0, :len(sf.rs)].numpy(), g2, rtol=1e-9)


def test_best_eip_and_classifier():
    E_ref = np.array([0.0, 1.0, 2.0])
    E_eips = np.array([[0.1, 5.0, 2.05], [0.5, 1.1, 9.0]])
    np.testing.assert_array_equal(best_eip_labels(E_ref, E_eips, 8), [0, 1, 0])
    X = np.r_[np.zeros((5, 2)), np.ones((5, 2))]
    y = np.r_[np.zeros(5, int), np.ones(5, int)]
    assert (fit_eip_classifier(X, y, 0)(X) == y).all()
    assert (fit_eip_classifier(X, np.full(10, 2), 0)(X) == 2).all()


def test_training_fits_and_pretraining_helps_on_a_tiny_problem():
    """A few labels from a linear-in-descriptor target: pre-training on a close 'EIP' target must lower test error."""
    torch.manual_seed(0)
    G = torch.randn(120, 4, 3, dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    E = torch.tanh(G @ w).sum(1)
    E_eip = E + 0.05 * torch.randn(120, dtype=torch.float64)
    J = torch.zeros(120, 0)
    lab, test = slice(0, 4), slice(60, 120)
    m0 = BPModel(3, hidden=8)
    ref = train(BPModel(3, hidden=8), [(G[lab], J[lab], E[lab], None, 1.0)], epochs=300, lr=1e-2)
    pre = train(BPModel(3, hidden=8), [(G[:60], J[:60], E_eip[:60], None, 1.0)], epochs=300, lr=1e-2)
    pre = train(pre, [(G[lab], J[lab], E[lab], None, 1.0)], epochs=300, lr=3e-3)
    mae = lambda m: float((m(G[test]).detach() - E[test]).abs().mean())  # noqa: E731
    assert mae(pre) < 0.5 * mae(ref) < mae(m0)


def test_learning_curve_smoke_is_deterministic():
    from reprolab.atoms.injection import build_dataset
    cfg = dict(seed=0, seeds=[0], n_pool=16, n_test=6, strain=0.03, rattle=[0.02, 0.1], reference="kumagai",
               eips=["sw", "tersoff_ea"], budgets=[4], hidden=8, layers=1, epochs=20, pretrain_epochs=20, lr=1e-2,
               finetune_lr=3e-3, weak_weight=1.0, force_weight=0.0)
    data = build_dataset(cfg)
    a, b = learning_curve(data, cfg), learning_curve(data, cfg)
    assert a == b
    r = a[(4, 0)]
    assert set(r) >= {"reference_only", "weak_supervision", "pretrain_finetune", "combined"}
    assert 0.0 <= r["classifier_acc"] <= 1.0
    # the trivial predictor (the labelled cells' mean per-atom energy), recomputed by hand
    n = data["G"].shape[1]
    lab = np.sort(np.random.default_rng(0).permutation(16)[:4])
    e = np.mean(data["E_ref"][lab] / n)
    unl = np.setdiff1d(np.arange(16), lab)
    assert abs(r["trivial_test_mae_mev"] - 1000 * np.mean(np.abs(data["test"][2].numpy() / n - e))) < 1e-9
    assert abs(r["trivial_pool_mae_mev"] - 1000 * np.mean(np.abs(data["E_ref"][unl] / n - e))) < 1e-9


def test_eip_itself_arm_is_the_calibrated_eip_by_lstsq():
    """The EIP-itself baseline arm (review of issue 14): per EIP a scale + offset fitted by numpy.linalg.lstsq on the
    labelled cells, the EIP whose calibrated fit has the smallest labelled MAE, its calibrated test MAE by hand; the raw
    pre-training EIP (smallest raw labelled MAE) stays the diagnostic eip_raw."""
    from reprolab.atoms.eip import label_configs
    from reprolab.atoms.injection import build_dataset, run_arms
    cfg = dict(seed=0, seeds=[0], n_pool=12, n_test=5, strain=0.03, rattle=[0.02, 0.1], reference="sw_vink",
               eips=["kumagai", "tersoff_ea"], budgets=[4], hidden=8, layers=1, epochs=5, pretrain_epochs=5, lr=1e-2,
               finetune_lr=3e-3, weak_weight=1.0, force_weight=0.0)
    data = build_dataset(cfg)
    lab = np.array([1, 4, 7, 9])
    r = run_arms(data, lab, cfg, seed=0)
    E_ref_te = label_configs(data["test_configs"], "sw_vink")[0]
    n = len(data["pool"][0])
    E_lab = [label_configs([data["pool"][i] for i in lab], e)[0] for e in cfg["eips"]]
    E_te = [label_configs(data["test_configs"], e)[0] for e in cfg["eips"]]
    k_raw = int(np.argmin([np.mean(np.abs(E - data["E_ref"][lab])) for E in E_lab]))
    assert r["pretrain_eip"] == k_raw
    assert abs(r["eip_raw"]["energy_mae_mev"] - 1000 * np.mean(np.abs(E_te[k_raw] - E_ref_te)) / n) < 1e-9
    fits = [np.linalg.lstsq(np.c_[E, np.ones(len(E))], data["E_ref"][lab], rcond=None)[0] for E in E_lab]
    k = int(np.argmin([np.mean(np.abs(a * E + b - data["E_ref"][lab])) for (a, b), E in zip(fits, E_lab)]))
    a, b = fits[k]
    want = 1000 * np.mean(np.abs(a * E_te[k] + b - E_ref_te)) / n
    assert r["eip_calibration"]["eip"] == k
    assert abs(r["eip_calibration"]["scale"] - a) < 1e-9 and abs(r["eip_itself"]["energy_mae_mev"] - want) < 1e-9


def test_calibrate_eip_recovers_an_exact_affine_map_and_the_normal_equations():
    from reprolab.atoms.injection import calibrate_eip
    x = np.array([0.1, 0.5, 0.9, 1.7, 2.2])
    assert np.allclose(calibrate_eip(x, 0.78 * x - 0.3), (0.78, -0.3))
    y = np.array([0.0, 1.0, 1.0, 3.0, 2.0])
    # closed form of the simple linear regression: a = cov(x, y) / var(x), b = mean(y) - a mean(x)
    a = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert np.allclose(calibrate_eip(x, y), (a, y.mean() - a * x.mean()))


def test_dft_reference_refuses_a_force_term_before_any_work():
    from reprolab.atoms.injection import build_dataset
    from reprolab.config import ParamError
    cfg = dict(seed=0, reference="dft", force_weight=0.5, n_pool=4, n_test=2, strain=0.03, rattle=[0.02, 0.1])
    with pytest.raises(ParamError, match="force_weight"):
        build_dataset(cfg)


def test_reference_subset_labels_only_referenced_cells(monkeypatch):
    """reference: dft labels the first n_ref_pool pool cells (and the test cells) only; the labelled subsets and the
    diagnostics use those cells. The DFT call is replaced by a fast potential here (the DFT itself: the next test)."""
    import reprolab.atoms.dft as dft
    from reprolab.atoms.eip import label_configs
    from reprolab.atoms.injection import build_dataset
    monkeypatch.setattr(dft, "label_dft", lambda configs, **kw: (label_configs(configs, "sw_vink")[0],
                                                                 np.ones(len(configs), dtype=bool)))
    cfg = dict(seed=0, seeds=[0, 1], n_pool=14, n_test=4, strain=0.03, rattle=[0.02, 0.1], reference="dft", n_ref_pool=6,
               dft_xc="lda,vwn", dft_basis="gth-szv", dft_ke_cutoff=8.0, eips=["kumagai", "tersoff_ea"], budgets=[3, 6],
               hidden=8, layers=1, epochs=5, pretrain_epochs=5, lr=1e-2, finetune_lr=3e-3, weak_weight=1.0, force_weight=0.0)
    data = build_dataset(cfg)
    assert np.isfinite(data["E_ref"][:6]).all() and np.isnan(data["E_ref"][6:]).all()
    assert list(data["ref_idx"]) == list(range(6)) and data["test"][3] is None
    out = learning_curve(data, cfg)
    for (b, s), r in out.items():
        assert np.isfinite(r["weak_label_mae_mev"]) and np.isfinite(r["trivial_pool_mae_mev"])
        assert "force_mae" not in r["reference_only"]
    # at budget 6 every referenced cell is labelled: no referenced unlabelled cell is left for the diagnostics
    assert out[(6, 0)]["trivial_pool_mae_mev"] == 0.0


def test_dft_labels_are_relative_to_the_ideal_crystal_and_permutation_invariant():
    """PySCF Gamma-point LDA labels (low cutoff for speed): the ideal cell is 0, a strained cell is above it, and
    permuting its atoms changes nothing (the energy is a function of the configuration, not the atom order)."""
    from ase.build import bulk
    from reprolab.atoms.dft import label_dft
    from reprolab.atoms.eip import A0
    ideal = bulk("Si", "diamond", a=A0, cubic=True)
    at = make_configs(1, 2, strain=0.03, rattle=(0.05, 0.05))[0]
    perm = at[[3, 1, 7, 0, 5, 2, 6, 4]]
    E, ok = label_dft([ideal, at, perm], ke_cutoff=6.0)
    assert ok.all()
    assert abs(E[0]) < 1e-5
    assert E[1] > 0.01
    assert abs(E[1] - E[2]) < 1e-5


def test_dft_scf_converges_on_a_tiny_cell_in_ev_per_atom():
    """The SCF of a rattled 2-atom primitive Si cell converges (with the full profile's settings, and through the
    Newton retry when DIIS gets only 3 cycles) and its total energy per atom is in the eV sanity window (about
    -105 eV/atom: GTH Si at LDA is about -3.9 Hartree/atom; a Hartree result, ~-3.9, would fail), above the ideal
    cell's; smearing together with a level shift is refused (PySCF never reports convergence then)."""
    from ase.build import bulk
    from reprolab.atoms.dft import E_ATOM_RANGE_EV, dft_energy
    from reprolab.atoms.eip import A0
    prim = bulk("Si", "diamond", a=A0)
    e0, _, ok0 = dft_energy(prim, ke_cutoff=6.0, max_cycle=100)
    at = prim.copy()
    at.positions += np.random.default_rng(0).normal(0, 0.1, at.positions.shape)
    e1, _, ok1 = dft_energy(at, ke_cutoff=6.0, max_cycle=100)
    assert ok0 and ok1
    assert E_ATOM_RANGE_EV[0] <= e0 / 2 <= E_ATOM_RANGE_EV[1]
    assert e1 > e0
    e2, _, ok2 = dft_energy(at, ke_cutoff=6.0, max_cycle=3)  # DIIS cannot converge in 3 cycles: the Newton retry does
    assert ok2 and abs(e2 - e1) < 1e-4
    assert not dft_energy(at, ke_cutoff=6.0, max_cycle=3, retry=False)[2]
    with pytest.raises(ValueError, match="smearing"):
        dft_energy(at, ke_cutoff=6.0, smearing=0.01, level_shift=0.1)


def test_non_converged_dft_cells_are_dropped_and_counted(monkeypatch):
    """A cell whose SCF does not converge is never labelled: it leaves the referenced pool subset and the test set,
    and build_dataset counts it (dft_dropped)."""
    import reprolab.atoms.dft as dft
    from reprolab.atoms.eip import label_configs
    from reprolab.atoms.injection import build_dataset

    def fake(configs, **kw):
        E = label_configs(configs, "sw_vink")[0]
        ok = np.arange(len(configs)) % 3 != 1  # every third cell fails
        return np.where(ok, E, np.nan), ok

    monkeypatch.setattr(dft, "label_dft", fake)
    cfg = dict(seed=0, seeds=[0], n_pool=14, n_test=6, strain=0.03, rattle=[0.02, 0.1], reference="dft", n_ref_pool=9,
               dft_xc="lda,vwn", dft_basis="gth-szv", dft_ke_cutoff=8.0, eips=["kumagai"], budgets=[3],
               hidden=8, layers=1, epochs=5, pretrain_epochs=5, lr=1e-2, finetune_lr=3e-3, weak_weight=1.0, force_weight=0.0)
    data = build_dataset(cfg)
    assert data["dft_dropped"] == {"pool": 3, "test": 2}
    assert list(data["ref_idx"]) == [0, 2, 3, 5, 6, 8]
    assert np.isfinite(data["E_ref"][data["ref_idx"]]).all() and np.isnan(data["E_ref"][[1, 4, 7]]).all()
    assert len(data["test"][0]) == 4 and np.isfinite(data["test"][2].numpy()).all()


def test_wide_configurations_are_a_selectable_mixture():
    """wide_fraction 0 gives exactly make_configs' cells (quick unchanged); 0.5 mixes in cells drawn with the wider
    rattle, whose displacements from the strained lattice are larger."""
    from reprolab.atoms.injection import mixed_configs
    base = dict(strain=0.03, rattle=[0.02, 0.12], wide_strain=0.08, wide_rattle=[0.3, 0.4])
    a = mixed_configs(10, 5, {**base, "wide_fraction": 0.0})
    b = make_configs(10, 5, strain=0.03, rattle=(0.02, 0.12))
    assert all(np.array_equal(x.positions, y.positions) for x, y in zip(a, b))
    m = mixed_configs(10, 5, {**base, "wide_fraction": 0.5})
    assert len(m) == 10
    wide = make_configs(5, 5 + 10007, strain=0.08, rattle=(0.3, 0.4))
    assert sum(any(np.array_equal(x.positions, w.positions) for w in wide) for x in m) == 5
