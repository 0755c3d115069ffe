"""Documents → Sections: the text of .txt / .md / .pdf / .docx files and of .csv / .tsv / .jsonl rows, with where it is.

Owns reading knowledge-base inputs: which suffixes are documents, walking folders, decoding text (UTF-8, UTF-8 with
BOM, GB18030), PDF pages (pypdf), Word paragraphs (python-docx) and one passage per table / JSON Lines row. A file
that cannot be read raises Unreadable with the reason, so the build reports it and goes on. Must not chunk, embed or
index (chunking.py, embedding.py, store.py do).

A Section's `line` is the 1-based line of the file (or PDF page, or Word paragraph) its text starts on; newlines
inside the text count further lines, so a chunk can name its line range.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..data.tabular import Rejected, open_table
from ..errors import DataError, UserError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
ROW_SUFFIXES = (".csv", ".tsv", ".jsonl")
DOCUMENT_SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".docx", *ROW_SUFFIXES)


class Unreadable(Exception):
    """A document that cannot be read (encrypted PDF, undecodable text, damaged file): the reason is the message."""


@dataclass(frozen=True)
class Section:
    text: str
    line: int              # 1-based: file line, Word paragraph, or the row's line
    page: int | None = None  # 1-based PDF page
    row: bool = False      # one table / JSON Lines row (a passage of its own)


@dataclass(frozen=True)
class RowColumns:
    """Which fields of a .csv / .tsv / .jsonl row make its passage (None: every field), and the text encoding."""

    columns: tuple[str, ...] | None = None
    encoding: str | None = None


def collect_files(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The documents named by `paths` (files, and folders walked recursively, in sorted order), and the files of
    those folders that are not documents, each with the reason it is skipped. A missing path or an explicit file
    of an unknown type is a UserError."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UserError(f"{given}: no such file or folder (relative paths start at {Path.cwd()})")
        if path.is_file():
            if path.suffix.lower() not in DOCUMENT_SUFFIXES:
                raise UserError(f"{given}: {path.suffix or 'no suffix'} is not a document type lmforge kb reads; "
                                f"give {', '.join(DOCUMENT_SUFFIXES)} files or a folder of them")
            found.append(path.resolve())
            continue
        for child in sorted(path.rglob("*")):
            relative = child.relative_to(path)
            if any(part.startswith(".") for part in relative.parts) or not child.is_file():
                continue  # hidden files and folders (.git, .DS_Store) are not documents
            if child.suffix.lower() in DOCUMENT_SUFFIXES:
                found.append(child.resolve())
            else:
                skipped.append((child.resolve(), f"{child.suffix or 'no suffix'} is not a document type"))
    unique = list(dict.fromkeys(found))
    return unique, skipped


def read_sections(path: Path, rows: RowColumns = RowColumns()) -> tuple[list[Section], list[str]]:
    """Every Section of one document, and the rows of a table that could not be read ("line N: reason"); raises
    Unreadable with the reason when the document as a whole cannot be read."""
    suffix = path.suffix.lower()
    problems: list[str] = []
    try:
        if suffix in TEXT_SUFFIXES:
            return [Section(decode_text(path.read_bytes(), rows.encoding), 1)], problems
        if suffix == ".pdf":
            return _pdf_sections(path), problems
        if suffix == ".docx":
            return _docx_sections(path), problems
        if suffix == ".jsonl":
            return list(_jsonl_sections(path, rows, problems)), problems
        return list(_table_sections(path, rows, problems)), problems
    except Unreadable:
        raise
    except DataError as error:
        raise Unreadable(str(error).removeprefix(f"{path}: ")) from None
    except (OSError, ValueError, KeyError) as error:
        raise Unreadable(f"{type(error).__name__}: {error}") from None


def decode_text(data: bytes, encoding: str | None = None) -> str:
    if encoding:
        try:
            return data.decode(encoding)
        except (UnicodeDecodeError, LookupError) as error:
            raise Unreadable(f"cannot be decoded as {encoding} ({error})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        try:
            text = data.decode("gb18030")
        except UnicodeDecodeError:
            raise Unreadable(f"not UTF-8 (byte {error.start}: {error.reason}) and not GB18030 either; save it as "
                             f"UTF-8 or pass --encoding") from None
        if "\x00" in text:
            raise Unreadable("binary content (NUL bytes), not text") from None
        return text


def _pdf_sections(path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # an owner-password-only PDF opens with the empty user password
            except Exception as error:
                raise Unreadable(f"encrypted PDF ({error})") from None
            if not opened:
                raise Unreadable("encrypted PDF: it needs a password; save a decrypted copy") from None
        sections = [Section(page.extract_text() or "", 1, page=number)
                    for number, page in enumerate(reader.pages, start=1)]
    except PdfReadError as error:
        raise Unreadable(f"damaged or not a PDF ({error})") from None
    if not any(section.text.strip() for section in sections):
        raise Unreadable(f"no text on any of its {len(sections)} pages (a scanned PDF needs OCR first)")
    return sections


def _docx_sections(path: Path) -> list[Section]:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise Unreadable(f"damaged or not a Word .docx file ({error})") from None
    paragraphs = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            paragraphs.append(" | ".join(cell.text for cell in row.cells))
    return [Section("\n".join(paragraphs), 1)]


def row_text(record: dict, columns: tuple[str, ...] | None, where: str) -> str:
    names = columns or tuple(record)
    missing = [name for name in names if name not in record]
    if missing:
        raise Unreadable(f"{where}: no column {', '.join(map(repr, missing))}; it has {', '.join(map(repr, record))}")
    values = [(name, record[name]) for name in names]
    values = [(name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
              for name, value in values if value not in (None, "")]
    if len(names) == 1:
        return values[0][1] if values else ""
    return "\n".join(f"{name}: {value}" for name, value in values)


def _jsonl_sections(path: Path, rows: RowColumns, problems: list[str]) -> Iterator[Section]:
    text = decode_text(path.read_bytes(), rows.encoding)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not JSON ({error.msg}, column {error.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: a JSON {type(record).__name__}, expected an object per line")
            continue
        yield Section(row_text(record, rows.columns, f"line {number}"), number, row=True)


def _table_sections(path: Path, rows: RowColumns, problems: list[str]) -> Iterator[Section]:
    with open_table(path, encoding=rows.encoding) as table:
        if rows.columns:
            missing = [name for name in rows.columns if name not in table.columns]
            if missing:
                raise Unreadable(f"no column {', '.join(map(repr, missing))}; its header has "
                                 f"{', '.join(map(repr, table.columns))}")
        for record, where in table.rows:
            line = int(where.rsplit(":", 1)[1])
            if isinstance(record, Rejected):
                problems.append(f"line {line}: {record.reason}")
                continue
            yield Section(row_text(record, rows.columns, where), line, row=True)
