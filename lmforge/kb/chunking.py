"""Sections → Chunks: passages of at most `chunk_tokens` tokens ending at sentence ends, with overlap and a source span.

Owns where text is cut. Sentences end at 。！？；… and at . ! ? followed by a space or the end (so 3.14 and e.g.
"v1.2" stay whole), plus closing quotes / brackets after them; a blank line, a Markdown heading or list item also
starts a new sentence. Chunks are whole sentences packed up to the token budget; the next chunk repeats the last
sentences of the previous one up to `overlap_tokens`. Paragraphs (blank lines) are kept apart where they can be: a
paragraph that does not fit, or that would start in the second half of a chunk, starts a new chunk, and overlap never
carries a sentence across a paragraph break (it would glue the end of one topic onto the next). A single sentence
longer than the budget is cut at clause marks (，、：, ; :) then spaces, and only when none is left, inside a word.
Must not read files or embed.

Tokens are counted by the caller's `count_tokens` (the embedding model's tokenizer), so the budget is what the model
sees. A table / JSON Lines row is a passage of its own: it is only cut when it is longer than the budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import UserError
from .readers import Section

SENTENCE_END = re.compile(
    r"(?:[。！？；]+|…+|[.!?;]+(?=\s|$))[”’」』）)\]\"'》]*"  # sentence punctuation, then closing quotes / brackets
    r"|\n[ \t]*\n"                                          # a blank line
    r"|\n(?=[ \t]*(?:#|[-*+][ \t]|\d+[.)、][ \t]?))"          # a line starting a heading or a list item
    r"|^#{1,6}[ \t][^\n]*$",                                  # a Markdown heading is a sentence of its own
    re.MULTILINE,
)
CLAUSE_END = re.compile(r"[，、：,:]+|\s+")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class ChunkSettings:
    chunk_tokens: int = 256
    overlap_tokens: int = 48

    def __post_init__(self):
        if self.chunk_tokens < 16:
            raise UserError(f"--chunk-tokens must be at least 16, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise UserError(f"--overlap-tokens must be at least 0 and less than half of --chunk-tokens "
                            f"({self.chunk_tokens}), got {self.overlap_tokens}")


@dataclass(frozen=True)
class Chunk:
    text: str
    line_start: int
    line_end: int
    page: int | None = None


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    tokens: int
    paragraph: int = 0


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence, whitespace trimmed, in order; together they cover all non-space text."""
    spans = []
    start = 0
    for match in SENTENCE_END.finditer(text):
        if match.end() > start:
            spans.append((start, match.end()))
            start = match.end()
    spans.append((start, len(text)))
    trimmed = []
    for begin, end in spans:
        piece = text[begin:end]
        stripped = piece.strip()
        if stripped:
            offset = begin + len(piece) - len(piece.lstrip())
            trimmed.append((offset, offset + len(stripped)))
    return trimmed


def chunk_section(section: Section, settings: ChunkSettings, count_tokens: Callable[[str], int]) -> list[Chunk]:
    text = section.text
    if section.row:
        stripped = text.strip()
        if not stripped:
            return []
        if count_tokens(stripped) <= settings.chunk_tokens:
            return [Chunk(stripped, section.line, section.line, section.page)]
    pieces: list[_Piece] = []
    paragraph, previous_end = 0, 0
    for start, end in sentence_spans(text):
        paragraph += PARAGRAPH_BREAK.search(text, previous_end, start) is not None
        previous_end = end
        pieces.extend(replace(piece, paragraph=paragraph)
                      for piece in _fit(text, start, end, settings.chunk_tokens, count_tokens))
    spans = pack(pieces, settings)
    chunks = []
    for start, end in spans:
        if section.row:  # a row keeps its own line, however many lines its passage has
            line_start = line_end = section.line
        else:
            line_start = section.line + text.count("\n", 0, start)
            line_end = line_start + text.count("\n", start, end)
        chunks.append(Chunk(text[start:end], line_start, line_end, section.page))
    return chunks


def pack(pieces: list[_Piece], settings: ChunkSettings) -> list[tuple[int, int]]:
    """Greedy: whole pieces up to the budget; each new chunk starts with the previous one's last pieces that fit in
    the overlap (never all of them, so every chunk moves forward)."""
    spans = []
    current: list[_Piece] = []
    tokens = 0
    for piece in pieces:
        new_paragraph = bool(current) and piece.paragraph != current[-1].paragraph
        if new_paragraph and tokens >= settings.chunk_tokens // 2:
            spans.append((current[0].start, current[-1].end))
            current, tokens = [], 0
        elif current and tokens + piece.tokens > settings.chunk_tokens:
            spans.append((current[0].start, current[-1].end))
            carry: list[_Piece] = []
            carried = 0
            for previous in reversed(current[1:]):
                if carried + previous.tokens > settings.overlap_tokens or previous.paragraph != piece.paragraph:
                    break
                carry.insert(0, previous)
                carried += previous.tokens
            while carry and carried + piece.tokens > settings.chunk_tokens:
                carried -= carry.pop(0).tokens
            current, tokens = carry, carried
        current.append(piece)
        tokens += piece.tokens
    if current:
        spans.append((current[0].start, current[-1].end))
    return spans


def _fit(text: str, start: int, end: int, budget: int, count_tokens: Callable[[str], int]) -> list[_Piece]:
    """One sentence as pieces within the budget: itself, or its clauses packed, or (last resort) hard cuts."""
    tokens = count_tokens(text[start:end])
    if tokens <= budget:
        return [_Piece(start, end, tokens)]
    cuts = sorted({m.end() for m in CLAUSE_END.finditer(text, start, end) if start < m.end() < end})
    pieces: list[_Piece] = []
    begin = start
    last_good = None
    for cut in [*cuts, end]:
        length = count_tokens(text[begin:cut])
        if length <= budget:
            last_good = (cut, length)
            continue
        if last_good is not None:
            pieces.append(_Piece(begin, last_good[0], last_good[1]))
            begin = last_good[0]
            while begin < end and text[begin].isspace():
                begin += 1
            last_good = None
            length = count_tokens(text[begin:cut])
            if length <= budget:
                last_good = (cut, length)
                continue
        pieces.extend(_hard_cut(text, begin, cut, budget, count_tokens))
        begin = cut
    if last_good is not None and begin < end:
        pieces.append(_Piece(begin, end, count_tokens(text[begin:end])))
    return [p for p in pieces if text[p.start:p.end].strip()]


def _hard_cut(text: str, start: int, end: int, budget: int, count_tokens: Callable[[str], int]) -> list[_Piece]:
    """No clause mark or space left: the longest prefix within the budget, repeatedly (binary search on chars)."""
    pieces = []
    while start < end:
        low, high = start + 1, end
        while low < high:
            middle = (low + high + 1) // 2
            if count_tokens(text[start:middle]) <= budget:
                low = middle
            else:
                high = middle - 1
        pieces.append(_Piece(start, low, count_tokens(text[start:low])))
        start = low
    return pieces
