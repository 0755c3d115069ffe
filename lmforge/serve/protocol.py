"""The wire format: OpenAI-compatible request and response bodies, and the error envelope.

Requests are pydantic models that accept what the official clients send (null means "the default", as in OpenAI's
API); fields we cannot honour are refused by name rather than ignored. Validation problems are reported with the
field's path as the client wrote it (messages[0].content), never pydantic's internals. Tools, tool_choice and the
tool calls / tool results of a conversation are read here into what chat templates take (whether the served template
takes them is routes.py's check). Responses are built here so every endpoint speaks the same shapes. Must not know
about the engine, keys or limits.
"""

from __future__ import annotations

import json
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


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    # OpenAI sends the arguments as a JSON object in a string; chat templates want the object (tojson).
    arguments: Annotated[Any, WithJsonSchema({"type": "string", "description": "a JSON object, as text"})]

    @field_validator("arguments")
    @classmethod
    def json_object(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except ValueError as err:
                raise ValueError(f"not valid JSON ({err}); send the arguments as a JSON object in a string") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object (in a string), not {type(value).__name__}")
        return value


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Any + our own check: one clear message instead of one per union member.
    # (null is accepted in an assistant message with tool_calls; the schema leaves it out, as it is valid nowhere else)
    content: Annotated[Any, WithJsonSchema(TEXT_PARTS_SCHEMA)]
    tool_calls: list[AssistantToolCall] | None = None  # assistant: the calls it made (content may then be null)
    tool_call_id: str | None = None  # tool: which call this is the result of
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def calls_need_no_content(cls, data):
        if isinstance(data, dict) and data.get("role") == "assistant" and data.get("tool_calls") \
                and data.get("content") is None:
            return {**data, "content": ""}
        return data

    @field_validator("content")
    @classmethod
    def text_only(cls, value):
        if value is None:
            raise ValueError("content is required (null only in an assistant message with tool_calls)")
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

    @field_validator("tool_calls")
    @classmethod
    def only_assistants_call(cls, value, info):
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as chat templates read it (OpenAI's shape, a call's arguments as an object)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [{**({"id": call.id} if call.id else {}), "type": "function",
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                     for call in self.tool_calls]
        if self.role == "tool":
            if self.tool_call_id is not None:
                message["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                message["name"] = self.name
        return message


_CALL_SCHEMA = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string", "minLength": 1},
                                "arguments": {"type": "string", "description": "a JSON object, as text"}}}}}
# One schema per kind of message, as OpenAI's own spec has them: tool_calls only on assistant messages, tool_call_id
# on tool results (content may be null beside tool_calls; the schema leaves that out).
MESSAGE_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["role", "content"],
     "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": TEXT_PARTS_SCHEMA,
                    "name": {"type": "string"}}},
    {"type": "object", "required": ["role", "content"],
     "properties": {"role": {"const": "assistant"}, "content": TEXT_PARTS_SCHEMA, "name": {"type": "string"},
                    "tool_calls": {"type": "array", "items": _CALL_SCHEMA}}},
    {"type": "object", "required": ["role", "content"],
     "properties": {"role": {"const": "tool"}, "content": TEXT_PARTS_SCHEMA, "tool_call_id": {"type": "string"}}}]}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @field_validator("strict")
    @classmethod
    def refuse_strict(cls, value):
        if value:
            raise ValueError("strict: true (arguments guaranteed to match the schema) is not supported: this server "
                             "does not constrain decoding; leave strict out or send false")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSpec

    def as_dict(self) -> dict:
        """The tool as chat templates read it (what the client sent, without null fields and strict)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class NullMeansDefault(BaseModel):
    """A field sent as null takes its default: clients send null for "not set"."""

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class _Sampling(NullMeansDefault):
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
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict | None = None

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

    @field_validator("functions", "function_call")
    @classmethod
    def refuse_function_fields(cls, value, info):
        if value not in (None, [], {}):
            other = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"{info.field_name} (OpenAI's deprecated function calling) is not supported by this "
                             f"server; send {other} instead")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("logit_bias", "logprobs")
    @classmethod
    def refuse_unsupported(cls, value, info):
        if value not in (None, False, [], {}):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[Annotated[ChatMessage, WithJsonSchema(MESSAGE_SCHEMA)]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Tool calling, for a model whose chat template renders tools (routes.py checks; tools.py reads calls back).
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def choice_names_a_tool(cls, value, info):
        if "tools" not in info.data:  # the tools themselves were refused: that error says it
            return value
        names = {tool.function.name for tool in info.data["tools"] or ()}
        if not names and value not in ("none", "auto"):  # without tools, none and auto mean the same: no calls
            raise ValueError(f"{value if isinstance(value, str) else 'a named function'} needs tools: send the tools "
                             f"the model may call")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names the function {value.function.name!r}, which is not one of the tools "
                             f"({', '.join(sorted(names))})")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_names(self) -> set[str]:
        return {tool.function.name for tool in self.tools or ()}

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or tool calls / results in the history: the chat template must render them."""
        return bool(self.tools) or any(m.role == "tool" or m.tool_calls for m in self.messages)

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def tool_dicts(self) -> list[dict] | None:
        return [tool.as_dict() for tool in self.tools] if self.tools else None

    def conversation(self) -> list[dict]:
        """The messages as the chat template reads them; a tool result without a name takes its call's name."""
        messages, names = [], {}
        for message in self.messages:
            item = message.as_dict()
            for call in message.tool_calls or ():
                if call.id:
                    names[call.id] = call.function.name
            if message.role == "tool" and "name" not in item and names.get(message.tool_call_id):
                item["name"] = names[message.tool_call_id]
            messages.append(item)
        return messages


class CompletionRequest(_Sampling):
    # The schema says what is accepted: one non-empty prompt, or a list holding exactly one (one_prompt below).
    prompt: Annotated[str | list[str], WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                             "minItems": 1, "maxItems": 1}]})]
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
REFUSED_FIELDS = {"logit_bias", "logprobs", "top_logprobs", "functions", "function_call", "echo", "suffix",
                  "best_of"}


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


def chat_completion(request_id: str, model: str, choices: list[tuple[str, str]], use: dict,
                    tool_calls: list[list[dict]] | None = None) -> dict:
    """`tool_calls`: per choice, the calls read from its text (OpenAI's shape; content then may be None)."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": assistant_message(text, tool_calls[i] if tool_calls else []),
                         "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": use}


def assistant_message(text: str | None, tool_calls: list[dict]) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


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
