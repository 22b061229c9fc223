"""Small pieces every federated paper needs: client splits, how non-IID they are, and torch <-> Flower weights.

* :func:`dirichlet_split`: the standard label-skew partition (Hsu et al. 2019, as in FedML/Flower Datasets'
  ``DirichletPartitioner``): for every class, its samples are divided among the clients in proportions drawn from
  Dir(alpha); every client gets at least ``min_size`` samples (redrawn otherwise, as FedML does).
* :func:`label_skew`: statistics of a partition to report (the issue's gate "the partition is really non-IID"):
  the mean total-variation distance between each client's label distribution and the global one, and the mean
  number of classes a client holds.
* :func:`get_weights` / :func:`set_weights`: a torch module's state as the list of numpy arrays Flower sends.
"""
from __future__ import annotations

import numpy as np


def dirichlet_split(labels, num_clients: int, alpha: float, seed: int, min_size: int = 10,
                    max_tries: int = 1000) -> list[np.ndarray]:
    """Indices per client (sorted), a Dir(alpha) label-skew partition of ``labels``; deterministic in ``seed``."""
    labels = np.asarray(labels)
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"dirichlet_split: num_clients={num_clients} must be >= 1 and alpha={alpha} > 0")
    if min_size * num_clients > len(labels):
        raise ValueError(f"dirichlet_split: {num_clients} clients x min_size {min_size} > {len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"dirichlet_split: no partition with >= {min_size} samples per client in {max_tries} draws "
                       f"(alpha={alpha}, {num_clients} clients); lower min_size or raise alpha")


def label_skew(labels, parts: list[np.ndarray]) -> dict:
    """How non-IID a partition is: mean/max total-variation distance of client label distributions from the global
    one (0 = IID, 1 = disjoint), mean classes per client, and client sizes."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    glob = np.array([(labels == c).mean() for c in classes])
    tvs, ncls = [], []
    for p in parts:
        y = labels[p]
        q = np.array([(y == c).mean() for c in classes]) if len(y) else np.zeros(len(classes))
        tvs.append(0.5 * np.abs(q - glob).sum())
        ncls.append(int((q > 0).sum()))
    sizes = [int(len(p)) for p in parts]
    return {"tv_mean": float(np.mean(tvs)), "tv_max": float(np.max(tvs)), "classes_per_client": float(np.mean(ncls)),
            "num_classes": int(len(classes)), "size_min": min(sizes), "size_max": max(sizes),
            "size_mean": float(np.mean(sizes))}


def get_weights(module) -> list[np.ndarray]:
    """The module's state_dict tensors (parameters and buffers, in state_dict order) as numpy arrays."""
    return [t.detach().cpu().numpy().copy() for t in module.state_dict().values()]


def set_weights(module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (same order and shapes) into ``module``."""
    import torch

    keys = list(module.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"set_weights: {len(weights)} arrays for {len(keys)} state_dict entries")
    ref = module.state_dict()
    module.load_state_dict({k: torch.as_tensor(np.asarray(w)).to(ref[k].dtype).reshape(ref[k].shape)
                            for k, w in zip(keys, weights)}, strict=True)
