"""`lmforge data convert`: tables and dataset files become JSONL conversations; every input row is written, filtered
by --where or rejected with its line and reason (read = written + filtered + rejected)."""

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.convert import convert_file
from lmforge.data.datasets import DatasetSpec, load_conversations
from lmforge.data.tabular import open_table
from lmforge.errors import DataError, UserError

HEADER = ["title", "question", "reply", "is_best"]
# Chinese text with the things Excel quotes: commas, line breaks (LF and CRLF) and doubled quotes.
ROWS = [
    ["劳动合同到期，公司不续签, 要赔偿吗？", "合同到期\n公司不续签", "需要支付经济补偿，\n按工作年限计算。", "1"],
    ["试用期被辞退怎么办", "试用期", "用人单位应说明理由, 并举证\r\n不符合录用条件。", "0"],
    ["借条写\"借\"还是\"欠\"", "借条", "写\"借\"更清楚。", "1"],
]


def csv_text(header: list[str], rows: list[list[str]], delimiter: str = ",") -> str:
    def field(value: str) -> str:
        needs_quotes = any(c in value for c in (delimiter, "\n", "\r", '"'))
        return '"' + value.replace('"', '""') + '"' if needs_quotes else value

    return "".join(delimiter.join(map(field, row)) + "\r\n" for row in [header, *rows])


def write_csv(path: Path, rows=ROWS, header=HEADER, encoding="gbk", bom=False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + csv_text(header, rows).encode(encoding))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def qa(rows=ROWS, user=0, assistant=2) -> list[list[dict]]:
    return [[{"role": "user", "content": r[user]}, {"role": "assistant", "content": r[assistant]}] for r in rows]


QA_MAP = {"user": "title", "assistant": "reply"}


# --- CSV: encodings, quoting, output shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("to", ["messages", "conversations"])
def test_gbk_csv_with_quoted_newlines_and_commas_round_trips(tmp_path, to):
    source = write_csv(tmp_path / "qa.csv", encoding="gbk")
    out = tmp_path / "train.jsonl"
    report = convert_file(source, out, to=to, mapping=QA_MAP)
    assert report.encoding == "gb18030"
    assert [r[to] for r in read_jsonl(out)] == qa()
    assert "\\u" not in out.read_text(encoding="utf-8")  # ensure_ascii=False: Chinese stays readable
    # the output is a dataset lmforge reads back unchanged
    loaded = load_conversations(DatasetSpec(path=out))
    assert [c.to_dicts() for c in loaded] == qa()
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (3, 3, 0)
    assert not (tmp_path / "train.rejects.jsonl").exists()
    assert json.loads((tmp_path / "train.report.json").read_text())["conversations_written"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.csv", "train.jsonl", "train.report.json"]


def test_utf8_bom_does_not_leak_into_the_first_column_name(tmp_path):
    source = write_csv(tmp_path / "qa.csv", encoding="utf-8", bom=True)
    with open_table(source) as table:
        assert table.columns == HEADER
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP)
    assert report.encoding == "utf-8-sig"
    assert [r["messages"] for r in read_jsonl(tmp_path / "out.jsonl")] == qa()


def test_tsv_and_a_system_prompt(tmp_path):
    source = tmp_path / "qa.tsv"
    source.write_text(csv_text(HEADER, ROWS, delimiter="\t"), encoding="utf-8")
    convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, system="你是一名律师。")
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["messages"][1:] for r in records] == qa()
    assert {r["messages"][0]["content"] for r in records} == {"你是一名律师。"}


def test_where_filters_rows_and_the_counts_add_up(tmp_path):
    rows = [*ROWS, ["标题", "问题", "", "1"]]  # empty reply: rejected, not silently dropped
    source = write_csv(tmp_path / "qa.csv", rows=rows)
    out = tmp_path / "best.jsonl"
    report = convert_file(source, out, mapping=QA_MAP, where="is_best == 1")
    assert (report.rows_read, report.rows_written, report.rows_filtered, report.rows_rejected) == (4, 2, 1, 1)
    assert report.rows_read == report.rows_written + report.rows_filtered + report.rows_rejected
    assert [r["messages"] for r in read_jsonl(out)] == qa([ROWS[0], ROWS[2]])
    [reject] = read_jsonl(tmp_path / "best.rejects.jsonl")
    assert reject["line"] == f"{source}:8" and "empty 'reply'" in reject["reason"]
    saved = json.loads((tmp_path / "best.report.json").read_text())
    assert saved["rows_filtered"] == 1 and saved["reject_reasons"] == {"empty 'reply'": 1}
    assert "1 filtered by --where" in report.summary() and "1 rejected" in report.summary()


@pytest.mark.parametrize(("condition", "kept"), [
    ("is_best == 1", 2), ("is_best == '1'", 2), ("is_best != 1", 1), ("is_best in [0, 1]", 3),
    ("votes >= 10", 1),  # numeric order: "9" < 10 although "9" > "10" as text
    ("votes > 2 and title == '试用期被辞退怎么办'", 1),
])
def test_where_compares_csv_text_as_numbers_when_both_sides_are(tmp_path, condition, kept):
    source = write_csv(tmp_path / "qa.csv", header=[*HEADER, "votes"], rows=[
        [*ROWS[0], "10"], [*ROWS[1], "9"], [*ROWS[2], "1"]])
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, where=condition)
    assert (report.rows_written, report.rows_filtered, report.rows_rejected) == (kept, 3 - kept, 0)


def test_where_on_a_missing_column_is_one_error_and_a_non_number_is_a_reject(tmp_path):
    source = write_csv(tmp_path / "qa.csv", header=[*HEADER, "votes"], rows=[
        [*ROWS[0], "10"], [*ROWS[1], "n/a"]])
    with pytest.raises(UserError, match=r"no column 'vote' \(did you mean 'votes'\?\)"):
        convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, where="vote >= 3")
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, where="votes >= 3")
    assert (report.rows_written, report.rows_rejected) == (1, 1)
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"] == f"{source}:5" and "--where" in reject["reason"] and "'n/a'" in reject["reason"]


def test_ragged_row_is_rejected_with_its_line_or_fails_in_strict_mode(tmp_path):
    text = csv_text(HEADER, ROWS[:1]) + "只有,两列\r\n" + csv_text(HEADER, ROWS[1:]).split("\r\n", 1)[1]
    source = tmp_path / "qa.csv"
    source.write_bytes(text.encode("gbk"))
    out = tmp_path / "out.jsonl"
    report = convert_file(source, out, mapping=QA_MAP)
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (4, 3, 1)
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"] == f"{source}:5"  # header 1, first record spans lines 2-4
    assert "2 fields but the header has 4" in reject["reason"] and reject["row"] == ["只有", "两列"]

    strict_out = tmp_path / "strict.jsonl"
    with pytest.raises(DataError, match=rf"{source}:5: ragged row"):
        convert_file(source, strict_out, mapping=QA_MAP, strict=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".strict", "strict"))]  # nothing half-written


def test_undecodable_bytes_with_a_forced_encoding_reject_that_row(tmp_path):
    source = tmp_path / "qa.csv"
    good = csv_text(HEADER, ROWS[:1]).encode("utf-8")
    source.write_bytes(good + "坏行,问,答,1\r\n".encode("gbk") + csv_text(HEADER, ROWS[2:]).split("\r\n", 1)[1]
                       .encode("utf-8"))
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, encoding="utf-8")
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (3, 2, 1)
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"] == f"{source}:5"
    assert "not valid utf-8" in reject["reason"] and "--encoding" in reject["reason"]
    with pytest.raises(DataError, match=rf"{source}:5: undecodable"):
        convert_file(source, tmp_path / "strict.jsonl", mapping=QA_MAP, encoding="utf-8", strict=True)


def test_ascii_start_then_gbk_switches_detection_instead_of_rejecting(tmp_path):
    rows = [["q", "x", "a", "1"]] * 30000 + [ROWS[0]]  # the first MiB is pure ASCII
    source = write_csv(tmp_path / "qa.csv", rows=rows, encoding="gbk")
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP)
    assert (report.rows_written, report.rows_rejected, report.encoding) == (30001, 0, "gb18030")


def test_memory_does_not_grow_with_the_file(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr("lmforge.data.tabular.SAMPLE_BYTES", 1 << 16)  # the one fixed-size read: encoding detection

    row = [ROWS[0][0], ROWS[0][1], ROWS[0][2] + "长" * 300, "1"]

    def peak_bytes(n_rows: int) -> int:
        source = write_csv(tmp_path / f"{n_rows}.csv", rows=[row] * n_rows)
        tracemalloc.start()
        try:
            report = convert_file(source, tmp_path / f"{n_rows}.jsonl", mapping=QA_MAP)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert report.rows_written == n_rows

    small, large = peak_bytes(300), peak_bytes(3000)  # 0.2 MB and 2.1 MB of GBK
    assert large < small + 300_000, f"peak {large} bytes for 3000 rows vs {small} for 300"


def test_missing_mapped_column_lists_the_columns_with_a_suggestion(tmp_path):
    source = write_csv(tmp_path / "qa.csv")
    with pytest.raises(UserError) as error:
        convert_file(source, tmp_path / "out.jsonl", mapping={"user": "titel", "assistant": "reply"})
    message = str(error.value)
    assert "'titel'" in message and "did you mean 'title'" in message
    assert "title, question, reply, is_best" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_empty_and_header_only_files_are_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        convert_file(empty, tmp_path / "out.jsonl", mapping=QA_MAP)
    bom_only = tmp_path / "bom.csv"
    bom_only.write_bytes(b"\xef\xbb\xbf\r\n")
    with pytest.raises(DataError, match="empty"):
        convert_file(bom_only, tmp_path / "out.jsonl", mapping=QA_MAP)
    header_only = write_csv(tmp_path / "header.csv", rows=[])
    with pytest.raises(DataError, match="no rows"):
        convert_file(header_only, tmp_path / "out.jsonl", mapping=QA_MAP)
    assert not (tmp_path / "out.jsonl").exists()


def test_unbalanced_quote_is_an_error_with_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr("lmforge.data.tabular.MAX_FIELD_CHARS", 1000)
    import csv
    limit = csv.field_size_limit(1000)
    try:
        source = tmp_path / "qa.csv"
        source.write_text("title,reply\na,\"never closed\n" + "more text\n" * 200, encoding="utf-8")
        with pytest.raises(DataError, match="never closes"):
            convert_file(source, tmp_path / "out.jsonl", mapping={"user": "title", "assistant": "reply"})
    finally:
        csv.field_size_limit(limit)


# --- other inputs ---------------------------------------------------------------------------------------------

def test_xlsx_input_with_numeric_cells(tmp_path):
    import openpyxl
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(HEADER)
    for row in ROWS:
        sheet.append([*row[:3], int(row[3])])
    sheet.append([None, None, None, None])  # a blank row Excel keeps at the end
    source = tmp_path / "qa.xlsx"
    workbook.save(source)
    report = convert_file(source, tmp_path / "out.jsonl", mapping=QA_MAP, where="is_best == 1")
    assert (report.rows_read, report.rows_written, report.rows_filtered) == (3, 2, 1)
    assert [r["messages"] for r in read_jsonl(tmp_path / "out.jsonl")] == qa([ROWS[0], ROWS[2]])


def test_parquet_input_streams_record_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr("lmforge.data.tabular.PARQUET_BATCH_ROWS", 2)
    columns = {name: [row[i] for row in ROWS] for i, name in enumerate(HEADER)}
    columns["is_best"] = [int(v) for v in columns["is_best"]]
    source = tmp_path / "qa.parquet"
    pq.write_table(pa.table(columns), source, row_group_size=2)
    report = convert_file(source, tmp_path / "out.jsonl", to="conversations", mapping=QA_MAP)
    assert report.rows_written == 3
    assert [r["conversations"] for r in read_jsonl(tmp_path / "out.jsonl")] == qa()


def test_jsonl_alpaca_reshaped_to_messages_with_bad_records_rejected(tmp_path):
    source = tmp_path / "alpaca.jsonl"
    records = [{"instruction": "翻译", "input": "hello", "output": "你好"},
               {"instruction": "no output"},
               {"instruction": "Say hi", "output": "hi", "system": "Be brief."}]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    report = convert_file(source, tmp_path / "out.jsonl", to="messages")
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (3, 2, 1)
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"messages": [{"role": "user", "content": "翻译\nhello"}, {"role": "assistant", "content": "你好"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                      {"role": "assistant", "content": "hi"}]}]
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"] == f"{source}:2" and "'output'" in reject["reason"]


def test_a_table_with_alpaca_columns_needs_no_map(tmp_path):
    source = tmp_path / "alpaca.csv"
    source.write_text("instruction,input,output\n翻译,hello,你好\n打招呼,,嗨\n", encoding="utf-8")
    convert_file(source, tmp_path / "out.jsonl")
    assert [[m["content"] for m in r["messages"]] for r in read_jsonl(tmp_path / "out.jsonl")] == [
        ["翻译\nhello", "你好"], ["打招呼", "嗨"]]


# --- multi-turn grouping and output shapes --------------------------------------------------------------------

TURNS_HEADER = ["conversation_id", "turn", "question", "answer"]
TURNS = [  # out of order: conversations interleaved, turns shuffled, turn 10 after turn 2 (numeric order)
    ["b", "2", "b 的第二问", "b 的第二答"],
    ["a", "10", "a 的第三问", "a 的第三答"],
    ["a", "1", "a 的第一问", "a 的第一答"],
    ["b", "1", "b 的第一问", "b 的第一答"],
    ["a", "2", "a 的第二问", "a 的第二答"],
    ["c", "1", "c 的问题", ""],  # empty answer: conversation c is rejected as a whole
]
TURNS_MAP = {"user": "question", "assistant": "answer"}


def turns_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "turns.csv", rows=TURNS, header=TURNS_HEADER, encoding="utf-8")


def test_group_by_builds_multi_turn_conversations_from_out_of_order_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    report = convert_file(turns_csv(tmp_path), out, mapping=TURNS_MAP, group_by="conversation_id",
                          order_by="turn")
    conversations = [[m["content"] for m in r["messages"]] for r in read_jsonl(out)]
    assert conversations == [  # in the order each conversation first appears
        ["b 的第一问", "b 的第一答", "b 的第二问", "b 的第二答"],
        ["a 的第一问", "a 的第一答", "a 的第二问", "a 的第二答", "a 的第三问", "a 的第三答"]]
    assert (report.rows_read, report.rows_written, report.rows_rejected, report.conversations_written) == (6, 5, 1, 2)
    [reject] = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert reject["line"].endswith(":7") and "conversation_id='c'" in reject["reason"]
    assert "read 6 rows → wrote 2 conversations from 5 rows" in report.summary()


def test_alpaca_output_puts_earlier_turns_in_history(tmp_path):
    out = tmp_path / "out.jsonl"
    convert_file(turns_csv(tmp_path), out, to="alpaca", mapping=TURNS_MAP, group_by="conversation_id",
                 order_by="turn", system="你是助手")
    first = read_jsonl(out)[0]
    assert first == {"instruction": "b 的第二问", "input": "", "output": "b 的第二答", "system": "你是助手",
                     "history": [["b 的第一问", "b 的第一答"]]}
    # and back: alpaca → messages through the same command
    back = tmp_path / "back.jsonl"
    convert_file(out, back, to="messages")
    assert [m["content"] for m in read_jsonl(back)[0]["messages"]] == [
        "你是助手", "b 的第一问", "b 的第一答", "b 的第二问", "b 的第二答"]


def test_sharegpt_output_with_a_system_column(tmp_path):
    source = write_csv(tmp_path / "qa.csv", header=["sys", *HEADER], rows=[["S", *r] for r in ROWS[:1]],
                       encoding="utf-8")
    convert_file(source, tmp_path / "out.jsonl", to="sharegpt", mapping=QA_MAP, system_column="sys")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"system": "S", "conversations": [
        {"from": "human", "value": ROWS[0][0]}, {"from": "gpt", "value": ROWS[0][2]}]}]


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_convert_prints_a_summary_and_returns_0(tmp_path, capsys):
    source = write_csv(tmp_path / "qa.csv")
    out = tmp_path / "train.jsonl"
    code = main(["data", "convert", str(source), "-o", str(out), "--map", "user=title", "--map", "assistant=reply",
                 "--where", "is_best == 1", "--to", "conversations"])
    assert code == 0
    assert capsys.readouterr().out.strip() == (
        f"read 3 rows → wrote 2 conversations to {out} (1 filtered by --where, 0 rejected)")
    assert [r["conversations"] for r in read_jsonl(out)] == qa([ROWS[0], ROWS[2]])


def test_cli_bad_input_returns_2_with_the_message(tmp_path, capsys):
    source = write_csv(tmp_path / "qa.csv")
    code = main(["data", "convert", str(source), "-o", str(tmp_path / "out.jsonl"), "--map", "user=title",
                 "--map", "assistant=answer"])
    assert code == 2
    assert "no column 'answer'" in capsys.readouterr().err
    assert main(["data", "convert", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o.jsonl"),
                 "--map", "user=a", "--map", "assistant=b"]) == 2
