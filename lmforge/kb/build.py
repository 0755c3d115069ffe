"""`lmforge kb build / add / remove`: documents into a knowledge base, re-embedding only what changed.

Owns the update rules. build: the KB holds exactly the given documents afterwards (new and changed files embedded,
unchanged files kept as they are, files no longer given removed); add: new and changed files embedded, the rest kept;
remove: the named files' chunks dropped. A different embedding model or chunker setting than the KB was built with
re-embeds everything (and says so). A file that cannot be read is reported with the reason and left out, a table row
that cannot be read likewise; every file's outcome and chunk count is in the report (build_report.json). Must not
rank or know about argparse.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .chunking import Chunk, ChunkSettings, chunk_section
from .readers import RowColumns, Unreadable, collect_files, read_sections
from .store import MANIFEST, KnowledgeBase, display_path

ADDED, CHANGED, UNCHANGED, REMOVED, SKIPPED = "added", "re-embedded", "unchanged", "removed", "skipped"


@dataclass
class FileOutcome:
    path: str
    status: str
    chunks: int = 0
    reason: str | None = None
    problems: list[str] = field(default_factory=list)  # rows that could not be read


@dataclass
class BuildReport:
    kb: str
    files: list[FileOutcome]
    total_files: int = 0
    total_chunks: int = 0
    embedded_chunks: int = 0
    seconds: float = 0.0
    note: str | None = None

    def count(self, status: str) -> int:
        return sum(outcome.status == status for outcome in self.files)

    def summary(self) -> str:
        lines = []
        for outcome in self.files:
            if outcome.status == SKIPPED:
                lines.append(f"  skipped {display_path(outcome.path)}: {outcome.reason}")
            for problem in outcome.problems:
                lines.append(f"  row left out: {display_path(outcome.path)} {problem}")
        if self.note:
            lines.insert(0, f"  note: {self.note}")
        statuses = (ADDED, CHANGED, UNCHANGED, REMOVED, SKIPPED)
        counts = ", ".join(f"{self.count(status)} {status}" for status in statuses if self.count(status))
        speed = ""
        if self.embedded_chunks and self.seconds:
            speed = f" ({self.embedded_chunks / self.seconds:.1f} chunks/s)"
        lines.append(f"{self.kb}: {self.total_files} files, {self.total_chunks} chunks; this run: "
                     f"{counts or 'nothing'}; {self.embedded_chunks} chunks embedded in {self.seconds:.1f}s{speed}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "files"},
                "files": [asdict(outcome) for outcome in self.files]}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_file(path: Path, settings: ChunkSettings, rows: RowColumns, count_tokens) -> tuple[list[Chunk], list[str]]:
    sections, problems = read_sections(path, rows)
    chunks = [chunk for section in sections for chunk in chunk_section(section, settings, count_tokens)]
    if not chunks:
        raise Unreadable("no text in it" + (f" ({len(problems)} unreadable rows)" if problems else ""))
    return chunks, problems


def update_kb(kb_dir: str | Path, paths: list[str], mode: str, embedder, settings: ChunkSettings | None = None,
              rows: RowColumns | None = None) -> BuildReport:
    """mode is "build", "add" or "remove". settings / rows: None keeps the KB's own (default ones for a new KB)."""
    started = time.perf_counter()
    root = Path(kb_dir)
    exists = (root / MANIFEST).is_file()
    if root.exists() and not exists and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root} exists and is not a knowledge base; give -o a new or empty folder")
    if mode in ("add", "remove") and not exists:
        raise UserError(f"{root} is not a knowledge base yet; create it with lmforge kb build DOCS -o {root}")
    kb = KnowledgeBase.open(root) if exists else None
    note = None
    if kb is not None:
        settings = settings or ChunkSettings(**kb.manifest["chunker"])
        rows = rows or _rows_from(kb.manifest["rows"])
        wanted = (embedder.describe(), asdict(settings), _rows_json(rows))
        had = (kb.manifest["embedding"], kb.manifest["chunker"], kb.manifest["rows"])
        if wanted != had and mode != "remove":
            changed = [name for name, a, b in zip(("embedding model", "chunker settings", "row columns"), wanted, had)
                       if a != b]
            note = f"{' and '.join(changed)} changed since the last build: every file is embedded again"
            previous = list(kb.files)
            kb = None
            if mode == "add":
                paths = [*previous, *paths]  # keep what the KB held, under the new settings
    settings = settings or ChunkSettings()
    rows = rows or RowColumns()
    if kb is None:
        kb = KnowledgeBase.create(root, embedder.describe(), asdict(settings), _rows_json(rows))

    outcomes: list[FileOutcome] = []
    embedded = 0
    if mode == "remove":
        for given in paths:
            key = _known_path(kb, given)
            outcomes.append(FileOutcome(key, REMOVED, kb.remove_file(key)))
    else:
        files, not_documents = collect_files(paths)
        outcomes += [FileOutcome(str(path), SKIPPED, reason=reason) for path, reason in not_documents]
        given = {str(path) for path in files}
        if mode == "build":
            for key in [key for key in kb.files if key not in given]:
                outcomes.append(FileOutcome(key, REMOVED, kb.remove_file(key)))
        for path in files:
            key = str(path)
            digest = sha256_of(path)
            if key in kb.files and kb.files[key]["sha256"] == digest:
                outcomes.append(FileOutcome(key, UNCHANGED, len(kb.files[key]["chunks"])))
                continue
            status = CHANGED if key in kb.files else ADDED
            try:
                chunks, problems = chunk_file(path, settings, rows, embedder.count_tokens)
            except Unreadable as error:
                if key in kb.files:
                    kb.remove_file(key)  # its old text no longer matches the file: keep nothing stale
                outcomes.append(FileOutcome(key, SKIPPED, reason=str(error)))
                continue
            vectors = embedder.passages([chunk.text for chunk in chunks])
            if key in kb.files:
                kb.remove_file(key)
            kb.add_file(key, digest, chunks, vectors, problems)
            embedded += len(chunks)
            outcomes.append(FileOutcome(key, status, len(chunks), problems=problems))
    report = BuildReport(str(root), outcomes, len(kb.files), len(kb.chunks), embedded,
                         time.perf_counter() - started, note)
    kb.save(report.to_json())
    return report


def _known_path(kb: KnowledgeBase, given: str) -> str:
    key = str(Path(given).resolve())
    if key in kb.files:
        return key
    raise UserError(f"{given} is not in the knowledge base {kb.root}; it holds "
                    f"{', '.join(display_path(k) for k in kb.files) or 'no files'}")


def _rows_json(rows: RowColumns) -> dict:
    return {"columns": list(rows.columns) if rows.columns else None, "encoding": rows.encoding}


def _rows_from(data: dict) -> RowColumns:
    return RowColumns(tuple(data["columns"]) if data.get("columns") else None, data.get("encoding"))
