"""The cleaning recipe: which steps `lmforge data clean` runs, in the order written, each with its options.

Owns the YAML schema (a list of one-key mappings: normalize, filter, pii, dedup), the default recipe, the options of
the pii and dedup steps (normalize and filter options live beside their code), and errors that name the step's index
and key path. Must not run steps (clean.py does) nor read datasets.

    steps:
      - normalize: {urls: remove}
      - filter: {where: "votes >= 3", length: {field: answer, min_chars: 5}, language: [zh, en], markers: true}
      - pii: {}
      - dedup: {method: exact}
      - dedup: {method: near, threshold: 0.6}
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from .dedup import PACKAGED_EMBEDDER
from .filters import FilterOptions, TextField
from .normalize import NormalizeOptions
from .pii import PII_TYPES

STEP_KINDS = ("normalize", "filter", "pii", "dedup")


class PiiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    types: list[str] = list(PII_TYPES)
    """Which kinds are masked (default all): SECRET_URL, EMAIL, ID_CARD, BANK_CARD, PHONE, PASSPORT, IP. Each match
    becomes its placeholder, e.g. <PHONE>; counts per type go to the report."""
    field: TextField = "all"
    """Which messages are masked: "all", "answer" (assistant) or "prompt" (system and user)."""

    @field_validator("types", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            return value
        unknown = [v for v in values if str(v).upper() not in PII_TYPES]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]).upper(), PII_TYPES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown PII type {unknown[0]!r}{hint}; expected some of {', '.join(PII_TYPES)}")
        return [str(v).upper() for v in values]


class DedupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["exact", "near", "semantic"] = "near"
    """exact: same text after Unicode/case/whitespace/punctuation normalisation. near: MinHash-LSH over character
    n-grams (Jaccard ≥ threshold; works for Chinese without word segmentation). semantic: sentence embeddings with
    cosine ≥ threshold (slow: ~60 texts/s on 2 cores; for sets up to ~100k records)."""
    field: TextField = "all"
    """Which text is compared: the whole conversation ("all"), the answers or the prompts."""
    threshold: float | None = Field(None, gt=0, le=1)
    """near: Jaccard of character 5-grams (default 0.4: a 300-character text with 5-10 % of its characters edited
    scores 0.5-0.7); semantic: cosine similarity (default 0.95). Not used by exact."""
    ngram: int = Field(5, ge=1)
    """near: character n-gram length."""
    keep: Literal["best", "longest", "first"] = "best"
    """Which record of a cluster stays: "best" = highest is_best column, then most votes, then longest answer, then
    first seen; "longest" = longest answer; "first" = first seen."""
    is_best_column: str = "is_best"
    votes_column: str = "votes"
    """Metadata columns the "best" rule reads (missing or non-numeric values count as 0)."""
    model: str = PACKAGED_EMBEDDER
    """semantic: "packaged-minilm" (all-MiniLM-L6-v2 from PyPI, English), a builtin model alias (its own hidden
    states, mean-pooled: multilingual when the model is) or a local model dir."""

    @property
    def name(self) -> str:
        return f"dedup.{self.method}"

    def similarity_threshold(self) -> float:
        return self.threshold if self.threshold is not None else {"near": 0.4, "semantic": 0.95}.get(self.method, 1)


_OPTION_TYPES = {"normalize": NormalizeOptions, "filter": FilterOptions, "pii": PiiOptions, "dedup": DedupOptions}


class Step(BaseModel):
    """One step of a recipe: its kind and validated options."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    kind: str
    options: Any

    @property
    def name(self) -> str:
        return self.options.name if self.kind == "dedup" else self.kind

    def to_dict(self) -> dict:
        return {self.kind: self.options.model_dump(mode="json", exclude_unset=True)}


DEFAULT_RECIPE: list[dict] = [
    {"normalize": {}},
    {"filter": {"length": [{"field": "answer", "min_chars": 1}, {"field": "prompt", "min_chars": 1}],
                "markers": True, "repetition": True, "blocklist": True}},
    {"pii": {}},
    {"dedup": {"method": "exact"}},
    {"dedup": {"method": "near"}},
]


def load_recipe(path: str | Path | None) -> list[Step]:
    """The steps of a recipe YAML file (a list of steps, or a mapping with `steps:`); the default recipe without one."""
    if path is None:
        return parse_recipe(DEFAULT_RECIPE, "the default recipe")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, str(path))


def parse_recipe(data: object, where: str) -> list[Step]:
    """Validate a recipe given as data; every problem is reported at once with its step index and key path."""
    if isinstance(data, dict):
        extra = sorted(set(data) - {"steps"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; a recipe has one key, "
                              f"`steps:`, a list such as [{{normalize: {{}}}}, {{dedup: {{method: exact}}}}]")
        data = data.get("steps")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: a recipe is a non-empty list of steps under `steps:`, each one of "
                          f"{', '.join(STEP_KINDS)} (e.g. `- dedup: {{method: near}}`)")
    steps, problems = [], []
    for index, item in enumerate(data):
        kind, options = _split_item(item)
        at = f"steps[{index}]"
        if kind not in _OPTION_TYPES:
            close = difflib.get_close_matches(str(kind), STEP_KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{at}: unknown step {kind!r}{hint}; steps are {', '.join(STEP_KINDS)}, each written "
                            f"as a one-key mapping like `- filter: {{...}}`")
            continue
        try:
            steps.append(Step(kind=kind, options=_OPTION_TYPES[kind].model_validate(options or {})))
        except ValidationError as err:
            for e in err.errors():
                path = ".".join(map(str, (at, kind, *e["loc"])))
                problems.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
        except (ConfigError, ValueError) as e:
            problems.append(f"{at}.{kind}: {e}")
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problem(s) in the recipe:\n  " + "\n  ".join(problems))
    return steps


def _split_item(item: object) -> tuple[object, object]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        ((kind, options),) = item.items()
        return kind, {} if options is None else options
    return repr(item)[:60], None
