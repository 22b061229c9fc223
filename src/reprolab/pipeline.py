"""Write ``dvc.yaml`` from the registry, with each paper's stage depending on exactly what it uses.

``python -m reprolab.pipeline`` regenerates ``dvc.yaml``; ``--check`` exits 1 if the committed file is out of date (the
tests run the check). A paper's stage ``<slug>`` depends on:

- its notebook and the Python files of ``src/reprolab`` it imports, transitively (a static walk over ``import`` statements
  of the notebook's code cells and of every module reached, parent packages' ``__init__.py`` included), so that changing
  one paper's module reruns that paper only;
- the data files and models it names: the registry's ``datasets``/``models``, every string value of its params section,
  and every string literal or loader name in its notebook and imported modules (other than the catalogue modules that
  define every name) that is the name of an offline dataset, text or model (conservative: a name that appears is a
  dependency);
- the params ``profile`` and its own section.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import yaml

from .config import read_params
from .data.sources import MODEL_SOURCES
from .paths import NOTEBOOKS_DIR, REPO_ROOT

SRC = REPO_ROOT / "src"
PKG = SRC / "reprolab"
CORE = ["src/reprolab/stage.py", "src/reprolab/config.py", "src/reprolab/results.py", "src/reprolab/paths.py",
        "src/reprolab/registry.py", "src/reprolab/claims.py"]
PY = "${python}"  # params.yaml: python (the interpreter of every stage; .venv/bin/python by default)

# offline names (catalogue entries, text names, model names) -> the files/folders they are read from
DATA_FILES = {
    "mnist5k": ["data/mnist5k"],
    "german_credit": ["data/german_credit"],
    "britannica": ["data/text/britannica.txt"],
    "hamlet": ["data/text/hamlet.txt"],
    "tempest": ["data/text/tempest.txt"],
    "macbeth": ["data/text/macbeth.txt"],
    "paradise_lost": ["data/text/paradise_lost.txt"],
    "areopagitica": ["data/text/areopagitica.txt"],
    "shakespeare": ["data/text/hamlet.txt", "data/text/tempest.txt", "data/text/macbeth.txt"],
    "milton": ["data/text/paradise_lost.txt", "data/text/areopagitica.txt"],
    "ml100k_kg": ["data/ml100k_kg"],
    "md_forcefield": ["generated/md-forcefield"],
    "ml100k": ["data/ml100k"],
    "adult": ["data/adult"],
    "kinships": ["data/kg/kinships"],
    "umls": ["data/kg/umls"],
    "nations": ["data/kg/nations"],
    "pbmc": ["data/pbmc"],
    "pycode": ["data/pycode"],
    "nas_bench_graph": ["data/nas_bench_graph"],
    "analog_nasbench": ["data/analog_nasbench"],
    "nas_groundtruth": ["generated/nas-groundtruth"],
    "asterisk_speech": ["data/speech/asterisk"],
}
MODEL_FILES = {
    "smollm2-135m": ["models/smollm2-135m"],
    "minilm-l6": ["models/minilm-l6"],
    "tiny-llama-256": ["models/tiny-llama-256"],
    "offsite-emulator": ["models/offsite-emulator"],
    "mobilenet-v2": ["models/mobilenet-v2"],
    "whisper-base": ["models/whisper-base"],
}
# modules that define the catalogues (every dataset/model name appears in them): their literals are not evidence of use
CATALOGUE_MODULES = {"src/reprolab/data/__init__.py", "src/reprolab/data/sources.py", "src/reprolab/data/materialize.py",
                     "src/reprolab/lm/__init__.py", "src/reprolab/lm/cache.py", "src/reprolab/graph/datasets.py",
                     "src/reprolab/graph/fairness_graphs.py",
                     "src/reprolab/config.py"}  # names the sections of upstream stages (nas_groundtruth), reads no data
# loader functions that read a fixed file whatever their arguments
LOADER_FILES = {"load_mnist5k": "mnist5k", "load_german_credit": "german_credit", "load_ml100k": "ml100k",
                "load_adult": "adult", "load_pbmc": "pbmc", "PYCODE_DIR": "pycode", "MOBILENET_V2_WEIGHTS": "mobilenet-v2",
                "german_credit_graph": "german_credit", "adult_graph": "adult", "ml100k_graph": "ml100k",
                "nbg_table": "nas_bench_graph", "nbg_raw": "nas_bench_graph", "nbg_architectures": "nas_bench_graph",
                "nb201_table": "analog_nasbench", "nb201_accuracy": "analog_nasbench", "analog_raw": "analog_nasbench",
                "load_groundtruth": "nas_groundtruth", "asterisk_clips": "asterisk_speech", "load_wave": "asterisk_speech",
                "shared_prompts": "asterisk_speech", "WhisperTeacher": "whisper-base"}


def _module_file(mod: str) -> Path | None:
    parts = mod.split(".")
    if parts[0] != "reprolab":
        return None
    base = SRC.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, current: str | None, is_pkg: bool) -> list[str]:
    """Absolute names of reprolab modules imported by a module (``current``; None for a notebook)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if current is None:
                    continue
                base = current.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
    return [m for m in out if m == "reprolab" or m.startswith("reprolab.")]


def _literals(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
    return names


def notebook_tree(slug: str, notebooks_root: Path = NOTEBOOKS_DIR) -> ast.AST:
    nb = json.loads((notebooks_root / f"{slug}.ipynb").read_text())
    code = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            code.append("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
    return ast.parse("\n\n".join(code))


def code_closure(slug: str, notebooks_root: Path = NOTEBOOKS_DIR) -> tuple[list[Path], set[str]]:
    """(the src files a notebook imports, transitively; the names and literals seen in the notebook and those files)."""
    tree = notebook_tree(slug, notebooks_root)
    seen: dict[Path, None] = {}
    literals = _literals(tree)
    todo = _imports(tree, None, False)
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = _module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen[path] = None
            sub = ast.parse(path.read_text())
            if str(path.relative_to(REPO_ROOT)) not in CATALOGUE_MODULES:
                literals |= _literals(sub)
            todo += _imports(sub, _module_name(path), path.name == "__init__.py")
    return sorted(seen), literals


def _strings(obj) -> set[str]:
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        return set().union(*(_strings(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(_strings(v) for v in obj)) if obj else set()
    return set()


def paper_deps(slug: str, params: dict, notebooks_root: Path = NOTEBOOKS_DIR) -> list[str]:
    files, literals = code_closure(slug, notebooks_root)
    entry = params["papers"][slug]
    names = set(entry.get("datasets") or []) | set(entry.get("models") or []) | _strings(params.get(slug, {})) | literals
    names |= {LOADER_FILES[n] for n in literals if n in LOADER_FILES}
    data = sorted({p for n in names if n in DATA_FILES for p in DATA_FILES[n]})
    models = sorted({p for n in names if n in MODEL_FILES for p in MODEL_FILES[n]})
    code = sorted(set(CORE) | {str(p.relative_to(REPO_ROOT)) for p in files})
    return [f"notebooks/{slug}.ipynb", entry["file"], *code, *data, *models]


HEADER = """\
# GENERATED by `python -m reprolab.pipeline` from the registry (src/reprolab/*/*.paper.yaml): edit that, not this file
# (the tests fail when this file is out of date).
# The pipeline: offline model cache -> one stage per paper (papermill notebook -> metrics, figures, HTML report) -> index.
# Each paper's stage depends on its notebook, the src files it imports, the data/models it names and its params section.
# Data is tracked by data.dvc (materialized by `make data`). Run everything: `make repro` (= dvc repro); one paper:
# `dvc repro <slug>`. Stages run with the interpreter `python` of params.yaml (.venv/bin/python, which `make` installs).
"""


def build(params: dict | None = None) -> dict:
    params = params or read_params()
    stages: dict = {
        "model_cache": {"cmd": f"{PY} -m reprolab.lm.cache",
                        "deps": ["src/reprolab/lm/cache.py", "src/reprolab/data/sources.py"],
                        "outs": [f"models/{m}" for m in MODEL_SOURCES]},
        "tiny_llama": {"cmd": f"{PY} -m reprolab.lm.tiny_llama",
                       "deps": ["src/reprolab/lm/tiny_llama.py", "data/text"],
                       "params": ["self_extend.pretrain"],
                       "outs": ["models/tiny-llama-256"]},
        "offsite_emulator": {"cmd": f"{PY} -m reprolab.lm.offsite_emulator",
                             "deps": ["src/reprolab/lm/offsite_emulator.py", "src/reprolab/lm/offsite.py",
                                      "src/reprolab/lm/__init__.py", "models/smollm2-135m", "data/text"],
                             # the stage reads the section merged with the quick profile: the profiles are a param too
                             "params": [f"offsite_tuning.{k}" for k in ("emulator", "model", "distill_text", "l_pad",
                                                                        "r_pad", "n_student", "lm_weight", "kd_weight",
                                                                        "seed", "profiles")],
                             "outs": ["models/offsite-emulator"]},
        "md_forcefield": {"cmd": f"{PY} -m reprolab.equivariant.md_data",
                          "deps": ["src/reprolab/equivariant/md_data.py"],
                          "params": ["ponita.md"],
                          "outs": ["generated/md-forcefield"]},
        # NB-201 cells trained standalone on real digits (the NAS papers' ground truth); reads profile + its section
        "nas_groundtruth": {"cmd": f"{PY} -m reprolab.nas.groundtruth",
                            "deps": [f"src/reprolab/nas/{m}.py" for m in ("__init__", "groundtruth", "space201",
                                                                          "benchmarks", "rank")]
                            + ["src/reprolab/config.py", "src/reprolab/paths.py", "src/reprolab/data/images.py",
                               "src/reprolab/data/__init__.py", "data/analog_nasbench",
                               "data/mnist5k"],
                            "params": ["profile", "nas_groundtruth"],
                            "outs": ["generated/nas-groundtruth"]},
    }
    for slug in params["papers"]:
        stages[slug] = {
            "cmd": f"{PY} -m reprolab.stage {slug}",
            "deps": paper_deps(slug, params),
            "params": ["profile", slug],
            "outs": [{f"results/{slug}/details.json": {"cache": False}}, {f"results/{slug}/timings.json": {"cache": False}},
                     {f"reports/{slug}.html": {"cache": False}}],
            "metrics": [{f"results/{slug}/metrics.json": {"cache": False}}],
            "plots": [{f"results/{slug}/figures": {"cache": False}}],
        }
    stages["index"] = {
        "cmd": f"{PY} -m reprolab.report.index",
        "deps": [f"results/{slug}/metrics.json" for slug in params["papers"]]
        + [f"results/{slug}/timings.json" for slug in params["papers"]]
        + [params["papers"][slug]["file"] for slug in params["papers"]]
        + ["src/reprolab/report", "src/reprolab/config.py", "src/reprolab/registry.py", "src/reprolab/claims.py"],
        "outs": [{"reports/index.html": {"cache": False}}, {"reports/index.md": {"cache": False}},
                 {"reports/forest.svg": {"cache": False}}],
    }
    return {"stages": stages}


def render(params: dict | None = None) -> str:
    return HEADER + yaml.safe_dump(build(params), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not what the registry generates")
    args = ap.parse_args(argv)
    text = render()
    path = REPO_ROOT / "dvc.yaml"
    if args.check:
        if path.read_text() != text:
            print("dvc.yaml is out of date: run `python -m reprolab.pipeline`", file=sys.stderr)
            return 1
        print("dvc.yaml is up to date")
        return 0
    path.write_text(text)
    print(f"wrote {path} ({len(build()['stages'])} stages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
