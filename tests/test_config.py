"""Config loading: unknown keys with a "did you mean", every problem reported at once, key=value overrides (dotted
and LLaMA-Factory flat), and LLaMA-Factory SFT/LoRA YAML files translated and trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, tiny_tokenizer
from safetensors import safe_open

from lmforge import cli
from lmforge.config import load_config
from lmforge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value)


# ---------------------------------------------------------------------------------------------- unknown keys


def test_unknown_nested_key_suggests_the_right_one(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"]}, "train": {"learnig_rate": 1e-4}})
    message = config_error(path)
    assert str(path) in message
    assert "unknown key 'train.learnig_rate'" in message
    assert "did you mean train.learning_rate" in message
    # inside a section, a flat LLaMA-Factory name would be unknown again: it must not be suggested
    assert "or learning_rate" not in message


def test_unknown_flat_llamafactory_key_suggests_the_flat_name(tmp_path):
    path = write_yaml(tmp_path / "lf.yaml", {"model_name_or_path": "m", "dataset": "d", "lerning_rate": 1e-4})
    message = config_error(path)
    assert "unknown key 'lerning_rate'" in message
    assert "did you mean learning_rate" in message


def test_misplaced_key_suggests_its_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"]}, "model": {"max_steps": 3}})
    assert "did you mean train.max_steps" in config_error(path)


def test_all_problems_are_reported_at_once(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"], "cutof_len": 512},
                                            "train": {"learnig_rate": 1e-4, "max_steps": "many"}})
    message = config_error(path)
    assert "3 problems" in message
    assert "unknown key 'data.cutof_len'" in message and "did you mean data.cutoff_len" in message
    assert "unknown key 'train.learnig_rate'" in message
    assert "train.max_steps" in message and "integer" in message
    assert message.count("\n  - ") == 3


def test_wrong_literal_value_names_the_choices(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"], "train_on": "assistants"}})
    message = config_error(path)
    assert "data.train_on" in message and "'assistant'" in message and "'assistants'" in message


def test_missing_dataset_is_reported(tmp_path):
    assert "data.train is empty" in config_error(write_yaml(tmp_path / "c.yaml", {"train": {"max_steps": 1}}))


def test_missing_config_file_and_invalid_yaml(tmp_path):
    assert "config file not found" in config_error(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [a.jsonl\ntrain:\n  max_steps: 1\n")
    assert f"{bad}:" in config_error(bad) and "invalid YAML" in config_error(bad)


# ---------------------------------------------------------------------------------------------- key=value overrides


def test_dotted_overrides_are_typed_by_yaml():
    config = load_config(None, ["data.train=[a.jsonl, b.jsonl]", "train.learning_rate=1e-4", "train.max_steps=5",
                                "train.overwrite_output_dir=true", "method.lora_dropout=0.05", "name=exp1"])
    assert config.data.train == ["a.jsonl", "b.jsonl"]
    assert config.train.learning_rate == 1e-4
    assert config.train.max_steps == 5 and isinstance(config.train.max_steps, int)
    assert config.train.overwrite_output_dir is True
    assert config.method.lora_dropout == 0.05
    assert config.name == "exp1" and config.output_dir == Path("runs/exp1")


def test_flat_llamafactory_overrides_land_in_their_sections():
    config = load_config(None, ["dataset=a.jsonl,b.jsonl", "learning_rate=1e-4", "lora_target=q_proj,v_proj",
                                "per_device_train_batch_size=2", "cutoff_len=256", "bf16=true"])
    assert config.data.train == ["a.jsonl", "b.jsonl"]
    assert config.train.learning_rate == 1e-4
    assert config.method.lora_target == ["q_proj", "v_proj"]
    assert config.train.batch_size == 2
    assert config.data.cutoff_len == 256
    assert config.model.dtype == "bfloat16"


def test_overrides_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"]},
                                            "train": {"learning_rate": 1e-3, "max_steps": 10}})
    config = load_config(path, ["train.learning_rate=5e-5", "max_steps=2"])
    assert config.train.learning_rate == 5e-5 and config.train.max_steps == 2
    assert config.data.train == ["d.jsonl"]  # untouched keys stay


def test_bad_overrides_are_config_errors():
    assert "did you mean train.learning_rate" in config_error(None, ["data.train=a", "train.learnig_rate=1"])
    assert "did you mean learning_rate" in config_error(None, ["data.train=a", "lerning_rate=1"])
    assert "not key=value" in config_error(None, ["data.train=a", "train.max_steps"])
    message = config_error(None, ["data.train=a", "train.max_steps=abc", "train.batch_size=x"])
    assert "2 problems" in message and "train.max_steps" in message and "train.batch_size" in message


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["data.train=a.jsonl", "lora_target=q_proj", "train.max_steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    assert load_config(path) == config


# ---------------------------------------------------------------------------------------------- LLaMA-Factory YAML


def llamafactory_sft_lora(**changes) -> dict:
    """The shape of LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml."""
    return {
        "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "q_proj,v_proj",
        "lora_rank": 16,
        "lora_alpha": 32,
        "dataset": "identity,alpaca_en_demo",
        "dataset_dir": "data",
        "template": "llama3",
        "cutoff_len": 2048,
        "max_steps": 100,
        "overwrite_cache": True,
        "output_dir": "saves/llama3-8b/lora/sft",
        "logging_steps": 10,
        "save_steps": 500,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine",
        "fp16": False,
        "bf16": True,
        "val_size": 0.1,
        **changes,
    }


def test_llamafactory_sft_lora_yaml_translates(tmp_path, capsys):
    config = load_config(write_yaml(tmp_path / "lf.yaml", llamafactory_sft_lora()))
    assert config.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert config.model.template == "llama3"
    assert config.model.dtype == "bfloat16"
    assert config.method.type == "lora"
    assert config.method.lora_target == ["q_proj", "v_proj"]
    assert config.method.lora_rank == 16 and config.method.lora_alpha == 32
    assert config.data.train == ["identity", "alpaca_en_demo"]
    assert config.data.dataset_dir == "data"
    assert config.data.cutoff_len == 2048 and config.data.val_size == 0.1
    assert config.train.stage == "sft"
    assert config.train.max_steps == 100 and config.train.num_train_epochs == 3.0
    assert config.train.batch_size == 1 and config.train.gradient_accumulation_steps == 8
    assert config.train.learning_rate == 1e-4 and config.train.lr_scheduler_type == "cosine"
    assert config.train.logging_steps == 10 and config.train.save_steps == 500
    assert config.output_dir == Path("saves/llama3-8b/lora/sft")
    assert config.name == "sft"
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "overwrite_cache" in notes[0] and "(ignored)" in notes[0]


def test_llamafactory_variants(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; it must still be a learning rate. fp16 → float16, all → "all".
    raw = llamafactory_sft_lora(learning_rate="1e-4", fp16=True, bf16=False, lora_target="all",
                                finetuning_type="freeze", freeze_trainable_layers=2)
    config = load_config(write_yaml(tmp_path / "lf.yaml", raw))
    assert config.train.learning_rate == 1e-4
    assert config.model.dtype == "float16"
    assert config.method.type == "freeze" and config.method.lora_target == "all"


def test_llamafactory_settings_we_cannot_honour_are_errors(tmp_path):
    message = config_error(write_yaml(tmp_path / "a.yaml", llamafactory_sft_lora(report_to="wandb")))
    assert "report_to" in message and "wandb" in message and "metrics.jsonl" in message
    message = config_error(write_yaml(tmp_path / "b.yaml", llamafactory_sft_lora(do_train=False)))
    assert "do_train" in message and "lmforge eval" in message
    both = config_error(write_yaml(tmp_path / "c.yaml", llamafactory_sft_lora(do_train=False, report_to="wandb")))
    assert "do_train" in both and "report_to" in both
    # report_to: none is what the message asks for, and is accepted
    load_config(write_yaml(tmp_path / "d.yaml", llamafactory_sft_lora(report_to="none")))


def test_llamafactory_yaml_trains_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    model_dir = make_tiny_model("llama", tiny_tokenizer(), tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    records = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(9)]
    records.append({"instruction": "Repeat after me.", "input": "hello", "output": "hello"})
    (data_dir / "my_data.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"my_data": {"file_name": "my_data.json"}}))
    raw = llamafactory_sft_lora(model_name_or_path=model_dir, dataset="my_data", lora_target="all", max_steps=3,
                                per_device_train_batch_size=2, gradient_accumulation_steps=1, logging_steps=1,
                                save_steps=100, cutoff_len=256, output_dir="saves/tiny/lora/sft")
    path = write_yaml(tmp_path / "llama3_lora_sft.yaml", raw)

    assert cli.main(["train", str(path)]) == 0
    captured = capsys.readouterr()
    run = tmp_path / "saves/tiny/lora/sft"
    assert (run / "adapter" / "adapter_config.json").is_file()
    notes = [line for line in captured.out.splitlines() if line.startswith("note: ")]
    assert any("overwrite_cache" in n for n in notes) and any("'llama3' ignored" in n for n in notes)

    # bf16: true on a CPU: one line says which precision the run uses and why (bf16 autocast only where the CPU does
    # bf16 fast and the model is large enough to gain; this tiny one trains in float32), and the weights are float32
    if not torch.cuda.is_available():
        chosen = [line for line in captured.err.splitlines() if line.startswith("precision:")]
        assert len(chosen) == 1 and "float32" in chosen[0] and "because" in chosen[0], chosen
        with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}

    report = json.loads((run / "data_report.json").read_text())
    assert report["datasets"] == {"my_data": 10}
    assert report["train"]["kept"] == 9 and report["val"]["kept"] == 1  # val_size 0.1
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resolved = load_config(run / "config.yaml")
    assert resolved.data.train == ["my_data"] and resolved.method.lora_target == "all"



def test_every_config_key_is_documented_in_help_config(capsys):
    """`lmforge train --help-config` prints every key with its default and meaning, from the schema itself."""
    from lmforge import cli
    from lmforge.config import known_paths

    assert cli.main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for path in known_paths():
        assert f"  {path}  (default: " in text, path
    assert "(no description)" not in text
    assert "Peak learning rate" in text


# ------------------------------------------------------------------------- LLaMA-Factory keys of other set-ups


def notes_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]


def test_distributed_and_cache_keys_are_accepted_with_a_note(tmp_path, capsys):
    ds_config = tmp_path / "my_zero.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw = llamafactory_sft_lora(deepspeed=str(ds_config), fsdp="full_shard auto_wrap", tokenized_path="saves/tok",
                                preprocessing_num_workers=16, dataloader_num_workers=4, ddp_timeout=180000000,
                                ddp_find_unused_parameters=False, ray_num_workers=1)
    config = load_config(write_yaml(tmp_path / "lf.yaml", raw))
    assert config.method.type == "lora"
    notes = notes_of(capsys)
    said = {key: [n for n in notes if f": {key}:" in n] for key in
            ("deepspeed", "fsdp", "tokenized_path", "preprocessing_num_workers", "dataloader_num_workers",
             "ddp_timeout", "ddp_find_unused_parameters", "ray_num_workers")}
    assert all(len(found) == 1 for found in said.values()), said
    assert "ZeRO-2" in said["deepspeed"][0] and "in one process it changes nothing" in said["deepspeed"][0]
    assert "automatically" in said["tokenized_path"][0]


def test_deepspeed_stage_is_read_from_the_file_or_its_name(tmp_path):
    from lmforge.config.llamafactory import DEEPSPEED_ZERO_TO_FSDP, deepspeed_zero_stage

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    assert deepspeed_zero_stage(str(ds)) == 3
    assert deepspeed_zero_stage("examples/deepspeed/ds_z2_offload_config.json") == 2  # not on disk: by name
    assert deepspeed_zero_stage({"zero_optimization": {"stage": 0}}) == 0
    assert deepspeed_zero_stage("my_settings.json") is None
    assert DEEPSPEED_ZERO_TO_FSDP[0] == "ddp" and DEEPSPEED_ZERO_TO_FSDP[3] == "fsdp"


def test_ray_is_refused_with_what_to_do_instead(tmp_path):
    message = config_error(write_yaml(tmp_path / "lf.yaml", llamafactory_sft_lora(ray_num_workers=4)))
    assert "ray_num_workers: 4" in message and "--nproc N" in message


def test_a_refused_key_does_not_hide_the_unknown_keys_after_it(tmp_path):
    unknown = {"use_magic": True, "lora_rnk": 4, "use_turbo": True, "training_args": {}, "foo": 1, "bar": 2}
    raw = llamafactory_sft_lora(report_to="wandb", **unknown, learning_rate="fast")
    message = config_error(write_yaml(tmp_path / "lf.yaml", raw))
    assert "report_to" in message and "wandb" in message
    for key in unknown:
        assert f"unknown key {key!r}" in message
    assert "train.learning_rate" in message  # an invalid value, found in the same pass
    assert "8 problems" in message and message.count("\n  - ") == 8
    assert "did you mean lora_rank" in message
    # no far-fetched suggestions (training_args is not logging_steps)
    lines = {line.split("'")[1]: line for line in message.splitlines() if "unknown key" in line}
    for key in ("use_turbo", "training_args", "foo", "bar", "use_magic"):
        assert "did you mean" not in lines[key], lines[key]


def test_fractional_warmup_steps_is_a_ratio_as_in_transformers(tmp_path, capsys):
    config = load_config(write_yaml(tmp_path / "a.yaml", llamafactory_sft_lora(warmup_steps=0.1)))
    assert config.train.warmup_ratio == 0.1 and config.train.warmup_steps == 0
    assert any("warmup_steps: 0.1" in n and "share of the total steps" in n for n in notes_of(capsys))
    config = load_config(write_yaml(tmp_path / "b.yaml", llamafactory_sft_lora(warmup_steps=5)))
    assert config.train.warmup_steps == 5 and config.train.warmup_ratio == 0.0
    ours = write_yaml(tmp_path / "c.yaml", {"data": {"train": ["d.jsonl"]}, "train": {"warmup_steps": 0.05}})
    config = load_config(ours)
    assert config.train.warmup_ratio == 0.05 and config.train.warmup_steps == 0
    assert load_config(ours, ["warmup_steps=0.2"]).train.warmup_ratio == 0.2


def test_a_yaml_that_is_no_config_is_said_to_be_none_not_listed_key_by_key(tmp_path):
    tokens = tmp_path / "tokens_cfg.yaml"  # LLaMA-Factory's new-token descriptions: a YAML, but no training config
    tokens.write_text("".join(f'"<|start_of_{t}|>": "Begins a {t} element"\n' for t in ("svg", "g", "rect", "path")))
    with pytest.raises(ConfigError) as err:
        load_config(tokens)
    message = str(err.value)
    assert "is not a training config" in message and "4 top-level keys" in message and "--help-config" in message
    assert "unknown key" not in message

    typo = tmp_path / "typo.yaml"  # a config with a misspelt section is still read as one, problem by problem
    typo.write_text("modle:\n  name_or_path: x\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(typo)
