"""Tensor Decomposition Networks for Fast Machine Learning Force Field Computations (TDN), arXiv 2507.01131.

https://arxiv.org/abs/2507.01131 ; official code divelab/AIRS, OpenMol/TDN (models/_tensor_product.py, models/tdn.py).

The SO(3) tensor product of two irreps features x, y (components 0..lmax stacked, d = (lmax+1)^2) through every
Clebsch-Gordan path |l1 - l2| <= l_out <= min(lmax, l1 + l2) with one weight per channel shared by all paths
("path-weight sharing", official ``_generate_fully_connected_instructions`` and ``codegen_tensor_product``) is one
bilinear map with a fixed 3-way tensor M (d, d, d), the sum of the Wigner 3j blocks:

    out[c, u] = sum_ij M[i, j, c] x[i, u] (sum_v w[u, v] y[j, v])            (mode "uvu")

TDN replaces M by a rank-R CP decomposition M ~ sum_r A[:, r] o B[:, r] o C[:, r], so that

    out = C ((A^T x) * (B^T y) * w)                                          (three small matmuls, O(d R) per channel)

with R = 7 L^2 (official ``rank_scheduler("quadratic")``): O(L^4) instead of O(L^6) for the dense tensor. The product
is exactly equivariant only when the decomposition is exact; otherwise its equivariance error is bounded by the
approximation error (the exact product is equivariant, rotations are orthogonal):

    || f_R(Dx, Dy) - D f_R(x, y) || <= 2 ||E||_op ||x|| ||y|| |w|,   E = M - [[A, B, C]]  (per edge and channel)

Here: the CG tensor, its exact CP (rank = number of nonzero fibres, <= d^2) and a rank-R CP fitted by alternating least
squares; the CP product; layout converters to e3nn's ``o3.TensorProduct`` (the peer CG implementation); equivariance
error and its bound; and a small NequIP-style potential (energy, forces = -dE/dpos) whose tensor product is either
e3nn's CG, the CP product, or a direction-blind control (the CG tensor with every l2 > 0 entry zeroed), trained on
Tersoff-labelled Si clusters generated here (EMT-labelled Cu clusters remain selectable).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from e3nn import o3


# ----------------------------------------------------------------------------------------------------------------------
# The Clebsch-Gordan tensor and its CP decompositions
# ----------------------------------------------------------------------------------------------------------------------
def fc_paths(lmax: int) -> list[tuple[int, int, int]]:
    """All (l1, l2, l_out) with |l1 - l2| <= l_out <= min(lmax, l1 + l2), l1, l2 <= lmax (official instruction set)."""
    return [(l1, l2, lo) for l1 in range(lmax + 1) for l2 in range(lmax + 1)
            for lo in range(abs(l1 - l2), min(lmax, l1 + l2) + 1)]


def l_slices(lmax: int) -> list[slice]:
    out, s = [], 0
    for l in range(lmax + 1):
        out.append(slice(s, s + 2 * l + 1))
        s += 2 * l + 1
    return out


def sh_irreps(lmax: int, mul: int = 1) -> o3.Irreps:
    """mul x (0e + 1e + ... + lmax e): the official all-even labels (every triangle path allowed)."""
    return o3.Irreps("+".join(f"{mul}x{l}e" for l in range(lmax + 1)))


def cg_tensor(lmax: int, dtype=torch.float64) -> torch.Tensor:
    """M (d, d, d): sum over fc_paths of the Wigner 3j blocks placed at their (l1, l2, l_out) slices (no path
    normalization, as the official codegen_tensor_product)."""
    d = (lmax + 1) ** 2
    sl = l_slices(lmax)
    M = torch.zeros(d, d, d, dtype=dtype)
    for l1, l2, lo in fc_paths(lmax):
        M[sl[l1], sl[l2], sl[lo]] += o3.wigner_3j(l1, l2, lo, dtype=dtype)
    return M


def cp_reconstruct(A, B, C):
    return torch.einsum("ir,jr,cr->ijc", A, B, C)  # (d, d, d)


def cp_exact(M: torch.Tensor):
    """An exact CP of M: one rank-1 term e_i o e_j o M[i, j, :] per nonzero fibre (rank <= d^2; the official
    rank_scheduler("full") uses (L+1)^4 = d^2)."""
    d = M.shape[0]
    ij = [(i, j) for i in range(d) for j in range(d) if bool(M[i, j].abs().max() > 0)]
    R = len(ij)
    A = torch.zeros(d, R, dtype=M.dtype)
    B = torch.zeros(d, R, dtype=M.dtype)
    C = torch.zeros(d, R, dtype=M.dtype)
    for r, (i, j) in enumerate(ij):
        A[i, r] = 1.0
        B[j, r] = 1.0
        C[:, r] = M[i, j]
    return A, B, C


def cp_als(M: torch.Tensor, rank: int, n_iter: int = 500, seed: int = 0, ridge: float = 1e-10, tol: float = 1e-12):
    """Rank-R CP of M by alternating least squares (float64). Returns (A, B, C, relative Frobenius error).

    The official code fits the factors by AdamW on random inputs (x Gaussian, y spherical harmonics, w Gaussian) with
    a relative-RMSE loss on the product's output; with E[x x^T] = E[y y^T] = I (component-normalised SH) that
    objective's expectation is ||M - [[A, B, C]]||_F / ||M||_F, which ALS minimises directly. Initialisation: the
    official xavier_uniform with gain rank^(-1/3) (``initialize_abc``), from a seeded generator.
    """
    d = M.shape[0]
    M = M.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    bound = rank ** (-1 / 3) * math.sqrt(6.0 / (d + rank))
    A, B, C = [(torch.rand(d, rank, generator=g, dtype=torch.float64) * 2 - 1) * bound for _ in range(3)]
    I = torch.eye(rank, dtype=torch.float64)
    norm = M.norm()
    prev = math.inf
    for _ in range(n_iter):
        A = torch.linalg.solve((B.T @ B) * (C.T @ C) + ridge * I, torch.einsum("ijc,jr,cr->ri", M, B, C)).T
        B = torch.linalg.solve((A.T @ A) * (C.T @ C) + ridge * I, torch.einsum("ijc,ir,cr->rj", M, A, C)).T
        C = torch.linalg.solve((A.T @ A) * (B.T @ B) + ridge * I, torch.einsum("ijc,ir,jr->rc", M, A, B)).T
        err = float((M - cp_reconstruct(A, B, C)).norm() / norm)
        if prev - err < tol * max(err, 1e-30):
            break
        prev = err
    # balance the column norms of the three factors (does not change the product)
    na, nb, nc = A.norm(dim=0), B.norm(dim=0), C.norm(dim=0)
    s = (na * nb * nc).clamp_min(1e-300) ** (1 / 3)
    A, B, C = A * (s / na.clamp_min(1e-300)), B * (s / nb.clamp_min(1e-300)), C * (s / nc.clamp_min(1e-300))
    return A, B, C, float((M - cp_reconstruct(A, B, C)).norm() / norm)


def rank_quadratic(lmax: int) -> int:
    """Official default rank schedule (``rank_scheduler("quadratic")``): 7 L^2."""
    return 7 * lmax ** 2


# ----------------------------------------------------------------------------------------------------------------------
# Tensor products: dense CG reference, CP product, e3nn peer
# ----------------------------------------------------------------------------------------------------------------------
def tp_dense(M, x, y, w):
    """Reference: out[e, c, u] = sum_ijv M[i, j, c] x[e, i, u] y[e, j, v] w[e, u, v]; x (E, d, U), y (E, d, V)."""
    return torch.einsum("ijc,eiu,ejv,euv->ecu", M, x, y, w)


def tp_cp(A, B, C, x, y, w):
    """CP tensor product, mode uvu: C ((A^T x) * (B^T y) w). x (E, d, U), y (E, d, V), w (E, U, V) -> (E, d, U)."""
    xa = x.transpose(1, 2) @ A  # (E, U, R)
    if y.shape[2] == 1:
        z = xa * (y[:, :, 0] @ B)[:, None, :] * w[:, :, 0, None]  # (E, U, R)
    else:
        yb = y.transpose(1, 2) @ B  # (E, V, R)
        z = xa * torch.einsum("evr,euv->eur", yb, w)
    return (z @ C.T).transpose(1, 2)  # (E, d, U)


class CPTensorProduct(nn.Module):
    """Frozen CP factors (official: ``p.requires_grad_(False)`` after the fit); the learned weights come per edge."""

    def __init__(self, A, B, C, dtype=torch.float32):
        super().__init__()
        self.register_buffer("A", A.to(dtype))
        self.register_buffer("B", B.to(dtype))
        self.register_buffer("C", C.to(dtype))

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def forward(self, x, y, w):
        return tp_cp(self.A, self.B, self.C, x, y, w)


class DenseTensorProduct(nn.Module):
    """A fixed dense tensor M (d, d, d), y (one channel) contracted with M first: T_e = sum_j M[:, j, :] y[e, j]
    (d^3 per edge), then out = T_e^T x w (d^2 per edge and channel). For V = 1 the fastest CG implementation here."""

    def __init__(self, M, dtype=torch.float32):
        super().__init__()
        self.d = M.shape[0]
        self.register_buffer("Mflat", M.permute(1, 0, 2).reshape(self.d, -1).to(dtype))  # (j, i * c)

    def forward(self, x, y, w):
        E = x.shape[0]
        T = (y[:, :, 0] @ self.Mflat).reshape(E, self.d, self.d)  # (E, i, c)
        return torch.bmm(T.transpose(1, 2), x) * w[:, :, 0][:, None, :]  # (E, c, U)


def direction_blind_tensor(lmax: int) -> torch.Tensor:
    """The CG tensor with every l2 > 0 entry zeroed: the message sees the bond only through |r| (the radial weights),
    never its direction (premise control: if this arm is as accurate as CG, the labels do not need the product)."""
    M = cg_tensor(lmax)
    M[:, 1:, :] = 0
    return M


def to_e3nn(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """(E, d, U) component-major -> e3nn's (E, sum_l U (2l+1)) with blocks [u, m] per l."""
    return torch.cat([x[:, s, :].transpose(1, 2).reshape(x.shape[0], -1) for s in l_slices(lmax)], dim=1)


def from_e3nn(z: torch.Tensor, lmax: int, mul: int) -> torch.Tensor:
    out, o = [], 0
    for l in range(lmax + 1):
        n = mul * (2 * l + 1)
        out.append(z[:, o:o + n].reshape(z.shape[0], mul, 2 * l + 1).transpose(1, 2))
        o += n
    return torch.cat(out, dim=1)  # (E, d, mul)


def e3nn_tensor_product(lmax: int, channels: int, mul2: int = 1) -> o3.TensorProduct:
    """The peer CG product: e3nn o3.TensorProduct over every fc path, mode uvu, raw Wigner 3j (no normalization),
    per-edge weights (one weight tensor (U, V) per path; path-weight sharing feeds it the same (U, V) on every path)."""
    instr = [(l1, l2, lo, "uvu", True) for l1, l2, lo in fc_paths(lmax)]
    return o3.TensorProduct(sh_irreps(lmax, channels), sh_irreps(lmax, mul2), sh_irreps(lmax, channels), instr,
                            irrep_normalization="none", path_normalization="none", internal_weights=False,
                            shared_weights=False)


class E3nnTensorProduct(nn.Module):
    """e3nn's CG product with the layout (E, d, U) and shared path weights w (E, U, V)."""

    def __init__(self, lmax: int, channels: int, mul2: int = 1):
        super().__init__()
        self.lmax, self.channels, self.mul2 = lmax, channels, mul2
        self.tp = e3nn_tensor_product(lmax, channels, mul2)
        self.n_paths = len(fc_paths(lmax))

    def forward(self, x, y, w):
        wf = w.reshape(w.shape[0], -1).repeat(1, self.n_paths)  # (E, paths * U * V), same weights on every path
        out = self.tp(to_e3nn(x, self.lmax), to_e3nn(y, self.lmax), wf)
        return from_e3nn(out, self.lmax, self.channels)


# ----------------------------------------------------------------------------------------------------------------------
# Equivariance error and its bound; cost accounting
# ----------------------------------------------------------------------------------------------------------------------
def random_inputs(lmax: int, n: int, channels: int, seed: int, dtype=torch.float64):
    """x Gaussian (n, d, U), y = component-normalised SH of random directions (n, d, 1), w Gaussian (n, U, 1)
    (the official fit's x1_init="random", x2_init="sh")."""
    g = torch.Generator().manual_seed(seed)
    d = (lmax + 1) ** 2
    x = torch.randn(n, d, channels, generator=g, dtype=dtype)
    vec = torch.randn(n, 3, generator=g, dtype=dtype)
    y = o3.spherical_harmonics(sh_irreps(lmax), vec, normalize=True, normalization="component")[:, :, None]
    w = torch.randn(n, channels, 1, generator=g, dtype=dtype)
    return x, y, w


def random_rotations(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """n Haar-random rotation matrices (normalised Gaussian quaternions), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=dtype)
    return o3.quaternion_to_matrix(q / q.norm(dim=1, keepdim=True))


def wigner_D(lmax: int, R: torch.Tensor) -> torch.Tensor:
    return sh_irreps(lmax).D_from_matrix(R)  # (d, d)


def equivariance_error(f, lmax: int, x, y, w, rotations) -> dict:
    """Relative error ||f(Dx, Dy, w) - D f(x, y, w)||_F / ||f(x, y, w)||_F per rotation, and the bound
    2 ||E||_op sqrt(sum_eu ||x_eu||^2 ||y_e||^2 |w_eu|^2) / ||f||_F needs E (see equivariance_bound)."""
    base = f(x, y, w)
    errs, rmse = [], []
    for R in rotations:
        D = wigner_D(lmax, R).to(x.dtype)
        rot = f(torch.einsum("ij,ejc->eic", D, x), torch.einsum("ij,ejc->eic", D, y), w)
        diff = rot - torch.einsum("ij,ejc->eic", D, base)
        errs.append(float(diff.norm() / base.norm()))
        rmse.append(float(diff.pow(2).mean().sqrt()))  # the official measure (_equivariance_error): absolute RMSE
    return {"per_rotation": errs, "max": max(errs), "mean": float(np.mean(errs)), "out_norm": float(base.norm()),
            "abs_rmse_mean": float(np.mean(rmse)), "out_rms": float(base.pow(2).mean().sqrt())}


def equivariance_bound(M, A, B, C, x, y, w, out_norm: float) -> float:
    """Theorem: f_R(Dx, Dy) - D f_R(x, y) = D E(x, y) - E(Dx, Dy) (f exact is equivariant), and
    ||E(x, y)_{e,u}|| <= ||E_(3)||_2 ||x_eu|| ||y_e|| |w_eu| with E_(3) the (c, ij) unfolding; D is orthogonal.
    Returns the bound on the relative error (for V = 1)."""
    E = (M - cp_reconstruct(A, B, C)).to(torch.float64)
    d = E.shape[0]
    op = float(torch.linalg.matrix_norm(E.permute(2, 0, 1).reshape(d, d * d), ord=2))
    per = (x.norm(dim=1) ** 2) * (y.norm(dim=1) ** 2) * (w[:, :, 0] ** 2)  # (E, U)
    return 2 * op * float(per.sum().sqrt()) / out_norm


def tp_macs(lmax: int, rank: int | None = None, channels: int = 1) -> dict:
    """Multiply-adds with y one channel (V = 1, official CPTensorProductSH).

    Per edge and channel, the per-edge precontractions left out (the original, lopsided count): CG path sum (e3nn /
    official codegen contract every (2l1+1)(2l2+1)(2lo+1) block) against CP 2 d R + R.
    Per edge with U = `channels` channels, the per-edge precontractions counted on both sides (symmetric count):
    dense/y-first CG contracts y with the path blocks once per edge (cg_path_sum) and then costs d^2 per channel;
    CP computes B^T y once per edge (d R) and then 2 d R + R per channel."""
    d = (lmax + 1) ** 2
    R = rank_quadratic(lmax) if rank is None else rank
    cg = sum((2 * a + 1) * (2 * b + 1) * (2 * c + 1) for a, b, c in fc_paths(lmax))
    cg_edge = cg + channels * d * d
    cp_edge = d * R + channels * (2 * d * R + R)
    return {"lmax": lmax, "d": d, "rank": R, "paths": len(fc_paths(lmax)), "cg_path_sum": cg, "dense": d ** 3,
            "cp": 2 * d * R + R, "ratio_cg_over_cp": cg / (2 * d * R + R), "channels": channels,
            "cg_dense_per_edge": cg_edge, "cp_per_edge": cp_edge, "ratio_per_edge_cg_over_cp": cg_edge / cp_edge}


def time_call(fn, n_inner: int, n_repeats: int) -> list[float]:
    """Seconds per call, one value per repeat (each the mean of n_inner calls after one warm-up)."""
    fn()
    out = []
    for _ in range(n_repeats):
        t0 = time.perf_counter()
        for _ in range(n_inner):
            fn()
        out.append((time.perf_counter() - t0) / n_inner)
    return out


def benchmark_tp(lmax: int, n_edges: int, channels: int, rank: int, n_inner: int, n_repeats: int, seed: int = 0,
                 backward: bool = False) -> dict:
    """Wall-clock of e3nn's CG product, the dense/y-first CG product (DenseTensorProduct: the fastest CG here for
    V = 1) and the CP product (float32, same inputs), interleaved per repeat. Ratios are CG time / CP time."""
    x, y, w = (t.float() for t in random_inputs(lmax, n_edges, channels, seed))
    A, B, C, _ = cp_als(cg_tensor(lmax), rank, n_iter=5, seed=seed)  # factors' values do not affect the time
    cp = CPTensorProduct(A, B, C)
    e3 = e3nn_tensor_product(lmax, channels)
    dense = DenseTensorProduct(cg_tensor(lmax))
    n_paths = len(fc_paths(lmax))
    xe, ye = to_e3nn(x, lmax), to_e3nn(y, lmax)  # e3nn gets its native layout (conversion not timed)
    wf = w.reshape(n_edges, -1).repeat(1, n_paths)
    if backward:
        x.requires_grad_(True)
        xe.requires_grad_(True)

    def run_cg():
        out = e3(xe, ye, wf)
        if backward:
            out.sum().backward()

    def run_cp():
        out = cp(x, y, w)
        if backward:
            out.sum().backward()

    def run_dense():
        out = dense(x, y, w)
        if backward:
            out.sum().backward()

    t_cg, t_cp, t_dense = [], [], []
    for _ in range(n_repeats):  # interleave the three so that machine load hits them alike
        t_cg += time_call(run_cg, n_inner, 1)
        t_dense += time_call(run_dense, n_inner, 1)
        t_cp += time_call(run_cp, n_inner, 1)
    return {"cg": t_cg, "cp": t_cp, "dense": t_dense, "ratio": [a / b for a, b in zip(t_cg, t_cp)],
            "ratio_dense": [a / b for a, b in zip(t_dense, t_cp)]}


# ----------------------------------------------------------------------------------------------------------------------
# Data: EMT-labelled Cu clusters (generated here)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    pos: np.ndarray  # (N, 3) Angstrom
    energy: float  # eV
    forces: np.ndarray  # (N, 3) eV/Angstrom
    cluster: str
    run: int  # trajectory index
    step: int  # position of the frame in its trajectory


def base_clusters(names: list[str]):
    from ase.cluster import Decahedron, Icosahedron, Octahedron

    make = {"ico13": lambda: Icosahedron("Cu", 2), "octa19": lambda: Octahedron("Cu", 3),
            "deca13": lambda: Decahedron("Cu", 2, 2, 0), "octa38": lambda: Octahedron("Cu", 4, 1),
            "ico55": lambda: Icosahedron("Cu", 3)}
    return {n: make[n]() for n in names}


def make_cu_frames(clusters: list[str], temperatures: list[float], frames_per_run: int, stride: int,
                   rattle: float, seed: int, dt_fs: float = 5.0, friction: float = 0.02) -> list[Frame]:
    """Langevin MD with ASE's EMT at each temperature from each base cluster (rattled by `rattle` Angstrom), keeping
    every `stride`-th step after one stride of warm-up; each kept frame is labelled by EMT (energy, forces)."""
    from ase.calculators.emt import EMT

    import warnings

    frames, run = [], 0
    for ci, (name, atoms0) in enumerate(base_clusters(clusters).items()):
        for ti, T in enumerate(temperatures):
            rng = np.random.default_rng([seed, ci, ti])
            atoms = atoms0.copy()
            atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
            atoms.calc = EMT()
            with warnings.catch_warnings():  # ASE 3.29 warns about fixcm=True (the default) in Langevin
                warnings.simplefilter("ignore", FutureWarning)
                frames += _langevin_frames(atoms, T, dt_fs, friction, rng, stride, frames_per_run, name, run)
            run += 1
    return frames


def _langevin_frames(atoms, T: float, dt_fs: float, friction: float, rng, stride: int, frames_per_run: int,
                     name: str, run: int) -> list[Frame]:
    """Maxwell-Boltzmann velocities at T, Langevin MD (its calculator attached to `atoms`), one stride of warm-up, then
    frames_per_run frames every `stride` steps, each labelled by the calculator (energy, forces)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    MaxwellBoltzmannDistribution(atoms, temperature_K=T, rng=rng)
    dyn = Langevin(atoms, dt_fs * units.fs, temperature_K=T, friction=friction, rng=rng)
    dyn.run(stride)
    frames = []
    for k in range(frames_per_run):
        dyn.run(stride)
        frames.append(Frame(atoms.positions.copy(), float(atoms.get_potential_energy()), atoms.get_forces().copy(),
                            name, run, k))
    return frames


# Tersoff (1988) silicon, PRB 37, 6991: the parameter set of ASE's own Tersoff test (ase/test/calculator/test_tersoff.py,
# equal to LAMMPS' Si.tersoff); the bond order depends on the bond angles (three-body g(theta)), unlike EMT
TERSOFF_SI = dict(A=3264.7, B=95.373, lambda1=3.2394, lambda2=1.3258, lambda3=1.3258, beta=0.33675, gamma=1.0, m=3.0,
                  n=22.956, c=4.8381, d=2.0417, h=0.0, R=3.0, D=0.2)


def si_clusters(names: list[str]):
    """Si clusters cut from the diamond lattice (a = 5.43 A): 'si17' = an atom and its first two shells
    (r < 3.9 A), 'si14' = the atoms within 3.5 A of a bond centre."""
    from ase import Atoms
    from ase.build import bulk

    b = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
    p = b.positions
    centre = p[np.argmin(np.linalg.norm(p - p.mean(0), axis=1))]
    nb = p[np.argsort(np.linalg.norm(p - centre, axis=1))[1]]
    spec = {"si17": (centre, 3.9), "si20": ((centre + nb) / 2, 4.2)}
    out = {}
    for n in names:
        c, r = spec[n]
        m = np.linalg.norm(p - c, axis=1) < r
        out[n] = Atoms(f"Si{int(m.sum())}", positions=p[m] - c)
    return out


def make_si_frames(clusters: list[str], temperatures: list[float], frames_per_run: int, stride: int, rattle: float,
                   seed: int, dt_fs: float = 1.0, friction: float = 0.02, anneal_steps: int = 300,
                   anneal_T: float = 1200.0) -> list[Frame]:
    """Langevin MD with ASE's Tersoff (Si, TERSOFF_SI): each cluster is first annealed (anneal_steps at anneal_T: the
    bare diamond fragment reconstructs its surface), then at each temperature one stride of warm-up and
    frames_per_run frames every `stride` steps, each labelled by Tersoff (energy, forces)."""
    from ase import units
    from ase.calculators.tersoff import Tersoff, TersoffParameters
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    import warnings

    params = {("Si", "Si", "Si"): TersoffParameters(**TERSOFF_SI)}
    frames, run = [], 0
    for ci, (name, atoms0) in enumerate(si_clusters(clusters).items()):
        rng = np.random.default_rng([seed, ci])
        atoms = atoms0.copy()
        atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        atoms.calc = Tersoff(params)
        with warnings.catch_warnings():  # ASE 3.29: fixcm FutureWarning, MaxwellBoltzmann DeprecationWarning
            warnings.simplefilter("ignore")
            MaxwellBoltzmannDistribution(atoms, temperature_K=anneal_T, rng=rng)
            Langevin(atoms, dt_fs * units.fs, temperature_K=anneal_T, friction=friction, rng=rng).run(anneal_steps)
            start = atoms.copy()
            for ti, T in enumerate(temperatures):
                rng_t = np.random.default_rng([seed, ci, ti])
                atoms = start.copy()
                atoms.calc = Tersoff(params)
                frames += _langevin_frames(atoms, T, dt_fs, friction, rng_t, stride, frames_per_run, name, run)
                run += 1
    return frames


def split_frames(frames: list[Frame], test_fraction: float) -> tuple[list[Frame], list[Frame]]:
    """The last test_fraction of every trajectory is test, the rest train (no test frame between training frames)."""
    train, test = [], []
    for run in sorted({f.run for f in frames}):
        part = [f for f in frames if f.run == run]
        n_test = max(1, int(round(test_fraction * len(part))))
        train += part[:-n_test]
        test += part[-n_test:]
    return train, test


def neighbours(pos: np.ndarray, cutoff: float):
    """Directed edges (src, dst) of all pairs closer than cutoff (no self loops)."""
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    src, dst = np.nonzero((dist < cutoff) & ~np.eye(len(pos), dtype=bool))
    return src, dst


@dataclass
class Batch:
    pos: torch.Tensor  # (N, 3)
    src: torch.Tensor  # (E,)
    dst: torch.Tensor
    graph: torch.Tensor  # (N,) frame index of each atom
    n_graphs: int
    n_atoms: torch.Tensor  # (G,)
    energy: torch.Tensor  # (G,)
    forces: torch.Tensor  # (N, 3)


def collate(frames: list[Frame], cutoff: float, dtype=torch.float32) -> Batch:
    pos, src, dst, graph, off = [], [], [], [], 0
    for g, f in enumerate(frames):
        s, t = neighbours(f.pos, cutoff)
        pos.append(f.pos)
        src.append(s + off)
        dst.append(t + off)
        graph.append(np.full(len(f.pos), g))
        off += len(f.pos)
    return Batch(torch.tensor(np.concatenate(pos), dtype=dtype), torch.tensor(np.concatenate(src)),
                 torch.tensor(np.concatenate(dst)), torch.tensor(np.concatenate(graph)), len(frames),
                 torch.tensor([len(f.pos) for f in frames]), torch.tensor([f.energy for f in frames], dtype=dtype),
                 torch.tensor(np.concatenate([f.forces for f in frames]), dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------------
# The potential
# ----------------------------------------------------------------------------------------------------------------------
def bessel_rbf(r: torch.Tensor, n: int, cutoff: float) -> torch.Tensor:
    k = torch.arange(1, n + 1, dtype=r.dtype) * math.pi / cutoff
    return math.sqrt(2 / cutoff) * torch.sin(k * r[:, None]) / r[:, None]  # (E, n)


def cosine_envelope(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    return 0.5 * (torch.cos(math.pi * r / cutoff) + 1) * (r < cutoff)


class Interaction(nn.Module):
    """One message-passing layer: m_ij = TP(h_j, Y(r_ij), w(|r_ij|)); sum over j / avg degree; per-l channel mixing;
    gate (SiLU on scalars, sigmoid-gated l > 0 blocks, official ``Gate``); residual."""

    def __init__(self, lmax: int, channels: int, n_rbf: int, radial_hidden: int, tp: nn.Module, avg_degree: float):
        super().__init__()
        self.lmax, self.channels, self.avg_degree, self.tp = lmax, channels, avg_degree, tp
        self.radial = nn.Sequential(nn.Linear(n_rbf, radial_hidden), nn.SiLU(), nn.Linear(radial_hidden, channels))
        self.mix = nn.Parameter(torch.randn(lmax + 1, channels, channels) / math.sqrt(channels))
        self.gates = nn.Linear(channels, lmax * channels)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h, src, dst, Y, rbf, env):
        w = (self.radial(rbf) * env[:, None])[:, :, None]  # (E, U, 1)
        m = self.tp(h[src], Y, w)  # (E, d, U)
        agg = torch.zeros_like(h).index_add(0, dst, m) / self.avg_degree  # (N, d, U)
        blocks = [torch.einsum("nmc,cd->nmd", agg[:, s, :], self.mix[l]) for l, s in enumerate(l_slices(self.lmax))]
        s0 = blocks[0] + self.bias
        gate = torch.sigmoid(self.gates(s0[:, 0, :])).reshape(-1, self.lmax, self.channels)  # (N, lmax, U)
        out = [nn.functional.silu(s0)] + [b * gate[:, l - 1, None, :] for l, b in enumerate(blocks) if l > 0]
        return h + torch.cat(out, dim=1)


class Potential(nn.Module):
    """E = sum_i (scale e_i + shift), F = -dE/dpos; single species (Cu)."""

    def __init__(self, lmax: int, channels: int, n_layers: int, n_rbf: int, radial_hidden: int, cutoff: float,
                 make_tp, avg_degree: float, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.lmax, self.channels, self.n_rbf, self.cutoff = lmax, channels, n_rbf, cutoff
        self.embed = nn.Parameter(torch.randn(channels))
        self.layers = nn.ModuleList([Interaction(lmax, channels, n_rbf, radial_hidden, make_tp(), avg_degree)
                                     for _ in range(n_layers)])
        self.readout = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
        self.irreps = sh_irreps(lmax)
        self.shift, self.scale = shift, scale

    def energy(self, pos, src, dst, graph, n_graphs):
        vec = pos[dst] - pos[src]  # (E, 3)  dst - src: the direction from the sender
        r = vec.norm(dim=1)
        Y = o3.spherical_harmonics(self.irreps, vec, normalize=True, normalization="component")[:, :, None]
        rbf, env = bessel_rbf(r, self.n_rbf, self.cutoff), cosine_envelope(r, self.cutoff)
        h = torch.zeros(pos.shape[0], (self.lmax + 1) ** 2, self.channels, dtype=pos.dtype)
        h[:, 0, :] = self.embed
        for layer in self.layers:
            h = layer(h, src, dst, Y, rbf, env)
        e = self.readout(h[:, 0, :])[:, 0] * self.scale + self.shift  # (N,)
        return torch.zeros(n_graphs, dtype=pos.dtype).index_add(0, graph, e)

    def forward(self, b: Batch, create_graph: bool = True):
        pos = b.pos.detach().requires_grad_(True)
        E = self.energy(pos, b.src, b.dst, b.graph, b.n_graphs)
        F = -torch.autograd.grad(E.sum(), pos, create_graph=create_graph)[0]
        return E, F


def make_tp_factory(kind: str, lmax: int, channels: int, rank: int | None = None, als_iter: int = 500, seed: int = 0,
                    als_tol: float = 1e-9):
    """kind 'cg': e3nn's o3.TensorProduct; 'cp': frozen CP factors fitted once by ALS (shared by the layers, as the
    official cache file is shared by every CPTensorProduct of one configuration). Returns (factory, info)."""
    if kind == "cg":
        return (lambda: E3nnTensorProduct(lmax, channels)), {"rank": None, "rel_err": 0.0}
    if kind == "blind":
        return (lambda: DenseTensorProduct(direction_blind_tensor(lmax))), {"rank": None, "rel_err": None}
    R = rank_quadratic(lmax) if rank is None else rank
    A, B, C, err = cp_als(cg_tensor(lmax), R, n_iter=als_iter, seed=seed, tol=als_tol)
    return (lambda: CPTensorProduct(A, B, C)), {"rank": R, "rel_err": err}


def evaluate(model: Potential, frames: list[Frame], cutoff: float, chunk: int = 64) -> dict:
    """Energy MAE per atom (eV/atom) and force-component MAE (eV/Angstrom)."""
    e_err, f_err, n_f = [], [], 0
    for i in range(0, len(frames), chunk):
        b = collate(frames[i:i + chunk], cutoff)
        E, F = model(b, create_graph=False)
        e_err.append(((E.detach() - b.energy).abs() / b.n_atoms).numpy())
        f_err.append((F.detach() - b.forces).abs().sum().item())
        n_f += b.forces.numel()
    return {"energy_mae": float(np.concatenate(e_err).mean()), "force_mae": float(sum(f_err) / n_f)}


def trivial_errors(train: list[Frame], test: list[Frame]) -> dict:
    """Mean per-atom training energy times N (energy), zero force."""
    mu = float(np.mean([f.energy / len(f.pos) for f in train]))
    return {"energy_mae": float(np.mean([abs(f.energy / len(f.pos) - mu) for f in test])),
            "force_mae": float(np.mean(np.concatenate([np.abs(f.forces).ravel() for f in test])))}


def train_potential(kind: str, train: list[Frame], test: list[Frame], seed: int, *, lmax: int, channels: int,
                    n_layers: int, n_rbf: int, radial_hidden: int, cutoff: float, steps: int, batch_size: int,
                    lr: float, energy_weight: float, force_weight: float, rank: int | None = None,
                    als_iter: int = 500) -> dict:
    """Train one potential (loss: energy_weight L1(E) + force_weight RMSE(F), official main.py criteria; Adam with
    cosine decay) and evaluate it on the test frames."""
    torch.manual_seed(seed)
    factory, info = make_tp_factory(kind, lmax, channels, rank, als_iter, seed)
    mu = float(np.mean([f.energy / len(f.pos) for f in train]))
    f_rms = float(np.sqrt(np.mean(np.concatenate([f.forces.ravel() for f in train]) ** 2)))
    avg_deg = float(np.mean([len(neighbours(f.pos, cutoff)[0]) / len(f.pos) for f in train]))
    model = Potential(lmax, channels, n_layers, n_rbf, radial_hidden, cutoff, factory, avg_deg, mu, f_rms)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = rng.choice(len(train), batch_size, replace=False)
        b = collate([train[i] for i in idx], cutoff)
        E, F = model(b)
        loss = energy_weight * (E - b.energy).abs().mean() + force_weight * ((F - b.forces) ** 2).mean().sqrt()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    return {"kind": kind, "seed": seed, **evaluate(model, test, cutoff), "cp_rank": info["rank"],
            "cp_rel_err": info["rel_err"], "loss_curve": losses, "train_seconds": train_s, "model": model}
