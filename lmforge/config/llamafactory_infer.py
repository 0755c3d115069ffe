"""LLaMA-Factory's after-training YAMLs: inference files (`llamafactory-cli chat / api`) → what `lmforge chat` and
`lmforge serve` load, and prediction files (`do_predict` + `predict_with_generate`) → what `lmforge eval` runs.

Owns those two tables. Where LLaMA-Factory points at a training output dir, an lmforge run dir (config.yaml) there is
recognised and used as a run (its best or final weights), because that is where `lmforge train` wrote them. The
training keys of a prediction file are read with llamafactory.py's table. Must not load models (the verbs do).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .llamafactory import is_lmforge_run, translate_flat

# Inference keys: key → field of InferenceRequest, or a note (str) when it changes nothing here.
INFER_FIELDS = {
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapter",
    "template": "template",
    "infer_dtype": "dtype",
    "default_system": "system",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
}
INFER_NOTES = {
    "trust_remote_code": "lmforge loads models with transformers' own classes",
    "finetuning_type": "the adapter dir (or run dir) says which method trained it",
    "stage": "inference does not depend on the training stage",
    "do_sample": "temperature 0 decodes greedily, above 0 samples",
    "enable_thinking": "thinking blocks are the model's own chat template's business",
    "vllm_maxlen": "a vLLM engine setting: pass it with `lmforge serve --backend vllm --vllm-arg max_model_len=N`",
    "vllm_gpu_util": "a vLLM engine setting: `lmforge serve --backend vllm --vllm-arg gpu_memory_utilization=X`",
    "vllm_enforce_eager": "a vLLM engine setting: `lmforge serve --backend vllm --vllm-arg enforce_eager=true`",
    "vllm_config": "vLLM engine settings: `lmforge serve --backend vllm --vllm-arg KEY=VALUE`",
}
INFER_REFUSALS = {
    "quantization_bit": "quantised inference needs a GPU here; export a q8_0 GGUF (`lmforge export RUN --gguf "
                        "q8_0`) and run it in llama.cpp / Ollama",
    "repetition_penalty": "lmforge decodes without a repetition penalty; remove it",
    "top_k": "lmforge samples with temperature and top_p; remove top_k",
}
BACKENDS = {"huggingface": None, "hf": None, "vllm": "vllm"}


@dataclass
class InferenceRequest:
    """What to load: a run dir (its weights as every lmforge verb chooses them), or a model plus an adapter dir."""

    run_dir: str | None = None
    model: str | None = None
    adapter: str | None = None
    template: str | None = None
    backend: str | None = None  # None = lmforge's own decoder; "vllm"
    dtype: str = "auto"
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    notes: list[str] = field(default_factory=list)


def is_inference_yaml(raw: dict) -> bool:
    """A file naming a model without training or exporting it (LLaMA-Factory's examples/inference/*.yaml)."""
    return ("model_name_or_path" in raw and not raw.get("do_train") and not raw.get("do_predict")
            and not any(key.startswith("export_") for key in raw) and "dataset" not in raw)


def read_inference_yaml(path: str | Path) -> InferenceRequest:
    """An inference YAML → InferenceRequest; every unknown or unhonourable key is reported at once (ConfigError)."""
    source = str(path)
    raw = _read_mapping(Path(path))
    request = InferenceRequest()
    problems: list[str] = []
    for key, value in raw.items():
        if key in INFER_FIELDS:
            setattr(request, INFER_FIELDS[key], value)
        elif key in INFER_NOTES:
            request.notes.append(f"{source}: {key}: {INFER_NOTES[key]} (ignored)")
        elif key in INFER_REFUSALS:
            if value not in (None, False):
                problems.append(f"{key}: {value!r} — {INFER_REFUSALS[key]}")
        elif key == "infer_backend":
            if value not in BACKENDS:
                problems.append(f"infer_backend: {value!r} — lmforge runs its own decoder (huggingface) or vLLM's "
                                f"engine (vllm, for `lmforge serve`); use one of them")
            request.backend = BACKENDS.get(value)
        else:
            known = [*INFER_FIELDS, *INFER_NOTES, *INFER_REFUSALS, "infer_backend"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            problems.append(f"unknown key {key!r}" + (f" — did you mean {close[0]}?" if close else
                                                      " (not an inference key lmforge reads)"))
    if not request.model:
        problems.append("model_name_or_path is missing: name the base model (or a full/freeze run's output dir)")
    if problems:
        raise ConfigError(_problems(source, problems, "inference config"))
    _resolve_runs(request, source)
    return request


def _resolve_runs(request: InferenceRequest, source: str) -> None:
    """LLaMA-Factory points at training output dirs; an lmforge run dir there is loaded as a run."""
    if request.adapter and "," in str(request.adapter):
        raise ConfigError(f"{source}: adapter_name_or_path lists several adapters; lmforge applies one (merge the "
                          f"others first with `lmforge export`)")
    for key, value in (("adapter_name_or_path", request.adapter), ("model_name_or_path", request.model)):
        if is_lmforge_run(value):
            request.notes.append(f"{source}: {key} {value} is an lmforge run dir: using its weights (best.json's "
                                 f"choice, else the final ones) on the base model it was trained from")
            request.run_dir, request.model, request.adapter = str(value), None, None
            return


# Keys of a prediction YAML that are not training keys: → eval option, or a note.
PREDICT_KEYS = {
    "do_predict": None,
    "predict_with_generate": "generate",
    "adapter_name_or_path": "adapter",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
}
PREDICT_NOTES = {
    "do_sample": "temperature 0 decodes greedily, above 0 samples",
    "infer_backend": "lmforge eval decodes with its own batched loop",
}


@dataclass
class PredictRequest:
    """`lmforge eval` options from a prediction YAML."""

    inference: InferenceRequest
    data: list[str]
    dataset_dir: str | None
    max_samples: int | None
    cutoff_len: int | None
    batch_size: int | None
    output: str | None
    generate: bool = False
    notes: list[str] = field(default_factory=list)


def is_predict_yaml(raw: dict) -> bool:
    return bool(raw.get("do_predict"))


def read_predict_yaml(path: str | Path) -> PredictRequest:
    """A `do_predict` YAML (examples/extras/nlg_eval) → PredictRequest; problems reported at once (ConfigError)."""
    source = str(path)
    raw = _read_mapping(Path(path))
    if not is_predict_yaml(raw):
        raise ConfigError(f"{source} is not a prediction config (no do_predict: true); for a run dir: lmforge eval "
                          f"runs/NAME --data TEST")
    extra = {key: raw.pop(key) for key in list(raw) if key in PREDICT_KEYS or key in PREDICT_NOTES}
    if raw.get("do_train"):
        raise ConfigError(f"{source}: do_train and do_predict together: train with `lmforge train`, then run this "
                          f"file with do_train removed")
    nested, notes = translate_flat({key: value for key, value in raw.items()}, source)
    problems = list(nested.pop("_refused", [])) + [f"unknown key {key!r}" for key in nested.pop("_unknown", [])]
    stage = nested.get("train", {}).get("stage", "sft")
    if stage != "sft":
        problems.append(f"stage: {stage} — prediction with generation scores sft models; for a reward model use "
                        f"`lmforge score`")
    data = nested.get("data", {})
    entries = _names(data.get("val") or data.get("train"))
    if not entries:
        problems.append("eval_dataset is missing: name the test set(s) (dataset_info.json names or files)")
    model = nested.get("model", {})
    inference = InferenceRequest(model=model.get("name_or_path"), adapter=extra.get("adapter_name_or_path"),
                                 template=model.get("template"))
    if not inference.model:
        problems.append("model_name_or_path is missing")
    for key in ("max_new_tokens", "temperature", "top_p"):
        if key in extra:
            setattr(inference, key, extra[key])
    notes += [f"{source}: {key}: {PREDICT_NOTES[key]} (ignored)" for key in extra if key in PREDICT_NOTES]
    if problems:
        raise ConfigError(_problems(source, problems, "prediction config"))
    _resolve_runs(inference, source)
    train = nested.get("train", {})
    return PredictRequest(inference, entries, data.get("dataset_dir"), data.get("max_samples"), data.get("cutoff_len"),
                          train.get("eval_batch_size"), train.get("output_dir"),
                          generate=bool(extra.get("predict_with_generate")), notes=notes + inference.notes)


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value or [])


def _read_mapping(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return raw


def _problems(source: str, problems: list[str], what: str) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the {what}:\n{lines}"


def is_inference_file(path: str | Path) -> bool:
    """A YAML file LLaMA-Factory's chat / api / webui would read (it names model_name_or_path)."""
    try:
        return is_inference_yaml(_read_mapping(Path(path)))
    except ConfigError:
        return False
