"""Prime-field arithmetic, multilinear extensions, a Fiat-Shamir transcript and the sumcheck protocol.

Building blocks of zkDL (Sun, Li, Zhang: "zkDL: Efficient Zero-Knowledge Proofs of Deep Learning Training",
https://arxiv.org/abs/2307.16273), which proves matrix products with Thaler's sumcheck over multilinear extensions.

Field: p = 2^31 - 1 held in numpy int64 (a product of two reduced elements is < 2^62, so it never overflows; sums of
many products are reduced through 16-bit limbs, see ``matmul``).  A vector ``v`` of length 2^m is the table of a
multilinear polynomial ``v~`` over {0,1}^m with the FIRST variable as the most significant bit of the index, so a
row-major (2^a, 2^b) matrix has its row variables first.

``OPS`` counts field multiplications of whoever runs (verifier or re-execution) so that costs can be compared
deterministically (wall-clock goes to timings, never to metrics).
"""
from __future__ import annotations

import hashlib

import numpy as np

P = 2**31 - 1  # Mersenne prime modulus


class OpCounter:
    """Counts field multiplications (the unit of cost) between ``reset`` calls."""

    def __init__(self):
        self.mul = 0

    def reset(self) -> int:
        n, self.mul = self.mul, 0
        return n


OPS = OpCounter()


# ---------------------------------------------------------------- field helpers
def to_field(x) -> np.ndarray:
    """Signed integers -> field elements (negative x becomes p - |x|)."""
    return np.mod(np.asarray(x, dtype=np.int64), P)


def from_field(a) -> np.ndarray:
    """Field elements -> signed integers in (-p/2, p/2]."""
    a = np.asarray(a, dtype=np.int64)
    return np.where(a > P // 2, a - P, a)


def inv(a: int) -> int:
    return pow(int(a) % P, P - 2, P)


def matmul(A: np.ndarray, B: np.ndarray, count: bool = True) -> np.ndarray:
    """(A @ B) mod p for reduced int64 matrices, exact: A is split into 16-bit limbs so no partial sum overflows."""
    A = np.asarray(A, dtype=np.int64)
    B = np.asarray(B, dtype=np.int64)
    assert A.shape[-1] <= 2**16, "inner dimension too large for the limb trick"
    A_hi, A_lo = A >> 16, A & 0xFFFF  # A = A_hi * 2^16 + A_lo, A_hi < 2^15
    hi = (A_hi @ B) % P
    lo = (A_lo @ B) % P
    if count:
        OPS.mul += A.size * (B.shape[1] if B.ndim > 1 else 1)
    return (hi * 65536 + lo) % P


# ---------------------------------------------------------------- multilinear extensions
def num_vars(n: int) -> int:
    m = int(n).bit_length() - 1
    assert 1 << m == n, f"length {n} is not a power of two"
    return m


def eq_vector(r) -> np.ndarray:
    """eq(r, x) for every x in {0,1}^m, as a vector of length 2^m (first variable = most significant bit)."""
    e = np.ones(1, dtype=np.int64)
    for rj in r:
        rj = int(rj) % P
        e = np.stack([e * ((1 - rj) % P) % P, e * rj % P], axis=1).reshape(-1)  # (2 * len,)
        OPS.mul += 2 * e.size // 2
    return e


def eq_eval(r, s) -> int:
    """eq(r, s) = prod_j (r_j s_j + (1 - r_j)(1 - s_j)) for two points."""
    out = 1
    for a, b in zip(r, s):
        out = out * ((a * b + (1 - a) * (1 - b)) % P) % P
    OPS.mul += 3 * len(r)
    return out


def fold(v: np.ndarray, r: int) -> np.ndarray:
    """Fix the first variable of v~ to r: v~(r, .) = v_lo + r (v_hi - v_lo)."""
    h = v.size // 2
    lo, hi = v[:h], v[h:]
    OPS.mul += h
    return (lo + (hi - lo) % P * (int(r) % P)) % P


def mle_eval(v, r) -> int:
    """v~(r) for a table v of length 2^m (any shape, flattened row-major) and a point r of length m."""
    v = np.asarray(v, dtype=np.int64).reshape(-1)
    assert len(r) == num_vars(v.size)
    for rj in r:
        v = fold(v, rj)
    return int(v[0])


def mle_eval_partial(v, r) -> np.ndarray:
    """Fix the LAST len(r) variables of v~ to r and return the table over the remaining (leading) variables."""
    v = np.asarray(v, dtype=np.int64).reshape(-1)
    k = len(r)
    rest = v.size >> k
    e = eq_vector(r)  # (2^k,)
    return matmul(v.reshape(rest, 1 << k), e.reshape(-1, 1)).reshape(rest)  # (rest,)


def mle_naive(v, r) -> int:
    """v~(r) = sum_x eq(r, x) v(x), by an explicit loop over the hypercube (reference for tests)."""
    v = [int(a) for a in np.asarray(v).reshape(-1)]
    m = len(r)
    total = 0
    for x in range(1 << m):
        w = 1
        for j in range(m):
            bit = (x >> (m - 1 - j)) & 1
            w = w * (r[j] if bit else (1 - r[j])) % P
        total = (total + w * v[x]) % P
    return total


# ---------------------------------------------------------------- Fiat-Shamir
class Transcript:
    """SHA-256 hash chain: both sides absorb the same messages and squeeze the same challenges."""

    def __init__(self, label: str = "zkdl"):
        self.state = hashlib.sha256(label.encode()).digest()

    def absorb(self, label: str, data) -> None:
        if isinstance(data, np.ndarray):
            payload = np.ascontiguousarray(data, dtype=np.int64).tobytes() + str(data.shape).encode()
        elif isinstance(data, (list, tuple)):
            payload = b",".join(str(int(x)).encode() for x in data)
        else:
            payload = str(int(data)).encode()
        self.state = hashlib.sha256(self.state + label.encode() + b"|" + payload).digest()

    def challenge(self) -> int:
        self.state = hashlib.sha256(self.state + b"challenge").digest()
        return int.from_bytes(self.state, "big") % P

    def challenges(self, n: int) -> list[int]:
        return [self.challenge() for _ in range(n)]


# ---------------------------------------------------------------- sumcheck for a product of multilinear tables
def interpolate(evals, r: int) -> int:
    """Value at r of the polynomial of degree d = len(evals) - 1 with g(t) = evals[t] for t = 0..d (Lagrange)."""
    d = len(evals) - 1
    r = int(r) % P
    out = 0
    for i, yi in enumerate(evals):
        num, den = 1, 1
        for j in range(d + 1):
            if j != i:
                num = num * ((r - j) % P) % P
                den = den * ((i - j) % P) % P
        out = (out + int(yi) * num % P * inv(den)) % P
    OPS.mul += (d + 1) * (2 * d + 2)
    return out


def sumcheck_prove(factors: list[np.ndarray], transcript: Transcript, label: str = "sc"):
    """Prove sum_x prod_i f_i~(x) over {0,1}^m. Returns (messages, challenges r, final factor values f_i~(r)).

    Each round sends g_j(t) for t = 0..d (d = number of factors) where
    g_j(t) = sum over the remaining variables of prod_i f_i~(r_1..r_{j-1}, t, x_{j+1}..x_m).
    """
    tables = [np.asarray(f, dtype=np.int64).reshape(-1) % P for f in factors]
    m = num_vars(tables[0].size)
    d = len(tables)
    messages, rs = [], []
    for _ in range(m):
        h = tables[0].size // 2
        cur = [f[:h] for f in tables]  # f~(.., t, ..) on the remaining half-cube, starting at t = 0
        diff = [(f[h:] - f[:h]) % P for f in tables]
        evals = []
        for t in range(d + 1):
            if t:
                cur = [(c + df) % P for c, df in zip(cur, diff)]
            prod = cur[0]
            for c in cur[1:]:
                prod = prod * c % P
            evals.append(int(prod.sum() % P))
        transcript.absorb(label, evals)
        r = transcript.challenge()
        messages.append(evals)
        rs.append(r)
        tables = [fold(f, r) for f in tables]
    return messages, rs, [int(f[0]) for f in tables]


def sumcheck_verify(claim: int, messages, m: int, degree: int, transcript: Transcript, label: str = "sc"):
    """Check the rounds of a sumcheck. Returns (ok, challenges r, the reduced claim g_m(r_m)) to be checked by the
    caller against the factors' values at r (from openings)."""
    if len(messages) != m:
        return False, [], 0
    rs = []
    for evals in messages:
        if len(evals) != degree + 1 or (evals[0] + evals[1]) % P != claim % P:
            return False, rs, 0
        transcript.absorb(label, evals)
        r = transcript.challenge()
        rs.append(r)
        claim = interpolate(evals, r)
    return True, rs, claim
