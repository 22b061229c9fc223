"""TDN (arXiv 2507.01131): the CP tensor product against e3nn's CG product, a naive loop, and exact identities."""
import math

import numpy as np
import pytest
import torch
from e3nn import o3

from reprolab.equivariant import tdn


pytestmark = pytest.mark.usefixtures("float64")  # tests/conftest.py


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("L", [1, 2, 3])
def test_cg_tensor_and_exact_cp_match_e3nn(L):
    """The dense Wigner-3j tensor and its exact CP give e3nn's o3.TensorProduct (shared path weights)."""
    x, y, w = tdn.random_inputs(L, 7, 3, seed=L)
    ref = tdn.E3nnTensorProduct(L, 3).double()(x, y, w)
    M = tdn.cg_tensor(L)
    assert rel(tdn.tp_dense(M, x, y, w), ref) < 1e-5  # e3nn's 3j tables are float32-accurate
    A, B, C = tdn.cp_exact(M)
    assert A.shape[1] <= (L + 1) ** 4
    assert rel(tdn.tp_cp(A, B, C, x, y, w), tdn.tp_dense(M, x, y, w)) < 1e-12
    assert torch.allclose(tdn.cp_reconstruct(A, B, C), M, atol=1e-14)


def test_e3nn_layout_round_trip_and_paths():
    L, U = 3, 4
    x = torch.randn(5, (L + 1) ** 2, U)
    assert torch.equal(tdn.from_e3nn(tdn.to_e3nn(x, L), L, U), x)
    # e3nn's own instruction list enumerates the same paths (all-even irreps: every triangle allowed)
    tp = tdn.e3nn_tensor_product(L, 1)
    assert sorted((i.i_in1, i.i_in2, i.i_out) for i in tp.instructions) == sorted(tdn.fc_paths(L))
    macs = tdn.tp_macs(L)
    assert macs["cg_path_sum"] == sum(int(np.prod(o3.wigner_3j(a, b, c).shape)) for a, b, c in tdn.fc_paths(L))
    assert macs["cp"] == 2 * 16 * 63 + 63


def test_path_set_pinned_independently():
    """The path set is pinned apart from fc_paths: hand counts 5, 15, 34, 65 for L = 1..4, and e3nn's own
    FullTensorProduct (every l1 x l2 -> l_out it allows, filtered to l_out <= L) gives the same (l1, l2, l_out)."""
    assert [len(tdn.fc_paths(L)) for L in (1, 2, 3, 4)] == [5, 15, 34, 65]
    for L in (1, 2, 3):
        irr = tdn.sh_irreps(L)
        full = o3.FullTensorProduct(irr, irr, filter_ir_out=[o3.Irrep(l, 1) for l in range(L + 1)])
        ref = sorted((irr[i.i_in1].ir.l, irr[i.i_in2].ir.l, full.irreps_out[i.i_out].ir.l) for i in full.instructions)
        assert sorted(tdn.fc_paths(L)) == ref
    # the CG tensor has a nonzero block on every path (no path is silently empty)
    M, sl = tdn.cg_tensor(2), tdn.l_slices(2)
    assert all(M[sl[a], sl[b], sl[c]].abs().max() > 1e-3 for a, b, c in tdn.fc_paths(2))


def test_dense_and_direction_blind_products():
    L = 2
    x, y, w = tdn.random_inputs(L, 6, 3, seed=4)
    M = tdn.cg_tensor(L)
    dense = tdn.DenseTensorProduct(M, dtype=torch.float64)
    assert rel(dense(x, y, w), tdn.E3nnTensorProduct(L, 3).double()(x, y, w)) < 1e-5
    blind = tdn.DenseTensorProduct(tdn.direction_blind_tensor(L), dtype=torch.float64)
    # only the l2 = 0 (scalar) component of y enters: changing the direction changes nothing
    x2, y2, _ = tdn.random_inputs(L, 6, 3, seed=5)
    assert torch.allclose(blind(x, y, w), blind(x, y2, w), atol=1e-12)
    scale = torch.cat([torch.full((2 * l + 1,), (2 * l + 1) ** -0.5) for l in range(L + 1)])  # 3j(l, 0, l)
    assert torch.allclose(blind(x, y, w), scale[None, :, None] * x * w[:, :, 0][:, None, :] * y[:, :1, :1], atol=1e-12)


def test_symmetric_mac_count():
    m = tdn.tp_macs(4, channels=32)  # reviewer's numbers: CG 13075 + 32 * 625, CP 2800 + 32 * 5712
    assert m["cg_path_sum"] == 13075 and m["cg_dense_per_edge"] == 33075 and m["cp_per_edge"] == 185584
    # CP saves no multiply-adds per edge at L = 4 for V = 1 and U >= 3
    assert all(tdn.tp_macs(4, channels=U)["ratio_per_edge_cg_over_cp"] < 1 for U in (3, 8, 256))


def test_tersoff_si_frames_small():
    fr = tdn.make_si_frames(["si17"], [300.0], 2, 1, 0.05, 0, anneal_steps=2)
    assert len(fr) == 2 and fr[0].pos.shape == (17, 3) and np.isfinite(fr[0].forces).all()
    assert len(tdn.si_clusters(["si20"])["si20"]) == 20
    from ase import Atoms
    from ase.calculators.tersoff import Tersoff, TersoffParameters

    # the label has angular terms: a 4-coordinated Si with the same four 2.35 A bonds (no other pair within the
    # cutoff) has a different energy tetrahedral and square-planar (EMT, pairwise densities only, could not tell)
    def e(neigh):
        a = Atoms("Si5", positions=np.vstack([np.zeros(3), 2.35 * np.asarray(neigh, float) / np.linalg.norm(neigh[0])]))
        a.calc = Tersoff({("Si", "Si", "Si"): TersoffParameters(**tdn.TERSOFF_SI)})
        return a.get_potential_energy()
    tetra = [[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    square = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]
    assert abs(e(tetra) - e(square)) > 0.1


def test_cp_product_against_naive_loop():
    """C((A^T x) * (B^T y) * w), general V, against explicit sums over r, i, j, v."""
    g = torch.Generator().manual_seed(0)
    E, d, U, V, R = 2, 4, 3, 2, 5
    x, y = torch.randn(E, d, U, generator=g), torch.randn(E, d, V, generator=g)
    w = torch.randn(E, U, V, generator=g)
    A, B, C = (torch.randn(d, R, generator=g) for _ in range(3))
    out = torch.zeros(E, d, U)
    for e in range(E):
        for c in range(d):
            for u in range(U):
                out[e, c, u] = sum(C[c, r] * sum(A[i, r] * x[e, i, u] for i in range(d))
                                   * sum(w[e, u, v] * B[j, r] * y[e, j, v] for j in range(d) for v in range(V))
                                   for r in range(R))
    assert torch.allclose(tdn.tp_cp(A, B, C, x, y, w), out, atol=1e-10)
    assert torch.allclose(tdn.tp_cp(A, B, C, x, y[:, :, :1], w[:, :, :1]),
                          tdn.tp_dense(tdn.cp_reconstruct(A, B, C), x, y[:, :, :1], w[:, :, :1]), atol=1e-10)


def test_als_recovers_an_exact_low_rank_tensor_and_reports_its_error():
    g = torch.Generator().manual_seed(0)
    A0, B0, C0 = (torch.randn(6, 3, generator=g) for _ in range(3))
    M = tdn.cp_reconstruct(A0, B0, C0)  # a random rank-3 tensor
    A, B, C, err = tdn.cp_als(M, 3, n_iter=300, seed=1, tol=0.0)
    assert err < 1e-6 and torch.allclose(tdn.cp_reconstruct(A, B, C), M, atol=1e-5)
    M2 = tdn.cg_tensor(2)
    A, B, C, err = tdn.cp_als(M2, 10, n_iter=20, seed=0)
    assert math.isclose(err, float((M2 - tdn.cp_reconstruct(A, B, C)).norm() / M2.norm()))


def test_equivariance_exact_and_bounded():
    L = 2
    x, y, w = tdn.random_inputs(L, 16, 3, seed=3)
    rots = tdn.random_rotations(3, seed=3)
    assert torch.allclose(rots[0] @ rots[0].T, torch.eye(3), atol=1e-12)
    e3 = tdn.E3nnTensorProduct(L, 3).double()
    assert tdn.equivariance_error(e3, L, x, y, w, rots)["max"] < 1e-5
    M = tdn.cg_tensor(L)
    for R in (4, 28):
        A, B, C, err = tdn.cp_als(M, R, n_iter=20, seed=0)
        eq = tdn.equivariance_error(lambda a, b, c: tdn.tp_cp(A, B, C, a, b, c), L, x, y, w, rots)
        assert eq["max"] > 1e-4  # an inexact decomposition is not equivariant ...
        assert eq["max"] <= tdn.equivariance_bound(M, A, B, C, x, y, w, eq["out_norm"])  # ... but within the bound


def _frames():
    rng = np.random.default_rng(0)
    from ase.calculators.emt import EMT

    atoms = tdn.base_clusters(["ico13"])["ico13"]
    out = []
    for k in range(3):
        a = atoms.copy()
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        a.calc = EMT()
        out.append(tdn.Frame(a.positions.copy(), float(a.get_potential_energy()), a.get_forces().copy(), "ico13", 0, k))
    return out


@pytest.mark.parametrize("kind", ["cg", "cp", "blind"])
def test_potential_forces_are_gradients_and_equivariant(kind):
    torch.manual_seed(0)
    factory, _ = tdn.make_tp_factory(kind, 1, 4, als_iter=200)
    model = tdn.Potential(1, 4, 2, 4, 8, 4.5, factory, 10.0).double()
    fr = _frames()
    b = tdn.collate(fr, 4.5, dtype=torch.float64)
    E, F = model(b, create_graph=False)
    # forces = -dE/dx by central differences
    h = 1e-5
    for atom, ax in [(0, 0), (5, 2)]:
        bp, bm = tdn.collate(fr, 4.5, dtype=torch.float64), tdn.collate(fr, 4.5, dtype=torch.float64)
        bp.pos[atom, ax] += h
        bm.pos[atom, ax] -= h
        fd = -(model(bp)[0][0] - model(bm)[0][0]) / (2 * h)
        assert abs(float(fd) - float(F[atom, ax])) < 1e-6 * max(1.0, abs(float(fd)))
    # rotation + translation: energy invariant; forces rotate (exactly for CG, within the CP error for CP)
    Rm = tdn.random_rotations(1, seed=5)[0]
    br = tdn.collate(fr, 4.5, dtype=torch.float64)
    br.pos = br.pos @ Rm.T + torch.tensor([0.3, -1.0, 2.0])
    Er, Fr = model(br, create_graph=False)
    tol = 5e-2 if kind == "cp" else 1e-8
    assert rel(Er, E) < tol
    assert rel(Fr, F @ Rm.T) < (0.5 if kind == "cp" else 1e-6)


def test_split_keeps_the_end_of_every_trajectory_for_test():
    frames = [tdn.Frame(np.zeros((2, 3)), 0.0, np.zeros((2, 3)), "c", run, k) for run in range(2) for k in range(6)]
    train, test = tdn.split_frames(frames, 0.34)
    assert [(f.run, f.step) for f in test] == [(0, 4), (0, 5), (1, 4), (1, 5)]
    assert len(train) == 8 and not {id(f) for f in train} & {id(f) for f in test}


def test_trivial_errors_by_hand():
    a = tdn.Frame(np.zeros((2, 3)), -2.0, np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]]), "c", 0, 0)
    b = tdn.Frame(np.zeros((2, 3)), -4.0, np.zeros((2, 3)), "c", 0, 1)
    t = tdn.trivial_errors([a, b], [a])
    assert math.isclose(t["energy_mae"], 0.5) and math.isclose(t["force_mae"], 4.0 / 6.0)

