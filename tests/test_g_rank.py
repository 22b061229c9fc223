"""G-Rank (arXiv 2301.12530): the similarity and ranking against naive loops over sets, NDCG against scikit-learn and a
hand computation, and the gossip protocol against direct checks (convergence, exactly-once delivery, shard-count
independence, message contents)."""
import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from reprolab.fed import g_rank as G


def tiny_logs(seed=0, n_peers=5, n_items=12, n_queries=3, per_peer=(6, 4, 7, 3, 5)):
    rng = np.random.default_rng(seed)
    item_query = rng.random((n_items, n_queries)) < 0.5
    item_query[np.arange(n_items), rng.integers(0, n_queries, n_items)] = True
    users, items, ts = [], [], []
    for u in range(n_peers):
        n = per_peer[u] + 2  # + held-out
        its = rng.choice(n_items, size=n, replace=False)
        users += [u] * n
        items += its.tolist()
        ts += rng.integers(0, 1000, n).tolist()
    return G.build_logs(np.array(users), np.array(items), np.array(ts), item_query, test_frac=0.25, seed=seed)


def naive_similarity(logs, vv, i, K=10):
    """The paper's Sec. III-D, written over Python sets of (query, item) tuples and term counts."""
    held = {j: [(int(logs.query[e]), int(logs.item[e])) for e in range(len(logs.origin))
                if logs.origin[e] == j and logs.seq[e] < vv[j]] for j in range(logs.n_peers)}

    def top(entries):
        counts = {}
        for q, _ in entries:
            counts[q] = counts.get(q, 0) + 1
        return {q for q, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:K]}

    S = []
    for j in range(logs.n_peers):
        A, B = set(held[i]), set(held[j])
        kt = len(top(held[i]) & top(held[j]))
        km = len(A & B)
        ku = len(A | B)
        S.append((kt + km ** 2) / ku if ku else 0.0)
    S = np.array(S)
    return S / S.max()


def naive_scores(logs, vv, i, F, K=10):
    S = naive_similarity(logs, vv, i, K)
    R = np.zeros((logs.n_queries, logs.n_items))
    for e in range(len(logs.origin)):
        j = logs.origin[e]
        if logs.seq[e] < vv[j]:
            R[logs.query[e], logs.item[e]] += S[j] + F  # C_k(j) (S_i(n_j) + F), one click at a time
    return R


@pytest.mark.parametrize("K", [10, 1])
def test_similarity_and_scores_match_naive_loops(K):
    logs, _ = tiny_logs()
    full = logs.lengths
    rng = np.random.default_rng(3)
    for vv in (full, np.minimum(full, rng.integers(0, 5, logs.n_peers))):
        for i in range(logs.n_peers):
            v = vv.copy()
            v[i] = full[i]
            S = G.similarity(logs, v, i, top_k=K)
            np.testing.assert_allclose(S, naive_similarity(logs, v, i, K), rtol=1e-12, atol=1e-12)
            for F in (0.0, 1.0):
                W = np.where(v > 0, S + F, 0.0)
                got = G.grank_scores(logs, G.visible(logs, v), W)
                np.testing.assert_allclose(got, naive_scores(logs, v, i, F, K), rtol=1e-12, atol=1e-12)


def test_code_variant_matches_the_official_notebook_formula():
    logs, _ = tiny_logs(seed=1)
    full = logs.lengths
    for i in range(logs.n_peers):
        mine = {int(logs.item[e]): int(logs.query[e]) for e in range(len(logs.origin)) if logs.origin[e] == i}
        raw = []
        for j in range(logs.n_peers):
            theirs = {int(logs.item[e]): int(logs.query[e]) for e in range(len(logs.origin)) if logs.origin[e] == j}
            shared_terms = set(mine.values()) & set(theirs.values())
            if not shared_terms:
                raw.append(0.0)
                continue
            a = {m for m, q in mine.items() if q in shared_terms}
            b = {m for m, q in theirs.items() if q in shared_terms}
            ct_i = {q: list(mine.values()).count(q) for q in set(mine.values())}
            ct_j = {q: list(theirs.values()).count(q) for q in set(theirs.values())}
            top_i = {q for q, _ in sorted(ct_i.items(), key=lambda x: (-x[1], x[0]))[:10]}
            top_j = {q for q, _ in sorted(ct_j.items(), key=lambda x: (-x[1], x[0]))[:10]}
            raw.append((len(a & b) + len(top_i & top_j) ** 2) / len(set(mine) | set(theirs)))
        raw = np.array(raw)
        np.testing.assert_allclose(G.similarity(logs, full, i, variant="code"), raw / raw.max(), rtol=1e-12)


def test_ndcg_matches_sklearn_and_a_hand_computation():
    # hand: relevant {3, 7}; ranked [7, 1, 3, ...] -> DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    assert G.ndcg_at_k(np.array([7, 1, 3, 4, 5]), np.array([3, 7]), 10) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert G.ndcg_at_k(np.array([1, 2, 3]), np.array([9]), 10) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(12, 40))
        scores = rng.permutation(n).astype(float)  # no ties: sklearn averages over ties, we break them
        rel = np.zeros(n)
        rel[rng.choice(n, size=int(rng.integers(1, 6)), replace=False)] = 1
        ranked = np.argsort(-scores)
        got = G.ndcg_at_k(ranked, np.flatnonzero(rel), 10)
        assert got == pytest.approx(ndcg_score(rel[None], scores[None], k=10), abs=1e-12)


def test_ranking_breaks_ties_by_the_seeded_order_and_excludes_own_items():
    logs, test = tiny_logs()
    tb = G.tiebreak_order(logs.n_items, 0)
    scores = np.zeros(logs.n_items)
    cand = np.arange(logs.n_items)
    np.testing.assert_array_equal(G.rank_items(scores, cand, tb), np.argsort(tb))
    scores[5] = 2.0
    assert G.rank_items(scores, cand, tb)[0] == 5
    # own-log-only ranks every new item at score 0: its ranking is the tie-break order (the chance reference)
    i = int(test.peer[0])
    r = G.evaluate_peer(logs, test, i, logs.lengths, arms={"own": ("own",)}, tiebreak=tb)
    own = logs.item[logs.start[i]:logs.start[i + 1]]
    want = []
    for q in np.unique(test.query[test.peer == i]):
        cand = np.setdiff1d(np.flatnonzero(logs.item_query[:, q]), own)
        rel = test.item[(test.peer == i) & (test.query == q)]
        want.append(G.ndcg_at_k(cand[np.argsort(tb[cand])], rel, 10))
    assert r["own"] == pytest.approx(np.mean(want))


def test_split_holds_out_each_peers_latest_interactions_and_queries_are_item_genres():
    logs, test = tiny_logs()
    for u in range(logs.n_peers):
        tr = logs.ts[logs.origin == u]
        assert (np.diff(tr) >= 0).all()  # time order within a log
        n = len(tr) + int((test.peer == u).sum())
        assert (test.peer == u).sum() == max(1, round(0.25 * n))
        assert test.ts[test.peer == u].min() >= tr.max()  # held out: the latest interactions
    assert logs.item_query[logs.item, logs.query].all() and logs.item_query[test.item, test.query].all()
    sched = G.round_schedule(logs, 4)
    np.testing.assert_array_equal(sched[-1], logs.lengths)
    assert (np.diff(sched, axis=0) >= 0).all()


def gossip(n_shards, seed=0, rounds=6, flush=30, offline=()):
    logs, test = tiny_logs(seed=seed, n_peers=9, n_items=20, per_peer=(6, 4, 7, 3, 5, 8, 2, 6, 5))
    net = G.GossipNetwork(logs.n_peers, n_shards, use_ray=False).load(logs, test, G.round_schedule(logs, rounds), seed)
    for r in range(rounds):
        online = np.ones(logs.n_peers, bool)
        online[list(offline)] = False
        net.step(r, online)
    for r in range(flush):
        net.step(rounds + r, np.ones(logs.n_peers, bool), advance=False)
    return logs, net


def test_gossip_converges_every_peer_holds_every_log_exactly_once():
    logs, net = gossip(3, offline=(2, 5))
    vv = net.versions()
    np.testing.assert_array_equal(vv, np.tile(logs.lengths, (logs.n_peers, 1)))  # direct check: all logs, all peers
    delivered = sum(x["entries"] for x in net.ledger)
    assert delivered == (logs.n_peers - 1) * logs.lengths.sum()  # no duplicates, nothing missing
    assert all(x["reply_bytes"] == G.ENTRY_BYTES * x["entries"] for x in net.ledger)
    assert all(x["request_bytes"] == 4 * logs.n_peers * x["requests"] for x in net.ledger)


def test_offline_peers_neither_pull_nor_answer():
    logs, net = gossip(2, rounds=4, flush=0, offline=(0,))
    vv = net.versions()
    assert (np.delete(vv[0], 0) == 0).all()  # peer 0 learnt nothing from others
    others = np.delete(np.arange(logs.n_peers), 0)
    assert (vv[others, 0] == 0).all()  # and nobody got its log
    assert sum(x["failed"] for x in net.ledger) > 0


def test_results_do_not_depend_on_the_number_of_shards():
    _, a = gossip(1, flush=2)
    _, b = gossip(4, flush=2)
    np.testing.assert_array_equal(a.versions(), b.versions())
    assert a.ledger == b.ledger


def test_replies_carry_the_missing_entries_and_gaps_are_refused():
    logs, _ = tiny_logs()
    table = logs.wire()
    lo = np.array([1, 0, 7, 0, 2])
    hi = logs.lengths
    idx = G.reply_entries(logs, lo, hi)
    want = [e for e in range(len(logs.origin)) if lo[logs.origin[e]] <= logs.seq[e] < hi[logs.origin[e]]]
    assert idx.tolist() == want
    np.testing.assert_array_equal(G.apply_reply(np.minimum(lo, hi), table[idx]), np.maximum(np.minimum(lo, hi), hi))
    with pytest.raises(ValueError, match="gap"):
        G.apply_reply(np.zeros(logs.n_peers, np.int64), table[idx])  # peer 0 would skip its first entry

# The Ray path (GossipNetwork(use_ray=True)) is exercised by the notebook's smoke run, which `make test` runs twice and
# compares byte for byte; here the same shard code runs in-process (a Ray start costs more than this whole file).


def naive_counts(logs, vv):
    """Raw click counts per (query, item) over the entries held, one click at a time."""
    R = np.zeros((logs.n_queries, logs.n_items))
    for e in range(len(logs.origin)):
        if logs.seq[e] < vv[logs.origin[e]]:
            R[logs.query[e], logs.item[e]] += 1
    return R


def test_evaluate_peer_arms_match_ndcg_of_naive_scores():
    """Each arm of evaluate_peer against peer_ndcg on scores from the naive loops: G-Rank on the peer's own (partial)
    log, centralised G-Rank on the complete logs, popularity on raw counts (catches a weight that ignores S)."""
    logs, test = tiny_logs(seed=2, n_peers=9, n_items=20, per_peer=(9, 8, 10, 7, 9, 11, 8, 10, 9))
    full = logs.lengths.astype(np.int64)
    tb = G.tiebreak_order(logs.n_items, 2)
    rng = np.random.default_rng(5)
    pop = G.popularity_scores(logs, full)
    np.testing.assert_array_equal(pop, naive_counts(logs, full))
    arms = {"grank": ("grank", None, 0.0), "grank_f1": ("grank", None, 1.0), "central": ("grank", full, 0.0),
            "popularity": ("popularity",)}
    for i in np.unique(test.peer):
        vv = np.minimum(full, rng.integers(1, 8, logs.n_peers))
        vv[i] = full[i]
        own = logs.item[logs.start[i]:logs.start[i + 1]]
        got = G.evaluate_peer(logs, test, int(i), vv, arms=arms, tiebreak=tb, pop_scores=pop)
        want = {"grank": naive_scores(logs, vv, i, 0.0), "grank_f1": naive_scores(logs, vv, i, 1.0),
                "central": naive_scores(logs, full, i, 0.0), "popularity": naive_counts(logs, full)}
        for a, sc in want.items():
            assert got[a] == pytest.approx(G.peer_ndcg(logs, test, int(i), sc, own, tb, 10), abs=1e-12), (i, a)
    # the similarity weights matter here: ranking by the raw counts of the same partial log differs for some peer
    own_of = {int(i): logs.item[logs.start[i]:logs.start[i + 1]] for i in np.unique(test.peer)}
    assert any(G.peer_ndcg(logs, test, i, naive_scores(logs, full, i, 0.0), own, tb, 10)
               != pytest.approx(G.peer_ndcg(logs, test, i, naive_counts(logs, full), own, tb, 10), abs=1e-12)
               for i, own in own_of.items())


def test_run_seed_ranks_with_partial_logs_and_centralised_with_full_logs():
    logs, test = tiny_logs(seed=3, n_peers=9, n_items=20, per_peer=(6, 4, 7, 3, 5, 8, 2, 6, 5))
    net = G.GossipNetwork(logs.n_peers, 2, use_ray=False)
    out = G.run_seed(net, logs, test, seed=3, rounds=4, offline_fraction=0.25, offline_start=0.25, offline_end=0.75,
                     flush_rounds=30)
    full = logs.lengths.astype(np.int64)
    held = np.array(out["held_fraction_final"])
    assert held.mean() < 1.0 and held.min() < 1.0  # at evaluation peers hold less than every log
    assert out["held_final"]["mean"] == pytest.approx(held.mean()) and out["held_final"]["min"] == pytest.approx(held.min())
    assert out["complete_fraction"] == 1.0  # ... and all of it after the flush
    tb = G.tiebreak_order(logs.n_items, 3)
    pop = G.popularity_scores(logs, full)
    for i, r in out["final"].items():
        ref = G.evaluate_peer(logs, test, i, full, arms={"c": ("grank", None, 0.0)}, tiebreak=tb, pop_scores=pop)
        assert r["central"] == pytest.approx(ref["c"], abs=1e-12)  # the centralised arm ranks with the complete logs
    assert any(r["grank"] != pytest.approx(r["central"], abs=1e-12) for r in out["final"].values())


def test_itemknn_is_cosine_over_peers():
    logs, test = tiny_logs()
    sim = G.itemknn_similarity(logs, logs.lengths)
    users = {m: {int(logs.origin[e]) for e in range(len(logs.origin)) if logs.item[e] == m} for m in range(logs.n_items)}
    for a in range(logs.n_items):
        for b in range(logs.n_items):
            want = 0.0 if a == b or not users[a] or not users[b] else (
                len(users[a] & users[b]) / math.sqrt(len(users[a]) * len(users[b])))
            assert sim[a, b] == pytest.approx(want, abs=1e-12)
