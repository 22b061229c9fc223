"""LIFL: A Lightweight, Event-driven Serverless Platform for Federated Learning (Qi, Ramakrishnan, Lee; MLSys 2024),
https://arxiv.org/abs/2405.10968; official code: cisco-open/flame (``lib/python/flame/backend/shm.py``, the
``eager_syncfl`` / ``syncfl`` middle and top aggregators, ``lib/python/flame/optimizer/fedavg.py``).

The part of LIFL that one machine can measure: its **intra-node data plane for hierarchical aggregation**. Client
updates that reach a node are written once into a shared-memory pool; leaf aggregators sum their clients' updates
in place (reading the pool, writing their partial sum into the pool) and pass a *reference* (slot, sample count) to
the top aggregator, which sums the partials in place. The baseline data plane passes every update *by value*: the
wire message (Flower's own serialisation, ``ndarrays_to_parameters``: one ``np.save`` byte string per tensor) is
pickled through a ``multiprocessing.Queue`` (a pipe) to the aggregator process, which deserialises it
(``parameters_to_ndarrays``), aggregates, and serialises its partial sum for the next level.

Three arms, each one round of aggregation of N client updates with real processes (fork), timed end to end from the
moment every update is at the node (in the ingress processes' memory, as wire bytes) until the global update is
ready at the top aggregator:

* ``lifl_shm``: ingress decodes each wire message once into its slot of a ``multiprocessing.shared_memory`` pool and
  sends ``(slot, count)`` to its leaf; leaves aggregate in place into their pool slot, the top aggregator into its.
* ``queue_hier``: the same hierarchy (same leaves, same summation order), every message by value through queues.
* ``queue_flat``: serverful: one aggregator receives all N updates by value through one queue.

The aggregation rule is flame's FedAvg (``optimizer/fedavg.py:79-110``, ``agg += update * (count / total)``) in the
eager form that aggregates each update as it arrives (flame's ``eager_syncfl``; LIFL's eager aggregation): ``agg +=
update * count`` on arrival, one division by the total at the end, at the leaf (its clients) and at the top (the
leaves' partial means weighted by their sample totals); this equals the flat weighted mean ``sum_i n_i u_i / sum_i
n_i`` in exact arithmetic. Inputs are folded in a fixed order (a reorder buffer holds early arrivals), so both
hierarchical arms run the same float32 operations in the same order and their aggregates are bit-identical.

What crosses a process boundary is counted in the round itself: every aggregator adds up the length of each pickled
message it reads from its pipe (reported after the clock stops), so a payload sent by value would show up.

Out of reach here (said in the notebook and the registry): the eBPF sidecar / sockmap that carries references
between functions (``shm.py:109-125, 302-311``), Knative autoscaling, multi-node locality-aware placement and
aggregator reuse across a cluster.
"""
from __future__ import annotations

import io
import math
import multiprocessing as mp
import time
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler

import numpy as np

from reprolab.distributed.flower import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

ARMS = ("lifl_shm", "queue_hier", "queue_flat")
ARM_NAMES = {"lifl_shm": "LIFL: shared memory, in place, by reference (hierarchical)",
             "queue_hier": "serialised through queues (same hierarchy)",
             "queue_flat": "serialised through one queue (serverful, flat)"}


# ---------------------------------------------------------------------------------------------------------------------
# the update: ResNet-18-shaped
# ---------------------------------------------------------------------------------------------------------------------
def resnet18_shapes(width: float = 1.0, num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every floating-point state_dict entry of torchvision's resnet18, in state_dict order, with
    every channel count scaled by ``width`` (width 1.0: torchvision's exact shapes; ``num_batches_tracked``, an int64
    counter, is left out)."""
    c = [max(1, int(round(ch * width))) for ch in (64, 128, 256, 512)]
    out: list[tuple[str, tuple[int, ...]]] = []

    def bn(name, ch):
        out.extend((f"{name}.{k}", (ch,)) for k in ("weight", "bias", "running_mean", "running_var"))

    out.append(("conv1.weight", (c[0], 3, 7, 7)))
    bn("bn1", c[0])
    cin = c[0]
    for li, ch in enumerate(c, start=1):
        for bi in range(2):
            stride2 = li > 1 and bi == 0
            p = f"layer{li}.{bi}"
            out.append((f"{p}.conv1.weight", (ch, cin, 3, 3)))
            bn(f"{p}.bn1", ch)
            out.append((f"{p}.conv2.weight", (ch, ch, 3, 3)))
            bn(f"{p}.bn2", ch)
            if stride2 or cin != ch:
                out.append((f"{p}.downsample.0.weight", (ch, cin, 1, 1)))
                bn(f"{p}.downsample.1", ch)
            cin = ch
    out.append(("fc.weight", (num_classes, c[3])))
    out.append(("fc.bias", (num_classes,)))
    return out


def make_updates(shapes, n_clients: int, seed: int, scale: float = 1e-2, count_range=(50, 500)):
    """Generated client updates (model deltas, float32, N(0, scale^2)) and sample counts, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(count_range[0], count_range[1] + 1, size=n_clients).tolist()
    updates = [[rng.standard_normal(s, dtype=np.float32) * np.float32(scale) for _, s in shapes]
               for _ in range(n_clients)]
    return updates, [int(x) for x in counts]


def make_wire(shapes, n_clients: int, seed: int, scale: float = 1e-2, count_range=(50, 500)):
    """``make_updates`` serialised client by client (``to_wire``), the float32 arrays dropped as soon as each is
    serialised: the same values (the same draws in the same order) in half the memory (the full profile's N=128)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(count_range[0], count_range[1] + 1, size=n_clients).tolist()
    wire = [to_wire([rng.standard_normal(s, dtype=np.float32) * np.float32(scale) for _, s in shapes])
            for _ in range(n_clients)]
    return wire, [int(x) for x in counts]


def update_bytes(shapes) -> int:
    return int(sum(4 * math.prod(s) for _, s in shapes))


# ---------------------------------------------------------------------------------------------------------------------
# aggregation (flame's FedAvg, in place) and the hierarchy
# ---------------------------------------------------------------------------------------------------------------------
def leaves_of(n_clients: int, fanin: int) -> list[list[int]]:
    """Clients 0..N-1 split into consecutive groups of at most ``fanin`` (one leaf aggregator each)."""
    return [list(range(i, min(i + fanin, n_clients))) for i in range(0, n_clients, fanin)]


def accumulate(out: np.ndarray, x: np.ndarray, rate: float, tmp: np.ndarray) -> None:
    """out += x * rate in place (float32), through the scratch buffer ``tmp`` (flame fedavg.py:104, 110: there rate
    = count / total; here rate = count and one division by the total at the end, so that an aggregator can fold
    each update in as it arrives, before it knows the total)."""
    np.multiply(x, np.float32(rate), out=tmp)
    np.add(out, tmp, out=out)


def weighted_mean_into(out_arrays, inputs, counts) -> None:
    """The aggregators' rule, eager form: out = (sum_i inputs[i] * n_i) / sum_i n_i in float32, the products added in
    the given order (each input folded in as it is taken), then one division by the total (see ``_aggregator``)."""
    for o in out_arrays:
        o[...] = 0
    tmp = [np.empty_like(o) for o in out_arrays]
    for x, n in zip(inputs, counts):
        for o, xi, t in zip(out_arrays, x, tmp):
            accumulate(o, xi, n, t)
    total = np.float32(sum(counts))
    for o in out_arrays:
        np.divide(o, total, out=o)


def hierarchical_mean(updates, counts, fanin: int):
    """Reference in one process: leaves then top, the same float32 operations in the same order as the two
    hierarchical arms (leaf: its clients in id order; top: the leaves' partial means weighted by their totals)."""
    parts, part_counts = [], []
    for leaf in leaves_of(len(updates), fanin):
        out = [np.empty_like(a) for a in updates[0]]
        weighted_mean_into(out, [updates[i] for i in leaf], [counts[i] for i in leaf])
        parts.append(out)
        part_counts.append(sum(counts[i] for i in leaf))
    glob = [np.empty_like(a) for a in updates[0]]
    weighted_mean_into(glob, parts, part_counts)
    return glob


def flat_order(n_clients: int, fanin: int) -> list[int]:
    """The serverful aggregator's fixed summation order: round robin over the ingress streams (stream j carries the
    clients of group j in id order), which is about the order in which the updates arrive, so the reorder buffer
    stays short."""
    groups = leaves_of(n_clients, fanin)
    return [g[k] for k in range(max(len(g) for g in groups)) for g in groups if k < len(g)]


def flat_mean(updates, counts, fanin: int):
    """Reference in one process for queue_flat: one aggregator, the clients in ``flat_order``, float32."""
    order = flat_order(len(updates), fanin)
    out = [np.empty_like(a) for a in updates[0]]
    weighted_mean_into(out, [updates[i] for i in order], [counts[i] for i in order])
    return out


def flat_mean_float64(updates, counts):
    """The direct weighted mean sum_i n_i u_i / sum_i n_i in float64 (the independent reference)."""
    tot = float(sum(counts))
    return [sum(np.asarray(u[k], dtype=np.float64) * n for u, n in zip(updates, counts)) / tot
            for k in range(len(updates[0]))]


def prefix_means_float64(wire, counts, ns) -> dict:
    """``{N: flat_mean_float64 of the first N clients}`` for every N in ``ns``, computed in one pass over the wire
    messages (views of the np.save bytes, no float32 copy of the updates kept): the same float64 operations in the
    same order as ``flat_mean_float64``, so the same bits, in 2 x update size of extra memory per N."""
    want = sorted(set(int(n) for n in ns))
    acc, tot, out = None, 0, {}
    for i, (msg, n) in enumerate(zip(wire, counts)):
        xs = [np.asarray(npy_view(b), dtype=np.float64) * n for b in msg]
        acc = xs if acc is None else [a + x for a, x in zip(acc, xs)]
        tot += n
        if i + 1 in want:
            out[i + 1] = [a / float(tot) for a in acc]
        if i + 1 >= want[-1]:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------------
# serialisation (Flower's wire format) and zero-copy decoding into a shared-memory pool
# ---------------------------------------------------------------------------------------------------------------------
def to_wire(update) -> list[bytes]:
    """What Flower sends for an update: ``ndarrays_to_parameters(update).tensors`` (np.save bytes per tensor)."""
    return ndarrays_to_parameters(update).tensors


def from_wire(tensors: list[bytes]) -> list[np.ndarray]:
    """Flower's deserialisation: ``parameters_to_ndarrays`` (np.load, a new array per tensor)."""
    return parameters_to_ndarrays(Parameters(tensors=tensors, tensor_type="numpy.ndarray"))


def npy_view(b: bytes) -> np.ndarray:
    """A read-only view of the array inside one ``np.save`` byte string (no copy): parse the .npy header only."""
    f = io.BytesIO(b)
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    arr = np.frombuffer(b, dtype=dtype, count=math.prod(shape), offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


class Pool:
    """A shared-memory pool of equal slots, one flat float32 update per slot (LIFL's shared memory pool)."""

    def __init__(self, n_slots: int, numel: int):
        self.n_slots, self.numel = int(n_slots), int(numel)
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, 4 * self.n_slots * self.numel))
        self.array = np.ndarray((self.n_slots, self.numel), dtype=np.float32, buffer=self.shm.buf)
        self.array.fill(0)  # touch every page now: LIFL's pool is allocated once and reused, not faulted in per round

    def slot(self, i: int) -> np.ndarray:
        return self.array[i]  # a view into the shared memory, no copy

    def close(self) -> None:
        del self.array
        self.shm.close()
        self.shm.unlink()


def write_wire_into(slot: np.ndarray, tensors: list[bytes]) -> None:
    """Decode one wire message into a pool slot: one copy per tensor, from the message bytes into shared memory."""
    off = 0
    for b in tensors:
        v = npy_view(b)
        slot[off:off + v.size] = v.reshape(-1)
        off += v.size


def split_flat(flat: np.ndarray, shapes) -> list[np.ndarray]:
    """Views of a flat slot as the update's tensors (no copy)."""
    out, off = [], 0
    for _, s in shapes:
        n = math.prod(s)
        out.append(flat[off:off + n].reshape(s))
        off += n
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the processes of one aggregation round
# ---------------------------------------------------------------------------------------------------------------------
def _get_counted(q) -> tuple[object, int]:
    """``q.get()`` (multiprocessing.Queue, blocking: the same steps as ``Queue.get``) that also returns the length of
    the pickled message it read from the pipe: the bytes that really crossed the process boundary."""
    with q._rlock:
        res = q._recv_bytes()
    q._sem.release()
    return ForkingPickler.loads(res), len(res)


def _report(name, go, done, report, t_cpu0, received=(0, 0, 0)):
    """After the clock stopped: CPU seconds of this process, then (bytes received through pipes, messages, the
    longest reorder buffer) counted during the round."""
    done.wait()  # only now: a queue's feeder thread may still be writing after put() returned
    cpu = time.process_time() - t_cpu0
    report.put(("cpu", name, cpu, *received))


def _lifl_message(cid: int, count: int, slot: int, tensors) -> tuple:
    """What LIFL's ingress sends to the leaf: a reference (slot index and sample count), not the payload."""
    return ("ref", cid, count, slot)


def _ingress(arm, name, msgs, slots, dest, ready, go, done, report):
    """One ingress: the node's receive side for its clients' messages (wire bytes, already in memory)."""
    ready.wait()
    go.wait()
    t0 = time.process_time()
    for (cid, count, tensors), s in zip(msgs, slots):
        if arm == "lifl_shm":
            write_wire_into(s[1], tensors)  # the one copy: wire bytes -> shared memory
            dest.put(_lifl_message(cid, count, s[0], tensors))  # by reference: slot index and sample count
        else:
            dest.put(("val", cid, count, tensors))  # by value: pickled through the queue's pipe
    _report(name, go, done, report, t0)


def _aggregator(arm, name, order, shapes, pool, out_slot, src, dest, ready, go, done, report, top):
    """A leaf (sends its partial mean on) or the top aggregator (holds the global update).

    Eager: every input is folded in as soon as it arrives, in the fixed order ``order`` (input ids): an input that
    arrives before its predecessors waits in a reorder buffer, so the float32 sum is the same bits whatever the
    arrival order. Inputs: pool slots (lifl_shm, views, no copy) or wire messages decoded with Flower's
    ``parameters_to_ndarrays`` when folded (queue arms)."""
    ready.wait()
    go.wait()
    t0 = time.process_time()
    if arm == "lifl_shm":
        out = [pool.slot(out_slot)]  # in place, into the pool
    else:
        out = [np.empty(s, dtype=np.float32) for _, s in shapes]
    for o in out:
        o[...] = 0
    tmp = [np.empty_like(o) for o in out]
    pending, nxt, total, nbytes, longest = {}, 0, 0, 0, 0
    for _ in range(len(order)):
        m, nb = _get_counted(src)
        nbytes += nb  # an int addition; the message was pickled by the sender anyway
        pending[m[1]] = m
        longest = max(longest, len(pending))
        while nxt < len(order) and order[nxt] in pending:
            m = pending.pop(order[nxt])
            nxt += 1
            x = [pool.slot(m[3])] if arm == "lifl_shm" else from_wire(m[3])  # view / Flower deserialisation (copy)
            for o, xi, t in zip(out, x, tmp):
                accumulate(o, xi, m[2], t)
            total += m[2]
            del x, m
    ftotal = np.float32(total)
    for o in out:
        np.divide(o, ftotal, out=o)
    if top:
        report.put(("t_end", time.perf_counter()))  # the global update is ready (no serialisation: it goes nowhere)
    elif arm == "lifl_shm":
        dest.put(("ref", name[1], total, out_slot))  # by reference
    else:
        dest.put(("val", name[1], total, to_wire(out)))  # serialised for the next hop (Flower's wire format)
    _report(name, go, done, report, t0, (nbytes, len(order), longest))
    if top:
        report.put(("result", None if arm == "lifl_shm" else out))


def run_round(arm: str, wire: list[list[bytes]], counts: list[int], shapes, fanin: int, timeout: float = 600.0) -> dict:
    """One aggregation round of ``len(wire)`` client messages through ``arm``.

    Returns latency (s, go -> global update ready), ``cpu`` (summed CPU seconds of every process of the round),
    the global update (list of arrays), the number of processes, and what the aggregators received through pipes,
    counted in the round itself (the length of every pickled message each one read) and reported after the clock
    stopped: ``pipe_bytes`` {"from_ingress", "from_leaves", "total"}, ``pipe_messages``, and ``longest_reorder``
    (the most inputs any aggregator held before it could fold them; arrival order, so not deterministic)."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}; one of {ARMS}")
    ctx = mp.get_context("fork")
    n = len(wire)
    groups = leaves_of(n, fanin)
    numel = sum(math.prod(s) for _, s in shapes)
    pool = Pool(n + len(groups) + 1, numel) if arm == "lifl_shm" else None
    go, done = ctx.Event(), ctx.Event()
    report = ctx.Queue()
    top_q = ctx.Queue()
    procs = []
    n_procs = 2 * len(groups) + 1 if arm != "queue_flat" else len(groups) + 1
    ready = ctx.Barrier(n_procs + 1)
    if arm == "queue_flat":
        leaf_qs = [top_q] * len(groups)
    else:
        leaf_qs = [ctx.Queue() for _ in groups]
    for li, (g, q) in enumerate(zip(groups, leaf_qs)):
        msgs = [(i, counts[i], wire[i]) for i in g]
        slots = [(i, pool.slot(i)) if pool else (i, None) for i in g]
        procs.append(ctx.Process(target=_ingress, args=(arm, ("ingress", li), msgs, slots, q, ready, go, done, report)))
        if arm != "queue_flat":
            procs.append(ctx.Process(target=_aggregator, args=(arm, ("leaf", li), list(g), shapes, pool, n + li, q,
                                                               top_q, ready, go, done, report, False)))
    top_order = flat_order(n, fanin) if arm == "queue_flat" else list(range(len(groups)))
    procs.append(ctx.Process(target=_aggregator, args=(arm, ("top", 0), top_order, shapes, pool, n + len(groups),
                                                       top_q, None, ready, go, done, report, True)))
    try:
        for p in procs:
            p.start()
        ready.wait(timeout)  # every process started and waiting (warm aggregators: LIFL reuses them; the baseline too)
        time.sleep(0.01)
        t0 = time.perf_counter()
        go.set()
        got = report.get(timeout=timeout)
        if got[0] != "t_end":
            raise RuntimeError(f"unexpected report {got!r}")
        latency = got[1] - t0
        done.set()
        cpu, final = 0.0, None
        nbytes = {"from_ingress": 0, "from_leaves": 0}
        n_msgs, longest = 0, 0
        for _ in range(len(procs) + 1):  # one report per process, and the top's result
            r = report.get(timeout=timeout)
            if r[0] == "result":
                final = r[1]
                continue
            _, (kind, _li), c, nb, nm, lg = r
            cpu += c
            from_leaves = kind == "top" and arm != "queue_flat"
            nbytes["from_leaves" if from_leaves else "from_ingress"] += nb
            n_msgs += nm
            longest = max(longest, lg)
        for p in procs:
            p.join(timeout)
            if p.exitcode != 0:
                raise RuntimeError(f"{arm}: a process exited with {p.exitcode}")
        if arm == "lifl_shm":
            result = [a.copy() for a in split_flat(pool.slot(n + len(groups)), shapes)]
        else:
            result = final
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if pool is not None:
            pool.close()
    nbytes["total"] = nbytes["from_ingress"] + nbytes["from_leaves"]
    return {"latency": float(latency), "cpu": float(cpu), "aggregate": result, "processes": len(procs),
            "pipe_bytes": nbytes, "pipe_messages": n_msgs, "longest_reorder": longest}


# ---------------------------------------------------------------------------------------------------------------------
# accounting from the measured pipe bytes
# ---------------------------------------------------------------------------------------------------------------------
def payload_bytes(arm: str, n_clients: int, fanin: int, b: int) -> int:
    """The payload a by-value arm must move through pipes at least: every update once (and, in the hierarchy, every
    leaf's partial once): (N + L) B for queue_hier, N B for queue_flat, 0 for LIFL."""
    if arm == "lifl_shm":
        return 0
    return b * (n_clients + (len(leaves_of(n_clients, fanin)) if arm == "queue_hier" else 0))


def pickled_len(msg) -> int:
    """Length of ``msg`` pickled as ``multiprocessing.Queue`` pickles it (for the tests' independent count)."""
    return len(ForkingPickler.dumps(msg))
