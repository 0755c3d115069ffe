"""Which dataset a name or path means, and loading it as Conversations.

Owns dataset resolution: a file path, or a name in LLaMA-Factory's <dataset_dir>/dataset_info.json. Loading reads
records with sources.py and converts them with formats.py. Must not download anything: hub-only entries are errors
that say how to get the file.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..conversation import Conversation
from ..errors import ConfigError, DataError
from .formats import FormatSpec, convert, detect_format
from .sources import read_json_file, read_records

DEFAULT_DATASET_DIR = "data"  # LLaMA-Factory's default dataset_dir
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# Keys that only matter when loading from a hub; a local file has one split and no subsets.
HUB_ONLY_KEYS = ("subset", "split", "folder")
ENTRY_KEYS = ("file_name", "formatting", "ranking", "columns", "tags", "num_samples", *HUB_KEYS, *HUB_ONLY_KEYS)
DATA_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to read: a file (or a folder of .json/.jsonl files), how to read its records, and its name."""

    path: Path
    format: FormatSpec = FormatSpec()
    name: str = ""
    file_format: str | None = None  # "json" | "jsonl"; None = detect per file


def resolve_dataset(entry: str, dataset_dir: str | Path | None = None, shape: str = "sft") -> DatasetSpec:
    """A dataset entry as the user wrote it: an existing file path, else a name in <dataset_dir>/dataset_info.json.
    `shape` is what the training stage reads (formats.FormatSpec.from_dataset_info): sft, pairs, kto or text."""
    path = Path(entry)
    if path.is_file():
        return DatasetSpec(path=path, name=entry)
    directory = Path(dataset_dir if dataset_dir is not None else DEFAULT_DATASET_DIR)
    info_path = directory / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"dataset {entry!r} is neither a file nor a name in {info_path} (not found)."
                        f"{_path_hint(entry, directory)}")
    info = read_json_file(info_path)
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected a JSON object of dataset names, got {type(info).__name__}")
    if entry not in info:
        raise DataError(_unknown_name_message(entry, info, info_path))
    return dataset_from_info(entry, info[entry], directory, info_path, shape)


def dataset_from_info(name: str, entry: object, directory: Path, info_path: Path, shape: str = "sft") -> DatasetSpec:
    """One dataset_info.json entry → DatasetSpec, with its file resolved relative to the dataset directory."""
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object like {{\"file_name\": \"{name}.json\"}}, got "
                        f"{type(entry).__name__}")
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(key, ENTRY_KEYS, n=1)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: unknown key {key!r}{suggestion}; known keys: {', '.join(ENTRY_KEYS)}")
    if "file_name" not in entry:
        raise _hub_only_error(name, entry, where)
    if "num_samples" in entry:
        raise DataError(f"{where}: num_samples is not supported yet; remove it and limit samples with max_samples")
    path = directory / entry["file_name"]
    if not path.exists():
        raise DataError(f"{where}: file_name {entry['file_name']!r} → {path} not found (file_name is relative to "
                        f"the dataset directory {directory})")
    return DatasetSpec(path=path, format=FormatSpec.from_dataset_info(entry, where, shape), name=name)


def load_conversations(spec: DatasetSpec, max_samples: int | None = None) -> list[Conversation]:
    """Every record of a dataset as a Conversation (the first max_samples, if given). Stops at the first bad record."""
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be a positive number of samples, got {max_samples}")
    result: list[Conversation] = []
    for path in dataset_files(spec.path):
        fmt = spec.format
        for record, where in read_records(path, spec.file_format):
            if max_samples is not None and len(result) >= max_samples:
                return result
            if fmt.format == "auto":  # decide once per file, so a bad record gets "missing field", not "unknown format"
                fmt = replace(fmt, format=detect_format(record, where))
            result.append(convert(record, where, fmt))
    if not result:
        raise DataError(f"{spec.path}: dataset {spec.name or str(spec.path)!r} has no records")
    return result


def load_many(entries: list[str], dataset_dir: str | Path | None = None,
              max_samples: int | None = None) -> tuple[list[Conversation], dict[str, int]]:
    """Several datasets concatenated in order, with how many conversations each contributed (max_samples is per
    dataset, as in LLaMA-Factory)."""
    return load_specs(resolve_many(entries, dataset_dir), max_samples)


def resolve_many(entries: list[str], dataset_dir: str | Path | None = None, shape: str = "sft") -> list[DatasetSpec]:
    if not entries:
        raise ConfigError("no datasets given; name at least one dataset file or dataset_info.json entry")
    return [resolve_dataset(entry, dataset_dir, shape) for entry in entries]


def load_specs(specs: list[DatasetSpec], max_samples: int | None = None
               ) -> tuple[list[Conversation], dict[str, int]]:
    conversations: list[Conversation] = []
    counts: dict[str, int] = {}
    for spec in specs:
        loaded = load_conversations(spec, max_samples)
        conversations.extend(loaded)
        counts[spec.name] = counts.get(spec.name, 0) + len(loaded)  # a dataset listed twice counts twice
    return conversations, counts


def dataset_files(path: Path) -> list[Path]:
    """The files of a dataset: the file itself, or a folder's .json/.jsonl files in name order."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataError(f"{path}: the folder has no .json or .jsonl files")
    return files


def _hub_only_error(name: str, entry: dict, where: str) -> DataError:
    hubs = [f"{key}={entry[key]!r}" for key in HUB_KEYS if key in entry]
    if not hubs:
        return DataError(f"{where}: the entry has no \"file_name\"; add one, e.g. \"file_name\": \"{name}.json\"")
    return DataError(f"{where}: only available from a hub ({', '.join(hubs)}); lmforge does not download datasets "
                     f"at run time. Download the file yourself (e.g. `huggingface-cli download --repo-type dataset "
                     f"<repo> --local-dir <dir>`), put it in the dataset directory and point \"file_name\" at it")


def _unknown_name_message(name: str, info: dict, info_path: Path) -> str:
    names = sorted(info, key=lambda known: -difflib.SequenceMatcher(None, name, known).ratio())
    close = difflib.get_close_matches(name, list(info), n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "")
    looks_like_file = Path(name).suffix.lower() in DATA_SUFFIXES
    key, file_name = (Path(name).stem, Path(name).name) if looks_like_file else (name, f"{name}.json")
    snippet = json.dumps({key: {"file_name": file_name}}, indent=2)
    return (f"dataset {name!r} is not a file and not a name in {info_path}.{suggestion}"
            f"{_path_hint(name, info_path.parent)}\n"
            f"  names there (closest first): {shown or 'none'}\n"
            f"  to add it, put an entry in {info_path} (file_name is relative to {info_path.parent}):\n"
            + "\n".join("    " + line for line in snippet[1:-1].strip("\n").split("\n"))
            + "\n  add \"formatting\": \"sharegpt\" with \"columns\"/\"tags\" for chat-shaped data")


def _path_hint(entry: str, directory: Path) -> str:
    candidate = directory / entry
    if candidate.is_file():
        return f" Did you mean the file {candidate}?"
    if Path(entry).suffix.lower() in DATA_SUFFIXES or "/" in entry:
        return f" File paths are resolved from the current directory ({Path.cwd()})."
    return ""
