"""Auxiliary-loss-free load balancing (ALF-LB) as a one-step primal-dual method.

Han & Zhong, "A Theoretical Framework for Auxiliary-Loss-Free Load Balancing of Sparse Mixture-of-Experts in
Large-Scale AI Models", arXiv:2512.03915; the procedure is DeepSeek's (Wang et al., "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts", arXiv:2408.15664; DeepSeek-V3).

ALF-LB keeps one bias ``b_i`` per expert. Each token picks its top-K experts by ``score + b`` (the bias changes the
*selection* only; the gating weight is the unbiased score, DeepSeek-V3 ``inference/model.py`` ``Gate.forward``), and
after each step ``b_i <- b_i + u * sign(mean load - load_i)`` (Megatron-Core ``moe_utils.get_updated_expert_bias``).

The primal-dual reading (our notation). Tokens t = 1..T, experts i = 1..E, affinities ``gamma[t, i]``, K experts per
token, balanced load ``L = T K / E``. The assignment LP is

    V* = max_x  sum_ti gamma_ti x_ti   s.t.  sum_i x_ti = K (each token),  sum_t x_ti = L (each expert),  0 <= x <= 1.

Dualising the expert constraints with multipliers ``b`` gives the Lagrangian
``Lag(x, b) = sum_ti (gamma_ti + b_i) x_ti - L sum_i b_i``; its maximiser over the token constraints is exactly the
biased top-K routing, and the dual function ``g(b) = max_x Lag(x, b) = sum_t topK_sum(gamma_t + b) - L sum_i b_i`` is
convex with subgradient ``load(b) - L``. ALF-LB is one (sign-)subgradient step on ``g`` per routing step.
Exact facts checked numerically here (derived in the notebook):

* preference rule: between two consecutive routings every expert a token adds had a strictly larger sign
  ``s_i = sign(L - load_i)`` than every expert it drops (tokens move from overloaded towards underloaded experts);
* monotone Lagrangian: if no expert receives more tokens than its deficit nor loses more than its excess ("no
  overshoot"), then ``g(b_{n+1}) <= g(b_n)``: the Lagrangian at the iterates improves monotonically;
* weak and strong duality: ``g(b) >= V*`` for every b, with equality at the LP's dual solution.

Online (K = 1, Gumbel affinities ``gamma_ti = mu_i + G_ti``): the expected per-token dual function has the closed
form ``F(b) = logsumexp(mu + b) - mean(b) + const``, strongly convex on the zero-sum subspace with modulus
``min_i softmax(mu + b)_i``; a gradient step with ``u_t = c / (t + t0)`` has O(log T) expected regret (Hazan et al.
2007, online gradient descent on strongly convex losses).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linprog
from scipy.special import logsumexp, softmax

from .smile import Block, Experts, dispatch_combine

# ----------------------------------------------------------------------------------------------------------------
# The update and the routing (shared by the LP, the online run and the LM)
# ----------------------------------------------------------------------------------------------------------------


def update_bias(bias, load, rate):
    """ALF-LB: ``b + rate * sign(mean(load) - load)`` (Megatron-Core get_updated_expert_bias). numpy or torch."""
    if isinstance(load, torch.Tensor):
        load = load.to(bias.dtype)
        return bias + torch.sign(load.mean() - load) * rate
    load = np.asarray(load, dtype=float)
    return np.asarray(bias, dtype=float) + np.sign(load.mean() - load) * rate


def biased_topk(scores: torch.Tensor, bias: torch.Tensor | None, k: int):
    """Top-k experts by ``scores + bias``; gating weights are the UNBIASED scores of the chosen experts.
    scores (T, E) -> (indices (T, k), weights (T, k))."""
    sel = scores if bias is None else scores + bias  # (T, E): used for the selection only
    idx = torch.topk(sel, k, dim=-1).indices  # (T, k)
    return idx, scores.gather(1, idx)


def max_vio(load) -> float:
    """MaxVio (Wang et al. 2408.15664, eq. 4): ``max_i load_i / mean(load) - 1``."""
    load = np.asarray(load, dtype=float)
    return float(load.max() / load.mean() - 1.0)


def switch_aux_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i P_i`` with ``f_i = tokens_i / (T k)`` and ``P_i`` the mean
    router probability (Megatron-Core switch_load_balancing_loss_func without the coefficient). Equals 1 when balanced."""
    T, E = probs.shape
    return E * (probs.mean(0) * tokens_per_expert.to(probs.dtype) / (T * k)).sum()


# ----------------------------------------------------------------------------------------------------------------
# (a) The deterministic assignment LP
# ----------------------------------------------------------------------------------------------------------------


def route_topk(gamma: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Biased top-k routing as a 0/1 matrix x (T, E): the Lagrangian's maximiser for biases b."""
    idx = np.argpartition(-(gamma + b), k - 1, axis=1)[:, :k]  # (T, k)
    x = np.zeros(gamma.shape, dtype=bool)
    np.put_along_axis(x, idx, True, axis=1)
    return x


def dual_value(gamma: np.ndarray, b: np.ndarray, k: int, L: float) -> float:
    """g(b) = sum_t (sum of the k largest gamma_t + b) - L sum_i b_i (the Lagrangian at its maximiser)."""
    top = -np.partition(-(gamma + b), k - 1, axis=1)[:, :k]  # (T, k)
    return float(top.sum() - L * np.sum(b))


def lagrangian(gamma: np.ndarray, x: np.ndarray, b: np.ndarray, L: float) -> float:
    return float(((gamma + b) * x).sum() - L * np.sum(b))


def lp_optimum(gamma: np.ndarray, k: int):
    """The balanced assignment LP solved by HiGHS: (V*, x* (T, E), b* (E,) the dual of the expert constraints, in
    the sign convention of ``dual_value``)."""
    T, E = gamma.shape
    L = T * k / E
    n = T * E
    rows_tok = np.kron(np.eye(T), np.ones((1, E)))  # (T, T E): sum_i x_ti
    rows_exp = np.kron(np.ones((1, T)), np.eye(E))  # (E, T E): sum_t x_ti
    res = linprog(-gamma.ravel(), A_eq=np.vstack([rows_tok, rows_exp]), b_eq=np.r_[np.full(T, k), np.full(E, L)],
                  bounds=(0, 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    # HiGHS marginals are d(objective of the min problem)/d(b_eq); our b is the multiplier of the max problem with
    # Lag = gamma x + b (load - L): b_i = marginal of the expert row (sign flips twice). Fixed up to a constant.
    b = np.asarray(res.eqlin.marginals[T:], dtype=float)
    return float(-res.fun), res.x.reshape(T, E), b


def alf_lb_deterministic(gamma: np.ndarray, k: int, u: float, n_iter: int, b0=None) -> dict:
    """Run ALF-LB with a constant sign step on a FIXED token set (the paper's stylized deterministic setting) and
    record, at every step n -> n+1: the Lagrangian g(b_n), MaxVio, the preference-rule check, the no-overshoot
    condition and whether g did not increase.

    Preference rule (exact): for every token whose expert set changes, min_{added} s_i > max_{dropped} s_j with
    s = sign(L - load_n). No-overshoot: every underloaded expert gains at most its deficit and every overloaded expert
    loses at most its excess between the two routings (then g does not increase). The one-step bound
    g(b_{n+1}) - g(b_n) <= u (sum_{underloaded} arrivals + sum_{overloaded} departures - sum_i |load_i - L|) is checked
    at every step."""
    T, E = gamma.shape
    L = T * k / E
    b = np.zeros(E) if b0 is None else np.asarray(b0, dtype=float).copy()
    x = route_topk(gamma, b, k)
    g = [dual_value(gamma, b, k, L)]
    vio = [max_vio(x.sum(0))]
    n_moves = n_pref_viol = n_strict = n_bound_viol = 0
    cond, dec, g_up_under_cond = [], [], 0
    worst_increase_under_cond = -np.inf
    for _ in range(n_iter):
        load = x.sum(0)
        s = np.sign(L - load)  # (E,) +1 underloaded, -1 overloaded
        b = update_bias(b, load, u)
        x_new = route_topk(gamma, b, k)
        added, dropped = x_new & ~x, x & ~x_new  # (T, E)
        moved = added.any(1)
        if moved.any():
            s_add = np.where(added[moved], s, np.inf).min(1)
            s_drop = np.where(dropped[moved], s, -np.inf).max(1)
            n_pref_viol += int((s_add <= s_drop).sum())
            n_strict += int(((s_add == 1) & (s_drop == -1)).sum())
            n_moves += int(moved.sum())
        arrivals, departures = added.sum(0), dropped.sum(0)
        ok = bool(np.all(arrivals[s > 0] <= (L - load)[s > 0]) and np.all(departures[s < 0] <= (load - L)[s < 0]))
        g_new = dual_value(gamma, b, k, L)
        # the unconditional one-step bound: g_new - g <= u (sum_under arrivals + sum_over departures - sum |load - L|)
        bound = u * (arrivals[s > 0].sum() + departures[s < 0].sum() - np.abs(load - L).sum())
        n_bound_viol += int(g_new - g[-1] > bound + 1e-9 * max(1.0, abs(g[-1])))
        cond.append(ok)
        dec.append(g_new <= g[-1] + 1e-9 * max(1.0, abs(g[-1])))
        if ok:
            worst_increase_under_cond = max(worst_increase_under_cond, g_new - g[-1])
            g_up_under_cond += int(not dec[-1])
        x = x_new
        g.append(g_new)
        vio.append(max_vio(x.sum(0)))
    return {"g": np.array(g), "maxvio": np.array(vio), "b": b, "n_moves": n_moves, "pref_violations": n_pref_viol,
            "strict_over_to_under": n_strict, "cond": np.array(cond), "g_nonincreasing": np.array(dec),
            "g_increase_under_cond": g_up_under_cond, "step_bound_violations": n_bound_viol,
            "worst_increase_under_cond": float(worst_increase_under_cond) if np.isfinite(worst_increase_under_cond)
            else 0.0}


def skewed_affinities(T: int, E: int, spread: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """GENERATED token-expert affinities: gamma_ti = mu_i + noise * z_ti with expert popularities mu_i evenly spaced
    over [0, spread] (a router that prefers some experts), z standard normal."""
    mu = np.linspace(0.0, spread, E)[rng.permutation(E)]
    return mu[None, :] + noise * rng.standard_normal((T, E))


# ----------------------------------------------------------------------------------------------------------------
# (b) The online setting: K = 1, Gumbel affinities, exact pseudo-regret
# ----------------------------------------------------------------------------------------------------------------


def online_dual(mu: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Expected per-token dual function up to a constant: F(b) = logsumexp(mu + b) - mean(b). b (..., E)."""
    return logsumexp(mu + b, axis=-1) - b.mean(-1)


def online_run(mu: np.ndarray, n_tok: int, T: int, rule: str, c: float, t0: float, rng: np.random.Generator) -> dict:
    """T routing steps of n_tok tokens with affinities mu_i + Gumbel (top-1 routing by affinity + b samples an expert
    from softmax(mu + b)). Rules: ``grad`` b += u_t (1/E - share), u_t = c/(t + t0) (the primal-dual gradient step);
    ``sign`` b += u_t sign(mean load - load) with u_t = c/(t + t0) (ALF-LB with decaying steps); ``const`` the
    gradient step with constant u = c/(1 + t0). Returns the per-step pseudo-regret F(b_t) - F(b*) (exact), MaxVio
    of each batch and the smallest routing probability seen (the strong-convexity modulus along the path)."""
    E = len(mu)
    b = np.zeros(E)
    F_star = math.log(E) + float(mu.mean())  # F at b* = -(mu - mean mu)
    inst, vio, p_min = np.empty(T), np.empty(T), 1.0 / E
    for t in range(1, T + 1):
        p = softmax(mu + b)
        p_min = min(p_min, float(p.min()))
        inst[t - 1] = logsumexp(mu + b) - b.mean() - F_star
        gumbel = rng.gumbel(size=(n_tok, E))
        load = np.bincount(np.argmax(mu + b + gumbel, axis=1), minlength=E)
        vio[t - 1] = max_vio(load)
        u = c / (t + t0) if rule in ("grad", "sign") else c / (1 + t0)
        if rule == "sign":
            b = update_bias(b, load, u)
        else:
            b = b + u * (1.0 / E - load / n_tok)
    return {"inst_regret": inst, "regret": np.cumsum(inst), "maxvio": vio, "p_min": p_min, "b": b}


def ogd_regret_bound(T: np.ndarray, c: float, t0: float, mu_sc: float, D2: float, G2: float) -> np.ndarray:
    """Expected-regret bound of online gradient descent with u_t = c/(t + t0) on losses that are mu_sc-strongly convex
    (on the segments between the iterates and b*), valid when c * mu_sc >= 1:
    R_T <= ((1 + t0)/c - mu_sc) D2 / 2 + (c G2 / 2) sum_{t=1}^T 1/(t + t0), D2 = |b_1 - b*|^2, G2 >= E|grad|^2."""
    T = np.asarray(T)
    harmonic = np.array([np.sum(1.0 / (np.arange(1, n + 1) + t0)) for n in np.atleast_1d(T)])
    return max((1 + t0) / c - mu_sc, 0.0) * D2 / 2 + c * G2 / 2 * harmonic


def fit_r2(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares y = a + beta x: (a, beta, R^2)."""
    A = np.c_[np.ones_like(x), x]
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    return float(coef[0]), float(coef[1]), r2


# ----------------------------------------------------------------------------------------------------------------
# (c) A tiny top-K MoE language model: no balancing, Switch aux loss, ALF-LB
# ----------------------------------------------------------------------------------------------------------------


class TopKMoE(nn.Module):
    """Router (linear, softmax or sigmoid scores) + E experts, top-K. ``balance``: ``none``, ``aux`` (Switch loss
    returned) or ``alf`` (the selection uses score + expert_bias, a buffer updated outside autograd)."""

    def __init__(self, d: int, h: int, E: int, k: int, balance: str, score_func: str = "softmax"):
        super().__init__()
        self.E, self.k, self.balance, self.score_func = E, k, balance, score_func
        self.router = nn.Linear(d, E, bias=False)
        self.experts = Experts(E, d, h)
        self.register_buffer("expert_bias", torch.zeros(E))
        self.last_load = torch.zeros(E)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        logits = self.router(x)  # (T, E)
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()  # (T, E)
        idx, w = biased_topk(scores, self.expert_bias if self.balance == "alf" else None, self.k)  # (T, k) each
        if self.score_func == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        y = sum(dispatch_combine(x, idx[:, j], w[:, j], self.experts) for j in range(self.k))  # (T, d)
        load = torch.bincount(idx.reshape(-1), minlength=self.E)  # (E,)
        self.last_load = load.detach()
        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = switch_aux_loss(probs, load, self.k) if self.balance == "aux" else scores.sum() * 0.0
        return y.reshape(shape), aux, idx


class TopKMoELM(nn.Module):
    """Tiny character-level LM whose every feed-forward is a top-K MoE; forward -> (logits, summed aux, indices)."""

    def __init__(self, vocab: int, d: int, heads: int, h: int, layers: int, ctx: int, E: int, k: int, balance: str,
                 score_func: str = "softmax"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, lambda: TopKMoE(d, h, E, k, balance, score_func))
                                    for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        aux, idxs = 0.0, []
        for blk in self.blocks:
            x, a, idx = blk(x)
            aux, idxs = aux + a, idxs + [idx]
        return self.head(self.ln(x)), aux, idxs


@torch.no_grad()
def validation_maxvio(model: TopKMoELM, ids: torch.Tensor, T: int, n_windows: int) -> tuple[float, list]:
    """MaxVio_global (Wang et al.): expert loads over fixed validation windows, per layer; returns (mean over layers,
    per-layer loads)."""
    model.eval()
    starts = torch.linspace(0, len(ids) - T - 2, n_windows).long().tolist()
    w = torch.stack([ids[s:s + T] for s in starts])
    _, _, idxs = model(w)
    model.train()
    E = model.blocks[0].moe.E
    loads = [torch.bincount(i.reshape(-1), minlength=E).tolist() for i in idxs]
    return float(np.mean([max_vio(l) for l in loads])), loads


def train_moe_lm(balance: str, train_ids, val_ids, vocab: int, cfg: dict, seed: int, aux_coef: float = 0.0,
                 bias_rate: float = 0.0) -> dict:
    """Train one MoE LM. Same seed -> same initial parameters and batches for every balancing arm (no arm draws extra
    random numbers). ALF-LB updates each layer's bias after every optimizer step from that step's batch loads."""
    from .smile import batch, evaluate

    torch.manual_seed(seed)
    model = TopKMoELM(vocab, cfg["d_model"], cfg["heads"], cfg["d_ff"], cfg["layers"], cfg["ctx"], cfg["n_experts"],
                      cfg["top_k"], balance, cfg["score_func"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve, batch_vio = [], []
    for step in range(1, cfg["steps"] + 1):
        x, y = batch(train_ids, cfg["batch_size"], cfg["ctx"], gen)
        logits, aux, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        if balance == "aux":
            loss = loss + aux_coef * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        loads = [blk.moe.last_load for blk in model.blocks]
        batch_vio.append(float(np.mean([max_vio(l.numpy()) for l in loads])))
        if balance == "alf":
            for blk, l in zip(model.blocks, loads):
                blk.moe.expert_bias.copy_(update_bias(blk.moe.expert_bias, l, bias_rate))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curve.append((step, evaluate(model, val_ids, cfg["ctx"], cfg["val_windows"])))
    vio, loads = validation_maxvio(model, val_ids, cfg["ctx"], cfg["val_windows"])
    return {"val_loss": curve[-1][1], "curve": curve, "maxvio_global": vio, "val_loads": loads,
            "maxvio_batch": batch_vio,
            "bias": [blk.moe.expert_bias.tolist() for blk in model.blocks]}
