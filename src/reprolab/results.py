"""Seeding and result files shared by every notebook.

``metrics.json`` holds what a user compares between runs: every claim's per-seed values, estimate, 95% interval and
verdict, the gates and the accounting checks (see ``reprolab.claims``). ``details.json`` holds everything else the
notebook measured (per-arm numbers, sweeps, diagnostics). Both are sorted, rounded and free of timestamps, so that a
rerun with the same parameters is byte-identical; wall-clock measurements go to ``timings.json`` instead.
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

from .paths import REPO_ROOT, RESULTS_DIR

SIGNIFICANT_DIGITS = 6
STRING_FIELDS = ("verdict", "status", "criterion", "failed_gates", "uncertain_gates")  # the only strings metrics.json may hold


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
    """Round floats to SIGNIFICANT_DIGITS, convert numpy/torch scalars, refuse NaN and strings (but STRING_FIELDS)."""
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
    if isinstance(value, str) and key.split(".")[-1].split("[")[0] in STRING_FIELDS:
        return value
    raise TypeError(f"metrics: {key} is {type(value).__name__} {value!r}; metrics hold numbers only")


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (temporary file then rename) so that a crash leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(obj))
    os.replace(tmp, path)


class Results:
    """Where a notebook writes: ``metrics.json``, ``details.json``, ``timings.json`` and ``figures/*.png``.

    ``out_dir`` empty means ``results/<paper>`` (interactive use); the pipeline passes a staging folder (relative to the
    repository root) and moves it into place only when the whole notebook succeeded.
    """

    def __init__(self, paper: str, out_dir: str | Path = ""):
        self.paper = paper
        d = Path(out_dir) if out_dir else RESULTS_DIR / paper
        self.dir = d if d.is_absolute() else REPO_ROOT / d
        self.figures = self.dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self._timings: dict[str, Any] = {}
        self._benchmarks: dict[str, Any] = {}

    def savefig(self, fig, name: str) -> None:
        """Save a matplotlib figure as ``figures/<name>.png`` without timestamps in its metadata.

        Returns nothing, so that a cell ending with it does not print the (machine-specific) path into the report.
        """
        path = self.figures / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})

    @contextmanager
    def timer(self, name: str):
        """Time a block; the seconds go to timings.json, never to metrics.json."""
        start = time.perf_counter()
        yield
        self._timings[name] = round(time.perf_counter() - start, 4)

    def benchmark(self, name: str, measured: float, *, what: str, comparable: bool, paper: str = "",
                  paper_setting: str = "", unit: str = "x") -> None:
        """A wall-clock measurement (kept apart from metrics: timings vary between runs).

        ``what`` says what was measured here (in words, with the hardware); ``comparable`` whether it is the paper's own
        quantity in a comparable setting. The index shows the paper's number (``paper``, measured in ``paper_setting``)
        beside ours only when ``comparable`` is true.
        """
        if not what:
            raise ValueError(f"benchmark {name!r}: say what it measures (what=...)")
        if comparable and not paper:
            raise ValueError(f"benchmark {name!r}: comparable=True needs the paper's number (paper=...)")
        self._benchmarks[name] = {"measured": round(float(measured), 4), "unit": unit, "what": what,
                                  "comparable": bool(comparable), "paper": paper, "paper_setting": paper_setting}

    def write_metrics(self, details: dict, verdicts) -> None:
        """Write ``metrics.json`` (claims, gates, accounting from a ``reprolab.claims.Verdicts``) and ``details.json``."""
        from .claims import Verdicts

        if not isinstance(verdicts, Verdicts):
            raise TypeError("write_metrics(details, verdicts): verdicts is a reprolab.claims.Verdicts")
        if any(k in details for k in ("claims", "gates", "accounting")):
            raise ValueError("write_metrics: claims, gates and accounting come from the Verdicts, not from details")
        body = _clean(verdicts.finalize())
        det = _clean({**details, **({"claim_context": verdicts.context} if verdicts.context else {})})
        path = self.dir / "metrics.json"
        write_json(self.dir / "details.json", det)
        write_json(path, body)
        if self._timings or self._benchmarks:
            write_json(self.dir / "timings.json", {"notebook": self._timings, "benchmarks": self._benchmarks})
        # returns nothing: a cell ending with it must not print the machine's path into the report
