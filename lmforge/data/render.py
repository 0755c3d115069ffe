"""Conversation + tokenizer → Example: token ids and the labels that carry loss.

The tokenizer's own chat template is the only prompt format, for training and inference alike. Trained tokens are
found by prefix difference: the text of messages[:k] with a generation prompt must be a prefix of messages[:k+1],
which must be a prefix of the whole conversation; the tokens in between are assistant turn k. A template that breaks
this is refused. A model without a template takes a named one (templates.py: chatml, human_assistant and LLaMA-Factory's
common names) set on the tokenizer as Jinja; a model with one keeps it when a LLaMA-Factory name is given.
Tool use (tool descriptions, the assistant's tool calls, tool results) goes through the chat template when it renders
them (Qwen2.5 / Llama 3.1 style, `tools=`), else through LLaMA-Factory's default tool format (templates.py); the
assistant's calls train like any reply, tool results never do, and a turn marked "loss": false does not either.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..conversation import Conversation
from ..errors import ConfigError, DataError
from .templates import (
    LLAMAFACTORY_TEMPLATES,
    NAMED_TEMPLATES,
    TEMPLATE_TOKENS,
    plain_tool_messages,
    template_names,
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where no loss

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def ensure_chat_template(tokenizer, template: str | None) -> str | None:
    """Make sure the tokenizer has the chat template training will use; return a note for the user, if any.

    chatml / human_assistant (lmforge's names) and a Jinja string replace the model's own template. A LLaMA-Factory
    name (llama3, qwen, …) is what LLaMA-Factory needs to format any model; here the model's own template wins, with
    a note when the name would render differently, and the name's real template is set only on a model without one."""
    if template is None:
        if not tokenizer.chat_template:
            raise ConfigError(
                "the model has no chat template (it is probably a base model): set model.template to one of "
                f"{', '.join(template_names())} or to a Jinja template string")
        return None
    if template in NAMED_TEMPLATES:
        _check_template_tokens(tokenizer, template)
        had_own = bool(tokenizer.chat_template)
        tokenizer.chat_template = NAMED_TEMPLATES[template]
        return f"chat template {template!r} replaces the model's own" if had_own else None
    if "{%" in template or "{{" in template:
        tokenizer.chat_template = template
        return "using the Jinja chat template from model.template"
    if template in LLAMAFACTORY_TEMPLATES:
        if tokenizer.chat_template:
            if _renders_alike(tokenizer, LLAMAFACTORY_TEMPLATES[template]):
                return f"template {template!r} ignored: the model's own chat template is used (it renders the same)"
            return (f"template {template!r} ignored: the model's own chat template is used, and it renders "
                    f"conversations differently from LLaMA-Factory's {template!r} — check that the name fits this "
                    f"model (set model.template to a Jinja string to force a format)")
        _check_template_tokens(tokenizer, template)
        tokenizer.chat_template = LLAMAFACTORY_TEMPLATES[template]
        return f"the model has no chat template: using {template!r} (LLaMA-Factory's format of that name)"
    if tokenizer.chat_template:  # another LLaMA-Factory name: the tokenizer's own template is the real one
        return f"template {template!r} ignored: lmforge always uses the model's own chat template"
    raise ConfigError(f"model.template {template!r} is not a template lmforge knows, and the model has none of its "
                      f"own: use one of {', '.join(template_names())} or a Jinja template string")


_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
          {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]


def _renders_alike(tokenizer, other: str) -> bool:
    try:
        return render_text(tokenizer, _PROBE) == tokenizer.apply_chat_template(_PROBE, chat_template=other,
                                                                               tokenize=False)
    except Exception:  # a template that cannot render the probe (e.g. no system role) is not alike
        return False


def _check_template_tokens(tokenizer, template: str) -> None:
    missing = [t for t in TEMPLATE_TOKENS[template] if not _is_single_token(tokenizer, t)]
    if missing:
        raise ConfigError(
            f"model.template {template!r} needs the tokens {', '.join(missing)}, which this tokenizer does not "
            f"have; use model.template: human_assistant (built from the model's own bos/eos tokens), or a template "
            f"without special tokens (alpaca, default, llama2, mistral)")


def _is_single_token(tokenizer, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id  # a vocabulary may map an unknown word to one <unk>


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool_lmforge", "description": "d",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE_CALLS = [{"role": "user", "content": "u"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "probe_call_lmforge", "arguments": {"a": 1}}}]},
                {"role": "tool", "name": "probe_call_lmforge", "content": "probe_result_lmforge"},
                {"role": "assistant", "content": "done"}]
_RENDERS_TOOLS: dict[str, bool] = {}


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes tool descriptions, tool calls and tool results (Qwen2.5, Llama 3.1, …)."""
    template = tokenizer.chat_template or ""
    if template not in _RENDERS_TOOLS:
        try:
            text = render_text(tokenizer, _PROBE_CALLS, tools=_PROBE_TOOLS)
            _RENDERS_TOOLS[template] = all(marker in text for marker in
                                           ("probe_tool_lmforge", "probe_call_lmforge", "probe_result_lmforge"))
        except Exception:  # a template that raises on tools or tool roles does not render them
            _RENDERS_TOOLS[template] = False
    return _RENDERS_TOOLS[template]


def chat_messages(tokenizer, conversation: Conversation) -> tuple[list[dict], list[dict] | None, frozenset[int]]:
    """What the chat template renders for a conversation: (messages, tools or None, indices of untrained turns).
    A conversation using tools keeps them for a template that renders them; for any other template they become
    plain system / user / assistant text in LLaMA-Factory's default tool format."""
    messages = conversation.to_dicts()
    untrained = frozenset(i for i, m in enumerate(conversation.messages) if m.train is False)
    if not conversation.uses_tools:
        return messages, None, untrained
    if template_renders_tools(tokenizer):
        return messages, list(conversation.tools) or None, untrained
    plain, untrained = plain_tool_messages(messages, list(conversation.tools), untrained)
    return plain, None, untrained


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (inference); `tools` as the template
    takes them (template_renders_tools).

    One render, linear in the conversation (a server renders long chats on every request). Earlier assistant replies
    are cut out where their text sits in the render, which is where training cuts them for the templates that put a
    reply right after its generation prompt; so the tokens equal training's without rendering every prefix."""
    text = render_text(tokenizer, messages, add_generation_prompt=True, tools=tools)
    return _tokenize(tokenizer, text, _reply_spans(text, messages), [])[0]


def prompt_heads(tokenizer, conversations: list[list[dict]], prompts: list[list[int]]) -> list[int]:
    """For each rendered prompt, how many of its first tokens do not depend on the first user message's text: the
    template's head, with the system prompt (the template's default or the conversation's own) and the user turn's
    opening. Conversations with the same messages before the first user message share it, so a batch can prefill it
    once. A function of one conversation alone (found by rendering it with that text replaced twice and keeping what
    both renders share with the real one), so a prompt is split the same way whatever else is in its batch."""
    variants: dict[str, tuple[list[int], list[int]]] = {}
    heads = []
    for messages, prompt in zip(conversations, prompts):
        first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first_user is None or not isinstance(messages[first_user].get("content"), str):
            heads.append(0)
            continue
        key = repr(messages[:first_user])
        if key not in variants:
            variants[key] = tuple(render_prompt(tokenizer, messages[:first_user] + [{"role": "user", "content": text}])
                                  for text in ("A", "Z"))
        heads.append(min(common_prefix(variant, prompt) for variant in variants[key]))
    return heads


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _reply_spans(text: str, messages: list[dict]) -> list[tuple]:
    """Character spans of the assistant replies in `text`, found in order; stops at the first message whose text
    the template did not render verbatim (nothing after it is cut)."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        if not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            break
        if message["role"] == "assistant":
            spans.append((at, at + len(content)))
        cursor = at + len(content)
    return spans


def assistant_spans(tokenizer, messages: list[dict], train_on: str, where: str = "", tools: list[dict] | None = None,
                    untrained: frozenset[int] = frozenset()) -> tuple[str, list[tuple]]:
    """Render the conversation; return (text, [(start, end) character spans that carry loss]). Assistant turns in
    `untrained` ("loss": false) carry none."""
    try:
        full = render_text(tokenizer, messages, tools=tools)
    except Exception as error:  # jinja2's TemplateError, or raise_exception() inside the template itself
        raise DataError(f"{where}: the model's chat template cannot render this conversation: {error}") from None
    if train_on == "all":
        return full, [(0, len(full))]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for k in turns:
        if k in untrained:
            continue
        prompt = render_text(tokenizer, messages[:k], add_generation_prompt=True, tools=tools)
        upto = full if k == len(messages) - 1 else render_text(tokenizer, messages[:k + 1], tools=tools)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise ConfigError(
                f"{where}: the chat template is not prefix-preserving at assistant message {k} (rendering the "
                f"earlier messages is not a prefix of rendering more of them), so the trained tokens cannot be "
                f"found exactly. Use data.train_on: last_assistant, or set model.template")
        end = len(upto.rstrip())  # the turn ends with its end-of-turn token; trailing newlines are not trained
        spans.append((len(prompt), end))
    return full, spans


def render_example(tokenizer, conversation: Conversation, train_on: str = "assistant") -> Example:
    messages, tools, untrained = chat_messages(tokenizer, conversation)
    text, spans = assistant_spans(tokenizer, messages, train_on, conversation.source, tools, untrained)
    turns = spans if train_on == "assistant" and not untrained else _turn_spans(tokenizer, messages, tools)
    ids, labels = _tokenize(tokenizer, text, turns, spans)
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{conversation.source}: no trainable tokens after rendering (empty assistant reply?)")
    return Example(ids, labels)


def _turn_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[tuple]:
    """Spans of every assistant turn, or none if the template is not prefix-preserving (then only trained spans cut)."""
    try:
        return assistant_spans(tokenizer, messages, "assistant", tools=tools)[1]
    except ConfigError:
        return []


def _tokenize(tokenizer, text: str, turns: list[tuple], trained: list[tuple]) -> tuple[list[int], list[int]]:
    """Tokenize `text` in pieces cut at both ends of every assistant turn; labels on the pieces inside `trained`.

    Tokenizing the whole text at once lets a token straddle a turn's start (e.g. the generation prompt's "\n" merged
    with a reply's leading whitespace): that token would be half prompt, half reply, and the prompt tokens would differ
    from render_prompt's at inference. Cutting the same way here and in render_prompt keeps them identical.
    """
    cuts = sorted({0, len(text), *(bound for span in (*turns, *trained) for bound in span)})
    ids, labels = [], []
    for lo, hi in zip(cuts, cuts[1:]):
        piece = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if any(start <= lo and hi <= end for start, end in trained) else [IGNORE_INDEX] * len(piece)
    return ids, labels


@dataclass
class RenderStats:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_cutoff: int = 0

    def summary(self) -> str:
        return (f"{self.read} conversations → {self.kept} examples "
                f"({self.truncated} truncated to cutoff_len, {self.dropped_cutoff} dropped: nothing trainable "
                f"left within cutoff_len)")


def render_dataset(tokenizer, conversations: list[Conversation], train_on: str, cutoff_len: int
                   ) -> tuple[list[Example], RenderStats]:
    """Render every conversation; truncate to cutoff_len; drop (and count) examples left with no trained token."""
    stats = RenderStats(read=len(conversations))
    examples = []
    for conversation in conversations:
        example = render_example(tokenizer, conversation, train_on)
        if len(example.input_ids) > cutoff_len:
            example = Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])
            if example.num_supervised == 0:
                stats.dropped_cutoff += 1
                continue
            stats.truncated += 1
        examples.append(example)
    stats.kept = len(examples)
    return examples, stats


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under this template (for stopping generation)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text, spans = assistant_spans(tokenizer, messages, "assistant")
    start, end = spans[0]
    tail = text[start:end]
    tail = tail[tail.rfind("y") + 1:]
    ids = set(tokenizer(tail, add_special_tokens=False)["input_ids"][:1]) if tail else set()
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.add(eos)
    return sorted(ids)
