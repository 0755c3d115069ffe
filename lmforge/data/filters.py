"""Record filters for `data clean`: each one keeps a record or rejects it with a reason naming the value and limit.

Owns the filters (where, length, markers, blocklist, repetition, language, tokens), their options (`FilterOptions`,
each field documented once, here), the shipped term lists in blocklists/, and `build_filters` / `run_filters`.
A filter is an object with `.name` and `__call__(record) -> str | None` (a reason, or None to keep); it may also
offer `filter_batch(records)`. Filters never change a record (normalize.py does) and never read dataset files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, DataError, UserError
from .expressions import Condition, compile_condition
from .language import (
    CANDIDATE_LANGUAGES,
    cjk_text,
    detect_language,
    is_cjk,
    language_code,
)

TERM_DIR = Path(__file__).parent / "blocklists"
BUILTIN_LISTS = {"markers": ("markers_en.txt", "markers_zh.txt"), "blocklist": ("en.txt", "zh.txt")}
TextField = Literal["answer", "prompt", "all"]
_FIELD_LABELS = {"answer": "answer", "prompt": "prompt", "all": "conversation"}


class Filter(Protocol):
    name: str

    def __call__(self, record: dict) -> str | None: ...


# ---------------------------------------------------------------------------------------------- options


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthOptions(_Options):
    field: TextField = "answer"
    """Which text is measured: "answer" (all assistant messages), "prompt" (system and user messages) or "all"."""
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    """Limits in characters (code points) of that text, inclusive; at least one is required."""

    @model_validator(mode="after")
    def _check(self) -> LengthOptions:
        _check_limits(self.min_chars, self.max_chars, "chars")
        return self


class TokenOptions(_Options):
    tokenizer: str = "smollm2-135m-instruct"
    """A model whose tokenizer counts: builtin alias, local dir or hub id (as for `model.name_or_path`)."""
    field: TextField = "all"
    """Which text is counted (see LengthOptions.field). Counts cover message contents joined by newlines, without
    the chat template's special tokens (a few per message)."""
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    """Limits in tokens, inclusive; at least one is required."""

    @model_validator(mode="after")
    def _check(self) -> TokenOptions:
        _check_limits(self.min_tokens, self.max_tokens, "tokens")
        return self


class LanguageOptions(_Options):
    keep: list[str]
    """ISO 639-1 codes to keep, e.g. [zh, en]; "zh" covers Simplified and Traditional Chinese. Detected with lingua
    (models shipped in the package) after script rules for Chinese, Japanese and Korean."""
    field: TextField = "all"
    """Which text is classified (see LengthOptions.field); the dominant language of that text decides."""
    undetermined: Literal["keep", "reject"] = "keep"
    """What to do with text too short or letterless to judge ("OK.", "42", code symbols)."""
    accuracy: Literal["high", "low"] = "high"
    """lingua's mode for texts the rules leave open: "high" is better on short text but loads up to ~0.5 GB of
    models (once per process); "low" needs ~60 MB and mixes up a few close languages (pt/ro, ru/uk)."""

    @field_validator("keep", mode="before")
    @classmethod
    def _codes(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else value
        return [language_code(v) for v in values] if isinstance(values, list) else value


class TermOptions(_Options):
    builtin: bool = True
    """Use the shipped English and Chinese lists (lmforge/data/blocklists/: markers_{en,zh}.txt for markers,
    {en,zh}.txt for the blocklist)."""
    files: list[str] = []
    """More lists: UTF-8 text, one term per line, `#` comments, `# category: NAME` naming the terms after it."""
    terms: list[str] = []
    """More terms written inline."""
    field: TextField = "answer"
    """Which text is searched (see LengthOptions.field). Matching ignores case, treats runs of whitespace alike,
    allows spaces between CJK and Latin characters, and respects word boundaries at Latin ends of a term."""


class BlocklistOptions(TermOptions):
    field: TextField = "all"
    """Which text is searched; "all" also drops records whose prompt has a blocked term."""


class RepetitionOptions(_Options):
    max_ratio: float = Field(0.3, ge=0, le=1)
    """Reject when more than this fraction of the text's n-grams repeat an earlier n-gram."""
    char_ngram: int = Field(10, ge=1)
    """n for character n-grams, used when the text is mostly CJK."""
    word_ngram: int = Field(5, ge=1)
    """n for word n-grams, used otherwise."""
    field: TextField = "answer"


class FilterOptions(_Options):
    """The filters of one `filter` step. They run cheapest first (the order below); a record's reason is the first
    failing filter's. `markers: true` / `blocklist: true` / `repetition: true` enable a filter with its defaults."""

    where: str | None = None
    """A condition on metadata columns, e.g. "votes >= 3 and is_best == 1" (see data/expressions.py)."""
    length: list[LengthOptions] = []
    """One or more character-length limits, e.g. [{field: answer, min_chars: 10}, {field: all, max_chars: 8000}]."""
    markers: TermOptions | None = None
    """Machine-generated or boilerplate markers ("As an AI language model", "作为一个AI语言模型", …)."""
    blocklist: BlocklistOptions | None = None
    """Clearly unacceptable terms (slurs, incitement to violence, illegal trade), by category."""
    repetition: RepetitionOptions | None = None
    language: LanguageOptions | None = None
    """Keep only these languages; `language: [zh, en]` is short for {keep: [zh, en]}."""
    tokens: TokenOptions | None = None

    @field_validator("length", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("markers", "blocklist", "repetition", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value

    @field_validator("language", mode="before")
    @classmethod
    def _keep_list(cls, value: Any) -> Any:
        return {"keep": value} if isinstance(value, list | str) else value


def _check_limits(low: int | None, high: int | None, unit: str) -> None:
    if low is None and high is None:
        raise ValueError(f"set min_{unit} and/or max_{unit}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min_{unit} {low} > max_{unit} {high}")


# ---------------------------------------------------------------------------------------------- building & running


def build_filters(options: FilterOptions | dict) -> list[Filter]:
    """The filters `options` enables, cheapest first. Raises ConfigError for bad options or unreadable term files."""
    if not isinstance(options, FilterOptions):
        try:
            options = FilterOptions.model_validate(options)
        except ValidationError as err:
            problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"filter options:\n{problems}") from None
    filters: list[Filter] = []
    if options.where:
        filters.append(WhereFilter(compile_condition(options.where)))
    filters += [LengthFilter(o.field, o.min_chars, o.max_chars) for o in options.length]
    if options.markers:
        filters.append(TermFilter.from_options("markers", options.markers, "machine-generated marker"))
    if options.blocklist:
        filters.append(TermFilter.from_options("blocklist", options.blocklist, "blocklisted term"))
    if options.repetition:
        o = options.repetition
        filters.append(RepetitionFilter(o.max_ratio, o.char_ngram, o.word_ngram, o.field))
    if options.language:
        filters.append(LanguageFilter(options.language))
    if options.tokens:
        o = options.tokens
        filters.append(TokenFilter(o.tokenizer, o.field, o.min_tokens, o.max_tokens))
    return filters


def run_filters(filters: Sequence[Filter], records: Sequence[dict]) -> list[str | None]:
    """The first rejection reason of each record (None = kept). Uses a filter's filter_batch when it has one, and
    only asks later filters about records still kept."""
    reasons: list[str | None] = [None] * len(records)
    for f in filters:
        alive = [i for i, reason in enumerate(reasons) if reason is None]
        batch = getattr(f, "filter_batch", None)
        results = batch([records[i] for i in alive]) if batch else [f(records[i]) for i in alive]
        for i, reason in zip(alive, results, strict=True):
            reasons[i] = reason
    return reasons


def field_texts(record: dict, field: str) -> list[str]:
    """The message contents a filter looks at: assistant ones ("answer"), the others ("prompt"), or all."""
    try:
        messages = record["messages"]
        if field == "all":
            return [m["content"] for m in messages]
        if field == "answer":
            return [m["content"] for m in messages if m["role"] == "assistant"]
        return [m["content"] for m in messages if m["role"] != "assistant"]
    except (KeyError, TypeError):
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"record is not in messages shape: expected {{\"messages\": [{{\"role\": ..., "
                        f"\"content\": ...}}, ...]}}, got {keys}; convert the file first (lmforge data convert)"
                        ) from None


def field_text(record: dict, field: str) -> str:
    return "\n".join(field_texts(record, field))


# ---------------------------------------------------------------------------------------------- simple filters


class WhereFilter:
    name = "where"

    def __init__(self, condition: Condition) -> None:
        self.condition = condition

    def __call__(self, record: dict) -> str | None:
        if self.condition(record):
            return None
        return f"where {self.condition.text!r} is false ({self.condition.describe(record)})"


class LengthFilter:
    name = "length"

    def __init__(self, field: str, min_chars: int | None, max_chars: int | None) -> None:
        self.field, self.min_chars, self.max_chars = field, min_chars, max_chars

    def __call__(self, record: dict) -> str | None:
        n = sum(map(len, field_texts(record, self.field)))
        if self.min_chars is not None and n < self.min_chars:
            return f"{_FIELD_LABELS[self.field]} too short: {n} chars < min {self.min_chars}"
        if self.max_chars is not None and n > self.max_chars:
            return f"{_FIELD_LABELS[self.field]} too long: {n} chars > max {self.max_chars}"
        return None


_WORD = re.compile(r"\w+")


class RepetitionFilter:
    """Fraction of repeated n-grams: character n-grams for mostly-CJK text, word n-grams otherwise."""

    name = "repetition"

    def __init__(self, max_ratio: float, char_ngram: int, word_ngram: int, field: str) -> None:
        self.max_ratio, self.char_ngram, self.word_ngram, self.field = max_ratio, char_ngram, word_ngram, field

    def __call__(self, record: dict) -> str | None:
        text = field_text(record, self.field)
        if cjk_text(text) and _repeat_bound(text, self.char_ngram) <= self.max_ratio:
            return None  # the cheap bound settles most texts
        ratio, unit = self.ratio(text)
        if ratio > self.max_ratio:
            return f"repetitive: {ratio:.2f} > {self.max_ratio} (repeated {unit})"
        return None

    def ratio(self, text: str) -> tuple[float, str]:
        """(fraction of n-grams that repeat an earlier one, the n-gram unit)."""
        if cjk_text(text):
            n, unit = self.char_ngram, f"{self.char_ngram}-char grams"
            total = len(text) - n + 1
            distinct = len({text[i:i + n] for i in range(total)}) if total >= 2 else 0
        else:
            n, unit = self.word_ngram, f"{self.word_ngram}-word grams"
            words = _WORD.findall(text.lower())
            total = len(words) - n + 1
            distinct = len(set(zip(*(words[i:] for i in range(n)), strict=False))) if total >= 2 else 0
        return (1 - distinct / total if total >= 2 else 0.0), unit


def _repeat_bound(text: str, n: int) -> float:
    """An upper bound on the repeated character n-gram fraction, from about len/c substring searches instead of
    len set insertions. With c = n // 2, the n-gram at i contains the c-gram at a = ceil(i / c) * c; if the n-gram
    repeats an earlier one, that c-gram occurs before a, and each such a accounts for at most c positions i."""
    c, total = max(n // 2, 1), len(text) - n + 1
    if total < 2:
        return 0.0
    seen_before = sum(text.find(text[a:a + c], 0, a + c - 1) != -1 for a in range(c, len(text) - c + 1, c))
    return c * seen_before / total


# ---------------------------------------------------------------------------------------------- term lists


class TermFilter:
    """Case-insensitive search for any of many terms with one compiled regex (a trie of the terms, so the regex
    engine tries one branch per position instead of every term)."""

    def __init__(self, name: str, pattern: re.Pattern, categories: dict[str, str], field: str, label: str) -> None:
        self.name, self.pattern, self.categories, self.field, self.label = name, pattern, categories, field, label

    @classmethod
    def from_options(cls, name: str, options: TermOptions, label: str) -> TermFilter:
        terms: list[tuple[str, str]] = []
        if options.builtin:
            for file_name in BUILTIN_LISTS[name]:
                terms += load_terms(TERM_DIR / file_name)
        for file in options.files:
            terms += load_terms(Path(file))
        terms += [(term.strip(), "") for term in options.terms if term.strip()]
        if not terms:
            raise ConfigError(f"{name}: no terms (builtin lists off, no files, no terms); add some or remove "
                              f"the {name} filter")
        return cls(name, compile_terms(term for term, _ in terms), {_term_key(t): c for t, c in terms},
                   options.field, label)

    def __call__(self, record: dict) -> str | None:
        text = field_text(record, self.field)
        lowered = text.lower()
        match = self.pattern.search(lowered)
        if match is None:
            return None
        # Quote the text as written; lower() can change lengths (İ → i̇), then quote the lower-cased match.
        found = text[match.start():match.end()] if len(lowered) == len(text) else match.group()
        category = self.categories.get(_term_key(match.group()), "")
        return f"{self.label}: {category} ({found!r})" if category else f"{self.label}: {found!r}"


def load_terms(path: Path) -> list[tuple[str, str]]:
    """(term, category) pairs of a term file; `# category: NAME` sets the category of the terms that follow."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read term list {path}: {err}; give a UTF-8 text file, one term per line") from None
    terms, category = [], ""
    for line in lines:
        line = line.strip()
        if line.startswith("#"):
            label = line.lstrip("#").strip()
            if label.lower().startswith("category:"):
                category = label.split(":", 1)[1].strip()
        elif line:
            terms.append((line, category))
    return terms


def compile_terms(terms: Iterable[str]) -> re.Pattern:
    """One regex matching any term in lower-cased text, built as a trie of per-character pieces."""
    trie: dict = {}
    for term in terms:
        node = trie
        for piece in _term_pieces(term.lower()):
            node = node.setdefault(piece, {})
        node[""] = {}  # a term ends here
    return re.compile(_trie_regex(trie))


def _trie_regex(node: dict) -> str:
    # A term ending at a word boundary is tried after the longer terms it starts.
    branches = [piece + _trie_regex(child) for piece, child in sorted(node.items(), key=lambda kv: kv[0][:3] == "(?!")
                if piece]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 and len(node) == 1 else f"(?:{'|'.join(branches)})"
    return body + "?" if "" in node else body  # greedy: the longest term wins


def _term_pieces(term: str) -> list[str]:
    pieces, previous = [], ""
    for ch in " ".join(term.split()):
        if previous and (is_cjk(ch) and previous.isascii() and previous.isalnum()
                         or is_cjk(previous) and ch.isascii() and ch.isalnum()):
            pieces.append(r"\s*")  # "作为一个AI语言模型" also matches "作为一个 AI 语言模型"
        if ch == " ":
            if previous not in ",\uff0c":  # the comma's piece already takes the spaces after it
                pieces.append(r"\s+")
        elif ch in "'\u2019":
            pieces.append("['\u2019]")
        elif ch in ",\uff0c":
            pieces.append("\\s*[,\uff0c]\\s*")
        elif not pieces and ch.isascii() and ch.isalnum():
            # Word boundary written after the first letter, so every branch starts with a literal and the regex
            # engine can skip positions whose character starts no term.
            pieces.append(f"{ch}(?<![a-z0-9]{ch})")
        else:
            pieces.append(re.escape(ch))
        previous = ch
    if previous.isascii() and previous.isalnum():
        pieces.append(r"(?![a-z0-9])")
    return pieces


def _term_key(text: str) -> str:
    """What a term and its matches have in common: lower case, no whitespace, one kind of apostrophe and comma."""
    return "".join(text.lower().split()).replace("\u2019", "'").replace("\uff0c", ",")


# ---------------------------------------------------------------------------------------------- language


class LanguageFilter:
    name = "language"

    def __init__(self, options: LanguageOptions) -> None:
        self.options = options
        self.candidates = (*CANDIDATE_LANGUAGES, *(code for code in options.keep if code not in CANDIDATE_LANGUAGES))

    def __call__(self, record: dict) -> str | None:
        language = detect_language(field_text(record, self.options.field), self.candidates, self.options.accuracy)
        if language in self.options.keep or (language is None and self.options.undetermined == "keep"):
            return None
        return f"language {language or 'undetermined'} not in [{', '.join(self.options.keep)}]"


# ---------------------------------------------------------------------------------------------- tokens


class TokenFilter:
    """Token counts under a model's tokenizer. UTF-8 byte counts bound them (a token covers at least one byte), so
    only texts whose bounds straddle a limit are tokenized, in batches."""

    name = "tokens"

    def __init__(self, tokenizer: str, field: str, min_tokens: int | None, max_tokens: int | None) -> None:
        self.tokenizer, self.field, self.min_tokens, self.max_tokens = tokenizer, field, min_tokens, max_tokens
        self._backend = None
        self._bytes_per_token = 0  # the longest token's UTF-8 length: at least the bytes any one token covers
        self._bounds_hold = False  # False: the normalizer may lengthen text, so every text is tokenized

    def __call__(self, record: dict) -> str | None:
        return self.filter_batch([record])[0]

    def filter_batch(self, records: Sequence[dict]) -> list[str | None]:
        texts = [field_text(record, self.field) for record in records]
        backend = self._load()
        counts: list[int | None] = [None] * len(texts)
        unsure = []
        for i, text in enumerate(texts):
            n_bytes = len(text.encode("utf-8"))
            upper = n_bytes + 8  # + a prefix space or metaspace some tokenizers add
            lower = math.ceil(n_bytes / self._bytes_per_token)
            if not self._bounds_hold or (self.max_tokens is not None and upper > self.max_tokens) or (
                    self.min_tokens is not None and lower < self.min_tokens):
                unsure.append(i)
        if unsure:
            for i, encoding in zip(unsure, backend.encode_batch_fast([texts[i] for i in unsure],
                                                                     add_special_tokens=False), strict=True):
                counts[i] = len(encoding.ids)
        return [self._reason(count) for count in counts]

    def _reason(self, count: int | None) -> str | None:
        if count is None:
            return None
        label = _FIELD_LABELS[self.field]
        if self.min_tokens is not None and count < self.min_tokens:
            return f"{label} too short: {count} tokens < min {self.min_tokens} ({self.tokenizer})"
        if self.max_tokens is not None and count > self.max_tokens:
            return f"{label} too long: {count} tokens > max {self.max_tokens} ({self.tokenizer})"
        return None

    def _load(self):
        if self._backend is None:
            from ..model.loader import load_tokenizer, resolve_model

            try:
                tokenizer = load_tokenizer(resolve_model(self.tokenizer))
            except UserError as err:
                raise ConfigError(f"tokens filter: {err}") from None
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ConfigError(f"tokens filter: {self.tokenizer} has no fast (Rust) tokenizer; pick a model "
                                  f"with a tokenizer.json")
            self._backend = backend
            self._bytes_per_token = max(1, *(len(token.encode("utf-8")) for token in backend.get_vocab()))
            self._bounds_hold = _normalizer_keeps_length(json.loads(backend.to_str()).get("normalizer"))
        return self._backend


_SAFE_NORMALIZERS = ("NFC", "Strip")


def _normalizer_keeps_length(spec: dict | None) -> bool:
    """Whether a tokenizer.json normalizer cannot add characters (except one prefix): then a token count is at
    most the UTF-8 byte count + 8. NFKC/NFD expand some characters, so those tokenizers count every text."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_keeps_length(s) for s in spec.get("normalizers", []))
    if kind == "Replace":
        pattern = spec.get("pattern", {}).get("String")
        return pattern is not None and len(spec.get("content", "").encode()) <= len(pattern.encode())
    if kind == "Prepend":
        return len(spec.get("prepend", "")) <= 1
    return kind in _SAFE_NORMALIZERS
