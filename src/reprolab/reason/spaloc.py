"""SpaLoc on family trees: local sparse supports, information-sufficiency (IS) subgraph sampling, training, metrics.

Paper: "Sparse and Local Networks for Hypergraph Reasoning" (SpaLoc), https://arxiv.org/abs/2303.05496

* Locality: the support of binary predicates is the set of pairs within ``k_hop`` hops of the input graph (diagonal
  included); ternary hyperedges are the triangles of that pair set (so every ternary prefix is a supported pair).
* Sparsity: gated NLM outputs, a Hoyer loss on the gates, pruning of low-importance hyperedges at inference.
* Subgraph training: subgraphs of ``sub_size`` nodes are sampled from a large training graph, by default as the
  official ``SubgraphNeighborDataset`` does (``sampler="neighbor"``: fanouts[0] random seed nodes, then fanouts[h]
  random neighbours, with replacement, of every frontier node, then a random truncation to ``sub_size`` or a random
  fill-up); ``sampler="bfs"`` is the earlier fan-out BFS truncated in BFS order. Labels are calibrated as
  y * IS^gamma with the official IS (``SubgraphDataset.get_IS``): IS = (I + sum_{k<=is_len} A_sub^k) /
  (I + sum_{k<=is_len} A^k) restricted to the subgraph, 0/0 -> 1, i.e. how much of the short-walk evidence for the
  label the subgraph still holds (pairs with no short walk in the full graph keep their label).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fnn

from .family import TARGETS, FamilyTree, family_relations, hop_distances
from .nlm import NLM, hoyer, hoyer_official, tuple_keys

IN_DIMS = [0, 1, 1, 0]  # arity 0: none, 1: male, 2: parent(x, y), 3: none
OUT_DIMS = [0, 0, len(TARGETS), 0]


def local_supports(P: np.ndarray, k_hop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E2: pairs within k_hop (incl. (x, x)); E3: triples whose three pairs (x,y), (y,z), (x,z) are all in E2."""
    M = hop_distances(P, k_hop) <= k_hop  # (N, N) symmetric
    E2 = torch.from_numpy(np.argwhere(M))
    triples = []
    for x in range(len(M)):
        nb = np.flatnonzero(M[x])
        yz = np.argwhere(M[np.ix_(nb, nb)])  # pairs of x's neighbours that are themselves close
        triples.append(np.column_stack([np.full(len(yz), x), nb[yz[:, 0]], nb[yz[:, 1]]]))
    return E2, torch.from_numpy(np.concatenate(triples))


def dense_inputs(male: np.ndarray, P: np.ndarray) -> list[torch.Tensor]:
    n = len(male)
    return [torch.zeros(0), torch.from_numpy(male.astype(np.float32)).reshape(n, 1),
            torch.from_numpy(P.astype(np.float32)).reshape(n, n, 1), torch.zeros(n, n, n, 0)]


def sparse_inputs(male: np.ndarray, P: np.ndarray, E2: torch.Tensor, E3: torch.Tensor) -> list:
    n = len(male)
    S = [torch.zeros(0)]
    idx1 = torch.arange(n).reshape(n, 1)
    S.append((idx1, idx1.reshape(-1), torch.from_numpy(male.astype(np.float32)).reshape(n, 1)))
    for idx, feat in ((E2, lambda i: torch.from_numpy(P[i[:, 0].numpy(), i[:, 1].numpy()].astype(np.float32))
                       .reshape(-1, 1)), (E3, lambda i: torch.zeros(len(i), 0))):
        keys = tuple_keys(idx, n)
        order = torch.argsort(keys)
        idx = idx[order]
        S.append((idx, keys[order], feat(idx)))
    return S


def targets(rel: dict) -> np.ndarray:
    return np.stack([rel[t] for t in TARGETS], -1).astype(np.float32)  # (N, N, T)


# ---------------------------------------------------------------- IS subgraph sampling
def sample_neighbor_subgraph(A: np.ndarray, size: int, fanouts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Official SubgraphNeighborDataset.__sample_nodes__: fanouts[0] random seed nodes; for each later fan-out f, f
    neighbours drawn with replacement for every frontier node (the frontier = the unique drawn nodes); then a random
    subset of ``size`` nodes (random truncation) or a fill-up with random other nodes."""
    n = len(A)
    chosen = np.zeros(n, dtype=bool)
    frontier = rng.choice(n, min(fanouts[0], n), replace=False)
    chosen[frontier] = True
    nbrs = [np.flatnonzero(A[u]) for u in range(n)]
    for f in fanouts[1:]:
        drawn = [nbrs[u][rng.integers(len(nbrs[u]), size=f)] for u in frontier if len(nbrs[u])]
        if not drawn:
            break
        frontier = np.unique(np.concatenate(drawn))
        chosen[frontier] = True
    nodes = np.flatnonzero(chosen)
    if len(nodes) > size:
        nodes = rng.permutation(nodes)[:size]
    elif len(nodes) < size:
        rest = np.flatnonzero(~chosen)
        nodes = np.concatenate([nodes, rng.permutation(rest)[:size - len(nodes)]])
    return np.sort(nodes)


def sample_subgraph(A: np.ndarray, size: int, fanouts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Fan-out BFS from a random seed: hop h adds up to fanouts[h] random neighbours per frontier node."""
    nodes = [int(rng.integers(len(A)))]
    frontier = list(nodes)
    for f in fanouts:
        nxt = []
        for u in frontier:
            nb = [v for v in np.flatnonzero(A[u]) if v not in nodes and v not in nxt]
            rng.shuffle(nb)
            nxt += [int(v) for v in nb[:f]]
        room = size - len(nodes)
        nodes += nxt[:room]
        frontier = nxt[:room]
        if len(nodes) >= size or not frontier:
            break
    return np.array(sorted(nodes))


def walk_counts(A: np.ndarray, L: int) -> np.ndarray:
    """sum_{l=1..L} A^l: number of walks of length <= L between every pair."""
    A = A.astype(np.float64)
    W, Al = np.zeros_like(A), np.eye(len(A))
    for _ in range(L):
        Al = Al @ A
        W += Al
    return W


def information_sufficiency(A_sub: np.ndarray, walks_full_sub: np.ndarray, is_len: int) -> np.ndarray:
    """Official IS: (I + walks<=is_len in the subgraph) / (I + the same in the full graph, on the subgraph's pairs),
    0/0 -> 1 (SpaLoc difflogic/dataset/graph/subgraph.py, get_IS)."""
    n_sub = np.eye(len(A_sub)) + walk_counts(A_sub, is_len)
    n_tot = np.eye(len(A_sub)) + walks_full_sub
    with np.errstate(invalid="ignore", divide="ignore"):
        IS = n_sub / n_tot
    return np.where(np.isnan(IS), 1.0, IS)


def sample(A: np.ndarray, size: int, fanouts: list[int], rng: np.random.Generator, sampler: str) -> np.ndarray:
    if sampler == "neighbor":
        return sample_neighbor_subgraph(A, size, fanouts, rng)
    if sampler == "bfs":
        return sample_subgraph(A, size, fanouts, rng)
    raise ValueError(f"sampler {sampler!r}; allowed: neighbor, bfs")


def label_change(ex_is: list[dict], ex_hard: list[dict]) -> dict[str, float]:
    """Share of positive (hard) labels that IS calibration lowers, per target and overall (the premise of IS)."""
    out, tot, chg = {}, 0, 0
    for t, name in enumerate(TARGETS):
        pos = np.concatenate([e["Y"][..., t][e["Y"][..., t] > 0] for e in ex_hard])
        cal = np.concatenate([c["Y"][..., t][e["Y"][..., t] > 0] for c, e in zip(ex_is, ex_hard)])
        out[name] = float((cal < pos - 1e-9).mean()) if len(pos) else 0.0
        tot, chg = tot + len(pos), chg + int((cal < pos - 1e-9).sum())
    out["all"] = chg / max(tot, 1)
    return out


def allpositive_f1(rel: dict) -> dict[str, float]:
    """F1 of the trivial predictor that calls every ordered pair x != y positive (the best constant predictor's F1)."""
    n = len(rel[TARGETS[0]])
    off = ~np.eye(n, dtype=bool)
    return {t: 2 * float(rel[t][off].sum()) / max(float(rel[t][off].sum()) + float(off.sum()), 1.0) for t in TARGETS}


def subgraph_example(tree: FamilyTree, rel: dict, walks_full: np.ndarray, nodes: np.ndarray, is_len: int,
                     gamma: float | None):
    """Inputs and (calibrated) labels of the induced subgraph; gamma None = hard full-graph labels (no IS)."""
    P = tree.parent_matrix()[np.ix_(nodes, nodes)]
    male = tree.male[nodes]
    Y = targets({k: v[np.ix_(nodes, nodes)] for k, v in rel.items()})  # (n, n, T) labels from the full graph
    if gamma is not None:
        IS = information_sufficiency(P | P.T, walks_full[np.ix_(nodes, nodes)], is_len)
        Y = Y * np.clip(IS, 0, 1)[..., None] ** gamma
    return {"male": male, "P": P, "Y": Y.astype(np.float32), "nodes": nodes}


# ---------------------------------------------------------------- training and evaluation
def make_model(hidden: int, depth: int, gated: bool, seed: int) -> NLM:
    torch.manual_seed(seed)
    return NLM(IN_DIMS, hidden, depth, OUT_DIMS, gated=gated)


def predict(model: NLM, male, P, sparse: bool, k_hop: int, prune_tau: float = 0.0, nnz_tau: float = 0.0):
    """(N, N, T) logits (-30 off the sparse support), the counted floats of the forward and its nnz: the hyperedges
    (arity 2 and 3) of the intermediate layers held in the forward (pruned at prune_tau) whose importance is >= nnz_tau,
    summed over those layers (``NLM.consumed_nnz``). The official evaluation is unpruned (prune_tau = 0) and counts
    the hyperedges whose importance clears the threshold (nnz_tau)."""
    n = len(male)
    model.reset_count()
    if not sparse:
        heads, _ = model.forward_dense(dense_inputs(male, P), n)
        return heads[2], model.count(), dense_consumed_nnz(model, n)
    E2, E3 = local_supports(P, k_hop)
    heads, _, S = model.forward_sparse(sparse_inputs(male, P, E2, E3), n, prune_tau)
    out = torch.full((n, n, len(TARGETS)), -30.0)
    idx, logits = heads[2]
    out[idx[:, 0], idx[:, 1]] = logits
    return out, model.count(), model.consumed_nnz(nnz_tau)


def dense_consumed_nnz(model: NLM, n: int) -> int:
    """The dense NLM's counterpart of ``NLM.consumed_nnz``: every intermediate layer holds all n^r tuples of every
    arity >= 2."""
    depth, B = len(model.layers), len(model.out_dims) - 1
    return sum(n ** r for _ in range(depth - 1) for r in range(2, B + 1))


def sparsity_loss(model: NLM, alphas: list, n: int, form: str = "official") -> torch.Tensor:
    """The Hoyer sparsity loss on the gates of the last forward: ``official`` = SpaLoc's hoyer_square / space size,
    weighted by n (:func:`reprolab.reason.nlm.hoyer_official`); ``mean_l1l2`` = our earlier mean of the normalised
    Hoyer measure ||a||_1 / (sqrt(m) ||a||_2) over gate tensors (:func:`reprolab.reason.nlm.hoyer`)."""
    if form == "official":
        return hoyer_official(alphas, model.alpha_meta, n, len(model.layers), len(model.out_dims) - 1)
    return hoyer(alphas)


def train(model: NLM, examples, sparse: bool, k_hop: int, steps: int, lr: float, hoyer_weight: float,
          rng: np.random.Generator, hoyer_form: str = "official"):
    """Adam on BCE over the supported pairs (all pairs for the dense model) + hoyer_weight * sparsity_loss(gates)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ex = examples[step % len(examples)]
        male, P, Y = ex["male"], ex["P"], ex["Y"]
        n = len(male)
        Yt = torch.from_numpy(Y)
        if sparse:
            if "S" not in ex:
                ex["S"], ex["plan"] = sparse_inputs(male, P, *local_supports(P, k_hop)), {}
            heads, alphas, _ = model.forward_sparse(ex["S"], n, plan=ex["plan"])
            idx, logits = heads[2]
            loss = Fnn.binary_cross_entropy_with_logits(logits, Yt[idx[:, 0], idx[:, 1]])
            if hoyer_weight:
                loss = loss + hoyer_weight * sparsity_loss(model, alphas, n, hoyer_form)
        else:
            heads, _ = model.forward_dense(dense_inputs(male, P), n)
            loss = Fnn.binary_cross_entropy_with_logits(heads[2], Yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def f1_scores(logits: torch.Tensor, rel: dict) -> dict[str, float]:
    """F1 of each target relation over all ordered pairs x != y (pairs off the support count as predicted false)."""
    pred = (logits > 0).numpy()
    n = pred.shape[0]
    off = ~np.eye(n, dtype=bool)
    out = {}
    for t, name in enumerate(TARGETS):
        y, p = rel[name][off], pred[..., t][off]
        tp = float((y & p).sum())
        out[name] = 2 * tp / max(float(y.sum() + p.sum()), 1.0)
    return out


def dense_floats(model: NLM, n: int) -> int:
    """Counted floats of a dense forward at domain size n, run on the meta device (shapes only, no memory)."""
    import copy

    meta = copy.deepcopy(model).to("meta")
    F = [torch.zeros(0, device="meta"), torch.zeros(n, 1, device="meta"), torch.zeros(n, n, 1, device="meta"),
         torch.zeros(n, n, n, 0, device="meta")]
    meta.reset_count()
    with torch.no_grad():
        meta.forward_dense(F, n)
    return meta.count()


# ---------------------------------------------------------------- independent training runs on several cores
def _run_job(job: dict):
    import time

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    make, make_kw = job["make"]
    fit, fit_kw = job["train"]
    model = make(**make_kw)
    losses = fit(model, **fit_kw)
    return model.state_dict(), losses, time.perf_counter() - start


def run_training(jobs: list[dict], workers: int = 1) -> list[tuple[dict, list[float], float]]:
    """Independent training runs: each job is {"make": (fn, kwargs), "train": (fn, kwargs)} with module-level functions;
    model = make(**kwargs), losses = train(model, **kwargs). With workers > 1 the jobs run in that many spawned,
    single-threaded processes; each run is seeded by its own arguments and uses deterministic single-threaded kernels,
    so the results are the same as in-process (tested). Returns (state_dict, losses, seconds) per job, in order."""
    if workers <= 1 or len(jobs) <= 1:
        return [_run_job(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    def fresh(job):  # drop the in-process caches (sparse inputs, index plans keyed by tensor id) before pickling
        fit, kw = job["train"]
        if "examples" in kw:
            kw = {**kw, "examples": [{k: v for k, v in e.items() if k not in ("S", "plan")} for e in kw["examples"]]}
        return {**job, "train": (fit, kw)}

    jobs = [fresh(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_run_job, jobs))
