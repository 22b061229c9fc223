"""PONITA (arXiv 2310.02970): invariants, separable convolution, sphere grid, simulator and equivariance, each against an
independent reference (naive loops, e3nn rotations, finite differences, the official simulator written as a loop)."""

import numpy as np
import pytest
import torch
from e3nn import o3

from reprolab.equivariant import md_data
from reprolab.equivariant.ponita import (EGNN, Ponita, SeparableFiberConv, charged_nbody, distances, energy_and_forces,
                                         equivariance_error, fibonacci_grid, r3s2_invariants)


pytestmark = pytest.mark.usefixtures("float64")  # tests/conftest.py


def test_invariants_match_naive_loop():
    pos = torch.randn(2, 5, 3)
    grid = fibonacci_grid(7, torch.float64)
    attr, fiber = r3s2_invariants(pos, grid)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                for o in range(7):
                    d = pos[b, j] - pos[b, i]
                    a1 = float(torch.dot(grid[o], d))
                    a2 = float(torch.linalg.norm(d - a1 * grid[o]))
                    assert attr[b, i, j, o, 0].item() == pytest.approx(a1, abs=1e-12)
                    assert attr[b, i, j, o, 1].item() == pytest.approx(a2, abs=1e-12)
    for o in range(7):
        for p in range(7):
            assert fiber[o, p, 0].item() == pytest.approx(float(torch.dot(grid[o], grid[p])), abs=1e-12)
    # a1^2 + a2^2 = |x_j - x_i|^2 (Pythagoras), and the distances helper agrees
    assert torch.allclose(attr[..., 0] ** 2 + attr[..., 1] ** 2, distances(pos).expand(-1, -1, -1, 7) ** 2)


def test_sphere_grid():
    for n in (1, 8, 20, 64):
        g = fibonacci_grid(n, torch.float64)
        assert g.shape == (n, 3)
        assert torch.allclose(g.norm(dim=-1), torch.ones(n))
    g = fibonacci_grid(200, torch.float64)
    assert g.mean(0).norm() < 1e-2  # balanced
    assert torch.allclose(g.T @ g / 200, torch.eye(3) / 3, atol=1e-2)  # second moment of the uniform measure on S2
    d = torch.cdist(g, g) + 10 * torch.eye(200)
    nn_d = d.min(1).values
    assert nn_d.max() / nn_d.min() < 1.6  # near-uniform spacing


def test_separable_conv_matches_naive_loop():
    B, N, O, C, K = 1, 3, 4, 2, 5
    conv = SeparableFiberConv(C, K)
    x = torch.randn(B, N, O, C)
    basis = torch.randn(B, N, N, O, K)
    fiber_basis = torch.randn(O, O, K)
    out = conv(x, basis, fiber_basis)
    Wk, Wf = conv.kernel.weight, conv.fiber_kernel.weight  # (C, K)
    ref = torch.zeros(B, N, O, C)
    for i in range(N):
        for p in range(O):
            for c in range(C):
                s = 0.0
                for o in range(O):
                    x1 = sum(float(Wk[c] @ basis[0, i, j, o]) * float(x[0, j, o, c]) for j in range(N))
                    s += float(Wf[c] @ fiber_basis[o, p]) * x1
                ref[0, i, p, c] = s / O + conv.bias[c]
    assert torch.allclose(out, ref, atol=1e-10)


def _rand_cloud(B=3, N=6):
    pos = torch.randn(B, N, 3) * 1.5
    X = torch.nn.functional.one_hot(torch.randint(0, 3, (N,)), 3).double()[None].expand(B, -1, -1)
    return pos, X


@pytest.mark.parametrize("num_ori", [0, 6])
def test_forces_rotation_equivariant(num_ori):
    """Forces of PNITA exactly; of PONITA exactly when the grid rotates with the points, not with a fixed grid.
    Rotations from e3nn (independent of our QR sampler)."""
    pos, X = _rand_cloud()
    m = Ponita(3, 0, 8, 2, out_scalar=1, num_ori=num_ori, basis_dim=8).double()
    _, F = energy_and_forces(m, "ponita", pos, X)
    R = o3.rand_matrix().double()
    if num_ori == 0:
        _, F_rot = energy_and_forces(m, "pnita", pos @ R.T, X)
        assert torch.allclose(F_rot, F @ R.T, atol=1e-10)
        return
    with torch.enable_grad():
        p = (pos @ R.T).requires_grad_(True)
        E = m(p, X, grid=m.grid @ R.T)[0][..., 0].sum()
        (g,) = torch.autograd.grad(E, p)
    assert torch.allclose(-g, F @ R.T, atol=1e-10)  # joint rotation: exact
    _, F_fixed = energy_and_forces(m, "ponita", pos @ R.T, X)
    assert (F_fixed - F @ R.T).norm() / F.norm() > 1e-6  # a fixed grid is not rotation invariant


def test_egnn_equivariant_and_translation_invariant():
    pos, X = _rand_cloud()
    m = EGNN(3, 8, 2, "energy").double()
    _, F = energy_and_forces(m, "egnn", pos, X)
    R = o3.rand_matrix().double()
    _, F_rot = energy_and_forces(m, "egnn", pos @ R.T + torch.tensor([1.0, -2.0, 0.5]), X)
    assert torch.allclose(F_rot, F @ R.T, atol=1e-10)
    nb = EGNN(1, 8, 2, "nbody", edge_dim=1).double()
    vel, q = torch.randn(2, 5, 3), torch.sign(torch.randn(2, 5, 1))
    e = (q * q.transpose(1, 2))[..., None]
    x0 = torch.randn(2, 5, 3)
    out = nb(x0, vel.norm(dim=-1, keepdim=True), vel, e)
    out_r = nb(x0 @ R.T, vel.norm(dim=-1, keepdim=True), vel @ R.T, e)
    assert torch.allclose(out_r, out @ R.T, atol=1e-10)


def test_forces_are_minus_energy_gradient():
    pos, X = _rand_cloud(B=1, N=4)
    m = Ponita(3, 0, 8, 2, out_scalar=1, num_ori=5, basis_dim=8).double()
    _, F = energy_and_forces(m, "ponita", pos, X)
    h = 1e-6
    for a in range(4):
        for k in range(3):
            d = torch.zeros_like(pos)
            d[0, a, k] = h
            Ep = m(pos + d, X)[0][..., 0].sum()
            Em = m(pos - d, X)[0][..., 0].sum()
            assert float(F[0, a, k]) == pytest.approx(-float(Ep - Em) / (2 * h), rel=1e-5, abs=1e-7)


def test_equivariance_error_helper_is_zero_for_an_equivariant_map():
    gen = torch.Generator().manual_seed(0)
    fn = lambda p, vecs, grid: p - p.mean(1, keepdim=True) + 2 * vecs[0]  # noqa: E731
    pos, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert equivariance_error(fn, pos, [v], 4, gen) < 1e-13
    fn_bad = lambda p, vecs, grid: p + torch.tensor([1.0, 0.0, 0.0])  # noqa: E731
    assert equivariance_error(fn_bad, pos, [v], 4, gen) > 1e-3


def test_charged_nbody_matches_official_loop():
    """The vectorised simulator against the official ChargedParticlesSim.sample_trajectory written as a loop
    (one simulation, frames every step)."""
    out = charged_nbody(1, steps=6, frame_0=3, frame_T=6, sample_freq=1, seed=3)
    rng = np.random.RandomState(3)
    n, dt = 5, 0.001
    q = rng.choice(np.array([-1.0, 1.0]), size=(1, n, 1))[0]
    edges = q @ q.T
    loc = rng.randn(n, 3)
    vel = rng.randn(n, 3)
    vel = vel * 0.5 / np.linalg.norm(vel, axis=-1, keepdims=True)

    def force(loc):
        F = np.zeros((n, 3))
        for i in range(n):
            for j in range(n):
                if i != j:
                    r = loc[i] - loc[j]
                    F[i] += edges[i, j] * r / np.linalg.norm(r) ** 3
        return np.clip(F, -100.0, 100.0)

    vel = vel + dt * force(loc)
    frames = {}
    for i in range(1, 7):
        loc = loc + dt * vel
        frames[i] = (loc.copy(), vel.copy())
        vel = vel + dt * force(loc)
    assert np.allclose(out["loc"][0], frames[3][0], atol=1e-12)
    assert np.allclose(out["vel"][0], frames[3][1], atol=1e-12)
    assert np.allclose(out["loc_end"][0], frames[6][0], atol=1e-12)
    assert np.array_equal(out["charges"][0], q)


def test_fd_relative_errors_closed_form():
    F = np.ones((5, 2, 3))
    fd = F[[0, 4]] * np.array([1.0, 1.1])[:, None, None]
    err = md_data.fd_relative_errors({"F": F, "fd_index": np.array([0, 4]), "fd_forces": fd})
    assert np.allclose(err, [0.0, 0.1])



@pytest.mark.parametrize("num_ori", [0, 6])
def test_calibration_sets_conv_output_std_to_input_std(num_ori):
    """Official conv.py:134-140: after the first training forward every convolution's output has the std of its input
    (kernels rescaled by std(in) / std(out)); without calibration the spatial sum over neighbours changes the std."""
    pos, X = _rand_cloud(B=4, N=8)
    pos = pos * 2.0
    m = Ponita(3, 0, 16, 3, out_scalar=1, num_ori=num_ori, basis_dim=16).double()
    seen = []
    hooks = [layer.conv.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].std(), (out - mod.bias).std())))
             for layer in m.layers]
    m(pos, X)
    uncalibrated = [float(o / i) for i, o in seen]
    seen.clear()
    m.calibrate_on_next_forward()
    m(pos, X)
    for h in hooks:
        h.remove()
    ratios = [float(o / i) for i, o in seen]
    assert len(ratios) == 3
    assert all(0.9 < r < 1.1 for r in ratios), ratios
    assert max(abs(r - 1) for r in uncalibrated) > 0.1, uncalibrated  # the test is not vacuous


def test_nbody_vector_output_jointly_equivariant_and_readout_matches_loop():
    """PONITA's N-body vector output (input: scalar charge, vector velocity): rotating points, velocities and the grid
    together rotates the output exactly; and the vector readout is 1/|O| sum_o f(o) o of the averaged readouts
    (official to_from_sphere.py), checked against a naive loop over the fibre."""
    B, N, O = 3, 5, 6
    pos, vel = torch.randn(B, N, 3), torch.randn(B, N, 3)
    q = torch.sign(torch.randn(B, N, 1))
    m = Ponita(1, 1, 8, 2, out_vec=1, num_ori=O, basis_dim=8).double()
    outs = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: outs.append(out)) for r in m.readouts if r is not None]
    _, v = m(pos, q, vel[:, :, None, :])
    for h in hooks:
        h.remove()
    f = sum(outs) / len(outs)  # (B, N, O, 1)
    ref = torch.zeros(B, N, 3)
    for b in range(B):
        for n in range(N):
            for o in range(O):
                ref[b, n] += f[b, n, o, 0] * m.grid[o] / O
    assert torch.allclose(v[:, :, 0, :], ref, atol=1e-12)
    R = o3.rand_matrix().double()
    _, v_rot = m(pos @ R.T, q, (vel @ R.T)[:, :, None, :], grid=m.grid @ R.T)
    assert torch.allclose(v_rot, v @ R.T, atol=1e-10)
    _, v_fixed = m(pos @ R.T, q, (vel @ R.T)[:, :, None, :])
    assert (v_fixed - v @ R.T).norm() / v.norm() > 1e-6  # the fixed grid alone is not rotation invariant


def test_undertraining_statistic():
    from reprolab.equivariant.ponita import undertraining

    flat = [1.0, 0.5, 0.4, 0.35, 0.34, 0.34, 0.35, 0.34, 0.345, 0.35]  # best epoch 4: not in the last 20%
    assert undertraining(flat, 0.2, 0.25) == 0.0
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # best at the end; last 3 epochs from 0.4 to 0.1
    assert undertraining(falling, 0.2, 0.25) == pytest.approx((0.4 - 0.1) / 0.4)
    tail = [1.0, 0.5, 0.4, 0.35, 0.34, 0.34, 0.34, 0.34, 0.34, 0.339]  # best at the end but only 0.3% better
    assert undertraining(tail, 0.2, 0.25) == pytest.approx(0.001 / 0.34)
