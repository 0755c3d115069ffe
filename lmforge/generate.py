"""One decoding path for chat, eval and serve: load a trained run (or base + adapter) and stream a reply.

The prompt is rendered with the same chat template as training (render.render_prompt). Decoding is a plain loop
over a KV cache: prefill once, then one token per step, yielding text as it becomes printable.
Must not know about terminals or HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from .checkpoint import RunDir
from .errors import UserError
from .models import load_model, load_tokenizer, pick_dtype, resolve_model
from .render import end_of_turn_ids, render_prompt


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


def load_for_inference(run_dir: str | None = None, model: str | None = None, adapter: str | None = None,
                       dtype: str = "auto"):
    """(model, tokenizer) from a run dir, or from a base model name/path plus an optional PEFT adapter dir."""
    if run_dir:
        run = RunDir(Path(run_dir))
        artifact = run.artifact()
        if artifact == run.adapter:
            base = json.loads((artifact / "adapter_config.json").read_text())["base_model_name_or_path"]
            return _with_adapter(base, artifact, dtype)
        return load_model(str(artifact), pick_dtype(dtype)).eval(), load_tokenizer(str(artifact))
    if not model:
        raise UserError("name a run dir (lmforge chat runs/NAME) or a model (--model NAME [--adapter DIR])")
    if adapter:
        return _with_adapter(model, Path(adapter), dtype)
    path = resolve_model(model)
    return load_model(path, pick_dtype(dtype)).eval(), load_tokenizer(path)


def _with_adapter(base: str, adapter: Path, dtype: str):
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
    path = resolve_model(base)
    model = PeftModel.from_pretrained(load_model(path, pick_dtype(dtype)), str(adapter)).eval()
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(path)
    return model, load_tokenizer(str(tokenizer_dir))


def _next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream_tokens(model, prompt_ids: list[int], stop_ids: list[int], params: SamplingParams) -> Iterator[int]:
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    cache = DynamicCache()
    inputs = torch.tensor([prompt_ids])
    for _ in range(params.max_new_tokens):
        logits = model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = _next_token(logits, params, generator)
        if token in stop_ids:
            return
        yield token
        inputs = torch.tensor([[token]])


def stream_reply(model, tokenizer, messages: list[dict], params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the assistant's reply to `messages` as text pieces."""
    ids: list[int] = []
    shown = ""
    for token in stream_tokens(model, render_prompt(tokenizer, messages), end_of_turn_ids(tokenizer), params):
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        yield text[len(shown):]
        shown = text


def reply(model, tokenizer, messages: list[dict], params: SamplingParams = SamplingParams()) -> str:
    return "".join(stream_reply(model, tokenizer, messages, params))
