"""Edge converters: one small function per record shape, each turning one record into a Conversation.

Owns the shapes we read (alpaca, sharegpt, ChatGLM3 "conversations", OpenAI "messages"), format detection, and
LLaMA-Factory's dataset_info.json column/tag mapping (FormatSpec). Tool use in each shape's own spelling (sharegpt's
function_call / observation turns and tools column, ChatGLM3's "tool" turns, OpenAI's tool_calls and "tool" messages)
and per-turn loss flags ("loss": false, OpenAI's "weight": 0) become the Conversation's tool calls, tool messages and
untrained turns. Must not open files (sources.py does that) nor
clean or filter content (later data/ stages do). Everything ends in conversation.validate(), so all shapes get the
same checks.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ..conversation import Conversation, parse_json_object, validate, validate_tools
from ..errors import DataError

FORMAT_NAMES = ("alpaca", "sharegpt", "conversations", "messages")
# LLaMA-Factory's column defaults. Unlike LLaMA-Factory we also read `system` and `history` by default: a column
# that is present but silently unused would train on different data than the user wrote.
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                   "messages": "conversations", "system": "system", "tools": "tools", "images": "images",
                   "videos": "videos", "audios": "audios",
                   "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
MEDIA_COLUMNS = ("images", "videos", "audios")


@dataclass(frozen=True)
class FormatSpec:
    """How to read records: a format name ("auto" = detect from the first record) and, for files described in
    LLaMA-Factory's dataset_info.json, its `columns` (our key → the record's key) and sharegpt `tags`."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMAT_NAMES:
            raise DataError(f"unknown data format {self.format!r}{_did_you_mean(self.format, FORMAT_NAMES)}; "
                            f"expected auto or one of {', '.join(FORMAT_NAMES)}")

    def column(self, key: str) -> str:
        return self.columns.get(key, DEFAULT_COLUMNS[key])

    def tag(self, key: str) -> str:
        return self.tags.get(key, DEFAULT_TAGS[key])

    @classmethod
    def from_dataset_info(cls, entry: dict, where: str, shape: str = "sft") -> FormatSpec:
        """Read an entry's `formatting`, `columns` and `tags`; refuse an entry whose data is not of `shape` (what the
        stage reads: sft conversations, preference "pairs", "kto" labelled responses, or pt "text")."""
        formatting = entry.get("formatting", "alpaca")
        if formatting not in FORMAT_NAMES:
            raise DataError(f"{where}: formatting {formatting!r} is not one we read"
                            f"{_did_you_mean(formatting, FORMAT_NAMES)}; use \"alpaca\" (the default) or \"sharegpt\"")
        columns = _string_mapping(entry.get("columns"), DEFAULT_COLUMNS, "columns", where)
        tags = _string_mapping(entry.get("tags"), DEFAULT_TAGS, "tags", where)
        ranking = bool(entry.get("ranking") or "chosen" in columns or "rejected" in columns)
        kto = "kto_tag" in columns
        if ranking and shape != "pairs":
            raise DataError(f"{where}: preference data (ranking) is for stage dpo/rm, not {shape_name(shape)}; "
                            f"remove this dataset from the list or set train.stage: dpo (orpo, simpo, rm)")
        if kto and shape != "kto":
            raise DataError(f"{where}: KTO data (kto_tag) is for stage kto, not {shape_name(shape)}; remove this "
                            f"dataset from the list or set train.stage: kto")
        if shape == "pairs" and not ranking:
            raise DataError(f"{where}: stage dpo/orpo/simpo/rm reads preference pairs; this entry has no "
                            f"\"ranking\": true (add it, with \"chosen\"/\"rejected\" columns if they are named "
                            f"otherwise)")
        if shape == "kto" and not kto:
            raise DataError(f"{where}: stage kto reads responses labelled desirable or not; this entry names no "
                            f"label column: add \"columns\": {{\"kto_tag\": \"label\"}}")
        media = [key for key in MEDIA_COLUMNS if key in columns]
        if media:
            raise DataError(f"{where}: multimodal data not supported (columns: {', '.join(media)}); lmforge trains "
                            f"text-only models for now")
        return cls(formatting, columns, tags)


def shape_name(shape: str) -> str:
    return {"sft": "sft", "pairs": "dpo/rm", "kto": "kto", "text": "pt"}[shape]


def convert(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> Conversation:
    """Turn one record into a Conversation using spec.format, or the detected format when it is "auto"."""
    name = detect_format(record, where) if spec.format == "auto" else spec.format
    return FORMATS[name](record, where, spec)


def detect_format(record: dict, where: str) -> str:
    """The format name a record looks like, judged by its keys."""
    if "chosen" in record and "rejected" in record:
        raise DataError(f"{where}: this record is a preference pair (chosen/rejected), which trains with stage dpo, "
                        f"orpo, simpo or rm, not sft: set train.stage (LLaMA-Factory: stage), or use conversations")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        turns = record["conversations"]
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and "from" in first:
            return "sharegpt"
        if isinstance(first, dict) and "role" in first:
            return "conversations"
        raise DataError(f"{where}: field 'conversations' should be a non-empty list of messages with 'from'/'value' "
                        f"(sharegpt) or 'role'/'content' (ChatGLM3), got {_preview(turns)}")
    if "instruction" in record:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format of this record (its keys: {', '.join(record) or 'none'}).\n"
                    f"{_unknown_shape_hint(record)}lmforge reads records shaped like:\n"
                    f"  messages       {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}   (OpenAI)\n"
                    f"  sharegpt       {{\"conversations\": [{{\"from\": ..., \"value\": ...}}, ...]}}\n"
                    f"  conversations  {{\"conversations\": [{{\"role\": ..., \"content\": ...}}, ...]}}   (ChatGLM3)\n"
                    f"  alpaca         {{\"instruction\": ..., \"input\": ... (optional), \"output\": ...}}\n"
                    f"If your fields have other names, describe the file in dataset_info.json with \"columns\".")


def alpaca(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> Conversation:
    """instruction (+ newline + input) → user, output → assistant; optional system and earlier [user, assistant]
    pairs in history."""
    reject_unsupported_columns(record, where, spec)
    required = (spec.column("prompt"), spec.column("response"))
    if set(record) == {required[0]} and required[1] not in record:
        raise DataError(f"{where}: missing field {required[1]!r}: the record has only {required[0]!r}, which looks "
                        f"like pre-training text (stage pt); sft needs a response to train on")
    instruction = _required_text(record, required[0], where, required)
    response = _required_text(record, required[1], where, required)
    query = _optional_text(record, spec.column("query"), where)
    system = _optional_text(record, spec.column("system"), where)
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in _history_pairs(record, spec.column("history"), where):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    # LLaMA-Factory's rule: the non-empty parts of instruction and input joined by a newline.
    prompt = "\n".join(part for part in (instruction, query) if part)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Conversation.from_dicts(validate(messages, where), where, _tools(record, where, spec))


def sharegpt(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> Conversation:
    """{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system": optional}, with tag renames."""
    reject_unsupported_columns(record, where, spec)
    turns = _message_list(record, spec.columns.get("messages", "conversations"), where)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    roles = _sharegpt_roles(spec)
    function_tag, observation_tag = spec.tag("function_tag"), spec.tag("observation_tag")
    messages: list = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            messages.append(turn)  # validate() reports it with its index
            continue
        value = turn.get(role_tag)
        if value == function_tag:  # the assistant's call(s): {"name", "arguments"} as JSON, or a list of them
            _add_tool_calls(messages, _function_calls(turn.get(content_tag), f"{where}: message {i} ({value})"))
            continue
        if value == observation_tag:
            messages.append({"role": "tool", "content": _tool_result(turn.get(content_tag))})
            continue
        if not isinstance(value, str) or value not in roles:
            raise DataError(f"{where}: message {i} has {role_tag}={_preview(value)}; expected one of "
                            f"{', '.join(map(repr, [*roles, function_tag, observation_tag]))}")
        messages.append({"role": roles[value], "content": turn.get(content_tag),
                         **({"loss": turn["loss"]} if "loss" in turn else {})})
    return _with_system_column(validate(messages, where), record, where, spec)


def conversations(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> Conversation:
    """ChatGLM3 finetune-demo shape: {"conversations": [{"role": ..., "content": ...}]}."""
    reject_unsupported_columns(record, where, spec)
    turns = _message_list(record, spec.columns.get("messages", "conversations"), where)
    return _role_content(turns, record, where, spec)


def messages(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> Conversation:
    """OpenAI chat shape: {"messages": [{"role": ..., "content": ...}]}."""
    reject_unsupported_columns(record, where, spec)
    turns = _message_list(record, spec.columns.get("messages", "messages"), where)
    return _role_content(turns, record, where, spec)


FORMATS: dict[str, Callable[[dict, str, FormatSpec], Conversation]] = {
    "alpaca": alpaca, "sharegpt": sharegpt, "conversations": conversations, "messages": messages}


def reject_unsupported_columns(record: dict, where: str, spec: FormatSpec) -> None:
    """Media files change what a sample means; refuse them rather than drop them."""
    media = [spec.column(key) for key in MEDIA_COLUMNS if _is_present(record.get(spec.column(key)))]
    if media:
        raise DataError(f"{where}: multimodal data not supported (record has {', '.join(media)}); lmforge trains "
                        f"text-only models for now, so remove these records or fields")


def _role_content(turns: list, record: dict, where: str, spec: FormatSpec) -> Conversation:
    """role/content messages (ChatGLM3, OpenAI), with each one's way of writing tool use and loss flags."""
    messages: list = []
    tools = _tools(record, where, spec)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            messages.append(turn)  # validate() reports it with its index
            continue
        role = turn.get("role")
        if role == "system" and _is_present(turn.get("tools")):  # ChatGLM3 may carry the tools on the system turn
            tools = tools or validate_tools(turn["tools"], f"{where}: message {i} tools")
        if role == "tool" and ("observation" in turn or "parameters" in turn):  # ChatGLM3: call + result in one
            name = turn.get("name")
            if not isinstance(name, str) or not name:
                raise DataError(f"{where}: message {i} (tool) has no \"name\" (the tool called)")
            arguments = parse_json_object(turn.get("parameters", {}), f"{where}: message {i} (tool) parameters")
            _add_tool_calls(messages, [{"name": name, "arguments": arguments}])
            messages.append({"role": "tool", "name": name, "content": _tool_result(turn.get("observation"))})
            continue
        item = {key: turn[key] for key in ("role", "content", "tool_calls", "name", "loss") if key in turn}
        if role in ("observation", "function"):  # ChatGLM3's and OpenAI's older names of a tool result
            item["role"] = "tool"
            item["content"] = _tool_result(turn.get("content"))
        elif role == "tool":
            item["content"] = _tool_result(turn.get("content"))
        if role == "assistant" and _is_present(turn.get("function_call")):  # OpenAI's older single call
            item["tool_calls"] = [turn["function_call"]]
        if "weight" in turn:  # OpenAI fine-tuning files: weight 0 = do not train this assistant turn
            if turn["weight"] not in (0, 1):
                raise DataError(f"{where}: message {i} has \"weight\": {_preview(turn['weight'])}; expected 0 or 1")
            if turn["weight"] == 0:
                item["loss"] = False
        messages.append(item)
    return _with_system_column(validate(messages, where), record, where, spec, tools)


def _with_system_column(messages: list[dict], record: dict, where: str, spec: FormatSpec,
                        tools: list[dict] | None = None) -> Conversation:
    """Messages already validated (so error indices match the file), plus the record's top-level system prompt
    when the messages do not start with one (a system message in the list wins, as in LLaMA-Factory)."""
    system = _optional_text(record, spec.column("system"), where)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    tools = _tools(record, where, spec) if tools is None else tools
    return Conversation.from_dicts(validate(messages, where), where, tools)


def _tools(record: dict, where: str, spec: FormatSpec) -> list[dict]:
    value = record.get(spec.column("tools"))
    return validate_tools(value, f"{where}: field {spec.column('tools')!r}") if _is_present(value) else []


def _add_tool_calls(messages: list, calls: list[dict]) -> None:
    """Calls join the assistant message right before them (its text is the thought before calling), else they are
    an assistant message of their own."""
    previous = messages[-1] if messages else None
    if isinstance(previous, dict) and previous.get("role") == "assistant" and not previous.get("tool_calls"):
        previous["tool_calls"] = calls
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


def _function_calls(value: object, what: str) -> list[dict]:
    """sharegpt function_call content: {"name", "arguments"} as JSON (or a list of them, for parallel calls)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{what} is not valid JSON ({error.msg} at character {error.pos}): "
                            f"{_preview(value)}") from None
    calls = value if isinstance(value, list) else [value]
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise DataError(f"{what} should be {{\"name\": ..., \"arguments\": {{...}}}} (or a list of them), "
                            f"got {_preview(value)}")
    return [{"name": call["name"], "arguments": parse_json_object(call.get("arguments", {}), f"{what} arguments")}
            for call in calls]


def _tool_result(value: object) -> object:
    """A tool's result as text: JSON values (ChatGLM3's observation need not be a string) are written as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _sharegpt_roles(spec: FormatSpec) -> dict[str, str]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    roles.update({spec.tag("user_tag"): "user", spec.tag("assistant_tag"): "assistant",
                  spec.tag("system_tag"): "system"})
    return roles


def _message_list(record: dict, key: str, where: str) -> list:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (the list of messages); this record has: "
                        f"{', '.join(record) or 'no fields'}")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} should be a non-empty list of messages, got {_preview(turns)}")
    return turns


def _required_text(record: dict, key: str, where: str, required: tuple[str, ...]) -> str:
    if record.get(key) is None:
        raise DataError(f"{where}: missing field {key!r} (alpaca records need {' and '.join(map(repr, required))}; "
                        f"this record has: {', '.join(record) or 'no fields'})")
    return _optional_text(record, key, where)


def _optional_text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__} {_preview(value)}, expected a string")
    return value


def _history_pairs(record: dict, key: str, where: str) -> list[tuple[str, str]]:
    history = record.get(key) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {key!r} should be a list of [user, assistant] pairs, got {_preview(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError(f"{where}: {key}[{i}] should be a [user, assistant] pair of strings, got {_preview(pair)}")
    return [(user, assistant) for user, assistant in history]


def _string_mapping(value: object, known: dict[str, str], name: str, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DataError(f"{where}: {name!r} should be an object of string values, got {_preview(value)}")
    for key in value:
        if key not in known:
            raise DataError(f"{where}: unknown key {key!r} in {name!r}{_did_you_mean(key, known)}; "
                            f"known keys: {', '.join(known)}")
    return dict(value)


def _unknown_shape_hint(record: dict) -> str:
    if "chosen" in record or "rejected" in record:
        return "It looks like preference data (ranking), which is for stage dpo/rm, not sft.\n"
    if set(record) == {"text"}:
        return "It looks like plain pre-training text; sft needs conversations with an assistant reply.\n"
    return ""


def _is_present(value: object) -> bool:
    """True for a non-empty field; LLaMA-Factory files often carry "" or "[]" for "no tools"."""
    return value not in (None, "", "[]", [], {})


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _preview(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text[:60] + ("…" if len(text) > 60 else "")
