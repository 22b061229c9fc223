"""CAFE (arXiv 2312.03256): HotSketch against exact counting and a loop reference; hot/cold routing against a naive
lookup; migration; byte accounting; the CTR data."""
from collections import Counter, deque

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


class OfficialSS:
    """An independent transliteration of the official HotSketch, HugoZHL/CAFE @c757c39
    ArtifactEvaluation/embeddings/sketch.cpp, class SS, kept as close to the C++ as Python allows: fixed arrays
    val/cnt/dic of 4 slots per bucket, hot ids 1 .. lim-1 in a FIFO queue (dic 0 = not hot), Insert occurrence by
    occurrence, decay checked at the start of batch_insert_val. Two substitutions, both declared deviations of the
    port: the bucket hash is passed in (the port uses a seeded universal hash, the official `val % s`), and counts are
    Python floats (official float32)."""

    def __init__(self, k, lim, s, dr, bucket_of):
        self.k, self.lim, self.s, self.decay_rate, self.bucket_of = k, lim, s, dr, bucket_of
        self.tot = 0.0
        self.hot_id = deque(range(1, lim))  # SS(): for (i = 1; i < lim; ++i) hot_id.push(i)
        self.val = [[0] * 4 for _ in range(s)]
        self.cnt = [[0.0] * 4 for _ in range(s)]
        self.dic = [[0] * 4 for _ in range(s)]

    def Hash(self, val):
        return self.bucket_of(val)

    def query(self, val):  # sketch.cpp:45-53
        key = self.Hash(val)
        for i in range(4):
            if self.cnt[key][i] != 0 and self.val[key][i] == val:
                if self.dic[key][i]:
                    return -self.dic[key][i]
        return val

    def decay(self):  # sketch.cpp:76-88
        for key in range(self.s):
            for i in range(4):
                if self.dic[key][i] and self.cnt[key][i] * self.decay_rate < self.k:
                    self.hot_id.append(self.dic[key][i])
                    self.dic[key][i] = 0
                self.cnt[key][i] *= self.decay_rate
        self.tot = 0.0

    def Insert(self, val, v):  # sketch.cpp:89-125
        self.tot += v
        key, id_ = self.Hash(val), 0
        b_val, b_cnt, b_dic = self.val[key], self.cnt[key], self.dic[key]
        for i in range(4):
            if b_cnt[i] and b_val[i] == val:
                b_cnt[i] += v
                if b_cnt[i] >= self.k and self.hot_id and not b_dic[i]:
                    b_dic[i] = self.hot_id.popleft()
                    id_ = 1
                while i and b_cnt[i] > b_cnt[i - 1]:
                    b_cnt[i], b_cnt[i - 1] = b_cnt[i - 1], b_cnt[i]
                    b_val[i], b_val[i - 1] = b_val[i - 1], b_val[i]
                    b_dic[i], b_dic[i - 1] = b_dic[i - 1], b_dic[i]
                    i -= 1
                return id_
        for i in range(4):
            if b_cnt[i] == 0:
                b_cnt[i] = v
                b_val[i] = val
                return 0
        if not b_dic[3]:
            b_cnt[3] += v
            b_val[3] = val
        return 0

    def batch_insert_val(self, data, v):  # sketch.cpp:142-150
        if self.tot > self.s * self.k * 10:
            self.decay()
        return [self.Insert(int(d), float(w)) for d, w in zip(data, v)]

    def state(self):
        """Slot by slot (the order inside a bucket is part of the semantics): (id, count, hot row or -1) for
        occupied slots, None for empty ones; official hot id h is row h - 1 of the port."""
        return [[(self.val[b][i], self.cnt[b][i], self.dic[b][i] - 1) if self.cnt[b][i] != 0 else None
                 for i in range(4)] for b in range(self.s)]


def port_state(sk):
    ids, sc, hot = sk.ids, sk.score, sk.hot
    return [[(int(ids[b, i]), float(sc[b, i]), int(hot[b, i])) if sc[b, i] != 0 else None for i in range(sk.slots)]
            for b in range(sk.n_buckets)]


def official_for(sk, n_hot):
    return OfficialSS(sk.threshold, n_hot + 1, sk.n_buckets, sk.decay,
                      lambda v: int(universal_hash(np.int64(v), sk.n_buckets, sk.seed)))


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


def test_hotsketch_matches_the_official_transliteration_slot_by_slot():
    """Weighted Zipf batches with duplicates, promotions into a small hot pool (so the queue runs dry), mass-triggered
    decays that demote: after every batch the port's buckets equal the official SS's slot by slot (ids, counts, hot
    rows, order inside the bucket), with the same promotions (batch position, id, row) and the same free queue."""
    rng = np.random.default_rng(1)
    sk = HotSketch(48, 4, decay=0.6, seed=5, threshold=6.0, n_hot=25)
    ref = official_for(sk, 25)
    n_prom = n_dem = 0
    for step in range(60):
        xs = zipf_stream(200, 1500, 1.0, seed=int(rng.integers(1 << 30)))
        ss = rng.exponential(1.0, len(xs))
        if step % 7 == 3:
            ss[rng.random(len(ss)) < 0.3] = 0.0  # zero scores: an "empty" slot keeps count 0
        demoted, promoted = sk.insert(xs, ss)
        mask = ref.batch_insert_val(xs, ss)
        assert [p[0] for p in promoted] == [i for i, m in enumerate(mask) if m]
        assert [(p[1], p[2]) for p in promoted] == [(int(xs[i]), -ref.query(int(xs[i])) - 1)
                                                      for i, m in enumerate(mask) if m]
        assert port_state(sk) == ref.state(), f"bucket contents differ after batch {step}"
        assert list(sk.free) == [h - 1 for h in ref.hot_id]
        n_prom, n_dem = n_prom + len(promoted), n_dem + len(demoted)
    assert sk.decays >= 3 and n_dem > 0 and n_prom > 25, "the run must exhaust the pool, decay and demote"


def test_last_slot_rule_and_a_hot_last_slot_drops_the_newcomer():
    """sketch.cpp:113-123: a newcomer takes an empty slot, else the LAST slot (count += s) unless it is hot."""
    sk = HotSketch(1, 4, seed=0, threshold=5.0, n_hot=2)
    sk.insert(np.array([1, 2, 3, 4]), np.array([9.0, 8.0, 7.0, 1.0]))
    sk.insert(np.array([4]), np.array([7.0]))  # 4 reaches 8 >= 5: promoted to row 0, bubbles past 3 (7) to slot 2
    assert sk.ids[0].tolist() == [1, 2, 4, 3] and sk.hot[0].tolist() == [-1, -1, 0, -1]
    sk.insert(np.array([10]), np.array([2.0]))  # last slot (3, count 7) not hot: 10 replaces it with 7 + 2
    assert sk.ids[0].tolist() == [1, 2, 4, 10] and sk.score[0].tolist() == [9.0, 8.0, 8.0, 9.0]
    sk.insert(np.array([11]), np.array([1.0]))  # the last slot is not re-sorted: 11 replaces 10 (not the minimum)
    assert sk.ids[0].tolist() == [1, 2, 4, 11] and sk.score[0, 3] == 10.0
    sk.insert(np.array([11]), np.array([0.5]))  # a hit: 11 reaches 10.5 >= 5, promoted (row 1), bubbles to the front
    assert sk.ids[0].tolist() == [11, 1, 2, 4] and sk.hot[0].tolist() == [1, -1, -1, 0]
    _, prom = sk.insert(np.array([12]), np.array([100.0]))  # last slot (4) is hot: the newcomer is dropped
    assert sk.ids[0].tolist() == [11, 1, 2, 4] and prom == []
    _, prom = sk.insert(np.array([2, 2]), np.array([0.0, 1.0]))  # hot pool empty: no promotion at count 9
    assert prom == [] and sk.hot[0].tolist() == [1, -1, -1, 0]


def test_decay_is_triggered_by_mass_and_demotes():
    sk = HotSketch(2, 4, decay=0.5, seed=0, threshold=1.0, n_hot=4)  # decays once the mass exceeds 2 * 1 * 10 = 20
    b = sk.bucket(np.arange(100))
    x1, x2 = [int(i) for i in np.flatnonzero(b == b[0])[:2]]  # two ids of one bucket
    _, prom = sk.insert(np.array([x1, x2, x1, x2]), np.array([6.0, 1.0, 6.0, 2.0]))  # promoted at their 2nd hit
    assert [(p[1], p[2]) for p in prom] == [(x1, 0), (x2, 1)]
    dem, _ = sk.insert(np.array([50]), np.array([4.0]))  # mass 15 before this batch: no decay
    dem, _ = sk.insert(np.array([50]), np.array([1.0]))  # mass 19: none
    dem, _ = sk.insert(np.array([50]), np.array([1.0]))  # mass 20 is not > 20: none
    assert dem == [] and sk.decays == 0
    dem, _ = sk.insert(np.array([50]), np.array([0.5]))  # mass 21 > 20: decay first (x1 12 -> 6, x2 3 -> 1.5)
    s, h = sk.query(np.array([x1, x2]))
    np.testing.assert_allclose(s, [6.0, 1.5])
    assert dem == [] and h.tolist() == [0, 1] and sk.decays == 1
    sk.mass = 100.0
    dem, _ = sk.insert(np.array([51]), np.array([0.1]))
    s, h = sk.query(np.array([x1, x2]))
    assert dem == [(x2, 1)] and h.tolist() == [0, -1], "x2's decayed score 0.75 < 1: demoted"
    assert sk.query(np.array([50]))[1].tolist() == [2], "50 (count >= 1 at its second batch) took row 2"
    assert list(sk.free) == [3, 1], "a freed hot id goes to the back of the FIFO queue"


def test_cafe_training_matches_the_official_sketch_fed_independent_scores():
    """End to end: every step, the port's sketch after insert_grad equals the official SS fed, field by field, with
    scores computed here from the embedding gradients (per-field L2 norms normalised to mean 1, as
    sk_embedding_bag.py:155-161); routing equals the official query for every feature; a promoted feature's hot row
    is a copy of its own hash row taken before the optimizer step (main.py:375-377, sk_embedding_bag.py:177-180;
    the official line 179 indexes weight_hash without the field offset that its lookup adds, a quirk not ported:
    see the deviations)."""
    data = zipf_ctr_stream(4000, n_fields=2, ids_per_field=1500, alpha=1.2, seed=0)
    emb = CafeEmbedding(data.n_features, 8, n_hot=30, n_hash=60, n_buckets=30, slots=4, hot_threshold=3.0,
                        decay=0.7, seed=2)
    ref = official_for(emb.sketch, 30)
    model = DLRMLite(emb, data.n_fields, 8, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    prom_total = 0
    for i in range(0, len(y), 128):
        xb, yb = x[i:i + 128], y[i:i + 128]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = emb._last[1].grad.detach().clone()  # (B, F, d): the per-occurrence embedding gradients
        hash_before = emb.hash_weight.detach().clone()
        owner_before = emb.row_owner.copy()
        for f in range(xb.shape[1]):
            gn = g[:, f].norm(dim=1).double().numpy()
            prom_total += sum(ref.batch_insert_val(xb[:, f].numpy(), gn * len(gn) / gn.sum()))
        emb.after_backward(opt)
        assert port_state(emb.sketch) == ref.state()
        official_hot = np.array([max(-ref.query(v), 0) - 1 for v in range(data.n_features)])
        np.testing.assert_array_equal(emb.route_hot, official_hot)
        for r in np.flatnonzero((emb.row_owner >= 0) & (emb.row_owner != owner_before)):
            h = int(universal_hash(np.int64(emb.row_owner[r]), emb.n_hash, emb.seed + 1))
            torch.testing.assert_close(emb.hot_weight.data[r], hash_before[h])
        opt.step()
    assert prom_total == emb.migrations > 30 and emb.demotions > 0 and emb.sketch.decays > 0


def test_promoted_row_is_a_copy_of_the_hash_row_and_scores_are_per_field_gradient_norms():
    emb = CafeEmbedding(100, 4, n_hot=3, n_hash=5, n_buckets=8, slots=4, hot_threshold=1.5, decay=1.0, seed=0)
    x = torch.tensor([[7, 3], [7, 3], [7, 11], [7, 11]])  # field 0: id 7 four times; field 1: ids 3 and 11
    e = emb(x)
    w = torch.zeros_like(e)
    w[:, 0] = 1.0  # only field 0 (id 7) gets gradient, norm 2 per occurrence
    (e * w).sum().backward()
    before = emb.hash_weight.detach().clone()
    emb.after_backward(None)
    s, hot = emb.sketch.query(np.array([7, 3, 11]))
    # field 0 normalised to mean 1: 1 per occurrence; 7 enters with 1 and is promoted at its 2nd occurrence (2 >= 1.5)
    # field 1 has zero gradient: its scores are 0 and its ids occupy no slot
    np.testing.assert_allclose(s, [4.0, 0.0, 0.0])
    assert hot.tolist() == [0, -1, -1] and emb.migrations == 1
    h = int(universal_hash(np.int64(7), 5, 1))
    torch.testing.assert_close(emb.hot_weight.data[0], before[h])
    assert emb.route_hot[7] == 0 and emb.row_owner[0] == 7


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
