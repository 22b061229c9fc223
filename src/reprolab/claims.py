"""Verdicts from per-seed values: the statistic, its 95% interval, gates, accounting checks.

A notebook builds one :class:`Verdicts` from its registry entry and configuration, then reports, for every claim and
gate of the registry, one value per seed for the method and (paired by seed) for the baseline::

    v = Verdicts(paper, cfg)
    v.gate("gcn_learns", method=acc_gcn, baseline=majority_rate)       # lists, one value per seed (or a number)
    v.claim("gcn_less_fair_than_mlp", method=dsp_gcn, baseline=dsp_mlp)
    v.accounting("int8_weight_memory", 1.95)                           # deterministic checks, shown apart
    res.write_metrics(details, v)

The statistic is declared in the registry: ``difference`` (method - baseline per seed), ``ratio`` (method / baseline
per seed; interval from a t interval on the log ratios) or ``value`` (the method per seed). The interval is a 95%
t interval (``scipy.stats.ttest_1samp(...).confidence_interval``) or, where declared, ``scipy.stats.bootstrap``.
Verdicts:

- ``held``: the whole interval is on the pass side of the threshold;
- ``not reproduced``: the whole interval is on the fail side;
- ``inconclusive``: the interval straddles the threshold (or there is one seed only): more seeds or budget would decide;
- ``not testable here``: a gate the claim requires failed (the gate's numbers are shown beside it).

A gate has three states: ``passed`` (its whole interval on the pass side), ``failed`` (wholly on the fail side) and
``uncertain`` (it straddles, or one seed): an uncertain gate makes the claims that require it ``inconclusive``. The threshold is read from the configuration (the
params.yaml key the registry names), never from the measurement.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from .registry import OPS, paper_entry

HELD, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE = "held", "not reproduced", "inconclusive", "not testable here"
GATE_PASSED, GATE_FAILED, GATE_UNCERTAIN = "passed", "failed", "uncertain"
VERDICTS = (HELD, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE)
CONFIDENCE = 0.95
MIN_BOOTSTRAP = 20
MIN_SEEDS = {"smoke": 1, "quick": 3, "full": 5}  # per empirical claim and gate, checked by the stage runner


class ClaimError(ValueError):
    pass


def _as_list(x, n: int | None, name: str) -> list[float]:
    if isinstance(x, (int, float, np.integer, np.floating)) or (hasattr(x, "ndim") and getattr(x, "ndim") == 0):
        if n is None:
            raise ClaimError(f"{name}: give one value per seed (a list), not a single number")
        return [float(x)] * n
    vals = [float(v) for v in np.asarray(x, dtype=float).ravel()]
    if not vals:
        raise ClaimError(f"{name}: no values")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ClaimError(f"{name}: non-finite values {bad}")
    return vals


def per_seed_statistic(statistic: str, method: Sequence[float] | float, baseline=None) -> tuple[list[float], list, list]:
    """The per-seed values of the statistic, with the method's and baseline's per-seed values (paired by index)."""
    m = _as_list(method, None, "method")
    if statistic == "value":
        b = _as_list(baseline, len(m), "baseline") if baseline is not None else []
        if b and len(b) != len(m):
            raise ClaimError(f"method has {len(m)} seeds, baseline {len(b)}: values are paired by seed")
        return m, m, b
    if baseline is None:
        raise ClaimError(f"statistic {statistic!r} needs a baseline (one value per seed, or a reference number)")
    b = _as_list(baseline, len(m), "baseline")
    if len(b) != len(m):
        raise ClaimError(f"method has {len(m)} seeds, baseline {len(b)}: values are paired by seed")
    if statistic == "difference":
        return [x - y for x, y in zip(m, b)], m, b
    if statistic == "ratio":
        if min(m + b) <= 0:
            raise ClaimError(f"statistic 'ratio' needs positive values; got method {m}, baseline {b}")
        return [x / y for x, y in zip(m, b)], m, b
    raise ClaimError(f"unknown statistic {statistic!r}; allowed: difference, ratio, value")


def interval(values: Sequence[float], statistic: str, method: str = "t") -> tuple[float, list[float] | None]:
    """(point estimate, 95% interval or None for a single value). Ratios: geometric mean, interval on log ratios."""
    x = np.asarray(values, dtype=float)
    log = statistic == "ratio"
    if method == "bootstrap" and len(x) < MIN_BOOTSTRAP:
        raise ClaimError(f"interval 'bootstrap' needs at least {MIN_BOOTSTRAP} values (got {len(x)}); with few seeds "
                         "the percentile bootstrap is about [min, max] and too narrow: use the t interval")
    if log:
        x = np.log(x)
    est = float(x.mean())
    if len(x) < 2:
        lo_hi = None
    elif np.ptp(x) == 0:
        lo_hi = [est, est]
    elif method == "bootstrap":
        r = stats.bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=2000, method="percentile",
                            random_state=np.random.default_rng(0))
        lo_hi = [float(r.confidence_interval.low), float(r.confidence_interval.high)]
    else:
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(CONFIDENCE)
        lo_hi = [float(ci.low), float(ci.high)]
    if log:
        est = float(np.exp(est))
        lo_hi = None if lo_hi is None else [float(np.exp(v)) for v in lo_hi]
    return est, lo_hi


def side(lo: float, hi: float, op: str, threshold: float) -> str:
    """'pass' if the whole interval [lo, hi] is on the pass side of ``op threshold``, 'fail' if wholly on the other.

    Bounds within floating-point roundoff of the threshold (relative 1e-9) count as equal to it.
    """
    tol = 1e-9 * max(1.0, abs(threshold))
    lo = threshold if abs(lo - threshold) <= tol else lo
    hi = threshold if abs(hi - threshold) <= tol else hi
    if op == ">=":
        return "pass" if lo >= threshold else ("fail" if hi < threshold else "straddle")
    if op == ">":
        return "pass" if lo > threshold else ("fail" if hi <= threshold else "straddle")
    if op == "<=":
        return "pass" if hi <= threshold else ("fail" if lo > threshold else "straddle")
    if op == "<":
        return "pass" if hi < threshold else ("fail" if lo >= threshold else "straddle")
    raise ClaimError(f"op {op!r}; allowed: {', '.join(OPS)}")


def evaluate(spec: dict, threshold: float, method, baseline=None) -> dict:
    """One claim or gate: per-seed statistic, estimate, interval, the side of the threshold it lies on.

    Scalars are what ``dvc metrics show/diff`` tabulates (estimate, ci_low, ci_high, verdict; a gate's status);
    everything else is a list, which DVC leaves out of its tables: ``criterion`` = [statistic, op, threshold],
    ``ci95`` = [low, high] (null for one seed), the per-seed values.
    """
    vals, m, b = per_seed_statistic(spec["statistic"], method, baseline)
    est, ci = interval(vals, spec["statistic"], spec.get("interval", "t"))
    if ci is None:
        where = "straddle"
    elif spec["statistic"] == "ratio" and threshold > 0:  # compare on the log scale, as the interval was computed
        where = side(math.log(ci[0]), math.log(ci[1]), spec["op"], math.log(threshold))
    else:
        where = side(ci[0], ci[1], spec["op"], threshold)
    out = {"criterion": [spec["statistic"], spec["op"], float(threshold)], "estimate": est, "ci95": ci,
           "ci_low": None if ci is None else ci[0], "ci_high": None if ci is None else ci[1],
           "per_seed": vals, "method_per_seed": m, "side": where}
    if b:
        out["baseline_per_seed"] = b
    return out


def criterion(result: dict) -> tuple[str, str, float]:
    """(statistic, op, threshold) of a claim, gate or accounting result."""
    statistic, op, threshold = result["criterion"]
    return statistic, op, float(threshold)


def margin(result: dict, scale: float | None = None) -> list[float]:
    """[estimate, low, high] of the signed distance to the threshold (positive = pass side), for the forest plot.

    Ratios: log(estimate / threshold). Other statistics: (estimate - threshold) / scale, a relative distance, where
    ``scale`` (the registry's, else) is the baseline's mean magnitude, else |threshold|, else 1.
    """
    statistic, op, th = criterion(result)
    sign = 1.0 if op in (">=", ">") else -1.0
    pts = [result["estimate"]] + (result["ci95"] or [result["estimate"]] * 2)
    if statistic == "ratio" and th > 0:
        vals = [sign * math.log(p / th) for p in pts]
    else:
        if scale is None:
            base = result.get("baseline_per_seed") or []
            scale = (abs(float(np.mean(base))) if base else 0.0) or abs(th) or 1.0
        vals = [sign * (p - th) / scale for p in pts]
    lo, hi = sorted(vals[1:])
    return [vals[0], lo, hi]


class Verdicts:
    """Collects a paper's gates, claims and accounting checks, and decides the verdicts when written."""

    def __init__(self, paper: str, cfg: dict):
        self.paper, self.cfg = paper, cfg
        self.entry = paper_entry(paper)
        self.gates: dict[str, dict] = {}
        self.claims: dict[str, dict] = {}
        self.accounting_checks: dict[str, dict] = {}
        self.context: dict[str, dict] = {}  # extra numbers per claim/gate (keyword arguments): go to details.json

    def _context(self, cid: str, context: dict) -> None:
        if context:
            self.context[cid] = context

    def _threshold(self, spec: dict, where: str) -> float:
        th = spec["threshold"]
        if isinstance(th, str):
            if th not in self.cfg:
                raise ClaimError(f"{where}: threshold key {th!r} is not in the configuration of {self.paper}")
            th = self.cfg[th]
        return float(th)

    def _spec(self, table: str, cid: str) -> dict:
        specs = self.entry[table]
        if cid not in specs:
            raise ClaimError(f"{self.paper}: no {table[:-1]} {cid!r} in {self.entry['file']}; "
                             f"declared: {', '.join(specs) or 'none'}")
        return specs[cid]

    def gate(self, gid: str, method, baseline=None, **context) -> dict:
        spec = self._spec("gates", gid)
        r = evaluate(spec, self._threshold(spec, f"gates.{gid}"), method, baseline)
        where = r.pop("side")
        r["status"] = {"pass": GATE_PASSED, "fail": GATE_FAILED}.get(where, GATE_UNCERTAIN)
        r["passed"] = r["status"] == GATE_PASSED
        self._context(gid, context)
        self.gates[gid] = r
        return r

    def claim(self, cid: str, method, baseline=None, **context) -> dict:
        spec = self._spec("claims", cid)
        if spec["kind"] != "empirical":
            raise ClaimError(f"{self.paper}.{cid} is an accounting check: use Verdicts.accounting")
        r = evaluate(spec, self._threshold(spec, f"claims.{cid}"), method, baseline)
        self._context(cid, context)
        self.claims[cid] = r
        return r

    def accounting(self, cid: str, value: float, **context) -> dict:
        """A deterministic check (bytes, counts, identities): value ``op`` threshold, passed or failed."""
        spec = self._spec("claims", cid)
        if spec["kind"] != "accounting":
            raise ClaimError(f"{self.paper}.{cid} is an empirical claim: use Verdicts.claim with per-seed values")
        th = self._threshold(spec, f"claims.{cid}")
        value = float(value)
        r = {"criterion": ["value", spec["op"], th], "value": value,
             "passed": side(value, value, spec["op"], th) == "pass"}
        self._context(cid, context)
        self.accounting_checks[cid] = r
        return r

    def finalize(self) -> dict:
        """``{"claims", "gates", "accounting"}`` with verdicts; every registered claim and gate must be present."""
        want_claims = {c for c, s in self.entry["claims"].items() if s["kind"] == "empirical"}
        want_acc = {c for c, s in self.entry["claims"].items() if s["kind"] == "accounting"}
        for what, want, got in (("claims", want_claims, self.claims), ("accounting checks", want_acc,
                                                                       self.accounting_checks),
                                ("gates", set(self.entry["gates"]), self.gates)):
            if set(got) != want:
                raise ClaimError(f"{self.paper}: {what} {sorted(got)} differ from the registry's {sorted(want)} "
                                 f"({self.entry['file']})")
        claims = {}
        for cid, r in self.claims.items():
            spec = self.entry["claims"][cid]
            req = spec.get("requires", [])
            failed = [g for g in req if self.gates[g]["status"] == GATE_FAILED]
            uncertain = [g for g in req if self.gates[g]["status"] == GATE_UNCERTAIN]
            r = dict(r)
            where = r.pop("side")
            if failed:
                verdict = NOT_TESTABLE
            elif uncertain or r["ci95"] is None or where == "straddle":
                verdict = INCONCLUSIVE
            else:
                verdict = HELD if where == "pass" else NOT_REPRODUCED
            r["verdict"] = verdict
            r["failed_gates"] = failed
            r["uncertain_gates"] = uncertain
            r["margin"] = margin(r, spec.get("scale"))
            claims[cid] = r
        return {"claims": claims, "gates": dict(self.gates), "accounting": dict(self.accounting_checks)}

    def table(self):
        """A pandas table of every claim, gate and accounting check with its verdict (for the notebook)."""
        import pandas as pd

        done = self.finalize()
        rows = []
        for kind, items in (("gate", done["gates"]), ("claim", done["claims"]), ("accounting", done["accounting"])):
            for cid, r in items.items():
                ci = r.get("ci95")
                statistic, op, th = criterion(r)
                rows.append({"kind": kind, "id": cid, "statistic": statistic,
                             "estimate": r.get("estimate", r.get("value")),
                             "95% CI": "" if kind == "accounting" else ("one seed" if ci is None else
                                                                        f"[{ci[0]:.4g}, {ci[1]:.4g}]"),
                             "criterion": f"{op} {th:.4g}", "seeds": len(r.get("per_seed", [])) or "",
                             "verdict": r.get("verdict") or r.get("status") or ("passed" if r["passed"] else "FAILED")})
        return pd.DataFrame(rows)
