"""Preference data → Conversations ending in the judged reply: pairs for dpo/orpo/simpo/rm ({"messages"|"prompt",
"chosen", "rejected"}; LLaMA-Factory's alpaca/sharegpt forms with `ranking: true`) and labelled replies for kto
({"messages", "label"}; LLaMA-Factory's `kto_tag` column). Prompts go through formats.py's converters, so they get
the sft checks. Must not tokenize; files are read through sources.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..conversation import Conversation
from ..errors import DataError
from . import formats
from .datasets import DatasetSpec, dataset_files
from .formats import FormatSpec, _preview
from .sources import read_records


@dataclass(frozen=True)
class PreferencePair:
    """Two conversations with the same prompt, differing in the last (assistant) message."""
    chosen: Conversation
    rejected: Conversation


@dataclass(frozen=True)
class LabelledReply:
    """A conversation whose last assistant message is judged desirable (True) or undesirable (False)."""
    conversation: Conversation
    desirable: bool


def detect_pair_format(record: dict, where: str) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "messages" in record or "prompt" in record:
        return "messages"
    raise DataError(f"{where}: cannot tell the shape of this preference record (its keys: "
                    f"{', '.join(record) or 'none'}); lmforge reads pairs shaped like:\n"
                    f"  {{\"messages\": [{{\"role\": \"user\", \"content\": ...}}], "
                    f"\"chosen\": ..., \"rejected\": ...}}\n"
                    f"  {{\"prompt\": \"...\", \"chosen\": \"...\", \"rejected\": \"...\"}}\n"
                    f"  {{\"conversations\": [{{\"from\": \"human\", \"value\": ...}}], "
                    f"\"chosen\": {{\"from\": \"gpt\", "
                    f"\"value\": ...}}, \"rejected\": {{...}}}}   (LLaMA-Factory sharegpt)\n"
                    f"  {{\"instruction\": ..., \"input\": ..., \"chosen\": \"...\", \"rejected\": \"...\"}}   "
                    f"(LLaMA-Factory alpaca)")


def pair_from_record(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> PreferencePair:
    shape = detect_pair_format(record, where) if spec.format == "auto" else _pair_shape(spec.format)
    keys = (spec.column("chosen"), spec.column("rejected"))
    missing = [key for key in keys if key not in record or record[key] in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}: a preference pair needs both {keys[0]!r} and "
                        f"{keys[1]!r} (this record has: {', '.join(record) or 'no fields'}); a reply without a "
                        f"counterpart belongs in sft data, or in kto data with a true/false label")
    chosen, rejected = (_with_reply(record, _reply_text(record[key], key, where, spec), where, spec, shape)
                        for key in keys)
    return PreferencePair(chosen, rejected)


def labelled_from_record(record: dict, where: str, spec: FormatSpec = FormatSpec()) -> LabelledReply:
    label_key = spec.columns.get("kto_tag", "label")
    if label_key not in record:
        raise DataError(f"{where}: missing field {label_key!r}: KTO data labels each reply true (desirable) or false "
                        f"(undesirable); this record has: {', '.join(record) or 'no fields'}")
    label = record[label_key]
    if not isinstance(label, bool):
        raise DataError(f"{where}: field {label_key!r} is {_preview(label)}; expected true or false")
    body = {k: v for k, v in record.items() if k != label_key}
    if spec.format == "auto" and "completion" in body and "prompt" in body:  # TRL's {"prompt", "completion", "label"}
        body = {"messages": _prompt_messages(body["prompt"], where) +
                [{"role": "assistant", "content": _reply_text(body["completion"], "completion", where, spec)}]}
    conversation = formats.convert(body, where, spec)
    if conversation.messages[-1].role != "assistant":
        raise DataError(f"{where}: a KTO record must end with the assistant reply that the label judges")
    return LabelledReply(conversation, label)


def load_pairs(specs: list[DatasetSpec], max_samples: int | None = None) -> tuple[list[PreferencePair], dict]:
    return _load(specs, max_samples, pair_from_record)


def load_labelled(specs: list[DatasetSpec], max_samples: int | None = None) -> tuple[list[LabelledReply], dict]:
    items, counts = _load(specs, max_samples, labelled_from_record)
    kinds = {item.desirable for item in items}
    if len(kinds) < 2:
        raise DataError(f"KTO data: every reply is labelled {'desirable' if True in kinds else 'undesirable'}; KTO "
                        f"needs both kinds (true and false labels)")
    return items, counts


def _load(specs, max_samples, convert_one):
    items, counts = [], {}
    for spec in specs:
        before = len(items)
        for path in dataset_files(spec.path):
            for record, where in read_records(path, spec.file_format):
                if max_samples is not None and len(items) - before >= max_samples:
                    break
                items.append(convert_one(record, where, spec.format))
        if len(items) == before:
            raise DataError(f"{spec.path}: dataset {spec.name or str(spec.path)!r} has no records")
        counts[spec.name] = counts.get(spec.name, 0) + len(items) - before
    return items, counts


def _pair_shape(format_name: str) -> str:
    return "messages" if format_name in ("messages", "conversations") else format_name


def _reply_text(value: object, key: str, where: str, spec: FormatSpec) -> str:
    """A reply given as a string, an assistant message ({"role", "content"} or sharegpt {"from", "value"}), or a
    one-message list of either."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for role_key, content_key in (("role", "content"), (spec.tag("role_tag"), spec.tag("content_tag"))):
            if content_key in value:
                role = value.get(role_key, "assistant")
                if role not in ("assistant", "gpt", spec.tag("assistant_tag")):
                    raise DataError(f"{where}: {key!r} is a message from {role!r}; the judged reply must be the "
                                    f"assistant's")
                if not isinstance(value[content_key], str):
                    break
                return value[content_key]
    raise DataError(f"{where}: field {key!r} is {_preview(value)}; expected the reply as a string or an assistant "
                    f"message like {{\"role\": \"assistant\", \"content\": \"...\"}}")


def _prompt_messages(prompt: object, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return list(prompt)
    raise DataError(f"{where}: field 'prompt' is {_preview(prompt)}; expected a string or a list of messages")


def _with_reply(record: dict, reply: str, where: str, spec: FormatSpec, shape: str) -> Conversation:
    """The record's prompt followed by `reply` as the last assistant message, read by the sft converters."""
    chosen_key, rejected_key = spec.column("chosen"), spec.column("rejected")
    base = {k: v for k, v in record.items() if k not in (chosen_key, rejected_key)}
    if shape == "alpaca":
        return formats.alpaca({**base, spec.column("response"): reply}, where, spec)
    if shape == "sharegpt":
        key = spec.columns.get("messages", "conversations")
        turns = base.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {key!r} should be the non-empty list of prompt messages, got "
                            f"{_preview(turns)}")
        reply_turn = {spec.tag("role_tag"): spec.tag("assistant_tag"), spec.tag("content_tag"): reply}
        return formats.sharegpt({**base, key: [*turns, reply_turn]}, where, spec)
    prompt = base.pop("messages") if "messages" in base else base.pop("prompt", None)
    if prompt is None:
        raise DataError(f"{where}: missing field 'messages' (or 'prompt'): the conversation before the judged reply")
    messages = [*_prompt_messages(prompt, where), {"role": "assistant", "content": reply}]
    return formats.messages({**base, "messages": messages}, where, replace(spec, format="messages"))
