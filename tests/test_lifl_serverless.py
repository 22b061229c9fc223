"""LIFL's data plane against independent references: the direct weighted mean (numpy float64), Flower's own FedAvg
aggregate, Flower's own (de)serialisation, torchvision's resnet18 shapes, np.shares_memory for zero copy, and the
pipe bytes of a round against the messages pickled here; a mutation that sends the payload by value in the LIFL arm
must be caught by the measured bytes."""
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

from reprolab.fed import lifl_serverless as L

SMALL = [("a", (3, 4)), ("b", (5,)), ("c", (2, 3, 2))]


def _rel(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b)) / \
        max(float(np.max(np.abs(y))) for y in b)


def _same_bits(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_resnet18_shapes_match_torchvision():
    tv = pytest.importorskip("torchvision")
    sd = tv.models.resnet18(weights=None).state_dict()
    want = [(k, tuple(v.shape)) for k, v in sd.items() if v.is_floating_point()]
    assert L.resnet18_shapes(1.0, 1000) == want
    assert L.update_bytes(want) == 4 * sum(v.numel() for v in sd.values() if v.is_floating_point())


def test_leaves_partition_clients_and_flat_order_is_a_permutation():
    for n, k in [(1, 4), (5, 2), (8, 4), (9, 4)]:
        groups = L.leaves_of(n, k)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert all(1 <= len(g) <= k for g in groups)
        assert sorted(L.flat_order(n, k)) == list(range(n))
    assert L.flat_order(5, 2) == [0, 2, 4, 1, 3]  # round robin over the streams [0, 1], [2, 3], [4]


def test_means_equal_flat_weighted_mean_and_flower_fedavg():
    from flwr.server.strategy.aggregate import aggregate as flower_fedavg

    ups, counts = L.make_updates(SMALL, 7, seed=3)
    ref = L.flat_mean_float64(ups, counts)
    direct = [sum(u[k].astype(np.float64) * n for u, n in zip(ups, counts)) / sum(counts) for k in range(len(SMALL))]
    assert _rel(ref, direct) < 1e-15
    for fanin in (1, 2, 3, 7, 10):
        for agg in (L.hierarchical_mean(ups, counts, fanin), L.flat_mean(ups, counts, fanin)):
            assert [a.dtype for a in agg] == [np.float32] * len(SMALL)
            assert _rel(agg, ref) < 1e-6
    assert _rel(L.hierarchical_mean(ups, counts, 3), flower_fedavg(list(zip(ups, counts)))) < 1e-6


def test_wire_generation_and_incremental_float64_reference():
    ups, counts = L.make_updates(SMALL, 6, seed=4)
    wire, counts2 = L.make_wire(SMALL, 6, seed=4)
    assert counts2 == counts and wire == [L.to_wire(u) for u in ups]  # the same draws, serialised
    pref = L.prefix_means_float64(wire, counts, [2, 6, 3])
    assert sorted(pref) == [2, 3, 6]
    for n, ref in pref.items():
        assert _same_bits(ref, L.flat_mean_float64(ups[:n], counts[:n]))  # same float64 operations, same bits


def test_flower_serialisation_round_trip_exact_and_npy_view_zero_copy():
    ups, _ = L.make_updates(SMALL, 2, seed=0)
    wire = L.to_wire(ups[0])
    assert all(isinstance(b, bytes) for b in wire)
    back = L.from_wire(wire)
    for a, b, raw in zip(ups[0], back, wire):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        v = L.npy_view(raw)
        assert v.tobytes() == a.tobytes() and not v.flags.owndata and not v.flags.writeable  # a view of the bytes


def test_shared_memory_round_trip_is_zero_copy_and_exact():
    ups, _ = L.make_updates(SMALL, 3, seed=1)
    numel = sum(int(np.prod(s)) for _, s in SMALL)
    pool = L.Pool(3, numel)
    try:
        for i, u in enumerate(ups):
            L.write_wire_into(pool.slot(i), L.to_wire(u))
        for i, u in enumerate(ups):
            views = L.split_flat(pool.slot(i), SMALL)
            for v, a in zip(views, u):
                assert np.shares_memory(v, pool.array) and v.tobytes() == a.tobytes()
        out = [pool.slot(2)]
        L.weighted_mean_into(out, [[pool.slot(0)], [pool.slot(1)]], [10, 30])  # in place, in the pool
        assert np.shares_memory(out[0], pool.array)
        flat = [np.concatenate([a.ravel() for a in u]) for u in ups[:2]]
        np.testing.assert_allclose(pool.slot(2), (10 * flat[0].astype(np.float64) + 30 * flat[1]) / 40, rtol=1e-6,
                                   atol=1e-9)
        del views, out, v
    finally:
        pool.close()


def _expected_pipe_bytes(arm, wire, counts, fanin, ups):
    """Every message an aggregator of ``arm`` reads from a pipe, pickled here as multiprocessing.Queue pickles it."""
    n, groups = len(wire), L.leaves_of(len(wire), fanin)
    dumps = lambda m: len(ForkingPickler.dumps(m))  # noqa: E731
    if arm == "lifl_shm":
        return (sum(dumps(("ref", i, counts[i], i)) for i in range(n)),
                sum(dumps(("ref", li, sum(counts[i] for i in g), n + li)) for li, g in enumerate(groups)))
    up = sum(dumps(("val", i, counts[i], wire[i])) for i in range(n))
    if arm == "queue_flat":
        return up, 0
    parts = [L.hierarchical_mean([ups[i] for i in g], [counts[i] for i in g], fanin) for g in groups]
    return up, sum(dumps(("val", li, sum(counts[i] for i in g), L.to_wire(p)))
                   for li, (g, p) in enumerate(zip(groups, parts)))


def test_rounds_all_arms_agree_and_pipe_bytes_are_the_messages():
    ups, counts = L.make_updates(SMALL, 5, seed=2)
    wire = [L.to_wire(u) for u in ups]
    b = L.update_bytes(SMALL)
    got = {arm: L.run_round(arm, wire, counts, SMALL, fanin=2, timeout=60) for arm in L.ARMS}
    ref32 = L.hierarchical_mean(ups, counts, 2)
    for arm in ("lifl_shm", "queue_hier"):  # same operations, same order: the same bits
        assert _same_bits(got[arm]["aggregate"], ref32), arm
    assert _same_bits(got["queue_flat"]["aggregate"], L.flat_mean(ups, counts, 2))
    assert _rel(got["queue_flat"]["aggregate"], L.flat_mean_float64(ups, counts)) < 1e-6
    assert got["lifl_shm"]["processes"] == 2 * 3 + 1 and got["queue_flat"]["processes"] == 3 + 1
    assert got["queue_hier"]["pipe_messages"] == 5 + 3 and got["queue_flat"]["pipe_messages"] == 5
    for arm, r in got.items():
        assert r["latency"] > 0 and r["cpu"] > 0
        up, hop = _expected_pipe_bytes(arm, wire, counts, 2, ups)
        assert (r["pipe_bytes"]["from_ingress"], r["pipe_bytes"]["from_leaves"]) == (up, hop), arm
        assert r["pipe_bytes"]["total"] >= L.payload_bytes(arm, 5, 2, b)
    assert got["lifl_shm"]["pipe_bytes"]["total"] < 40 * 8  # eight small references


def test_payload_by_value_in_the_lifl_arm_is_caught(monkeypatch):
    """The reviewer's mutation: LIFL's ingress also sends the payload through the pipe. The result is still right,
    so only the measured pipe bytes can catch it: the premise gate (bytes / B below a small bound) must fail."""
    shapes = [("w", (64, 256)), ("b", (64,))]  # 66 KB per update: a bound relative to B means something
    ups, counts = L.make_updates(shapes, 4, seed=5)
    wire = [L.to_wire(u) for u in ups]
    b = L.update_bytes(shapes)
    honest = L.run_round("lifl_shm", wire, counts, shapes, fanin=2, timeout=60)
    monkeypatch.setattr(L, "_lifl_message", lambda cid, count, slot, tensors: ("ref", cid, count, slot, tensors))
    mutant = L.run_round("lifl_shm", wire, counts, shapes, fanin=2, timeout=60)  # fork: the children see the patch
    assert _same_bits(mutant["aggregate"], honest["aggregate"])  # the aggregate cannot tell
    bound = 0.01  # params.yaml threshold_lifl_payload
    assert honest["pipe_bytes"]["total"] / b < bound
    assert mutant["pipe_bytes"]["total"] / b >= 4 > bound  # every update crossed the pipe
