"""Bottleneck adapters (Houlsby et al. 2019): a small down-project → nonlinearity → up-project added to the output
of the attention block and of the MLP block of every decoder layer, before the residual add. peft has no such
adapter, so this is ours, saved like a PEFT adapter dir (adapter_config.json + adapter_model.safetensors, peft_type
LMFORGE_BOTTLENECK). The up-projection starts at zero, so a fresh adapter leaves the model unchanged.
Must not know about training or data.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEFT_TYPE = "LMFORGE_BOTTLENECK"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = ("o_proj", "down_proj", "dense", "c_proj", "out_proj", "dense_4h_to_h")


class BottleneckAdapter(torch.nn.Module):
    """y = base(x); y + up(gelu(down(y)))."""

    def __init__(self, base_layer: torch.nn.Linear, size: int):
        super().__init__()
        self.base_layer = base_layer
        width = base_layer.out_features
        self.adapter_down = torch.nn.Linear(width, size).to(base_layer.weight.dtype)
        self.adapter_up = torch.nn.Linear(size, width).to(base_layer.weight.dtype)
        torch.nn.init.zeros_(self.adapter_up.weight)
        torch.nn.init.zeros_(self.adapter_up.bias)
        self.enabled = True

    def forward(self, x):
        y = self.base_layer(x)
        if not self.enabled:
            return y
        return y + self.adapter_up(torch.nn.functional.gelu(self.adapter_down(y)))


def adapter_targets(model, requested) -> tuple[list[str], list[str]]:
    """(full names of the linear layers that get an adapter, the short names available in the decoder layers)."""
    linear = {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    available = sorted(set(linear.values()))
    wanted = [t for t in DEFAULT_TARGETS if t in available][:2] if requested == "auto" else list(requested)
    return [name for name, short in linear.items() if short in wanted], available


def add_adapters(model, size: int, targets: list[str]) -> list[str]:
    """Wrap each named linear layer; freeze everything else. Returns the wrapped names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), size))
    model.lmforge_bottleneck = {"adapter_size": size, "target_modules": targets}
    return targets


def has_adapters(model) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


@contextmanager
def adapters_disabled(model):
    modules = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def save_adapters(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().contiguous() for name, p in model.named_parameters() if ".adapter_" in name}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": PEFT_TYPE, "base_model_name_or_path": model.name_or_path,
              **model.lmforge_bottleneck}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def is_bottleneck_dir(directory: Path) -> bool:
    path = Path(directory) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("peft_type") == PEFT_TYPE


def load_adapters(model, directory: Path):
    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    add_adapters(model, config["adapter_size"], config["target_modules"])
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    missing = {n for n, _ in model.named_parameters() if ".adapter_" in n} - set(state)
    if missing:
        raise ValueError(f"{directory} lacks {len(missing)} adapter tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(state, strict=False)
    return model
