"""CAFE (arXiv 2312.03256): HotSketch against exact counting and a loop reference; hot/cold routing against a naive
lookup; migration; byte accounting; the CTR data."""
from collections import Counter

import numpy as np
import pytest
import torch

from reprolab.embed import CafeEmbedding, HotSketch, ml100k_ctr, naive_cafe_lookup, universal_hash, zipf_ctr_stream
from reprolab.embed.model import DLRMLite, cafe_settings, cafe_sizes, make_table, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def zipf_stream(n, n_ids, alpha, seed):
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_ids + 1, dtype=float) ** -alpha
    perm = rng.permutation(n_ids)
    return perm[rng.choice(n_ids, n, p=p / p.sum())]


class LoopSketch:
    """Reference HotSketch with Python dicts/lists, written from the official sketch.cpp (SS::Insert, SS::decay) with
    the batch order of HotSketch.insert: a decay first if the mass since the last one exceeds n * k * 10 (hot entries
    whose decayed score is below k are demoted); sum duplicates; add to present ids; then, in increasing id order, fill
    an empty slot, or replace the minimum with s_min + s unless that slot is hot (then the newcomer is dropped)."""

    def __init__(self, n_buckets, slots, seed, decay=1.0, threshold=None):
        self.b = [[] for _ in range(n_buckets)]  # list of [id, score, hot_row]
        self.n, self.slots, self.seed, self.decay, self.k = n_buckets, slots, seed, decay, threshold
        self.mass = 0.0

    def insert(self, xs, ss):
        freed = []
        if self.k is not None and self.mass > self.n * self.k * 10:
            for bk in self.b:
                for e in bk:
                    if e[2] >= 0 and e[1] * self.decay < self.k:
                        freed.append(e[2])
                        e[2] = -1
                    e[1] *= self.decay
            self.mass = 0.0
        agg = Counter()
        for x, s in zip(xs.tolist(), ss.tolist()):
            agg[x] += s
            self.mass += s
        absent = []
        for x in sorted(agg):
            bk = self.b[int(universal_hash(np.int64(x), self.n, self.seed))]
            hit = [e for e in bk if e[0] == x]
            if hit:
                hit[0][1] += agg[x]
            else:
                absent.append(x)
        for x in absent:
            bk = self.b[int(universal_hash(np.int64(x), self.n, self.seed))]
            if len(bk) < self.slots:
                bk.append([x, agg[x], -1])
            else:
                j = min(range(len(bk)), key=lambda i: bk[i][1])
                if bk[j][2] < 0:
                    bk[j] = [x, bk[j][1] + agg[x], -1]
        return sorted(freed)

    def set_hot(self, x, row):
        bk = self.b[int(universal_hash(np.int64(x), self.n, self.seed))]
        [e for e in bk if e[0] == x][0][2] = row

    def state(self):
        return {x: (s, h) for bk in self.b for x, s, h in bk}


def test_hotsketch_reports_true_heavy_hitters():
    stream = zipf_stream(60_000, 20_000, 1.2, seed=0)
    sk = HotSketch(n_buckets=256, slots=4, decay=1.0, seed=3)
    for i in range(0, len(stream), 1000):
        sk.insert(stream[i:i + 1000], np.ones(1000))
    exact = Counter(stream.tolist())
    true_top = [x for x, _ in sorted(exact.items(), key=lambda kv: (-kv[1], kv[0]))[:20]]
    assert set(sk.top(20).tolist()) == set(true_top), "the sketch must report the 20 true heavy hitters"
    est, _ = sk.query(np.array(true_top))
    truth = np.array([exact[x] for x in true_top], dtype=float)
    assert (est >= truth).all(), "SpaceSaving-style scores never underestimate a tracked id"
    assert (est <= truth * 1.25).all(), "heavy hitters' scores are close to their counts"
    # a small sketch with many distinct ids must NOT be exact: the check above can fail
    tiny = HotSketch(n_buckets=4, slots=4, decay=1.0, seed=3)
    tiny.insert(stream, np.ones(len(stream)))
    assert set(tiny.top(20).tolist()) != set(true_top)


def test_hotsketch_matches_loop_reference_with_weights_hot_slots_and_decay():
    rng = np.random.default_rng(1)
    ref = LoopSketch(64, 4, seed=5, decay=0.9, threshold=2.0)
    sk = HotSketch(64, 4, decay=0.9, seed=5, threshold=2.0)
    next_row, n_freed = 0, 0
    for step in range(40):
        xs = zipf_stream(300, 3000, 1.0, seed=int(rng.integers(1 << 30)))
        ss = rng.exponential(1.0, len(xs))
        freed, _ = sk.insert(xs, ss)
        assert sorted(freed) == ref.insert(xs, ss)
        n_freed += len(freed)
        if step % 5 == 0:  # mark some ids hot in both, as a promotion would
            for x in sk.top(80)[-6:].tolist():  # low-ranked ids: some decay below k
                _, h = sk.query(np.array([x]))
                if h[0] < 0:
                    sk.set_hot(np.array([x]), np.array([next_row]))
                    ref.set_hot(x, next_row)
                    next_row += 1
    mine = {int(x): (float(s), int(h)) for x, s, h in zip(sk.ids.ravel(), sk.score.ravel(), sk.hot.ravel()) if x >= 0}
    theirs = ref.state()
    assert mine.keys() == theirs.keys()
    np.testing.assert_allclose([mine[k][0] for k in sorted(mine)], [theirs[k][0] for k in sorted(theirs)], rtol=1e-9)
    assert [mine[k][1] for k in sorted(mine)] == [theirs[k][1] for k in sorted(theirs)]
    assert sk.decays > 0 and n_freed > 0, "the run must exercise the mass-triggered decay and a demotion"


def test_hot_slot_is_never_evicted_by_a_newcomer():
    sk = HotSketch(1, 2, seed=0)
    sk.insert(np.array([1, 2]), np.array([1.0, 5.0]))
    sk.set_hot(np.array([1]), np.array([0]))  # the minimum slot is hot
    _, new = sk.insert(np.array([3]), np.array([10.0]))
    assert sorted(sk.ids[0].tolist()) == [1, 2] and len(new) == 0, "a hot minimum slot keeps its feature"
    sk.set_hot(np.array([1]), np.array([-1]))
    _, new = sk.insert(np.array([3]), np.array([10.0]))
    s, _ = sk.query(np.array([3]))
    assert sorted(sk.ids[0].tolist()) == [2, 3] and s[0] == 11.0 and new.tolist() == [3], "else SpaceSaving"


def test_decay_is_triggered_by_mass_and_demotes():
    sk = HotSketch(2, 4, decay=0.5, seed=0, threshold=1.0)  # decays once the mass exceeds 2 * 1 * 10 = 20
    sk.insert(np.array([1, 2]), np.array([12.0, 3.0]))
    sk.set_hot(np.array([1, 2]), np.array([0, 1]))
    freed, _ = sk.insert(np.array([5]), np.array([6.0]))  # mass 15 before this batch: no decay
    assert freed == [] and sk.decays == 0
    freed, _ = sk.insert(np.array([5]), np.array([1.0]))  # mass 21 > 20: decay first
    s, h = sk.query(np.array([1, 2, 5]))
    np.testing.assert_allclose(s, [6.0, 1.5, 4.0])
    assert freed == [] and h.tolist() == [0, 1, -1]
    sk.mass = 100.0
    freed, _ = sk.insert(np.array([9]), np.array([0.1]))
    s, h = sk.query(np.array([1, 2]))
    assert freed == [1] and h.tolist() == [0, -1], "id 2's decayed score 0.75 < 1: demoted, row 1 freed"


def _trained_cafe(levels):
    data = zipf_ctr_stream(6000, n_fields=3, ids_per_field=2000, alpha=1.2, seed=0)
    emb = CafeEmbedding(data.n_features, 8, n_hot=40, n_hash=50, n_buckets=30, slots=4, hot_threshold=1.0,
                        decay=0.99, levels=levels, medium_threshold=0.5, seed=0)
    model = DLRMLite(emb, data.n_fields, 8, hidden=16)
    train(model, data, epochs=1, batch_size=256, lr=1e-2)
    return emb, data


@pytest.mark.parametrize("levels", [1, 2])
def test_lookup_with_hot_cold_routing_equals_naive_loop(levels):
    emb, data = _trained_cafe(levels)
    emb.eval()
    x = torch.from_numpy(data.x_test[:200])
    hot, _, h2 = emb.route(x.reshape(-1).numpy())
    assert (hot >= 0).any() and (hot < 0).any(), "the test batch must mix hot and cold ids"
    if levels == 2:
        assert (h2 >= 0).any(), "and some medium ids (two hash rows)"
    with torch.no_grad():
        torch.testing.assert_close(emb(x), naive_cafe_lookup(emb, x))
    # the hot set is consistent: every hot row has one owner, and the sketch points back to it
    feats = emb.hot_features()
    _, rows = emb.sketch.query(feats)
    assert len(np.unique(rows)) == len(feats) and (emb.row_owner[rows] == feats).all()
    assert len(feats) + len(emb.free_rows) == emb.n_hot


def test_migration_copies_the_hash_row_and_scores_are_gradient_norms():
    emb = CafeEmbedding(100, 4, n_hot=3, n_hash=5, n_buckets=8, slots=4, hot_threshold=1.5, decay=1.0, seed=0)
    x = torch.tensor([[7, 7, 7, 7, 3, 3, 11, 11]])
    e = emb(x)
    w = torch.zeros_like(e)
    w[0, :4] = 1.0  # only id 7 gets gradient
    (e * w).sum().backward()
    before = emb.hash_weight.detach().clone()
    emb.after_backward(None)
    s, hot = emb.sketch.query(np.array([7, 3, 11]))
    # per-occurrence grad norms: 2 for the four occurrences of 7, 0 otherwise; normalised to mean 1 -> 8/4 * 2
    np.testing.assert_allclose(s, [8.0, 0.0, 0.0])
    assert hot[0] >= 0 and hot[1] < 0 and hot[2] < 0, "only id 7 crosses the threshold"
    h = int(universal_hash(np.int64(7), 5, 1))
    torch.testing.assert_close(emb.hot_weight.data[hot[0]], before[h])


def test_cafe_bytes_fit_the_budget():
    budget = 100_000
    sz = cafe_sizes(budget, 16, hot_frac=0.5, slots_per_hot=2, slots=4)
    emb = CafeEmbedding(10 ** 6, 16, sz["n_hot"], sz["n_hash"], sz["n_buckets"], 4)
    assert 0.97 * budget <= emb.nbytes() <= budget
    assert emb.nbytes() == (sz["n_hot"] + sz["n_hash"]) * 64 + sz["n_buckets"] * 4 * 12


def test_official_sizing_matches_init_embed():
    """init_embed.py: hotn = int(totn * rate * (1 - hash_rate) * 4d / (4d + 48)); one 4-slot bucket per hot row;
    hash rows = ceil(rate * hash_rate * n)."""
    totn, d = 1_000_000, 16
    for ratio, (thr, hash_rate) in ((10, (20, 0.5)), (100, (100, 0.3)), (1000, (500, 0.2))):
        assert cafe_settings(ratio, {"cafe_schedule": "criteo"}) == (thr, hash_rate)
        rate = 1 / ratio
        sz = cafe_sizes(totn * d * 4 * rate, d, 1 - hash_rate, slots_per_hot=4, slots=4)
        assert abs(sz["n_hot"] - int(totn * rate * (1 - hash_rate) * (4 * d / (4 * d + 48)))) <= 1
        assert sz["n_buckets"] == sz["n_hot"]
        assert abs(sz["n_hash"] - np.ceil(rate * hash_rate * totn)) <= 2
    assert cafe_settings(30, {"cafe_schedule": "criteo"}) == (30, 0.5)  # nearest listed ratio on a log scale: 20x
    assert cafe_settings(30, {"cafe_schedule": "fixed", "hot_threshold": 7.0, "hash_rate": 0.4}) == (7.0, 0.4)


def test_zipf_stream_has_zipf_head_and_drift():
    d = zipf_ctr_stream(40_000, n_fields=2, ids_per_field=5000, alpha=1.1, drift_at=0.5, drift_frac=0.5,
                        test_fraction=0.1, seed=0)
    f0 = d.x_train[:20_000, 0]
    counts = np.sort(np.bincount(f0, minlength=5000))[::-1][:50].astype(float)
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts), 1)[0]
    assert abs(slope + 1.1) < 0.25, f"log-log slope {slope} should be about -alpha"
    before = set(np.argsort(-np.bincount(f0, minlength=5000))[:50])
    after = set(np.argsort(-np.bincount(d.x_train[20_000:, 0], minlength=5000))[:50])
    assert len(before & after) < 45, "drift must change part of the head"
    assert d.x_train[:, 1].min() >= 5000 and 0.05 < d.y_train.mean() < 0.95


def test_ml100k_ctr_is_time_ordered():
    from reprolab.data import load_ml100k

    d = ml100k_ctr(0.2)
    assert d.x_train.shape == (80_000, 8) and d.x_test.shape == (20_000, 8)
    assert d.field_sizes[:2] == [943, 1682] and d.n_features == d.x_train.max() + 1 or d.n_features > d.x_train.max()
    ratings = load_ml100k()[0]
    cut = np.sort(ratings["timestamp"].to_numpy())[80_000 - 1]
    assert (np.sort(ratings["timestamp"].to_numpy())[80_000:] >= cut).all()
    clicks = (ratings["rating"].to_numpy() >= 4).mean()
    assert np.isclose(np.concatenate([d.y_train, d.y_test]).mean(), clicks)


def test_make_table_respects_budget_for_cafe_and_hash():
    d = zipf_ctr_stream(2000, n_fields=2, ids_per_field=5000, seed=0)
    cfg = {"cafe_schedule": "criteo", "slots_per_hot": 4, "slots": 4, "decay": 0.99, "medium_threshold": 0.5}
    full = d.n_features * 16 * 4
    for r in (10, 100):
        for m in ("hash", "cafe", "cafe_ml"):
            t = make_table(m, d, 16, r, cfg)
            assert 0.95 * full / r <= t.nbytes() <= full / r, (m, r)
        assert make_table("cafe", d, 16, r, cfg).hot_threshold == {10: 20, 100: 100}[r]


def test_free_sketch_ablation_puts_the_sketch_outside_the_budget():
    d = zipf_ctr_stream(2000, n_fields=2, ids_per_field=5000, seed=0)
    cfg = {"cafe_schedule": "criteo", "slots_per_hot": 4, "slots": 4, "decay": 0.99, "medium_threshold": 1.0}
    budget = d.n_features * 16 * 4 / 100
    strict, nosk = make_table("cafe", d, 16, 100, cfg), make_table("cafe_nosk", d, 16, 100, cfg)
    tables = (nosk.n_hot + nosk.n_hash) * 16 * 4
    assert 0.99 * budget <= tables <= budget and nosk.nbytes() == tables + nosk.sketch.nbytes()
    assert nosk.nbytes() > budget >= strict.nbytes() and nosk.n_hot > strict.n_hot
