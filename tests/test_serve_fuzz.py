"""Property-based fuzzing of /v1/chat/completions and /v1/completions from the app's own OpenAPI schema
(schemathesis → hypothesis), against a real server on 127.0.0.1: schema-valid bodies (half of them naming the served
model, so they generate) and schema-violating ones, with legal-but-hostile values mixed in (seeds past 64 bits,
subnormal temperatures and top_p, text with lone surrogates) that the schema alone rarely draws. Every answer must be
a valid completion (JSON or a well-formed event stream) or an error in OpenAI's shape, never a 5xx; after each batch
a normal request must still work.

The model's chat template renders tools (Qwen2.5's tool parts), so fuzzed `tools`, tool calls and tool results reach
the template and the tool-call parser too. A tiny random model keeps the few hundred cases within about a minute on
two busy cores; the bundled model would spend most of that time generating tokens the assertions do not look at
(test_e2e.py serves the bundled model).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from conftest import make_tiny_model, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_helpers import http, live_server
from test_compat_tools import QWEN25_STYLE

from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
CASES_PER_BATCH = 60  # 2 endpoints x 2 modes x 60 = 240 cases
TEXT = st.one_of(st.text(min_size=1, max_size=40),
                 st.text(st.characters(categories=["L", "Zs", "Cs"]), max_size=20))  # Cs: lone surrogates
HOSTILE = st.fixed_dictionaries({}, optional={
    "seed": st.one_of(st.integers(), st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**40])),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([5e-324, 1e-300, 1e-30, 1e-8])),
    "top_p": st.sampled_from([5e-324, 1e-300, 1e-9, 1.0]),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 8),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": TEXT}), min_size=1, max_size=3),
    "prompt": TEXT,
})
# A call's arguments are a JSON object in a string: the schema says string, so most drawn ones are not JSON (a 400);
# half the time they are replaced by drawn JSON objects, so bodies with tool calls in the history reach the engine.
JSON_ARGUMENTS = st.one_of(st.none(), st.dictionaries(TEXT, st.one_of(st.integers(), TEXT, st.booleans()), max_size=3))
FUZZ = settings(max_examples=CASES_PER_BATCH, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN25_STYLE  # a template that renders tools: fuzzed tools and tool messages generate
    model_dir = make_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("fuzz") / "tiny-llama")
    config = ServeSettings(max_tokens=16, default_max_tokens=8, context_length=1024, request_timeout=60)
    engine = build_engine(model_dir, None, {}, config)
    app = create_app(engine, config)
    with live_server(app) as (url, _):
        yield url, schemathesis.openapi.from_dict(app.openapi()), engine


def _check_answer(response, path: str) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        return
    kind = "chat.completion" if path.endswith("chat/completions") else "text_completion"
    content_type = response.headers.get("content-type") or [""]
    if (content_type[0] if isinstance(content_type, list) else content_type).startswith("text/event-stream"):
        events = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block.strip()]
        # schemathesis reads at most 20 events of a stream, then stops reading (stream_cut_short): n choices of up to
        # 16 tokens can be longer. A stream read to its end must end with [DONE]; every event read must be valid.
        if not getattr(response, "stream_cut_short", False):
            assert events[-1] == "[DONE]", events[-3:]
        for event in map(json.loads, [e for e in events if e != "[DONE]"]):
            if "error" in event:  # a stream ends with an error event only for a timeout or the kill switch
                assert event["error"]["code"] in ("timeout", "degraded"), event
            else:
                assert event["object"].startswith(kind) and "choices" in event, event
        return
    body = response.json()
    assert body["object"] == kind and body["choices"], body
    assert body["usage"]["completion_tokens"] <= 16 * len(body["choices"])
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")


def _json_arguments(body: dict, arguments: dict) -> None:
    for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call["function"]["arguments"] = json.dumps(arguments)


def _normal_request_works(url: str) -> None:
    status, _, text = http("POST", f"{url}/v1/chat/completions",
                           {"model": "tiny-llama", "messages": [{"role": "user", "content": "still there?"}],
                            "max_tokens": 3})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] >= 1, text
    assert http("GET", f"{url}/health")[0] == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_5xx(served, path, mode):
    url, schema, engine = served
    operation = schema[path]["POST"]
    statuses: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), name_the_model=st.booleans(), hostile=HOSTILE,
           arguments=JSON_ARGUMENTS)
    def one_request(case, name_the_model, hostile, arguments):
        if isinstance(case.body, dict):
            case.body.update(hostile)
            if arguments is not None:
                _json_arguments(case.body, arguments)
            if name_the_model:
                case.body["model"] = "tiny-llama"
        response = case.call(base_url=url, timeout=60)
        statuses.append(response.status_code)
        _check_answer(response, path)

    one_request()
    if mode == GenerationMode.POSITIVE:  # the fuzz reached the engine, not only the validation
        assert statuses.count(200) >= 5, sorted(set(statuses))
    _normal_request_works(url)
    assert engine.alive
