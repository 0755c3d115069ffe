"""Reading dataset files into plain JSON records, each tagged with where it came from ("path:line").

Owns file handling: existence, encodings (UTF-8, with or without BOM), JSON array vs JSONL detection, and
file:line:col error messages for malformed JSON. Must not interpret what a record means (formats.py does that).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import DataError

FILE_FORMATS = ("json", "jsonl")
UNSUPPORTED_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet", ".arrow", ".xlsx", ".xls")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".xlsx")  # what `lmforge data convert` reads
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_HEAD_BYTES = 65536


def read_records(path: str | Path, file_format: str | None = None,
                 on_bad_line: Callable[[str, str, str], None] | None = None) -> Iterator[tuple[dict, str]]:
    """Yield (record, "path:line") for every record in a JSON-array or JSONL file.

    The format is detected from the first non-whitespace character ('[' → JSON array, '{' → JSONL), whatever the
    file's suffix says; pass file_format="json" or "jsonl" to force one. JSONL is streamed line by line (memory does
    not grow with the file). on_bad_line(where, reason, raw_line): for JSONL, called for a line that is not valid
    UTF-8, not valid JSON or not an object, instead of raising, so a large run can set such lines aside.
    """
    if file_format is not None and file_format not in FILE_FORMATS:
        raise DataError(f"unknown file_format {file_format!r}; expected one of {', '.join(FILE_FORMATS)} "
                        f"(or leave it unset to detect it from the file)")
    path = Path(path)
    head = _check_file(path)
    if file_format is None:
        reject_unsupported_suffix(path)
    start = _skip_whitespace(head, 0)
    if start == len(head):
        raise DataError(f"{path}: the file is empty (no records); add records or remove it from the dataset list")
    file_format = file_format or detect_file_format(head, start, path)
    if file_format == "jsonl":
        yield from _jsonl_records(path, on_bad_line)
        return
    text = read_text(path)
    for value, line in _json_values(text, _skip_whitespace(text, 0), path):
        where = f"{path}:{line}"
        if not isinstance(value, dict):
            raise DataError(_not_an_object(where, value))
        yield value, where


def file_format_of(path: Path) -> str:
    """'json' when the first non-blank character (after a UTF-8 BOM) is '[', else 'jsonl' (as read_records detects
    it); for a file read_records has already accepted."""
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_HEAD_BYTES):
            text = chunk.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if text:
                return "json" if text.startswith(b"[") else "jsonl"
    return "jsonl"


def _not_an_object(where: str, value: object) -> str:
    return (f"{where}: record is a JSON {_json_type(value)} {_preview(value)}, expected a JSON object {{...}} with "
            f"one example's fields")


def read_json_file(path: str | Path) -> object:
    """Parse a whole file as one JSON document (used for dataset_info.json)."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid_json(path, e.lineno, e.colno, e.msg, "the file must be one valid JSON document") from None


def _check_file(path: Path) -> str:
    """The first non-blank part of the file as text; clear errors for missing, non-file, UTF-16 or binary paths."""
    if not path.exists():
        raise DataError(f"file not found: {path} (relative paths are resolved from the current directory, "
                        f"{Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected a dataset file (.json or .jsonl)")
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{path}: the file is UTF-16 text; re-save it as UTF-8")
        while head and not head.strip():  # skip a long run of blank lines without reading the whole file
            head = f.read(_HEAD_BYTES)
    return head.decode("utf-8-sig", errors="replace")


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a BOM is dropped); clear errors for missing, non-file or non-UTF-8 paths."""
    _check_file(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text (byte 0x{data[e.start]:02x}); "
                        f"re-save the file as UTF-8") from None


def reject_unsupported_suffix(path: Path) -> None:
    if path.suffix.lower() in UNSUPPORTED_SUFFIXES:
        hint = (f"convert it first: lmforge data convert {path} -o {path.with_suffix('.jsonl')} "
                f"--map user=COLUMN --map assistant=COLUMN" if path.suffix.lower() in TABLE_SUFFIXES
                else "convert it to .jsonl with one record per line")
        raise DataError(f"{path}: training reads JSON arrays and JSONL (one conversation per record), not "
                        f"{path.suffix} files; {hint}")


def detect_file_format(text: str, start: int, path: Path) -> str:
    """'json' for a file that opens with '[', 'jsonl' for one that opens with '{'."""
    first = text[start]
    if first == "[":
        return "json"
    if first == "{":
        return "jsonl"
    line, col = _line_and_column(text, start)
    raise DataError(f"{path}:{line}:{col}: cannot tell the file format: expected '[' (a JSON array of records) or "
                    f"'{{' (JSONL, one record per line), found {first!r}")


def _json_values(text: str, start: int, path: Path) -> Iterator[tuple[object, int]]:
    """Values of a JSON array with the line each one starts on, found by raw_decode-scanning the array."""
    if text[start] != "[":
        yield from _json_document(text, path)
        return
    lines = _LineCounter(text)
    pos = _skip_whitespace(text, start + 1)
    if text.startswith("]", pos):
        raise DataError(f"{path}: the file is empty (the JSON array has no records); add records or remove it "
                        f"from the dataset list")
    while True:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _invalid_json(path, e.lineno, e.colno, e.msg, _ARRAY_HINT) from None
        yield value, lines.line_at(pos)
        pos = _skip_whitespace(text, end)
        if text.startswith(",", pos):
            pos = _skip_whitespace(text, pos + 1)
            if text.startswith("]", pos):
                raise _invalid_at(path, text, pos, "trailing comma before ']'", "remove the last comma")
            continue
        if text.startswith("]", pos):
            break
        raise _invalid_at(path, text, pos, "expected ',' or ']' after a record", _ARRAY_HINT)
    pos = _skip_whitespace(text, pos + 1)
    if pos < len(text):
        raise _invalid_at(path, text, pos, "extra data after the closing ']'",
                          "a JSON array file holds exactly one array; remove what follows it")


def _json_document(text: str, path: Path) -> Iterator[tuple[object, int]]:
    """file_format="json" on a file that does not open with '[': parse it whole; it must be an array."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("is this JSONL (one object per line)? Leave file_format unset or set it to 'jsonl'"
                if e.msg == "Extra data" else _ARRAY_HINT)
        raise _invalid_json(path, e.lineno, e.colno, e.msg, hint) from None
    raise DataError(f"{path}: the top level is a JSON {_json_type(value)}, expected an array of records "
                    f"[{{...}}, {{...}}]; if the records sit under a key (e.g. {{\"data\": [...]}}), save that list "
                    f"on its own")


def _jsonl_records(path: Path, on_bad_line: Callable[[str, str, str], None] | None
                   ) -> Iterator[tuple[dict, str]]:
    # Lines are split on b"\n" only (not U+2028 etc., which would skew line numbers), and decoded one at a time.
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 text (byte 0x{raw[e.start]:02x})"
                if on_bad_line is None:
                    raise DataError(f"{where}: {reason}; re-save the file as UTF-8") from None
                on_bad_line(where, reason, raw.decode("utf-8", errors="replace"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if on_bad_line is None:
                    raise _invalid_json(path, line_number, e.colno, e.msg, _jsonl_hint(path, line)) from None
                on_bad_line(where, f"invalid JSON: {e.msg} (column {e.colno})", line.rstrip("\r\n"))
                continue
            if not isinstance(value, dict):
                if on_bad_line is None:
                    raise DataError(_not_an_object(where, value))
                on_bad_line(where, f"not a JSON object but a {_json_type(value)}", line.rstrip("\r\n"))
                continue
            yield value, where


def _jsonl_hint(path: Path, line: str) -> str:
    if line.strip().startswith("["):
        return "this line opens a JSON array; if the whole file is one array, use file_format='json' or leave it unset"
    try:
        json.loads(read_text(path))
    except json.JSONDecodeError:
        return ("each line of a JSONL file must hold one complete JSON object; is this JSONL with a broken line "
                "(a record split over lines, a missing quote or brace)?")
    return ("the file is one JSON object spread over several lines, not JSONL; put the records in a JSON array "
            "[{...}, {...}] or write one record per line")


_ARRAY_HINT = "look for a missing or extra comma, an unescaped quote, or an unclosed bracket near that position"


def _invalid_json(path: Path, line: int, col: int, message: str, hint: str) -> DataError:
    return DataError(f"{path}:{line}:{col}: invalid JSON: {message}\n  hint: {hint}")


def _invalid_at(path: Path, text: str, pos: int, message: str, hint: str) -> DataError:
    line, col = _line_and_column(text, pos)
    return _invalid_json(path, line, col, message, hint)


def _line_and_column(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


class _LineCounter:
    """Line numbers for increasing offsets in O(total length), instead of recounting from 0 per record."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def line_at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _preview(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text[:60] + ("…" if len(text) > 60 else "")
