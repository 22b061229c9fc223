"""FED-PUB: Personalized Subgraph Federated Learning (Baek, Jeong, Jin, Yoon, Hwang; ICML 2023),
`arXiv:2206.10206 <https://arxiv.org/abs/2206.10206>`_. Official code: github.com/JinheonBaek/FED-PUB (read at commit
302980d); file:line references below are to it.

The method, as the official code runs it (``models/fedpub/{server,client}.py``, ``models/nets.py``, ``models/layers.py``):

1. **Masked GCN** (``nets.py:30-52``): two GCN layers (``GCNConv``: self loops, symmetric normalisation) and a linear
   classifier; every weight matrix ``W`` is used as ``W * M`` with a learnable mask ``M`` of the same shape, initialised
   to ones (``--laye-mask-one --clsf-mask-one`` in ``scripts/disjoint.sh``). In eval mode entries with ``|M| < l1`` are
   zeroed (``layers.py:340-345``). ReLU + dropout 0.5 after each GCN layer.
2. **Masks are personal** (``client.py:48``, ``utils.py:69-72`` ``skip_mask``): a client never overwrites its masks with
   the server's weights; only the weights ``W`` and biases travel.
3. **Local objective** (``client.py:90-98``): ``CE + l1 * sum ||M||_1 + loc_l2 * sum ||theta - theta_received||_2``
   (the 2-norm, not squared, over the non-mask weights and biases; the proximal term skipped in the first round);
   Adam (lr 0.01 for Cora, weight decay 1e-6, ``main.py:27-39``), its state kept by the client across rounds.
4. **Functional embedding** (``client.py:124-133``): the mean over the nodes of a random proxy graph (the server's,
   ``server.py:18-24``: ``n_proxy`` = 5 blocks of 100 nodes, ``p_in`` 0.1, features N(0, 1)) of the client model's
   second GCN layer output (eval mode).
5. **Personalised aggregation** (``server.py:47-69``): ``S_ij = cos(e_i, e_j)``, ``alpha_ij = exp(tau * S_ij) /
   sum_k exp(tau * S_ik)`` (``agg_norm = exp``, ``norm_scale`` tau: 10 by default, 3 in ``scripts/disjoint.sh``), and
   client i's next model is ``sum_j alpha_ij theta_j``.

Baselines: **FedAvg** (``models/fedavg``: plain GCN, the server's average; each client reports ``train_size =
len(partition) = 1`` graph, so the average is uniform), **local-only** (each client trains a GCN alone, no server),
and, for the premise gate, **FedAvg + fine-tune** (the round's FedAvg global model fine-tuned ``ft_steps`` full-batch
steps on each client). Accuracy is the official "local accuracy": each client's model after its local training of the
round, on its own validation/test nodes; model selection "Acc@Best Val All" (``evaluations/visualizer.py:83-88``):
per run, the round of the best client-mean validation accuracy, and the client-mean test accuracy at that round.

Data (official ``data/generators/disjoint.py``): one graph, a random 20% / 40% / 40% train / test / validation split
of its nodes, METIS (here ``dgl.metis_partition_assignment``) into ``num_clients`` disjoint parts; each client holds
the subgraph induced by its part (edges between parts are lost).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402
from dgl.nn import GraphConv  # noqa: E402

ARMS = ("fedpub", "fedavg", "local")
DATASETS = ("citation_like", "cora", "citeseer", "pubmed")


# ---------------------------------------------------------------------------------------------------------------------
# Data: one graph, the official node split, METIS clients
# ---------------------------------------------------------------------------------------------------------------------
def load_graph(name: str, seed: int = 0, **gen_kwargs):
    """(NodeData, stats-source label). ``citation_like``: the offline generator calibrated to Cora's statistics;
    ``cora`` / ``citeseer`` / ``pubmed``: DGL's Planetoid loaders (online), restricted to the largest connected
    component as the official ``LargestConnectedComponents`` transform does."""
    if name == "citation_like":
        from reprolab.graph.citation_like import citation_like

        return citation_like(seed=seed, **gen_kwargs)
    if name in ("cora", "citeseer", "pubmed"):  # pragma: no cover - needs the internet
        from reprolab.graph.datasets import load_graph as _load
        from reprolab.graph.graphdata import NodeData

        d = _load(name)
        import scipy.sparse as sp

        src, dst = d.graph.edges()
        A = sp.coo_matrix((np.ones(len(src)), (src.numpy(), dst.numpy())), shape=(d.num_nodes, d.num_nodes))
        _, comp = sp.csgraph.connected_components(A)
        keep = torch.from_numpy(np.flatnonzero(comp == np.bincount(comp).argmax()))
        sub = dgl.node_subgraph(d.graph, keep)
        return NodeData(name, dgl.graph(sub.edges(), num_nodes=len(keep)), d.X[keep], d.y[keep],
                        torch.zeros(len(keep), dtype=torch.int64), {"source": "dgl", "lcc_of": d.num_nodes})
    raise ValueError(f"dataset {name!r}; allowed: {', '.join(DATASETS)}")


def row_normalize(X: torch.Tensor) -> torch.Tensor:
    """``T.NormalizeFeatures``: each row divided by its sum (rows summing to 0 stay 0)."""
    s = X.sum(1, keepdim=True)
    return X / s.clamp(min=1e-12)


def split_nodes(n: int, seed: int, ratio_train: float = 0.2) -> dict[str, np.ndarray]:
    """Official ``split_train`` (``data/generators/utils.py:32-55``): a random permutation, the first 20% train, the
    next 40% test, the rest validation. Boolean masks (N,)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_test = round(n * ratio_train), round(n * (1 - ratio_train) / 2)
    out = {k: np.zeros(n, dtype=bool) for k in ("train", "test", "val")}
    out["train"][perm[:n_train]] = True
    out["test"][perm[n_train:n_train + n_test]] = True
    out["val"][perm[n_train + n_test:]] = True
    return out


def metis_parts(g: dgl.DGLGraph, k: int) -> np.ndarray:
    """Part id (0..k-1) of every node: METIS (``dgl.metis_partition_assignment``, balanced, edge-cut objective)."""
    return dgl.metis_partition_assignment(g, k).numpy().astype(np.int64)


@dataclass
class ClientGraph:
    """One client's subgraph (self loops added; its node ids are local), features (sparse COO), labels and masks."""
    g: dgl.DGLGraph
    X: torch.Tensor
    y: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    nodes: np.ndarray  # global ids


def client_graphs(g: dgl.DGLGraph, X: torch.Tensor, y: torch.Tensor, split: dict, parts: np.ndarray) -> list[ClientGraph]:
    """The induced subgraph of every METIS part (official ``split_subgraphs``: edges inside the part only)."""
    out = []
    for c in range(int(parts.max()) + 1):
        nodes = np.flatnonzero(parts == c)
        sub = dgl.node_subgraph(g, torch.from_numpy(nodes))
        sg = dgl.add_self_loop(dgl.remove_self_loop(dgl.graph(sub.edges(), num_nodes=len(nodes))))
        out.append(ClientGraph(sg, X[nodes].contiguous().to_sparse(), y[nodes].contiguous(),
                               *(torch.from_numpy(split[k][nodes]) for k in ("train", "val", "test")), nodes))
    return out


def proxy_graph(n_feat: int, n_proxy: int = 5, seed: int = 0, block: int = 100) -> tuple[dgl.DGLGraph, torch.Tensor]:
    """The server's random proxy graph (``server.py:18-24``): ``n_proxy`` disconnected G(100, 0.1) blocks
    (``nx.random_partition_graph(p_out=0)``), features N(0, 1) of the input width; self loops added for the GCN."""
    import networkx as nx

    G = nx.random_partition_graph([block] * n_proxy, p_in=0.1, p_out=0.0, seed=seed)
    e = np.array(G.edges(), dtype=np.int64).reshape(-1, 2)
    n = block * n_proxy
    g = dgl.graph((torch.from_numpy(np.concatenate([e[:, 0], e[:, 1]])),
                   torch.from_numpy(np.concatenate([e[:, 1], e[:, 0]]))), num_nodes=n)
    g = dgl.add_self_loop(g)
    x = torch.randn(n, n_feat, generator=torch.Generator().manual_seed(int(seed)))
    return g, x


# ---------------------------------------------------------------------------------------------------------------------
# The (masked) GCN
# ---------------------------------------------------------------------------------------------------------------------
class MaskedGCN(nn.Module):
    """Official ``MaskedGCN`` (``masked=True``) or ``GCN`` (``masked=False``): conv1 -> ReLU -> dropout -> conv2
    [-> proxy output] -> ReLU -> dropout -> linear. Weights in DGL's (in, out) layout; ``W_eff = W * prune(M)``.

    Parameter names: ``conv{1,2}.weight``, ``conv{1,2}.bias``, ``clsif.weight``, ``clsif.bias`` and, if masked,
    ``conv{1,2}.mask``, ``clsif.mask``. ``g`` must carry self loops (``GraphConv(norm="both")`` then computes
    D^-1/2 (A + I) D^-1/2 X W, as ``GCNConv`` does).
    """

    def __init__(self, n_feat: int, n_dims: int, n_clss: int, masked: bool = True, l1: float = 1e-3,
                 dropout: float = 0.5):
        super().__init__()
        self.masked, self.l1, self.dropout = masked, float(l1), float(dropout)
        self.conv1 = _Layer(n_feat, n_dims, masked)
        self.conv2 = _Layer(n_dims, n_dims, masked)
        self.clsif = _Layer(n_dims, n_clss, masked, xavier_bias=True)
        # normalised aggregation only (no weight): D^-1/2 (A + I) D^-1/2 h; the weight is applied before it
        self._gc = GraphConv(1, 1, norm="both", weight=False, bias=False, allow_zero_in_degree=True)

    def effective(self, layer: "_Layer") -> torch.Tensor:
        if not self.masked:
            return layer.weight
        m = layer.mask
        if not self.training:  # official prune(): |m| < l1 -> 0 in eval mode
            m = m.masked_fill(m.abs() < self.l1, 0.0)
        return layer.weight * m

    def _conv(self, g: dgl.DGLGraph, h: torch.Tensor, layer: "_Layer") -> torch.Tensor:
        W = self.effective(layer)
        hw = torch.sparse.mm(h, W) if h.is_sparse else h @ W  # (N, out); bag-of-words inputs stay sparse
        return self._gc(g, hw) + layer.bias  # A_hat (h W) + b

    def forward(self, g: dgl.DGLGraph, x: torch.Tensor, is_proxy: bool = False) -> torch.Tensor:
        h = self._conv(g, x, self.conv1)  # (N, n_dims)
        h = F.dropout(F.relu(h), self.dropout, self.training)
        h = self._conv(g, h, self.conv2)  # (N, n_dims)
        if is_proxy:
            return h
        h = F.dropout(F.relu(h), self.dropout, self.training)
        return h @ self.effective(self.clsif) + self.clsif.bias  # (N, n_clss)

    def shared_names(self) -> list[str]:
        """Names of the parameters that travel (everything but the masks), in a fixed order."""
        return [k for k, _ in self.named_parameters() if not k.endswith(".mask")]

    def get_shared(self) -> list[np.ndarray]:
        p = dict(self.named_parameters())
        return [p[k].detach().numpy().copy() for k in self.shared_names()]

    def set_shared(self, arrays: list[np.ndarray]) -> None:
        p = dict(self.named_parameters())
        with torch.no_grad():
            for k, a in zip(self.shared_names(), arrays, strict=True):
                p[k].copy_(torch.as_tensor(np.asarray(a)).reshape(p[k].shape))

    def masks(self) -> list[torch.Tensor]:
        return [layer.mask for layer in (self.conv1, self.conv2, self.clsif)] if self.masked else []


class _Layer(nn.Module):
    def __init__(self, d_in: int, d_out: int, masked: bool, xavier_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        nn.init.xavier_uniform_(self.weight)  # glorot (GCNConv) / xavier_uniform (MaskedLinear)
        if xavier_bias:  # official MaskedLinear: bias (1, d_out), xavier_uniform
            b = torch.empty(1, d_out)
            nn.init.xavier_uniform_(b)
            self.bias = nn.Parameter(b.squeeze(0))
        else:
            self.bias = nn.Parameter(torch.zeros(d_out))
        if masked:
            self.mask = nn.Parameter(torch.ones(d_in, d_out))


def init_model(n_feat: int, hp: dict, n_clss: int, masked: bool, seed: int) -> MaskedGCN:
    torch.manual_seed(int(seed))
    return MaskedGCN(n_feat, hp["n_dims"], n_clss, masked=masked, l1=hp["l1"], dropout=hp["dropout"])


# ---------------------------------------------------------------------------------------------------------------------
# The local objective, the functional embedding, the server's similarity weights
# ---------------------------------------------------------------------------------------------------------------------
def local_loss(model: MaskedGCN, logits: torch.Tensor, y: torch.Tensor, prev: dict | None, l1: float,
               loc_l2: float, grad_through_regularisers: bool = True) -> torch.Tensor:
    """``CE + l1 * sum_M ||M||_1 + loc_l2 * sum_theta ||theta - theta_prev||_2`` (official ``client.py:90-98``).

    ``prev`` (name -> tensor of the received weights) None skips the proximal term (the first round).
    ``grad_through_regularisers=False`` reproduces the official code literally: it sums the terms over
    ``model.state_dict()``, whose tensors are detached, so they change the loss value but give no gradient."""
    loss = F.cross_entropy(logits, y)
    params = dict(model.named_parameters())
    for name, p in params.items():
        q = p if grad_through_regularisers else p.detach()
        if name.endswith(".mask"):
            loss = loss + torch.norm(q, 1) * l1
        elif prev is not None:
            loss = loss + torch.norm(q - prev[name], 2) * loc_l2
    return loss


@torch.no_grad()
def functional_embedding(model: MaskedGCN, proxy: tuple[dgl.DGLGraph, torch.Tensor]) -> np.ndarray:
    """Mean over the proxy nodes of the second GCN layer's output, in eval mode (official ``client.py:124-133``)."""
    was = model.training
    model.eval()
    out = model(proxy[0], proxy[1], is_proxy=True).mean(0).numpy().astype(np.float64)
    model.train(was)
    return out


def similarity_weights(emb: np.ndarray, tau: float, agg_norm: str = "exp") -> np.ndarray:
    """alpha (K, K): ``S = cos(e_i, e_j)``; ``exp``: ``alpha_ij = exp(tau S_ij) / sum_k exp(tau S_ik)``; ``cosine``:
    ``S_ij / sum_k S_ik`` (official ``server.py:49-58``)."""
    E = np.asarray(emb, dtype=np.float64)
    nrm = np.linalg.norm(E, axis=1, keepdims=True)
    S = (E @ E.T) / np.maximum(nrm * nrm.T, 1e-300)
    if agg_norm == "exp":
        S = np.exp(tau * S)
    elif agg_norm != "cosine":
        raise ValueError(f"agg_norm {agg_norm!r}: exp | cosine")
    return S / S.sum(1, keepdims=True)


def weighted_models(models: list[list[np.ndarray]], weights) -> list[np.ndarray]:
    """``sum_j w_j theta_j`` per array (float64 sums, float32 out)."""
    w = np.asarray(weights, dtype=np.float64)
    return [sum(wj * m[i].astype(np.float64) for wj, m in zip(w, models)).astype(np.float32)
            for i in range(len(models[0]))]


# ---------------------------------------------------------------------------------------------------------------------
# One client's round
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MaskedGCN, cg: ClientGraph) -> dict:
    """Accuracy on the client's validation and test nodes, eval mode (official ``validate``; 1.0 if no node)."""
    model.eval()
    pred = model(cg.g, cg.X).argmax(1)
    out = {}
    for k in ("val", "test"):
        m = getattr(cg, k)
        out[f"{k}_acc"] = float((pred[m] == cg.y[m]).double().mean()) if bool(m.any()) else 1.0
    model.train()
    return out


def adam_state(opt: torch.optim.Optimizer) -> list[np.ndarray]:
    """Adam's state as arrays: for each parameter (in order) step, exp_avg, exp_avg_sq (empty list before step 1)."""
    st = opt.state_dict()["state"]
    out = []
    for i in range(len(opt.param_groups[0]["params"])):
        s = st[i]
        out += [np.array([float(s["step"])]), s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy()]
    return out


def load_adam_state(opt: torch.optim.Optimizer, arrays: list[np.ndarray]) -> None:
    sd = opt.state_dict()
    sd["state"] = {i: {"step": torch.tensor(float(arrays[3 * i][0])), "exp_avg": torch.as_tensor(arrays[3 * i + 1]).clone(),
                       "exp_avg_sq": torch.as_tensor(arrays[3 * i + 2]).clone()}
                   for i in range(len(arrays) // 3)}
    opt.load_state_dict(sd)


def local_train(model: MaskedGCN, cg: ClientGraph, opt: torch.optim.Optimizer, steps: int, hp: dict,
                prev: dict | None) -> float:
    """``steps`` full-batch steps (one per local epoch: the client's subgraph is one batch) of the local objective
    (masked model: CE + L1 on masks + proximal term; plain GCN: CE only, as the official FedAvg client)."""
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(int(steps)):
        opt.zero_grad()
        logits = model(cg.g, cg.X)[cg.train]
        if model.masked:
            loss = local_loss(model, logits, cg.y[cg.train], prev, hp["l1"], hp["loc_l2"],
                              hp["grad_through_regularisers"])
        else:
            loss = F.cross_entropy(logits, cg.y[cg.train])
        loss.backward()
        opt.step()
    return float(loss)


def make_optimizer(model: MaskedGCN, hp: dict) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])


def mask_stats(model: MaskedGCN, l1: float) -> dict:
    """Sparsity (fraction of mask entries with |m| < l1, the official ``get_sparsity``), and how far masks moved."""
    m = torch.cat([x.detach().abs().ravel() for x in model.masks()])
    return {"sparsity": float((m < l1).double().mean()), "frac_below_half": float((m < 0.5).double().mean()),
            "mean_abs": float(m.mean())}


def client_round(arm: str, cg: ClientGraph, received: list[np.ndarray], state: list[np.ndarray] | None, hp: dict,
                 n_feat: int, n_clss: int, rnd: int, seed: int, proxy=None) -> tuple[list[np.ndarray], list, dict]:
    """One client's round of ``arm`` ("fedpub" or "fedavg"): load its persistent state (masks and Adam moments),
    take the received weights, train ``local_epochs`` steps, evaluate. Returns (weights to send [+ the functional
    embedding for FED-PUB], the new state, metrics). FedAvg also reports the received global model's accuracy and that
    of a fine-tuned copy (``ft_steps`` more steps; the premise gate), which are never sent."""
    t0 = time.perf_counter()
    torch.manual_seed(int(seed))
    masked = arm == "fedpub"
    model = MaskedGCN(n_feat, hp["n_dims"], n_clss, masked=masked, l1=hp["l1"], dropout=hp["dropout"])
    opt = make_optimizer(model, hp)
    n_masks = 3 if masked else 0
    if state is not None:
        if masked:
            with torch.no_grad():
                for mk, a in zip(model.masks(), state[:n_masks]):
                    mk.copy_(torch.as_tensor(a))
        load_adam_state(opt, state[n_masks:])
    model.set_shared(received)
    metrics: dict = {}
    if not masked:
        metrics.update({f"global_{k}": v for k, v in evaluate(model, cg).items()})
    prev = None
    if masked and rnd > 1:
        prev = {k: torch.as_tensor(np.asarray(a)).reshape(p.shape).clone()
                for (k, p), a in zip([(k, p) for k, p in model.named_parameters() if not k.endswith(".mask")], received)}
    metrics["loss"] = local_train(model, cg, opt, hp["local_epochs"], hp, prev)
    metrics.update(evaluate(model, cg))
    if not masked and hp.get("ft_steps", 0) > 0:
        ft, ft_opt = copy.deepcopy(model), None
        ft.set_shared(received)
        ft_opt = make_optimizer(ft, hp)
        local_train(ft, cg, ft_opt, hp["ft_steps"], hp, None)
        metrics.update({f"ft_{k}": v for k, v in evaluate(ft, cg).items()})
    out = model.get_shared()
    new_state = ([m.detach().numpy().copy() for m in model.masks()] if masked else []) + adam_state(opt)
    if masked:
        out.append(functional_embedding(model, proxy).astype(np.float32))
        metrics.update({f"mask_{k}": v for k, v in mask_stats(model, hp["l1"]).items()})
    metrics["train_s"] = time.perf_counter() - t0
    return out, new_state, metrics


# ---------------------------------------------------------------------------------------------------------------------
# Servers (the direct computation; the Flower strategies below call the same functions)
# ---------------------------------------------------------------------------------------------------------------------
def fedpub_server(uploads: list[list[np.ndarray]], sizes, tau: float, agg_norm: str = "exp"):
    """FED-PUB's server step on the clients' uploads (weights + functional embedding last), in partition order:
    (per-client personalised models, the global average weighted by ``sizes``, alpha)."""
    emb = np.stack([u[-1] for u in uploads])
    ws = [u[:-1] for u in uploads]
    alpha = similarity_weights(emb, tau, agg_norm)
    personal = [weighted_models(ws, alpha[i]) for i in range(len(ws))]
    s = np.asarray(sizes, dtype=np.float64)
    return personal, weighted_models(ws, s / s.sum()), alpha


def run_inprocess(arm: str, clients: list[ClientGraph], hp: dict, seed: int, *, rounds: int, n_feat: int,
                  n_clss: int, proxy=None) -> dict:
    """The protocol without Flower (one process, clients in partition order): the reference the Flower run is
    tested against, and the local-only arm (``arm="local"``: each client alone, no server, the same steps)."""
    from reprolab.distributed.flower import client_seed

    init = init_model(n_feat, hp, n_clss, arm == "fedpub", seed)
    glob = init.get_shared()
    K = len(clients)
    received = [glob] * K
    states: list = [None] * K
    curve = []
    for r in range(1, rounds + 1):
        ups, mets = [], []
        for k in range(K):
            a = "fedavg" if arm == "local" else arm
            h = {**hp, "ft_steps": 0} if arm == "local" else hp
            up, states[k], met = client_round(a, clients[k], received[k], states[k], h, n_feat, n_clss, r,
                                              client_seed(seed, k, r), proxy)
            ups.append(up)
            mets.append(met)
        curve.append(mets)
        if arm == "local":
            received = ups
        elif arm == "fedavg":
            sizes = [1.0] * K if hp["fedavg_weighting"] == "uniform" else [float(c.train.sum()) for c in clients]
            g = weighted_models(ups, np.asarray(sizes) / sum(sizes))
            received = [g] * K
        else:
            sizes = [1.0] * K if hp["fedavg_weighting"] == "uniform" else [float(c.train.sum()) for c in clients]
            received, _, _ = fedpub_server(ups, sizes, hp["tau"], hp["agg_norm"])
    return {"curve": curve}


def best_val_all(val: np.ndarray, test: np.ndarray) -> tuple[float, int]:
    """Official "Acc@Best Val All" for one run: ``val``/``test`` (rounds, clients); the round r* maximising the
    client-mean validation accuracy (first on ties, ``np.argmax``), and the client-mean test accuracy there."""
    v = np.asarray(val, dtype=np.float64).mean(1)
    r = int(np.argmax(v))
    return float(np.asarray(test, dtype=np.float64)[r].mean()), r


def curves(run: dict, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(val, test) arrays (rounds, clients) of a run's per-round client metrics (``prefix`` "ft_" or "global_")."""
    val = np.array([[m[f"{prefix}val_acc"] for m in rnd] for rnd in run["curve"]])
    test = np.array([[m[f"{prefix}test_acc"] for m in rnd] for rnd in run["curve"]])
    return val, test


# ---------------------------------------------------------------------------------------------------------------------
# Flower: clients with persistent state (Context.state), the personalising strategy
# ---------------------------------------------------------------------------------------------------------------------
def make_client_fn(arm: str, shared_ref, hp: dict, seed: int):
    """``client_fn(context)``: a Flower client of ``arm`` whose masks and Adam moments live in ``context.state``
    (Flower keeps a node's Context between rounds; nothing of it is sent)."""
    from flwr.common import ArrayRecord

    from reprolab.distributed import flower as fl

    class Client(fl.PartitionClient):
        def __init__(self, partition, context):
            super().__init__(partition)
            self.context = context

        def fit(self, parameters, config):
            torch.set_num_threads(int(hp["threads"]))
            sh = fl.fetch(shared_ref, cache=True)
            rnd = int(config["round"])
            st = self.context.state
            state = st["fedpub_state"].to_numpy_ndarrays() if "fedpub_state" in st else None
            out, new_state, met = client_round(arm, sh["clients"][self.partition], parameters, state, hp,
                                               sh["n_feat"], sh["n_clss"], rnd,
                                               fl.client_seed(seed, self.partition, rnd), sh.get("proxy"))
            st["fedpub_state"] = ArrayRecord(numpy_ndarrays=new_state)
            n = 1 if hp["fedavg_weighting"] == "uniform" else int(sh["clients"][self.partition].train.sum())
            return out, n, met

        def evaluate(self, parameters, config):  # client-side metrics come with fit (official: after training)
            return 0.0, 1, {}

    return lambda context: Client(fl.partition_id(context), context)


def _strategy_classes():
    from flwr.common import FitIns
    from flwr.server.strategy import FedAvg

    from reprolab.distributed import flower as fl

    class Recording(FedAvg):
        """Keeps every client's fit metrics per round, by partition (the local accuracies)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.records: dict[int, dict[int, dict]] = {}

        def _record(self, server_round, results):
            self.records[int(server_round)] = {self.partition_of[c.cid]: dict(r.metrics) for c, r in results}

    class FedAvgGCN(fl.Tracked, Recording):
        def aggregate_fit(self, server_round, results, failures):
            self._record(server_round, self._sorted(results))
            return super().aggregate_fit(server_round, results, failures)

    class PersonalisedFed(Recording):
        """FED-PUB's server: per-client models from functional-embedding similarity; ``configure_fit`` sends each
        client its own model (the global one before the first aggregation)."""

        def __init__(self, *args, tau: float, agg_norm: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.tau, self.agg_norm = float(tau), agg_norm
            self.personal: dict[int, list[np.ndarray]] = {}
            self.alphas: dict[int, np.ndarray] = {}

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            out = []
            for client, ins in pairs:
                pid = self.partition_of[client.cid]
                if pid in self.personal:
                    ins = FitIns(fl.ndarrays_to_parameters(self.personal[pid]), ins.config)
                out.append((client, ins))
            return out

        def aggregate_fit(self, server_round, results, failures):
            if not results or (failures and not self.accept_failures):
                return None, {}
            results = self._sorted(results)
            self._record(server_round, results)
            uploads = [fl.parameters_to_ndarrays(r.parameters) for _, r in results]
            pids = [self.partition_of[c.cid] for c, _ in results]
            personal, glob, alpha = fedpub_server(uploads, [r.num_examples for _, r in results], self.tau,
                                                  self.agg_norm)
            self.personal.update(dict(zip(pids, personal)))
            self.alphas[int(server_round)] = alpha
            return fl.ndarrays_to_parameters(glob), {}

    class FedPubStrategy(fl.Tracked, PersonalisedFed):
        pass

    return FedAvgGCN, FedPubStrategy


def run_arm(arm: str, shared: dict, hp: dict, seed: int, *, rounds: int, num_cpus: int = 2,
            ray_address: str | None = None) -> dict:
    """One Flower simulation of ``arm`` ("fedpub" | "fedavg"): per-round client metrics (partition order), the byte
    ledger, the similarity matrices (FED-PUB) and the wall clock."""
    from reprolab.distributed import flower as fl

    FedAvgGCN, FedPubStrategy = _strategy_classes()
    K = len(shared["clients"])
    init = init_model(shared["n_feat"], hp, shared["n_clss"], arm == "fedpub", seed)
    common = dict(num_clients=K, seed=seed, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=K,
                  min_available_clients=K, accept_failures=False, on_fit_config_fn=lambda r: {"round": r},
                  initial_parameters=fl.ndarrays_to_parameters(init.get_shared()))
    if arm == "fedavg":
        strategy = FedAvgGCN(**common)
    elif arm == "fedpub":
        strategy = FedPubStrategy(tau=hp["tau"], agg_norm=hp["agg_norm"], **common)
    else:
        raise ValueError(f"run_arm: arm {arm!r}; Flower arms: fedpub | fedavg (local runs in process)")
    ref = fl.share(shared)
    t0 = time.perf_counter()
    fl.simulate(strategy, make_client_fn(arm, ref, hp, seed), num_clients=K, rounds=rounds, num_cpus=num_cpus,
                ray_address=ray_address)
    wall = time.perf_counter() - t0
    curve = [[strategy.records[r][k] for k in range(K)] for r in range(1, rounds + 1)]
    return {"curve": curve, "ledger": list(strategy.ledger), "wall_s": wall,
            "alphas": {r: a.tolist() for r, a in getattr(strategy, "alphas", {}).items()}}


def prepare(cfg: dict, seed: int) -> dict:
    """One seed's data: the graph (generated with ``seed`` offline), row-normalised features, the official 20/40/40
    split, METIS clients, the proxy graph. Returns the ``shared`` dict every arm's clients read."""
    d = load_graph(cfg["dataset"], seed=seed, **(cfg.get("generator") or {}) if cfg["dataset"] == "citation_like" else {})
    X = row_normalize(d.X.float())
    split = split_nodes(d.num_nodes, seed, cfg["ratio_train"])
    parts = metis_parts(d.graph, cfg["num_clients"])
    clients = client_graphs(d.graph, X, d.y, split, parts)
    proxy = proxy_graph(X.shape[1], cfg["n_proxy"], seed)
    return {"clients": clients, "n_feat": int(X.shape[1]), "n_clss": int(d.y.max()) + 1, "proxy": proxy,
            "data": d, "parts": parts, "split": split}
