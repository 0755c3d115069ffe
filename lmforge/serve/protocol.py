"""The wire format: OpenAI-compatible request and response bodies, and the error envelope.

Requests are pydantic models that accept what the official clients send; fields we cannot honour are refused by
name rather than ignored. Responses are built here so every endpoint speaks the same shapes. Must not know about
the engine, keys or limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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


# ---------------------------------------------------------------------------------------------------- requests


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def only_text(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, not {self.type!r}")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def has_text(self):
        if self.content is None:
            raise ValueError("content is required (tool calls are not supported)")
        return self

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

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
    # Accepted by OpenAI, not by us: refused by name when set, never silently ignored.
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    tools: list[Any] | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("logit_bias", "logprobs", "tools", "response_format")
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

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"} for name in names]}


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
