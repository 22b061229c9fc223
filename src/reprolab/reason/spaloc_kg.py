"""SpaLoc on real knowledge graphs (Kinships, UMLS): link prediction with a sparse NLM vs a dense NLM.

Paper: "Sparse and Local Networks for Hypergraph Reasoning" (SpaLoc), https://arxiv.org/abs/2303.05496 (its
Kinships / UMLS link-prediction tables: filtered MRR and Hits@10).

Setup (SpaLoc / NLM style): the entities are the domain objects; every relation r of the KG is an input binary predicate
r(x, y) (channel r of the arity-2 input tensor, 1 iff (x, r, y) is a training triple) and an output binary predicate
(channel r of the arity-2 head). Training: subgraphs of ``sub_size`` entities sampled by fan-out BFS from the training
graph; inside a subgraph a random ``holdout`` share of the training triples is removed from the input and the model is
asked to predict all training triples of the subgraph (so it must re-derive the held-out ones from the others).
Evaluation: the input is the whole training graph; each test triple (h, r, t) is ranked against every candidate tail e
by the logit of r(h, e), filtered (other known true tails of (h, r) from train/valid/test are skipped).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fnn

from .nlm import NLM, hoyer, tuple_keys
from .spaloc import dense_consumed_nnz, local_supports, sample_subgraph


def kg_index(splits: dict) -> tuple[dict, list[str], list[str]]:
    """Integer triples (m, 3) [head, relation, tail] per split; entity and relation names sorted (ids = positions)."""
    ents = sorted({x for s in splits.values() for h, _, t in s for x in (h, t)})
    rels = sorted({r for s in splits.values() for _, r, _ in s})
    e, r = {x: i for i, x in enumerate(ents)}, {x: i for i, x in enumerate(rels)}
    out = {k: np.array([(e[h], r[rr], e[t]) for h, rr, t in v], dtype=np.int64).reshape(-1, 3) for k, v in splits.items()}
    return out, ents, rels


def restrict(splits: dict, n_ent: int) -> dict:
    """Keep only the triples among the first n_ent entities (a smaller induced KG; n_ent <= 0 keeps all)."""
    if n_ent <= 0:
        return splits
    return {k: v[(v[:, 0] < n_ent) & (v[:, 2] < n_ent)] for k, v in splits.items()}


def relation_tensor(triples: np.ndarray, n: int, n_rel: int) -> np.ndarray:
    """(n, n, R) bool, T[h, t, r] = 1 iff (h, r, t) is in ``triples``."""
    T = np.zeros((n, n, n_rel), dtype=bool)
    T[triples[:, 0], triples[:, 2], triples[:, 1]] = True
    return T


def in_dims(n_rel: int) -> list[int]:
    return [0, 1, n_rel, 0]  # arity 1: a constant 'entity' predicate, arity 2: the relations, no arity 0/3 inputs


def make_model(n_rel: int, hidden: int, depth: int, gated: bool, seed: int) -> NLM:
    torch.manual_seed(seed)
    return NLM(in_dims(n_rel), hidden, depth, [0, 0, n_rel, 0], gated=gated)


def dense_inputs(T: np.ndarray) -> list[torch.Tensor]:
    n, _, R = T.shape
    return [torch.zeros(0), torch.ones(n, 1), torch.from_numpy(T.astype(np.float32)), torch.zeros(n, n, n, 0)]


def sparse_inputs(T: np.ndarray, E2: torch.Tensor, E3: torch.Tensor) -> list:
    """Sparse state: arity 1 full, arity 2 = the relations on the support E2, arity 3 = the (featureless) support E3."""
    n = T.shape[0]
    idx1 = torch.arange(n).reshape(n, 1)
    S = [torch.zeros(0), (idx1, idx1.reshape(-1), torch.ones(n, 1))]
    for idx, feat in ((E2, lambda i: torch.from_numpy(T[i[:, 0].numpy(), i[:, 1].numpy()].astype(np.float32))),
                      (E3, lambda i: torch.zeros(len(i), 0))):
        keys = tuple_keys(idx, n)
        order = torch.argsort(keys)
        idx = idx[order]
        S.append((idx, keys[order], feat(idx)))
    return S


def supports(T: np.ndarray, k_hop: int):
    """SpaLoc's local supports of the KG: pairs within k_hop hops of the (undirected, any-relation) graph, triangles."""
    return local_supports(T.any(-1), k_hop)


def predict(model: NLM, T: np.ndarray, sparse: bool, k_hop: int, prune_tau: float = 0.0, nnz_tau: float = 0.0):
    """(n, n, R) logits (-30 off the sparse support), counted activation floats, nnz (arity 2 + 3 hyperedges of the
    intermediate layers held in the forward pruned at prune_tau, with importance >= nnz_tau; see spaloc.predict)."""
    n, _, R = T.shape
    model.reset_count()
    if not sparse:
        heads, _ = model.forward_dense(dense_inputs(T), n)
        return heads[2], model.count(), dense_consumed_nnz(model, n)
    heads, _, S = model.forward_sparse(sparse_inputs(T, *supports(T, k_hop)), n, prune_tau)
    out = torch.full((n, n, R), -30.0)
    idx, logits = heads[2]
    out[idx[:, 0], idx[:, 1]] = logits
    return out, model.count(), model.consumed_nnz(nnz_tau)


def sample_examples(train: np.ndarray, n: int, n_rel: int, n_sub: int, sub_size: int, fanouts: list[int],
                    holdout: float, rng: np.random.Generator) -> list[dict]:
    """Subgraph examples: input = the subgraph's training triples minus a random ``holdout`` share, label = all of them."""
    T_full = relation_tensor(train, n, n_rel)
    A = T_full.any(-1)
    A = A | A.T
    out = []
    for _ in range(n_sub):
        nodes = sample_subgraph(A, sub_size, fanouts, rng)
        Y = T_full[np.ix_(nodes, nodes)]
        X = Y & (rng.random(Y.shape) >= holdout)
        out.append({"X": X, "Y": Y.astype(np.float32), "nodes": nodes})
    return out


def train(model: NLM, examples: list[dict], sparse: bool, k_hop: int, steps: int, lr: float, hoyer_weight: float,
          hoyer_form: str = "official"):
    """Adam on BCE over the supported pairs (all pairs for the dense model) + hoyer_weight * sparsity loss(gates)
    (``hoyer_form``: see :func:`reprolab.reason.spaloc.sparsity_loss`)."""
    from .spaloc import sparsity_loss
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ex = examples[step % len(examples)]
        X, Yt = ex["X"], torch.from_numpy(ex["Y"])
        n = X.shape[0]
        if sparse:
            if "S" not in ex:
                ex["S"], ex["plan"] = sparse_inputs(X, *supports(X, k_hop)), {}
            heads, alphas, _ = model.forward_sparse(ex["S"], n, plan=ex["plan"])
            idx, logits = heads[2]
            loss = Fnn.binary_cross_entropy_with_logits(logits, Yt[idx[:, 0], idx[:, 1]])
            if hoyer_weight:
                loss = loss + hoyer_weight * sparsity_loss(model, alphas, n, hoyer_form)
        else:
            heads, _ = model.forward_dense(dense_inputs(X), n)
            loss = Fnn.binary_cross_entropy_with_logits(heads[2], Yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def filtered_ranks(logits: torch.Tensor, test: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Filtered tail rank of every test triple (h, r, t): 1 + #(candidates scoring higher) + #(ties)/2, where the
    candidates are all entities except t and except the other known true tails of (h, r) (``known``: all triples)."""
    n = logits.shape[0]
    S = logits.detach().numpy()
    true = relation_tensor(known, n, logits.shape[2])  # (h, t, r)
    h, r, t = test[:, 0], test[:, 1], test[:, 2]
    scores = S[h, :, r]  # (m, n) score of every candidate tail
    target = scores[np.arange(len(test)), t][:, None]
    valid = ~true[h, :, r]  # filter the known true tails ...
    valid[np.arange(len(test)), t] = False  # ... and t itself (counted as the 1)
    greater = ((scores > target) & valid).sum(1)
    ties = ((scores == target) & valid).sum(1)
    return 1.0 + greater + 0.5 * ties


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    return {"mrr": float(np.mean(1.0 / ranks)), "hits@1": float(np.mean(ranks <= 1)),
            "hits@10": float(np.mean(ranks <= 10))}
