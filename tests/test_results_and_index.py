"""Result files are deterministic and honest; claims get one of four verdicts from per-seed intervals; the index."""
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from scipy import stats

from reprolab import claims as C
from reprolab.report import index
from reprolab.results import Results

# a toy registry entry (what reprolab.registry loads from src/reprolab/<family>/<slug>.paper.yaml)
ENTRY = {
    "slug": "toy", "title": "Toy", "arxiv": "0000.00000", "family": "f", "datasets": [], "models": [],
    "file": "src/reprolab/f/toy.paper.yaml", "deviations": [], "params": {"seed": {"type": "integer"}},
    "claims": {
        "better": {"kind": "empirical", "statistic": "difference", "op": ">", "threshold": "th_gain",
                   "requires": ["learns"], "text": "method beats baseline", "baseline": "b", "paper": "p"},
        "smaller": {"kind": "empirical", "statistic": "ratio", "op": "<=", "threshold": 0.5, "requires": [],
                    "text": "method halves the cost", "baseline": "b", "paper": "p"},
        "bytes": {"kind": "accounting", "statistic": "value", "op": ">=", "threshold": 1.9, "requires": [],
                  "text": "bytes ratio", "baseline": "b", "paper": "p"},
    },
    "gates": {"learns": {"statistic": "difference", "op": ">", "threshold": 0.0, "text": "beats chance"}},
}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(C, "paper_entry", lambda slug: ENTRY)
    return {"th_gain": 0.0, "seed": 0}


def test_t_interval_matches_the_textbook_formula():
    x = [0.3, 0.1, 0.25, 0.18, 0.22]
    est, (lo, hi) = C.interval(x, "difference")
    half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    assert est == pytest.approx(np.mean(x)) and lo == pytest.approx(np.mean(x) - half) and hi == pytest.approx(
        np.mean(x) + half)


def test_ratio_interval_is_on_log_ratios():
    r = [0.4, 0.5, 0.45]
    est, (lo, hi) = C.interval(r, "ratio")
    logs = np.log(r)
    half = stats.t.ppf(0.975, 2) * np.std(logs, ddof=1) / math.sqrt(3)
    assert est == pytest.approx(math.exp(logs.mean()))
    assert (lo, hi) == (pytest.approx(math.exp(logs.mean() - half)), pytest.approx(math.exp(logs.mean() + half)))


def test_single_value_has_no_interval_and_constant_values_a_point():
    assert C.interval([0.3], "value") == (0.3, None)
    assert C.interval([0.3, 0.3, 0.3], "value") == (pytest.approx(0.3), [pytest.approx(0.3)] * 2)


@pytest.mark.parametrize("lo,hi,op,th,want", [
    (0.1, 0.2, ">", 0.0, "pass"), (-0.1, 0.2, ">", 0.0, "straddle"), (-0.3, 0.0, ">", 0.0, "fail"),
    (0.0, 0.2, ">=", 0.0, "pass"), (0.0, 0.2, ">", 0.0, "straddle"), (0.3, 0.4, "<=", 0.5, "pass"),
    (0.4, 0.6, "<=", 0.5, "straddle"), (0.6, 0.7, "<=", 0.5, "fail"), (0.5, 0.7, "<", 0.5, "fail"),
])
def test_side_of_threshold(lo, hi, op, th, want):
    assert C.side(lo, hi, op, th) == want


def test_constant_ratio_at_the_threshold_passes_a_non_strict_test():
    spec = {"statistic": "ratio", "op": ">=", "threshold": 3.0}
    r = C.evaluate(spec, 3.0, [0.3, 0.6, 0.9], [0.1, 0.2, 0.3])  # ratio 3 on every seed (3.0000000000000004 etc.)
    assert r["side"] == "pass" and r["ci_low"] == pytest.approx(3.0)


def test_four_verdicts(toy):
    seeds = [0.80, 0.82, 0.81]
    v = C.Verdicts("toy", toy)
    v.gate("learns", seeds, 0.5)                                   # beats chance on every seed
    v.claim("better", [0.85, 0.86, 0.88], seeds)                   # +0.05 on every seed: held
    v.claim("smaller", [0.9, 1.0, 0.95], [1.0, 1.0, 1.0])          # ratio ~0.95 > 0.5 everywhere: not reproduced
    v.accounting("bytes", 1.95)
    done = v.finalize()
    assert done["claims"]["better"]["verdict"] == C.HELD
    assert done["claims"]["smaller"]["verdict"] == C.NOT_REPRODUCED
    assert done["accounting"]["bytes"]["passed"] is True and "bytes" not in done["claims"]
    assert done["claims"]["better"]["per_seed"] == pytest.approx([0.05, 0.04, 0.07])

    v.claim("better", [0.85, 0.79, 0.83], seeds)                   # +0.05, -0.03, +0.02: straddles 0
    assert v.finalize()["claims"]["better"]["verdict"] == C.INCONCLUSIVE
    v.gate("learns", [0.45, 0.44, 0.46], 0.5)                      # below chance on every seed: cannot be tested
    done = v.finalize()
    assert done["gates"]["learns"]["status"] == C.GATE_FAILED
    assert done["claims"]["better"]["verdict"] == C.NOT_TESTABLE and done["claims"]["better"]["failed_gates"] == ["learns"]
    v.claim("better", [0.85, 0.86, 0.88], seeds)
    v.gate("learns", [0.5, 0.49, 0.53], 0.5)                       # straddles chance: more seeds would decide
    done = v.finalize()
    assert done["gates"]["learns"]["status"] == C.GATE_UNCERTAIN
    assert done["claims"]["better"]["verdict"] == C.INCONCLUSIVE and done["claims"]["better"]["uncertain_gates"] == ["learns"]


def test_one_seed_is_inconclusive_and_pairing_is_enforced(toy):
    v = C.Verdicts("toy", toy)
    v.gate("learns", [0.9], 0.5)
    v.claim("better", [0.9], [0.1])
    v.claim("smaller", [0.1], [1.0])
    v.accounting("bytes", 2.0)
    done = v.finalize()
    assert done["claims"]["smaller"]["verdict"] == C.INCONCLUSIVE   # no interval from one seed
    assert done["gates"]["learns"]["status"] == C.GATE_UNCERTAIN     # a gate is not established by one seed either
    assert done["claims"]["better"]["verdict"] == C.INCONCLUSIVE
    with pytest.raises(C.ClaimError, match="paired by seed"):
        v.claim("better", [0.9, 0.8], [0.1, 0.2, 0.3])
    with pytest.raises(C.ClaimError, match="accounting"):
        v.claim("bytes", [2.0, 2.0])
    with pytest.raises(C.ClaimError, match="no claim 'nope'"):
        v.claim("nope", [1.0])


def test_every_registered_claim_and_gate_must_be_reported(toy):
    v = C.Verdicts("toy", toy)
    v.claim("better", [0.9, 0.8], [0.1, 0.2])
    with pytest.raises(C.ClaimError, match="differ from the registry"):
        v.finalize()


def _verdicts(toy):
    v = C.Verdicts("toy", toy)
    v.gate("learns", [0.8, 0.82, 0.81], 0.5)
    v.claim("better", [0.85, 0.86, 0.88], [0.8, 0.82, 0.81])
    v.claim("smaller", [0.9, 1.0, 0.95], [1.0, 1.0, 1.0])
    v.accounting("bytes", 1.95)
    return v


def test_metrics_are_sorted_rounded_and_reproducible(tmp_path, toy):
    res = Results("toy", tmp_path)
    details = {"b": np.float32(1 / 3), "a": {"z": 2, "y": [0.1234567891, np.int64(3)]}}
    with res.timer("work"):
        pass
    assert res.write_metrics(details, _verdicts(toy)) is None  # nothing to print into a report
    p = tmp_path / "metrics.json"
    first, det = p.read_bytes(), (tmp_path / "details.json").read_bytes()
    res.write_metrics(details, _verdicts(toy))
    assert p.read_bytes() == first and (tmp_path / "details.json").read_bytes() == det
    body, d = json.loads(first), json.loads(det)
    assert list(body) == ["accounting", "claims", "gates"]
    assert d["a"]["y"] == [0.123457, 3] and d["b"] == 0.333333
    assert body["claims"]["better"]["verdict"] == "held" and len(body["claims"]["better"]["per_seed"]) == 3
    assert "work" in json.loads((tmp_path / "timings.json").read_text())["notebook"]
    assert b"work" not in first


@pytest.mark.parametrize("bad,err", [({"x": "text"}, TypeError), ({"x": float("nan")}, ValueError),
                                     ({"claims": 1}, ValueError)])
def test_details_refuse_strings_nan_and_claims(tmp_path, toy, bad, err):
    with pytest.raises(err):
        Results("toy", tmp_path).write_metrics(bad, _verdicts(toy))


def test_benchmark_must_say_what_and_whether_comparable(tmp_path):
    res = Results("toy", tmp_path)
    with pytest.raises(TypeError):
        res.benchmark("speed", 1.5, paper="1.56x")  # comparable is required
    with pytest.raises(ValueError, match="paper's number"):
        res.benchmark("speed", 1.5, what="int8 vs fp32 on CPU", comparable=True)
    res.benchmark("speed", 1.5, what="int8 vs fp32 linear, this CPU", comparable=False, paper="1.56x")


def test_results_dir_relative_to_repository(tmp_path):
    from reprolab.paths import REPO_ROOT

    res = Results("toy", "build/test-relative-out")
    try:
        assert res.dir == REPO_ROOT / "build/test-relative-out"
    finally:
        import shutil

        shutil.rmtree(REPO_ROOT / "build/test-relative-out", ignore_errors=True)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.links.append(a["src"])
        if "id" in a:
            self.ids.append(a["id"])


def test_index_scoreboard_rows_forest_and_links(tmp_path, toy):
    params = {"papers": {"toy": ENTRY, "p2": {**ENTRY, "slug": "p2", "claims": {
        "c": {**ENTRY["claims"]["better"], "requires": []}}, "gates": {}}}}
    res = Results("toy", tmp_path / "results" / "toy")
    res.benchmark("lookup", 0.03, what="eval-mode lookup microbenchmark", comparable=False, paper="1x training")
    res.benchmark("speedup", 1.7, what="end-to-end step time", comparable=True, paper="1.56x")
    res.write_metrics({"x": 1}, _verdicts(toy))
    rows = index.collect(params, results_root=tmp_path / "results")
    verdicts = {(r["slug"], c["id"]): c["verdict"] for r in rows for c in r["claims"]}
    assert verdicts == {("toy", "better"): "held", ("toy", "smaller"): "not reproduced", ("p2", "c"): "not run"}
    s = index.scoreboard(rows)
    assert (s["claims"], s["held"], s["not reproduced"], s["not run"], s["accounting"], s["accounting_passed"]) == \
        (3, 1, 1, 1, 1, 1)
    reports = tmp_path / "reports"
    reports.mkdir()
    index.forest(rows, reports / "forest.svg")
    svg = (reports / "forest.svg").read_bytes()
    index.forest(rows, reports / "forest.svg")
    assert (reports / "forest.svg").read_bytes() == svg, "the forest plot must be byte-identical on rerun"
    md, ht = index.to_markdown(rows), index.to_html(rows)
    assert "1.56x" in md and "1x training" not in md and "not comparable" in md  # paper's number only if comparable
    assert "| toy | speedup | time |" in md  # a memory ratio is never listed as a wall-clock benchmark
    assert index.bench_kind({"what": "rise of the process RSS high-water mark"}) == "memory"
    assert index.bench_kind({"what": "whole-step peak memory, full / WTA-CRS"}) == "memory"
    assert index.bench_kind({"what": "wall clock of one step"}) == "time"
    p = _Links()
    p.feed(ht)
    assert {"scoreboard", "papers"} <= set(p.ids)
    for ref in ("toy.html", "p2.html", "forest.svg"):
        assert ref in p.links


def test_old_metrics_without_verdicts_show_as_not_run(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "metrics.json").write_text(json.dumps({"claims": {"better": {"holds": True}}}))
    rows = index.collect({"papers": {"toy": ENTRY}}, results_root=tmp_path)
    assert {c["verdict"] for c in rows[0]["claims"]} == {"not run"} and not rows[0]["current"]


def test_bootstrap_interval_is_scipys_percentile_bootstrap():
    with pytest.raises(C.ClaimError, match="at least 20"):
        C.interval([0.1, 0.3, 0.2], "value", method="bootstrap")  # 3 seeds: the bootstrap would be about [min, max]
    x = list(np.random.default_rng(1).normal(0.2, 0.05, 25))
    est, (lo, hi) = C.interval(x, "value", method="bootstrap")
    ref = stats.bootstrap((np.asarray(x),), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert est == pytest.approx(np.mean(x)) and (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert min(x) < lo < est < hi < max(x)
