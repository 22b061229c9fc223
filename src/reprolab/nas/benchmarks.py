"""Published NAS ground truth, read offline from the pinned wheels' data (``data/``, see ``reprolab.data.sources``).

- **NAS-Bench-Graph** (Qin et al., NeurIPS 2022; ``nas-bench-graph==1.4.0``): ``data/nas_bench_graph/<dataset>.bench``,
  a pickle ``{hash: {'valid_perf', 'perf', 'latency', 'para'}}`` per graph dataset (26,206 architectures; proteins
  2,021 on a 5-op space). The architecture space (9 link patterns x 9 GNN ops per node, isomorphic cells merged) is
  enumerated with the library's own ``architecture.py`` (copied byte for byte from the wheel into
  ``data/nas_bench_graph/architecture.py`` and imported from there: ``all_archs``, ``Arch.valid_hash``).
- **AnalogNAS-Bench** (IBM, ``analog-nasbench==0.1.3``): ``data/analog_nasbench/data.anb``, a pickle
  ``{cell: Architecture}`` for all 15,625 NAS-Bench-201 cells trained on CIFAR-10 (baseline / PTQ / QAT / noisy /
  analog accuracy in %, drift). Cells are NASLib op-index tuples (``reprolab.nas.space201``).

Both pickles are read with a RESTRICTED unpickler: only the globals named in ``_NBG_GLOBALS`` / ``_ANALOG_GLOBALS`` are
resolved (numpy scalar/dtype; the analog ``Architecture``/``DriftMeasurement`` classes mapped to small local classes
that only hold attributes); any other global (``os.system``, ``builtins.eval``...) raises ``UnsafePickleError``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import DATA_DIR
from . import space201

NBG_DIR = DATA_DIR / "nas_bench_graph"
ANALOG_FILE = DATA_DIR / "analog_nasbench" / "data.anb"
NBG_DATASETS = ("cora", "citeseer", "pubmed", "arxiv", "cs", "physics", "photo", "computers", "proteins")
ANALOG_METRICS = ("baseline_accuracy", "ptq_accuracy", "qat_accuracy", "noisy_accuracy", "analog_accuracy")
DRIFT_TIMES = (60, 3600, 86400, 2592000)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class DriftMeasurement:
    """Local stand-in for ``analognasbench.data.DriftMeasurement`` (attributes ``value``, ``uncertainty``)."""

    def __repr__(self):
        return f"{self.__dict__.get('value')} ± {self.__dict__.get('uncertainty')}"


class AnalogArchitecture:
    """Local stand-in for ``analognasbench.data.Architecture``: attributes only (set by the pickle's BUILD)."""


def _numpy_scalar():
    try:
        from numpy.core.multiarray import scalar  # numpy 1.x
    except ImportError:  # pragma: no cover - numpy 2
        from numpy._core.multiarray import scalar
    return scalar


_NBG_GLOBALS = {("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
                ("numpy", "dtype"): lambda: np.dtype}
_ANALOG_GLOBALS = {("analognasbench.data", "Architecture"): lambda: AnalogArchitecture,
                   ("analognasbench.data", "DriftMeasurement"): lambda: DriftMeasurement}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals of ``allowed`` ({(module, name): factory of the object})."""

    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]()
        raise UnsafePickleError(f"refusing to load global {module}.{name}: only "
                                f"{sorted(f'{m}.{n}' for m, n in self.allowed)} are allowed in this benchmark pickle")


def restricted_load(data: bytes, allowed: dict):
    return RestrictedUnpickler(io.BytesIO(data), allowed).load()


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` (python -m reprolab.data.materialize)")
    return path


# --------------------------------------------------------------------------------------------------- NAS-Bench-Graph
@lru_cache(maxsize=1)
def nbg_architecture_module():
    """The wheel's own ``nas_bench_graph/architecture.py`` (as materialized in data/), imported as a module."""
    path = _need(NBG_DIR / "architecture.py")
    spec = importlib.util.spec_from_file_location("nas_bench_graph_architecture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nbg_raw(dataset: str) -> dict:
    """The bench pickle of one dataset: {hash: {'valid_perf', 'perf', 'latency', 'para'}} (restricted unpickler)."""
    if dataset not in NBG_DATASETS:
        raise ValueError(f"NAS-Bench-Graph dataset {dataset!r}; allowed: {', '.join(NBG_DATASETS)}")
    return restricted_load(_need(NBG_DIR / f"{dataset}.bench").read_bytes(), _NBG_GLOBALS)


@lru_cache(maxsize=1)
def nbg_architectures() -> pd.DataFrame:
    """The 26,206 architectures of NAS-Bench-Graph (library's ``all_archs()``): link, ops, hash."""
    mod = nbg_architecture_module()
    with contextlib.redirect_stdout(io.StringIO()):  # all_archs() prints the count
        archs = mod.all_archs()
    rows = [{"link": tuple(a.link), "ops": tuple(a.ops), "hash": int(a.valid_hash())} for a in archs]
    return pd.DataFrame(rows)


@lru_cache(maxsize=1)
def nbg_raw_keys() -> tuple:
    """((link index, op1..op4 indices), bench hash) for all 9 x 9^4 raw genomes (link from the library's ``link_list``,
    ops from its ``gnn_list``), keyed by the library's ``Arch.valid_hash`` (isomorphic genomes share a hash)."""
    mod = nbg_architecture_module()
    return tuple(((li,) + ops, int(mod.Arch(list(link), [mod.gnn_list[o] for o in ops]).valid_hash()))
                 for li, link in enumerate(mod.link_list)
                 for ops in itertools.product(range(len(mod.gnn_list)), repeat=4))


def nbg_hash(link, ops) -> int:
    """Bench key of an architecture (the library's ``Arch(link, ops).valid_hash()``: isomorphic cells share a key)."""
    return int(nbg_architecture_module().Arch(list(link), list(ops)).valid_hash())


@lru_cache(maxsize=16)
def nbg_table(dataset: str) -> pd.DataFrame:
    """One row per architecture: link, ops, hash, val_acc, test_acc (0-1), latency_s, params_m (millions).

    proteins (5-op space, keys from ``hash_arch(use_proteins=True)``) has no enumerated link/ops here: hash only."""
    raw = nbg_raw(dataset)
    if dataset == "proteins":
        base = pd.DataFrame({"hash": sorted(int(k) for k in raw)})
    else:
        base = nbg_architectures().copy()
        missing = set(base["hash"]) - set(int(k) for k in raw)
        if missing:
            raise ValueError(f"{dataset}: {len(missing)} enumerated architectures have no bench entry")
    rec = [raw[h] for h in base["hash"]]
    base["val_acc"] = [float(r["valid_perf"]) for r in rec]
    base["test_acc"] = [float(r["perf"]) for r in rec]
    base["latency_s"] = [float(r["latency"]) for r in rec]
    base["params_m"] = [float(r["para"]) for r in rec]
    return base


# --------------------------------------------------------------------------------------------------- AnalogNAS-Bench
@lru_cache(maxsize=1)
def analog_raw() -> dict:
    """{cell tuple: AnalogArchitecture} for the 15,625 NB-201 cells (restricted unpickler)."""
    return restricted_load(_need(ANALOG_FILE).read_bytes(), _ANALOG_GLOBALS)


@lru_cache(maxsize=1)
def nb201_table() -> pd.DataFrame:
    """One row per NB-201 cell (NASLib op order, ``space201``), sorted by cell: cell, arch (NB-201 string), the five
    CIFAR-10 accuracies of AnalogNAS-Bench in % (``baseline_accuracy`` is the plain digital training) and drift."""
    raw = analog_raw()
    rows = []
    for cell in sorted(raw):
        a = raw[cell].__dict__
        row = {"cell": tuple(int(o) for o in cell), "arch": space201.to_str(cell)}
        row.update({m: float(a[m]) for m in ANALOG_METRICS})
        for kind in ("baseline", "analog"):
            for t in DRIFT_TIMES:
                row[f"{kind}_drift_{t}"] = float(a[f"{kind}_drift_{t}"].value)
        rows.append(row)
    return pd.DataFrame(rows)


def nb201_accuracy(metric: str = "baseline_accuracy") -> dict:
    """{cell: CIFAR-10 accuracy in %} from AnalogNAS-Bench."""
    if metric not in ANALOG_METRICS:
        raise ValueError(f"metric {metric!r}; allowed: {', '.join(ANALOG_METRICS)}")
    t = nb201_table()
    return dict(zip(t["cell"], t[metric].astype(float)))
