"""Flower (``flwr[simulation]``, Ray backend) as the engine of the federated papers.

The federated papers are written as Flower apps: each client is a ``flwr.client.NumPyClient`` returned by a
``client_fn(context)`` (wrapped into a ``ClientApp``), each server-side algorithm a ``flwr.server.strategy.Strategy``
(FedAvg or a subclass). :func:`simulate` runs them with Flower's simulation engine: Ray starts locally (offline, no
dashboard) and every client runs in a Ray actor process, so the code that runs here is the code that runs on a cluster.

What this module adds to Flower, and why:

* **Determinism** (``Tracked``). Flower samples clients with the unseeded ``random`` module and hands results to
  ``aggregate_fit`` in arrival order, so two runs would aggregate in different orders (float sums differ) and sample
  different clients. ``Tracked`` learns each node's *partition id* once (a ``get_properties`` call, answered by
  :class:`PartitionClient`), samples clients from a generator seeded by ``(seed, round)`` over partitions sorted by id,
  and sorts results by partition before aggregation.
* **Accounting from the wire** (``Tracked.ledger``). Bytes sent are counted from the serialized messages: the
  ``Parameters.tensors`` byte strings of every ``FitIns`` sent to a client (down) and of every ``FitRes`` received
  (up), per round and per client. No formula: whatever a strategy puts in the message is what is counted.
* **Failures are errors.** Flower logs a crashing client and goes on; :func:`simulate` raises after the run if any
  round had a failure, so a notebook cannot report a result computed without some clients.
* **One Ray session per notebook** (:func:`ray_session`). ``run_simulation`` shuts Ray down after every run (5-8 s to
  start again on 2 cores). Inside ``with ray_session(...)``, Ray is started once and Flower's Ray backend only
  terminates its actors at the end of a run (``RayBackend.terminate`` patched for the duration of the block; Flower is
  pinned to 1.42.0, where ``terminate`` is ``pool.terminate_all_actors(); ray.shutdown()``).

On a cluster: pass ``ray_address`` (e.g. ``"auto"`` on a Ray head node, or ``"ray://host:10001"``) and the same
simulation runs on the cluster's Ray workers; with real, separate machines, the same ``client_fn`` and strategy are
deployed as a Flower app (``flwr run`` against a SuperLink with one SuperNode per machine). See the README.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

import numpy as np

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import flwr  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import (  # noqa: E402
    Context,
    GetPropertiesIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402

__all__ = [
    "PartitionClient", "Tracked", "simulate", "ray_session", "partition_id", "client_seed", "message_bytes",
    "ndarrays_to_parameters", "parameters_to_ndarrays", "quiet", "FLOWER_VERSION", "share", "fetch",
]
FLOWER_VERSION = flwr.__version__


def quiet(level: int = logging.WARNING) -> None:
    """Flower logs every round at INFO; keep notebook outputs readable."""
    logging.getLogger("flwr").setLevel(level)


def partition_id(context: Context) -> int:
    """The partition (client) index Flower's simulation gives a node: 0 .. num_supernodes - 1."""
    return int(context.node_config["partition-id"])


def client_seed(seed: int, partition: int, server_round: int) -> int:
    """A seed for one client's local work in one round, the same in every run and independent of scheduling."""
    return int(np.random.SeedSequence([int(seed), int(partition), int(server_round)]).generate_state(1)[0])


def message_bytes(parameters: Parameters) -> int:
    """Bytes of a serialized ``Parameters`` message body: the sum of its tensors' byte strings."""
    return int(sum(len(t) for t in parameters.tensors))


class PartitionClient(NumPyClient):
    """A ``NumPyClient`` that knows its partition id and tells the server (``get_properties``)."""

    def __init__(self, partition: int):
        self.partition = int(partition)

    def get_properties(self, config):  # noqa: D401 - Flower API
        return {"partition_id": self.partition}


class _SeededManager:
    """A view of Flower's ClientManager whose ``sample`` is a seeded choice over partitions sorted by id."""

    def __init__(self, inner: ClientManager, order: list[ClientProxy], rng: np.random.Generator):
        self._inner, self._order, self._rng = inner, order, rng

    def num_available(self) -> int:
        return len(self._order)

    def all(self) -> dict[str, ClientProxy]:
        return {c.cid: c for c in self._order}

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        return self._inner.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None) -> list[ClientProxy]:
        pool = [c for c in self._order if criterion is None or criterion.select(c)]
        if num_clients > len(pool):
            return []
        idx = np.sort(self._rng.choice(len(pool), size=num_clients, replace=False))
        return [pool[i] for i in idx]


class Tracked:
    """Mixin placed before a Flower strategy: ``class MyStrategy(Tracked, FedAvg)``.

    Adds seeded client sampling, results sorted by partition, a byte ledger from the serialized messages and a record
    of failures. Subclasses read ``self.partition_of[client.cid]`` to personalise messages.
    Construct with ``num_clients=`` and ``seed=`` besides the strategy's own arguments.
    """

    def __init__(self, *args, num_clients: int, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.partition_of: dict[str, int] = {}
        self.ledger: list[dict] = []  # one row per message: round, direction, partition, bytes
        self.failures: list[tuple[int, str]] = []

    # ---- partitions and sampling -------------------------------------------------------------------------------
    def _ordered(self, client_manager: ClientManager, server_round: int) -> list[ClientProxy]:
        client_manager.wait_for(self.num_clients)
        clients = dict(client_manager.all())
        for cid, proxy in clients.items():
            if cid not in self.partition_of:
                res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=server_round)
                self.partition_of[cid] = int(res.properties["partition_id"])
        return sorted(clients.values(), key=lambda c: self.partition_of[c.cid])

    def _manager(self, client_manager: ClientManager, server_round: int, stream: int) -> _SeededManager:
        order = self._ordered(client_manager, server_round)
        rng = np.random.default_rng([self.seed, int(server_round), stream])
        return _SeededManager(client_manager, order, rng)

    def _sorted(self, results):
        return sorted(results, key=lambda r: self.partition_of[r[0].cid])

    def _log(self, server_round: int, direction: str, client: ClientProxy, parameters: Parameters) -> None:
        self.ledger.append({"round": int(server_round), "direction": direction,
                            "partition": self.partition_of[client.cid], "bytes": message_bytes(parameters)})

    # ---- Flower strategy hooks -----------------------------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, self._manager(client_manager, server_round, 0))
        for client, ins in pairs:
            self._log(server_round, "down", client, ins.parameters)
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        for f in failures:
            self.failures.append((int(server_round), repr(f[1]) if isinstance(f, tuple) else repr(f)))
        results = self._sorted(results)
        for client, res in results:
            self._log(server_round, "up", client, res.parameters)
        return super().aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return super().configure_evaluate(server_round, parameters, self._manager(client_manager, server_round, 1))

    def aggregate_evaluate(self, server_round, results, failures):
        for f in failures:
            self.failures.append((int(server_round), repr(f[1]) if isinstance(f, tuple) else repr(f)))
        return super().aggregate_evaluate(server_round, self._sorted(results), failures)

    # ---- summaries -------------------------------------------------------------------------------------------------
    def bytes_sent(self, direction: str | None = None) -> int:
        """Total bytes in the ledger (``direction``: "up", "down" or None for both)."""
        return int(sum(r["bytes"] for r in self.ledger if direction in (None, r["direction"])))


def _ray_init_args(num_cpus: int, object_store_mb: int, ray_address: str | None) -> dict:
    """``ray.init`` arguments: a local Ray (no dashboard, a bounded object store) or the cluster at ``ray_address``."""
    if ray_address:
        return {"address": ray_address, "include_dashboard": False, "log_to_driver": False}
    return {"num_cpus": int(num_cpus), "include_dashboard": False, "object_store_memory": int(object_store_mb) << 20,
            "log_to_driver": False}


def _ray_init(ray, args: dict, attempts: int = 3) -> None:
    """``ray.init``, retried: Ray 2.55 gives its raylet a fixed 30 s to register (``ray/_private/node.py``), which a
    heavily loaded 2-core machine can miss; a retry starts a fresh local node (a cluster address is not retried)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**args)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or "address" in args or attempt == attempts:
                raise
            logging.getLogger(__name__).warning("ray.init timed out (attempt %d of %d); retrying", attempt, attempts)
            ray.shutdown()


def share(obj):
    """Data every client reads, shipped once: ``ray.put(obj)`` while Ray is running (a Flower simulation inside
    :func:`ray_session`), else ``obj`` itself (the in-process driver). Clients read it back with :func:`fetch`."""
    try:
        import ray

        if ray.is_initialized():
            return ray.put(obj)
    except ImportError:  # pragma: no cover
        pass
    return obj


_FETCHED: dict = {}  # per process (Ray actor): the last object fetched with cache=True


def fetch(ref, cache: bool = False):
    """The object behind a :func:`share` reference (``ray.get``); anything else passes through. ``cache=True``
    deserialises it once per actor process (keyed by object id; only the latest object is kept), for clients that
    are rebuilt every round; the cached object is shared, so such clients must not modify it."""
    try:
        import ray

        if isinstance(ref, ray.ObjectRef):
            if not cache:
                return ray.get(ref)
            key = ref.hex()
            if key not in _FETCHED:
                _FETCHED.clear()
                _FETCHED[key] = ray.get(ref)
            return _FETCHED[key]
    except ImportError:  # pragma: no cover
        pass
    return ref


@contextlib.contextmanager
def ray_session(num_cpus: int = 2, object_store_mb: int = 256, ray_address: str | None = None):
    """Start Ray once for a block of :func:`simulate` calls (one Ray session per notebook); shut it down at the end."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    _ray_init(ray, _ray_init_args(num_cpus, object_store_mb, ray_address))
    original = raybackend.RayBackend.terminate

    def terminate_actors_only(self):
        if self.pool:
            self.pool.terminate_all_actors()

    raybackend.RayBackend.terminate = terminate_actors_only
    try:
        yield
    finally:
        raybackend.RayBackend.terminate = original
        ray.shutdown()


def simulate(strategy, client_fn: Callable[[Context], object], *, num_clients: int, rounds: int,
             num_cpus: int = 2, client_cpus: float = 1.0, ray_address: str | None = None,
             object_store_mb: int = 256):
    """Run ``rounds`` rounds of ``strategy`` over ``num_clients`` Flower clients (``client_fn(context)`` returns a
    ``NumPyClient`` or a ``Client``) with Flower's Ray simulation engine; return the strategy (with its ledger).

    ``client_fn`` and what it closes over are shipped to the Ray actors (pickled), so keep client data small or load
    it inside ``client_fn``. Raises RuntimeError if any client failed in any round.
    """
    from flwr.simulation import run_simulation

    if int(num_clients) < 1 or int(rounds) < 1:
        raise ValueError(f"simulate: num_clients={num_clients} and rounds={rounds} must both be >= 1")

    def _client(context: Context):
        c = client_fn(context)
        return c.to_client() if isinstance(c, NumPyClient) else c

    def server_fn(context: Context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(rounds)))

    init_args = _ray_init_args(num_cpus, object_store_mb, ray_address)
    quiet()
    run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=_client), num_supernodes=int(num_clients),
                   backend_config={"client_resources": {"num_cpus": float(client_cpus), "num_gpus": 0.0},
                                   "init_args": init_args})
    failures = getattr(strategy, "failures", [])
    if failures:
        raise RuntimeError(f"{len(failures)} client failure(s) in the Flower run; first: round {failures[0][0]}: "
                           f"{failures[0][1][:2000]}")
    return strategy
