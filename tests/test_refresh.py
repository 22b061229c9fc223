"""ReFresh (arXiv:2301.07482): the cached sampler/forward against DGL's plain NeighborSampler forward and an exact
full-graph computation, gradient admission against numpy, staleness eviction on a hand-made sequence."""
import os

import numpy as np
import torch

torch.set_num_threads(1)
os.environ.setdefault("DGLBACKEND", "pytorch")
import dgl  # noqa: E402

from reprolab.graph.datasets import load_graph  # noqa: E402
from reprolab.graph.refresh import (SAGE, CachedNeighborSampler, HistoryCache, Policy, SharedBufferCache,  # noqa: E402
                                    admit_by_gradient, fresh_block_forward, hot_order_by_degree, set_seed,
                                    train_sampled)


def _data():
    return load_graph("powerlaw", seed=1, n=300, classes=3, d=8, mean_degree=6.0)


def _cached_forward(model, blocks, input_nodes, X, caches):
    need = blocks[0].srcdata["need"]
    x = torch.zeros(len(input_nodes), X.shape[1])
    x[need] = X[input_nodes[need]]
    with torch.no_grad():
        return model(blocks, x, caches), int(need.sum())


def test_no_cache_or_staleness_zero_equals_fresh_sampled_forward():
    d = _data()
    torch.manual_seed(0)
    model = SAGE(8, 16, 3, n_layers=3).eval()
    seeds = torch.arange(0, 300, 7)
    dgl.seed(5)
    inp_ref, out_ref, blocks_ref = dgl.dataloading.NeighborSampler([4, 3, 2]).sample_blocks(d.graph, seeds)
    with torch.no_grad():
        ref = fresh_block_forward(model, blocks_ref, d.X, inp_ref)
    # (a) no cache at all
    dgl.seed(5)
    inp, _, blocks = CachedNeighborSampler([4, 3, 2]).sample_blocks(d.graph, seeds)
    out, rows = _cached_forward(model, blocks, inp, d.X, {})
    assert torch.equal(inp, inp_ref) and rows == len(inp_ref)
    assert torch.allclose(out, ref, atol=1e-6)
    # (b) a cache full of junk but staleness 0: never used, identical forward
    caches = {lvl: HistoryCache(300, 16, staleness=0) for lvl in (1, 2)}
    for c in caches.values():
        c.admit(torch.arange(300), torch.randn(300, 16))
        c.now = 1
    dgl.seed(5)
    inp, _, blocks = CachedNeighborSampler([4, 3, 2], caches).sample_blocks(d.graph, seeds)
    out, rows = _cached_forward(model, blocks, inp, d.X, caches)
    assert torch.equal(inp, inp_ref) and rows == len(inp_ref)
    assert torch.allclose(out, ref, atol=1e-6)


def test_pruned_forward_with_exact_cache_equals_full_graph():
    """Full neighbourhoods (fanout -1) and a cache holding the exact h^1, h^2 of half the nodes: pruned sampling
    fetches fewer features yet gives exactly the full-graph logits."""
    d = _data()
    torch.manual_seed(0)
    model = SAGE(8, 16, 3, n_layers=3).eval()
    with torch.no_grad():
        h1 = torch.relu(model.layers[0](d.graph, d.X))
        h2 = torch.relu(model.layers[1](d.graph, h1))
        full = model.layers[2](d.graph, h2)
    caches = {1: HistoryCache(300, 16, staleness=5), 2: HistoryCache(300, 16, staleness=5)}
    half = torch.arange(0, 300, 2)
    caches[1].admit(half, h1[half])
    caches[2].admit(half, h2[half])
    for c in caches.values():
        c.now = 1
    seeds = torch.arange(1, 300, 5)
    inp, _, blocks = CachedNeighborSampler([-1, -1, -1], caches).sample_blocks(d.graph, seeds)
    out, rows = _cached_forward(model, blocks, inp, d.X, caches)
    assert torch.allclose(out, full[seeds], atol=1e-5)
    inp0, _, _ = CachedNeighborSampler([-1, -1, -1]).sample_blocks(d.graph, seeds)
    assert rows < len(inp0)
    assert int(sum(b.dstdata["cached"].sum() for b in blocks[:-1])) > 0


def test_admission_picks_exactly_nodes_below_quantile():
    rng = np.random.default_rng(0)
    for q in (0.1, 0.5, 0.9):
        g = rng.exponential(size=57)
        nodes = torch.from_numpy(rng.permutation(1000)[:57])
        got = admit_by_gradient(nodes, torch.from_numpy(g).float(), q)
        thr = np.quantile(g.astype(np.float32).astype(np.float64), q)
        want = nodes.numpy()[g.astype(np.float32) < thr]
        assert sorted(got.tolist()) == sorted(want.tolist())
        assert 0 < len(got) < 57


def test_staleness_eviction_hand_made_sequence():
    c = HistoryCache(5, 2, staleness=2)
    c.now = 1
    c.admit(torch.tensor([0]), torch.ones(1, 2))  # admitted at 1: valid at 2, 3
    c.now = 2
    c.admit(torch.tensor([1, 2]), torch.ones(2, 2))  # admitted at 2: valid at 3, 4
    assert c.valid(torch.arange(5)).tolist() == [True, False, False, False, False]
    assert c.evict() == 0
    c.now = 3
    assert c.valid(torch.arange(5)).tolist() == [True, True, True, False, False]
    assert c.evict() == 0
    c.now = 4
    assert c.valid(torch.arange(5)).tolist() == [False, True, True, False, False]
    assert c.evict() == 1 and c.size() == 2
    c.admit(torch.tensor([2]), 2 * torch.ones(1, 2))  # refreshed at 4: valid at 5, 6
    c.now = 5
    assert c.valid(torch.arange(5)).tolist() == [False, False, True, False, False]
    assert c.evict() == 1 and c.size() == 1
    assert torch.equal(c.emb[2], torch.tensor([2.0, 2.0]))


def test_fresh_training_counts_every_input_feature():
    d = _data()
    idx = torch.arange(0, 300, 2)
    set_seed(0)
    model = SAGE(8, 8, 3, n_layers=2)
    c = train_sampled(model, d.graph, d.X, d.y, idx, Policy("fresh"), fanouts=[3, 3], batch_size=50, epochs=1,
                      lr=0.01, seed=0)
    set_seed(0)
    loader = dgl.dataloading.DataLoader(d.graph, idx, dgl.dataloading.NeighborSampler([3, 3]), batch_size=50,
                                        shuffle=True)
    SAGE(8, 8, 3, n_layers=2)  # same RNG consumption as above before sampling
    rows = sum(len(inp) for inp, _, _ in loader)
    assert c.feature_rows == rows and c.feature_bytes == rows * 8 * 4 and c.cache_hits == 0


class _OfficialBuffer:
    """Independent reference: the public FreshGNN HistoryCache bookkeeping transcribed with its own variable names
    (xxcclong/history-cache@1b0b1db hiscache/history_cache.py: fill l. 115-133, update_history l. 175-220): one ``full2embed`` of 2N + 1
    entries (embedding slots for ids < N, feature slots for id + N), a float buffer of ``floats`` numbers."""

    def __init__(self, n, hid, d, floats, indice):
        self.n, self.hid, self.d = n, hid, d
        self.full2embed = -np.ones(2 * n + 1, dtype=np.int64)
        self.buffer = np.zeros(floats)
        self.embed2full = -np.ones(floats // hid, dtype=np.int64)
        overall_feat_num = floats // d
        cache_indice = indice if overall_feat_num > n else indice[-overall_feat_num:]
        new_id = np.arange(len(cache_indice))
        if overall_feat_num > n:
            new_id += overall_feat_num - n
        self.feat2full = np.asarray(cache_indice) + n
        self.full2embed[self.feat2full] = new_id
        self.header = 0

    def update(self, glb_iter, staleness, sub_nodes, record_mask, emb):
        if glb_iter % staleness == 0:
            self.header = 0
        rec = np.asarray(sub_nodes)[record_mask]
        num = len(rec)
        self.buffer.reshape(-1, self.hid)[self.header:self.header + num] = emb[record_mask]
        begin = self.header * self.hid // self.d
        end = int(np.ceil((self.header + num) * self.hid / self.d))
        self.full2embed[self.feat2full[begin:end]] = -1
        tmp = self.embed2full[self.header:self.header + num]
        change = self.full2embed[tmp]
        change[(change >= self.header) & (change < self.header + num)] = -1
        self.full2embed[tmp] = change
        self.full2embed[rec] = np.arange(self.header, self.header + num)
        self.embed2full[self.header:self.header + num] = rec
        self.header += num


def test_shared_buffer_matches_official_bookkeeping():
    """Random admissions over many iterations (buffer of 0.6 x the feature table, d != hid): which embeddings and which
    raw features are cached, and the embedding values served, equal the official bookkeeping's."""
    rng = np.random.default_rng(0)
    n, d, hid, S = 200, 6, 4, 3
    floats = int(0.6 * n * d)
    indice = rng.permutation(n)
    ours = SharedBufferCache(n, hid, d, floats, torch.from_numpy(indice), staleness=S)
    ref = _OfficialBuffer(n, hid, d, floats, indice)
    for it in range(40):
        sub = rng.choice(n, size=30, replace=False)
        cached = ours.valid(torch.from_numpy(sub)).numpy()
        assert np.array_equal(cached, ref.full2embed[sub] != -1)
        mask = (rng.random(30) < 0.5) & ~cached  # official: grad < thres and sub2embed == -1
        emb = rng.normal(size=(30, hid))
        ours.new_iteration(it)
        k = ours.admit(torch.from_numpy(sub[mask]), torch.from_numpy(emb[mask]).float())
        if ref.header + int(mask.sum()) > floats // hid:  # the official code would write past its buffer: stop
            assert k < int(mask.sum())
            break
        ref.update(it, S, sub, mask, emb)
        assert k == int(mask.sum())
        allv = torch.arange(n)
        assert np.array_equal(ours.valid(allv).numpy(), ref.full2embed[:n] != -1)
        assert np.array_equal(ours.feature_hit(allv).numpy(), ref.full2embed[n:2 * n] != -1)
        v = ours.valid(allv)
        served = ours.read(allv[v]).numpy()
        want = ref.buffer.reshape(-1, hid)[ref.full2embed[:n][v.numpy()]]
        assert np.allclose(served, want, atol=1e-6)
    assert it >= 10


def test_shared_buffer_fill_keeps_the_hottest_features():
    n, d = 50, 4
    hot = torch.arange(n)  # ascending hotness: node 49 hottest
    c = SharedBufferCache(n, 4, d, 10 * d, hot, staleness=5)
    assert c.feature_hit(torch.arange(n)).nonzero().flatten().tolist() == list(range(40, 50))
    g = dgl.graph((torch.tensor([0, 1, 2, 2]), torch.tensor([2, 2, 1, 0])), num_nodes=4)
    assert hot_order_by_degree(g).tolist() == [3, 0, 1, 2]  # in-degrees 1, 1, 2, 0 -> ascending, ties by id


def test_official_layout_top_level_exact_cache_equals_full_graph():
    """Full neighbourhoods and the exact h^2 of half the nodes in the shared buffer (top level only): pruned sampling
    still gives exactly the full-graph logits, and fetches fewer raw features."""
    d = _data()
    torch.manual_seed(0)
    model = SAGE(8, 16, 3, n_layers=3).eval()
    with torch.no_grad():
        h1 = torch.relu(model.layers[0](d.graph, d.X))
        h2 = torch.relu(model.layers[1](d.graph, h1))
        full = model.layers[2](d.graph, h2)
    shared = SharedBufferCache(300, 16, 8, 300 * 16, torch.arange(300), staleness=5)
    half = torch.arange(0, 300, 2)
    shared.new_iteration(0)
    assert shared.admit(half, h2[half]) == len(half)
    seeds = torch.arange(1, 300, 5)
    inp, _, blocks = CachedNeighborSampler([-1, -1, -1], {2: shared}).sample_blocks(d.graph, seeds)
    out, rows = _cached_forward(model, blocks, inp, d.X, {2: shared})
    assert torch.allclose(out, full[seeds], atol=1e-5)
    inp0, _, _ = CachedNeighborSampler([-1, -1, -1]).sample_blocks(d.graph, seeds)
    assert rows < len(inp0) and int(blocks[1].dstdata["cached"].sum()) > 0


def test_official_layout_training_counts_and_warmup():
    """Every needed raw-feature row is either fetched or a feature-cache hit; nothing is admitted during warm-up;
    the static-cache counter equals a direct count."""
    d = _data()
    idx = torch.arange(0, 300, 2)
    kw = dict(fanouts=[3, 3, 3], batch_size=50, epochs=2, lr=0.01, seed=0)
    set_seed(0)
    warm = train_sampled(SAGE(8, 8, 3, n_layers=3), d.graph, d.X, d.y, idx,
                         Policy("r", "gradient", 4, 0.5, layout="official", warmup=6, cache_budget=0.5), **kw)
    assert warm.admitted == 0 and warm.cache_hits == 0  # 6 iterations in all: never past the warm-up
    set_seed(0)
    fresh = train_sampled(SAGE(8, 8, 3, n_layers=3), d.graph, d.X, d.y, idx, Policy("fresh"), **kw)
    # no embedding hits -> same sampling as fresh; rows split into fetched + feature-cache hits
    assert warm.feature_rows + warm.feature_cache_hits == fresh.feature_rows
    assert warm.feature_bytes == fresh.static_cache_feature_bytes  # the buffer is untouched: the static cache
    set_seed(0)
    c = train_sampled(SAGE(8, 8, 3, n_layers=3), d.graph, d.X, d.y, idx,
                      Policy("r", "gradient", 4, 0.5, layout="official", warmup=0, cache_budget=0.5), **kw)
    assert c.admitted > 0 and c.cache_hits > 0 and c.feature_bytes < fresh.feature_bytes
