"""The thirteen fine-tuning methods, one MethodSpec each: what the method changes, how peft builds it, whether it
merges into plain weights, whether it adds virtual tokens (so batches are padded, not packed), which base it can train
on and how `lmforge serve` runs the result.

Owns: METHOD_SPECS, the one table every caller consults — config/schema.py (the choices of method.type and its
checks), model/methods.py (checking and applying), rundir.py (adapter/ or model/), export (what merges), serve (which
decoder). Must not import torch or lmforge's config: config/schema.py imports this module.

Adding a peft method: one MethodSpec below with its peft config builder (plus its row in tests/test_methods.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# What a method changes (MethodSpec.changes)
LINEAR = "linear layers"  # new weights on the decoder's linear layers named by method.lora_target (via peft)
VIRTUAL_TOKENS = "virtual tokens"  # trained tokens in front of every sequence (via peft)
BOTTLENECK = "bottleneck adapters"  # our adapters after the layers named by method.adapter_target (bottleneck.py)
LAYERS = "some layers"  # freeze: the chosen decoder layers (and named modules) train in place
ALL = "every weight"  # full

# How `lmforge serve` runs a trained model of the method (MethodSpec.serve)
PER_REQUEST_LORA = "per-request LoRA"  # the fast decoder, the LoRA applied per row beside the base and other LoRAs
MERGED = "merged"  # the fast decoder, after merging into the base in memory; served alone
WHOLE_MODEL = "whole model"  # the fast decoder; the saved model/ is served as a base
OWN_FORWARD = "own forward"  # the model's own forward (serve/model_decoder.py), one sequence per forward


@dataclass(frozen=True)
class MethodSpec:
    name: str
    changes: str  # LINEAR, VIRTUAL_TOKENS, BOTTLENECK, LAYERS or ALL
    serve: str  # PER_REQUEST_LORA, MERGED, WHOLE_MODEL or OWN_FORWARD
    peft_config: Callable | None = None  # (method, target module names or None, model) → a peft config
    saves_model: bool = False  # the artifact is a whole model (model/), not an adapter (adapter/)
    unmergeable: str | None = None  # why it cannot be merged into plain weights (None: it can)
    quantized_base: bool = False  # may train on a bitsandbytes-quantised base (method.quantization_bit)
    default_bits: int | None = None  # quantised without being asked (qlora: 4-bit)
    lora_init: bool = False  # method.lora_init (pissa / olora) applies
    peft_default_targets: bool = False  # lora_target "all" → peft's own per-architecture targets when it has them
    loraplus: bool = False  # LoRA's A / B matrices: method.loraplus_lr_ratio (LoRA+) applies

    @property
    def virtual_tokens(self) -> bool:
        """Tokens in front of each sequence: packing does not apply, rows are padded instead."""
        return self.changes == VIRTUAL_TOKENS

    @property
    def mergeable(self) -> bool:
        return self.unmergeable is None


# ---------------------------------------------------------------------------------------------- peft config builders
# Each takes the run's MethodConfig, the target module short names (None = peft's defaults) and the model.


def _rank_alpha(method) -> tuple[int, float]:
    return method.lora_rank, method.lora_alpha or 2 * method.lora_rank


def _lora(method, targets, model):
    import peft

    rank, alpha = _rank_alpha(method)
    init = True if method.lora_init == "default" else method.lora_init
    if method.lora_init == "pissa" and method.pissa_iter is not None and method.pissa_iter >= 0:
        init = f"pissa_niter_{method.pissa_iter}"  # fast randomised SVD (LLaMA-Factory's pissa_iter)
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=method.lora_dropout, target_modules=targets,
                           use_dora=method.dora, use_rslora=method.use_rslora, task_type="CAUSAL_LM",
                           init_lora_weights=init, layers_to_transform=expanded_layers(method, model))


def _oft(method, targets, model):
    import peft

    return peft.OFTConfig(r=method.oft_rank, oft_block_size=method.oft_block_size, target_modules=targets,
                          module_dropout=method.module_dropout, task_type="CAUSAL_LM")


def expanded_layers(method, model) -> list[int] | None:
    """llama_pro: the block-expanded layers (every (layers / freeze_trainable_layers)-th one, as LLaMA-Factory's
    scripts/llama_pro.py places them); None when llama_pro is off."""
    if not method.llama_pro:
        return None
    layers = model.config.num_hidden_layers
    stride = layers // method.freeze_trainable_layers
    return list(range(stride - 1, layers, stride))


def _loha(method, targets, model):
    import peft

    rank, alpha = _rank_alpha(method)
    return peft.LoHaConfig(r=rank, alpha=alpha, rank_dropout=method.lora_dropout, target_modules=targets,
                           task_type="CAUSAL_LM")


def _lokr(method, targets, model):
    import peft

    rank, alpha = _rank_alpha(method)
    return peft.LoKrConfig(r=rank, alpha=alpha, rank_dropout=method.lora_dropout, target_modules=targets,
                           task_type="CAUSAL_LM")


def _ia3(method, targets, model):
    import peft

    feedforward = None if targets is None else [t for t in targets if t in ("down_proj", "fc2", "c_proj",
                                                                            "dense_4h_to_h")]
    return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


def _prefix(method, targets, model):
    """prefix: Li & Liang's MLP reparameterisation; ptuning: P-tuning v2 trains the per-layer prefix directly."""
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                   prefix_projection=method.type == "prefix",
                                   encoder_hidden_size=method.prefix_projection_dim)


def _prompt(method, targets, model):
    import peft

    if method.prompt_init_text:
        return peft.PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                       prompt_tuning_init="TEXT", prompt_tuning_init_text=method.prompt_init_text,
                                       tokenizer_name_or_path=model.name_or_path)
    return peft.PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM")


_OUTSIDE = "its virtual tokens live outside the weights"

METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("lora", LINEAR, PER_REQUEST_LORA, _lora, quantized_base=True, lora_init=True, loraplus=True),
    MethodSpec("dora", LINEAR, MERGED, _lora, quantized_base=True, lora_init=True, loraplus=True),
    MethodSpec("qlora", LINEAR, PER_REQUEST_LORA, _lora, quantized_base=True, default_bits=4, loraplus=True),
    MethodSpec("loha", LINEAR, MERGED, _loha),
    MethodSpec("lokr", LINEAR, MERGED, _lokr),
    MethodSpec("ia3", LINEAR, MERGED, _ia3, peft_default_targets=True),
    MethodSpec("oft", LINEAR, MERGED, _oft),
    MethodSpec("prefix", VIRTUAL_TOKENS, OWN_FORWARD, _prefix, unmergeable=_OUTSIDE),
    MethodSpec("ptuning", VIRTUAL_TOKENS, OWN_FORWARD, _prefix, unmergeable=_OUTSIDE),
    MethodSpec("prompt", VIRTUAL_TOKENS, OWN_FORWARD, _prompt, unmergeable=_OUTSIDE),
    MethodSpec("adapter", BOTTLENECK, OWN_FORWARD,
               unmergeable="bottleneck adapters add layers the base architecture does not have"),
    MethodSpec("freeze", LAYERS, WHOLE_MODEL, saves_model=True),
    MethodSpec("full", ALL, WHOLE_MODEL, saves_model=True),
)}


def method_spec(name: str | None) -> MethodSpec | None:
    """The spec of a method name, or None for no name or a name lmforge does not know."""
    return METHOD_SPECS.get(name) if name else None


def spoken_list(names) -> str:
    """["a", "b", "c"] → "a, b or c" (for messages that list the methods that would work)."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
