"""lmforge serve's Ollama API with the official `ollama` Python client: a real uvicorn server on 127.0.0.1, tiny
models with prompt-dependent greedy replies, the same keys, limits and kill switch as the OpenAI API."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from conftest import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import http, live_server, make_adapter, vivid_tiny_model, wait_steps
from transformers import AutoModelForCausalLM

from lmforge.data.render import render_prompt
from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, ADMIN = "test-key-alice", "test-admin-key"
HI = [{"role": "user", "content": "What does article 12 say?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def models(tmp_path_factory, bundled_model_dir):
    root = tmp_path_factory.mktemp("serve_ollama")
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), root / "tiny")
    return base, {"legal": make_adapter(base, root / "legal", ["q_proj", "v_proj", "down_proj"], seed=1)}


def _serve(models, with_adapters=True, **settings):
    base, adapters = models
    config = ServeSettings(**settings)
    engine = build_engine(base, None, adapters if with_adapters else {}, config)
    return live_server(create_app(engine, config)), engine


@pytest.fixture(scope="module")
def server(models):
    context, engine = _serve(models, api_keys=[f"alice={KEY}"], admin_keys=[ADMIN], max_tokens=64,
                             context_length=256)
    with context as (url, _):
        yield url, engine


def client(url: str, key: str | None = KEY) -> ollama.Client:
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"} if key else None, timeout=60)


def openai_client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _joined(chunks, field: str) -> tuple[str, list]:
    chunks = list(chunks)
    text = "".join((c.message.content if field == "message" else c.response) or "" for c in chunks)
    return text, chunks


def test_chat_equals_openai_api_streamed_or_not(server, models):
    url = server[0]
    reply = client(url).chat(model="tiny", messages=HI, stream=False, options=GREEDY)
    same = openai_client(url).chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    assert reply.message.content and reply.message.content == same.choices[0].message.content
    assert reply.message.role == "assistant" and reply.done and reply.done_reason == "length"
    prompt_tokens = len(render_prompt(load_tokenizer(models[0]), HI))
    assert (reply.prompt_eval_count, reply.eval_count) == (prompt_tokens, 12)
    assert reply.total_duration >= reply.eval_duration >= 0 and reply.model == "tiny"
    text, chunks = _joined(client(url).chat(model="tiny:latest", messages=HI, stream=True, options=GREEDY), "message")
    assert text == reply.message.content
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count, last.message.content) == \
        ("length", 12, prompt_tokens, "")
    assert all(c.model == "tiny:latest" for c in chunks)  # the name as the client wrote it
    # No options at all: the default is greedy (the model has no sampling generation config), as the Modelfile says.
    default = client(url).chat(model="tiny", messages=HI, stream=False, options={"num_predict": 12})
    assert default.message.content == reply.message.content


def test_adapters_and_stop_strings_as_on_the_openai_api(server):
    url = server[0]
    legal = client(url).chat(model="legal", messages=HI, stream=False, options=GREEDY).message.content
    base = client(url).chat(model="tiny", messages=HI, stream=False, options=GREEDY).message.content
    expected = openai_client(url).chat.completions.create(model="legal", messages=HI, max_tokens=12, temperature=0)
    assert legal == expected.choices[0].message.content and legal != base
    stop = base[3:6]
    cut = client(url).chat(model="tiny", messages=HI, stream=False, options={**GREEDY, "stop": [stop]})
    assert cut.message.content == base[:base.index(stop)] and cut.done_reason == "stop"
    seeded = [client(url).chat(model="tiny", messages=HI, stream=False,
                               options={"temperature": 1.0, "seed": 7, "num_predict": 12}).message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_generate_streams_ndjson_through_the_template_or_raw(server):
    url, c = server[0], client(server[0])
    system = "You answer in one line."
    whole = c.generate(model="tiny", prompt=HI[0]["content"], system=system, stream=False, options=GREEDY)
    expected = openai_client(url).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": system}, *HI], max_tokens=12, temperature=0)
    assert whole.response and whole.response == expected.choices[0].message.content
    text, chunks = _joined(c.generate(model="tiny", prompt=HI[0]["content"], system=system, stream=True,
                                      options=GREEDY), "response")
    assert text == whole.response and chunks[-1].done and chunks[-1].eval_count == 12
    raw = c.generate(model="tiny", prompt="The court held", raw=True, stream=False, options=GREEDY)
    completion = openai_client(url).completions.create(model="tiny", prompt="The court held", max_tokens=12,
                                                       temperature=0)
    assert raw.response == completion.choices[0].text
    # The wire format itself: one JSON object per line, stream on by default (no "stream" key).
    status, headers, body = http("POST", f"{url}/api/generate", {"model": "tiny", "prompt": "Hello",
                                                                 "options": GREEDY}, key=KEY)
    lines = body.splitlines()
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson") and len(lines) > 1
    parsed = [json.loads(line) for line in lines]
    assert parsed[-1]["done"] is True and not any(p["done"] for p in parsed[:-1])
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration", "done_reason", "created_at"} <= set(parsed[-1])
    # Empty chat / prompt: Ollama's "load the model" call, answered without generating.
    assert c.chat(model="tiny", messages=[], stream=False).done_reason == "load"
    assert c.generate(model="tiny", stream=False).done_reason == "load"


def test_tags_show_ps_version(server, models):
    url, c = server[0], client(server[0])
    listed = {m.model: m for m in c.list().models}
    assert set(listed) == {"tiny:latest", "legal:latest"}
    assert listed["legal:latest"].details.parent_model == "tiny:latest"
    assert listed["tiny:latest"].details.family == "llama" and listed["tiny:latest"].size > 0
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models[0]).parameters())
    assert listed["tiny:latest"].details.parameter_size == listed["legal:latest"].details.parameter_size == \
        f"{parameters / 1e6:.1f}M"  # the base's count for an adapter, as Ollama shows a model with an ADAPTER
    assert len(listed["tiny:latest"].digest) == 64 and listed["tiny:latest"].modified_at is not None
    shown = c.show("tiny")
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 256
    assert shown.modelinfo["general.parameter_count"] == parameters
    assert "{{ .Content }}" in shown.template and "TEMPLATE" in shown.modelfile  # the Go template export writes
    assert "temperature" in shown.parameters and "num_ctx" in shown.parameters and "stop" in shown.parameters
    assert {m.model for m in c.ps().models} == set(listed) and shown.capabilities == ["completion"]
    status, _, body = http("GET", f"{url}/api/version", key=KEY)
    assert status == 200 and json.loads(body)["version"]
    with pytest.raises(ollama.ResponseError) as caught:
        c.show("nonexistent")
    assert caught.value.status_code == 404 and "tiny:latest" in caught.value.error


def test_keys_are_required(server):
    url = server[0]
    for key in ("wrong-key-123", None):
        with pytest.raises(ollama.ResponseError) as caught:
            client(url, key).chat(model="tiny", messages=HI, stream=False, options=GREEDY)
        assert caught.value.status_code == 401 and "Authorization: Bearer" in caught.value.error
        with pytest.raises(ollama.ResponseError) as caught:
            list(client(url, key).generate(model="tiny", prompt="Hi", stream=True, options=GREEDY))
        assert caught.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as caught:
            client(url, key).list()
        assert caught.value.status_code == 401
    assert client(url, ADMIN).list().models  # an admin key is a key too


def test_kill_switch_refuses_and_clears(server):
    url, c = server[0], client(server[0])
    assert http("POST", f"{url}/admin/kill-switch", {"enabled": True, "message": "down for upgrade"},
                key=ADMIN)[0] == 200
    try:
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as caught:
                reply = c.chat(model="tiny", messages=HI, stream=stream, options=GREEDY)
                list(reply) if stream else reply
            assert (caught.value.status_code, caught.value.error) == (503, "down for upgrade")
    finally:
        http("POST", f"{url}/admin/kill-switch", {"enabled": False}, key=ADMIN)
    assert c.chat(model="tiny", messages=HI, stream=False, options=GREEDY).message.content


def test_malformed_requests_are_400_with_ollama_errors(server):
    url = server[0]
    cases = [  # (body, status, words the error must hold)
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"messages": HI}, 400, "model: required"),
        ({"model": "tiny", "messages": HI, "options": {"temperature": "hot"}}, 400, "options.temperature"),
        ({"model": "tiny", "messages": HI, "options": {"top_k": 40}}, 400, "top_k is not supported"),
        ({"model": "tiny", "messages": HI, "options": {"num_predict": 0}}, 400, "options.num_predict"),
        ({"model": "tiny", "messages": HI, "options": {"num_predict": 5000}}, 400, "at most 64"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, "does not render tools"),
        ({"model": "tiny", "messages": "hello"}, 400, "messages"),
        ({"model": "tiny", "messages": HI, "format": "json"}, 400, "format"),
        ({"model": "tiny", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
         "does not render tools"),
        ({"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
        (b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (3 << 20) + b'"}', 413, "max_body_bytes"),
        ({"model": "tiny", "messages": HI * 200}, 400, "context"),
        ({"model": "gpt-4", "messages": HI}, 404, "not found"),
    ]
    for body, status, words in cases:
        got, _, text = _post(f"{url}/api/chat", body)
        assert got == status and words in json.loads(text)["error"], (body, got, text)
    got, _, text = _post(f"{url}/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "system": "y"})
    assert got == 400 and "system" in json.loads(text)["error"]
    assert http("GET", f"{url}/api/chat", key=KEY)[0] == 405
    got, _, text = http("POST", f"{url}/api/pull", {"model": "llama3"}, key=KEY)
    assert got == 404 and "not pulled" in json.loads(text)["error"]
    # Runtime options Ollama's clients send are accepted and change nothing; keep_alive too.
    reply = client(url).chat(model="tiny", messages=HI, stream=False, keep_alive="5m",
                             options={**GREEDY, "num_ctx": 4096, "num_thread": 2, "top_k": 0, "repeat_penalty": 1})
    assert reply.eval_count == 12


def _post(url: str, body) -> tuple[int, dict, str]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, method="POST", data=data, headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_rate_limit_applies_per_key(models):
    context, _ = _serve(models, with_adapters=False, api_keys=[KEY, "bob=other-key-bob"], requests_per_minute=2)
    with context as (url, _):
        c = client(url)
        c.chat(model="tiny", messages=HI, stream=False, options={"num_predict": 2})
        openai_client(url).chat.completions.create(model="tiny", messages=HI, max_tokens=2)  # one budget for both
        with pytest.raises(ollama.ResponseError) as caught:
            c.generate(model="tiny", prompt="Hi", stream=False, options={"num_predict": 2})
        assert caught.value.status_code == 429 and "2 requests per minute" in caught.value.error
        assert client(url, "other-key-bob").chat(model="tiny", messages=HI, stream=False,
                                                 options={"num_predict": 2}).done


def test_client_leaving_mid_stream_frees_its_slot_and_abort_ends_a_stream(models):
    context, engine = _serve(models, with_adapters=False, max_concurrent=1, max_queue=0, context_length=2048,
                             max_tokens=2000, admin_keys=[ADMIN], kill_switch_mode="abort")
    with context as (url, _):
        c = client(url, None)
        stream = c.chat(model="tiny", messages=HI, stream=True, options={"temperature": 0, "num_predict": 2000})
        assert not next(stream).done
        with pytest.raises(ollama.ResponseError) as caught:  # the one slot is taken, no queue: busy
            c.chat(model="tiny", messages=HI, stream=False, options={"num_predict": 2})
        assert caught.value.status_code == 503 and engine.running == 1
        stream.close()  # the client goes away mid-stream
        assert wait_steps(engine, lambda: engine.running == 0, steps=100)
        assert c.chat(model="tiny", messages=HI, stream=False, options={"num_predict": 2}).eval_count == 2
        # The kill switch in abort mode ends a running stream with an error line, which the client raises.
        stream = c.chat(model="tiny", messages=HI, stream=True, options={"temperature": 0, "num_predict": 2000})
        assert not next(stream).done
        http("POST", f"{url}/admin/kill-switch", {"enabled": True, "message": "stopping now"}, key=ADMIN)
        with pytest.raises(ollama.ResponseError) as caught:
            list(stream)
        assert "stopping now" in caught.value.error
        http("POST", f"{url}/admin/kill-switch", {"enabled": False}, key=ADMIN)
        assert wait_steps(engine, lambda: engine.running == 0, steps=100)
        _, _, text = http("GET", f"{url}/metrics", key=ADMIN)
        assert 'lmforge_requests_total{endpoint="/api/chat",status="200"}' in text


TEXT = st.one_of(st.text(min_size=1, max_size=30), st.text(st.characters(categories=["L", "Zs", "Cs"]), max_size=10))
ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT, st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
OPTIONS = st.fixed_dictionaries({}, optional={  # legal but hostile values, and a few the server refuses
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([5e-324, 1e-30, float("nan"), float("inf"), -1.0])),
    "top_p": st.sampled_from([5e-324, 1e-9, 0.5, 1.0, 0.0]),
    "seed": st.one_of(st.integers(), st.sampled_from([2**64, -(2**63) - 1, 10**40])),
    "num_predict": st.integers(-2, 6), "stop": st.lists(TEXT, max_size=5), "top_k": st.sampled_from([0, 40]),
    "num_ctx": st.integers(0, 10**6), "presence_penalty": st.floats(-3, 3)})
VALID = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny:latest", "legal", "nope"])},
    optional={"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                          "content": TEXT}), max_size=3),
              "prompt": TEXT, "system": st.one_of(st.none(), TEXT), "raw": st.booleans(), "options": OPTIONS,
              "stream": st.booleans(), "keep_alive": st.sampled_from(["5m", 0, -1]),
              "format": st.sampled_from(["", None, "json"]), "think": st.sampled_from([False, None, True])})
MUTATED = st.builds(lambda body, key, value: {**body, key: value}, VALID,
                    st.sampled_from(["model", "messages", "prompt", "options", "stream", "raw", "system"]), ANY)
BODIES = st.one_of(VALID, VALID, MUTATED)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(["/api/chat", "/api/generate"]), body=BODIES)
def test_fuzzed_bodies_get_an_answer_or_an_ollama_error_never_a_500(server, endpoint, body):
    status, headers, text = _post(f"{server[0]}{endpoint}", json.dumps(body).encode())
    assert status < 500, (body, status, text)
    if status != 200:
        assert isinstance(json.loads(text)["error"], str)
        return
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all("error" not in line for line in lines) and lines[-1]["done"] is True, (body, text)


NUMBERED = ("{%- for m in messages %}[{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n{%- endfor %}"
            "{%- if add_generation_prompt %}[{{ messages | length + 1 }}] assistant:{%- endif %}")


def test_base_model_without_template_and_a_template_go_cannot_restate(bundled_model_dir, tmp_path):
    """A base model (no chat template): /api/generate sends the prompt as it is (= /v1/completions), /api/chat says
    what to use. An adapter whose template numbers its turns: no per-message Go template renders it, so /api/show
    gives the Jinja template as it is and a Modelfile without TEMPLATE; its chat still equals /v1's."""
    plain = load_tokenizer(bundled_model_dir)
    plain.chat_template = None
    base = vivid_tiny_model("llama", plain, tmp_path / "plain")
    numbered = make_adapter(base, tmp_path / "numbered", ["q_proj", "v_proj"], seed=3)
    tokenizer = load_tokenizer(bundled_model_dir)
    tokenizer.chat_template = NUMBERED
    tokenizer.save_pretrained(numbered)
    context, _ = _serve((base, {"numbered": numbered}), context_length=256, max_tokens=64)
    with context as (url, _):
        c = client(url, None)
        reply = c.generate(model="plain", prompt="The court held", stream=False, options=GREEDY)
        completion = openai_client(url, "unused").completions.create(model="plain", prompt="The court held",
                                                                    max_tokens=12, temperature=0)
        assert reply.response and reply.response == completion.choices[0].text
        for call in (lambda: c.chat(model="plain", messages=HI, stream=False),
                     lambda: c.generate(model="plain", prompt="x", system="Be brief.", stream=False)):
            with pytest.raises(ollama.ResponseError) as caught:
                call()
            assert caught.value.status_code == 400
        shown = c.show("plain")
        assert shown.template == "{{ .Prompt }}" and "TEMPLATE" not in shown.modelfile
        shown = c.show("numbered:latest")
        assert shown.template == NUMBERED and "TEMPLATE" not in shown.modelfile
        assert "stop" in shown.parameters and shown.details.parent_model == "plain:latest"
        chat = c.chat(model="numbered", messages=[{"role": "system", "content": "Be brief."}, *HI], stream=False,
                      options=GREEDY)
        same = openai_client(url, "unused").chat.completions.create(
            model="numbered", messages=[{"role": "system", "content": "Be brief."}, *HI], max_tokens=12,
            temperature=0)
        assert chat.message.content == same.choices[0].message.content


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """A tiny Qwen2 trained (as tests/test_serve_tools.py does) until greedy decoding answers with the Qwen2.5
    template's tool calls — for the tool exactly as the ollama client sends a Python function."""
    from ollama._client import _copy_tools
    from test_serve_tools import PARIS, PARIS_REPLY, TWO, TWO_REPLY, _train_to_call, get_weather, qwen_tool_tokenizer

    from lmforge.data.render import render_prompt as render

    path = make_tiny_model("qwen2", qwen_tool_tokenizer(), tmp_path_factory.mktemp("ollama_tools") / "tools")
    tokenizer = load_tokenizer(path)
    tool = [t.model_dump(exclude_none=True) for t in _copy_tools([get_weather])]
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    _train_to_call(path, [(render(tokenizer, [{"role": "user", "content": question}], tools=tool),
                           tokenizer.encode(reply, add_special_tokens=False) + end)
                          for question, reply in ((PARIS, PARIS_REPLY), (TWO, TWO_REPLY))])
    config = ServeSettings(max_tokens=256, context_length=1024)
    with live_server(create_app(build_engine(path, None, {}, config), config)) as (url, _):
        yield url, get_weather, PARIS, TWO


def test_tool_calls_on_api_chat_streamed_or_not(tool_server):
    url, get_weather, paris, two = tool_server
    c, greedy = client(url, None), {"temperature": 0, "num_predict": 200}
    reply = c.chat(model="tools", messages=[{"role": "user", "content": paris}], tools=[get_weather], stream=False,
                   options=greedy)
    assert reply.message.content == "" and reply.done_reason == "stop"
    assert [(t.function.name, dict(t.function.arguments)) for t in reply.message.tool_calls] == \
        [("get_weather", {"city": "Paris"})]
    chunks = list(c.chat(model="tools", messages=[{"role": "user", "content": two}], tools=[get_weather],
                         stream=True, options=greedy))
    assert "".join(chunk.message.content or "" for chunk in chunks) == "Checking both."
    calls = [t for chunk in chunks for t in chunk.message.tool_calls or ()]
    assert [dict(t.function.arguments)["city"] for t in calls] == ["Rome", "Oslo"] and chunks[-1].done
    whole = c.chat(model="tools", messages=[{"role": "user", "content": two}], tools=[get_weather], stream=False,
                   options=greedy)
    assert whole.message.content == "Checking both." and whole.message.tool_calls == calls
    # The call and its result in the history render as on /v1: the same prompt, so the same greedy reply.
    history = [{"role": "user", "content": paris}, reply.message,
               {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    answer = c.chat(model="tools", messages=history, stream=False, options={**greedy, "num_predict": 8})
    same = openai_client(url, "unused").chat.completions.create(
        model="tools", temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": paris},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny"}])
    assert answer.message.content and answer.message.content == same.choices[0].message.content
    assert answer.prompt_eval_count == same.usage.prompt_tokens
    assert c.show("tools").capabilities == ["completion", "tools"]
