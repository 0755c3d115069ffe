"""report.html for `lmforge compare`: one self-contained page (inline CSS and a few lines of inline JS, no external
assets), every text escaped, fonts and line breaking that suit Chinese as well as English.

Input is the comparison dict compare.py writes to compare.json (and compare_kb.py's knowledge-base section, already
rendered); this module only renders it. Must not compute metrics or call models.
"""

from __future__ import annotations

from html import escape

from .scoring import LOWER_IS_BETTER

CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --card:#fff; --good:#1a7f37; --bad:#cf222e;
  --tie:#8c959f; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.65;
  font-family: system-ui, -apple-system, "Segoe UI", "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei",
  "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 26px; } h2 { margin: 32px 0 12px; font-size: 19px; }
.sub { color: var(--muted); margin: 0; }
table { border-collapse: collapse; background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  overflow: hidden; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 14px; border-bottom: 1px solid var(--line); text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: var(--bg); }
td.best { color: var(--good); font-weight: 700; }
.delta { font-size: 12px; font-weight: 400; color: var(--muted); } .delta.up { color: var(--good); }
.delta.down { color: var(--bad); }
.models { margin: 8px 0 0; padding-left: 20px; color: var(--muted); }
.dir { color: var(--muted); font-size: 12px; margin-left: 4px; }
.bar { display: flex; height: 22px; width: 360px; border-radius: 4px; overflow: hidden; }
.bar span { color: #fff; font-size: 12px; display: flex; align-items: center; justify-content: center; }
.win { background: var(--good); } .tie { background: var(--tie); } .loss { background: var(--bad); }
.tools { display: flex; gap: 16px; align-items: center; margin: 8px 0 16px; flex-wrap: wrap; }
.tools input[type=search] { padding: 6px 10px; border: 1px solid var(--line); border-radius: 6px; width: 320px;
  font: inherit; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px;
  margin-bottom: 16px; }
.card h3 { margin: 0 0 8px; font-size: 14px; color: var(--muted); font-weight: 600; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; word-break: normal; }
.prompt { font-size: 16px; font-weight: 600; }
.history { color: var(--muted); margin-bottom: 6px; } .history summary { cursor: pointer; }
.role { color: var(--muted); font-weight: 600; margin-right: 6px; }
.reference { border-left: 3px solid var(--accent); background: #f0f6ff; padding: 8px 12px; margin: 10px 0;
  border-radius: 0 6px 6px 0; }
.label { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.outputs { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 12px; }
.output { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.output header { display: flex; justify-content: space-between; gap: 8px; margin-bottom: 6px; flex-wrap: wrap; }
.model { font-weight: 700; }
.chips span { font-size: 12px; background: var(--bg); border: 1px solid var(--line); border-radius: 10px;
  padding: 0 8px; margin-left: 4px; white-space: nowrap; }
.chips span.win, .chips span.loss, .chips span.tie { color: #fff; border-color: transparent; }
.chips span.win { background: var(--good); } .chips span.loss { background: var(--bad); }
.chips span.tie { background: var(--tie); }
.empty { color: var(--muted); font-style: italic; }
table.kb td:nth-child(2) { text-align: left; color: var(--muted); overflow-wrap: anywhere; max-width: 280px; }
.reading { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 12px 12px 32px; }
"""

SCRIPT = """
const search = document.getElementById('search'), differ = document.getElementById('differ');
function filter() {
  const q = search.value.trim().toLowerCase();
  let shown = 0;
  for (const card of document.querySelectorAll('.card')) {
    const ok = (!q || card.textContent.toLowerCase().includes(q)) && (!differ.checked || card.dataset.differ === '1');
    card.hidden = !ok; shown += ok;
  }
  document.getElementById('shown').textContent = shown;
}
search.addEventListener('input', filter); differ.addEventListener('change', filter);
"""


def best_values(comparison: dict) -> dict[str, float]:
    """Per metric, the best value among the models (lowest loss, highest score)."""
    best = {}
    for name in comparison["models"][0]["metrics"]:
        values = [m["metrics"][name] for m in comparison["models"]]
        best[name] = min(values) if name in LOWER_IS_BETTER else max(values)
    return best


def describe_generation(params: dict) -> str:
    how = "greedy" if params["temperature"] <= 0 else (f"sampling (temperature {params['temperature']}, top-p "
                                                       f"{params['top_p']}, seed {params['seed']})")
    return f"{how}, at most {params['max_new_tokens']} new tokens"


def _text(value: str) -> str:
    if not value:
        return '<div class="text empty">(empty)</div>'
    return f'<div class="text">{escape(value)}</div>'


def figure(value: float) -> str:
    """A metric as shown in the reports: two decimals are enough to read (compare.json keeps four)."""
    return f"{value:.2f}"


def delta(value: float, baseline: float, name: str) -> tuple[str, str]:
    """(text, "up" | "down" | "") of a change against the first model, "up" meaning better."""
    change = value - baseline
    if round(change, 2) == 0:
        return "±0", ""
    better = change < 0 if name in LOWER_IS_BETTER else change > 0
    return f"{change:+.2f}", "up" if better else "down"


def _metrics_table(comparison: dict) -> str:
    models = comparison["models"]
    best = best_values(comparison)
    head = "".join(f"<th>{escape(m['label'])}</th>" for m in models)
    body = []
    for name in models[0]["metrics"]:
        direction = "lower is better" if name in LOWER_IS_BETTER else "higher is better"
        cells = []
        for i, model in enumerate(models):
            value = model["metrics"][name]
            shown = figure(value)
            if i:
                text, kind = delta(value, models[0]["metrics"][name], name)
                shown += f' <span class="delta {kind}">{text}</span>'
            cells.append(f'<td class="{"best" if value == best[name] and len(models) > 1 else ""}">{shown}</td>')
        arrow = "↓" if name in LOWER_IS_BETTER else "↑"
        body.append(f'<tr><td>{escape(name)}<span class="dir" title="{direction}">{arrow}</span></td>'
                    f'{"".join(cells)}</tr>')
    return f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def describe_model(model: dict) -> str:
    """What a contender is, in words: "best checkpoint step-20 of runs/demo", "smollm2-135m-instruct + adapter"."""
    kb = f" + knowledge base {model['kb']}" if model.get("kb") else ""
    if model.get("run"):
        return f"{model.get('reason') or model['weights']} of {model['run']}{kb}"
    return model["model"] + (f" + adapter {model['adapter']}" if model.get("adapter") else "") + kb


def _models_list(comparison: dict) -> str:
    items = "".join(f"<li><b>{escape(m['label'])}</b>: {escape(describe_model(m))}</li>"
                    for m in comparison["models"])
    return f'<ul class="models">{items}</ul>'


def _judge_section(judge: dict | None) -> str:
    if not judge:
        return ""
    rows = []
    for label, s in judge["results"].items():
        total = max(s["win"] + s["tie"] + s["loss"], 1)
        bar = "".join(f'<span class="{kind}" style="width:{100 * s[kind] / total:.2f}%">{s[kind] or ""}</span>'
                      for kind in ("win", "tie", "loss"))
        rows.append(f"<tr><td>{escape(label)}</td><td><div class='bar'>{bar}</div></td><td>{s['win']}</td>"
                    f"<td>{s['tie']}</td><td>{s['loss']}</td><td>{s['win_rate']}%</td></tr>")
    return (f"<h2>LLM judge: each model against {escape(judge['baseline'])}</h2>"
            f"<p class='sub'>Judge <code>{escape(judge['model'])}</code> at {escape(judge['url'])}. Every pair is "
            f"asked in both answer orders; a win or loss counts only when both orders agree, anything else is a "
            f"tie. Win rate counts ties as half.</p><br>"
            f"<table><thead><tr><th>model</th><th></th><th>win</th><th>tie</th><th>loss</th><th>win rate</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _chips(output: dict, judgement: dict | None) -> str:
    scores = output.get("scores") or {}
    chips = [f"rouge-l {figure(scores['rouge-l'])}", f"bleu-4 {figure(scores['bleu-4'])}"] if scores else []
    if output.get("loss") is not None:
        chips.append(f"loss {figure(output['loss'])}")
    if output.get("choice") is not None or "choice_accuracy" in scores:
        mark = "✓" if scores.get("choice_accuracy") else "✗"
        chips.append(f"choice {output.get('choice') or '—'} {mark}")
    if output.get("kb"):  # with a knowledge base: the passages the answer cites, the one holding the reference
        cited = ", ".join(f"[{n}]" for n in output["kb"]["cited"]) or "nothing"
        chips.append(f"cites {cited}" + (f" · reference in [{output['kb']['holder']}]" if output["kb"]["holder"]
                                         else " · reference not retrieved"))
    html = "".join(f"<span>{escape(chip)}</span>" for chip in chips)
    if judgement:
        html += f'<span class="{judgement["outcome"]}">judge: {judgement["outcome"]}</span>'
    return html


def _card(row: dict, labels: list[str]) -> str:
    *history, last = row["prompt"] or [{"role": "user", "content": ""}]
    earlier = ""
    if history:
        turns = "".join(f'<div class="text"><span class="role">{escape(m["role"])}</span>{escape(m["content"])}</div>'
                        for m in history)
        earlier = f'<details class="history"><summary>{len(history)} earlier messages</summary>{turns}</details>'
    outputs = []
    for label in labels:
        output = row["outputs"][label]
        outputs.append(f'<div class="output"><header><span class="model">{escape(label)}</span>'
                       f'<span class="chips">{_chips(output, row["judge"].get(label))}</span></header>'
                       f'{_text(output["prediction"])}</div>')
    differ = int(len({row["outputs"][label]["prediction"] for label in labels}) > 1)
    return (f'<section class="card" data-differ="{differ}"><h3>#{row["index"] + 1} · {escape(row["source"])}</h3>'
            f'{earlier}<div class="text prompt"><span class="role">{escape(last["role"])}</span>'
            f'{escape(last["content"])}</div>'
            f'<div class="reference"><div class="label">reference</div>{_text(row["reference"])}</div>'
            f'<div class="outputs">{"".join(outputs)}</div></section>')


def render_html(comparison: dict, kb_section: str = "") -> str:
    """The page; kb_section: compare_kb.html_section's HTML (the four-way table and the reading), after the metrics."""
    labels = [m["label"] for m in comparison["models"]]
    cards = "".join(_card(row, labels) for row in comparison["rows"])
    title = " vs ".join(labels)
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge compare · {escape(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<p class="sub">Test set {escape(', '.join(comparison['data']))} · {comparison['examples']} examples ·
{escape(describe_generation(comparison['generation']))} · made by lmforge compare</p>
{_models_list(comparison)}
<h2>Metrics</h2>
{_metrics_table(comparison)}
<p class="sub">BLEU-4 and ROUGE as LLaMA-Factory computes them (×100); exact match and choice accuracy in %;
small figures: the change against {escape(labels[0])}.</p>
{_judge_section(comparison.get('judge'))}
{kb_section}
<h2>Examples</h2>
<div class="tools"><input type="search" id="search" placeholder="filter: any word in prompt, reference or answers">
<label><input type="checkbox" id="differ"> only where the answers differ</label>
<span class="sub"><span id="shown">{len(comparison['rows'])}</span> of {len(comparison['rows'])} shown</span></div>
{cards}
</main><script>{SCRIPT}</script></body></html>
"""
