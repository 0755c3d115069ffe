"""The wire format: OpenAI-compatible request and response bodies, and the error envelope.

Requests are pydantic models that accept what the official clients send (null means "the default", as in OpenAI's
API); fields we cannot honour are refused by name rather than ignored. Validation problems are reported with the
field's path as the client wrote it (messages[0].content), never pydantic's internals. Responses are built here so
every endpoint speaks the same shapes. Must not know about the engine, keys or limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator


class ApiError(Exception):
    """An error returned to the client in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def field_path(location: tuple) -> str:
    """('messages', 0, 'role') → 'messages[0].role', the way OpenAI names a field."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic's names of union members


def user_path(location: tuple, data: Any) -> str:
    """A pydantic error location → the field path in the client's own JSON. Pydantic puts the names of union members
    ('str', 'list[str]') between real keys; only keys and indexes that exist in `data`, or a missing field's name,
    are kept."""
    kept: list = []
    for part in location:
        if isinstance(data, dict) and isinstance(part, str) and (part in data or (part.isidentifier() and
                                                                            part not in UNION_TAGS)):
            kept.append(part)  # a key of the body, or the name of a required field that is missing
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int):
            kept.append(part)
            data = data[part] if 0 <= part < len(data) else None
    return field_path(tuple(kept))


def validation_problem(error: ValidationError, data: Any) -> tuple[str, str]:
    """(message, param) for a request that failed validation: up to five problems, one per field."""
    seen: dict[str, str] = {}
    for problem in error.errors():
        path = user_path(problem["loc"], data)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing":
            message = "required"
        seen.setdefault(path, message)
    detail = "; ".join(f"{path or 'body'}: {message}" for path, message in list(seen.items())[:5])
    return detail, next(iter(seen)) or None


def lone_surrogate_path(data: Any, path: tuple = ()) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate ("\\ud800" in JSON): valid JSON, but not text
    any tokenizer can encode."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return field_path(path) or "body"
    elif isinstance(data, dict):
        for key, value in data.items():
            if lone_surrogate_path(key) is not None:
                return field_path(path) or "body"
            found = lone_surrogate_path(value, (*path, key))
            if found is not None:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = lone_surrogate_path(value, (*path, index))
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------- requests


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


TEXT_PARTS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": ContentPart.model_json_schema()}]}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    # Any + our own check: one clear message instead of one per union member.
    content: Annotated[Any, WithJsonSchema(TEXT_PARTS_SCHEMA)]

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        if value is None:
            raise ValueError("content is required (tool calls are not supported)")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"expected a string or a list of text parts, not {type(value).__name__}")
        parts = []
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"type {kind!r}" if isinstance(kind, str) else "no text"
                raise ValueError(f"part {index}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                 f"supported, not {what}")
            parts.append(ContentPart(type="text", text=part["text"]))
        return parts

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and text completions. A field sent as null takes its default."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension (extra_body): no stop at end of text / turn, max_tokens tokens
    kb: bool = True  # lmforge's extension (extra_body), with serve --kb: false answers without retrieval
    # Accepted by OpenAI, not by us: refused by name when set, never silently ignored.
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("response_format")
    @classmethod
    def only_text_format(cls, value):
        if value and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported by this server; only "
                             f"{{\"type\": \"text\"}} (plain text, the default)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def refuse_top_logprobs(cls, value):
        if value is not None:
            raise ValueError("top_logprobs needs logprobs, which this server does not support")
        return value

    @field_validator("tool_choice", "functions", "function_call")
    @classmethod
    def refuse_tool_fields(cls, value, info):
        if value not in (None, [], {}):
            raise ValueError(f"{info.field_name} is not supported by this server (no tool or function calling)")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("logit_bias", "logprobs", "tools")
    @classmethod
    def refuse_unsupported(cls, value, info):
        if value not in (None, False, [], {}):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for text completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list must hold exactly one string)")
            value = value[0]
        return value

    @field_validator("echo", "suffix")
    @classmethod
    def refuse_echo_suffix(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def refuse_best_of(cls, value):
        if value not in (None, 1):
            raise ValueError("best_of is not supported by this server; ask for n choices instead")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# Fields OpenAI accepts and this server refuses by name unless they are empty (validators above).
REFUSED_FIELDS = {"logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                  "echo", "suffix", "best_of"}


def request_body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of an endpoint that reads `model` itself (routes.py parses off the event loop), with
    the schema inlined (no $refs), so the app's /openapi.json describes what it accepts."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    for name in REFUSED_FIELDS & set(schema["properties"]):  # accepted only when empty; say so
        schema["properties"][name] = {"type": "null", "description": "not supported: refused unless null"}
    if "response_format" in schema["properties"]:
        schema["properties"]["response_format"] = {
            "anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}},
                                         "required": ["type"]}]}

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# ---------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, parent: str | None = None) -> dict:
    """One model; `parent` (as vLLM lists LoRA adapters) is the base an adapter runs on, None for the base."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lmforge", "parent": parent}


def model_list(cards: list[dict]) -> dict:
    return {"object": "list", "data": cards}


def chat_completion(request_id: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": use}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               with_usage_field: bool) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def text_completion(request_id: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": use}


def text_chunk(request_id: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
               with_usage_field: bool) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(request_id: str, model: str, created: int, kind: str, use: dict) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [], "usage": use}
