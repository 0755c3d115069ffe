"""Prepared data is cached by content: a second run with the same data, tokenizer and options reads token ids from the
cache (and gets the same examples); any change misses. A training config may name a cleaning recipe, which then runs
inside `lmforge train`, once."""

import json
from pathlib import Path

import pytest

import lmforge.data.cache as data_cache
from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.train.stages import prepare_data


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "cache_root", lambda: tmp_path / "cache")


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def config(data: Path, **data_fields) -> Config:
    return Config.model_validate({"model": {"name_or_path": "unused"}, "data": {"train": [str(data)], **data_fields},
                                  "train": {"output_dir": "unused"}})


QA = [("房东不退押金怎么办？", "可以先与房东协商，协商不成可以向住房管理部门投诉，或者向人民法院提起诉讼。"),
      ("房租每年能涨多少？", "合同期内房东不能单方面涨租；续签时的涨幅由双方协商，合同里写明最好。"),
      ("我想提前退租要赔钱吗？", "看合同的违约条款：通常需要提前一个月通知，并可能承担一个月租金的违约金。"),
      ("热水器坏了谁来修？", "正常使用中损坏的设施一般由出租人负责维修，人为损坏则由承租人承担费用。"),
      ("可以把房子转租给朋友吗？", "转租须经出租人同意，未经同意擅自转租的，出租人可以解除合同。"),
      ("What should a lease say?", "The rent, the term, the deposit, who pays for repairs and how to give notice."),
      ("Can my landlord enter without notice?", "Usually not: most places require reasonable notice except in "
                                                "emergencies such as a burst pipe."),
      ("Who pays the utility bills?", "Whoever the lease names; if it says nothing, the tenant usually pays for "
                                      "what they use.")]


def records(n: int) -> list[dict]:
    """Conversations different enough not to be near-duplicates of each other."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:n]]


def test_second_preparation_reads_token_ids_from_the_cache(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", records(6))
    first = prepare_data(config(data), tokenizer)
    second = prepare_data(config(data), tokenizer)
    assert (first.report["tokenized_from_cache"], second.report["tokenized_from_cache"]) == (False, True)
    assert second.train == first.train and second.report["train"] == first.report["train"]
    assert prepare_data(config(data, cutoff_len=60), tokenizer).report["tokenized_from_cache"] is False
    write(data, records(7))
    assert prepare_data(config(data), tokenizer).report["tokenized_from_cache"] is False
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert prepare_data(config(data), tokenizer).report["tokenized_from_cache"] is False


def test_a_recipe_in_the_training_config_cleans_once(tmp_path, tokenizer, capsys):
    rows = records(4) + [records(4)[0]]                                       # an exact duplicate
    rows[1]["messages"][1]["content"] += " 电话 13812345678"                  # personal information
    rows.append({"messages": [{"role": "user", "content": "你是谁"},
                              {"role": "assistant", "content": "作为一个AI语言模型，我没有名字。"}]})  # boilerplate
    data = write(tmp_path / "raw.jsonl", rows)
    prepared = prepare_data(config(data, recipe="default"), tokenizer)
    cleaning = prepared.report["cleaning"][str(data)]
    assert (cleaning["records_in"], cleaning["kept"], cleaning["rejected"], cleaning["cached"]) == (6, 4, 2, False)
    assert prepared.report["train"]["kept"] == 4
    rejects = [json.loads(line) for line in Path(cleaning["rejects"]).read_text().splitlines()]
    assert sorted(r["step"] for r in rejects) == ["dedup.exact", "filter.markers"]
    decoded = [tokenizer.decode(e.input_ids) for e in prepared.train]
    assert any("<PHONE>" in text for text in decoded) and not any("13812345678" in text for text in decoded)
    again = prepare_data(config(data, recipe="default"), tokenizer)
    assert again.report["cleaning"][str(data)]["cached"] is True and again.report["tokenized_from_cache"] is True
    assert "(cached)" in capsys.readouterr().out


def test_a_missing_recipe_file_is_a_config_error(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", records(2))
    with pytest.raises(ConfigError, match="recipe file not found"):
        prepare_data(config(data, recipe=str(tmp_path / "nope.yaml")), tokenizer)


def test_a_folder_dataset_is_cleaned_as_one_dataset(tmp_path, tokenizer):
    """Duplicates across a folder's files are found (each file cleaned alone would keep both), and the folder gets
    one report, one HTML page."""
    folder = tmp_path / "folder"
    folder.mkdir()
    alpaca = [{"instruction": q, "output": a} for q, a in QA[:5]]  # a dataset_info.json entry's default format
    write(folder / "a.jsonl", alpaca[:3])
    write(folder / "b.jsonl", alpaca[2:])  # starts with a.jsonl's last record
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rent": {"file_name": "folder"}}))
    prepared = prepare_data(config(Path("rent"), recipe="default", dataset_dir=str(tmp_path)), tokenizer)
    [cleaning] = prepared.report["cleaning"].values()
    assert (cleaning["records_in"], cleaning["kept"], cleaning["rejected"]) == (6, 5, 1)
    rejects = [json.loads(line) for line in Path(cleaning["rejects"]).read_text().splitlines()]
    assert [(r["step"], Path(r["line"].split(":")[0]).name) for r in rejects] == [("dedup.exact", "b.jsonl")]
    assert Path(cleaning["report"]).read_text(encoding="utf-8").lower().count("<html") == 1
