"""`lmforge export`: a trained run → a directory other tools run. Merged HF weights (sharded safetensors, the tokenizer
with the training chat template, generation_config) or the PEFT adapter alone; optionally a GGUF file and an Ollama
Modelfile; and manifest.json (where it came from, what was checked, with the figures).

Nothing is declared done unproven: merged logits must equal base+adapter logits, the files written must reload to the
same logits (within the tolerance of the chosen dtype / GGUF type), and every exported tokenizer must render the probe
conversations to the same tokens as training (the checks themselves: export_checks.py). Everything is written into a
temp dir beside OUT and renamed into place last. Must not train, and leaves GGUF and Modelfile details to
gguf_export.py and modelfile.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from .. import __version__
from ..config.llamafactory import is_export_yaml, translate_export
from ..data.render import end_of_turn_ids, ensure_chat_template, render_text
from ..errors import ConfigError, UserError
from ..generate import load_for_inference, load_run_weights
from ..model.loader import (
    DTYPE_NAMES,
    load_model,
    load_tokenizer,
    resolve_model,
    sha256_of,
)
from ..model.method_specs import method_spec
from ..rundir import RunDir, choose_weights
from .checks import (
    logit_gap,
    logits_of,
    probe_ids,
    require_close,
    require_same_tokens,
    usable_probes,
)
from .gguf_writer import (
    GGUF_TYPES,
    bos_added,
    check_gguf_config,
    check_gguf_support,
    write_gguf,
)
from .modelfile import (
    TemplateNotExpressible,
    build_modelfile,
    ollama_prompt,
    read_modelfile,
)

MANIFEST = "manifest.json"
# Methods whose trained part is not a change to existing weights, so merge_and_unload has nothing to fold in.


@dataclass
class ExportRequest:
    source: str | None = None  # run dir, PEFT adapter dir or model dir (None with a LLaMA-Factory YAML)
    output: str | None = None
    checkpoint: str | None = None  # run dirs: best | final | step-N (default: best.json's choice, else final)
    adapter_only: bool = False
    gguf: str | None = None  # f32 | f16 | q8_0
    dtype: str = "auto"  # merged safetensors: auto (the base model's stored dtype) | float32 | bfloat16 | float16
    shard_size_gb: float = 5.0
    overwrite: bool = False
    base_model: str | None = None  # LLaMA-Factory: model_name_or_path
    adapter: str | None = None  # LLaMA-Factory: adapter_name_or_path
    method: str | None = None  # LLaMA-Factory: finetuning_type
    template: str | None = None  # LLaMA-Factory: template (used only when the tokenizer has no chat template)
    notes: list[str] = field(default_factory=list)


def request_from_yaml(path: str | Path, **overrides) -> ExportRequest:
    """An ExportRequest from a LLaMA-Factory export YAML; command-line values (not None) win over the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"export config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, dict) or not is_export_yaml(raw):
        raise ConfigError(f"{path} is not a LLaMA-Factory export config (no export_dir / export_* keys); to export a "
                          f"run, pass its directory: lmforge export runs/NAME -o OUT")
    fields, notes = translate_export(raw, str(path))
    request = ExportRequest(**fields, notes=notes)
    for name, value in overrides.items():
        if value is not None and value is not False:
            setattr(request, name, value)
    return request


@dataclass
class Source:
    """What an export reads, found without loading anything (so bad input fails fast)."""

    kind: str  # run | adapter | model
    path: Path
    base_model: str | None = None
    adapter: Path | None = None
    run: RunDir | None = None
    weights: object = None  # checkpoint.RunWeights for runs
    method: str | None = None

    def protected_paths(self) -> list[Path]:
        return [p for p in (self.path, self.adapter, self.run.root if self.run else None) if p is not None]


def find_source(request: ExportRequest) -> Source:
    if request.source is None:
        return _llamafactory_source(request)
    path = Path(request.source)
    if not path.exists():
        raise UserError(f"{path} does not exist: name a run dir (runs/NAME), a PEFT adapter dir, a model dir or a "
                        f"LLaMA-Factory export YAML")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        run = RunDir(path)
        weights = choose_weights(run, request.checkpoint)
        print(f"using {weights.reason} of {run.root}")
        method = (yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}).get("method", {}).get("type")
        return Source("run", path, run=run, weights=weights, method=method)
    if request.checkpoint:
        raise UserError(f"--checkpoint needs a run dir made by `lmforge train`; {path} is not one (no config.yaml)")
    if (path / "adapter_config.json").is_file():
        return Source("adapter", path, base_model=request.base_model or _adapter_base(path), adapter=path,
                      method="lora")
    if (path / "config.json").is_file():
        return Source("model", path, base_model=str(path), method=request.method)
    raise UserError(f"{path} is not a run dir (config.yaml with adapter/ or model/), a PEFT adapter dir "
                    f"(adapter_config.json) or a model dir (config.json)")


def _llamafactory_source(request: ExportRequest) -> Source:
    method = request.method or "lora"
    if not request.adapter:  # finetuning_type full / freeze: the model dir is the trained model; lora: the base alone
        return Source("model", Path(resolve_model(request.base_model)), base_model=request.base_model,
                      method=None if method == "lora" else method)
    if "," in str(request.adapter):
        raise ConfigError("adapter_name_or_path: lmforge merges one adapter per export; list one directory")
    if method != "lora":
        raise ConfigError(f"finetuning_type: {method} has no adapter to merge: drop adapter_name_or_path and set "
                          f"model_name_or_path to the trained model dir")
    adapter = Path(request.adapter)
    if not (adapter / "adapter_config.json").is_file() and (adapter / "adapter" / "adapter_config.json").is_file():
        adapter = adapter / "adapter"  # an lmforge run dir given as the adapter
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_name_or_path: {request.adapter} is not a PEFT adapter dir (no "
                          f"adapter_config.json)")
    return Source("adapter", adapter, base_model=request.base_model, adapter=adapter, method="lora")


def _adapter_base(adapter: Path) -> str:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter}/adapter_config.json names no base model: use a LLaMA-Factory export YAML with "
                        f"model_name_or_path and adapter_name_or_path")
    return base


def check_request(request: ExportRequest, source: Source) -> Path:
    """The output dir, after refusing what cannot be done (before any model is loaded)."""
    if not request.output:
        raise UserError("name the output dir: lmforge export SOURCE -o OUT (or export_dir in the export YAML)")
    if request.gguf and request.gguf not in GGUF_TYPES:
        raise UserError(f"--gguf {request.gguf}: choose one of {', '.join(GGUF_TYPES)}")
    if request.dtype != "auto" and request.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {request.dtype}: choose auto, float32, bfloat16 or float16")
    if not request.shard_size_gb or request.shard_size_gb <= 0:
        raise UserError(f"--shard-size {request.shard_size_gb}: give a size in GB above 0 (e.g. 5)")
    if request.gguf:
        check_gguf_config(_model_config(source))
    if request.adapter_only and request.gguf:
        raise UserError("--gguf needs merged weights; drop --adapter-only (llama.cpp applies no PEFT adapters here)")
    spec = method_spec(source.method)
    if request.adapter_only and (source.method is None or spec is not None and spec.saves_model):
        raise UserError(f"--adapter-only needs an adapter; {source.path} holds {source.method or 'full'} weights: "
                        f"export the merged model instead (drop --adapter-only)")
    if not request.adapter_only and spec is not None and not spec.mergeable:
        raise UserError(f"a {source.method} run cannot be merged into plain weights ({spec.unmergeable}); "
                        f"export it with --adapter-only")
    out = Path(request.output)
    if out.is_file():
        raise UserError(f"{out} is a file: -o needs a directory")
    if out.is_dir() and any(out.iterdir()) and not request.overwrite:
        raise UserError(f"{out} already exists and is not empty: choose another -o, or pass --overwrite to replace it")
    for protected in source.protected_paths():
        resolved, target = protected.resolve(), out.resolve()
        if target == resolved or resolved.is_relative_to(target):
            raise UserError(f"-o {out} would replace the export's own source {protected}: choose another directory")
    return out


def _model_config(source: Source):
    """The transformers config of what will be exported, from config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    if source.kind == "run" and source.weights.path == source.run.model:
        directory = source.run.model
    elif source.kind == "run":
        config = yaml.safe_load(source.run.config.read_text(encoding="utf-8")) or {}
        directory = Path(resolve_model(config.get("model", {}).get("name_or_path", "")))
    else:
        directory = Path(resolve_model(source.base_model))
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError):  # a model_type transformers does not know: refused by its name below
        return SimpleNamespace(model_type=json.loads((directory / "config.json").read_text()).get("model_type", "?"))


def export(request: ExportRequest) -> dict:
    """Run one export; returns the manifest that was written to OUT/manifest.json."""
    source = find_source(request)
    out = check_request(request, source)
    started = time.perf_counter()
    model, tokenizer = _load(source, request)
    probes = usable_probes(tokenizer)
    manifest = _manifest_head(source, request)
    manifest["notes"] = request.notes  # the steps below may still add to them
    reference, base_logits = _reference_logits(model, tokenizer, probes)
    with staged_dir(out, request.overwrite) as tmp:
        if request.adapter_only:
            manifest["verification"] = _export_adapter(model, tokenizer, probes, reference, source, tmp)
        else:
            manifest["verification"] = _export_merged(model, tokenizer, probes, reference, base_logits, request,
                                                      tmp, manifest)
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _load(source: Source, request: ExportRequest):
    """(model, tokenizer) in float32 — merging in full precision, casting only when saving."""
    if source.kind == "run":
        model, tokenizer = load_run_weights(source.weights, "float32")
    else:
        model, tokenizer = load_for_inference(model=source.base_model, dtype="float32",
                                              adapter=str(source.adapter) if source.adapter else None)
    if request.template and tokenizer.chat_template:  # as in training: the model's own template wins
        request.notes.append(f"template {request.template!r} ignored: the tokenizer carries the chat template it "
                             f"was trained with")
    elif request.template:
        note = ensure_chat_template(tokenizer, request.template)
        if note:
            request.notes.append(note)
    return model, tokenizer


def _reference_logits(model, tokenizer, probes):
    """The trained model's logits on the probes, and (for an adapter) the base model's, to show what it changed."""
    prompts = probe_ids(tokenizer, probes)
    reference = logits_of(model, prompts)
    base = None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = logits_of(model, prompts)
    return reference, base


def _export_adapter(model, tokenizer, probes, reference, source: Source, tmp: Path) -> dict:
    saved = source.adapter or (None if source.weights.is_checkpoint else source.weights.path)
    if saved is not None:  # an adapter dir as training wrote it: copied as is
        for path in saved.iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
    elif hasattr(model, "peft_config"):  # a checkpoint: its trainable tensors are in the PEFT model now
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    else:
        raise UserError(f"checkpoint {source.weights.path} of a {source.method} run cannot be saved as an adapter; "
                        f"export the run's final adapter (--checkpoint final) or the merged model")
    base = json.loads((tmp / "adapter_config.json").read_text())["base_model_name_or_path"]
    reloaded, reloaded_tokenizer = load_for_inference(model=base, adapter=str(tmp), dtype="float32")
    require_same_tokens("exported tokenizer", tokenizer, reloaded_tokenizer, probes)
    gap = require_close("base + exported adapter logits", reference,
                        logits_of(reloaded, probe_ids(tokenizer, probes)), "float32")
    return {"probes": len(reference), "adapter_reloaded_vs_trained": gap, "tokenizer_renders_like_training": True}


def _export_merged(model, tokenizer, probes, reference, base_logits, request: ExportRequest, tmp: Path,
                   manifest: dict) -> dict:
    prompts = probe_ids(tokenizer, probes)
    checks: dict = {"probes": len(prompts)}
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        checks["merged_vs_adapter"] = require_close("merged logits", reference, logits_of(model, prompts), "merge")
        checks["adapter_vs_base"] = logit_gap(base_logits, reference)  # how much the adapter changes the model
    if request.gguf:  # from the float32 merged weights, before any cast
        check_gguf_support(model, tokenizer)
        manifest["gguf"] = _write_and_check_gguf(model, tokenizer, probes, reference, request.gguf, tmp)
    dtype = _export_dtype(request.dtype, manifest["base_model"].get("stored_dtype"))
    model = model.to(dtype)
    if tokenizer.chat_template:  # HF generate() then stops at the end of the assistant's turn, as lmforge chat does
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, max_shard_size=int(request.shard_size_gb * 1e9))
    tokenizer.save_pretrained(tmp)
    manifest["dtype"] = str(dtype).removeprefix("torch.")
    manifest["shard_size_gb"] = request.shard_size_gb
    reloaded_tokenizer = load_tokenizer(str(tmp))
    require_same_tokens("exported tokenizer", tokenizer, reloaded_tokenizer, probes)
    del model  # the reload below needs the memory
    reloaded = load_model(str(tmp), torch.float32).eval()
    checks["exported_vs_trained"] = require_close(f"the exported {manifest['dtype']} weights' logits", reference,
                                                  logits_of(reloaded, prompts), manifest["dtype"])
    checks["tokenizer_renders_like_training"] = True
    manifest["modelfile"] = _write_modelfile(tokenizer, reloaded, probes, tmp, manifest.get("gguf"))
    return checks


def _export_dtype(requested: str, stored: str | None) -> torch.dtype:
    if requested != "auto":
        return DTYPE_NAMES[requested]
    return DTYPE_NAMES.get(str(stored or "float32").removeprefix("torch."), torch.float32)


def _write_and_check_gguf(model, tokenizer, probes, reference, qtype: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = tmp / f"model-{qtype}.gguf"
    info = write_gguf(model, tokenizer, path, qtype, name=getattr(model.config, "_name_or_path", "") or "lmforge")
    # The proof is an independent reader: transformers' own GGUF loader rebuilds model and tokenizer from the file,
    # seen alone in a dir of its own (beside config.json / tokenizer.json it would quietly read those instead).
    with tempfile.TemporaryDirectory(dir=tmp, prefix=".gguf-alone-") as alone, _quiet_transformers():
        os.link(path, Path(alone) / path.name)
        reread = AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32,
                                                      quantization_config=GgufConfig(dequantize=True)).eval()
        reread_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
    require_same_tokens(f"tokenizer read back from {path.name}", tokenizer, reread_tokenizer, probes)
    gap = require_close(f"logits of {path.name} read back by transformers", reference,
                        logits_of(reread, probe_ids(tokenizer, probes)), qtype)
    return {"file": path.name, **info, "read_back_vs_trained": gap, "tokenizer_renders_like_training": True}


@contextmanager
def _quiet_transformers():
    """transformers' GGUF loader warns about optional GPU kernels it cannot load; nothing a user can act on."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def _write_modelfile(tokenizer, model, probes, tmp: Path, gguf: dict | None) -> dict:
    """An Ollama Modelfile whose TEMPLATE is proven to render the probes like the chat template, or the reason why
    there is none."""
    if not tokenizer.chat_template:
        return {"written": False, "reason": "the model has no chat template"}
    with_bos = gguf["add_bos_token"] if gguf else bos_added(tokenizer)
    source = f"./{gguf['file']}" if gguf else "."
    header = (f"written by lmforge {__version__}; create the model with: ollama create NAME -f Modelfile"
              + ("" if gguf else " (FROM . imports these safetensors; export with --gguf for a GGUF)"))
    try:
        text = build_modelfile(tokenizer, source, with_bos, model.config.max_position_embeddings,
                               model.generation_config, header)
        parsed = read_modelfile(text)
        for index, conversation in enumerate(probes):
            prompt = conversation[:-1]
            expected = render_text(tokenizer, prompt, add_generation_prompt=True)
            got = (tokenizer.bos_token if with_bos else "") + ollama_prompt(parsed["template"], parsed.get("system"),
                                                                            prompt)
            if got != expected:
                raise TemplateNotExpressible(f"the derived TEMPLATE renders probe {index} differently")
    except TemplateNotExpressible as reason:
        print(f"warning: no Ollama Modelfile: {reason}")
        return {"written": False, "reason": str(reason)}
    (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return {"written": True, "from": source, "template_renders_like_chat_template": True, "probes": len(probes)}


def _manifest_head(source: Source, request: ExportRequest) -> dict:
    manifest: dict = {"lmforge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "format": "adapter" if request.adapter_only else "merged", "source": str(source.path),
                      "method": source.method}
    base_name = source.base_model
    if source.run is not None:
        config = yaml.safe_load(source.run.config.read_text(encoding="utf-8")) or {}
        base_name = config.get("model", {}).get("name_or_path")
        manifest["run"] = {"dir": str(source.run.root), "weights": source.weights.label,
                           "weights_path": str(source.weights.path), "step": source.weights.step}
        manifest["data"] = data_fingerprint(config)
        for name in ("data_report.json", "eval.json", "best.json"):
            path = source.run.root / name
            if path.is_file():
                try:
                    manifest[name.removesuffix(".json")] = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    request.notes.append(f"{path} is not valid JSON; left out of the manifest")
    if source.adapter is not None:
        adapter_config = json.loads((source.adapter / "adapter_config.json").read_text())
        manifest["adapter"] = {"path": str(source.adapter), **{k: adapter_config.get(k) for k in
                               ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")}}
    manifest["base_model"] = {"name": base_name, "stored_dtype": _stored_dtype(base_name)}
    return manifest


def _stored_dtype(name: str | None) -> str | None:
    if not name:
        return None
    try:
        config = json.loads((Path(resolve_model(name)) / "config.json").read_text())
    except (UserError, OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def data_fingerprint(config: dict) -> dict:
    """sha256 of every training/validation data file the run's config.yaml names, and one over all of them."""
    from ..data.datasets import dataset_files, resolve_dataset

    data = config.get("data", {})
    files = []
    try:
        for entry in [*data.get("train", []), *data.get("val", [])]:
            for path in dataset_files(resolve_dataset(entry, data.get("dataset_dir")).path):
                files.append({"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    except UserError as error:
        return {"sha256": None, "note": f"training data not readable from here: {error}"}
    combined = sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    return {"sha256": combined, "files": files}


@contextmanager
def staged_dir(out: Path, overwrite: bool):
    """Yield a temp dir beside `out`; on success it replaces `out`, on any failure it is removed. A killed export
    leaves only a hidden .NAME.tmp-PID dir, which the next export to the same place removes."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # appeared while we worked
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{out} was filled by something else during the export; nothing was replaced")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # rename(2) replaces an empty directory


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def summary(manifest: dict, out: Path) -> str:
    """What the CLI prints after an export."""
    checks = manifest.get("verification", {})
    lines = [f"exported {manifest['format']} model to {out}"]
    if "merged_vs_adapter" in checks:
        lines.append(f"  merged == base+adapter: relative RMS {checks['merged_vs_adapter']['relative_rms']:.1e} "
                     f"(adapter changed the base by {checks['adapter_vs_base']['relative_rms']:.1e})")
    for key, label in (("exported_vs_trained", "reloaded safetensors"), ("adapter_reloaded_vs_trained",
                                                                          "reloaded adapter")):
        if key in checks:
            lines.append(f"  {label} == trained: relative RMS {checks[key]['relative_rms']:.1e}")
    if manifest.get("gguf"):
        gguf = manifest["gguf"]
        lines.append(f"  {gguf['file']} read back by transformers: relative RMS "
                     f"{gguf['read_back_vs_trained']['relative_rms']:.1e}, next-token agreement "
                     f"{gguf['read_back_vs_trained']['top1_agreement']:.1%}")
    modelfile = manifest.get("modelfile")
    if modelfile and modelfile.get("written"):
        lines.append(f"  Modelfile: ollama create NAME -f {out / 'Modelfile'}")
    lines.append(f"  tokenizer renders the probes like training: yes · details in {out / MANIFEST}")
    return "\n".join(lines)
