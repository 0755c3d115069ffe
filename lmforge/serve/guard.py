"""The guard in front of the model: API keys, per-key rate limits and usage, and the kill switch (degraded mode).

Keys are kept as SHA-256 hashes only (a key file may hold just the hashes). Limits are sliding one-minute windows
per key: requests/min, and prompt + completion tokens/min. The kill switch is a runtime flag (admin endpoint) or a
flag file; its mode says what happens to streams already running. /metrics is for admin or metrics keys only.
The windows, usage counters and runtime switch live in a state store (state.py): this process's, or Redis shared
by replicas (--state).
Every refusal is an ApiError with the status a client expects. Must not know about the engine or models.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .protocol import ApiError
from .state import LocalState, StateStore, open_state

ANONYMOUS = "anonymous"  # the key id of every request when the server has no keys (loopback only)
WINDOW = 60.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """Accepted keys → a key id (its name, or the first hex digits of its hash) used for limits and metrics."""

    def __init__(self, entries: list[str], where: str = "api key"):
        self.ids: dict[str, str] = {}
        for number, entry in enumerate(entries, 1):
            name, digest = _parse_key(entry, f"{where} {number}")
            self.ids[digest] = name or f"key-{digest[:8]}"

    @classmethod
    def from_settings(cls, keys: list[str], key_file: str | None) -> KeyRing:
        ring = cls(keys)
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise ConfigError(f"API key file not found: {key_file}")
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    name, digest = _parse_key(line, f"{key_file}:{number}")
                    ring.ids[digest] = name or f"key-{digest[:8]}"
        return ring

    def __bool__(self) -> bool:
        return bool(self.ids)

    def identify(self, authorization: str | None) -> str | None:
        """The key id for an `Authorization: Bearer KEY` header, or None if it carries no accepted key."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.ids.get(hash_key(authorization[7:].strip()))


def _parse_key(entry: str, where: str) -> tuple[str | None, str]:
    named = re.fullmatch(r"([A-Za-z0-9_.-]{1,64})=(.+)", entry.strip())
    name, secret = (named.group(1), named.group(2).strip()) if named else ("", entry.strip())
    if secret.startswith("sha256:"):
        digest = secret[7:].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}: sha256: must be followed by 64 hex digits (printf %s KEY | sha256sum)")
        return name.strip() or None, digest
    if len(secret) < 8:
        raise ConfigError(f"{where}: an API key needs at least 8 characters (a key that contains '=' needs a "
                          f"name in front: NAME=KEY)")
    return name.strip() or None, hash_key(secret)


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RateLimiter:
    """Sliding one-minute windows per key. Tokens are counted when known: the prompt on admission, the completion
    as it finishes; a request is refused while its key's window holds too many."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, prompt_tokens: int, field: str = "messages", now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            requests = _trim(self._requests.setdefault(key, deque()), now)
            tokens = _trim(self._tokens.setdefault(key, deque()), now)
            if self.rpm is not None and len(requests) >= self.rpm:
                wait = requests[0] + WINDOW - now
                raise _too_many(f"rate limit reached for {key}: {self.rpm} requests per minute", wait)
            if self.tpm is not None:
                if prompt_tokens > self.tpm:  # a budget error, and one that waiting never fixes: no retry
                    raise ApiError(429, f"request too large for {key}: the prompt has {prompt_tokens} tokens, more "
                                        f"than the {self.tpm} tokens per minute this key may use; shorten the "
                                        f"{field}", type="tokens", param=field, code="request_too_large",
                                   headers={"x-should-retry": "false"})
                used = sum(n for _, n in tokens)
                if used + prompt_tokens > self.tpm:
                    wait, freed = WINDOW, 0
                    for stamp, count in tokens:  # when will enough of the window have expired?
                        freed += count
                        if used - freed + prompt_tokens <= self.tpm:
                            wait = stamp + WINDOW - now
                            break
                    raise _too_many(f"rate limit reached for {key}: {self.tpm} tokens per minute "
                                    f"({used} used in the last minute)", wait)
            requests.append(now)
            tokens.append((now, prompt_tokens))

    def record_tokens(self, key: str, count: int) -> None:
        if count:
            with self._lock:
                self._tokens.setdefault(key, deque()).append((time.monotonic(), count))


def _trim(window: deque, now: float) -> deque:
    while window and (window[0] if isinstance(window[0], float) else window[0][0]) <= now - WINDOW:
        window.popleft()
    return window


def _too_many(message: str, wait: float) -> ApiError:
    seconds = max(1, math.ceil(wait))
    return ApiError(429, f"{message}; retry after {seconds} s", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


class KillSwitch:
    """Degraded mode: on while switched on at runtime or while the flag file exists (its text, if any, is the
    message). Checked per request, so it takes effect and clears without a restart. Mode "drain" lets streams
    already running finish; "abort" ends them with a final error event (routes.py asks `aborts_running()`)."""

    def __init__(self, flag_file: str | None, message: str, mode: str = "drain", retry_after: int = 30):
        self.flag_file = Path(flag_file) if flag_file else None
        self.mode, self.retry_after = mode, retry_after
        self.default_message = message
        self.switched_on = False
        self.message = message
        self.shared: StateStore | None = None  # where the runtime switch lives when replicas share it (state.py)

    def set(self, on: bool, message: str | None = None) -> None:
        self.switched_on = on
        self.message = message or self.default_message
        if self.shared is not None:
            self.shared.set_kill_switch({"message": self.message} if on else None)

    def active_message(self) -> str | None:
        if self.shared is not None:
            value = self.shared.kill_switch()
            self.switched_on, self.message = value is not None, (value or {}).get("message", self.default_message)
        if self.switched_on:
            return self.message
        if self.flag_file is not None and self.flag_file.exists():
            try:
                text = self.flag_file.read_text(encoding="utf-8").strip()
            except OSError:
                text = ""
            return text or self.default_message
        return None

    def aborts_running(self) -> bool:
        return self.mode == "abort" and self.active_message() is not None

    def error(self, message: str) -> ApiError:
        return ApiError(503, message, type="service_unavailable", code="degraded",
                        headers={"Retry-After": str(self.retry_after)})


class Guard:
    def __init__(self, keys: KeyRing, admin_keys: KeyRing, limiter: RateLimiter, kill_switch: KillSwitch,
                 metrics_keys: KeyRing | None = None, state: StateStore | None = None):
        """state: where windows, usage and the runtime kill switch live (state.py); default this process only."""
        self.keys, self.admin_keys, self.limiter, self.kill_switch = keys, admin_keys, limiter, kill_switch
        self.metrics_keys = metrics_keys or KeyRing([])
        self.state = state or LocalState(limiter)
        if self.state.kind != "local":
            kill_switch.shared = self.state

    @classmethod
    def from_settings(cls, settings) -> Guard:
        limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        return cls(KeyRing.from_settings(settings.api_keys, settings.api_key_file),
                   KeyRing(settings.admin_keys, "admin key"), limiter,
                   KillSwitch(settings.kill_switch_file, settings.degraded_message, settings.kill_switch_mode,
                              settings.degraded_retry_after),
                   KeyRing(settings.metrics_keys, "metrics key"),
                   open_state(settings.state, limiter, fail_open=settings.state_fail == "open"))

    @property
    def usage(self) -> dict[str, Usage]:
        """Per key id, as counted by the state store (across replicas when it is shared)."""
        return {key: Usage(**counts) for key, counts in self.state.usage().items()}

    def authenticate(self, authorization: str | None) -> str:
        if not self.keys:
            return ANONYMOUS
        key = self.keys.identify(authorization) or self.admin_keys.identify(authorization)
        if key is None:
            raise ApiError(401, "missing or invalid API key: send the header Authorization: Bearer YOUR_KEY",
                           type="invalid_request_error", code="invalid_api_key")
        return key

    def authenticate_admin(self, authorization: str | None) -> str:
        if not self.admin_keys:
            raise ApiError(404, "admin endpoints are off: start the server with --admin-key KEY",
                           code="not_found")
        key = self.admin_keys.identify(authorization)
        if key is None:
            raise ApiError(401, "missing or invalid admin key", code="invalid_api_key")
        return key

    def authenticate_metrics(self, authorization: str | None) -> None:
        """/metrics names every key and its usage: an admin or metrics key reads it, a tenant key never does.
        A server without API keys (loopback only) keeps it open, like the rest of its API, unless metrics keys are
        set."""
        if not (self.keys or self.metrics_keys):
            return
        if self.admin_keys.identify(authorization) or self.metrics_keys.identify(authorization):
            return
        if self.keys.identify(authorization):
            raise ApiError(403, "an API key cannot read /metrics: use an admin key or a metrics key "
                                "(--metrics-key)", type="permission_denied", code="forbidden")
        raise ApiError(401, "/metrics needs an admin key or a metrics key: send Authorization: Bearer KEY",
                       code="invalid_api_key")

    def check_available(self) -> None:
        message = self.kill_switch.active_message()
        if message is not None:
            raise self.kill_switch.error(message)

    def admit(self, key: str, prompt_tokens: int, field: str = "messages") -> None:
        self.state.admit(key, prompt_tokens, field)

    def record_completion(self, key: str, completion_tokens: int) -> None:
        self.state.record_completion(key, completion_tokens)
