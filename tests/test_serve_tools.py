"""Tool calling on /v1/chat/completions: `tools` / `tool_choice` for a chat template that renders tools, tool calls read
back into OpenAI's `tool_calls` (non-stream and stream), checked with the official openai client and LangChain's
`bind_tools`; refused by name for a template without tools; the parser on the templates' own renders.

A random tiny model does not call tools, so the served model is a tiny Qwen2 trained here (full fine-tune, a couple of
hundred steps, seconds) until greedy decoding answers two questions with the Qwen2.5 template's tool calls: one call,
and a sentence followed by two calls. Its prompts are rendered by the server's own code with the tool exactly as
LangChain converts it, so every client below sends the prompt it was trained on.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch
from conftest import llama3_tokenizer, make_tiny_model, tiny_tokenizer
from serve_helpers import http, live_server
from test_compat_tools import QWEN25_STYLE

from lmforge.data.render import render_prompt, render_text, template_renders_tools
from lmforge.model.loader import load_tokenizer
from lmforge.serve import tools
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PARIS = "What is the weather in Paris?"
TWO = "Compare Rome and Oslo."
LLAMA31_REPLY = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
PARIS_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_REPLY = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')

# Llama 3.1's chat template, cut to its tool-use parts (tools in the first user message, one JSON call per reply,
# results under the ipython role), same text as the original for these parts.
LLAMA31_STYLE = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and loop.first and tools %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON for "
    "a function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}."
    "Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- message.content + '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + tool_call.name + '\", \"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny"


def weather_tool() -> dict:
    """The tool as LangChain's bind_tools sends it (and so as the openai client sends it below)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(get_weather)


def qwen_tool_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN25_STYLE
    return tokenizer


def _train_to_call(path: str, examples: list[tuple[list[int], list[int]]], margin: float = 4.0) -> None:
    """Full fine-tune of the tiny model on (prompt, reply) pairs until, teacher-forced, every reply token leads the
    next-best token by `margin` logits (so greedy decoding in the server's float16 / bf16 weights gives each reply);
    saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rows = [(torch.tensor([prompt + reply]), torch.tensor([[-100] * len(prompt) + reply]))
            for prompt, reply in examples]
    least = float("-inf")
    for step in range(1, 1001):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            least = min(_least_margin(model, ids, labels) for ids, labels in rows)
            if least >= margin:
                break
    assert least >= margin, f"the reply leads by only {least:.2f} logits after {step} steps"
    model.save_pretrained(path)


def _least_margin(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    targets, where = labels[0, 1:], labels[0, 1:] != -100
    logits, targets = logits[where], targets[where]
    right = logits.gather(1, targets[:, None])[:, 0]
    other = logits.scatter(1, targets[:, None], float("-inf")).max(1).values
    return (right - other).min().item()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_model("qwen2", qwen_tool_tokenizer(), tmp_path_factory.mktemp("tools") / "tools")
    tokenizer = load_tokenizer(path)  # as the server loads it
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    examples = [(render_prompt(tokenizer, [{"role": "user", "content": question}], tools=[weather_tool()]),
                 tokenizer.encode(reply, add_special_tokens=False) + end)
                for question, reply in ((PARIS, PARIS_REPLY), (TWO, TWO_REPLY))]
    _train_to_call(path, examples)
    config = ServeSettings(max_tokens=256, context_length=1024)
    engine = build_engine(path, None, {}, config)
    with live_server(create_app(engine, config)) as (url, _):
        yield url, path


@pytest.fixture(scope="module")
def llama31_server(tmp_path_factory):
    """A tiny Llama trained to answer PARIS with Llama 3.1's bare JSON call."""
    tokenizer = llama3_tokenizer()
    tokenizer.chat_template = LLAMA31_STYLE
    path = make_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("tools31") / "tools31")
    tokenizer = load_tokenizer(path)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": PARIS}], tools=[weather_tool()])
    reply = tokenizer.encode(LLAMA31_REPLY, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    _train_to_call(path, [(prompt, reply)])
    config = ServeSettings(max_tokens=256, context_length=1024)
    engine = build_engine(path, None, {}, config)
    with live_server(create_app(engine, config)) as (url, _):
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(question: str, **kw) -> dict:
    return {"model": "tools", "messages": [{"role": "user", "content": question}], "tools": [weather_tool()],
            "temperature": 0, "max_tokens": 200, **kw}


def test_openai_client_gets_parsed_tool_calls(server):
    server = server[0]
    reply = client(server).chat.completions.create(**ask(PARIS))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    two = client(server).chat.completions.create(**ask(TWO, tool_choice="auto")).choices[0]
    assert two.finish_reason == "tool_calls" and two.message.content == "Checking both."
    assert [json.loads(c.function.arguments)["city"] for c in two.message.tool_calls] == ["Rome", "Oslo"]
    assert len({c.id for c in two.message.tool_calls}) == 2
    one = client(server).chat.completions.create(**ask(TWO, parallel_tool_calls=False)).choices[0]
    assert [json.loads(c.function.arguments)["city"] for c in one.message.tool_calls] == ["Rome"]


def test_openai_stream_helper_reassembles_the_calls(server):
    server = server[0]
    with client(server).chat.completions.stream(**ask(TWO)) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking both."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Oslo"})]
    # the raw deltas: index, id, type and name first, then the arguments; the finish chunk says tool_calls
    chunks = list(client(server).chat.completions.create(stream=True, **ask(PARIS)))
    deltas = [d for chunk in chunks for choice in chunk.choices for d in choice.delta.tool_calls or ()]
    assert [(d.index, d.id is not None, d.function.name) for d in deltas] == [(0, True, "get_weather"),
                                                                                (0, False, None)]
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_langchain_bind_tools_gets_tool_calls(server):
    server = server[0]
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="tools", base_url=f"{server}/v1", api_key="unused", temperature=0, max_tokens=200,
                      max_retries=0).bind_tools([get_weather])
    message = chat.invoke(PARIS)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    streamed = None
    for chunk in chat.stream(TWO):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == "Checking both."
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Rome"}),
                                                                     ("get_weather", {"city": "Oslo"})]


def test_llama31_json_calls_non_stream_and_stream(llama31_server):
    request = {**ask(PARIS), "model": "tools31"}
    choice = client(llama31_server).chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    with client(llama31_server).chat.completions.stream(**request) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    assert json.loads(final.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    none = client(llama31_server).chat.completions.create(**{**request, "tool_choice": "none"}).choices[0]
    assert none.message.content == LLAMA31_REPLY and none.message.tool_calls is None


def test_tool_choice_none_and_required_leave_the_text_as_content(server):
    server = server[0]
    none = client(server).chat.completions.create(**ask(PARIS, tool_choice="none")).choices[0]
    assert none.finish_reason == "stop" and none.message.tool_calls is None
    assert none.message.content == PARIS_REPLY  # the model's own text, not read as a call
    streamed = "".join(c.choices[0].delta.content or "" for c in client(server).chat.completions.create(
        stream=True, **ask(PARIS, tool_choice="none")) if c.choices)
    assert streamed == PARIS_REPLY
    # decoding is not constrained: a named / required choice still gets the model's reply, parsed when it is a call
    named = client(server).chat.completions.create(
        **ask(PARIS, tool_choice={"type": "function", "function": {"name": "get_weather"}})).choices[0]
    assert named.finish_reason == "tool_calls" and named.message.tool_calls[0].function.name == "get_weather"
    plain = client(server).chat.completions.create(**ask(PARIS, tool_choice="required", max_tokens=3)).choices[0]
    assert plain.finish_reason == "length" and plain.message.tool_calls is None and plain.message.content


def test_tool_results_in_the_history_are_rendered_through_the_template(server):
    server, path = server
    history = [{"role": "user", "content": PARIS},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = client(server).chat.completions.create(model="tools", messages=history, tools=[weather_tool()],
                                                   max_tokens=4, temperature=0)
    tokenizer = load_tokenizer(path)
    rendered = render_prompt(tokenizer, [
        {"role": "user", "content": PARIS},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1", "name": "get_weather"}],
        tools=[weather_tool()])
    assert reply.usage.prompt_tokens == len(rendered)
    text = tokenizer.decode(rendered)
    assert '"arguments": {"city": "Paris"}' in text and "<tool_response>\nsunny, 21 C\n</tool_response>" in text


@pytest.mark.parametrize("extra, param, words", [
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "not one of the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools[0].function.strict",
     "does not constrain decoding"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools instead"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_tool_fields_are_named(server, extra, param, words):
    server = server[0]
    status, _, text = http("POST", f"{server}/v1/chat/completions", ask(PARIS, **extra))
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param and words in error["message"], error


def test_a_template_without_tools_refuses_them_by_name(llama_dir):
    config = ServeSettings(max_tokens=8, context_length=512)
    engine = build_engine(llama_dir, None, {}, config)  # the tiny tokenizer's ChatML takes no tools
    with live_server(create_app(engine, config)) as (url, _):
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).chat.completions.create(model="tiny-llama", max_tokens=2, tools=[weather_tool()],
                                                messages=[{"role": "user", "content": PARIS}])
        error = caught.value.body
        assert error["param"] == "tools" and "does not render tools" in error["message"], error
        history = [{"role": "user", "content": PARIS},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
        status, _, text = http("POST", f"{url}/v1/chat/completions",
                               {"model": "tiny-llama", "messages": history, "max_tokens": 2})
        error = json.loads(text)["error"]
        assert status == 400 and error["param"] == "messages[1].tool_calls", error
        assert http("POST", f"{url}/v1/chat/completions", {"model": "tiny-llama", "max_tokens": 2, "messages": [
            {"role": "user", "content": PARIS}], "tools": None, "tool_choice": None})[0] == 200


# ------------------------------------------------------------------------------------------ the parser


def _rendered_reply(tokenizer, call_message: dict, tools_: list[dict]) -> str:
    """The text a template writes for an assistant message with tool calls: what a model trained on it generates."""
    user = [{"role": "user", "content": "q"}]
    prompt = render_text(tokenizer, user, add_generation_prompt=True, tools=tools_)
    whole = render_text(tokenizer, [*user, call_message], tools=tools_)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]}


def test_parser_reads_the_qwen25_hermes_format():
    tokenizer = qwen_tool_tokenizer()
    assert template_renders_tools(tokenizer) and tools.call_format(tokenizer) == tools.HERMES
    two = {**CALL, "content": "Let me look.", "tool_calls": CALL["tool_calls"] * 2}
    text = _rendered_reply(tokenizer, two, [weather_tool()]).removesuffix("<|im_end|>\n")
    content, calls = tools.parse_tool_calls(text, tools.HERMES, {"get_weather"})
    assert content == "Let me look." and len(calls) == 2
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Zürich", "days": 2})] * 2
    assert calls[0].id != calls[1].id and '"Zürich"' in calls[0].arguments  # JSON text, not ASCII-escaped


def test_parser_reads_the_llama31_json_format():
    tokenizer = llama3_tokenizer()
    tokenizer.chat_template = LLAMA31_STYLE
    assert template_renders_tools(tokenizer) and tools.call_format(tokenizer) == tools.JSON
    text = _rendered_reply(tokenizer, CALL, [weather_tool()]).removesuffix("<|eot_id|>")
    assert text == '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 2}}'
    content, [call] = tools.parse_tool_calls(text, tools.JSON, {"get_weather"})
    assert content is None and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Zürich", "days": 2}
    # JSON that is not a call of one of the request's tools is an answer, not a call
    for answer in ('{"name": "other_tool", "parameters": {}}', '{"city": "Paris"}', '[1, 2]'):
        assert tools.parse_tool_calls(answer, tools.JSON, {"get_weather"}) == (answer, [])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # cut short
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
    "The weather is fine, no tool needed.",
])
def test_malformed_calls_stay_content(text):
    assert tools.parse_tool_calls(text, tools.HERMES, {"get_weather"}) == (text, [])
    stream = tools.ToolCallStream(tools.HERMES, {"get_weather"})
    shown = "".join(stream.add(ch) for ch in text)
    rest, calls = stream.finish()
    assert shown + rest == text and calls == []


def test_a_bad_block_stays_content_beside_a_good_one():
    text = ('<tool_call>\n{"name": "get_weather", oops}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    content, [call] = tools.parse_tool_calls(text, tools.HERMES, {"get_weather"})
    assert content == '<tool_call>\n{"name": "get_weather", oops}\n</tool_call>' and call.name == "get_weather"


@pytest.mark.parametrize("format, text", [
    (tools.HERMES, TWO_REPLY), (tools.HERMES, "  Sure.  \n\n" + PARIS_REPLY + "\nDone."),
    (tools.HERMES, "plain text with a < sign and <tool"), (tools.JSON, ' {"name": "get_weather", "parameters": {}}'),
    (tools.JSON, '{"not": "a call"}'), (tools.JSON, "  words, then {braces}"),
])
def test_streamed_content_and_calls_equal_the_whole_parse(format, text):
    content, calls = tools.parse_tool_calls(text, format, {"get_weather"})
    for size in (1, 3, 7):
        stream = tools.ToolCallStream(format, {"get_weather"})
        shown = "".join(stream.add(text[i:i + size]) for i in range(0, len(text), size))
        rest, streamed = stream.finish()
        assert shown + rest == (content or "")
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
