"""What Ollama's API says about the served models: their names with a tag, /api/tags' listing, /api/show's Modelfile,
template, parameters and model info, and the sampling a request gets when its options set none.

A served name is an Ollama model name: "tiny" is listed as "tiny:latest" and either spelling finds it. What is
listed comes from what is on disk (weight files' size, time, parameter count from safetensors headers, a digest of
their identity) and from the decoder (architecture, precision); the Modelfile is the one `lmforge export` writes
(export/modelfile.py derives the Go TEMPLATE from the chat template; shown only when it renders the export's probe
conversations exactly as the chat template does) with the context and defaults this server applies. The defaults
are the export's: the generation config's temperature and top_p when the model samples, else greedy (as `lmforge
chat`). Must not know about HTTP, the guard or generation.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path

from ..data.render import end_of_turn_ids, render_text, template_renders_tools
from .protocol import ApiError


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def iso_time(timestamp: float) -> str:
    """RFC 3339 in UTC, as Ollama writes times."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class OllamaModels:
    """The engine's served models as Ollama names them; `started` (a Unix time) stands in for files it cannot see."""

    def __init__(self, engine, started: float):
        self.engine, self.started = engine, started
        self._defaults: dict[str, dict] = {}

    def find(self, name: str):
        """The served model for an Ollama name: exact, or without the default tag (`tiny:latest` → `tiny`)."""
        models = self.engine.models
        served = models.get(name) or (models.get(name.removesuffix(":latest")) if name.endswith(":latest") else None)
        if served is None:
            raise ApiError(404, f"model {name!r} not found: this server serves {', '.join(map(tagged, models))} "
                                f"(models are not pulled here)")
        return served

    def listing(self, name: str) -> dict:
        """A served model as /api/tags lists it. An adapter shows the base as parent_model and the base's parameter
        count (as Ollama shows a model with an ADAPTER)."""
        served = self.engine.models[name]
        files = _weight_files(served)
        size = sum(f.stat().st_size for f in files)
        modified = max((f.stat().st_mtime for f in files), default=self.started)
        identity = "\0".join([name, *(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)])
        parent = self._base_of(served)
        count = self._parameter_count(served)
        precision = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(
            getattr(getattr(self.engine, "decoder", None), "weights", ""), "")
        family = self._family(files)
        return {"name": tagged(name), "model": tagged(name), "modified_at": iso_time(modified), "size": size,
                "digest": hashlib.sha256(identity.encode()).hexdigest(),
                "details": {"parent_model": tagged(parent) if parent else "", "format": "safetensors",
                            "family": family, "families": [family],
                            "parameter_size": _human(count) if count else "", "quantization_level": precision}}

    def show(self, served) -> dict:
        """/api/show's reply for a served model."""
        listing = self.listing(served.name)
        modelfile, template, parameters = self._modelfile(served)
        family = listing["details"]["family"]
        info = {"general.architecture": family, "general.parameter_count": self._parameter_count(served) or None,
                f"{family}.context_length": self.engine.max_len,
                "tokenizer.chat_template": served.tokenizer.chat_template or ""}
        return {"modelfile": modelfile, "parameters": parameters, "template": template, "license": "",
                "details": listing["details"], "model_info": info,
                "capabilities": ["completion", *(["tools"] if template_renders_tools(served.tokenizer) else [])],
                "modified_at": listing["modified_at"]}

    def defaults(self, served) -> dict:
        """{"temperature", "top_p"} for a request whose options set none."""
        if served.name not in self._defaults:
            config = _generation_config(served)
            if config is not None and getattr(config, "do_sample", False):
                self._defaults[served.name] = {
                    "temperature": 1.0 if config.temperature is None else config.temperature,
                    "top_p": 1.0 if config.top_p is None else config.top_p}
            else:
                self._defaults[served.name] = {"temperature": 0.0, "top_p": 1.0}
        return self._defaults[served.name]

    def _base_of(self, served) -> str | None:
        """The base model's served name for an adapter; None for the base itself."""
        if not served.adapter:
            return None
        return next((other for other, model in self.engine.models.items() if not model.adapter), None)

    def _parameter_count(self, served) -> int:
        base = self._base_of(served)
        return _parameter_count(_weight_files(self.engine.models[base] if base else served))

    def _family(self, files: list[Path]) -> str:
        """The architecture (config.json's model_type): from the decoder, else the weights' or vLLM's model dir."""
        decoder = getattr(self.engine, "decoder", None)
        family = getattr(decoder, "model_type", None) or getattr(
            getattr(getattr(decoder, "model", None), "config", None), "model_type", None)
        if family:
            return family
        for directory in [*(f.parent for f in files[:1]), Path(str(getattr(self.engine, "model_path", "")))]:
            try:
                return json.loads((directory / "config.json").read_text(encoding="utf-8"))["model_type"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return "unknown"

    def _modelfile(self, served) -> tuple[str, str, str]:
        """(modelfile, template, parameters): TEMPLATE, SYSTEM and stop tokens of the Modelfile `lmforge export`
        writes, with this server's context and defaults. A chat template that is not "per message: prefix + content
        + suffix" cannot be restated in Go: the template is then shown as it is (Jinja), the Modelfile has none."""
        from ..export.checks import usable_probes
        from ..export.modelfile import TemplateNotExpressible, build_modelfile, ollama_prompt, read_modelfile

        name, tokenizer = tagged(served.name), served.tokenizer
        found: dict = {"parameters": []}
        if served.has_chat_template:
            try:
                found = read_modelfile(build_modelfile(tokenizer, name, False, self.engine.max_len))
                for conversation in usable_probes(tokenizer):  # proven as the export proves it, or not shown
                    prompt = conversation[:-1]
                    if ollama_prompt(found["template"], found.get("system"), prompt) != \
                            render_text(tokenizer, prompt, add_generation_prompt=True):
                        raise TemplateNotExpressible("the derived TEMPLATE renders a probe differently")
            except TemplateNotExpressible:
                found = {"parameters": []}
                stops = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
                found["parameters"] = [("stop", json.dumps(stop, ensure_ascii=False)) for stop in dict.fromkeys(stops)]
        defaults = self.defaults(served)
        parameters = [pair for pair in found["parameters"] if pair[0] == "stop"]
        parameters += [("num_ctx", self.engine.max_len), ("temperature", _number(defaults["temperature"]))]
        if defaults["temperature"]:
            parameters.append(("top_p", _number(defaults["top_p"])))
        lines = [f"# {name} as lmforge serve runs it", f"FROM {name}"]
        if "template" in found:
            lines.append(f'TEMPLATE """{found["template"]}"""')
        if found.get("system") is not None:
            lines.append(f'SYSTEM """{found["system"]}"""')
        lines += [f"PARAMETER {key} {value}" for key, value in parameters]
        template = found.get("template") or tokenizer.chat_template or "{{ .Prompt }}"
        return "\n".join(lines) + "\n", template, "\n".join(f"{key:<30} {value}" for key, value in parameters)


def _weight_files(served) -> list[Path]:
    directory = Path(str(getattr(served.tokenizer, "name_or_path", "") or ""))
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file())


def _parameter_count(files: list[Path]) -> int:
    """Parameters in safetensors files, read from their headers (8 bytes of length, then JSON shapes)."""
    count = 0
    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with path.open("rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, ValueError):
            return 0
        for tensor, entry in header.items():
            if tensor != "__metadata__":
                count += math.prod(entry.get("shape", []))
    return count


def _human(count: int) -> str:
    """Ollama's parameter_size: 135M, 1.7B, 8.0B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)


def _number(value):
    return f"{value:g}" if isinstance(value, float) else value


def _generation_config(served):
    directory = Path(str(getattr(served.tokenizer, "name_or_path", "") or ""))
    if not (directory / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        return None
