"""`lmforge data clean`: a recipe's steps run in order over a file, nothing is lost (kept + rejected = input, every
reject has its line, step and reason), metadata survives, duplicates keep the best record, workers change nothing,
and the reports say what happened."""

import json
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.clean import clean_file
from lmforge.data.recipe import parse_recipe

QUESTION = "房东不退押金怎么办？"
ANSWER = "可以先与房东协商，协商不成可以向住房管理部门投诉，或者向人民法院提起诉讼，要求返还押金并支付利息。"
EN_ANSWER = ("A lease is a contract between a landlord and a tenant that sets the rent, the term, the deposit and "
             "the duties of both sides, such as repairs and notice before moving out.")


def msg(question: str, answer: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **meta}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def mixed_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "raw.jsonl", [
        msg(QUESTION, f"<p>{ANSWER}</p> 电话 13812345678", votes=5, is_best=0),           # 1 kept after cleaning
        msg(QUESTION, f"{ANSWER} 电话 13987654321", votes=9, is_best=1),                   # 2 exact dup once masked
        {"instruction": "What is a lease?", "input": "", "output": EN_ANSWER, "votes": 1},  # 3 alpaca, kept
        msg("Who are you?", "As an AI language model, I do not have a name."),            # 4 marker
        "{not json",                                                                       # 5 unreadable
        msg("What is a lease agreement?", EN_ANSWER.replace("moving out", "leaving")),     # 6 near dup of 3
        {"foo": "bar"},                                                                    # 7 unknown shape
        msg("重复", "哈" * 38),                                                                # 8 repetition
    ])


def test_default_recipe_accounts_for_every_record(tmp_path):
    out = tmp_path / "clean.jsonl"
    report = clean_file(mixed_file(tmp_path), out)
    kept, rejects = read_jsonl(out), read_jsonl(tmp_path / "clean.rejects.jsonl")
    assert report.records_in == 8 == len(kept) + len(rejects)
    assert (report.kept, report.rejected) == (len(kept), len(rejects))
    by_line = {int(r["line"].rsplit(":", 1)[1]): r for r in rejects}
    assert {line: r["step"] for line, r in by_line.items()} == {
        1: "dedup.exact", 4: "filter.markers", 5: "read", 6: "dedup.near", 7: "read", 8: "filter.repetition"}
    assert "As an AI language model" in by_line[4]["reason"]
    assert re.fullmatch(r"duplicate of .*raw\.jsonl:2 \(exact\)", by_line[1]["reason"])  # is_best=1 wins
    assert re.fullmatch(r"duplicate of .*raw\.jsonl:3 \(near, similarity ≈ 0\.\d+\)", by_line[6]["reason"])
    assert by_line[5]["record"] == "{not json"
    # what was kept: normalised, masked, metadata intact, the alpaca record in messages shape
    assert kept[0] == msg(QUESTION, f"{ANSWER} 电话 <PHONE>", votes=9, is_best=1)
    assert kept[1] == msg("What is a lease?", EN_ANSWER, votes=1)
    data = json.loads((tmp_path / "clean.report.json").read_text())
    assert data["accounting"] == "8 in = 2 kept + 6 rejected"
    steps = {s["step"]: s for s in data["steps"]}
    assert steps["pii"]["masked"] == {"PHONE": 2}
    assert steps["normalize"]["changed"] == 1
    assert steps["filter"]["rejected"] == 2 and steps["dedup.exact"]["rejected"] == 1


def test_steps_run_in_the_order_written(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [msg(QUESTION, f"{ANSWER} 13812345678"),
                                                 msg(QUESTION, f"{ANSWER} 13987654321")])
    dedup_first = parse_recipe([{"dedup": {"method": "exact"}}, "pii"], "test")
    pii_first = parse_recipe(["pii", {"dedup": {"method": "exact"}}], "test")
    assert clean_file(source, tmp_path / "a.jsonl", recipe=dedup_first).kept == 2  # numbers differ: not duplicates
    assert clean_file(source, tmp_path / "b.jsonl", recipe=pii_first).kept == 1    # both become <PHONE>


def test_metadata_filter_and_keeper_rules(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [
        msg(QUESTION, ANSWER, votes=2), msg(QUESTION, ANSWER + "！", votes=7), msg(QUESTION, ANSWER, votes=3),
        msg("另一个问题", ANSWER[:20], votes="12")])
    where = parse_recipe([{"filter": {"where": "votes >= 3"}}], "test")
    report = clean_file(source, tmp_path / "w.jsonl", recipe=where)
    assert [r["votes"] for r in read_jsonl(tmp_path / "w.jsonl")] == [7, 3, "12"] and report.rejected == 1
    rejects = read_jsonl(tmp_path / "w.rejects.jsonl")
    assert rejects[0]["step"] == "filter.where" and "votes" in rejects[0]["reason"]

    def keep(rule):
        recipe = parse_recipe([{"dedup": {"method": "near", "threshold": 0.5, "keep": rule}}], "test")
        clean_file(source, tmp_path / f"{rule}.jsonl", recipe=recipe)
        return [r["votes"] for r in read_jsonl(tmp_path / f"{rule}.jsonl")]
    assert keep("best") == [7, "12"]     # most votes
    assert keep("first") == [2, "12"]
    assert keep("longest") == [7, "12"]  # the answer with "！"


def test_output_shapes_keep_metadata(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [msg(QUESTION, ANSWER, votes=4)])
    clean_file(source, tmp_path / "c.jsonl", to="conversations", recipe=parse_recipe(["normalize"], "t"))
    assert read_jsonl(tmp_path / "c.jsonl") == [{"conversations": msg(QUESTION, ANSWER)["messages"], "votes": 4}]
    clean_file(source, tmp_path / "a.jsonl", to="alpaca", recipe=parse_recipe(["normalize"], "t"))
    assert read_jsonl(tmp_path / "a.jsonl")[0]["output"] == ANSWER


def test_worker_processes_give_the_same_result(tmp_path):
    rows = [msg(f"问题{i}", f"{ANSWER[i % 30:]} 编号{i} 邮箱 user{i}@example.com", votes=i % 4) for i in range(1500)]
    rows += [rows[7], rows[900]]
    source = write_lines(tmp_path / "in.jsonl", rows)
    one = clean_file(source, tmp_path / "one.jsonl", num_proc=1, html=False)
    two = clean_file(source, tmp_path / "two.jsonl", num_proc=2, html=False)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert (tmp_path / "one.rejects.jsonl").read_bytes() == (tmp_path / "two.rejects.jsonl").read_bytes()
    assert one.kept == two.kept and one.records_in == 1502
    assert sum(s.masked["EMAIL"] for s in two.steps) == 1502


def test_html_report_is_self_contained(tmp_path):
    clean_file(mixed_file(tmp_path), tmp_path / "clean.jsonl")
    page = (tmp_path / "clean.report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    assert not re.search(r"""(?:src|href)=['"]?(?:https?:)?//""", page)  # no external assets
    for text in ("dedup.exact", "dedup.near", "PHONE", "in = kept + rejected", "duplicate clusters".title()[:9]):
        assert text in page
    assert "&lt;PHONE&gt;" in page  # record text is escaped


def test_cli_convert_keep_then_clean_with_a_recipe(tmp_path, capsys):
    csv = tmp_path / "qa.csv"
    csv.write_bytes(("title,reply,votes,is_best\n"
                     f"{QUESTION},{ANSWER},5,1\n"
                     f"{QUESTION},\"{ANSWER}\",1,0\n"
                     "合同怎么写？,写清楚双方的权利义务,2,1\n").encode("gbk"))
    assert main(["data", "convert", str(csv), "-o", str(tmp_path / "qa.jsonl"), "--map", "user=title",
                 "--map", "assistant=reply", "--keep", "votes", "--keep", "is_best"]) == 0
    assert read_jsonl(tmp_path / "qa.jsonl")[0]["votes"] == 5
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - normalize: {}\n  - filter: {where: \"votes >= 2\"}\n  - dedup: {method: exact}\n")
    capsys.readouterr()
    assert main(["data", "clean", str(tmp_path / "qa.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--recipe", str(recipe)]) == 0
    assert "read 3 records → kept 2" in capsys.readouterr().out
    assert [r["votes"] for r in read_jsonl(tmp_path / "out.jsonl")] == [5, 2]


def test_bad_recipe_and_strict_mode_exit_2(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - normalise: {}\n  - dedup: {method: fuzzy}\n  - filter: {lenght: 3}\n")
    source = mixed_file(tmp_path)
    assert main(["data", "clean", str(source), "-o", str(tmp_path / "o.jsonl"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "steps[0]: unknown step 'normalise' (did you mean 'normalize'?)" in err
    assert "steps[1].dedup.method" in err and "steps[2].filter.lenght" in err
    assert main(["data", "clean", str(source), "-o", str(tmp_path / "o.jsonl"), "--strict"]) == 2
    assert "raw.jsonl:5: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written


@pytest.mark.parametrize("content, message", [("", "the file is empty"), ("\n\n", "the file is empty")])
def test_empty_input(tmp_path, capsys, content, message):
    (tmp_path / "e.jsonl").write_text(content)
    assert main(["data", "clean", str(tmp_path / "e.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_is_cleaned_as_one_dataset_written_outside_it(tmp_path, capsys):
    folder = tmp_path / "parts"
    folder.mkdir()
    row = {"messages": [{"role": "user", "content": "押金什么时候退？"},
                        {"role": "assistant", "content": "退租交房验收后七日内退还押金。"}]}
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["data", "clean", str(folder), "-o", str(folder / "clean.jsonl")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["data", "clean", str(folder), "-o", str(tmp_path / "clean.jsonl")]) == 0
    assert len(read_jsonl(tmp_path / "clean.jsonl")) == 1  # b.jsonl's copy of a.jsonl's record is a duplicate
