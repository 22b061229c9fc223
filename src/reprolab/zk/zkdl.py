"""zkDL in miniature: sumcheck proofs of one fixed-point training step of a 2-layer MLP (no commitments).

Paper: Sun, Li, Zhang, "zkDL: Efficient Zero-Knowledge Proofs of Deep Learning Training", https://arxiv.org/abs/2307.16273

What is proven, for X (B, d0) -> Z1 = X W1 -> zkReLU -> A1 -> Z2 = A1 W2 -> rescale -> Z2' and a square loss
(G_Z2 = Z2' - Y), then back-propagation and an SGD step with learning rate 2^-k:

* five matrix products (Z1, Z2, G_A1 = G_Z2 W2^T, G_W2 = A1^T G_Z2, G_W1 = X^T G_Z1), each by Thaler's sumcheck:
  C~(r_i, r_j) = sum_k A~(r_i, k) B~(k, r_j);
* zkReLU: each fixed-point rescale X = 2^q X' + R is given as auxiliary bit planes (q remainder bits, then X' in
  two's complement, sign bit S last, 30 value bits in all so that the decomposition is unique in the field, padded
  to 32 planes with zero planes); the prover shows every plane is binary (sumcheck of eq * b * (b - 1) = 0), the
  recomposition (linear, checked at a random point) and the Hadamard relations A = (1 - S) * Z' and
  G_Z = (1 - S) * G_A' (sumcheck of eq * (1 - S) * Z');
* the linear relations G_Z2 = Z2' - Y and W_new = W - G_W' at a random point.

Challenges come from a SHA-256 Fiat-Shamir transcript that first absorbs a hash of every witness tensor.

NOT implemented (so this is neither zero-knowledge nor succinct): polynomial commitments -- the verifier's "openings"
W~(r) are computed from the plaintext witness, costing O(size) each; FAC4DNN's aggregation of all layers and steps into
one sumcheck; GPU (CUDA) parallelism; proofs of the softmax/cross-entropy loss (a square loss is used instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sumcheck import (OPS, P, Transcript, eq_eval, eq_vector, from_field, matmul, mle_eval, mle_eval_partial,
                       num_vars, sumcheck_prove, sumcheck_verify, to_field)

PLANES = 32  # stored bit planes per rescale (a power of two, for the MLE): the value bits, then zero padding
VALUE_BITS = 30  # value bits: q remainder bits + (VALUE_BITS - q) two's-complement bits of the output, sign bit last
# Soundness of the bit decomposition needs the 2^VALUE_BITS representable integers [-2^(VALUE_BITS-1), 2^(VALUE_BITS-1))
# to be distinct modulo p: 2^VALUE_BITS <= p. With 32 value bits (the first version) every field element had TWO
# valid decompositions (v and v + 2^(q-1) - p), which let a prover zero a positive ReLU output undetected (see
# ``forge_relu_drop``); 31 bits still leave one colliding pair, so 30 is the largest sound choice for p = 2^31 - 1.
assert 2**VALUE_BITS <= P


@dataclass(frozen=True)
class FixedPoint:
    Q: int = 8  # fractional bits of activations and weights
    lr_shift: int = 8  # learning rate 2^-lr_shift (applied to the batch-summed gradient)
    bits: int = VALUE_BITS  # value bits per rescale (<= PLANES); 32 reproduces the unsound first version

    def __post_init__(self):
        if not (self.Q + self.lr_shift < self.bits <= PLANES):
            raise ValueError(f"bits={self.bits}: need Q + lr_shift < bits <= {PLANES}")

    @property
    def sound(self) -> bool:
        """Whether every field element has at most one decomposition into ``bits`` value bits (2^bits <= p)."""
        return 2**self.bits <= P

    @property
    def sign(self) -> int:
        """Index of the sign plane."""
        return self.bits - 1


# ---------------------------------------------------------------- fixed-point training step (the witness)
def quantize(x: np.ndarray, Q: int) -> np.ndarray:
    return np.round(np.asarray(x, dtype=np.float64) * (1 << Q)).astype(np.int64)


def decompose(V: np.ndarray, q: int, bits: int = VALUE_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Bit planes of V = 2^q X' + R (0 <= R < 2^q, X' in ``bits - q``-bit two's complement): returns X' and the
    (PLANES, *V.shape) 0/1 planes [R bits, X' bits, zero padding]. Raises if X' is out of the signed range."""
    nbits = bits - q
    Xp = V >> q  # (rows, cols)
    R = V - (Xp << q)
    assert np.all((Xp >= -(1 << (nbits - 1))) & (Xp < (1 << (nbits - 1)))), "value out of the signed range"
    U = np.where(Xp < 0, Xp + (1 << nbits), Xp)  # two's complement, sign bit = bit nbits-1
    planes = [(R >> j) & 1 for j in range(q)] + [(U >> j) & 1 for j in range(nbits)]
    planes += [np.zeros_like(R)] * (PLANES - bits)
    return Xp, np.stack(planes).astype(np.int64)  # (PLANES, rows, cols)


def rescale(X: np.ndarray, q: int, bits: int = VALUE_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest: X + 2^(q-1) = 2^q X' + R with 0 <= R < 2^q; returns X' and the (PLANES, *X.shape) 0/1 bit
    planes [R bits, X' bits, zero padding] (floor alone would bias every SGD step downwards)."""
    return decompose(X + (1 << (q - 1)), q, bits)


def plane_weights(q: int, bits: int = VALUE_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Weights w with X + 2^(q-1) = sum_j w_j bit_j, and w' with X' = sum_j w'_j bit_j (as field elements); the
    padding planes have weight 0 (and are checked to be zero)."""
    nbits = bits - q
    pad = [0] * (PLANES - bits)
    w_x = [1 << j for j in range(q)] + [(1 << (q + j)) for j in range(nbits - 1)] + [-(1 << (q + nbits - 1))] + pad
    w_xp = [0] * q + [(1 << j) for j in range(nbits - 1)] + [-(1 << (nbits - 1))] + pad
    return to_field(w_x), to_field(w_xp)


def train_step(X, Y, W1, W2, fp: FixedPoint) -> dict[str, np.ndarray]:
    """One SGD step in signed fixed point; returns every tensor of the trace (signed int64) incl. bit planes.

    X (B, d0), Y (B, c) one-hot and W at scale 2^Q; products are at scale 2^2Q and rescaled by zkReLU's bits."""
    Q, q_g, nb = fp.Q, fp.Q + fp.lr_shift, fp.bits
    w = {"X": X, "Y": Y, "W1": W1, "W2": W2}
    w["Z1"] = X @ W1  # (B, n) scale 2Q
    w["Zp1"], w["B_Z1"] = rescale(w["Z1"], Q, nb)  # (B, n) scale Q
    return _finish_step(w, fp)


def _finish_step(w: dict, fp: FixedPoint) -> dict:
    """The rest of ``train_step`` after Z1's rescale (shared with the forgery, which replaces that rescale)."""
    Q, q_g, nb = fp.Q, fp.Q + fp.lr_shift, fp.bits
    X, Y, W1, W2 = w["X"], w["Y"], w["W1"], w["W2"]
    S1 = w["B_Z1"][fp.sign]  # sign bit of Z1'
    w["A1"] = (1 - S1) * w["Zp1"]  # ReLU, (B, n)
    w["Z2"] = w["A1"] @ W2  # (B, c) scale 2Q
    w["Z2p"], w["B_Z2"] = rescale(w["Z2"], Q, nb)
    w["GZ2"] = w["Z2p"] - Y  # square-loss gradient, (B, c) scale Q
    w["GA1"] = w["GZ2"] @ W2.T  # (B, n) scale 2Q
    w["GA1p"], w["B_GA1"] = rescale(w["GA1"], Q, nb)
    w["GZ1"] = (1 - S1) * w["GA1p"]  # ReLU backward
    w["GW2"] = w["A1"].T @ w["GZ2"]  # (n, c) scale 2Q
    w["GW2p"], w["B_GW2"] = rescale(w["GW2"], q_g, nb)  # scale Q after the 2^-lr_shift step
    w["GW1"] = X.T @ w["GZ1"]  # (d0, n) scale 2Q
    w["GW1p"], w["B_GW1"] = rescale(w["GW1"], q_g, nb)
    w["W1n"] = W1 - w["GW1p"]
    w["W2n"] = W2 - w["GW2p"]
    return w


def forge_relu_drop(X, Y, W1, W2, fp: FixedPoint, i: int, j: int, force: bool = False) -> dict | None:
    """The review's structured forgery (reviews/reason-security-science.md, zkdl appendix): a training step in which
    the positive pre-activation Z1[i, j] is rescaled through the SECOND field representation of the same element,
    v + 2^(q-1) - p, whose sign bit is 1, so that ReLU outputs 0 and the unit's gradient is dropped; every later tensor
    is recomputed consistently.

    When that representation does not fit in ``fp.bits`` value bits (the sound encoding, 2^bits <= p) it returns None,
    or with ``force`` sends it anyway: its low ``fp.bits - 1`` bit planes with the sign plane set (so that ReLU still
    outputs 0), which no longer recompose to Z1's field element."""
    Q = fp.Q
    w = {"X": X, "Y": Y, "W1": W1, "W2": W2}
    w["Z1"] = X @ W1
    w["Zp1"], w["B_Z1"] = rescale(w["Z1"], Q, fp.bits)
    if w["Zp1"][i, j] <= 0:
        raise ValueError("the forgery targets a positive ReLU input")
    alt = np.array([[int(w["Z1"][i, j]) + (1 << (Q - 1)) - P]], dtype=np.int64)  # same field element, other integer
    try:
        Xpp, planes = decompose(alt, Q, fp.bits)
    except AssertionError:
        if not force:
            return None
        Xpp, planes = decompose(alt, Q, PLANES)  # the 32-bit decomposition (2^32 > p)
        planes[fp.bits:] = 0
        planes[fp.sign] = 1
    w["Zp1"] = w["Zp1"].copy()
    w["B_Z1"] = w["B_Z1"].copy()
    w["Zp1"][i, j] = Xpp[0, 0]
    w["B_Z1"][:, i, j] = planes[:, 0, 0]
    return _finish_step(w, fp)


PUBLIC = ("X", "Y")  # known to the verifier; everything else is the prover's witness


def circuit(fp: FixedPoint):
    """The relations of one training step: matmuls (C, A, B), rescales (src, bits, out, q), Hadamards
    (out, bits-of-sign, in), linear relations [(coeff, tensor), ...] summing to zero."""
    Q, q_g = fp.Q, fp.Q + fp.lr_shift
    matmuls = [("Z1", "X", "W1"), ("Z2", "A1", "W2"), ("GA1", "GZ2", "W2^T"), ("GW2", "A1^T", "GZ2"),
               ("GW1", "X^T", "GZ1")]
    rescales = [("Z1", "B_Z1", "Zp1", Q), ("Z2", "B_Z2", "Z2p", Q), ("GA1", "B_GA1", "GA1p", Q),
                ("GW2", "B_GW2", "GW2p", q_g), ("GW1", "B_GW1", "GW1p", q_g)]
    hadamards = [("A1", "B_Z1", "Zp1"), ("GZ1", "B_Z1", "GA1p")]
    linears = [[(1, "GZ2"), (-1, "Z2p"), (1, "Y")], [(1, "W1n"), (-1, "W1"), (1, "GW1p")],
               [(1, "W2n"), (-1, "W2"), (1, "GW2p")]]
    return matmuls, rescales, hadamards, linears


def to_witness(trace: dict) -> dict[str, np.ndarray]:
    return {k: to_field(v) for k, v in trace.items()}


# ---------------------------------------------------------------- oracle access to the witness (commitment stand-in)
def view(w: dict, name: str) -> np.ndarray:
    return w[name[:-2]].T if name.endswith("^T") else w[name]


def open_at(w: dict, name: str, point) -> int:
    """MLE of a (possibly transposed) matrix at point = row variables + column variables.

    A polynomial commitment would answer this in O(log) for the verifier; here it is computed from the plaintext."""
    if name.endswith("^T"):
        T = w[name[:-2]]
        nr = num_vars(T.shape[1])  # the view's row variables are the stored column variables
        point = list(point[nr:]) + list(point[:nr])
        return mle_eval(T, point)
    return mle_eval(w[name], point)


def absorb_witness(tr: Transcript, w: dict) -> None:
    for k in sorted(w):
        tr.absorb(k, w[k])


def _rand_point(tr, shape):
    return tr.challenges(sum(num_vars(s) for s in shape))


def plane_point(index: int) -> list[int]:
    """The hypercube point of plane ``index`` (first variable = most significant bit)."""
    m = num_vars(PLANES)
    return [(index >> (m - 1 - k)) & 1 for k in range(m)]


# ---------------------------------------------------------------- prover
def prove(w: dict, fp: FixedPoint) -> dict:
    """Fiat-Shamir proof of the whole training step: a list of sumcheck transcripts in circuit order."""
    tr = Transcript()
    absorb_witness(tr, w)
    matmuls, rescales, hadamards, linears = circuit(fp)
    proof = {"matmul": [], "bits": [], "hadamard": []}
    for C, A, B in matmuls:
        M, N = view(w, C).shape
        r_i, r_j = tr.challenges(num_vars(M)), tr.challenges(num_vars(N))
        a = matmul(eq_vector(r_i), view(w, A), count=False)  # A~(r_i, k) for all k, (K,)
        b = matmul(view(w, B), eq_vector(r_j), count=False)  # B~(k, r_j), (K,)
        msgs, _, _ = sumcheck_prove([a, b], tr, "mm")
        proof["matmul"].append(msgs)
    for _, bits, _, _ in rescales:
        Bt = w[bits]
        rb = _rand_point(tr, Bt.shape)
        msgs, _, _ = sumcheck_prove([eq_vector(rb), Bt, (Bt - 1) % P], tr, "bits")
        proof["bits"].append(msgs)
    for out, bits, inp in hadamards:
        r = _rand_point(tr, w[out].shape)
        one_minus_S = (1 - w[bits][fp.sign]) % P
        msgs, _, _ = sumcheck_prove([eq_vector(r), one_minus_S, w[inp]], tr, "had")
        proof["hadamard"].append(msgs)
    return proof


# ---------------------------------------------------------------- verifier
def verify(w: dict, proof: dict, fp: FixedPoint) -> tuple[bool, str]:
    """Replay the transcript; every check that fails names itself. Witness access only through ``open_at``."""
    tr = Transcript()
    absorb_witness(tr, w)
    matmuls, rescales, hadamards, linears = circuit(fp)
    for (C, A, B), msgs in zip(matmuls, proof["matmul"]):
        M, N = view(w, C).shape
        K = view(w, A).shape[1]
        r_i, r_j = tr.challenges(num_vars(M)), tr.challenges(num_vars(N))
        claim = open_at(w, C, r_i + r_j)
        ok, r_k, red = sumcheck_verify(claim, msgs, num_vars(K), 2, tr, "mm")
        if not ok or red != open_at(w, A, r_i + r_k) * open_at(w, B, r_k + r_j) % P:
            return False, f"matmul {C}"
    for (_, bits, _, _), msgs in zip(rescales, proof["bits"]):
        shape = w[bits].shape
        rb = _rand_point(tr, shape)
        ok, rf, red = sumcheck_verify(0, msgs, len(rb), 3, tr, "bits")
        OPS.mul += 2
        if not ok:
            return False, f"binary {bits}"
        b = open_at(w, bits, rf)
        if red != eq_eval(rb, rf) * b % P * ((b - 1) % P) % P:
            return False, f"binary {bits}"
    for (out, bits, inp), msgs in zip(hadamards, proof["hadamard"]):
        r = _rand_point(tr, w[out].shape)
        ok, rf, red = sumcheck_verify(open_at(w, out, r), msgs, len(r), 3, tr, "had")
        OPS.mul += 2
        if not ok:
            return False, f"hadamard {out}"
        s = open_at(w, bits, plane_point(fp.sign) + rf)
        if red != eq_eval(r, rf) * ((1 - s) % P) % P * open_at(w, inp, rf) % P:
            return False, f"hadamard {out}"
    for src, bits, out, q in rescales:  # recomposition, linear: one random point each
        r = _rand_point(tr, w[src].shape)
        planes = mle_eval_partial(w[bits], r)  # Bits~(j, r) for every plane j, (PLANES,)
        w_x, w_xp = plane_weights(q, fp.bits)
        OPS.mul += 2 * PLANES
        if (open_at(w, src, r) + (1 << (q - 1))) % P != int((planes * w_x % P).sum() % P) or \
                open_at(w, out, r) != int((planes * w_xp % P).sum() % P) or np.any(planes[fp.bits:] != 0):
            return False, f"recompose {bits}"
    for terms in linears:
        r = _rand_point(tr, w[terms[0][1]].shape)
        total = sum(c * open_at(w, name, r) for c, name in terms) % P
        if total != 0:
            return False, "linear " + terms[0][1]
    return True, "ok"


def proof_size(proof: dict) -> int:
    """Number of field elements the prover sends."""
    return sum(len(e) for part in proof.values() for msgs in part for e in msgs)


# ---------------------------------------------------------------- baseline: re-execution
def reexecute(w: dict, fp: FixedPoint) -> bool:
    """The naive verifier: recompute the whole trace (incl. the auxiliary bits) from X, Y, W1, W2 and compare.

    Matrix products run in the field (counted in OPS); elementwise work is counted as 10 ops per entry (generous).
    A value outside the encoding's signed range cannot come from an honest step: rejected."""
    try:
        return _reexecute(w, fp)
    except AssertionError:  # raised by ``decompose``: out of the signed range
        return False


def _reexecute(w: dict, fp: FixedPoint) -> bool:
    Q, q_g, nb = fp.Q, fp.Q + fp.lr_shift, fp.bits
    s = from_field
    X, Y, W1, W2 = (w[k] for k in ("X", "Y", "W1", "W2"))
    t = {}
    t["Z1"] = matmul(X, W1)
    Zp1, t["B_Z1"] = rescale(s(t["Z1"]), Q, nb)
    t["A1"] = to_field((1 - t["B_Z1"][fp.sign]) * Zp1)
    t["Z2"] = matmul(t["A1"], W2)
    Z2p, t["B_Z2"] = rescale(s(t["Z2"]), Q, nb)
    t["GZ2"] = to_field(Z2p - s(Y))
    t["GA1"] = matmul(t["GZ2"], W2.T)
    GA1p, t["B_GA1"] = rescale(s(t["GA1"]), Q, nb)
    t["GZ1"] = to_field((1 - t["B_Z1"][fp.sign]) * GA1p)
    t["GW2"] = matmul(t["A1"].T, t["GZ2"])
    GW2p, t["B_GW2"] = rescale(s(t["GW2"]), q_g, nb)
    t["GW1"] = matmul(X.T, t["GZ1"])
    GW1p, t["B_GW1"] = rescale(s(t["GW1"]), q_g, nb)
    t["W1n"], t["W2n"] = to_field(s(W1) - GW1p), to_field(s(W2) - GW2p)
    t.update(Zp1=to_field(Zp1), Z2p=to_field(Z2p), GA1p=to_field(GA1p), GW2p=to_field(GW2p), GW1p=to_field(GW1p))
    OPS.mul += 10 * (2 * t["Z1"].size + t["Z2"].size + W1.size + W2.size)
    return all(np.array_equal(v, w[k]) for k, v in t.items())


# ---------------------------------------------------------------- a single matrix product (the width sweep)
def prove_matmul(A, B, C) -> list:
    tr = Transcript("matmul")
    for k, v in (("A", A), ("B", B), ("C", C)):
        tr.absorb(k, v)
    r_i, r_j = tr.challenges(num_vars(C.shape[0])), tr.challenges(num_vars(C.shape[1]))
    a = matmul(eq_vector(r_i), A, count=False)  # (K,)
    b = matmul(B, eq_vector(r_j), count=False)  # (K,)
    msgs, _, _ = sumcheck_prove([a, b], tr, "mm")
    return msgs


def verify_matmul(A, B, C, msgs) -> bool:
    tr = Transcript("matmul")
    for k, v in (("A", A), ("B", B), ("C", C)):
        tr.absorb(k, v)
    r_i, r_j = tr.challenges(num_vars(C.shape[0])), tr.challenges(num_vars(C.shape[1]))
    ok, r_k, red = sumcheck_verify(mle_eval(C, r_i + r_j), msgs, num_vars(A.shape[1]), 2, tr, "mm")
    return ok and red == mle_eval(A, r_i + r_k) * mle_eval(B, r_k + r_j) % P


def reexecute_matmul(A, B, C) -> bool:
    return bool(np.array_equal(matmul(A, B), C))


# ---------------------------------------------------------------- tampering
TAMPERABLE = ("W1", "W2", "Z1", "Zp1", "A1", "Z2", "Z2p", "GZ2", "GA1", "GA1p", "GZ1", "GW2", "GW2p", "GW1", "GW1p",
              "W1n", "W2n", "B_Z1", "B_Z2", "B_GA1", "B_GW2", "B_GW1")


def tamper(w: dict, rng: np.random.Generator, target: str | None = None) -> tuple[dict, str]:
    """Copy of the witness with one entry of one tensor changed by a random non-zero amount (bits are flipped)."""
    name = target or TAMPERABLE[rng.integers(len(TAMPERABLE))]
    w2 = dict(w)
    T = w[name].copy()
    idx = tuple(int(rng.integers(s)) for s in T.shape)
    if name.startswith("B_"):
        T[idx] = 1 - T[idx]
    else:
        T[idx] = (T[idx] + int(rng.integers(1, P))) % P
    w2[name] = T
    return w2, name


def tamper_proof(proof: dict, rng: np.random.Generator) -> dict:
    """Copy of the proof with one sumcheck message entry changed."""
    kind = sorted(proof)[rng.integers(len(proof))]
    i = int(rng.integers(len(proof[kind])))
    j = int(rng.integers(len(proof[kind][i])))
    k = int(rng.integers(len(proof[kind][i][j])))
    new = {key: [[list(e) for e in msgs] for msgs in part] for key, part in proof.items()}
    new[kind][i][j][k] = (new[kind][i][j][k] + int(rng.integers(1, P))) % P
    return new


# ---------------------------------------------------------------- float reference and the training loop
def float_step(X, Y, W1, W2, lr: float):
    """The same step in float64 (reference for the fixed-point trace): square loss, ReLU, SGD on the batch sum."""
    Z1 = X @ W1
    A1 = np.maximum(Z1, 0)
    GZ2 = A1 @ W2 - Y  # (B, c)
    GZ1 = (GZ2 @ W2.T) * (Z1 > 0)
    return W1 - lr * X.T @ GZ1, W2 - lr * A1.T @ GZ2


def init_mlp(d0: int, n: int, c_pad: int, c: int, rng: np.random.Generator):
    """Float initial weights (d0, n) and (n, c_pad), output columns beyond c are zero padding."""
    W1 = rng.normal(0, 1 / np.sqrt(d0), (d0, n))
    W2 = np.zeros((n, c_pad))
    W2[:, :c] = rng.normal(0, 1 / np.sqrt(n), (n, c))
    return W1, W2


def accuracy(X, y, W1, W2, c: int) -> float:
    return float(((np.maximum(X @ W1, 0) @ W2)[:, :c].argmax(1) == y).mean())
