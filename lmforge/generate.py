"""One decoding path for chat, eval, compare and the checkpoint sweep: load a trained run (or base + adapter) and
generate replies.

Loading a run takes the weights checkpoint.choose_weights picks (the best checkpoint named by best.json, else the
final adapter/ or model/) and says which on stderr; a checkpoint is the base model + the run's method + its trainable
tensors. The prompt is rendered with the same chat template as training (render.render_prompt). Decoding runs on
serve's fast batched decoder (model/lean_decoder.py) wherever it runs the model — Llama-family and Gemma 3, plain or
with a LoRA adapter — with continuous batching over the whole prompt set (a finished reply's row takes the next
prompt at once), and otherwise through the model's own forward over a KV cache (other architectures, other methods,
a quantised base). The decoder's weight format is SamplingParams.decode_dtype: float32 (greedy replies as the model's
own forward gives them), or bfloat16 / float16 (faster; replies can differ slightly), auto choosing per CPU
(lean_decoder.choose_weights). Must not know about terminals or HTTP.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from .config import Config, load_config
from .data.render import end_of_turn_ids, ensure_chat_template, prompt_heads, render_prompt
from .errors import ModelError, UserError
from .model.lean_decoder import (
    Decoder,
    applies_windows,
    bfloat16_kernels,
    choose_decode_weights,
    fast_decoder_runs,
    holds_in_float16,
    lora_pairs,
)
from .model.loader import load_model, load_tokenizer, pick_dtype, resolve_model
from .model.methods import apply_method, load_base, load_saved_adapter, unwrap
from .model.precision import cpu_capability
from .rundir import TRAINABLE_FILE, RunDir, RunWeights, choose_weights


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # prompt i samples from seed + keys[i] (default i): its reply does not depend on the batch
    decode_dtype: str = "float32"  # the fast decoder's weights: float32, bfloat16, float16, or auto (per CPU)


@dataclass(frozen=True)
class Decoding:
    """How replies were decoded, for eval.json and the line on stderr."""

    path: str     # "fast decoder" or "model forward"
    weights: str  # float32 / bfloat16 / float16; the model's own dtype on the model-forward path
    reason: str
    slots: int    # prompts decoded at once

    def line(self) -> str:
        return f"decoding: {self.path}, {self.weights} weights, {self.slots} at a time — {self.reason}"

    def as_dict(self) -> dict:
        return asdict(self)


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
    found = lean_decoder(model, len(prompts), max(len(p) for p in prompts) + params.max_new_tokens,
                         decode_weights(model, params.decode_dtype)[0])
    if found is None:
        return model_forward_tokens(model, prompts, stop_ids, params)
    return _as_steps(_lean_events(*found, prompts, stop_ids, params, len(prompts)), len(prompts))


def generate_all(model, prompts: list[list[int]], stop_ids: list[int], params: SamplingParams, slots: int,
                 done: Callable[[int], None] | None = None, keys: list[int] | None = None,
                 heads: list[int] | None = None) -> tuple[list[list[int]], Decoding]:
    """Every prompt's generated tokens (stop token excluded) and how they were decoded. On the fast decoder:
    continuous batching on `slots` rows — a row whose reply ends takes the next waiting prompt before the next step,
    so the batch stays full until the set runs out. Through the model's own forward: `slots` prompts at a time, in
    the order given. `done(i)` is called as prompt i's reply ends. Sampling: prompt i draws from seed + keys[i]
    (default: its index), whatever else is in its batch. `heads`: each prompt's head (render.prompt_heads); in the
    reduced weight formats prompts admitted together prefill a shared head once (float32 prefills every prompt
    whole, as the model's own forward does, whose greedy replies it gives)."""
    out: list[list[int]] = [[] for _ in prompts]
    keys = list(range(len(prompts))) if keys is None else keys
    slots = max(1, min(slots, len(prompts)))
    weights, reason = decode_weights(model, params.decode_dtype)
    found = lean_decoder(model, slots, max(map(len, prompts), default=1) + params.max_new_tokens, weights)
    if found is not None:
        split = heads if heads is not None and weights != "float32" else None
        for events in _lean_events(*found, prompts, stop_ids, params, slots, keys, split):
            for i, token in events:
                if token is None:
                    if done:
                        done(i)
                else:
                    out[i].append(token)
        return out, Decoding("fast decoder", weights, reason, slots)
    for start in range(0, len(prompts), slots):
        chunk = prompts[start:start + slots]
        for step in model_forward_tokens(model, chunk, stop_ids, params, keys[start:start + slots]):
            for offset, token in enumerate(step):
                if token is not None:
                    out[start + offset].append(token)
        for offset in range(len(chunk)):
            if done:
                done(start + offset)
    return out, Decoding("model forward", _own_dtype(model), _own_forward_reason(params, _own_dtype(model)), slots)


def _own_dtype(model) -> str:
    base = unwrap(model)
    return str(base.dtype).removeprefix("torch.") if isinstance(base, torch.nn.Module) else "?"


def _own_forward_reason(params: SamplingParams, dtype: str) -> str:
    why = "the fast decoder does not run this model (architecture, method, adapter modules or quantised weights)"
    if params.decode_dtype not in ("auto", dtype):
        why += f"; --decode-dtype {params.decode_dtype} applies to the fast decoder only"
    return why


def prepare_decoding(model, params: SamplingParams, slots: int = 1) -> Decoding:
    """Build the decoder a chat will use (before the first prompt) and say how it decodes."""
    weights, reason = decode_weights(model, params.decode_dtype)
    if lean_decoder(model, slots, params.max_new_tokens + 1, weights) is not None:
        return Decoding("fast decoder", weights, reason, slots)
    return Decoding("model forward", _own_dtype(model), _own_forward_reason(params, _own_dtype(model)), slots)


def decode_weights(model, requested: str) -> tuple[str, str]:
    """(the fast decoder's weight format, why) for `requested` (auto / a format) on this CPU and model."""
    if requested != "auto":
        return choose_decode_weights(requested, [], False, False)
    bf16 = cpu_capability().bf16_instructions
    native = bool(bf16) and bfloat16_kernels()
    fits = not native and runs_on_lean_decoder(model) and holds_in_float16(model)  # reads every weight: only if asked
    return choose_decode_weights("auto", bf16, native, fits)


# ------------------------------------------------------------------------------------------ the fast decoder

_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (Decoder, adapter index)
_OWN_FORWARD: weakref.WeakSet = weakref.WeakSet()  # models found not to run on it (their adapter's modules)
CONTEXT_STEP = 1024  # the decoder's KV cache is sized in steps of this many tokens (pages are touched only as used)
PREFILL_TOKENS = 2048  # prompt tokens prefilled in one forward when rows free up (at least one prompt)
SHARED_HEAD = 8  # a prompt head (render.prompt_heads) this long or longer is prefilled once per batch, not per prompt


def lean_decoder(model, slots: int, max_len: int, weights: str = "float32") -> tuple[Decoder, int] | None:
    """The fast decoder holding `model`'s weights in format `weights` with room for `slots` sequences of `max_len`
    tokens, and the adapter index its rows use (0: none); None where it does not compute what the model computes,
    which then decodes through its own forward. Built once per model and reused (load_trainable drops it when the
    weights change, another format replaces it)."""
    cached = _DECODERS.get(model) if _weakrefable(model) else None
    if cached is not None and cached[0].weights != weights:
        cached = None
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
    # float32: LoRA rows beside the base weights, as the model's own forward computes them (greedy replies equal);
    # a reduced format: the adapter merged into the weights before they are rounded (no extra work per row)
    lora = hasattr(model, "peft_config")
    if lora:
        try:
            lora_pairs(model, model.active_adapter, "run")
        except ModelError:  # LoRA on modules the decoder does not adapt (lm_head, embeddings, modules_to_save)
            _OWN_FORWARD.add(model)
            return None
    # float32: LoRA rows beside the base weights, as the model's own forward computes them (greedy replies equal);
    # a reduced format: the adapter merged into the weights before they are rounded (no extra work per row)
    merge = lora and weights != "float32"
    decoder = Decoder(model, slots=slots, max_len=capacity, weights=weights,
                      merge_adapter=model.active_adapter if merge else None)
    adapter = 0
    if lora and not merge:
        decoder.add_lora("run", model, model.active_adapter)
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
def _lean_events(decoder: Decoder, adapter: int, prompts: list[list[int]], stop_ids: list[int],
                 params: SamplingParams, slots: int, keys: list[int] | None = None, heads: list[int] | None = None
                 ) -> Iterator[list[tuple[int, int | None]]]:
    """Continuous batching on the fast decoder: each round decodes one token for every running prompt, then
    prefills waiting prompts into the rows that freed up (up to PREFILL_TOKENS tokens in one pass, no padding) and
    samples their first token. Yields each round's events in order: (prompt index, new token), and (prompt index,
    None) where its reply ended (a stop token, or max_new_tokens reached). Prompt i samples with its own generator
    (seed + keys[i], default seed + i), so its tokens do not depend on which other prompts share its batch."""
    waiting = deque(range(len(prompts)))
    free = list(range(slots))
    running: dict[int, list[int]] = {}  # prompt index → [row, next position, last token, tokens generated]
    keys = list(range(len(prompts))) if keys is None else keys
    generators = [torch.Generator().manual_seed(params.seed + key) if params.seed is not None else None
                  for key in keys]
    stops = set(stop_ids)
    greedy = params.temperature <= 0

    def accept(i: int, logits: torch.Tensor, greedy_token: int | None, events: list) -> None:
        state = running[i]
        token = _next_token(logits, params, generators[i]) if greedy_token is None else greedy_token
        state[3] += 1
        if token not in stops:
            events.append((i, token))
            state[2] = token
            if state[3] < params.max_new_tokens:
                return
        events.append((i, None))
        free.append(state[0])
        del running[i]

    while waiting or running:
        events: list[tuple[int, int | None]] = []
        if not waiting:
            _compact_rows(decoder, running, free)
        if running:
            batch = sorted(running, key=lambda i: running[i][0])
            logits = decoder.decode([running[i][0] for i in batch], [running[i][2] for i in batch],
                                    [running[i][1] for i in batch], [adapter] * len(batch))
            tokens = logits.argmax(-1).tolist() if greedy else [None] * len(batch)
            for i, row, token in zip(batch, logits, tokens):
                running[i][1] += 1
                accept(i, row, token, events)
        admitted: list[int] = []
        budget = PREFILL_TOKENS
        free.sort()  # the lowest rows first keeps the decode step's row range short
        while waiting and free and (not admitted or len(prompts[waiting[0]]) <= budget):
            i = waiting.popleft()
            budget -= len(prompts[i])
            running[i] = [free.pop(0), len(prompts[i]), 0, 0]
            admitted.append(i)
        if admitted:
            logits = _prefill(decoder, adapter, [running[i][0] for i in admitted], [prompts[i] for i in admitted],
                              [_usable_head(heads, prompts, i) for i in admitted])
            tokens = logits.argmax(-1).tolist() if greedy else [None] * len(admitted)
            for i, row, token in zip(admitted, logits, tokens):
                accept(i, row, token, events)
        yield events


def _usable_head(heads: list[int] | None, prompts: list[list[int]], i: int) -> int:
    head = heads[i] if heads is not None else 0
    return head if SHARED_HEAD <= head < len(prompts[i]) else 0


def _prefill(decoder: Decoder, adapter: int, slots: list[int], prompts: list[list[int]], heads: list[int]
             ) -> torch.Tensor:
    """Prefill prompts into their rows; returns each one's last logits. A prompt with a head (heads[k] > 0) is
    prefilled in two parts, the head then the rest: prompts with the same head tokens compute it once and the others
    copy its cache (eval's test sets share the system prompt: on the demo's held-out set, 337 rows instead of 745).
    A prompt is split by its own head alone, so its bits are the same in any batch."""
    holder: dict[tuple[int, ...], int] = {}  # head tokens → the row that computes them
    for slot, prompt, head in zip(slots, prompts, heads):
        if head:
            holder.setdefault(tuple(prompt[:head]), slot)
    if holder:
        decoder.prefill_many(list(holder.values()), [list(tokens) for tokens in holder], [0] * len(holder),
                             [adapter] * len(holder))
        for slot, prompt, head in zip(slots, prompts, heads):
            source = holder[tuple(prompt[:head])] if head else slot
            if source != slot:
                decoder.copy_slot(source, slot, head)
    return decoder.prefill_many(slots, [prompt[head:] for prompt, head in zip(prompts, heads)], heads,
                                [adapter] * len(slots))


def _compact_rows(decoder: Decoder, running: dict[int, list[int]], free: list[int]) -> None:
    """Once no prompt waits, move the reply on the highest row into the lowest free row (its cache copied) until
    the running rows are 0..n-1: a decode step computes every row up to the highest one, so rows whose replies ended
    below it still cost their share of every product (on the demo's held-out set, 486 rows computed for 377 tokens).
    A row's tokens do not depend on which row it is on (tests/test_eval.py)."""
    free.sort()
    while running and free:
        top = max(running, key=lambda i: running[i][0])
        source = running[top][0]
        if free[0] > source:
            return
        target = free.pop(0)
        decoder.copy_slot(source, target, running[top][1])
        running[top][0] = target
        free.append(source)
        free.sort()


def _as_steps(rounds: Iterator[list[tuple[int, int | None]]], count: int) -> Iterator[list[int | None]]:
    """generate_tokens' shape from _lean_events run with a row per prompt: each round one token (or None) per prompt;
    ends without yielding a round in which no prompt produced a token."""
    for events in rounds:
        step: list[int | None] = [None] * count
        for i, token in events:
            if token is not None:
                step[i] = token
        if all(token is None for token in step):
            return
        yield step


# ------------------------------------------------------------------------------------------ the model's own forward


@torch.inference_mode()
def model_forward_tokens(model, prompts: list[list[int]], stop_ids: list[int], params: SamplingParams,
                         keys: list[int] | None = None) -> Iterator[list[int | None]]:
    """generate_tokens through the model's own forward: prompts left-padded, one KV cache for the batch. Prompt i
    samples from seed + keys[i] (default seed + i), as on the fast decoder."""
    keys = list(range(len(prompts))) if keys is None else keys
    generators = [torch.Generator().manual_seed(params.seed + key) if params.seed is not None else None
                  for key in keys]
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
            token = _next_token(row, params, generators[i]) if running[i] else None
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
    """Replies to many conversations, `batch_size` decoded at a time with the same decoding as reply()."""
    return decode_replies(model, tokenizer, conversations, params or SamplingParams(), batch_size)[0]


def decode_replies(model, tokenizer, conversations: list[list[dict]], params: SamplingParams, batch_size: int,
                   done: Callable[[int], None] | None = None, keys: list[int] | None = None
                   ) -> tuple[list[str], Decoding]:
    """replies() and how they were decoded; `done(i)` is called as conversation i's reply ends; keys: as in
    generate_all (what each conversation's sampling seed adds)."""
    prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    generated, decoding = generate_all(model, prompts, end_of_turn_ids(tokenizer), params, batch_size, done, keys,
                                       prompt_heads(tokenizer, conversations, prompts))
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated], decoding
