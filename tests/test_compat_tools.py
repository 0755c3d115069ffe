"""Tool-call data: rendered through the chat template when it takes `tools` (a compact Qwen2.5-style template here),
else in LLaMA-Factory's default tool format; the assistant's tool calls train like replies, tool results never do,
and a turn with "loss": false does not either. Records in ChatGLM3's and sharegpt's spellings."""

from __future__ import annotations

import json

import pytest
from conftest import supervised_texts, tiny_tokenizer

from lmforge.data.formats import FormatSpec, convert
from lmforge.data.render import render_example, render_prompt, template_renders_tools
from lmforge.errors import DataError

# Qwen2.5's chat template, cut to its tool-use parts (same text for tools, tool calls and tool responses).
QWEN25_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}"
    "{%- endif %}{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{{- '\\n<tool_call>\\n{\"name\": \"' }}"
    "{{- tool_call.function.name }}{{- '\", \"arguments\": ' }}{{- tool_call.function.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATGLM3_RECORD = {
    "tools": [{"name": "search_law", "description": "find a statute",
               "parameters": {"type": "object", "properties": {"keyword": {"type": "string", "description": "word"}},
                              "required": ["keyword"]}}],
    "conversations": [{"role": "system", "content": "You are a legal assistant."},
                      {"role": "user", "content": "What is the limitation period?"},
                      {"role": "assistant", "content": "Let me look."},
                      {"role": "tool", "name": "search_law", "parameters": {"keyword": "limitation"},
                       "observation": {"article": 188, "years": 3}},
                      {"role": "tool", "name": "search_law", "parameters": {"keyword": "start"},
                       "observation": "from when the right holder knows"},
                      {"role": "assistant", "content": "Three years, from when you knew."}]}


def test_a_template_that_takes_tools_renders_them():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN25_STYLE
    assert template_renders_tools(tokenizer)
    conversation = convert(CHATGLM3_RECORD, "legal.jsonl:3")
    example = render_example(tokenizer, conversation)
    text = tokenizer.decode(example.input_ids)
    assert '# Tools\n\n<tools>\n{"type": "function", "function": {"name": "search_law"' in text
    assert '<|im_start|>user\n<tool_response>\n{"article": 188, "years": 3}\n</tool_response><|im_end|>' in text
    # each ChatGLM3 tool turn is a call (after the thought before it) and its result
    assert supervised_texts(tokenizer, example) == [
        'Let me look.\n<tool_call>\n{"name": "search_law", "arguments": {"keyword": "limitation"}}\n</tool_call>'
        '<|im_end|>',
        '<tool_call>\n{"name": "search_law", "arguments": {"keyword": "start"}}\n</tool_call><|im_end|>',
        "Three years, from when you knew.<|im_end|>"]
    # inference after the tool results prompts with exactly the training tokens
    messages = conversation.to_dicts()
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tools=list(conversation.tools), tokenize=False,
                                                add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids).startswith(prompt_text)


def test_a_template_without_tools_uses_the_default_tool_format():
    tokenizer = tiny_tokenizer()  # ChatML without tool support, as SmolLM2's
    assert not template_renders_tools(tokenizer)
    example = render_example(tokenizer, convert(CHATGLM3_RECORD, "legal.jsonl:3"))
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a legal assistant.You have access to the following tools:\n"
                           "> Tool Name: search_law\nTool Description: find a statute\nTool Args:\n"
                           "  - keyword (string, required): word\n")
    assert '<|im_start|>user\n{"article": 188, "years": 3}<|im_end|>' in text  # a result: a user turn
    assert supervised_texts(tokenizer, example) == [
        'Let me look.\nAction: search_law\nAction Input: {"keyword": "limitation"}<|im_end|>',
        'Action: search_law\nAction Input: {"keyword": "start"}<|im_end|>',
        "Three years, from when you knew.<|im_end|>"]


def test_parallel_calls_and_their_results_in_the_default_tool_format():
    record = {"messages": [
        {"role": "user", "content": "weather in Rome and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
            {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "snow"},
        {"role": "assistant", "content": "Rome sunny, Oslo snow."}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    tokenizer = tiny_tokenizer()
    example = render_example(tokenizer, convert(record, "openai.jsonl:1"))
    assert "<|im_start|>user\nsunny\nsnow<|im_end|>" in tokenizer.decode(example.input_ids)  # one user turn
    assert supervised_texts(tokenizer, example)[0] == ('Action: weather\nAction Input: {"city": "Rome"}\nAction: '
                                                    'weather\nAction Input: {"city": "Oslo"}<|im_end|>')
    bad = json.loads(json.dumps(record))
    bad["messages"][1]["tool_calls"][1]["function"]["arguments"] = '{"city": Oslo}'
    with pytest.raises(DataError, match=r"openai.jsonl:1: message 1 tool_calls\[1\] arguments is not valid JSON"):
        convert(bad, "openai.jsonl:1")


@pytest.mark.parametrize("template", ["plain", "qwen25"])
def test_loss_false_turns_and_tool_results_carry_no_loss(template):
    tokenizer = tiny_tokenizer()
    if template == "qwen25":
        tokenizer.chat_template = QWEN25_STYLE
    record = {"conversations": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "an answer we do not want", "loss": False},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": "better"}]}
    example = render_example(tokenizer, convert(record, "f:1"))
    assert supervised_texts(tokenizer, example) == ["better<|im_end|>"]
    # the untrained turn is still in the context, token for token as at inference
    prompt = render_prompt(tokenizer, convert(record, "f:1").to_dicts()[:3])
    assert example.input_ids[:len(prompt)] == prompt


def test_glaive_toolcall_shape_through_dataset_info_columns():
    spec = FormatSpec("sharegpt", {"messages": "conversations", "tools": "tools"})
    record = {"conversations": [{"from": "human", "value": "15% of 80?"},
                                {"from": "function_call", "value": json.dumps(
                                    {"name": "percentage", "arguments": {"value": 80, "percent": 15}})},
                                {"from": "observation", "value": '{"result": 12}'},
                                {"from": "gpt", "value": "12."}],
              "tools": json.dumps([{"name": "percentage", "description": "a share",
                                    "parameters": {"type": "object", "properties": {"value": {"type": "number"}}}}])}
    tokenizer = tiny_tokenizer()
    example = render_example(tokenizer, convert(record, "glaive.json:2", spec))
    assert supervised_texts(tokenizer, example) == [
        'Action: percentage\nAction Input: {"value": 80, "percent": 15}<|im_end|>', "12.<|im_end|>"]
    assert '{"result": 12}' in tokenizer.decode(example.input_ids)  # in context, not trained


def test_data_convert_keeps_tools_and_loss_flags(tmp_path):
    from lmforge.data.convert import convert_file

    source = tmp_path / "glm.jsonl"
    flagged = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (CHATGLM3_RECORD, flagged)) + "\n")
    convert_file(str(source), str(tmp_path / "out.jsonl"), to="messages")
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written[0]["tools"][0]["function"]["name"] == "search_law"
    assert written[0]["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"keyword": "limitation"}
    assert written[1]["messages"][1]["loss"] is False
    assert convert(written[0], "out.jsonl:1") == convert(CHATGLM3_RECORD, "glm.jsonl:1")  # read back the same
    report = convert_file(str(source), str(tmp_path / "out_sharegpt.jsonl"), to="sharegpt")
    assert report.rows_rejected == 2  # not written without their tools / flags: rejected with the reason
    assert "use --to messages" in (tmp_path / "out_sharegpt.rejects.jsonl").read_text()


def test_a_template_that_refuses_a_conversation_names_the_record():
    tokenizer = tiny_tokenizer()  # as Llama 3.1's template, which allows one tool call per message
    tokenizer.chat_template = QWEN25_STYLE.replace(
        "{%- elif message.role == 'assistant' %}",
        "{%- elif message.role == 'assistant' %}{%- if message.tool_calls | length > 1 %}"
        "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}", 1)
    record = {"messages": [{"role": "user", "content": "two cities?"},
                           {"role": "assistant", "content": "", "tool_calls": [
                               {"function": {"name": "weather", "arguments": {"city": "Rome"}}},
                               {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match=r"calls.jsonl:9: the model's chat template cannot render this conversation: "
                                        r".*single tool-calls"):
        render_example(tokenizer, convert(record, "calls.jsonl:9"))
