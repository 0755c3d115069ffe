"""Streaming readers for tables: CSV/TSV, XLSX and Parquet rows as dicts, each tagged "path:line".

Owns table files: encodings (UTF-8, UTF-8 with BOM, GBK/GB18030 detected or forced), quoting, headers, and rows that
cannot be read (ragged, undecodable), which are yielded as Rejected (or raise DataError in strict mode). Never holds
more than one record (or one Parquet batch) in memory. Must not interpret what the columns mean (convert.py does).

Where a row came from: CSV/TSV → the line its record starts on; XLSX → the spreadsheet row number (header = 1);
Parquet → the 1-based row index. Cell values are kept as the file stores them: CSV/TSV cells are strings, XLSX and
Parquet cells keep their numbers; an empty cell is "" in every format.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import decimal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, UserError

TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx", ".parquet")
SAMPLE_BYTES = 1 << 20  # enough text to tell UTF-8 from GB18030
# One cell's limit. It is also what bounds memory when a quote never closes: the csv module would otherwise read
# the rest of the file into that one field.
MAX_FIELD_CHARS = 16 << 20
PARQUET_BATCH_ROWS = 1024
_UTF8_BOM = codecs.BOM_UTF8
_ENCODING_HINT = "pass --encoding (e.g. --encoding gb18030 for files saved by Excel on Chinese Windows)"


@dataclass(frozen=True)
class Rejected:
    """A row that could not be read: why, and what could be read of it (for the rejects file)."""

    reason: str
    row: dict | list


@dataclass
class Table:
    """An open table: its column names, and `rows` to iterate once."""

    path: Path
    columns: list[str]
    rows: Iterator[tuple[dict | Rejected, str]]
    close: Callable[[], None]
    blank_rows: int = 0  # rows with every cell empty (Excel leaves them at the end); skipped, not counted as read
    _decoder: _LineDecoder | None = field(default=None, repr=False)

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def encoding(self) -> str | None:
        """The text encoding (CSV/TSV only). It may change once while reading: when auto-detection saw only ASCII
        in the first MiB and then meets a GB18030 line (see _LineDecoder)."""
        return self._decoder.name if self._decoder else None


def open_table(path: str | Path, *, encoding: str | None = None, strict: bool = False) -> Table:
    """Open a .csv, .tsv, .xlsx or .parquet file and read its header; rows stream from Table.rows.

    encoding forces a text encoding for CSV/TSV (default: detected). In strict mode the first unreadable row raises
    DataError naming path:line; otherwise it is yielded as (Rejected(reason, row), where).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path} (relative paths are resolved from the current directory, "
                        f"{Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected a table file ({', '.join(TABLE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _open_csv(path, "\t" if suffix == ".tsv" else None, encoding, strict)
    if encoding is not None:
        raise UserError(f"--encoding applies to CSV/TSV text files; {path.name} is a {suffix} file, which stores "
                        f"its own encoding. Remove --encoding")
    if suffix == ".xlsx":
        return _open_xlsx(path, strict)
    if suffix == ".parquet":
        return _open_parquet(path)
    if suffix == ".xls":
        raise DataError(f"{path}: old Excel .xls files are not supported; in Excel, save it as .xlsx or CSV UTF-8")
    raise DataError(f"{path}: {suffix or 'no suffix'} is not a table format; expected {', '.join(TABLE_SUFFIXES)}")


# --- CSV / TSV ---------------------------------------------------------------------------------------------------

def _open_csv(path: Path, delimiter: str | None, encoding: str | None, strict: bool) -> Table:
    forced = _normalise_encoding(encoding) if encoding is not None else None
    handle = path.open("rb")
    try:
        sample = handle.read(SAMPLE_BYTES)
        handle.seek(0)
        if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise DataError(f"{path}: the file is UTF-16 text (Excel's \"Unicode text\"); save it as \"CSV UTF-8\" "
                            f"or pass --encoding utf-16")
        if not sample.removeprefix(_UTF8_BOM).strip():
            raise DataError(f"{path}: the file is empty (no header, no rows)")
        has_bom = sample.startswith(_UTF8_BOM)
        decoder = _LineDecoder(forced or _detect_encoding(sample), forced=forced is not None, bom=has_bom)
        lines = _decoded_lines(handle, decoder)
        if csv.field_size_limit() < MAX_FIELD_CHARS:
            csv.field_size_limit(MAX_FIELD_CHARS)
        reader = csv.reader(lines, delimiter=delimiter or _sniff_delimiter(sample, decoder))
        header, header_line = _csv_header(reader, path, decoder)
        columns = _column_names(header, path, header_line)
    except BaseException:
        handle.close()
        raise
    table = Table(path, columns, iter(()), handle.close, _decoder=decoder)
    table.rows = _csv_rows(table, reader, decoder, strict)
    return table


def _csv_header(reader, path: Path, decoder: _LineDecoder) -> tuple[list[str], int]:
    for fields, line in _csv_records(reader, path):
        if not any(f.strip() for f in fields):
            continue
        if decoder.bad_lines:
            raise DataError(f"{path}:{decoder.bad_lines[0][0]}: the header line is not valid {decoder.name} text "
                            f"({decoder.bad_lines[0][1]}); {_ENCODING_HINT}")
        return fields, line
    raise DataError(f"{path}: the file is empty (no header, no rows)")


def _csv_rows(table: Table, reader, decoder: _LineDecoder, strict: bool) -> Iterator[tuple[dict | Rejected, str]]:
    columns, path = table.columns, table.path
    for fields, start in _csv_records(reader, path):
        where = f"{path}:{start}"
        bad = decoder.take_bad_lines(reader.line_num)
        if bad:
            line, detail = bad[0]
            reason = (f"undecodable bytes: line {line} is not valid {decoder.name} ({detail}); the row shows U+FFFD in "
                      f"their place. If the whole file is in another encoding, {_ENCODING_HINT}")
            yield _problem(reason, dict(zip(columns, fields)) if len(fields) == len(columns) else fields,
                           where, strict)
            continue
        if not any(f.strip() for f in fields):
            table.blank_rows += 1
            continue
        if len(fields) != len(columns):
            reason = (f"ragged row: {len(fields)} fields but the header has {len(columns)} columns "
                      f"({', '.join(columns)}); a field containing the delimiter or a line break must be quoted")
            yield _problem(reason, fields, where, strict)
            continue
        yield dict(zip(columns, fields)), where


def _csv_records(reader, path: Path) -> Iterator[tuple[list[str], int]]:
    """(fields, line the record starts on) from csv.reader, skipping empty lines; csv errors (which end the file:
    the parser cannot resync) become DataError."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = ("a quoted field probably never closes (an unbalanced \" at or before this line)"
                    if "field limit" in str(e) else "check the quoting at this line")
            raise DataError(f"{path}:{reader.line_num}: cannot parse the CSV: {e}; {hint}") from None
        if fields:  # csv yields [] for an empty line
            yield fields, start


def _detect_encoding(sample: bytes) -> str:
    """UTF-8 (with or without BOM) when the sample decodes as UTF-8, else GB18030 (a superset of GBK) when it
    decodes as that; else UTF-8, so that the undecodable rows are rejected with a hint to pass --encoding."""
    sample = sample.removeprefix(_UTF8_BOM)
    for name in ("utf-8", "gb18030"):
        decoder = codecs.getincrementaldecoder(name)()
        try:
            for start in range(0, len(sample), 1 << 16):  # in pieces, so the decoded text is never all held
                # final=False: the sample may end inside a multi-byte character
                decoder.decode(sample[start:start + (1 << 16)], final=False)
            return name
        except UnicodeDecodeError:
            continue
    return "utf-8"


class _LineDecoder:
    """Decodes one physical line at a time, so an undecodable byte costs one row, not the file.

    Line-at-a-time is safe for UTF-8 and GBK/GB18030: neither uses the byte 0x0A inside a multi-byte character.
    Auto-detection looks at the first MiB only; when that was pure ASCII and a later line is GB18030 but not UTF-8,
    the decoder switches to GB18030 for the rest of the file (the ASCII lines read so far decode the same in both).
    """

    def __init__(self, name: str, *, forced: bool, bom: bool):
        self.name, self.forced, self.bom = name, forced, bom
        self.seen_non_ascii = False
        self.bad_lines: list[tuple[int, str]] = []  # (line, detail) not yet claimed by a record

    @property
    def codec(self) -> str:
        return "utf-8" if self.name == "utf-8-sig" else self.name  # the BOM is stripped from the first line only

    def decode(self, raw: bytes, line: int) -> str:
        if line == 1 and self.bom:
            raw = raw.removeprefix(_UTF8_BOM)
            if self.name == "utf-8" and not self.forced:
                self.name = "utf-8-sig"
        try:
            text = raw.decode(self.codec)
        except UnicodeDecodeError as e:
            if self._switch_to_gb18030(raw):
                return raw.decode("gb18030")
            self.bad_lines.append((line, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"))
            return raw.decode(self.codec, errors="replace")
        if not self.seen_non_ascii and not raw.isascii():
            self.seen_non_ascii = True
        return text

    def take_bad_lines(self, up_to: int) -> list[tuple[int, str]]:
        taken = [bad for bad in self.bad_lines if bad[0] <= up_to]
        if taken:
            self.bad_lines = [bad for bad in self.bad_lines if bad[0] > up_to]
        return taken

    def _switch_to_gb18030(self, raw: bytes) -> bool:
        if self.forced or self.seen_non_ascii or self.codec != "utf-8" or self.bom:
            return False
        try:
            raw.decode("gb18030")
        except UnicodeDecodeError:
            return False
        self.name = "gb18030"
        self.seen_non_ascii = True
        return True


def _decoded_lines(handle, decoder: _LineDecoder) -> Iterator[str]:
    for number, raw in enumerate(handle, start=1):
        yield decoder.decode(raw, number)


def _sniff_delimiter(sample: bytes, decoder: _LineDecoder) -> str:
    """',' unless the first line has more ';' than ',' (Excel in locales with a decimal comma writes ';')."""
    first = sample.removeprefix(_UTF8_BOM).split(b"\n", 1)[0].decode(decoder.codec, errors="replace")
    return ";" if first.count(";") > first.count(",") else ","


def _normalise_encoding(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"unknown encoding {encoding!r}; use e.g. utf-8, utf-8-sig, gbk, gb18030, big5, latin-1, "
                        f"or leave --encoding out to detect UTF-8 / GB18030") from None
    return "gb18030" if name == "gbk" else name  # GB18030 decodes every GBK file and more


# --- XLSX ---------------------------------------------------------------------------------------------------------

def _open_xlsx(path: Path, strict: bool) -> Table:
    import zipfile

    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError) as e:
        raise DataError(f"{path}: not a readable .xlsx workbook ({e}); open it in Excel and save it again as "
                        f".xlsx") from None
    try:
        sheet = workbook.worksheets[0]
        # min_row/min_col=1 so that the n-th tuple is spreadsheet row n, even when the data starts lower down
        cells = enumerate(sheet.iter_rows(min_row=1, min_col=1, values_only=True), start=1)
        header, header_row = [], 0
        for header_row, values in cells:
            if any(_cell(v) != "" for v in values):
                header = [_cell(v) for v in values]
                break
        if not header:
            raise DataError(f"{path}: the first sheet ({sheet.title!r}) is empty (no header, no rows)")
        while header and header[-1] == "":  # trailing empty header cells: columns Excel counts but nobody wrote
            header.pop()
        columns = _column_names([str(h) for h in header], path, header_row)
    except BaseException:
        workbook.close()
        raise
    table = Table(path, columns, iter(()), workbook.close)
    table.rows = _xlsx_rows(table, cells, strict)
    return table


def _xlsx_rows(table: Table, cells, strict: bool) -> Iterator[tuple[dict | Rejected, str]]:
    width = len(table.columns)
    for number, values in cells:
        values = [_cell(v) for v in values]
        if not any(v != "" for v in values):
            table.blank_rows += 1
            continue
        where = f"{table.path}:{number}"
        if any(v != "" for v in values[width:]):
            reason = (f"ragged row: cells beyond the header's {width} columns ({', '.join(table.columns)}); give "
                      f"those columns a header or clear the cells")
            yield _problem(reason, values, where, strict)
            continue
        values = values[:width] + [""] * (width - len(values))
        yield dict(zip(table.columns, values)), where


# --- Parquet ------------------------------------------------------------------------------------------------------

def _open_parquet(path: Path) -> Table:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    table = Table(path, list(parquet.schema_arrow.names), iter(()), parquet.close)
    table.rows = _parquet_rows(table, parquet)
    return table


def _parquet_rows(table: Table, parquet) -> Iterator[tuple[dict, str]]:
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            number += 1
            row = {key: _cell(value) for key, value in record.items()}
            if not any(v != "" for v in row.values()):
                table.blank_rows += 1
                continue
            yield row, f"{table.path}:{number}"


# --- shared -------------------------------------------------------------------------------------------------------

def _column_names(header: list[str], path: Path, line: int) -> list[str]:
    """Header cells stripped of surrounding spaces; an empty one is named column<N> (1-based); duplicates are an
    error, since a row could not say which of the two cells a name means."""
    names = [name.strip() or f"column{i}" for i, name in enumerate(header, start=1)]
    seen: set[str] = set()
    duplicates = [name for name in names if name in seen or seen.add(name)]
    if duplicates:
        raise DataError(f"{path}:{line}: the header names a column twice ({', '.join(sorted(set(duplicates)))}); "
                        f"rename one so every column has its own name")
    return names


def _cell(value: object) -> object:
    """A cell as str, int, float or bool ("" when empty); dates as ISO text; lists/dicts (Parquet) kept."""
    if value is None:
        return ""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _problem(reason: str, row: dict | list, where: str, strict: bool) -> tuple[Rejected, str]:
    if strict:
        raise DataError(f"{where}: {reason} (without --strict such rows go to the rejects file)")
    return Rejected(reason, row), where
