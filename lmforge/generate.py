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
def generate_tokens(model, prompts: list[list[int]], stop_ids: list[int], params: SamplingParams
                    ) -> Iterator[list[int | None]]:
    """Decode a batch of prompts together (left-padded, one KV cache); yield each step's new token per prompt,
    None for prompts that have already stopped. Ends when all have stopped or max_new_tokens is reached."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    longest = max(len(p) for p in prompts)
    pad = stop_ids[0] if stop_ids else 0
    inputs = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    running = [True] * len(prompts)
    for _ in range(params.max_new_tokens):
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        step: list[int | None] = []
        for i, row in enumerate(logits):
            token = _next_token(row, params, generator) if running[i] else None
            if token is not None and token in stop_ids:
                running[i], token = False, None
            step.append(token)
        if not any(running):
            return
        yield step
        inputs = torch.tensor([[t if t is not None else pad] for t in step])
        mask = torch.cat([mask, torch.tensor([[int(r)] for r in running])], dim=1)
        positions = positions[:, -1:] + 1


def stream_reply(model, tokenizer, messages: list[dict], params: SamplingParams = SamplingParams()) -> Iterator[str]:
    """Yield the assistant's reply to `messages` as text pieces."""
    ids: list[int] = []
    shown = ""
    prompt = render_prompt(tokenizer, messages)
    for (token,) in generate_tokens(model, [prompt], end_of_turn_ids(tokenizer), params):
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        yield text[len(shown):]
        shown = text


def reply(model, tokenizer, messages: list[dict], params: SamplingParams = SamplingParams()) -> str:
    return "".join(stream_reply(model, tokenizer, messages, params))


def replies(model, tokenizer, conversations: list[list[dict]], params: SamplingParams = SamplingParams(),
            batch_size: int = 16) -> list[str]:
    """Replies to many conversations, decoded `batch_size` at a time with the same decoding as reply()."""
    stop_ids = end_of_turn_ids(tokenizer)
    out: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        generated: list[list[int]] = [[] for _ in chunk]
        prompts = [render_prompt(tokenizer, messages) for messages in chunk]
        for step in generate_tokens(model, prompts, stop_ids, params):
            for ids, token in zip(generated, step):
                if token is not None:
                    ids.append(token)
        out += [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return out
