"""Tool calls read back from generated text: the chat template's own call format → OpenAI's `tool_calls`.

Two formats, told apart by rendering a probe call through the template: Qwen2.5 / Hermes write each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per reply, text around them allowed); Llama 3.1
writes the reply as one bare JSON object `{"name": ..., "parameters": {...}}`, taken as a call only when the name is
one of the request's tools (a reply that merely is JSON stays content). Text that does not parse as a call stays
content, unchanged. Streaming holds back only what may still turn into a call (text from `<tool_call>` on, a reply
starting with `{`, trailing whitespace before a call), so streamed content + calls equal the non-streamed ones.
Decoding is not constrained: tool_choice "required" or a named function cannot force a call. Must not know about HTTP
or the engine.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..data.render import render_text

HERMES, JSON = "hermes", "json"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_FORMATS: dict[str, str] = {}

_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool_lmforge", "description": "d",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE_CALL = [{"role": "user", "content": "u"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "probe_tool_lmforge", "arguments": {"a": 1}}}]}]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's function.arguments)

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_format(tokenizer) -> str:
    """How the tokenizer's chat template writes an assistant's tool call: HERMES (`<tool_call>` tags) or JSON (the
    reply is the call's JSON object, Llama 3.1). Only asked of templates that render tools (data.render)."""
    template = tokenizer.chat_template or ""
    if template not in _FORMATS:
        try:
            text = render_text(tokenizer, _PROBE_CALL, tools=_PROBE_TOOLS)
        except Exception:  # cannot happen for a template that renders tools; the tags are the common form
            text = OPEN
        _FORMATS[template] = HERMES if OPEN in text else JSON
    return _FORMATS[template]


def parse_tool_calls(text: str, format: str, tool_names: set[str] | frozenset[str]) -> tuple[str | None, list]:
    """(content, [ToolCall]) of one generated reply. Without a call, content is `text` unchanged; with calls, the
    text around them (stripped at the calls), or None when there is none."""
    if format == JSON:
        call = _call(text.strip(), "parameters", tool_names)
        return (None, [call]) if call is not None else (text, [])
    parts, calls, cursor = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1).strip(), "arguments", None)
        if call is None:
            continue  # not a call: stays in the content
        parts.append(text[cursor:match.start()])
        cursor = match.end()
        calls.append(call)
    if not calls:
        return text, []
    rest = [part.strip() for part in [*parts[1:], text[cursor:]] if part.strip()]
    content = "\n".join([parts[0].rstrip(), *rest] if parts[0].strip() else rest)
    return content or None, calls


def _call(text: str, arguments_key: str, tool_names) -> ToolCall | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if tool_names is not None and value["name"] not in tool_names:
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's streamed text → content pieces now, (rest of the content, calls) at the end."""

    def __init__(self, format: str, tool_names: set[str] | frozenset[str]):
        self.format, self.tool_names = format, tool_names
        self.text = ""
        self.sent = 0  # characters of content handed out
        self.holding = False  # from here on everything waits for the end (a call may be under way)

    def add(self, piece: str) -> str:
        """The content that can be shown now ("" while it may still become part of a call)."""
        self.text += piece
        if self.holding:
            return ""
        if self.format == JSON:
            start = self.text.lstrip()
            if not start:
                return ""
            if start.startswith("{"):
                self.holding = True
                return ""
            end = len(self.text)  # not a call: plain content from here on
        else:
            # Only the unsent tail is searched and stripped: a long reply costs linear time, not quadratic.
            at = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
            end = at if at >= 0 else len(self.text) - _partial_tag(self.text)
            self.holding = at >= 0
            end = self.sent + len(self.text[self.sent:end].rstrip())
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet shown, calls) once the reply has ended."""
        content, calls = parse_tool_calls(self.text, self.format, self.tool_names)
        return (content or "")[self.sent:], calls


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` may be the start of `<tool_call>`."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:size]):
            return size
    return 0


def stream_deltas(calls: list[ToolCall]) -> list[dict]:
    """OpenAI's streamed tool calls: per call, a delta with index, id, type and name (arguments ""), then one with
    the arguments — the shape the openai client's stream helpers and LangChain reassemble."""
    deltas = []
    for index, call in enumerate(calls):
        deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas
