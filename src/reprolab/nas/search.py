"""Black-box architecture search: random search, regularized evolution, NSGA-II (pymoo), hypervolume, Pareto fronts.

- ``random_search`` and ``regularized_evolution`` follow NASLib (naslib/optimizers/discrete/rs, re/optimizer.py):
  RE fills a population of ``population_size`` random architectures, then repeatedly draws ``sample_size`` members WITH
  replacement (``np.random.choice`` in a loop, as NASLib), mutates the best of the sample, evaluates the child, appends it
  to the population (a ``deque(maxlen=population_size)``: the oldest dies; Real et al. 2019, "aging"). Every evaluation
  counts toward ``n_evals``; the result records the whole history and the incumbent after each evaluation.
- ``nsga2`` runs pymoo's NSGA2 (Deb et al. 2002) on an integer encoding with pymoo's discrete-variable recipe
  (IntegerRandomSampling, SBX + PM with RoundingRepair, duplicate elimination); ``hypervolume`` is pymoo's HV indicator.
  All objectives are MINIMISED (pass -accuracy, latency).
- ``pareto_front``: the non-dominated rows of an objective matrix (pymoo's NonDominatedSorting).

``evaluate`` callables may be a ground-truth lookup (benchmarks, groundtruth) or a supernet/predictor proxy.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np


@dataclass
class SearchResult:
    """History of one search run: architectures and scores in evaluation order (higher score = better)."""
    archs: list = field(default_factory=list)
    scores: list = field(default_factory=list)

    def add(self, arch, score: float) -> None:
        self.archs.append(arch)
        self.scores.append(float(score))

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.scores))  # first maximum: ties go to the earlier evaluation

    @property
    def best(self):
        return self.archs[self.best_index]

    @property
    def best_score(self) -> float:
        return self.scores[self.best_index]

    def incumbent_trajectory(self) -> list[float]:
        """Best score so far after each evaluation."""
        return [float(v) for v in np.maximum.accumulate(self.scores)]


def random_search(sample: Callable, evaluate: Callable, n_evals: int, rng: np.random.Generator) -> SearchResult:
    """Sample ``n_evals`` architectures (``sample(rng)``), evaluate each, keep the history."""
    res = SearchResult()
    for _ in range(n_evals):
        a = sample(rng)
        res.add(a, evaluate(a))
    return res


def regularized_evolution(sample: Callable, mutate: Callable, evaluate: Callable, n_evals: int,
                          rng: np.random.Generator, population_size: int = 10, sample_size: int = 3) -> SearchResult:
    """Regularized (aging) evolution, NASLib's loop. ``sample(rng)`` draws a random architecture, ``mutate(arch, rng)``
    returns a child; ``evaluate(arch)`` returns a score to maximise. ``n_evals`` counts every evaluation."""
    if population_size < 1 or sample_size < 1:
        raise ValueError("population_size and sample_size must be >= 1")
    res = SearchResult()
    population: collections.deque = collections.deque(maxlen=population_size)
    for t in range(n_evals):
        if t < population_size:
            a = sample(rng)
        else:
            members = list(population)
            draw = [members[int(rng.integers(len(members)))] for _ in range(sample_size)]  # with replacement
            parent = max(draw, key=lambda m: m[1])
            a = mutate(parent[0], rng)
        s = float(evaluate(a))
        population.append((a, s))
        res.add(a, s)
    return res


# ------------------------------------------------------------------------------------------------ multi-objective
def pareto_front(F) -> np.ndarray:
    """Indices of the non-dominated rows of ``F`` (n, m), all objectives minimised (pymoo NonDominatedSorting)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.asarray(F, dtype=float)
    return np.sort(NonDominatedSorting().do(F, only_non_dominated_front=True))


def hypervolume(F, ref_point) -> float:
    """Hypervolume dominated by the rows of ``F`` (minimised) and bounded by ``ref_point`` (pymoo ``HV``).
    Rows that do not strictly dominate the reference point contribute nothing."""
    from pymoo.indicators.hv import HV

    F = np.asarray(F, dtype=float)
    ref = np.asarray(ref_point, dtype=float)
    F = F[np.all(F < ref, axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=ref)(F))


def nsga2(evaluate: Callable[[np.ndarray], Sequence[float]], n_var: int, xl, xu, pop_size: int, n_gen: int,
          seed: int, integer: bool = True, n_obj: int = 2) -> dict:
    """pymoo NSGA-II on ``n_var`` variables in [xl, xu] (integers by default: an architecture encoding).

    ``evaluate(x)`` returns the ``n_obj`` objectives of one solution (all minimised); every call is recorded (pymoo's duplicate
    elimination skips offspring equal to the current population, but a genome dropped earlier can come back: count
    unique architectures with ``dedup``). Returns ``{"X", "F"}`` of every
    evaluated solution in evaluation order, ``front_X``/``front_F`` (the final non-dominated set) and ``n_evals``."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import ElementwiseProblem
    from pymoo.optimize import minimize

    xl = np.broadcast_to(np.asarray(xl, dtype=float), (n_var,)).copy()
    xu = np.broadcast_to(np.asarray(xu, dtype=float), (n_var,)).copy()
    history_X, history_F = [], []

    class _Problem(ElementwiseProblem):
        def __init__(self):
            super().__init__(n_var=n_var, n_obj=n_obj, xl=xl, xu=xu, vtype=int if integer else float)

        def _evaluate(self, x, out, *args, **kwargs):
            x = np.round(x).astype(int) if integer else np.asarray(x, dtype=float)
            f = np.asarray(evaluate(x), dtype=float)
            history_X.append(x.copy())
            history_F.append(f.copy())
            out["F"] = f

    if integer:
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        algo = NSGA2(pop_size=pop_size, sampling=IntegerRandomSampling(),
                     crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
                     mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    else:
        algo = NSGA2(pop_size=pop_size)
    res = minimize(_Problem(), algo, ("n_gen", n_gen), seed=seed, verbose=False)
    X, F = np.array(history_X), np.array(history_F)
    front = pareto_front(F)
    return {"X": X, "F": F, "front_X": X[front], "front_F": F[front], "n_evals": len(X),
            "pymoo_opt_F": np.asarray(res.F)}


def nb201_sampler(rng: np.random.Generator) -> tuple:
    """A uniformly random NB-201 cell (6 op indices)."""
    from .space201 import N_EDGES, N_OPS

    return tuple(int(v) for v in rng.integers(N_OPS, size=N_EDGES))


def dedup(archs: Sequence[Hashable]) -> list:
    """Architectures in first-seen order without repeats (count unique evaluations)."""
    return list(dict.fromkeys(archs))
