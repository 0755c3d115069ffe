"""lmforge serve over HTTP with the official openai client: a real uvicorn server on 127.0.0.1, tiny models."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_helpers import http, live_server, make_adapter, vivid_tiny_model, wait_steps

from lmforge.errors import ConfigError
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings, load_settings

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, ADMIN = "test-key-alice", "test-admin-key"
HI = [{"role": "user", "content": "What does article 12 say?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, bundled_model_dir):
    root = tmp_path_factory.mktemp("serve")
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), root / "tiny")
    return base, {"legal": make_adapter(base, root / "legal", ["q_proj", "v_proj", "down_proj"], seed=1),
                  "medical": make_adapter(base, root / "medical", ["k_proj", "o_proj", "up_proj"], seed=2)}


def _serve(models, **settings):
    base, adapters = models
    with_adapters = settings.pop("with_adapters", True)
    config = ServeSettings(**settings)
    engine = build_engine(base, None, adapters if with_adapters else {}, config)
    return live_server(create_app(engine, config)), engine


@pytest.fixture(scope="module")
def server(models):
    context, engine = _serve(models, api_keys=[f"alice={KEY}"], admin_keys=[ADMIN], max_tokens=64, max_n=3,
                             context_length=256)
    with context as (url, _):
        yield url, engine


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _chat(c, stream=False, **kw):
    kw = {"model": "tiny", "messages": HI, "max_tokens": 12, "temperature": 0, **kw}
    if not stream:
        return c.chat.completions.create(**kw)
    texts, finish, usage = {}, {}, None
    for chunk in c.chat.completions.create(stream=True, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    return texts, finish, usage


def test_models_lists_base_and_adapters(server):
    assert sorted(m.id for m in client(server[0]).models.list().data) == ["legal", "medical", "tiny"]


def test_stream_equals_non_stream_with_usage(server, models):
    from lmforge.data.render import render_prompt

    c = client(server[0])
    whole = _chat(c)
    texts, finish, usage = _chat(c, stream=True, stream_options={"include_usage": True})
    assert whole.choices[0].message.content and texts[0] == whole.choices[0].message.content
    assert finish[0] == whole.choices[0].finish_reason == "length"
    prompt_tokens = len(render_prompt(load_tokenizer(models[0]), HI))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, 12, prompt_tokens + 12)
    completion = c.completions.create(model="tiny", prompt="The court held", max_tokens=8, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The court held", max_tokens=8, temperature=0, stream=True))
    assert completion.choices[0].text and streamed == completion.choices[0].text


def test_ignore_eos_generates_max_tokens(server):
    """vLLM's `ignore_eos` (benchmarks use it): the reply runs to max_tokens past an end-of-text token."""
    url, engine = server
    c = client(url)
    first = c.completions.create(model="tiny", prompt="The court held", max_tokens=1, temperature=0)
    token = engine.models["tiny"].tokenizer.encode(first.choices[0].text, add_special_tokens=False)[0]
    before = engine.models["tiny"].text_stop_ids
    engine.models["tiny"].text_stop_ids = frozenset({token})  # that first token now ends the text
    try:
        stopped = c.completions.create(model="tiny", prompt="The court held", max_tokens=8, temperature=0)
        kept = c.completions.create(model="tiny", prompt="The court held", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    finally:
        engine.models["tiny"].text_stop_ids = before
    assert (stopped.usage.completion_tokens, stopped.choices[0].finish_reason) == (0, "stop")
    assert (kept.usage.completion_tokens, kept.choices[0].finish_reason) == (8, "length")


def test_n_choices_and_seed(server):
    c = client(server[0])
    greedy = _chat(c, n=3)
    assert [ch.index for ch in greedy.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 36
    sampled = _chat(c, n=3, temperature=1.0, seed=11)
    again = _chat(c, n=1, temperature=1.0, seed=11)
    assert sampled.choices[0].message.content == again.choices[0].message.content
    assert len({ch.message.content for ch in sampled.choices}) == 3
    texts, _, _ = _chat(c, stream=True, n=2, temperature=1.0, seed=11)
    assert texts[0] == sampled.choices[0].message.content and texts[1] == sampled.choices[1].message.content


def test_stop_strings_cut_the_reply(server):
    c = client(server[0])
    full = _chat(c, max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = _chat(c, max_tokens=20, stop=[stop, "never-there"])
    expected = full[:full.index(stop)]
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 20
    texts, finish, _ = _chat(c, stream=True, max_tokens=20, stop=stop)
    assert texts[0] == expected and finish[0] == "stop"


def test_adapters_routed_by_model_equal_each_adapter_alone(server, models):
    from peft import PeftModel

    from lmforge.generate import SamplingParams, reply

    base_dir, adapters = models
    tokenizer = load_tokenizer(base_dir)
    c = client(server[0])
    params = SamplingParams(max_new_tokens=10)
    replies = {}
    for name in ("tiny", "legal", "medical"):
        model = load_model(base_dir, __import__("torch").float32).eval()
        if name != "tiny":
            model = PeftModel.from_pretrained(model, adapters[name]).eval()
        replies[name] = reply(model, tokenizer, HI, params)
        assert _chat(c, model=name, max_tokens=10).choices[0].message.content == replies[name]
    assert len(set(replies.values())) == 3


def test_concurrent_requests_equal_sequential(server):
    c = client(server[0])
    jobs = [dict(model=("tiny", "legal", "medical")[i % 3], max_tokens=6 + i,
                 messages=[{"role": "user", "content": f"question number {i}: is clause {i * 7} valid?"}])
            for i in range(8)]
    sequential = [_chat(c, **job).choices[0].message.content for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _chat(client(server[0]), **job).choices[0].message.content, jobs))
    assert together == sequential
    assert len(set(sequential)) == 8


def test_errors_name_the_field(server):
    c = client(server[0])
    cases = [(dict(max_tokens=65), "max_tokens"), (dict(max_completion_tokens=65), "max_completion_tokens"),
             (dict(n=4), "n"), (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
             (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
             (dict(temperature=3), "temperature"), (dict(logit_bias={"1": 2}), "logit_bias")]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            _chat(c, **kwargs)
        assert caught.value.body["param"] == field, (kwargs, caught.value.body)
        assert field.split("[")[0] in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # fits alone, not with the reply
        _chat(c, messages=[{"role": "user", "content": "word " * 200}], max_tokens=60)
    assert caught.value.body["param"] == "max_tokens" and "context" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        c.completions.create(model="tiny", prompt="", max_tokens=2)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(c, model="gpt-4")
    assert caught.value.body["param"] == "model" and "legal" in caught.value.body["message"]


def test_keys_are_required(server):
    url = server[0]
    with pytest.raises(openai.AuthenticationError) as caught:
        _chat(client(url, "wrong-key-123"))
    assert caught.value.body["code"] == "invalid_api_key"
    status, _, body = http("POST", f"{url}/v1/chat/completions", {"model": "tiny", "messages": HI})  # no header
    assert status == 401 and "Authorization: Bearer" in body
    assert http("GET", f"{url}/metrics")[0] == 401
    assert http("GET", f"{url}/metrics", key=KEY)[0] == 403  # a tenant never reads other keys' usage
    assert http("GET", f"{url}/metrics", key=ADMIN)[0] == 200
    assert http("GET", f"{url}/health")[0] == 200  # probes stay open


def test_kill_switch_and_back(server, tmp_path):
    url, c = server[0], client(server[0])
    assert http("POST", f"{url}/admin/kill-switch", {"enabled": True}, key=KEY)[0] == 401  # not an admin key
    status, _, _ = http("POST", f"{url}/admin/kill-switch", {"enabled": True, "message": "down for upgrade"},
                        key=ADMIN)
    assert status == 200
    with pytest.raises(openai.InternalServerError) as caught:
        _chat(c)
    assert caught.value.status_code == 503 and caught.value.body["message"] == "down for upgrade"
    assert http("GET", f"{url}/ready")[0] == 503
    http("POST", f"{url}/admin/kill-switch", {"enabled": False}, key=ADMIN)
    assert _chat(c).choices[0].message.content and http("GET", f"{url}/ready")[0] == 200


def test_kill_switch_file(models, tmp_path):
    flag = tmp_path / "offline"
    context, _ = _serve(models, with_adapters=False, kill_switch_file=str(flag))
    with context as (url, _):
        c = client(url, "unused")
        assert _chat(c, max_tokens=2).choices
        flag.write_text("maintenance until 10:00\n")
        with pytest.raises(openai.InternalServerError) as caught:
            _chat(c, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["message"] == "maintenance until 10:00"
        flag.unlink()
        assert _chat(c, max_tokens=2).choices


def test_rate_limits_answer_429_with_retry_after(models):
    context, _ = _serve(models, with_adapters=False, api_keys=[KEY, "bob=other-key-bob"], requests_per_minute=2)
    with context as (url, _):
        c = client(url)
        _chat(c, max_tokens=2), _chat(c, max_tokens=2)
        response = c.chat.completions.with_raw_response
        with pytest.raises(openai.RateLimitError) as caught:
            response.create(model="tiny", messages=HI, max_tokens=2)
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
        assert "2 requests per minute" in caught.value.body["message"]
        assert _chat(client(url, "other-key-bob"), max_tokens=2).choices  # limits are per key
    context, _ = _serve(models, with_adapters=False, tokens_per_minute=100)
    with context as (url, _):
        c = client(url, "unused")
        _chat(c, max_tokens=40)  # ~30 prompt + 40 completion tokens
        with pytest.raises(openai.RateLimitError) as caught:
            _chat(c, max_tokens=40)
        assert "100 tokens per minute" in caught.value.body["message"]
        assert int(caught.value.response.headers["retry-after"]) >= 1


def test_queue_full_is_503_and_disconnect_stops_generation(models):
    context, engine = _serve(models, with_adapters=False, max_concurrent=1, max_queue=0, max_n=1,
                             context_length=2048, max_tokens=2000)
    with context as (url, _):
        c = client(url, "unused")
        stream = c.chat.completions.create(model="tiny", messages=HI, max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as caught:
            _chat(c, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "queue_full"
        assert engine.running == 1
        stream.close()  # the client goes away mid-stream
        assert wait_steps(engine, lambda: engine.running == 0, steps=100)  # stops within a few engine steps
        _, _, text = http("GET", f"{url}/metrics")
        generated = [line for line in text.splitlines() if line.startswith("lmforge_generated_tokens_total")]
        assert generated and float(generated[0].split()[-1]) < 1500  # stopped long before max_tokens
        assert _chat(c, max_tokens=2).choices  # the slot is free again


def test_timeout_and_graceful_shutdown(models):
    context, engine = _serve(models, with_adapters=False, request_timeout=0.3, context_length=2048,
                             max_tokens=2000)
    with context as (url, server):
        c = client(url, "unused")
        with pytest.raises(openai.APIStatusError) as caught:
            _chat(c, max_tokens=2000)
        assert caught.value.status_code == 504
    context, engine = _serve(models, with_adapters=False)
    with context as (url, server):
        results = []
        worker = threading.Thread(target=lambda: results.append(_chat(client(url, "unused"), stream=True,
                                                                      max_tokens=60)))
        worker.start()
        while engine.running == 0 and worker.is_alive():
            time.sleep(0.01)
        server.should_exit = True  # like SIGTERM: stop accepting, let the stream finish
        worker.join(30)
    texts, finish, _ = results[0]
    assert finish[0] == "length" and texts[0]
    assert not engine.alive


def test_metrics_count_requests_tokens_and_keys(server):
    url, c = server[0], client(server[0])
    before = _metric(url, 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}')
    _chat(c, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        _chat(c, n=9)
    assert _metric(url, 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}') == before + 1
    assert _metric(url, 'lmforge_requests_total{endpoint="/v1/chat/completions",status="400"}') >= 1
    assert _metric(url, 'lmforge_key_tokens_total{key="alice",kind="completion"}') >= 5
    assert _metric(url, 'lmforge_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert _metric(url, "lmforge_queue_depth") == 0
    status, _, body = http("GET", f"{url}/admin/usage", key=ADMIN)
    assert status == 200 and '"alice"' in body


def _metric(url: str, name: str) -> float:
    _, _, text = http("GET", f"{url}/metrics", key=ADMIN)
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_chat_page_contract(server):
    status, headers, page = http("GET", f"{server[0]}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for needle in ('fetch("/v1/chat/completions"', 'fetch("/v1/models"', '"Bearer " + key', "stream: true",
                   "[DONE]", 'id="apiKey"'):
        assert needle in page


def test_refuses_open_bind_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="without API keys"):
        ServeSettings(host="0.0.0.0").check_bind()
    ServeSettings(host="0.0.0.0", api_keys=["a-long-key"]).check_bind()
    config = tmp_path / "serve.yaml"
    config.write_text("max_concurent: 4\nmax_n: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), {})
    assert "did you mean 'max_concurrent'" in str(caught.value) and "max_n" in str(caught.value)
    from lmforge.cli import main

    assert main(["serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0"]) == 2
