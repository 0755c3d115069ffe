"""A knowledge base on disk: manifest.json, chunks.jsonl and vectors.faiss in one folder.

Owns the KB folder's layout and its consistency: the manifest names the embedding model, the chunker settings, the
row columns and, per file, its SHA-256 and the ids of its chunks; chunks.jsonl holds each chunk's text and source;
vectors.faiss is a FAISS inner-product index (unit vectors → cosine) keyed by chunk id, so a file's chunks can be
removed without touching the rest. Saving writes temporary files and renames them, manifest last. Must not read
documents, chunk or embed (build.py does), nor rank (retrieve.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserError
from .embedding import passive_openmp

MANIFEST = "manifest.json"
CHUNKS = "chunks.jsonl"
VECTORS = "vectors.faiss"
REPORT = "build_report.json"
FORMAT = 1


@dataclass(frozen=True)
class StoredChunk:
    id: int
    file: str  # absolute path
    text: str
    line_start: int
    line_end: int
    page: int | None = None

    def source(self) -> str:
        """file[ p.N]:line or :first-last, the file relative to the current directory when it is inside it."""
        where = f" p.{self.page}" if self.page is not None else ""
        lines = str(self.line_start) if self.line_start == self.line_end else f"{self.line_start}-{self.line_end}"
        return f"{display_path(self.file)}{where}:{lines}"


def load_faiss():
    """FAISS, its OpenMP threads loaded passive (see embedding.passive_openmp)."""
    with passive_openmp():
        import faiss
    return faiss


def display_path(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


class KnowledgeBase:
    def __init__(self, root: Path, manifest: dict, chunks: dict[int, StoredChunk], index):
        self.root = root
        self.manifest = manifest
        self.chunks = chunks
        self.index = index

    @classmethod
    def create(cls, root: Path, embedding: dict, chunker: dict, rows: dict) -> KnowledgeBase:
        faiss = load_faiss()

        manifest = {"format": FORMAT, "lmforge": __version__, "embedding": embedding, "chunker": chunker,
                    "rows": rows, "files": {}, "next_id": 0}
        return cls(root, manifest, {}, faiss.IndexIDMap2(faiss.IndexFlatIP(int(embedding["dim"]))))

    @classmethod
    def open(cls, root: str | Path) -> KnowledgeBase:
        faiss = load_faiss()

        root = Path(root)
        if not (root / MANIFEST).is_file():
            hint = "it does not exist" if not root.exists() else f"it has no {MANIFEST}"
            raise UserError(f"{root} is not a knowledge base ({hint}); build one with lmforge kb build DOCS -o {root}")
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            chunks = {}
            with open(root / CHUNKS, encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    chunks[record["id"]] = StoredChunk(**record)
            index = faiss.read_index(str(root / VECTORS))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise UserError(f"{root}: the knowledge base is damaged ({type(error).__name__}: {error}); rebuild it "
                            f"with lmforge kb build") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{root}: knowledge base format {manifest.get('format')} is not {FORMAT}; rebuild it")
        if index.ntotal != len(chunks):
            raise UserError(f"{root}: {index.ntotal} vectors for {len(chunks)} chunks; the knowledge base is damaged, "
                            f"rebuild it with lmforge kb build")
        return cls(root, manifest, chunks, index)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    def add_file(self, path: str, sha256: str, chunks: list, vectors: np.ndarray, problems: list[str]) -> None:
        ids = np.arange(self.manifest["next_id"], self.manifest["next_id"] + len(chunks), dtype=np.int64)
        self.manifest["next_id"] += len(chunks)
        for chunk_id, chunk in zip(ids.tolist(), chunks):
            self.chunks[chunk_id] = StoredChunk(chunk_id, path, chunk.text, chunk.line_start, chunk.line_end,
                                                chunk.page)
        if len(chunks):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.files[path] = {"sha256": sha256, "chunks": ids.tolist(), "problems": problems}

    def remove_file(self, path: str) -> int:
        entry = self.files.pop(path)
        ids = entry["chunks"]
        for chunk_id in ids:
            del self.chunks[chunk_id]
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        return len(ids)

    def vectors(self, ids: list[int]) -> np.ndarray:
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if ids else np.zeros((0, self.index.d))

    def save(self, report: dict | None = None) -> None:
        faiss = load_faiss()

        self.root.mkdir(parents=True, exist_ok=True)
        temporary = {name: self.root / f".{name}.tmp" for name in (CHUNKS, VECTORS, MANIFEST, REPORT)}
        with open(temporary[CHUNKS], "w", encoding="utf-8") as handle:
            for chunk_id in sorted(self.chunks):
                handle.write(json.dumps(asdict(self.chunks[chunk_id]), ensure_ascii=False) + "\n")
        faiss.write_index(self.index, str(temporary[VECTORS]))
        temporary[MANIFEST].write_text(json.dumps(self.manifest, ensure_ascii=False, indent=1), encoding="utf-8")
        names = [CHUNKS, VECTORS, MANIFEST]
        if report is not None:
            temporary[REPORT].write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
            names.insert(0, REPORT)
        for name in names:
            os.replace(temporary[name], self.root / name)
