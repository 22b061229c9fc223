"""dvc.yaml generation: each paper's static import closure covers every reprolab module its notebook really imports."""
import ast
import json
import multiprocessing as mp
import os
import sys

import pytest

from reprolab.config import read_params
from reprolab.paths import NOTEBOOKS_DIR, REPO_ROOT
from reprolab.pipeline import code_closure, paper_deps

PARAMS = read_params()
PAPERS = list(PARAMS["papers"])


def _import_lines(slug):
    """The import statements of the notebook's code cells (any nesting level), as source."""
    nb = json.loads((NOTEBOOKS_DIR / f"{slug}.ipynb").read_text())
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "\n".join(l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(ast.unparse(node))
    return out


def _child(lines, queue):
    before = set(sys.modules)
    for line in lines:
        exec(line, {})
    files = sorted({os.path.realpath(m.__file__) for name, m in list(sys.modules.items())
                    if name not in before and name.startswith("reprolab") and getattr(m, "__file__", None)})
    queue.put(files)


def test_static_closure_covers_runtime_imports():
    import importlib

    for heavy in ("torch", "dgl", "transformers", "opacus", "peft", "sklearn", "pandas", "matplotlib.pyplot", "scipy.sparse"):
        importlib.import_module(heavy)  # third-party imports once, before forking

    ctx = mp.get_context("fork")
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.startswith("reprolab")}
    try:
        _check_closures(ctx)
    finally:  # other tests hold references to these modules' classes: put them back
        sys.modules.update(saved)


def _check_closures(ctx):
    for slug in PAPERS:
        queue = ctx.Queue()
        p = ctx.Process(target=_child, args=(_import_lines(slug), queue))
        p.start()
        runtime = set(queue.get(timeout=300))
        p.join()
        static = {os.path.realpath(f) for f in code_closure(slug)[0]}
        assert runtime <= static, f"{slug}: imported at run time but not a dependency: {sorted(runtime - static)}"


@pytest.mark.parametrize("slug", PAPERS)
def test_deps_exist_and_name_the_notebook(slug):
    deps = paper_deps(slug, PARAMS)
    assert deps[0] == f"notebooks/{slug}.ipynb"
    for d in deps:
        assert (REPO_ROOT / d).exists() or d.startswith(("models/", "generated/")), d  # made by DVC stages


def test_stage_commands_work_without_an_activated_venv():
    """`.venv/bin/dvc repro <slug>` (the README's command) runs stage commands through a shell whose PATH need not
    contain the venv: every command's interpreter comes from params.yaml's `python`, which must import reprolab."""
    import subprocess

    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    python = PARAMS["python"]
    for name, st in stages.items():
        assert st["cmd"].startswith("${python} -m reprolab."), f"stage {name}: {st['cmd']}"
    cmd = stages["index"]["cmd"].replace("${python}", python).replace("-m reprolab.report.index",
                                                                        "-c 'import reprolab.stage, reprolab.report.index'")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}  # no venv on PATH, nothing activated
    out = subprocess.run(["sh", "-c", cmd], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_readme_commands_exist():
    """Every `.venv/bin/<tool>` and `make <target>` the README shows exists."""
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in set(re.findall(r"^make (\w[\w-]*)", readme, re.M)):
        assert re.search(rf"^{target}:", makefile, re.M), f"README shows `make {target}`, the Makefile lacks it"
    stages = yaml_stages()
    for slug in set(re.findall(r"dvc repro (\w+)", readme)):
        assert slug in stages, f"README shows `dvc repro {slug}`, which is not a stage"
    for mod in set(re.findall(r"python -m (reprolab[\w.]*)", readme)):
        assert (REPO_ROOT / "src" / (mod.replace(".", "/") + ".py")).exists() or \
            (REPO_ROOT / "src" / mod.replace(".", "/") / "__init__.py").exists(), mod


def yaml_stages():
    import yaml

    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
