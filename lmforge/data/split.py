"""`lmforge data split`: one records file → train / val / test JSONL files, reproducibly.

Owns which record goes to which split (a seeded hash ranking with exact sizes, --stratify, --group) and writing the
split files and their report atomically. Records are copied through unchanged: JSONL lines verbatim, JSON-array
records re-serialised with their keys in order. Must not convert, clean or judge records, nor hold all parsed
records in memory: pass 1 keeps a few numbers per record, pass 2 re-reads the file and writes each record out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataError, UserError
from .sources import file_format_of, read_records

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
# How assignment works, stated in every report so a reader of the files knows what "seed" meant.
METHOD = ("records (or --group groups) ranked by a hash of (seed, content or group value); val takes the lowest "
          "ranks, then test, per --stratify value; the rest is train")


@dataclass
class SplitReport:
    """What one split did; written as IN_STEM.split.json next to the input, or OUT_DIR/split.json."""

    input: str
    file_format: str  # "json" (an array) or "jsonl"
    seed: int
    requested: dict[str, float]  # as given: a fraction (< 1) or a count (>= 1), per split
    records: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    report_file: str = ""
    stratify: str | None = None
    strata: dict[str, dict[str, int]] | None = None  # stratum value → records per split
    group: str | None = None
    groups: dict[str, int] | None = None  # groups per split
    notes: list[str] = field(default_factory=list)
    method: str = METHOD

    def summary(self) -> str:
        parts = [f"{name} {self.sizes[name]} ({self.files[name]})" for name in SPLIT_NAMES if name in self.files]
        extra = "".join(f"; {note}" for note in self.notes)
        return (f"split {self.records} records of {self.input} (seed {self.seed}) → {', '.join(parts)}; report "
                f"{self.report_file}{extra}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(value: str | float, option: str) -> float:
    """A split size as the user wrote it: a fraction in (0, 1), a whole count >= 1, or 0 for "no such split"."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{option} {value!r}: expected a fraction below 1 (e.g. 0.05) or a record count "
                        f"(e.g. 200)") from None
    if not math.isfinite(number) or number < 0:
        raise UserError(f"{option} {value}: must be 0, a fraction below 1 (e.g. 0.05) or a record count (e.g. 200)")
    if number >= 1 and number != int(number):
        raise UserError(f"{option} {value}: a size of 1 or more is a record count and must be whole; for a share "
                        f"of the records give a fraction below 1 (e.g. 0.05)")
    return int(number) if number >= 1 else number


def split_file(in_path: str | Path, out_dir: str | Path | None = None, *, val: str | float = 0.05,
               test: str | float = 0, seed: int = 0, stratify: str | None = None,
               group: str | None = None) -> SplitReport:
    """Split a JSON/JSONL records file into train/val/test JSONL files plus a report; return the report."""
    in_path = Path(in_path)
    requested = {"val": parse_size(val, "--val"), "test": parse_size(test, "--test")}
    _check_requested(requested)
    paths = output_paths(in_path, out_dir)
    for name, path in paths.items():
        if path.resolve() == in_path.resolve():
            raise UserError(f"the {name} output {path} would overwrite the input file; rename the input or give "
                            f"another -o OUT_DIR")

    scan = _scan(in_path, seed, stratify, group)
    counts = {name: _requested_count(size, scan.records) for name, size in requested.items()}
    if counts["val"] + counts["test"] >= scan.records:
        raise UserError(f"{in_path}: val {counts['val']} + test {counts['test']} records leave none of the "
                        f"{scan.records} for train; ask for smaller --val/--test")
    unit_split = _assign(scan, counts["val"], counts["test"])
    if TRAIN not in unit_split:
        raise UserError(f"{in_path}: with --group {group!r}, the {len(unit_split)} groups all went to val or test, "
                        f"leaving none for train; ask for smaller --val/--test")

    wanted = [name for name in SPLIT_NAMES if name == "train" or counts[name] > 0]
    report = SplitReport(input=str(in_path), file_format=scan.file_format, seed=seed,
                         requested={name: size for name, size in requested.items() if size},
                         records=scan.records, files={name: str(paths[name]) for name in wanted},
                         report_file=str(paths["report"]), stratify=stratify, group=group)
    # An earlier split's file that this one does not replace would look like part of this split.
    stale = [paths[name] for name in SPLIT_NAMES if name not in wanted and paths[name].exists()]
    _write_splits(in_path, scan, unit_split, {name: paths[name] for name in wanted}, report, paths["report"],
                  [f"{path} is from an earlier split and was left as it was" for path in stale])
    return report


def output_paths(in_path: Path, out_dir: str | Path | None) -> dict[str, Path]:
    """IN_STEM.train.jsonl … next to the input, or train.jsonl … inside OUT_DIR; plus the report's path."""
    if out_dir is None:
        stem = in_path.name.rsplit(".", 1)[0] if "." in in_path.name else in_path.name
        names = {name: f"{stem}.{name}.jsonl" for name in SPLIT_NAMES} | {"report": f"{stem}.split.json"}
        return {name: in_path.parent / file for name, file in names.items()}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir}: is a file; -o names a directory to write train.jsonl, val.jsonl, … into")
    return {name: out_dir / f"{name}.jsonl" for name in SPLIT_NAMES} | {"report": out_dir / "split.json"}


# --- pass 1: a few numbers per record ------------------------------------------------------------------------------

@dataclass
class _Scan:
    """Pass 1's result. A unit is what moves between splits as a whole: a record, or every record of a --group."""

    file_format: str
    records: int = 0
    lines: array = field(default_factory=lambda: array("q"))  # line of each record (to copy JSONL lines verbatim)
    unit_of: array | None = None  # unit of each record, with --group (else record i is unit i)
    scores: array = field(default_factory=lambda: array("Q"))  # per unit: seeded hash, the ranking key
    sizes: array = field(default_factory=lambda: array("q"))  # per unit: records
    strata: array = field(default_factory=lambda: array("q"))  # per unit: index into stratum_names
    stratum_names: list[str] = field(default_factory=list)
    stratum_scores: list[int] = field(default_factory=list)  # tie-break when apportioning leftover records


def _scan(path: Path, seed: int, stratify: str | None, group: str | None) -> _Scan:
    scan = _Scan(file_format="")
    if group is not None:
        scan.unit_of = array("q")
    units: dict[bytes, int] = {}  # group digest → unit (groups only)
    first_seen: list[tuple[str, str]] = []  # per unit with --group: (where, stratum) of its first record
    strata: dict[str, int] = {}
    for record, where in read_records(path):
        scan.lines.append(int(where.rsplit(":", 1)[1]))
        scan.records += 1
        stratum = 0
        if stratify is not None:
            value = _canonical(lookup(record, stratify, where, "--stratify"))
            if value not in strata:
                strata[value] = len(strata)
                scan.stratum_names.append(_display(value))
                scan.stratum_scores.append(_score(seed, b"stratum\0" + value.encode()))
            stratum = strata[value]
        if group is None:  # a record's own content ranks it: stable when other records are added or reordered
            scan.scores.append(_score(seed, b"record\0" + _canonical(record).encode()))
            scan.sizes.append(1)
            scan.strata.append(stratum)
            continue
        value = lookup(record, group, where, "--group")
        if value is None:
            raise DataError(f"{where}: --group key {group!r} is null; every record needs a value that names its "
                            f"group (e.g. a conversation id)")
        key = b"group\0" + _canonical(value).encode()
        digest = hashlib.blake2b(key, digest_size=16).digest()
        unit = units.setdefault(digest, len(units))
        if unit == len(scan.sizes):
            scan.scores.append(_score(seed, key))
            scan.sizes.append(0)
            scan.strata.append(stratum)
            first_seen.append((where, scan.stratum_names[stratum] if stratify else ""))
        elif scan.strata[unit] != stratum:
            first_where, first_stratum = first_seen[unit]
            raise UserError(f"{where}: --group {group!r} = {_display(_canonical(value))} also appears at "
                            f"{first_where} with a different --stratify {stratify!r} value ({first_stratum!r} "
                            f"there, {scan.stratum_names[stratum]!r} here). A group moves as a whole, so it must sit "
                            f"in one stratum: stratify by a key that is the same within each group, or drop one "
                            f"of the two options")
        scan.sizes[unit] += 1
        scan.unit_of.append(unit)
    if stratify is None:
        scan.stratum_names, scan.stratum_scores = [""], [0]
    scan.file_format = file_format_of(path)  # after reading: read_records has reported a missing or empty file
    return scan


def lookup(record: dict, key: str, where: str, option: str) -> object:
    """record[key], where KEY may be a dotted path into nested objects and lists (meta.category, messages.0.role)."""
    if key in record:
        return record[key]
    node: object = record
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            place = f"under {'.'.join(walked)!r}" if walked else "in the record"
            if isinstance(node, dict):
                there = f"keys there: {', '.join(node) or 'none'}"
            elif isinstance(node, list):
                there = f"a list of {len(node)} items there"
            else:
                there = f"a {type(node).__name__} there, not an object"
            raise DataError(f"{where}: {option} key {key!r} is missing: no {part!r} {place} ({there}). Every record "
                            f"needs the key; pick one that all records have")
        walked.append(part)
    return node


def _canonical(value: object) -> str:
    # sort_keys: the same content ranks the same whatever order its keys were written in
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _display(canonical: str) -> str:
    value = json.loads(canonical)
    return value if isinstance(value, str) else canonical


def _score(seed: int, key: bytes) -> int:
    # blake2b, not hash(): Python's str hash changes with PYTHONHASHSEED, and the split must not
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest(), "big")


# --- assignment ----------------------------------------------------------------------------------------------------

def _check_requested(requested: dict[str, float]) -> None:
    if not any(requested.values()):
        raise UserError("--val 0 and --test 0 leave nothing to split off; ask for a validation and/or test set, "
                        "e.g. --val 0.05 or --test 200")
    fractions = [size for size in requested.values() if 0 < size < 1]
    if len(fractions) == 2 and sum(fractions) >= 1:
        raise UserError(f"--val {requested['val']} + --test {requested['test']} = {sum(fractions):g} of the "
                        f"records, leaving none for train; the fractions must add up to less than 1")


def _requested_count(size: float, records: int) -> int:
    if size == 0:
        return 0
    if size >= 1:
        return int(size)
    # Round half up; a split asked for is never empty (a 0.05 validation share of 10 records is 1, not 0).
    return max(1, math.floor(size * records + 0.5))


def _assign(scan: _Scan, n_val: int, n_test: int) -> bytearray:
    """Each unit's split. Per stratum, units in ranked order fill val, then test, each up to its target.

    A ranking rather than a hash threshold gives exact sizes (a threshold gives binomial ones, off by several
    records on small sets); because ranks come from content, adding records moves only units near the boundaries.
    With --group a unit that would overshoot a target more than it fills goes on to the next split, so sizes come
    as close as the group sizes allow.
    """
    n_strata = len(scan.stratum_names)
    per_stratum = [0] * n_strata
    for unit, size in enumerate(scan.sizes):
        per_stratum[scan.strata[unit]] += size
    val_targets = _apportion(n_val, per_stratum, per_stratum, scan.stratum_scores)
    room = [count - taken for count, taken in zip(per_stratum, val_targets)]
    test_targets = _apportion(n_test, per_stratum, room, scan.stratum_scores)
    filled = [[0] * n_strata for _ in SPLIT_NAMES]
    unit_split = bytearray(len(scan.sizes))  # TRAIN unless assigned below
    for unit in sorted(range(len(scan.sizes)), key=lambda u: (scan.scores[u], u)):
        stratum, size = scan.strata[unit], scan.sizes[unit]
        for split, targets in ((VAL, val_targets), (TEST, test_targets)):
            have, want = filled[split][stratum], targets[stratum]
            if have < want and have + size - want <= want - have:
                filled[split][stratum] += size
                unit_split[unit] = split
                break
    return unit_split


def _apportion(total: int, counts: list[int], caps: list[int], tie_scores: list[int]) -> list[int]:
    """Split `total` across strata in proportion to `counts` (largest remainder, so the sum is exactly `total`),
    never giving a stratum more than its cap."""
    whole = sum(counts)
    shares = [min(total * count // whole, cap) for count, cap in zip(counts, caps)]
    by_remainder = sorted(range(len(counts)), key=lambda s: (-(total * counts[s] % whole), tie_scores[s], s))
    while sum(shares) < total:  # terminates: the caps add up to at least `total` (checked before assignment)
        for s in by_remainder:
            if sum(shares) < total and shares[s] < caps[s]:
                shares[s] += 1
    return shares


# --- pass 2: write -------------------------------------------------------------------------------------------------

def _write_splits(in_path: Path, scan: _Scan, unit_split: bytearray, paths: dict[str, Path], report: SplitReport,
                  report_path: Path, notes: list[str]) -> None:
    """Pass 2: every record to its split's file; then the report (sizes, strata, groups, notes) beside them."""
    sizes = dict.fromkeys(paths, 0)
    strata = [dict.fromkeys(paths, 0) for _ in scan.stratum_names]
    with _AtomicFiles() as files:
        handles = {SPLIT_NAMES.index(name): files.open(path) for name, path in paths.items()}
        written = 0
        for text in _record_texts(in_path, scan):
            if written == scan.records:
                raise _changed_while_splitting(in_path)
            unit = scan.unit_of[written] if scan.unit_of is not None else written
            split = unit_split[unit]
            handles[split].write(text + "\n")
            sizes[SPLIT_NAMES[split]] += 1
            strata[scan.strata[unit]][SPLIT_NAMES[split]] += 1
            written += 1
        if written != scan.records:
            raise _changed_while_splitting(in_path)
        report.sizes = sizes
        if report.stratify is not None:
            report.strata = dict(zip(scan.stratum_names, strata))
        if report.group is not None:
            report.groups = dict.fromkeys(paths, 0)
            for split in unit_split:
                report.groups[SPLIT_NAMES[split]] += 1
        report.notes = _notes(report, scan) + notes
        files.open(report_path).write(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")
        files.commit()


def _changed_while_splitting(in_path: Path) -> DataError:
    return DataError(f"{in_path} changed while it was being split (the second reading found a different number of "
                     f"records than the first); run the split again when nothing is writing to the file")


def _record_texts(in_path: Path, scan: _Scan):
    """Each record's JSON text, in file order: the JSONL line itself, or a JSON-array record re-serialised."""
    if scan.file_format == "json":
        for record, _ in read_records(in_path, "json"):
            yield json.dumps(record, ensure_ascii=False)
        return
    lines = iter(scan.lines)
    wanted = next(lines, None)
    with in_path.open("rb") as handle:  # bytes split on b"\n" only, numbering lines as sources.py does
        for number, raw in enumerate(handle, start=1):
            if number == wanted:
                yield raw.decode("utf-8-sig").strip(" \t\r\n")
                wanted = next(lines, None)


def _notes(report: SplitReport, scan: _Scan) -> list[str]:
    notes = []
    for name in ("val", "test"):
        asked = report.requested.get(name, 0)
        wanted = _requested_count(asked, report.records)
        if asked and report.sizes[name] != wanted:
            notes.append(f"{name} has {report.sizes[name]} records, not {wanted}: --group keeps each group whole")
    if report.stratify is not None and len(scan.stratum_names) > report.records / 2:
        notes.append(f"--stratify {report.stratify!r} has {len(scan.stratum_names)} distinct values for "
                     f"{report.records} records, so most values have one record and their proportions cannot be "
                     f"kept (a per-record id belongs in --group)")
    return notes


class _AtomicFiles:
    """Files written under temporary names in their target directory, renamed into place by commit(); removed if
    anything fails first, so a split never leaves half-written files behind."""

    def __init__(self):
        self.files: list[tuple[Path, Path, object]] = []

    def __enter__(self) -> _AtomicFiles:
        return self

    def open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        handle = tmp.open("x", encoding="utf-8", newline="\n")
        self.files.append((path, tmp, handle))
        return handle

    def commit(self) -> None:
        for _, _, handle in self.files:
            handle.close()
        for path, tmp, _ in self.files:
            os.replace(tmp, path)
        self.files = []

    def __exit__(self, *exc) -> None:
        for _, tmp, handle in self.files:
            handle.close()
            tmp.unlink(missing_ok=True)
