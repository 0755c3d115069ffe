"""The self-contained HTML report of `lmforge data clean`: counts per step, kept/dropped, length histograms before and
after (inline PNG), language mix, PII counts per type and samples of duplicate clusters.

Owns presentation only: it reads a finished CleanReport and returns one HTML string with no external assets.
Must not compute statistics the JSON report lacks (except binning lengths into a histogram).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;margin:2rem auto;
max-width:1100px;color:#1f2328;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;
vertical-align:top}th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.tiles{display:flex;gap:1rem;flex-wrap:wrap}.tile{border:1px solid #d0d7de;border-radius:6px;padding:.7rem 1rem;
min-width:9rem}.tile b{display:block;font-size:1.6rem}.ok{color:#1a7f37}.bad{color:#cf222e}
.cluster{border:1px solid #d0d7de;border-radius:6px;margin:.6rem 0;padding:.4rem .8rem}
.cluster pre{white-space:pre-wrap;margin:.3rem 0;font-size:.85rem}.kept{border-left:4px solid #1a7f37;
padding-left:.5rem}.dropped{border-left:4px solid #cf222e;padding-left:.5rem;color:#57606a}
.bar{background:#0969da;height:.8rem;display:inline-block;vertical-align:middle}
"""


def render_clean_report(report) -> str:
    data = report.to_dict()
    e = html.escape
    balanced = data["records_in"] == data["kept"] + data["rejected"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lmforge data clean — "
             f"{e(data['output'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>lmforge data clean</h1><p><code>{e(data['input'])}</code> → <code>{e(data['output'])}</code>"
             f" in {data['seconds']} s ({data['num_proc']} process{'es' if data['num_proc'] > 1 else ''})</p>",
             "<div class='tiles'>",
             _tile("records in", data["records_in"]), _tile("kept", data["kept"], "ok"),
             _tile("rejected", data["rejected"], "bad" if data["rejected"] else ""),
             _tile("in = kept + rejected", "yes" if balanced else "NO", "ok" if balanced else "bad"), "</div>",
             f"<p>Every rejected record is in <code>{e(str(data['rejects']))}</code> with its line, step and reason."
             "</p>" if data["rejects"] else ""]
    parts.append("<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>in</th><th>out</th><th>rejected</th>"
                 "<th>changed</th><th>records/s</th><th>top reasons</th></tr>")
    if data["unreadable"]:
        parts.append(f"<tr><td>0</td><td>read</td><td class=n>{data['records_in']}</td><td class=n>"
                     f"{data['records_in'] - data['unreadable']}</td><td class=n>{data['unreadable']}</td><td></td>"
                     "<td></td><td>not a record in a shape we read</td></tr>")
    for index, step in enumerate(data["steps"], start=1):
        reasons = "<br>".join(f"{e(k)}: {v}" for k, v in list(step.get("reasons", {}).items())[:6])
        parts.append(f"<tr><td>{index}</td><td>{e(step['step'])}</td><td class=n>{step['in']}</td><td class=n>"
                     f"{step['out']}</td><td class=n>{step['rejected']}</td><td class=n>{step.get('changed', '')}</td>"
                     f"<td class=n>{step['records_per_second'] or ''}</td><td>{reasons}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Length in characters (all messages of a record)</h2>")
    parts.append(f"<img alt='length histogram' src='data:image/png;base64,{_histogram_png(report)}'>")
    parts.append(_table(["", "count", "mean", "p50", "p90", "p99", "max"],
                        [[name, *(stats.get(k, "") for k in ("count", "mean", "p50", "p90", "p99", "max"))]
                         for name, stats in data["chars"].items()]))
    languages = data["languages"]
    if languages.get("sampled"):
        parts.append(f"<h2>Language mix of kept records</h2>"
                     f"<p>{languages['sampled']} sampled of {languages['of']}.</p>")
        parts.append(_bars(languages["counts"]))
    for step in data["steps"]:
        if step["step"] == "pii":
            parts.append("<h2>Personal information masked</h2>")
            parts.append(_bars(step["masked"]) if step["masked"] else "<p>None found.</p>")
    for step in data["steps"]:
        if step["step"].startswith("dedup") and step["sample_clusters"]:
            parts.append(f"<h2>Duplicate clusters — {e(step['step'])} (samples)</h2>")
            for cluster in step["sample_clusters"]:
                parts.append("<div class='cluster'>" + "".join(
                    f"<div class='{'kept' if m['kept'] else 'dropped'}'><small>{'kept' if m['kept'] else 'dropped'}"
                    f" · {e(m['line'])}</small><pre>{e(m['text'])}</pre></div>" for m in cluster) + "</div>")
    parts.append("<h2>Recipe</h2><pre>" + e("\n".join(map(str, data["recipe"]))) + "</pre></body></html>\n")
    return "".join(parts)


def _tile(label: str, value, css: str = "") -> str:
    return f"<div class='tile'><b class='{css}'>{html.escape(str(value))}</b>{html.escape(label)}</div>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=n>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bars(counts: dict) -> str:
    total = max(sum(counts.values()), 1)
    top = max(counts.values(), default=1)
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td class=n>{v}</td><td class=n>{100 * v / total:.1f}%</td>"
                   f"<td><span class='bar' style='width:{max(1, round(240 * v / top))}px'></span></td></tr>"
                   for k, v in counts.items())
    return f"<table>{rows}</table>"


def _histogram_png(report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    before = np.frombuffer(report.chars_before, dtype=np.uint32) if report.chars_before else np.zeros(0, np.uint32)
    after = np.frombuffer(report.chars_after, dtype=np.uint32) if report.chars_after else np.zeros(0, np.uint32)
    low = max(int(before.min()) if len(before) else 1, 1)
    top = max(int(before.max()) if len(before) else 1, low + 1)
    bins = np.unique(np.geomspace(low, top + 1, 40).round())
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    ax.hist(np.maximum(before, 1), bins=bins, alpha=0.55, label=f"before ({len(before)})", color="#8c959f")
    ax.hist(np.maximum(after, 1), bins=bins, alpha=0.75, label=f"after ({len(after)})", color="#0969da")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("characters per record (log scale)")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
