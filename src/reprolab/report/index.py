"""Build ``reports/index.html`` and ``reports/index.md``: one row per claim of every registered paper.

Reads the registry in params.yaml (claim text, baseline, the paper's own number) and, per paper,
``results/<slug>/metrics.json`` (measured, baseline, threshold, holds) and ``timings.json`` (stage wall time, peak
memory, benchmark ratios). A paper without results shows as "not run".
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..config import read_params
from ..paths import REPORTS_DIR, RESULTS_DIR


def _fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def collect(params: dict | None = None, results_root: Path = RESULTS_DIR) -> list[dict]:
    """One dict per paper: registry entry, claims with their measurements, timings."""
    params = read_params() if params is None else params
    rows = []
    for slug, entry in params["papers"].items():
        mpath, tpath = results_root / slug / "metrics.json", results_root / slug / "timings.json"
        metrics = json.loads(mpath.read_text()) if mpath.exists() else None
        timings = json.loads(tpath.read_text()) if tpath.exists() else {}
        claims = []
        for cid, spec in (entry.get("claims") or {}).items():
            m = (metrics or {}).get("claims", {}).get(cid)
            if m is None:
                verdict = "not run"
            else:
                verdict = "held" if m["holds"] else "not reproduced"
            claims.append({"id": cid, **spec, "result": m, "verdict": verdict})
        rows.append({"slug": slug, "title": entry["title"], "arxiv": entry["arxiv"], "family": entry["family"],
                     "claims": claims, "stage": timings.get("stage", {}), "benchmarks": timings.get("benchmarks", {})})
    return rows


def _measured(c: dict) -> tuple[str, str, str]:
    r = c["result"]
    if r is None:
        return "", "", ""
    return _fmt(r["measured"]), _fmt(r["baseline"]), f"{r.get('op', '')} {_fmt(r['threshold'])}".strip()


def to_markdown(rows: list[dict]) -> str:
    out = ["# Reproduction index", "",
           "One row per claim. *measured* is our number for the paper's method, *baseline value* the same quantity for "
           "the baseline arm, *criterion* the pass threshold fixed in params.yaml before the run.", "",
           "| paper | claim | baseline | measured | baseline value | criterion | verdict | paper says | runtime | peak mem |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        st = p["stage"]
        rt = f"{st['wall_s']:.0f} s ({st['profile']})" if st else ""
        mem = f"{st['peak_rss_mb']:.0f} MB" if st else ""
        for c in p["claims"]:
            meas, base, crit = _measured(c)
            verdict = {"held": "held", "not reproduced": "**not reproduced**", "not run": "not run"}[c["verdict"]]
            out.append(f"| [{p['slug']}]({p['slug']}.html) | {c['text']} | {c['baseline']} | {meas} | {base} | {crit} "
                       f"| {verdict} | {c['paper']} | {rt} | {mem} |")
    bench = [(p["slug"], k, b) for p in rows for k, b in p["benchmarks"].items()]
    if bench:
        out += ["", "## Wall-clock benchmarks (this machine; kept apart from metrics)", "",
                "| paper | benchmark | measured | paper says |", "|---|---|---|---|"]
        out += [f"| {s} | {k} | {_fmt(b['measured'])}{b.get('unit', '')} | {b['paper']} |" for s, k, b in bench]
    return "\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ccc;padding:.35em .5em;vertical-align:top;font-size:.92em}th{background:#f3f3f3}
.held{background:#e3f6e3}.notrep{background:#fbe3e3;font-weight:600}.notrun{background:#eee;color:#777}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"""


def to_html(rows: list[dict]) -> str:
    e = html.escape
    n_claims = sum(len(p["claims"]) for p in rows)
    n_held = sum(c["verdict"] == "held" for p in rows for c in p["claims"])
    n_run = sum(c["verdict"] != "not run" for p in rows for c in p["claims"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Reproduction index</title><style>{CSS}</style>"
             "</head><body><h1>Reproduction index</h1>",
             f"<p>{len(rows)} papers, {n_claims} claims: {n_held} held, {n_run - n_held} not reproduced, "
             f"{n_claims - n_run} not run. <i>measured</i> is our number for the paper's method, <i>baseline value</i> the "
             "same quantity for the baseline arm, <i>criterion</i> the pass threshold fixed in params.yaml before the run."
             "</p><table><tr><th>paper</th><th>claim</th><th>baseline</th><th>measured</th><th>baseline value</th>"
             "<th>criterion</th><th>verdict</th><th>paper says</th><th>runtime</th><th>peak mem</th></tr>"]
    for p in rows:
        st = p["stage"]
        for i, c in enumerate(p["claims"]):
            meas, base, crit = _measured(c)
            cls = {"held": "held", "not reproduced": "notrep", "not run": "notrun"}[c["verdict"]]
            head = ""
            if i == 0:
                span = len(p["claims"])
                head = (f"<td rowspan='{span}'><a href='{e(p['slug'])}.html'>{e(p['slug'])}</a><br><small>{e(p['title'])}"
                        f"<br>arXiv <a href='https://arxiv.org/abs/{e(str(p['arxiv']))}'>{e(str(p['arxiv']))}</a></small></td>")
            tail = ""
            if i == 0:
                rt = f"{st['wall_s']:.0f} s<br><small>{e(st['profile'])}</small>" if st else ""
                mem = f"{st['peak_rss_mb']:.0f} MB" if st else ""
                tail = f"<td rowspan='{len(p['claims'])}' class='num'>{rt}</td><td rowspan='{len(p['claims'])}' class='num'>{mem}</td>"
            parts.append(f"<tr>{head}<td>{e(c['text'])}</td><td>{e(c['baseline'])}</td><td class='num'>{e(meas)}</td>"
                         f"<td class='num'>{e(base)}</td><td class='num'>{e(crit)}</td><td class='{cls}'>{e(c['verdict'])}</td>"
                         f"<td>{e(c['paper'])}</td>{tail}</tr>")
    parts.append("</table>")
    bench = [(p["slug"], k, b) for p in rows for k, b in p["benchmarks"].items()]
    if bench:
        parts.append("<h2>Wall-clock benchmarks</h2><p>Measured on the machine that ran the stage; kept apart from metrics "
                     "because timings vary between runs.</p><table><tr><th>paper</th><th>benchmark</th><th>measured</th>"
                     "<th>paper says</th></tr>")
        parts += [f"<tr><td>{e(s)}</td><td>{e(k)}</td><td class='num'>{_fmt(b['measured'])}{e(b.get('unit', ''))}</td>"
                  f"<td>{e(b['paper'])}</td></tr>" for s, k, b in bench]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build(reports_root: Path = REPORTS_DIR, results_root: Path = RESULTS_DIR) -> tuple[Path, Path]:
    rows = collect(results_root=results_root)
    reports_root.mkdir(parents=True, exist_ok=True)
    md, ht = reports_root / "index.md", reports_root / "index.html"
    md.write_text(to_markdown(rows))
    ht.write_text(to_html(rows))
    return ht, md


def main() -> int:
    ht, md = build()
    print(f"wrote {ht} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
