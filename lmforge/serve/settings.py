"""Serving settings: one typed model, read from serve.yaml and overridden by command-line flags.

Each field is documented once, here. Unknown keys are errors with a "did you mean". Must not load models or open
sockets (cli.py and app.py do).
"""

from __future__ import annotations

import difflib
import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from .protocol import field_path


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind; beyond loopback only with API keys")
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str | None = Field(None, description="the name /v1/models lists for the base or run")
    adapters: dict[str, str] = Field({}, description="extra LoRA adapters on the same base: name → adapter dir")
    api_keys: list[str] = Field([], description="accepted keys: KEY, NAME=KEY or NAME=sha256:HEX (hashed at rest)")
    api_key_file: str | None = Field(None, description="a file of keys, one per line in the api_keys forms")
    admin_keys: list[str] = Field([], description="keys for /admin (kill switch, usage) and /metrics; same forms")
    metrics_keys: list[str] = Field([], description="keys that may read /metrics only (a Prometheus scraper); "
                                                    "API keys never can")
    requests_per_minute: int | None = Field(None, ge=1, description="per key; over it → 429 with Retry-After")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + completion tokens per key per minute")
    max_concurrent: int = Field(8, ge=1, le=256, description="sequences generated together (KV-cache slots)")
    max_queue: int = Field(128, ge=0, description="sequences waiting for a slot; beyond it → 503 with a Retry-After "
                                                  "estimated from the backlog and the measured service rate")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body; bigger → 413 before "
                                                                      "anything is parsed")
    max_tokens: int = Field(2048, ge=1, description="the largest max_tokens a request may ask for")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of a chat request that sets none")
    max_n: int = Field(4, ge=1, description="the largest n (choices per request); default min(4, max_concurrent)")
    context_length: int | None = Field(None, ge=16, description="prompt + reply tokens; default min(model's, 4096)")
    request_timeout: float = Field(300.0, gt=0, description="seconds before a request is cut off")
    kill_switch_file: str | None = Field(None, description="while this file exists the API answers 503 (degraded)")
    kill_switch_mode: Literal["drain", "abort"] = Field(
        "drain", description="what the kill switch does to streams already running: drain lets them finish; abort "
                             "ends them with a final error event (code degraded)")
    degraded_message: str = "The assistant is temporarily unavailable. Please try again later."
    degraded_retry_after: int = Field(30, ge=1, description="Retry-After (seconds) on the kill switch's 503")
    cors_origins: list[str] = Field([], description="origins allowed to call the API from a browser; none = off")
    backend: Literal["lmforge", "vllm"] = Field(
        "lmforge", description="lmforge: the built-in engine (CPU or GPU); vllm: vLLM's engine behind the same API "
                               "and guard (GPU machines, `pip install vllm`)")
    vllm_args: dict[str, Any] = Field({}, description="more vLLM engine arguments (AsyncEngineArgs) with --backend "
                                                      "vllm, e.g. {tensor_parallel_size: 2, "
                                                      "gpu_memory_utilization: 0.8}; --vllm-arg KEY=VALUE adds "
                                                      "to them")
    kb: str | None = Field(None, description="a knowledge base (lmforge kb build) for every served model: chat "
                                             "answers get its passages in the prompt, a Sources line and a "
                                             "`sources` field; a request sends \"kb\": false to skip it")
    kb_per_model: dict[str, str] = Field({}, description="a knowledge base per served model name (the base, the run, "
                                                         "an adapter): name → KB dir, over `kb` for that name; an "
                                                         "empty dir serves that name without one")
    kb_k: int = Field(3, ge=1, le=20, description="passages retrieved per chat request with kb")
    state: str | None = Field(None, description="where replicas share rate-limit windows, usage and the kill switch: "
                                                "redis://HOST:PORT/DB (rediss:// for TLS, unix:///PATH); default: "
                                                "this process only")
    state_fail: Literal["open", "closed"] = Field(
        "open", description="when the --state store is unreachable: open keeps serving with this replica's local "
                            "limits (said in /health and the log); closed answers 503 until it is back")
    threads: int | None = Field(None, ge=1, description="torch threads for the model; default: CPU cores - 1, so "
                                                     "HTTP keeps a core (on a busy machine, fewer threads are faster)")
    decode_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="float16: weights held in float16 for FBGEMM's float16 GEMM (float32 activations): half "
                            "the memory and ~2x the speed of float32 on CPU; replies differ slightly from float32's, "
                            "never with server load. bfloat16: bf16 weights and products through oneDNN (CPUs with "
                            "AMX / AVX512_BF16): faster than float16 at wide batches there, as fast single-stream. "
                            "auto: float16 where torch has FBGEMM (x86-64), else float32")
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step (long prompts "
                                                      "are split so running streams keep flowing)")

    @model_validator(mode="after")
    def state_is_redis(self):
        if self.state is not None and not self.state.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"state: {self.state!r} is not a Redis URL; expected redis://HOST:PORT/DB (e.g. "
                             f"redis://127.0.0.1:6379/0), rediss://… or unix:///PATH/redis.sock")
        return self

    @model_validator(mode="after")
    def n_fits_slots(self):
        if "max_n" not in self.model_fields_set:
            self.max_n = min(self.max_n, self.max_concurrent)
        elif self.max_n > self.max_concurrent:
            raise ValueError(f"max_n ({self.max_n}) cannot exceed max_concurrent ({self.max_concurrent}): the n "
                             f"choices of a request are generated side by side")
        return self

    def kbs_for(self, served: list[str]) -> dict[str, str]:
        """Served model name → its knowledge base dir (names without one left out): `kb` for every name, then
        `kb_per_model` over it. A name that is not served is an error naming those that are."""
        unknown = [name for name in self.kb_per_model if name not in served]
        if unknown:
            raise ConfigError(f"kb_per_model (--kb NAME=KB): {', '.join(map(repr, unknown))} "
                              f"{'is' if len(unknown) == 1 else 'are'} not served here; the served model names are "
                              f"{', '.join(served)} (a run or model dir's name, --served-model-name, --adapter "
                              f"NAME=DIR)")
        kbs = dict.fromkeys(served, self.kb) if self.kb else {}
        kbs.update(self.kb_per_model)
        return {name: directory for name, directory in kbs.items() if directory}

    def has_keys(self) -> bool:
        return bool(self.api_keys or self.api_key_file)

    def check_bind(self) -> None:
        """No keys → loopback only: an open model on the network is how unprotected servers get found."""
        if self.has_keys() or is_loopback(self.host):
            return
        raise ConfigError(f"refusing to listen on {self.host} without API keys: anyone who can reach it could use "
                          f"the model. Add --api-key KEY (or --api-key-file FILE), or bind --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_kb_options(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """--kb KB (every served model; once) and --kb NAME=KB (that model; NAME= for none), repeatable → (kb, per
    model). A value that is an existing path is a KB even when it holds "="."""
    every: str | None = None
    per_model: dict[str, str] = {}
    for value in values or []:
        name, sep, directory = value.partition("=")
        if not sep or Path(value).exists():
            if every is not None:
                raise ConfigError(f"--kb {value!r}: a knowledge base for every model is already given ({every}); "
                                  f"give one per model as --kb NAME=KB")
            every = value
            continue
        if not name.strip():
            raise ConfigError(f"--kb {value!r}: expected KB or NAME=KB (NAME: a served model name), e.g. "
                              f"--kb legal=kb/legal")
        if name.strip() in per_model:
            raise ConfigError(f"--kb: the model name {name.strip()!r} is given twice")
        per_model[name.strip()] = directory.strip()
    return every, per_model


def load_settings(path: str | None, overrides: dict) -> ServeSettings:
    """serve.yaml (if given) with command-line values on top; every problem reported at once."""
    data: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"serve config not found: {path}")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v not in (None, [], {})})
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as err:
        where = path or "serve settings"
        known = list(ServeSettings.model_fields)
        lines = []
        for problem in err.errors():
            name = field_path(problem["loc"])
            if problem["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append(f"  {name}: unknown setting{hint}")
            else:
                lines.append(f"  {name or 'settings'}: {problem['msg']}")
        raise ConfigError(f"{where}:\n" + "\n".join(lines)) from None
