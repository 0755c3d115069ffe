"""HTTP endpoints: /v1/models[/{id}], /v1/chat/completions, /v1/completions, /health, /ready, /metrics, /admin/*,
and / (the chat page).

A completion request passes the guard (key → kill switch), its body is read up to max_body_bytes (413 beyond), then
parsed, validated, rendered through the chat template and tokenized in a worker thread (the event loop stays free
for other streams), checked against the limits, and goes to the engine as a Submission; it comes back as one JSON
body or as server-sent events; with `tools`, tool calls are read back from the text (tools.py). A client that
disconnects cancels its sequences. Must not do model arithmetic (engine.py) or decide limits (guard.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from ..data.render import render_prompt, template_renders_tools
from . import protocol, tools
from .engine import EngineBusy, EngineStopped, Sampling, Submission, engine_failure
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest
from .text import TextAssembler

router = APIRouter()
STARTED = int(time.time())
DRAIN_LIMIT = 64 * 1024 * 1024  # a body over max_body_bytes is read (and dropped) this far, then the socket closes


def _state(request: Request):
    return request.app.state


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 503 once the engine thread has died (the process then exits non-zero so a supervisor restarts it)."""
    failure = engine_failure(_state(request).engine)
    if failure is not None:
        return JSONResponse({"status": "engine_down", "error": f"{type(failure).__name__}: {failure}"},
                            status_code=503)
    return JSONResponse({"status": "ok", "state": _state(request).guard.state.status()})  # shared limits: up?


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    if not state.engine.alive:
        raise ApiError(503, "the model engine is not running", type="service_unavailable", code="engine_down")
    state.guard.check_available()
    return JSONResponse({"status": "ready", "running": state.engine.running, "queued": state.engine.queued})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    state.guard.authenticate_metrics(request.headers.get("authorization"))
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate(request.headers.get("authorization"))
    return protocol.model_list(_model_cards(state.engine.models))


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate(request.headers.get("authorization"))
    for card in _model_cards(state.engine.models):
        if card["id"] == model_id:
            return card
    raise ApiError(404, f"model {model_id!r} is not served here; available: {', '.join(state.engine.models)}",
                   param="model", code="model_not_found")


def _model_cards(models: dict) -> list[dict]:
    """The base first, then each adapter with the base as its parent (the chat page picks the first adapter)."""
    base = next((name for name, served in models.items() if not getattr(served, "adapter", 0)), None)
    return [protocol.model_card(name, STARTED, base if getattr(served, "adapter", 0) else None)
            for name, served in models.items()]


class KillSwitchBody(BaseModel):
    enabled: bool
    message: str | None = None


@router.get("/admin/kill-switch")
async def kill_switch_state(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate_admin(request.headers.get("authorization"))
    switch = state.guard.kill_switch
    return {"enabled": switch.active_message() is not None, "message": switch.active_message(), "mode": switch.mode}


@router.post("/admin/kill-switch")
async def set_kill_switch(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate_admin(request.headers.get("authorization"))
    body = _validated(_json_object(await _read_body(request, state.settings.max_body_bytes)), KillSwitchBody)
    state.guard.kill_switch.set(body.enabled, body.message)
    return await kill_switch_state(request)


@router.get("/admin/usage")
async def usage(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate_admin(request.headers.get("authorization"))
    return {"keys": {key: vars(u) for key, u in state.guard.usage.items()}}


@router.post("/v1/chat/completions", openapi_extra=protocol.request_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request):
    return await _complete(request, ChatCompletionRequest, chat=True)


@router.post("/v1/completions", openapi_extra=protocol.request_body_schema(CompletionRequest))
async def completions(request: Request):
    return await _complete(request, CompletionRequest, chat=False)


# ---------------------------------------------------------------------------------------------------- completions


async def _complete(request: Request, schema: type[BaseModel], chat: bool):
    state, settings = _state(request), _state(request).settings
    arrived = time.perf_counter()
    key = state.guard.authenticate(request.headers.get("authorization"))
    state.guard.check_available()
    raw = await _read_body(request, settings.max_body_bytes)
    # Parsing, the chat template and the tokenizer cost up to seconds on a big body: off the event loop.
    body, served, prompt, field, retrieved = await asyncio.get_running_loop().run_in_executor(
        state.prepare_pool, _prepare, state.engine.models, raw, schema, chat, getattr(state, "retrieval", None))
    max_tokens = _check_sizes(body, len(prompt), field, settings, state.engine.max_len, chat)
    state.guard.admit(key, len(prompt), field)
    state.metrics.admitted(key, body.model, len(prompt))
    sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    submission = Submission(prompt=prompt, adapter=served.adapter, choices=[sampling] * body.n,
                            stop_ids=frozenset() if body.ignore_eos else
                            served.chat_stop_ids if chat else served.text_stop_ids,
                            deadline=time.monotonic() + settings.request_timeout)
    try:
        ticket = state.engine.submit(submission, asyncio.get_running_loop())
    except EngineBusy as busy:
        raise ApiError(503, f"server busy: {busy}; retry after {busy.retry_after} s", type="service_unavailable",
                       code="queue_full", headers={"Retry-After": str(busy.retry_after)}) from None
    except EngineStopped as stopped:
        raise ApiError(503, str(stopped), type="service_unavailable", code="engine_down") from None
    run = _Run(state, key, body, served, ticket, arrived, len(prompt), chat)
    run.retrieved = retrieved
    if body.stream:
        return StreamingResponse(run.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await run.collect(request))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is known to exceed `limit` bytes; nothing of it is parsed. The rest is read
    and dropped (up to DRAIN_LIMIT) so a client still sending can read the answer instead of a reset connection."""
    too_big = ApiError(413, f"the request body is larger than this server accepts ({limit} bytes; max_body_bytes)",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_big
    return b"".join(chunks)


def _prepare(models: dict, raw: bytes, schema: type[BaseModel], chat: bool, retrieval=None):
    """(request, served model, prompt token ids, the field that holds the prompt) — runs in a worker thread."""
    body = _validated(_json_object(raw), schema)
    served = models.get(body.model)
    if served is None:
        raise ApiError(404, f"model {body.model!r} is not served here; available: {', '.join(models)}",
                       param="model", code="model_not_found")
    retrieved = None
    if retrieval is not None and chat:  # serve --kb: the knowledge base's passages join the messages (retrieval.py)
        body, retrieved = retrieval.augment(body, served)
    return (body, served, *_prompt_ids(served, body, chat), retrieved)


def _json_object(raw: bytes) -> dict:
    try:
        data = json.loads(raw or b"null")
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        bad = protocol.lone_surrogate_path(data)
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None
    if bad is not None:
        raise ApiError(400, f"{bad}: holds a lone UTF-16 surrogate (such as \\ud800), which is not text; send "
                            f"valid Unicode", param=bad)
    return data


def _validated(data: dict, schema: type[BaseModel]):
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        detail, param = protocol.validation_problem(err, data)
        raise ApiError(400, detail, param=param) from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply") from None


def _prompt_ids(served, body, chat: bool) -> tuple[list[int], str]:
    if not chat:
        return served.tokenizer(body.prompt, add_special_tokens=True)["input_ids"], "prompt"
    if not served.has_chat_template:
        raise ApiError(400, f"model {served.name!r} has no chat template (a base model): use /v1/completions",
                       param="model")
    tool_dicts = None
    if body.uses_tools:
        if not template_renders_tools(served.tokenizer):
            raise ApiError(400, _no_tools_message(served, body), param=_tools_param(body))
        tool_dicts = body.tool_dicts()
    try:
        return render_prompt(served.tokenizer, body.conversation(), tools=tool_dicts), "messages"
    except (TemplateError, ValueError, TypeError) as err:  # e.g. a template that insists on alternating roles
        raise ApiError(400, f"the chat template rejected these messages: {err}", param="messages") from None


def _tools_param(body) -> str:
    if body.tools:
        return "tools"
    index = next(i for i, m in enumerate(body.messages) if m.role == "tool" or m.tool_calls)
    return f"messages[{index}]" + ("" if body.messages[index].role == "tool" else ".tool_calls")


def _no_tools_message(served, body) -> str:
    what = "tools" if body.tools else f"{_tools_param(body)}: tool calls and tool results"
    return (f"{what}: the chat template of model {served.name!r} does not render tools (no tool descriptions, calls "
            f"or results in it), so this model cannot be offered tools; tool calling needs a template that takes "
            f"them (Qwen2.5's, Llama 3.1's, …) — leave tools and tool messages out for this model")


def _check_sizes(body, prompt_tokens: int, field: str, settings, context: int, chat: bool) -> int:
    name = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if body.n > settings.max_n:
        raise ApiError(400, f"n is {body.n}; this server allows at most {settings.max_n}", param="n")
    if prompt_tokens == 0:
        raise ApiError(400, f"the {field} is empty", param=field)
    requested = body.requested_max_tokens()
    if requested is not None and requested > settings.max_tokens:
        raise ApiError(400, f"{name} is {requested}; this server allows at most {settings.max_tokens}", param=name)
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {context} (prompt + reply): "
                            f"shorten the {field}", param=field, code="context_length_exceeded")
    room = context - prompt_tokens
    if requested is None:
        return min(settings.default_max_tokens, room)
    if requested > room:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens and {name} is {requested}: together more than "
                            f"the context of {context}; lower {name} to at most {room}", param=name,
                       code="context_length_exceeded")
    return requested


class _Run:
    """One admitted request: turns engine events into choices' text, usage, metrics and the wire format."""

    def __init__(self, state, key, body, served, ticket, arrived: float, prompt_tokens: int, chat: bool):
        self.state, self.key, self.body, self.served, self.ticket = state, key, body, served, ticket
        self.arrived, self.prompt_tokens, self.chat = arrived, prompt_tokens, chat
        self.texts = [TextAssembler(served.tokenizer, body.stop) for _ in range(body.n)]
        self.reasons: list[str | None] = [None] * body.n
        self.counts = [0] * body.n
        self.first_token_seen = False
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.retrieved = None  # serve --kb: what retrieval.py found for this request
        # Tool calls read back from each choice's text in the template's format (tools.py), unless tool_choice none.
        self.tool_format = tools.call_format(served.tokenizer) if chat and body.parses_tool_calls else None

    async def pieces(self):
        """(choice, new text, finish_reason or None) until every choice has finished."""
        try:
            while None in self.reasons:
                choice, token, reason = await self._next_event()
                if self.reasons[choice] is not None:
                    continue  # events after we stopped it ourselves (stop string)
                if token is not None:
                    self._count_first()
                    self.counts[choice] += 1
                    text = self.texts[choice].add(token)
                    if self.texts[choice].stopped:
                        self.ticket.cancel(choice)
                        self.reasons[choice] = "stop"
                        yield choice, text, "stop"
                    elif text:
                        yield choice, text, None
                    continue
                if reason == "timeout":
                    raise ApiError(504, f"the request took longer than {self.state.settings.request_timeout:g} s "
                                        f"and was stopped", type="timeout", code="timeout")
                if reason == "error":
                    why = self.ticket.error or "see the server log"
                    raise ApiError(500, f"generation failed for this request ({why}); other requests are not "
                                        f"affected", type="server_error", code="engine_error")
                self.reasons[choice] = reason
                yield choice, self.texts[choice].flush(), reason
        finally:
            self.ticket.cancel()  # a no-op when all finished; stops generation when the client went away
            completion = sum(self.counts)
            self.state.guard.record_completion(self.key, completion)
            self.state.metrics.completed(self.key, self.body.model, completion)

    async def _next_event(self) -> tuple:
        """The engine's next event. Between events (at most every second), the kill switch in abort mode ends the
        request, and an engine that died without a word (it should fail its requests itself) is noticed."""
        guard, engine = self.state.guard, self.state.engine
        while True:
            if guard.kill_switch.aborts_running():
                self.ticket.cancel()
                message = guard.kill_switch.active_message()
                raise guard.kill_switch.error(f"{message} (this request was stopped)")
            try:
                async with asyncio.timeout(1.0):
                    return await self.ticket.events.get()
            except TimeoutError:
                if engine_failure(engine) is not None and self.ticket.events.empty():
                    raise ApiError(503, f"the model engine stopped: {engine.failure}", type="service_unavailable",
                                   code="engine_down") from None

    def _count_first(self) -> None:
        if not self.first_token_seen:
            self.first_token_seen = True
            self.state.metrics.ttft.labels(self.body.model).observe(time.perf_counter() - self.arrived)

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(self.counts))

    async def collect(self, request: Request) -> dict:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.ticket))
        try:
            texts = [""] * self.body.n
            async for choice, text, _ in self.pieces():
                texts[choice] += text
        finally:
            watcher.cancel()
        if not self.chat:
            return protocol.text_completion(self.id, self.body.model, list(zip(texts, self.reasons)), self.usage())
        calls = None
        if self.tool_format is not None:
            calls = []
            for index, text in enumerate(texts):
                texts[index], found = tools.parse_tool_calls(text, self.tool_format, self.body.tool_names)
                calls.append([call.as_dict() for call in self._allowed(found)])
                if found:
                    self.reasons[index] = "tool_calls"
        if self.retrieved is None:
            return protocol.chat_completion(self.id, self.body.model, list(zip(texts, self.reasons)), self.usage(),
                                            calls)
        sources = self.retrieved.sources(texts[0] or "")  # serve --kb: what the reply cites, then the Sources line
        texts = [text + self.retrieved.footer() if text is not None else self.retrieved.footer() or None
                 for text in texts]
        return {**protocol.chat_completion(self.id, self.body.model, list(zip(texts, self.reasons)), self.usage(),
                                           calls), "sources": sources}

    def _allowed(self, calls: list) -> list:
        return calls if self.body.parallel_tool_calls else calls[:1]

    async def events(self):
        options = self.body.stream_options
        with_usage = bool(options and options.include_usage)
        model = self.body.model
        said = [""] * self.body.n
        streams = [tools.ToolCallStream(self.tool_format, self.body.tool_names) for _ in range(self.body.n)] \
            if self.tool_format is not None else None
        try:
            if self.chat:
                for index in range(self.body.n):
                    yield _sse(protocol.chat_chunk(self.id, model, self.created, index,
                                                   {"role": "assistant", "content": ""}, None, with_usage))
            async for choice, text, reason in self.pieces():
                if self.chat:
                    if streams is not None:  # content now; what may be a call waits for the end of the reply
                        text = streams[choice].add(text) if text else ""
                        if reason:
                            rest, calls = streams[choice].finish()
                            text += rest
                    if text:
                        yield _sse(protocol.chat_chunk(self.id, model, self.created, choice, {"content": text},
                                                       None, with_usage))
                    if streams is not None and reason and calls:
                        for delta in tools.stream_deltas(self._allowed(calls)):
                            yield _sse(protocol.chat_chunk(self.id, model, self.created, choice, delta, None,
                                                           with_usage))
                        reason = "tool_calls"
                    if self.retrieved is not None:
                        said[choice] += text
                    if reason and self.retrieved is not None:  # serve --kb: the Sources line, then `sources`
                        if self.retrieved.hits:
                            yield _sse(protocol.chat_chunk(self.id, model, self.created, choice,
                                                           {"content": self.retrieved.footer()}, None, with_usage))
                        last = protocol.chat_chunk(self.id, model, self.created, choice, {}, reason, with_usage)
                        yield _sse({**last, "sources": self.retrieved.sources(said[choice])})
                    elif reason:
                        yield _sse(protocol.chat_chunk(self.id, model, self.created, choice, {}, reason, with_usage))
                elif text or reason:
                    yield _sse(protocol.text_chunk(self.id, model, self.created, choice, text, reason, with_usage))
            if with_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse(protocol.usage_chunk(self.id, model, self.created, kind, self.usage()))
        except ApiError as error:  # headers are sent: the error travels as an event, as OpenAI's API does
            yield _sse(error.body())
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, ticket) -> None:
    """The body is read, so the next ASGI message is the disconnect (if the client leaves before the reply)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.cancel()
            return
