"""`lmforge data inspect`: what training will make of a dataset, found before training rather than 20 minutes in.

Owns the inspection report: file format and record shape, every record with a problem (file:line, message index),
token lengths under a model's chat template against cutoff_len, supervised-token totals, and rendered samples with
the trained tokens marked; printed as text or JSON. Must not change data, nor convert or render records its own way:
records go through formats.convert and render.render_example exactly as in training.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from ..conversation import Conversation
from ..errors import ConfigError, DataError
from .datasets import dataset_files, resolve_dataset
from .formats import FormatSpec, convert, detect_format
from .render import IGNORE_INDEX, Example, ensure_chat_template, render_example
from .sources import file_format_of, read_records

PERCENTILES = (50, 90, 95, 99)
SHOWN_PROBLEMS = 20  # in the text report; --json lists every problem
PLAIN_MARKS = ("[[", "]]")  # around trained tokens when colour is off
FILE_FORMAT_NAMES = {"json": "JSON array", "jsonl": "JSONL"}
# convert()'s messages → a problem kind; the first pattern that matches wins.
_KINDS = (
    (re.compile(r"has [\w-]+="), "unknown_role"),  # sharegpt: "message 1 has from=\"bot\""
    (re.compile(r"has role .*; expected one of"), "unknown_role"),
    (re.compile(r"only the first message may be"), "wrong_role_order"),
    (re.compile(r"but '(user|assistant)' was expected"), "non_alternating"),
    (re.compile(r"no assistant message"), "missing_assistant"),
    (re.compile(r"tool-call|multimodal|loss flags"), "unsupported"),
    (re.compile(r"missing field"), "missing_field"),
    (re.compile(r"cannot tell the format"), "unknown_format"),
)
_MESSAGE_INDEX = re.compile(r"\bmessage (\d+)\b")


@dataclass
class Problem:
    where: str  # "path:line"
    kind: str  # unknown_role, wrong_role_order, non_alternating, missing_assistant, empty_turn, missing_reply, …
    message: str  # what is wrong, without the "path:line: " prefix
    message_index: int | None = None  # index in the record's list of messages, when one message is at fault

    def line(self) -> str:
        return f"{self.where}: {self.message.splitlines()[0]}"


@dataclass
class InspectReport:
    dataset: str
    files: list[dict] = field(default_factory=list)  # {"path", "file_format", "shape", "shape_detected", "records"}
    records: int = 0
    conversations: int = 0  # records that convert into a conversation (what training would read)
    problems: list[Problem] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    tokens: dict | None = None
    samples: list[dict] = field(default_factory=list)  # {"where", "truncated", "segments": [{"text", "trained"}]}

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_dataset(entry: str, *, model: str | None, template: str | None = None, cutoff_len: int = 1024,
                    train_on: str = "assistant", samples: int = 2, dataset_dir: str | None = None) -> InspectReport:
    """Read every record of a dataset file (or dataset_info.json name) as training does and report on it.

    With model=None only the structure is checked (no tokenizer, no token statistics, no samples).
    """
    if cutoff_len < 1:
        raise ConfigError(f"--cutoff-len {cutoff_len}: must be a positive number of tokens")
    spec = resolve_dataset(entry, dataset_dir)
    tokenizer = _tokenizer(model, template) if model is not None else None
    report = InspectReport(dataset=entry)
    lengths = _Lengths(cutoff_len)
    for path in dataset_files(spec.path):
        file_entry = {"path": str(path), "file_format": None, "shape": None,
                      "shape_detected": spec.format.format == "auto", "records": 0}
        report.files.append(file_entry)
        fmt = spec.format

        def bad_line(where: str, reason: str, raw: str, file_entry=file_entry) -> None:
            file_entry["records"] += 1
            report.problems.append(Problem(where, "invalid_json", reason))

        # on_bad_line: a JSONL line that is not a JSON object is listed like any other problem (a broken JSON
        # array still stops the reading: nothing after the break can be located)
        for record, where in read_records(path, spec.file_format, on_bad_line=bad_line):
            file_entry["records"] += 1
            try:
                if fmt.format == "auto":  # decided once per file, as load_conversations does
                    fmt = replace(fmt, format=detect_format(record, where))
                conversation = convert(record, where, fmt)
            except DataError as error:
                report.problems.append(_from_error(error, where))
                continue
            report.conversations += 1
            report.problems += content_problems(conversation, record, fmt)
            if tokenizer is not None:
                _render(tokenizer, conversation, train_on, lengths, report, samples)
        file_entry["shape"] = fmt.format if fmt.format != "auto" else None
        file_entry["file_format"] = file_format_of(path)  # after reading: read_records reports a missing file
        report.records += file_entry["records"]
    report.problem_counts = dict(Counter(problem.kind for problem in report.problems))
    if tokenizer is not None:
        report.tokens = {"model": model, "template": template or "the model's own", "train_on": train_on,
                         **lengths.summary()}
    return report


def content_problems(conversation: Conversation, record: dict, fmt: FormatSpec) -> list[Problem]:
    """What conversation.validate lets through but nobody means: empty turns, a last user turn with no reply."""
    messages = conversation.messages
    problems = []
    for i, message in enumerate(messages):
        if not message.content.strip():
            index, name = _turn_in_record(i, conversation, record, fmt)
            problems.append(Problem(conversation.source, "empty_turn", f"{name} ({message.role}) is empty", index))
    if messages[-1].role == "user":
        index, name = _turn_in_record(len(messages) - 1, conversation, record, fmt)
        problems.append(Problem(conversation.source, "missing_reply", f"{name} (user) is the last one and has no "
                                f"assistant reply; nothing is trained on it, so drop it or add the reply", index))
    return problems


def _turn_in_record(i: int, conversation: Conversation, record: dict, fmt: FormatSpec) -> tuple[int | None, str]:
    """Message i of the conversation as the user finds it in the record: its index in the record's message list
    and how to name it (alpaca records have fields instead; a top-level system field is not in the list)."""
    messages = conversation.messages
    if fmt.format == "alpaca":  # [system,] history pairs…, instruction+input → user, output → assistant
        offset = 1 if messages[0].role == "system" else 0
        pair, is_reply = divmod(i - offset, 2)
        if i < offset:
            field_name = f"field {fmt.column('system')!r}"
        elif pair < (len(messages) - offset) // 2 - 1:
            field_name = f"{fmt.column('history')}[{pair}][{is_reply}]"
        else:
            field_name = (f"field {fmt.column('response')!r}" if is_reply
                          else f"fields {fmt.column('prompt')!r} and {fmt.column('query')!r}")
        return i, field_name
    key = fmt.columns.get("messages", "messages" if fmt.format == "messages" else "conversations")
    offset = len(messages) - len(record[key])  # 1 when a top-level system field was put in front
    if i < offset:
        return None, f"field {fmt.column('system')!r}"
    return i - offset, f"message {i - offset}"


def _from_error(error: DataError, where: str) -> Problem:
    text = str(error).removeprefix(f"{where}: ")
    kind = next((kind for pattern, kind in _KINDS if pattern.search(text)), "invalid_record")
    index = _MESSAGE_INDEX.search(text)
    message_index = int(index.group(1)) if index else None
    if kind == "non_alternating" and "but 'user' was expected" in text and message_index in (0, 1):
        kind = "wrong_role_order"  # the first turn (after an optional system message) is not the user's
    return Problem(where, kind, text, message_index)


# --- tokens -------------------------------------------------------------------------------------------------------

def _tokenizer(model: str, template: str | None):
    from ..model.loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    try:
        ensure_chat_template(tokenizer, template)
    except ConfigError as error:  # its advice names the config key; here the option is --template
        raise ConfigError(f"{error} (for data inspect: --template NAME)") from None
    return tokenizer


class _Lengths:
    """Token counts of rendered conversations and what cutoff_len does to them (render.render_dataset's rules)."""

    def __init__(self, cutoff_len: int):
        self.cutoff_len = cutoff_len
        self.lengths: list[int] = []
        self.supervised = self.kept_tokens = self.kept_supervised = self.truncated = self.dropped = 0

    def add(self, example: Example) -> Example:
        """Count one example; return it as training would keep it (truncated to cutoff_len)."""
        self.lengths.append(len(example.input_ids))
        self.supervised += example.num_supervised
        if len(example.input_ids) > self.cutoff_len:
            example = Example(example.input_ids[:self.cutoff_len], example.labels[:self.cutoff_len])
            if example.num_supervised == 0:
                self.dropped += 1
                return example
            self.truncated += 1
        self.kept_tokens += len(example.input_ids)
        self.kept_supervised += example.num_supervised
        return example

    def summary(self) -> dict:
        ordered = sorted(self.lengths)
        n = len(ordered)
        # nearest rank: p percent of the conversations have at most this many tokens (a length that occurs)
        percentiles = {f"p{p}": ordered[max(0, -(-p * n // 100) - 1)] for p in PERCENTILES} if n else {}
        fit = sum(length <= self.cutoff_len for length in ordered)
        return {"cutoff_len": self.cutoff_len, "conversations": n,
                "length": {**percentiles, "max": ordered[-1], "mean": round(sum(ordered) / n, 1)} if n else {},
                "fit": fit, "fit_share": round(fit / n, 4) if n else None,
                "truncated": self.truncated, "dropped": self.dropped,
                "supervised_tokens": self.supervised, "kept_tokens": self.kept_tokens,
                "kept_supervised_tokens": self.kept_supervised}


def _render(tokenizer, conversation: Conversation, train_on: str, lengths: _Lengths, report: InspectReport,
            samples: int) -> None:
    try:
        example = render_example(tokenizer, conversation, train_on)
    except (ConfigError, DataError) as error:  # a template that is not prefix-preserving; nothing to train
        report.problems.append(Problem(conversation.source, "render", str(error).removeprefix(
            f"{conversation.source}: ")))
        return
    full_length = len(example.input_ids)
    kept = lengths.add(example)
    if len(report.samples) < samples:
        report.samples.append({"where": conversation.source, "truncated": len(kept.input_ids) < full_length,
                               "segments": marked_segments(tokenizer, kept)})


def marked_segments(tokenizer, example: Example) -> list[dict]:
    """The example's text in runs of trained / untrained tokens: [{"text": ..., "trained": bool}, ...]."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [{"text": tokenizer.decode(ids, skip_special_tokens=False), "trained": trained} for trained, ids in runs]


# --- presentation -------------------------------------------------------------------------------------------------

def format_report(report: InspectReport, colour: bool) -> str:
    lines = []
    for entry in report.files:
        shape = f"shape {entry['shape']}" if entry["shape"] else "shape not recognised"
        source = "decided by the first record, as training does" if entry["shape_detected"] else "dataset_info.json"
        lines.append(f"{entry['path']}: {FILE_FORMAT_NAMES[entry['file_format']]}, {_n(entry['records'], 'record')}, "
                     f"{shape} ({source})")
    problem_records = len({problem.where for problem in report.problems})
    lines.append(f"{report.conversations} of {_n(report.records, 'record')} convert into conversations; "
                 + (f"{_n(len(report.problems), 'problem')} in {_n(problem_records, 'record')}:" if report.problems
                    else "no problems found"))
    if report.problems:
        lines.append("  by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(report.problem_counts.items())))
        lines += [f"  {problem.line()}" for problem in report.problems[:SHOWN_PROBLEMS]]
        if len(report.problems) > SHOWN_PROBLEMS:
            lines.append(f"  … and {len(report.problems) - SHOWN_PROBLEMS} more (--json lists every one)")
    if report.tokens is not None:
        lines += _format_tokens(report.tokens)
    for number, sample in enumerate(report.samples, start=1):
        marks = "trained tokens in colour" if colour else f"trained tokens between {' and '.join(PLAIN_MARKS)}"
        cut = f", cut at cutoff_len {report.tokens['cutoff_len']}" if sample["truncated"] else ""
        lines.append(f"sample {number} — {sample['where']} ({marks}{cut}):")
        lines.append(format_segments(sample["segments"], colour))
    return "\n".join(lines)


def _format_tokens(tokens: dict) -> list[str]:
    head = (f"tokens under {tokens['model']} with {tokens['template']} chat template (train_on {tokens['train_on']}, "
            f"cutoff_len {tokens['cutoff_len']}), {_n(tokens['conversations'], 'conversation')}:")
    if not tokens["conversations"]:
        return [head, "  nothing rendered"]
    length = tokens["length"]
    return [head,
            "  length  " + " · ".join(f"{name} {length[name]}" for name in (*(f"p{p}" for p in PERCENTILES), "max"))
            + f" · mean {length['mean']}",
            f"  within cutoff_len: {tokens['fit']} ({tokens['fit_share']:.1%}); truncated: {tokens['truncated']}; "
            f"dropped (nothing trainable left within cutoff_len): {tokens['dropped']}",
            f"  supervised tokens: {tokens['supervised_tokens']:,} ({tokens['kept_supervised_tokens']:,} of "
            f"{tokens['kept_tokens']:,} tokens after cutoff)"]


def format_segments(segments: list[dict], colour: bool) -> str:
    if colour:  # untrained dim, trained bold green
        return "".join(f"\x1b[1;32m{s['text']}\x1b[0m" if s["trained"] else f"\x1b[2m{s['text']}\x1b[0m"
                       for s in segments)
    return "".join(f"{PLAIN_MARKS[0]}{s['text']}{PLAIN_MARKS[1]}" if s["trained"] else s["text"] for s in segments)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def use_colour(stream) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def report_json(report: InspectReport) -> str:
    return json.dumps(report.to_dict(), ensure_ascii=False, indent=2)
