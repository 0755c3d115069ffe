"""Ollama's own API beside the OpenAI one: POST /api/chat, /api/generate (NDJSON streams), /api/show; GET /api/tags,
/api/ps, /api/version — so tools built for Ollama (its Python / JS clients, Open WebUI) talk to a served model.

Owns the Ollama wire format only: its requests (stream defaults to true; `options` carries temperature, top_p, seed,
num_predict, stop and the penalties; tools, tool calls and tool results as Ollama writes them), its replies (`done`,
`done_reason`, durations in nanoseconds, token counts, tool calls with their arguments as objects), its error body
{"error": "..."} (also for streams cut short, as a last line), and the "load the model" reply to an empty chat or
prompt; what /api/tags and /api/show say about a model is ollama_models.py's. Everything else is the OpenAI path's:
the guard (keys, kill switch, rate limits), the body cap, validation in a worker thread (a request is restated as a
ChatCompletionRequest / CompletionRequest), the chat template, tools.py's reading of tool calls, the engine's queue
and routes._Run (stop strings, timeouts, kill switch in abort mode, usage, metrics, cancel on disconnect). Sampling
the engine cannot do (top_k, min_p, repeat_penalty, mirostat, …) is refused by name unless set to its no-op value;
Ollama's runtime options (num_ctx, num_thread, num_gpu, …) and keep_alive are accepted and change nothing (the
served models stay loaded). Must not do model arithmetic or decide limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from .. import __version__
from ..data.render import render_prompt, template_renders_tools
from . import tools
from .engine import EngineBusy, EngineStopped, Sampling, Submission
from .ollama_models import OllamaModels, iso_time
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, NullMeansDefault
from .routes import STARTED, _cancel_on_disconnect, _json_object, _read_body, _Run, _state, _validated

OLLAMA_VERSION = "0.6.3"  # the Ollama API as of this version (what /api/version reports to clients that check it)
NO_OP_OPTIONS = {"top_k": (0, -1), "min_p": (0.0,), "typical_p": (1.0,), "tfs_z": (1.0,), "repeat_penalty": (1.0,),
                 "mirostat": (0,)}  # sampling the engine does not do: accepted only at the value that turns it off


class _OllamaRoute(APIRoute):
    """Errors in Ollama's shape, {"error": "message"} with the status, as its clients read them (the app's handlers
    answer the OpenAI envelope everywhere else)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except ApiError as error:
                return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)
            except HTTPException as error:
                return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

        return handle


router = APIRouter(route_class=_OllamaRoute)


# ---------------------------------------------------------------------------------------------------- requests


class Options(BaseModel):
    """Ollama's `options` (Modelfile parameters). Null means the default."""

    model_config = ConfigDict(extra="allow")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("num_predict")
    @classmethod
    def tokens_or_unbounded(cls, value):
        if value is not None and (value == 0 or value < -2):
            raise ValueError("must be at least 1, or -1 (until the reply ends or the context is full)")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @model_validator(mode="after")
    def refuse_unsupported_sampling(self):
        for name, value in (self.model_extra or {}).items():
            if name in NO_OP_OPTIONS and value is not None and value not in NO_OP_OPTIONS[name]:
                off = " or ".join(str(v) for v in NO_OP_OPTIONS[name])
                raise ValueError(f"{name} is not supported by this server (its sampling has temperature, top_p, "
                                 f"seed, presence_penalty and frequency_penalty); leave it out or set it to {off}")
        return self


class _Request(NullMeansDefault):
    """Fields /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    options: Options = Field(default_factory=Options)
    format: Any = None
    keep_alive: Any = None  # accepted; the served models stay loaded
    think: Any = None
    logprobs: Any = None
    top_logprobs: Any = None

    @field_validator("format")
    @classmethod
    def text_only(cls, value):
        if value not in (None, ""):
            raise ValueError("structured output (json or a JSON schema) is not supported by this server; ask for "
                             "JSON in the prompt instead")
        return value

    @field_validator("think")
    @classmethod
    def no_thinking(cls, value):
        if value not in (None, False):
            raise ValueError("thinking is not supported by this server's models; leave it out or set false")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def no_logprobs(cls, value, info):
        if value not in (None, False, 0):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class _Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: dict = Field(default_factory=dict)  # Ollama sends the object itself (OpenAI: a JSON string)


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    function: _Function


class Message(NullMeansDefault):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[_ToolCall] | None = None  # assistant: the calls it made
    tool_name: str | None = None  # tool: the function whose result this is

    @field_validator("role")
    @classmethod
    def known_role(cls, value):
        if value not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"role {value!r} is not one of system, user, assistant, tool")
        return value

    @field_validator("images")
    @classmethod
    def text_only(cls, value):
        if value:
            raise ValueError("images are not supported by this server (text-only models)")
        return value

    def as_openai(self, index: int) -> dict:
        """The message in OpenAI's shape (ChatCompletionRequest validates it; a call's arguments as JSON text)."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": f"call_{index}_{number}", "type": "function",
                                      "function": {"name": call.function.name,
                                                   "arguments": json.dumps(call.function.arguments)}}
                                     for number, call in enumerate(self.tool_calls)]
        if self.role == "tool" and self.tool_name:
            message["name"] = self.tool_name
        return message


class ChatRequest(_Request):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None  # OpenAI's function tools (the same shape); ChatCompletionRequest checks them


class GenerateRequest(_Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None

    @field_validator("suffix", "template", "context", "images")
    @classmethod
    def refuse(cls, value, info):
        if value:
            why = {"suffix": "fill-in-the-middle", "template": "a template other than the model's own",
                   "context": "the deprecated context (send the conversation to /api/chat instead)",
                   "images": "images"}[info.field_name]
            raise ValueError(f"{info.field_name}: {why} is not supported by this server")
        return value


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # the older spelling of `model`

    @model_validator(mode="after")
    def one_name(self):
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self


# ---------------------------------------------------------------------------------------------------- endpoints


@router.get("/api/version")
async def version(request: Request) -> dict:
    _state(request).guard.authenticate(request.headers.get("authorization"))
    return {"version": OLLAMA_VERSION, "lmforge": __version__}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate(request.headers.get("authorization"))
    return {"models": [_models(state).listing(name) for name in state.engine.models]}


@router.get("/api/ps")
async def running_models(request: Request) -> dict:
    """Every served model is loaded for as long as the server runs."""
    state = _state(request)
    state.guard.authenticate(request.headers.get("authorization"))
    return {"models": [{**_models(state).listing(name), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                        "context_length": state.engine.max_len} for name in state.engine.models]}


@router.post("/api/show")
async def show(request: Request) -> dict:
    state = _state(request)
    state.guard.authenticate(request.headers.get("authorization"))
    body = _validated(_json_object(await _read_body(request, state.settings.max_body_bytes)), ShowRequest)
    models = _models(state)
    served = models.find(body.model or body.name)
    # The Modelfile renders the chat template a few times: off the event loop, like a request's preparation.
    return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, models.show, served)


@router.post("/api/chat")
async def chat(request: Request):
    return await _generate(request, ChatRequest)


@router.post("/api/generate")
async def generate(request: Request):
    return await _generate(request, GenerateRequest)


@router.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"], include_in_schema=False)
async def unknown(rest: str, request: Request):
    method = {"chat": "POST", "generate": "POST", "show": "POST", "tags": "GET", "ps": "GET", "version": "GET"}
    if rest in method:
        raise ApiError(405, f"/api/{rest} answers {method[rest]}, not {request.method}")
    raise ApiError(404, f"{request.method} /api/{rest} is not part of this server's Ollama API (POST /api/chat, "
                        f"/api/generate, /api/show; GET /api/tags, /api/ps, /api/version); models are not pulled, "
                        f"created or deleted here")


# ---------------------------------------------------------------------------------------------------- generation


async def _generate(request: Request, schema: type[_Request]):
    state, settings = _state(request), _state(request).settings
    arrived = time.perf_counter()
    key = state.guard.authenticate(request.headers.get("authorization"))
    state.guard.check_available()
    raw = await _read_body(request, settings.max_body_bytes)
    prepared = await asyncio.get_running_loop().run_in_executor(
        state.prepare_pool, _prepare, state, raw, schema)
    if prepared.prompt is None:  # no messages / empty prompt: Ollama's "load the model" call
        return JSONResponse(_reply(prepared, "", {"done": True, "done_reason": "load"}))
    max_tokens = _max_tokens(prepared, settings, state.engine.max_len)
    state.guard.admit(key, len(prepared.prompt), prepared.field)
    state.metrics.admitted(key, prepared.body.model, len(prepared.prompt))
    options = prepared.body
    sampling = Sampling(max_tokens=max_tokens, temperature=options.temperature, top_p=options.top_p,
                        seed=options.seed, presence_penalty=options.presence_penalty,
                        frequency_penalty=options.frequency_penalty)
    served = prepared.served
    submission = Submission(prompt=prepared.prompt, adapter=served.adapter, choices=[sampling],
                            stop_ids=served.chat_stop_ids if served.has_chat_template else served.text_stop_ids,
                            deadline=time.monotonic() + settings.request_timeout)
    try:
        ticket = state.engine.submit(submission, asyncio.get_running_loop())
    except EngineBusy as busy:
        raise ApiError(503, f"server busy: {busy}; retry after {busy.retry_after} s",
                       headers={"Retry-After": str(busy.retry_after)}) from None
    except EngineStopped as stopped:
        raise ApiError(503, str(stopped)) from None
    run = _Run(state, key, prepared.body, served, ticket, arrived, len(prepared.prompt), prepared.chat)
    run.retrieved = prepared.retrieved
    if prepared.stream:
        return StreamingResponse(_stream(run, prepared), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _collect(run, prepared, request))


class _Prepared:
    """An Ollama request made into the OpenAI path's request (`body`, what routes._Run reads), plus what the
    reply echoes."""

    def __init__(self, kind: str, asked_model: str, stream: bool, unbounded: bool):
        self.kind, self.asked_model, self.stream, self.unbounded = kind, asked_model, stream, unbounded
        self.body = self.served = self.prompt = self.retrieved = None
        self.field, self.chat = "messages", True


def _prepare(state, raw: bytes, schema: type[_Request]) -> _Prepared:
    """Runs in a worker thread: parse, validate, find the model, render the prompt and tokenize it. An empty chat or
    prompt leaves `prompt` None (Ollama's "load the model" call)."""
    request = _validated(_json_object(raw), schema)
    served = _models(state).find(request.model)
    options = request.options
    prepared = _Prepared("chat" if schema is ChatRequest else "generate", request.model, request.stream,
                         options.num_predict is not None and options.num_predict < 0)
    prepared.served = served
    defaults = _models(state).defaults(served)
    sampling = {"model": served.name, "stop": options.stop,
                "temperature": defaults["temperature"] if options.temperature is None else options.temperature,
                "top_p": defaults["top_p"] if options.top_p is None else options.top_p,
                "seed": options.seed, "presence_penalty": options.presence_penalty,
                "frequency_penalty": options.frequency_penalty,
                "max_tokens": options.num_predict if (options.num_predict or 0) > 0 else None}
    if isinstance(request, ChatRequest):
        if not request.messages:
            return prepared
        messages = [m.as_openai(index) for index, m in enumerate(request.messages)]
        if request.tools:
            sampling["tools"] = request.tools
    elif request.raw or not served.has_chat_template:  # the prompt as it is, like /v1/completions
        if request.system:
            raise ApiError(400, "system: a raw prompt (raw: true, or a model without a chat template) is sent as "
                                "it is; put the system text into the prompt")
        if not request.prompt:
            return prepared
        prepared.field, prepared.chat = "prompt", False
        prepared.body = _validated({**sampling, "prompt": request.prompt}, CompletionRequest)
        prepared.prompt = served.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        return prepared
    else:
        if not (request.prompt or request.system):
            return prepared
        messages = ([{"role": "system", "content": request.system}] if request.system else []) + \
                   [{"role": "user", "content": request.prompt}]
        prepared.field = "prompt"
    if not served.has_chat_template:
        raise ApiError(400, f"model {served.name!r} has no chat template (a base model): use /api/generate, whose "
                            f"prompt is sent as it is")
    prepared.body = _validated({**sampling, "messages": messages}, ChatCompletionRequest)
    retrieval = getattr(state, "retrieval", None)
    if retrieval is not None:  # serve --kb: the knowledge base's passages join the messages (retrieval.py)
        prepared.body, prepared.retrieved = retrieval.augment(prepared.body, served)
    body, tool_dicts = prepared.body, None
    if body.uses_tools:  # tools offered, or calls / results in the history: the template must render them
        if not template_renders_tools(served.tokenizer):
            raise ApiError(400, f"tools: the chat template of model {served.name!r} does not render tools (no tool "
                                f"descriptions, calls or results in it); leave tools and tool messages out for it")
        tool_dicts = body.tool_dicts()
    try:
        prepared.prompt = render_prompt(served.tokenizer, body.conversation(), tools=tool_dicts)
    except (TemplateError, ValueError, TypeError) as err:  # e.g. a template that insists on alternating roles
        raise ApiError(400, f"the chat template rejected these messages: {err}") from None
    return prepared


def _max_tokens(prepared: _Prepared, settings, context: int) -> int:
    """options.num_predict checked against the server's limits and the context; -1 (Ollama's "until the reply
    ends") runs to the server's max_tokens or the end of the context, whichever comes first."""
    prompt_tokens, field = len(prepared.prompt), prepared.field
    if prompt_tokens == 0:
        raise ApiError(400, f"the {field} is empty")
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {context} (prompt + reply): "
                            f"shorten the {field}")
    room = context - prompt_tokens
    requested = prepared.body.max_tokens
    if requested is None:
        return min(settings.max_tokens if prepared.unbounded else settings.default_max_tokens, room)
    if requested > settings.max_tokens:
        raise ApiError(400, f"options.num_predict is {requested}; this server allows at most {settings.max_tokens}")
    if requested > room:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens and options.num_predict is {requested}: together "
                            f"more than the context of {context}; lower options.num_predict to at most {room}")
    return requested


async def _stream(run: _Run, prepared: _Prepared):
    """One JSON object per line: each piece of text with done false, the tool calls read from the reply (one line),
    then the statistics with done true. An error after the first line travels as a line {"error": ...} (Ollama's
    clients raise it)."""
    calls_stream = tools.ToolCallStream(run.tool_format, run.body.tool_names) if run.tool_format else None
    first_token, said = None, ""
    try:
        async for _, text, reason in run.pieces():
            first_token = first_token or time.perf_counter()
            said += text
            calls = []
            if calls_stream is not None:  # content now; what may be a call waits for the end of the reply
                text = calls_stream.add(text) if text else ""
                if reason:
                    rest, calls = calls_stream.finish()
                    text += rest
            if reason and run.retrieved is not None and run.retrieved.hits:
                text += run.retrieved.footer()  # serve --kb: the Sources line ends the reply
            if text:
                yield _line(_reply(prepared, text, {"done": False}))
            if calls:
                yield _line(_reply(prepared, "", {"done": False}, calls))
            if reason:
                yield _line(_reply(prepared, "", _final(run, reason, first_token, said)))
    except ApiError as error:
        yield _line({"error": error.message})


async def _collect(run: _Run, prepared: _Prepared, request: Request) -> dict:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, run.ticket))
    said, first_token, reason = "", None, None
    try:
        async for _, piece, reason in run.pieces():
            first_token = first_token or time.perf_counter()
            said += piece
    finally:
        watcher.cancel()
    content, calls = said, []
    if run.tool_format is not None:
        content, calls = tools.parse_tool_calls(said, run.tool_format, run.body.tool_names)
    footer = run.retrieved.footer() if run.retrieved is not None and run.retrieved.hits else ""
    return _reply(prepared, (content or "") + footer, _final(run, reason, first_token, said), calls)


def _final(run: _Run, reason: str | None, first_token: float | None, said: str) -> dict:
    """The closing statistics, durations in nanoseconds as Ollama gives them (load_duration 0: already loaded);
    with serve --kb, the passages and whether the reply cites them (`sources`, as on /v1)."""
    now = time.perf_counter()
    first_token = first_token or now
    final = {"done": True, "done_reason": reason or "stop", "total_duration": _ns(now - run.arrived),
             "load_duration": 0, "prompt_eval_count": run.prompt_tokens,
             "prompt_eval_duration": _ns(first_token - run.arrived), "eval_count": sum(run.counts),
             "eval_duration": _ns(now - first_token)}
    if run.retrieved is not None:
        final["sources"] = run.retrieved.sources(said)
    return final


def _reply(prepared: _Prepared, text: str, rest: dict, calls: list | None = None) -> dict:
    head = {"model": prepared.asked_model, "created_at": _now()}
    if prepared.kind != "chat":
        return {**head, "response": text, **rest}
    message = {"role": "assistant", "content": text}
    if calls:  # Ollama's shape: the arguments as an object, no ids
        message["tool_calls"] = [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                                 for call in calls]
    return {**head, "message": message, **rest}


def _line(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _now() -> str:
    return iso_time(time.time())


def _models(state) -> OllamaModels:
    models = getattr(state, "ollama_models", None)
    if models is None:
        models = state.ollama_models = OllamaModels(state.engine, STARTED)
    return models
