"""Ollama Modelfile: the training chat template (Jinja) restated as an Ollama TEMPLATE (Go text/template), checked.

The TEMPLATE is derived, not looked up: the Jinja template is rendered with marker contents to find the text each
role puts before and after its content, the generation prompt, a BOS written once at the start, and a default system
prompt (which becomes SYSTEM: Ollama injects it as a system message when a chat has none). A template that is not
"per message: prefix + content + suffix" cannot be restated, and `TemplateNotExpressible` says why; one exception is
understood: a system prompt written inside the first user turn, before its content (Gemma's templates), which the
TEMPLATE writes there too. `ollama_prompt` evaluates the small Go-template subset used here with
Ollama's message handling, so the export can prove both templates give the same prompt text.
Must not load models or write weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.render import end_of_turn_ids


class TemplateNotExpressible(ValueError):
    """The chat template cannot be restated as a per-message Ollama TEMPLATE."""


@dataclass(frozen=True)
class TurnFormat:
    start: str  # written once before the first message (a BOS the template writes itself), else ""
    system: tuple[str, str]  # (before content, after content)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the generation prompt that opens the assistant's reply
    default_system: str | None  # what the template says when the conversation has no system message
    folded_system: str | None = None  # Gemma: no system turn; the system text + this separator opens the first
    #                                   user turn's content (system stays ("", ""))


_SYSTEM, _USER_1, _ASSISTANT_1, _USER_2 = ("⟦lmforge:system⟧", "⟦lmforge:user-1⟧", "⟦lmforge:assistant-1⟧",
                                          "⟦lmforge:user-2⟧")


def derive_turn_format(tokenizer) -> TurnFormat:
    """Read the per-role text around contents off the tokenizer's chat template by rendering marker contents."""
    system, user_1 = {"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER_1}
    assistant_1, user_2 = {"role": "assistant", "content": _ASSISTANT_1}, {"role": "user", "content": _USER_2}
    try:
        full = _render(tokenizer, [system, user_1, assistant_1, user_2], True)
        user_alone = _render(tokenizer, [user_1], False)
        user_prompt = _render(tokenizer, [user_1], True)
        pair = _render(tokenizer, [user_1, assistant_1], False)
    except Exception as error:  # the template's own raise_exception (e.g. "system role not supported")
        raise TemplateNotExpressible(f"the chat template rejects a system/user/assistant conversation: {error}") \
            from None
    head, g_system_user, g_user_assistant, g_assistant_user, tail = _pieces(full, [_SYSTEM, _USER_1, _ASSISTANT_1,
                                                                                _USER_2])
    alone_head, user_suffix = _pieces(user_alone, [_USER_1])
    if not user_prompt.startswith(user_alone):
        raise TemplateNotExpressible("adding the generation prompt changes the text before it")
    generation = user_prompt[len(user_alone):]
    assistant_suffix = _pieces(pair, [_USER_1, _ASSISTANT_1])[2]
    assistant_prefix = _strip_prefix(g_user_assistant, user_suffix, "user turn end / assistant turn start")
    user_prefix = _strip_prefix(g_assistant_user, assistant_suffix, "assistant turn end / user turn start")
    if tail != user_suffix + generation:
        raise TemplateNotExpressible("the last user turn is rendered differently from the first one")
    bos = tokenizer.bos_token or ""
    # A BOS the template writes once (Llama 3's {{ bos_token }}), not a turn marker that happens to be the BOS token
    # (SmolLM2's BOS is <|im_start|>, which opens every turn).
    start = bos if bos and head.startswith(bos) and not user_prefix.startswith(bos) else ""
    system_prefix = head[len(start):]
    if system_prefix == user_prefix and not g_system_user.endswith(user_prefix):
        # No system turn: the system text is written inside the first user turn, then a separator, then its content
        return _folded_system_format(tokenizer, start, user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                                     generation, alone_head, g_system_user)
    system_suffix = _strip_suffix(g_system_user, user_prefix, "system turn end / user turn start")
    before_user = _strip_suffix(_strip_prefix(alone_head, start, "start of text"), user_prefix,
                                "text before the first user turn")
    default_system = None
    if before_user:
        if not (before_user.startswith(system_prefix) and before_user.endswith(system_suffix)
                and len(before_user) >= len(system_prefix) + len(system_suffix)):
            raise TemplateNotExpressible("the template writes text before the first message that is not a system turn")
        default_system = before_user[len(system_prefix):len(before_user) - len(system_suffix)]
    return TurnFormat(start, (system_prefix, system_suffix), (user_prefix, user_suffix),
                      (assistant_prefix, assistant_suffix), generation, default_system)


def _folded_system_format(tokenizer, start: str, user_prefix: str, user_suffix: str, assistant_prefix: str,
                          assistant_suffix: str, generation: str, alone_head: str, separator: str) -> TurnFormat:
    """Gemma's shape: checked on a system + user + assistant + user conversation that only the first user turn
    carries the system text, and that a conversation without one starts with the plain user turn."""
    if alone_head != start + user_prefix:
        raise TemplateNotExpressible("the template writes text before the first message that is not a system prompt")
    system, user_1 = {"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER_1}
    assistant_1, user_2 = {"role": "assistant", "content": _ASSISTANT_1}, {"role": "user", "content": _USER_2}
    expected = (start + user_prefix + _SYSTEM + separator + _USER_1 + user_suffix + assistant_prefix + _ASSISTANT_1
                + assistant_suffix + user_prefix + _USER_2 + user_suffix + generation)
    if _render(tokenizer, [system, user_1, assistant_1, user_2], True) != expected:
        raise TemplateNotExpressible("the system prompt is not written once, at the start of the first user turn")
    return TurnFormat(start, ("", ""), (user_prefix, user_suffix), (assistant_prefix, assistant_suffix), generation,
                      None, folded_system=separator)


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _pieces(text: str, markers: list[str]) -> list[str]:
    """The text around each marker, in order; every marker must appear exactly once."""
    pieces = []
    for marker in markers:
        if text.count(marker) != 1:
            raise TemplateNotExpressible("the template does not write each message's content exactly once, as given")
        before, text = text.split(marker)
        pieces.append(before)
    return pieces + [text]


def _strip_prefix(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise TemplateNotExpressible(f"turns are not rendered the same way everywhere ({where})")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, where: str) -> str:
    if not text.endswith(suffix):
        raise TemplateNotExpressible(f"turns are not rendered the same way everywhere ({where})")
    return text[:len(text) - len(suffix)]


def go_template(turns: TurnFormat, bos_added: bool) -> str:
    """The Ollama TEMPLATE for these turns. No trim markers: every character outside {{ }} is literal.
    When llama.cpp adds BOS itself (`bos_added`), the template's own leading BOS is left out."""
    for text in (turns.start, *turns.system, *turns.user, *turns.assistant, turns.generation,
                 turns.folded_system or ""):
        if "{{" in text or '"""' in text:
            raise TemplateNotExpressible('the template text contains "{{" or """, which a Modelfile TEMPLATE '
                                         'cannot hold')
    start = "" if bos_added else turns.start
    if turns.folded_system is not None:
        # Ollama keeps the system message first in .Messages (the Modelfile SYSTEM is inserted there when a chat has
        # none), so the first user turn is message 1; .System is the system text.
        (user_prefix, user_suffix), (assistant_prefix, assistant_suffix) = turns.user, turns.assistant
        return (f'{start}{{{{ range $i, $_ := .Messages }}}}{{{{ if eq .Role "user" }}}}{user_prefix}'
                f'{{{{ if eq $i 1 }}}}{{{{ if $.System }}}}{{{{ $.System }}}}{turns.folded_system}{{{{ end }}}}'
                f'{{{{ end }}}}{{{{ .Content }}}}{user_suffix}{{{{ else if eq .Role "assistant" }}}}{assistant_prefix}'
                f'{{{{ .Content }}}}{assistant_suffix}{{{{ end }}}}{{{{ end }}}}{turns.generation}')
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}'
        for i, (role, (prefix, suffix)) in enumerate((("system", turns.system), ("user", turns.user),
                                                       ("assistant", turns.assistant))))
    return f"{start}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{turns.generation}"


def build_modelfile(tokenizer, source: str, bos_added: bool, context_length: int, generation_config=None,
                    header: str = "") -> str:
    """The Modelfile text: FROM, TEMPLATE, SYSTEM (the template's default), stop tokens and default parameters."""
    turns = derive_turn_format(tokenizer)
    lines = [f"# {header}" if header else "# Ollama Modelfile", f"FROM {source}",
             f'TEMPLATE """{go_template(turns, bos_added)}"""']
    if turns.default_system is not None:
        if '"""' in turns.default_system:
            raise TemplateNotExpressible('the default system prompt contains """, which a Modelfile cannot hold')
        lines.append(f'SYSTEM """{turns.default_system}"""')
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)))
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    lines.append(f"PARAMETER num_ctx {min(context_length, 4096)}")
    lines += [f"PARAMETER {name} {value}" for name, value in _sampling(generation_config)]
    return "\n".join(lines) + "\n"


def _sampling(generation_config) -> list[tuple[str, object]]:
    """The model's own sampling defaults; without any, greedy decoding, which is what `lmforge chat` and the export
    verification use (Ollama's own default would be temperature 0.8)."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return [("temperature", 0)]
    pairs = [("temperature", generation_config.temperature), ("top_p", generation_config.top_p),
             ("top_k", generation_config.top_k), ("repeat_penalty", generation_config.repetition_penalty)]
    return [(name, value) for name, value in pairs if value is not None]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETERs of a Modelfile (the subset build_modelfile writes)."""
    found: dict = {"parameters": []}
    for match in re.finditer(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, flags=re.MULTILINE | re.DOTALL):
        found[match.group(1).lower()] = match.group(2)
    for line in text.splitlines():
        if line.startswith("FROM "):
            found["from"] = line[5:].strip()
        elif line.startswith("PARAMETER "):
            name, value = line[10:].split(" ", 1)
            found["parameters"].append((name, value))
    return found


# ---------------------------------------------------------------------------------------------- Ollama's rendering


def ollama_prompt(template: str, system: str | None, messages: list[dict]) -> str:
    """The prompt text Ollama's /api/chat builds: the Modelfile SYSTEM prepended when the chat has no system message,
    consecutive messages of one role merged with a blank line, then the TEMPLATE with .System and .Messages."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["role"] == message["role"]:
            collated[-1] = {**collated[-1], "content": collated[-1]["content"] + "\n\n" + message["content"]}
        else:
            collated.append(dict(message))
    joined_system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    top = {"System": joined_system, "Messages": collated}
    return _execute(_parse(template), top, top)


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _parse(template: str) -> list:
    """Go text/template → nested nodes, for: literal text, trim markers, {{ .Field }} / {{ $.Field }},
    {{ range [$i, $_ :=] .Messages }}, {{ if / else if COND }} with COND = FIELD, eq FIELD "text" or eq $i NUMBER
    (the range index), {{ else }}, {{ end }}. Anything else is refused rather than misread."""
    tokens: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        position, trim_next = match.end(), bool(match.group(3))
    tail = template[position:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    nodes, rest = _parse_list(tokens, 0)
    if rest != len(tokens):
        raise ValueError("unbalanced {{ end }} in Go template")
    return nodes


def _parse_list(tokens: list, index: int) -> tuple[list, int]:
    nodes: list = []
    while index < len(tokens):
        kind, value = tokens[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
        elif value == "end" or value == "else" or value.startswith("else if "):
            return nodes, index
        elif value.startswith("range "):
            body, index = _parse_list(tokens, index + 1)
            nodes.append(("range", *_range_field(value), body))
            index = _expect_end(tokens, index)
        elif value.startswith("if "):
            node, index = _parse_if(tokens, value[3:], index + 1)
            nodes.append(node)
        else:
            nodes.append(("field", _field(value)))
            index += 1
    return nodes, index


def _parse_if(tokens: list, condition: str, index: int) -> tuple[tuple, int]:
    body, index = _parse_list(tokens, index)
    otherwise: list = []
    value = tokens[index][1] if index < len(tokens) else ""
    if value.startswith("else if "):
        nested, index = _parse_if(tokens, value[8:], index + 1)
        return ("if", _condition(condition), body, [nested]), index
    if value == "else":
        otherwise, index = _parse_list(tokens, index + 1)
    return ("if", _condition(condition), body, otherwise), _expect_end(tokens, index)


def _expect_end(tokens: list, index: int) -> int:
    if index >= len(tokens) or tokens[index][1] != "end":
        raise ValueError("missing {{ end }} in Go template")
    return index + 1


def _range_field(action: str) -> tuple[str, str | None]:
    """(the field ranged over, the index variable's name or None)."""
    match = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*\$\w*\s*:=\s*)?(\$?\.\w+)", action)
    if not match:
        raise ValueError(f"unsupported Go template action {{{{ {action} }}}}")
    return _field(match.group(2)), match.group(1)


def _field(expression: str) -> str:
    match = re.fullmatch(r"(\$?)\.(\w+)", expression.strip())
    if not match:
        raise ValueError(f"unsupported Go template action {{{{ {expression} }}}}")
    return match.group(1) + match.group(2)


def _condition(expression: str) -> tuple:
    match = re.fullmatch(r'eq\s+(\$?\.\w+)\s+"([^"]*)"', expression.strip())
    if match:
        return ("eq", _field(match.group(1)), match.group(2))
    match = re.fullmatch(r"eq\s+(\$\w+)\s+(\d+)", expression.strip())
    if match:  # a variable against a number: the range index
        return ("eq", match.group(1), int(match.group(2)))
    return ("truthy", _field(expression))


def _lookup(name: str, dot: dict, top: dict, variables: dict):
    if name in variables:
        return variables[name]
    return top.get(name[1:]) if name.startswith("$") else dot.get(name.lower() if name in ("Role", "Content") else name)


def _execute(nodes: list, dot: dict, top: dict, variables: dict | None = None) -> str:
    variables = variables or {}
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_lookup(node[1], dot, top, variables) or ""))
        elif node[0] == "range":
            _, field, index_name, body = node
            for index, item in enumerate(_lookup(field, dot, top, variables) or []):
                out.append(_execute(body, item, top, {**variables, index_name: index} if index_name else variables))
        else:
            condition = node[1]
            value = _lookup(condition[1], dot, top, variables)
            holds = value == condition[2] if condition[0] == "eq" else bool(value)
            out.append(_execute(node[2] if holds else node[3], dot, top, variables))
    return "".join(out)
