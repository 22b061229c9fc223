"""ReaRev: adaptive instruction reasoning over a KG, and the NSM-style sequential baseline.

Paper: Mavromatis & Karypis, "ReaRev: Adaptive Reasoning for Question Answering over Knowledge Graphs",
https://arxiv.org/abs/2210.13650 ; baseline NSM: He et al., "Improving Multi-hop KBQA ... (Neural State Machine)".

Shared parts: an LSTM question encoder; K instructions decoded by attention over the question tokens, each conditioned
on the previous one (NSM); entity states initialised from their incident relations (no entity ids: the models are
inductive); a GNN layer that sends, for every edge (e' -r-> e) and instruction i_k,
    m_k = p(e') * ReLU(W_r r (.) i_k)
and updates h_e = ReLU(W [h_e ; sum m_1 ; ... ; sum m_K']), then p = softmax over the question's subgraph of w . h_e.
* NSM (sequential): K layers, layer k uses instruction i_k alone, one pass.
* ReaRev (adaptive): every layer uses ALL K instructions in parallel (BFS over an instruction set); after each of T
  rounds the instructions are re-encoded from the graph state and the GNN is re-run from the topic entity with the
  adapted instructions. ``reform="gated"`` (default) is the official ``QueryReform`` (cmavro/ReaRev_KGQA,
  modules/query_update.py: ``Fusion``, one module per instruction): with y = h_topic, the topic entity's current state,
      i_k <- g (.) r + (1 - g) (.) i_k,   r = W_r^k [i_k ; y ; i_k - y],   g = sigmoid(W_g^k [i_k ; y ; i_k - y])
  (both linear maps without bias, r without tanh, as in the official code), and entity states are kept across rounds.
  ``reform="ungated"`` is this repository's earlier variant (an ablation): q_G = sum_e p_e h_e,
  i_k <- ReLU(W_a [i_k ; q_G ; i_k (.) q_G]), entity states reset to h0 every round.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def segment_softmax(logits: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Softmax of logits within each segment (question)."""
    mx = torch.full((n_seg,), -1e9).scatter_reduce(0, seg, logits, "amax", include_self=True)
    ex = torch.exp(logits - mx[seg])
    den = torch.zeros(n_seg).index_add(0, seg, ex)
    return ex / den[seg]


def propagate(p: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, w_edge: torch.Tensor, n: int) -> torch.Tensor:
    """agg[e] = sum over edges (s -> e) of p[s] * w_edge[edge]   (p (n,), w_edge (E, K, d)) -> (n, K, d)."""
    msg = p[src].reshape(-1, 1, 1) * w_edge  # (E, K, d)
    return torch.zeros(n, *w_edge.shape[1:]).index_add(0, dst, msg)


class Fusion(nn.Module):
    """Official ReaRev ``Fusion``: g * r + (1 - g) * x with r, g linear (no bias) in [x; y; x - y]."""

    def __init__(self, d: int):
        super().__init__()
        self.r = nn.Linear(3 * d, d, bias=False)
        self.g = nn.Linear(3 * d, d, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, y, x - y], -1)
        g = torch.sigmoid(self.g(z))
        return g * self.r(z) + (1 - g) * x


class KGQAReasoner(nn.Module):
    def __init__(self, vocab_size: int, n_rel: int, d: int, K: int, adaptive: bool, rounds: int, layers: int,
                 reform: str = "gated"):
        super().__init__()
        if reform not in ("gated", "ungated"):
            raise ValueError(f"reform {reform!r}; allowed: gated, ungated")
        self.K, self.adaptive, self.rounds, self.layers, self.reform = K, adaptive, rounds, layers, reform
        self.word = nn.Embedding(vocab_size + 1, d, padding_idx=0)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.rel = nn.Embedding(2 * n_rel, d)
        self.W_init = nn.Linear(d, d)
        self.W_ins = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(K)])
        self.W_r = nn.Linear(d, d)
        width = K if adaptive else 1
        self.W_h = nn.Linear(d * (1 + width), d)
        self.w_p = nn.Linear(d, 1)
        if reform == "gated":
            self.fusions = nn.ModuleList([Fusion(d) for _ in range(K)])  # one QueryReform per instruction
        else:
            self.W_a = nn.Linear(3 * d, d)

    def instructions(self, tokens: torch.Tensor) -> torch.Tensor:
        H, (q, _) = self.lstm(self.word(tokens))  # H (B, T, d), q (1, B, d)
        q = q[0]
        mask = tokens > 0
        ins, prev = [], torch.zeros_like(q)
        for k in range(self.K):
            key = self.W_ins[k](torch.cat([prev, q], -1))  # (B, d)
            att = (H * key.unsqueeze(1)).sum(-1).masked_fill(~mask, -1e9).softmax(-1)  # (B, T)
            prev = (att.unsqueeze(-1) * H).sum(1)  # (B, d)
            ins.append(prev)
        return torch.stack(ins, 1)  # (B, K, d)

    def init_states(self, g: dict) -> torch.Tensor:
        n = g["n_nodes"]
        deg = torch.zeros(n).index_add(0, g["dst"], torch.ones(len(g["dst"]))).clamp(min=1)
        h = torch.zeros(n, self.rel.embedding_dim).index_add(0, g["dst"], self.rel(g["rel"]))
        return torch.relu(self.W_init(h / deg.unsqueeze(-1)))  # (n, d)

    def gnn(self, g: dict, I: torch.Tensor, h0: torch.Tensor):
        """Run the layers from the topic entity. I (B, K, d) instructions. Returns p (n,), h (n, d)."""
        n, src, dst = g["n_nodes"], g["src"], g["dst"]
        r = self.W_r(self.rel(g["rel"]))  # (E, d)
        e_q = g["qid"][src]  # question of each edge
        p, h = g["seed"], h0
        for layer in range(self.layers):
            ins = I if self.adaptive else I[:, layer % self.K: layer % self.K + 1]  # (B, K', d)
            w_edge = torch.relu(r.unsqueeze(1) * ins[e_q])  # (E, K', d)
            agg = propagate(p, src, dst, w_edge, n)  # (n, K', d)
            h = torch.relu(self.W_h(torch.cat([h, agg.reshape(n, -1)], -1)))  # (n, d)
            p = segment_softmax(self.w_p(h).squeeze(-1), g["qid"], g["batch"])
        return p, h

    def forward(self, g: dict) -> torch.Tensor:
        I = self.instructions(g["tokens"])  # (B, K, d)
        h0 = self.init_states(g)
        p, h = self.gnn(g, I, h0)
        for _ in range(self.rounds - 1 if self.adaptive else 0):
            if self.reform == "gated":
                y = torch.zeros(g["batch"], h.shape[1]).index_add(0, g["qid"], g["seed"].unsqueeze(-1) * h)  # h_topic
                I = torch.stack([f(I[:, k], y) for k, f in enumerate(self.fusions)], 1)  # (B, K, d)
                p, h = self.gnn(g, I, h)  # re-run from the topic entity, entity states kept
            else:
                qG = torch.zeros(g["batch"], h.shape[1]).index_add(0, g["qid"], p.unsqueeze(-1) * h)  # (B, d)
                qG = qG.unsqueeze(1).expand_as(I)
                I = torch.relu(self.W_a(torch.cat([I, qG, I * qG], -1)))  # adapted instructions (B, K, d)
                p, h = self.gnn(g, I, h0)  # re-run from the topic entity
        return p


def loss_fn(p: torch.Tensor, g: dict) -> torch.Tensor:
    """Cross-entropy to the uniform distribution over the answers present in each subgraph."""
    y = g["answer"].float()
    cnt = torch.zeros(g["batch"]).index_add(0, g["qid"], y)
    w = y / cnt.clamp(min=1)[g["qid"]]
    per_q = torch.zeros(g["batch"]).index_add(0, g["qid"], -w * torch.log(p + 1e-10))
    has = cnt > 0
    return per_q[has].mean() if has.any() else per_q.sum() * 0


def hits_at_1(p: torch.Tensor, g: dict) -> torch.Tensor:
    """1 per question if its top entity is an answer (answers from the complete KG)."""
    best = torch.full((g["batch"],), -1.0).scatter_reduce(0, g["qid"], p, "amax", include_self=True)
    is_best = p >= best[g["qid"]] - 1e-12
    first = torch.full((g["batch"],), g["n_nodes"], dtype=torch.long).scatter_reduce(
        0, g["qid"], torch.where(is_best, torch.arange(g["n_nodes"]), g["n_nodes"]), "amin", include_self=True)
    return g["answer"][first].float()
