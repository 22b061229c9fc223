"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD, through opacus's accountants.

``rdp`` (Renyi DP, Mironov et al. 2019; opacus's default) or ``prv`` (privacy random variables, Gopi et al. 2021,
tighter). Automatic clipping changes only the sensitivity (absorbed in the noise std), so the accounting is unchanged.
"""
from __future__ import annotations

import warnings

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


def noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp", epsilon_tolerance: float = 0.01) -> float:
    """Smallest sigma (to the tolerance of opacus's bisection) with epsilon(sigma, q, steps, delta) <= target."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    with warnings.catch_warnings():  # the bisection's huge trial sigmas hit the largest RDP order; the answer does not
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          epsilon_tolerance=epsilon_tolerance))


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon after ``steps`` Poisson-subsampled Gaussian steps with noise multiplier ``sigma``."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))
