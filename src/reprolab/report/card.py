"""What a paper's notebook shows about its registry entry: claims and criteria, gates, deviations, then verdicts.

``show_card(paper, cfg)`` goes right after the parameters cell (the criteria are fixed before the run);
``show_verdicts(verdicts, res)`` goes last (verdicts, gates, accounting checks, benchmarks). The rendered report
(``reports/<slug>.html``) is the executed notebook, so these tables are in it too.
"""
from __future__ import annotations

import html

from ..claims import criterion
from ..registry import paper_entry

STAT_WORDS = {"difference": "method - baseline (paired by seed)", "ratio": "method / baseline (paired by seed)",
              "value": "method's value per seed"}


def _threshold(spec: dict, cfg: dict) -> str:
    th = spec["threshold"]
    if isinstance(th, str):
        return f"{cfg.get(th, '?')} (<code>{html.escape(th)}</code>)"
    return f"{th}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th style='text-align:left'>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td style='text-align:left;vertical-align:top'>{c}</td>" for c in r) + "</tr>"
            for r in rows]
    return "\n".join(out) + "</tbody></table>"


def card_html(paper: str, cfg: dict) -> str:
    e = paper_entry(paper)
    esc = html.escape
    parts = [f"<h3>Registry entry: claims, gates and deviations</h3><p>From <code>{esc(e['file'])}</code>; "
             f"thresholds from <code>params.yaml</code> ({esc(cfg.get('profile', ''))} profile), fixed before the run. "
             "Verdicts: <b>held</b> (the whole 95% interval on the pass side), <b>not reproduced</b> (wholly on the "
             "fail side), <b>inconclusive</b> (it straddles the threshold, or a required gate is uncertain), "
             "<b>not testable here</b> (a required gate failed). Accounting checks are deterministic and not counted as claims.</p>"]
    emp = [(c, s) for c, s in e["claims"].items() if s["kind"] == "empirical"]
    acc = [(c, s) for c, s in e["claims"].items() if s["kind"] == "accounting"]
    if emp:
        parts.append("<h4>Empirical claims</h4>" + _table(
            ["claim", "statistic", "pass if", "needs gates", "claim in words", "baseline", "the paper says"],
            [[f"<b>{esc(c)}</b>", STAT_WORDS[s["statistic"]], f"{esc(s['op'])} {_threshold(s, cfg)}",
              esc(", ".join(s.get("requires", [])) or "-"), esc(s["text"]), esc(s["baseline"]), esc(s["paper"])]
             for c, s in emp]))
    if e["gates"]:
        parts.append("<h4>Gates (preconditions measured in the same run)</h4>" + _table(
            ["gate", "statistic", "passes if", "what it checks"],
            [[f"<b>{esc(g)}</b>", STAT_WORDS[s["statistic"]], f"{esc(s['op'])} {_threshold(s, cfg)}", esc(s["text"])]
             for g, s in e["gates"].items()]))
    if acc:
        parts.append("<h4>Accounting checks (deterministic; not claims)</h4>" + _table(
            ["check", "passes if", "what it counts"],
            [[f"<b>{esc(c)}</b>", f"{esc(s['op'])} {_threshold(s, cfg)}", esc(s["text"])] for c, s in acc]))
    parts.append("<h4>Deviations from the official implementation</h4>")
    if e["deviations"]:
        parts.append(_table(["what", "official (where)", "ours", "why"],
                            [[esc(d["what"]), esc(d["official"]), esc(d["ours"]), esc(d["why"])]
                             for d in e["deviations"]]))
    else:
        parts.append("<p>None recorded.</p>")
    return "\n".join(parts)


def show_card(paper: str, cfg: dict) -> None:
    from IPython.display import HTML, display

    display(HTML(card_html(paper, cfg)))


def verdicts_html(verdicts, res=None) -> str:
    esc = html.escape
    done = verdicts.finalize()
    colour = {"held": "#d9f2d9", "not reproduced": "#f8d7d7", "inconclusive": "#fff1c2", "not testable here": "#e4e4e4",
              "passed": "#d9f2d9", "failed": "#f8d7d7", "uncertain": "#fff1c2"}

    def ci(r):
        return "one seed" if r.get("ci95") is None else f"[{r['ci95'][0]:.4g}, {r['ci95'][1]:.4g}]"

    def crit(r):
        _, op, th = criterion(r)
        return f"{esc(op)} {th:.4g}"

    def cell(v):
        return f"<span style='background:{colour.get(v, '#fff')};padding:0 .4em'><b>{esc(v)}</b></span>"

    parts = ["<h3>Verdicts</h3>"]
    if done["gates"]:
        parts.append("<h4>Gates</h4>" + _table(
            ["gate", "estimate", "95% CI", "criterion", "seeds", "per seed", "result"],
            [[esc(g), f"{r['estimate']:.4g}", ci(r), crit(r), str(len(r["per_seed"])),
              esc(", ".join(f"{x:.4g}" for x in r["per_seed"])), cell(r["status"])]
             for g, r in done["gates"].items()]))
    if done["claims"]:
        parts.append("<h4>Claims</h4>" + _table(
            ["claim", "statistic", "estimate", "95% CI", "criterion", "seeds", "per seed", "verdict"],
            [[esc(c), esc(criterion(r)[0]), f"{r['estimate']:.4g}", ci(r), crit(r),
              str(len(r["per_seed"])), esc(", ".join(f"{x:.4g}" for x in r["per_seed"])),
              cell(r["verdict"]) + (f"<br><small>failed gate(s): {esc(', '.join(r['failed_gates']))}</small>"
                                    if r["failed_gates"] else "")
              + (f"<br><small>uncertain gate(s): {esc(', '.join(r['uncertain_gates']))}</small>"
                 if r.get("uncertain_gates") else "")]
             for c, r in done["claims"].items()]))
    if done["accounting"]:
        parts.append("<h4>Accounting checks</h4>" + _table(
            ["check", "value", "criterion", "result"],
            [[esc(c), f"{r['value']:.4g}", crit(r),
              cell("passed" if r["passed"] else "failed")] for c, r in done["accounting"].items()]))
    bench = getattr(res, "_benchmarks", {}) if res is not None else {}
    if bench:
        parts.append("<h4>Benchmarks (wall clock on this machine; kept apart from metrics)</h4>" + _table(
            ["benchmark", "measured here", "what it measures", "comparable to the paper?", "the paper"],
            [[esc(k), f"{b['measured']:.4g}{esc(b['unit'])}", esc(b["what"]), "yes" if b["comparable"] else "no",
              esc(b["paper"] + (f" ({b['paper_setting']})" if b.get("paper_setting") else ""))]
             for k, b in bench.items()]))
    return "\n".join(parts)


def show_verdicts(verdicts, res=None) -> None:
    from IPython.display import HTML, display

    display(HTML(verdicts_html(verdicts, res)))
