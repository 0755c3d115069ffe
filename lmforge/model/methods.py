"""Fine-tuning methods — which parameters train: lora (+ dora, rslora, pissa/olora), qlora (bitsandbytes 4/8-bit base),
loha, lokr, ia3, oft, prefix, ptuning (P-tuning v2), prompt via peft; adapter (bottleneck.py); freeze (+ LLaMA Pro's
block expansion); full. What each
method is (what it changes, its peft config) is its entry in method_specs.py; this module acts on it.
`check_method` checks a method against the architecture on an empty meta-device copy before weights load;
`apply_method` marks exactly the method's parameters trainable; `save_trained` / `load_saved_adapter` write and
read the artifact so a reload computes what was trained. `method` is always the run's config.MethodConfig (not
imported: config sits above model). Must not know about data or the loop.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from . import bottleneck as adapters
from .method_specs import ALL, BOTTLENECK, LAYERS, LINEAR, METHOD_SPECS

QUANTIZATION_FILE = "lmforge_quantization.json"  # beside adapter_config.json: the base was quantised in training
# bitsandbytes (imported by peft) warns on every import that an optional CPU kernel package from the Hugging Face Hub
# is missing; lmforge never downloads code at run time, and the built-in CPU kernels are what it uses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


# ---------------------------------------------------------------------------------------------- checks, before loading


def check_method(method, model_path: str) -> None:
    """Every problem the method has with this architecture, found on an empty copy of the model (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _targets(model, method)
    changes = METHOD_SPECS[method.type].changes
    if changes == BOTTLENECK:
        _adapter_targets(model, method)
    if changes == LAYERS:
        _freeze_plan(expand_blocks(model, method.llama_pro_expand), method)
    if method.llama_pro and changes == LINEAR:
        _llama_pro_stride(len(decoder_layers(model)), method.freeze_trainable_layers)
    if method.bits:
        _require_bitsandbytes()


def _targets(model, method) -> list[str] | None:
    """LoRA-style target short names (None = peft's defaults, for ia3 with "all")."""
    spec = METHOD_SPECS[method.type]
    if spec.changes != LINEAR:
        return None
    available = linear_module_names(model)
    if method.lora_target == "all":
        return None if spec.peft_default_targets and _ia3_defaults(model) else available
    missing = [t for t in method.lora_target if t not in available]
    if missing:
        raise ConfigError(f"method.lora_target: {', '.join(missing)} not found in this model "
                          f"({type(model).__name__}); its linear layers are: {', '.join(available)} (or use \"all\")")
    return list(method.lora_target)


def _ia3_defaults(model) -> bool:
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    return model.config.model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING


def _adapter_targets(model, method) -> list[str]:
    targets, available = adapters.adapter_targets(model, method.adapter_target)
    wanted = [] if method.adapter_target == "auto" else method.adapter_target
    missing = [t for t in wanted if t not in available]
    if missing or not targets:
        raise ConfigError(f"method.adapter_target: {', '.join(missing) or 'auto'} not found in this model "
                          f"({type(model).__name__}); its decoder linear layers are: {', '.join(available)}")
    return targets


def _freeze_plan(model, method) -> tuple[str, ...]:
    """The name fragments of the parameters a freeze run trains, as LLaMA-Factory chooses them: the last (or first) N
    decoder layers or, with llama_pro, the expanded blocks; inside them freeze_trainable_modules (all: everything);
    freeze_extra_modules (outside the layers) are matched by _is_extra."""
    layers = decoder_layers(model)
    n = method.llama_pro_expand or method.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"method.freeze_trainable_layers: {n} — this model has {len(layers)} decoder layers; "
                          f"use 1..{len(layers)} (last N) or -1..-{len(layers)} (first N)")
    if method.llama_pro:
        chosen = range(_llama_pro_stride(len(layers), n) - 1, len(layers), _llama_pro_stride(len(layers), n))
    else:
        chosen = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    names = [name for name, _ in model.named_parameters()]
    inside = sorted({name.split(".layers.0.", 1)[1].split(".")[0] for name in names if ".layers.0." in name})
    modules = method.freeze_trainable_modules
    if modules != "all":
        unknown = [m for m in modules if m not in inside]
        if unknown or not modules:
            raise ConfigError(f"method.freeze_trainable_modules: {', '.join(unknown) or '[]'} — not a module of a "
                              f"decoder layer; choose from {', '.join(inside)} or all (modules outside the layers: "
                              f"method.freeze_extra_modules)")
    outside = sorted({name.rsplit(".", 2)[-2] for name in names if ".layers." not in name and "." in name})
    unknown = [m for m in method.freeze_extra_modules if m not in outside]
    if unknown:
        raise ConfigError(f"method.freeze_extra_modules: {', '.join(unknown)} — not a module outside the decoder "
                          f"layers; choose from {', '.join(outside)}")
    inner = [""] if modules == "all" else [f"{m}." for m in modules]
    return tuple(f".layers.{i}.{m}" for i in chosen for m in inner)


def _is_extra(name: str, method) -> bool:
    """A parameter outside the decoder layers inside one of method.freeze_extra_modules."""
    return ".layers." not in name and any(m in name.split(".")[:-1] for m in method.freeze_extra_modules)


def _llama_pro_stride(layers: int, trainable: int) -> int:
    if trainable <= 0 or layers % trainable:
        raise ConfigError(f"method.llama_pro: this model has {layers} decoder layers, which freeze_trainable_layers "
                          f"{trainable} does not divide; set it to the number of expanded blocks (the model's layers "
                          f"must be a multiple of it, as LLaMA-Factory's scripts/llama_pro.py expands them)")
    return layers // trainable


def expand_blocks(model, count: int):
    """LLaMA Pro's block expansion, as LLaMA-Factory's scripts/llama_pro.py does it, in memory: after every
    (layers / count)-th decoder layer, a copy of it whose o_proj and down_proj are zero, so each new block adds
    nothing to the residual stream and the model computes what it computed before. Returns the model (count 0: as
    it is)."""
    if not count:
        return model
    import copy

    layers = decoder_layers(model)
    total = len(layers)
    if count < 0 or total % count:
        raise ConfigError(f"method.llama_pro_expand: {count} — it must divide this model's {total} decoder layers")
    split, expanded, types = total // count, [], []
    layer_types = getattr(model.config, "layer_types", None)
    for index, layer in enumerate(layers):
        expanded.append(layer)
        types.append(layer_types[index] if layer_types else None)
        if (index + 1) % split == 0:
            block = copy.deepcopy(layer)
            zeroed = [m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in ("o_proj", "down_proj")]
            if len(zeroed) < 2:
                raise ConfigError(f"method.llama_pro_expand: {type(layer).__name__} has no o_proj and down_proj "
                                  f"(LLaMA Pro expands Llama-style blocks: Llama, Mistral, Qwen2, Qwen3, …)")
            with torch.no_grad():
                for module in zeroed:
                    for parameter in module.parameters():
                        parameter.zero_()
            expanded.append(block)
            types.append(types[-1])
    for index, layer in enumerate(expanded):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index  # the KV cache is indexed by it
    model.get_decoder().layers = torch.nn.ModuleList(expanded)
    model.config.num_hidden_layers = len(expanded)
    if layer_types:
        model.config.layer_types = types
    return model


def _require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"method.quantization_bit needs bitsandbytes ({error}); install it: pip install "
                          f"bitsandbytes==0.50.2") from None


# ---------------------------------------------------------------------------------------------- applying


def load_base(path: str, dtype: torch.dtype, method):
    """The base model to train: as models.load_model loads it, or for qlora quantised while it loads (one tensor at a
    time, so peak memory is the quantised model's, not the full-precision one's)."""
    from .loader import load_model

    if not method.bits:
        return load_model(path, dtype)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _require_bitsandbytes()
    settings = BitsAndBytesConfig(load_in_4bit=method.bits == 4, load_in_8bit=method.bits == 8,
                                  bnb_4bit_quant_type=method.quantization_type,
                                  bnb_4bit_use_double_quant=method.double_quantization, bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=["lm_head"])
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                     quantization_config=settings, device_map="cpu")
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        raise ModelError(f"cannot load {path} quantised to {method.bits}-bit: {error}") from error
    model.lmforge_quantization = {"bits": method.bits, "quant_type": method.quantization_type,
                                  "double_quantization": method.double_quantization}
    return model


def apply_method(model, method):
    changes = METHOD_SPECS[method.type].changes
    if changes == ALL:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if changes == LAYERS:
        prefixes = _freeze_plan(expand_blocks(model, method.llama_pro_expand), method)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(any(p in name for p in prefixes) or _is_extra(name, method))
        return model
    if changes == BOTTLENECK:
        adapters.add_adapters(model, method.adapter_size, _adapter_targets(model, method))
        return model
    if method.bits and not getattr(model, "lmforge_quantization", None):  # loaded unquantised (load_base was not used)
        quantize(model, method.bits, method.quantization_type, method.double_quantization)
    return _apply_peft(model, method)


def _apply_peft(model, method):
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    peft_model = get_peft_model(model, peft_config(model, method))
    if method.lora_init != "default":  # kept to convert the trained adapter back to a plain LoRA (save_trained)
        peft_model.lmforge_initial_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model


def peft_config(model, method):
    """The peft config of a peft method (its builder in method_specs.py) for this model."""
    build = METHOD_SPECS[method.type].peft_config
    if build is None:
        raise ConfigError(f"method.type {method.type!r} is not supported")
    return build(method, _targets(model, method), model)


def quantize(model, bits: int, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Replace the decoder's linear layers by bitsandbytes 4-bit (or 8-bit) layers holding the same weights,
    quantised now (on CPU). The LM head and embeddings stay as they are, as in QLoRA. Returns how many."""
    _require_bitsandbytes()
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if not (type(module) is torch.nn.Linear and ".layers." in name):
            continue
        parent_name, child = name.rsplit(".", 1)
        weight = module.weight.data
        if bits == 4:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=weight.dtype, compress_statistics=double_quant,
                                      quant_type=quant_type)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type)
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent_name), child, layer.to(weight.device))
        count += 1
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.lmforge_quantization = {"bits": bits, "quant_type": quant_type, "double_quantization": double_quant}
    return count


# ---------------------------------------------------------------------------------------------- saving and loading


@contextmanager
def adapter_disabled(model):
    """The base model's behaviour (the reference of dpo/kto): peft's disable_adapter, or our adapters switched off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    elif adapters.has_adapters(model):
        with adapters.adapters_disabled(model):
            yield
    else:
        raise ValueError("the model has no adapter to switch off")


def has_adapter(model) -> bool:
    return hasattr(model, "disable_adapter") or adapters.has_adapters(model)


def save_trained(model, directory: Path) -> None:
    """The trained result into `directory`: a PEFT adapter (a PiSSA/OLoRA one converted to a plain LoRA on the
    original base), our bottleneck adapters, or the whole model."""
    if adapters.has_adapters(model):
        adapters.save_adapters(model, directory)
        return
    initial = getattr(model, "lmforge_initial_adapter", None)
    if initial is None:
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_file

        init_dir = directory / "initial_adapter"
        init_dir.mkdir(parents=True)
        save_file(initial, str(init_dir / "adapter_model.safetensors"))
        model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(init_dir))
        shutil.rmtree(init_dir)
    quantization = getattr(unwrap(model), "lmforge_quantization", None)
    if quantization:
        (directory / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=2) + "\n")


def load_saved_adapter(base_model, directory: Path):
    """A loaded base model + the adapter dir written by save_trained (PEFT or ours), quantising the base first
    when it was quantised in training, so the result computes what the trained model computed."""
    from peft import PeftModel

    directory = Path(directory)
    if adapters.is_bottleneck_dir(directory):
        try:
            return adapters.load_adapters(base_model, directory)
        except (ValueError, RuntimeError, AttributeError) as error:
            raise ModelError(f"adapter {directory} does not fit this base model: {error}") from None
    quantization = directory / QUANTIZATION_FILE
    if quantization.is_file():
        settings = json.loads(quantization.read_text())
        quantize(base_model, settings["bits"], settings["quant_type"], settings["double_quantization"])
    model = PeftModel.from_pretrained(base_model, str(directory))
    if model.active_peft_config.is_prompt_learning:  # decode loops keep their own KV cache: see virtual_tokens.py
        from .virtual_tokens import VirtualTokenModel

        return VirtualTokenModel(model)
    return model


def trainable_summary(model) -> str:
    """The line users know from peft: trainable params: … || all params: … || trainable%: …"""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _numel(parameter) -> int:
    """Packed 4-bit weights store two values per byte; count the values, not the bytes."""
    shape = getattr(parameter, "quant_state", None)
    return int(torch.Size(shape.shape).numel()) if shape is not None else parameter.numel()
