"""Fine-tuning methods: which parameters train. lora (via peft), full, freeze.

Each method takes a loaded base model and returns the model to train, with exactly the parameters it owns marked
trainable. Target modules are checked against the model before peft sees them, so a typo lists the names that exist.
Must not know about data or the training loop.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from .config import MethodConfig
from .errors import ConfigError


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers inside the decoder blocks (q_proj, v_proj, …), as LoRA targets them."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_method(model, method: MethodConfig):
    if method.type == "lora":
        return _apply_lora(model, method)
    if method.type == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if method.type == "freeze":
        return _apply_freeze(model, method)
    raise ConfigError(f"method.type {method.type!r} is not supported")


def _apply_lora(model, method: MethodConfig):
    available = linear_module_names(model)
    if method.lora_target == "all":
        targets = available
    else:
        targets = list(method.lora_target)
        missing = [t for t in targets if t not in available]
        if missing:
            raise ConfigError(f"method.lora_target: {', '.join(missing)} not found in this model; its linear layers "
                              f"are: {', '.join(available)} (or use \"all\")")
    config = LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha or 2 * method.lora_rank,
                        lora_dropout=method.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def _apply_freeze(model, method: MethodConfig):
    layers = decoder_layers(model)
    n = method.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"method.freeze_trainable_layers: {n} — this model has {len(layers)} decoder layers; "
                          f"use 1..{len(layers)} (last N) or -1..-{len(layers)} (first N)")
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    prefixes = tuple(f".layers.{i}." for i in chosen)
    for name, parameter in model.named_parameters():
        trainable = any(p in name for p in prefixes) or any(m in name for m in method.freeze_trainable_modules)
        parameter.requires_grad_(trainable)
    unmatched = [m for m in method.freeze_trainable_modules if not any(m in n for n, _ in model.named_parameters())]
    if unmatched:
        raise ConfigError(f"method.freeze_trainable_modules: no parameter name contains {', '.join(unmatched)}")
    return model


def trainable_summary(model) -> str:
    """The line users know from peft: trainable params: … || all params: … || trainable%: …"""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
