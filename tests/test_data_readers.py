"""Readers: dataset files in every supported shape become the one Conversation type, and bad input fails with
file:line, the field, and what to do."""

import json
from pathlib import Path

import pytest

from lmforge.conversation import Conversation
from lmforge.data.datasets import (
    DatasetSpec,
    load_conversations,
    load_many,
    resolve_dataset,
)
from lmforge.data.formats import FormatSpec, convert, detect_format
from lmforge.data.sources import read_records
from lmforge.errors import DataError

# Small files written for these tests in the shapes of LLaMA-Factory's data/ folder (dataset_info.json + its demos).
LLAMAFACTORY_DATA = Path(__file__).resolve().parent / "assets" / "llamafactory"


def conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation.from_dicts([{"role": role, "content": content} for role, content in turns])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load(path: Path, **spec) -> list[Conversation]:
    return load_conversations(DatasetSpec(path=path, **spec))


# --- formats ---------------------------------------------------------------------------------------------------

def test_alpaca_with_input_history_and_system():
    record = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief.",
              "history": [["hi", "hey"], ["how are you?", "fine"]]}
    assert convert(record, "f.json:1") == conv(
        ("system", "Be brief."), ("user", "hi"), ("assistant", "hey"), ("user", "how are you?"),
        ("assistant", "fine"), ("user", "Translate\nbonjour"), ("assistant", "hello"))


def test_alpaca_empty_input_is_just_the_instruction():
    assert convert({"instruction": "Say hi", "input": "", "output": "hi"}, "f:1") == conv(
        ("user", "Say hi"), ("assistant", "hi"))


def test_alpaca_missing_output_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing field 'output'"):
        load(path)


def test_alpaca_bad_history_pair_is_reported():
    with pytest.raises(DataError, match=r"f:3: history\[0\] should be a \[user, assistant\] pair"):
        convert({"instruction": "q", "output": "a", "history": [["only one"]]}, "f:3")


def test_sharegpt_with_top_level_system():
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
              "system": "You are kind."}
    assert convert(record, "f:1") == conv(("system", "You are kind."), ("user", "hi"), ("assistant", "hello"))


def test_sharegpt_system_message_in_the_list_wins_over_the_column():
    record = {"conversations": [{"from": "system", "value": "S1"}, {"from": "user", "value": "hi"},
                                {"from": "assistant", "value": "yo"}], "system": "S2"}
    assert convert(record, "f:1") == conv(("system", "S1"), ("user", "hi"), ("assistant", "yo"))


def test_sharegpt_tool_call_record_is_read():
    call = '{"name": "weather", "arguments": {"city": "Rome"}}'
    record = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": call},
                                {"from": "observation", "value": '{"sky": "sunny"}'},
                                {"from": "gpt", "value": "sunny"}],
              "tools": '[{"name": "weather", "description": "today", "parameters": {"type": "object", '
                       '"properties": {"city": {"type": "string"}}}}]'}
    result = convert(record, "f:7")
    assert [m.role for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[1].tool_calls[0].name == "weather"
    assert result.messages[1].tool_calls[0].arguments == {"city": "Rome"}
    assert result.messages[2].content == '{"sky": "sunny"}'
    assert result.tools[0]["function"]["name"] == "weather"
    bad = {**record, "conversations": [record["conversations"][0], {"from": "function_call", "value": '{"name": '}]}
    with pytest.raises(DataError, match=r"f:7: message 1 \(function_call\) is not valid JSON"):
        convert(bad, "f:7")
    with pytest.raises(DataError, match=r"f:7: field 'tools' is not valid JSON"):
        convert({**record, "tools": "[{"}, "f:7")


def test_sharegpt_non_alternating_turns_report_the_message_index():
    record = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(DataError, match=r"f:1: message 1 is 'user' but 'assistant' was expected"):
        convert(record, "f:1")


def test_chatglm3_conversations():
    record = {"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a", "loss": True}]}
    assert convert(record, "f:1") == conv(("system", "S"), ("user", "q"), ("assistant", "a"))


def test_chatglm3_loss_false_marks_an_untrained_turn():
    record = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False},
                                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    result = convert(record, "f:1")
    assert [m.train for m in result.messages] == [None, False, None, None]
    assert result.to_record()["messages"][1]["loss"] is False


def test_chatglm3_tool_turn_is_a_call_and_its_result():
    record = {"tools": [{"name": "search", "description": "find", "parameters": {"type": "object", "properties": {}}}],
              "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me look."},
                                {"role": "tool", "name": "search", "parameters": {"k": "v"},
                                 "observation": {"hits": 1}},
                                {"role": "assistant", "content": "Found one."}]}
    result = convert(record, "f:1")
    assert [m.role for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[1].content == "Let me look." and result.messages[1].tool_calls[0].arguments == {"k": "v"}
    assert result.messages[2].content == '{"hits": 1}' and result.messages[2].name == "search"
    with pytest.raises(DataError, match=r"f:1: message 1 is 'tool' but 'assistant' was expected"):
        convert({"conversations": [{"role": "user", "content": "q"}, {"role": "observation", "content": "{}"}]}, "f:1")


def test_openai_messages():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    result = convert(record, "f:4")
    assert result == conv(("user", "q"), ("assistant", "a"))
    assert result.source == "f:4"


@pytest.mark.parametrize("record, expected", [
    ({"messages": []}, "messages"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"conversations": [{"role": "user", "content": "x"}]}, "conversations"),
    ({"instruction": "x", "output": "y"}, "alpaca"),
])
def test_detect_format(record, expected):
    assert detect_format(record, "f:1") == expected


def test_unknown_format_lists_the_keys_and_the_shapes_we_read():
    with pytest.raises(DataError, match=r"f:2: cannot tell the format.*keys: question, answer") as info:
        detect_format({"question": "q", "answer": "a"}, "f:2")
    for shape in ("messages", "sharegpt", "conversations", "alpaca", "instruction"):
        assert shape in str(info.value)


def test_format_spec_columns_rename_alpaca_fields():
    spec = FormatSpec("alpaca", columns={"prompt": "q", "response": "a"})
    assert convert({"q": "question", "a": "answer"}, "f:1", spec) == conv(("user", "question"), ("assistant", "answer"))


# --- sources ---------------------------------------------------------------------------------------------------

def test_json_array_records_carry_the_line_where_each_starts(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"instruction": "a",\n   "output": "b"},\n\n  {"instruction": "c", '
                                      '"output": "d"}\n]\n')
    assert [where for _, where in read_records(path)] == [f"{path}:2", f"{path}:5"]


def test_json_suffix_with_jsonl_content_is_read_as_jsonl(tmp_path):
    path = write(tmp_path / "really_jsonl.json", '{"instruction": "a", "output": "b"}\n\n'
                                                 '{"instruction": "c", "output": "d"}\n')
    records = list(read_records(path))
    assert [r["instruction"] for r, _ in records] == ["a", "c"]
    assert [where for _, where in records] == [f"{path}:1", f"{path}:3"]


def test_file_format_override(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n{"b": 2}\n')
    with pytest.raises(DataError, match=r"(?s)d\.jsonl:2:1: invalid JSON.*is this JSONL"):
        list(read_records(path, file_format="json"))


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "你好", "output": "hi"}).encode() + b"\n")
    assert load(path) == [conv(("user", "你好"), ("assistant", "hi"))]


def test_malformed_jsonl_reports_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError, match=r"(?s)bad\.jsonl:2:\d+: invalid JSON: .*broken line"):
        load(path)


def test_malformed_json_array_reports_the_line_of_the_error(tmp_path):
    path = write(tmp_path / "bad.json", '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3:3: invalid JSON: expected ',' or ']'"):
        load(path)


def test_trailing_comma_in_array_is_reported(tmp_path):
    path = write(tmp_path / "t.json", '[{"instruction": "a", "output": "b"},\n]')
    with pytest.raises(DataError, match=r"t\.json:2:1: invalid JSON: trailing comma"):
        load(path)


@pytest.mark.parametrize("text", ["", "  \n\n", "[]", "[ \n ]"])
def test_empty_file_says_it_is_empty(tmp_path, text):
    path = write(tmp_path / "empty.json", text)
    with pytest.raises(DataError, match=r"empty\.json: the file is empty"):
        load(path)


def test_non_object_record_is_reported_with_where(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"instruction": "a", "output": "b"},\n  ["not", "an", "object"]\n]')
    with pytest.raises(DataError, match=r"d\.json:3: record is a JSON array"):
        load(path)


def test_missing_file_says_so_with_the_current_directory(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*nope\.jsonl \(relative paths are resolved from the "
                                        r"current directory"):
        load(tmp_path / "nope.jsonl")


def test_max_samples_takes_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": str(i), "output": "x"} for i in range(5)])
    assert [c.messages[0].content for c in load_conversations(DatasetSpec(path), max_samples=2)] == ["0", "1"]


# --- dataset_info.json -----------------------------------------------------------------------------------------

@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    write(tmp_path / "alpaca.json", json.dumps([{"instruction": "q", "input": "i", "output": "a"}]))
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "S"},
                                                        {"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}])
    info = {
        "my_alpaca": {"file_name": "alpaca.json"},
        "my_openai": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
        "hub_only": {"hf_hub_url": "someone/some_dataset"},
        "prefs": {"file_name": "alpaca.json", "ranking": True},
        "pictures": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"images": "images"}},
    }
    write(tmp_path / "dataset_info.json", json.dumps(info))
    return tmp_path


def test_existing_file_path_wins_and_reads_in_auto_format(dataset_dir):
    spec = resolve_dataset(str(dataset_dir / "alpaca.json"), dataset_dir)
    assert spec.path == dataset_dir / "alpaca.json" and spec.format.format == "auto"
    assert load_conversations(spec) == [conv(("user", "q\ni"), ("assistant", "a"))]


def test_name_resolves_relative_to_dataset_dir(dataset_dir):
    spec = resolve_dataset("my_alpaca", dataset_dir)
    assert spec.path == dataset_dir / "alpaca.json" and spec.format.format == "alpaca" and spec.name == "my_alpaca"


def test_sharegpt_tags_read_openai_style_messages(dataset_dir):
    spec = resolve_dataset("my_openai", dataset_dir)
    assert load_conversations(spec) == [conv(("system", "S"), ("user", "q"), ("assistant", "a"))]


def test_load_many_concatenates_and_counts(dataset_dir):
    conversations, counts = load_many(["my_alpaca", "my_openai"], dataset_dir)
    assert len(conversations) == 2 and counts == {"my_alpaca": 1, "my_openai": 1}


def test_missing_name_suggests_the_closest_and_shows_how_to_add_one(dataset_dir):
    with pytest.raises(DataError) as info:
        resolve_dataset("my_alpcaa", dataset_dir)
    message = str(info.value)
    assert "Did you mean 'my_alpaca'?" in message
    assert message.index("my_alpaca") < message.index("pictures")  # closest first
    assert '"file_name": "my_alpcaa.json"' in message


def test_hub_only_entry_explains_that_we_do_not_download(dataset_dir):
    with pytest.raises(DataError, match=r"'hub_only': only available from a hub.*does not download datasets"
                                        r".*\"file_name\""):
        resolve_dataset("hub_only", dataset_dir)


def test_ranking_and_multimodal_entries_are_refused(dataset_dir):
    with pytest.raises(DataError, match=r"preference data \(ranking\) is for stage dpo/rm, not sft"):
        resolve_dataset("prefs", dataset_dir)
    with pytest.raises(DataError, match="multimodal data not supported"):
        resolve_dataset("pictures", dataset_dir)


def test_neither_file_nor_name_without_dataset_info(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'x' is neither a file nor a name in .*dataset_info\.json "
                                        r"\(not found\)"):
        resolve_dataset("x", tmp_path)


# --- a LLaMA-Factory data folder: dataset_info.json names, columns, sharegpt tags ------------------------------

def test_llamafactory_demo_datasets_load_through_dataset_info():
    conversations, counts = load_many(["identity", "alpaca_en_demo", "alpaca_zh_demo"], LLAMAFACTORY_DATA)
    assert counts == {"identity": 3, "alpaca_en_demo": 4, "alpaca_zh_demo": 3}
    assert len(conversations) == sum(counts.values())
    assert all(c.messages[-1].role == "assistant" for c in conversations)
    identity = conversations[0]
    assert identity.source == f"{LLAMAFACTORY_DATA / 'identity.json'}:2"
    assert identity == conv(("user", "hi"), ("assistant", "Hi! I am {{name}}, a helper made by {{author}}. What "
                                                          "would you like to do?"))
    # a non-empty `input` follows the instruction on a new line, as LLaMA-Factory joins them
    assert conversations[4].messages[0].content == ("Turn this sentence into the past tense.\n"
                                                    "She walks to the station and buys a ticket.")
    # `system` and `history` columns (named in dataset_info.json) become the turns before the instruction
    assert [(m.role, m.content) for m in conversations[-1].messages] == [
        ("system", "你是图书馆的前台，回答要简短。"),
        ("user", "图书馆几点开门？"), ("assistant", "工作日早上八点开门。"),
        ("user", "晚上几点关门？"), ("assistant", "晚上九点关门。"),
        ("user", "那周末呢？"), ("assistant", "周末上午十点开门，下午五点关门。")]
    tool_use, _ = load_many(["glaive_toolcall_en_demo"], LLAMAFACTORY_DATA)  # sharegpt function_call / observation
    assert [m.role for m in tool_use[0].messages] == ["user", "assistant", "tool", "assistant"]
    assert tool_use[0].messages[1].tool_calls[0].arguments == {"value": 80, "percent": 15}
    assert tool_use[0].tools[0]["function"]["name"] == "percentage"
