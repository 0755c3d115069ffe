"""The one data type that flows through lmforge: a Conversation, a list of OpenAI-shaped messages.

Every reader converts its input into this shape; every later stage (render, train, chat, eval, serve) reads only
this shape. On disk a conversation is one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]}.
This module owns the type and its validation; it knows nothing about files or tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = field(default="", compare=False)  # "file:line" for error messages and rejects

    @classmethod
    def from_dicts(cls, messages: list[dict], source: str = "") -> Conversation:
        return cls(tuple(Message(m["role"], m["content"]) for m in messages), source)

    def to_dicts(self) -> list[dict]:
        return [m.to_dict() for m in self.messages]

    def to_record(self) -> dict:
        return {"messages": self.to_dicts()}


def validate(messages: object, where: str, *, need_assistant: bool = True) -> list[dict]:
    """Check an OpenAI-style message list and return it as plain dicts.

    Raises DataError naming `where` (file:line) and the message index of the first problem. The shape accepted is:
    an optional system message first, then user/assistant turns alternating, starting with user.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {_describe(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is {_describe(m)}, expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content {_describe(content)}, expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + (len(out) - len(turns))
            raise DataError(f"{where}: message {index} is {m['role']!r} but {expected!r} was expected "
                            f"(turns must alternate user/assistant, starting with user)")
    if need_assistant and not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to train on")
    return out


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null or missing)"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"
