"""What a server serves: a run dir, an export/model dir or a base model, plus named LoRA adapters → one engine.

Every served name (the base, the run, each adapter) maps to a ServedModel: its adapter index in the decoder, its
tokenizer (with the chat template it was trained with) and the token ids that end a reply. Must not know about HTTP.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import RunDir, choose_weights
from ..errors import ModelError, UserError
from ..models import load_model, load_tokenizer, resolve_model
from ..render import end_of_turn_ids
from .decoder import Decoder, load_adapter_into
from .engine import Engine

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


def build_engine(target: str | None, model: str | None, adapters: dict[str, str], settings) -> Engine:
    """Load the base once, add every adapter, and return an engine (not started) that knows every served name."""
    if bool(target) == bool(model):
        raise UserError("serve a run or export dir (lmforge serve runs/NAME) or a base model (--model NAME), "
                        "not both and not neither")
    base_name, base_path, run_adapter, run_name = _resolve_target(target, model)
    served_base = settings.served_model_name or base_name
    base = load_model(base_path, torch.float32).eval()  # fp32: bf16 matmuls are far slower on CPU
    base_tokenizer = load_tokenizer(base_path)
    limit = min(base.config.max_position_embeddings, getattr(base.config, "sliding_window", None) or 1 << 30)
    context = settings.context_length or min(limit, DEFAULT_CONTEXT)
    decoder = Decoder(base, slots=settings.max_concurrent, max_len=context,
                      float16=settings.decode_dtype == "float16")
    served = {}
    if run_adapter is None:
        served[served_base] = _served(served_base, 0, base_tokenizer)
    else:  # a LoRA run: its base under the base's name, and the run under the run's (or the configured) name
        served[base_name] = _served(base_name, 0, base_tokenizer)
        adapters = {settings.served_model_name or run_name: str(run_adapter), **adapters}
    for name, directory in adapters.items():
        if name in served:
            raise UserError(f"adapter name {name!r} is already the name of the served model; pick another")
        path = Path(directory)
        load_adapter_into(decoder, base, name, path)
        tokenizer = load_tokenizer(str(path)) if (path / "tokenizer_config.json").is_file() else base_tokenizer
        if len(tokenizer) > decoder.vocab_size:
            raise ModelError(f"adapter {name!r} brings a tokenizer with {len(tokenizer)} tokens, more than the "
                             f"base model's {decoder.vocab_size}: it was trained with added tokens; merge and export "
                             f"it, then serve the export dir")
        served[name] = _served(name, decoder.adapter_index(name), tokenizer)
    threads = settings.threads or max(1, (os.cpu_count() or 2) - 1)
    return Engine(decoder, served, max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                  threads=threads)


def _resolve_target(target: str | None, model: str | None) -> tuple[str, str, Path | None, str | None]:
    """(base served name, base model path, the run's adapter dir or None, the run's name or None)."""
    if model:
        return _display_name(model), resolve_model(model), None, None
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target} does not exist: name a run dir (runs/NAME), an export dir, or use --model NAME")
    if (path / "config.json").is_file():  # an export or any HF model dir
        return path.resolve().name, resolve_model(str(path)), None, None
    if (path / "adapter_config.json").is_file():  # an adapter dir on its own
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _display_name(base), resolve_model(base), path, path.resolve().name
    run = RunDir(path)
    artifact = _run_weights_dir(run)
    if (artifact / "adapter_config.json").is_file():
        base = json.loads((artifact / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _display_name(base), resolve_model(base), artifact, path.resolve().name
    return path.resolve().name, str(artifact), None, None


def _run_weights_dir(run: RunDir) -> Path:
    """The run's weights chat and export would use (the best checkpoint when `lmforge eval --all-checkpoints` named
    one, else the final artifact), as an adapter or model dir; a checkpoint is written out once to a temp dir."""
    from ..generate import load_run_weights

    weights = choose_weights(run)
    print(f"{run.root.name}: using {weights.reason}", file=sys.stderr)
    if not weights.is_checkpoint:
        return weights.path
    model, tokenizer = load_run_weights(weights, "float32")
    out = Path(tempfile.mkdtemp(prefix=f"lmforge-serve-{weights.label}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    model.save_pretrained(out)
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
