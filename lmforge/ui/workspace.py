"""The workspace of `lmforge ui`: the one folder the board reads and writes, and the rule that no path leaves it.

Owns: turning a path a client sent into a real path inside the workspace (no `..` escape, no absolute path elsewhere,
no symlink pointing out), listing the dataset files and run dirs in it, and writing an upload with a size limit.
Must not start processes or know about HTTP.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".xlsx", ".parquet", ".txt")
SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", "checkpoints", "adapter", "model", "evals"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class PathRefused(UserError):
    """A path outside the workspace (or otherwise not allowed): the API answers 403."""


class UploadTooLarge(UserError):
    """An upload over the size limit: the API answers 413."""


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError(f"workspace {root} is not a directory (create it, or pass --workspace DIR)")

    def path(self, relative: str, *, must_exist: bool = False) -> Path:
        """The real path of `relative` (relative to the workspace, or absolute inside it), symlinks resolved; refused
        when it is outside the workspace."""
        if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
            raise PathRefused(f"path {relative!r}: give a file or folder inside the workspace {self.root}")
        candidate = Path(relative)
        real = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if real != self.root and not real.is_relative_to(self.root):
            raise PathRefused(f"path {relative!r} is outside the workspace {self.root} (symlinks and .. are "
                              f"followed): use a file inside it")
        if must_exist and not real.exists():
            raise UserError(f"{relative}: no such file or folder in the workspace")
        return real

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def run_name(self, name: str) -> str:
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            raise UserError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 100, not starting "
                            f"with '.' or '-')")
        return name

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.path(f"runs/{self.run_name(name)}")

    def list_runs(self) -> list[Path]:
        """Every dir under runs/ holding a config.yaml (started from the page or the CLI)."""
        if not self.runs_dir.is_dir():
            return []
        found = [p for p in self.runs_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file()
                 and SAFE_NAME.match(p.name) and p.resolve().is_relative_to(self.root)]
        return sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)

    def data_files(self, limit: int = 500) -> list[dict]:
        """Dataset-looking files in the workspace (not inside runs' weights), newest first."""
        found = []
        for path in _walk(self.root, depth=4):
            if path.suffix.lower() in DATA_SUFFIXES and not path.name.startswith("."):
                stat = path.stat()
                found.append({"path": self.relative(path), "bytes": stat.st_size, "modified": stat.st_mtime})
                if len(found) >= limit:
                    break
        return sorted(found, key=lambda f: f["path"])

    def upload(self, name: str, limit: int, folder: str = "data") -> Upload:
        """A writer for an uploaded file going to <folder>/<name> (a plain file name)."""
        if not SAFE_NAME.match(name or "") or Path(name).suffix.lower() not in DATA_SUFFIXES:
            raise UserError(f"upload name {name!r}: a plain file name ending in {', '.join(DATA_SUFFIXES)}")
        target_dir = self.path(folder)
        target_dir.mkdir(parents=True, exist_ok=True)
        return Upload(self.path(f"{folder}/{name}"), limit)


class Upload:
    """Writes chunks to a temporary name, refuses them past `limit` bytes, renames into place on commit(); nothing
    is left behind when refused or abandoned."""

    def __init__(self, target: Path, limit: int):
        self.target, self.limit, self.written = target, limit, 0
        self.tmp = target.with_name(f".upload-{target.name}-{os.getpid()}-{id(self)}")
        self.handle = self.tmp.open("wb")

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.limit:
            self.abandon()
            raise UploadTooLarge(f"upload {self.target.name} is larger than the limit of {self.limit:,} bytes "
                                 f"(start lmforge ui with a larger --max-upload-mb)")
        self.handle.write(chunk)

    def commit(self) -> Path:
        self.handle.close()
        os.replace(self.tmp, self.target)
        return self.target

    def abandon(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _walk(root: Path, depth: int):
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            continue  # a link may point outside; list only what is really here
        if entry.is_dir():
            if depth > 0 and entry.name not in SKIPPED_DIRS and not entry.name.startswith("."):
                yield from _walk(entry, depth - 1)
        elif entry.is_file():
            yield entry
