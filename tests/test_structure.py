"""Every registered paper has a notebook, a params section and tests, and the reverse; notebooks are clean."""
import json
import re

import nbformat
import pytest
import yaml

from reprolab.config import read_params
from reprolab.paths import NOTEBOOKS_DIR, REPO_ROOT

PARAMS = read_params()
PAPERS = list(PARAMS["papers"])
NOTEBOOKS = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))


def test_top_level_shape():
    for name in ("notebooks", "src", "data.dvc", "dvc.yaml", "params.yaml", "environment.yml", "tests", "README.md",
                 "pyproject.toml", ".ci/run"):
        assert (REPO_ROOT / name).exists(), name
    assert [p.name for p in (REPO_ROOT / "src").iterdir() if p.is_dir() and not p.name.endswith(".egg-info")] == ["reprolab"]


def test_registry_and_notebooks_match():
    assert sorted(PAPERS) == NOTEBOOKS, "each paper needs notebooks/<slug>.ipynb and each notebook a registry entry"
    for slug in PAPERS:
        assert slug in PARAMS, f"params.yaml has no '{slug}:' section"
        assert list((REPO_ROOT / "tests").glob(f"test_{slug}*.py")), f"no tests/test_{slug}*.py"


def test_dvc_pipeline_runs_every_paper():
    from reprolab.pipeline import render

    text = (REPO_ROOT / "dvc.yaml").read_text()
    assert text == render(PARAMS), "dvc.yaml is out of date: run `python -m reprolab.pipeline`"
    stages = yaml.safe_load(text)["stages"]
    for slug in PAPERS:
        assert stages[slug]["cmd"] == f"${{python}} -m reprolab.stage {slug}"
        assert PARAMS["papers"][slug]["file"] in stages[slug]["deps"], "the registry file is a dependency"
        assert f"notebooks/{slug}.ipynb" in stages[slug]["deps"]
        assert {"profile", slug} <= set(stages[slug]["params"])
        assert f"results/{slug}/metrics.json" in stages["index"]["deps"]


@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_notebook_is_clean_and_parameterized(slug):
    nb = nbformat.read(NOTEBOOKS_DIR / f"{slug}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill overwrites injected values otherwise)"
    src = tagged[0].source
    for name in ("paper: str", "profile: str", "out_dir: str"):
        assert name in src, f"parameters cell lacks `{name}`"
    assert f'"{slug}"' in src, "the default paper slug must be the notebook's own"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, "commit notebooks without outputs"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "load_params(paper, profile)" in code and "write_metrics(" in code and "savefig(" in code
    assert "Verdicts(paper, cfg)" in code, "claims are computed from per-seed values by reprolab.claims.Verdicts"
    assert "show_card(paper, cfg)" in code and "show_verdicts(" in code, "the notebook shows the card and verdicts"


@pytest.mark.parametrize("slug", PAPERS)
def test_registry_claims_are_complete(slug):
    entry = PARAMS["papers"][slug]
    assert entry["claims"], f"{slug}: at least one claim"
    for cid, c in entry["claims"].items():
        assert all(c.get(k) for k in ("text", "baseline", "paper")), f"{slug}.{cid}"
    assert "TODO" not in (REPO_ROOT / entry["file"]).read_text(), f"{entry['file']} still has TODOs"
    section = {k for k in PARAMS[slug] if k != "profiles"}
    assert section == set(entry["params"]), f"{slug}: the params schema must declare exactly the section's keys"


def test_committed_metrics_match_registry():
    for slug in PAPERS:
        path = REPO_ROOT / "results" / slug / "metrics.json"
        if path.exists():
            body = json.loads(path.read_text())
            if "gates" not in body:  # results from before the verdict machinery: the index shows the paper as not run
                continue
            entry = PARAMS["papers"][slug]
            assert set(body.get("claims", {})) | set(body.get("accounting", {})) == set(entry["claims"]), slug
            assert set(body.get("gates", {})) == set(entry["gates"]), slug


def test_committed_reports_have_no_machine_paths():
    """The injected out_dir is repository-relative and the stage strips the repository's absolute path from the
    rendered report (library warnings name the model folder or the venv), so no report shows the machine that ran it."""
    for slug in PAPERS:
        report = REPO_ROOT / "reports" / f"{slug}.html"
        metrics = REPO_ROOT / "results" / slug / "metrics.json"
        if report.exists() and metrics.exists() and "verdict" in metrics.read_text():
            text = report.read_text()
            assert "out_dir = &quot;/" not in text and 'out_dir = "/' not in text, slug
            assert str(REPO_ROOT) not in text, slug
            # and the path of whichever machine ran it (this test also runs in a fresh clone elsewhere)
            hits = set(re.findall(r"(?<![\w.:/-])/(?:[\w.+-]+/)+?(?:\.venv|models|build|results|notebooks)/", text))
            assert not hits, (slug, hits)


def _index_links():
    from html.parser import HTMLParser

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            ref = a.get("href") if tag == "a" else a.get("src") if tag == "img" else None
            if ref:
                self.refs.append(ref)

    p = Links()
    p.feed((REPO_ROOT / "reports" / "index.html").read_text())
    return p.refs


def test_committed_index_links_resolve():
    refs = [r for r in _index_links() if "://" not in r]
    assert "forest.svg" in refs and len(refs) >= len(PAPERS)
    for ref in refs:
        assert (REPO_ROOT / "reports" / ref).exists(), f"reports/index.html links to missing {ref}"


def test_index_renders_in_a_headless_browser(tmp_path):
    """Render the committed index in a real browser (Debian's chromium), as a user would open it."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    index = REPO_ROOT / "reports" / "index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "id=\"scoreboard\"" in dom.stdout and "id=\"papers\"" in dom.stdout
    for slug in PAPERS:
        assert f"{slug}.html" in dom.stdout, slug
    shot = tmp_path / "index.png"
    subprocess.run([browser, *flags, "--window-size=1400,1200", f"--screenshot={shot}", index.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000, "the screenshot of the index is (nearly) empty"
