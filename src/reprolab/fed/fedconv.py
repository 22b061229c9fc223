"""FedConv: A Learning-on-Model Paradigm for Heterogeneous Federated Clients (Shen et al., MobiSys 2024),
`arXiv:2502.20639 <https://arxiv.org/abs/2502.20639>`_. Official code: `lemingshen/FedConv
<https://github.com/lemingshen/FedConv>`_ (``strategy.py``, ``utils/federated_settings.py``, ``config.py``); the
line numbers below are of its HEAD (8b44be1).

FedConv's server, every round (``strategy.py: configure_fit`` and ``aggregate_fit``):

1. **Server-side training**: the global (large) model is trained on the server's small public data set
   (``server_local_training``: Adam, lr 1e-4, ``server_epoch`` epochs; federated_settings.py:1017-1048).
2. **Convolutional compression**: every parameter tensor ``P`` of the large model (a bias as a 1 x L matrix) becomes the
   tensor of a sub-model of width ratio ``r = 0.75^t`` by a learned filter (``Base_Filter``, :46-172): a 1x1
   convolution (a scalar affine map ``a P + b``), then a ``weight_norm`` convolution with ``padding=0`` whose kernel
   is ``(S_0 - s_0 + 1, S_1 - s_1 + 1)`` (large shape ``S``, small shape ``s``; :377-466), then the *modified Leaky
   ReLU* (MLR: ``0.85 x`` for ``x > 0``, ``0.001 x`` else; :19-43). The official code applies MLR **twice**: once at
   the end of ``Base_Filter.forward`` (:170) and again in ``convolution()`` (:632) and ``deconvolution()`` (:674).
   One filter per tier (``client_conv_parameter``), learned on the public data (the compressed model's cross-entropy,
   the large model fixed; ``train_conv_deconv_parameter``, :720-862), persisting across rounds.
3. Tier-0 clients receive the large model, the others their compressed sub-model, and train it directly.
4. **Transposed convolutional dilation**: every returned model is first trained on the public data
   (``pre_train_client``, :1222-1244); a sub-model is then dilated back to the large shape by its client's own learned
   filter (``ConvTranspose2d``, same kernel; MLR twice), learned on the public data (``deconvolution_process``).
5. **Weighted aggregation**: ``theta = sum_k w_k * theta_k * n_k / sum_k n_k`` with an element-wise learned weight
   tensor ``w_k`` per client and parameter (``weighted_parameter``, :683-717), the weights learned on the public data
   (``weighted_aggregate``, :865-979), persisting across rounds.

**Selection and acceptance rules** (the official code's, bounded here): each filter/weight learning records the model
after every epoch and keeps the epoch of highest ``accuracy[%] - loss`` (:1079-1083); a learning run stops early when
accuracy falls below 40% (:855) (15% for the aggregation weights, :972). If the kept epoch's accuracy is under a floor
(compression 40%, :1085-1093; dilation 80%, :1172-1183; aggregation 50%, strategy.py:568-577), the filter (or the
weight vector) is re-initialised and learned again; the official loop is unbounded, here at most ``max_restarts``
times, and then: a compression keeps its best attempt, a client whose dilation never passes is left out of the
aggregation, and an aggregation that never passes keeps the previous global model. Every trigger is counted.

**HeteroFL** (Diao et al., ICLR 2021; official code ``diaoenmao/HeteroFL-...``, ``src/fed.py``): a client of rate
``r`` gets the first ``int(r h)`` units of every hidden layer (``split_model``); it trains with the ``Scaler``
(hidden pre-activations divided by ``r`` during training only, ``src/modules/modules.py``) and masks the logits of
classes absent from its data (``models/conv.py``: ``masked_fill(label_mask == 0, 0)``); the server averages every
entry over the clients that hold it (``combine``: uniform ``count``; the output layer's rows only over clients that hold
that class, ``label_split``); entries no client holds keep their value.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

ARMS = ("fedconv", "heterofl", "fedavg")  # Flower arms; "public_only" runs on the server alone
NEG_SLOPE, POS_SLOPE = 0.001, 0.85  # config.py:36-37


# ---------------------------------------------------------------------------------------------------------------------
# The model: a ReLU MLP with biases, parameters [W1, b1, W2, b2, ..., W_L, b_L], W (out, in)
# ---------------------------------------------------------------------------------------------------------------------
def tier_rate(tier: int, shrinkage_ratio: float) -> float:
    """Width ratio of tier ``t``: ``shrinkage_ratio ** t`` (config.py:58-60, strategy.py:55)."""
    return float(shrinkage_ratio) ** int(tier)


def layer_sizes(sizes: list[int], rate: float) -> list[int]:
    """Input and output kept, hidden widths ``int(h * rate)`` (network_architecture/MNIST.py:10-13)."""
    return [sizes[0], *[int(h * rate) for h in sizes[1:-1]], sizes[-1]]


def param_shapes(sizes: list[int], rate: float = 1.0) -> list[tuple]:
    s = layer_sizes(sizes, rate)
    out = []
    for i, o in zip(s[:-1], s[1:]):
        out += [(o, i), (o,)]
    return out


def init_params(sizes: list[int], seed: int) -> list[np.ndarray]:
    """``torch.nn.Linear``'s default initialisation (uniform +-1/sqrt(fan_in) for weights and biases), seeded."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / fan_in ** 0.5
        out.append(((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound).numpy())
        out.append(((torch.rand(fan_out, generator=gen) * 2 - 1) * bound).numpy())
    return [np.asarray(p, dtype=np.float32) for p in out]


def forward(x: torch.Tensor, params, hidden_scale: float = 1.0, label_mask: torch.Tensor | None = None):
    """Logits. ``hidden_scale`` multiplies every hidden pre-activation (HeteroFL's Scaler: ``1 / rate`` in training);
    ``label_mask`` (bool, classes) zeroes the logits of the other classes (HeteroFL's ``masked_fill``)."""
    h = x
    n = len(params) // 2
    for i in range(n):
        h = h @ params[2 * i].T + params[2 * i + 1]  # (B, out)
        if i < n - 1:
            h = torch.relu(h * hidden_scale)
    if label_mask is not None:
        h = h.masked_fill(~label_mask, 0.0)
    return h


def macs(shapes) -> int:
    """Multiply-accumulates of one forward pass of one sample: the weight matrices' sizes (biases add one each)."""
    return int(sum(int(np.prod(s)) for s in shapes))


@torch.no_grad()
def evaluate(params, X, y) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy)."""
    logits = forward(torch.as_tensor(X), [torch.as_tensor(p) for p in params])
    yt = torch.as_tensor(y)
    return float((logits.argmax(1) == yt).double().mean()), float(F.cross_entropy(logits, yt))


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def train_params(params, X, y, *, epochs: int, lr: float, batch_size: int, seed: int, hidden_scale: float = 1.0,
                 label_mask: np.ndarray | None = None) -> tuple[list[np.ndarray], int]:
    """Adam on all parameters (clients: ``train_model``, client_settings.py:99-167; server:
    ``server_local_training``); returns the new parameters and the number of optimiser steps."""
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    P = [torch.tensor(np.asarray(p, dtype=np.float32), requires_grad=True) for p in params]
    opt = torch.optim.Adam(P, lr=lr)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    mask = None if label_mask is None else torch.as_tensor(np.asarray(label_mask, dtype=bool))
    steps = 0
    for _ in range(int(epochs)):
        for idx in _batches(len(y), batch_size, rng):
            opt.zero_grad()
            F.cross_entropy(forward(Xt[idx], P, hidden_scale, mask), yt[idx]).backward()
            opt.step()
            steps += 1
    return [p.detach().numpy().copy() for p in P], steps


# ---------------------------------------------------------------------------------------------------------------------
# FedConv's filters: 1x1 projection, weight-normalised (transposed) convolution, MLR
# ---------------------------------------------------------------------------------------------------------------------
def mlr(x: torch.Tensor, negative_slope: float = NEG_SLOPE, positive_slope: float = POS_SLOPE) -> torch.Tensor:
    """The modified Leaky ReLU (``Leaky_Decay_ReLU``, federated_settings.py:19-43): ``leaky_relu(x, ns) - (relu(x) -
    ps relu(x))``, i.e. ``ps x`` for ``x > 0`` and ``ns x`` otherwise."""
    return torch.where(x > 0, positive_slope * x, negative_slope * x)


def kernel_shape(large: tuple, small: tuple) -> tuple[int, int]:
    """Kernel of the (transposed) convolution between a large and a small tensor, a bias being a 1 x L matrix:
    ``(S_0 - s_0 + 1, S_1 - s_1 + 1)`` (federated_settings.py:377-466: ``(1, k)`` for a bias and the output layer's
    weight, ``(k, 1)`` for the input layer's, ``(1, 1)`` for the output bias)."""
    L, s = (1, *large) if len(large) == 1 else large, (1, *small) if len(small) == 1 else small
    return int(L[0] - s[0] + 1), int(L[1] - s[1] + 1)


def init_filter(kshape: tuple[int, int], gen: torch.Generator) -> dict:
    """One ``Base_Filter``'s parameters with ``torch.nn.Conv2d``'s default initialisation: the 1x1 projection's
    weight ``a`` and bias ``b`` ~ U(-1, 1) (fan-in 1), the kernel's direction ``v`` ~ U(+-1/sqrt(kh kw)), and
    ``weight_norm``'s magnitude ``g = ||v||`` (so the initial kernel is ``v``)."""
    kh, kw = kshape
    bound = 1.0 / (kh * kw) ** 0.5
    v = (torch.rand(1, 1, kh, kw, generator=gen) * 2 - 1) * bound
    return {"a": torch.rand(1, 1, 1, 1, generator=gen) * 2 - 1, "b": torch.rand(1, generator=gen) * 2 - 1,
            "v": v, "g": v.norm().reshape(1, 1, 1, 1).clone()}


def apply_filter(P: torch.Tensor, f: dict, transpose: bool, mlr_times: int = 2) -> torch.Tensor:
    """``MLR^mlr_times(conv(a P + b, g v / ||v||))`` with ``conv`` a valid cross-correlation (compression) or a
    transposed convolution (dilation); a 1-D tensor is treated as a 1 x L matrix and returned 1-D."""
    x = P.reshape(1, 1, 1, -1) if P.dim() == 1 else P[None, None]  # (1, 1, H, W)
    x = F.conv2d(x, f["a"], f["b"])  # projection: nn.Conv2d(1, 1, 1, 1, 0)
    w = f["g"] * f["v"] / f["v"].norm()  # weight_norm(dim=0) of a (1, 1, kh, kw) kernel
    x = F.conv_transpose2d(x, w) if transpose else F.conv2d(x, w)
    for _ in range(int(mlr_times)):
        x = mlr(x)
    x = x[0, 0]
    return x.reshape(-1) if P.dim() == 1 else x


def identity_filter(kshape: tuple[int, int]) -> dict:
    """A filter that starts as width slicing: projection ``a = 1, b = 0`` and a unit impulse kernel at the top-left
    tap (``g = 1``): the compression keeps the first rows/columns, the dilation zero-pads (then MLR as always)."""
    v = torch.zeros(1, 1, *kshape)
    v[0, 0, 0, 0] = 1.0
    return {"a": torch.ones(1, 1, 1, 1), "b": torch.zeros(1), "v": v, "g": torch.ones(1, 1, 1, 1)}


def filters_for(large_shapes, small_shapes, gen: torch.Generator, how: str = "official") -> list[dict]:
    """One filter per parameter tensor: ``official`` (torch's random Conv2d initialisation) or ``identity``."""
    if how == "identity":
        return [identity_filter(kernel_shape(L, s)) for L, s in zip(large_shapes, small_shapes)]
    return [init_filter(kernel_shape(L, s), gen) for L, s in zip(large_shapes, small_shapes)]


def compress(params, filters, mlr_times: int = 2) -> list[torch.Tensor]:
    """Convolutional compression of every large tensor into the sub-model's (``convolution``, :607-638)."""
    return [apply_filter(torch.as_tensor(p), f, False, mlr_times) for p, f in zip(params, filters)]


def dilate(params, filters, mlr_times: int = 2) -> list[torch.Tensor]:
    """Transposed convolutional dilation of every small tensor back to the large shape (``deconvolution``, :641-680)."""
    return [apply_filter(torch.as_tensor(p), f, True, mlr_times) for p, f in zip(params, filters)]


def weighted_parameter(client_params, weights, n) -> list[torch.Tensor]:
    """``sum_k w_k[j] * theta_k[j] * n_k / sum_k n_k`` for every parameter j (``weighted_parameter``, :683-717)."""
    N = float(sum(n))
    return [sum(w[j] * torch.as_tensor(th[j]) * float(nk) for w, th, nk in zip(weights, client_params, n)) / N
            for j in range(len(client_params[0]))]


def _trainable(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return list(obj.values())
    out = []
    for o in obj:
        out += _trainable(o)
    return out


def _snapshot(obj):
    if isinstance(obj, dict):
        return {k: v.detach().clone() for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return [_snapshot(o) for o in obj]


def fit_filter(theta, build, X, y, *, epochs: int, lr: float, batch_size: int, seed: int,
               early_floor: float, passes: int = 1) -> dict:
    """Learn ``theta`` (filters or weight vectors: dicts / lists of tensors) so that the model ``build(theta)``
    (a parameter list) classifies the public data (``train_conv_deconv_parameter`` / ``weighted_aggregate``).

    After every epoch (``passes`` passes over the public data) the model is evaluated on the public data and recorded; a run stops early when the accuracy is
    below ``early_floor`` (:855); the kept epoch is the one of highest ``100 * acc - loss`` (:1079-1083, on the public
    data here: the official code scores its test set). Returns ``{"theta", "acc", "loss", "epoch", "history",
    "steps"}`` with the kept epoch's snapshot."""
    torch.manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    for t in _trainable(theta):
        t.requires_grad_(True)
    opt = torch.optim.Adam(_trainable(theta), lr=lr)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    history, snaps, steps = [], [], 0
    for _ in range(int(epochs)):
        for _ in range(int(passes)):
            for idx in _batches(len(y), batch_size, rng):
                opt.zero_grad()
                F.cross_entropy(forward(Xt[idx], build(theta)), yt[idx]).backward()
                opt.step()
                steps += 1
        with torch.no_grad():
            acc, loss = evaluate([p.detach() for p in build(theta)], X, y)
        history.append((acc, loss))
        snaps.append(_snapshot(theta))
        if acc < early_floor:
            break
    scores = [100.0 * a - l for a, l in history]
    best = int(np.argmax(scores))
    return {"theta": snaps[best], "acc": history[best][0], "loss": history[best][1], "epoch": best,
            "history": history, "steps": steps}


def accept(theta, reinit, build, X, y, *, floor: float, max_restarts: int, **fit_kw) -> dict:
    """The acceptance rule: learn (:func:`fit_filter`); if the kept epoch's public accuracy is below ``floor``,
    re-initialise (``reinit()``) and learn again, at most ``max_restarts`` times (official: unbounded). Returns the
    passing result, or the best attempt with ``accepted=False``; ``restarts`` counts the re-initialisations."""
    best, restarts, steps = None, 0, 0
    seed = int(fit_kw.pop("seed"))
    for attempt in range(int(max_restarts) + 1):
        if attempt > 0:
            theta = reinit()
            restarts += 1
        r = fit_filter(theta, build, X, y, seed=seed + 7919 * attempt, **fit_kw)
        steps += r["steps"]
        if best is None or 100.0 * r["acc"] - r["loss"] > 100.0 * best["acc"] - best["loss"]:
            best = r
        if r["acc"] >= floor:
            return {**r, "accepted": True, "restarts": restarts, "steps": steps}
    return {**best, "accepted": False, "restarts": restarts, "steps": steps}


# ---------------------------------------------------------------------------------------------------------------------
# HeteroFL: width slicing and masked aggregation
# ---------------------------------------------------------------------------------------------------------------------
def slice_params(params, sizes: list[int], rate: float) -> list[np.ndarray]:
    """The first ``int(rate h)`` units of every hidden layer (``split_model``): W[:out', :in'], b[:out']."""
    return [np.ascontiguousarray(np.asarray(p)[tuple(slice(0, d) for d in s)])
            for p, s in zip(params, param_shapes(sizes, rate))]


def heterofl_combine(global_params, client_params, label_sets) -> list[np.ndarray]:
    """HeteroFL's ``combine``: each entry becomes the plain mean of the clients' values over the clients whose slice
    holds it (output layer: only clients holding that class); entries no client holds keep the global value."""
    out = []
    last_w, last_b = len(global_params) - 2, len(global_params) - 1
    for j, g in enumerate(global_params):
        tot = np.zeros(g.shape, np.float64)
        cnt = np.zeros(g.shape, np.float64)
        for cp, labels in zip(client_params, label_sets):
            p = np.asarray(cp[j], np.float64)
            sl = tuple(slice(0, d) for d in p.shape)
            m = np.ones(p.shape, bool)
            if j in (last_w, last_b):
                m[~np.isin(np.arange(p.shape[0]), labels)] = False  # rows (classes) the client does not hold
            tot[sl] += np.where(m, p, 0.0)
            cnt[sl] += m
        new = np.asarray(g, np.float64).copy()
        new[cnt > 0] = tot[cnt > 0] / cnt[cnt > 0]
        out.append(new.astype(np.float32))
    return out


def fedavg(client_params, n) -> list[np.ndarray]:
    N = float(sum(n))
    return [(sum(np.asarray(p[j], np.float64) * nk for p, nk in zip(client_params, n)) / N).astype(np.float32)
            for j in range(len(client_params[0]))]


# ---------------------------------------------------------------------------------------------------------------------
# The server of each arm (no Flower here: the Flower strategies below call these)
# ---------------------------------------------------------------------------------------------------------------------
def sub_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(1)[0] % (2 ** 31))


class Server:
    """The server-side state and work of one arm (``fedconv``, ``heterofl`` or ``fedavg``) for one seed.

    Every arm trains the global model on the public data before the broadcast and every returned model before the
    aggregation with the same Adam steps (FedConv's ``server_local_training`` and ``pre_train_client``: the controls
    get the same public-data model training). FedConv's filters and aggregation weights are learned on top."""

    def __init__(self, arm: str, hp: dict, sizes: list[int], tiers: list[int], public: tuple, seed: int):
        self.arm, self.hp, self.sizes, self.tiers, self.seed = arm, hp, list(sizes), list(tiers), int(seed)
        self.Xp, self.yp = public
        self.rates = {t: tier_rate(t, hp["shrinkage_ratio"]) for t in sorted(set(tiers))}
        self.large_shapes = param_shapes(sizes, 1.0)
        self.stats = {"server_steps": 0, "conv_restarts": 0, "conv_failed": 0, "deconv_restarts": 0,
                      "deconv_failed": 0, "agg_restarts": 0, "agg_failed": 0, "rounds": 0}
        self.log: list[dict] = []
        self.sent: dict[int, list[tuple]] = {}  # partition -> shapes of the last model sent (FLOP accounting)
        gen = torch.Generator().manual_seed(sub_seed(seed, 101))
        self.gen = gen
        if arm == "fedconv":
            how = hp["filter_init"]  # the first filters; a restart always draws the official random initialisation
            self.conv = {t: filters_for(self.large_shapes, param_shapes(sizes, r), gen, how)
                         for t, r in self.rates.items() if t > 0}
            self.deconv = {k: filters_for(self.large_shapes, param_shapes(sizes, self.rates[t]), gen, how)
                           for k, t in enumerate(tiers) if t > 0}
            self.wvec = [self.init_wvec() for _ in tiers]
            self.sub: dict[int, list[np.ndarray]] = {}

    def init_wvec(self) -> list[torch.Tensor]:
        """Aggregation weights (one tensor per parameter and client): ``randn`` as official (:478-604) or ``ones``."""
        if self.hp["agg_init"] == "ones":
            return [torch.ones(s) for s in self.large_shapes]
        return [torch.randn(s, generator=self.gen) for s in self.large_shapes]

    def _train_public(self, params, rnd: int, key: int):
        new, steps = train_params(params, self.Xp, self.yp, epochs=self.hp["server_epochs"], lr=self.hp["lr_server"],
                                  batch_size=self.hp["batch_size"], seed=sub_seed(self.seed, rnd, key))
        self.stats["server_steps"] += steps
        return new

    def _fit_kw(self, epochs_key: str, rnd: int, key: int, lr_key: str = "lr_filter", early: float = 0.40):
        return dict(epochs=self.hp[epochs_key], lr=self.hp[lr_key], batch_size=self.hp["batch_size"],
                    seed=sub_seed(self.seed, rnd, key), early_floor=early, passes=self.hp["filter_passes"])

    # ---- downlink -------------------------------------------------------------------------------------------------
    def messages(self, global_params, rnd: int) -> dict[int, tuple[list[np.ndarray], dict]]:
        """Parameters and config for every partition this round (``configure_fit``)."""
        g = self._train_public(global_params, rnd, 1)
        out = {}
        if self.arm == "fedconv":
            self.sub = {0: g}
            for t in self.conv:
                rate = self.rates[t]

                def build(f, g=g):
                    return compress(g, f, self.hp["mlr_times"])

                r = accept(self.conv[t], lambda rate=rate: filters_for(self.large_shapes,
                                                                       param_shapes(self.sizes, rate), self.gen),
                           build, self.Xp, self.yp, floor=self.hp["floor_conv"], max_restarts=self.hp["max_restarts"],
                           **self._fit_kw("conv_epochs", rnd, 100 + t))
                self.conv[t] = r["theta"]
                self.stats["server_steps"] += r["steps"]
                self.stats["conv_restarts"] += r["restarts"]
                self.stats["conv_failed"] += int(not r["accepted"])
                self.log.append({"round": rnd, "step": "compress", "tier": t, "acc": r["acc"], "epoch": r["epoch"],
                                 "restarts": r["restarts"], "accepted": r["accepted"]})
                with torch.no_grad():
                    self.sub[t] = [p.detach().numpy().astype(np.float32) for p in build(self.conv[t])]
        for k, t in enumerate(self.tiers):
            rate = self.rates[t]
            if self.arm == "fedconv":
                params = self.sub[t]
                cfg = {"round": rnd, "tier": t, "rate": rate, "scaler": False, "label_mask": False}
            elif self.arm == "heterofl":
                params = slice_params(g, self.sizes, rate)
                cfg = {"round": rnd, "tier": t, "rate": rate, "scaler": True, "label_mask": True}
            else:  # fedavg: the full model to everyone (the reference, above every tier's budget)
                params = [p.copy() for p in g]
                cfg = {"round": rnd, "tier": 0, "rate": 1.0, "scaler": False, "label_mask": False}
            self.sent[k] = [tuple(p.shape) for p in params]
            out[k] = ([np.asarray(p, np.float32) for p in params], cfg)
        return out

    # ---- uplink and aggregation -------------------------------------------------------------------------------------
    def aggregate(self, global_params, results: list[tuple[int, list[np.ndarray], int, list[int]]], rnd: int):
        """``results``: (partition, parameters, n_examples, labels held) sorted by partition; returns the new global."""
        self.stats["rounds"] += 1
        pre = {k: self._train_public(p, rnd, 1000 + k) for k, p, _, _ in results}  # pre_train_client
        if self.arm == "heterofl":
            return heterofl_combine(global_params, [pre[k] for k, _, _, _ in results],
                                    [lab for _, _, _, lab in results])
        if self.arm == "fedavg":
            return fedavg([pre[k] for k, _, _, _ in results], [n for _, _, n, _ in results])
        large, n, who = [], [], []
        for k, _, nk, _ in results:
            t = self.tiers[k]
            if t == 0:
                large.append([torch.as_tensor(p) for p in pre[k]])
            else:
                small = [torch.as_tensor(p) for p in pre[k]]

                def build(f, small=small):
                    return dilate(small, f, self.hp["mlr_times"])

                rate = self.rates[t]
                r = accept(self.deconv[k], lambda rate=rate: filters_for(self.large_shapes,
                                                                         param_shapes(self.sizes, rate), self.gen),
                           build, self.Xp, self.yp, floor=self.hp["floor_deconv"],
                           max_restarts=self.hp["max_restarts"], **self._fit_kw("deconv_epochs", rnd, 2000 + k))
                self.stats["server_steps"] += r["steps"]
                self.stats["deconv_restarts"] += r["restarts"]
                self.log.append({"round": rnd, "step": "dilate", "partition": k, "acc": r["acc"],
                                 "epoch": r["epoch"], "restarts": r["restarts"], "accepted": r["accepted"]})
                if not r["accepted"]:  # never aggregate a dilated model below the floor
                    self.stats["deconv_failed"] += 1
                    self.deconv[k] = r["theta"]  # its best attempt, learned on next round
                    continue
                self.deconv[k] = r["theta"]
                with torch.no_grad():
                    large.append([p.detach() for p in build(self.deconv[k])])
            n.append(nk)
            who.append(k)
        if not who:  # every dilation failed and no tier-0 client: keep the previous global model
            self.stats["agg_failed"] += 1
            return [np.asarray(p, np.float32).copy() for p in global_params]
        wv = [self.wvec[k] for k in who]

        def build_agg(ws):
            return weighted_parameter(large, ws, n)

        r = accept(wv, lambda: [self.init_wvec() for _ in who], build_agg, self.Xp, self.yp,
                   floor=self.hp["floor_agg"], max_restarts=self.hp["max_restarts"],
                   **self._fit_kw("agg_epochs", rnd, 3000, "lr_agg", early=0.15))
        self.stats["server_steps"] += r["steps"]
        self.stats["agg_restarts"] += r["restarts"]
        self.log.append({"round": rnd, "step": "aggregate", "clients": len(who), "acc": r["acc"],
                         "epoch": r["epoch"], "restarts": r["restarts"], "accepted": r["accepted"]})
        if not r["accepted"]:  # keep the previous global model
            self.stats["agg_failed"] += 1
            return [np.asarray(p, np.float32).copy() for p in global_params]
        for k, w in zip(who, r["theta"]):
            self.wvec[k] = w
        with torch.no_grad():
            return [p.detach().numpy().astype(np.float32) for p in build_agg(r["theta"])]


# ---------------------------------------------------------------------------------------------------------------------
# Clients and the Flower strategy
# ---------------------------------------------------------------------------------------------------------------------
def local_train(params, X, y, config: dict, hp: dict, seed: int, num_classes: int) -> tuple[list[np.ndarray], float]:
    """One client's round: Adam (lr_client) for ``local_epochs``; HeteroFL clients with ``scaler`` (hidden
    pre-activations / rate) and ``label_mask`` (logits of classes absent from the local data set to 0)."""
    t0 = time.perf_counter()
    scale = 1.0 / float(config["rate"]) if config.get("scaler") else 1.0
    mask = np.isin(np.arange(num_classes), np.unique(y)) if config.get("label_mask") else None
    new, _ = train_params(params, X, y, epochs=hp["local_epochs"], lr=hp["lr_client"], batch_size=hp["batch_size"],
                          seed=seed, hidden_scale=scale, label_mask=mask)
    return new, time.perf_counter() - t0


def make_client_fn(shared_ref, hp: dict, seed: int, num_classes: int):
    from reprolab.distributed import flower as fl
    from reprolab.fed.hidenseek import client_data

    class Client(fl.PartitionClient):
        def fit(self, parameters, config):
            torch.set_num_threads(int(hp["threads"]))
            X, y = client_data(fl.fetch(shared_ref), self.partition)
            new, secs = local_train([np.asarray(p, np.float32) for p in parameters], X, y, config, hp,
                                    fl.client_seed(seed, self.partition, int(config["round"])), num_classes)
            return new, len(y), {"train_s": secs, "labels": ",".join(map(str, np.unique(y).tolist()))}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    return lambda context: Client(fl.partition_id(context))


def strategy_class():
    from flwr.common import FitIns
    from flwr.server.strategy import FedAvg

    from reprolab.distributed import flower as fl

    class HeteroServer(FedAvg):
        """Per-partition messages from a :class:`Server` (configure_fit) and its aggregation (aggregate_fit)."""

        def __init__(self, *args, server: Server, **kwargs):
            super().__init__(*args, **kwargs)
            self.server = server
            self.global_params = [np.asarray(p, np.float32) for p in
                                  fl.parameters_to_ndarrays(kwargs["initial_parameters"])]

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            msgs = self.server.messages(self.global_params, int(server_round))
            out = []
            for client, _ in pairs:
                params, cfg = msgs[self.partition_of[client.cid]]
                out.append((client, FitIns(fl.ndarrays_to_parameters(params), cfg)))
            return out

        def aggregate_fit(self, server_round, results, failures):
            if not results or (failures and not self.accept_failures):
                return None, {}
            res = []
            for client, r in results:  # already sorted by partition (Tracked)
                labels = [int(v) for v in str(r.metrics["labels"]).split(",") if v != ""]
                res.append((self.partition_of[client.cid], [np.asarray(p, np.float32) for p in
                                                             fl.parameters_to_ndarrays(r.parameters)],
                            int(r.num_examples), labels))
            self.global_params = self.server.aggregate(self.global_params, res, int(server_round))
            return fl.ndarrays_to_parameters(self.global_params), {}

    class Strategy(fl.Tracked, HeteroServer):
        pass

    return Strategy


def run_arm(arm: str, shared: dict, hp: dict, seed: int, *, sizes, tiers, test: tuple, init: list[np.ndarray],
            num_cpus: int = 2, ray_address: str | None = None) -> dict:
    """One Flower simulation of ``arm``: test accuracy of the global model after every round (server side), the
    byte ledger, the shapes sent to every partition, the server's counters and log."""
    from reprolab.distributed import flower as fl

    Strategy = strategy_class()
    server = Server(arm, hp, sizes, tiers, shared["public"], seed)
    Xte, yte = test
    curve: list[dict] = []

    def evaluate_fn(server_round, nds, config):
        acc, loss = evaluate(nds, Xte, yte)
        curve.append({"round": int(server_round), "acc": acc, "loss": loss})
        return loss, {"acc": acc}

    strategy = Strategy(server=server, num_clients=len(tiers), seed=seed, fraction_fit=1.0, fraction_evaluate=0.0,
                        min_fit_clients=len(tiers), min_available_clients=len(tiers), accept_failures=False,
                        evaluate_fn=evaluate_fn, initial_parameters=fl.ndarrays_to_parameters(init))
    ref = fl.share({k: shared[k] for k in ("X", "y", "parts")})
    t0 = time.perf_counter()
    fl.simulate(strategy, make_client_fn(ref, hp, seed, sizes[-1]), num_clients=len(tiers), rounds=hp["rounds"],
                num_cpus=num_cpus, ray_address=ray_address)
    return {"curve": curve, "ledger": list(strategy.ledger), "sent": dict(server.sent), "stats": dict(server.stats),
            "log": list(server.log), "wall_s": time.perf_counter() - t0, "final": strategy.global_params}


def run_public_only(init, public: tuple, test: tuple, *, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    """The server's public data alone: Adam on the large model for exactly ``steps`` steps (FedConv's count of
    public-data steps on the server), evaluated on the test set."""
    Xp, yp = public
    per_epoch = -(-len(yp) // batch_size)
    epochs = max(1, int(round(steps / per_epoch)))
    params, done = train_params(init, Xp, yp, epochs=epochs, lr=lr, batch_size=batch_size, seed=sub_seed(seed, 9))
    acc, loss = evaluate(params, *test)
    return {"acc": acc, "loss": loss, "steps": done}


def prepare_seed(X, y, seed: int, *, num_clients: int, alpha: float, test_fraction: float, n_public: int,
                 min_size: int = 10) -> dict:
    """Stratified test split; a label-stratified public set of ``n_public`` training samples for the server; the
    rest split over the clients by Dir(alpha) label skew."""
    from sklearn.model_selection import train_test_split

    from reprolab.fed.common import dirichlet_split

    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    idx_cl, idx_pub = train_test_split(idx_tr, test_size=int(n_public), stratify=y[idx_tr], random_state=seed)
    Xc = np.ascontiguousarray(X[idx_cl], dtype=np.float32)
    yc = y[idx_cl].astype(np.int64)
    parts = dirichlet_split(yc, num_clients, alpha, seed=seed, min_size=min_size)
    return {"X": Xc, "y": yc, "parts": parts,
            "public": (np.ascontiguousarray(X[idx_pub], dtype=np.float32), y[idx_pub].astype(np.int64)),
            "test": (np.ascontiguousarray(X[idx_te], dtype=np.float32), y[idx_te].astype(np.int64))}


def pipeline_acceptance(log: list[dict]) -> dict:
    """Share of the FedConv server's compressions, dilations and aggregations (entries of ``Server.log``) that passed
    their floor, and ``premise`` = min(share of compressions accepted, share of dilations accepted): 0 when no
    compressed or no dilated sub-model ever passed, i.e. the compress -> train -> dilate pipeline never functioned."""
    out = {}
    for step in ("compress", "dilate", "aggregate"):
        acc = [bool(e["accepted"]) for e in log if e["step"] == step]
        out[step] = float(np.mean(acc)) if acc else 0.0
        out[f"{step}_n"] = len(acc)
    out["premise"] = min(out["compress"], out["dilate"])
    return out


def filter_probe(large_params, public: tuple, test: tuple, sizes: list[int], rate: float, *, how: str, draws: int,
                 epochs: int, passes: int, lr: float, batch_size: int, mlr_times: int, seed: int) -> dict:
    """Diagnostic (shown, not a gate): learn a compression filter of ``large_params`` (a trained large model) to the
    width ``rate`` on the public data, ``draws`` fresh initialisations (``how``: official random or identity), each for
    ``epochs`` evaluations of ``passes`` passes, no early stop; returns every draw's public-accuracy history and the
    best draw's test accuracy."""
    gen = torch.Generator().manual_seed(sub_seed(seed, 77))
    L, s = param_shapes(sizes, 1.0), param_shapes(sizes, rate)
    hist, best = [], None
    for d in range(int(draws)):
        f = filters_for(L, s, gen, how)
        r = fit_filter(f, lambda f: compress(large_params, f, mlr_times), *public, epochs=epochs, lr=lr,
                       batch_size=batch_size, seed=sub_seed(seed, 78, d), early_floor=0.0, passes=passes)
        hist.append([round(a, 4) for a, _ in r["history"]])
        if best is None or r["acc"] > best["acc"]:
            best = r
    with torch.no_grad():
        test_acc = evaluate([p.detach() for p in compress(large_params, best["theta"], mlr_times)], *test)[0]
    return {"steps_per_draw": best["steps"], "public_acc_history": hist,
            "best_public_acc": float(best["acc"]), "best_test_acc": float(test_acc)}
