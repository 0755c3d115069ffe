"""Prepared data that a second training run does not redo: datasets cleaned by a recipe, and conversations rendered
into token ids, each cached under $LMFORGE_HOME/data by a hash of everything the result depends on.

Owns the cache keys (file bytes + format + recipe for cleaning; conversations + tokenizer + chat template + train_on +
cutoff_len + the render code for tokens), the on-disk formats and atomic writes. Must not decide how data is read,
cleaned or rendered (data/, render.py do); a cache entry is only ever a copy of what those would produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from ..conversation import Conversation
from .datasets import DatasetSpec, dataset_files
from .recipe import Step
from .render import Example, RenderStats, render_dataset

_RENDER_CODE = (Path(__file__).with_name("render.py"), Path(__file__).with_name("templates.py"))


def cache_root() -> Path:
    from ..model.loader import lmforge_home

    return lmforge_home() / "data"


# --- cleaning ---------------------------------------------------------------------------------------------------------

def cleaned_dataset(spec: DatasetSpec, steps: list[Step]) -> tuple[DatasetSpec, dict]:
    """`spec` run through the recipe `steps` (lmforge data clean), from the cache when the same files were cleaned with
    the same recipe before. Returns the cleaned dataset (messages shape) and a summary for the data report."""
    from .clean import clean_file

    digest = hashlib.sha256(f"clean {__version__} folders-as-one".encode())  # folders were once cleaned per file
    files = dataset_files(spec.path)
    for path in files:
        digest.update(_file_digest(path))
    digest.update(json.dumps([repr(spec.format), spec.file_format, [s.to_dict() for s in steps]],
                             sort_keys=True, default=str).encode())
    entry = cache_root() / "cleaned" / digest.hexdigest()[:24]
    out = entry / "clean.jsonl"
    hit = (entry / "clean.report.json").is_file()
    if not hit:
        staging = _staging(entry)
        try:
            clean_file(spec.path, staging / out.name, recipe=steps, format_spec=spec.format)  # a folder: as one
            _publish(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report = json.loads((entry / "clean.report.json").read_text(encoding="utf-8"))
    summary = {"cached": hit, "records_in": report["records_in"], "kept": report["kept"],
               "rejected": report["rejected"], "report": str(entry / "clean.report.html"),
               "rejects": str(entry / "clean.rejects.jsonl") if report["rejected"] else None}
    return DatasetSpec(path=out, name=spec.name), summary


# --- tokenisation -----------------------------------------------------------------------------------------------------

def rendered_dataset(tokenizer, conversations: list[Conversation], train_on: str, cutoff_len: int
                     ) -> tuple[list[Example], RenderStats, bool]:
    """render.render_dataset(...), from the cache when the same conversations were rendered with the same tokenizer,
    chat template and options before. Returns (examples, stats, cache hit)."""
    digest = hashlib.sha256(f"render {__version__}".encode())
    for code in _RENDER_CODE:
        digest.update(code.read_bytes())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(f"{train_on} {cutoff_len}".encode())
    for conversation in conversations:
        digest.update(json.dumps(conversation.to_record(), ensure_ascii=False).encode())  # + tools, loss flags
        digest.update(b"\x00")
    entry = cache_root() / "tokenized" / f"{digest.hexdigest()[:24]}.npz"
    if entry.is_file():
        try:
            return (*_load_examples(entry), True)
        except (OSError, ValueError, KeyError):  # a damaged entry is rebuilt, not trusted
            entry.unlink(missing_ok=True)
    examples, stats = render_dataset(tokenizer, conversations, train_on, cutoff_len)
    _save_examples(entry, examples, stats)
    return examples, stats, False


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the tokenizer's model and rules, special tokens and the chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.all_special_tokens, tokenizer.eos_token,
                              tokenizer.bos_token], default=str).encode())
    return digest.hexdigest()


def _save_examples(path: Path, examples: list[Example], stats: RenderStats) -> None:
    lengths = np.fromiter((len(e.input_ids) for e in examples), np.int64, len(examples))
    ids = np.fromiter((t for e in examples for t in e.input_ids), np.int32, int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e.labels), np.int32, int(lengths.sum()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.npz")
    try:
        np.savez(tmp, ids=ids, labels=labels, lengths=lengths, stats=np.array(json.dumps(asdict(stats))))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_examples(path: Path) -> tuple[list[Example], RenderStats]:
    with np.load(path) as data:
        ids, labels, lengths = data["ids"].tolist(), data["labels"].tolist(), data["lengths"].tolist()
        stats = RenderStats(**json.loads(str(data["stats"])))
    examples, start = [], 0
    for length in lengths:
        examples.append(Example(ids[start:start + length], labels[start:start + length]))
        start += length
    return examples, stats


# --- files ------------------------------------------------------------------------------------------------------------

def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _staging(entry: Path) -> Path:
    staging = entry.with_name(f".{entry.name}.{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, entry: Path) -> None:
    try:
        os.replace(staging, entry)
    except OSError:  # another run published the same entry first: theirs is identical
        if not entry.is_dir():
            raise

