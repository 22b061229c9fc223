"""G-Rank: Unsupervised Continuous Learn-to-Rank for Edge Devices in a P2P Network (Gold & Pouwelse,
`arXiv:2301.12530 <https://arxiv.org/abs/2301.12530>`_; official simulation: github.com/awrgold/G-Rank,
``G-Rank - Repository Notebook.ipynb``).

Every peer keeps a *clicklog* of (peer, query term, clicked item) entries: its own clicks plus what it pulled from
other peers by gossip. To answer query Q, peer i scores every item k that matches Q's metadata by the clicks it
received for Q, weighted by how similar the clicking peer is to i (paper Sec. III-D)::

    S_i(n_j) = (kappa_t + kappa_m^2) / kappa_u,      normalised by max_j S_i(n_j)
    R_i(Q)   = for k in K_Q:  sum_j C_k(j) * (S_i(n_j) + F)

kappa_t = |top-K query terms of i  ∩  top-K query terms of j| (K = 10, ``head(10)`` in the official notebook),
kappa_m = |query-click tuples clicked by both|, kappa_u = |union of their query-click tuples|, F = the isolation
constant (0: only peers with S > 0 count; 1: every known peer counts). ``variant="code"`` is the official notebook's
``jaccard_similarity`` instead: (kappa_m' + kappa_t^2) / kappa_u' with item sets (see the deviations).

The decentralised engine (Tribler/IPv8 in the paper) is written here on Ray: peers are sharded over
:class:`PeerShard` actors; every round each online peer *pulls* from one uniformly drawn peer (solicited gossip, Sec.
III-C). The request carries the requester's version vector (how many entries of each origin it holds: a peer's log
of any origin is always a prefix of that origin's log, because every reply carries everything the requester lacks),
the reply carries exactly the missing entries (8 bytes each: origin, seq, item, query as uint16), and the requester
merges them. All pulls of a round are served from the state at the start of the round, and merges are max
operations, so results do not depend on scheduling or on the number of shards (tested). A peer's log is stored as
its version vector over one read-only table of all entries (the same content, deduplicated in memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ENTRY_BYTES = 8  # one clicklog entry on the wire: origin, seq, item, query as uint16
VV_DTYPE = np.int32  # version vectors on the wire: one int32 per peer


# ----------------------------------------------------------------------------------------------------------------------
# Data: MovieLens-100k as click logs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ClickLogs:
    """All training clicks, sorted by (origin, seq): entry ``start[j] + s`` is peer j's s-th click in time order."""

    origin: np.ndarray  # (E,) peer that clicked
    seq: np.ndarray  # (E,) position in its origin's log (time order)
    item: np.ndarray  # (E,)
    query: np.ndarray  # (E,) query term (genre) id
    ts: np.ndarray  # (E,) timestamp
    start: np.ndarray  # (N + 1,) offsets of each origin's log
    item_query: np.ndarray  # (M, Q) bool: item metadata (genres): the items a query can return
    n_peers: int
    n_items: int
    n_queries: int
    query_names: list = field(default_factory=list)
    table: np.ndarray | None = None  # (E, 4) uint16 wire form, built on demand

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.start)

    def wire(self) -> np.ndarray:
        if self.table is None:
            if max(self.n_peers, self.n_items, int(self.lengths.max(initial=0)), self.n_queries) >= 2 ** 16:
                raise ValueError("uint16 wire format: peers, items, log lengths and queries must be < 65536")
            self.table = np.stack([self.origin, self.seq, self.item, self.query], 1).astype(np.uint16)
        return self.table


@dataclass
class HeldOut:
    """Each peer's held-out later interactions, grouped as (peer, query) -> relevant items."""

    peer: np.ndarray  # (T,)
    query: np.ndarray  # (T,)
    item: np.ndarray  # (T,)
    ts: np.ndarray | None = None  # (T,)


def assign_queries(item_ids: np.ndarray, item_query: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One query term per interaction: a genre of the clicked movie drawn uniformly (the user searched that genre and
    clicked the movie)."""
    counts = item_query.sum(1)
    if (counts[item_ids] == 0).any():
        raise ValueError("every item needs at least one genre")
    pick = np.floor(rng.random(len(item_ids)) * counts[item_ids]).astype(np.int64)  # which of the item's genres
    cum = np.cumsum(item_query, 1)  # (M, Q)
    return (cum[item_ids] > pick[:, None]).argmax(1)


def build_logs(users: np.ndarray, items: np.ndarray, ts: np.ndarray, item_query: np.ndarray, test_frac: float,
               seed: int, query_names=None) -> tuple[ClickLogs, HeldOut]:
    """Interactions (users, items, ts) with 0-based ids -> training click logs and held-out later interactions.

    Each peer's interactions are ordered by (timestamp, item); the last ``max(1, round(test_frac * n))`` are held out.
    Query terms are drawn per interaction by :func:`assign_queries` with ``seed``.
    """
    users, items, ts = (np.asarray(a, dtype=np.int64) for a in (users, items, ts))
    rng = np.random.default_rng([int(seed), 17])
    query = assign_queries(items, item_query, rng)
    order = np.lexsort((items, ts, users))
    u, m, t, q = users[order], items[order], ts[order], query[order]
    n_peers = int(users.max()) + 1
    counts = np.bincount(u, minlength=n_peers)
    pos = np.arange(len(u)) - np.repeat(np.cumsum(counts) - counts, counts)  # rank within the peer
    n_test = np.maximum(1, np.round(test_frac * counts)).astype(np.int64)
    is_test = pos >= (counts - n_test)[u]
    tr = ~is_test
    lengths = np.bincount(u[tr], minlength=n_peers)
    logs = ClickLogs(origin=u[tr], seq=pos[tr], item=m[tr], query=q[tr], ts=t[tr],
                     start=np.concatenate([[0], np.cumsum(lengths)]), item_query=np.asarray(item_query, bool),
                     n_peers=n_peers, n_items=item_query.shape[0], n_queries=item_query.shape[1],
                     query_names=list(query_names or []))
    return logs, HeldOut(peer=u[is_test], query=q[is_test], item=m[is_test], ts=t[is_test])


def movielens_logs(test_frac: float, seed: int, min_rating: float = 0.0,
                   max_peers: int | None = None) -> tuple[ClickLogs, HeldOut]:
    """MovieLens-100k (offline, ``reprolab.data.load_ml100k``): every user is a peer, every rating >= min_rating a
    click on that movie for one of its genres (the query term), time-ordered by timestamp. ``max_peers``: keep the
    users with the smallest ids only (smoke runs and the scaling curve)."""
    from ..data import load_ml100k

    ratings, _, meta = load_ml100k()
    ratings = ratings[ratings.rating >= min_rating]
    if max_peers is not None:
        ratings = ratings[ratings.user_id.isin(np.sort(ratings.user_id.unique())[:int(max_peers)])]
    genres = sorted({g for c in meta["class"] for g in c.split()})
    gidx = {g: k for k, g in enumerate(genres)}
    item_ids = np.sort(meta.item_id.to_numpy())
    iq = np.zeros((len(item_ids), len(genres)), bool)
    row = {int(v): k for k, v in enumerate(item_ids)}
    for iid, c in zip(meta.item_id, meta["class"]):
        for g in c.split():
            iq[row[int(iid)], gidx[g]] = True
    uid = np.sort(ratings.user_id.unique())
    umap = np.full(int(uid.max()) + 1, -1)
    umap[uid] = np.arange(len(uid))
    imap = np.full(int(item_ids.max()) + 1, -1)
    imap[item_ids] = np.arange(len(item_ids))
    return build_logs(umap[ratings.user_id.to_numpy()], imap[ratings.item_id.to_numpy()],
                      ratings.timestamp.to_numpy(), iq, test_frac, seed, genres)


def round_schedule(logs: ClickLogs, rounds: int) -> np.ndarray:
    """(rounds, N): how many of its own clicks each peer has made by the end of each round. The training timeline is
    cut into ``rounds`` rounds of equal numbers of clicks (timestamp quantiles)."""
    edges = np.quantile(logs.ts, np.linspace(0, 1, rounds + 1)[1:])
    edges[-1] = logs.ts.max()
    rnd = np.minimum(np.searchsorted(edges, logs.ts, side="left"), rounds - 1)  # round in which each click happens
    # a peer's clicks are in time order, so its count by the end of round r is the number of its clicks with rnd <= r
    out = np.zeros((rounds, logs.n_peers), np.int64)
    np.add.at(out, (rnd, logs.origin), 1)
    return np.cumsum(out, 0)


def non_iid_stats(logs: ClickLogs, seed: int) -> dict:
    """How non-IID the peers' logs are, on the query (genre) distribution, beside an IID reference (the same entries
    shuffled across peers, the same log sizes): mean total-variation distance from the global distribution, and the
    mean Jaccard overlap of the item sets of random peer pairs."""
    from .common import label_skew

    parts = [np.arange(logs.start[j], logs.start[j + 1]) for j in range(logs.n_peers)]
    nat = label_skew(logs.query, parts)
    perm = np.random.default_rng([int(seed), 23]).permutation(len(logs.query))
    iid = label_skew(logs.query[perm], parts)
    return {"tv_mean": nat["tv_mean"], "tv_mean_iid": iid["tv_mean"], "tv_max": nat["tv_max"],
            "queries_per_peer": nat["classes_per_client"], "num_queries": nat["num_classes"],
            "log_min": nat["size_min"], "log_max": nat["size_max"], "log_mean": nat["size_mean"]}


# ----------------------------------------------------------------------------------------------------------------------
# The ranking model (one peer, given the entries it holds)
# ----------------------------------------------------------------------------------------------------------------------
def visible(logs: ClickLogs, vv: np.ndarray) -> np.ndarray:
    """(E,) bool: the entries a peer with version vector ``vv`` holds."""
    return logs.seq < np.asarray(vv)[logs.origin]


def top_k_mask(counts: np.ndarray, k: int) -> np.ndarray:
    """(N, Q) counts of query terms -> (N, Q) bool: each row's top-k issued terms (count desc, then term id)."""
    order = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    mask = np.zeros(counts.shape, bool)
    np.put_along_axis(mask, order, True, 1)
    return mask & (counts > 0)


def similarity(logs: ClickLogs, vv: np.ndarray, i: int, top_k: int = 10, variant: str = "paper",
               vis: np.ndarray | None = None) -> np.ndarray:
    """S_i(n_j) for every peer j, from the entries peer i holds, normalised by its maximum (paper Sec. III-D)."""
    vis = visible(logs, vv) if vis is None else vis
    N, Q, M = logs.n_peers, logs.n_queries, logs.n_items
    own = slice(logs.start[i], logs.start[i] + int(vv[i]))
    own_q = np.full(M, -1)
    own_q[logs.item[own]] = logs.query[own]  # query under which i clicked each item (-1: not clicked)
    n_i = int(vv[i])
    n_j = np.bincount(logs.origin[vis], minlength=N)
    counts = np.bincount(logs.origin[vis] * Q + logs.query[vis], minlength=N * Q).reshape(N, Q)
    top = top_k_mask(counts, top_k)
    kappa_t = (top & top[i]).sum(1)
    oq = own_q[logs.item]
    if variant == "paper":  # query-click tuples
        both = vis & (oq == logs.query)
        kappa_m = np.bincount(logs.origin[both], minlength=N)
        kappa_u = n_i + n_j - kappa_m
        S = (kappa_t + kappa_m.astype(float) ** 2) / np.maximum(kappa_u, 1)
    elif variant == "code":  # official notebook: items clicked by both under terms both issued; kappa_t squared
        terms = counts > 0
        common_item = vis & (oq >= 0)
        kappa_i = np.bincount(logs.origin[common_item], minlength=N)  # items in common, any terms
        shared = common_item & terms[logs.origin, np.maximum(oq, 0)] & terms[i][logs.query]
        kappa_m = np.bincount(logs.origin[shared], minlength=N)
        kappa_u = n_i + n_j - kappa_i
        S = (kappa_m + kappa_t.astype(float) ** 2) / np.maximum(kappa_u, 1)
        S[(terms & terms[i]).sum(1) == 0] = 0.0  # no intersecting terms -> 0
    else:
        raise ValueError(f"variant {variant!r}; allowed: paper, code")
    S[kappa_u == 0] = 0.0
    return S / S.max() if S.max() > 0 else S


def grank_scores(logs: ClickLogs, vis: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(Q, M) scores R(Q)[k] = sum over held entries (j, Q, k) of weight[j] (weight = S_i + F, or 1: popularity)."""
    e = np.flatnonzero(vis)
    w = np.asarray(weight, float)[logs.origin[e]]
    flat = logs.query[e] * logs.n_items + logs.item[e]
    return np.bincount(flat, weights=w, minlength=logs.n_queries * logs.n_items).reshape(logs.n_queries, logs.n_items)


def ndcg_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Binary-relevance NDCG@k of a ranked list of item ids against a set of relevant ids."""
    top = np.asarray(ranked)[:k]
    gains = np.isin(top, relevant).astype(float)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = disc[:min(k, len(np.unique(relevant)))].sum()
    return float((gains * disc[:len(top)]).sum() / ideal) if ideal > 0 else 0.0


def rank_items(scores: np.ndarray, candidates: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Candidates sorted by score (desc), ties by the seeded tie-break order (asc)."""
    return candidates[np.lexsort((tiebreak[candidates], -scores[candidates]))]


def peer_ndcg(logs: ClickLogs, test: HeldOut, i: int, scores: np.ndarray, own_items: np.ndarray, tiebreak, k: int):
    """Mean NDCG@k over peer i's held-out queries (relevant: its held-out items for that query; candidates: the items
    whose metadata match the query, minus the items i already clicked)."""
    sel = test.peer == i
    out = []
    for q in np.unique(test.query[sel]):
        rel = test.item[sel & (test.query == q)]
        cand = np.flatnonzero(logs.item_query[:, q])
        cand = cand[~np.isin(cand, own_items)]
        out.append(ndcg_at_k(rank_items(scores[q], cand, tiebreak), rel, k))
    return float(np.mean(out)) if out else float("nan")


def evaluate_peer(logs: ClickLogs, test: HeldOut, i: int, vv: np.ndarray, *, arms: dict, tiebreak: np.ndarray,
                  k: int = 10, top_k: int = 10, variant: str = "paper", pop_scores: np.ndarray | None = None) -> dict:
    """NDCG@k of peer i for each arm. ``arms``: name -> ("grank", vv or None for the peer's own vv, F[, variant]) or
    ("popularity",) (``pop_scores`` precomputed) or ("own",) (G-Rank over the peer's own log only)."""
    own_items = logs.item[logs.start[i]:logs.start[i + 1]]
    out, cache = {}, {}
    for name, spec in arms.items():
        if spec[0] == "popularity":
            scores = pop_scores
        else:
            if spec[0] == "own":
                v = np.zeros(logs.n_peers, np.int64)
                v[i] = vv[i]
                F = 0.0
            else:
                v = vv if spec[1] is None else np.asarray(spec[1])
                F = float(spec[2])
            var = spec[3] if len(spec) > 3 else variant
            key = (v.tobytes(), var)
            if key not in cache:
                vis = visible(logs, v)
                cache[key] = (vis, similarity(logs, v, i, top_k, var, vis))
            vis, S = cache[key]
            W = np.where(v > 0, S + F, 0.0)  # F counts only peers whose entries it holds
            scores = grank_scores(logs, vis, W)
        out[name] = peer_ndcg(logs, test, i, scores, own_items, tiebreak, k)
    return out


def itemknn_similarity(logs: ClickLogs, vv: np.ndarray) -> np.ndarray:
    """(M, M) cosine similarity of items over the peers that clicked them (binary peer x item matrix of the entries a
    version vector ``vv`` holds; diagonal 0): the item-kNN collaborative-filtering reference (context only)."""
    vis = visible(logs, vv)
    X = np.zeros((logs.n_peers, logs.n_items))
    X[logs.origin[vis], logs.item[vis]] = 1.0
    co = X.T @ X
    norm = np.sqrt(np.diag(co))
    sim = co / np.maximum(np.outer(norm, norm), 1e-12)
    np.fill_diagonal(sim, 0.0)
    return sim


def itemknn_ndcg(logs: ClickLogs, test: HeldOut, sim: np.ndarray, tiebreak: np.ndarray, k: int, peers) -> dict:
    """NDCG@k per peer of item-kNN: item m scores sum over the peer's own clicked items n of sim[n, m] (the same for
    every query; candidates are the query's items the peer has not clicked, as for every arm)."""
    out = {}
    for i in peers:
        own = logs.item[logs.start[i]:logs.start[i + 1]]
        s = sim[np.unique(own)].sum(0)
        out[int(i)] = peer_ndcg(logs, test, int(i), np.broadcast_to(s, (logs.n_queries, logs.n_items)), own,
                                tiebreak, k)
    return out


def popularity_scores(logs: ClickLogs, vv: np.ndarray) -> np.ndarray:
    """(Q, M) click counts per query over the entries held (``vv`` = everything revealed: the global popularity)."""
    return grank_scores(logs, visible(logs, vv), np.ones(logs.n_peers))


def tiebreak_order(n_items: int, seed: int) -> np.ndarray:
    """A seeded random rank per item, shared by all arms of one seed (ties never favour an arm)."""
    return np.random.default_rng([int(seed), 31]).permutation(n_items)


# ----------------------------------------------------------------------------------------------------------------------
# Gossip: messages and the peer shard (a Ray actor)
# ----------------------------------------------------------------------------------------------------------------------
def reply_entries(logs: ClickLogs, vv_requester: np.ndarray, vv_target: np.ndarray) -> np.ndarray:
    """Indices (into the entry table) of what the target holds and the requester lacks, by origin then seq."""
    lo, hi = np.asarray(vv_requester), np.asarray(vv_target)
    n = np.maximum(hi - lo, 0)
    js = np.flatnonzero(n)
    if len(js) == 0:
        return np.zeros(0, np.int64)
    reps = n[js]
    first = logs.start[js] + lo[js]
    offs = np.cumsum(reps) - reps
    return np.repeat(first - offs, reps) + np.arange(int(reps.sum()))


def apply_reply(vv: np.ndarray, payload: np.ndarray) -> np.ndarray:
    """Merge a reply (wire rows origin, seq, item, query) into a version vector; a gap (an entry beyond the next one
    missing) is an error, since logs are prefixes."""
    new = np.array(vv, copy=True)
    if len(payload) == 0:
        return new
    o, s = payload[:, 0].astype(np.int64), payload[:, 1].astype(np.int64)
    lowest = np.full(len(new), np.iinfo(np.int64).max)
    np.minimum.at(lowest, o, s)
    present = lowest < np.iinfo(np.int64).max
    if (lowest[present] > new[present]).any():
        raise ValueError("reply leaves a gap in an origin's log")
    np.maximum.at(new, o, s + 1)
    return new


class PeerShard:
    """A shard of peers: their version vectors, their own click schedule, gossip serving/merging and evaluation.

    Used as a Ray actor (``ray.remote(PeerShard)``) or in-process (tests); the driver (:class:`GossipNetwork`) routes
    requests and replies between shards.
    """

    def __init__(self, shard_id: int, peers):
        self.shard_id = int(shard_id)
        self.peers = np.asarray(peers, np.int64)
        self.logs = None

    def load(self, logs: ClickLogs, test: HeldOut, schedule: np.ndarray):
        self.logs, self.test, self.schedule = logs, test, schedule
        logs.wire()
        self.vv = np.zeros((len(self.peers), logs.n_peers), np.int64)
        return len(self.peers)

    def advance(self, rnd: int):
        """The peers' own clicks of round ``rnd`` enter their own logs (online or not)."""
        own = self.schedule[rnd, self.peers]
        idx = np.arange(len(self.peers))
        self.vv[idx, self.peers] = np.maximum(self.vv[idx, self.peers], own)
        return True

    def versions(self):
        return self.vv.astype(VV_DTYPE)

    def serve(self, requests: np.ndarray, vv_requesters: np.ndarray, shard_of: np.ndarray, n_shards: int):
        """Answer pull requests (rows: requester, target; the target is on this shard) from the state at the start of
        the round. Returns one bundle per destination shard and a ledger of what was sent."""
        table = self.logs.wire()
        local = {int(p): k for k, p in enumerate(self.peers)}
        bundles = [[] for _ in range(n_shards)]
        ledger = []
        for (a, b), vva in zip(requests, vv_requesters):
            idx = reply_entries(self.logs, vva, self.vv[local[int(b)]])
            payload = table[idx]
            bundles[int(shard_of[a])].append((int(a), int(b), payload))
            ledger.append((int(a), int(b), len(payload.tobytes()), len(idx)))
        return (*bundles, ledger)

    def merge(self, *bundles):
        local = {int(p): k for k, p in enumerate(self.peers)}
        for a, b, payload in sorted((x for bl in bundles for x in bl), key=lambda x: (x[0], x[1])):
            k = local[a]
            self.vv[k] = apply_reply(self.vv[k], payload)
        return True

    def evaluate(self, peers, arms: dict, tiebreak: np.ndarray, k: int, top_k: int, variant: str,
                 pop_vv: np.ndarray | None):
        """NDCG@k per arm for the given peers of this shard (``arms`` as in :func:`evaluate_peer`)."""
        local = {int(p): j for j, p in enumerate(self.peers)}
        pop = popularity_scores(self.logs, pop_vv) if pop_vv is not None else None
        out = {}
        for p in peers:
            out[int(p)] = evaluate_peer(self.logs, self.test, int(p), self.vv[local[int(p)]], arms=arms,
                                        tiebreak=tiebreak, k=k, top_k=top_k, variant=variant, pop_scores=pop)
        return out


class _Now:
    """In-process stand-in for a Ray actor handle: ``h.method.remote(...)`` runs the method now."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        fn = getattr(self._obj, name)

        class _M:
            def remote(self, *a, **kw):
                return fn(*a, **kw)

            def options(self, **kw):
                return self

        return _M()


class GossipNetwork:
    """The driver: shards peers over ``n_shards`` actors (Ray if ``use_ray``), runs pull-gossip rounds and keeps the
    message ledger. Peer selection is seeded by (seed, round); messages are merged in sorted order."""

    def __init__(self, n_peers: int, n_shards: int, use_ray: bool = True):
        self.n_peers, self.n_shards, self.use_ray = int(n_peers), int(n_shards), bool(use_ray)
        self.shard_of = np.arange(self.n_peers) % self.n_shards
        groups = [np.flatnonzero(self.shard_of == s) for s in range(self.n_shards)]
        if use_ray:
            import ray

            actor = ray.remote(num_cpus=1)(PeerShard)
            self.shards = [actor.remote(s, g) for s, g in enumerate(groups)]
            self._get = ray.get
            self._put = ray.put
        else:
            self.shards = [_Now(PeerShard(s, g)) for s, g in enumerate(groups)]
            self._get = lambda x: x
            self._put = lambda x: x
        self.groups = groups

    def load(self, logs: ClickLogs, test: HeldOut, schedule: np.ndarray, seed: int):
        self.logs, self.schedule, self.seed = logs, schedule, int(seed)
        refs = [self._put(x) for x in (logs, test, schedule)]
        self._get([s.load.remote(*refs) for s in self.shards])
        self.ledger: list[dict] = []
        return self

    def versions(self) -> np.ndarray:
        vv = np.zeros((self.n_peers, self.n_peers), np.int64)
        for g, part in zip(self.groups, self._get([s.versions.remote() for s in self.shards])):
            vv[g] = part
        return vv

    def targets(self, rnd: int, fanout: int = 1) -> np.ndarray:
        """(N, fanout) gossip partners: uniform over the other peers, seeded by (seed, round)."""
        rng = np.random.default_rng([self.seed, int(rnd), 41])
        t = rng.integers(0, self.n_peers - 1, size=(self.n_peers, fanout))
        return t + (t >= np.arange(self.n_peers)[:, None])

    def step(self, rnd: int, online: np.ndarray, *, advance: bool = True, fanout: int = 1) -> dict:
        """One round: own clicks of round ``rnd`` enter the logs (if ``advance``), then every online peer pulls from
        ``fanout`` peers drawn with (seed, rnd) (a pull to an offline peer fails: its request is sent, no reply
        comes)."""
        if advance:
            self._get([s.advance.remote(rnd) for s in self.shards])
        vv = self.versions()
        tgt = self.targets(rnd, fanout)
        reqs = [(a, int(b)) for a in range(self.n_peers) if online[a] for b in tgt[a]]
        served = [(a, b) for a, b in reqs if online[b]]
        per_shard = [np.array([(a, b) for a, b in served if self.shard_of[b] == s], np.int64).reshape(-1, 2)
                     for s in range(self.n_shards)]
        outs = [s.serve.options(num_returns=self.n_shards + 1).remote(r, vv[r[:, 0]], self.shard_of, self.n_shards)
                for s, r in zip(self.shards, per_shard)]
        self._get([d.merge.remote(*[outs[s][di] for s in range(self.n_shards)]) for di, d in enumerate(self.shards)])
        rows = sorted(x for o in self._get([o[-1] for o in outs]) for x in o)
        req_bytes = self.n_peers * np.dtype(VV_DTYPE).itemsize
        rec = {"round": int(rnd), "requests": len(reqs), "failed": len(reqs) - len(served),
               "request_bytes": len(reqs) * req_bytes, "reply_bytes": int(sum(r[2] for r in rows)),
               "entries": int(sum(r[3] for r in rows))}
        self.ledger.append(rec)
        return rec

    def evaluate(self, peers, arms: dict, tiebreak: np.ndarray, *, k: int = 10, top_k: int = 10,
                 variant: str = "paper", pop_vv: np.ndarray | None = None) -> dict:
        peers = np.asarray(sorted(int(p) for p in peers))
        jobs = [s.evaluate.remote(peers[self.shard_of[peers] == si], arms, tiebreak, k, top_k, variant, pop_vv)
                for si, s in enumerate(self.shards)]
        out = {}
        for part in self._get(jobs):
            out.update(part)
        return {p: out[p] for p in sorted(out)}


# ----------------------------------------------------------------------------------------------------------------------
# One seed of the experiment
# ----------------------------------------------------------------------------------------------------------------------
def offline_plan(n_peers: int, rounds: int, fraction: float, start: float, end: float, seed: int):
    """(offline peers, first offline round, first round back): a seeded ``fraction`` of the peers is disconnected
    during rounds [start * rounds, end * rounds)."""
    k = int(round(fraction * n_peers))
    peers = np.sort(np.random.default_rng([int(seed), 53]).choice(n_peers, size=k, replace=False))
    return peers, int(round(start * rounds)), int(round(end * rounds))


def held_stats(vv: np.ndarray, revealed: np.ndarray) -> dict:
    """Fraction of the revealed training clicks each peer (a row of ``vv``) holds: mean, minimum and maximum."""
    frac = np.asarray(vv).sum(1) / max(int(np.asarray(revealed).sum()), 1)
    return {"mean": float(frac.mean()), "min": float(frac.min()), "max": float(frac.max())}


def run_seed(net: GossipNetwork, logs: ClickLogs, test: HeldOut, *, seed: int, rounds: int, offline_fraction: float,
             offline_start: float, offline_end: float, flush_rounds: int, k: int = 10, top_k: int = 10,
             variant: str = "paper", fanout: int = 1, curve_rounds=(), curve_stride: int = 1,
             extra_arms: dict | None = None) -> dict:
    """Continuous G-Rank on ``net`` for one seed: ``rounds`` gossip rounds over the time-ordered logs with a seeded set
    of peers offline for a window; evaluation of the offline peers at the end of their offline window (while still
    disconnected), of every peer after the last round, then gossip without new clicks until every peer holds every log
    (at most ``flush_rounds``). Returns per-peer NDCG@k per arm, knowledge curves and the message ledger."""
    schedule = round_schedule(logs, rounds)
    net.load(logs, test, schedule, seed)
    tb = tiebreak_order(logs.n_items, seed)
    full = logs.lengths.astype(np.int64)
    off, r0, r1 = offline_plan(logs.n_peers, rounds, offline_fraction, offline_start, offline_end, seed)
    is_off = np.zeros(logs.n_peers, bool)
    is_off[off] = True
    eval_kw = dict(k=k, top_k=top_k, variant=variant)
    out = {"offline_peers": off.tolist(), "offline_rounds": [r0, r1], "knowledge": [], "curve": {}}

    def knowledge(vv, revealed):
        frac = vv.sum(1) / max(int(revealed.sum()), 1)
        return {"online": float(frac[~is_off].mean()), "offline": float(frac[is_off].mean()) if off.size else None}

    for r in range(rounds):
        online = np.ones(logs.n_peers, bool)
        if r0 <= r < r1:
            online[off] = False
        net.step(r, online, fanout=fanout)
        vv = net.versions()
        out["knowledge"].append(knowledge(vv, schedule[r]))
        if r == r1 - 1 and off.size:  # offline peers, still disconnected, against the centre at the same time
            arms = {"grank": ("grank", None, 0.0), "central": ("grank", schedule[r], 0.0), "popularity": ("popularity",)}
            out["while_offline"] = net.evaluate(off, arms, tb, pop_vv=schedule[r], **eval_kw)
            out["held_while_offline"] = held_stats(vv[off], schedule[r])
        if r in set(curve_rounds):
            peers = np.arange(0, logs.n_peers, curve_stride)
            arms = {"grank": ("grank", None, 0.0), "central": ("grank", schedule[r], 0.0), "popularity": ("popularity",)}
            out["curve"][int(r)] = net.evaluate(peers, arms, tb, pop_vv=schedule[r], **eval_kw)
    arms = {"grank": ("grank", None, 0.0), "grank_f1": ("grank", None, 1.0), "central": ("grank", full, 0.0),
            "popularity": ("popularity",), "own_log": ("own",), **(extra_arms or {})}
    arms = {a: (s[:1] + (full,) + s[2:] if s[0] == "grank" and isinstance(s[1], str) and s[1] == "full" else s)
            for a, s in arms.items()}
    out["final"] = net.evaluate(np.arange(logs.n_peers), arms, tb, pop_vv=full, **eval_kw)
    vv = net.versions()
    out["held_final"] = held_stats(vv, full)  # what G-Rank ranked with; centralised and popularity use ``full``
    out["held_final_offline"] = held_stats(vv[off], full) if off.size else None
    out["held_fraction_final"] = (vv.sum(1) / full.sum()).tolist()
    gossip_rounds = len(net.ledger)
    converged_after = None
    for extra in range(flush_rounds):
        vv = net.versions()
        if (vv == full[None, :]).all():
            converged_after = extra
            break
        net.step(rounds + extra, np.ones(logs.n_peers, bool), advance=False, fanout=fanout)  # no new clicks
    vv = net.versions()
    if converged_after is None and (vv == full[None, :]).all():
        converged_after = flush_rounds
    out["complete_fraction"] = float((vv == full[None, :]).all(1).mean())
    out["flush_rounds_to_converge"] = converged_after
    out["ledger"] = list(net.ledger)
    out["ledger_rounds"] = gossip_rounds
    delivered = int(sum(x["entries"] for x in net.ledger))
    out["entries_delivered"] = delivered
    out["entries_needed"] = int((logs.n_peers - 1) * full.sum())  # every peer lacks every other origin's log
    return out


def rounds_sweep(net: GossipNetwork, logs: ClickLogs, test: HeldOut, *, seed: int, rounds_list, stride: int,
                 k: int = 10, top_k: int = 10, variant: str = "paper", fanout: int = 1) -> list[dict]:
    """The rounds sweep: for each number of rounds, gossip over the whole timeline (every peer online), then G-Rank on
    the gossiped logs of every ``stride``-th peer beside centralised G-Rank and popularity (complete logs, the same for
    every point: computed once). Fewer rounds = fewer pulls per click revealed: peers hold less at evaluation."""
    full = logs.lengths.astype(np.int64)
    tb = tiebreak_order(logs.n_items, seed)
    peers = np.arange(0, logs.n_peers, stride)
    ref, out = None, []
    for rounds in rounds_list:
        schedule = round_schedule(logs, int(rounds))
        net.load(logs, test, schedule, seed)
        for r in range(int(rounds)):
            net.step(r, np.ones(logs.n_peers, bool), fanout=fanout)
        arms = {"grank": ("grank", None, 0.0)}
        if ref is None:
            arms.update(central=("grank", full, 0.0), popularity=("popularity",))
        ev = net.evaluate(peers, arms, tb, k=k, top_k=top_k, variant=variant, pop_vv=full if ref is None else None)
        m = {a: float(np.mean([ev[p][a] for p in ev])) for a in arms}
        if ref is None:
            ref = {"central": m["central"], "popularity": m["popularity"]}
        m.update(ref)
        held = held_stats(net.versions(), full)
        out.append({"rounds": int(rounds), "peers_evaluated": len(ev), **m, "ratio": m["grank"] / m["central"],
                    "held_mean": held["mean"], "held_min": held["min"]})
    return out
