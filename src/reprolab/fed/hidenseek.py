"""HideNseek: Federated Lottery Ticket via Server-side Pruning and Sign Supermask (Vallapuram et al. 2022),
`arXiv:2206.04385 <https://arxiv.org/abs/2206.04385>`_. No official code is public: this follows the paper's text.

The method, in three steps:

1. **Server-side pruning at initialisation with SynFlow** (Tanaka et al. 2020, official code ganguli-lab/Synaptic-Flow):
   data-agnostic, so the server needs no client data. Scores ``|theta * dR/dtheta|`` with
   ``R = 1^T f(1; |theta|)`` (all-ones input, every parameter replaced by its absolute value), recomputed over
   ``iterations`` rounds of pruning to density ``rho^(k/n)`` (exponential schedule, one global threshold).
2. **Sign supermask on the clients**: the surviving weights stay frozen at their initial values; each client learns
   real scores ``s`` and uses ``w_eff = theta * P * sign(s)`` (``P`` the pruning mask, ``sign(0) = +1``), the gradient
   passing the sign with the straight-through estimator (``d sign(s) / ds := 1``).
3. **One bit per surviving parameter**: a client sends ``sign(s) > 0`` packed with ``np.packbits``; the server takes
   the weighted majority of the signs (the sign of the data-weighted mean of the clients' {-1, +1} masks; a tie keeps
   the previous sign) and broadcasts it back as packed bits; next round the clients restart their scores at
   ``score_init * global_sign``.

The baseline **binary supermask FL** is FedPM-like (Isik et al., ICLR 2023, "Sparse random networks for
communication-efficient federated learning": a {0, 1} mask over all frozen weights, one bit per parameter up, the
server's mean of the masks, a float per parameter, down); here the mask is thresholded deterministically from real
scores, ``w_eff = theta * 1[s >= 0]``, with the straight-through estimator, and uses the same protocol as HideNseek.
A diagnostic arm ``sign_dense`` is HideNseek's sign mask without pruning (density 1): the same bits per round as the
binary mask. Dense **FedAvg** (float32 weights both ways) is the reference.

SynFlow scores are computed in float64 (the official code scores float32 models).

Flower is the engine: clients are :class:`reprolab.distributed.flower.PartitionClient` subclasses, strategies are
``Tracked`` Flower strategies, so bytes are counted from the serialized messages (the packed bits on the wire).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ARMS = ("fedavg", "binary", "hidenseek", "sign_dense")
KIND = {"fedavg": None, "binary": "binary", "hidenseek": "sign", "sign_dense": "sign"}  # mask kind of each arm
DATASETS = ("mnist5k", "digits", "mnist")


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 in [0, 1] (N, d) and int64 labels (``reprolab.data.images.load_image_set``): ``mnist5k``, ``digits``
    (offline) or ``mnist`` (online)."""
    from reprolab.data.images import load_image_set

    return load_image_set(name)


# ---------------------------------------------------------------------------------------------------------------------
# Model: a bias-free ReLU MLP given as a list of weight matrices (out, in)
# ---------------------------------------------------------------------------------------------------------------------
def init_weights(sizes: list[int], seed: int) -> list[np.ndarray]:
    """Kaiming-normal (fan-in, ReLU gain) weights of a bias-free MLP ``sizes[0] -> ... -> sizes[-1]``; float32."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = torch.randn(fan_out, fan_in, generator=gen) * (2.0 / fan_in) ** 0.5  # (out, in)
        out.append(w.numpy().astype(np.float32))
    return out


def forward(x: torch.Tensor, Ws: list[torch.Tensor]) -> torch.Tensor:
    """Logits of the MLP with effective weights ``Ws``: ReLU after every layer but the last."""
    h = x
    for i, W in enumerate(Ws):
        h = h @ W.T  # (B, out)
        if i < len(Ws) - 1:
            h = torch.relu(h)
    return h


# ---------------------------------------------------------------------------------------------------------------------
# SynFlow pruning at initialisation (Tanaka et al. 2020; ganguli-lab/Synaptic-Flow Pruners/pruners.py, prune.py)
# ---------------------------------------------------------------------------------------------------------------------
def synflow_scores(weights: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    """Synaptic-flow scores ``|theta * dR/dtheta|``, ``R = sum f(1; |theta * mask|)`` (float64, official
    ``SynFlow.score``: linearize = absolute values, all-ones input of batch 1, ``sum(output).backward()``)."""
    Ws = [torch.tensor(np.abs(w), dtype=torch.float64, requires_grad=True) for w in weights]
    Ms = [torch.tensor(m, dtype=torch.float64) for m in masks]
    x = torch.ones(1, weights[0].shape[1], dtype=torch.float64)
    R = forward(x, [W * M for W, M in zip(Ws, Ms)]).sum()
    R.backward()
    return [(W.grad * W).abs().detach().numpy() for W in Ws]


def synflow_prune(weights: list[np.ndarray], density: float, iterations: int) -> list[np.ndarray]:
    """Masks (float32 0/1, like the weights) keeping a fraction ``density`` of all weights, iterative SynFlow with the
    exponential schedule ``density^(k/n)``, k = 1..n, and one global threshold (official ``prune_loop`` and
    ``Pruner._global_mask``: prune scores ``<=`` the k-th smallest, k = int((1 - d) * numel))."""
    if not 0.0 < density <= 1.0 or iterations < 1:
        raise ValueError(f"synflow_prune: density={density} must be in (0, 1] and iterations={iterations} >= 1")
    masks = [np.ones_like(w, dtype=np.float32) for w in weights]
    for k in range(iterations):
        d = density ** ((k + 1) / iterations)
        scores = synflow_scores(weights, masks)
        flat = np.concatenate([s.ravel() for s in scores])
        n_prune = int((1.0 - d) * flat.size)
        if n_prune >= 1:
            thr = np.partition(flat, n_prune - 1)[n_prune - 1]  # torch.kthvalue(global_scores, k)
            masks = [(s > thr).astype(np.float32) for s in scores]
    return masks


# ---------------------------------------------------------------------------------------------------------------------
# Supermasks with the straight-through estimator
# ---------------------------------------------------------------------------------------------------------------------
class SignSTE(torch.autograd.Function):
    """``sign(s)`` in {-1, +1} (``s >= 0 -> +1``); backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx, s):
        return torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))

    @staticmethod
    def backward(ctx, g):
        return g


class StepSTE(torch.autograd.Function):
    """``1[s >= 0]`` in {0, 1} (the binary supermask); backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx, s):
        return (s >= 0).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def effective_weights(theta: list[torch.Tensor], P: list[torch.Tensor], scores: list[torch.Tensor], kind: str):
    """``theta * P * sign(s)`` (kind "sign", HideNseek) or ``theta * P * 1[s >= 0]`` (kind "binary")."""
    f = {"sign": SignSTE.apply, "binary": StepSTE.apply}[kind]
    return [t * p * f(s) for t, p, s in zip(theta, P, scores)]


# ---------------------------------------------------------------------------------------------------------------------
# Bits on the wire
# ---------------------------------------------------------------------------------------------------------------------
def pack(bits: np.ndarray) -> np.ndarray:
    """Booleans -> uint8 bytes, 8 bits a byte (``np.packbits``, big-endian bit order, zero padding)."""
    return np.packbits(np.asarray(bits, dtype=bool).ravel())


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack` for ``n`` bits."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=int(n)).astype(bool)


def majority_vote(client_bits: list[np.ndarray], weights, previous: np.ndarray) -> np.ndarray:
    """Server aggregation of {-1, +1} masks given as bits: ``sign(sum_k n_k (2 b_k - 1))``; a tie keeps ``previous``."""
    w = np.asarray(weights, dtype=np.float64)
    v = sum(wk * (2.0 * b.astype(np.float64) - 1.0) for wk, b in zip(w, client_bits))
    out = np.asarray(previous, dtype=bool).copy()
    out[v > 0] = True
    out[v < 0] = False
    return out


def mean_signs(client_bits: list[np.ndarray], weights) -> np.ndarray:
    """Server aggregation by averaging: the data-weighted mean of the clients' {-1, +1} masks, in [-1, 1] (float32)."""
    w = np.asarray(weights, dtype=np.float64)
    v = sum(wk * (2.0 * b.astype(np.float64) - 1.0) for wk, b in zip(w, client_bits)) / w.sum()
    return v.astype(np.float32)


def to_values(g: np.ndarray) -> np.ndarray:
    """The server's broadcast as values in [-1, 1]: bits b -> 2 b - 1; a mean of signs is returned as it is."""
    g = np.asarray(g)
    return 2.0 * g.astype(np.float32) - 1.0 if g.dtype == bool else g.astype(np.float32)


def aggregate(client_bits: list[np.ndarray], weights, previous: np.ndarray, rule: str) -> np.ndarray:
    """``rule`` "majority": bits (:func:`majority_vote`); "mean": float32 mean of signs (:func:`mean_signs`)."""
    if rule == "majority":
        prev = previous if previous.dtype == bool else previous >= 0
        return majority_vote(client_bits, weights, prev)
    if rule == "mean":
        return mean_signs(client_bits, weights)
    raise ValueError(f"aggregation rule {rule!r}: majority | mean")


def encode(g: np.ndarray) -> np.ndarray:
    """What goes on the wire downward: packed bits for a bit vector, float32 values for a mean of signs."""
    return pack(g) if g.dtype == bool else np.asarray(g, dtype=np.float32)


def decode(arr: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(arr)
    return unpack(arr, n) if arr.dtype == np.uint8 else arr.astype(np.float32)


@dataclass
class MaskModel:
    """The frozen network every mask client shares: weights ``theta``, the pruning mask ``P`` (all ones for the binary
    arm) and the positions that carry a bit (``P == 1``, flattened in layer order)."""
    theta: list[np.ndarray]
    P: list[np.ndarray]

    @property
    def n_bits(self) -> int:
        return int(sum(int(p.sum()) for p in self.P))

    def scores_from_bits(self, bits: np.ndarray, score_init: float) -> list[torch.Tensor]:
        """Scores ``score_init * v`` at the surviving positions, 0 elsewhere (multiplied by P = 0 anyway), where
        ``v = 2 b - 1`` for bits (majority aggregation) or the broadcast mean of the signs (mean aggregation)."""
        v = to_values(bits)
        out, i = [], 0
        for p in self.P:
            s = np.zeros(p.size, dtype=np.float32)
            keep = p.ravel() > 0
            k = int(keep.sum())
            s[keep] = score_init * v[i:i + k]
            i += k
            out.append(torch.tensor(s.reshape(p.shape), requires_grad=True))
        return out

    def bits_from_scores(self, scores: list[torch.Tensor]) -> np.ndarray:
        return np.concatenate([(s.detach().numpy().ravel() >= 0)[p.ravel() > 0] for s, p in zip(scores, self.P)])

    def weights_from_bits(self, bits: np.ndarray, kind: str) -> list[torch.Tensor]:
        scores = self.scores_from_bits(bits, 1.0)
        with torch.no_grad():
            return effective_weights([torch.tensor(t) for t in self.theta], [torch.tensor(p) for p in self.P],
                                     scores, kind)


# ---------------------------------------------------------------------------------------------------------------------
# Local training (what one client does in one round) and evaluation
# ---------------------------------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def local_train_mask(model: MaskModel, bits: np.ndarray, X: np.ndarray, y: np.ndarray, kind: str, *, epochs: int,
                     batch_size: int, lr: float, score_init: float, seed: int) -> tuple[np.ndarray, float]:
    """One client's round: scores restart at ``score_init * global_sign``; Adam on the scores for ``epochs`` local
    epochs (frozen weights); returns the new bits (``s >= 0`` at the surviving positions) and the training seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    theta = [torch.tensor(t) for t in model.theta]
    P = [torch.tensor(p) for p in model.P]
    scores = model.scores_from_bits(bits, score_init)
    opt = torch.optim.Adam(scores, lr=lr)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(epochs):
        for idx in _batches(len(y), batch_size, rng):
            opt.zero_grad()
            loss = F.cross_entropy(forward(Xt[idx], effective_weights(theta, P, scores, kind)), yt[idx])
            loss.backward()
            opt.step()
    return model.bits_from_scores(scores), time.perf_counter() - t0


def local_train_dense(weights: list[np.ndarray], X: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                      lr: float, momentum: float, seed: int) -> tuple[list[np.ndarray], float]:
    """One FedAvg client's round: SGD with momentum on all weights; returns the new weights and training seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    Ws = [torch.tensor(w, requires_grad=True) for w in weights]
    opt = torch.optim.SGD(Ws, lr=lr, momentum=momentum)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(epochs):
        for idx in _batches(len(y), batch_size, rng):
            opt.zero_grad()
            F.cross_entropy(forward(Xt[idx], Ws), yt[idx]).backward()
            opt.step()
    return [w.detach().numpy().copy() for w in Ws], time.perf_counter() - t0


@torch.no_grad()
def accuracy(Ws: list[torch.Tensor], X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy, accuracy) of the MLP on (X, y)."""
    logits = forward(torch.as_tensor(X), [torch.as_tensor(w) for w in Ws])
    yt = torch.as_tensor(y)
    return float(F.cross_entropy(logits, yt)), float((logits.argmax(1) == yt).double().mean())


# ---------------------------------------------------------------------------------------------------------------------
# Data shared with the clients: through Ray's object store when Ray is up (one copy, not one per message;
# reprolab.distributed.flower.share / fetch)
# ---------------------------------------------------------------------------------------------------------------------
def client_data(shared: dict, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """The partition's training features (float32 in [0, 1]) and labels (int64)."""
    idx = shared["parts"][partition]
    return shared["X"][idx], shared["y"][idx]


# ---------------------------------------------------------------------------------------------------------------------
# Flower: clients and strategies
# ---------------------------------------------------------------------------------------------------------------------
def make_client_fn(arm: str, shared_ref, hp: dict, seed: int):
    """``client_fn(context)`` for Flower: a client of ``arm`` reading its partition from ``shared_ref``."""
    from reprolab.distributed import flower as fl

    class MaskClient(fl.PartitionClient):
        def fit(self, parameters, config):
            torch.set_num_threads(int(hp["threads"]))
            shared = fl.fetch(shared_ref)
            model = shared["model"]
            X, y = client_data(shared, self.partition)
            bits = decode(parameters[0], model.n_bits)
            rnd = int(config["round"])
            new, secs = local_train_mask(model, bits, X, y, shared["kind"], epochs=hp["local_epochs"],
                                         batch_size=hp["batch_size"], lr=hp["lr_mask"], score_init=hp["score_init"],
                                         seed=fl.client_seed(seed, self.partition, rnd))
            return [pack(new)], len(y), {"train_s": secs}

        def evaluate(self, parameters, config):  # server-side evaluation only (fraction_evaluate = 0)
            return 0.0, 1, {}

    class DenseClient(fl.PartitionClient):
        def fit(self, parameters, config):
            torch.set_num_threads(int(hp["threads"]))
            shared = fl.fetch(shared_ref)
            X, y = client_data(shared, self.partition)
            rnd = int(config["round"])
            new, secs = local_train_dense([np.asarray(p, dtype=np.float32) for p in parameters], X, y,
                                          epochs=hp["local_epochs"], batch_size=hp["batch_size"], lr=hp["lr_dense"],
                                          momentum=hp["momentum"], seed=fl.client_seed(seed, self.partition, rnd))
            return new, len(y), {"train_s": secs}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    cls = DenseClient if KIND[arm] is None else MaskClient
    return lambda context: cls(fl.partition_id(context))


def _strategy_classes():
    from flwr.server.strategy import FedAvg

    from reprolab.distributed import flower as fl

    class Recording(FedAvg):
        """Keeps every client's reported training seconds, per round (benchmarks only)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fit_seconds: dict[int, list[float]] = {}

        def aggregate_fit(self, server_round, results, failures):
            self.fit_seconds[int(server_round)] = [float(r.metrics["train_s"]) for _, r in results]
            return super().aggregate_fit(server_round, results, failures)

    class MajorityVote(Recording):
        """HideNseek's server (and the binary-mask baseline's): data-weighted majority of the clients' mask bits."""

        def __init__(self, *args, n_bits: int, initial_bits: np.ndarray, rule: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.n_bits, self.rule = int(n_bits), rule
            self.global_bits = np.asarray(initial_bits, dtype=bool).copy()  # bits (majority) or mean signs (mean)

        def aggregate_fit(self, server_round, results, failures):
            self.fit_seconds[int(server_round)] = [float(r.metrics["train_s"]) for _, r in results]
            if not results or (failures and not self.accept_failures):
                return None, {}
            bits = [unpack(fl.parameters_to_ndarrays(r.parameters)[0], self.n_bits) for _, r in results]
            self.global_bits = aggregate(bits, [r.num_examples for _, r in results], self.global_bits, self.rule)
            return fl.ndarrays_to_parameters([encode(self.global_bits)]), {}

    class DenseFedAvg(fl.Tracked, Recording):
        pass

    class MaskFed(fl.Tracked, MajorityVote):
        pass

    return DenseFedAvg, MaskFed


def run_arm(arm: str, shared: dict, hp: dict, seed: int, *, num_clients: int, rounds: int, test: tuple,
            num_cpus: int = 2, ray_address: str | None = None) -> dict:
    """One Flower simulation of ``arm``; returns the test-accuracy curve (server-side, after every round), the byte
    ledger, clients' training seconds and wall-clock seconds of the run."""
    from reprolab.distributed import flower as fl

    DenseFedAvg, MaskFed = _strategy_classes()
    Xte, yte = test
    curve: list[dict] = []
    kind = KIND[arm]
    model: MaskModel | None = shared.get("model")

    def evaluate_fn(server_round, nds, config):
        if kind is None:
            Ws = nds
        else:
            Ws = model.weights_from_bits(decode(nds[0], model.n_bits), kind)
        loss, acc = accuracy(Ws, Xte, yte)
        curve.append({"round": int(server_round), "loss": loss, "acc": acc})
        return loss, {"acc": acc}

    common = dict(num_clients=num_clients, seed=seed, fraction_fit=1.0, fraction_evaluate=0.0,
                  min_fit_clients=num_clients, min_available_clients=num_clients, accept_failures=False,
                  on_fit_config_fn=lambda r: {"round": r}, evaluate_fn=evaluate_fn)
    if kind is None:
        strategy = DenseFedAvg(initial_parameters=fl.ndarrays_to_parameters(shared["theta"]), **common)
    else:
        init_bits = np.ones(model.n_bits, dtype=bool)  # round 0: the (pruned) random network itself
        strategy = MaskFed(initial_parameters=fl.ndarrays_to_parameters([pack(init_bits)]), n_bits=model.n_bits,
                           initial_bits=init_bits, rule=hp["aggregation"], **common)
    ref = fl.share({**shared, "kind": kind})
    t0 = time.perf_counter()
    fl.simulate(strategy, make_client_fn(arm, ref, hp, seed), num_clients=num_clients, rounds=rounds,
                num_cpus=num_cpus, ray_address=ray_address)
    wall = time.perf_counter() - t0
    return {"curve": curve, "ledger": list(strategy.ledger), "fit_seconds": dict(strategy.fit_seconds),
            "wall_s": wall, "final_bits": None if kind is None else strategy.global_bits.copy()}


def run_inprocess(arm: str, shared: dict, hp: dict, seed: int, *, num_clients: int, rounds: int, test: tuple) -> dict:
    """The same protocol without Flower (one process, clients in partition order): the direct computation the
    Flower run is checked against, and a fast pilot."""
    from reprolab.distributed.flower import client_seed

    Xte, yte = test
    curve = []
    if arm == "fedavg":
        Ws = [w.copy() for w in shared["theta"]]
        curve.append({"round": 0, **dict(zip(("loss", "acc"), accuracy(Ws, Xte, yte)))})
        for r in range(1, rounds + 1):
            ups, ns = [], []
            for k in range(num_clients):
                X, y = client_data(shared, k)
                new, _ = local_train_dense(Ws, X, y, epochs=hp["local_epochs"], batch_size=hp["batch_size"],
                                           lr=hp["lr_dense"], momentum=hp["momentum"], seed=client_seed(seed, k, r))
                ups.append(new)
                ns.append(len(y))
            Ws = [sum(n * u[j].astype(np.float64) for n, u in zip(ns, ups)) / sum(ns) for j in range(len(Ws))]
            Ws = [w.astype(np.float32) for w in Ws]
            curve.append({"round": r, **dict(zip(("loss", "acc"), accuracy(Ws, Xte, yte)))})
        return {"curve": curve, "weights": Ws}
    kind = KIND[arm]
    model = shared["model"]
    bits = np.ones(model.n_bits, dtype=bool)
    curve.append({"round": 0, **dict(zip(("loss", "acc"), accuracy(model.weights_from_bits(bits, kind), Xte, yte)))})
    for r in range(1, rounds + 1):
        ups, ns = [], []
        for k in range(num_clients):
            X, y = client_data(shared, k)
            new, _ = local_train_mask(model, bits, X, y, kind, epochs=hp["local_epochs"], batch_size=hp["batch_size"],
                                      lr=hp["lr_mask"], score_init=hp["score_init"], seed=client_seed(seed, k, r))
            ups.append(new)
            ns.append(len(y))
        bits = aggregate(ups, ns, bits, hp["aggregation"])
        curve.append({"round": r, **dict(zip(("loss", "acc"),
                                               accuracy(model.weights_from_bits(bits, kind), Xte, yte)))})
    return {"curve": curve, "final_bits": bits}


# ---------------------------------------------------------------------------------------------------------------------
# Setting up one seed: split, partition, initial weights, the two frozen mask networks
# ---------------------------------------------------------------------------------------------------------------------
def prepare_seed(X: np.ndarray, y: np.ndarray, seed: int, *, sizes: list[int], num_clients: int, alpha: float,
                 test_fraction: float, density: float, synflow_iterations: int, min_size: int = 10) -> dict:
    """Stratified train/test split, Dir(alpha) partition of the training part, Kaiming init, SynFlow mask.

    Returns ``{"fedavg": shared, "binary": shared, "hidenseek": shared, "sign_dense": shared, "test": (X, y),
    "train_y", "parts"}`` (``sign_dense``: the sign mask over all weights, unpruned); each
    ``shared`` holds the training features (sent once through Ray's object store), the partition and the initial
    weights.
    """
    from sklearn.model_selection import train_test_split

    from reprolab.fed.common import dirichlet_split

    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    Xtr = np.ascontiguousarray(X[idx_tr], dtype=np.float32)
    ytr = y[idx_tr].astype(np.int64)
    parts = dirichlet_split(ytr, num_clients, alpha, seed=seed, min_size=min_size)
    theta = init_weights(sizes, seed)
    P = synflow_prune(theta, density, synflow_iterations)
    base = {"X": Xtr, "y": ytr, "parts": parts}
    ones = [np.ones_like(t) for t in theta]
    return {"fedavg": {**base, "theta": theta},
            "binary": {**base, "model": MaskModel(theta, ones)},
            "hidenseek": {**base, "model": MaskModel(theta, P)},
            "sign_dense": {**base, "model": MaskModel(theta, ones)},
            "test": (X[idx_te].astype(np.float32), y[idx_te].astype(np.int64)),
            "train_y": ytr, "parts": parts, "P": P, "theta": theta}
