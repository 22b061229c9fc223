"""A small Kohn-Sham DFT reference for periodic Si cells (PySCF), outside the family of the injected EIPs.

Used by the eip_injection paper (Shui et al., NeurIPS 2022, https://arxiv.org/abs/2210.08047) as the "DFT" labels of
a subset of the generated cells: restricted Kohn-Sham at the Gamma point only, GTH pseudopotentials and a small
GTH Gaussian basis (PySCF's periodic code; Sun et al., J. Chem. Phys. 153, 024109, 2020). A miniature of the paper's
plane-wave DFT labels: too small a basis and one k-point for converged energies, but a first-principles energy
surface that no EIP was fitted to. Energies are in eV, measured from the same functional's ideal diamond crystal.
"""
from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.units import Hartree

from .eip import A0


def dft_energy(at: Atoms, xc: str = "lda,vwn", basis: str = "gth-szv", pseudo: str = "gth-pade",
               ke_cutoff: float | None = None, conv_tol: float = 1e-7, dm0=None) -> tuple[float, object]:
    """Total energy (eV) of a periodic cell: Gamma-point RKS (``xc``; "hf" for Hartree-Fock) with GTH pseudopotentials.
    Returns (energy, converged density matrix, for warm starts of similar cells)."""
    from pyscf.pbc import dft, gto, scf

    cell = gto.Cell()
    cell.atom = [("Si", tuple(p)) for p in at.positions]
    cell.a = np.asarray(at.cell.array)
    cell.unit = "A"
    cell.basis, cell.pseudo, cell.verbose = basis, pseudo, 0
    if ke_cutoff is not None:
        cell.ke_cutoff = ke_cutoff
    cell.build()
    mf = scf.RHF(cell) if xc == "hf" else dft.RKS(cell, xc=xc)
    mf.conv_tol = conv_tol
    e = mf.kernel(dm0=dm0)
    if not mf.converged:
        raise RuntimeError("SCF did not converge")
    return float(e) * Hartree, mf.make_rdm1()


def label_dft(configs: list[Atoms], **kw) -> np.ndarray:
    """Energies (eV) of every cell relative to n_atoms x the per-atom energy of the ideal diamond crystal at A0 (as
    :func:`reprolab.atoms.eip.label_configs` does for the EIPs), each SCF warm-started from the ideal cell's density."""
    ideal = bulk("Si", "diamond", a=A0, cubic=True)
    e0, dm0 = dft_energy(ideal, **kw)
    out = []
    for at in configs:
        if len(at) != len(ideal):
            raise ValueError("warm start needs cells of the ideal cell's size")
        out.append(dft_energy(at, dm0=dm0, **kw)[0] - e0 / len(ideal) * len(at))
    return np.asarray(out)
