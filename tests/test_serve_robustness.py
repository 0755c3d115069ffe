"""No request can take `lmforge serve` down (issue 13): hostile-but-legal values, failures inside one request, a dead
engine, huge and deep bodies, OpenAI's edge cases, bursts and the kill switch — each as a client would send it, to a
real server on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from urllib.parse import urlparse

import openai
import pytest
from serve_helpers import http, live_server, make_adapter, vivid_tiny_model, wait_steps

from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app, run_server
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, ADMIN, SCRAPER = "robust-key-alice", "robust-admin-key", "robust-metrics-key"
HI = [{"role": "user", "content": "Is clause 7 enforceable?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, bundled_model_dir):
    root = tmp_path_factory.mktemp("robust")
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), root / "tiny")
    return base, {"legal": make_adapter(base, root / "legal", ["q_proj", "v_proj"], seed=1)}


def _serve(models, adapters=True, **settings):
    base, extra = models
    config = ServeSettings(**settings)
    engine = build_engine(base, None, extra if adapters else {}, config)
    return live_server(create_app(engine, config)), engine


@pytest.fixture(scope="module")
def server(models):
    context, engine = _serve(models, api_keys=[f"alice={KEY}"], admin_keys=[ADMIN], metrics_keys=[SCRAPER],
                             max_tokens=64, context_length=512, max_n=2)
    with context as (url, _):
        yield url, engine


def client(url: str, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120, **kw)


def post(url: str, path: str, body, key: str = KEY) -> tuple[int, dict, dict]:
    status, headers, text = http("POST", url + path, body, key=key)
    return status, headers, json.loads(text)


def chat(**kw) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": 4, **kw}


def assert_openai_error(status: int, body: dict, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ------------------------------------------------------------------------------------------ 1. engine supervision


def test_hostile_sampling_values_are_safe_and_do_not_touch_other_streams(server):
    """Seeds past 64 bits and temperatures that overflow softmax: before, they killed the engine (or failed an
    unrelated stream) and every later request got 503."""
    url, engine = server
    c = client(url)
    bystander = c.chat.completions.create(model="tiny", messages=HI, max_tokens=60, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
    first = next(iter(bystander))
    hostile = [chat(seed=2**64), chat(seed=2**64 - 1, n=2, temperature=1.0), chat(seed=-(2**70), temperature=0.7),
               chat(temperature=1e-300), chat(temperature=1e-300, n=2, seed=3, top_p=1e-9),
               chat(temperature=2.0, top_p=1e-300, presence_penalty=-2, frequency_penalty=2)]
    for body in hostile:
        status, _, reply = post(url, "/v1/chat/completions", body)
        assert status == 200, (body, reply)
        assert len(reply["choices"]) == body.get("n", 1)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in bystander if ch.choices)
    assert first and streamed  # the stream in flight ran on to its end
    greedy = post(url, "/v1/chat/completions", chat(temperature=0))[2]["choices"][0]["message"]["content"]
    cold = post(url, "/v1/chat/completions", chat(temperature=1e-300))[2]["choices"][0]["message"]["content"]
    assert cold == greedy  # below the floor is greedy
    seeded = [post(url, "/v1/chat/completions", chat(seed=2**64 + 5, temperature=1.0))[2] for _ in range(2)]
    assert seeded[0]["choices"][0]["message"] == seeded[1]["choices"][0]["message"]  # reduced, still repeatable
    assert http("GET", f"{url}/health")[0] == 200 and engine.alive


def test_a_failure_inside_one_request_fails_that_request_alone(models):
    """A prefill that raises (as a bug or a bad adapter would) ends that request with a clear 500 error; a stream
    already running and every later request are untouched, and the engine thread lives on."""
    context, engine = _serve(models, adapters=False, max_tokens=80)
    tokenizer = load_tokenizer(models[0])
    poison = tokenizer.encode(" zebra", add_special_tokens=False)[0]
    real_prefill = engine.decoder.prefill_many

    def prefill_failing_on_poison(slots, chunks, starts, adapters):
        if any(poison in chunk for chunk in chunks):
            raise RuntimeError("injected failure for this prompt")
        return real_prefill(slots, chunks, starts, adapters)

    engine.decoder.prefill_many = prefill_failing_on_poison
    with context as (url, _):
        c = client(url, "unused")
        stream = c.completions.create(model="tiny", prompt="The court held", max_tokens=60, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
        pieces = [next(iter(stream)).choices[0].text]
        status, _, body = post(url, "/v1/completions", {"model": "tiny", "prompt": "a zebra", "max_tokens": 4})
        error = assert_openai_error(status, body, 500)
        assert error["code"] == "engine_error" and "injected failure" in error["message"]
        assert "other requests are not affected" in error["message"]
        pieces += [chunk.choices[0].text for chunk in stream]
        assert len("".join(pieces)) > 0
        assert c.completions.create(model="tiny", prompt="The court held", max_tokens=3).usage.completion_tokens == 3
        assert engine.alive and http("GET", f"{url}/health")[0] == 200


def _break_engine(engine) -> None:
    """A bug outside any one request's step: the next admission raises, and the engine thread dies."""
    def broken():
        raise RuntimeError("injected engine bug")
    engine._admit = broken


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's death
def test_a_dead_engine_shows_in_health_and_fails_in_flight_requests_at_once(models):
    context, engine = _serve(models, adapters=False)
    with context as (url, _):
        assert http("GET", f"{url}/health")[0] == 200
        _break_engine(engine)
        status, _, body = post(url, "/v1/chat/completions", chat(), key="unused")
        assert_openai_error(status, body, 500)  # answered, not hung until the timeout
        status, _, text = http("GET", f"{url}/health")
        assert status == 503 and "injected engine bug" in text
        status, _, body = post(url, "/v1/chat/completions", chat(), key="unused")
        assert assert_openai_error(status, body, 503)["code"] == "engine_down"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_run_server_exits_1_when_the_engine_dies(models):
    """What systemd / Kubernetes see: the process stops on its own, with a non-zero exit code."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(port=port)
    engine = build_engine(models[0], None, {}, settings)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(run_server(engine, settings)), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to a minute for the start-up
        try:
            if http("GET", f"{url}/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    _break_engine(engine)
    post(url, "/v1/chat/completions", chat(), key="unused")
    thread.join(120)  # a hang guard; the server stops within the watcher's half-second
    assert codes == [1]


def test_sigterm_stops_the_cli_server_promptly_after_hostile_requests(models):
    """As an operator runs it: `lmforge serve` in its own process takes a seed past 64 bits (before: the engine died,
    the request hung and SIGTERM then waited out the 300 s request timeout), keeps serving, and stops on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", models[0], "--port", str(port),
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # start-up: up to two minutes on a busy machine (a hang guard)
            try:
                if http("GET", f"{url}/health")[0] == 200:
                    break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.1)
        assert post(url, "/v1/chat/completions", chat(seed=2**64), key="unused")[0] == 200
        assert post(url, "/v1/chat/completions", chat(seed=2**64 - 1, n=2, temperature=1.0), key="unused")[0] == 200
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)  # a hang guard; an idle server stops at once
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = server.stderr.read()
    # uvicorn shuts down gracefully, then ends by the signal it caught: what systemd counts as a clean stop
    assert code in (0, -signal.SIGTERM) and "Finished server process" in log, (code, log[-2000:])


# ------------------------------------------------------------------------------------------ 2. a free event loop


def test_body_over_the_cap_is_413_before_parsing(server):
    url, _ = server
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    status, _, body = post(url, "/v1/chat/completions", big)
    assert assert_openai_error(status, body, 413)["code"] == "request_too_large"
    assert "max_body_bytes" in body["error"]["message"]
    assert post(url, "/v1/chat/completions", chat())[0] == 200


def _health_latencies_during(url: str, work) -> tuple[list[float], float]:
    """/health round trips (seconds) measured in a thread while `work()` runs here, and how long `work` took."""
    done, latencies = threading.Event(), []

    def probe():
        while not done.is_set():
            t = time.perf_counter()
            http("GET", f"{url}/health")
            latencies.append(time.perf_counter() - t)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.perf_counter()
    try:
        work()
    finally:
        took = time.perf_counter() - started
        done.set()
        prober.join()
    return latencies, took


def test_big_and_long_requests_do_not_stall_health_or_other_streams(server):
    """A 1,200-turn chat (quadratic to render before) and a 1.9 MB body are parsed, rendered and tokenized off the
    event loop: /health answers and a running stream keeps flowing meanwhile. Bounds are ratios to the same probes
    on an idle server, never seconds."""
    url, _ = server
    long_chat = {"model": "tiny", "max_tokens": 4,
                 "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: clause {i}"}
                              for i in range(2400)] + [{"role": "user", "content": "summarise"}]}
    big_body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 380_000}]}
    heavy = [long_chat, long_chat, big_body, long_chat]

    def send_heavy():
        for body in heavy:
            status, _, reply = post(url, "/v1/chat/completions", body)
            assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply

    idle, _ = _health_latencies_during(url, lambda: time.sleep(0.5))
    busy, took = _health_latencies_during(url, send_heavy)
    baseline = statistics.median(idle)
    assert len(busy) >= 5, f"only {len(busy)} /health answers during {took:.2f} s of heavy requests"
    # Blocked, the loop would answer one probe after the whole heavy batch: latency ≈ took.
    assert max(busy) < 0.1 * took + 20 * baseline, (max(busy), took, baseline)
    assert statistics.median(busy) < 20 * baseline + 0.02 * took, (statistics.median(busy), baseline, took)

    stream_gaps: list[float] = []

    def stream_beside():
        stamps = []
        for _ in client(url).completions.create(model="tiny", prompt="The court held", max_tokens=60, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}):
            stamps.append(time.perf_counter())
        stream_gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    beside = threading.Thread(target=stream_beside)
    beside.start()
    started = time.perf_counter()
    send_heavy()
    took = time.perf_counter() - started
    beside.join()
    assert stream_gaps and max(stream_gaps) < 0.1 * took + 20 * statistics.median(stream_gaps), (
        max(stream_gaps), took)


# ------------------------------------------------------------------------------------------ 3. malformed bodies


def _raw_post(connection: HTTPConnection, body: bytes, key: str = KEY) -> tuple[int, dict]:
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_lone_surrogate_and_deep_nesting_are_400_on_a_kept_connection(server):
    url, _ = server
    connection = HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=60)
    surrogate = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    status, body = _raw_post(connection, surrogate)
    assert "surrogate" in assert_openai_error(status, body, 400, "messages[0].content")["message"]
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = _raw_post(connection, deep)
    assert "too deeply" in assert_openai_error(status, body, 400)["message"]
    status, body = _raw_post(connection, json.dumps(chat()).encode())  # the same connection still serves
    assert status == 200 and body["choices"]
    connection.close()


# ------------------------------------------------------------------------------------------ 4. OpenAI compatibility


def test_null_means_default_and_text_response_format_is_accepted(server):
    url, _ = server
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "stop",
                           "seed", "stream_options", "logprobs", "tools", "tool_choice", "max_completion_tokens",
                           "response_format", "user"))
    status, _, body = post(url, "/v1/chat/completions", chat(**nulls))
    assert status == 200 and len(body["choices"]) == 1, body
    status, _, body = post(url, "/v1/completions", {"model": "tiny", "prompt": "The court", "max_tokens": None,
                                                    "best_of": None, "echo": None, "suffix": None})
    assert status == 200 and body["usage"]["completion_tokens"] <= 16, body  # OpenAI's default max_tokens
    reply = client(url).chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                                response_format={"type": "text"})
    assert reply.choices[0].message.content is not None


def test_retrieve_one_model(server):
    c = client(server[0])
    assert c.models.retrieve("legal").id == "legal"
    assert c.models.retrieve("tiny").model_dump()["parent"] is None
    assert c.models.retrieve("legal").model_dump()["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found"
    assert http("GET", f"{server[0]}/v1/models/tiny", key=KEY)[0] == 200
    assert http("GET", f"{server[0]}/v1/models/tiny", key="wrong-key-123")[0] == 401


@pytest.mark.parametrize("path, extra, field", [
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),  # without tools
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # no tools in
    # this model's chat template (tests/test_serve_tools.py serves one that has them)
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
])
def test_fields_we_cannot_honour_are_refused_by_name(server, path, extra, field):
    body = chat(**extra) if path.endswith("chat/completions") else {"model": "tiny", "prompt": "x", **extra}
    status, _, reply = post(server[0], path, body)
    assert field in assert_openai_error(status, reply, 400, field)["message"]


def test_errors_name_fields_as_the_client_wrote_them(server):
    url, _ = server
    cases = [({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages[0].content", "image_url"),
             ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list of text"),
             ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
             ({"stop": 5}, "stop", "stop")]
    for extra, param, words in cases:
        status, _, body = post(url, "/v1/chat/completions", chat(**extra))
        message = assert_openai_error(status, body, 400, param)["message"]
        assert message.startswith(param) and words in message, message
        for internal in ("function-after", "list[", "ContentPart", "Value error"):
            assert internal not in message, message


def test_prompt_over_the_token_budget_is_a_budget_error(models):
    context, _ = _serve(models, adapters=False, tokens_per_minute=50, context_length=512)
    with context as (url, _):
        status, headers, body = post(url, "/v1/chat/completions",
                                     chat(messages=[{"role": "user", "content": "word " * 80}]), key="unused")
        error = assert_openai_error(status, body, 429)
        assert error["code"] == "request_too_large" and "50 tokens per minute" in error["message"]
        assert headers.get("x-should-retry") == "false"  # the official clients do not retry what never fits


# ------------------------------------------------------------------------------------------ 5. overload


def test_service_rate_estimates_retry_after():
    from lmforge.serve.engine import ServiceRate

    now = [100.0]
    rate = ServiceRate(clock=lambda: now[0])
    assert rate.retry_after(16, slots=8) == 4  # nothing measured yet: two seconds per round of slots
    for _ in range(10):  # 10 sequences finish over 5 s: 2 per second
        now[0] += 0.5
        rate.finished()
    now[0] += 0.5
    assert rate.per_second() == pytest.approx(10 / 5.0)
    assert rate.retry_after(20, slots=8) == 10
    assert rate.retry_after(500, slots=8) == 60  # the official clients wait at most 60 s
    assert rate.retry_after(0, slots=8) == 1


def test_queue_full_retry_after_follows_the_backlog(models):
    context, engine = _serve(models, adapters=False, max_concurrent=1, max_queue=10, max_n=1, max_tokens=60,
                             context_length=256)
    long = {"model": "tiny", "prompt": "The court held", "max_tokens": 60, "ignore_eos": True}
    with context as (url, _):
        for _ in range(3):  # measure the service rate
            post(url, "/v1/completions", long, key="unused")
        c = client(url, "unused")
        streams = [c.completions.create(stream=True, **{k: v for k, v in long.items() if k != "ignore_eos"},
                                        extra_body={"ignore_eos": True}) for _ in range(11)]
        status, headers, body = post(url, "/v1/completions", long, key="unused")
        rate = engine.service.per_second()
        assert assert_openai_error(status, body, 503)["code"] == "queue_full"
        expected = max(1, min(60, 11 / rate))  # 11 sequences ahead (1 running, 10 queued) at the measured rate
        assert int(headers["retry-after"]) == pytest.approx(expected, abs=1.01), (headers, rate)
        assert int(headers["retry-after"]) >= 2
        for stream in streams:
            stream.close()


def test_default_queue_holds_a_burst_of_50_streams_through_the_official_client(models):
    context, _ = _serve(models, adapters=False, context_length=512)  # the default queue and slots
    with context as (url, _):
        async def burst():
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300)  # 2 retries by default

            async def one(i):
                text = ""
                async for chunk in await c.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=32,
                        stream=True, extra_body={"ignore_eos": True}):
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                return text
            try:
                return await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
            finally:
                await c.close()

        results = asyncio.run(burst())
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        _, _, metrics = http("GET", f"{url}/metrics")
        assert 'status="503"' not in metrics  # none was turned away, even once


def test_kill_switch_modes(server, models):
    """drain (default): a running stream finishes; the 503 carries Retry-After. abort: running streams end with a
    final error event."""
    url, engine = server
    c = client(url)
    stream = c.chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert http("POST", f"{url}/admin/kill-switch", {"enabled": True, "message": "maintenance"}, key=ADMIN)[0] == 200
    try:
        status, headers, body = post(url, "/v1/chat/completions", chat())
        assert assert_openai_error(status, body, 503)["code"] == "degraded"
        assert int(headers["retry-after"]) >= 1
        finish = [ch.choices[0].finish_reason for ch in stream if ch.choices]
        assert finish[-1] == "length"  # drained
    finally:
        http("POST", f"{url}/admin/kill-switch", {"enabled": False}, key=ADMIN)

    context, engine = _serve(models, adapters=False, admin_keys=[ADMIN], kill_switch_mode="abort", max_tokens=2000,
                             context_length=2048)
    with context as (url, _):
        events, connection = [], HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=120)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(chat(max_tokens=2000, stream=True,
                                                                                 ignore_eos=True)),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        events.append(response.readline())
        assert wait_steps(engine, lambda: engine.running == 1, steps=50)
        assert http("POST", f"{url}/admin/kill-switch", {"enabled": True, "message": "stop now"}, key=ADMIN)[0] == 200
        events += response.read().decode().split("\n\n")
        data = [e.strip().removeprefix("data: ") for e in events[1:] if e.strip()]
        assert data[-1] == "[DONE]"
        final = json.loads(data[-2])
        assert final["error"]["code"] == "degraded" and "stop now" in final["error"]["message"]
        assert wait_steps(engine, lambda: engine.running == 0, steps=50)  # generation stopped, not just the stream


# ------------------------------------------------------------------------------------------ 6. tenants


def test_metrics_are_for_admin_and_metrics_keys_only(server):
    url, _ = server
    assert http("GET", f"{url}/metrics", key=KEY)[0] == 403
    assert http("GET", f"{url}/metrics")[0] == 401
    status, _, text = http("GET", f"{url}/metrics", key=SCRAPER)
    assert status == 200 and "lmforge_requests_total" in text
    assert http("GET", f"{url}/metrics", key=ADMIN)[0] == 200
    assert http("GET", f"{url}/admin/usage", key=SCRAPER)[0] == 401  # a metrics key is not an admin key
