"""`lmforge data split`: exact sizes, the same split on every run and machine, records copied unchanged, strata kept,
groups whole, and clear errors."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.split import split_file
from lmforge.errors import DataError, UserError

CATEGORIES = ["劳动法", "合同法", "婚姻法"]


def records(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    """alpaca-shaped records with Chinese text, a nested category and a conversation id (3 records per id)."""
    rng = random.Random(seed)
    return [{"instruction": f"问题 {i}：试用期被辞退怎么办？", "output": f"回答 {i}", "input": "",
             "meta": {"category": rng.choice(CATEGORIES), "conversation_id": f"c{i // 3}"}}
            for i in range(start, start + n)]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def split_lines(directory: Path, names=("train", "val", "test")) -> dict[str, list[str]]:
    return {name: lines(directory / f"{name}.jsonl") for name in names if (directory / f"{name}.jsonl").exists()}


def test_sizes_are_exact_and_every_line_is_copied_verbatim_once(tmp_path, write_jsonl):
    source = write_jsonl("qa.jsonl", records(103))
    # a CRLF line and surrounding blank lines must not change what is copied
    text = source.read_text(encoding="utf-8")
    source.write_text("\n" + text.replace("\n", "\r\n", 1) + "\n\n", encoding="utf-8")
    report = split_file(source, val=0.1, test=7, seed=0)
    assert report.sizes == {"train": 86, "val": 10, "test": 7}  # 0.1 × 103 = 10.3 → 10
    outputs = {name: lines(tmp_path / f"qa.{name}.jsonl") for name in ("train", "val", "test")}
    assert {name: len(found) for name, found in outputs.items()} == report.sizes
    written = Counter(line for found in outputs.values() for line in found)
    assert written == Counter(line.strip("\r") for line in text.splitlines())  # a multiset: nothing lost or doubled
    saved = json.loads((tmp_path / "qa.split.json").read_text(encoding="utf-8"))
    assert saved["sizes"] == report.sizes and saved["records"] == 103 and saved["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary files left behind
        "qa.jsonl", "qa.split.json", "qa.test.jsonl", "qa.train.jsonl", "qa.val.jsonl"]


def test_json_array_records_keep_their_content_and_key_order(tmp_path):
    source = tmp_path / "data.json"
    items = [{"output": f"答{i}", "instruction": f"问{i}", "score": i / 3, "history": [["q", "a"]]} for i in range(20)]
    source.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    report = split_file(source, tmp_path / "out", val=3, test=0.2)
    assert report.sizes == {"train": 13, "val": 3, "test": 4}
    assert report.file_format == "json"
    found = [json.loads(line) for split in split_lines(tmp_path / "out").values() for line in split]
    assert sorted(found, key=lambda r: r["instruction"]) == sorted(items, key=lambda r: r["instruction"])
    assert all(list(record) == ["output", "instruction", "score", "history"] for record in found)


def test_same_input_and_seed_give_identical_files_under_any_hash_seed(tmp_path, write_jsonl):
    source = write_jsonl("qa.jsonl", records(60))
    for run, hash_seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-m", "lmforge", "data", "split", str(source), "-o",
                               str(tmp_path / run), "--val", "0.1", "--test", "0.1", "--stratify", "meta.category",
                               "--seed", "7"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    in_process = split_file(source, tmp_path / "c", val=0.1, test=0.1, stratify="meta.category", seed=7)
    assert split_lines(tmp_path / "c") == split_lines(tmp_path / "a")
    assert in_process.sizes == {"train": 48, "val": 6, "test": 6}
    split_file(source, tmp_path / "d", val=0.1, test=0.1, stratify="meta.category", seed=8)
    assert split_lines(tmp_path / "d")["val"] != split_lines(tmp_path / "a")["val"]  # the seed matters


def test_the_split_does_not_depend_on_key_order_or_record_order(tmp_path, write_jsonl):
    data = records(50)
    reordered = [dict(reversed(list(r.items()))) for r in reversed(data)]
    split_file(write_jsonl("a.jsonl", data), tmp_path / "a", val=0.2)
    split_file(write_jsonl("b.jsonl", reordered), tmp_path / "b", val=0.2)

    def val_ids(directory: Path) -> set[str]:
        return {json.loads(line)["instruction"] for line in lines(directory / "val.jsonl")}

    assert val_ids(tmp_path / "a") == val_ids(tmp_path / "b")


def test_appending_records_moves_few_existing_ones(tmp_path, write_jsonl):
    before = records(2000)
    split_file(write_jsonl("v1.jsonl", before), tmp_path / "v1", val=0.1)
    split_file(write_jsonl("v2.jsonl", before + records(200, start=2000)), tmp_path / "v2", val=0.1)
    old_val = set(lines(tmp_path / "v1" / "val.jsonl"))
    new_val = set(lines(tmp_path / "v2" / "val.jsonl"))
    assert (len(old_val), len(new_val)) == (200, 220)
    # a global shuffle would keep ~10 % of the old validation set; ranking by content keeps nearly all of it
    assert len(old_val & new_val) >= 0.9 * len(old_val)


def test_stratify_keeps_each_value_share_in_every_split(tmp_path, write_jsonl):
    data = [{"q": f"{c}{i}", "meta": {"category": c}} for c, n in (("a", 500), ("b", 300), ("c", 200))
            for i in range(n)]
    random.Random(1).shuffle(data)
    report = split_file(write_jsonl("s.jsonl", data), val=0.1, test=0.1, stratify="meta.category")
    assert report.strata == {"a": {"train": 400, "val": 50, "test": 50}, "b": {"train": 240, "val": 30, "test": 30},
                             "c": {"train": 160, "val": 20, "test": 20}}
    found = {name: Counter(json.loads(line)["meta"]["category"] for line in lines(tmp_path / f"s.{name}.jsonl"))
             for name in ("train", "val", "test")}
    assert found["val"] == {"a": 50, "b": 30, "c": 20} and found["test"] == {"a": 50, "b": 30, "c": 20}


def test_stratified_sizes_on_uneven_strata_stay_exact_in_total(tmp_path, write_jsonl):
    data = [{"q": f"{c}{i}", "cat": c} for c, n in (("a", 7), ("b", 11), ("c", 13), ("d", 1)) for i in range(n)]
    report = split_file(write_jsonl("u.jsonl", data), val=0.15, test=5, stratify="cat")
    assert report.sizes == {"train": 22, "val": 5, "test": 5}
    for value, n in (("a", 7), ("b", 11), ("c", 13), ("d", 1)):
        got = report.strata[value]
        assert sum(got.values()) == n
        assert abs(got["val"] - 5 * n / 32) < 1 and abs(got["test"] - 5 * n / 32) < 1.5


def test_group_keeps_every_group_in_one_split(tmp_path, write_jsonl):
    rng = random.Random(3)
    data = [{"text": f"{g}-{k}", "conv": {"id": g}, "cat": CATEGORIES[g % 3]}
            for g in range(120) for k in range(rng.randint(1, 5))]
    rng.shuffle(data)
    report = split_file(write_jsonl("g.jsonl", data), val=0.1, test=0.1, group="conv.id", stratify="cat")
    where: dict[int, set[str]] = {}
    for name in ("train", "val", "test"):
        for line in lines(tmp_path / f"g.{name}.jsonl"):
            where.setdefault(json.loads(line)["conv"]["id"], set()).add(name)
    assert len(where) == 120 and all(len(splits) == 1 for splits in where.values())
    target = round(0.1 * len(data))
    assert abs(report.sizes["val"] - target) <= 5 and abs(report.sizes["test"] - target) <= 5
    assert sum(report.groups.values()) == 120 and sum(report.sizes.values()) == len(data)


def test_groups_too_big_to_leave_a_train_split_are_refused(write_jsonl):
    source = write_jsonl("big_groups.jsonl", [{"id": i // 5, "n": i} for i in range(10)])
    with pytest.raises(UserError, match="the 2 groups all went to val or test"):
        split_file(source, val=0.6, test=0.3, group="id")


def test_a_group_spread_over_two_strata_is_refused_with_both_lines(write_jsonl):
    source = write_jsonl("m.jsonl", [{"id": 1, "cat": "a"}, {"id": 2, "cat": "a"}, {"id": 1, "cat": "b"}])
    with pytest.raises(UserError, match=r"m.jsonl:3: --group 'id' = 1 also appears at .*m.jsonl:1 .*'a'.*'b'"):
        split_file(source, val=1, group="id", stratify="cat")


@pytest.mark.parametrize("kwargs, message", [
    ({"val": 0.6, "test": 0.4}, "add up to less than 1"),
    ({"val": 0, "test": 0}, "nothing to split off"),
    ({"val": "2.5"}, "must be whole"),
    ({"val": "ten"}, "expected a fraction below 1"),
    ({"val": -0.1}, "must be 0, a fraction"),
    ({"val": 6, "test": 4}, "leave none of the 10 for train"),
])
def test_impossible_sizes_are_refused(write_jsonl, kwargs, message):
    source = write_jsonl("t.jsonl", records(10))
    with pytest.raises(UserError, match=message):
        split_file(source, **kwargs)


def test_missing_key_names_the_line_and_the_keys_that_exist(tmp_path, write_jsonl):
    data = records(5)
    del data[3]["meta"]["category"]
    source = write_jsonl("k.jsonl", data)
    with pytest.raises(DataError, match=r"k.jsonl:4: --stratify key 'meta.category' is missing: no 'category' "
                                        r"under 'meta' \(keys there: conversation_id\)"):
        split_file(source, stratify="meta.category")
    with pytest.raises(DataError, match=r"k.jsonl:1: --group key 'conv' is missing: no 'conv' in the record "
                                        r"\(keys there: instruction, output, input, meta\)"):
        split_file(source, group="conv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.jsonl"]  # nothing written


def test_missing_or_empty_file_and_overwriting_the_input_are_refused(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        split_file(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        split_file(empty)
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records(10)), encoding="utf-8")
    with pytest.raises(UserError, match="would overwrite the input"):
        split_file(source, tmp_path)


def test_a_split_file_left_from_an_earlier_run_is_pointed_out(tmp_path, write_jsonl):
    source = write_jsonl("qa.jsonl", records(30))
    split_file(source, val=3, test=3)
    report = split_file(source, val=3)
    assert "test" not in report.files
    assert f"{tmp_path / 'qa.test.jsonl'} is from an earlier split" in report.summary()


def test_cli_prints_one_line_and_returns_0_or_2_with_the_message(tmp_path, write_jsonl, capsys):
    source = write_jsonl("qa.jsonl", records(40))
    assert main(["data", "split", str(source), "--test", "4", "--group", "meta.conversation_id"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"split 40 records of {source} (seed 0) → train ")
    assert main(["data", "split", str(source), "--val", "0.7", "--test", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --val 0.7 + --test 0.3") and "Traceback" not in err
