"""LLaMA-Factory compatibility: its flat YAML keys → our grouped config, and its export YAML → an export request.

Owns the translation tables. A key we honour maps to a dotted path (optionally through a converter); a key that
changes nothing here is accepted with a note saying why; a key whose meaning we cannot honour is an error. Nothing
else in lmforge knows LLaMA-Factory's key names.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from ..errors import ConfigError
from .schema import SECTIONS

# Keys that only exist in LLaMA-Factory's flat layout; one of them at the top level marks a flat file.
_MARKERS = {"model_name_or_path", "stage", "finetuning_type", "dataset", "do_train", "per_device_train_batch_size"}


def _bool_true_only(key: str, meaning: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        if value is False:
            raise _Refuse(f"{key}: false — {meaning}")
        return None, None
    return convert


def _dtype(key: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        name = {"fp16": "float16", "bf16": "bfloat16", "pure_bf16": "bfloat16"}[key]
        return ({"model": {"dtype": name}} if value else None), None
    return convert


def _train_on_prompt(value: Any) -> tuple[dict | None, str | None]:
    return ({"data": {"train_on": "all"}} if value else None), None


def _mask_history(value: Any) -> tuple[dict | None, str | None]:
    return ({"data": {"train_on": "last_assistant"}} if value else None), None


def _report_to(value: Any) -> tuple[dict | None, str | None]:
    if value in (None, "none", [], ["none"]):
        return None, None
    raise _Refuse(f"report_to: {value!r} — lmforge logs to metrics.jsonl and loss.png in the run dir; "
                  f"set report_to: none")


def _quantization_method(value: Any) -> tuple[dict | None, str | None]:
    if value in (None, "bnb", "bitsandbytes"):
        return None, None
    raise _Refuse(f"quantization_method: {value!r} — lmforge quantises with bitsandbytes only (bnb); GPTQ/AWQ/HQQ/"
                  f"EETQ need a GPU")


def _pissa_init(value: Any) -> tuple[dict | None, str | None]:
    return ({"method": {"lora_init": "pissa"}} if value else None), None


def _pref_loss(value: Any) -> tuple[dict | None, str | None]:
    """LLaMA-Factory selects ORPO and SimPO as a dpo loss; here they are stages (the stage key is fixed up after)."""
    if value in ("orpo", "simpo"):
        return {"train": {"stage": value}}, None
    if value in ("sigmoid", "hinge", "ipo"):
        return {"preference": {"loss": value}}, None
    raise _Refuse(f"pref_loss: {value!r} — lmforge has sigmoid, hinge, ipo (stage dpo), orpo and simpo")


def _ignored(reason: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    return lambda value: (None, reason)


class _Refuse(Exception):
    pass


# LLaMA-Factory key → dotted path in our config, or a converter returning (partial config, note).
FLAT_KEYS: dict[str, str | Callable[[Any], tuple[dict | None, str | None]]] = {
    "model_name_or_path": "model.name_or_path",
    "template": "model.template",
    "fp16": _dtype("fp16"),
    "bf16": _dtype("bf16"),
    "pure_bf16": _dtype("pure_bf16"),
    "stage": "train.stage",
    "do_train": _bool_true_only("do_train", "evaluation-only configs are not training runs; use `lmforge eval`"),
    "finetuning_type": "method.type",
    "lora_rank": "method.lora_rank",
    "lora_alpha": "method.lora_alpha",
    "lora_dropout": "method.lora_dropout",
    "lora_target": "method.lora_target",
    "use_dora": "method.use_dora",
    "use_rslora": "method.use_rslora",
    "pissa_init": _pissa_init,
    "pissa_convert": _ignored("pissa_convert: a PiSSA adapter is always saved converted to a plain LoRA"),
    "quantization_bit": "method.quantization_bit",
    "quantization_type": "method.quantization_type",
    "double_quantization": "method.double_quantization",
    "quantization_method": _quantization_method,
    "num_virtual_tokens": "method.num_virtual_tokens",
    "pref_beta": "preference.beta",
    "pref_loss": _pref_loss,
    "pref_ftx": "preference.ftx",
    "simpo_gamma": "preference.simpo_gamma",
    "dpo_label_smoothing": "preference.label_smoothing",
    "kto_chosen_weight": "preference.kto_desirable_weight",
    "kto_rejected_weight": "preference.kto_undesirable_weight",
    "freeze_trainable_layers": "method.freeze_trainable_layers",
    "freeze_trainable_modules": "method.freeze_trainable_modules",
    "dataset": "data.train",
    "eval_dataset": "data.val",
    "dataset_dir": "data.dataset_dir",
    "cutoff_len": "data.cutoff_len",
    "max_samples": "data.max_samples",
    "val_size": "data.val_size",
    "train_on_prompt": _train_on_prompt,
    "mask_history": _mask_history,
    "output_dir": "train.output_dir",
    "overwrite_output_dir": "train.overwrite_output_dir",
    "seed": "train.seed",
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "lr_scheduler_type": "train.lr_scheduler_type",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "resume_from_checkpoint": "train.resume_from_checkpoint",
    "report_to": _report_to,
    "overwrite_cache": _ignored("overwrite_cache: lmforge tokenises in memory each run, there is no cache to overwrite"),
    "preprocessing_num_workers": _ignored("preprocessing_num_workers: tokenising runs in-process"),
    "dataloader_num_workers": _ignored("dataloader_num_workers: batches are built in-process"),
    "plot_loss": _ignored("plot_loss: loss.png is always written"),
    "save_only_model": _ignored("save_only_model: checkpoints always hold what exact resume needs"),
    "ddp_timeout": _ignored("ddp_timeout: single-process run"),
    "trust_remote_code": _ignored("trust_remote_code: lmforge loads models with transformers' own classes"),
    "eval_strategy": _ignored("eval_strategy: evaluation runs every eval_steps when validation data exists"),
    "evaluation_strategy": _ignored("evaluation_strategy: evaluation runs every eval_steps"),
    "save_strategy": _ignored("save_strategy: checkpoints are saved every save_steps"),
    "logging_strategy": _ignored("logging_strategy: logs every logging_steps"),
}


def is_flat_llamafactory(raw: dict) -> bool:
    return bool(_MARKERS & set(raw))


def translate_flat(raw: dict, source: str) -> tuple[dict, list[str]]:
    """Return (our nested config dict, notes). Unknown keys are listed under "_unknown" for the caller to report."""

    nested: dict = {}
    notes: list[str] = []
    unknown: list[str] = []
    refused: list[str] = []
    for key, value in raw.items():
        if key in SECTIONS or key == "name":  # already in our layout
            if isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
            continue
        target = FLAT_KEYS.get(key)
        if target is None:
            unknown.append(key)
        elif isinstance(target, str):
            section, field = target.split(".")
            nested.setdefault(section, {})[field] = value
        else:
            try:
                partial, note = target(value)
            except _Refuse as refusal:
                refused.append(str(refusal))
                continue
            if partial:
                for section, fields in partial.items():
                    nested.setdefault(section, {}).update(fields)
            if note:
                notes.append(f"{source}: {note} (ignored)")
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise ConfigError(f"{source}: LLaMA-Factory settings lmforge cannot honour:\n{lines}")
    if unknown:
        nested["_unknown"] = unknown
    if raw.get("pref_loss") in ("orpo", "simpo") and raw.get("stage") in (None, "dpo"):
        nested.setdefault("train", {})["stage"] = raw["pref_loss"]  # whichever of the two keys came first
    if "output_dir" in nested.get("train", {}) and "name" not in nested:
        nested["name"] = str(nested["train"]["output_dir"]).rstrip("/").split("/")[-1] or "run"
    return nested, notes


# LLaMA-Factory's export YAML (`llamafactory-cli export`): key → field of export.ExportRequest, a note, or a refusal.
_EXPORT_REFUSALS = {
    "export_quantization_bit": "GPTQ quantization needs a GPU and a calibration set; for a quantized file use "
                               "`lmforge export ... --gguf q8_0`",
    "export_quantization_dataset": "only used by GPTQ quantization (export_quantization_bit), which lmforge does not "
                                   "do; use --gguf q8_0",
    "export_quantization_nsamples": "only used by GPTQ quantization; use --gguf q8_0",
    "export_quantization_maxlen": "only used by GPTQ quantization; use --gguf q8_0",
    "export_hub_model_id": "lmforge does not upload; push the export dir with `huggingface-cli upload REPO OUT`",
}
EXPORT_KEYS: dict[str, str | None] = {
    "model_name_or_path": "base_model",
    "adapter_name_or_path": "adapter",
    "template": "template",
    "finetuning_type": "method",
    "export_dir": "output",
    "export_size": "shard_size_gb",
    "infer_dtype": "dtype",
    "export_legacy_format": None,  # false is the only value we honour (checked above)
    "export_device": None,  # accepted with a note
    "stage": None,
    "trust_remote_code": None,
}
_EXPORT_NOTES = {
    "export_device": "export_device: lmforge merges on the CPU",
    "stage": "stage: an export does not depend on the training stage",
    "trust_remote_code": "trust_remote_code: lmforge loads models with transformers' own classes",
}


def is_export_yaml(raw: dict) -> bool:
    return "export_dir" in raw or any(key.startswith("export_") for key in raw)


def translate_export(raw: dict, source: str) -> tuple[dict, list[str]]:
    """LLaMA-Factory export keys → {ExportRequest field: value}, notes. Unknown or unhonourable keys are errors."""

    fields: dict = {}
    notes: list[str] = []
    problems: list[str] = []
    for key, value in raw.items():
        if key in _EXPORT_REFUSALS:
            if value not in (None, False, "", 0):
                problems.append(f"{key}: {value!r} — {_EXPORT_REFUSALS[key]}")
        elif key == "export_legacy_format":
            if value:
                problems.append("export_legacy_format: true — transformers 5 writes safetensors only (no .bin "
                                "files); set export_legacy_format: false")
        elif key in EXPORT_KEYS:
            if EXPORT_KEYS[key] is None:
                notes.append(f"{source}: {_EXPORT_NOTES[key]} (ignored)")
            else:
                fields[EXPORT_KEYS[key]] = value
        else:
            known = list(EXPORT_KEYS) + list(_EXPORT_REFUSALS)
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            problems.append(f"unknown key {key!r}" + (f" — did you mean {' or '.join(close)}?" if close else
                                                      " (not a LLaMA-Factory export key)"))
    if "base_model" not in fields:
        problems.append("model_name_or_path is missing: name the base model (or, for finetuning_type: full, the "
                        "trained model dir)")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the export "
                          f"config:\n{lines}")
    return fields, notes
