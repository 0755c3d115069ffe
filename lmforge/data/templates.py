"""Named chat templates for models that have none of their own (base models), as Jinja strings.

Owns the short table of real templates users name: lmforge's own (chatml, human_assistant) and LLaMA-Factory's common
names (llama3, llama2, qwen, qwen3, qwen3_nothink, mistral, gemma, glm4, alpaca, default, empty), each written to
produce the text LLaMA-Factory's template of that name produces, so a model trained there is prompted the same way
here. Must not touch tokenizers (render.py sets a template on one); the chat template stays the only prompt format.

Where LLaMA-Factory's text has no end to a reply, or ends it outside the text, the table says what it does instead:
- glm4: GLM-4 ends a reply by generating the next role token; LLaMA-Factory trains an eos label there. Here the eos
  token is written after each reply, so the model learns to stop (it is also in the prompt of later turns).
- empty: contents only, nothing between them (as LLaMA-Factory's): generation stops at eos or max tokens.
- alpaca: a system message is followed by a blank line (LLaMA-Factory's runs into "### Instruction:").
- qwen3: ChatML; thinking blocks (<think>) are not added — a Qwen3 model ships its own template, which wins.
System messages: llama2, mistral and gemma put it in front of the first user message, as LLaMA-Factory does.

Tool use, for a chat template that does not render tools itself: LLaMA-Factory's default tool format (tool_prompt,
plain_tool_messages below), so such a model learns one consistent way to call tools.
"""

from __future__ import annotations

import json

_SYSTEM_FIRST = (  # splits off a leading system message for templates that fuse it into the first user turn
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
)
_EOS = "{%- set eos = eos_token | default('', true) %}{%- set bos = bos_token | default('', true) %}"

CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {
    "chatml": CHATML,
    "human_assistant": (
        "{%- set bos = bos_token | default('<s>', true) %}{%- set eos = eos_token | default('</s>', true) %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{ bos + 'System: ' + message['content'] + eos }}"
        "{%- elif message['role'] == 'user' %}{{ bos + 'Human: ' + message['content'] + eos }}"
        "{%- else %}{{ bos + 'Assistant: ' + message['content'] + eos }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ bos + 'Assistant:' }}{%- endif %}"
    ),
}

LLAMAFACTORY_TEMPLATES = {
    "llama3": (
        _EOS + "{{- bos }}{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    "llama2": (
        _EOS + _SYSTEM_FIRST + "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system %}{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
        "message['content'] %}{%- else %}{%- set content = message['content'] %}{%- endif %}"
        "{{- bos + '[INST] ' + content + ' [/INST]' }}"
        "{%- else %}{{- message['content'] + eos }}{%- endif %}{%- endfor %}"
    ),
    "qwen": (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}"
        "{%- endif %}" + CHATML
    ),
    "qwen3": CHATML,
    "qwen3_nothink": CHATML,
    "mistral": (
        _EOS + _SYSTEM_FIRST + "{{- bos }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system %}{%- set content = system + '\\n\\n' + message['content'] %}"
        "{%- else %}{%- set content = message['content'] %}{%- endif %}"
        "{{- '[INST] ' + content + '[/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] + eos }}{%- endif %}{%- endfor %}"
    ),
    "gemma": (
        _EOS + _SYSTEM_FIRST + "{{- bos }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system %}{%- set content = system + '\\n\\n' + message['content'] %}"
        "{%- else %}{%- set content = message['content'] %}{%- endif %}"
        "{{- '<start_of_turn>user\\n' + content + '<end_of_turn>\\n' }}"
        "{%- else %}{{- '<start_of_turn>model\\n' + message['content'] + '<end_of_turn>\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    ),
    "glm4": (
        _EOS + "{{- '[gMASK]<sop>' }}{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
        "{%- if message['role'] == 'assistant' %}{{- eos }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    ),
    "alpaca": (
        _EOS + "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
        "{%- else %}{{- 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\\n\\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if message['role'] == 'user' %}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
    ),
    "default": (
        _EOS + "{%- for message in messages %}{%- if message['role'] == 'system' %}"
        "{{- 'System: ' + message['content'] + eos + '\\n' }}"
        "{%- elif message['role'] == 'user' %}{{- 'Human: ' + message['content'] + eos + '\\nAssistant:' }}"
        "{%- else %}{{- message['content'] + eos + '\\n' }}{%- endif %}{%- endfor %}"
    ),
    "empty": "{%- for message in messages %}{{- message['content'] }}{%- endfor %}",
}

# Tokens a template writes literally; they must be single tokens of the vocabulary, or the model never saw them.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "human_assistant": (),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama2": (),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "qwen3_nothink": ("<|im_start|>", "<|im_end|>"),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "glm4": ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"),
    "alpaca": (),
    "default": (),
    "empty": (),
}


def template_names() -> list[str]:
    return [*NAMED_TEMPLATES, *LLAMAFACTORY_TEMPLATES]


# --- tool use for templates that do not render it ------------------------------------------------------------------
# LLaMA-Factory's default tool format (its DefaultToolUtils): the tools described in the system message, each call
# written as "Action: NAME\nAction Input: {JSON}" in the assistant's reply, each result given back as a user turn.

DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)


def tool_prompt(tools: list[dict]) -> str:
    """The system-message text describing `tools` (OpenAI's {"type": "function", "function": {...}} each)."""
    tool_text, names = "", []
    for tool in tools:
        function = tool.get("function", tool)
        parameters = function.get("parameters") or {}
        required = parameters.get("required", [])
        args = ""
        for name, param in (parameters.get("properties") or {}).items():
            enum = f", should be one of [{', '.join(map(str, param['enum']))}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            args += (f"  - {name} ({param.get('type', '')}{', required' if name in required else ''}): "
                     f"{param.get('description', '')}{enum}{items}\n")
        tool_text += (f"> Tool Name: {function['name']}\nTool Description: {function.get('description', '')}\n"
                      f"Tool Args:\n{args}\n")
        names.append(function["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def tool_call_text(calls: list[dict]) -> str:
    return "\n".join(f"Action: {call['function']['name']}\nAction Input: "
                     f"{json.dumps(call['function']['arguments'], ensure_ascii=False)}" for call in calls)


def plain_tool_messages(messages: list[dict], tools: list[dict], untrained: frozenset[int]
                        ) -> tuple[list[dict], frozenset[int]]:
    """Tool use as plain system / user / assistant messages in the default tool format; the indices of untrained
    turns follow the messages (consecutive tool results become one user turn)."""
    out: list[dict] = []
    still_untrained = set()
    if tools:
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + tool_prompt(tools)})
            messages = messages[1:]
            untrained = frozenset(i - 1 for i in untrained)
        else:
            out.append({"role": "system", "content": tool_prompt(tools)})
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + message["content"]
                continue
            out.append({"role": "user", "content": message["content"], "_results": True})
            continue
        if message.get("tool_calls"):
            text = tool_call_text(message["tool_calls"])
            message = {"role": "assistant", "content": f"{message['content']}\n{text}" if message["content"] else text}
        else:
            message = {"role": message["role"], "content": message["content"]}
        if i in untrained:
            still_untrained.add(len(out))
        out.append(message)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out], frozenset(still_untrained)
