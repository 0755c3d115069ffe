"""LLaMA-Factory compatibility: its flat YAML keys → our grouped config.

Owns the one translation table. A key we honour maps to a dotted path (optionally through a converter); a key that
changes nothing here is accepted with a note saying why; a key whose meaning we cannot honour is an error. Nothing
else in lmforge knows LLaMA-Factory's key names.
"""

from __future__ import annotations

from typing import Any, Callable

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
    from .config import SECTIONS, ConfigError

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
    if "output_dir" in nested.get("train", {}) and "name" not in nested:
        nested["name"] = str(nested["train"]["output_dir"]).rstrip("/").split("/")[-1] or "run"
    return nested, notes
