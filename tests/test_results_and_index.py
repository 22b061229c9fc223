"""Result files are deterministic and honest; the index reports every claim."""
import json

import numpy as np
import pytest

from reprolab.report import index
from reprolab.results import Results, claim


def test_claim_holds_only_when_comparison_true():
    assert claim(1.01, "<=", 1.03, baseline=1.4)["holds"] is True
    assert claim(1.05, "<=", 1.03, baseline=1.4)["holds"] is False
    assert claim(0.9, ">=", 0.95, baseline=0.97)["holds"] is False
    with pytest.raises(ValueError, match="allowed"):
        claim(1, "==", 1, baseline=1)


def test_metrics_are_sorted_rounded_and_reproducible(tmp_path):
    res = Results("toy", tmp_path)
    m = {"b": np.float32(1 / 3), "a": {"z": 2, "y": [0.1234567891, np.int64(3)]}}
    c = {"c1": claim(1.0, "<=", 1.03, baseline=2.0)}
    with res.timer("work"):
        pass
    p = res.write_metrics(m, c)
    first = p.read_bytes()
    res.write_metrics(m, c)
    assert p.read_bytes() == first
    body = json.loads(first)
    assert list(body) == sorted(body)
    assert body["a"]["y"] == [0.123457, 3] and body["b"] == 0.333333
    assert body["claims"]["c1"] == {"baseline": 2.0, "holds": True, "measured": 1.0, "op": "<=", "threshold": 1.03}
    assert "work" in json.loads((tmp_path / "timings.json").read_text())["notebook"]
    assert "work" not in first.decode()


@pytest.mark.parametrize("bad,err", [({"x": "text"}, TypeError), ({"x": float("nan")}, ValueError)])
def test_metrics_refuse_strings_and_nan(tmp_path, bad, err):
    with pytest.raises(err):
        Results("toy", tmp_path).write_metrics(bad, {"c": claim(1, "<=", 2, baseline=3)})


def test_index_rows_follow_results(tmp_path, monkeypatch):
    params = {"papers": {"p1": {"title": "P1", "arxiv": "1", "family": "f", "claims": {
        "c1": {"text": "claim one", "baseline": "base", "paper": "2x"},
        "c2": {"text": "claim two", "baseline": "base", "paper": "3x"}}},
        "p2": {"title": "P2", "arxiv": "2", "family": "f", "claims": {"c": {"text": "t", "baseline": "b", "paper": "p"}}}}}
    res = Results("p1", tmp_path / "p1")
    res.benchmark("speedup", 1.7, paper="1.56x")
    res.write_metrics({"x": 1}, {"c1": claim(1.0, "<=", 1.03, baseline=2.0), "c2": claim(5.0, "<=", 1.03, baseline=2.0)})
    rows = index.collect(params, results_root=tmp_path)
    verdicts = {(r["slug"], c["id"]): c["verdict"] for r in rows for c in r["claims"]}
    assert verdicts == {("p1", "c1"): "held", ("p1", "c2"): "not reproduced", ("p2", "c"): "not run"}
    md, ht = index.to_markdown(rows), index.to_html(rows)
    assert "**not reproduced**" in md and "1.56x" in md and "1.7x" in md
    assert "1 held, 1 not reproduced, 1 not run" in ht
