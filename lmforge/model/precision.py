"""Which precision computes, chosen from what this CPU does: bf16 autocast for training where bf16 GEMM is fast, the
decoder's weight format for serving, fp32 everywhere else.

A CPU with AVX512_BF16 or AMX-BF16 multiplies bf16 matrices several times faster than fp32 ones (this machine's
figures: benchmarks/RESULTS.md); a CPU without them emulates bf16 and is far slower than fp32. So the flags in
/proc/cpuinfo say whether bf16 can pay, and a short matmul probe at the model's own shapes (cached per process)
confirms it before a run relies on it. Training under bf16 autocast keeps trainable parameters, gradients and optimizer
state in fp32, as mixed precision does on GPUs; only the matmuls' inputs are rounded to bf16. The frozen weight
matrices are rounded once, when training starts (`keep_frozen_weights`), instead of at every use: autocast's cast
cache keeps only tensors that require grad, so it re-cast every frozen fp32 weight in every forward and backward.

Every choice is a pure function of a CpuCapability and a GemmProbe, so both kinds of CPU are tested on any machine by
passing them in. Must not know about training loops, runs or serving engines; it decides, explains, and puts a bf16
choice into a model (rounded frozen weights, activations handed to the matmuls in bf16).
"""

from __future__ import annotations

import functools
import sys
import time
import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much at the model's shapes to be worth its rounding
MIN_HIDDEN = 256  # below this width a step is per-op overhead, not GEMM: bf16 only rounds, it cannot pay
PRECISION_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                   "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU says it can do: its model name and the instruction-set flags that matter for precision."""

    model: str
    flags: frozenset[str]

    @property
    def bf16_instructions(self) -> list[str]:
        return [flag for flag in BF16_FLAGS if flag in self.flags]

    def describe(self) -> str:
        shown = [flag for flag in REPORTED_FLAGS if flag in self.flags]
        return f"{self.model} ({', '.join(shown) or 'none of ' + ', '.join(REPORTED_FLAGS)})"


@functools.cache
def cpu_capability(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuCapability:
    """This machine's CPU, read once per process (no /proc/cpuinfo, e.g. macOS: no flags, fp32 everywhere)."""
    model, flags = "unknown CPU", frozenset()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return CpuCapability(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuCapability(model, flags)


@dataclass(frozen=True)
class GemmProbe:
    """GFLOP/s of one matmul shape (tokens × in → out) in fp32 and bf16, measured in this process."""

    shape: tuple[int, int, int]
    fp32_gflops: float
    bf16_gflops: float

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops else 0.0


def gemm_gflops(tokens: int, inputs: int, outputs: int, dtype: torch.dtype, seconds: float = 0.1) -> float:
    """GFLOP/s of F.linear([tokens, inputs] · [outputs, inputs]ᵀ) in `dtype` over ~`seconds` after one warm-up call
    (the best of the repeats: on a shared machine the fastest run is the one least disturbed)."""
    x = torch.randn(tokens, inputs).to(dtype)
    w = torch.randn(outputs, inputs).to(dtype)
    torch.nn.functional.linear(x, w)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        now = time.perf_counter()
        best = min(best, now - start)
        if now >= deadline:
            break
    return 2 * tokens * inputs * outputs / best / 1e9


@functools.cache
def probe_gemm(hidden: int, intermediate: int, tokens: int = 256, threads: int | None = None) -> GemmProbe:
    """fp32 vs bf16 at the model's MLP shape (tokens × hidden → intermediate), ~0.2 s; cached per shape and thread
    count, so a process probes once."""
    del threads  # part of the cache key only: torch's thread count changes the answer
    return GemmProbe((tokens, hidden, intermediate), gemm_gflops(tokens, hidden, intermediate, torch.float32),
                     gemm_gflops(tokens, hidden, intermediate, torch.bfloat16))


@dataclass(frozen=True)
class Precision:
    """How a training forward computes: `autocast` None = in the weights' dtype (`load_dtype`); else the matmuls
    run in that dtype while parameters stay in `load_dtype`. `reason` is the sentence printed on stderr."""

    load_dtype: torch.dtype
    autocast: torch.dtype | None
    reason: str
    device_type: str = "cpu"  # where autocast applies: "cpu" or "cuda"
    frozen_dtype: torch.dtype | None = None  # frozen weight matrices kept in this dtype in training (None: as loaded)

    @property
    def needs_grad_scaler(self) -> bool:
        """float16 autocast underflows small gradients unless the loss is scaled (torch.amp.GradScaler)."""
        return self.autocast == torch.float16

    @property
    def name(self) -> str:
        if self.autocast is not None:
            return f"{_short(self.autocast)} autocast ({_short(self.load_dtype)} parameters)"
        return _short(self.load_dtype)

    def context(self) -> Callable[[], AbstractContextManager]:
        """A factory of the context each forward runs under."""
        if self.autocast is None:
            return nullcontext
        return functools.partial(torch.autocast, self.device_type, dtype=self.autocast)


def normalize(requested: str | None) -> str:
    name = "auto" if requested is None else str(requested).strip().lower()
    if name not in PRECISION_NAMES:
        raise UserError(f"unknown dtype {requested!r}; valid values: {', '.join(PRECISION_NAMES)}")
    return PRECISION_NAMES[name]


def choose_cpu_training(requested: str | None, capability: CpuCapability, hidden: int | None,
                        probe: Callable[[], GemmProbe]) -> Precision:
    """The training precision on a CPU. bf16 autocast when the CPU has native bf16 (flags) and the probe at the
    model's shapes shows it ≥ MIN_SPEEDUP × fp32 — for `auto` and for an explicit bfloat16 (LLaMA-Factory's
    `bf16: true`) alike; fp32 otherwise, saying why. `probe` runs only when the flags allow bf16."""
    name = normalize(requested)
    fp32 = torch.float32
    if name == "float32":
        return Precision(fp32, None, "float32 as requested")
    if name == "float16":
        return Precision(fp32, None, "float16 requested, but CPUs have no fast float16 training path in torch: "
                                     "training in float32")
    asked = "bf16 requested" if name == "bfloat16" else "dtype auto"
    instructions = capability.bf16_instructions
    if not instructions:
        why = f"{capability.model} has no native bf16 (no {' / '.join(BF16_FLAGS)} in /proc/cpuinfo)"
        return Precision(fp32, None, f"{asked}: float32, because {why}: bf16 would be emulated, slower than fp32")
    if name == "auto" and hidden is not None and hidden < MIN_HIDDEN:
        return Precision(fp32, None, f"dtype auto: float32, because the model is small (hidden size {hidden} < "
                                     f"{MIN_HIDDEN}): its steps are per-op overhead, bf16 would only round")
    measured = probe()
    figures = (f"bf16 {measured.bf16_gflops:.0f} vs fp32 {measured.fp32_gflops:.0f} GFLOP/s at "
               f"{'×'.join(map(str, measured.shape))}")
    if measured.speedup < MIN_SPEEDUP:
        return Precision(fp32, None, f"{asked}: float32, because bf16 matmul is not fast enough here ({figures}, "
                                     f"{measured.speedup:.1f}× < {MIN_SPEEDUP}×) although the CPU has "
                                     f"{' and '.join(instructions)}")
    return Precision(fp32, torch.bfloat16, f"{asked}: bf16 autocast, frozen weights in bf16, trainable parameters "
                                           f"and optimizer state in float32, because {capability.model} has "
                                           f"{' and '.join(instructions)} ({figures}, {measured.speedup:.1f}× fp32)",
                     frozen_dtype=torch.bfloat16)


def choose_gpu_training(requested: str | None, bf16_supported: bool) -> Precision:
    """On a GPU the weights themselves are loaded in half precision (bf16 where the GPU has it)."""
    name = normalize(requested)
    if name == "auto":
        name = "bfloat16" if bf16_supported else "float32"
    if name == "bfloat16" and not bf16_supported:
        return Precision(torch.float32, None, "bf16 requested but this GPU has no bf16 support: float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float32:
        return Precision(dtype, None, "float32 on the GPU", "cuda")
    # Frozen weights in half precision; what trains (peft keeps adapter weights in float32) computes under autocast,
    # and float16 scales the loss so small gradients survive (a GradScaler in the loop).
    scaled = " with a gradient scaler" if dtype == torch.float16 else ""
    return Precision(dtype, dtype, f"{_short(dtype)} weights and autocast on the GPU{scaled}", "cuda")


def training_precision(requested: str | None, model_config=None, announce: bool = True) -> Precision:
    """This machine's choice for a run (`model_config`: the model's config, for the probe's shapes); one line on
    stderr says what was chosen and why."""
    if torch.cuda.is_available():
        chosen = choose_gpu_training(requested, torch.cuda.is_bf16_supported())
    else:
        hidden = getattr(model_config, "hidden_size", None)
        intermediate = getattr(model_config, "intermediate_size", None) or 4 * (hidden or 576)

        def probe() -> GemmProbe:
            return probe_gemm(hidden or 576, intermediate, threads=torch.get_num_threads())

        chosen = choose_cpu_training(requested, cpu_capability(), hidden, probe)
    if announce:
        print(f"precision: {chosen.reason}", file=sys.stderr)
    return chosen


def keep_frozen_weights(model: torch.nn.Module, dtype: torch.dtype, activations: bool = True) -> tuple[int, int]:
    """Round the frozen float32 weight matrices (ndim ≥ 2: linear layers, embeddings, a tied LM head) to `dtype` in
    place, once, so autocast uses them as they are instead of casting each at every use. Trainable parameters, norms,
    biases and buffers (RoPE frequencies) keep their dtype. An embedding whose table was rounded hands float32 to the
    layers after it (a forward hook), so the residual stream stays float32 as under plain autocast. With
    `activations`, also `half_activations(model)`. Returns (tensors rounded, bytes saved). Only for training: a model
    saved whole afterwards would carry the rounded weights."""
    rounded: set[int] = set()
    saved = 0
    for parameter in model.parameters():  # each shared (tied) Parameter once
        if parameter.requires_grad or parameter.dim() < 2 or parameter.dtype != torch.float32:
            continue
        parameter.data = parameter.data.to(dtype)
        rounded.add(id(parameter))
        saved += parameter.numel() * (4 - parameter.element_size())
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) in rounded:
            module.register_forward_hook(_float32_output)
    if activations and rounded:
        half_activations(model)
    return len(rounded), saved


def half_activations(model: torch.nn.Module) -> int:
    """Under autocast, hand the matmuls their input already in the autocast dtype, rounded once where it is made
    instead of once per consumer: an RMSNorm's output (read by q, k, v or gate, up — autocast would round it for each,
    and each rounding's backward adds a float32 gradient), the rotary cos / sin tables (float32 tables turn the bf16
    q and k into float32 that attention rounds back), and PEFT's cast of a layer's input to its float32 LoRA weights
    (which autocast then rounds back to bf16). Llama-style RMSNorms (weight · x / rms(x)) compute through torch's
    fused `rms_norm`, in float32 as before, in fewer passes. The values reaching the matmuls are the same as
    autocast's; the gradients of a norm's consumers are summed in bf16 before their one conversion. Outside autocast
    nothing changes.
    Returns how many modules changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") or name.endswith("RotaryEmbedding"):
            module.register_forward_hook(_autocast_dtype_output)
            if name in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon"):
                module.forward = types.MethodType(_fused_rms_norm, module)
            count += 1
        elif isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # peft's switch (tuners_utils._cast_input_dtype)
            count += 1
    return count


LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight · x / rms(x)


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def _float32_output(module, inputs, output):
    return output.float() if output.is_floating_point() else output


def _autocast_dtype_output(module, inputs, output):
    device = "cpu"
    if not torch.is_autocast_enabled(device):
        return output
    dtype = torch.get_autocast_dtype(device)
    if isinstance(output, tuple):
        return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in output)
    return output.to(dtype) if output.dtype == torch.float32 else output


def load_dtype(requested: str | None) -> torch.dtype:
    """The dtype weights are loaded in: half precision on a GPU that has it, else float32 (autocast, when chosen,
    computes in bf16 from float32 weights)."""
    if torch.cuda.is_available():
        return choose_gpu_training(requested, torch.cuda.is_bf16_supported()).load_dtype
    normalize(requested)  # a bad name is an error on every machine
    return torch.float32


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "float16"}.get(dtype, str(dtype))
