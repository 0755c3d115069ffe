"""`lmforge data clean`: run a recipe (normalize, filter, pii, dedup steps, in the order written) over a records file,
streaming, so that nothing is lost: every dropped record goes to OUT.rejects.jsonl with its source line, the step and
the reason, and the report proves input = kept + rejected.

Owns the pipeline: reading records into messages shape (metadata columns kept), per-record steps (optionally in
`num_proc` worker processes), the two passes dedup needs (survivors spooled to a temporary file), the accounting and
the report data. Must not implement the steps (normalize/filters/pii/dedup.py) nor draw the report (report.py).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, UserError
from .convert import shape
from .datasets import dataset_files
from .dedup import (
    ExactDeduper,
    NearDuplicateIndex,
    choose_keepers,
    embed_texts,
    semantic_clusters,
)
from .filters import build_filters, field_text, field_texts
from .formats import FormatSpec, detect_format
from .formats import convert as convert_record
from .language import detect_language
from .normalize import normalize_text
from .outputs import OutputFiles, reason_kind, sibling_path
from .pii import mask_pii
from .recipe import DedupOptions, Step, load_recipe
from .sources import read_records

# The keys each shape reads (FormatSpec names; a dataset_info.json entry may map them to other columns).
_CONSUMED = {"alpaca": ("prompt", "query", "response", "system", "history"),
             "sharegpt": ("messages", "system", "tools"), "conversations": ("messages", "system", "tools")}
_CHUNK = 512            # records handed to a worker at a time
_SAMPLE_TEXTS = 2000    # kept records sampled for the report's language mix
_CLUSTER_SAMPLES = 5    # duplicate clusters shown per dedup step
_SAMPLE_CHARS = 300


@dataclass
class StepStats:
    name: str
    records_in: int = 0
    rejected: int = 0
    changed: int = 0                                  # normalize / pii: records whose text changed
    reasons: Counter = field(default_factory=Counter)  # short reason label → count
    masked: Counter = field(default_factory=Counter)   # pii: placeholders per type
    seconds: float = 0.0
    clusters: list = field(default_factory=list)       # dedup: sample clusters

    def to_dict(self) -> dict:
        out = {"step": self.name, "in": self.records_in, "out": self.records_in - self.rejected,
               "rejected": self.rejected, "seconds": round(self.seconds, 3),
               "records_per_second": round(self.records_in / self.seconds) if self.seconds > 0 else None}
        if self.name in ("normalize", "pii"):
            out["changed"] = self.changed
        if self.reasons:
            out["reasons"] = dict(self.reasons.most_common())
        if self.name == "pii":
            out["masked"] = dict(self.masked.most_common())
        if self.name.startswith("dedup"):
            out["sample_clusters"] = self.clusters
        return out


@dataclass
class CleanReport:
    input: str
    output: str
    recipe: list[dict]
    records_in: int = 0
    kept: int = 0
    rejected: int = 0
    unreadable: int = 0          # lines that were not a record (bad JSON, bad shape): rejected at step "read"
    steps: list[StepStats] = field(default_factory=list)
    chars_before: array = field(default_factory=lambda: array("I"))
    chars_after: array = field(default_factory=lambda: array("I"))
    languages: dict = field(default_factory=dict)
    seconds: float = 0.0
    num_proc: int = 1
    rejects: str | None = None

    def summary(self) -> str:
        parts = [f"read {self.records_in} records → kept {self.kept} in {self.output}, rejected {self.rejected}"]
        dropped = [f"{s.name} {s.rejected}" for s in self.steps if s.rejected]
        if self.unreadable:
            dropped.insert(0, f"read {self.unreadable}")
        if dropped:
            parts.append(f"({', '.join(dropped)}; see {Path(self.rejects).name})" if self.rejects else "")
        masked = sum((s.masked for s in self.steps), Counter())
        if masked:
            parts.append(f"masked {sum(masked.values())} personal-information spans")
        return " ".join(p for p in parts if p) + f" in {self.seconds:.1f}s"

    def to_dict(self) -> dict:
        return {"input": self.input, "output": self.output, "rejects": self.rejects, "recipe": self.recipe,
                "records_in": self.records_in, "kept": self.kept, "rejected": self.rejected,
                "accounting": f"{self.records_in} in = {self.kept} kept + {self.rejected} rejected",
                "unreadable": self.unreadable, "steps": [s.to_dict() for s in self.steps],
                "chars": {"before": _percentiles(self.chars_before), "after": _percentiles(self.chars_after)},
                "languages": self.languages, "seconds": round(self.seconds, 2), "num_proc": self.num_proc,
                "records_per_second": round(self.records_in / self.seconds) if self.seconds > 0 else None}


def clean_file(in_path: str | Path, out_path: str | Path, *, recipe: str | Path | list[Step] | None = None,
               to: str = "messages", num_proc: int = 1, strict: bool = False, html: bool = True,
               format_spec: FormatSpec = FormatSpec()) -> CleanReport:
    """Clean one JSON/JSONL records file — or a folder of them, read in name order as one dataset (so duplicates
    across its files are found too) — into OUT (JSONL), with OUT.rejects.jsonl, OUT.report.json and (html=True)
    OUT.report.html beside it. All outputs are written under temporary names and renamed at the end.
    format_spec: how records are read (a dataset_info.json entry's format and columns); default: detected."""
    in_path, out_path = Path(in_path), Path(out_path)
    steps = recipe if isinstance(recipe, list) else load_recipe(recipe)
    if in_path.resolve() == out_path.resolve():
        raise UserError(f"-o {out_path} is the input file; write the cleaned data to a new file")
    if in_path.is_dir() and out_path.resolve().parent == in_path.resolve():
        raise UserError(f"-o {out_path} is inside the input folder {in_path}, whose files are all read as data; "
                        f"write the cleaned data outside it")
    if num_proc < 1:
        raise UserError(f"--num-proc must be ≥ 1, got {num_proc}")
    started = time.perf_counter()
    report = CleanReport(input=str(in_path), output=str(out_path), recipe=[s.to_dict() for s in steps],
                         num_proc=num_proc)
    report.steps = [StepStats(s.name) for s in steps]
    rejects_path = sibling_path(out_path, "rejects.jsonl")
    with OutputFiles(out_path, rejects_path) as outputs:
        def reject(where: str, step: str, reason: str, record: object) -> None:
            if strict and step == "read":
                raise DataError(f"{where}: {reason} (without --strict such records go to {rejects_path.name})")
            outputs.reject({"line": where, "step": step, "reason": reason, "record": record})
            report.rejected += 1

        stream = _read(in_path, report, reject, format_spec)
        for segment in _segments(steps, report.steps):
            stream = _run_segment(segment, stream, reject, num_proc, out_path)
        languages = _LanguageSample()
        for record, where in stream:
            outputs.write(shape_record(record, to))
            report.kept += 1
            report.chars_after.append(_chars(record))
            languages.offer(record)
        if report.records_in == 0:
            raise DataError(f"{in_path}: the file has no records")
        assert report.records_in == report.kept + report.rejected, report.to_dict()
        report.languages = languages.mix()
        report.seconds = time.perf_counter() - started
        report.rejects = str(rejects_path) if report.rejected else None
        outputs.add(sibling_path(out_path, "report.json"),
                    json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")
        if html:
            from .clean_report import render_clean_report

            outputs.add(sibling_path(out_path, "report.html"), render_clean_report(report))
        outputs.commit()
    return report


def shape_record(record: dict, to: str) -> dict:
    """A messages-shape record (with metadata columns) in the `to` output shape, metadata kept."""
    if to == "messages":
        return record
    from ..conversation import Conversation

    meta = {k: v for k, v in record.items() if k != "messages"}
    return {**shape(Conversation.from_dicts(record["messages"]), to), **meta}


# --- reading ---------------------------------------------------------------------------------------------------------

def _read(path: Path, report: CleanReport, reject, spec: FormatSpec) -> Iterator[tuple[dict, str]]:
    def bad_line(where: str, reason: str, raw: str) -> None:
        report.records_in += 1
        report.unreadable += 1
        reject(where, "read", reason, raw)

    records = (pair for file in dataset_files(path) for pair in read_records(file, on_bad_line=bad_line))
    for record, where in records:
        report.records_in += 1
        try:
            record = as_messages_record(record, where, spec)
        except DataError as e:
            report.unreadable += 1
            reject(where, "read", str(e).removeprefix(f"{where}: "), record)
            continue
        report.chars_before.append(_chars(record))
        yield record, where


def as_messages_record(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> dict:
    """`{"messages": [...], **metadata}` from a record in any shape we read; the shape's own keys are consumed."""
    found = spec.format if spec.format != "auto" else detect_format(record, where)
    conversation = convert_record(record, where, replace(spec, format=found))
    consumed = {"messages", "tools"} if found == "messages" else {spec.column(key) for key in _CONSUMED[found]}
    # to_record keeps the tools and "loss": false flags of the conversation (nothing the reader understood is lost)
    return {**conversation.to_record(), **{k: v for k, v in record.items() if k not in consumed}}


def _chars(record: dict) -> int:
    return min(sum(len(m["content"]) for m in record["messages"]), 0xFFFFFFFF)


# --- per-record steps ----------------------------------------------------------------------------------------------

def _segments(steps: list[Step], stats: list[StepStats]) -> list[tuple[list, list]]:
    """Steps cut into segments: per-record steps, then the dedup steps that follow them (which need every record)."""
    segments: list[tuple[list, list]] = [([], [])]
    for step, stat in zip(steps, stats, strict=True):
        if step.kind == "dedup":
            segments[-1][1].append((step, stat))
        else:
            if segments[-1][1]:
                segments.append(([], []))
            segments[-1][0].append((step, stat))
    return segments


class RecordSteps:
    """The per-record steps of a segment, built once per process: apply() runs them on one record."""

    def __init__(self, steps: list[Step]):
        self.runners = [self._runner(step) for step in steps]

    @staticmethod
    def _runner(step: Step):
        if step.kind == "normalize":
            def normalize(record):
                messages = [{**m, "content": normalize_text(m["content"], step.options)} for m in record["messages"]]
                changed = any(a["content"] != b["content"] for a, b in zip(messages, record["messages"]))
                return {**record, "messages": messages}, None, changed, None
            return normalize
        if step.kind == "filter":
            filters = build_filters(step.options)

            def filter_(record):
                for f in filters:
                    try:
                        reason = f(record)
                    except DataError as e:  # e.g. a where condition on a column this record lacks
                        reason = str(e)
                    if reason is not None:
                        return record, (f"filter.{f.name}", reason), False, None
                return record, None, False, None
            return filter_
        options = step.options

        def pii(record):
            counts: Counter = Counter()
            messages = []
            for m in record["messages"]:
                if _in_field(m["role"], options.field):
                    text, found = mask_pii(m["content"], options.types)
                    counts.update(found)
                    m = {**m, "content": text}
                messages.append(m)
            return ({**record, "messages": messages}, None, bool(counts), counts) if counts else \
                (record, None, False, None)
        return pii

    def apply(self, record: dict) -> tuple[dict, tuple[int, str, str] | None, list]:
        """(record after the steps, (step index, step label, reason) if rejected, per step (changed, counts, s))."""
        effects = []
        for index, run in enumerate(self.runners):
            start = time.perf_counter()
            record, rejection, changed, counts = run(record)
            effects.append((changed, counts, time.perf_counter() - start))
            if rejection:
                return record, (index, *rejection), effects
        return record, None, effects


def _in_field(role: str, field_name: str) -> bool:
    return field_name == "all" or (role == "assistant") == (field_name == "answer")


_WORKER_STEPS: RecordSteps | None = None


def _worker_init(steps: list[Step]) -> None:
    global _WORKER_STEPS
    _WORKER_STEPS = RecordSteps(steps)


def _worker_chunk(chunk: list[tuple[dict, str]]) -> list:
    return [(where, *_WORKER_STEPS.apply(record)) for record, where in chunk]


def _chunks(stream: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in stream:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_record_steps(pairs: list[tuple[Step, StepStats]], stream: Iterator, reject, num_proc: int) -> Iterator:
    steps = [step for step, _ in pairs]
    stats = [stat for _, stat in pairs]
    if num_proc > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(num_proc, _worker_init, (steps,))
        results = (item for chunk in pool.imap(_worker_chunk, _chunks(stream, _CHUNK)) for item in chunk)
    else:
        pool = None
        runner = RecordSteps(steps)
        results = ((where, *runner.apply(record)) for record, where in stream)
    try:
        for where, record, rejection, effects in results:
            for stat, (changed, counts, seconds) in zip(stats, effects):
                stat.records_in += 1
                stat.changed += changed
                stat.seconds += seconds
                if counts:
                    stat.masked.update(counts)
            if rejection:
                index, label, reason = rejection
                stats[index].rejected += 1
                stats[index].reasons[label.removeprefix("filter.") + ": " + reason_kind(reason)] += 1
                reject(where, label, reason, record)
                continue
            yield record, where
    finally:
        if pool is not None:
            pool.terminate()


# --- dedup ---------------------------------------------------------------------------------------------------------

def _run_segment(segment: tuple[list, list], stream: Iterator, reject, num_proc: int, out_path: Path) -> Iterator:
    record_steps, dedup_steps = segment
    if record_steps:
        stream = _run_record_steps(record_steps, stream, reject, num_proc)
    if dedup_steps:
        stream = _deduplicate(dedup_steps, stream, reject, out_path)
    return stream


class _Fingerprints:
    """What one dedup step remembers per record during the first pass, and its clusters after it."""

    def __init__(self, options: DedupOptions):
        self.options = options
        if options.method == "exact":
            self.index = ExactDeduper()
        elif options.method == "near":
            self.index = NearDuplicateIndex(options.similarity_threshold(), options.ngram)
        else:
            self.texts: list[str] = []  # embedded at the end, in batches

    def add(self, record: dict) -> None:
        text = field_text(record, self.options.field)
        if self.options.method == "semantic":
            self.texts.append(text)
        else:
            self.index.add(text)

    def clusters(self) -> np.ndarray:
        if self.options.method == "semantic":
            return semantic_clusters(embed_texts(self.texts, self.options.model), self.options.similarity_threshold())
        return self.index.clusters()

    def similarity(self, i: int, j: int) -> float | None:
        return round(self.index.similarity(i, j), 2) if self.options.method == "near" else None


def _deduplicate(pairs: list[tuple[Step, StepStats]], stream: Iterator, reject, out_path: Path) -> Iterator:
    """Pass 1: spool the records and fingerprint them for every dedup step; then keep one record per cluster, step by
    step in recipe order (a later step sees only what earlier ones kept); pass 2: replay the spool."""
    prints = [_Fingerprints(step.options) for step, _ in pairs]
    is_best, votes, answer_chars = array("q"), array("q"), array("q")
    spool_path = out_path.with_name(f".{out_path.name}.spool-{os.getpid()}-{secrets.token_hex(4)}")
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    wheres: list[str] = []
    first = pairs[0][0].options
    try:
        with spool_path.open("w", encoding="utf-8") as spool:
            for record, where in stream:
                spool.write(json.dumps(record, ensure_ascii=False) + "\n")
                wheres.append(where)
                for fingerprint, (_, stat) in zip(prints, pairs):
                    start = time.perf_counter()
                    fingerprint.add(record)
                    stat.seconds += time.perf_counter() - start
                is_best.append(_int(record.get(first.is_best_column)))
                votes.append(_int(record.get(first.votes_column)))
                answer_chars.append(sum(map(len, field_texts(record, "answer"))))
        n = len(wheres)
        alive = np.ones(n, bool)
        dropped_by: dict[int, tuple[int, int, float | None]] = {}  # record → (step position, keeper, similarity)
        for position, ((step, stat), fingerprint) in enumerate(zip(pairs, prints)):
            start = time.perf_counter()
            labels = fingerprint.clusters() if n else np.zeros(0, np.int64)
            labels = np.where(alive, labels, -1 - np.arange(n))  # records already dropped are out of the running
            keeper = choose_keepers(labels, step.options.keep, is_best=is_best, votes=votes,
                                    answer_chars=answer_chars)
            duplicates = np.flatnonzero(alive & (keeper != np.arange(n)))
            stat.records_in = int(alive.sum())
            stat.rejected = len(duplicates)
            for i in duplicates.tolist():
                dropped_by[i] = (position, int(keeper[i]), fingerprint.similarity(i, int(keeper[i])))
            alive[duplicates] = False
            stat.seconds += time.perf_counter() - start
        samples = _sample_clusters(pairs, dropped_by)
        with spool_path.open(encoding="utf-8") as spool:
            for i, line in enumerate(spool):
                record = json.loads(line)
                for position, keeper_index, clusters in samples:
                    if i in clusters:
                        clusters[i] = {"line": wheres[i], "kept": i == keeper_index, "text": _excerpt(record)}
                if i in dropped_by:
                    position, kept, similarity = dropped_by[i]
                    step, stat = pairs[position]
                    reason = f"duplicate of {wheres[kept]} ({step.options.method}" + \
                        (f", similarity ≈ {similarity})" if similarity is not None else ")")
                    stat.reasons[f"duplicate ({step.options.method})"] += 1
                    reject(wheres[i], step.name, reason, record)
                    continue
                yield record, wheres[i]
        _store_samples(pairs, samples)
    finally:
        spool_path.unlink(missing_ok=True)


def _sample_clusters(pairs, dropped_by) -> list[tuple[int, int, dict]]:
    """The first few clusters with drops per dedup step: (step position, keeper index, {member index: None})."""
    clusters: dict[tuple[int, int], dict] = {}
    per_step = Counter()
    for i, (position, keeper, _) in sorted(dropped_by.items()):
        key = (position, keeper)
        if key not in clusters:
            if per_step[position] >= _CLUSTER_SAMPLES:
                continue
            per_step[position] += 1
            clusters[key] = {keeper: None}
        if len(clusters[key]) < 6:
            clusters[key][i] = None
    return [(position, keeper, members) for (position, keeper), members in clusters.items()]


def _store_samples(pairs, samples) -> None:
    for position, keeper, members in samples:
        stat = pairs[position][1]
        stat.clusters.append(sorted(members.values(), key=lambda m: not m["kept"]))  # the kept record first


def _excerpt(record: dict) -> str:
    text = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    return text if len(text) <= _SAMPLE_CHARS else text[:_SAMPLE_CHARS] + "…"


def _int(value: object) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0


# --- report helpers -------------------------------------------------------------------------------------------------

class _LanguageSample:
    """A reservoir sample of kept records whose languages make the report's language mix."""

    def __init__(self, size: int = _SAMPLE_TEXTS, seed: int = 0):
        self.size, self.seen, self.texts, self.random = size, 0, [], random.Random(seed)

    def offer(self, record: dict) -> None:
        self.seen += 1
        if len(self.texts) < self.size:
            self.texts.append(field_text(record, "all"))
        else:
            slot = self.random.randrange(self.seen)
            if slot < self.size:
                self.texts[slot] = field_text(record, "all")

    def mix(self) -> dict:
        counts = Counter(detect_language(text) or "undetermined" for text in self.texts)
        return {"sampled": len(self.texts), "of": self.seen, "counts": dict(counts.most_common())}


def _percentiles(values: array) -> dict:
    if not values:
        return {"count": 0}
    data = np.frombuffer(values, dtype=np.uint32)
    points = np.percentile(data, [50, 90, 99]).round().astype(int).tolist()
    return {"count": len(data), "mean": round(float(data.mean()), 1), "p50": points[0], "p90": points[1],
            "p99": points[2], "max": int(data.max())}
