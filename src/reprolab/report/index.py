"""Build ``reports/index.html``, ``reports/index.md`` and ``reports/forest.svg``: the state of every paper at a glance.

- a scoreboard (papers; empirical claims by verdict; accounting checks passed; gates passed);
- one row per paper: family, a short headline per claim coloured by verdict, verdict counts, runtime, link to its report;
- a forest plot of every empirical claim: the 95% interval of its margin to the threshold, normalised so that all
  claims share one axis (positive = pass side), coloured by verdict;
- wall-clock benchmarks, with the paper's number beside ours only where the benchmark is the paper's own quantity.

Full claim texts, gates and deviations are in each paper's report (``reports/<slug>.html``), not here. Reads the
registry (``reprolab.registry``), ``results/<slug>/metrics.json`` and ``timings.json``. A paper whose metrics.json
predates the verdict machinery (claims without a verdict) or is missing shows as "not run".
"""
from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path

from ..claims import HELD, INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, VERDICTS
from ..config import read_params
from ..paths import REPORTS_DIR, RESULTS_DIR

NOT_RUN = "not run"
ORDER = (HELD, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE, NOT_RUN)
COLOURS = {HELD: "#2e9e4f", NOT_REPRODUCED: "#d1352b", INCONCLUSIVE: "#e0a100", NOT_TESTABLE: "#8c8c8c",
           NOT_RUN: "#c8c8c8"}
BACKGROUNDS = {HELD: "#cdeed6", NOT_REPRODUCED: "#f7cdca", INCONCLUSIVE: "#ffe9a8", NOT_TESTABLE: "#dadada",
               NOT_RUN: "#ffffff"}


def _fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def collect(params: dict | None = None, results_root: Path = RESULTS_DIR) -> list[dict]:
    """One dict per paper: registry entry, its claims with results and verdicts, gates, accounting, timings."""
    params = read_params() if params is None else params
    rows = []
    for slug, entry in params["papers"].items():
        mpath, tpath = results_root / slug / "metrics.json", results_root / slug / "timings.json"
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        current = all(c.get("verdict") in VERDICTS for c in metrics.get("claims", {}).values()) and bool(metrics)
        if not current:
            metrics = {}
        timings = json.loads(tpath.read_text()) if tpath.exists() and current else {}
        claims, accounting = [], []
        for cid, spec in entry["claims"].items():
            if spec["kind"] == "accounting":
                r = metrics.get("accounting", {}).get(cid)
                accounting.append({"id": cid, **spec, "result": r,
                                   "status": NOT_RUN if r is None else ("passed" if r["passed"] else "failed")})
            else:
                r = metrics.get("claims", {}).get(cid)
                claims.append({"id": cid, **spec, "result": r, "verdict": NOT_RUN if r is None else r["verdict"]})
        required = {g for c in entry["claims"].values() for g in c.get("requires", [])}
        gates = {g: r for g, r in metrics.get("gates", {}).items() if g in required}  # diagnostics are not counted
        rows.append({"slug": slug, "title": entry["title"], "arxiv": entry["arxiv"], "family": entry["family"],
                     "claims": claims, "accounting": accounting, "gates": gates, "current": current,
                     "stage": timings.get("stage", {}), "benchmarks": timings.get("benchmarks", {})})
    return rows


def scoreboard(rows: list[dict]) -> dict:
    verdicts = Counter(c["verdict"] for p in rows for c in p["claims"])
    acc = [a for p in rows for a in p["accounting"]]
    gates = [g for p in rows for g in p["gates"].values()]
    return {"papers": len(rows), "papers_run": sum(p["current"] for p in rows),
            "claims": sum(verdicts.values()), **{v: verdicts.get(v, 0) for v in ORDER},
            "accounting": len(acc), "accounting_passed": sum(a["status"] == "passed" for a in acc),
            "gates": len(gates), "gates_passed": sum(g["passed"] for g in gates)}


def _headline(c: dict) -> str:
    return c.get("headline") or c["id"].replace("_", " ")


def _acc_md(p: dict) -> str:
    acc = p["accounting"]
    if not acc or not p["current"]:
        return "-"
    failed = [a["id"] for a in acc if a["status"] == "failed"]
    return f"{len(acc) - len(failed)}/{len(acc)}" + (f" (failed: {', '.join(failed)})" if failed else "")


def _runtime(p: dict) -> str:
    st = p["stage"]
    return f"{st['wall_s']:.0f} s ({st['profile']})" if st else ""


def forest(rows: list[dict], path: Path) -> Path:
    """The forest plot of every empirical claim's normalised margin (SVG, deterministic bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(p["slug"], c) for p in rows for c in p["claims"] if c["result"] is not None]
    plt.rcParams["svg.hashsalt"] = "reprolab-index"
    if not items:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no empirical claim has been run yet", ha="center", va="center")
        fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
        return path
    fig, ax = plt.subplots(figsize=(11, 0.24 * len(items) + 2.2))
    labels = []
    for i, (slug, c) in enumerate(items):
        (est, lo, hi), v = c["result"]["margin"], c["verdict"]
        y = len(items) - 1 - i
        col = COLOURS[v]
        one_seed = c["result"]["ci95"] is None
        if not one_seed:
            ax.plot([lo, hi], [y, y], color=col, lw=2.2, solid_capstyle="butt")
        ax.plot(est, y, "o", color=col, mfc="white" if one_seed or v == NOT_TESTABLE else col, ms=5)
        labels.append(f"{slug}: {_headline(c)}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels[::-1], fontsize=7)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(-0.7, len(items) - 0.3)
    ax.set_xlabel("margin to the threshold (positive = pass side)\nratios: log(estimate / threshold); "
                  "others: (estimate - threshold) / |baseline|", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], color=COLOURS[v], marker="o", lw=2, label=v) for v in VERDICTS]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return path


def _bench_rows(rows: list[dict]) -> list[tuple[str, str, dict]]:
    return [(p["slug"], k, b) for p in rows for k, b in p["benchmarks"].items()]


def bench_kind(b: dict) -> str:
    """What a benchmark measures, from its description: "memory" (peak memory, RSS, bytes) or "time" (wall clock,
    throughput): the index lists them apart so that a memory ratio is not read as a speed-up."""
    return "memory" if re.search(r"memory|\bRSS\b|bytes", b.get("what", ""), re.I) else "time"


def to_markdown(rows: list[dict]) -> str:
    s = scoreboard(rows)
    out = ["# Reproduction index", "",
           f"**{s['papers']} papers** ({s['papers_run']} run under the current verdict machinery) · "
           f"**{s['claims']} empirical claims**: {s[HELD]} held, {s[NOT_REPRODUCED]} not reproduced, "
           f"{s[INCONCLUSIVE]} inconclusive, {s[NOT_TESTABLE]} not testable here, {s[NOT_RUN]} not run · "
           f"accounting checks passed {s['accounting_passed']}/{s['accounting']} · gates passed "
           f"{s['gates_passed']}/{s['gates']}", "",
           "*held*: the whole 95% interval of the claim's statistic (over seeds) is on the pass side of the threshold "
           "fixed before the run; *not reproduced*: wholly on the fail side; *inconclusive*: it straddles the "
           "threshold; *not testable here*: a precondition (gate) measured in the same run failed. Accounting checks "
           "(byte counts, identities) are not claims. Each paper's report has the claim texts, gates and deviations.",
           "", "![forest plot](forest.svg)", "",
           "| paper | family | claims (verdict) | held | not rep. | inconcl. | not testable | accounting checks passed "
           "| runtime |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        cnt = Counter(c["verdict"] for c in p["claims"])
        heads = "; ".join(f"{_headline(c)} (**{c['verdict']}**)" for c in p["claims"]) or "-"
        out.append(f"| [{p['slug']}]({p['slug']}.html) | {p['family']} | {heads} | {cnt.get(HELD, 0)} | "
                   f"{cnt.get(NOT_REPRODUCED, 0)} | {cnt.get(INCONCLUSIVE, 0)} | {cnt.get(NOT_TESTABLE, 0)} | "
                   f"{_acc_md(p)} | {_runtime(p) or 'not run'} |")
    bench = _bench_rows(rows)
    if bench:
        out += ["", "## Benchmarks: time and memory on this machine (kept apart from metrics)", "",
                "The paper's number is shown only where the benchmark measures the paper's own quantity. *time*: wall "
                "clock or throughput; *memory*: peak memory, resident set or bytes.", "",
                "| paper | benchmark | kind | measured here | what it measures | the paper |", "|---|---|---|---|---|---|"]
        out += [f"| {sl} | {k} | {bench_kind(b)} | {_fmt(b['measured'])}{b.get('unit', '')} | {b.get('what', '')} | "
                f"{b['paper'] if b.get('comparable') else 'not comparable'} |" for sl, k, b in bench]
    return "\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1400px}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d4d4d4;padding:.3em .5em;vertical-align:top;
font-size:.9em}th{background:#f3f3f3;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}.score{display:flex;gap:.8em;flex-wrap:wrap;margin:1em 0}.tile{border-radius:6px;padding:.5em 1em;
min-width:7em}.tile b{display:block;font-size:1.7em}.chip{display:inline-block;border-radius:4px;padding:0 .35em;
margin:.1em .15em;font-size:.88em;border:1px solid #bbb}td:nth-child(3){min-width:22em}small{color:#555}details{margin:1em 0}"""


def to_html(rows: list[dict], forest_file: str | None = "forest.svg") -> str:
    e = html.escape
    s = scoreboard(rows)
    tiles = [("papers", f"{s['papers']}", f"{s['papers_run']} run under the current machinery", "#eef2f8")]
    tiles += [(v, str(s[v]), "empirical claims", BACKGROUNDS[v]) for v in ORDER]
    tiles += [("accounting checks", f"{s['accounting_passed']}/{s['accounting']}", "passed (not claims)", "#eef2f8"),
              ("gates", f"{s['gates_passed']}/{s['gates']}", "preconditions passed", "#eef2f8")]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Reproduction index</title>"
             f"<style>{CSS}</style></head><body><h1>Reproduction index</h1>",
             "<div class='score' id='scoreboard'>"
             + "".join(f"<div class='tile' style='background:{bg}'><b>{e(n)}</b>{e(t)}<br><small>{e(sub)}</small>"
                       f"</div>" for t, n, sub, bg in tiles) + "</div>",
             "<p><b>held</b>: the whole 95% interval of the claim's statistic (over seeds) is on the pass side of the "
             "threshold fixed before the run; <b>not reproduced</b>: wholly on the fail side; <b>inconclusive</b>: it "
             "straddles the threshold (more seeds or budget would decide); <b>not testable here</b>: a precondition "
             "(gate) measured in the same run failed. Accounting checks (byte counts, identities) are shown in each "
             "paper's report and never counted as claims. Click a paper for its claims in full, gates, deviations "
             "from the official code and benchmarks.</p>",
             "<h2>Papers</h2><table id='papers'><tr><th>paper</th><th>family</th><th>claims</th><th>held</th>"
             "<th>not rep.</th><th>inconcl.</th><th>not testable</th><th>gates passed</th>"
             "<th>accounting checks passed</th><th>runtime</th></tr>"]
    for p in rows:
        cnt = Counter(c["verdict"] for c in p["claims"])
        chips = "".join(f"<span class='chip' style='background:{BACKGROUNDS[c['verdict']]}' "
                        f"title='{e(c['id'])}: {e(c['verdict'])}'>{e(_headline(c))}</span>" for c in p["claims"])
        g = p["gates"]
        gates = f"{sum(x['passed'] for x in g.values())}/{len(g)}" if g else ("-" if p["current"] else "")
        link = f"<a href='{e(p['slug'])}.html'>{e(p['slug'])}</a>"
        acc = p["accounting"]
        failed_acc = [a["id"] for a in acc if a["status"] == "failed"]
        acc_cell = (f"{sum(a['status'] == 'passed' for a in acc)}/{len(acc)}"
                    + (f"<br><small>failed: {e(', '.join(failed_acc))}</small>" if failed_acc else "")
                    if acc and p["current"] else ("-" if p["current"] else ""))
        parts.append(f"<tr><td>{link}<br><small>{e(p['title'])} (arXiv {e(p['arxiv'])})</small></td>"
                     f"<td>{e(p['family'])}</td><td>{chips}</td>"
                     + "".join(f"<td class='num'>{cnt.get(v, 0)}</td>" for v in ORDER[:4])
                     + f"<td class='num'>{gates}</td><td class='num'>{acc_cell}</td>"
                     f"<td class='num'>{e(_runtime(p)) or 'not run'}</td></tr>")
    parts.append("</table>")
    if forest_file:
        parts.append("<h2>Forest plot</h2><p>Each empirical claim's 95% interval of its margin to the pass threshold; "
                     "positive is the pass side. Ratio claims: log(estimate / threshold); the others: "
                     "(estimate - threshold) / |baseline| (the baseline's mean magnitude; |threshold| where a claim has no "
                     "baseline), i.e. a relative distance. Open circles: one seed or not testable. Symmetric-log axis.</p>"
                     f"<img src='{e(forest_file)}' alt='forest plot of every claim' style='max-width:100%'>")
    bench = _bench_rows(rows)
    if bench:
        parts.append("<details><summary><b>Benchmarks: time and memory</b> (this machine; kind <i>time</i> = wall clock "
                     "or throughput, <i>memory</i> = peak memory, resident set or bytes; the paper's number only where "
                     "comparable)</summary><table><tr><th>paper</th><th>benchmark</th><th>kind</th><th>measured here</th>"
                     "<th>what it measures</th><th>the paper</th></tr>")
        parts += [f"<tr><td>{e(sl)}</td><td>{e(k)}</td><td>{bench_kind(b)}</td><td class='num'>{_fmt(b['measured'])}{e(b.get('unit', ''))}"
                  f"</td><td>{e(b.get('what', ''))}</td><td>"
                  f"{e(b['paper'] + (' (' + b['paper_setting'] + ')' if b.get('paper_setting') else '')) if b.get('comparable') else '<small>not comparable</small>'}"
                  "</td></tr>" for sl, k, b in bench]
        parts.append("</table></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build(reports_root: Path = REPORTS_DIR, results_root: Path = RESULTS_DIR) -> tuple[Path, Path]:
    rows = collect(results_root=results_root)
    reports_root.mkdir(parents=True, exist_ok=True)
    md, ht = reports_root / "index.md", reports_root / "index.html"
    forest(rows, reports_root / "forest.svg")
    md.write_text(to_markdown(rows))
    ht.write_text(to_html(rows))
    return ht, md


def main() -> int:
    ht, md = build()
    print(f"wrote {ht}, {md} and the forest plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
