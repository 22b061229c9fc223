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


# sanity range of the total energy per Si atom with GTH pseudopotentials (4 valence electrons): about -3.9 Hartree
# (-105 eV) at LDA; anything outside this window means a unit slip (Hartree vs eV) or a broken SCF
E_ATOM_RANGE_EV = (-125.0, -85.0)
# relative energies of rattled/strained cells per atom (eV): the ideal crystal at A0 is near the minimum, but not exactly
# (this basis's lattice constant differs; a strained cell measured -41 meV/atom), and wide rattles cost < ~2 eV/atom
E_REL_RANGE_EV = (-0.5, 5.0)


def dft_energy(at: Atoms, xc: str = "lda,vwn", basis: str = "gth-szv", pseudo: str = "gth-pade",
               ke_cutoff: float | None = None, conv_tol: float = 1e-7, dm0=None, smearing: float = 0.0,
               level_shift: float = 0.0, max_cycle: int = 100, retry: bool = True) -> tuple[float, object, bool]:
    """Total energy (eV) of a periodic cell: Gamma-point RKS (``xc``; "hf" for Hartree-Fock) with GTH pseudopotentials.
    ``max_cycle`` bounds the DIIS SCF; ``level_shift`` (Hartree) is applied to it; ``smearing`` (Hartree, Fermi-Dirac,
    0 = none) changes the energy itself (about 40 meV/atom at 0.01 Ha on a 2-atom cell), so it must be the same for
    every cell of a dataset, and it must not be combined with a level shift (PySCF's SCF then never reports convergence:
    measured on a rattled 2-atom cell). If the SCF does not converge and ``retry``: (2) second-order (Newton) SCF from
    scratch, max_cycle cycles; (3) DIIS with level shift max(level_shift, 0.2) and damping 0.5 (no smearing only),
    2 x max_cycle. Returns (energy, density matrix (for warm starts), converged); the caller decides what to do with
    a non-converged cell (:func:`label_dft` drops it)."""
    from pyscf.pbc import dft, gto, scf

    cell = gto.Cell()
    cell.atom = [("Si", tuple(p)) for p in at.positions]
    cell.a = np.asarray(at.cell.array)
    cell.unit = "A"
    cell.basis, cell.pseudo, cell.verbose = basis, pseudo, 0
    if ke_cutoff is not None:
        cell.ke_cutoff = ke_cutoff
    cell.build()

    if smearing > 0 and level_shift > 0:
        raise ValueError("smearing and level_shift together: PySCF's SCF never reports convergence")

    def run(shift, damp, cycles, start, newton=False):
        mf = scf.RHF(cell) if xc == "hf" else dft.RKS(cell, xc=xc)
        if smearing > 0:
            mf = scf.addons.smearing_(mf, sigma=smearing, method="fermi")
        if newton:
            mf = mf.newton()
        mf.conv_tol, mf.max_cycle = conv_tol, cycles
        if not newton:
            mf.level_shift, mf.damp = shift, damp
        e = mf.kernel(dm0=start)
        return mf, e

    mf, e = run(level_shift, 0.0, max_cycle, dm0)
    if not mf.converged and retry:
        mf, e = run(0.0, 0.0, max_cycle, None, newton=True)
    if not mf.converged and retry and smearing == 0:
        mf, e = run(max(level_shift, 0.2), 0.5, 2 * max_cycle, None)
    return float(e) * Hartree, mf.make_rdm1(), bool(mf.converged)


def label_dft(configs: list[Atoms], **kw) -> tuple[np.ndarray, np.ndarray]:
    """Energies (eV) of every cell relative to n_atoms x the per-atom energy of the ideal diamond crystal at A0 (as
    :func:`reprolab.atoms.eip.label_configs` does for the EIPs), each SCF warm-started from the ideal cell's density.
    Returns (energies, converged mask): a cell whose SCF does not converge (after the retry) gets NaN and
    ``converged`` False, and the caller drops it and counts it. Unit sanity checks (ValueError): the ideal cell must
    converge with a total energy per atom in E_ATOM_RANGE_EV (eV, not Hartree), and every converged relative energy per
    atom must lie in E_REL_RANGE_EV."""
    ideal = bulk("Si", "diamond", a=A0, cubic=True)
    e0, dm0, ok0 = dft_energy(ideal, **kw)
    if not ok0:
        raise RuntimeError("SCF of the ideal diamond cell did not converge")
    e_atom = e0 / len(ideal)
    if not (E_ATOM_RANGE_EV[0] <= e_atom <= E_ATOM_RANGE_EV[1]):
        raise ValueError(f"ideal Si total energy {e_atom:.3f} eV/atom outside {E_ATOM_RANGE_EV}: unit or SCF problem")
    out, conv = [], []
    for at in configs:
        if len(at) != len(ideal):
            raise ValueError("warm start needs cells of the ideal cell's size")
        e, _, ok = dft_energy(at, dm0=dm0, **kw)
        out.append(e - e_atom * len(at) if ok else np.nan)
        conv.append(ok)
    out, conv = np.asarray(out), np.asarray(conv, dtype=bool)
    rel = out[conv] / len(ideal)
    if len(rel) and not ((rel >= E_REL_RANGE_EV[0]) & (rel <= E_REL_RANGE_EV[1])).all():
        raise ValueError(f"relative DFT energies per atom {rel.min():.3f}..{rel.max():.3f} eV outside {E_REL_RANGE_EV}")
    return out, conv
