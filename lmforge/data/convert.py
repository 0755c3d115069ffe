"""`lmforge data convert`: table rows (CSV/TSV/XLSX/Parquet) or JSON/JSONL records → one conversation per JSONL line.

Owns mapping columns to roles, --where filtering, multi-turn grouping, the output shapes (messages, conversations,
alpaca, sharegpt) and the accounting: rows read = rows written + filtered by --where + rejected, and every rejected
row is in OUT.rejects.jsonl with its line and the reason. Must not decode files (tabular.py, sources.py do) nor judge
record shapes itself (formats.py and conversation.validate do).
"""

from __future__ import annotations

import codecs
import difflib
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path

from ..conversation import Conversation, validate
from ..errors import DataError, UserError
from .expressions import as_number
from .formats import FormatSpec, detect_format
from .formats import convert as convert_record
from .outputs import OutputFiles, reason_kind, sibling_path
from .sources import read_records
from .tabular import TABLE_SUFFIXES, Rejected, open_table

OUTPUT_SHAPES = ("messages", "conversations", "alpaca", "sharegpt")
MAP_ROLES = ("system", "user", "assistant")
RECORD_SUFFIXES = (".json", ".jsonl")
RECORD_COLUMNS = ("messages", "conversations", "instruction")  # a table with these columns holds records as is


@dataclass
class ConvertReport:
    """What one conversion did; written next to the output as OUT.report.json."""

    input: str
    output: str
    to: str
    rejects: str | None = None  # the rejects file, when there were rejects
    encoding: str | None = None  # text encoding of a CSV/TSV input, as used
    rows_read: int = 0
    rows_written: int = 0
    rows_filtered: int = 0  # by --where; not rejects: the user asked for them to be left out
    rows_rejected: int = 0
    conversations_written: int = 0
    blank_rows_skipped: int = 0  # rows with every cell empty; not counted as read
    reject_reasons: dict[str, int] = field(default_factory=dict)
    accounting: str = "rows_read = rows_written + rows_filtered + rows_rejected"

    def summary(self) -> str:
        rejected = f"{self.rows_rejected} rejected" + (f" → {self.rejects}" if self.rejects else "")
        rows = "" if self.rows_written == self.conversations_written else f" from {self.rows_written} rows"
        return (f"read {self.rows_read} rows → wrote {self.conversations_written} conversations{rows} to "
                f"{self.output} ({self.rows_filtered} filtered by --where, {rejected})")

    def to_dict(self) -> dict:
        return asdict(self)


class _Problem(Exception):
    """Why a row or a conversation cannot be written; the row goes to the rejects file. `kind` labels the reason
    in the report's counts (default: the reason up to its first ':' or '(')."""

    def __init__(self, reason: str, kind: str | None = None):
        super().__init__(reason)
        self.kind = kind or reason_kind(reason)


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """["user=title", "assistant=reply"] → {"user": "title", "assistant": "reply"}."""
    mapping: dict[str, str] = {}
    for item in items or []:
        role, sep, column = item.partition("=")
        role, column = role.strip(), column.strip()
        if not sep or not role or not column:
            raise UserError(f"--map {item!r}: expected ROLE=COLUMN, e.g. --map user=title --map assistant=reply")
        if role in mapping:
            raise UserError(f"--map: role {role!r} is mapped twice ({mapping[role]!r} and {column!r})")
        mapping[role] = column
    return mapping


def convert_file(in_path: str | Path, out_path: str | Path, *, to: str = "messages",
                 mapping: dict[str, str] | None = None, where: str | None = None, system: str | None = None,
                 system_column: str | None = None, group_by: str | None = None, order_by: str | None = None,
                 encoding: str | None = None, strict: bool = False, keep: list[str] | None = None
                 ) -> ConvertReport:
    """Convert one file into JSONL conversations in the `to` shape, with rejects and a report beside it.

    mapping: role → column ({"user": "title", "assistant": "reply"}, optionally "system"); without it, rows must
    already be records in a known shape (alpaca, sharegpt, conversations, messages). where: a condition on a row's
    columns (lmforge.data.expressions) that keeps a row. system: a constant system prompt (a record's own system
    prompt wins); system_column: a column holding it. group_by/order_by: rows with the same group_by value become
    one multi-turn conversation, each row one user/assistant pair, in order_by order (file order when unset); rows
    of a conversation need not be adjacent. strict: the first row that cannot be written raises DataError.
    keep: metadata columns copied into each output record beside the messages (numbers in text cells become
    numbers), so `data clean` can filter on them (`where: "votes >= 3"`) and dedup can keep the best record.
    Output files are written under temporary names and renamed at the end, so a failed run leaves none behind.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    roles = _check_options(in_path, out_path, to, dict(mapping or {}), system, system_column, group_by, order_by)
    condition = _compile_where(where)
    report = ConvertReport(input=str(in_path), output=str(out_path), to=to)
    rejects_path, report_path = sibling_path(out_path, "rejects.jsonl"), sibling_path(out_path, "report.json")
    with _Source(in_path, encoding, strict) as source, OutputFiles(out_path, rejects_path) as outputs:
        columns, rows = source.columns_and_rows()
        if condition is not None and not source.is_records:  # records may leave optional fields out
            _check_where_columns(condition, columns, in_path)
        if roles:
            _check_columns(columns, roles, group_by, order_by, in_path)
        elif not source.is_records and not any(c in columns for c in RECORD_COLUMNS):
            raise UserError(_needs_mapping_message(in_path, columns))
        if keep and not source.is_records:
            _check_kept_columns(columns, keep, in_path)
        build = _mapped_builder(roles, system) if roles else _record_builder(system)

        def reject(row_where: str, reason: str, row: object, kind: str | None = None) -> None:
            if strict:
                raise DataError(f"{row_where}: {reason} (without --strict such rows go to {rejects_path.name})")
            outputs.reject({"line": row_where, "reason": reason, "row": row})
            report.rows_rejected += 1
            kind = kind or reason_kind(reason)
            report.reject_reasons[kind] = report.reject_reasons.get(kind, 0) + 1

        def write(conversation: Conversation, n_rows: int, row: dict) -> None:
            record = shape(conversation, to)
            if keep:
                record.update({column: _metadata_value(row.get(column)) for column in keep})
            outputs.write(record)
            report.rows_written += n_rows
            report.conversations_written += 1

        kept = _filtered(rows, condition, report, reject)
        if group_by:
            _convert_groups(kept, roles, group_by, order_by, system, write, reject)
        else:
            for row, row_where in kept:
                try:
                    write(build(row, row_where), 1, row)
                except _Problem as problem:
                    reject(row_where, str(problem), row, problem.kind)
        report.encoding = source.encoding
        report.blank_rows_skipped = source.blank_rows
        if report.rows_read == 0:
            raise DataError(f"{in_path}: no rows to convert (the file has a header but no data rows)"
                            if columns else f"{in_path}: the file is empty (no records)")
        assert report.rows_read == report.rows_written + report.rows_filtered + report.rows_rejected, report
        report.rejects = str(rejects_path) if report.rows_rejected else None
        outputs.add(report_path, json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")
        outputs.commit()
    return report


def shape(conversation: Conversation, to: str) -> dict:
    """A Conversation as one output record in the `to` shape."""
    messages = conversation.to_dicts()
    if to == "messages":
        return conversation.to_record()  # with its tools and "loss": false flags
    if to == "conversations":  # ChatGLM3 finetune_demo
        record = conversation.to_record()
        return {"conversations": record.pop("messages"), **record}
    if conversation.uses_tools or any(m.train is False for m in conversation.messages):
        raise _Problem(f"the conversation has tool calls or \"loss\": false turns, which the {to} shape written "
                       f"here cannot hold; use --to messages")
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if to == "sharegpt":  # the system prompt in its own column, LLaMA-Factory's default "system"
        names = {"user": "human", "assistant": "gpt"}
        record = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in turns]}
        return {**record, "system": system} if system else record
    if not turns or turns[-1]["role"] != "assistant":
        raise _Problem("the conversation ends with a user message; an alpaca record needs a final output")
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]
    return {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "system": system,
            "history": pairs[:-1]}


# --- options and columns -----------------------------------------------------------------------------------------

def _check_options(in_path: Path, out_path: Path, to: str, mapping: dict[str, str], system: str | None,
                   system_column: str | None, group_by: str | None, order_by: str | None) -> dict[str, str]:
    """The role → column mapping to use ({} = rows are records), after checking the options fit together."""
    if to not in OUTPUT_SHAPES:
        raise UserError(f"--to {to!r}: unknown output shape{_did_you_mean(to, OUTPUT_SHAPES)}; "
                        f"expected one of {', '.join(OUTPUT_SHAPES)}")
    for role in mapping:
        if role not in MAP_ROLES:
            raise UserError(f"--map {role}=…: unknown role{_did_you_mean(role, MAP_ROLES)}; "
                            f"roles are {', '.join(MAP_ROLES)}")
    if system_column is not None:
        if "system" in mapping and mapping["system"] != system_column:
            raise UserError("--system-column and --map system=… name different columns; give one of them")
        mapping["system"] = system_column
    if system is not None and "system" in mapping:
        raise UserError("--system (a fixed prompt) and a system column (--system-column or --map system=…) "
                        "exclude each other; give one of them")
    if mapping and not {"user", "assistant"} <= set(mapping):
        missing = " and ".join(f"--map {r}=COLUMN" for r in ("user", "assistant") if r not in mapping)
        raise UserError(f"--map needs both a user and an assistant column; add {missing}")
    if order_by and not group_by:
        raise UserError("--order-by orders the turns inside a conversation; it needs --group-by COLUMN")
    if group_by and not mapping:
        raise UserError("--group-by builds conversations from table rows, one user/assistant pair per row; "
                        "it needs --map user=COLUMN --map assistant=COLUMN")
    if in_path.resolve() == out_path.resolve():
        raise UserError(f"-o {out_path}: the output would overwrite the input; choose another output path")
    return mapping


def _check_columns(columns: list[str], roles: dict[str, str], group_by: str | None, order_by: str | None,
                   path: Path) -> None:
    wanted = [(f"--map {role}={col}", col) for role, col in roles.items()]
    wanted += [(f"--group-by {group_by}", group_by)] if group_by else []
    wanted += [(f"--order-by {order_by}", order_by)] if order_by else []
    missing = [(option, col) for option, col in wanted if col not in columns]
    if missing:
        lines = [f"  {option}: no column {col!r}{_did_you_mean(col, columns)}" for option, col in missing]
        raise UserError(f"{path}: " + ("a mapped column does not exist" if len(missing) == 1 else
                                       "mapped columns do not exist") + "\n" + "\n".join(lines)
                        + f"\n  the columns are: {', '.join(columns) or 'none'}")


_ROLE_HINTS = {"user": ("question", "title", "prompt", "query", "instruction", "input", "user", "问题", "标题"),
               "assistant": ("answer", "reply", "response", "output", "assistant", "回答", "答案", "回复")}


def _check_kept_columns(columns: list[str], keep: list[str], path: Path) -> None:
    missing = [c for c in keep if c not in columns]
    if missing:
        raise UserError(f"{path}: --keep column(s) {', '.join(map(repr, missing))} not found"
                        f"{_did_you_mean(missing[0], columns)}; the columns are: {', '.join(columns)}")


def _metadata_value(value: object) -> object:
    return as_number(value) if isinstance(value, str) else value


def _needs_mapping_message(path: Path, columns: list[str]) -> str:
    def guess(role: str) -> str:
        return next((c for hint in _ROLE_HINTS[role] for c in columns if hint in c.lower()), "COLUMN")

    example = " ".join(f"--map {role}={guess(role)}" for role in ("user", "assistant"))
    return (f"{path}: say which columns hold the user and the assistant messages, e.g. {example}\n"
            f"  the columns are: {', '.join(columns) or 'none'}\n"
            f"  (a table with columns instruction/input/output, or messages/conversations, is read without --map)")


def _compile_where(text: str | None):
    if text is None:
        return None
    from .expressions import compile_condition

    return compile_condition(text)


def _check_where_columns(condition, columns: list[str], path: Path) -> None:
    """A table's columns are known up front, so a misspelt column is one error, not a reject per row."""
    missing = [c for c in condition.columns if c not in columns]
    if missing:
        lines = [f"  no column {c!r}{_did_you_mean(c, columns)}" for c in missing]
        raise UserError(f"--where {condition.text!r}: {path}:\n" + "\n".join(lines)
                        + f"\n  the columns are: {', '.join(columns) or 'none'}")


# --- reading -----------------------------------------------------------------------------------------------------

class _Source:
    """A table (tabular.py) or a JSON/JSONL file (sources.py) behind one interface."""

    def __init__(self, path: Path, requested_encoding: str | None, strict: bool):
        self.path, self.requested_encoding, self.strict = path, requested_encoding, strict
        self.is_records = path.suffix.lower() in RECORD_SUFFIXES
        self.table = None

    def __enter__(self) -> _Source:
        suffix = self.path.suffix.lower()
        if self.is_records:
            if self.requested_encoding is not None and not _is_utf8(self.requested_encoding):
                raise UserError(f"--encoding {self.requested_encoding}: JSON/JSONL files are read as UTF-8; "
                                f"re-save the file as UTF-8 or remove --encoding")
        elif suffix in TABLE_SUFFIXES or suffix == ".xls":  # open_table explains what to do with .xls
            self.table = open_table(self.path, encoding=self.requested_encoding, strict=self.strict)
        else:
            raise DataError(f"{self.path}: cannot convert {suffix or 'a file without a suffix'}; inputs are "
                            f"{', '.join(TABLE_SUFFIXES + RECORD_SUFFIXES)}")
        return self

    def __exit__(self, *exc) -> None:
        if self.table is not None:
            self.table.close()

    def columns_and_rows(self) -> tuple[list[str], Iterator[tuple[dict | Rejected, str]]]:
        """The column names (for records: the first record's keys) and the rows."""
        if self.table is not None:
            return self.table.columns, self.table.rows
        records = read_records(self.path)
        first = next(records, None)
        if first is None:
            return [], iter(())
        return list(first[0]), chain([first], records)

    @property
    def encoding(self) -> str | None:  # read after the rows: detection may switch once while reading
        return self.table.encoding if self.table is not None else "utf-8"

    @property
    def blank_rows(self) -> int:
        return self.table.blank_rows if self.table is not None else 0


def _filtered(rows, condition, report: ConvertReport, reject) -> Iterator[tuple[dict, str]]:
    """Readable rows that pass --where; unreadable rows are rejected, the others counted as filtered."""
    for row, where in rows:
        report.rows_read += 1
        if isinstance(row, Rejected):
            reject(where, row.reason, row.row)
            continue
        if condition is not None:
            try:
                keep = condition(row)
            except UserError as e:  # e.g. `votes >= 3` on a row whose votes is "n/a", or a record without votes
                reject(where, f"--where cannot be evaluated on this row: {e}", row, "--where error")
                continue
            if not keep:
                report.rows_filtered += 1
                continue
        yield row, where


# --- building conversations ----------------------------------------------------------------------------------------

def _mapped_builder(roles: dict[str, str], system: str | None) -> Callable[[dict, str], Conversation]:
    def build(row: dict, where: str) -> Conversation:
        messages = _system_message(system if system is not None else _text(row, roles.get("system")))
        messages += _pair(row, roles)
        return Conversation.from_dicts(validate(messages, where), source=where)

    return build


def _record_builder(system: str | None) -> Callable[[dict, str], Conversation]:
    spec = FormatSpec()

    def build(record: dict, where: str) -> Conversation:
        nonlocal spec
        try:
            if spec.format == "auto":  # decided on the first readable record, as datasets.load_conversations does
                spec = replace(spec, format=detect_format(record, where))
            conversation = convert_record(record, where, spec)
        except DataError as e:
            raise _Problem(str(e).removeprefix(f"{where}: ")) from None
        if system and conversation.messages[0].role != "system":  # the record's own system prompt wins
            messages = _system_message(system) + conversation.to_dicts()
            conversation = Conversation.from_dicts(messages, source=where)
        return conversation

    return build


def _pair(row: dict, roles: dict[str, str]) -> list[dict]:
    messages = []
    for role in ("user", "assistant"):
        content = _text(row, roles[role])
        if not content.strip():
            raise _Problem(f"empty {roles[role]!r} (the {role} message)")
        messages.append({"role": role, "content": content})
    return messages


def _system_message(text: str | None) -> list[dict]:
    return [{"role": "system", "content": text}] if text and text.strip() else []


def _text(row: dict, column: str | None) -> str:
    if column is None:
        return ""
    value = row.get(column)
    if value is None:  # a JSON record without the field, or with null
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float):
        return str(value)
    raise _Problem(f"column {column!r} holds {type(value).__name__} {json.dumps(value, default=str)[:60]}, "
                   f"expected text")


def _convert_groups(rows, roles: dict[str, str], group_by: str, order_by: str | None, system: str | None,
                    write, reject) -> None:
    """Rows spilled to a temporary SQLite file, then read back one conversation at a time, in the order each
    conversation first appears and its turns in order_by order; memory holds one conversation, never the file."""
    with tempfile.TemporaryDirectory(prefix="lmforge-convert-") as tmp:
        db = sqlite3.connect(Path(tmp) / "groups.sqlite")
        try:
            db.execute("CREATE TABLE rows (seq INTEGER PRIMARY KEY, grp TEXT, ord_num REAL, ord_text TEXT, "
                       "src TEXT, row TEXT)")
            db.execute("CREATE TABLE groups (grp TEXT PRIMARY KEY, first_seq INTEGER)")
            for seq, (row, where) in enumerate(rows):
                try:
                    key, order = _text(row, group_by), _text(row, order_by)
                except _Problem as problem:
                    reject(where, str(problem), row, problem.kind)
                    continue
                if not key.strip():
                    reject(where, f"empty {group_by!r} (--group-by): the row belongs to no conversation", row,
                           "empty --group-by value")
                    continue
                number = as_number(order)
                db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (key, seq))
                db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?)",
                           (seq, key, float(number) if isinstance(number, int | float) else None, order, where,
                            json.dumps(row, ensure_ascii=False, default=str)))
            db.commit()
            query = ("SELECT r.grp, r.src, r.row FROM rows r JOIN groups g ON g.grp = r.grp "
                     "ORDER BY g.first_seq, r.ord_num IS NULL, r.ord_num, r.ord_text, r.seq")
            for key, members in _runs(db.execute(query)):
                try:
                    write(_group_conversation(members, roles, system), len(members), members[0][1])
                except _Problem as problem:
                    reason = f"conversation {group_by}={key!r} ({len(members)} rows) rejected: {problem}"
                    for where, row in members:
                        reject(where, reason, row, f"conversation rejected: {problem.kind}")
        finally:
            db.close()


def _runs(cursor) -> Iterator[tuple[str, list[tuple[str, dict]]]]:
    key, members = None, []
    for grp, where, row in cursor:
        if grp != key and members:
            yield key, members
            members = []
        key = grp
        members.append((where, json.loads(row)))
    if members:
        yield key, members


def _group_conversation(members: list[tuple[str, dict]], roles: dict[str, str], system: str | None) -> Conversation:
    first = members[0][0]
    if system is None:  # the first non-empty system cell of the conversation
        system = next((s for s in (_text(row, roles.get("system")) for _, row in members) if s.strip()), "")
    messages = _system_message(system)
    for where, row in members:
        try:
            messages += _pair(row, roles)
        except _Problem as problem:
            raise _Problem(f"row {where}: {problem}", problem.kind) from None
    try:
        return Conversation.from_dicts(validate(messages, first), source=first)
    except DataError as e:
        raise _Problem(str(e).removeprefix(f"{first}: ")) from None


# --- writing -------------------------------------------------------------------------------------------------------

def _is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")
    except LookupError:
        return False


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    if not close:
        close = [o for o in options if o.lower() == word.lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""
