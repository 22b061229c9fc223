"""embcomp_bench (arXiv 2311.15578): each compression method against a naive reference, and its byte accounting."""
import math

import numpy as np
import pytest
import torch

from reprolab.embed import (HashEmbedding, MDEmbedding, PrunedEmbedding, QREmbedding, QuantizedEmbedding,
                            prune_table, quantize_table, universal_hash, zipf_ctr_stream)
from reprolab.embed.model import make_table


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hash_and_qr_lookups_equal_naive_loops():
    x = torch.randint(0, 10_000, (7, 3))
    h = HashEmbedding(10_000, 4, rows=97, seed=2)
    q = QREmbedding(10_000, 4, m=50, seed=2)
    with torch.no_grad():
        eh, eq = h(x), q(x)
    for i in range(7):
        for j in range(3):
            v = int(x[i, j])
            torch.testing.assert_close(eh[i, j], h.weight[int(universal_hash(np.int64(v), 97, 3))])
            torch.testing.assert_close(eq[i, j], q.q[v // 50] * q.r[v % 50])
    assert q.nbytes() == (50 + 200) * 4 * 4
    # QR gives distinct features distinct (quotient, remainder) pairs: no two ids share both rows
    pairs = {(v // 50, v % 50) for v in range(10_000)}
    assert len(pairs) == 10_000


def test_qr_rows_for_budget():
    N = 100_000
    m = QREmbedding.m_for_rows(N, 1000)
    assert m + math.ceil(N / m) <= 1000 and (m + 1) + math.ceil(N / (m + 1)) > 1000 or m == 999
    assert QREmbedding.m_for_rows(N, 2 * math.sqrt(N) - 5) is None, "below 2 sqrt(N) rows QR cannot fit"


def test_mde_lookup_equals_naive_and_fits_budget():
    rng = np.random.default_rng(0)
    N, d = 40_000, 8
    counts = rng.zipf(1.3, N).astype(float)
    budget = N * d * 4 / 10
    rank, bounds, dims = MDEmbedding.plan(counts, d, budget, n_blocks=4, alpha=0.3)
    assert dims == sorted(dims, reverse=True), "more popular blocks get at least as many dims"
    emb = MDEmbedding(N, d, rank, bounds, dims, seed=0)
    assert 0.95 * budget <= emb.nbytes() <= budget
    x = torch.randint(0, N, (20, 2))
    with torch.no_grad():
        out = emb(x)
    for i in range(20):
        for j in range(2):
            r = int(rank[int(x[i, j])])
            k = next(k for k in range(len(dims)) if bounds[k] <= r < bounds[k + 1])
            ref = torch.zeros(d) if dims[k] == 0 else emb.tables[k][r - bounds[k]] @ emb.projs[k]
            torch.testing.assert_close(out[i, j], ref)
    assert int(rank[np.argmax(counts)]) == 0


def test_quantization_error_and_bytes():
    w = torch.randn(300, 16)
    for bits in (8, 4, 2):
        q = QuantizedEmbedding(w, bits)
        x = torch.arange(300).reshape(30, 10)
        err = (q(x) - w[x]).abs()
        assert (err <= q.scale[x] / 2 + 1e-6).all(), "round-to-nearest: error <= half a step"
        assert q.nbytes() == 300 * 16 * bits // 8 + 300 * 4
    assert quantize_table(w, 300 * 16 * 4 / 2).bits == 8
    assert quantize_table(w, 300 * 16 * 4 / 4).bits == 4
    assert quantize_table(w, 300 * 16 * 4 / 100) is None


def test_pruning_keeps_largest_and_coo_lookup_equals_dense():
    w = torch.randn(200, 8)
    p = prune_table(w, 200 * 8 * 4 / 10)
    nnz = int(200 * 8 * 4 / 10 // 8)
    assert p.values.numel() == nnz and p.nbytes() == nnz * 8
    thresh = torch.sort(w.abs().reshape(-1), descending=True).values[nnz - 1]
    dense_ref = torch.where(w.abs() >= thresh, w, 0.0)
    torch.testing.assert_close(p.dense(), dense_ref)
    x = torch.randint(0, 200, (50, 3))
    torch.testing.assert_close(p(x), dense_ref[x])


def test_tunable_methods_hit_the_budget_within_5_percent():
    d = zipf_ctr_stream(5000, n_fields=4, ids_per_field=10_000, seed=0)
    cfg = {"cafe_schedule": "criteo", "slots_per_hot": 4, "slots": 4, "decay": 0.99, "medium_threshold": 1.0}
    full = d.n_features * 16 * 4
    for r in (2, 10, 100):
        for m in ("hash", "qr", "cafe"):
            t = make_table(m, d, 16, r, cfg)
            assert abs(t.nbytes() / (full / r) - 1) <= 0.05, (m, r, t.nbytes() / (full / r))
    assert make_table("qr", d, 16, 1000, cfg) is None, "QR needs 2 sqrt(N) rows: infeasible at 1000x here"


def test_qat_forward_is_the_deployed_quantized_row_and_gradient_is_straight_through():
    """Reference: a naive loop over rows and entries of the row-wise absmax formula (code = round(w / s) clipped to
    +-q_max, s = max|w_row| / q_max); the STE gradient of a lookup is the upstream gradient scattered to the rows."""
    from reprolab.embed.tables import QATEmbedding

    emb = QATEmbedding(50, 6, bits=4, seed=1, init_scale=0.5)
    x = torch.tensor([[3, 7, 3], [49, 0, 7]])
    out = emb(x)
    w = emb.weight.detach()
    for i in range(2):
        for j in range(3):
            row = w[int(x[i, j])].tolist()
            s = max(abs(v) for v in row) / 7
            for k in range(6):
                assert abs(out[i, j, k].item() - max(-7, min(7, round(row[k] / s))) * s) < 1e-6
    torch.testing.assert_close(out, emb.export()(x), rtol=0, atol=0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref = torch.zeros(50, 6)
    for i in range(2):
        for j in range(3):
            ref[int(x[i, j])] += g[i, j]
    torch.testing.assert_close(emb.weight.grad, ref)
    assert emb.nbytes() == 50 * 6 * 4 // 8 + 50 * 4 == emb.export().nbytes()


def test_qat_takes_the_widest_bits_that_fit():
    d = zipf_ctr_stream(2000, n_fields=2, ids_per_field=5000, seed=0)
    full = d.n_features * 16 * 4
    bits = {r: getattr(make_table("qat", d, 16, r, {}), "bits", None) for r in (2, 4, 8, 100)}
    assert bits == {2: 8, 4: 4, 8: 2, 100: None}
    for r in (2, 4, 8):
        assert make_table("qat", d, 16, r, {}).nbytes() <= full / r
