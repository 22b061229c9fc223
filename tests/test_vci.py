"""VCI (arXiv 2209.05935): the simulator's counterfactuals, the loss terms against closed forms, the metrics."""
import numpy as np
import pytest
import torch
from scipy import stats

from reprolab.bio.simulator import GRN, Simulator, corrupt_edges, nb_ppf, simulate_dataset, undirected_adjacency
from reprolab.bio.vci import VCI, Trainer, evaluate, kl_normal, logprob_normal, r2, random_other

SMALL = dict(n_genes=12, n_regulators=3, n_cell_types=2, n_perturbations=3, n_cells=120, test_fraction=0.25,
             kd=3.0, noise_sd=0.1, state_sd=0.5, state_dim=2, lib_sd=0.2, log_lib=1.0, theta=20.0,
             grn_w=[1.0, 2.0], base="random", grn_corruption=0.3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_nb_ppf_equals_scipy():
    rng = np.random.default_rng(0)
    U = rng.random(20000)
    mu = np.exp(rng.uniform(-4, 6, 20000))  # both the pmf walk (mu < 30) and the scipy branch
    for theta in (0.7, 10.0, 50.0):
        np.testing.assert_array_equal(nb_ppf(U, mu, theta), stats.nbinom.ppf(U, theta, theta / (theta + mu)))


def tiny_sim():
    """Hand-made GRN: 0 -> 1 (+1.5), 1 -> 2 (-1.0); gene 3 isolated; knockdowns of gene 0 (t=1) and gene 2 (t=2)."""
    W = np.zeros((4, 4))
    W[0, 1], W[1, 2] = 1.5, -1.0
    b = np.log(np.array([[2.0, 3.0, 4.0, 5.0], [1.0, 6.0, 2.0, 3.0]]))
    return Simulator(GRN(W=W, order=np.array([0, 1, 2, 3])), b, targets=np.array([0, 2]), kd=2.0, theta=10.0)


def test_effects_follow_the_grn_exactly():
    sim = tiny_sim()
    rng = np.random.default_rng(1)
    ct = np.array([0, 1, 0, 1, 1])
    noise = sim.exogenous(len(ct), rng)
    eps = noise["eps"]
    hill = lambda v: v ** 2 / (1 + v ** 2)  # noqa: E731
    for t in (0, 1, 2):
        a = sim.log_mean(ct, np.full(len(ct), t), eps)
        a0 = sim.b[ct, 0] + eps[:, 0] - 2.0 * (t == 1)
        a1 = sim.b[ct, 1] + eps[:, 1] + 1.5 * (hill(np.exp(a0) / sim.K[0]) - 0.5)
        a2 = sim.b[ct, 2] + eps[:, 2] - 2.0 * (t == 2) - 1.0 * (hill(np.exp(a1) / sim.K[1]) - 0.5)
        a3 = sim.b[ct, 3] + eps[:, 3]
        np.testing.assert_allclose(a, np.stack([a0, a1, a2, a3], 1), rtol=1e-12)
    y0, y1, y2 = (sim.potential_outcomes(ct, noise, t) for t in (0, 1, 2))
    # knocking down gene 0 moves its descendants 1 and 2 only in the means; gene 3's counts are the same cell's
    np.testing.assert_array_equal(y1[:, 3], y0[:, 3])
    # knocking down gene 2 (a leaf) leaves every other gene's counts identical (shared noise)
    np.testing.assert_array_equal(y2[:, [0, 1, 3]], y0[:, [0, 1, 3]])
    assert (y2[:, 2] <= y0[:, 2]).all() and (y1[:, 0] <= y0[:, 0]).all()  # monotone coupling of the quantiles
    assert sim.grn.descendants(0).tolist() == [False, True, True, False]


def test_factual_and_no_perturbation_counterfactuals_are_consistent():
    data = simulate_dataset(SMALL, seed=3)
    te = data["test"]
    # the potential outcome under the cell's own treatment is its factual observation
    np.testing.assert_array_equal(data["Y_test_all"][np.arange(len(te)), data["t"][te]], data["Y"][te])
    # regenerating the same cells under control twice gives identical counts (no fresh noise)
    sim, noise = data["sim"], {k: v[te] for k, v in data["noise"].items()}
    c = data["cell_type"][te]
    np.testing.assert_array_equal(sim.potential_outcomes(c, noise, 0), sim.potential_outcomes(c, noise, 0))
    np.testing.assert_array_equal(np.log1p(sim.potential_outcomes(c, noise, 0)).astype(np.float32),
                                  data["Y_test_all"][:, 0])
    # every knockdown changes only its target and the target's descendants
    for k, g in enumerate(sim.targets, start=1):
        untouched = ~data["grn"].descendants(g)
        untouched[g] = False
        np.testing.assert_array_equal(data["Y_test_all"][:, k][:, untouched], data["Y_test_all"][:, 0][:, untouched])


def test_corrupted_prior_keeps_the_right_fraction():
    rng = np.random.default_rng(0)
    true = np.array([[i, i + 1] for i in range(20)])
    prior = corrupt_edges(true, 30, 0.3, rng)
    A, P = undirected_adjacency(true, 30), undirected_adjacency(prior, 30)
    assert P.sum() == A.sum()  # same number of edges
    assert (A & P).sum() // 2 == 14  # 70% of the 20 true edges kept


def test_loss_terms_equal_closed_forms():
    torch.manual_seed(0)
    x, loc, scale = torch.randn(5, 7), torch.randn(5, 7), torch.rand(5, 7) + 0.1
    ref = torch.distributions.Normal(loc, scale).log_prob(x)
    torch.testing.assert_close(logprob_normal(x, loc, scale), ref)
    mu1, mu2 = torch.randn(6, 4), torch.randn(6, 4)
    s1, s2 = torch.rand(6, 4) + 0.2, torch.rand(6, 4) + 0.2
    kl_ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu1, s1), torch.distributions.Normal(mu2, s2))
    # form "exact" is the textbook KL (torch.distributions as the independent reference)
    torch.testing.assert_close(kl_normal(mu1, s1, mu2, s2, "exact"), kl_ref.sum(1).mean())
    # KL to N(0, I): 0.5 * sum(mu^2 + s^2 - 1 - log s^2) (the cVAE's ELBO term); both forms give it
    closed = (0.5 * (mu1 ** 2 + s1 ** 2 - 1 - torch.log(s1 ** 2))).sum(1).mean()
    for form in ("exact", "official"):
        torch.testing.assert_close(kl_normal(mu1, s1, torch.zeros_like(mu1), torch.ones_like(s1), form), closed)
        assert kl_normal(mu1, s1, mu1, s1, form).abs() < 1e-6


def test_counterfactual_treatments_differ_and_cover():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (4000,), generator=gen)
    tc = random_other(t, 5, gen)
    assert (tc != t).all() and set(tc.tolist()) == set(range(5))


def test_match_mode_samples_real_cells_of_the_same_group():
    data = simulate_dataset(SMALL, seed=0)
    tr = data["train"]
    t = torch.from_numpy(data["t"][tr]).long()
    c = torch.from_numpy(data["cell_type"][tr]).long()
    index = {(ci, ti): torch.nonzero((c == ci) & (t == ti))[:, 0] for ci in range(2) for ti in range(4)}
    model = VCI(12, 4, 2, latent=4, width=8, outcome_emb=8, covariate_emb=2)
    cfg = {"lr": 1e-3, "weight_decay": 0.0, "dist_mode": "match"}
    trainer = Trainer(model, "vci", cfg, 2, train_index=index)
    gen = torch.Generator().manual_seed(0)
    qc, qt = torch.randint(0, 2, (500,), generator=gen), torch.randint(0, 4, (500,), generator=gen)
    rows = trainer.sample_rows(qc, qt, gen)
    assert (c[rows] == qc).all() and (t[rows] == qt).all()


def test_r2_and_evaluate_against_references():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert abs(r2(a, b) - r2_score(a, b)) < 1e-12
    data = simulate_dataset(SMALL, seed=1)
    perfect = evaluate(data["Y_test_all"].copy(), data, n_deg=5)
    assert perfect["cf_mse"] == 0 and perfect["r2_deg"] == 1 and perfect["r2_all"] == 1
    noisy = evaluate(data["Y_test_all"] + 0.5, data, n_deg=5)
    assert abs(noisy["cf_mse"] - 0.25) < 1e-6 and noisy["r2_deg"] < 1


def test_official_kl_form_is_the_official_kldiv_normal():
    """kl_form "official" pins vci/utils/math_utils.py:25-31 (no division of (mu1-mu2)^2 by sigma2^2), written out."""
    torch.manual_seed(1)
    mu1, mu2 = torch.randn(6, 4), torch.randn(6, 4)
    s1, s2 = torch.rand(6, 4) + 0.2, torch.rand(6, 4) + 0.2
    lv1, lv2 = 2 * torch.log(s1), 2 * torch.log(s2)
    official = torch.mean(-0.5 * torch.sum(1.0 + lv1 - lv2 - (mu1 - mu2) ** 2 - torch.exp(lv1 - lv2), dim=1), dim=0)
    torch.testing.assert_close(kl_normal(mu1, s1, mu2, s2, "official"), official)
    torch.testing.assert_close(kl_normal(mu1, s1, mu2, s2), official)  # the default is the official form
    # a naive per-entry loop of the official formula (independent of the vectorized code)
    loop = 0.0
    for b in range(6):
        for j in range(4):
            a1, a2, m1, m2 = s1[b, j].item(), s2[b, j].item(), mu1[b, j].item(), mu2[b, j].item()
            loop += 0.5 * (a1 ** 2 / a2 ** 2 + (m1 - m2) ** 2 - 1 - np.log(a1 ** 2 / a2 ** 2))
    assert abs(kl_normal(mu1, s1, mu2, s2, "official").item() - loop / 6) < 1e-5
    assert not torch.allclose(kl_normal(mu1, s1, mu2, s2, "official"), kl_normal(mu1, s1, mu2, s2, "exact"))
    one = torch.ones_like(s1)  # against N(., 1) the two forms agree (the cVAE's prior term)
    torch.testing.assert_close(kl_normal(mu1, s1, mu2, one, "official"), kl_normal(mu1, s1, mu2, one, "exact"))
    with pytest.raises(ValueError):
        kl_normal(mu1, s1, mu2, s2, "textbook")


def test_non_control_counterfactual_treatments():
    gen = torch.Generator().manual_seed(0)
    T = 5
    t = torch.randint(0, T, (20000,), generator=gen)
    tc = random_other(t, T, gen, control=False)
    assert (tc != t).all() and (tc != 0).all() and set(tc.tolist()) == set(range(1, T))
    for k in range(T):  # uniform over the allowed treatments of each factual t
        allowed = [j for j in range(1, T) if j != k]
        freq = np.bincount(tc[t == k].numpy(), minlength=T)[allowed] / (t == k).sum().item()
        np.testing.assert_allclose(freq, 1 / len(allowed), atol=0.03)


def test_kde_samples_several_real_cells_of_the_same_group():
    data = simulate_dataset(SMALL, seed=0)
    tr = data["train"]
    t = torch.from_numpy(data["t"][tr]).long()
    c = torch.from_numpy(data["cell_type"][tr]).long()
    index = {(ci, ti): torch.nonzero((c == ci) & (t == ti))[:, 0] for ci in range(2) for ti in range(4)}
    model = VCI(12, 4, 2, latent=4, width=8, outcome_emb=8, covariate_emb=2)
    trainer = Trainer(model, "vci", {"lr": 1e-3, "weight_decay": 0.0, "dist_mode": "match"}, 2, train_index=index)
    gen = torch.Generator().manual_seed(0)
    qc, qt = torch.randint(0, 2, (300,), generator=gen), torch.randint(0, 4, (300,), generator=gen)
    rows = trainer.sample_rows(qc, qt, gen, k=20)
    assert rows.shape == (300, 20)
    assert (c[rows] == qc[:, None]).all() and (t[rows] == qt[:, None]).all()
    assert (rows.unique(dim=1).shape[1] > 1)  # several distinct cells, not one repeated


def test_vci_step_runs_with_official_settings():
    data = simulate_dataset(SMALL, seed=0)
    cfg = {"lr": 1e-3, "weight_decay": 0.0, "dist_mode": "match", "mc_samples": 2, "omega0": 1.0, "omega1": 1.6,
           "omega2": 0.1, "kde_std": 1.0, "kde_cells": 5, "cf_control": False, "kl_form": "official",
           "steps": 3, "batch_size": 8}
    from reprolab.bio.vci import train_arm

    model = VCI(12, 4, 2, latent=4, width=8, outcome_emb=8, covariate_emb=2)
    log = train_arm(model, "vci", data, cfg, seed=0, log_every=1)
    assert len(log) == 3 and all(np.isfinite([r["kl_cf"] for r in log]))


def test_official_kl_latent_carries_the_individual_cell():
    """The claim-critical property (the review: with the textbook KL, reconstruction = the group mean's): a short
    training with the official KL reconstructs the factual clearly better than the group-mean predictor, which
    ignores the individual cell."""
    from reprolab.bio.vci import predict_all, train_arm

    small = {**SMALL, "n_genes": 20, "n_regulators": 4, "n_perturbations": 4, "n_cells": 600, "log_lib": 2.0,
             "theta": 50.0, "grn_w": [1.0, 2.5]}
    data = simulate_dataset(small, seed=0)
    tr, te = data["train"], data["test"]
    gm = np.stack([[data["Y"][tr][(data["cell_type"][tr] == x) & (data["t"][tr] == k)].mean(0)
                    for k in range(data["n_treatments"])] for x in range(data["n_types"])])
    ref = evaluate(gm[data["cell_type"][te]], data, n_deg=5)
    cfg = {"lr": 3e-3, "weight_decay": 0.0, "dist_mode": "match", "mc_samples": 1, "omega0": 1.0, "omega1": 1.6,
           "omega2": 0.1, "kde_std": 1.0, "kde_cells": 5, "cf_control": False, "kl_form": "official",
           "steps": 600, "batch_size": 32}
    torch.manual_seed(0)
    model = VCI(20, data["n_treatments"], 2, latent=4, width=32, outcome_emb=32, covariate_emb=2)
    train_arm(model, "vci", data, cfg, seed=0)
    ev = evaluate(predict_all(model, data, te), data, n_deg=5)
    assert ev["rec_mse"] < 0.8 * ref["rec_mse"] and ev["cf_mse"] < ref["cf_mse"]


OOD = {**SMALL, "n_cell_types": 3, "n_perturbations": 4, "n_cells": 600, "ood_groups": 3}


def test_ood_split_holds_out_whole_groups():
    """The official ood split (vci/dataset/gene_dataset.py:93-95): held-out (cell type, perturbation) groups have no
    training cell; each perturbation is held out in one cell type at most and stays in training in the others."""
    data = simulate_dataset(OOD, seed=2)
    groups = data["ood_groups"]
    assert len(groups) == 3 and len({k for _, k in groups}) == 3 and all(k > 0 for _, k in groups)
    ct, t = data["cell_type"], data["t"]
    train_groups = set(zip(ct[data["train"]].tolist(), t[data["train"]].tolist()))
    test_groups = set(zip(ct[data["test"]].tolist(), t[data["test"]].tolist()))
    for x, k in groups:
        assert (x, k) not in train_groups and (x, k) not in test_groups
        assert any((y, k) in train_groups for y in range(3) if y != x)  # the perturbation is seen elsewhere
    # every cell is in exactly one of train / test / ood, and the ood cells are exactly the held-out groups' cells
    allidx = np.sort(np.concatenate([data["train"], data["test"], data["ood"]]))
    np.testing.assert_array_equal(allidx, np.arange(OOD["n_cells"]))
    naive = [i for i in range(OOD["n_cells"]) if (int(ct[i]), int(t[i])) in set(groups)]
    assert data["ood"].tolist() == naive
    # without ood groups the rest of the data is unchanged (the split has its own generator)
    base = simulate_dataset({**OOD, "ood_groups": 0}, seed=2)
    np.testing.assert_array_equal(base["Y"], data["Y"])
    np.testing.assert_array_equal(base["prior_edges"], data["prior_edges"])
    assert set(data["train"]) <= set(base["train"]) and base["ood_groups"] == []
    # official prep (datasets/SciplexPrep.ipynb: df_vs_rest.sort_values('L2').tail(n)), all in one cell type: the
    # held-out perturbations are the n with the largest ||mean(train cells under k) - mean(other train cells)||
    assert len({x for x, _ in groups}) == 1
    Ytr, ttr = base["Y"][base["train"]], base["t"][base["train"]]
    l2 = {k: float(np.sqrt(sum((Ytr[ttr == k][:, j].mean() - Ytr[ttr != k][:, j].mean()) ** 2
                                for j in range(Ytr.shape[1])))) for k in range(1, data["n_treatments"])}
    top = sorted(l2, key=lambda k: -l2[k])[:3]
    assert sorted(k for _, k in groups) == sorted(top)


def test_cf_mse_splits_seen_and_held_out_counterfactuals():
    """cf_mse: counterfactuals (t' != t) into groups seen in training; cf_mse_ood: into held-out groups (naive loop)."""
    data = simulate_dataset(OOD, seed=2)
    rng = np.random.default_rng(1)
    P = data["Y_test_all"] + rng.normal(0, 0.3, data["Y_test_all"].shape).astype(np.float32)
    ev = evaluate(P, data, n_deg=5)
    te, ood = data["test"], set(data["ood_groups"])
    seen, held, fact = [], [], []
    for i in range(len(te)):
        x, t0 = int(data["cell_type"][te[i]]), int(data["t"][te[i]])
        for k in range(data["n_treatments"]):
            e = float(((P[i, k] - data["Y_test_all"][i, k]) ** 2).mean())
            (fact if k == t0 else held if (x, k) in ood else seen).append(e)
    assert abs(ev["cf_mse"] - np.mean(seen)) < 1e-5 and abs(ev["cf_mse_ood"] - np.mean(held)) < 1e-5
    assert abs(ev["rec_mse"] - np.mean(fact)) < 1e-5


def test_ood_r2_and_references_against_naive_loops():
    from sklearn.metrics import r2_score

    from reprolab.bio.vci import reference_predictions

    data = simulate_dataset(OOD, seed=2)
    te, tr = data["test"], data["train"]
    perfect = evaluate(data["Y_test_all"].copy(), data, n_deg=5)
    assert perfect["r2_deg_ood"] == 1 and perfect["r2_all_ood"] == 1 and perfect["r2_deg"] == 1
    rng = np.random.default_rng(0)
    P = data["Y_test_all"] + rng.normal(0, 0.3, data["Y_test_all"].shape).astype(np.float32)
    ev = evaluate(P, data, n_deg=5)
    naive = []  # the held-out groups' DEG R2, one group at a time, with sklearn
    for x, k in data["ood_groups"]:
        rows = [i for i in range(len(te)) if data["cell_type"][te[i]] == x]
        true_k = data["Y_test_all"][rows, k].mean(0)
        ctrl = data["Y_test_all"][rows, 0].mean(0)
        deg = np.argsort(-np.abs(true_k - ctrl), kind="stable")[:5]
        naive.append(r2_score(true_k[deg], P[rows, k].mean(0)[deg]))
    assert abs(ev["r2_deg_ood"] - np.mean(naive)) < 1e-5
    refs = reference_predictions(data)
    Y, ct, t = data["Y"], data["cell_type"], data["t"]
    for i in (0, 5, 17):
        x = ct[te[i]]
        for k in range(data["n_treatments"]):
            cells = [j for j in tr if ct[j] == x and t[j] == k]
            if cells:
                expect = Y[cells].mean(0)
            else:  # held-out: x's control mean + k's mean shift in the other cell types
                shifts = [Y[[j for j in tr if ct[j] == y and t[j] == k]].mean(0)
                          - Y[[j for j in tr if ct[j] == y and t[j] == 0]].mean(0) for y in range(3) if y != x]
                expect = Y[[j for j in tr if ct[j] == x and t[j] == 0]].mean(0) + np.mean(shifts, 0)
                assert (x, k) in data["ood_groups"]
            np.testing.assert_allclose(refs["group mean"][i, k], expect, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(refs["no effect"][i, k],
                                       Y[[j for j in tr if ct[j] == x and t[j] == 0]].mean(0), rtol=1e-4, atol=1e-5)


def test_match_loss_skips_samples_without_real_cells_like_the_official_code():
    """Official: a (x, t') with no training cell gives cf_genes None (gene_dataset.py:278-280) and loss_causality
    keeps only the notNone rows (model.py:520-526). Recomputed by hand with the same random draws."""
    data = simulate_dataset(OOD, seed=2)
    tr = data["train"]
    Y = torch.from_numpy(data["Y"][tr])
    t = torch.from_numpy(data["t"][tr]).long()
    c = torch.from_numpy(data["cell_type"][tr]).long()
    T = data["n_treatments"]
    index = {(ci, ti): torch.nonzero((c == ci) & (t == ti))[:, 0] for ci in range(3) for ti in range(T)}
    cfg = {"lr": 1e-3, "weight_decay": 0.0, "dist_mode": "match", "mc_samples": 2, "omega0": 1.0, "omega1": 1.6,
           "omega2": 0.1, "kde_std": 1.0, "kde_cells": 4, "cf_control": False, "kl_form": "official"}
    torch.manual_seed(0)
    model = VCI(12, T, 3, latent=4, width=8, outcome_emb=8, covariate_emb=2)
    trainer = Trainer(model, "vci", cfg, 3, train_index=index)
    assert trainer.group_has.view(3, T).logical_not().nonzero().tolist() == [list(g) for g in data["ood_groups"]]
    b = torch.arange(200)
    with torch.no_grad():  # the hand computation first (the step updates the model)
        gen = torch.Generator().manual_seed(5)
        mu, sigma = model.encode(Y[b], t[b], c[b])
        torch.randn((2,) + mu.shape, generator=gen)  # the MC draw of the step
        t_cf = random_other(t[b], T, gen, control=False)
        rows = trainer.sample_rows(c[b], t_cf, gen, 4)
        y_cf = model.decode(mu, t_cf)[0]
        vals = []
        for i in range(len(b)):
            if (int(c[b][i]), int(t_cf[i])) in set(data["ood_groups"]):
                continue  # skipped, as the official notNone mask
            for j in range(4):
                vals.append(logprob_normal(y_cf[i], Y[rows[i, j]], torch.ones(12)).mean())
        manual = -torch.stack(vals).mean().item()
        n_skip = sum((int(ci), int(tc)) in set(data["ood_groups"]) for ci, tc in zip(c[b], t_cf))
    assert n_skip > 0
    out = trainer.step(Y[b], t[b], c[b], torch.Generator().manual_seed(5), Y_train=Y)
    assert abs(out["covar"] - manual) < 1e-4
