"""The engine behind `lmforge serve --backend vllm` (GPU machines): vLLM's AsyncLLMEngine does the batching, the paged
KV cache and the LoRA adapters; lmforge keeps everything in front of it — keys, limits, kill switch, validation,
metrics, the wire format and the chat template (routes.py, guard.py, protocol.py).

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
import sys
import time
from pathlib import Path

from ..errors import UserError
from .engine import EngineBusy, EngineStopped, Submission, Ticket

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values every recent vLLM accepts


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
        """Build vLLM's engine (loads the weights onto the GPU). Called from the server's start-up, on its loop."""
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        arguments = {"model": self.model_path, "max_model_len": self.max_len, "max_num_seqs": self.slots,
                     **self.engine_args}
        if self.lora_dirs:
            rank = max_lora_rank([_lora_rank(directory) for _, directory in self.lora_dirs.values()])
            arguments = {"enable_lora": True, "max_loras": len(self.lora_dirs), "max_lora_rank": rank, **arguments}
        print(f"vLLM engine: {arguments}", file=sys.stderr)
        self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**arguments))

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
            n=len(submission.choices), max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed, presence_penalty=sampling.presence_penalty,
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
        except Exception as error:  # noqa: BLE001 — vLLM's engine died: fail this request, keep serving the rest
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
