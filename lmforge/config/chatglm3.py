"""ChatGLM3 compatibility: a finetune_demo config (configs/lora.yaml, ptuning_v2.yaml, sft.yaml) → our grouped config.

Owns the ChatGLM3 tables: `data_config`, `max_input_length` / `max_output_length`, `training_args` (transformers'
Seq2SeqTrainingArguments, read through llamafactory.py's table of the same Trainer keys) and `peft_config` (a PEFT
config dict). ChatGLM3's `finetune_hf.py DATA_DIR MODEL CONFIG` becomes
`lmforge train CONFIG data.dataset_dir=DATA_DIR model.name_or_path=MODEL`: data files are relative to DATA_DIR, so
they are joined to data.dataset_dir after the overrides (resolve_data_files). Nothing else knows ChatGLM3's names.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from .llamafactory import FLAT_KEYS, Refused, merge_partial

# Top-level keys of a ChatGLM3 finetune config; `data_config` or `training_args` marks the shape.
TOP_KEYS = ("data_config", "max_input_length", "max_output_length", "training_args", "peft_config")

# data_config keys → what they become (a note says how each is used).
DATA_CONFIG_KEYS = {
    "train_file": "data.train (relative to data.dataset_dir, finetune_hf.py's DATA_DIR)",
    "val_file": "data.val: validation loss every eval_steps (ChatGLM3 generates on 50 of them; `lmforge eval` "
                "does the generation metrics)",
    "test_file": "not read by training: score a run on it with `lmforge eval RUN --data FILE`",
    "num_proc": "tokenising runs in-process and is cached",
}

# Seq2SeqTrainingArguments fields LLaMA-Factory also uses: read with llamafactory.py's table (one meaning each).
TRAINER_KEYS = (
    "output_dir", "overwrite_output_dir", "seed", "learning_rate", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
    "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "report_to", "fp16", "bf16", "do_train", "eval_strategy",
    "evaluation_strategy", "save_strategy", "logging_strategy", "dataloader_num_workers", "ddp_timeout",
    "ddp_find_unused_parameters", "ddp_backend", "deepspeed", "fsdp", "fsdp_config", "save_only_model", "run_name",
)
# Seq2SeqTrainingArguments fields ChatGLM3's configs set that change nothing here, with why.
TRAINER_NOTES = {
    "remove_unused_columns": "lmforge builds its own batches from the conversations",
    "log_level": "lmforge prints progress lines and writes metrics.jsonl",
    "use_cpu": "lmforge uses the CPU when there is no GPU",
    "do_eval": "validation runs every eval_steps when there is validation data",
    "predict_with_generate": "generation metrics (BLEU-4, ROUGE) come from `lmforge eval RUN`",
    "generation_config": "generation settings are `lmforge eval` / `lmforge chat` options (--max-new-tokens, "
                         "--temperature)",
}

# peft_type → method.type; PREFIX_TUNING is P-tuning v2 (ChatGLM3's prefix encoder without projection) unless
# prefix_projection is true (then prefix tuning with its reparameterising MLP).
PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "ptuning", "PROMPT_TUNING": "prompt", "IA3": "ia3", "LOHA": "loha",
              "LOKR": "lokr"}
PEFT_REFUSED = {
    "P_TUNING": "P-tuning (v1) trains a prompt encoder MLP; lmforge has P-tuning v2 (peft_type: PREFIX_TUNING) and "
                "prompt tuning (PROMPT_TUNING)",
    "ADALORA": "AdaLoRA is not one of lmforge's methods; use peft_type: LORA",
}
# peft_config keys → dotted path in our config, per meaning (LoRA family and virtual tokens).
PEFT_KEYS = {
    "r": "method.lora_rank",
    "lora_alpha": "method.lora_alpha",
    "lora_dropout": "method.lora_dropout",
    "target_modules": "method.lora_target",
    "use_dora": "method.use_dora",
    "use_rslora": "method.use_rslora",
    "num_virtual_tokens": "method.num_virtual_tokens",
    "encoder_hidden_size": "method.prefix_projection_dim",
}
PEFT_NOTES = {
    "peft_type": None,  # read above
    "task_type": "task_type: CAUSAL_LM is what lmforge trains",
    "prefix_projection": None,  # read above
    "inference_mode": "inference_mode: false while training; chat and serve load adapters for inference",
    "bias": "bias: none is what lmforge trains (biases stay frozen)",
    "token_dim": "token_dim: taken from the model",
    "num_layers": "num_layers: taken from the model",
    "num_attention_heads": "num_attention_heads: taken from the model",
    "num_transformer_submodules": "num_transformer_submodules: taken from the model",
}


def is_chatglm3(raw: dict) -> bool:
    return "data_config" in raw or "training_args" in raw or "peft_config" in raw


def translate_chatglm3(raw: dict, source: str) -> tuple[dict, list[str]]:
    """Return (our nested config dict, notes); unknown keys under "_unknown", refusals under "_refused" (as
    llamafactory.translate_flat does), and the data files under "_chatglm3_files" for resolve_data_files."""
    nested: dict = {}
    notes: list[str] = []
    unknown: list[str] = []
    refused: list[str] = []
    for key in raw:
        if key not in TOP_KEYS and key not in ("model", "data", "train", "method", "name"):
            unknown.append(key)
    for section in ("model", "data", "train", "method", "name"):  # our own keys may sit beside ChatGLM3's
        if section in raw:
            merge_partial(nested, {section: raw[section]})
    _data_config(raw.get("data_config"), nested, notes, unknown, refused)
    lengths = [raw.get("max_input_length"), raw.get("max_output_length")]
    if all(isinstance(n, int) and n > 0 for n in lengths):
        cutoff = lengths[0] + lengths[1] + 1
        nested.setdefault("data", {})["cutoff_len"] = cutoff
        notes.append(f"max_input_length + max_output_length + 1 = data.cutoff_len {cutoff} (ChatGLM3 cuts each "
                     f"example at this many tokens; a longer one keeps its start)")
    elif any(n is not None for n in lengths):
        refused.append(f"max_input_length / max_output_length: expected two positive whole numbers, got "
                       f"{lengths[0]!r} and {lengths[1]!r}")
    _training_args(raw.get("training_args"), nested, notes, unknown, refused, source)
    _peft_config(raw.get("peft_config"), nested, notes, unknown, refused)
    if "model" not in raw:
        notes.append("the model is finetune_hf.py's MODEL argument, not in the config: pass "
                     "model.name_or_path=MODEL (default: the bundled smollm2-135m-instruct)")
    if "name" not in nested and "output_dir" in nested.get("train", {}):
        nested["name"] = PurePath(str(nested["train"]["output_dir"])).name or "run"
    if refused:
        nested["_refused"] = refused
    if unknown:
        nested["_unknown"] = unknown
    return nested, [f"{source}: {note}" for note in notes]


def resolve_data_files(raw: dict) -> list[str]:
    """Join the data_config files to data.dataset_dir (ChatGLM3's DATA_DIR), once the overrides are in; return
    problems. A relative file without a data dir is a problem: finetune_hf.py needs DATA_DIR too."""
    files = raw.pop("_chatglm3_files", None)
    if not files:
        return []
    data = raw.setdefault("data", {})
    if not isinstance(data, dict):
        return []  # reported by load.py as a section that is not a mapping
    directory = data.get("dataset_dir")
    relative = [name for names in files.values() for name in names if not PurePath(name).is_absolute()]
    if directory is None and relative:
        data.setdefault("train", files.get("train", []))
        return [f"data_config: {', '.join(map(repr, relative))} {'is' if len(relative) == 1 else 'are'} relative to "
                f"finetune_hf.py's DATA_DIR: give it on the command line, lmforge train CONFIG "
                f"data.dataset_dir=DATA_DIR model.name_or_path=MODEL"]
    for split, names in files.items():
        if split not in data:  # data.train=… / data.val=… on the command line win
            data[split] = [name if PurePath(name).is_absolute() else str(PurePath(directory) / name)
                           for name in names]
    return []


def _data_config(value: Any, nested: dict, notes: list[str], unknown: list[str], refused: list[str]) -> None:
    if value is None:
        refused.append("data_config is missing: ChatGLM3 configs name the files as data_config.train_file (and "
                       "val_file)")
        return
    if not isinstance(value, dict):
        refused.append(f"data_config: expected a section with train_file (val_file, test_file), got {value!r}")
        return
    files: dict[str, list[str]] = {}
    for key, item in value.items():
        if key not in DATA_CONFIG_KEYS:
            unknown.append(f"data_config.{key}")
        elif key in ("train_file", "val_file"):
            if isinstance(item, str) and item:
                files[key.removesuffix("_file")] = [item]
            elif item is not None:
                refused.append(f"data_config.{key}: expected a file name, got {item!r}")
            if key == "val_file" and item:
                notes.append(f"data_config.val_file → {DATA_CONFIG_KEYS[key]}")
        elif item is not None:
            notes.append(f"data_config.{key}: {DATA_CONFIG_KEYS[key]} (ignored)")
    if "train" not in files:
        refused.append("data_config.train_file is missing: name the training file (JSON or JSONL conversations)")
    nested["_chatglm3_files"] = files


def _training_args(value: Any, nested: dict, notes: list[str], unknown: list[str], refused: list[str],
                   source: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        refused.append(f"training_args: expected a section of Seq2SeqTrainingArguments keys, got {value!r}")
        return
    for key, item in value.items():
        if key in TRAINER_NOTES:
            notes.append(f"training_args.{key}: {TRAINER_NOTES[key]} (ignored)")
            continue
        if key not in TRAINER_KEYS:
            unknown.append(f"training_args.{key}")
            continue
        target = FLAT_KEYS[key]
        if isinstance(target, str):
            merge_partial(nested, _dotted(target, item))
            continue
        try:
            partial, note = target(item)
        except Refused as refusal:
            refused.append(f"training_args.{refusal}")
            continue
        merge_partial(nested, partial or {})
        if note:
            notes.append(f"training_args.{note}")


def _peft_config(value: Any, nested: dict, notes: list[str], unknown: list[str], refused: list[str]) -> None:
    if value is None:
        nested.setdefault("method", {}).setdefault("type", "full")
        notes.append("no peft_config: full fine-tuning (method.type: full), as finetune_hf.py does")
        return
    if not isinstance(value, dict):
        refused.append(f"peft_config: expected a PEFT config section (peft_type: LORA, …), got {value!r}")
        return
    peft_type = str(value.get("peft_type", "")).upper()
    if peft_type in PEFT_REFUSED:
        refused.append(f"peft_config.peft_type: {value['peft_type']} — {PEFT_REFUSED[peft_type]}")
        return
    if peft_type not in PEFT_TYPES:
        refused.append(f"peft_config.peft_type: {value.get('peft_type')!r} — expected one of "
                       f"{', '.join(PEFT_TYPES)}")
        return
    method_type = PEFT_TYPES[peft_type]
    if peft_type == "PREFIX_TUNING" and value.get("prefix_projection"):
        method_type = "prefix"
    merge_partial(nested, {"method": {"type": method_type}})
    if method_type in ("lora", "loha", "lokr", "ia3") and "target_modules" not in value:
        notes.append("peft_config has no target_modules: the adapter goes on every linear layer of the decoder "
                     "(method.lora_target: all); list target_modules to choose")
    for key, item in value.items():
        if key in PEFT_KEYS:
            merge_partial(nested, _dotted(PEFT_KEYS[key], item))
        elif key in PEFT_NOTES:
            if PEFT_NOTES[key]:
                notes.append(f"peft_config.{PEFT_NOTES[key]} (ignored)")
        else:
            unknown.append(f"peft_config.{key}")


def _dotted(path: str, value: Any) -> dict:
    section, field = path.split(".")
    return {section: {field: value}}
