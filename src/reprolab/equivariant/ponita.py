"""PONITA: Fast, Expressive SE(n) Equivariant Networks through Weight-Sharing in Position-Orientation Space.

Bekkers, Vadgama, Hesselink, van der Linden, Romero, arXiv 2310.02970; official code github.com/ebekkers/ponita
(read at commit a584aa2). Dense re-implementation for small, fully connected point clouds (no torch_geometric).

Fibre-bundle PONITA (``num_ori > 0``, the paper's main model) lifts every point x_i to a grid of orientations
o in S^2 shared by all points and convolves over R^3 x S^2 with kernels conditioned on the invariants of the pair
(x_i, o), (x_j, o') (official ``ponita/geometry/invariants.py:10-34``)::

    a1 = o^T (x_j - x_i)            a2 = || (x_j - x_i) - a1 o ||            a3 = o^T o'

The convolution is *separable* (``ponita/nn/conv.py:99-123``, depth-wise, ``groups = channels``): first spatial,
per orientation, with a kernel k(a1, a2), then over the fibre with a kernel k_S2(a3)::

    f1[i, o, c] = sum_j k(a1, a2)[i, j, o, c] f[j, o, c]
    f2[i, p, c] = 1/|O| sum_o k_S2(o^T p)[o, p, c] f1[i, o, c] + b_c

Kernels are an MLP of polynomial features of the invariants (``PolynomialFeatures(degree)``, then
Linear-GELU-Linear-GELU, ``ponita/models/ponita.py:60-61``), shared by all layers, then one linear map per layer.
Each layer is a ConvNeXt block (conv, LayerNorm, Linear(C, 4C), GELU, Linear(4C, C), layer scale, residual;
``ponita/nn/convnext.py``). Readouts after every layer are averaged; a scalar output is the mean over the fibre, a
vector output is ``1/|O| sum_o f(o) o`` (``ponita/utils/to_from_sphere.py``). Input scalars are repeated over the
fibre, input vectors v become v^T o.

The position-only variant (PNITA, ``num_ori = 0``, ``PonitaPointCloud``): the same ConvNeXt blocks on R^3 with the
kernel conditioned on ||x_j - x_i|| only (the paper's ablation). EGNN (Satorras et al. 2021) is the third arm.
Forces are F = -dE/dx by autograd of the predicted energy (official ``lightning_wrappers/md17.py:92-106``).

Equivariance: a fixed orientation grid is not rotation invariant, so fibre-bundle PONITA is equivariant only up to
its discretisation of S^2; it is *exactly* equivariant jointly in (points, grid): rotating both leaves every
invariant unchanged (``measure_equivariance(..., joint=True)`` checks this to machine precision).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- the sphere grid
def fibonacci_grid(n: int, dtype=torch.float32) -> torch.Tensor:
    """``n`` near-uniform unit vectors on S^2 (the Fibonacci / golden-spiral lattice), shape (n, 3)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = torch.sqrt(1.0 - z ** 2)
    phi = math.pi * (1.0 + math.sqrt(5.0)) * i
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1).to(dtype)


# ----------------------------------------------------------------------------------------------- invariants
def r3s2_invariants(pos: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable R^3 x S^2 invariants of a fully connected cloud: spatial (B, N, N, O, 2) = (a1, a2) of receiver i,
    sender j, orientation o; fibre (O, O, 1) = a3 = o^T o'. ``pos`` (B, N, 3), ``grid`` (O, 3)."""
    rel = pos[:, None, :, :] - pos[:, :, None, :]  # (B, N_i, N_j, 3): x_j - x_i
    a1 = torch.einsum("bijd,od->bijo", rel, grid)[..., None]  # (B, N, N, O, 1)
    perp = rel[:, :, :, None, :] - a1 * grid  # (B, N, N, O, 3)
    a2 = _safe_norm(perp)  # (B, N, N, O, 1)
    a3 = (grid[:, None, :] * grid[None, :, :]).sum(-1, keepdim=True)  # (O, O, 1)
    return torch.cat([a1, a2], -1), a3


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """||v|| over the last axis (keepdim) with a zero gradient at v = 0 (the self-loops), as torch's norm has."""
    sq = (v * v).sum(-1, keepdim=True)
    nz = sq > 0
    return torch.where(nz, torch.sqrt(torch.where(nz, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def distances(pos: torch.Tensor) -> torch.Tensor:
    """Pairwise ||x_j - x_i||, (B, N, N, 1) (the position-only invariant)."""
    return _safe_norm(pos[:, None, :, :] - pos[:, :, None, :])


class PolynomialFeatures(nn.Module):
    """[x, x (x) x, x (x) x (x) x, ...] up to ``degree`` (official ``ponita/nn/embedding.py:4-15``)."""

    def __init__(self, degree: int):
        super().__init__()
        self.degree = degree

    def forward(self, x):
        out = [x]
        for _ in range(1, self.degree):
            out.append(torch.einsum("...i,...j->...ij", out[-1], x).flatten(-2, -1))
        return torch.cat(out, -1)


def basis_mlp(in_dim: int, degree: int, hidden: int, basis_dim: int) -> nn.Sequential:
    n_poly = sum(in_dim ** k for k in range(1, degree + 1))
    return nn.Sequential(PolynomialFeatures(degree), nn.Linear(n_poly, hidden), nn.GELU(), nn.Linear(hidden, basis_dim),
                         nn.GELU())


# ----------------------------------------------------------------------------------------------- layers
class SeparableFiberConv(nn.Module):
    """Depth-wise separable fibre-bundle convolution (official ``FiberBundleConv(groups=C, separable=True)``)."""

    def __init__(self, channels: int, basis_dim: int):
        super().__init__()
        self.kernel = nn.Linear(basis_dim, channels, bias=False)
        self.fiber_kernel = nn.Linear(basis_dim, channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.calibrate_next = False

    def forward(self, x, basis, fiber_basis):
        # x (B, N, O, C); basis (B, N, N, O, K); fiber_basis (O, O, K)
        k = self.kernel(basis)  # (B, N_i, N_j, O, C)
        x1 = torch.einsum("bijoc,bjoc->bioc", k, x)  # spatial conv, per orientation
        fk = self.fiber_kernel(fiber_basis)  # (O, P, C)
        x2 = torch.einsum("bioc,opc->bipc", x1, fk) / fk.shape[-2]  # conv over the fibre
        if self.calibrate_next:  # official conv.py:115-117, 134-140: rescale kernels once, at the first training step
            with torch.no_grad():
                self.kernel.weight.mul_(x.std() / x1.std())
                self.fiber_kernel.weight.mul_(x1.std() / x2.std())
            self.calibrate_next = False
            return self.forward(x, basis, fiber_basis)
        return x2 + self.bias


class PointConv(nn.Module):
    """Depth-wise convolution on R^3 (official ``Conv(groups=C)``): f1[i, c] = sum_j k(||x_j - x_i||)[i, j, c] f[j, c]."""

    def __init__(self, channels: int, basis_dim: int):
        super().__init__()
        self.kernel = nn.Linear(basis_dim, channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.calibrate_next = False

    def forward(self, x, basis, fiber_basis=None):
        k = self.kernel(basis)  # (B, N, N, C)
        x1 = torch.einsum("bijc,bjc->bic", k, x)
        if self.calibrate_next:
            with torch.no_grad():
                self.kernel.weight.mul_(x.std() / x1.std())
            self.calibrate_next = False
            return self.forward(x, basis)
        return x1 + self.bias


class ConvNext(nn.Module):
    """conv -> LayerNorm -> Linear(C, wC) -> GELU -> Linear(wC, C) -> layer scale -> + input (``convnext.py``)."""

    def __init__(self, channels: int, conv: nn.Module, widening: int = 4, layer_scale: float | None = None):
        super().__init__()
        self.conv, self.norm = conv, nn.LayerNorm(channels)
        self.linear_1, self.linear_2 = nn.Linear(channels, widening * channels), nn.Linear(widening * channels, channels)
        self.layer_scale = nn.Parameter(torch.ones(channels) * layer_scale) if layer_scale else None

    def forward(self, x, basis, fiber_basis=None):
        h = self.linear_2(F.gelu(self.linear_1(self.norm(self.conv(x, basis, fiber_basis)))))
        if self.layer_scale is not None:
            h = self.layer_scale * h
        return h + x


# ----------------------------------------------------------------------------------------------- models
class Ponita(nn.Module):
    """PONITA (``num_ori > 0``: fibre bundle R^3 x S^2) or PNITA (``num_ori = 0``: position only).

    ``forward(pos, x, vec=None)`` with pos (B, N, 3), scalars x (B, N, S), vectors vec (B, N, V, 3) returns
    (per-node scalars (B, N, out_scalar), per-node vectors (B, N, out_vec, 3)). PNITA takes no vector input and
    gives no vector output (official ``PonitaPointCloud`` without lifting).
    """

    def __init__(self, in_scalar: int, in_vec: int, hidden: int, layers: int, out_scalar: int = 0, out_vec: int = 0,
                 num_ori: int = 16, basis_dim: int | None = None, degree: int = 3, widening: int = 4,
                 layer_scale: float | None = None, multiple_readouts: bool = True):
        super().__init__()
        if num_ori == 0 and (in_vec or out_vec):
            raise ValueError("the position-only variant (num_ori=0) handles scalars only")
        basis_dim = basis_dim or hidden
        self.num_ori, self.out_scalar, self.out_vec = num_ori, out_scalar, out_vec
        self.register_buffer("grid", fibonacci_grid(num_ori) if num_ori > 0 else torch.zeros(0, 3))
        self.basis_fn = basis_mlp(2 if num_ori > 0 else 1, degree, hidden, basis_dim)
        self.fiber_basis_fn = basis_mlp(1, degree, hidden, basis_dim) if num_ori > 0 else None
        self.x_embedder = nn.Linear(in_scalar + in_vec, hidden, bias=False)
        conv = (lambda: SeparableFiberConv(hidden, basis_dim)) if num_ori > 0 else (lambda: PointConv(hidden, basis_dim))
        self.layers = nn.ModuleList([ConvNext(hidden, conv(), widening, layer_scale) for _ in range(layers)])
        self.readouts = nn.ModuleList([nn.Linear(hidden, out_scalar + out_vec) if (multiple_readouts or i == layers - 1)
                                       else None for i in range(layers)])

    def calibrate_on_next_forward(self) -> None:
        for layer in self.layers:
            layer.conv.calibrate_next = True

    def forward(self, pos, x, vec=None, grid=None):
        grid = self.grid if grid is None else grid  # (O, 3); a rotated grid only in the joint-equivariance check
        if self.num_ori > 0:
            attr, fiber_attr = r3s2_invariants(pos, grid)
            basis, fiber_basis = self.basis_fn(attr), self.fiber_basis_fn(fiber_attr)
            f = [x[:, :, None, :].expand(-1, -1, grid.shape[0], -1)]  # scalars repeated over the fibre
            if vec is not None:
                f.append(torch.einsum("bnvd,od->bnov", vec, grid))  # vectors lifted as v^T o
            h = self.x_embedder(torch.cat(f, -1))  # (B, N, O, C)
        else:
            basis, fiber_basis = self.basis_fn(distances(pos)), None
            h = self.x_embedder(x)  # (B, N, C)
        outs = []
        for layer, readout in zip(self.layers, self.readouts):
            h = layer(h, basis, fiber_basis)
            if readout is not None:
                outs.append(readout(h))
        out = sum(outs) / len(outs)
        s, v = out[..., :self.out_scalar], out[..., self.out_scalar:]
        if self.num_ori > 0:
            s = s.mean(-2)  # (B, N, out_scalar): mean over the fibre
            v = torch.einsum("bnoc,od->bncd", v, grid) / grid.shape[0]  # (B, N, out_vec, 3)
        else:
            v = None
        return s, v


class EGCL(nn.Module):
    """One E(n)-equivariant graph convolution (Satorras et al. 2021, official egnn ``models/gcl.py`` E_GCL(_vel)):

    m_ij = phi_e(h_i, h_j, ||x_i - x_j||^2, e_ij); x_i += 1/(N-1) sum_j (x_i - x_j) phi_x(m_ij) [+ phi_v(h_i) v_i];
    h_i += phi_h(h_i, sum_j m_ij)  (recurrent).

    ``radial='dist'`` (energy model, after the review): the edge input is ||x_i - x_j|| / dist_scale instead of the raw
    squared distance, followed by ``n_rbf`` Gaussian radial basis functions of the distance (centres evenly spaced
    over ``rbf_range`` A, width = their spacing), and ``agg='mean'`` aggregates messages by 1/(N-1) sum_j (official
    egnn_clean.py: squared distance only, sum)."""

    def __init__(self, hidden: int, edge_dim: int, update_coords: bool, velocity: bool, radial: str = "sq",
                 agg: str = "sum", dist_scale: float = 1.0, n_rbf: int = 0, rbf_range=(0.5, 5.0)):
        super().__init__()
        self.radial_mode, self.agg, self.dist_scale, self.n_rbf = radial, agg, dist_scale, n_rbf
        if n_rbf:
            self.register_buffer("rbf_mu", torch.linspace(float(rbf_range[0]), float(rbf_range[1]), n_rbf))
            self.rbf_width = (float(rbf_range[1]) - float(rbf_range[0])) / max(n_rbf - 1, 1)
        edge_dim = edge_dim + n_rbf
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 1 + edge_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                      nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.update_coords, self.velocity = update_coords, velocity
        if update_coords:
            last = nn.Linear(hidden, 1, bias=False)
            nn.init.xavier_uniform_(last.weight, gain=0.001)
            self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        if velocity:
            self.vel_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h, x, v=None, e=None):
        B, N, C = h.shape
        rel = x[:, :, None, :] - x[:, None, :, :]  # (B, N_i, N_j, 3): x_i - x_j
        if self.radial_mode == "sq":
            radial = (rel ** 2).sum(-1, keepdim=True)
        else:
            d = _safe_norm(rel)
            radial = d / self.dist_scale
        parts = [h[:, :, None, :].expand(-1, -1, N, -1), h[:, None, :, :].expand(-1, N, -1, -1), radial]
        if e is not None:
            parts.append(e)
        if self.n_rbf:
            parts.append(torch.exp(-((d - self.rbf_mu) ** 2) / (2 * self.rbf_width ** 2)))
        m = self.edge_mlp(torch.cat(parts, -1))  # (B, N, N, C)
        mask = 1.0 - torch.eye(N, dtype=h.dtype, device=h.device)[None, :, :, None]  # no self-edges
        m = m * mask
        if self.update_coords:
            x = x + (rel * self.coord_mlp(m) * mask).sum(2) / (N - 1)  # coords_agg='mean'
            if self.velocity:
                x = x + self.vel_mlp(h) * v
        agg = m.sum(2) if self.agg == "sum" else m.sum(2) / (N - 1)
        h = h + self.node_mlp(torch.cat([h, agg], -1))
        return h, x


class EGNN(nn.Module):
    """EGNN. ``task='nbody'``: official EGNN_vel (h0 = ||v||, edge attribute q_i q_j, coordinate + velocity updates;
    returns predicted positions). ``task='energy'``: invariant EGNN (no coordinate updates, as for QM9), per-atom
    energies summed; forces by autograd."""

    def __init__(self, in_node: int, hidden: int, layers: int, task: str, edge_dim: int = 0, dist_scale: float = 1.0,
                 n_rbf: int = 0, rbf_range=(0.5, 5.0)):
        super().__init__()
        self.task = task
        self.embedding = nn.Linear(in_node, hidden)
        nb = task == "nbody"
        kw = {} if nb else {"radial": "dist", "agg": "mean", "dist_scale": dist_scale, "n_rbf": n_rbf,
                            "rbf_range": rbf_range}
        self.layers = nn.ModuleList([EGCL(hidden, edge_dim, update_coords=nb, velocity=nb, **kw) for _ in range(layers)])
        if not nb:
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, pos, h, vel=None, e=None):
        h = self.embedding(h)
        x = pos
        for layer in self.layers:
            h, x = layer(h, x, vel, e)
        return x if self.task == "nbody" else self.head(h)  # (B, N, 3) or (B, N, 1)


# ----------------------------------------------------------------------------------------------- N-body data
def charged_nbody(n_sims: int, *, n_balls: int = 5, steps: int = 4000, frame_0: int = 30, frame_T: int = 40,
                  sample_freq: int = 100, loc_std: float = 1.0, vel_norm: float = 0.5,
                  interaction_strength: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The EGNN / PONITA charged-particle simulator (official ``n_body_system/dataset/synthetic_sim.py:149-297``,
    ``ChargedParticlesSim``), vectorised over simulations: charges +-1 with probability 1/2, Gaussian initial positions
    (std ``loc_std``), velocities of norm ``vel_norm``, leapfrog with dt = 0.001, force clamp 0.1/dt, no walls.
    Returns positions and velocities at frame ``frame_0`` and positions at ``frame_T`` (``nbody_small``: frames 30 and
    40 of a trajectory sampled every 100 steps, i.e. predict 1000 steps ahead), and the charges."""
    rng = np.random.RandomState(seed)
    dt, max_F = 0.001, 0.1 / 0.001
    q = rng.choice(np.array([-1.0, 1.0]), size=(n_sims, n_balls, 1))
    edges = q * q.transpose(0, 2, 1)  # (S, N, N)
    loc = rng.randn(n_sims, n_balls, 3) * loc_std * (n_balls / 5.0) ** (1 / 3)
    vel = rng.randn(n_sims, n_balls, 3)
    vel = vel * vel_norm / np.linalg.norm(vel, axis=-1, keepdims=True)
    eye = np.eye(n_balls, dtype=bool)[None]

    def force(loc):
        diff = loc[:, :, None, :] - loc[:, None, :, :]  # (S, N, N, 3): x_i - x_j
        d3 = np.where(eye, 1.0, (diff ** 2).sum(-1)) ** 1.5
        size = np.where(eye, 0.0, interaction_strength * edges / d3)
        return np.clip((size[..., None] * diff).sum(2), -max_F, max_F)

    vel = vel + dt * force(loc)  # half-step leapfrog start
    saved = {}
    for i in range(1, steps + 1):
        loc = loc + dt * vel
        if i % sample_freq == 0 and i // sample_freq in (frame_0, frame_T):
            saved[i // sample_freq] = (loc.copy(), vel.copy())
        vel = vel + dt * force(loc)
    # the official loop saves loc at i % sample_freq == 0 into slot counter (slot 0 = the initial state, slot k = step
    # k * sample_freq for k >= 1)
    return {"loc": saved[frame_0][0], "vel": saved[frame_0][1], "charges": q, "loc_end": saved[frame_T][0]}


# ----------------------------------------------------------------------------------------------- training
def cosine_warmup(opt, warmup: int, total: int):
    """Linear warm-up then cosine decay (official ``lightning_wrappers/scheduler.py``), stepped per epoch."""
    def f(epoch):
        lr = 0.5 * (1 + math.cos(math.pi * epoch / max(total, 1)))
        return lr * min(1.0, (epoch + 1) / max(warmup, 1)) if warmup else lr
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def random_rotations(n: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` Haar-random rotation matrices (QR of a Gaussian matrix, sign-fixed, det +1), (n, 3, 3)."""
    A = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    Q[torch.det(Q) < 0, :, 0] *= -1
    return Q.to(dtype)


def nbody_predict(model, arm: str, loc, vel, q):
    """Predicted positions after 1000 steps. PONITA: loc + vector output (input scalar q, vector v)."""
    if arm == "egnn":
        e = (q * q.transpose(1, 2))[..., None]  # (B, N, N, 1): q_i q_j
        return model(loc, vel.norm(dim=-1, keepdim=True), vel, e)
    _, v = model(loc, q, vel[:, :, None, :])
    return loc + v[:, :, 0, :]


def make_nbody_model(arm: str, cfg: dict):
    if arm == "egnn":
        return EGNN(1, cfg["egnn_hidden"], cfg["egnn_layers"], "nbody", edge_dim=1)
    return Ponita(1, 1, cfg["hidden"], cfg["layers"], out_vec=1, num_ori=cfg["num_ori"], basis_dim=cfg["basis_dim"],
                  degree=cfg["degree"], widening=cfg["widening"], layer_scale=cfg["layer_scale"] or None)


def train_nbody(arm: str, cfg: dict, data: dict, seed: int) -> tuple[nn.Module, dict]:
    """Adam + cosine warm-up, MSE on positions, random-rotation augmentation (official ``train_augm=True``), gradient
    clipping 0.5 (official ``main_nbody.py`` Trainer); the model of the best validation MSE is kept."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_nbody_model(arm, cfg)
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in data.items()}
    n_tr, n_va = cfg["nbody_train"], cfg["nbody_val"]
    tr = slice(0, n_tr)
    va = slice(n_tr, n_tr + n_va)
    te = slice(n_tr + n_va, None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["nbody_lr"], weight_decay=cfg["nbody_weight_decay"])
    sched = cosine_warmup(opt, cfg["warmup"], cfg["nbody_epochs"])
    bs = cfg["nbody_batch"]
    best, best_state, curve = float("inf"), None, []
    for epoch in range(cfg["nbody_epochs"]):
        model.train()
        perm = torch.randperm(n_tr, generator=gen)
        for b in range(0, n_tr, bs):
            idx = perm[b:b + bs]
            loc, vel, q, y = (t[k][tr][idx] for k in ("loc", "vel", "charges", "loc_end"))
            R = random_rotations(len(idx), gen)
            loc, vel, y = (torch.einsum("bij,bnj->bni", R, a) for a in (loc, vel, y))
            if epoch == 0 and b == 0 and arm != "egnn":
                model.calibrate_on_next_forward()
            loss = F.mse_loss(nbody_predict(model, arm, loc, vel, q), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        sched.step()
        val = nbody_mse(model, arm, t, va)
        curve.append(val)
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, {"test_mse": nbody_mse(model, arm, t, te), "val_mse": best, "curve": curve}


@torch.no_grad()
def nbody_mse(model, arm, t, sl) -> float:
    model.eval()
    pred = nbody_predict(model, arm, t["loc"][sl], t["vel"][sl], t["charges"][sl])
    return float(F.mse_loss(pred, t["loc_end"][sl]))


# ----------------------------------------------------------------------------------------------- molecules
def make_energy_model(arm: str, cfg: dict, n_species: int):
    if arm == "egnn":
        return EGNN(n_species, cfg["egnn_hidden"], cfg["egnn_layers"], "energy", dist_scale=cfg["egnn_dist_scale"],
                    n_rbf=cfg["egnn_rbf"], rbf_range=cfg["egnn_rbf_range"])
    return Ponita(n_species, 0, cfg["hidden"], cfg["layers"], out_scalar=1,
                  num_ori=cfg["num_ori"] if arm == "ponita" else 0, basis_dim=cfg["basis_dim"], degree=cfg["degree"],
                  widening=cfg["widening"], layer_scale=cfg["layer_scale"] or None)


def energy_and_forces(model, arm: str, pos, x, create_graph: bool = False):
    """Predicted energy (B,) (sum of per-atom outputs) and forces -dE/dx (B, N, 3)."""
    with torch.enable_grad():
        if not pos.requires_grad:
            pos = pos.clone().requires_grad_(True)
        out = model(pos, x) if arm == "egnn" else model(pos, x)[0]
        E = out[..., 0].sum(-1)
        (g,) = torch.autograd.grad(E.sum(), pos, create_graph=create_graph)
    return E, -g


def train_forces(arm: str, cfg: dict, mol: dict, seed: int) -> tuple[nn.Module, dict]:
    """Energy + force matching (official ``md17.py:108-120``): targets (E - shift) / scale and F / scale with shift =
    mean training energy, scale = rms training force; loss = MSE(E) / lambda_F + mean_atoms sum_xyz (dF)^2 / 3; Adam +
    cosine warm-up, random-rotation augmentation; the model of the best validation force MAE is kept.

    Split (after the review): contiguous blocks in time, train = the first n_train frames, then a gap of
    ``md_split_gap`` frames, val = the next n_val, a gap, test = the rest (a random split of frames 5 fs apart puts
    near-duplicates of training frames in the test set); the seed draws the initialisation and the batch order.
    Test: for PONITA also the mean over ``test_rotations`` random rotations R of R^T F(R x) (official
    ``md17.py:135-155``, repeats = 5); PNITA and EGNN are exactly invariant, so for them it equals one frame."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    R, E, Fo = (torch.tensor(mol[k], dtype=torch.float32) for k in ("R", "E", "F"))
    X = torch.tensor(mol["onehot"], dtype=torch.float32)[None]  # (1, N, n_species), one molecule
    n_tr, n_va, gap = cfg["md_train"], cfg["md_val"], cfg["md_split_gap"]
    tr = torch.arange(0, n_tr)
    va = torch.arange(n_tr + gap, n_tr + gap + n_va)
    te = torch.arange(n_tr + 2 * gap + n_va, len(R))
    if len(te) < 1:
        raise ValueError(f"{len(R)} frames leave no test block after md_train + md_val + 2 md_split_gap")
    shift, scale = float(E[tr].mean()), float(Fo[tr].pow(2).mean().sqrt())
    model = make_energy_model(arm, cfg, X.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["md_lr"], weight_decay=cfg["md_weight_decay"])
    sched = cosine_warmup(opt, cfg["warmup"], cfg["md_epochs"])
    bs = cfg["md_batch"]
    best, best_state, curve = float("inf"), None, []
    for epoch in range(cfg["md_epochs"]):
        model.train()
        order = tr[torch.randperm(n_tr, generator=gen)]
        for b in range(0, n_tr, bs):
            idx = order[b:b + bs]
            Rot = random_rotations(len(idx), gen)
            pos = torch.einsum("bij,bnj->bni", Rot, R[idx])
            f_true = torch.einsum("bij,bnj->bni", Rot, Fo[idx])
            if epoch == 0 and b == 0 and arm != "egnn":
                model.calibrate_on_next_forward()
            e_pred, f_pred = energy_and_forces(model, arm, pos, X.expand(len(idx), -1, -1), create_graph=True)
            loss = ((e_pred - (E[idx] - shift) / scale) ** 2).mean() / cfg["lambda_F"] + \
                ((f_pred - f_true / scale) ** 2).sum(-1).mean() / 3.0
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        val = force_mae(model, arm, R[va], X.expand(len(va), -1, -1), Fo[va], scale)
        curve.append(val)
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    Xt = X.expand(len(te), -1, -1)
    e_te, f_te = energy_and_forces(model, arm, R[te], Xt)
    single = float((f_te * scale - Fo[te]).abs().mean())
    n_rep = cfg["test_rotations"] if arm == "ponita" else 0
    if n_rep:  # official md17.py:135-155: mean over random rotations, each prediction rotated back
        tgen = torch.Generator().manual_seed(10_000 + seed)
        e_sum, f_sum = torch.zeros_like(e_te), torch.zeros_like(f_te)
        for Rot in random_rotations(n_rep, tgen):
            e_r, f_r = energy_and_forces(model, arm, R[te] @ Rot.T, Xt)
            e_sum, f_sum = e_sum + e_r.detach(), f_sum + f_r.detach() @ Rot
        e_te, f_te = e_sum / n_rep, f_sum / n_rep
    return model, {"force_mae": float((f_te * scale - Fo[te]).abs().mean()), "force_mae_single": single,
                   "energy_mae": float((e_te.detach() * scale + shift - E[te]).abs().mean()),
                   "zero_force_mae": float(Fo[te].abs().mean()), "val_force_mae": best, "curve": curve,
                   "scale": scale, "shift": shift, "test_index": te}


def undertraining(curve, last_frac: float, window: float) -> float:
    """Under-training statistic of one validation curve (lower is better): if the best epoch falls in the last
    ``last_frac`` of the epochs, the relative improvement over the last ``window`` of the epochs,
    (curve[e0 - 1] - min(curve[e0:])) / curve[e0 - 1] with e0 = the first epoch of that window; otherwise 0 (the
    curve had flattened before its end). A gate requires it <= a threshold (still improving: under-trained)."""
    c = np.asarray(curve, dtype=float)
    n = len(c)
    best = int(np.argmin(c))
    if n < 2 or best < n - max(1, math.ceil(last_frac * n)):
        return 0.0
    e0 = min(max(1, n - max(1, math.ceil(window * n))), n - 1)
    return float(max(0.0, (c[e0 - 1] - c[e0:].min()) / c[e0 - 1]))


def force_mae(model, arm, R, X, Fo, scale) -> float:
    model.eval()
    _, f = energy_and_forces(model, arm, R, X)
    return float((f.detach() * scale - Fo).abs().mean())


def one_hot_species(z: np.ndarray) -> np.ndarray:
    """One-hot of the atomic numbers over the species present, (N, n_species)."""
    species = np.unique(z)
    return (z[:, None] == species[None, :]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- equivariance
def equivariance_error(fn, pos: torch.Tensor, vecs: list[torch.Tensor], n_rot: int, generator: torch.Generator,
                       grid_fn=None) -> float:
    """max over ``n_rot`` random rotations R of ||fn(R pos, R vecs) - R fn(pos, vecs)|| / ||fn(pos, vecs)||, in float64
    (``fn`` returns (B, N, 3) vectors). ``grid_fn(R)``: passed to ``fn`` as the rotated grid (joint equivariance)."""
    pos = pos.double()
    vecs = [v.double() for v in vecs]
    ref = fn(pos, vecs, None)
    errs = []
    for R in random_rotations(n_rot, generator, torch.float64):
        rot = lambda a: a @ R.T  # noqa: E731
        out = fn(rot(pos), [rot(v) for v in vecs], grid_fn(R) if grid_fn else None)
        errs.append(float((out - rot(ref)).norm() / ref.norm()))
    return max(errs)


def measure_equivariance(model: nn.Module, arm: str, task: str, pos, feats, n_rot: int, seed: int,
                         joint: bool = False) -> float:
    """Relative rotation-equivariance error (``equivariance_error``) of a trained model in float64.

    ``task='nbody'``: the predicted displacement x(T) - x(0) from (pos, vel, charges) with feats = (vel, q);
    ``task='forces'``: the predicted forces from pos with feats = (one-hot species,). ``joint``: rotate the PONITA
    orientation grid together with the points (exact equivariance); otherwise the model keeps its fixed grid."""
    import copy

    m = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(seed)
    grid_fn = (lambda R: m.grid @ R.T) if joint else None

    if task == "nbody":
        vel, q = feats[0].double(), feats[1].double()

        def fn(p, vecs, grid):
            with torch.no_grad():
                if arm == "egnn":
                    return nbody_predict(m, arm, p, vecs[0], q) - p
                _, v = m(p, q, vecs[0][:, :, None, :], grid=grid)
                return v[:, :, 0, :]
        return equivariance_error(fn, pos, [vel], n_rot, gen, grid_fn)

    X = feats[0].double()

    def fn(p, vecs, grid):
        with torch.enable_grad():
            p = p.clone().requires_grad_(True)
            out = m(p, X) if arm == "egnn" else m(p, X, grid=grid)[0]
            (g,) = torch.autograd.grad(out[..., 0].sum(), p)
        return -g
    return equivariance_error(fn, pos, [], n_rot, gen, grid_fn)
