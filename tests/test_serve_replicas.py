"""Replicas of `lmforge serve` sharing one view of keys' limits, usage and the kill switch through a real Redis
(`--state redis://…`), as users run them: separate processes on loopback, a redis-server started here on a free port.

One limit across replicas, the kill switch propagating, and Redis killed mid-test (fail-open: local limits, said in
/health and the log). Needs Debian's redis-server (`apt-get install redis-server`; .ci/run installs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from serve_helpers import http, live_server, vivid_tiny_model

from lmforge.errors import ConfigError
from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.guard import RateLimiter
from lmforge.serve.loading import build_engine
from lmforge.serve.protocol import ApiError
from lmforge.serve.settings import ServeSettings, load_settings
from lmforge.serve.state import open_state

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="needs redis-server (apt-get install redis-server)")
ADMIN = "admin-key-0123456789"
KEYS = ["alice=alice-key-0123456789", "bob=bob-key-0123456789", "carol=carol-key-0123456789"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(interval)


def start_redis(port: int) -> subprocess.Popen:
    import redis

    server = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return redis.Redis(port=port, socket_timeout=0.5).ping()
        except redis.exceptions.RedisError:
            return False
    wait_until(answers, 10, "redis-server answering")
    return server


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def complete(url: str, key: str) -> tuple[int, dict, dict]:
    status, headers, text = http("POST", f"{url}/v1/completions", {"model": "tiny", "prompt": "hello",
                                                                    "max_tokens": 1}, key=key.partition("=")[2])
    return status, {name.lower(): value for name, value in headers.items()}, json.loads(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_model_dir) -> str:
    return vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    """A redis-server and two replicas pointed at it: (redis process, [url A, url B], [log A, log B])."""
    if REDIS is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    logs_dir = tmp_path_factory.mktemp("replicas")
    redis_port = free_port()
    redis_server = start_redis(redis_port)
    replicas, urls, logs = [], [], []
    try:
        for name in ("a", "b"):
            port, log = free_port(), logs_dir / f"replica-{name}.log"
            command = [sys.executable, "-m", "lmforge", "serve", "--model", tiny, "--served-model-name", "tiny",
                       "--port", str(port), "--requests-per-minute", "10", "--admin-key", ADMIN, "--threads", "1",
                       "--state", f"redis://127.0.0.1:{redis_port}/0", "--max-concurrent", "2",
                       *[f"--api-key={key}" for key in KEYS]]
            with open(log, "w") as out:
                replicas.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                 env={**os.environ, "HF_HUB_OFFLINE": "1"}))
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        for url, replica, log in zip(urls, replicas, logs):
            def ready(url=url, replica=replica, log=log) -> bool:
                assert replica.poll() is None, log.read_text()[-3000:]
                try:
                    return http("GET", f"{url}/ready")[0] == 200
                except OSError:
                    return False
            wait_until(ready, 120, f"replica {url} ready", interval=0.2)
        yield redis_server, urls, logs
    finally:
        for replica in replicas:
            stop(replica, signal.SIGINT)
        stop(redis_server)


@needs_redis
def test_a_key_gets_its_limit_across_replicas_not_per_replica(cluster):
    _, (a, b), _ = cluster
    statuses = [complete(a if i % 2 else b, KEYS[0])[0] for i in range(10)]
    assert statuses == [200] * 10
    for url in (a, b):  # the 11th request in the minute is refused wherever it lands
        status, headers, body = complete(url, KEYS[0])
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["retry-after"]) <= 60
    assert complete(a, KEYS[1])[0] == 200  # another key has its own window
    status, _, text = http("GET", f"{b}/admin/usage", key=ADMIN)
    usage = json.loads(text)["keys"]
    assert usage["alice"]["requests"] == 10 and usage["bob"]["requests"] == 1  # counted across both replicas
    assert usage["alice"]["completion_tokens"] == 10
    assert json.loads(http("GET", f"{a}/health")[2])["state"] == {"store": "redis", "shared": True}


@needs_redis
def test_the_kill_switch_flipped_on_one_replica_holds_on_all_within_a_second(cluster):
    _, (a, b), _ = cluster
    assert http("POST", f"{a}/admin/kill-switch", {"enabled": True, "message": "maintenance"}, key=ADMIN)[0] == 200
    flipped = time.monotonic()
    status, _, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(complete(b, KEYS[2])), 1.0,
                                 "replica B degraded")
    assert time.monotonic() - flipped < 1.0
    assert body["error"]["code"] == "degraded" and body["error"]["message"] == "maintenance"
    assert json.loads(http("GET", f"{b}/admin/kill-switch", key=ADMIN)[2])["enabled"] is True
    assert http("POST", f"{b}/admin/kill-switch", {"enabled": False}, key=ADMIN)[0] == 200  # cleared from B
    wait_until(lambda: complete(a, KEYS[2])[0] == 200, 1.0, "replica A serving again")


@needs_redis
def test_redis_down_replicas_keep_serving_with_local_limits_and_say_so(cluster):
    redis_server, (a, b), (log_a, _) = cluster
    stop(redis_server, signal.SIGKILL)
    statuses = [complete(a, KEYS[1])[0] for _ in range(10)]  # bob used 1 of 10 in Redis; locally he starts over
    assert statuses == [200] * 10
    status, _, body = complete(a, KEYS[1])
    assert status == 429  # the limit still holds, per replica while Redis is away
    assert complete(b, KEYS[1])[0] == 200  # B counts its own
    health = json.loads(http("GET", f"{a}/health")[2])
    assert health["status"] == "ok"
    assert health["state"]["store"] == "redis" and health["state"]["shared"] is False
    assert "local limits" in health["state"]["meanwhile"]
    assert "redis at redis://127.0.0.1" in log_a.read_text() and "unreachable" in log_a.read_text()


@needs_redis
def test_fail_closed_refuses_while_redis_is_unreachable_and_fail_open_serves(tiny):
    port = free_port()  # nothing listens here
    for fail, expected in (("closed", 503), ("open", 200)):
        settings = ServeSettings(state=f"redis://127.0.0.1:{port}/0", state_fail=fail, max_concurrent=2)
        with live_server(create_app(build_engine(None, tiny, {}, settings), settings)) as (url, _):
            status, headers, text = http("POST", f"{url}/v1/completions", {"model": "tiny", "prompt": "hi",
                                                                            "max_tokens": 1})
            assert status == expected, text
            if fail == "closed":
                assert json.loads(text)["error"]["code"] == "state_unavailable"
                assert "retry-after" in {name.lower() for name in headers}
            assert json.loads(http("GET", f"{url}/health")[2])["state"]["shared"] is False


@needs_redis
def test_tokens_per_minute_are_one_budget_across_replicas():
    """Two stores on one Redis (what two replicas' guards hold): prompt tokens admitted on one and completion tokens
    recorded on the other fill the same window; the refusal says how much was used and when to retry."""
    port = free_port()
    server = start_redis(port)
    try:
        a, b = (open_state(f"redis://127.0.0.1:{port}/0", RateLimiter(None, 100)) for _ in range(2))
        a.admit("k", 40)
        b.record_completion("k", 50)
        with pytest.raises(ApiError) as refused:
            a.admit("k", 20)  # 40 + 50 + 20 > 100
        assert refused.value.status == 429 and "100 tokens per minute (90 used in the last minute)" in \
            refused.value.message and 1 <= int(refused.value.headers["Retry-After"]) <= 60
        b.admit("k", 10)  # exactly 100 fits
        assert a.usage()["k"] == {"requests": 2, "prompt_tokens": 50, "completion_tokens": 50}
    finally:
        stop(server)


def test_state_must_be_a_redis_url(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("state: http://127.0.0.1:6379\n")
    with pytest.raises(ConfigError, match="state: .*not a Redis URL; expected redis://HOST:PORT/DB"):
        load_settings(str(config), {})
    assert load_settings(None, {"state": "redis://10.0.0.5:6379/1"}).state_fail == "open"  # the default
