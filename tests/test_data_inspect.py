"""`lmforge data inspect`: every planted problem reported with its line and message index, token statistics equal to
an independent count with a real byte-level BPE tokenizer, samples that mark exactly the trained tokens, and a JSON
report that round-trips through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import llama3_tokenizer, make_tiny_model

from lmforge.cli import main
from lmforge.data.inspect import (
    PLAIN_MARKS,
    SHOWN_PROBLEMS,
    format_report,
    format_segments,
    inspect_dataset,
)


def msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


GOOD = msgs(("user", "你好"), ("assistant", "你好！有什么可以帮你？"))
# line → (kind, message index) for each planted problem; the good records carry none
PLANTED = [
    (GOOD, None),
    (msgs(("user", "hi"), ("assistant", "")), ("empty_turn", 1)),
    (msgs(("assistant", "I open"), ("user", "x")), ("wrong_role_order", 0)),
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")), ("non_alternating", 1)),
    (msgs(("user", "only a question")), ("missing_assistant", None)),
    (msgs(("user", "a"), ("bot", "b")), ("unknown_role", 1)),
    (msgs(("user", "q"), ("assistant", "a"), ("user", "dangling")), ("missing_reply", 2)),
    (GOOD, None),
    (msgs(("system", "s"), ("user", "   "), ("assistant", "ok")), ("empty_turn", 1)),
    (msgs(("user", "q"), ("assistant", "a"), ("system", "late")), ("wrong_role_order", 2)),
]


def write_planted(tmp_path):
    lines = [json.dumps(record, ensure_ascii=False) for record, _ in PLANTED]
    lines.insert(7, '{"messages": [broken')  # line 8: invalid JSON, the records after it are still read
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = {}
    for line, (_, problem) in enumerate(PLANTED, start=1):
        if problem:
            expected[line if line < 8 else line + 1] = problem
    expected[8] = ("invalid_json", None)
    return path, expected


def test_every_planted_problem_is_reported_with_its_line_and_message_index(tmp_path):
    path, expected = write_planted(tmp_path)
    report = inspect_dataset(str(path), model=None)
    found = {int(p.where.rsplit(":", 1)[1]): (p.kind, p.message_index) for p in report.problems}
    assert found == expected
    assert all(p.where.startswith(f"{path}:") for p in report.problems)
    assert (report.records, report.conversations) == (11, 5)
    assert report.files == [{"path": str(path), "file_format": "jsonl", "shape": "messages", "shape_detected": True,
                             "records": 11}]
    text = format_report(report, colour=False)
    assert f"{path}:2: message 1 (assistant) is empty" in text
    assert f"{path}:8: invalid JSON" in text


def test_sharegpt_and_alpaca_problems_name_the_turn_or_field(tmp_path, write_jsonl):
    sharegpt = write_jsonl("s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        {"system": "你是律师。", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    ])
    problems = inspect_dataset(str(sharegpt), model=None).problems
    # indices are those of the file's list, even when a top-level system field is put in front of it
    assert [(p.where, p.kind, p.message_index) for p in problems] == [
        (f"{sharegpt}:2", "unknown_role", 1), (f"{sharegpt}:3", "empty_turn", 1)]
    assert problems[1].message == "message 1 (assistant) is empty"
    alpaca = write_jsonl("a.jsonl", [{"instruction": "q", "output": "a", "history": [["h", ""]]},
                                     {"instruction": "q", "output": " "}, {"instruction": "q"}])
    problems = inspect_dataset(str(alpaca), model=None).problems
    assert [(p.where.rsplit(":", 1)[1], p.kind) for p in problems] == [
        ("1", "empty_turn"), ("2", "empty_turn"), ("3", "missing_field")]
    assert [p.message for p in problems[:2]] == ["history[0][1] (assistant) is empty",
                                                 "field 'output' (assistant) is empty"]


def test_a_dataset_name_from_dataset_info_is_read_with_its_columns(tmp_path):
    (tmp_path / "law.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q2"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"law": {"file_name": "law.json", "columns": {"prompt": "question", "response": "answer"}}}))
    report = inspect_dataset("law", model=None, dataset_dir=str(tmp_path))
    assert report.files[0]["file_format"] == "json" and report.files[0]["shape"] == "alpaca"
    assert [(p.where, p.kind) for p in report.problems] == [(f"{tmp_path / 'law.json'}:1", "missing_field")]


def word_reply(n: int) -> str:
    return " ".join(["word"] * n)


def test_token_statistics_equal_an_independent_count(tmp_path, write_jsonl, tokenizer, tiny_model_dir):
    # prompts and replies of varied length; plain words, so whole-text tokenization equals render's per-turn cuts
    data = [msgs(("user", word_reply(3 + 7 * i)), ("assistant", word_reply(1 + 13 * (i % 5)))) for i in range(20)]
    path = write_jsonl("lengths.jsonl", data)
    cutoff = 80
    report = inspect_dataset(str(path), model=tiny_model_dir, cutoff_len=cutoff)

    def count(messages: list[dict], prompt: bool = False) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lengths = np.array([count(r["messages"]) for r in data])
    prompts = np.array([count(r["messages"][:1], prompt=True) for r in data])
    # supervised = the reply and its end-of-turn token, not the newline after it
    supervised = lengths - prompts - 1
    tokens = report.tokens
    assert tokens["conversations"] == 20
    for p in (50, 90, 95, 99):
        assert tokens["length"][f"p{p}"] == int(np.percentile(lengths, p, method="inverted_cdf"))
    assert tokens["length"]["max"] == lengths.max()
    assert tokens["fit"] == (lengths <= cutoff).sum()
    assert tokens["dropped"] == (prompts >= cutoff).sum() > 0
    assert tokens["truncated"] == ((lengths > cutoff) & (prompts < cutoff)).sum() > 0
    assert tokens["supervised_tokens"] == supervised.sum()
    kept = lengths[prompts < cutoff]
    assert tokens["kept_tokens"] == np.minimum(kept, cutoff).sum()
    assert tokens["kept_supervised_tokens"] == np.minimum(supervised, np.maximum(cutoff - prompts, 0)).sum()


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_samples_mark_exactly_the_assistant_tokens(tmp_path, write_jsonl, tokenizer, tiny_model_dir, template):
    model = tiny_model_dir
    end = "<|im_end|>"
    if template == "llama3":
        model = make_tiny_model("llama", llama3_tokenizer(), tmp_path / "tiny-llama3")
        end = "<|eot_id|>"
    conversation = msgs(("system", "你是律师。"), ("user", "试用期被辞退怎么办？"), ("assistant", "先要求书面理由。"),
                        ("user", "然后呢？"), ("assistant", "申请劳动仲裁。"))
    path = write_jsonl("sample.jsonl", [conversation, GOOD, GOOD])
    report = inspect_dataset(str(path), model=model, samples=2)
    assert [s["where"] for s in report.samples] == [f"{path}:1", f"{path}:2"]
    segments = report.samples[0]["segments"]
    assert [s["text"] for s in segments if s["trained"]] == [f"先要求书面理由。{end}", f"申请劳动仲裁。{end}"]
    rendered = tokenizer.apply_chat_template(conversation["messages"], tokenize=False) if template == "chatml" \
        else llama3_tokenizer().apply_chat_template(conversation["messages"], tokenize=False)
    assert "".join(s["text"] for s in segments) == rendered
    plain = format_segments(segments, colour=False)
    left, right = PLAIN_MARKS
    assert plain == rendered.replace("先要求书面理由。" + end, f"{left}先要求书面理由。{end}{right}").replace(
        "申请劳动仲裁。" + end, f"{left}申请劳动仲裁。{end}{right}")
    coloured = format_segments(segments, colour=True)
    assert f"\x1b[1;32m申请劳动仲裁。{end}\x1b[0m" in coloured and left not in coloured


@pytest.mark.parametrize("train_on, trained", [("last_assistant", ["a2<|im_end|>"]), ("all", None)])
def test_samples_follow_train_on(write_jsonl, tokenizer, tiny_model_dir, train_on, trained):
    conversation = msgs(("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    path = write_jsonl("t.jsonl", [conversation])
    segments = inspect_dataset(str(path), model=tiny_model_dir, train_on=train_on).samples[0]["segments"]
    rendered = tokenizer.apply_chat_template(conversation["messages"], tokenize=False)
    assert [s["text"] for s in segments if s["trained"]] == (trained or [rendered])


def test_cli_json_round_trips_and_the_exit_code_says_whether_there_were_problems(tmp_path, write_jsonl,
                                                                                  tiny_model_dir, capsys):
    path, _ = write_planted(tmp_path)
    assert main(["data", "inspect", str(path), "--model", tiny_model_dir, "--json", "--cutoff-len", "16"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed == inspect_dataset(str(path), model=tiny_model_dir, cutoff_len=16).to_dict()
    assert printed["problem_counts"]["empty_turn"] == 2 and printed["tokens"]["cutoff_len"] == 16
    clean = write_jsonl("clean.jsonl", [GOOD] * 3)
    assert main(["data", "inspect", str(clean), "--model", tiny_model_dir, "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{clean}: JSONL, 3 records, shape messages" in out and "no problems found" in out
    assert out.count("sample ") == 1 and f"{PLAIN_MARKS[0]}你好！有什么可以帮你？<|im_end|>{PLAIN_MARKS[1]}" in out


def test_the_text_report_caps_the_problem_list(tmp_path, write_jsonl):
    path = write_jsonl("many.jsonl", [msgs(("user", "q"), ("assistant", ""))] * (SHOWN_PROBLEMS + 7))
    text = format_report(inspect_dataset(str(path), model=None), colour=False)
    assert text.count("is empty") == SHOWN_PROBLEMS and "… and 7 more (--json lists every one)" in text


def test_unreadable_input_is_exit_2_with_a_message(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"messages": []},\n{"messages": [}\n]', encoding="utf-8")
    assert main(["data", "inspect", str(broken), "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}:3:") and "invalid JSON" in err and "Traceback" not in err
    assert main(["data", "inspect", str(broken), "--model", "no-such-model"]) == 2
    assert "unknown model: 'no-such-model'" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl' is neither a file nor a name" in capsys.readouterr().err
    assert main(["data", "inspect", str(broken), "--cutoff-len", "0"]) == 2
    assert "--cutoff-len 0: must be a positive number" in capsys.readouterr().err
