"""The command line, in-process: bad input is exit code 2 with a message that says what and where (no traceback);
`models`, `--help` and `chat` work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import cli
from lmforge.config import Config
from lmforge.generate import SamplingParams, load_for_inference, reply
from lmforge.model.loader import BUILTIN_MODELS
from lmforge.train.loop import train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")



def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, out: str, err: str) -> str:
    """Exit 2, the message on stderr, no traceback anywhere; returns the message."""
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: "), err
    return err


def messages_record(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


@pytest.fixture
def project(tmp_path, monkeypatch, llama_dir):
    """A working dir with a config naming the tiny model; train(data_file, *overrides) runs `lmforge train`."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": llama_dir}, "data": {"train": ["train.jsonl"]},
                                      "train": {"output_dir": "runs/t", "max_steps": 1, "batch_size": 2}}))

    def train_cli(capsys, *overrides: str):
        return run_cli(capsys, "train", str(config), *overrides)
    return train_cli


# ---------------------------------------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(project, tmp_path, capsys):
    lines = [json.dumps(messages_record(0)), '{"messages": [{"role": "user", "content": "hi"}', json.dumps(
        messages_record(2))]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    err = assert_user_error(*project(capsys))
    assert "train.jsonl:2:" in err and "invalid JSON" in err


def test_alpaca_record_without_output_names_file_line_and_field(project, tmp_path, capsys):
    rows = [{"instruction": "Say a.", "output": "a"}, {"instruction": "Say b.", "output": "b"},
            {"instruction": "Say c.", "input": "now"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = assert_user_error(*project(capsys))
    assert "train.jsonl:3" in err and "missing field 'output'" in err


def test_empty_dataset_file(project, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("\n\n")
    err = assert_user_error(*project(capsys))
    assert "train.jsonl" in err and "empty" in err


def test_unknown_record_format_lists_its_keys(project, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    err = assert_user_error(*project(capsys))
    assert "train.jsonl:1" in err and "cannot tell the format" in err
    assert "question, answer" in err
    assert "alpaca" in err and "sharegpt" in err  # the shapes it does read


def test_unknown_config_key(project, capsys):
    err = assert_user_error(*project(capsys, "train.learnig_rate=1e-4"))
    assert "unknown key 'train.learnig_rate'" in err and "did you mean train.learning_rate" in err


def test_model_path_that_does_not_exist(project, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps(messages_record(0)) + "\n")
    err = assert_user_error(*project(capsys, "model.name_or_path=./no/such/model"))
    assert "model path does not exist: ./no/such/model" in err
    assert "smollm2-135m-instruct" in err  # what to use instead


def test_cutoff_len_shorter_than_every_prompt(project, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(messages_record(i)) + "\n" for i in range(4)))
    err = assert_user_error(*project(capsys, "cutoff_len=5"))
    assert "data.cutoff_len=5" in err and "Raise data.cutoff_len" in err
    assert not (tmp_path / "runs" / "t").exists()  # refused before anything was written


def test_dataset_name_missing_from_dataset_info(project, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"my_data": {"file_name": "my_data.json"}}))
    (tmp_path / "data" / "my_data.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    err = assert_user_error(*project(capsys, "data.train=my_dta"))
    assert "'my_dta'" in err and str(Path("data") / "dataset_info.json") in err
    assert "Did you mean 'my_data'?" in err


def test_missing_config_file(tmp_path, capsys):
    err = assert_user_error(*run_cli(capsys, "train", str(tmp_path / "nope.yaml")))
    assert "config file not found" in err


# ---------------------------------------------------------------------------------------------- models, help


def test_models_lists_the_builtin_aliases(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))  # listing must not need (or build) a cache
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for alias in BUILTIN_MODELS:
        assert alias in out
    assert "ALIAS" in out.splitlines()[0]
    assert not (tmp_path / "home" / "models").exists()


def test_python_m_lmforge_help():
    result = subprocess.run([sys.executable, "-m", "lmforge", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for verb in ("train", "chat", "models"):
        assert verb in result.stdout
    assert "Traceback" not in result.stderr


def test_help_does_not_import_torch():
    # `lmforge --help` is meant to be instant: the heavy libraries load inside the verbs.
    code = "import sys, lmforge.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ---------------------------------------------------------------------------------------------- chat


def test_chat_prompt_on_a_trained_run(llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(messages_record(i)) + "\n" for i in range(4)))
    run = train(Config.model_validate({"model": {"name_or_path": llama_dir}, "data": {"train": [str(data)]},
                                       "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1,
                                                 "batch_size": 2}}))
    capsys.readouterr()
    code, out, err = run_cli(capsys, "chat", str(run.root), "--prompt", "hi", "--max-new-tokens", "4",
                             "--decode-dtype", "float32")  # float32: exactly the model's own greedy reply
    assert code == 0, err
    model, tokenizer = load_for_inference(run_dir=str(run.root))
    expected = reply(model, tokenizer, [{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4))
    assert expected and out == expected + "\n"


def test_chat_on_a_dir_without_a_trained_artifact(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: run\n")
    err = assert_user_error(*run_cli(capsys, "chat", str(tmp_path / "run"), "--prompt", "hi"))
    assert str(tmp_path / "run") in err and "no trained adapter/ or model/" in err
    assert "lmforge train" in err


def test_chat_without_a_run_or_model(capsys):
    err = assert_user_error(*run_cli(capsys, "chat", "--prompt", "hi"))
    assert "--model" in err
