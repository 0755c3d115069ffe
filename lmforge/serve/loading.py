"""What a server serves: a run dir, an export/model dir, an adapter dir or a base model, plus named LoRA adapters →
one engine.

Every served name (the base, the run, each adapter) maps to a ServedModel: its adapter index in the decoder, its
tokenizer (with the chat template it was trained with) and the token ids that end a reply. Which decoder runs it:
the lean decoder.Decoder for a base model and LoRA adapters applied per request beside it, and for a served target
of another mergeable method (DoRA, LoHa, LoKr, IA3) merged into the base in memory; model_decoder.ModelDecoder (the
model's own forward) for what cannot be merged (prefix / P-tuning / prompt tuning, bottleneck adapters, adapters on
a quantised base) and for architectures the lean decoder does not run. With `--backend vllm`: vllm_engine.VllmEngine,
for a model dir plus LoRA adapter dirs. Must not know about HTTP.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig

from ..data.render import end_of_turn_ids
from ..errors import ModelError, UserError
from ..generate import load_for_inference, load_run_weights, run_config
from ..model import bottleneck
from ..model.loader import load_model, load_tokenizer, resolve_model
from ..model.method_specs import METHOD_SPECS, PER_REQUEST_LORA
from ..model.methods import save_trained, unwrap
from ..model.virtual_tokens import VirtualTokenModel
from ..rundir import RunDir, RunWeights, choose_weights
from .decoder import (
    SUPPORTED_TYPES,
    Decoder,
    applies_windows,
    fast_decoder_runs,
    holds_in_float16,
    load_adapter_into,
)
from .engine import Engine
from .model_decoder import ModelDecoder
from .vllm_engine import VllmEngine, require_vllm

DEFAULT_CONTEXT = 4096


@dataclass
class ServedModel:
    name: str
    adapter: int  # decoder adapter index, 0 = the base
    tokenizer: object
    chat_stop_ids: frozenset[int]  # end of an assistant turn under the chat template (plus eos)
    text_stop_ids: frozenset[int]  # end of text for /v1/completions (eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


@dataclass
class Target:
    """What `lmforge serve TARGET` (or --model) names, decided before any weights load."""

    base_name: str  # served name of the model the decoder runs: the base, an export, a full / freeze run
    base_path: str | None  # where that model loads from (None: `load` loads it)
    name: str | None = None  # the run's or adapter dir's served name
    lora: Path | None = None  # a LoRA adapter dir, applied per request beside the base
    method: str | None = None  # an adapter of any other method (dora, loha, prefix, …): served alone, by `load`
    load: Callable[[], tuple] | None = None  # → (model, tokenizer) in float32, when base_path is not the weights


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """--adapter NAME=DIR (repeatable) → {name: dir}."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--adapter {value!r}: expected NAME=DIR, e.g. --adapter legal=runs/legal/adapter")
        if name.strip() in adapters:
            raise UserError(f"--adapter: the name {name.strip()!r} is used twice")
        adapters[name.strip()] = path.strip()
    return adapters


def build_engine(target: str | None, model: str | None, adapters: dict[str, str], settings) -> Engine | VllmEngine:
    """Load the served model once, add every adapter, and return an engine (not started) that knows every name."""
    if bool(target) == bool(model):
        raise UserError("serve a run or export dir (lmforge serve runs/NAME) or a base model (--model NAME), "
                        "not both and not neither")
    for name, directory in adapters.items():  # before minutes of loading
        _check_shareable(name, Path(directory))
    served_target = _resolve_target(target, model)
    if served_target.method and adapters:
        raise UserError(f"--adapter {', '.join(adapters)}: {served_target.name} ({served_target.method}) is served "
                        f"as a model of its own, not as the base plus per-request LoRA adapters, so no adapter can "
                        f"be served beside it; serve the adapters from another `lmforge serve`")
    if settings.backend == "vllm":
        return _vllm_engine(served_target, adapters, settings)
    served_target = _outside_fast_decoder(served_target, adapters)
    if served_target.load is None:
        path = served_target.base_path
        loaded, tokenizer = load_model(path, torch.float32).eval(), load_tokenizer(path)  # fp32: bf16 is slow on CPU
    else:
        loaded, tokenizer = served_target.load()
    if served_target.method:
        name = settings.served_model_name or served_target.name
        decoder = _adapted_decoder(loaded, name, served_target, settings)
        served = {name: _served(name, 0, tokenizer)}
    else:
        decoder = _decoder_for(loaded, settings)

        def add_lora(name: str, path: Path) -> int:
            load_adapter_into(decoder, loaded, name, path)
            return decoder.adapter_index(name)

        served = _base_and_loras(add_lora, decoder.vocab_size, tokenizer, served_target, adapters, settings)
        if settings.decode_dtype == "bfloat16" and len(served) > 1:  # open issue, benchmarks/RESULTS.md
            print("note: --decode-dtype bfloat16 with per-request LoRA adapters: a repeated prompt (its prefix reused "
                  "from the cache) can get a reply that differs by a token from a fresh one (seen in tests); the "
                  "default (float16 here) has not shown it", file=sys.stderr)
    threads = settings.threads or max(1, (os.cpu_count() or 2) - 1)
    return Engine(decoder, served, max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                  threads=threads)


def _base_and_loras(add_lora: Callable[[str, Path], int], vocab_size: int, base_tokenizer, target: Target,
                    adapters: dict[str, str], settings) -> dict[str, ServedModel]:
    """The base under its name (or the configured one), and each LoRA adapter (a LoRA run first) under its own,
    added to the engine by `add_lora` (→ its adapter index)."""
    served = {}
    if target.lora is None:
        served_base = settings.served_model_name or target.base_name
        served[served_base] = _served(served_base, 0, base_tokenizer)
    else:  # a LoRA run: its base under the base's name, and the run under the run's (or the configured) name
        served[target.base_name] = _served(target.base_name, 0, base_tokenizer)
        adapters = {settings.served_model_name or target.name: str(target.lora), **adapters}
    for name, directory in adapters.items():
        if name in served:
            raise UserError(f"adapter name {name!r} is already the name of the served model; pick another")
        path = Path(directory)
        index = add_lora(name, path)
        tokenizer = load_tokenizer(str(path)) if (path / "tokenizer_config.json").is_file() else base_tokenizer
        if len(tokenizer) > vocab_size:
            raise ModelError(f"adapter {name!r} brings a tokenizer with {len(tokenizer)} tokens, more than the "
                             f"base model's {vocab_size}: it was trained with added tokens; merge and export "
                             f"it, then serve the export dir")
        served[name] = _served(name, index, tokenizer)
    return served


def _vllm_engine(target: Target, adapters: dict[str, str], settings) -> VllmEngine:
    """vLLM serves a model dir (a base, an export, a full / freeze run's model/) plus LoRA adapter dirs."""
    if target.method or target.base_path is None:
        what = f"a {target.method} run" if target.method else "a full-model checkpoint"
        raise UserError(f"--backend vllm serves a model dir plus LoRA adapters; {target.name or target.base_name} "
                        f"is {what}: merge it with `lmforge export {target.name or target.base_name} -o OUT` and "
                        f"serve OUT, or drop --backend vllm")
    require_vllm()
    tokenizer = load_tokenizer(target.base_path)
    config = AutoConfig.from_pretrained(target.base_path)
    lora_dirs: dict[int, tuple[str, str]] = {}

    def add_lora(name: str, path: Path) -> int:
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"adapter {name!r}: {path} is not a PEFT adapter dir (no adapter_config.json)")
        lora_dirs[len(lora_dirs) + 1] = (name, str(path.resolve()))
        return len(lora_dirs)

    served = _base_and_loras(add_lora, config.vocab_size, tokenizer, target, adapters, settings)
    return VllmEngine(target.base_path, served, lora_dirs, max_len=_context_length(config, settings, own_forward=True),
                      slots=settings.max_concurrent, max_queue=settings.max_queue, engine_args=settings.vllm_args)


def _adapted_decoder(model, name: str, target: Target, settings):
    """A target of a method other than LoRA, loaded whole: merged into the base weights for the lean decoder when
    peft can merge it, else run through the model's own forward. One note line on stderr says which."""
    from peft import PeftModel

    quantized = bool(getattr(unwrap(model), "lmforge_quantization", None))
    alone = f"the plain base {target.base_name} is not served beside it"
    if isinstance(model, PeftModel) and not quantized:
        try:
            merged = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as error:
            raise ModelError(f"{name} ({target.method}) cannot be merged into the base for serving: {error}. "
                             f"Talk to it with `lmforge chat`") from None
        print(f"note: {name} ({target.method}) is merged into the base weights in memory; {alone}", file=sys.stderr)
        return _decoder_for(merged, settings)
    method = f"{target.method} on a quantised base" if quantized else target.method
    print(f"note: {name} ({method}) is served through the model's own forward (slower, no cross-request batching); "
          f"{alone}", file=sys.stderr)
    return ModelDecoder(model, slots=settings.max_concurrent, max_len=_context_length(model, settings,
                                                                                      own_forward=True))


def _outside_fast_decoder(target: Target, adapters: dict[str, str]) -> Target:
    """An architecture the lean decoder does not run (Gemma 2, Phi, …) is served through its own forward, which cannot
    apply adapters per request: a LoRA run is then merged and served alone, and extra --adapters are refused."""
    if target.base_path is None or not (Path(target.base_path) / "config.json").is_file():
        return target  # a checkpoint (loaded whole) or a hub id: _decoder_for decides once the model is loaded
    config = AutoConfig.from_pretrained(target.base_path)
    if fast_decoder_runs(config):
        return target
    model_type = config.model_type
    if adapters:
        raise UserError(f"--adapter {', '.join(adapters)}: per-request LoRA adapters need lmforge's fast decoder, "
                        f"which runs {', '.join(SUPPORTED_TYPES)} models; {target.base_name} is {model_type!r}. "
                        f"Serve each adapter on its own (lmforge serve DIR), or use --backend vllm on a GPU machine")
    if target.lora is None:
        return target
    return Target(target.base_name, target.base_path, target.name, method="LoRA",
                  load=partial(load_for_inference, model=target.base_path, adapter=str(target.lora), dtype="float32"))


def _decoder_for(model, settings) -> Decoder | ModelDecoder:
    """The decoder for a whole model (a base, or a target merged into it): the lean Decoder for the architectures it
    runs, else the model's own forward."""
    if not fast_decoder_runs(model.config):
        print(f"note: lmforge's fast decoder runs {', '.join(SUPPORTED_TYPES)} models; this {model.config.model_type} "
              f"model is served through its own forward (slower, no cross-request batching)", file=sys.stderr)
        return ModelDecoder(model, slots=settings.max_concurrent,
                            max_len=_context_length(model, settings, own_forward=True))
    return Decoder(model, slots=settings.max_concurrent,
                   max_len=_context_length(model, settings, own_forward=applies_windows(model.config)),
                   weights=settings.decode_dtype if settings.decode_dtype != "auto" else
                   "float16" if holds_in_float16(model) else "float32")


def _context_length(model, settings, own_forward: bool = False) -> int:
    """The configured context length, else the model's limit (less any virtual tokens) up to DEFAULT_CONTEXT.
    `model` is a model, or just its config. Where the engine does not apply the model's sliding window itself, the
    context stops at the window; `own_forward`: it does (the model's own forward, vLLM, Decoder on per-layer
    windows)."""
    config = getattr(model, "config", model)
    window = None if own_forward else getattr(config, "sliding_window", None)
    limit = min(config.max_position_embeddings, window or 1 << 30)
    if isinstance(model, VirtualTokenModel):
        limit -= model.virtual
    return settings.context_length or min(limit, DEFAULT_CONTEXT)


def _resolve_target(target: str | None, model: str | None) -> Target:
    if model:
        return Target(_display_name(model), resolve_model(model))
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target} does not exist: name a run dir (runs/NAME), an export dir, or use --model NAME")
    if (path / "config.json").is_file():  # an export or any HF model dir
        return Target(path.resolve().name, resolve_model(str(path)))
    name = path.resolve().name
    if (path / "adapter_config.json").is_file():  # an adapter dir on its own
        return _adapter_target(path, name)
    run = RunDir(path)
    weights = choose_weights(run)
    print(f"{run.root.name}: using {weights.reason}", file=sys.stderr)
    if not weights.is_checkpoint and not (weights.path / "adapter_config.json").is_file():
        return Target(name, str(weights.path))  # a full / freeze run's model/
    config = run_config(run)
    method = config.method
    label = "dora" if method.dora else method.type
    if not weights.is_checkpoint:
        return _adapter_target(weights.path, name, label)
    if METHOD_SPECS[label].serve == PER_REQUEST_LORA:  # per-request LoRA rows need an adapter dir
        return _adapter_target(_written_out(weights), name, label)
    load = partial(load_run_weights, weights, "float32")
    if not method.peft:  # a full / freeze checkpoint: a whole model, served as the base
        return Target(name, None, load=load)
    base = config.model.name_or_path
    return Target(_display_name(base), resolve_model(base), name, method=label, load=load)


def _adapter_target(directory: Path, name: str, method: str | None = None) -> Target:
    """A LoRA adapter dir → rows beside the base; any other method's (`method` names it; default: from the dir's
    adapter_config.json) → loaded whole on its base."""
    config = json.loads((directory / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{directory}/adapter_config.json names no base model: add the base model's name or path "
                        f"to it as base_model_name_or_path")
    if _per_request_lora(config):
        return Target(_display_name(base), resolve_model(base), name, lora=directory)
    return Target(_display_name(base), resolve_model(base), name, method=method or _method_label(config),
                  load=partial(load_for_inference, model=base, adapter=str(directory), dtype="float32"))


def _check_shareable(name: str, directory: Path) -> None:
    """An --adapter beside other served names must be a LoRA the decoder applies per request; refuse any other
    method with what to do instead (load_adapter_into reports a dir that is no adapter at all)."""
    path = directory / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if _per_request_lora(config):
        return
    merge = "" if _unmergeable(config) else f", or merge it into its base with `lmforge export {directory} -o OUT` " \
                                             f"and serve OUT"
    raise ModelError(f"adapter {name!r} ({directory}) is a {_method_label(config)} adapter, which cannot share the "
                     f"base with other served names (only LoRA adapters can): serve it on its own with "
                     f"`lmforge serve {directory}`{merge}")


def _per_request_lora(config: dict) -> bool:
    """LoRA the decoder applies as rows beside the base (DoRA and whole trained modules need a merge)."""
    return config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("modules_to_save")


def _unmergeable(config: dict) -> bool:
    """Virtual tokens and bottleneck adapters are not a change to existing weights."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kind = config.get("peft_type")
    return kind == bottleneck.PEFT_TYPE or issubclass(PEFT_TYPE_TO_CONFIG_MAPPING.get(kind, object),
                                                      PromptLearningConfig)


def _method_label(config: dict) -> str:
    if config.get("peft_type") == bottleneck.PEFT_TYPE:
        return "bottleneck adapter"
    return "DoRA" if config.get("use_dora") else str(config.get("peft_type", "?"))


def _written_out(weights: RunWeights) -> Path:
    """A LoRA checkpoint as an adapter dir (converted to a plain LoRA on the original base, as the final adapter
    is), written once to a temp dir removed at exit."""
    model, tokenizer = load_run_weights(weights, "float32")
    out = Path(tempfile.mkdtemp(prefix=f"lmforge-serve-{weights.label}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    save_trained(model, out)
    tokenizer.save_pretrained(out)
    return out


def _display_name(model: str) -> str:
    """A builtin alias or hub id stays as written; a local path shows as its directory name."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def _served(name: str, adapter: int, tokenizer) -> ServedModel:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    chat_stop = set(end_of_turn_ids(tokenizer)) if tokenizer.chat_template else set()
    return ServedModel(name, adapter, tokenizer, frozenset(chat_stop | eos), frozenset(eos))
