"""Reading a run's configuration: a YAML file (ours, LLaMA-Factory's flat one or ChatGLM3's finetune_demo one) plus
`key=value` overrides.

Owns: YAML parsing with file:line errors, overrides, and reporting every problem at once with a "did you mean".
The schema is schema.py's; LLaMA-Factory's key names are llamafactory.py's, ChatGLM3's chatglm3.py's.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .chatglm3 import is_chatglm3, resolve_data_files, translate_chatglm3
from .llamafactory import FLAT_KEYS, WARMUP_RATIO_NOTE, is_flat_llamafactory, translate_flat
from .llamafactory_infer import is_inference_yaml
from .schema import SECTIONS, Config, known_paths


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (ours or LLaMA-Factory's flat one), apply key=value overrides, validate everything."""
    raw: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
    notes: list[str] = []
    if is_inference_yaml(raw) and not any(item.startswith(("dataset=", "data.train=")) for item in overrides):
        raise ConfigError(f"{source} names a model but no dataset: it looks like an inference config; talk to it "
                          f"with `lmforge chat {source}` or serve it with `lmforge serve {source}` (to train, add "
                          f"dataset: …)")
    if is_flat_llamafactory(raw):
        raw, notes = translate_flat(raw, source)
    elif is_chatglm3(raw):
        raw, notes = translate_chatglm3(raw, source)
    elif len(raw) >= 3 and not set(raw) & (set(Config.model_fields) | set(FLAT_KEYS)) and not any(
            _close_matches(str(key), [*known_paths(), *FLAT_KEYS]) for key in raw):  # typos get "did you mean"
        listed = ", ".join(repr(key) for key in list(raw)[:3]) + (", …" if len(raw) > 3 else "")
        raise ConfigError(f"{source} is not a training config: none of its {len(raw)} top-level keys ({listed}) is "
                          f"an lmforge, LLaMA-Factory or ChatGLM3 key. `lmforge train --help-config` lists the keys")
    problems: list[str] = []
    _fractional_warmup_steps(raw, notes)
    for item in overrides:
        _apply_override(raw, item, problems, notes)
        _fractional_warmup_steps(raw, notes)
    problems += resolve_data_files(raw)
    problems += _unknown_keys(raw, source)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # Unknown keys and non-mapping sections are already listed above (with a "did you mean"); add the rest.
        listed = {key for key, value in raw.items() if key in SECTIONS and not isinstance(value, dict)}
        problems += [_describe_error(e) for e in exc.errors()
                     if e["type"] != "extra_forbidden" and (e["loc"] or ("",))[0] not in listed]
    if problems:
        raise ConfigError(_format_problems(source, problems)) from None
    if _prints_notes():
        for note in notes:
            print(f"note: {note}")
    return config


def _prints_notes() -> bool:
    """Notes are said once per command: not again by the ranks `lmforge train --nproc N` starts (the launcher said
    them; it marks its children with LMFORGE_CONFIG_NOTES_SAID), and under a bare torchrun by rank 0 only."""
    return os.environ.get("LMFORGE_CONFIG_NOTES_SAID") != "1" and os.environ.get("RANK", "0") == "0"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _apply_override(raw: dict, item: str, problems: list[str], notes: list[str]) -> None:
    """Apply `a.b=value`; a flat LLaMA-Factory key (learning_rate=…) is translated to its place."""
    if "=" not in item:
        problems.append(f"override {item!r} is not key=value")
        return
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text else None
    if "." not in key and key not in Config.model_fields:
        translated, override_notes = translate_flat({key: value}, "command line")
        notes += override_notes
        if translated.get("_unknown"):
            problems.append(_unknown_message(key))
            return
        problems += translated.pop("_refused", [])
        _merge(raw, translated)
        return
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"override {key}: {part} is not a section")
            return
    node[leaf] = value


def _fractional_warmup_steps(raw: dict, notes: list[str]) -> None:
    """train.warmup_steps below 1 is a share of the total steps, as transformers reads it: move it to warmup_ratio."""
    train = raw.get("train")
    value = train.get("warmup_steps") if isinstance(train, dict) else None
    if isinstance(value, float) and 0 < value < 1:
        train["warmup_ratio"] = train.pop("warmup_steps")
        notes.append("train." + WARMUP_RATIO_NOTE.format(value=value))


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _unknown_keys(raw: dict, source: str) -> list[str]:
    problems = raw.pop("_refused", []) + [_unknown_message(key) for key in raw.pop("_unknown", [])]
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a section (mapping), got {value!r}")
                continue
            problems += [_unknown_message(f"{key}.{sub}") for sub in value if sub not in SECTIONS[key].model_fields]
        elif key not in Config.model_fields:
            problems.append(_unknown_message(key))
    return problems


def _unknown_message(key: str) -> str:
    # A flat LLaMA-Factory name is only valid at the top level; inside a section it would be unknown again.
    candidates = known_paths() + ([] if "." in key else list(FLAT_KEYS))
    leaf_matches = [p for p in known_paths() if p.split(".")[-1] == key.split(".")[-1]]
    close = leaf_matches or _close_matches(key, candidates)
    hint = f" — did you mean {' or '.join(close)}?" if close else ""
    return f"unknown key {key!r}{hint}"


def _close_matches(key: str, candidates: list[str]) -> list[str]:
    """Names that look like a typo of `key`: compared whole and leaf to leaf (data.cutof_len ~ data.cutoff_len),
    above a similarity where a suggestion is usually right (deepspeed is not seed, training_args not logging_steps)."""
    leaf = key.split(".")[-1]
    scored = []
    for name in candidates:
        whole = difflib.SequenceMatcher(None, key, name).ratio()
        by_leaf = difflib.SequenceMatcher(None, leaf, name.split(".")[-1]).ratio() if "." in name else 0.0
        if max(whole, by_leaf) >= SUGGEST_ABOVE:
            scored.append((max(whole, by_leaf), whole, name))
    return [name for *_, name in sorted(scored, reverse=True)[:3]]


SUGGEST_ABOVE = 0.8


def _describe_error(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "config"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("literal_error", "enum"):
        return f"{where}: {message} (got {error.get('input')!r})"
    return f"{where}: {message}"


def _format_problems(source: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the config:\n{lines}"
