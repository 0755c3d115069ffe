"""The memory pre-flight: before any weights load, how much memory one training process will need at its peak,
and a refusal with the numbers and what to change when that cannot fit.

Owns: the estimate (`estimate_peak`), what is available (`available_bytes`), and the refusal (`check_fits`).
The parts, per process:
- the process as it is now (interpreter, torch, tokenizer, the prepared data) — read, not guessed;
- weights: every parameter of the model with the method applied (counted on an empty meta-device copy), in the
  dtype it loads in; a quantised base (qlora) at 4 or 8 bits plus the full-precision checkpoint it is quantised
  from (resident while loading); FSDP divides them by the number of processes and gathers one layer at a time;
- what trains: gradients and AdamW's two moments, 12 bytes per trainable parameter (sharded under FSDP);
- a frozen reference copy for dpo / kto with full or freeze (the adapter is switched off otherwise);
- activations kept for backward, per token and per decoder layer that trains (freeze keeps none below its first
  trained layer), for the largest micro-batch the data can form (the batch_size longest examples, packed);
- the LM head's chunk of logits (256 rows at a time, train/losses.py).
Must not load weights, and must not decide anything but "fits / does not fit".
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

GiB = 1 << 30
HEAD_CHUNK_ROWS = 256  # train/losses.py computes the LM head this many rows at a time
# Bytes of activations kept per token per trained decoder layer, in units of the activation dtype's size: inputs of
# the two norms and the residual (3 h), q / k / v after RoPE (h + 2 kv), attention output (h), the lean MLP's gate
# and up (2 i) and the down projection's input (i). Checked against measured peaks in benchmarks/memory.py.
ALLOCATOR_SLACK = 1.10  # freed temporaries the allocator has not returned yet, between heap trims


@dataclass(frozen=True)
class MemoryEstimate:
    process: int  # bytes the process holds now, before the model loads
    weights: int
    training_state: int  # gradients + optimizer moments of what trains
    reference: int
    activations: int
    head: int
    processes_here: int  # training processes sharing this machine's memory
    device: str

    @property
    def peak(self) -> int:
        return int(self.process + self.weights + self.training_state + self.reference
                    + (self.activations + self.head) * ALLOCATOR_SLACK)

    def summary(self) -> str:
        parts = [("now", self.process), ("weights", self.weights), ("grads+optimizer", self.training_state)]
        if self.reference:
            parts.append(("reference", self.reference))
        parts += [("activations", self.activations), ("LM head", self.head)]
        each = " + ".join(f"{name} {_gib(value)}" for name, value in parts)
        scope = f" per process × {self.processes_here}" if self.processes_here > 1 else ""
        return f"memory estimate{scope}: peak {_gib(self.peak)} ({each})"


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def count_parameters(model_path: str, method, method_dtype: str = "auto") -> tuple[int, int, dict]:
    """(parameter bytes as loaded, trainable parameters, facts) of the model with the method applied, counted on an
    empty meta-device copy: nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.loader import pick_dtype
    from ..model.methods import apply_method

    config = AutoConfig.from_pretrained(model_path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    bits = method.bits
    # How weights are initialised (PiSSA / OLoRA decompositions, prompt text) changes no size, and cannot run on the
    # meta device; a quantised base trains the same LoRA weights (its frozen linears are counted quantised below).
    method = method.model_copy(update={"lora_init": "default", "prompt_init_text": None,
                                       **({"type": "lora", "quantization_bit": None} if bits else {})})
    model = apply_method(model, method)
    dtype_bytes = torch.finfo(pick_dtype(method_dtype)).bits // 8
    weight_bytes, trainable = 0, 0
    for name, parameter in model.named_parameters():  # tied weights are listed once
        if parameter.requires_grad:
            trainable += parameter.numel()
            weight_bytes += parameter.numel() * 4  # trainable parameters are kept in float32
        elif bits and name.endswith(".weight") and ".layers." in name and parameter.dim() == 2:
            # quantised (+ its constants), and the full-precision tensor read from the checkpoint to quantise it:
            # the file's pages stay resident while the model loads (measured: a qlora run peaks above a lora one)
            weight_bytes += int(parameter.numel() * bits / 8 * 1.03) + parameter.numel() * dtype_bytes
        else:
            weight_bytes += parameter.numel() * dtype_bytes
    layers = text_config.num_hidden_layers
    facts = {"hidden": text_config.hidden_size, "intermediate": getattr(text_config, "intermediate_size", 0) or
             4 * text_config.hidden_size, "kv": _kv_width(text_config), "layers": layers,
             "vocab": text_config.vocab_size, "trained_layers": _trained_layers(model, layers),
             "layer_bytes": weight_bytes // max(layers, 1), "dtype_bytes": dtype_bytes}
    return weight_bytes, trainable, facts


def _kv_width(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def _trained_layers(model, layers: int) -> int:
    """How many decoder layers keep activations for backward: from the first one holding a trainable parameter (or
    all, when anything below the decoder trains: embeddings, virtual tokens)."""
    first = None
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        marker = ".layers."
        if marker not in name:
            return layers
        index = int(name.split(marker, 1)[1].split(".", 1)[0])
        first = index if first is None else min(first, index)
    return layers if first is None else layers - first


def estimate_peak(config, model_path: str, longest_batch_tokens: int, world: int = 1, mode: str | None = None,
                  processes_here: int = 1, device: str = "cpu", needs_reference_copy: bool = False
                  ) -> MemoryEstimate:
    """The peak of one training process (see the module docstring for what is counted). `mode`: None (one process),
    ddp, fsdp (weights, gradients and optimizer state sharded) or fsdp_grad_op (gradients and optimizer state)."""
    weight_bytes, trainable, facts = count_parameters(model_path, config.method, config.model.dtype)
    sharded_weights = mode == "fsdp"
    state_share = world if mode in ("fsdp", "fsdp_grad_op") else 1
    weights = weight_bytes // world + 2 * facts["layer_bytes"] if sharded_weights else weight_bytes  # + 2 gathered
    training_state = trainable * 12 // state_share
    reference = weight_bytes if needs_reference_copy else 0
    activation_bytes = 4  # float32 activations (bf16 autocast keeps some in 2 bytes: this is the upper bound)
    per_token_layer = (5 * facts["hidden"] + 2 * facts["kv"] + 3 * facts["intermediate"]) * activation_bytes
    activations = longest_batch_tokens * (per_token_layer * facts["trained_layers"] + facts["hidden"] * 4 * 2)
    head = min(HEAD_CHUNK_ROWS, longest_batch_tokens) * facts["vocab"] * 4 * 3  # logits, probabilities, gradient
    return MemoryEstimate(process_bytes() if device == "cpu" else 0, weights, training_state, reference,
                          activations, head, processes_here, device)


def process_bytes() -> int:
    """This process's resident memory now."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_process_bytes() -> int:
    """The highest resident memory of this process's own address space (VmHWM). Not ru_maxrss: across fork/vfork +
    exec Linux carries the parent's high-water mark into it, so a run started by a large process (a test runner, a
    notebook) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a run can still take: free GPU memory, or the machine's available memory within any cgroup limit."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < (1 << 60):
                room = int(limit) - int(Path(used_file).read_text().strip())
                available = room if available is None else min(available, room)
            break
        except (OSError, ValueError):
            continue
    return available


def check_fits(estimate: MemoryEstimate, available: int | None, method: str, batch_size: int, cutoff_len: int,
               world: int, mode: str | None) -> None:
    """Refuse a run that cannot fit, with the numbers and the levers that would make it fit."""
    if available is None:
        return
    needed = (estimate.peak - estimate.process) * estimate.processes_here
    if needed <= available:
        return
    advice = []
    if estimate.activations > estimate.weights / 2:
        advice.append(f"lower train.batch_size (now {batch_size}) or data.cutoff_len (now {cutoff_len}): "
                      f"activations are {_gib(estimate.activations)}")
    if method in ("full", "freeze") and estimate.training_state > estimate.weights / 4:
        advice.append("train fewer parameters: method.type lora (or qlora for 4-bit frozen weights)")
    elif method not in ("qlora",):
        advice.append("method.type qlora: the frozen weights in 4 bits")
    if world > 1 and mode != "fsdp":
        advice.append("train.distributed fsdp: shard weights, gradients and optimizer state across the processes")
    advice.append("or more processes / machines (torchrun), each holding a share")
    raise ConfigError(f"this run needs about {_gib(needed)} more memory ({estimate.summary()}"
                      f"{f' for each of {estimate.processes_here} processes' if estimate.processes_here > 1 else ''})"
                      f", and {_gib(available)} is available on {estimate.device}. To make it fit:\n"
                      + "\n".join(f"  - {line}" for line in advice)
                      + "\n  (train.skip_memory_check=true runs anyway)")
