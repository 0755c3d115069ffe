"""Hybrid retrieval over a knowledge base: BM25 (bm25s) on words and dense vectors (FAISS), fused by a convex
combination of min-max normalised scores.

Owns ranking. Words: Chinese runs are cut by jieba (search mode, so 北京大学 also yields 北京 and 大学), other text is
lower-cased letters and digits; BM25 is built in memory when the KB is opened (it takes a fraction of the time the
vectors took), with k1 1.5 and b 0: no length normalisation, because chunks are cut to one token budget, so a chunk
is short only where a paragraph or file ended, and with b 0.75 such fragments that repeat a name outranked the full
passage. Dense: the query's e5 vector against the FAISS index. Fusion (Bruch et al. 2023, "An analysis of fusion
functions for hybrid retrieval"): each list's scores are mapped to [0, 1] by its own top-`depth` minimum and maximum,
every chunk in either list gets both scores (a chunk outside a list scores at or below that list's minimum, so 0),
and the fused score is 0.6 · dense + 0.4 · BM25. Reciprocal rank fusion (sum(1 / (60 + rank)), Cormack et al. 2009)
stays available as fusion="rrf". The settings were chosen on development seeds of benchmarks/kb.py and reported on
another (benchmarks/RESULTS.md). Must not read documents or change the KB.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .store import KnowledgeBase, StoredChunk

RRF_K = 60
BM25_K1, BM25_B = 1.5, 0.0
DENSE_WEIGHT = 0.6  # the convex fusion's weight of the dense score; BM25 gets 1 - DENSE_WEIGHT
MODES = ("hybrid", "bm25", "dense")
FUSIONS = ("convex", "rrf")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+|[^\W_\u3400-\u9fff\uf900-\ufaff]+")  # CJK runs | other words
_ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be by for from has have how in is it its of on or that the this to was were what when where "
    "which who why with does do did can".split())
_CHINESE_STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 吗 呢 吧 啊 什么 哪 哪些 哪个 怎么 如何 为什么 多少 几 有 个".split())


def words(text: str) -> list[str]:
    """BM25's terms: jieba words for Chinese, lower-cased words for everything else; stop words left out."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    terms = []
    for match in _WORD.finditer(text.lower()):
        token = match.group()
        if _CJK.fullmatch(token):
            terms += [w for w in jieba.cut_for_search(token) if w not in _CHINESE_STOPWORDS]
        elif token not in _ENGLISH_STOPWORDS:
            terms.append(token)
    return terms


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float                # the fused score (or the one list's own score in bm25 / dense mode)
    bm25: float | None = None   # the chunk's BM25 score (rrf: only if it was in BM25's list)
    dense: float | None = None  # cosine similarity (rrf: only if it was in the dense list)

    def to_json(self, rank: int) -> dict:
        return {"rank": rank, "source": self.chunk.source(), "file": self.chunk.file, "page": self.chunk.page,
                "lines": [self.chunk.line_start, self.chunk.line_end], "score": round(self.score, 6),
                "bm25": None if self.bm25 is None else round(self.bm25, 4),
                "dense": None if self.dense is None else round(self.dense, 4), "text": self.chunk.text}


def min_max(scores: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """scores mapped linearly so that the listed ones' minimum is 0 and maximum 1, clipped to [0, 1]; when the listed
    scores are all equal, 1 for a score at least that high, else 0 (no list: all 0)."""
    if not len(listed):
        return np.zeros(len(scores))
    low, high = float(np.min(listed)), float(np.max(listed))
    if high <= low:
        return (scores >= high).astype(np.float64)
    return np.clip((scores.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def convex_fusion(bm25: np.ndarray, bm25_listed: np.ndarray, dense: np.ndarray, dense_listed: np.ndarray,
                  dense_weight: float = DENSE_WEIGHT) -> np.ndarray:
    """dense_weight · min-max(cosine) + (1 - dense_weight) · min-max(BM25) for candidates with both scores; each
    normalisation is set by its own retriever's list (the *_listed scores)."""
    return dense_weight * min_max(dense, dense_listed) + (1.0 - dense_weight) * min_max(bm25, bm25_listed)


class Retriever:
    def __init__(self, kb: KnowledgeBase, embedder, k1: float = BM25_K1, b: float = BM25_B):
        import bm25s

        if kb.manifest["embedding"]["model"] != embedder.name or kb.manifest["embedding"]["dim"] != embedder.dim:
            raise UserError(f"{kb.root} was built with {kb.manifest['embedding']['model']}, not {embedder.name}; "
                            f"rebuild it with lmforge kb build")
        self.kb = kb
        self.embedder = embedder
        self.ids = sorted(kb.chunks)
        self.position = {chunk_id: n for n, chunk_id in enumerate(self.ids)}
        self.bm25 = None
        if self.ids:
            self.bm25 = bm25s.BM25(k1=k1, b=b)
            corpus = [words(kb.chunks[i].text) or [""] for i in self.ids]
            self.bm25.index(corpus, show_progress=False)
            self.vocabulary = self.bm25.vocab_dict

    @classmethod
    def open(cls, kb_dir: str | Path, embedder=None, k1: float = BM25_K1, b: float = BM25_B) -> Retriever:
        from .embedding import shared_embedder

        return cls(KnowledgeBase.open(kb_dir), embedder or shared_embedder(), k1, b)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int = 50, fusion: str = "convex",
               dense_weight: float = DENSE_WEIGHT) -> list[Hit]:
        """The k best chunks. Hybrid candidates: BM25's and the vectors' top `depth` each; fusion "convex" (default,
        dense_weight on the cosine) or "rrf"."""
        if k < 1:
            raise UserError(f"-k must be at least 1, got {k}")
        if mode not in MODES:
            raise UserError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if not 0.0 <= dense_weight <= 1.0:
            raise UserError(f"the dense weight must be between 0 and 1, got {dense_weight}")
        if not query.strip():
            raise UserError("the query is empty")
        if not self.ids:
            return []
        depth = max(depth, k)
        all_bm25 = self._bm25_scores(query) if mode != "dense" else None
        lexical = self._bm25(all_bm25, depth) if mode != "dense" else []
        vector = self.embedder.queries([query]) if mode != "bm25" else None
        semantic = self._dense(vector, depth) if mode != "bm25" else []
        if mode == "bm25":
            return [Hit(self.kb.chunks[i], s, bm25=s) for i, s in lexical[:k]]
        if mode == "dense":
            return [Hit(self.kb.chunks[i], s, dense=s) for i, s in semantic[:k]]
        if fusion == "rrf":
            fused: dict[int, float] = {}
            for ranking in (lexical, semantic):
                for rank, (chunk_id, _) in enumerate(ranking, start=1):
                    fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
            bm25_scores, dense_scores = dict(lexical), dict(semantic)
            best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
            return [Hit(self.kb.chunks[i], fused[i], bm25_scores.get(i), dense_scores.get(i)) for i in best]
        candidates = sorted({i for i, _ in lexical} | {i for i, _ in semantic})
        bm25 = all_bm25[[self.position[i] for i in candidates]] if all_bm25 is not None else np.zeros(len(candidates))
        dense_known = dict(semantic)
        missing = [i for i in candidates if i not in dense_known]
        if missing:  # BM25's candidates beyond the vectors' top `depth`: their cosine, for the fusion
            dense_known.update(zip(missing, (self.kb.vectors(missing) @ vector[0]).tolist()))
        dense = np.array([dense_known[i] for i in candidates], dtype=np.float64)
        fused = convex_fusion(bm25, np.array([s for _, s in lexical]), dense, np.array([s for _, s in semantic]),
                              dense_weight)
        order = sorted(range(len(candidates)), key=lambda n: (-fused[n], candidates[n]))[:k]
        return [Hit(self.kb.chunks[candidates[n]], float(fused[n]), float(bm25[n]), float(dense[n])) for n in order]

    def _bm25_scores(self, query: str) -> np.ndarray | None:
        """Every chunk's BM25 score in self.ids order, None when no query word is in the KB."""
        terms = [term for term in words(query) if term in self.vocabulary]
        return self.bm25.get_scores(terms) if terms else None

    def _bm25(self, scores: np.ndarray | None, depth: int) -> list[tuple[int, float]]:
        if scores is None:
            return []
        order = np.argsort(-scores, kind="stable")[:depth]
        return [(self.ids[i], float(scores[i])) for i in order if scores[i] > 0]

    def _dense(self, vector: np.ndarray, depth: int) -> list[tuple[int, float]]:
        scores, ids = self.kb.index.search(vector, min(depth, len(self.ids)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
