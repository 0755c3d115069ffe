"""LLaMA-Factory compatibility: its flat YAML keys → our grouped config, and its export YAML → an export request.

Owns the translation tables. A key we honour maps to a dotted path (optionally through a converter); a key that
changes nothing here is accepted with a note saying why; a key whose meaning we cannot honour is an error. Nothing
else in lmforge knows LLaMA-Factory's key names.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import SECTIONS

# Keys that only exist in LLaMA-Factory's flat layout; one of them at the top level marks a flat file.
_MARKERS = {"model_name_or_path", "stage", "finetuning_type", "dataset", "do_train", "per_device_train_batch_size"}


def _bool_true_only(key: str, meaning: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        if value is False:
            raise Refused(f"{key}: false — {meaning}")
        return None, None
    return convert


def _false_only(key: str, meaning: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        if value:
            raise Refused(f"{key}: true — {meaning}")
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
    raise Refused(f"report_to: {value!r} — lmforge logs to metrics.jsonl and loss.png in the run dir; "
                  f"set report_to: none")


def _quantization_method(value: Any) -> tuple[dict | None, str | None]:
    if value in (None, "bnb", "bitsandbytes"):
        return None, None
    raise Refused(f"quantization_method: {value!r} — lmforge quantises with bitsandbytes only (bnb); GPTQ/AWQ/HQQ/"
                  f"EETQ need a GPU")


def _pissa_init(value: Any) -> tuple[dict | None, str | None]:
    return ({"method": {"lora_init": "pissa"}} if value else None), None


def _pissa_iter(value: Any) -> tuple[dict | None, str | None]:
    return None, None  # applied with pissa_init in translate_flat (LLaMA-Factory reads it only then)


# Hugging Face optimizer names that are lmforge's train.optim as they are
_OPTIM_NAMES = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit",
                "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_OPTIM_LOW_RANK = {"galore_adamw": ("galore", "adamw_torch"), "galore_adafactor": ("galore", "adafactor"),
                   "apollo_adamw": ("apollo", "adamw_torch")}


def _optim(value: Any) -> tuple[dict | None, str | None]:
    if value in _OPTIM_NAMES:
        return {"train": {"optim": value}}, None
    if value in _OPTIM_LOW_RANK:
        kind, optim = _OPTIM_LOW_RANK[value]
        return {"train": {kind: True, "optim": optim}}, None
    if value == "adamw_hf":
        raise Refused("optim: 'adamw_hf' — transformers 5 removed its own AdamW; adamw_torch is the same algorithm "
                      "(use optim: adamw_torch)")
    if isinstance(value, str) and value.endswith("_layerwise"):
        raise Refused(f"optim: {value!r} — layer-wise GaLore / APOLLO steps inside backward, which lmforge's "
                      f"gradient accumulation and clipping do not allow; use {value.removesuffix('_layerwise')}")
    raise Refused(f"optim: {value!r} — lmforge has {', '.join(_OPTIM_NAMES)}, galore_adamw, galore_adafactor, "
                  f"apollo_adamw (and use_muon / use_adam_mini); GPU-only and third-party ones (xla, npu, lion, "
                  f"ademamix, lomo, schedule-free, torchao) are not available: use adamw_torch")


def _use_muon(value: Any) -> tuple[dict | None, str | None]:
    return ({"train": {"optim": "muon"}} if value else None), None


def _pref_loss(value: Any) -> tuple[dict | None, str | None]:
    """LLaMA-Factory selects ORPO and SimPO as a dpo loss; here they are stages (the stage key is fixed up after)."""
    if value in ("orpo", "simpo"):
        return {"train": {"stage": value}}, None
    if value in ("sigmoid", "hinge", "ipo"):
        return {"preference": {"loss": value}}, None
    raise Refused(f"pref_loss: {value!r} — lmforge has sigmoid, hinge, ipo (stage dpo), orpo and simpo")


def _mixture_of_depths(value: Any) -> tuple[dict | None, str | None]:
    if value in (None, "", False):
        return None, None
    raise Refused(f"mixture_of_depths: {value!r} — mixture-of-depths (the mixture-of-depth package's layers that "
                  f"route tokens past blocks) is not an architecture lmforge trains; it trains the model's own "
                  f"layers: remove mixture_of_depths")


_NEW_TOKENS = ("lmforge keeps the model's vocabulary as it is (no new tokens, no resized embeddings); add the "
               "tokens to the model dir first (tokenizer.add_tokens + model.resize_token_embeddings, then "
               "save_pretrained) and point model_name_or_path at it, or write them as plain text")


def _new_tokens(key: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        if value in (None, "", False, []):
            return None, None
        raise Refused(f"{key}: {value!r} — {_NEW_TOKENS}")
    return convert


def _ignored(reason: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    return lambda value: (None, f"{reason} (ignored)")


def _warmup_steps(value: Any) -> tuple[dict | None, str | None]:
    """transformers (≥ 5) reads a warmup_steps float below 1 as a share of the total steps; so do we."""
    if isinstance(value, float) and 0 < value < 1:
        return {"train": {"warmup_ratio": value}}, WARMUP_RATIO_NOTE.format(value=value)
    return {"train": {"warmup_steps": value}}, None


WARMUP_RATIO_NOTE = ("warmup_steps: {value} is below 1, so it is a share of the total steps, as transformers reads it "
                     "(= train.warmup_ratio: {value})")

# DeepSpeed ZeRO stage → train.distributed under torchrun: ZeRO-0 is plain data parallel (DDP); ZeRO-1/2 shard
# optimizer state and gradients but keep whole weights between forward and backward (FSDP2 without resharding after
# forward, FSDP1's SHARD_GRAD_OP); ZeRO-3 shards the weights too (FSDP2 full sharding). Under one process: nothing.
DEEPSPEED_ZERO_TO_FSDP = {0: "ddp", 1: "fsdp_grad_op", 2: "fsdp_grad_op", 3: "fsdp"}


def deepspeed_zero_stage(value: Any) -> int | None:
    """The ZeRO stage of a `deepspeed:` value: an inline dict or a JSON file (read when it exists), else the stage
    in LLaMA-Factory's file names (ds_z3_config.json, ds_z2_offload_config.json)."""
    config = value if isinstance(value, dict) else None
    if config is None and isinstance(value, str):
        try:
            config = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            match = re.search(r"z(?:ero)?_?([0-3])", Path(value).name)
            return int(match.group(1)) if match else None
    stage = (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return stage if stage in DEEPSPEED_ZERO_TO_FSDP else None


def _deepspeed(value: Any) -> tuple[dict | None, str | None]:
    if value in (None, "", False):
        return None, None
    stage = deepspeed_zero_stage(value)
    if stage is None:
        return None, ("deepspeed: a DeepSpeed config without a ZeRO stage; under torchrun (--nproc N) lmforge "
                      "trains with DDP (train.distributed auto); in one process it changes nothing")
    mode = DEEPSPEED_ZERO_TO_FSDP[stage]
    offload = _offloads(value)
    note = (f"deepspeed: ZeRO-{stage} → train.distributed {mode} under torchrun (lmforge train CONFIG --nproc N); "
            f"in one process it changes nothing")
    if offload:
        note += (f"; its {offload} is not used: lmforge keeps weights and optimizer state on the training device "
                 f"(the memory pre-flight says before loading when that will not fit)")
    return {"train": {"distributed": mode}}, note


def _offloads(value: Any) -> str | None:
    config = value if isinstance(value, dict) else None
    if config is None and isinstance(value, str):
        try:
            config = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "CPU offload" if "offload" in Path(value).name else None
    zero = (config or {}).get("zero_optimization", {}) if isinstance(config, dict) else {}
    kinds = [name for name in ("offload_optimizer", "offload_param")
             if isinstance(zero.get(name), dict) and zero[name].get("device") not in (None, "none")]
    return " and ".join(kinds) or None


def _ray(key: str) -> Callable[[Any], tuple[dict | None, str | None]]:
    def convert(value: Any) -> tuple[dict | None, str | None]:
        if value in (None, 1, "", {}) and key != "ray_storage_path":
            return None, f"{key}: {value!r} asks for no Ray workers (ignored)"
        raise Refused(f"{key}: {value!r} — lmforge does not launch Ray workers; train in one process (remove the "
                      f"ray_* keys), or start several with torchrun: lmforge train CONFIG --nproc N")
    return convert


class Refused(Exception):
    """A LLaMA-Factory (or Trainer) setting whose meaning lmforge cannot honour; the message says why and what to do."""


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
    "pissa_iter": _pissa_iter,
    "loraplus_lr_ratio": "method.loraplus_lr_ratio",
    "loraplus_lr_embedding": "method.loraplus_lr_embedding",
    "oft_rank": "method.oft_rank",
    "oft_block_size": "method.oft_block_size",
    "module_dropout": "method.module_dropout",
    "oft_target": _ignored("oft_target: LLaMA-Factory itself places OFT on lora_target's modules, and so does "
                           "lmforge"),
    "use_llama_pro": "method.llama_pro",
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
    "freeze_extra_modules": "method.freeze_extra_modules",
    "optim": _optim,
    "use_muon": _use_muon,
    "use_adam_mini": "train.adam_mini",
    "use_galore": "train.galore",
    "galore_target": "train.galore_target",
    "galore_rank": "train.galore_rank",
    "galore_update_interval": "train.galore_update_interval",
    "galore_scale": "train.galore_scale",
    "galore_proj_type": "train.galore_proj_type",
    "galore_layerwise": _false_only("galore_layerwise", "layer-wise GaLore steps each parameter inside backward, "
                                                       "which lmforge's gradient accumulation and clipping do not "
                                                       "allow; use galore_layerwise: false"),
    "use_apollo": "train.apollo",
    "apollo_target": "train.apollo_target",
    "apollo_rank": "train.apollo_rank",
    "apollo_update_interval": "train.apollo_update_interval",
    "apollo_scale": "train.apollo_scale",
    "apollo_proj": "train.apollo_proj",
    "apollo_proj_type": "train.apollo_proj_type",
    "apollo_scale_type": "train.apollo_scale_type",
    "apollo_scale_front": "train.apollo_scale_front",
    "apollo_layerwise": _false_only("apollo_layerwise", "layer-wise APOLLO steps each parameter inside backward, "
                                                        "which lmforge's gradient accumulation and clipping do not "
                                                        "allow; use apollo_layerwise: false"),
    "use_badam": _false_only("use_badam", "BAdam switches which parameters train every few steps, which lmforge's "
                                          "checkpoints (they hold the trainable parameters) cannot resume exactly; "
                                          "for its memory saving train a fixed block (finetuning_type: freeze) or "
                                          "use_galore / use_apollo / use_adam_mini with finetuning_type: full"),
    **{key: _ignored(f"{key}: a setting of BAdam (use_badam), which lmforge does not run") for key in (
        "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
        "badam_mask_mode", "badam_verbose")},
    "use_dft_loss": _false_only("use_dft_loss", "DFT scales each token's loss by the model's own probability of "
                                                "it, a loss lmforge does not have; lmforge's SFT trains with the "
                                                "standard token cross-entropy: remove use_dft_loss"),
    "use_eaft_loss": _false_only("use_eaft_loss", "EAFT weights each token's loss by the model's entropy there, a "
                                                  "loss lmforge does not have; lmforge's SFT trains with the standard "
                                                  "token cross-entropy: remove use_eaft_loss (and eaft_alpha)"),
    "eaft_alpha": _ignored("eaft_alpha: a setting of use_eaft_loss, which lmforge does not run"),
    "use_asft_loss": _false_only("use_asft_loss", "ASFT (DFT's probability-weighted loss anchored to a frozen "
                                                  "reference model by KL) is a loss lmforge does not have; lmforge's "
                                                  "SFT trains with the standard token cross-entropy: remove "
                                                  "use_asft_loss (and asft_alpha)"),
    "asft_alpha": _ignored("asft_alpha: a setting of use_asft_loss, which lmforge does not run"),
    "mixture_of_depths": _mixture_of_depths,
    "add_tokens": _new_tokens("add_tokens"),
    "add_special_tokens": _new_tokens("add_special_tokens"),
    "new_special_tokens_config": _new_tokens("new_special_tokens_config"),
    "resize_vocab": _new_tokens("resize_vocab"),
    "init_special_tokens": _ignored("init_special_tokens: how new tokens' embeddings start; lmforge adds no tokens"),
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
    "warmup_steps": _warmup_steps,
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "resume_from_checkpoint": "train.resume_from_checkpoint",
    "report_to": _report_to,
    "overwrite_cache": _ignored("overwrite_cache: lmforge's token cache is keyed by the data, tokenizer "
                                         "and settings, so a stale entry cannot be used"),
    "preprocessing_num_workers": _ignored("preprocessing_num_workers: tokenising runs in-process (and is cached)"),
    "dataloader_num_workers": _ignored("dataloader_num_workers: batches are built in-process"),
    "plot_loss": _ignored("plot_loss: loss.png is always written"),
    "save_only_model": _ignored("save_only_model: checkpoints always hold what exact resume needs"),
    "ddp_timeout": _ignored("ddp_timeout: single-process run"),
    "trust_remote_code": _ignored("trust_remote_code: lmforge loads models with transformers' own classes"),
    "eval_strategy": _ignored("eval_strategy: evaluation runs every eval_steps when validation data exists"),
    "evaluation_strategy": _ignored("evaluation_strategy: evaluation runs every eval_steps"),
    "save_strategy": _ignored("save_strategy: checkpoints are saved every save_steps"),
    "logging_strategy": _ignored("logging_strategy: logs every logging_steps"),
    "deepspeed": _deepspeed,
    "fsdp": _ignored("fsdp: shards the model across GPU processes; this run is one process, where it changes nothing"),
    "fsdp_config": _ignored("fsdp_config: settings of fsdp, which changes nothing in one process"),
    "fsdp_transformer_layer_cls_to_wrap": _ignored("fsdp_transformer_layer_cls_to_wrap: a setting of fsdp, which "
                                                   "changes nothing in one process"),
    "ddp_find_unused_parameters": _ignored("ddp_find_unused_parameters: a setting of multi-process (DDP) training; "
                                           "this run is one process"),
    "ddp_backend": _ignored("ddp_backend: a setting of multi-process (DDP) training; this run is one process"),
    "tokenized_path": _ignored("tokenized_path: lmforge caches token ids automatically, keyed by the data, "
                               "tokenizer and settings, so there is no path to give and nothing to refresh by hand"),
    "ray_num_workers": _ray("ray_num_workers"),
    "ray_init_kwargs": _ray("ray_init_kwargs"),
    "ray_run_name": _ray("ray_run_name"),
    "ray_storage_path": _ray("ray_storage_path"),
    "ray_storage_filesystem": _ray("ray_storage_filesystem"),
    "flash_attn": _ignored("flash_attn: attention runs per example inside a packed row, on torch's SDPA kernels "
                           "(CPU bf16: lmforge's blocked kernel)"),
    "disable_gradient_checkpointing": _ignored("disable_gradient_checkpointing: lmforge does not checkpoint "
                                               "activations (packing and a lean MLP keep their memory down)"),
    "run_name": _ignored("run_name: the run is named after output_dir"),
    "packing": _ignored("packing: lmforge always packs examples into rows, each attending only to itself (no "
                        "cross-contamination), so results equal unpacked training"),
    "neat_packing": _ignored("neat_packing: lmforge's packing never lets examples attend to each other"),
    "gradient_checkpointing": _ignored("gradient_checkpointing: lmforge does not checkpoint activations (packing "
                                       "and a lean MLP keep their memory down)"),
    "use_reentrant_gc": _ignored("use_reentrant_gc: a setting of gradient checkpointing, which lmforge does not use"),
    "enable_liger_kernel": _ignored("enable_liger_kernel: GPU Triton kernels; lmforge computes the LM-head loss in "
                                    "chunks itself"),
    "use_unsloth": _ignored("use_unsloth: GPU kernels; lmforge runs its own CPU-friendly training path"),
    "use_v1_kernels": _ignored("use_v1_kernels: LLaMA-Factory's GPU kernels; lmforge uses its own"),
    "fp8": _false_only("fp8", "FP8 training needs an FP8-capable GPU (H100 class); on this machine train in "
                              "bf16 or float32 (remove fp8)"),
    "fp8_backend": _ignored("fp8_backend: a setting of fp8 training"),
    "fp8_enable_fsdp_float8_all_gather": _ignored("fp8_enable_fsdp_float8_all_gather: a setting of fp8 training"),
    "do_predict": _false_only("do_predict", "a prediction config is run by `lmforge eval THIS.yaml` (BLEU-4 / ROUGE "
                                            "on eval_dataset, as LLaMA-Factory's predict)"),
    "predict_with_generate": _ignored("predict_with_generate: generation metrics come from `lmforge eval`"),
    "do_eval": _ignored("do_eval: validation runs every eval_steps when there is validation data"),
    "adapter_name_or_path": "model.adapter",
    "create_new_adapter": _false_only("create_new_adapter", "lmforge continues the adapter it is given; to start a "
                                                            "new one on top, merge it first (`lmforge export`) and "
                                                            "train on the merged model"),
}


def merge_partial(into: dict, partial: dict) -> None:
    """Merge a partial config ({section: {field: value}} or a top-level value) into `into`."""
    for key, value in partial.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        elif isinstance(value, dict):
            into[key] = dict(value)
        else:
            into[key] = value


def adapter_dir(path: str) -> Path:
    """The adapter dir a path means: itself, or an lmforge run dir's adapter/."""
    return Path(path) / "adapter" if is_lmforge_run(path) else Path(path)


def _adopt_adapter_settings(nested: dict, notes: list[str], refused: list[str], source: str) -> None:
    """adapter_name_or_path in training: the adapter's own adapter_config.json decides its method and LoRA settings,
    as when LLaMA-Factory loads it (PeftModel.from_pretrained); settings in the file that differ are noted."""
    path = str(nested["model"]["adapter"])
    method = nested.setdefault("method", {})
    if "," in path:
        refused.append(f"adapter_name_or_path: {path!r} — lmforge continues one adapter; merge the others first "
                       f"(`lmforge export`) and train on the merged model")
        return
    if method.get("type") in ("full", "freeze"):
        refused.append(f"adapter_name_or_path with finetuning_type: {method['type']} — a full or freeze run continues "
                       f"from its model dir: point model_name_or_path at it")
        return
    config_file = adapter_dir(path) / "adapter_config.json"
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        refused.append(f"adapter_name_or_path: {path} — no readable adapter_config.json there (a PEFT adapter dir, "
                       f"or the output_dir of an lmforge LoRA run)")
        return
    kind = {"LORA": "dora" if saved.get("use_dora") else "lora", "LOHA": "loha", "LOKR": "lokr", "IA3": "ia3",
            "PREFIX_TUNING": "prefix" if saved.get("prefix_projection") else "ptuning",
            "PROMPT_TUNING": "prompt", "OFT": "oft"}.get(saved.get("peft_type"))
    if kind is None:
        refused.append(f"adapter_name_or_path: {path} — its peft_type {saved.get('peft_type')!r} is not one lmforge "
                       f"continues")
        return
    if kind == "lora" and (method.get("type") == "qlora" or method.get("quantization_bit")):
        kind = "qlora"
    adopted = {"type": kind}
    targets = saved.get("target_modules")
    for field, value in (("lora_rank", saved.get("r")), ("lora_alpha", saved.get("lora_alpha")),
                         ("lora_dropout", saved.get("lora_dropout")), ("use_rslora", saved.get("use_rslora")),
                         ("lora_target", sorted(targets) if isinstance(targets, list) else None),
                         ("num_virtual_tokens", saved.get("num_virtual_tokens")),
                         ("oft_rank", saved.get("r")), ("oft_block_size", saved.get("oft_block_size"))):
        if value is not None and (field != "num_virtual_tokens" or kind in ("prefix", "ptuning", "prompt")) and (
                not field.startswith("oft_") or kind == "oft"):
            adopted[field] = value
    changed = [f"{field} {method[field]!r} → {value!r}" for field, value in adopted.items()
               if field in method and method[field] != value]
    method.update(adopted)
    notes.append(f"{source}: adapter_name_or_path: continuing {path} with its own settings (adapter_config.json)"
                 + (f"; the file's {', '.join(changed)}" if changed else ""))


def is_flat_llamafactory(raw: dict) -> bool:
    return bool(_MARKERS & set(raw))


def translate_flat(raw: dict, source: str) -> tuple[dict, list[str]]:
    """Return (our nested config dict, notes). Unknown keys are listed under "_unknown" and settings we cannot honour
    under "_refused" (each a message), for the caller to report with every other problem."""

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
            except Refused as refusal:
                refused.append(str(refusal))
                continue
            if partial:
                for section, fields in partial.items():
                    nested.setdefault(section, {}).update(fields)
            if note:
                notes.append(f"{source}: {note}")
    if nested.get("model", {}).get("adapter"):
        _adopt_adapter_settings(nested, notes, refused, source)
    if refused:  # reported by the caller together with unknown keys and invalid values: every problem at once
        nested["_refused"] = refused
    if unknown:
        nested["_unknown"] = unknown
    if raw.get("pissa_init"):  # LLaMA-Factory: pissa_iter (default 16) FSVD steps; -1 = exact SVD
        steps = raw.get("pissa_iter", 16)
        nested.setdefault("method", {})["pissa_iter"] = None if steps == -1 else steps
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


def is_lmforge_run(path: Any) -> bool:
    """An lmforge run dir (config.yaml from `lmforge train`, no model config.json of its own): where LLaMA-Factory's
    files point at a training output_dir, the weights are in this run."""
    return isinstance(path, str) and bool(path) and (Path(path) / "config.yaml").is_file() \
        and not (Path(path) / "config.json").is_file()


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
    for key, name in (("adapter", "adapter_name_or_path"), ("base_model", "model_name_or_path")):
        if is_lmforge_run(fields.get(key)):  # LLaMA-Factory's output_dir is where `lmforge train` made a run dir
            fields["source"] = str(fields.pop(key))
            fields.pop("base_model", None)
            fields.pop("adapter", None)
            notes.append(f"{source}: {name} {fields['source']} is an lmforge run dir: exporting its weights "
                         f"(best.json's choice, else the final ones) on the base model it was trained from")
            break
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the export "
                          f"config:\n{lines}")
    return fields, notes
