"""FAROS: Fair Graph Generation via Attribute Switching Mechanisms (Badaoui et al., 2025), arXiv 2507.03728.

https://arxiv.org/abs/2507.03728 . No official code is public; the generator follows GraphMaker-Sync
(Graph-COM/GraphMaker, ``model/diffusion.py``, ``model/gnn.py``), the pre-trained graph diffusion model (GDM) that FAROS
and FairWire run on, and its GAE link-prediction evaluation (``model/discriminator/gae.py``).

Pipeline (paper, Fig. 2): (a) a GDM pre-trained on the real graph; (b) the fraction p* of nodes whose sensitive
attribute is switched, and the nodes, are drawn; (c) the reverse step tau* of the switch is chosen by constraints
that keep the node-topology profile of the real graph (a proxy for accuracy) while making the generated edges
independent of the sensitive attribute (a proxy for fairness); (d) generation runs unchanged down to t = tau*,
(e) the sensitive attribute of the chosen nodes is flipped, (f) generation finishes without further switching.

The GDM here: discrete edge diffusion with the marginal transition (GraphMaker ``MarginalTransition``)

    Q_t = alpha_t I + (1 - alpha_t) 1 m^T,   Qbar_t = Q_1 ... Q_t = abar_t I + (1 - abar_t) 1 m^T,

m = (1 - rho, rho) the edge density, so q(A_t = 1 | A_0) = abar_t A_0 + (1 - abar_t) rho (closed form, tested), a
cosine schedule, and a GraphMaker-style denoiser p(A_0 | A_t, X, s, t) (a GNN over A_t whose node input holds the
features X and an embedding of the conditioning attribute s, edge logit = MLP(h_i * h_j)). Reverse step (DiGress /
GraphMaker ``denoise_match_Z``): p(A_{t-1} | A_t) proportional to (A_t Q_t^T) * (p_hat_0 Qbar_{t-1}).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

# ----------------------------------------------------------------------------------------------------------------------
# Diffusion: schedule, transitions, forward marginals and the reverse posterior


def cosine_alpha_bar(T: int, s: float = 0.008) -> torch.Tensor:
    """abar_t, t = 0..T, of the cosine schedule (Nichol & Dhariwal), abar_0 = 1, abar_T = 0 (float64, (T+1,))."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(0.5 * math.pi * (t / T + s) / (1 + s)) ** 2
    abar = f / f[0]
    abar[-1] = 0.0  # cos(pi/2) is 0 up to rounding: the prior is exactly the marginal
    return abar.clamp(0.0, 1.0)


def step_alphas(abar: torch.Tensor) -> torch.Tensor:
    """alpha_t = abar_t / abar_{t-1} for t = 1..T, index 0 unused (= 1)."""
    a = torch.ones_like(abar)
    a[1:] = abar[1:] / abar[:-1].clamp_min(1e-300)
    return a


def transition(alpha: float, rho: float) -> torch.Tensor:
    """(2, 2) marginal transition alpha I + (1 - alpha) 1 m^T with m = (1 - rho, rho); rows: from, columns: to."""
    m = torch.tensor([1.0 - rho, rho], dtype=torch.float64)
    return alpha * torch.eye(2, dtype=torch.float64) + (1.0 - alpha) * m[None, :].expand(2, 2)


def forward_prob(A0: torch.Tensor, abar_t: float, rho: float) -> torch.Tensor:
    """q(A_t = 1 | A_0) = abar_t A_0 + (1 - abar_t) rho, elementwise."""
    return abar_t * A0 + (1.0 - abar_t) * rho


def sample_symmetric(prob: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A symmetric 0/1 matrix without self loops: the upper triangle ~ Bernoulli(prob), mirrored."""
    n = prob.shape[0]
    iu = torch.triu_indices(n, n, 1)
    u = torch.rand(iu.shape[1], generator=gen, dtype=torch.float64)
    vals = (u < prob[iu[0], iu[1]].double()).to(prob.dtype)
    A = torch.zeros(n, n, dtype=prob.dtype)
    A[iu[0], iu[1]] = vals
    return A + A.T


def posterior_prob(A_t: torch.Tensor, p0: torch.Tensor, t: int, abar: torch.Tensor, rho: float) -> torch.Tensor:
    """p(A_{t-1} = 1 | A_t, p_hat_0): (A_t one-hot Q_t^T) * (p_hat_0 Qbar_{t-1}), normalised (GraphMaker/DiGress)."""
    alpha = step_alphas(abar)
    Qt, Qbar_s = transition(float(alpha[t]), rho), transition(float(abar[t - 1]), rho)
    At = A_t.double()
    left1 = At * Qt[1, 1] + (1 - At) * Qt[1, 0]  # q(A_t | A_{t-1} = 1)
    left0 = At * Qt[0, 1] + (1 - At) * Qt[0, 0]  # q(A_t | A_{t-1} = 0)
    p = p0.double()
    right1 = p * Qbar_s[1, 1] + (1 - p) * Qbar_s[0, 1]  # sum_a0 p_hat(a0) q(A_{t-1} = 1 | a0)
    right0 = p * Qbar_s[1, 0] + (1 - p) * Qbar_s[0, 0]
    num1, num0 = left1 * right1, left0 * right0
    den = num1 + num0
    return torch.where(den > 0, num1 / den.clamp_min(1e-300), torch.zeros_like(den))


# ----------------------------------------------------------------------------------------------------------------------
# The denoiser (GraphMaker-style link predictor conditioned on X and the attribute s)


def row_normalise(A: torch.Tensor) -> torch.Tensor:
    deg = A.sum(1, keepdim=True)
    return A / deg.clamp_min(1.0)


class EdgeDenoiser(nn.Module):
    """p(A_0[i, j] = 1 | A_t, X, s, t): GraphMaker's GNNTower (X and label embeddings, message passing over the
    row-normalised A_t, concatenation of every layer, time embedding) and LinkPredictor (MLP of h_i * h_j)."""

    def __init__(self, in_x: int, n_groups: int = 2, hidden_x: int = 64, hidden_y: int = 16, hidden_t: int = 16,  # GraphMaker hidden_t 32
                 hidden_e: int = 32, layers: int = 2):
        super().__init__()
        self.mlp_t = nn.Sequential(nn.Linear(1, hidden_t), nn.ReLU(), nn.Linear(hidden_t, hidden_t), nn.ReLU())
        self.mlp_x = nn.Sequential(nn.Linear(in_x, hidden_x), nn.ReLU(), nn.Linear(hidden_x, hidden_x), nn.ReLU())
        self.emb_y = nn.Embedding(n_groups, hidden_y)
        self.upd_x = nn.ModuleList([nn.Sequential(nn.Linear(hidden_x + hidden_y + hidden_t, hidden_x), nn.ReLU(),
                                                  nn.LayerNorm(hidden_x)) for _ in range(layers)])
        self.upd_y = nn.ModuleList([nn.Sequential(nn.Linear(hidden_y, hidden_y), nn.ReLU(), nn.LayerNorm(hidden_y))
                                    for _ in range(layers)])
        cat = (layers + 1) * (hidden_x + hidden_y) + hidden_t
        self.out = nn.Sequential(nn.Linear(cat, cat), nn.ReLU(), nn.Linear(cat, hidden_e))
        self.edge = nn.Sequential(nn.Linear(hidden_e, hidden_e), nn.ReLU(), nn.Linear(hidden_e, 1))

    def forward(self, A_t: torch.Tensor, X: torch.Tensor, s: torch.Tensor, t_float: float) -> torch.Tensor:
        """(n, n) logits of A_0 (symmetric)."""
        n = X.shape[0]
        P = row_normalise(A_t)  # (n, n)
        h_t = self.mlp_t(torch.full((1, 1), float(t_float))).expand(n, -1)  # (n, ht)
        h_x, h_y = self.mlp_x(X), self.emb_y(s)  # (n, hx), (n, hy)
        hs_x, hs_y = [h_x], [h_y]
        for ux, uy in zip(self.upd_x, self.upd_y):
            agg_x = P @ torch.cat([h_x, h_y], 1)
            h_x, h_y = ux(torch.cat([agg_x, h_t], 1)), uy(P @ h_y)
            hs_x.append(h_x)
            hs_y.append(h_y)
        h = self.out(torch.cat(hs_x + hs_y + [h_t], 1))  # (n, he)
        return self.edge(h[:, None, :] * h[None, :, :]).squeeze(-1)  # (n, n)


def train_denoiser(A0: torch.Tensor, X: torch.Tensor, s: torch.Tensor, *, T: int, steps: int, lr: float,
                   gen: torch.Generator, hidden: int = 64) -> tuple[EdgeDenoiser, dict]:
    """Fit the denoiser on the one observed graph: t ~ U{1..T}, A_t ~ q(A_t | A_0), cross-entropy on every pair."""
    n = A0.shape[0]
    rho = float(A0.sum() / (n * (n - 1)))
    abar = cosine_alpha_bar(T)
    model = EdgeDenoiser(X.shape[1], int(s.max()) + 1, hidden_x=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)  # GraphMaker: Adam(amsgrad=True)
    iu = torch.triu_indices(n, n, 1)
    target = A0[iu[0], iu[1]]
    losses = []
    for _ in range(steps):
        t = int(torch.randint(1, T + 1, (1,), generator=gen))
        A_t = sample_symmetric(forward_prob(A0.double(), float(abar[t]), rho), gen).float()
        logits = model(A_t, X, s, t / T)[iu[0], iu[1]]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # GraphMaker max_grad_norm 10
        opt.step()
        losses.append(float(loss))
    model.eval()
    return model, {"rho": rho, "T": T, "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:])),
                   "base_entropy": base_rate_entropy(rho)}


def base_rate_entropy(rho: float) -> float:
    """Binary entropy (nats) of the edge base rate: the cross-entropy of a denoiser that predicts the density only."""
    return float(-(rho * math.log(rho) + (1 - rho) * math.log(1 - rho))) if 0 < rho < 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# FAROS: the switch, its fraction and its step


def switch_attribute(s: torch.Tensor, nodes: torch.Tensor, shifts: torch.Tensor | None = None,
                     n_groups: int = 2) -> torch.Tensor:
    """A copy of s with s[nodes] switched to another group: (s + shift) mod n_groups, shift in {1..n_groups-1}
    (default 1: for a binary attribute the flip 1 - s; for K groups a uniform other group when shifts ~ U{1..K-1})."""
    out = s.clone()
    sh = torch.ones_like(out[nodes]) if shifts is None else shifts.to(out.dtype)
    out[nodes] = (out[nodes] + sh) % n_groups
    return out


def draw_shifts(n_switch: int, n_groups: int, gen: torch.Generator) -> torch.Tensor:
    """Per switched node, the shift to a uniformly drawn other group (all ones for a binary attribute)."""
    if n_groups == 2:
        return torch.ones(n_switch, dtype=torch.long)
    return torch.randint(1, n_groups, (n_switch,), generator=gen)


def draw_switch_nodes(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """round(p n) nodes drawn uniformly without replacement (sorted)."""
    k = int(round(p * n))
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


@torch.no_grad()
def generate(model: EdgeDenoiser, X: torch.Tensor, s: torch.Tensor, *, T: int, rho: float, gen: torch.Generator,
             switch_nodes: torch.Tensor | None = None, tau: int | None = None, shifts: torch.Tensor | None = None,
             n_groups: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse diffusion from A_T ~ marginal; the denoiser is conditioned on s for t > tau and on the switched s for
    t <= tau (tau = T: switched from the start; tau = 0: switched after the last step, edges unchanged).

    Returns (A_0 (n, n) 0/1, the attribute of the generated graph (switched if a switch happened))."""
    abar = cosine_alpha_bar(T)
    n = X.shape[0]
    A = sample_symmetric(torch.full((n, n), rho, dtype=torch.float64), gen).float()
    cond = s
    switched = (switch_attribute(s, switch_nodes, shifts, n_groups) if switch_nodes is not None and tau is not None
                else s)
    for t in range(T, 0, -1):
        if switch_nodes is not None and tau is not None and t <= tau:
            cond = switched
        p0 = torch.sigmoid(model(A, X, cond, t / T))
        A = sample_symmetric(posterior_prob(A, p0, t, abar, rho), gen).float()
    return A, switched


def intra_share(A: torch.Tensor, s: torch.Tensor) -> float:
    """Share of edges whose two ends have the same attribute."""
    src, dst = torch.triu(A, 1).nonzero(as_tuple=True)
    return float((s[src] == s[dst]).double().mean()) if len(src) else float("nan")


def independence_share(s: torch.Tensor) -> float:
    """Intra-group share of edges placed independently of s: sum_g pi_g^2."""
    pi = torch.bincount(s, minlength=2).double() / len(s)
    return float((pi ** 2).sum())


def switched_intra_share(h0: float, p, n_groups: int = 2):
    """Expected intra-group share after switching each node with probability p to a uniform other group (K groups)
    on fixed edges: an intra edge stays intra w.p. (1-p)^2 + p^2/(K-1); an inter edge becomes intra w.p.
    2p(1-p)/(K-1) + p^2 (K-2)/(K-1)^2. For K = 2: h0 (1 - q) + (1 - h0) q with q = 2p(1-p)."""
    K = n_groups
    stay = (1 - p) ** 2 + p ** 2 / (K - 1)
    become = 2 * p * (1 - p) / (K - 1) + p ** 2 * (K - 2) / (K - 1) ** 2
    return h0 * stay + (1 - h0) * become


def optimal_fraction(h0: float, pi, grid: int = 10001) -> float:
    """p* in [0, (K-1)/K]: the smallest switching fraction whose switch makes the edges' expected intra-group share
    equal to that of independent edges under the switched group sizes (pi_g' = pi_g (1 - p) + (1 - pi_g) p/(K-1));
    the closest if none. ``pi``: the group-1 rate of a binary attribute (a number) or the K group rates."""
    pi = np.array([1.0 - pi, pi]) if np.ndim(pi) == 0 else np.asarray(pi, dtype=float)
    K = len(pi)
    if h0 <= float((pi ** 2).sum()):
        return 0.0  # already at or below independence: nothing to switch
    ps = np.linspace(0.0, (K - 1) / K, grid)
    pis = pi[None, :] * (1 - ps[:, None]) + (1 - pi[None, :]) * ps[:, None] / (K - 1)
    gap = switched_intra_share(h0, ps, K) - (pis ** 2).sum(1)
    cross = np.flatnonzero(gap <= 0)
    return float(ps[cross[0]] if len(cross) else ps[np.argmin(np.abs(gap))])


def degree_tv(A: torch.Tensor, B: torch.Tensor) -> float:
    """Total-variation distance between the degree histograms of two graphs on the same nodes."""
    da, db = A.sum(1).long(), B.sum(1).long()
    m = int(max(da.max(), db.max())) + 1
    ha = torch.bincount(da, minlength=m).double() / len(da)
    hb = torch.bincount(db, minlength=m).double() / len(db)
    return float(0.5 * (ha - hb).abs().sum())


def feature_alignment(A: torch.Tensor, X: torch.Tensor) -> float:
    """Mean cosine similarity of the features at the two ends of an edge (how much the topology follows X)."""
    src, dst = torch.triu(A, 1).nonzero(as_tuple=True)
    Xn = F.normalize(X, dim=1)
    return float((Xn[src] * Xn[dst]).sum(1).mean())


def topology_profile_distance(A: torch.Tensor, A_ref: torch.Tensor, X: torch.Tensor) -> float:
    """Node-topology profile distance: degree-histogram TV + |feature alignment difference|."""
    return degree_tv(A, A_ref) + abs(feature_alignment(A, X) - feature_alignment(A_ref, X))


SELECTION_BRANCHES = ("feasible", "profile kept, fairness constraint unmet", "no step keeps the profile")


def select_tau(stats: dict[int, dict], *, eps_fair: float, delta_topo: float) -> tuple[int, str]:
    """tau* from validation generations: stats[tau] = {"indep_gap", "topo"} (and stats[-1] the unswitched run).

    Constraints: topo(tau) <= topo(unswitched) + delta_topo (node-topology profile kept) and indep_gap(tau) <= eps_fair
    (edges independent of the attribute). Among the feasible steps the most faithful (smallest topo); if none, the
    fairest among those that keep the profile; if none keeps it, the most faithful."""
    base = stats[-1]["topo"]
    taus = sorted(k for k in stats if k >= 0)
    keep = [t for t in taus if stats[t]["topo"] <= base + delta_topo]
    feasible = [t for t in keep if stats[t]["indep_gap"] <= eps_fair]
    if feasible:
        return min(feasible, key=lambda t: (stats[t]["topo"], -t)), "feasible"
    if keep:
        return min(keep, key=lambda t: (stats[t]["indep_gap"], -t)), "profile kept, fairness constraint unmet"
    return min(taus, key=lambda t: (stats[t]["topo"], -t)), "no step keeps the profile"


def rewire_to_independence(A: torch.Tensor, s: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Fair-edit baseline: replace uniformly drawn intra-group edges by uniformly drawn inter-group non-edges, one for
    one (equal edge count), until the intra-group share is at most that of independent edges."""
    A = A.clone()
    n = A.shape[0]
    src, dst = torch.triu(A, 1).nonzero(as_tuple=True)
    m = len(src)
    intra = (s[src] == s[dst]).nonzero(as_tuple=True)[0]
    n_intra, target = len(intra), independence_share(s)
    k = max(0, int(math.ceil(n_intra - target * m)))
    order = intra[torch.randperm(len(intra), generator=gen)[:k]]
    A[src[order], dst[order]] = 0
    A[dst[order], src[order]] = 0
    added = 0
    while added < k:  # a uniform inter-group non-edge (uniform pair, rejected if intra or present)
        i, j = (int(x) for x in torch.randint(n, (2,), generator=gen))
        if s[i] != s[j] and A[i, j] == 0:
            A[i, j] = A[j, i] = 1
            added += 1
    assert A.sum() / 2 == m and n == A.shape[0]
    return A, k


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: GAE link predictor trained on a (generated) graph, tested on the real graph


def split_edges(A: torch.Tensor, fractions: tuple[float, float], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random edge split of a symmetric A: {"A_train", "val"/"test": (u, v, y) pairs with as many sampled non-edges
    as held-out edges (non-edges of the full graph)}."""
    n = A.shape[0]
    src, dst = torch.triu(A, 1).nonzero(as_tuple=True)
    perm = torch.randperm(len(src), generator=gen)
    n_val, n_test = int(round(fractions[0] * len(src))), int(round(fractions[1] * len(src)))
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    A_train = torch.zeros_like(A)
    A_train[src[train], dst[train]] = 1
    A_train = A_train + A_train.T
    iu = torch.triu_indices(n, n, 1)
    non = (A[iu[0], iu[1]] == 0).nonzero(as_tuple=True)[0]
    neg = non[torch.randperm(len(non), generator=gen)[:n_val + n_test]]
    out = {"A_train": A_train}
    for name, pos, negs in (("val", val, neg[:n_val]), ("test", test, neg[n_val:])):
        u = torch.cat([src[pos], iu[0][negs]])
        v = torch.cat([dst[pos], iu[1][negs]])
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(negs))])
        out[name] = (u, v, y)
    return out


def gcn_norm(A: torch.Tensor) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2."""
    A = A + torch.eye(A.shape[0])
    d = A.sum(1).rsqrt()
    return d[:, None] * A * d[None, :]


class GAE(nn.Module):
    """GraphMaker's GAE discriminator: GCN layers, dot-product decoder."""

    def __init__(self, in_size: int, hidden: int = 32, layers: int = 2):
        super().__init__()
        sizes = [in_size] + [hidden] * layers
        self.lins = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, A_hat: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        for k, lin in enumerate(self.lins):
            Z = A_hat @ lin(Z)
            if k < len(self.lins) - 1:
                Z = F.relu(Z)
        return Z


LINK_MODELS = ("gae", "mlp", "gae_noattr")


def link_inputs(X: torch.Tensor, s: torch.Tensor, n_groups: int = 2, attr: bool = True) -> torch.Tensor:
    """Link-predictor input: standardised features next to the one-hot of the (sensitive) attribute s. GraphMaker's
    gae.py feeds the one-hot of the class label Y next to row-(L1-)normalised features; with the class label as the
    sensitive attribute (FairAdj's Cora convention) the two coincide. attr=False: the features only (ablation)."""
    Xs = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    return torch.cat([Xs, F.one_hot(s, n_groups).float()], 1) if attr else Xs


def train_link_predictor(A: torch.Tensor, X: torch.Tensor, s: torch.Tensor, *, epochs: int, lr: float, hidden: int,
                         gen: torch.Generator, kind: str = "gae", n_groups: int = 2) -> nn.Module:
    """Fit a GAE on graph A (its attribute s): every edge a positive, as many uniform random pairs as negatives per
    epoch (gae.py fit_trial), BCE, Adam; fixed epochs (no early stopping). kind: gae | mlp | gae_noattr (the GAE
    without the attribute in its input)."""
    if kind not in LINK_MODELS:
        raise ValueError(f"link model {kind!r}; allowed: {', '.join(LINK_MODELS)}")
    A_hat, Z = gcn_norm(A), link_inputs(X, s, n_groups, attr=kind != "gae_noattr")
    n = A.shape[0]
    src, dst = torch.triu(A, 1).nonzero(as_tuple=True)
    model = GAE(Z.shape[1], hidden) if kind != "mlp" else MLPEncoder(Z.shape[1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        H = model(A_hat, Z)
        ns = torch.randint(0, n, (len(src),), generator=gen)
        nd = torch.randint(0, n, (len(src),), generator=gen)
        pred = torch.cat([(H[src] * H[dst]).sum(1), (H[ns] * H[nd]).sum(1)])
        label = torch.cat([torch.ones(len(src)), torch.zeros(len(src))])
        loss = F.binary_cross_entropy_with_logits(pred, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.n_groups, model.attr = n_groups, kind != "gae_noattr"
    return model


def dyadic_gaps(prob: torch.Tensor, u: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                s: torch.Tensor) -> tuple[float, float]:
    """Dyadic fairness of link scores (FairAdj / FairWire): Delta_DP = |E[p | s_u = s_v] - E[p | s_u != s_v]| over
    the pairs, Delta_EO = the same over the true edges (y = 1)."""
    intra = s[u] == s[v]
    dp = abs(float(prob[intra].mean()) - float(prob[~intra].mean()))
    pos = y == 1
    eo = abs(float(prob[intra & pos].mean()) - float(prob[~intra & pos].mean()))
    return dp, eo


@torch.no_grad()
def evaluate_link_predictor(model: nn.Module, A_msg: torch.Tensor, X: torch.Tensor, s: torch.Tensor,
                            pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """AUC, Delta_DP, Delta_EO on the real pairs; message passing over the real training graph A_msg."""
    u, v, y = pairs
    H = model(gcn_norm(A_msg), link_inputs(X, s, getattr(model, "n_groups", 2), getattr(model, "attr", True)))
    prob = torch.sigmoid((H[u] * H[v]).sum(1))
    dp, eo = dyadic_gaps(prob, u, v, y, s)
    return {"auc": float(roc_auc_score(y.numpy(), prob.numpy())), "dsp": dp, "deo": eo,
            "pos_rate": float((prob > 0.5).float().mean())}


class MLPEncoder(nn.Module):
    """A link predictor without message passing (GraphMaker's MLP discriminator): MLP node embeddings, dot product."""

    def __init__(self, in_size: int, hidden: int = 32, layers: int = 2):
        super().__init__()
        sizes = [in_size] + [hidden] * layers
        self.lins = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, A_hat: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:  # A_hat unused
        for k, lin in enumerate(self.lins):
            Z = lin(Z)
            if k < len(self.lins) - 1:
                Z = F.relu(Z)
        return Z


# ----------------------------------------------------------------------------------------------------------------------
# One seed of the experiment


def dense_adjacency(data) -> torch.Tensor:
    """Symmetric 0/1 float adjacency without self loops of a NodeData graph."""
    n = data.num_nodes
    src, dst = data.graph.edges()
    A = torch.zeros(n, n)
    A[src, dst] = 1.0
    A = ((A + A.T) > 0).float()
    A.fill_diagonal_(0.0)
    return A


def _gen(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def graph_stats(A: torch.Tensor, s: torch.Tensor, A_ref: torch.Tensor, X: torch.Tensor,
                s_real: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of a generated graph. ``intra`` / ``indep_gap``: w.r.t. the attribute s released with the graph
    (the switched one for a switched arm; what the selection rule sees); ``intra_real``: w.r.t. the real attribute
    s_real (what the evaluation's delta-DP is measured against)."""
    h = intra_share(A, s)
    out = {"edges": float(A.sum() / 2), "intra": h, "indep_gap": abs(h - independence_share(s)),
           "topo": topology_profile_distance(A, A_ref, X)}
    if s_real is not None:
        out["intra_real"] = intra_share(A, s_real)
    return out


def fit_and_score(A: torch.Tensor, s_gen: torch.Tensor, X: torch.Tensor, A_msg: torch.Tensor, s_real: torch.Tensor,
                  pairs, cfg: dict, gen_key: tuple[int, ...], n_groups: int = 2) -> dict[str, dict[str, float]]:
    """Every link model of cfg["link_models"] trained on (A, s_gen), scored on the real pairs."""
    out = {}
    for k, kind in enumerate(cfg["link_models"]):
        g = _gen(*gen_key, 7919 + k)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # the weights' initialisation
        model = train_link_predictor(A, X, s_gen, epochs=cfg["lp_epochs"], lr=cfg["lp_lr"], hidden=cfg["lp_hidden"],
                                     gen=g, kind=kind, n_groups=n_groups)
        out[kind] = evaluate_link_predictor(model, A_msg, X, s_real, pairs)
    return out


def pair_scorers(X: torch.Tensor, s: torch.Tensor, pairs) -> dict[str, float]:
    """Trivial references on the real test pairs: AUC of the scorer "same group?" (1 if s_u = s_v) and of the
    cosine similarity of the features (no training, no graph)."""
    u, v, y = pairs
    Xn = F.normalize(X, dim=1)
    return {"group_only_auc": float(roc_auc_score(y.numpy(), (s[u] == s[v]).double().numpy())),
            "cosine_auc": float(roc_auc_score(y.numpy(), (Xn[u] * Xn[v]).sum(1).double().numpy()))}


def run_seed(data, cfg: dict, seed: int, grid: bool = False) -> dict:
    """Split, pre-train the GDM, choose (p*, tau*) on validation generations, then generate and evaluate every arm.

    Arms (one evaluation generation each per ``n_gen``, sharing its sampling seed): ``real`` (the observed training
    graph), ``unswitched`` (the GDM as is), ``faros`` (p*, tau*), ``posthoc`` (p*, switched after generation: an
    ablation outside the reverse process), ``rewire`` (the unswitched graph with intra-group edges replaced by
    inter-group ones down to independence, equal edge count: a fair-edit baseline), ``real_rewire`` (the observed
    graph rewired the same way: the instrument's positive control against ``real``), ``er`` (an
    Erdos-Renyi graph with the observed graph's density: the trivial reference of the "learns" gates)."""
    X, s = data.X, data.sens
    K = int(s.max()) + 1
    A = dense_adjacency(data)
    split = split_edges(A, (cfg["val_frac"], cfg["test_frac"]), _gen(seed, 1))
    A_tr = split["A_train"]
    torch.manual_seed(seed)
    model, info = train_denoiser(A_tr, X, s, T=cfg["T"], steps=cfg["gdm_steps"], lr=cfg["gdm_lr"], gen=_gen(seed, 2),
                                 hidden=cfg["gdm_hidden"])
    rho, T, n = info["rho"], cfg["T"], data.num_nodes
    h0 = intra_share(A_tr, s)
    pi = (torch.bincount(s, minlength=K).double() / n).numpy()
    p_star = optimal_fraction(h0, pi) if cfg["p_rule"] == "independence" else cfg["p_fixed"]

    # (c) tau* from validation generations (own sampling seeds), graph statistics only
    val: dict[int, dict] = {}
    for k in range(cfg["n_val_gen"]):
        nodes = draw_switch_nodes(n, p_star, _gen(seed, 3, k))
        shifts = draw_shifts(len(nodes), K, _gen(seed, 10, k))
        for tau in [-1] + list(range(1, T + 1)):
            Ag, sg = generate(model, X, s, T=T, rho=rho, gen=_gen(seed, 4, k), switch_nodes=None if tau < 0 else nodes,
                              tau=None if tau < 0 else tau, shifts=shifts, n_groups=K)
            st = graph_stats(Ag, sg, A_tr, X, s)
            for key, v in st.items():
                val.setdefault(tau, {}).setdefault(key, []).append(v)
    val = {tau: {k: float(np.mean(v)) for k, v in d.items()} for tau, d in val.items()}
    tau_star, branch = select_tau(val, eps_fair=cfg["eps_fair"], delta_topo=cfg["delta_topo"])

    # (d-f) evaluation generations
    arms: dict[str, list] = {}
    stats: dict[str, list] = {}
    for k in range(cfg["n_gen"]):
        nodes = draw_switch_nodes(n, p_star, _gen(seed, 5, k))
        shifts = draw_shifts(len(nodes), K, _gen(seed, 11, k))
        graphs = {"real": (A_tr, s)}
        graphs["unswitched"] = generate(model, X, s, T=T, rho=rho, gen=_gen(seed, 6, k))
        graphs["faros"] = generate(model, X, s, T=T, rho=rho, gen=_gen(seed, 6, k), switch_nodes=nodes, tau=tau_star,
                                   shifts=shifts, n_groups=K)
        graphs["posthoc"] = (graphs["unswitched"][0], switch_attribute(s, nodes, shifts, K))
        graphs["rewire"] = (rewire_to_independence(graphs["unswitched"][0], s, _gen(seed, 7, k))[0], s)
        graphs["real_rewire"] = (rewire_to_independence(A_tr, s, _gen(seed, 14, k))[0], s)
        graphs["er"] = (sample_symmetric(torch.full((n, n), rho, dtype=torch.float64), _gen(seed, 12, k)).float(), s)
        for arm, (Ag, sg) in graphs.items():
            arms.setdefault(arm, []).append(fit_and_score(Ag, sg, X, A_tr, s, split["test"], cfg, (seed, 8, k), K))
            stats.setdefault(arm, []).append(graph_stats(Ag, sg, A_tr, X, s))
    result = {"seed": seed, "gdm": info, "h0": h0, "h_obs_full": intra_share(A, s), "h_ind": independence_share(s), "p_star": p_star,
              "tau_star": tau_star, "tau_branch": branch, "val": {str(t): v for t, v in val.items()},
              "scorers": pair_scorers(X, s, split["test"]),
              "arms": {arm: {kind: {m: float(np.mean([r[kind][m] for r in runs])) for m in runs[0][kind]}
                             for kind in cfg["link_models"]} for arm, runs in arms.items()},
              "graphs": {arm: {m: float(np.mean([r[m] for r in runs])) for m in runs[0]} for arm, runs in stats.items()}}
    if grid:  # diagnostic (p, tau) grid, first link model only; never used for a choice
        kind = cfg["link_models"][0]
        cells = {}
        for p in cfg["grid_p"]:
            nodes = draw_switch_nodes(n, p, _gen(seed, 9, int(p * 1000)))
            shifts = draw_shifts(len(nodes), K, _gen(seed, 13, int(p * 1000)))
            for tau in range(0, T + 1):
                Ag, sg = generate(model, X, s, T=T, rho=rho, gen=_gen(seed, 6, 0), switch_nodes=nodes, tau=tau,
                                  shifts=shifts, n_groups=K)
                r = fit_and_score(Ag, sg, X, A_tr, s, split["test"], {**cfg, "link_models": [kind]}, (seed, 8, 0), K)[kind]
                cells[f"p={p:g},tau={tau}"] = {**r, **graph_stats(Ag, sg, A_tr, X, s), "p": p, "tau": tau}
        result["grid"] = cells
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Data: a Cora-calibrated generator (default, offline) and the real Cora (online, DGL)

CORA_CLASS_SIZES = (818, 426, 418, 351, 298, 217, 180)  # Planetoid Cora: 2708 nodes, 7 classes


def cora_like_sbm(n: int = 2708, mean_degree: float = 3.9, homophily: float = 0.81, d: int = 16, mu: float = 1.5,
                  seed: int = 0):
    """GENERATED Cora-like graph (a planted-partition SBM), calibrated to Planetoid Cora's published statistics:
    class proportions of its 7 classes, mean degree 2 * 5278 / 2708 = 3.9, edge homophily 0.81. The class label is the
    sensitive attribute (FairAdj's convention on citation graphs). Each of round(n * mean_degree / 2) edges picks a
    uniform source, then w.p. ``homophily`` a uniform node of its class, else a uniform node of another class
    (duplicates and self loops dropped). Features X = mu e_y + N(0, I_d) (e_y: one of 7 orthonormal directions);
    mu = 1.5 puts the Bayes accuracy of a feature-only classifier near 0.6 (an MLP on Cora's features)."""
    from .graphdata import NodeData, graph_from_edges

    rng = np.random.default_rng(seed)
    K = len(CORA_CLASS_SIZES)
    if d < K:
        raise ValueError(f"cora_like_sbm: d={d} must be at least the {K} classes")
    pi = np.array(CORA_CLASS_SIZES, dtype=float) / sum(CORA_CLASS_SIZES)
    counts = np.floor(pi * n).astype(int)
    counts[: n - counts.sum()] += 1  # exact total n
    y = rng.permutation(np.repeat(np.arange(K), counts))
    members = [np.flatnonzero(y == c) for c in range(K)]
    m = int(round(n * mean_degree / 2))
    src = rng.integers(0, n, m)
    same = rng.random(m) < homophily
    dst = np.empty(m, dtype=np.int64)
    for i in range(m):
        if same[i]:
            mem = members[y[src[i]]]
            dst[i] = mem[rng.integers(len(mem))]
        else:
            while True:
                j = int(rng.integers(n))
                if y[j] != y[src[i]]:
                    dst[i] = j
                    break
    X = rng.standard_normal((n, d))
    X[np.arange(n), y] += mu
    g = graph_from_edges(src, dst, n)
    y_t = torch.from_numpy(y).long()
    return NodeData("cora_sbm", g, torch.tensor(X, dtype=torch.float32), y_t, y_t.clone(),
                    {"n": n, "mean_degree": mean_degree, "homophily": homophily, "d": d, "mu": mu, "seed": seed})


def load_cora_dgl():
    """REAL Planetoid Cora via DGL (downloads; online users only): sensitive attribute = class label (FairAdj)."""
    import dgl
    from dgl.data import CoraGraphDataset

    from .graphdata import NodeData

    g = CoraGraphDataset(verbose=False)[0]
    y = g.ndata["label"].long()
    src, dst = g.edges()
    from .graphdata import graph_from_edges
    gs = graph_from_edges(src.numpy(), dst.numpy(), g.num_nodes())
    del dgl
    return NodeData("cora", gs, g.ndata["feat"].float(), y, y.clone(), {"source": "dgl.data.CoraGraphDataset"})
