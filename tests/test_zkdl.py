"""zkDL miniature: MLE, sumcheck, matmul and training-step proofs against naive references."""
import itertools

import numpy as np
import pytest

from reprolab.zk.sumcheck import (P, Transcript, eq_vector, matmul, mle_eval, mle_eval_partial, mle_naive,
                                  sumcheck_prove, sumcheck_verify, to_field)
from reprolab.zk.zkdl import (TAMPERABLE, FixedPoint, forge_relu_drop, plane_weights, prove, prove_matmul, quantize,
                              reexecute, rescale, tamper, tamper_proof, to_witness, train_step, verify, verify_matmul)

rng = np.random.default_rng(0)


def test_mle_matches_naive_hypercube_sum():
    v = rng.integers(0, P, 32)
    r = [int(x) for x in rng.integers(0, P, 5)]
    assert mle_eval(v, r) == mle_naive(v, r)
    for x in range(32):  # on the hypercube the MLE is the table
        bits = [(x >> (4 - j)) & 1 for j in range(5)]
        assert mle_eval(v, bits) == v[x]
    assert int((eq_vector(r) * v % P).sum() % P) == mle_naive(v, r)
    # partial evaluation over the trailing variables
    part = mle_eval_partial(v, r[2:])
    assert [int(a) for a in part] == [mle_naive(v[i * 8:(i + 1) * 8], r[2:]) for i in range(4)]


def test_field_matmul_exact():
    A, B = rng.integers(0, P, (8, 16)), rng.integers(0, P, (16, 4))
    ref = [[sum(int(A[i, k]) * int(B[k, j]) for k in range(16)) % P for j in range(4)] for i in range(8)]
    assert matmul(A, B).tolist() == ref


def test_sumcheck_random_small_polynomial():
    f, g, h = (rng.integers(0, P, 16) for _ in range(3))
    claim = sum(int(a) * int(b) % P * int(c) for a, b, c in zip(f, g, h)) % P  # naive hypercube sum
    msgs, r, finals = sumcheck_prove([f, g, h], Transcript("t"))
    ok, r_v, red = sumcheck_verify(claim, msgs, 4, 3, Transcript("t"))
    assert ok and r_v == r
    assert red == mle_naive(f, r) * mle_naive(g, r) % P * mle_naive(h, r) % P
    ok, _, _ = sumcheck_verify((claim + 1) % P, msgs, 4, 3, Transcript("t"))
    assert not ok


def test_matmul_proof_complete_and_sound():
    A, B = rng.integers(0, P, (8, 16)), rng.integers(0, P, (16, 4))
    C = matmul(A, B)
    assert verify_matmul(A, B, C, prove_matmul(A, B, C))
    for i, j in itertools.product(range(0, 8, 3), range(4)):
        C2 = C.copy()
        C2[i, j] = (C2[i, j] + 1) % P
        assert not verify_matmul(A, B, C2, prove_matmul(A, B, C2))


def test_rescale_bits_recompose():
    X = rng.integers(-2**20, 2**20, (4, 8))
    for q in (8, 16):
        Xp, bits = rescale(X, q)
        assert np.array_equal(Xp, np.floor(X / 2**q + 0.5).astype(np.int64))
        w_x, w_xp = plane_weights(q)
        assert np.array_equal(np.tensordot(w_x, bits, 1) % P, to_field(X + 2**(q - 1)))
        assert np.array_equal(np.tensordot(w_xp, bits, 1) % P, to_field(Xp))


@pytest.fixture(scope="module")
def step():
    fp = FixedPoint()
    X = quantize(rng.random((8, 16)), fp.Q)
    Y = np.zeros((8, 4), np.int64)
    Y[np.arange(8), rng.integers(0, 4, 8)] = 1 << fp.Q
    W1, W2 = quantize(rng.normal(0, .3, (16, 8)), fp.Q), quantize(rng.normal(0, .3, (8, 4)), fp.Q)
    t = train_step(X, Y, W1, W2, fp)
    float_relu = np.maximum(np.floor(X @ W1 / 2**fp.Q + .5), 0)
    assert np.array_equal(t["A1"], float_relu)
    return fp, to_witness(t)


def test_training_step_honest_accepts(step):
    fp, w = step
    assert verify(w, prove(w, fp), fp) == (True, "ok")
    assert reexecute(w, fp)


def test_training_step_any_single_tampering_rejected(step):
    fp, w = step
    r = np.random.default_rng(1)
    for name in TAMPERABLE:
        for _ in range(2):
            w2, _ = tamper(w, r, name)
            ok, why = verify(w2, prove(w2, fp), fp)
            assert not ok, name
            assert not reexecute(w2, fp), name
    proof = prove(w, fp)
    for _ in range(10):
        assert not verify(w, tamper_proof(proof, r), fp)[0]


def _forgery_case():
    """A digits-like step (the review's zkdl_forge.py setting: 16 x 64 -> 16 -> 16) and a positive ReLU input."""
    fp32, fp30 = FixedPoint(bits=32), FixedPoint()
    r = np.random.default_rng(3)
    X = quantize(r.random((16, 64)), fp30.Q)
    Y = np.zeros((16, 16), np.int64)
    Y[np.arange(16), r.integers(0, 10, 16)] = 1 << fp30.Q
    W1, W2 = quantize(r.normal(0, 1 / 8, (64, 16)), fp30.Q), quantize(r.normal(0, 1 / 4, (16, 16)), fp30.Q)
    Zp1 = train_step(X, Y, W1, W2, fp30)["Zp1"]
    i, j = map(int, np.argwhere(Zp1 > 0)[0])
    return fp32, fp30, (X, Y, W1, W2), (i, j)


def test_decomposition_is_unique_in_the_field():
    """Soundness of zkReLU's bits: the 2^bits representable integers must be distinct mod p (range size <= p)."""
    assert 2**FixedPoint().bits <= P and FixedPoint().sound and not FixedPoint(bits=32).sound
    lo, hi = -(1 << (FixedPoint().bits - 1)), (1 << (FixedPoint().bits - 1)) - 1
    assert hi - lo < P  # no two representable values coincide modulo p
    w_x, _ = plane_weights(8)  # the extreme bit patterns recompose to the extremes of the range
    top = np.zeros(32, np.int64); top[:29] = 1  # all value bits but the sign
    assert int((w_x * top).sum() % P) == hi and int(w_x[29]) == to_field(lo)


def test_review_forgery_accepted_by_32_bits_rejected_by_30():
    """The review's structured forgery (second decomposition v + 2^(q-1) - p of a positive ReLU input): the old
    32-value-bit encoding accepts it although re-execution rejects it; the 30-bit encoding cannot express it, and
    sending its bits anyway is rejected."""
    fp32, fp30, (X, Y, W1, W2), (i, j) = _forgery_case()
    honest = train_step(X, Y, W1, W2, fp32)
    forged = forge_relu_drop(X, Y, W1, W2, fp32, i, j)
    assert forged["A1"][i, j] == 0 < honest["A1"][i, j]
    assert not np.array_equal(forged["W1n"], honest["W1n"])  # the step's result differs
    wf = to_witness(forged)
    assert verify(wf, prove(wf, fp32), fp32) == (True, "ok")  # the hole
    assert not reexecute(wf, fp32)
    assert forge_relu_drop(X, Y, W1, W2, fp30, i, j) is None  # not expressible in 30 value bits
    wf30 = to_witness(forge_relu_drop(X, Y, W1, W2, fp30, i, j, force=True))
    ok, why = verify(wf30, prove(wf30, fp30), fp30)
    assert not ok and why.startswith("recompose B_Z1"), why
    assert not reexecute(wf30, fp30)


def test_padding_planes_must_be_zero():
    fp = FixedPoint()
    X = quantize(rng.random((8, 16)), fp.Q)
    Y = np.zeros((8, 4), np.int64)
    Y[np.arange(8), rng.integers(0, 4, 8)] = 1 << fp.Q
    w = to_witness(train_step(X, Y, quantize(rng.normal(0, .3, (16, 8)), fp.Q), quantize(rng.normal(0, .3, (8, 4)), fp.Q), fp))
    w2 = dict(w); B = w["B_Z2"].copy(); B[31, 0, 0] = 1; w2["B_Z2"] = B
    ok, why = verify(w2, prove(w2, fp), fp)
    assert not ok and why == "recompose B_Z2"
