"""Compare with a knowledge base: the test prompts with retrieved passages, citation checks, and the four-way reading.

Owns what `lmforge compare … RUN+kb:KB` (or `--kb KB`) adds: for a contender that carries a KB, each test prompt gets
the passages retrieved for its last user message, inserted by kb/context.py through the chat template; its answers
are checked for citing the passage that holds the reference; and the terminal, report.md and report.html gain the
four-way table (one row per contender: ROUGE / BLEU, reference passage retrieved, answer cites it) and a short reading
of which contender wins where (with and without the KB, against the first contender). Must not load models or
generate.
"""

from __future__ import annotations

from dataclasses import replace
from html import escape

from ..conversation import Conversation
from ..kb.context import citations, holder, query_of, sources_json, template_has_system_role, with_context
from ..kb.retrieve import Hit, Retriever
from .compare_report import figure
from .evaluate import TestSet

KB_SEPARATOR = "+kb:"

SCORES = (("rouge-1", "ROUGE-1"), ("rouge-2", "ROUGE-2"), ("rouge-l", "ROUGE-L"), ("bleu-4", "BLEU-4"))
TABLE_NOTE = ("Passages are retrieved for each question's last user message and given to the model in the system "
              "message, numbered [1] … [k]; a passage holds the reference when it contains at least half of the "
              "reference's words.")
__all__ = ["template_has_system_role"]  # compare.py asks it of each contender's tokenizer


def retrieve_for(test: TestSet, kb_dir: str, k: int) -> list[list[Hit]]:
    """The passages for every test prompt (its last user message is the query)."""
    retriever = Retriever.open(kb_dir)
    queries = [query_of(item.prompt) for item in test.items]
    return [retriever.search(query, k) if query.strip() else [] for query in queries]


def with_passages(test: TestSet, hits: list[list[Hit]], system_role: bool) -> TestSet:
    """The test set with each prompt's passages in it — in the prompt that is generated from and in the conversation
    whose reference loss is measured."""
    items = []
    for item, found in zip(test.items, hits):
        prompt = with_context(item.prompt, found, system_role)
        conversation = Conversation.from_dicts([*prompt, {"role": "assistant", "content": item.reference}],
                                               item.conversation.source, item.conversation.tools)
        items.append(replace(item, prompt=prompt, conversation=conversation))
    return TestSet(test.names, items)


def citation_rows(test: TestSet, hits: list[list[Hit]], predictions: list[str]) -> list[dict]:
    rows = []
    for item, found, prediction in zip(test.items, hits, predictions):
        number = holder(found, item.reference)
        cited = citations(prediction, len(found))
        rows.append({"sources": [s["source"] for s in sources_json(found)], "holder": number, "cited": cited,
                     "cites_reference": number is not None and number in cited})
    return rows


def summarize(kb_dir: str, rows: list[dict]) -> dict:
    total = max(len(rows), 1)
    return {"kb": kb_dir, "examples": len(rows),
            "reference_retrieved": sum(r["holder"] is not None for r in rows),
            "cites_reference": sum(r["cites_reference"] for r in rows),
            "cites_any": sum(bool(r["cited"]) for r in rows),
            "cites_reference_pct": round(100 * sum(r["cites_reference"] for r in rows) / total, 2)}


def twin_of(spec: str) -> str | None:
    """The spec of the same contender without its KB (for "RUN+kb:KB", "RUN")."""
    return spec.rsplit(KB_SEPARATOR, 1)[0] if KB_SEPARATOR in spec else None


def _change(new: float, old: float) -> str:
    return f"{new - old:+.2f}"


def reading(comparison: dict) -> list[str]:
    """A few sentences: who wins each headline metric, what the KB changes for each model, what each model changes
    against the first, how often answers cite the passage holding the reference, per-question wins."""
    models = comparison["models"]
    if not models or "rouge-l" not in models[0]["metrics"]:
        return []
    lines = []
    for metric, name in (("rouge-l", "ROUGE-L"), ("bleu-4", "BLEU-4")):
        best = max(models, key=lambda m: m["metrics"][metric])
        lines.append(f"Best {name}: {best['label']} ({best['metrics'][metric]:.2f}).")
    by_spec = {m["spec"]: m for m in models}
    first = models[0]
    for model in models[1:]:
        if model.get("kb") is None:
            lines.append(f"{model['label']} against {first['label']}: ROUGE-L "
                         f"{_change(model['metrics']['rouge-l'], first['metrics']['rouge-l'])}, BLEU-4 "
                         f"{_change(model['metrics']['bleu-4'], first['metrics']['bleu-4'])}.")
    for model in models:
        twin = by_spec.get(twin_of(model["spec"]) or "")
        if model.get("kb") is None or twin is None:
            continue
        change = model["metrics"]["rouge-l"] - twin["metrics"]["rouge-l"]
        verdict = "helps" if change >= 1 else "hurts" if change <= -1 else "changes little (within 1 point)"
        lines.append(f"The knowledge base {verdict} for {twin['label']}: {twin['label']} → {model['label']} ROUGE-L "
                     f"{_change(model['metrics']['rouge-l'], twin['metrics']['rouge-l'])}, BLEU-4 "
                     f"{_change(model['metrics']['bleu-4'], twin['metrics']['bleu-4'])}.")
    for label, summary in (comparison.get("kb") or {}).items():
        lines.append(f"{label}: the passage holding the reference was retrieved for {summary['reference_retrieved']} "
                     f"of {summary['examples']} questions; the answer cites it in {summary['cites_reference']} "
                     f"(any passage in {summary['cites_any']}).")
    wins = {m["label"]: 0 for m in models}
    for row in comparison["rows"]:
        scores = {label: output["scores"]["rouge-l"] for label, output in row["outputs"].items()}
        top = max(scores.values())
        for label, score in scores.items():
            wins[label] += score == top and top > 0
    lines.append("Best ROUGE-L per question (ties count for each): "
                 + ", ".join(f"{label} {count}" for label, count in wins.items()) + ".")
    return lines


def markdown_section(comparison: dict) -> list[str]:
    """The report.md lines for the KB table and the reading (nothing when no contender carries a KB)."""
    summaries = comparison.get("kb") or {}
    if not summaries:
        return []
    labels = [m["label"] for m in comparison["models"]]
    cells = {label: summaries.get(label) for label in labels}

    def row(name: str, key: str) -> str:
        values = [f"{s[key]}/{s['examples']}" if s else "—" for s in cells.values()]
        return f"| {name} | " + " | ".join(values) + " |"

    lines = ["", "## Knowledge base", "", TABLE_NOTE, "",
             "| | " + " | ".join(label.replace("|", "\\|") for label in labels) + " |",
             "|---|" + "---:|" * len(labels),
             row("reference passage retrieved", "reference_retrieved"),
             row("answer cites that passage", "cites_reference"),
             row("answer cites any passage", "cites_any"),
             "", "## Reading", ""]
    return lines + [f"- {line}" for line in reading(comparison)]



def four_way(comparison: dict) -> tuple[list[str], list[list[str]]]:
    """(header, one row per contender): model, knowledge base, ROUGE / BLEU as `eval`, the passage holding the
    reference retrieved, the answer cites that passage (count and %), the answer cites any passage — the cells the
    terminal and report.html show. Empty when no contender carries a KB."""
    summaries = comparison.get("kb") or {}
    if not summaries:
        return [], []
    scores = [(key, name) for key, name in SCORES if key in comparison["models"][0]["metrics"]]
    header = ["model", "knowledge base", *(name for _, name in scores), "reference retrieved", "cites that passage",
              "cites any"]
    rows = []
    for model in comparison["models"]:
        summary = summaries.get(model["label"])
        kb_cells = (["—"] * 3 if summary is None else
                    [f"{summary['reference_retrieved']}/{summary['examples']}",
                     f"{summary['cites_reference']}/{summary['examples']} ({summary['cites_reference_pct']:g}%)",
                     f"{summary['cites_any']}/{summary['examples']}"])
        rows.append([model["label"], model.get("kb") or "—",
                     *(figure(model["metrics"][key]) for key, _ in scores), *kb_cells])
    return header, rows


def terminal_lines(comparison: dict) -> list[str]:
    """The four-way table as aligned text lines, then the reading (what compare prints)."""
    header, rows = four_way(comparison)
    if not rows:
        return []
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    table = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in (header, *rows)]
    return ["", "knowledge base, four ways:", *table, "", *reading(comparison)]


def html_section(comparison: dict) -> str:
    """report.html's knowledge-base section: the four-way table and the reading (nothing without a KB)."""
    header, rows = four_way(comparison)
    if not rows:
        return ""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    items = "".join(f"<li>{escape(line)}</li>" for line in reading(comparison))
    return (f'<h2 id="kb">Knowledge base</h2><p class="sub">{escape(TABLE_NOTE)} ROUGE and BLEU as LLaMA-Factory '
            f'computes them (×100).</p><br><table class="kb"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f'</table><h2>Reading</h2><ul class="reading">{items}</ul>')
