"""zkDL miniature: MLE, sumcheck, matmul and training-step proofs against naive references."""
import itertools

import numpy as np
import pytest

from reprolab.zk.sumcheck import (P, Transcript, eq_vector, matmul, mle_eval, mle_eval_partial, mle_naive,
                                  sumcheck_prove, sumcheck_verify, to_field)
from reprolab.zk.zkdl import (CHEATS, FORGERIES, RESCALED, TAMPERABLE, FixedPoint, alt_decomposition, forge,
                              forge_gradient, forge_nonbinary_relu_drop, forge_relu_drop, forge_skipped_relu,
                              forger_rescale, init_mlp, other_representative, plane_weights, prove, prove_matmul,
                              quantize, reexecute, rescale, shifted_sumcheck_prove, tamper, tamper_proof, to_witness,
                              train_step, verify, verify_matmul)

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


def _review_step():
    """Exactly the review's zkdl_forge.py setting: digits[:16], 64 -> 16 -> 16, init_mlp with seed 0, Q = lr_shift = 8."""
    from sklearn.datasets import load_digits
    fp = FixedPoint(Q=8, lr_shift=8)
    d = load_digits()
    X = quantize(d.data[:16] / 16.0, fp.Q)
    Y = np.zeros((16, 16), np.int64)
    Y[np.arange(16), d.target[:16]] = 1 << fp.Q
    W1f, W2f = init_mlp(64, 16, 16, 10, np.random.default_rng(0))
    return X, Y, quantize(W1f, fp.Q), quantize(W2f, fp.Q)


def test_regression_review_forgery_rejected():
    """Regression test for the review's appendix forgery (reviews/reason-security-science.md, zkdl): A1[0, 11] = 228 is
    zeroed through the second decomposition and 22 + 3 updated weights change. The 32-value-bit encoding accepted it
    (reproduced, so the test has teeth); ``verify`` must reject it with the sound encoding."""
    X, Y, W1, W2 = _review_step()
    fp32, fp = FixedPoint(bits=32), FixedPoint()
    honest = train_step(X, Y, W1, W2, fp)
    i, j = map(int, np.argwhere(honest["A1"] > 50)[0])
    assert (i, j) == (0, 11) and honest["A1"][i, j] == 228
    old = forge_relu_drop(X, Y, W1, W2, fp32, i, j)
    assert old["A1"][i, j] == 0
    assert int((old["W1n"] != honest["W1n"]).sum()) == 22 and int((old["W2n"] != honest["W2n"]).sum()) == 3
    wo = to_witness(old)
    assert verify(wo, prove(wo, fp32), fp32) == (True, "ok") and not reexecute(wo, fp32)  # the hole, as reported
    new = forge_relu_drop(X, Y, W1, W2, fp, i, j, force=True)
    assert new["A1"][i, j] == 0 and np.array_equal(new["W1n"], old["W1n"])  # the same forged step ...
    wn = to_witness(new)
    assert verify(wn, prove(wn, fp), fp) == (False, "recompose B_Z1")  # ... is rejected now
    assert not reexecute(wn, fp)
    wh = to_witness(honest)
    assert verify(wh, prove(wh, fp), fp) == (True, "ok") and reexecute(wh, fp)


def test_other_representative_is_the_same_field_element_and_fits_only_32_bits():
    for V in (0, 1, 228 * 256 + 128, 2**29 - 1, -1, -(2**29)):
        alt = other_representative(V)
        assert alt != V and (alt - V) % P == 0
        assert -(2**31) <= alt < 2**31  # expressible with 32 value bits ...
        assert not -(2**29) <= alt < 2**29  # ... never with 30
    # the forger's 32-bit planes are a valid decomposition (binary, recompose to V mod p) with the opposite sign
    for V, q in ((228 * 256 + 128, 8), (-(5 << 16) + (1 << 15), 16)):
        Xpp, planes = alt_decomposition(V, q, FixedPoint(bits=32))
        w_x, w_xp = plane_weights(q, 32)
        assert set(np.unique(planes)) <= {0, 1}
        assert int((w_x * planes % P).sum() % P) == V % P and int((w_xp * planes % P).sum() % P) == Xpp % P
        assert planes[31] == (1 if V >= 0 else 0)


def test_forger_rescale_is_honest_on_in_range_values():
    X = rng.integers(-2**20, 2**20, (4, 8))
    for fp in (FixedPoint(), FixedPoint(bits=32)):
        for q in (8, 16):
            Xp, B = rescale(X, q, fp.bits)
            Xf, Bf = forger_rescale(X + P, q, fp)  # the same field elements through other integers
            assert np.array_equal(Xp, Xf) and np.array_equal(B, Bf)


@pytest.mark.parametrize("kind", FORGERIES)
@pytest.mark.parametrize("target", list(RESCALED))
def test_structured_forgery_rejected(kind, target):
    """Targeted adversaries that keep the rest of the step consistent: the second decomposition at every range-checked
    tensor, a sign-plane (ReLU) flip, an offset rescaled value with honest bits (at GW1/GW2 a forged weight update) and
    an offset matrix product, each at a non-negative and a negative entry. ``verify`` and re-execution must reject
    every one; the unsound 32-bit encoding must accept exactly the second decompositions (the hole, everywhere)."""
    X, Y, W1, W2 = _review_step()
    fp, fp32 = FixedPoint(), FixedPoint(bits=32)
    honest = train_step(X, Y, W1, W2, fp)
    for sign in (1, -1):
        idx = tuple(map(int, np.argwhere(sign * honest[target] >= (0 if sign > 0 else 1))[0]))
        w = forge(X, Y, W1, W2, fp, kind, target, idx)
        assert any(not np.array_equal(w[k], honest[k]) for k in honest)
        wf = to_witness(w)
        ok, why = verify(wf, prove(wf, fp), fp)
        assert not ok, (kind, target, idx)
        assert why == ("matmul " if kind == "product_offset" else "recompose B_") + target, why
        assert not reexecute(wf, fp)
        w32 = to_witness(forge(X, Y, W1, W2, fp32, kind, target, idx))
        assert verify(w32, prove(w32, fp32), fp32)[0] == (kind == "alt_decomposition"), (kind, target, idx)
        assert not reexecute(w32, fp32)


# ---------------------------------------------------------------- malformed proofs (second review: zip truncation)
EMPTY = {"matmul": [], "bits": [], "hadamard": []}


def _copy(proof):
    return {k: [[list(e) for e in msgs] for msgs in part] for k, part in proof.items()}


def test_empty_proof_rejected_review_forgery():
    """/tmp/review_zkdl/zip_truncation.py: with an EMPTY proof ``zip`` skipped every sumcheck, so a forged product
    (Z1 or G_W1 offset) and an arbitrary weight update were accepted. They must be rejected as malformed."""
    X, Y, W1, W2 = _review_step()
    fp = FixedPoint()
    honest = train_step(X, Y, W1, W2, fp)
    for target in ("Z1", "GW1"):
        idx = tuple(map(int, np.argwhere(honest[target] > 0)[0]))
        wf = to_witness(forge(X, Y, W1, W2, fp, "product_offset", target, idx))
        assert verify(wf, prove(wf, fp), fp) == (False, "matmul " + target)
        ok, why = verify(wf, EMPTY, fp)
        assert not ok and why.startswith("malformed proof"), why
        assert not reexecute(wf, fp)
    G = np.random.default_rng(0).integers(-2**20, 2**20, honest["GW1"].shape)
    wf = to_witness(forge_gradient(X, Y, W1, W2, fp, G))
    assert int((wf["W1n"] != to_witness(honest)["W1n"]).sum()) > 100  # (almost) every updated weight forged
    ok, why = verify(wf, EMPTY, fp)
    assert not ok and why.startswith("malformed proof"), why
    wh = to_witness(honest)
    assert verify(wh, EMPTY, fp)[0] is False  # even an honest witness needs its proof


def test_truncated_or_malformed_proofs_rejected_without_exception(step):
    fp, w = step
    proof = prove(w, fp)
    assert verify(w, proof, fp) == (True, "ok")
    bad = []
    for part in proof:
        p = _copy(proof); p[part] = p[part][:-1]; bad.append(p)  # one sumcheck dropped (the zip truncation)
        p = _copy(proof); p[part] = []; bad.append(p)
        p = _copy(proof); p[part] = p[part] + [p[part][-1]]; bad.append(p)  # one sumcheck too many
        p = _copy(proof); p[part][0] = p[part][0][:-1]; bad.append(p)  # one round dropped
        p = _copy(proof); p[part][-1][0] = p[part][-1][0][:-1]; bad.append(p)  # one evaluation dropped
        p = _copy(proof); p[part][0][0][0] = P + int(p[part][0][0][0]); bad.append(p)  # not reduced mod p
        p = _copy(proof); p[part][0][0][1] = -1; bad.append(p)
        p = _copy(proof); p[part][0][0][1] = "1"; bad.append(p)
        p = _copy(proof); p[part][0][0][1] = 1.0; bad.append(p)
        p = _copy(proof); p[part][0] = None; bad.append(p)
        p = _copy(proof); del p[part]; bad.append(p)  # missing key
    p = _copy(proof); p["extra"] = []; bad.append(p)  # unknown key
    bad += [None, [], "proof", {}, {"matmul": None, "bits": [], "hadamard": []}]
    for b in bad:
        ok, why = verify(w, b, fp)
        assert ok is False and why.startswith("malformed proof"), (why, b if not isinstance(b, dict) else list(b))
    # malformed witnesses: a missing tensor, a wrong shape, a non-field value -> False, not an exception
    for name, T in (("W1n", None), ("A1", w["A1"][:, :-1]), ("B_Z1", w["B_Z1"][:-1]), ("Z2", w["Z2"] + P),
                    ("GZ2", w["GZ2"].astype(float)), ("X", w["X"][:4])):
        w2 = dict(w)
        if T is None:
            del w2[name]
        else:
            w2[name] = T
        ok, why = verify(w2, proof, fp)
        assert ok is False and why.startswith("witness"), (name, why)


# ---------------------------------------------------------------- a cheating prover (second review: mutants survived)
def test_shifted_sumcheck_passes_every_round_but_not_the_final_check():
    """The cheating sumcheck prover against a naive reference: for a FALSE claim every round check passes (ok), and
    the reduced claim differs from the true product of the factors' MLEs at the challenges (naive evaluation) by
    exactly delta / 2^m; for the true claim it is the honest prover."""
    f, g, h = (rng.integers(0, P, 16) for _ in range(3))
    true = sum(int(a) * int(b) % P * int(c) for a, b, c in zip(f, g, h)) % P
    for delta in (0, 1, 12345):
        msgs = shifted_sumcheck_prove([f, g, h], Transcript("t"), "sc", (true + delta) % P)
        ok, r, red = sumcheck_verify((true + delta) % P, msgs, 4, 3, Transcript("t"), "sc")
        assert ok
        naive = mle_naive(f, r) * mle_naive(g, r) % P * mle_naive(h, r) % P
        assert (red - naive) % P == delta * pow(2, -4, P) % P
        if delta == 0:
            assert msgs == sumcheck_prove([f, g, h], Transcript("t"), "sc")[0]


def _cheat_case(kind, fp):
    X, Y, W1, W2 = _review_step()
    honest = train_step(X, Y, W1, W2, fp)
    if kind == "forged_gradient":  # /tmp/review_zkdl/cheating_prover.py: an arbitrary weight update
        w = forge_gradient(X, Y, W1, W2, fp, np.random.default_rng(0).integers(-2**20, 2**20, honest["GW1"].shape))
    elif kind == "nonbinary_relu_drop":  # check_specific_forgeries.py (a): positive unit dropped via planes {1, 2}
        w = forge_nonbinary_relu_drop(X, Y, W1, W2, fp, tuple(map(int, np.argwhere(honest["A1"] > 0)[0])))
        assert (w["A1"] == 0).sum() == (honest["A1"] == 0).sum() + 1 and int(w["B_Z1"].max()) == 2
    else:  # (b): the ReLU skipped at a negative entry, bits honest
        i, j = map(int, np.argwhere(honest["Zp1"] < 0)[0])
        w = forge_skipped_relu(X, Y, W1, W2, fp, (i, j))
        assert w["A1"][i, j] == honest["Zp1"][i, j] < 0 and np.array_equal(w["B_Z1"], honest["B_Z1"])
    assert not np.array_equal(w["W1n"], honest["W1n"])  # the forged step's result differs
    return to_witness(honest), to_witness(w)


@pytest.mark.parametrize("kind", list(CHEATS))
def test_cheating_prover_caught_by_the_final_opening_check(kind):
    """Second review (mutants.py): deleting the final opening check of the matmul, binary or Hadamard sumcheck left
    every test green, because no test played a cheating prover. Here each forgery makes exactly one sumcheck relation
    false; the honest prover then fails that sumcheck's first round, while the cheating prover (every round shifted,
    ``prove(cheat=True)``) passes all rounds, and the final opening check of exactly that sumcheck must reject it."""
    fp = FixedPoint()
    wh, wf = _cheat_case(kind, fp)
    assert verify(wh, prove(wh, fp, cheat=True), fp) == (True, "ok")  # no false claim: the cheat is the honest proof
    assert verify(wf, prove(wf, fp), fp) == (False, CHEATS[kind])  # honest prover: a round check fails
    assert verify(wf, prove(wf, fp, cheat=True), fp) == (False, CHEATS[kind] + " (final opening)")
    assert not reexecute(wf, fp)
