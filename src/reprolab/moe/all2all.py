"""Expert-parallel All2All for Switch (one flat exchange) and SMILE (inter-node, then intra-node), run for real with
torch.distributed (gloo, local processes standing in for N nodes x G ranks), plus an alpha-beta cost model.

He et al., "SMILE: Scaling Mixture-of-Experts with Efficient Bi-level Routing", arXiv:2212.05191.

Rank ``r = n * G + g`` holds expert ``r`` (one expert per rank, E = N * G). Switch: every rank sends the tokens routed
to expert e straight to rank e (one All2All over all P = N * G ranks: G * (N - 1) of each rank's peers are on other
nodes). SMILE: the inter-node router picks a node and the tokens go, in one All2All among the N ranks with the same
local index g, to rank (n, g); there the node's intra-node router picks a local expert and one All2All among the G
ranks of the node delivers them. Combine runs both exchanges backwards. Bytes are counted per level, payload rows
only (the token ids sent alongside, a test aid, and the split sizes are NOT counted), and so are the payload messages
(a non-empty point-to-point send to another rank, dispatch and combine), measured from the split sizes each rank
actually used.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .smile import MoELayer


# ---------------------------------------------------------------- alpha-beta cost model
def a2a_time_flat(N: int, G: int, m: float, alpha_inter: float, beta_inter: float, alpha_intra: float,
                  beta_intra: float) -> dict:
    """Modelled time (s) of one flat All2All over P = N * G ranks, each sending m bytes spread evenly (m / P per
    peer, itself included). Inter-node: each rank issues G (N - 1) messages (latency alpha_inter each) and the node's
    link (beta_inter s/byte, shared by its G ranks) carries G * m (N - 1) / N bytes. Intra-node: G - 1 messages of
    m / P bytes (alpha_intra + m / P * beta_intra each)."""
    P = N * G
    inter = G * (N - 1) * alpha_inter + G * m * (N - 1) / N * beta_inter
    intra = (G - 1) * (alpha_intra + m / P * beta_intra)
    return {"inter": inter, "intra": intra, "total": inter + intra}


def a2a_time_bilevel(N: int, G: int, m: float, alpha_inter: float, beta_inter: float, alpha_intra: float,
                     beta_intra: float) -> dict:
    """Modelled time (s) of SMILE's two All2Alls: N - 1 inter-node messages of m / N bytes per rank (same node-link
    bytes G * m (N - 1) / N as the flat scheme, G times fewer messages), then G - 1 intra-node messages of m / G."""
    inter = (N - 1) * alpha_inter + G * m * (N - 1) / N * beta_inter
    intra = (G - 1) * (alpha_intra + m / G * beta_intra)
    return {"inter": inter, "intra": intra, "total": inter + intra}


# ---------------------------------------------------------------- real exchanges (inside a process group)
def _exchange(x: torch.Tensor, ids: torch.Tensor, send_counts: list[int], group, me: int):
    """One All2All of rows x (T, d) and their ids (T,), already sorted by destination group-rank; returns the
    received rows, ids, receive counts and the payload bytes sent to peers other than itself."""
    k = len(send_counts)
    sc = torch.tensor(send_counts, dtype=torch.long)
    rc = torch.empty(k, dtype=torch.long)
    dist.all_to_all_single(rc, sc, group=group)
    recv_counts = rc.tolist()
    d = x.shape[1]
    out = x.new_empty(sum(recv_counts), d)
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    out_ids = ids.new_empty(sum(recv_counts))
    dist.all_to_all_single(out_ids, ids.contiguous(), recv_counts, send_counts, group=group)
    payload = sum(c for j, c in enumerate(send_counts) if j != me) * d * x.element_size()
    return out, out_ids, recv_counts, payload


def _reverse(y: torch.Tensor, recv_counts: list[int], send_counts: list[int], group) -> torch.Tensor:
    """The combine exchange: send y (rows in received order) back to where they came from."""
    out = y.new_empty(sum(send_counts), y.shape[1])
    dist.all_to_all_single(out, y.contiguous(), send_counts, recv_counts, group=group)
    return out


def _sorted_by(dest: torch.Tensor, k: int):
    order = torch.argsort(dest, stable=True)
    return order, torch.bincount(dest, minlength=k).tolist()


def rank_forward(layer: MoELayer, routing: str, x: torch.Tensor, ids: torch.Tensor, N: int, G: int, groups: dict):
    """Expert-parallel forward of this rank's tokens x (T, d) with global ids (T,). Returns the output (T, d),
    the (ids, rows) its expert received, payload bytes, payload messages and seconds per level (this rank's sends,
    dispatch + combine)."""
    rank = dist.get_rank()
    n, g = divmod(rank, G)
    bytes_, secs = {"inter": 0, "intra": 0}, {"inter": 0.0, "intra": 0.0}
    msgs = {"inter": 0, "intra": 0}
    E = N * G
    if routing == "switch":
        probs = F.softmax(layer.router.w(x), dim=-1)  # (T, E)
        gate, e = probs.max(-1)
        order, counts = _sorted_by(e, E)
        t0 = time.perf_counter()
        xr, idr, rc, _ = _exchange(x[order], ids[order], counts, None, rank)
        secs["inter"] += time.perf_counter() - t0  # one exchange: its time cannot be split, all booked "inter"
        for j, (c, c_back) in enumerate(zip(counts, rc)):  # per level: peers on other nodes vs same node
            if j != rank:
                lvl = "inter" if j // G != n else "intra"
                bytes_[lvl] += (c + c_back) * x.shape[1] * x.element_size()  # dispatch c rows, combine c_back rows
                msgs[lvl] += (c > 0) + (c_back > 0)
        y = layer.experts.expert(rank, xr)
        t0 = time.perf_counter()
        back = _reverse(y, rc, counts, None)
        secs["inter"] += time.perf_counter() - t0
        out = torch.empty_like(back)
        out[order] = back
        return out * gate[:, None], (idr, xr), bytes_, msgs, secs
    # SMILE: inter-node routing here, exchange among the ranks (., g), then intra-node routing on arrival
    p_node = F.softmax(layer.router.w_node(x), dim=-1)  # (T, N)
    g_node, node = p_node.max(-1)
    order1, c1 = _sorted_by(node, N)
    t0 = time.perf_counter()
    x1, id1, rc1, _ = _exchange(x[order1], ids[order1], c1, groups["cross"][g], n)
    secs["inter"] += time.perf_counter() - t0
    p_local = F.softmax(x1 @ layer.router.w_local[n], dim=-1)  # (T1, G): this node's intra-node router
    g_local, local = p_local.max(-1)
    order2, c2 = _sorted_by(local, G)
    t0 = time.perf_counter()
    x2, id2, rc2, _ = _exchange(x1[order2], id1[order2], c2, groups["node"][n], g)
    secs["intra"] += time.perf_counter() - t0
    y = layer.experts.expert(rank, x2)
    t0 = time.perf_counter()
    back2 = _reverse(y, rc2, c2, groups["node"][n])
    secs["intra"] += time.perf_counter() - t0
    y1 = torch.empty_like(back2)
    y1[order2] = back2
    y1 = y1 * g_local[:, None]
    t0 = time.perf_counter()
    back1 = _reverse(y1, rc1, c1, groups["cross"][g])
    secs["inter"] += time.perf_counter() - t0
    out = torch.empty_like(back1)
    out[order1] = back1
    row = x.shape[1] * x.element_size()
    for lvl, sent, back, me in (("inter", c1, rc1, n), ("intra", c2, rc2, g)):
        bytes_[lvl] = sum(a + b for j, (a, b) in enumerate(zip(sent, back)) if j != me) * row
        msgs[lvl] = sum((a > 0) + (b > 0) for j, (a, b) in enumerate(zip(sent, back)) if j != me)
    return out * g_node[:, None], (id2, x2), bytes_, msgs, secs


def _worker(rank: int, world: int, N: int, G: int, port: int, job_file: str, out_dir: str):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    job = torch.load(job_file)  # from a file, not pickled through spawn's pipes (shared-memory handles could hang)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = {"node": [dist.new_group(list(range(n * G, (n + 1) * G))) for n in range(N)],
              "cross": [dist.new_group(list(range(g, N * G, G))) for g in range(G)]}
    T = job["x"].shape[0] // world
    sl = slice(rank * T, (rank + 1) * T)
    results = {}
    for routing, state in job["layers"].items():
        layer = MoELayer(job["d"], job["h"], N, G, routing)
        layer.load_state_dict(state)
        with torch.no_grad():
            for _ in range(job["repeats"]):  # the last repeat is kept (earlier ones warm the sockets up)
                dist.barrier()
                y, recv, b, m, s = rank_forward(layer, routing, job["x"][sl], torch.arange(world * T)[sl], N, G,
                                                groups)
        results[routing] = {"y": y, "recv_ids": recv[0], "recv_x": recv[1], "bytes": b, "msgs": m, "secs": s}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(layers: dict, x: torch.Tensor, N: int, G: int, d: int, h: int, port: int | None = None,
                    repeats: int = 2) -> list[dict]:
    """Spawn N * G gloo processes on 127.0.0.1; each takes a contiguous share of the tokens x (P * T, d) and runs
    the expert-parallel forward of every layer in ``layers`` ({routing: state_dict}). Returns per-rank results."""
    import torch.multiprocessing as mp

    world = N * G
    assert x.shape[0] % world == 0, "token count must be a multiple of the number of ranks"
    job = {"layers": {k: {n: t.detach().clone() for n, t in v.items()} for k, v in layers.items()},
           "x": x.detach().clone(), "d": d, "h": h, "repeats": repeats}
    port = _free_port() if port is None else port  # a free port: two runs at once must not meet on one store
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(job, Path(tmp) / "job.pt")
        mp.spawn(_worker, args=(world, N, G, port, str(Path(tmp) / "job.pt"), tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
