"""The one data type that flows through lmforge: a Conversation, a list of OpenAI-shaped messages.

Every reader converts its input into this shape; every later stage (render, train, chat, eval, serve) reads only
this shape. On disk a conversation is one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]},
with OpenAI's tool-calling fields where a conversation uses tools: "tools" beside "messages", an assistant message's
"tool_calls", and "tool" messages carrying a tool's result. A message may say "loss": false (trained: no).
This module owns the type and its validation; it knows nothing about files or tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call the assistant makes: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it makes (content may then be empty)
    name: str | None = None  # tool: which tool produced this result
    train: bool | None = None  # False: this turn carries no loss ("loss": false); None: data.train_on decides

    def to_dict(self) -> dict:
        """The message as chat templates and the OpenAI API take it (no lmforge-only keys)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = field(default="", compare=False)  # "file:line" for error messages and rejects
    tools: tuple[dict, ...] = ()  # tool descriptions, OpenAI's {"type": "function", "function": {...}} each

    @classmethod
    def from_dicts(cls, messages: list[dict], source: str = "", tools: list[dict] | tuple = ()) -> Conversation:
        """From validate()'s output (or any {"role", "content"} dicts); tool_calls arguments must be objects."""
        return cls(tuple(_message(m) for m in messages), source, tuple(tools))

    def to_dicts(self) -> list[dict]:
        return [m.to_dict() for m in self.messages]

    def to_record(self) -> dict:
        """The JSONL record: messages (with "loss": false on untrained turns) and the tools, when there are some."""
        messages = [{**m.to_dict(), "loss": False} if m.train is False else m.to_dict() for m in self.messages]
        return {"messages": messages, **({"tools": list(self.tools)} if self.tools else {})}

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.role == "tool" or m.tool_calls for m in self.messages)


def _message(m: dict) -> Message:
    calls = tuple(ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or ())
    train = False if m.get("loss") is False else None
    return Message(m["role"], m["content"], calls, m.get("name"), train)


def validate(messages: object, where: str, *, need_assistant: bool = True) -> list[dict]:
    """Check an OpenAI-style message list and return it as plain dicts.

    Raises DataError naming `where` (file:line) and the message index of the first problem. The shape accepted is:
    an optional system message first, then turns starting with user, where a user message is answered by an
    assistant message; an assistant message with tool_calls is followed by one or more tool messages (the results),
    and those by the assistant again. Tool calls are normalised to {"type": "function", "function": {"name",
    "arguments": {...}}} (arguments given as a JSON string are parsed). "loss": false marks an untrained turn.
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
        calls = _tool_calls(m.get("tool_calls"), where, i) if role == "assistant" else []
        if calls and content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content {_describe(content)}, expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
        if m.get("tool_calls") and role != "assistant":
            raise DataError(f"{where}: message {i} ({role}) has tool_calls; only assistant messages call tools")
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise DataError(f"{where}: message {i} has \"loss\": {_describe(loss)}; expected true or false")
        if loss is True and role != "assistant":
            raise DataError(f"{where}: message {i} ({role}) has \"loss\": true; only assistant turns train (to train "
                            f"on every token, set data.train_on: all)")
        item: dict[str, Any] = {"role": role, "content": content}
        if calls:
            item["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("name"), str):
            item["name"] = m["name"]
        if loss is False:
            item["loss"] = False
        out.append(item)
    _check_order(out, where)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to train on")
    return out


def _check_order(out: list[dict], where: str) -> None:
    offset = 1 if out[0]["role"] == "system" else 0
    previous = None  # the role expected next is decided by the previous message
    for i, m in enumerate(out[offset:], start=offset):
        role = m["role"]
        if previous is None or (previous["role"] == "assistant" and not previous.get("tool_calls")):
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":  # it called tools: their results come next
            expected = ("tool",)
        else:  # after a tool result: more results, or the assistant again
            expected = ("tool", "assistant")
        if role not in expected:
            wanted = " or ".join(map(repr, expected))
            why = ("the results of the assistant's tool_calls come next, as 'tool' messages" if expected == ("tool",)
                   else "turns must alternate user/assistant, starting with user; tool results follow an assistant "
                        "message with tool_calls")
            raise DataError(f"{where}: message {i} is {role!r} but {wanted} was expected ({why})")
        previous = m


def _tool_calls(value: object, where: str, index: int) -> list[dict]:
    """OpenAI's tool_calls (or a list of {"name", "arguments"}) → normalised calls with object arguments."""
    if value in (None, []):
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: message {index} tool_calls should be a list of calls, got {_describe(value)}")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: message {index} tool_calls[{j}] has no function name: {_describe(call)}")
        arguments = parse_json_object(function.get("arguments", {}), f"{where}: message {index} tool_calls[{j}] "
                                                                       f"arguments")
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def parse_json_object(value: object, what: str) -> dict:
    """A JSON object given as an object or as a JSON string; anything else is a DataError naming `what`."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise DataError(f"{what} is not valid JSON ({error.msg} at character {error.pos}): "
                            f"{_describe(value)}") from None
    if not isinstance(value, dict):
        raise DataError(f"{what} should be a JSON object, got {_describe(value)}")
    return value


def validate_tools(value: object, what: str) -> list[dict]:
    """Tool descriptions (a list, or a JSON string of one) → OpenAI's [{"type": "function", "function": {...}}].
    `what` names the field in errors, e.g. "data.jsonl:3: field 'tools'"."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(f"{what} is not valid JSON ({error.msg} at character {error.pos}): "
                            f"{_describe(value)}") from None
    if value in (None, {}):
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{what} should be a list of tool descriptions, got {_describe(value)}")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{what}[{i}] should be an object with a \"name\" (and \"description\", "
                            f"\"parameters\"), got {_describe(tool)}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise DataError(f"{what}[{i}] ({function['name']}) parameters should be a JSON schema object, got "
                            f"{_describe(parameters)}")
        tools.append({"type": "function", "function": {**function, "parameters": parameters}})
    return tools


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null or missing)"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"
