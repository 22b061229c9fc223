"""SMILE: bi-level (inter-node, then intra-node) mixture-of-experts routing versus Switch top-1.

He et al., "SMILE: Scaling Mixture-of-Experts with Efficient Bi-level Routing", arXiv:2212.05191.

Experts are laid out on ``N`` nodes with ``G`` experts (one per GPU) each, ``E = N * G``. Switch routes every token
with one softmax over all ``E`` experts (top-1, gate = its probability) and a load-balancing loss
``E * sum_e f_e P_e``. SMILE factorises the choice: an inter-node router picks a node ``n`` (softmax over ``N``),
then that node's intra-node router picks a local expert ``g`` (softmax over ``G``); the gate is the product of the
two probabilities and the load-balancing loss is applied at both levels (``N * sum_n f_n P_n`` over all tokens plus,
per node, ``G * sum_g f_g P_g`` over the tokens routed to it, averaged over nodes). Because the node is chosen first,
the All2All splits into one exchange across nodes and one inside each node (see :mod:`reprolab.moe.all2all`).

No token is dropped here (infinite capacity), for both routers, so the two differ only in routing.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``K * sum_k f_k P_k`` for router probabilities (T, K) and top-1 choices (T,):
    f_k = share of tokens sent to k, P_k = mean router probability of k. Equals 1 under perfect balance."""
    T, K = probs.shape
    if T == 0:
        return probs.sum() * 0.0
    f = torch.bincount(idx, minlength=K).to(probs.dtype) / T  # (K,)
    P = probs.mean(0)  # (K,)
    return K * (f * P).sum()


class SwitchRouter(nn.Module):
    """Top-1 over all E experts: ``p = softmax(x W)``, expert = argmax p, gate = p[expert]."""

    def __init__(self, d: int, n_nodes: int, n_local: int):
        super().__init__()
        self.E = n_nodes * n_local
        self.w = nn.Linear(d, self.E, bias=False)

    def forward(self, x: torch.Tensor):
        probs = F.softmax(self.w(x), dim=-1)  # (T, E)
        gate, idx = probs.max(dim=-1)  # (T,), (T,)
        return idx, gate, load_balance_loss(probs, idx)


class SmileRouter(nn.Module):
    """Bi-level top-1: node n = argmax softmax(x W_node) (N,), then local g = argmax softmax(x W_local[n]) (G,);
    expert = n * G + g, gate = p_node[n] * p_local[g]; loss = inter-node LB + mean over nodes of intra-node LB."""

    def __init__(self, d: int, n_nodes: int, n_local: int):
        super().__init__()
        self.N, self.G = n_nodes, n_local
        self.w_node = nn.Linear(d, n_nodes, bias=False)
        self.w_local = nn.Parameter(torch.randn(n_nodes, d, n_local) / math.sqrt(d))  # one router per node

    def forward(self, x: torch.Tensor):
        p_node = F.softmax(self.w_node(x), dim=-1)  # (T, N)
        g_node, node = p_node.max(dim=-1)  # (T,)
        logits = torch.einsum("td,ndg->tng", x, self.w_local)  # (T, N, G): every node's intra-node router
        p_local = F.softmax(logits[torch.arange(len(x)), node], dim=-1)  # (T, G): the chosen node's router
        g_local, local = p_local.max(dim=-1)  # (T,)
        aux_inter = load_balance_loss(p_node, node)
        aux_intra = torch.stack([load_balance_loss(p_local[node == n], local[node == n]) for n in range(self.N)]).mean()
        return node * self.G + local, g_node * g_local, aux_inter + aux_intra


class Experts(nn.Module):
    """E independent two-layer GELU feed-forward experts d -> h -> d, stored as stacked weights."""

    def __init__(self, E: int, d: int, h: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, d, h) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(E, h))
        self.w2 = nn.Parameter(torch.randn(E, h, d) / math.sqrt(h))
        self.b2 = nn.Parameter(torch.zeros(E, d))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on tokens x (T_e, d)."""
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]


def dispatch_combine(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Sort tokens by expert (the dispatch permutation an All2All realises), run each expert on its contiguous
    chunk, scale by the gate and scatter back (combine). x (T, d), idx (T,), gate (T,) -> (T, d)."""
    E = experts.w1.shape[0]
    order = torch.argsort(idx, stable=True)  # (T,)
    counts = torch.bincount(idx, minlength=E).tolist()
    chunks = torch.split(x[order], counts)
    y_sorted = torch.cat([experts.expert(e, c) for e, c in enumerate(chunks)])  # (T, d)
    out = torch.empty_like(y_sorted)
    out[order] = y_sorted * gate[order, None]
    return out


class MoELayer(nn.Module):
    """Router (``switch`` or ``smile``) + E = N * G experts; returns (y, aux_loss, expert index)."""

    def __init__(self, d: int, h: int, n_nodes: int, n_local: int, routing: str):
        super().__init__()
        cls = {"switch": SwitchRouter, "smile": SmileRouter}[routing]
        # The two routers draw different numbers of random values. So that every other parameter (experts, later
        # blocks, head) gets the same initial values for both routings under the same seed, each router is built
        # from its own generator state, seeded by ONE draw from the global stream (the same draw for both routings),
        # and the global stream is restored afterwards.
        router_seed = int(torch.randint(0, 2**62, (1,)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(router_seed)
            self.router = cls(d, n_nodes, n_local)
        self.experts = Experts(n_nodes * n_local, d, h)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        idx, gate, aux = self.router(x)
        return dispatch_combine(x, idx, gate, self.experts).reshape(shape), aux, idx


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then the MoE feed-forward ``make_moe()``, a module returning
    ``(y, aux, idx)``. The MoE is built last, so every model initialises its parameters in the same order (shared by
    smile_moe and alf_lb_moe)."""

    def __init__(self, d: int, heads: int, make_moe):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.moe = make_moe()

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d/H)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        y, aux, idx = self.moe(self.ln2(x))
        return x + y, aux, idx


class MoELM(nn.Module):
    """Tiny character-level MoE language model; every block's feed-forward is an MoE layer."""

    def __init__(self, vocab: int, d: int, heads: int, h: int, layers: int, ctx: int, n_nodes: int, n_local: int,
                 routing: str):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, lambda: MoELayer(d, h, n_nodes, n_local, routing))
                                    for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor):
        """ids (B, T) -> logits (B, T, V), summed aux loss, per-layer expert indices."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        aux, idxs = 0.0, []
        for blk in self.blocks:
            x, a, idx = blk(x)
            aux, idxs = aux + a, idxs + [idx]
        return self.head(self.ln(x)), aux, idxs


def char_corpus(text: str, val_fraction: float):
    """Character vocabulary and (train, val) id tensors of a text (the last val_fraction held out)."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n_val = int(len(ids) * val_fraction)
    return chars, ids[:-n_val], ids[-n_val:]


def batch(ids: torch.Tensor, B: int, T: int, gen: torch.Generator):
    """B random windows of T + 1 characters -> (inputs (B, T), targets (B, T))."""
    start = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
    w = torch.stack([ids[s:s + T + 1] for s in start.tolist()])
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model: MoELM, ids: torch.Tensor, T: int, n_windows: int) -> float:
    """Mean cross-entropy (nats/char) over n_windows fixed, evenly spaced windows of the validation text."""
    model.eval()
    starts = torch.linspace(0, len(ids) - T - 2, n_windows).long().tolist()
    w = torch.stack([ids[s:s + T + 1] for s in starts])
    logits, _, _ = model(w[:, :-1])
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()


def train_lm(routing: str, train_ids, val_ids, vocab: int, cfg: dict, seed: int) -> dict:
    """Train one MoE LM with the given routing; the same seed gives the same init of every non-router parameter
    (routers are drawn from their own generator, see ``MoELayer``) and the same batches for both routings. Returns the
    validation-loss curve, the final loss and expert loads."""
    torch.manual_seed(seed)
    model = MoELM(vocab, cfg["d_model"], cfg["heads"], cfg["d_ff"], cfg["layers"], cfg["ctx"], cfg["n_nodes"],
                  cfg["n_local"], routing)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, cfg["steps"] + 1):
        x, y = batch(train_ids, cfg["batch_size"], cfg["ctx"], gen)
        logits, aux, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)) + cfg["aux_coef"] * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curve.append((step, evaluate(model, val_ids, cfg["ctx"], cfg["val_windows"])))
    x, _ = batch(val_ids, cfg["batch_size"], cfg["ctx"], torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, _, idxs = model(x)
    E = cfg["n_nodes"] * cfg["n_local"]
    load = torch.stack([torch.bincount(i, minlength=E) for i in idxs]).float()  # (layers, E)
    load = load / load.sum(1, keepdim=True)
    return {"curve": curve, "val_loss": curve[-1][1], "expert_load": load, "model": model}
