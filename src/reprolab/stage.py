"""Run one paper's stage: validate, execute its notebook with papermill, render the report, publish results.

``python -m reprolab.stage <slug> [--profile P]`` is what each paper's stage ``<slug>`` of dvc.yaml runs:

1. validate params.yaml (the paper's section under the profile, and the registry) before any expensive work;
2. execute ``notebooks/<slug>.ipynb`` into ``build/<slug>/`` (never over the source notebook) with papermill,
   the notebook writing into a staging folder;
3. on success: render ``reports/<slug>.html`` with nbconvert, check that metrics.json has exactly the registry's claims,
   gates and accounting checks, each with a verdict,
   add the stage's wall time and peak memory to ``timings.json`` (kept apart from metrics) and move the staging folder
   to ``results/<slug>/``;
4. on failure: print the failing cell, remove ``results/<slug>/`` (no stale metrics survive a failed run; DVC keeps the
   previous outputs in its cache), keep the partial executed notebook in ``build/<slug>/`` for debugging, exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import ParamError, load_params, read_params, registry_entry
from .paths import BUILD_DIR, NOTEBOOKS_DIR, REPO_ROOT, REPORTS_DIR, RESULTS_DIR
from .results import write_json


class StageError(RuntimeError):
    pass


def _rel(path: Path) -> str:
    """Repository-relative where possible: injected values are shown in the rendered report."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _child_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # Linux: KiB


def check_claims(slug: str, metrics_path: Path, params: dict, profile: str | None = None) -> dict:
    """metrics.json must hold exactly the registry's claims (empirical, with a verdict), accounting checks and gates,
    with at least ``MIN_SEEDS[profile]`` per-seed values for each empirical claim and gate."""
    from .claims import MIN_SEEDS, VERDICTS

    if not metrics_path.exists():
        raise StageError(f"{slug}: the notebook finished without writing {metrics_path.name}")
    metrics = json.loads(metrics_path.read_text())
    entry = registry_entry(slug, params)
    want = {"claims": {c for c, s in entry["claims"].items() if s["kind"] == "empirical"},
            "accounting": {c for c, s in entry["claims"].items() if s["kind"] == "accounting"},
            "gates": set(entry["gates"])}
    for table, expected in want.items():
        got = set(metrics.get(table, {}))
        if got != expected:
            raise StageError(f"{slug}: metrics.json {table} {sorted(got)} differ from the registry's {sorted(expected)} "
                             f"({entry['file']})")
    for cid, c in metrics["claims"].items():
        if c.get("verdict") not in VERDICTS:
            raise StageError(f"{slug}: claim {cid} has verdict {c.get('verdict')!r}; allowed: {', '.join(VERDICTS)}")
    if profile is not None:
        need = MIN_SEEDS[profile]
        for table in ("claims", "gates"):
            for cid, c in metrics[table].items():
                if len(c["per_seed"]) < need:
                    raise StageError(f"{slug}: {table[:-1]} {cid} has {len(c['per_seed'])} per-seed value(s); the "
                                     f"{profile} profile needs at least {need} for every empirical claim and gate")
    return metrics


def strip_machine_paths(path: Path) -> None:
    """Make a rendered report repository-relative: library warnings print absolute paths (the model folder, the venv)."""
    text = path.read_text(encoding="utf-8")
    clean = text.replace(str(REPO_ROOT) + os.sep, "").replace(str(REPO_ROOT), ".")
    if clean != text:
        path.write_text(clean, encoding="utf-8")


def run_stage(slug: str, profile: str | None = None, results_root: Path = RESULTS_DIR,
              reports_root: Path = REPORTS_DIR, build_root: Path = BUILD_DIR, render: bool = True,
              params_file: Path | None = None, notebooks_root: Path = NOTEBOOKS_DIR,
              registry_dir: Path | None = None) -> Path:
    """Run the stage of ``slug``; the keyword roots let tests run it in a scratch folder."""
    params = read_params(params_file, registry_dir)
    cfg = load_params(slug, profile, params)  # raises ParamError before any work
    profile = cfg["profile"]
    notebook = notebooks_root / f"{slug}.ipynb"
    if not notebook.exists():
        raise StageError(f"{notebook} does not exist (every registered paper needs a notebook)")
    if not reports_root.is_absolute() or not results_root.is_absolute():
        raise StageError("results_root and reports_root must be absolute paths")

    build = build_root / slug
    staging = build / "staging"
    shutil.rmtree(build, ignore_errors=True)
    staging.mkdir(parents=True)
    final = results_root / slug
    executed = build / f"{slug}.ipynb"

    env = dict(os.environ, DGLBACKEND="pytorch", PYTHONHASHSEED="0", TQDM_MININTERVAL="5", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(executed), "--kernel", "python3", "--log-output",
           "--cwd", str(REPO_ROOT), "-p", "paper", slug, "-p", "profile", profile, "-p", "out_dir", _rel(staging)]
    print(f"[{slug}] executing {notebook.name} (profile={profile})", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        shutil.rmtree(final, ignore_errors=True)
        raise StageError(f"{slug}: the notebook failed (see the failing cell above); the partially executed "
                         f"notebook is {executed}; {final} was removed")

    metrics = check_claims(slug, staging / "metrics.json", params, profile)
    if render:
        reports_root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--output-dir",
                        str(reports_root), "--output", slug, str(executed)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        strip_machine_paths(reports_root / f"{slug}.html")
    timings_path = staging / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {"notebook": {}, "benchmarks": {}}
    timings["stage"] = {"profile": profile, "wall_s": round(wall, 1), "peak_rss_mb": round(_child_peak_rss_mb(), 1)}
    write_json(timings_path, timings)

    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(final))
    from collections import Counter

    counts = Counter(c["verdict"] for c in metrics["claims"].values())
    acc = metrics.get("accounting", {})
    print(f"[{slug}] done in {wall:.0f} s, peak {timings['stage']['peak_rss_mb']:.0f} MB; claims: "
          + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
          + (f"; accounting checks passed {sum(a['passed'] for a in acc.values())}/{len(acc)}" if acc else ""),
          flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paper", help="slug of a registered paper (src/reprolab/<family>/<slug>.paper.yaml)")
    ap.add_argument("--profile", default=None, help="smoke | quick | full (default: params.yaml's profile)")
    args = ap.parse_args(argv)
    try:
        run_stage(args.paper, args.profile)
    except (ParamError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
