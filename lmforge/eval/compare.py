"""`lmforge compare A B [C …]`: several models, runs or checkpoints on the same test prompts, side by side.

Contenders are evaluated by evaluate.py one after another (one model in memory); an optional LLM judge behind any
OpenAI-compatible endpoint (the `openai` client) compares each with the first, in both answer orders to cancel
position bias. A contender written RUN+kb:KB (or every contender again, with `--kb KB`) answers with passages from
a knowledge base in its prompt (compare_kb.py), so base, tuned, base+kb and tuned+kb sit in one table. Writes
compare.json, report.md, report.html (report_html.py). Must not know about argparse.
"""

from __future__ import annotations

import gc
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..generate import load_for_inference, load_run_weights
from ..rundir import STATE_FILE, RunDir, RunWeights, choose_weights
from . import compare_kb
from .compare_report import (
    best_values,
    delta,
    describe_generation,
    describe_model,
    figure,
    render_html,
)
from .evaluate import (
    EvalOptions,
    TestSet,
    describe_weights,
    evaluate_model,
    format_metrics,
    write_eval,
)
from .scoring import LOWER_IS_BETTER

LABEL_SPEC = re.compile(r"([A-Za-z0-9_.\-\u4e00-\u9fff]+)=(.+)")


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: a run's weights, or a model (builtin alias / local dir / hub id) + adapter."""

    label: str
    spec: str
    weights: RunWeights | None = None
    model: str | None = None
    adapter: str | None = None
    kb: str | None = None  # a knowledge base folder: its passages go into every test prompt

    def load(self, dtype: str):
        if self.weights is not None:
            print(f"{self.label}: using {self.weights.reason} of {self.weights.run.root}")
            return load_run_weights(self.weights, dtype)
        return load_for_inference(model=self.model, adapter=self.adapter, dtype=dtype)

    def describe(self) -> dict:
        kb = {"kb": self.kb} if self.kb else {}
        if self.weights is not None:
            return {"spec": self.spec, **describe_weights(self.weights), **kb}
        return {"spec": self.spec, "model": self.model, "adapter": self.adapter, **kb}


def resolve_contender(spec: str) -> Contender:
    """LABEL=WHAT or WHAT, where WHAT is a run dir (its best checkpoint if best.json names one, else its final
    weights), a checkpoint dir (RUN/checkpoints/step-N), a PEFT adapter dir, or a model name or dir."""
    label = None
    match = LABEL_SPEC.fullmatch(spec)
    if match and not Path(spec).exists():
        label, spec = match.groups()
    if compare_kb.KB_SEPARATOR in spec and not Path(spec).exists():  # WHAT+kb:KB
        what, kb = spec.rsplit(compare_kb.KB_SEPARATOR, 1)
        if not kb:
            raise UserError(f"{spec}: give the knowledge base folder after +kb:, e.g. {what}+kb:kb/")
        inner = resolve_contender(what)
        return replace(inner, label=label or f"{inner.label}+kb", spec=spec, kb=kb)
    path = Path(spec)
    if (path / STATE_FILE).is_file() and path.parent.name == "checkpoints":
        run = RunDir(path.parent.parent)
        return Contender(label or f"{run.root.name}@{path.name}", spec, weights=choose_weights(run, str(path)))
    if (path / "config.yaml").is_file() and RunDir(path).has_results():
        weights = choose_weights(RunDir(path), None)
        suffix = "" if weights.label == "final" else f"@{weights.label}"
        return Contender(label or f"{path.resolve().name}{suffix}", spec, weights=weights)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return Contender(label or path.resolve().name, spec, model=base, adapter=str(path))
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{spec} is a directory but not a run dir (config.yaml + adapter/ or model/), a checkpoint "
                        f"(checkpoints/step-N), an adapter (adapter_config.json) or a model (config.json)")
    return Contender(label or (path.name if path.is_dir() else spec), spec, model=spec)


def unique_labels(contenders: list[Contender]) -> list[Contender]:
    seen: dict[str, int] = {}
    out = []
    for contender in contenders:
        count = seen[contender.label] = seen.get(contender.label, 0) + 1
        label = contender.label if count == 1 else f"{contender.label}-{count}"
        out.append(replace(contender, label=label))
    return out


def with_kb_twins(contenders: list[Contender], kb: str) -> list[Contender]:
    """`--kb KB`: every contender without a KB, then each of them again with KB (base, tuned, base+kb, tuned+kb)."""
    return contenders + [replace(c, label=f"{c.label}+kb", spec=f"{c.spec}{compare_kb.KB_SEPARATOR}{kb}", kb=kb)
                         for c in contenders if c.kb is None]


def safe_dir_name(label: str) -> str:
    return re.sub(r"[^\w.\-@]+", "_", label).strip("._") or "model"


# ------------------------------------------------------------------------------------------------ LLM judge


@dataclass(frozen=True)
class JudgeSettings:
    url: str
    model: str
    key: str | None = None
    workers: int = 4  # requests in flight at once
    max_tokens: int = 512


JUDGE_SYSTEM = (
    "You are an impartial judge. Compare two AI assistants' answers to the user's last message. A reference answer "
    "written by an expert is provided: prefer the answer that is correct and consistent with it, then the more "
    "helpful, relevant and precise one. Do not let the order of the answers, their length or the assistants' names "
    "influence you. Explain briefly, then output your verdict on the last line exactly as [[A]] if assistant A is "
    "better, [[B]] if assistant B is better, or [[C]] for a tie.")
VERDICT = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)


def judge_prompt(prompt: list[dict], reference: str, answer_a: str, answer_b: str) -> str:
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return (f"[Conversation]\n{conversation}\n[End of Conversation]\n\n"
            f"[Reference Answer]\n{reference}\n[End of Reference Answer]\n\n"
            f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
            f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")


def parse_verdict(text: str) -> str | None:
    """"A", "B", "tie", or None when the judge gave no verdict in the asked format (the last one counts)."""
    found = VERDICT.findall(text or "")
    if not found:
        return None
    last = found[-1].upper()
    return "tie" if last in ("C", "TIE") else last


def combine(first: str | None, swapped: str | None) -> str:
    """Outcome for the contender from two verdicts: `first` with the contender as A, `swapped` with it as B.
    It wins only if both orders prefer it, loses only if both prefer the baseline; anything else is a tie."""
    if first == "A" and swapped == "B":
        return "win"
    if first == "B" and swapped == "A":
        return "loss"
    return "tie"


class Judge:
    def __init__(self, settings: JudgeSettings):
        self.settings = settings

    def _client(self):
        from openai import OpenAI

        # local OpenAI-compatible servers usually ignore the key; the client insists on one
        return OpenAI(base_url=self.settings.url, api_key=self.settings.key or "not-needed", max_retries=1,
                      timeout=300)

    def ask(self, client, content: str) -> str:
        import openai

        try:
            response = client.chat.completions.create(
                model=self.settings.model, temperature=0, max_tokens=self.settings.max_tokens,
                messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}])
        except openai.APIConnectionError as error:
            raise UserError(f"judge endpoint {self.settings.url} cannot be reached ({error}); is the server running, "
                            f"and does --judge-url end in /v1?") from None
        except openai.AuthenticationError:
            raise UserError(f"judge endpoint {self.settings.url} refused the key: pass a valid one with "
                            f"--judge-key") from None
        except openai.APIStatusError as error:
            raise UserError(f"judge endpoint {self.settings.url} answered HTTP {error.status_code} for model "
                            f"{self.settings.model!r}: {error.message}") from None
        return response.choices[0].message.content or ""

    def compare(self, test: TestSet, contender: list[str], baseline: list[str]) -> list[dict]:
        """Per example: the verdict with the contender as A, the verdict with it as B, and the outcome."""
        client = self._client()
        jobs = []
        for item, ours, theirs in zip(test.items, contender, baseline):
            jobs.append(judge_prompt(item.prompt, item.reference, ours, theirs))
            jobs.append(judge_prompt(item.prompt, item.reference, theirs, ours))
        with ThreadPoolExecutor(max_workers=self.settings.workers) as pool:
            texts = list(pool.map(lambda content: self.ask(client, content), jobs))
        verdicts = [parse_verdict(text) for text in texts]
        return [{"verdicts": [first, swapped], "outcome": combine(first, swapped)}
                for first, swapped in zip(verdicts[::2], verdicts[1::2])]


def summarize_judgements(judgements: list[dict]) -> dict:
    count = {outcome: sum(j["outcome"] == outcome for j in judgements) for outcome in ("win", "tie", "loss")}
    inconsistent = sum(None not in j["verdicts"] and j["verdicts"][0] == j["verdicts"][1] != "tie"
                       for j in judgements)  # the same letter both times: the judge followed the position
    unparsed = sum(v is None for j in judgements for v in j["verdicts"])
    total = max(len(judgements), 1)
    return {**count, "position_bias": inconsistent, "unparsed": unparsed,
            "win_rate": round(100 * (count["win"] + count["tie"] / 2) / total, 2)}


# ------------------------------------------------------------------------------------------------ compare


def compare(specs: list[str], test: TestSet, options: EvalOptions, out_dir: Path,
            judge: JudgeSettings | None = None, kb: str | None = None, kb_k: int = 3) -> dict:
    """Evaluate every contender on the test set, judge them against the first, write the reports; returns
    the comparison (what compare.json holds). kb: add every contender again with this knowledge base; kb_k: passages
    per question."""
    if len(specs) < 2 and not (kb and specs):
        raise UserError("compare needs at least two models, runs or checkpoints (e.g. the base model and a run)")
    if not options.generate:
        raise UserError("compare shows the models' answers side by side, so it needs generation (drop --no-generate)")
    contenders = [resolve_contender(spec) for spec in specs]
    contenders = unique_labels(with_kb_twins(contenders, kb) if kb else contenders)
    if kb_k < 1:
        raise UserError(f"--kb-k must be at least 1, got {kb_k}")
    retrieved = {c.kb: compare_kb.retrieve_for(test, c.kb, kb_k) for c in contenders if c.kb}  # KBs checked first
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated, kb_rows = [], {}
    for contender in contenders:
        model, tokenizer = contender.load(options.dtype)
        contender_test = test
        if contender.kb:
            system_role = compare_kb.template_has_system_role(tokenizer)
            contender_test = compare_kb.with_passages(test, retrieved[contender.kb], system_role)
        result = evaluate_model(model, tokenizer, contender_test, options, contender.label, contender.describe())
        del model
        gc.collect()
        write_eval(result, out_dir / safe_dir_name(contender.label))
        print(f"{contender.label}: {format_metrics(result.metrics)}")
        evaluated.append((contender, result))
        if contender.kb:
            kb_rows[contender.label] = compare_kb.citation_rows(test, retrieved[contender.kb],
                                                                [r["prediction"] for r in result.records])
    comparison = build_comparison(test, options, evaluated)
    if kb_rows:
        comparison["kb"] = {label: compare_kb.summarize(c.kb, kb_rows[label]) for c, _ in evaluated
                            if (label := c.label) in kb_rows}
        for i, row in enumerate(comparison["rows"]):
            for label, rows in kb_rows.items():
                row["outputs"][label]["kb"] = rows[i]
        for line in compare_kb.terminal_lines(comparison):  # the four-way table and the reading
            print(line)
    if judge is not None:
        baseline = [r["prediction"] for r in evaluated[0][1].records]
        results = {}
        for contender, result in evaluated[1:]:
            judgements = Judge(judge).compare(test, [r["prediction"] for r in result.records], baseline)
            for row, judgement in zip(comparison["rows"], judgements):
                row["judge"][contender.label] = judgement
            results[contender.label] = summarize_judgements(judgements)
            print(f"judge: {contender.label} vs {contenders[0].label}: {format_judgement(results[contender.label])}")
        comparison["judge"] = {"url": judge.url, "model": judge.model, "baseline": contenders[0].label,
                               "results": results}
    RunDir(out_dir).write_json(out_dir / "compare.json", comparison)
    (out_dir / "report.md").write_text(render_markdown(comparison), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(comparison, compare_kb.html_section(comparison)),
                                         encoding="utf-8")
    return comparison


def build_comparison(test: TestSet, options: EvalOptions, evaluated: list) -> dict:
    rows = []
    for i, item in enumerate(test.items):
        outputs = {contender.label: {key: result.records[i].get(key) for key in ("prediction", "scores", "loss",
                                                                              "choice")}
                   for contender, result in evaluated}
        rows.append({"index": i, "source": item.source, "prompt": item.prompt, "reference": item.reference,
                     "outputs": outputs, "judge": {}})
    return {"data": test.names, "examples": len(test.items), "generation": vars(options.params),
            "models": [{"label": c.label, **c.describe(), "metrics": r.metrics} for c, r in evaluated],
            "judge": None, "rows": rows}


def format_judgement(summary: dict) -> str:
    return (f"win {summary['win']} · tie {summary['tie']} · loss {summary['loss']} (win rate {summary['win_rate']}%, "
            f"ties count half; {summary['position_bias']} position-biased pairs)")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_quote(text: str) -> str:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "\n".join(f"> {line}" if line else ">" for line in (escaped or "(empty)").split("\n"))


def render_markdown(comparison: dict) -> str:
    labels = [m["label"] for m in comparison["models"]]
    best = best_values(comparison)
    lines = ["# lmforge compare", "",
             f"Test set: {', '.join(comparison['data'])} · {comparison['examples']} examples · "
             f"{describe_generation(comparison['generation'])}", ""]
    lines += [f"- **{_md_cell(m['label'])}**: {describe_model(m)}" for m in comparison["models"]]
    lines += ["", "## Metrics", "", f"Bold: the best; in brackets: the change against {labels[0]}.", "",
              "| metric | " + " | ".join(_md_cell(label) for label in labels) + " |",
              "|---|" + "---:|" * len(labels)]
    for name in comparison["models"][0]["metrics"]:
        arrow = "↓" if name in LOWER_IS_BETTER else "↑"
        cells = []
        for i, model in enumerate(comparison["models"]):
            value = model["metrics"][name]
            cell = f"**{figure(value)}**" if value == best[name] and len(labels) > 1 else figure(value)
            if i:
                cell += f" ({delta(value, comparison['models'][0]['metrics'][name], name)[0]})"
            cells.append(cell)
        lines.append(f"| {name} {arrow} | " + " | ".join(cells) + " |")
    judge = comparison.get("judge")
    if judge:
        lines += ["", f"## LLM judge: each model against {judge['baseline']}", "",
                  f"Judge `{judge['model']}` at {judge['url']}; every pair asked in both answer orders, a win only "
                  f"when both orders agree; win rate counts ties as half.", "",
                  "| model | win | tie | loss | win rate |", "|---|---:|---:|---:|---:|"]
        for label, summary in judge["results"].items():
            lines.append(f"| {_md_cell(label)} | {summary['win']} | {summary['tie']} | {summary['loss']} | "
                         f"{summary['win_rate']}% |")
    lines += compare_kb.markdown_section(comparison)
    lines += ["", "## Examples", ""]
    for row in comparison["rows"]:
        lines += [f"### {row['index'] + 1} · {row['source']}", "", "**Prompt**", "",
                  _md_quote("\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])), "",
                  "**Reference**", "", _md_quote(row["reference"]), ""]
        for label in labels:
            output = row["outputs"][label]
            notes = [f"rouge-l {figure(output['scores']['rouge-l'])}", f"bleu-4 {figure(output['scores']['bleu-4'])}"]
            if output.get("loss") is not None:
                notes.append(f"loss {figure(output['loss'])}")
            if label in row["judge"]:
                notes.append(f"judge: {row['judge'][label]['outcome']}")
            if output.get("kb"):
                cited = output["kb"]["cited"]
                notes.append(f"cites {', '.join(f'[{n}]' for n in cited) or 'nothing'}"
                             + (f"; the reference is in [{output['kb']['holder']}]" if output["kb"]["holder"] else ""))
            lines += [f"**{_md_cell(label)}** ({' · '.join(notes)})", "", _md_quote(output["prediction"]), ""]
    return "\n".join(lines) + "\n"
