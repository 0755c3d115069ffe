"""The README's "coming from LLaMA-Factory / ChatGLM3" key tables (en + zh) are what the translation tables say:
regenerate them with `python -m lmforge.config.compat_keys en|zh` when a key is added."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.config import chatglm3, llamafactory, llamafactory_infer
from lmforge.config.compat_keys import markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("lang, readme", [("en", "README.md"), ("zh", "README_zh.md")])
def test_readme_key_table_is_the_generated_one(lang, readme):
    text = (ROOT / readme).read_text(encoding="utf-8")
    found = re.search(rf"<!-- compat-keys:{lang}:start[^>]*-->\n(.*?)<!-- compat-keys:{lang}:end -->", text, re.S)
    assert found, f"{readme} has no compat-keys:{lang} block"
    assert found.group(1) == markdown(lang), (f"{readme}'s key table differs from the code: run "
                                              f"`python -m lmforge.config.compat_keys {lang}` and paste it")


def test_every_key_of_every_table_has_a_row():
    table = markdown("en")
    keys = [*llamafactory.FLAT_KEYS, *llamafactory.EXPORT_KEYS, *llamafactory_infer.INFER_FIELDS,
            *llamafactory_infer.INFER_NOTES, *llamafactory_infer.INFER_REFUSALS, *llamafactory_infer.PREDICT_KEYS,
            *(f"data_config.{k}" for k in chatglm3.DATA_CONFIG_KEYS),
            *(f"training_args.{k}" for k in chatglm3.TRAINER_NOTES),
            *(f"peft_config.{k}" for k in chatglm3.PEFT_KEYS)]
    for key in keys:
        assert f"| `{key}` |" in table, key
    for key in chatglm3.TRAINER_KEYS:  # training_args read through the LLaMA-Factory table
        assert key in llamafactory.FLAT_KEYS, key
