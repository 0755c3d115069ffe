"""Text metrics against values worked out by hand (Chinese and English), so figures match LLaMA-Factory's:
ROUGE F1 over jieba words, BLEU-4 over characters with NIST smoothing (method3), ×100; exact match and choice
extraction for classification-style sets."""

from __future__ import annotations

import math

import pytest

from lmforge.eval.scoring import (
    detect_choices,
    exact_match,
    extract_choice,
    mean_scores,
    score_example,
    similarity_scores,
)


def f1(p: float, r: float) -> float:
    return 100 * 2 * p * r / (p + r)


def test_chinese_prefix_prediction():
    # jieba: 我/爱/北京/天安门 (reference) vs 我/爱/北京 (prediction)
    scores = similarity_scores("我爱北京", "我爱北京天安门")
    assert scores["rouge-1"] == pytest.approx(f1(3 / 3, 3 / 4), abs=1e-4)  # 85.7143
    assert scores["rouge-2"] == pytest.approx(f1(2 / 2, 2 / 3), abs=1e-4)  # 我爱, 爱北京 of 3 reference bigrams: 80
    assert scores["rouge-l"] == pytest.approx(f1(3 / 3, 3 / 4), abs=1e-4)  # LCS = 3 words
    # characters: every n-gram of the 4-character prediction is in the reference; brevity penalty exp(1 - 7/4)
    assert scores["bleu-4"] == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-4)  # 47.2367


def test_english_prefix_prediction():
    # jieba splits English into words (spaces dropped): the cat sat | the cat sat on the mat. rouge_chinese's
    # ROUGE-N counts distinct n-grams (the reference has 5 distinct words), ROUGE-L every word (6)
    scores = similarity_scores("the cat sat", "the cat sat on the mat")
    assert scores["rouge-1"] == pytest.approx(f1(1, 3 / 5), abs=1e-4)  # 75
    assert scores["rouge-2"] == pytest.approx(f1(1, 2 / 5), abs=1e-4)  # 57.1429
    assert scores["rouge-l"] == pytest.approx(f1(1, 3 / 6), abs=1e-4)  # 66.6667: LCS 3 of 6 reference words
    assert scores["bleu-4"] == pytest.approx(100 * math.exp(1 - 22 / 11), abs=1e-4)  # 36.7879: 11 of 22 characters


def test_bleu_smoothing_method3_for_a_missing_4gram():
    # characters a b c e vs a b c d: precisions 3/4, 2/3, 1/2, 0/1 → method3 replaces the zero by 1/(2·1)
    scores = similarity_scores("abce", "abcd")
    assert scores["bleu-4"] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, abs=1e-4)  # 59.4604


def test_identical_and_disjoint_and_empty():
    same = similarity_scores("依法治国是基本方略", "依法治国是基本方略")
    assert all(value == pytest.approx(100, abs=1e-3) for value in same.values())
    disjoint = similarity_scores("香蕉", "法律")
    assert disjoint == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    empty = similarity_scores("", "合同法第五十二条")
    assert empty == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_exact_match_ignores_width_and_spacing_only():
    assert exact_match(" Ａ  B ", "A B") == 100.0  # full-width letters and extra spaces
    assert exact_match("有效", "有效。") == 0.0
    assert exact_match("abc", "abd") == 0.0


def test_detect_choices():
    assert detect_choices(["A", "B", "A", "C"]) == ["A", "B", "C"]
    assert detect_choices(["正面", "负面", "正面"]) == ["正面", "负面"]
    assert detect_choices(["a long free-text answer", "another one"]) is None  # all distinct
    assert detect_choices(["x" * 40, "x" * 40, "y"]) is None  # a label too long to be one


@pytest.mark.parametrize("prediction, choices, expected", [
    ("The answer is B.", ["A", "B", "C"], "B"),
    ("Answer: A", ["A", "B"], "A"),              # not the A inside "Answer"
    ("It is a cat", ["A", "B"], None),           # the article "a" is not the label "A"
    ("这条评论是正面的", ["正面", "负面"], "正面"),
    ("Positive, not negative", ["negative", "positive"], "positive"),  # first occurrence wins, any case
    ("positive", ["pos", "positive"], "positive"),  # same start: the longer label
    ("I cannot tell", ["yes", "no"], None),
])
def test_extract_choice(prediction, choices, expected):
    assert extract_choice(prediction, choices) == expected


def test_score_example_and_mean():
    first = score_example("The answer is B", "B", ["A", "B"])
    second = score_example("A", "B", ["A", "B"])
    assert (first.choice, first.scores["choice_accuracy"], first.scores["exact_match"]) == ("B", 100.0, 0.0)
    assert (second.choice, second.scores["choice_accuracy"]) == ("A", 0.0)
    means = mean_scores([first.scores, second.scores])
    assert means["choice_accuracy"] == 50.0
    assert means["rouge-1"] == pytest.approx((first.scores["rouge-1"] + second.scores["rouge-1"]) / 2, abs=1e-4)
    assert "choice_accuracy" not in score_example("x", "y", None).scores
