"""The shared engines: Flower over Ray (seeded sampling, sorted aggregation, byte ledger, failures) and Spark."""
import numpy as np
import pytest

from reprolab.distributed import spark as sp


def _flower_setup():
    from flwr.server.strategy import FedAvg

    from reprolab.distributed import flower as fl

    class Client(fl.PartitionClient):
        def fit(self, parameters, config):
            if config.get("fail_on") == self.partition:
                raise ValueError("client boom")
            rng = np.random.default_rng(fl.client_seed(7, self.partition, int(config["round"])))
            new = [p + (self.partition + 1) + rng.normal(size=p.shape) * 1e-3 for p in parameters]
            return new, 10 * (self.partition + 1), {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    class Strategy(fl.Tracked, FedAvg):
        pass

    return fl, Client, Strategy


def _run(fail_on=-1, fraction=1.0, seed=0, rounds=2, n=4):
    fl, Client, Strategy = _flower_setup()
    init = [np.zeros(3), np.zeros((2, 2), dtype=np.float32)]
    s = Strategy(num_clients=n, seed=seed, fraction_fit=fraction, min_fit_clients=1, fraction_evaluate=0.0,
                 min_available_clients=n, accept_failures=False,
                 on_fit_config_fn=lambda r: {"round": r, "fail_on": fail_on},
                 initial_parameters=fl.ndarrays_to_parameters(init))
    captured = {}
    orig = Strategy.aggregate_fit

    def agg(self, server_round, results, failures):
        out = orig(self, server_round, results, failures)
        captured[server_round] = (out[0], [self.partition_of[c.cid] for c, _ in self._sorted(results)])
        return out

    s.aggregate_fit = agg.__get__(s)
    with fl.ray_session(num_cpus=2, object_store_mb=128):
        fl.simulate(s, lambda ctx: Client(fl.partition_id(ctx)), num_clients=n, rounds=rounds)
    return fl, s, captured, init


def test_flower_fedavg_matches_direct_weighted_mean_and_ledger_counts_serialized_bytes():
    fl, s, captured, init = _run()
    # round 1 by hand: client k returns init + (k+1) + noise(seed 7, k, round 1), weight 10 (k+1)
    w = np.array([10 * (k + 1) for k in range(4)], float)
    got = fl.parameters_to_ndarrays(captured[1][0])
    for j, p in enumerate(init):
        ups = []
        for k in range(4):
            rng = np.random.default_rng(fl.client_seed(7, k, 1))
            noise = [rng.normal(size=q.shape) * 1e-3 for q in init][j]
            ups.append(p + (k + 1) + noise)
        expect = sum(wk * u for wk, u in zip(w, ups)) / w.sum()
        np.testing.assert_allclose(got[j], expect, rtol=1e-6, atol=1e-6)
    assert captured[1][1] == [0, 1, 2, 3]
    # the ledger counts the serialized tensors: 4 clients x 2 rounds each way, each message = bytes of its tensors
    one = fl.message_bytes(fl.ndarrays_to_parameters(init))
    down = [r for r in s.ledger if r["direction"] == "down"]
    assert len(down) == 8 and all(r["bytes"] == one for r in down if r["round"] == 1)
    # round 2 sends the round-1 aggregate, whatever its dtype became
    assert all(r["bytes"] == fl.message_bytes(captured[1][0]) for r in down if r["round"] == 2)
    up = [r for r in s.ledger if r["direction"] == "up"]
    assert len(up) == 8 and s.bytes_sent("up") == sum(r["bytes"] for r in up) > 0
    assert one > init[0].nbytes + init[1].nbytes  # npy headers are on the wire too


def test_flower_sampling_is_seeded_and_reruns_identically():
    _, s1, c1, _ = _run(fraction=0.5, seed=3, rounds=3)
    _, s2, c2, _ = _run(fraction=0.5, seed=3, rounds=3)
    parts1 = [c1[r][1] for r in (1, 2, 3)]
    assert parts1 == [c2[r][1] for r in (1, 2, 3)]
    assert all(len(p) == 2 for p in parts1)
    fl = _flower_setup()[0]
    for r in (1, 2, 3):
        a, b = fl.parameters_to_ndarrays(c1[r][0]), fl.parameters_to_ndarrays(c2[r][0])
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_flower_client_failure_raises():
    with pytest.raises(RuntimeError, match="client failure"):
        _run(fail_on=2, rounds=1)


def test_java_found_and_bad_master_named():
    home, where, major = sp.java_home()
    assert major in sp.SUPPORTED_JAVA and where
    with pytest.raises(ValueError, match="master"):
        sp.spark_session(master="local[two]")


def test_spark_job_matches_direct_computation():
    spark = sp.spark_session("local[2]", "test")
    try:
        edges = [(0, 1), (1, 2), (2, 0), (2, 3), (3, 4)]
        rdd = spark.sparkContext.parallelize(edges + [(b, a) for a, b in edges], 2)
        deg = dict(rdd.map(lambda e: (e[0], 1)).reduceByKey(lambda a, b: a + b).collect())
        # a task result over spark.task.maxDirectResultSize (1 MiB) is fetched from the block manager at the
        # advertised driver host: it must be reachable in local mode
        big = spark.sparkContext.parallelize([0, 1], 2).map(lambda i: np.full(300_000, i, dtype=np.float64)).collect()
        assert [float(b.sum()) for b in big] == [0.0, 300_000.0]
    finally:
        spark.stop()
    assert deg == {0: 2, 1: 2, 2: 3, 3: 2, 4: 1}


def test_dirichlet_split_partitions_every_sample_and_skews_labels():
    from reprolab.fed.common import dirichlet_split, label_skew

    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_split(y, 10, alpha=0.1, seed=0)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(1000))  # a partition: each sample exactly once
    assert all(len(p) >= 10 for p in parts)
    again = dirichlet_split(y, 10, alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    skew, iid = label_skew(y, parts), label_skew(y, np.array_split(np.random.default_rng(0).permutation(1000), 10))
    # the total-variation distance by hand for client 0
    q = np.bincount(y[parts[0]], minlength=10) / len(parts[0])
    tv0 = 0.5 * np.abs(q - 0.1).sum()
    assert skew["tv_max"] >= tv0 - 1e-12 and skew["tv_mean"] > 0.4 > iid["tv_mean"]
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(y, 10, alpha=0.0, seed=0)


def test_weights_roundtrip_through_flower_parameters():
    import torch

    from reprolab.distributed import flower as fl
    from reprolab.fed.common import get_weights, set_weights

    torch.manual_seed(0)
    a, b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), \
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    a[1].running_mean += 1.5
    set_weights(b, fl.parameters_to_ndarrays(fl.ndarrays_to_parameters(get_weights(a))))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_ray_init_retries_a_startup_timeout_only():
    from reprolab.distributed.flower import _ray_init

    class FakeRay:
        def __init__(self, errors):
            self.errors, self.inits, self.shutdowns = list(errors), 0, 0

        def init(self, **kw):
            self.inits += 1
            if self.errors:
                raise self.errors.pop(0)

        def shutdown(self):
            self.shutdowns += 1

    timeout = Exception("The current node timed out during startup. This could happen ...")
    r = FakeRay([timeout])
    _ray_init(r, {"num_cpus": 2})
    assert (r.inits, r.shutdowns) == (2, 1)
    r = FakeRay([timeout] * 3)
    with pytest.raises(Exception, match="timed out"):
        _ray_init(r, {"num_cpus": 2}, attempts=3)
    assert r.inits == 3
    r = FakeRay([ValueError("bad argument")])
    with pytest.raises(ValueError):
        _ray_init(r, {"num_cpus": 2})
    assert r.inits == 1
    r = FakeRay([timeout])
    with pytest.raises(Exception, match="timed out"):
        _ray_init(r, {"address": "auto"})  # a cluster is not retried
    assert r.inits == 1


def test_share_and_fetch_go_through_the_object_store_only_when_ray_runs(monkeypatch):
    """share/fetch pass objects through unchanged without Ray; with Ray up, share puts once and fetch gets (every
    call, or once per process with cache=True, re-fetching when another object is shared)."""
    import sys
    import types

    from reprolab.distributed import flower as fl

    data = {"X": np.arange(3)}
    fake = types.ModuleType("ray")

    class ObjectRef:
        def __init__(self, i):
            self.i = i

        def hex(self):
            return f"{self.i:04x}"

    store, gets = [], []
    fake.ObjectRef = ObjectRef
    fake.is_initialized = lambda: False
    fake.put = lambda obj: (store.append(obj), ObjectRef(len(store) - 1))[1]
    fake.get = lambda ref: (gets.append(ref.i), store[ref.i])[1]
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert fl.share(data) is data and fl.fetch(data) is data and fl.fetch(data, cache=True) is data
    fake.is_initialized = lambda: True
    ref = fl.share(data)
    assert isinstance(ref, ObjectRef) and store == [data]
    assert fl.fetch(ref) is data and fl.fetch(ref) is data and gets == [0, 0]
    gets.clear()
    assert fl.fetch(ref, cache=True) is data and fl.fetch(ref, cache=True) is data and gets == [0]
    other = {"X": np.zeros(2)}
    ref2 = fl.share(other)
    assert fl.fetch(ref2, cache=True) is other and gets == [0, 1]
