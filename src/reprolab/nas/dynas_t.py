"""LINAS / DyNAS-T (Cummings et al., "A Hardware-Aware Framework for Accelerating Neural Architecture Search Across
Modalities", arXiv 2202.12954): predictor-in-the-loop NSGA-II for accuracy / cost sub-network search.

LINAS (Lightweight Iterative NAS) follows the official code, IntelLabs/DyNAS-T (commit 251cb5e):
``dynast/search/search_tactic.py`` class ``LINAS.search`` (lines 509-725):

1. a population of ``population`` uniformly random sub-networks;
2. ``num_loops = round(num_evals / population)`` loops: VALIDATE every member of the latest population (the expensive
   measurement; repeats are validated again, as the official ``eval_subnet`` has no cache); refit one predictor per
   optimisation objective on ALL validated points so far (``PredictorManager.train_predictor``: the results csv,
   duplicates dropped, one-hot features ``EncodingBase.onehot_generic``); run an inner NSGA-II on the PREDICTED
   objectives for ``LINAS_INNERLOOP_EVALS`` evaluations (pop ``population``, seed = the search seed, the same every
   loop); its final population (``results.pop.get('X')``) is the next population to validate.
3. The predictor is ``dynast/predictors/dynamic_predictor.py`` ``Predictor``: labels divided by
   10 ** (floor(log10(max|y|)) - 1); ``GridSearchCV`` (5-fold, scoring neg. MAPE) over Ridge (alpha in
   arange(0.1, 10.1, 0.1)) and RBF SVR (gamma 'auto', epsilon 0, C in arange(1, 101, 1)); the better searcher predicts.
4. NSGA-II operators are ``dynast/search/evolutionary.py`` ``configure_nsga2``: IntegerRandomSampling, SBX(prob 0.9,
   eta 15) and PM(prob 0.02, eta 20) with RoundingRepair, duplicate elimination. The plain NSGA-II baseline is the
   official ``Evolutionary`` tactic: the same NSGA-II on the VALIDATED objectives, ``n_gen = num_evals / population``.
   Random search is the official ``RandomSearch`` (``num_evals`` uniform sub-networks).

Here the "validation" of a sub-network is a lookup in NAS-Bench-Graph (valid accuracy and the benchmark's latency;
test accuracy kept for the hypervolume) or the evaluation of a child of an elastic CNN supernet (val accuracy after BN
recalibration; analytic MACs). Every validation is counted by :class:`Validator`; a cache avoids recomputing a repeat
(it is still counted: the count is what the claims compare).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

# official defaults (dynamic_predictor.py:25-27; evolutionary.py configure_nsga2)
OFFICIAL_ALPHAS = (0.1, 10.1, 0.1)  # np.arange(*): Ridge alpha grid
OFFICIAL_COSTS = (1.0, 101.0, 1.0)  # np.arange(*): SVR C grid
NSGA2_OPS = {"crossover_prob": 0.9, "crossover_eta": 15.0, "mutation_prob": 0.02, "mutation_eta": 20.0}


# --------------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Space:
    """A discrete space of ``len(sizes)`` integer variables, variable i in {0, ..., sizes[i] - 1} (DyNAS-T's pymoo
    vector: ``param_upperbound = sizes - 1``)."""
    sizes: tuple

    @property
    def n_var(self) -> int:
        return len(self.sizes)

    @property
    def upper(self) -> np.ndarray:
        return np.asarray(self.sizes) - 1

    def random_sample(self, rng: np.random.Generator) -> np.ndarray:
        """EncodingBase.random_sample: an independent uniform choice per variable."""
        return np.array([int(rng.integers(s)) for s in self.sizes])

    def onehot(self, X) -> np.ndarray:
        """EncodingBase.onehot_generic for every row of X (n, n_var) -> (n, sum(sizes)) of 0/1."""
        X = np.atleast_2d(np.asarray(X, dtype=int))
        out = np.zeros((len(X), int(sum(self.sizes))))
        off = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        out[np.arange(len(X))[:, None], off[None, :] + X] = 1.0
        return out


# --------------------------------------------------------------------------------------------------- predictor
class Predictor:
    """DyNAS-T's dynamic predictor (dynamic_predictor.py): Ridge and RBF-SVR, each tuned by 5-fold GridSearchCV on
    neg. MAPE; the searcher with the better CV score predicts. Labels are scaled by 10**(floor(log10 max|y|) - 1).
    ``n_jobs=1`` (official -1: the same result, parallel). ``fast=True`` runs the same grid search with a plain loop
    (:func:`_grid_search`: the same folds, scorer, tie rule and refit; tested equal to GridSearchCV) without
    GridSearchCV's per-fit overhead."""

    def __init__(self, alphas=None, cost_factors=None, max_iterations: int = 1_000_000, cv: int = 5, fast: bool = True):
        from sklearn import linear_model, svm
        from sklearn.model_selection import GridSearchCV

        alphas = np.arange(*OFFICIAL_ALPHAS) if alphas is None else np.asarray(alphas, dtype=float)
        cost_factors = np.arange(*OFFICIAL_COSTS) if cost_factors is None else np.asarray(cost_factors, dtype=float)
        self.normalization_factor, self.best_index, self.n_fit, self.fast = 1.0, 0, 0, fast
        regs = [linear_model.Ridge(max_iter=max_iterations),
                svm.SVR(kernel="rbf", gamma="auto", epsilon=0.0, max_iter=max_iterations)]
        grids = [{"alpha": alphas}, {"C": cost_factors}]
        self.searchers = [GridSearchCV(r, g, n_jobs=1, cv=cv, scoring="neg_mean_absolute_percentage_error")
                          for r, g in zip(regs, grids)]

    def train(self, examples, labels) -> "Predictor":
        labels = np.asarray(labels, dtype=float).ravel()
        m = float(np.amax(np.abs(labels)))
        self.normalization_factor = 10 ** (np.floor(np.log10(m)) - 1.0) if m > 0 else 1.0
        y = labels / self.normalization_factor
        scores = np.zeros(len(self.searchers))
        for s, searcher in enumerate(self.searchers):
            if self.fast:
                _grid_search(searcher, examples, y)
            else:
                searcher.fit(examples, y)
            scores[s] = searcher.best_score_
        self.best_index = int(np.argmax(scores))
        self.n_fit = len(labels)
        return self

    def predict(self, examples) -> np.ndarray:
        reg = self.searchers[self.best_index].best_estimator_
        return reg.predict(examples) * self.normalization_factor

    def get_parameters(self) -> dict:
        out = {"best_index": self.best_index}
        for s in self.searchers:
            for k, v in s.best_params_.items():
                out[f"{type(s.best_estimator_).__name__}_{k}".lower()] = float(v)
        return out


def _grid_search(searcher, X, y) -> None:
    """GridSearchCV.fit's result for a one-parameter grid, by a plain loop: KFold(cv) without shuffling, score = mean
    over folds of -MAPE (sklearn's ``mean_absolute_percentage_error``), the FIRST best candidate, refit on all data.
    Sets ``best_params_``, ``best_score_``, ``best_estimator_`` on ``searcher``."""
    from sklearn.base import clone
    from sklearn.metrics import mean_absolute_percentage_error
    from sklearn.model_selection import KFold

    (name, values), = searcher.param_grid.items()
    folds = list(KFold(n_splits=searcher.cv).split(X))
    scores = []
    for v in values:
        est = clone(searcher.estimator).set_params(**{name: v})
        f = [-mean_absolute_percentage_error(y[te], est.fit(X[tr], y[tr]).predict(X[te])) for tr, te in folds]
        scores.append(float(np.mean(f)))
    best = int(np.argmax(scores))  # first maximum (GridSearchCV: rank 1 with ties -> lowest index)
    searcher.best_params_ = {name: values[best]}
    searcher.best_score_ = scores[best]
    searcher.best_estimator_ = clone(searcher.estimator).set_params(**{name: values[best]}).fit(X, y)


# --------------------------------------------------------------------------------------------------- validation
@dataclass
class Validator:
    """Counts every validation (the expensive measurement) and keeps the history in evaluation order.

    ``measure(x) -> dict`` returns at least the objective keys: ``acc`` (maximised), ``cost`` (minimised); any extra
    key (e.g. ``test``) is kept for reporting. Results are cached by genome (a repeat is counted, not recomputed)."""
    measure: Callable
    X: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    @property
    def n_evals(self) -> int:
        return len(self.X)

    def __call__(self, X) -> np.ndarray:
        """Validate every row of X; returns pymoo objectives F (n, 2) = (-acc, cost)."""
        F = []
        for x in np.atleast_2d(np.asarray(X, dtype=int)):
            key = tuple(int(v) for v in x)
            if key not in self._cache:
                self._cache[key] = dict(self.measure(key))
            r = self._cache[key]
            self.X.append(key)
            self.rows.append(r)
            F.append([-r["acc"], r["cost"]])
        return np.asarray(F, dtype=float)

    def column(self, key: str, n: int | None = None) -> np.ndarray:
        return np.array([r[key] for r in self.rows[:n]], dtype=float)

    def training_set(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct validated genomes (first occurrence, as ``import_csv(drop_duplicates=True)``) and (acc, cost)."""
        seen = {}
        for x, r in zip(self.X, self.rows):
            seen.setdefault(x, (r["acc"], r["cost"]))
        return np.array(list(seen), dtype=int), np.array(list(seen.values()), dtype=float)


# --------------------------------------------------------------------------------------------------- NSGA-II
def make_nsga2(pop_size: int, crossover_prob: float = 0.9, crossover_eta: float = 15.0, mutation_prob: float = 0.02,
               mutation_eta: float = 20.0, sampling=None):
    """DyNAS-T ``EvolutionaryManager.configure_nsga2`` (evolutionary.py)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    return NSGA2(pop_size=pop_size, sampling=IntegerRandomSampling() if sampling is None else sampling,
                 crossover=SBX(prob=crossover_prob, eta=crossover_eta, vtype=float, repair=RoundingRepair()),
                 mutation=PM(prob=mutation_prob, eta=mutation_eta, vtype=float, repair=RoundingRepair()),
                 eliminate_duplicates=True)


def _problem(space: Space, fn: Callable[[np.ndarray], np.ndarray]):
    """A vectorised pymoo Problem over ``space`` (xl 0, xu sizes-1, integers) whose objectives are ``fn(X)`` (n, 2)."""
    from pymoo.core.problem import Problem

    class _P(Problem):
        def __init__(self):
            super().__init__(n_var=space.n_var, n_obj=2, xl=np.zeros(space.n_var), xu=space.upper.astype(float),
                             vtype=int)

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = fn(np.round(x).astype(int))

    return _P()


def nsga2_search(validator: Validator, space: Space, n_evals: int, pop_size: int, seed: int, ops: dict | None = None):
    """The official ``Evolutionary`` tactic: NSGA-II (pop ``pop_size``) on validated objectives. Official: ``n_gen =
    n_evals / pop_size``; here generations run until at least ``n_evals`` validations (pymoo ``("n_eval", n)``: with
    duplicate elimination a generation can yield fewer than ``pop_size`` offspring), and the caller reads the first
    ``n_evals`` (:func:`hv_after`)."""
    from pymoo.optimize import minimize

    minimize(_problem(space, validator), make_nsga2(pop_size, **(ops or NSGA2_OPS)), ("n_eval", int(n_evals)),
             seed=int(seed), verbose=False)
    return validator


def random_search(validator: Validator, space: Space, n_evals: int, seed: int) -> Validator:
    """The official ``RandomSearch`` tactic: ``n_evals`` uniform sub-networks, each validated."""
    rng = np.random.default_rng(seed)
    validator(np.array([space.random_sample(rng) for _ in range(n_evals)]))
    return validator


def linas(validator: Validator, space: Space, n_evals: int, pop_size: int, seed: int, inner_evals: int,
          predictor_kw: dict | None = None, ops: dict | None = None, on_loop: Callable | None = None) -> Validator:
    """LINAS (search_tactic.py ``LINAS.search``): random population; ``round(n_evals / pop_size)`` loops of
    validate-population -> refit one predictor per objective on every validated point -> inner NSGA-II on the
    predictions (``inner_evals`` evaluations, pop ``pop_size``, seed ``seed``) -> its final population.

    The official loop also refits and runs the inner search after the LAST validation; its population is returned
    unvalidated and changes nothing validated, so it is skipped here. ``on_loop(loop, predictors, Xtrain, Ytrain)``
    is called after every refit (diagnostics)."""
    from pymoo.optimize import minimize

    rng = np.random.default_rng(seed)
    latest = np.array([space.random_sample(rng) for _ in range(pop_size)])
    n_loops = int(round(n_evals / pop_size))
    validator.fits = []  # training-set size of every refit: a refit sees exactly the points validated so far
    for loop in range(n_loops):
        validator(latest)  # high-fidelity validation of the whole population
        if loop == n_loops - 1:
            break
        Xt, Yt = validator.training_set()
        feats = space.onehot(Xt)
        acc_pred = Predictor(**(predictor_kw or {})).train(feats, Yt[:, 0])
        cost_pred = Predictor(**(predictor_kw or {})).train(feats, Yt[:, 1])
        validator.fits.append(len(Xt))
        if on_loop is not None:
            on_loop(loop, (acc_pred, cost_pred), Xt, Yt)

        def predicted(X, a=acc_pred, c=cost_pred):
            f = space.onehot(X)
            return np.column_stack([-a.predict(f), c.predict(f)])

        res = minimize(_problem(space, predicted), make_nsga2(pop_size, **(ops or NSGA2_OPS)),
                       ("n_gen", int(inner_evals // pop_size)), seed=int(seed), verbose=False)
        latest = np.round(res.pop.get("X")).astype(int)
    return validator


def run_search(method: str, validator: Validator, space: Space, n_evals: int, pop_size: int, seed: int,
               inner_evals: int = 500, predictor_kw: dict | None = None) -> Validator:
    """'linas' | 'nsga2' | 'random' with ``n_evals`` validations (NSGA-II: pop_size * (n_evals // pop_size))."""
    if method == "linas":
        return linas(validator, space, n_evals, pop_size, seed, inner_evals, predictor_kw)
    if method == "nsga2":
        return nsga2_search(validator, space, n_evals, pop_size, seed)
    if method == "random":
        return random_search(validator, space, n_evals, seed)
    raise ValueError(f"method {method!r}; allowed: linas, nsga2, random")


# --------------------------------------------------------------------------------------------------- hypervolume
@dataclass(frozen=True)
class HVBox:
    """Normalised 2-D hypervolume: accuracy a -> (a_max - a) / (a_max - a_ref), cost c -> (c - c_min) / (c_ref - c_min),
    reference point (1, 1). HV is the fraction of the box [a_ref, a_max] x [c_min, c_ref] that the points dominate."""
    a_max: float
    a_ref: float
    c_min: float
    c_ref: float

    def normalise(self, acc, cost) -> np.ndarray:
        acc, cost = np.asarray(acc, dtype=float), np.asarray(cost, dtype=float)
        return np.column_stack([(self.a_max - acc) / (self.a_max - self.a_ref),
                                (cost - self.c_min) / (self.c_ref - self.c_min)])

    def hv(self, acc, cost) -> float:
        from .search import hypervolume

        if len(np.atleast_1d(acc)) == 0:
            return 0.0
        return hypervolume(self.normalise(acc, cost), [1.0, 1.0])


def box_from_table(acc, cost, acc_quantile: float, cost_quantile: float) -> HVBox:
    """A reference point fixed from the whole space (before any search): accuracy at its ``acc_quantile``, cost at its
    ``cost_quantile``; the box's best corner is the space's best accuracy and lowest cost."""
    acc, cost = np.asarray(acc, dtype=float), np.asarray(cost, dtype=float)
    return HVBox(float(acc.max()), float(np.quantile(acc, acc_quantile)), float(cost.min()),
                 float(np.quantile(cost, cost_quantile)))


def search_front(acc, cost) -> np.ndarray:
    """Indices of the distinct non-dominated (max acc, min cost) points (what a search reports as its front)."""
    from .search import pareto_front

    acc, cost = np.asarray(acc, dtype=float), np.asarray(cost, dtype=float)
    if len(acc) == 0:
        return np.array([], dtype=int)
    idx = pareto_front(np.column_stack([-acc, cost]))
    return np.array(sorted(idx), dtype=int)


def hv_after(validator: Validator, box: HVBox, n: int, report: str = "test") -> float:
    """HV after the first ``n`` validations: the front by the SEARCH objectives (validated ``acc``, ``cost``) among
    them, scored with its ``report`` accuracy (``test``: held-out truth; ``acc``: the search's own objective)."""
    acc, cost = validator.column("acc", n), validator.column("cost", n)
    front = search_front(acc, cost)
    rep = validator.column(report, n)
    return box.hv(rep[front], cost[front])


def hv_curve(validator: Validator, box: HVBox, checkpoints: Sequence[int], report: str = "test") -> list[float]:
    return [hv_after(validator, box, int(n), report) for n in checkpoints]


# --------------------------------------------------------------------------------------------------- NAS-Bench-Graph
@lru_cache(maxsize=4)
def nbg_lookup(dataset: str) -> dict:
    """NAS-Bench-Graph as a space of 5 integer variables (link pattern 9, GNN op of each of 4 nodes 9; the library's
    ``link_list`` / ``gnn_list`` order): {raw tuple: (val_acc, test_acc, latency_s)}. Raw tuples are keyed through
    the library's ``Arch.valid_hash`` (isomorphic cells share a record); the 9 tuples without a record are absent."""
    from .benchmarks import nbg_raw_keys, nbg_table

    tb = nbg_table(dataset)
    rec = dict(zip(tb["hash"].astype(int), zip(tb["val_acc"].astype(float), tb["test_acc"].astype(float),
                                               tb["latency_s"].astype(float))))
    return {key: rec[h] for key, h in nbg_raw_keys() if h in rec}


def nbg_space() -> Space:
    from .benchmarks import nbg_architecture_module

    mod = nbg_architecture_module()
    return Space((len(mod.link_list),) + (len(mod.gnn_list),) * 4)


def table_measure(table: dict, invalid_cost: float) -> Callable:
    """``measure`` over a lookup {tuple: (val, test, cost)}; a tuple without a record validates to accuracy 0 at
    ``invalid_cost`` (counted like any validation; the same rule for every arm)."""
    def measure(key):
        if key in table:
            v, t, c = table[key]
        else:
            v, t, c = 0.0, 0.0, invalid_cost
        return {"acc": float(v), "test": float(t), "cost": float(c)}
    return measure


def synthetic_table(sizes=(4, 4, 4), seed: int = 0) -> dict:
    """A tiny 2-objective table for tests: accuracy and cost additive in per-variable effects that trade off (a
    choice that adds accuracy adds cost), test = val. {tuple: (val, test, cost)}."""
    rng = np.random.default_rng(seed)
    gain = [np.sort(rng.uniform(0, 1, s)) for s in sizes]
    cost = [np.sort(rng.uniform(0, 1, s)) + 0.1 * rng.uniform(0, 1, s) for s in sizes]
    out = {}
    for a in itertools.product(*(range(s) for s in sizes)):
        v = float(sum(g[x] for g, x in zip(gain, a)))
        c = 1.0 + float(sum(k[x] for k, x in zip(cost, a)))
        out[a] = (v, v, c)
    return out


# --------------------------------------------------------------------------------------------------- elastic CNN
def elastic_space(net) -> tuple[Space, Callable]:
    """The ElasticCNN's space as integer variables (d per stage, e and ks per block, w per stage when it has more
    than one choice) and ``decode(x) -> config``."""
    sp = net.space()
    keys = [(k, i) for k in ("d", "e", "ks", "w") for i in range(len(sp[k])) if len(sp[k][i]) > 1]
    sizes = tuple(len(sp[k][i]) for k, i in keys)

    def decode(x) -> dict:
        cfg = net.max_config()
        for (k, i), v in zip(keys, x):
            cfg[k][i] = sp[k][i][int(v)]
        return cfg

    return Space(sizes), decode


def elastic_measure(net, data: dict, decode: Callable, image_size: int, calib: int = 1024) -> Callable:
    """``measure`` of a child: accuracy on val (search) and test (report) after BN recalibration on ``calib`` training
    images (``harness.evaluate_child``); cost = analytic MACs of one image (``flops.cnn_macs``; deterministic)."""
    from .flops import cnn_macs
    from .harness import evaluate_child_splits

    def measure(key):
        cfg = decode(key)
        acc = evaluate_child_splits(net, cfg, data, calib=calib)
        return {"acc": float(acc["val"]), "test": float(acc["test"]), "cost": float(cnn_macs(net, cfg, image_size))}
    return measure
