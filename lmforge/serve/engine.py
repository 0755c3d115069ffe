"""The batching engine: one thread owns the decoder; HTTP handlers hand it work and read tokens back through queues.

Continuous batching: every iteration admits waiting requests into free KV-cache slots, prefills them all in one forward
(at most prefill_chunk tokens, so a long prompt does not stall the others), then decodes one token for every running
sequence in one batch. Sequences join and leave between steps. A request's n choices share one prefill. Each choice
samples with its own generator, so its tokens do not depend on what else is in the batch.

Supervision: every value a request may carry is safe here (seeds reduced into the generator's range, temperatures
below MIN_TEMPERATURE are greedy); a step that fails anyway fails the requests in it (an "error" event with the
reason), never the thread. The service rate (sequences finished per second) is measured for Retry-After estimates.
Must not know about HTTP, keys or text (tokens only).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..data.render import common_prefix
from ..generate import sample_token
from .decoder import Decoder

log = logging.getLogger("lmforge.serve")
MIN_TEMPERATURE = 1e-5  # below it softmax(logits / t) overflows; sampling that cold is greedy anyway (as in vLLM)
SEED_RANGE = 2**64  # torch.Generator seeds are unsigned 64-bit; any integer seed is reduced into that range


@dataclass(frozen=True)
class Sampling:
    """How one choice picks its tokens (OpenAI request fields, already validated)."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass
class Submission:
    prompt: list[int]
    adapter: int  # decoder adapter index, 0 = base model
    choices: list[Sampling]
    stop_ids: frozenset[int]
    deadline: float | None = None  # time.monotonic() after which the request is cut off


def engine_failure(engine) -> BaseException | None:
    """Why the engine died, or None while it can serve (or is only stopping). Works for both engines: vllm_engine.py
    records a failed request in `failure` while its engine lives on."""
    failure = getattr(engine, "failure", None)
    return None if failure is None or engine.alive else failure


class EngineBusy(Exception):
    """The bounded queue is full; `retry_after` estimates the seconds until there is room."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine is shutting down or its thread died."""


class Ticket:
    """The handler's side of a submission: events arrive on an asyncio queue as (choice, token, finish_reason);
    token is None on the event that finishes a choice. cancel() stops generation (a disconnect, a stop string)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, submission: Submission):
        self.loop = loop
        self.submission = submission
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled_choices: set[int] = set()
        self.cancelled = False
        self.on_cancel = None  # an engine that must act at once (vllm_engine.py) sets this; engine.py polls
        self.error: str | None = None  # why an "error" event ended a choice

    def cancel(self, choice: int | None = None) -> None:
        if choice is None:
            self.cancelled = True
        else:
            self.cancelled_choices.add(choice)
        if self.on_cancel is not None:
            self.on_cancel()

    def is_cancelled(self, choice: int) -> bool:
        return self.cancelled or choice in self.cancelled_choices

    def _deliver(self, events: list[tuple]) -> None:
        for event in events:
            self.events.put_nowait(event)


@dataclass
class _Sequence:
    """One choice being generated (engine thread only)."""

    ticket: Ticket
    choice: int
    sampling: Sampling
    slot: int = -1
    position: int = 0  # where the next token goes
    last_token: int | None = None  # to feed at the next decode step
    generated: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # for presence/frequency penalties
    generator: torch.Generator | None = None

    @property
    def counts_matter(self) -> bool:
        return bool(self.sampling.presence_penalty or self.sampling.frequency_penalty)


@dataclass
class _Pending:
    """A submission waiting for slots, then being prefilled."""

    ticket: Ticket
    sequences: list[_Sequence]
    prefilled: int = 0


class Engine:
    def __init__(self, decoder: Decoder, models: dict, max_queue: int = 32, prefill_chunk: int = 256,
                 threads: int | None = None):
        self.decoder = decoder
        self.models = models  # served name → whatever routes need (tokenizer, adapter index…); the engine ignores it
        self.max_queue = max_queue  # sequences waiting for a slot
        self.prefill_chunk = prefill_chunk
        self.threads = threads
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Pending] = deque()
        self._prefilling: list[_Pending] = []
        self._running: list[_Sequence] = []
        self._free_slots = list(range(decoder.slots))
        # Per slot: the token ids whose keys/values the cache holds (kept after the slot is freed), and their adapter.
        # A new prompt copies its longest match instead of recomputing it: chat prompts share the template's system
        # prompt, and a conversation's next turn repeats the previous one.
        self._slot_tokens: list[list[int]] = [[] for _ in range(decoder.slots)]
        self._slot_adapter = [0] * decoder.slots
        self.reused_prompt_tokens = 0  # prompt tokens copied from another slot instead of prefilled
        self.moved_sequences = 0  # running sequences moved down into a free slot (_compact)
        self._queued_sequences = 0  # waiting in inbox or _waiting, read by other threads for admission
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: BaseException | None = None
        self.service = ServiceRate()
        self.steps = 0  # engine iterations so far (tests wait in steps, not seconds)

    # ------------------------------------------------------------------------------------------------ any thread

    @property
    def slots(self) -> int:
        return self.decoder.slots

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    @property
    def running(self) -> int:
        return self.decoder.slots - len(self._free_slots)

    @property
    def queued(self) -> int:
        return self._queued_sequences

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self.failure is None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is running (until `timeout`), then end the thread."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, submission: Submission, loop: asyncio.AbstractEventLoop) -> Ticket:
        if not self.alive:
            raise EngineStopped("the model engine is not running" + (f": {self.failure}" if self.failure else ""))
        count = len(submission.choices)
        if count > self.decoder.slots:
            raise ValueError(f"{count} choices need more slots than the engine has ({self.decoder.slots})")
        with self._lock:
            waiting_for_slots = self._queued_sequences + count + self.running - self.decoder.slots
            if waiting_for_slots > self.max_queue:
                backlog = self._queued_sequences + self.running
                raise EngineBusy(f"{self._queued_sequences} sequences already wait for the {self.decoder.slots} "
                                 f"generation slots (queue limit {self.max_queue})",
                                 self.service.retry_after(backlog - self.decoder.slots + count, self.decoder.slots))
            self._queued_sequences += count
        ticket = Ticket(loop, submission)
        self._inbox.put(ticket)
        return ticket

    # ------------------------------------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self._warm_up()
            while True:
                busy = self._running or self._prefilling or self._waiting
                if not self._take_inbox(block=not busy):
                    return
                self.steps += 1
                outbox: dict[Ticket, list[tuple]] = {}
                self._drop_cancelled(outbox)
                self._admit()
                self._prefill(outbox)
                alive = self._prefill_arrivals(outbox)
                self._decode(outbox)
                if not alive:
                    _send(outbox)
                    return
                _send(outbox)
        except BaseException as error:  # a bug outside any one request: fail them all instead of hanging them
            self.failure = error
            self._fail_all(error)
            raise

    def _prefill_arrivals(self, outbox) -> bool:
        """Prefill first: requests that arrived during the last prefill get their first token before the next
        decode step (simultaneous clients land a few ms apart). Bounded: each round admits into a free slot.
        False when told to stop and nothing is left."""
        for _ in range(self.decoder.slots):
            if self._inbox.empty() or not self._free_slots:
                break
            if not self._take_inbox(block=False):
                return False
            self._admit()
            if not self._prefilling:
                break
            self._prefill(outbox)
        return True

    def _warm_up(self) -> None:
        """Pay first-use costs before the first requests do (requests that arrive meanwhile wait in the inbox).
        A decode step of each batch width first-touches every slot's KV-cache pages (mapped lazily; numpy asks for
        huge pages, so each first touch zeroes up to 2 MB: 0.3-1 s per new width on the bundled model) and builds
        oneDNN's primitives for that width; two short prompts do the same for prefill. Nothing stays visible:
        no slot is recorded as holding tokens, so later prompts overwrite what this wrote."""
        slots, tokens = list(range(self.decoder.slots)), min(8, self.decoder.max_len)
        rows = slots[:2]
        self.decoder.prefill_many(rows, [[0] * tokens] * len(rows), [0] * len(rows), [0] * len(rows))
        widths = sorted({*range(1, min(self.decoder.slots, 16) + 1), self.decoder.slots})  # the widest touches all
        for width in widths:
            self.decoder.decode(slots[:width], [0] * width, [0] * width, [0] * width)

    def _take_inbox(self, block: bool) -> bool:
        """Move new tickets into the waiting line; False when told to stop and nothing is left to finish."""
        while True:
            try:
                ticket = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if self._stopping and not (self._running or self._prefilling or self._waiting):
                    return False
                if block:
                    continue
                return True
            if ticket is None:
                if not (self._running or self._prefilling or self._waiting):
                    return False
                continue
            sequences = [_Sequence(ticket, i, sampling) for i, sampling in enumerate(ticket.submission.choices)]
            try:
                for sequence in sequences:
                    sequence.generator = _generator(sequence.sampling.seed, sequence.choice)
            except Exception as error:
                self._dequeue(len(sequences))
                _send(self._failed(sequences, error, {}))
                continue
            self._waiting.append(_Pending(ticket, sequences))
            block = False

    def _drop_cancelled(self, outbox) -> None:
        now = time.monotonic()
        for pending in list(self._waiting) + self._prefilling:
            deadline = pending.ticket.submission.deadline
            if pending.ticket.cancelled or (deadline is not None and now > deadline):
                reason = "cancelled" if pending.ticket.cancelled else "timeout"
                if pending in self._waiting:
                    self._waiting.remove(pending)
                    self._dequeue(len(pending.sequences))
                else:
                    self._prefilling.remove(pending)
                    self._free_slots += [s.slot for s in pending.sequences]
                for sequence in pending.sequences:
                    outbox.setdefault(pending.ticket, []).append((sequence.choice, None, reason))
        for sequence in list(self._running):
            deadline = sequence.ticket.submission.deadline
            if sequence.ticket.is_cancelled(sequence.choice):
                self._finish(sequence, "cancelled", outbox)
            elif deadline is not None and now > deadline:
                self._finish(sequence, "timeout", outbox)

    def _dequeue(self, count: int) -> None:
        with self._lock:
            self._queued_sequences -= count

    def _admit(self) -> None:
        """First come, first served: a request enters when all its choices have slots (they share a prefill)."""
        while self._waiting and len(self._waiting[0].sequences) <= len(self._free_slots):
            pending = self._waiting.popleft()
            self._free_slots.sort()  # lowest slots first keeps the decode batch's slot range short
            first = max(self._free_slots, key=lambda slot: self._shared(slot, pending.ticket.submission))
            if self._shared(first, pending.ticket.submission) == 0:
                first = self._free_slots[0]
            self._free_slots.remove(first)
            pending.sequences[0].slot = first
            for sequence in pending.sequences[1:]:
                sequence.slot = self._free_slots.pop(0)
                self._slot_tokens[sequence.slot] = []
            self._dequeue(len(pending.sequences))
            self._reuse_prefix(pending)
            self._prefilling.append(pending)

    def _reuse_prefix(self, pending: _Pending) -> None:
        submission, target = pending.ticket.submission, pending.sequences[0].slot
        source = max(range(self.decoder.slots), key=lambda slot: (self._shared(slot, submission), slot == target))
        best = self._shared(source, submission)
        self._slot_adapter[target] = submission.adapter
        self._slot_tokens[target] = submission.prompt[:best]
        if best > 0:
            if source != target:
                self.decoder.copy_slot(source, target, best)
            pending.prefilled = best
            self.reused_prompt_tokens += best

    def _shared(self, slot: int, submission: Submission) -> int:
        """Prompt tokens whose keys/values `slot` already holds (never the last one: its logits pick token 1)."""
        if self._slot_adapter[slot] != submission.adapter:
            return 0
        return min(common_prefix(self._slot_tokens[slot], submission.prompt), len(submission.prompt) - 1)

    def _prefill(self, outbox) -> None:
        """One forward for every admitted prompt (up to `prefill_chunk` tokens in all, the rest next step)."""
        budget, batch = self.prefill_chunk, []
        for pending in self._prefilling:
            if budget <= 0:
                break
            chunk = pending.ticket.submission.prompt[pending.prefilled:pending.prefilled + budget]
            batch.append((pending, chunk))
            budget -= len(chunk)
        if not batch:
            return
        try:
            logits = self.decoder.prefill_many([p.sequences[0].slot for p, _ in batch], [c for _, c in batch],
                                               [p.prefilled for p, _ in batch],
                                               [p.ticket.submission.adapter for p, _ in batch])
        except Exception as error:
            for pending, _ in batch:
                self._prefilling.remove(pending)
                for sequence in pending.sequences:
                    self._free_slots.append(sequence.slot)
                    self._slot_tokens[sequence.slot] = []
                self._failed(pending.sequences, error, outbox)
            return
        for (pending, chunk), last_logits in zip(batch, logits):
            submission = pending.ticket.submission
            first = pending.sequences[0]
            self._slot_tokens[first.slot].extend(chunk)
            pending.prefilled += len(chunk)
            if pending.prefilled < len(submission.prompt):
                continue
            self._prefilling.remove(pending)
            for sequence in pending.sequences:
                if sequence is not first:
                    self.decoder.copy_slot(first.slot, sequence.slot, len(submission.prompt))
                    self._slot_tokens[sequence.slot] = list(submission.prompt)
                    self._slot_adapter[sequence.slot] = submission.adapter
                sequence.position = len(submission.prompt)
                self._running.append(sequence)
                self._sample_and_accept(sequence, last_logits, outbox)
        _send(outbox)  # first tokens go out now, not after the decode step

    def _decode(self, outbox) -> None:
        if not self._running:
            return
        self._compact()
        batch = sorted(self._running, key=lambda s: s.slot)
        try:
            logits = self.decoder.decode([s.slot for s in batch], [s.last_token for s in batch],
                                         [s.position for s in batch], [s.ticket.submission.adapter for s in batch])
        except Exception as error:
            for sequence in batch:
                self._running.remove(sequence)
                self._free_slots.append(sequence.slot)
                self._slot_tokens[sequence.slot] = []
            self._failed(batch, error, outbox)
            return
        greedy = logits.argmax(-1).tolist()
        for row, sequence in enumerate(batch):
            self._slot_tokens[sequence.slot].append(sequence.last_token)  # its keys/values are in the cache now
            sequence.position += 1
            if sequence.sampling.greedy and not sequence.counts_matter:
                self._accept(sequence, greedy[row], outbox)
            else:
                self._sample_and_accept(sequence, logits[row], outbox)

    def _compact(self) -> None:
        """Move the sequence on the highest running slot into a free slot below it (its cache copied) while there is
        one: a decode step computes every slot up to the highest running one, so a stream left running high after
        the ones below it ended would pay for their rows every step (one of 8 slots: ~2x the time per token). Only
        while nothing waits or arrives (arrivals take the free slots anyway). The free slot that holds the fewest
        reusable prompt tokens is overwritten; the vacated slot keeps the moved sequence's tokens for reuse. In the
        reduced formats a row's bits do not depend on its slot."""
        if not isinstance(self.decoder, Decoder):  # the model's own forward decodes slot by slot: nothing to gain
            return
        if self._waiting or self._prefilling or not self._inbox.empty():  # arrivals are about to take the free slots
            return
        while True:
            top = max(self._running, key=lambda s: s.slot)
            below = [slot for slot in self._free_slots if slot < top.slot]
            if not below:
                return
            target = min(below, key=lambda slot: (len(self._slot_tokens[slot]), slot))
            self.decoder.copy_slot(top.slot, target, top.position)
            self._free_slots.remove(target)
            self._free_slots.append(top.slot)
            self._slot_tokens[target] = self._slot_tokens[top.slot]
            self._slot_tokens[top.slot] = list(self._slot_tokens[target])
            self._slot_adapter[target] = self._slot_adapter[top.slot]
            top.slot = target
            self.moved_sequences += 1

    def _sample_and_accept(self, sequence: _Sequence, logits: torch.Tensor, outbox) -> None:
        try:
            token = sample(logits, sequence.sampling, sequence.counts, sequence.generator)
        except Exception as error:
            self._running.remove(sequence)
            self._free_slots.append(sequence.slot)
            self._failed([sequence], error, outbox)
            return
        self._accept(sequence, token, outbox)

    def _failed(self, sequences: list[_Sequence], error: Exception, outbox) -> dict:
        """End these sequences with an "error" event that says why (and log it with its traceback)."""
        log.error("a request failed in the engine (other requests go on)", exc_info=error)
        for sequence in sequences:
            sequence.ticket.error = f"{type(error).__name__}: {error}"
            outbox.setdefault(sequence.ticket, []).append((sequence.choice, None, "error"))
        return outbox

    def _accept(self, sequence: _Sequence, token: int, outbox) -> None:
        """Emit a sampled token, or finish the sequence (end of turn, max_tokens, context full)."""
        if token in sequence.ticket.submission.stop_ids:
            self._finish(sequence, "stop", outbox)
            return
        sequence.generated += 1
        sequence.last_token = token
        sequence.counts[token] = sequence.counts.get(token, 0) + 1
        outbox.setdefault(sequence.ticket, []).append((sequence.choice, token, None))
        if sequence.generated >= sequence.sampling.max_tokens or sequence.position >= self.decoder.max_len:
            self._finish(sequence, "length", outbox)

    def _finish(self, sequence: _Sequence, reason: str, outbox) -> None:
        self._running.remove(sequence)
        self._free_slots.append(sequence.slot)
        self.service.finished()
        outbox.setdefault(sequence.ticket, []).append((sequence.choice, None, reason))

    def _fail_all(self, error: BaseException) -> None:
        tickets = {p.ticket: p.sequences for p in list(self._waiting) + self._prefilling}
        for sequence in self._running:
            tickets.setdefault(sequence.ticket, []).append(sequence)
        while not self._inbox.empty():
            ticket = self._inbox.get_nowait()
            if ticket is not None:
                tickets[ticket] = [_Sequence(ticket, i, s) for i, s in enumerate(ticket.submission.choices)]
        for ticket, sequences in tickets.items():
            ticket.error = f"the engine stopped: {type(error).__name__}: {error}"
            events = [(s.choice, None, "error") for s in sequences]
            ticket.loop.call_soon_threadsafe(ticket._deliver, events)


def _send(outbox: dict) -> None:
    for ticket, events in outbox.items():
        ticket.loop.call_soon_threadsafe(ticket._deliver, events)
    outbox.clear()


def _generator(seed: int | None, choice: int) -> torch.Generator:
    """Choice i of a request with seed s draws from seed s + i (modulo 2**64, the generator's range): a seeded
    request repeats exactly, and its choice 0 equals the same request with n=1."""
    start = (seed + choice) % SEED_RANGE if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(start)


class ServiceRate:
    """Sequences finished per second over the last minute: how fast the backlog drains, for Retry-After."""

    def __init__(self, clock=time.monotonic, window: float = 60.0):
        self.clock, self.window = clock, window
        self._finished: deque[float] = deque(maxlen=1024)

    def finished(self) -> None:
        self._finished.append(self.clock())

    def per_second(self) -> float | None:
        now = self.clock()
        while self._finished and self._finished[0] < now - self.window:
            self._finished.popleft()
        if len(self._finished) < 2 or now <= self._finished[0]:
            return None
        return len(self._finished) / (now - self._finished[0])

    def retry_after(self, ahead: int, slots: int) -> int:
        """Seconds until `ahead` sequences have finished at the measured rate (1..60; the official clients honour
        a Retry-After up to 60 s). Before anything finished: a guess of two seconds per round of slots."""
        if ahead <= 0:
            return 1
        rate = self.per_second()
        wait = ahead / rate if rate else 2.0 * math.ceil(ahead / slots)
        return max(1, min(60, math.ceil(wait)))


def sample(logits: torch.Tensor, sampling: Sampling, counts: dict[int, int], generator: torch.Generator) -> int:
    """OpenAI semantics: penalties subtract presence (once per seen token) and frequency × count from the logits;
    temperature below MIN_TEMPERATURE is greedy; top_p keeps the smallest set of tokens whose probability reaches
    top_p."""
    if counts and (sampling.presence_penalty or sampling.frequency_penalty):
        seen = torch.tensor(list(counts))
        times = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits = logits.clone()
        logits[seen] -= sampling.presence_penalty + sampling.frequency_penalty * times
    return sample_token(logits, 0.0 if sampling.greedy else sampling.temperature, sampling.top_p, generator)
