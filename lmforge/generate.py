"""One decoding path for chat, eval, compare and the checkpoint sweep: load a trained run (or base + adapter) and
generate replies.

Loading a run takes the weights checkpoint.choose_weights picks (the best checkpoint named by best.json, else the
final adapter/ or model/) and says which on stderr; a checkpoint is the base model + the run's method + its trainable
tensors. The prompt is rendered with the same chat template as training (render.render_prompt). Decoding runs on
serve's fast batched decoder (model/lean_decoder.py: every prompt prefilled in one pass, then one step for all rows,
float32 weights, so greedy replies equal the model's own forward) wherever it runs the model — Llama-family and
Gemma 3, plain or with a LoRA adapter — and otherwise through the model's own forward over a KV cache (other
architectures, other methods, a quantised base). Must not know about terminals or HTTP.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from .config import Config, load_config
from .data.render import end_of_turn_ids, ensure_chat_template, render_prompt
from .errors import ModelError, UserError
from .model.lean_decoder import Decoder, applies_windows, fast_decoder_runs
from .model.loader import load_model, load_tokenizer, pick_dtype, resolve_model
from .model.methods import apply_method, load_base, load_saved_adapter, unwrap
from .rundir import TRAINABLE_FILE, RunDir, RunWeights, choose_weights


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


def load_for_inference(run_dir: str | None = None, model: str | None = None, adapter: str | None = None,
                       dtype: str = "auto", checkpoint: str | None = None, announce: bool = True):
    """(model, tokenizer) from a run dir, or from a base model name/path plus an optional PEFT adapter dir.

    For a run dir, `checkpoint` picks the weights (None: best.json's choice, else the final; "final", "best",
    "step-N"); with `announce` one line on stderr says which, e.g. "using best checkpoint step-40 (rouge-l 41.2)"."""
    if run_dir:
        weights = choose_weights(RunDir(Path(run_dir)), checkpoint)
        if announce:
            print(f"using {weights.reason} of {run_dir}", file=sys.stderr)
        return load_run_weights(weights, dtype)
    if checkpoint:
        raise UserError(f"a checkpoint ({checkpoint}) belongs to a run: name the run dir instead of --model")
    if not model:
        raise UserError("name a run dir (lmforge chat runs/NAME) or a model (--model NAME [--adapter DIR])")
    if adapter:
        return _with_adapter(model, Path(adapter), dtype)
    path = resolve_model(model)
    return load_model(path, pick_dtype(dtype)).eval(), load_tokenizer(path)


def load_run_weights(weights: RunWeights, dtype: str = "auto"):
    """(model, tokenizer) for one set of weights of a run: its final artifact or one of its checkpoints."""
    if weights.is_checkpoint:
        model, tokenizer = load_run_base(weights.run, dtype)
        if run_config(weights.run).train.stage == "rm":  # its checkpoints hold the value head too (unused here)
            from .model.value_head import attach_value_head

            attach_value_head(model)
        load_trainable(model, weights.path)
        return model, tokenizer
    artifact = weights.path
    if artifact == weights.run.adapter:
        base = json.loads((artifact / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _with_adapter(base, artifact, dtype)
    return load_model(str(artifact), pick_dtype(dtype)).eval(), load_tokenizer(str(artifact))


def run_config(run: RunDir) -> Config:
    """The resolved config.yaml a run was trained with."""
    if not run.config.is_file():
        raise UserError(f"{run.root} is not a run dir: it has no config.yaml (written by `lmforge train`)")
    return load_config(run.config)


def load_run_base(run: RunDir, dtype: str = "auto"):
    """The run's base model with the run's method applied (its trainable tensors still untrained), in eval mode,
    and the tokenizer with the chat template training used. load_trainable() then puts a checkpoint's weights in."""
    config = run_config(run)
    path = resolve_model(config.model.name_or_path)
    tokenizer = load_tokenizer(path)
    ensure_chat_template(tokenizer, config.model.template)
    model = apply_method(load_base(path, pick_dtype(dtype), config.method), config.method)
    return for_decoding(model.eval()), tokenizer


def for_decoding(model):
    """A prefix / P-tuning / prompt-tuning PEFT model decodes through VirtualTokenModel (see virtual_tokens.py);
    any other model as it is."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        from .model.virtual_tokens import VirtualTokenModel

        return VirtualTokenModel(model)
    return model


def load_trainable(model, checkpoint: Path) -> None:
    """Put a checkpoint's trainable tensors (checkpoints/step-N/trainable.safetensors) into a model from
    load_run_base(); every trainable tensor must be there, with its shape."""
    from .model.virtual_tokens import VirtualTokenModel

    if isinstance(model, VirtualTokenModel):  # the tensors are named as in the PEFT model it wraps
        model = model.peft_model
    weights = load_file(str(checkpoint / TRAINABLE_FILE))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ModelError(f"checkpoint {checkpoint} does not match its run's config.yaml: it holds {len(weights)} "
                         f"trainable tensors, the method there gives {len(expected)} (was config.yaml edited?)")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise ModelError(f"checkpoint {checkpoint} does not fit its run's model: {error}") from None
    _DECODERS.pop(model, None)  # the fast decoder copied the previous weights
    _OWN_FORWARD.discard(model)


def _with_adapter(base: str, adapter: Path, dtype: str):
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
    path = resolve_model(base)
    model = load_saved_adapter(load_model(path, pick_dtype(dtype)), adapter).eval()  # any method's adapter dir
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(path)
    return model, load_tokenizer(str(tokenizer_dir))


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from a row of logits: greedy at temperature 0, else softmax(logits / temperature) restricted to
    the smallest set of tokens whose probability reaches top_p. Shared by every decoding loop (chat, eval, serve)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    return sample_token(logits, params.temperature, params.top_p, generator)


def generate_tokens(model, prompts: list[list[int]], stop_ids: list[int], params: SamplingParams
                    ) -> Iterator[list[int | None]]:
    """Decode a batch of prompts together; yield each step's new token per prompt, None for prompts that have
    already stopped. Ends when all have stopped or max_new_tokens is reached. On the fast decoder where it runs the
    model, else through the model's own forward."""
    found = lean_decoder(model, len(prompts), max(len(p) for p in prompts) + params.max_new_tokens)
    if found is not None:
        return _lean_tokens(*found, prompts, stop_ids, params)
    return model_forward_tokens(model, prompts, stop_ids, params)


# ------------------------------------------------------------------------------------------ the fast decoder

_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (Decoder, adapter index)
_OWN_FORWARD: weakref.WeakSet = weakref.WeakSet()  # models found not to run on it (their adapter's modules)
CONTEXT_STEP = 1024  # the decoder's KV cache is sized in steps of this many tokens (pages are touched only as used)


def lean_decoder(model, slots: int, max_len: int) -> tuple[Decoder, int] | None:
    """The fast decoder holding `model`'s weights with room for `slots` sequences of `max_len` tokens, and the
    adapter index its rows use (0: none); None where it does not compute what the model computes, which then decodes
    through its own forward. Built once per model and reused (load_trainable drops it when the weights change)."""
    cached = _DECODERS.get(model) if _weakrefable(model) else None
    if cached is not None and cached[0].slots >= slots and cached[0].max_len >= max_len:
        return cached
    if (_weakrefable(model) and model in _OWN_FORWARD) or not runs_on_lean_decoder(model):
        return None
    config = unwrap(model).config
    limit = config.max_position_embeddings
    if not applies_windows(config) and getattr(config, "use_sliding_window", True):
        limit = min(limit, getattr(config, "sliding_window", None) or limit)
    if max_len > limit:
        return None  # beyond the model's context: the model's own forward says what it does there
    capacity = min(limit, -(-max_len // CONTEXT_STEP) * CONTEXT_STEP)
    slots = max(slots, cached[0].slots if cached else 0)
    _DECODERS.pop(model, None)  # free the smaller one first
    decoder = Decoder(model, slots=slots, max_len=capacity)
    adapter = 0
    if hasattr(model, "peft_config"):
        try:
            decoder.add_lora("run", model, model.active_adapter)
        except ModelError:  # LoRA on modules the decoder does not adapt (lm_head, embeddings, modules_to_save)
            _OWN_FORWARD.add(model)
            return None
        adapter = 1
    _DECODERS[model] = (decoder, adapter)
    return decoder, adapter


def runs_on_lean_decoder(model) -> bool:
    """A Llama-family / Gemma 3 model, plain or with a LoRA adapter (not DoRA), whose decoder projections are plain
    float linear layers (not quantised, no bottleneck adapters or other methods' layers)."""
    from peft.tuners.lora import LoraLayer

    base = unwrap(model)
    config = getattr(base, "config", None)
    if not isinstance(base, torch.nn.Module) or config is None or not fast_decoder_runs(config):
        return False
    if getattr(base, "lmforge_quantization", None) or base.dtype != torch.float32:
        return False
    if hasattr(model, "peft_config"):
        config = model.active_peft_config
        if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA" or getattr(config, "use_dora", False):
            return False
    elif not hasattr(base, "model"):
        return False
    inner = base.model
    for layer in getattr(inner, "layers", []):
        for module in (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                       *(getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))):
            plain = module.base_layer if isinstance(module, LoraLayer) else module
            if type(plain) is not torch.nn.Linear:
                return False
    return True


def _weakrefable(model) -> bool:
    try:
        weakref.ref(model)
        return True
    except TypeError:
        return False


@torch.inference_mode()
def _lean_tokens(decoder: Decoder, adapter: int, prompts: list[list[int]], stop_ids: list[int],
                 params: SamplingParams) -> Iterator[list[int | None]]:
    """generate_tokens on the fast decoder: all prompts prefilled in one pass (no padding), then one decode step for
    the rows still running; tokens are sampled row by row in prompt order, as the model-forward loop does."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    count = len(prompts)
    slots = list(range(count))
    logits = decoder.prefill_many(slots, prompts, [0] * count, [adapter] * count)
    running = [True] * count
    lengths = [len(p) for p in prompts]
    for _ in range(params.max_new_tokens):
        rows = dict(zip([s for s in slots if running[s]], logits))
        step: list[int | None] = []
        for i in range(count):
            token = _next_token(rows[i], params, generator) if running[i] else None
            if token is not None and token in stop_ids:
                running[i], token = False, None
            step.append(token)
        if not any(running):
            return
        yield step
        active = [i for i in slots if running[i]]
        logits = decoder.decode(active, [step[i] for i in active], [lengths[i] for i in active],
                                [adapter] * len(active))
        for i in active:
            lengths[i] += 1


# ------------------------------------------------------------------------------------------ the model's own forward


@torch.inference_mode()
def model_forward_tokens(model, prompts: list[list[int]], stop_ids: list[int], params: SamplingParams
                         ) -> Iterator[list[int | None]]:
    """generate_tokens through the model's own forward: prompts left-padded, one KV cache for the batch."""
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


def stream_reply(model, tokenizer, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
    """Yield the assistant's reply to `messages` as text pieces."""
    params = params or SamplingParams()
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


def reply(model, tokenizer, messages: list[dict], params: SamplingParams | None = None) -> str:
    return "".join(stream_reply(model, tokenizer, messages, params))


def replies(model, tokenizer, conversations: list[list[dict]], params: SamplingParams | None = None,
            batch_size: int = 16) -> list[str]:
    """Replies to many conversations, decoded `batch_size` at a time with the same decoding as reply()."""
    params = params or SamplingParams()
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
