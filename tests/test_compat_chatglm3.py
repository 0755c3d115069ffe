"""ChatGLM3 finetune_demo configs (tests/assets/compat/chatglm3: lora / ptuning_v2 / sft in ChatGLM3's layout, written
for these tests) translated and trained as finetune_hf.py's users run them: `lmforge train CONFIG
data.dataset_dir=DATA_DIR model.name_or_path=MODEL`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge import cli
from lmforge.config import load_config
from lmforge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ASSETS = Path(__file__).parent / "assets" / "compat" / "chatglm3"
DATA_DIR = str(ASSETS / "data")


def test_lora_config_translates(capsys):
    config = load_config(ASSETS / "lora.yaml", [f"data.dataset_dir={DATA_DIR}", "model.name_or_path=my/model"])
    assert config.model.name_or_path == "my/model"
    assert config.method.type == "lora" and config.method.lora_rank == 4 and config.method.lora_alpha == 16
    assert config.method.lora_dropout == 0.05 and config.method.lora_target == "all"
    assert config.data.train == [f"{DATA_DIR}/train.json"] and config.data.val == [f"{DATA_DIR}/dev.json"]
    assert config.data.cutoff_len == 96 + 128 + 1  # finetune_hf.py's max_length
    assert config.train.max_steps == 2 and config.train.learning_rate == 5e-4  # "5e-4" is a string to PyYAML
    assert config.train.batch_size == 2 and config.train.eval_batch_size == 4
    assert config.train.logging_steps == 1 and config.train.save_steps == 100 and config.train.eval_steps == 100
    assert config.name == "output" and config.output_dir == Path("output")
    notes = capsys.readouterr().out
    for key in ("remove_unused_columns", "predict_with_generate", "generation_config", "use_cpu", "num_proc",
                "test_file", "task_type", "target_modules"):
        assert key in notes, key


def test_ptuning_v2_and_sft_configs_translate(capsys):
    ptuning = load_config(ASSETS / "ptuning_v2.yaml", [f"data.dataset_dir={DATA_DIR}"])
    assert ptuning.method.type == "ptuning" and ptuning.method.num_virtual_tokens == 8
    sft = load_config(ASSETS / "sft.yaml", [f"data.dataset_dir={DATA_DIR}"])
    assert sft.method.type == "full"
    notes = capsys.readouterr().out
    assert "ZeRO-3" in notes and "full fine-tuning" in notes
    assert sft.train.distributed == "fsdp"  # ds_zero_3.json under torchrun; one process: plain training


def test_prefix_projection_is_prefix_tuning_and_peft_keys_map(tmp_path):
    raw = yaml.safe_load((ASSETS / "ptuning_v2.yaml").read_text())
    raw["peft_config"].update(prefix_projection=True, encoder_hidden_size=64)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, [f"data.dataset_dir={DATA_DIR}"])
    assert config.method.type == "prefix" and config.method.prefix_projection_dim == 64
    raw = yaml.safe_load((ASSETS / "lora.yaml").read_text())
    raw["peft_config"]["target_modules"] = ["q_proj", "v_proj"]
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path, [f"data.dataset_dir={DATA_DIR}"]).method.lora_target == ["q_proj", "v_proj"]


def test_problems_are_all_reported_with_what_to_do(tmp_path):
    # without DATA_DIR: say how finetune_hf.py's first argument is given here
    with pytest.raises(ConfigError) as err:
        load_config(ASSETS / "lora.yaml")
    assert "data.dataset_dir=DATA_DIR" in str(err.value) and "'train.json'" in str(err.value)
    raw = yaml.safe_load((ASSETS / "lora.yaml").read_text())
    raw["training_args"].update(adam_epsilonn=1e-6, report_to="wandb", learning_rate="fast")
    raw["peft_config"].update(peft_type="ADALORA", rank_pattern={})
    raw["data_config"]["train_files"] = "x.json"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"data.dataset_dir={DATA_DIR}"])
    message = str(err.value)
    assert "unknown key 'training_args.adam_epsilonn'" in message
    assert "unknown key 'data_config.train_files'" in message
    assert "training_args.report_to: 'wandb'" in message and "metrics.jsonl" in message
    assert "peft_type: ADALORA" in message and "LORA" in message
    assert "train.learning_rate" in message  # the invalid value, in the same report
    assert message.count("\n  - ") == 5


@pytest.mark.parametrize("config_name", ["lora.yaml", "ptuning_v2.yaml"])
def test_chatglm3_config_trains_in_finetune_hf_argument_order(config_name, tmp_path, monkeypatch, capsys, llama_dir):
    """finetune_hf.py DATA_DIR MODEL CONFIG → lmforge train CONFIG data.dataset_dir=DATA_DIR model.name_or_path=MODEL"""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", str(ASSETS / config_name), f"data.dataset_dir={DATA_DIR}",
                     f"model.name_or_path={llama_dir}"]) == 0
    run = tmp_path / yaml.safe_load((ASSETS / config_name).read_text())["training_args"]["output_dir"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["read"] == sum(1 for _ in open(ASSETS / "data" / "train.json", encoding="utf-8"))
