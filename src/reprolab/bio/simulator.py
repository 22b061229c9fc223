"""Ground-truth single-cell perturbation simulator with exact counterfactuals (for VCI, arXiv 2209.05935, and
graphVCI, arXiv 2210.00116).

Structural causal model, per cell ``i`` of cell type ``c`` under perturbation ``t`` (``t = 0`` is control, ``t = k``
knocks down gene ``targets[k-1]``), genes processed in the GRN's topological order:

    a_ij = b_cj + eps_ij - kd * [j == target(t)] + sum_{p in pa(j)} W_pj * (hill(exp(a_ip) / K_p) - 1/2)
    eps_i = state_sd * s_i M + noise_sd * e_i,   s_i ~ N(0, I_r) (a low-rank cell state),  e_i ~ N(0, I_G)
    y_ij = F^{-1}_{NB(mu = L_i exp(a_ij), theta)}(U_ij)                      (counts, negative binomial)

``hill(v) = v^n / (1 + v^n)``, ``K_p`` is gene p's median baseline level. The exogenous noise of a cell —
``eps_i`` (Gaussian: a cell state plus per-gene noise), the library size ``L_i`` and the NB quantiles ``U_i`` — is drawn once and shared by
all its potential outcomes, so the counterfactual of a cell under another perturbation is *the same cell* (the
quantile coupling makes the count monotone in the mean). Knocking down gene k changes only k and its GRN
descendants; control is the factual itself. Baseline log-levels ``b_cj`` are per-cell-type mean expression
profiles of real PBMC cells (``reprolab.data.load_pbmc``) or, offline-free, random.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats


def nb_ppf(U: np.ndarray, mu: np.ndarray, theta: float, walk_below: float = 30.0) -> np.ndarray:
    """Inverse CDF of NB(mean mu, inverse dispersion theta) at U: the smallest k with CDF(k) >= U.

    Same values as ``scipy.stats.nbinom.ppf(U, theta, theta / (theta + mu))`` (tested). Entries with
    mu < ``walk_below`` walk the pmf recurrence p(k+1) = p(k) (k + theta) / (k + 1) * mu / (theta + mu) (fast for
    small counts); the others use scipy."""
    U = np.asarray(U, np.float64)
    mu = np.broadcast_to(np.asarray(mu, np.float64), U.shape)
    out = np.zeros(U.shape, np.float64).ravel()
    u, m = U.ravel(), mu.ravel()
    big = np.flatnonzero(m >= walk_below)
    if len(big):
        out[big] = stats.nbinom.ppf(u[big], theta, theta / (theta + m[big]))
    small = np.flatnonzero(m < walk_below)
    u, m = u[small], m[small]
    q = m / (theta + m)
    pmf = np.exp(theta * (np.log(theta) - np.log(theta + m)))  # p(0)
    cdf = pmf.copy()
    sel = np.flatnonzero(u > cdf)
    idx, u, q, pmf, cdf = small[sel], u[sel], q[sel], pmf[sel], cdf[sel]
    k = 0
    while len(idx):
        pmf = pmf * (k + theta) / (k + 1) * q
        cdf = cdf + pmf
        k += 1
        go = (u > cdf) & ((pmf > 0) | (k < 10 * mu.ravel()[idx] + 100))
        out[idx[~go]] = k
        idx, u, q, pmf, cdf = idx[go], u[go], q[go], pmf[go], cdf[go]
    return out.reshape(U.shape)


@dataclass
class GRN:
    """A DAG gene regulatory network: ``W[p, j]`` is the signed effect of regulator p on target j (0: no edge)."""
    W: np.ndarray  # (G, G)
    order: np.ndarray  # topological order of the genes

    @property
    def n_genes(self) -> int:
        return self.W.shape[0]

    @property
    def edges(self) -> np.ndarray:
        """(E, 2) directed edges (regulator, target)."""
        return np.argwhere(self.W != 0)

    def descendants(self, k: int) -> np.ndarray:
        """Boolean mask of the genes reachable from k (k excluded)."""
        seen = np.zeros(self.n_genes, bool)
        stack = [k]
        while stack:
            for j in np.flatnonzero(self.W[stack.pop()] != 0):
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
        return seen


def random_grn(n_genes: int, n_regulators: int, rng: np.random.Generator, max_parents: int = 3,
               regulator_bias: float = 5.0, p_negative: float = 0.3, w_low: float = 0.8, w_high: float = 2.0) -> GRN:
    """Sparse random DAG: the first ``n_regulators`` genes of a random order are hubs (``regulator_bias`` times more
    likely to be chosen as a parent); every later gene gets 1..max_parents parents among earlier genes."""
    order = rng.permutation(n_genes)
    W = np.zeros((n_genes, n_genes))
    for pos in range(1, n_genes):
        j = order[pos]
        earlier = order[:pos]
        w = np.where(np.arange(pos) < n_regulators, regulator_bias, 1.0)
        n_par = min(pos, 1 + rng.binomial(max_parents - 1, 0.3))
        parents = rng.choice(earlier, size=n_par, replace=False, p=w / w.sum())
        sign = np.where(rng.random(n_par) < p_negative, -1.0, 1.0)
        W[parents, j] = sign * rng.uniform(w_low, w_high, n_par)
    return GRN(W=W, order=order)


def pick_targets(grn: GRN, n_perturbations: int) -> np.ndarray:
    """The perturbed genes: those with the most GRN descendants (ties broken by index), so knockdowns propagate."""
    n_desc = np.array([grn.descendants(k).sum() for k in range(grn.n_genes)])
    return np.array(sorted(range(grn.n_genes), key=lambda k: (-n_desc[k], k))[:n_perturbations])


def pbmc_baseline(n_genes: int, n_cell_types: int, pbmc: dict | None = None, pseudo: float = 0.1):
    """Per-cell-type baseline log-levels from real PBMC cells: the ``n_cell_types`` most frequent types and the
    ``n_genes`` most variable genes among them; ``b_cj = log(mean_c expm1(X_j) + pseudo)``."""
    if pbmc is None:
        from reprolab.data import load_pbmc
        pbmc = load_pbmc()
    types, counts = np.unique(pbmc["cell_type"], return_counts=True)
    keep = [types[i] for i in np.argsort(-counts, kind="stable")[:n_cell_types]]
    ct = np.asarray(pbmc["cell_type"])
    X = np.expm1(pbmc["X"][np.isin(ct, keep)].astype(np.float64))
    genes = np.argsort(-X.var(0), kind="stable")[:n_genes]
    b = np.stack([np.log(np.expm1(pbmc["X"][ct == t][:, genes].astype(np.float64)).mean(0) + pseudo) for t in keep])
    return b, keep, [pbmc["genes"][g] for g in genes]


@dataclass
class Simulator:
    """The SCM above. ``targets[k-1]`` is the gene knocked down by perturbation k (k = 1..K); 0 is control."""
    grn: GRN
    b: np.ndarray  # (C, G) baseline log-levels per cell type
    targets: np.ndarray  # (K,)
    kd: float = 2.3  # knockdown strength in log space (2.3 = 90% down)
    hill_n: float = 2.0
    noise_sd: float = 0.1  # sd of the iid per-gene exogenous log-noise
    state_sd: float = 0.3  # sd of the low-rank cell-state part of eps
    state_dim: int = 4  # rank r of the cell state
    lib_sd: float = 0.2  # sd of log library size
    log_lib: float = 0.0  # mean log library size (scales every mean count)
    theta: float = 10.0  # NB inverse dispersion
    seed: int = 0  # draws the cell-state loadings M
    K: np.ndarray = field(init=False)
    M: np.ndarray = field(init=False)

    def __post_init__(self):
        self.K = np.exp(np.median(self.b, axis=0))  # Hill half-saturation = median baseline level
        rng = np.random.default_rng(self.seed)
        self.M = rng.standard_normal((self.state_dim, self.grn.n_genes)) / np.sqrt(max(self.state_dim, 1))

    @property
    def n_treatments(self) -> int:
        return len(self.targets) + 1

    def hill(self, level: np.ndarray) -> np.ndarray:
        v = level ** self.hill_n
        return v / (1.0 + v)

    def log_mean(self, cell_type: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """a_ij of every cell (n,) under its perturbation t (n,), exogenous noise eps (n, G): the SEM in GRN order."""
        a = np.zeros_like(eps)
        kd_gene = np.where(t > 0, self.targets[np.maximum(t, 1) - 1], -1)
        for j in self.grn.order:
            parents = np.flatnonzero(self.grn.W[:, j])
            a[:, j] = self.b[cell_type, j] + eps[:, j] - self.kd * (kd_gene == j)
            if len(parents):
                a[:, j] += (self.hill(np.exp(a[:, parents]) / self.K[parents]) - 0.5) @ self.grn.W[parents, j]
        return a

    def exogenous(self, n: int, rng: np.random.Generator) -> dict:
        G = self.grn.n_genes
        state = rng.standard_normal((n, self.state_dim))
        return {"eps": self.state_sd * state @ self.M + self.noise_sd * rng.standard_normal((n, G)),
                "state": state, "log_lib": self.log_lib + self.lib_sd * rng.standard_normal(n),
                "U": rng.random((n, G))}

    def counts(self, a: np.ndarray, noise: dict) -> np.ndarray:
        """NB counts by inverse CDF of the shared quantiles U (the coupling between potential outcomes)."""
        return nb_ppf(noise["U"], np.exp(a + noise["log_lib"][:, None]), self.theta)

    def potential_outcomes(self, cell_type: np.ndarray, noise: dict, t: int | np.ndarray) -> np.ndarray:
        t = np.broadcast_to(np.asarray(t), cell_type.shape)
        return self.counts(self.log_mean(cell_type, t, noise["eps"]), noise)


def corrupt_edges(true_edges: np.ndarray, n_genes: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Undirected prior GRN: drop ``frac`` of the true (undirected) edges and add as many random false ones."""
    und = np.unique(np.sort(true_edges, axis=1), axis=0)
    keep = und[rng.permutation(len(und))[: len(und) - int(round(frac * len(und)))]]
    true_set = {tuple(e) for e in und}
    added: list[tuple[int, int]] = []
    while len(added) < len(und) - len(keep):
        i, j = sorted(rng.choice(n_genes, 2, replace=False).tolist())
        if (i, j) not in true_set and (i, j) not in added:
            added.append((i, j))
    return np.concatenate([keep, np.array(added, dtype=keep.dtype).reshape(-1, 2)])


def undirected_adjacency(edges: np.ndarray, n: int) -> np.ndarray:
    A = np.zeros((n, n), bool)
    if len(edges):
        A[edges[:, 0], edges[:, 1]] = True
        A[edges[:, 1], edges[:, 0]] = True
    return A


def pick_ood_groups(n_types: int, n_treatments: int, n_groups: int, seed: int, Y: np.ndarray | None = None,
                    t: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The held-out (cell type, perturbation) groups of the out-of-distribution split (the official ``ood`` split,
    ``vci/dataset/gene_dataset.py:93-95``: cells of perturbation-covariate combinations never seen in training).

    As the official data preparation (``datasets/SciplexPrep.ipynb`` / ``MarsonPrep.ipynb`` of
    yulun-rayn/variational-causal-inference: ``df_vs_rest.sort_values('L2').tail(20)``, all in one cell type): the
    ``n_groups`` perturbations k > 0 with the largest effect, the L2 norm of (mean expression of the cells under k)
    minus (mean of the other cells), computed from the given cells ``Y``, ``t`` (the caller passes the training
    cells), all held out in ONE cell type (drawn from the generator ``[seed, 1]``); every perturbation stays in
    training in the other cell types and every cell type keeps its control. Ties break towards the lower k."""
    if n_groups <= 0:
        return []
    if n_types < 2 or n_groups > n_treatments - 1:
        raise ValueError(f"ood_groups={n_groups} needs >= 2 cell types and <= {n_treatments - 1} perturbations")
    if Y is None or t is None:
        raise ValueError("pick_ood_groups needs the training cells (Y, t) to rank the perturbations by effect")
    l2 = np.array([np.linalg.norm(Y[t == k].mean(0) - Y[t != k].mean(0)) for k in range(1, n_treatments)])
    ks = 1 + np.argsort(-l2, kind="stable")[:n_groups]
    x = int(np.random.default_rng([seed, 1]).integers(n_types))
    return sorted((x, int(k)) for k in ks)


def simulate_dataset(cfg: dict, seed: int, pbmc: dict | None = None) -> dict:
    """The experiment's data: a GRN, cells with a random cell type and perturbation, their factual counts and all
    their potential outcomes (the truth for counterfactual evaluation), a train/test split and a corrupted prior.

    ``cfg`` keys: n_genes, n_regulators, n_cell_types, n_perturbations, n_cells, test_fraction, kd, noise_sd,
    state_sd, state_dim, lib_sd, log_lib, theta, grn_w (low, high), base ("pbmc" | "random"), grn_corruption and
    optionally ood_groups (held-out (cell type, perturbation) groups, :func:`pick_ood_groups`; default 0)."""
    rng = np.random.default_rng(seed)
    G = cfg["n_genes"]
    if cfg["base"] == "pbmc":
        b, type_names, gene_names = pbmc_baseline(G, cfg["n_cell_types"], pbmc)
    else:
        b = np.log(rng.gamma(1.0, 3.0, (cfg["n_cell_types"], G)) + 0.1)
        type_names, gene_names = [f"type{c}" for c in range(len(b))], [f"g{j}" for j in range(G)]
    grn = random_grn(G, cfg["n_regulators"], rng, w_low=cfg["grn_w"][0], w_high=cfg["grn_w"][1])
    sim = Simulator(grn, b, pick_targets(grn, cfg["n_perturbations"]), kd=cfg["kd"], noise_sd=cfg["noise_sd"],
                    state_sd=cfg["state_sd"], state_dim=cfg["state_dim"], lib_sd=cfg["lib_sd"],
                    log_lib=cfg["log_lib"], theta=cfg["theta"], seed=seed)
    n = cfg["n_cells"]
    cell_type = rng.integers(0, len(b), n)
    t = rng.integers(0, sim.n_treatments, n)
    noise = sim.exogenous(n, rng)
    perm = rng.permutation(n)
    n_test = int(round(cfg["test_fraction"] * n))
    train, test = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    Y = np.log1p(sim.potential_outcomes(cell_type, noise, t)).astype(np.float32)  # factual, log1p counts
    # out-of-distribution split (cfg ood_groups > 0): the cells observed in a held-out (cell type, perturbation) group
    # leave train and test (index "ood"); the held-out groups are scored through the test cells' counterfactuals.
    # The groups: the largest-effect perturbations (L2, from the training cells), in one cell type (official prep)
    ood_groups = pick_ood_groups(len(b), sim.n_treatments, int(cfg.get("ood_groups", 0)), seed, Y[train], t[train])
    in_ood = np.zeros(n, bool)
    for x, k in ood_groups:
        in_ood |= (cell_type == x) & (t == k)
    train, test, ood = train[~in_ood[train]], test[~in_ood[test]], np.flatnonzero(in_ood)
    # every potential outcome of the test cells (the truth for counterfactual evaluation), same exogenous noise
    noise_te = {k: v[test] for k, v in noise.items()}
    Y_test_all = np.stack([np.log1p(sim.potential_outcomes(cell_type[test], noise_te, k))
                           for k in range(sim.n_treatments)], 1).astype(np.float32)  # (n_test, T, G)
    prior = corrupt_edges(grn.edges, G, cfg["grn_corruption"], rng)
    return {"sim": sim, "grn": grn, "cell_type": cell_type, "t": t, "Y": Y, "Y_test_all": Y_test_all,
            "train": train, "test": test, "ood": ood, "ood_groups": ood_groups, "noise": noise, "prior_edges": prior, "type_names": type_names,
            "gene_names": gene_names, "n_types": len(b), "n_treatments": sim.n_treatments}
