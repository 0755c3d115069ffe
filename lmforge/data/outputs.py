"""Output files of the `data` commands: written under temporary names and renamed only when the run completes,
so an error or Ctrl-C never leaves a half-written file that looks finished; plus the naming of OUT's siblings
(OUT.rejects.jsonl, OUT.report.json) and the short reason labels counted in reports. Must not decide content.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path


class OutputFiles:
    """The output and rejects files, written under temporary names beside their targets and renamed on commit();
    without commit() (an error, --strict, Ctrl-C) the temporary files are removed and older outputs stay as they
    were."""

    def __init__(self, out_path: Path, rejects_path: Path):
        self.out_path, self.rejects_path = out_path, rejects_path
        self.files: dict[Path, tuple] = {}
        self.extra: list[tuple[Path, str]] = []

    def __enter__(self) -> OutputFiles:
        return self

    def write(self, record: dict) -> None:
        self._file(self.out_path).write(json.dumps(record, ensure_ascii=False) + "\n")

    def reject(self, entry: dict) -> None:
        self._file(self.rejects_path).write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def add(self, path: Path, text: str) -> None:
        self._file(path).write(text)

    def commit(self) -> None:
        self._file(self.out_path)  # exists even when every row was filtered or rejected
        for path, (handle, tmp) in self.files.items():
            handle.close()
            os.replace(tmp, path)
        if self.rejects_path not in self.files:  # no rejects this time: a stale rejects file would mislead
            self.rejects_path.unlink(missing_ok=True)
        self.files = {}

    def __exit__(self, *exc) -> None:
        for handle, tmp in self.files.values():
            handle.close()
            tmp.unlink(missing_ok=True)

    def _file(self, path: Path):
        if path not in self.files:
            path.parent.mkdir(parents=True, exist_ok=True)
            # open(..., "x") rather than mkstemp: the file gets the usual permissions (umask), not 0600
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            self.files[path] = (tmp.open("x", encoding="utf-8", newline="\n"), tmp)
        return self.files[path][0]


def sibling_path(out_path: Path, suffix: str) -> Path:
    """train.jsonl → train.<suffix> (the output's name without .jsonl/.json)."""
    name = out_path.name
    for ext in (".jsonl", ".json"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return out_path.with_name(f"{name}.{suffix}")


def reason_kind(reason: str) -> str:
    """A short label for counting reasons in the report: the reason up to its first ':' or '(' ."""
    return re.split(r"[:(;]", reason, maxsplit=1)[0].strip()[:80]
