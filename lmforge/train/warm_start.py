"""Continue training a saved adapter (model.adapter; LLaMA-Factory's adapter_name_or_path in a training config).

Owns putting a PEFT adapter dir's weights into the freshly applied method before the first step, and refusing an
adapter that does not fit it (with what to set). The method settings come from the config (llamafactory.py copies
them from the adapter's adapter_config.json); this module only loads and checks. Must not change the loop's order.
"""

from __future__ import annotations

from pathlib import Path

from ..config.llamafactory import adapter_dir
from ..errors import ConfigError, ModelError


def continue_adapter(model, path: str) -> str:
    """Load the adapter at `path` (a PEFT adapter dir, or an lmforge run dir's adapter/) into `model`'s method;
    return a line for the user."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = adapter_dir(path)
    peft_model = model if isinstance(model, PeftModel) else getattr(model, "peft_model", None)
    if not isinstance(peft_model, PeftModel):
        raise ConfigError(f"model.adapter {path}: continuing an adapter needs a PEFT method (lora, dora, qlora, loha, "
                          f"lokr, ia3, prefix, ptuning, prompt); this method has no PEFT adapter to load it into")
    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ConfigError(f"model.adapter {path}: no adapter_model.safetensors in {directory} (a PEFT adapter dir, or "
                          f"the output_dir of an lmforge LoRA run)")
    weights = load_file(str(weights_file))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except (RuntimeError, ValueError) as error:
        what = "its tensors have other shapes" if "size mismatch" in str(error) else str(error).splitlines()[0]
        raise ModelError(f"model.adapter {directory} does not fit method {_method(peft_model)}: {what} — set the "
                         f"method to the adapter's adapter_config.json (r, lora_alpha, target_modules)") from None
    missing = sorted(name for name in result.missing_keys if name in trainable)
    if result.unexpected_keys or missing:
        raise ModelError(f"model.adapter {directory} does not fit method {_method(peft_model)}: "
                         f"{len(result.unexpected_keys)} of its tensors have no place in the model and {len(missing)} "
                         f"trainable tensors get no value — set the method to the adapter's adapter_config.json "
                         f"(peft_type, r, target_modules)")
    return f"continuing the adapter in {Path(directory)} ({len(weights)} tensors)"


def _method(peft_model) -> str:
    config = peft_model.peft_config.get("default")
    kind = getattr(getattr(config, "peft_type", None), "value", "?")
    return f"{kind} r={getattr(config, 'r', '-')}"
