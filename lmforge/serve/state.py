"""Where the guard keeps what replicas must agree on: each key's one-minute windows (RPM / TPM), its usage counters,
and the kill switch set at runtime.

Two stores behind one interface: LocalState (this process only, the default) and RedisState (`--state
redis://HOST:PORT/DB`: every `lmforge serve` pointed at the same Redis shares one view, so a key limited to 10
requests a minute gets 10 across all replicas, and a kill switch set on one replica holds on all of them within
KILL_SWITCH_FRESH). One Lua script per admission checks and counts atomically; Redis's clock stamps the windows, so
replicas' clocks need not agree. When Redis cannot be reached, a RedisState keeps serving with this replica's local
windows (fail-open, the default) or refuses requests with 503 (fail-closed), logs it once, says so in status()
(/health), and tries Redis again every few seconds. Calls are synchronous with a 0.5 s timeout (loopback or LAN).

Must not know about keys' secrets, HTTP or the engine: it receives key ids and token counts, and raises ApiError.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from typing import Protocol

from .protocol import ApiError

log = logging.getLogger("lmforge.serve")

WINDOW_MS = 60_000
RETRY_AFTER_DOWN = 2.0  # seconds between attempts to reach a Redis that failed
KILL_SWITCH_FRESH = 0.25  # seconds a replica trusts the kill switch it read (checked per request and per stream step)
PREFIX = "lmforge:"

# KEYS: request window, token window, usage hash, set of keys with usage. ARGV: window ms, rpm (0 = none), tpm (0 =
# none), prompt tokens, a unique member id, the key id. → {0} admitted, {1, wait ms} too many requests,
# {2, wait ms, tokens used} too many tokens. Token members are "id:count"; scores are Redis's own clock in ms.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, rpm, tpm, prompt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, tonumber(oldest[2]) + window - now}
end
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  if used + prompt > tpm then
    local wait, freed = window, 0
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
      if used - freed + prompt <= tpm then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {2, wait, used}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5] .. ':' .. prompt)
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
redis.call('HINCRBY', KEYS[3], 'requests', 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', prompt)
redis.call('SADD', KEYS[4], ARGV[6])
return {0}
"""

# KEYS: token window, usage hash, set of keys with usage. ARGV: window ms, tokens, member id, key id.
RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('HINCRBY', KEYS[2], 'completion_tokens', tonumber(ARGV[2]))
redis.call('SADD', KEYS[3], ARGV[4])
return 0
"""


class StateStore(Protocol):
    """What the guard asks of its store. Usage is {key id: {requests, prompt_tokens, completion_tokens}}; the kill
    switch is a JSON-able dict while switched on at runtime (the guard decides what it holds), else None."""

    kind: str

    def admit(self, key: str, prompt_tokens: int, field: str = "messages") -> None: ...  # ApiError 429 / 503
    def record_completion(self, key: str, completion_tokens: int) -> None: ...
    def usage(self) -> dict[str, dict[str, int]]: ...
    def kill_switch(self) -> dict | None: ...
    def set_kill_switch(self, value: dict | None) -> None: ...
    def status(self) -> dict: ...
    def close(self) -> None: ...


def too_many(message: str, wait_seconds: float) -> ApiError:
    seconds = max(1, math.ceil(wait_seconds))
    return ApiError(429, f"{message}; retry after {seconds} s", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


class LocalState:
    """This process only: the guard's own sliding windows (its RateLimiter: admit(key, n), record_tokens(key, n)),
    usage counters in a dict, the kill switch in a field."""

    kind = "local"

    def __init__(self, limiter):
        self.limiter = limiter
        self._usage: dict[str, dict[str, int]] = {}
        self._kill: dict | None = None
        self._lock = threading.Lock()

    def admit(self, key: str, prompt_tokens: int, field: str = "messages") -> None:
        self.limiter.admit(key, prompt_tokens, field)
        self._count(key, requests=1, prompt_tokens=prompt_tokens)

    def record_completion(self, key: str, completion_tokens: int) -> None:
        self.limiter.record_tokens(key, completion_tokens)
        self._count(key, completion_tokens=completion_tokens)

    def _count(self, key: str, **counts: int) -> None:
        with self._lock:
            usage = self._usage.setdefault(key, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            for name, value in counts.items():
                usage[name] += value

    def usage(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {key: dict(counts) for key, counts in self._usage.items()}

    def kill_switch(self) -> dict | None:
        return self._kill

    def set_kill_switch(self, value: dict | None) -> None:
        self._kill = value

    def status(self) -> dict:
        return {"store": "local"}

    def close(self) -> None:
        pass


class RedisState:
    """Shared through Redis; `local` (a LocalState) answers while Redis is unreachable and fail_open is set."""

    kind = "redis"

    def __init__(self, url: str, local: LocalState, fail_open: bool = True, timeout: float = 0.5):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.local, self.fail_open = url, local, fail_open
        self.rpm, self.tpm = local.limiter.rpm, local.limiter.tpm
        self._errors = redis.exceptions.RedisError
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._admit = self._client.register_script(ADMIT)
        self._record = self._client.register_script(RECORD)
        self._down_since: float | None = None  # wall time of the first failure of the current outage
        self._next_try = 0.0
        self._problem = ""
        self._kill_read_until = 0.0
        self._lock = threading.Lock()
        self._call(self._client.ping)  # says at start-up when Redis is not there

    def _call(self, function, *args, **kwargs):
        """function(...) on Redis → (True, result); (False, None) while Redis is unreachable (logged once per
        outage; tried again every RETRY_AFTER_DOWN seconds)."""
        if self._down_since is not None and time.monotonic() < self._next_try:
            return False, None
        try:
            result = function(*args, **kwargs)
        except self._errors as error:
            with self._lock:
                self._next_try = time.monotonic() + RETRY_AFTER_DOWN
                if self._down_since is None:
                    self._down_since, self._problem = time.time(), f"{type(error).__name__}: {error}"
                    log.warning("shared state: redis at %s is unreachable (%s); %s", _safe(self.url), self._problem,
                                "serving with this replica's local limits and kill switch (fail-open)"
                                if self.fail_open else "refusing requests with 503 until it is back (fail-closed)")
            return False, None
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning("shared state: redis at %s is reachable again after %.0f s; limits are shared "
                                "again", _safe(self.url), time.time() - self._down_since)
                    self._down_since = None
        return True, result

    def _unavailable(self) -> ApiError:
        return ApiError(503, "the shared rate-limit store (redis) is unreachable, and this server refuses requests "
                             "without it (fail-closed); try again shortly", type="service_unavailable",
                        code="state_unavailable", headers={"Retry-After": str(math.ceil(RETRY_AFTER_DOWN))})

    def admit(self, key: str, prompt_tokens: int, field: str = "messages") -> None:
        if self.tpm is not None and prompt_tokens > self.tpm:  # never admissible: the guard's own refusal
            self.local.admit(key, prompt_tokens, field)
        keys = [f"{PREFIX}rpm:{key}", f"{PREFIX}tpm:{key}", f"{PREFIX}usage:{key}", f"{PREFIX}usage-keys"]
        args = [WINDOW_MS, self.rpm or 0, self.tpm or 0, prompt_tokens, uuid.uuid4().hex, key]
        ok, result = self._call(self._admit, keys=keys, args=args)
        if not ok:
            if not self.fail_open:
                raise self._unavailable()
            return self.local.admit(key, prompt_tokens, field)
        if result[0] == 1:
            raise too_many(f"rate limit reached for {key}: {self.rpm} requests per minute", result[1] / 1000)
        if result[0] == 2:
            raise too_many(f"rate limit reached for {key}: {self.tpm} tokens per minute ({result[2]} used in the "
                           f"last minute)", result[1] / 1000)

    def record_completion(self, key: str, completion_tokens: int) -> None:
        if not completion_tokens:
            return
        keys = [f"{PREFIX}tpm:{key}", f"{PREFIX}usage:{key}", f"{PREFIX}usage-keys"]
        ok, _ = self._call(self._record, keys=keys, args=[WINDOW_MS, completion_tokens, uuid.uuid4().hex, key])
        if not ok:
            self.local.record_completion(key, completion_tokens)

    def usage(self) -> dict[str, dict[str, int]]:
        def read() -> dict[str, dict[str, int]]:
            names = sorted(self._client.smembers(f"{PREFIX}usage-keys"))
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(f"{PREFIX}usage:{name}")
            return {name: {field: int(counts.get(field, 0))
                           for field in ("requests", "prompt_tokens", "completion_tokens")}
                    for name, counts in zip(names, pipe.execute())}

        ok, shared = self._call(read)
        return shared if ok else self.local.usage()  # while Redis is down: what this replica counted meanwhile

    def kill_switch(self) -> dict | None:
        if time.monotonic() < self._kill_read_until:
            return self.local.kill_switch()
        ok, value = self._call(self._client.get, f"{PREFIX}kill-switch")
        if not ok:
            return self.local.kill_switch()  # the last state this replica saw or set
        value = json.loads(value) if value else None
        self.local.set_kill_switch(value)
        self._kill_read_until = time.monotonic() + KILL_SWITCH_FRESH
        return value

    def set_kill_switch(self, value: dict | None) -> None:
        self.local.set_kill_switch(value)
        self._kill_read_until = time.monotonic() + KILL_SWITCH_FRESH
        name = f"{PREFIX}kill-switch"
        ok, _ = self._call(self._client.set, name, json.dumps(value)) if value else \
            self._call(self._client.delete, name)
        if not ok:
            log.warning("shared state: the kill switch was set on this replica only (redis is unreachable)")

    def status(self) -> dict:
        if self._down_since is not None and time.monotonic() >= self._next_try:
            self._call(self._client.ping)
        if self._down_since is None:
            return {"store": "redis", "shared": True}
        return {"store": "redis", "shared": False, "problem": f"redis unreachable ({self._problem.split(':')[0]})",
                "down_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since)),
                "meanwhile": "local limits and kill switch (fail-open)" if self.fail_open else
                             "refusing requests with 503 (fail-closed)"}

    def close(self) -> None:
        self._client.close()


def open_state(url: str | None, limiter, fail_open: bool = True) -> LocalState | RedisState:
    """The store `--state` names: none → this process only; redis://… or rediss://… or unix://… → Redis."""
    local = LocalState(limiter)
    if not url:
        return local
    return RedisState(url, local, fail_open)


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if "@" in rest else url
