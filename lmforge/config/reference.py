"""The configuration reference a user reads: every key, its default and its meaning, printed from the schema itself
(`lmforge train --help-config`), so the README and the code cannot drift apart.

Owns: formatting the schema's field docstrings. The meanings themselves live once, in schema.py.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from pydantic import BaseModel

from .schema import SECTIONS, Config


def reference(section: str | None = None, width: int = 100) -> str:
    """Every key as `section.key  (default)` and its meaning, wrapped to width; one section when given."""
    blocks = []
    if section in (None, ""):
        blocks.append(_section_text(None, Config, width, top_level_only=True))
    for name, cls in SECTIONS.items():
        if section in (None, "", name):
            blocks.append(_section_text(name, cls, width))
    return "\n\n".join(blocks) + "\n"


def _section_text(name: str | None, cls: type[BaseModel], width: int, top_level_only: bool = False) -> str:
    lines = [f"{name}:" if name else "top level:"]
    for field, info in cls.model_fields.items():
        if top_level_only and field in SECTIONS:
            continue
        key = f"{name}.{field}" if name else field
        lines.append(f"  {key}  (default: {_default(info.default)})")
        meaning = " ".join((info.description or "").split()) or "(no description)"
        lines += textwrap.wrap(meaning, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "{...}"
    return json.dumps(value, ensure_ascii=False, default=str)
