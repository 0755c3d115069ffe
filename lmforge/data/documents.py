"""Raw text for continued pretraining (stage pt): documents from .txt files (one per non-empty line, as LLaMA-Factory
and 🤗 datasets' text loader read them) or JSON/JSONL records with a text field (`text`, or the column that
dataset_info.json maps `prompt` to). Must not tokenize or cut documents into blocks (stages.py does).
"""

from __future__ import annotations

from ..errors import DataError
from .datasets import DatasetSpec, dataset_files
from .formats import _preview
from .sources import read_records, read_text

TEXT_SUFFIXES = (".txt", ".text", ".md")


def load_documents(specs: list[DatasetSpec], max_samples: int | None = None) -> tuple[list[str], dict]:
    documents: list[str] = []
    counts: dict[str, int] = {}
    for spec in specs:
        found = []
        for path in _files(spec):
            if path.suffix.lower() in TEXT_SUFFIXES:
                found += [line.strip() for line in read_text(path).splitlines() if line.strip()]
                continue
            key = spec.format.columns.get("prompt", "text")
            for record, where in read_records(path, spec.file_format):
                value = record.get(key)
                if not isinstance(value, str):
                    hint = (" (this is a conversation: use stage sft)"
                            if {"messages", "conversations", "instruction"} & set(record) else "")
                    raise DataError(f"{where}: stage pt reads documents from field {key!r}, but this record has "
                                    f"{_preview(value) if key in record else 'no such field'}{hint}; its keys: "
                                    f"{', '.join(record) or 'none'}")
                if value.strip():
                    found.append(value)
        found = found[:max_samples] if max_samples else found
        if not found:
            raise DataError(f"{spec.path}: dataset {spec.name or str(spec.path)!r} has no text")
        documents += found
        counts[spec.name] = counts.get(spec.name, 0) + len(found)
    return documents, counts


def _files(spec: DatasetSpec):
    if spec.path.is_dir():
        return sorted(p for p in spec.path.iterdir() if p.is_file() and p.suffix.lower() in
                      (*TEXT_SUFFIXES, ".json", ".jsonl"))
    return dataset_files(spec.path)
