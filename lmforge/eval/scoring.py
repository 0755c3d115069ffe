"""Text metrics of a prediction against its reference: BLEU-4, ROUGE-1/2/L, exact match, choice accuracy.

BLEU-4 and ROUGE are computed exactly as LLaMA-Factory's `ComputeSimilarity` (train/sft/metric.py), so figures are
comparable with its `predict_*` results: ROUGE F1 from rouge_chinese over jieba words (Chinese words; for English,
words and punctuation), BLEU-4 from nltk's sentence_bleu over characters with SmoothingFunction().method3; every
score is ×100 and a set's figure is the mean over examples. Must not know about models or files.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import warnings
from dataclasses import dataclass

LOWER_IS_BETTER = ("eval_loss", "perplexity")  # losses; every other figure is a score: higher is better
GENERATION_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
CHOICE_METRIC = "choice_accuracy"
# A set is classification-style when its references come from a small closed set of short labels.
MAX_CHOICES = 20
MAX_CHOICE_CHARS = 32


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it announces building its dictionary on every first use
    return jieba


def similarity_scores(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 of one prediction (×100, rounded to 4 places as LLaMA-Factory does)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis, target = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if not " ".join(hypothesis).split() or not " ".join(target).split():  # rouge_chinese refuses empty text
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(target))[0]
        scores = {name: round(value["f"] * 100, 4) for name, value in result.items()}
    with warnings.catch_warnings():  # nltk warns about missing n-gram orders, which smoothing handles
        warnings.simplefilter("ignore")
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **scores}


def normalize_answer(text: str) -> str:
    """For exact match: Unicode NFKC (full-width → half-width), whitespace collapsed, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


def detect_choices(references: list[str]) -> list[str] | None:
    """The label set of a classification-style test set (e.g. A/B/C/D, 正面/负面), or None for free text: at most
    MAX_CHOICES distinct references, each at most MAX_CHOICE_CHARS long, and at least one label used twice."""
    labels = sorted({normalize_answer(r) for r in references})
    if (not 2 <= len(labels) <= MAX_CHOICES or len(labels) >= len(references) or not all(labels)
            or any(len(label) > MAX_CHOICE_CHARS for label in labels)):
        return None
    return labels


def _is_word_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "_")


def extract_choice(prediction: str, choices: list[str]) -> str | None:
    """The label a prediction chose: the one occurring first in it (the longest when several start at the same
    place). ASCII labels match as whole words, so "A" is not found inside "Answer"; words of two or more letters
    match in any case ("Positive" = "positive"), single letters only in their own case (the article "a" is no "A")."""
    text = normalize_answer(prediction)
    folded = text.casefold()
    best: tuple[int, int, str] | None = None
    for label in choices:
        fold = label.isascii() and len(label) > 1
        needle, haystack = (label.casefold(), folded) if fold else (label, text)
        for match in re.finditer(re.escape(needle), haystack):
            start, end = match.span()
            if label.isascii() and ((start > 0 and _is_word_char(haystack[start - 1]) and _is_word_char(needle[0]))
                                    or (end < len(haystack) and _is_word_char(haystack[end])
                                        and _is_word_char(needle[-1]))):
                continue
            candidate = (start, -len(label), label)
            if best is None or candidate < best:
                best = candidate
            break
    return best[2] if best else None


@dataclass
class ExampleScores:
    """Per-example scores, as stored in predictions.jsonl."""
    scores: dict[str, float]
    choice: str | None = None


def score_example(prediction: str, reference: str, choices: list[str] | None) -> ExampleScores:
    scores = similarity_scores(prediction, reference)
    scores["exact_match"] = exact_match(prediction, reference)
    if choices is None:
        return ExampleScores(scores)
    chosen = extract_choice(prediction, choices)
    scores[CHOICE_METRIC] = 100.0 if chosen == normalize_answer(reference) else 0.0
    return ExampleScores(scores, chosen)


def mean_scores(per_example: list[dict[str, float]]) -> dict[str, float]:
    """A set's figures: the mean of each per-example score (as LLaMA-Factory averages), rounded to 4 places."""
    if not per_example:
        return {}
    names = [name for name in per_example[0]]
    return {name: round(sum(s[name] for s in per_example) / len(per_example), 4) for name in names}
