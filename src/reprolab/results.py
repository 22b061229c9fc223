"""Seeding, claims and result files shared by every notebook.

``metrics.json`` holds numbers only (sorted keys, rounded, no timestamps) so that a rerun with the same parameters
is byte-identical; wall-clock measurements go to ``timings.json`` instead.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .paths import RESULTS_DIR

SIGNIFICANT_DIGITS = 6
OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        import dgl  # noqa: F401  (imported lazily: only graph papers need it)

        dgl.seed(seed)
    except Exception:  # pragma: no cover - dgl optional for non-graph notebooks
        pass


def _clean(value: Any, key: str = "") -> Any:
    """Round floats to SIGNIFICANT_DIGITS, convert numpy/torch scalars, refuse strings and NaN."""
    if isinstance(value, dict):
        return {str(k): _clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and not isinstance(value, (bool, int, float)):
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metrics: {key} is {value}; metrics must be finite numbers")
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if value is None:
        return None
    raise TypeError(f"metrics: {key} is {type(value).__name__} {value!r}; metrics hold numbers only")


def claim(measured: float, op: str, threshold: float, baseline: float) -> dict:
    """One claim: ``holds`` is ``measured <op> threshold``; ``baseline`` is the same quantity for the baseline arm.

    The threshold must come from params.yaml (fixed before the run), never from the measurement.
    """
    if op not in OPS:
        raise ValueError(f"claim op {op!r}; allowed: {', '.join(OPS)}")
    return {"measured": float(measured), "baseline": float(baseline), "threshold": float(threshold),
            "op": op, "holds": bool(OPS[op](float(measured), float(threshold)))}


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temporary file then rename) so that a crash leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(obj))
    os.replace(tmp, path)


class Results:
    """Where a notebook writes: ``metrics.json``, ``timings.json`` and ``figures/*.png``.

    ``out_dir`` empty means ``results/<paper>`` (interactive use); the pipeline passes a staging folder and moves it
    into place only when the whole notebook succeeded.
    """

    def __init__(self, paper: str, out_dir: str | Path = ""):
        self.paper = paper
        self.dir = Path(out_dir) if out_dir else RESULTS_DIR / paper
        self.figures = self.dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self._timings: dict[str, Any] = {}
        self._benchmarks: dict[str, Any] = {}

    def savefig(self, fig, name: str) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` without timestamps in its metadata."""
        path = self.figures / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        return path

    @contextmanager
    def timer(self, name: str):
        """Time a block; the seconds go to timings.json, never to metrics.json."""
        start = time.perf_counter()
        yield
        self._timings[name] = round(time.perf_counter() - start, 4)

    def benchmark(self, name: str, measured: float, paper: str, unit: str = "x") -> None:
        """A wall-clock ratio to show beside the paper's number in the index (kept apart from metrics)."""
        self._benchmarks[name] = {"measured": round(float(measured), 4), "paper": paper, "unit": unit}

    def write_metrics(self, metrics: dict, claims: dict[str, dict]) -> Path:
        if not claims:
            raise ValueError("write_metrics: at least one claim is required")
        for cid, c in claims.items():
            missing = {"measured", "baseline", "threshold", "holds"} - set(c)
            if missing:
                raise ValueError(f"claim {cid!r} lacks {sorted(missing)}; build it with reprolab.results.claim()")
        if "claims" in metrics:
            raise ValueError("write_metrics: pass claims separately, not inside metrics")
        body = _clean(dict(metrics))
        # claims hold numbers plus their comparison operator (the index prints "measured <= threshold")
        body["claims"] = {cid: {**_clean({k: v for k, v in c.items() if k != "op"}, f"claims.{cid}"), "op": c.get("op", "")}
                          for cid, c in claims.items()}
        path = self.dir / "metrics.json"
        write_json(path, body)
        if self._timings or self._benchmarks:
            write_json(self.dir / "timings.json", {"notebook": self._timings, "benchmarks": self._benchmarks})
        return path
