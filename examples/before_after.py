"""Before/after check of `make demo`: the base model and the tuned run answer held-out questions side by side.

Usage: python examples/before_after.py RUN_DIR HELDOUT.jsonl
HELDOUT.jsonl lines: {"messages": [...], "kind": "identity"|"domain", "expect": ["forge", ...]} — an answer is
correct when it contains every expected word (as a whole word, case-insensitive). Uses only lmforge's public API.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import yaml

from lmforge.generate import SamplingParams, load_for_inference, replies


def correct(answer: str, expect: list[str]) -> bool:
    return all(re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) for word in expect)


def answers(model, tokenizer, questions: list[dict]) -> list[str]:
    return [text.strip() for text in replies(model, tokenizer, [q["messages"] for q in questions],
                                             SamplingParams(max_new_tokens=80))]


def main(run_dir: str, heldout: str) -> int:
    questions = [json.loads(line) for line in Path(heldout).read_text(encoding="utf-8").splitlines() if line.strip()]
    base_name = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["model"]["name_or_path"]
    print(f"Answering {len(questions)} held-out questions (not in the training data) before and after tuning…")
    before = answers(*load_for_inference(model=base_name), questions)
    after = answers(*load_for_inference(run_dir=run_dir), questions)

    width = 58
    for q, b, a in zip(questions, before, after):
        print("\n" + "─" * (2 * width + 3))
        print(f"Q ({q['kind']}): {q['messages'][-1]['content']}")
        left = textwrap.wrap(b, width) or [""]
        right = textwrap.wrap(a, width) or [""]
        print(f"{'BEFORE (' + base_name + ')':<{width}} │ AFTER ({run_dir})")
        for i in range(max(len(left), len(right))):
            print(f"{left[i] if i < len(left) else '':<{width}} │ {right[i] if i < len(right) else ''}")

    identity = [(q, b, a) for q, b, a in zip(questions, before, after) if q["kind"] == "identity"]
    hits_before = sum(correct(b, q["expect"]) for q, b, _ in identity)
    hits_after = sum(correct(a, q["expect"]) for q, _, a in identity)
    print("\n" + "═" * (2 * width + 3))
    print(f"Identity accuracy on held-out paraphrases: before {hits_before}/{len(identity)} "
          f"({100 * hits_before / len(identity):.0f}%) → after {hits_after}/{len(identity)} "
          f"({100 * hits_after / len(identity):.0f}%)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
