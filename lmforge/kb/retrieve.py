"""Hybrid retrieval over a knowledge base: BM25 (bm25s) on words and dense vectors (FAISS), fused by reciprocal rank.

Owns ranking. Words: Chinese runs are cut by jieba (search mode, so 北京大学 also yields 北京 and 大学), other text is
lower-cased letters and digits; BM25 is built in memory when the KB is opened (it takes a fraction of the time the
vectors took). Dense: the query's e5 vector against the FAISS index. Reciprocal rank fusion scores a chunk
sum(1 / (60 + rank)) over the lists it is in (Cormack et al. 2009), so neither score's scale matters. Must not read
documents or change the KB.
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
MODES = ("hybrid", "bm25", "dense")
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
    bm25: float | None = None   # the chunk's BM25 score, if it was in BM25's list
    dense: float | None = None  # cosine similarity, if it was in the dense list

    def to_json(self, rank: int) -> dict:
        return {"rank": rank, "source": self.chunk.source(), "file": self.chunk.file, "page": self.chunk.page,
                "lines": [self.chunk.line_start, self.chunk.line_end], "score": round(self.score, 6),
                "bm25": None if self.bm25 is None else round(self.bm25, 4),
                "dense": None if self.dense is None else round(self.dense, 4), "text": self.chunk.text}


class Retriever:
    def __init__(self, kb: KnowledgeBase, embedder):
        import bm25s

        if kb.manifest["embedding"]["model"] != embedder.name or kb.manifest["embedding"]["dim"] != embedder.dim:
            raise UserError(f"{kb.root} was built with {kb.manifest['embedding']['model']}, not {embedder.name}; "
                            f"rebuild it with lmforge kb build")
        self.kb = kb
        self.embedder = embedder
        self.ids = sorted(kb.chunks)
        self.bm25 = None
        if self.ids:
            self.bm25 = bm25s.BM25()
            corpus = [words(kb.chunks[i].text) or [""] for i in self.ids]
            self.bm25.index(corpus, show_progress=False)
            self.vocabulary = self.bm25.vocab_dict

    @classmethod
    def open(cls, kb_dir: str | Path, embedder=None) -> Retriever:
        from .embedding import shared_embedder

        return cls(KnowledgeBase.open(kb_dir), embedder or shared_embedder())

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int = 50,
               bm25_weight: float = 1.0) -> list[Hit]:
        """The k best chunks. bm25_weight scales BM25's share of the fused score (1: equal to the vectors')."""
        if k < 1:
            raise UserError(f"-k must be at least 1, got {k}")
        if mode not in MODES:
            raise UserError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not query.strip():
            raise UserError("the query is empty")
        if not self.ids:
            return []
        depth = max(depth, k)
        lexical = self._bm25(query, depth) if mode != "dense" else []
        semantic = self._dense(query, depth) if mode != "bm25" else []
        if mode == "bm25":
            return [Hit(self.kb.chunks[i], s, bm25=s) for i, s in lexical[:k]]
        if mode == "dense":
            return [Hit(self.kb.chunks[i], s, dense=s) for i, s in semantic[:k]]
        fused: dict[int, float] = {}
        for ranking, weight in ((lexical, bm25_weight), (semantic, 1.0)):
            for rank, (chunk_id, _) in enumerate(ranking, start=1):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (RRF_K + rank)
        bm25_scores, dense_scores = dict(lexical), dict(semantic)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [Hit(self.kb.chunks[i], fused[i], bm25_scores.get(i), dense_scores.get(i)) for i in best]

    def _bm25(self, query: str, depth: int) -> list[tuple[int, float]]:
        terms = [term for term in words(query) if term in self.vocabulary]
        if not terms:
            return []
        scores = self.bm25.get_scores(terms)
        order = np.argsort(-scores, kind="stable")[:depth]
        return [(self.ids[i], float(scores[i])) for i in order if scores[i] > 0]

    def _dense(self, query: str, depth: int) -> list[tuple[int, float]]:
        vector = self.embedder.queries([query])
        scores, ids = self.kb.index.search(vector, min(depth, len(self.ids)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
