"""The stage runner: failures leave no stale results; every notebook runs in the smoke profile; reruns are byte-identical.

Every paper's notebook runs once in the smoke profile. The byte-identical rerun (a second execution compared file by
file) is the expensive half of the suite, so ``make test`` reruns one paper per family (RERUN_SENTINELS: the family's
shared kernels, data and seeding paths) and ``make test-reruns`` (REPROLAB_RERUN_ALL=1) reruns every paper. Each paper's
own rerun was checked when it landed; run ``make test-reruns`` after changing shared code.
"""
import json
import os

import nbformat
import pytest
import yaml

from reprolab.claims import VERDICTS
from reprolab.config import read_params
from reprolab.stage import StageError, run_stage

FAMILIES = {slug: entry["family"] for slug, entry in read_params()["papers"].items()}
PAPERS = list(FAMILIES)
# one paper per family whose smoke run is repeated by `make test` (a cheap one, so the check costs little);
# test_every_family_has_one_rerun_sentinel makes a new family name its own
RERUN_SENTINELS = {
    "atoms": "eip_injection", "backdoor": "sra_backdoor", "bio": "graph_vci", "cl": "hypernet_review",
    "dp": "autoclip", "embed": "cafe", "equivariant": "tdn_mlip", "explain": "leta", "fed": "lifl_serverless",
    "graph": "fmp", "lm": "self_extend", "memory": "coat_fp8", "moe": "alf_lb_moe", "nas": "bignas", "privacy": "recit",
    "pruning": "weight_compander", "quant": "llm_qfa", "reason": "rearev", "rl": "gbrl", "select": "uds_batch_select",
    "sensing": "crossfi", "tf": "deep_incubation", "weightspace": "d2nwg", "zk": "zkdl",
}
RERUN_ALL = os.environ.get("REPROLAB_RERUN_ALL") == "1"


def _failing_setup(tmp_path):
    params = {"profile": "smoke", "models": {}, "datasets": {}, "broken": {"seed": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    entry = {"slug": "broken", "title": "B", "arxiv": "0", "family": "x", "datasets": [], "models": [],
             "claims": {"c": {"kind": "empirical", "statistic": "value", "op": ">", "threshold": 0.0, "text": "t",
                              "baseline": "b", "paper": "p"}}, "gates": {}, "deviations": [],
             "params": {"seed": {"type": "integer", "minimum": 0}}}
    (tmp_path / "registry" / "x").mkdir(parents=True)
    (tmp_path / "registry" / "x" / "broken.paper.yaml").write_text(yaml.safe_dump(entry))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('paper = "broken"\nprofile = "smoke"\nout_dir = ""')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("import pathlib\npathlib.Path(out_dir, 'metrics.json').write_text('{}')"),
                nbformat.v4.new_code_cell("raise RuntimeError('deliberate failure in cell 3')")]
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "broken.ipynb")


def test_failing_notebook_fails_stage_and_removes_stale_results(tmp_path, capfd):
    _failing_setup(tmp_path)
    stale = tmp_path / "results" / "broken"
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text('{"claims": {}}')
    with pytest.raises(StageError, match="the notebook failed"):
        run_stage("broken", "smoke", results_root=tmp_path / "results", reports_root=tmp_path / "reports",
                  build_root=tmp_path / "build", params_file=tmp_path / "params.yaml", notebooks_root=tmp_path / "nbs",
                  registry_dir=tmp_path / "registry")
    assert "deliberate failure in cell 3" in capfd.readouterr().err  # the failing cell is visible
    assert not stale.exists(), "a failed stage must not leave stale metrics behind"
    assert not (tmp_path / "reports" / "broken.html").exists()
    assert (tmp_path / "build" / "broken" / "broken.ipynb").exists(), "the partial notebook is kept for debugging"


@pytest.mark.notebook
@pytest.mark.parametrize("slug", PAPERS)
def test_notebook_smoke_runs_and_reruns_identically(slug, tmp_path):
    kw = dict(reports_root=tmp_path / "reports", build_root=tmp_path / "build")
    first = run_stage(slug, "smoke", results_root=tmp_path / "r1", **kw)
    metrics = json.loads((first / "metrics.json").read_text())
    entry = read_params()["papers"][slug]
    assert set(metrics["claims"]) | set(metrics["accounting"]) == set(entry["claims"])
    assert set(metrics["gates"]) == set(entry["gates"])
    assert all(c["verdict"] in VERDICTS for c in metrics["claims"].values())
    assert list((first / "figures").glob("*.png")), "each paper saves at least one figure"
    assert (tmp_path / "reports" / f"{slug}.html").stat().st_size > 10_000
    timings = json.loads((first / "timings.json").read_text())
    assert timings["stage"]["wall_s"] > 0 and timings["stage"]["peak_rss_mb"] > 0
    html = (tmp_path / "reports" / f"{slug}.html").read_text()
    assert "Registry entry: claims, gates and deviations" in html and "Verdicts" in html, \
        "the report shows the registry card (show_card) and the verdicts (show_verdicts)"
    if RERUN_ALL or RERUN_SENTINELS[FAMILIES[slug]] == slug:
        second = run_stage(slug, "smoke", results_root=tmp_path / "r2", render=False, **kw)
        for name in ("metrics.json", "details.json"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), \
                f"rerunning a stage with the same parameters must give a byte-identical {name}"


def test_every_family_has_one_rerun_sentinel():
    assert set(RERUN_SENTINELS) == set(FAMILIES.values()), "name one rerun sentinel per family, no stale family"
    assert all(FAMILIES.get(slug) == fam for fam, slug in RERUN_SENTINELS.items()), "a sentinel is a paper of its family"


def test_strip_machine_paths_makes_reports_repository_relative(tmp_path):
    from reprolab.paths import REPO_ROOT
    from reprolab.stage import strip_machine_paths

    page = tmp_path / "r.html"
    page.write_text(f"weights at {REPO_ROOT}/models/minilm-l6 not used; cwd {REPO_ROOT}; https://x.org/a/b\n")
    strip_machine_paths(page)
    assert page.read_text() == "weights at models/minilm-l6 not used; cwd .; https://x.org/a/b\n"
