"""Force-field labels on generated trajectories: short Langevin MD of small MD17 molecules, labelled by GFN2-xTB.

The PONITA paper (arXiv 2310.02970) trains on rMD17 (DFT labels on MD trajectories). rMD17 is not available offline,
so this module *generates* trajectories of the same molecules with a real semi-empirical force field, GFN2-xTB
(``tblite``, RESOURCES.md 4b), and labels every kept frame with its energy and forces. This is **not MD17**: it is
"force-field labels on generated trajectories" (same molecules, same kind of data: thermal MD frames, energy + forces).

Recipe (RESOURCES.md 4c): ASE ``Langevin`` at ``temperature_K`` with a ``timestep_fs`` step and ``friction`` (1/fs),
``equil_steps`` discarded, then every ``keep_every``-th of ``steps`` frames kept; energies in eV, forces in eV/A
(ASE units; forces = -dE/dx). Self-consistency check: on ``fd_frames`` kept frames the forces are compared with a
central finite difference of the energy (step ``fd_h`` A, all 3N coordinates), stored beside the labels so that the
notebook can gate on it without importing tblite.

``python -m reprolab.equivariant.md_data`` reads ``params.yaml: ponita.md`` and writes
``generated/md-forcefield/<molecule>.npz`` through ``generated/md-forcefield.partial/`` renamed at the end.
Deterministic: the Langevin noise and the initial velocities come from ``numpy.random.RandomState(seed)``.

Import order: ``tblite.interface`` must be imported before ``torch`` (torch 2.2's bundled libgomp lacks GOMP_5.0);
this module never imports torch.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from ..paths import REPO_ROOT

OUT_DIR = REPO_ROOT / "generated" / "md-forcefield"
# ASE g2 names of the MD17 molecules that ase.build.molecule knows (aspirin is not in g2)
G2_NAMES = {"ethanol": "CH3CH2OH", "malonaldehyde": "HCOCH2CHO", "benzene": "C6H6", "toluene": "C6H5CH3",
            "naphthalene": "C10H8"}


def _calculator():
    import os

    os.environ["OMP_NUM_THREADS"] = "1"  # one thread: bit-reproducible SCF sums (effective if tblite is not yet loaded)
    import tblite.interface  # noqa: F401  (before torch, see the module docstring)
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def finite_difference_forces(atoms, h: float = 1e-3) -> np.ndarray:
    """-dE/dx by central differences (step ``h`` A) on every coordinate of ``atoms`` (its calculator attached)."""
    pos0 = atoms.get_positions().copy()
    F = np.zeros_like(pos0)
    for a in range(len(atoms)):
        for k in range(3):
            e = []
            for s in (+1, -1):
                p = pos0.copy()
                p[a, k] += s * h
                atoms.set_positions(p)
                e.append(atoms.get_potential_energy())
            F[a, k] = -(e[0] - e[1]) / (2 * h)
    atoms.set_positions(pos0)
    return F


def run_md(molecule: str, *, steps: int, keep_every: int, equil_steps: int = 0, temperature_K: float = 500.0,
           timestep_fs: float = 0.5, friction: float = 0.01, seed: int = 0, fd_frames: int = 4,
           fd_h: float = 1e-3) -> dict:
    """Langevin MD of ``molecule`` with GFN2-xTB; returns arrays ready for ``np.savez`` (see the module docstring)."""
    from ase import units
    from ase.build import molecule as build
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = np.random.RandomState(seed)
    atoms = build(G2_NAMES[molecule])
    atoms.calc = _calculator()
    atoms.set_constraint(FixCom())
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction / units.fs,
                   rng=rng, fixcm=False)
    if equil_steps:
        dyn.run(equil_steps)
    R, E, F = [], [], []
    for _ in range(steps // keep_every):
        dyn.run(keep_every)
        R.append(atoms.get_positions().copy())
        E.append(atoms.get_potential_energy())
        F.append(atoms.get_forces(apply_constraint=False).copy())  # raw -dE/dx, not COM-projected
    R, E, F = np.array(R), np.array(E), np.array(F)  # (T, N, 3), (T,), (T, N, 3)
    # self-consistency: forces == -dE/dx by finite differences on evenly spaced kept frames
    idx = np.unique(np.linspace(0, len(R) - 1, fd_frames).round().astype(int))
    atoms.set_constraint()  # FixCom would shift the other atoms back under a one-coordinate displacement
    fd = []
    for t in idx:
        atoms.set_positions(R[t])
        fd.append(finite_difference_forces(atoms, fd_h))
    return {"z": atoms.get_atomic_numbers().astype(np.int64), "R": R, "E": E, "F": F, "fd_index": idx,
            "fd_forces": np.array(fd), "temperature_K": np.float64(temperature_K),
            "timestep_fs": np.float64(timestep_fs), "keep_every": np.int64(keep_every), "seed": np.int64(seed),
            "labeller": np.array("GFN2-xTB (tblite)"), "units": np.array("energy eV, forces eV/A, positions A")}


def fd_relative_errors(data: dict) -> np.ndarray:
    """Per checked frame: ||F - F_fd|| / ||F|| (F = the stored label, F_fd = -dE/dx by central differences)."""
    F = np.asarray(data["F"])[np.asarray(data["fd_index"])]
    fd = np.asarray(data["fd_forces"])
    return np.linalg.norm((F - fd).reshape(len(fd), -1), axis=1) / np.linalg.norm(F.reshape(len(fd), -1), axis=1)


def main(argv: list[str] | None = None) -> int:
    from ..config import read_params

    md = read_params()["ponita"]["md"]
    kw = {k: md[k] for k in ("steps", "keep_every", "equil_steps", "temperature_K", "timestep_fs", "friction",
                             "seed", "fd_frames", "fd_h")}
    partial = OUT_DIR.with_name(OUT_DIR.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for mol in md["molecules"]:
        data = run_md(mol, **kw)
        err = fd_relative_errors(data)
        print(f"{mol}: {len(data['R'])} frames, E in [{data['E'].min():.3f}, {data['E'].max():.3f}] eV, "
              f"|F| rms {np.sqrt((data['F'] ** 2).mean()):.3f} eV/A, FD relative error max {err.max():.2e}")
        np.savez(partial / f"{mol}.npz", **data)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    partial.rename(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
