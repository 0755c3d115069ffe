"""Cleaning steps of `data clean`: each normalize option and each filter, with a case it changes/rejects and a case
it leaves alone; the metadata condition language refuses anything but comparisons."""

import pytest

from lmforge.data.expressions import compile_condition
from lmforge.data.filters import (
    BUILTIN_LISTS,
    TERM_DIR,
    FilterOptions,
    TokenFilter,
    TokenOptions,
    build_filters,
    load_terms,
    run_filters,
)
from lmforge.data.language import detect_language
from lmforge.data.normalize import NormalizeOptions, normalize_record, normalize_text
from lmforge.errors import ConfigError, DataError, UserError
from lmforge.model.loader import DEFAULT_MODEL

OFF = dict(html=False, control_chars=False, whitespace=False)


def record(answer: str, prompt: str = "请回答这个问题", **columns) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], **columns}


def only(**options):
    """The single filter that `options` builds."""
    (f,) = build_filters(options)
    return f


# --- normalize: html -------------------------------------------------------------------------------------------

def test_html_tags_stripped_and_entities_unescaped():
    assert normalize_text("<p>a&amp;b</p>") == "a&b"
    assert normalize_text('<div class="x">Hello<br/>world</div><script>alert(1)</script><!-- c -->') == "Hello\nworld"
    assert normalize_text("&lt;b&gt; &#20013;&#x6587; &quot;q&quot;") == '<b> 中文 "q"'
    assert normalize_text("a&#8203;b&nbsp;&nbsp;c") == "ab c"  # decoded entities get the other options too


def test_html_leaves_non_tags_code_and_bare_ampersands_alone():
    text = "List<String> x; if a < b and c > d: AT&T ?a=1&copy=2"
    assert normalize_text(text) == text
    assert normalize_text("use `<br>` here:\n```html\n<p>hi</p>\n```") == "use `<br>` here:\n```html\n<p>hi</p>\n```"
    assert normalize_text("<p>a&amp;b</p>", NormalizeOptions(html=False)) == "<p>a&amp;b</p>"


# --- normalize: control and zero-width characters -----------------------------------------------------------------

def test_control_and_zero_width_chars_removed():
    assert normalize_text("a\u200bb\u200cc\u200dd\ufeffe\u2060f\x00g\x07h") == "abcdefgh"
    assert normalize_text("line1\r\nline2\rline3\tend") == "line1\nline2\nline3 end"


def test_control_chars_kept_when_off():
    assert normalize_text("a\u200bb", NormalizeOptions(control_chars=False)) == "a\u200bb"


# --- normalize: urls -----------------------------------------------------------------------------------------------

def test_urls_kept_by_default_and_removed_on_request():
    text = "See https://example.com/a?b=1&c=2. Or www.foo.org, 请访问https://x.cn/p获取 [docs](https://x.org/y)!"
    assert normalize_text(text) == text
    assert normalize_text(text, NormalizeOptions(urls="remove")) == "See . Or , 请访问获取 docs!"


def test_urls_in_code_survive_removal():
    text = 'call `requests.get("https://api.x.com/v1")` now'
    assert normalize_text(text, NormalizeOptions(urls="remove")) == text


# --- normalize: whitespace -----------------------------------------------------------------------------------------

def test_whitespace_collapsed_trimmed_and_blank_lines_limited():
    assert normalize_text("  a  \t b \u00a0 c   \n\n\n\n\nd  \n") == "a b c\n\nd"


def test_whitespace_keeps_indentation_and_code_blocks():
    text = "steps:\n    indented  line\n```python\ndef f():\n    return  1\n\n\n\nx = 2\n```"
    assert normalize_text(text) == "steps:\n    indented line\n```python\ndef f():\n    return  1\n\n\n\nx = 2\n```"
    assert normalize_text("a   b\n\n\n\nc", NormalizeOptions(whitespace=False)) == "a   b\n\n\n\nc"


# --- normalize: full-width and case --------------------------------------------------------------------------------

def test_fullwidth_to_halfwidth_keeps_chinese_punctuation():
    text = "ＡＢＣ１２３，你好！（测试）＃＠＋　结束"
    assert normalize_text(text) == text  # off by default
    assert normalize_text(text, NormalizeOptions(fullwidth_to_halfwidth=True)) == "ABC123，你好！（测试）#@+　结束"


def test_lowercase_latin_only():
    text = "Hello ÀÉÎ Ấ Python ΑΒΓ Привет 中文"
    assert normalize_text(text) == text  # off by default
    assert normalize_text(text, NormalizeOptions(lowercase_latin=True)) == "hello àéî ấ python ΑΒΓ Привет 中文"


def test_lowercase_leaves_code_alone():
    assert normalize_text("Use `MyClass()` Now", NormalizeOptions(lowercase_latin=True)) == "use `MyClass()` now"


def test_normalize_options_are_checked_and_records_copied():
    with pytest.raises(ValueError):
        NormalizeOptions(urls="strip")
    with pytest.raises(ValueError):
        NormalizeOptions(htlm=False)
    original = record("<b>hi</b>  there", votes=3)
    cleaned = normalize_record(original)
    assert cleaned == record("hi there", votes=3)
    assert original["messages"][1]["content"] == "<b>hi</b>  there"
    assert normalize_text("  <b>x</b>  ", NormalizeOptions(**OFF)) == "  <b>x</b>  "


# --- filter: length in characters ----------------------------------------------------------------------------------

def test_length_filter_on_answer_and_conversation():
    f = only(length={"min_chars": 10})
    assert f(record("好的")) == "answer too short: 2 chars < min 10"
    assert f(record("这是一个足够长的回答，可以保留。")) is None
    (short_prompt, long_all) = build_filters({"length": [{"field": "prompt", "min_chars": 3},
                                                         {"field": "all", "max_chars": 20}]})
    assert short_prompt(record("answer", prompt="hi")) == "prompt too short: 2 chars < min 3"
    assert long_all(record("x" * 30, prompt="hey")) == "conversation too long: 33 chars > max 20"
    assert long_all(record("x" * 10, prompt="hey")) is None


def test_length_options_need_a_sensible_limit():
    with pytest.raises(ConfigError, match="min_chars and/or max_chars"):
        build_filters({"length": {"field": "answer"}})
    with pytest.raises(ConfigError, match="min_chars 10 > max_chars 5"):
        build_filters({"length": {"min_chars": 10, "max_chars": 5}})
    with pytest.raises(ConfigError, match="field"):
        build_filters({"length": {"field": "answers", "min_chars": 1}})


def test_records_not_in_messages_shape_are_a_data_error():
    with pytest.raises(DataError, match="messages shape.*instruction"):
        only(length={"min_chars": 1})({"instruction": "q", "output": "a"})


# --- filter: length in tokens --------------------------------------------------------------------------------------

def test_token_filter_counts_with_the_named_models_tokenizer(tokenizer, tiny_model_dir):
    assert TokenOptions(max_tokens=1).tokenizer == DEFAULT_MODEL  # unnamed, the bundled model's tokenizer counts
    f = only(tokens={"max_tokens": 20, "field": "answer", "tokenizer": tiny_model_dir})
    long_answer = "The quick brown fox jumps over the lazy dog. " * 5
    n = len(tokenizer(long_answer, add_special_tokens=False)["input_ids"])
    assert n > 20 and f(record(long_answer)) == f"answer too long: {n} tokens > max 20 ({tiny_model_dir})"
    assert f(record("Short answer.")) is None
    g = only(tokens={"min_tokens": 5, "field": "answer", "tokenizer": tiny_model_dir})
    assert g(record("Hi")).startswith("answer too short: 1 tokens < min 5")


def test_token_filter_batch_equals_one_by_one_and_byte_bound_holds(tokenizer, tiny_model_dir):
    texts = ["你好" * 30, "short", "emoji 😀👨‍👩‍👧 " * 6, "x" * 300, "mixed 中文 and English " * 8, ""]
    f = TokenFilter(tiny_model_dir, "answer", min_tokens=3, max_tokens=40)
    records = [record(t) for t in texts]
    assert f.filter_batch(records) == [f(r) for r in records]
    for text in texts:  # the skip rule relies on: tokens <= UTF-8 bytes + 8
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= len(text.encode()) + 8


# --- filter: language ----------------------------------------------------------------------------------------------

def test_language_keeps_chinese_and_rejects_english():
    f = only(language=["zh"])
    assert f(record("机器学习是人工智能的一个分支，它让计算机从数据中学习。")) is None
    assert f(record("Machine learning is a branch of AI.", prompt="What is machine learning?")) == \
        "language en not in [zh]"


def test_language_keeps_traditional_chinese_and_english_when_both_listed():
    f = only(language={"keep": ["zh-TW", "en"]})
    assert f(record("電腦當機了，請問該怎麼辦？我們應該先重新開機。", prompt="請問")) is None
    assert f(record("Restart the computer and try again.", prompt="My computer froze, what should I do?")) is None


@pytest.mark.parametrize("text, code", [
    ("今日はいい天気ですね。散歩に行きましょう。", "ja"),
    ("오늘 날씨가 좋네요. 산책하러 가요.", "ko"),
    ("Il fait beau aujourd'hui, allons nous promener au parc.", "fr"),
    ("Das Wetter ist heute schön, wir gehen in den Park.", "de"),
    ("用pip安装numpy就可以了。", "zh"),
    ("The weather is nice today, so let's go for a walk in the park.", "en"),
    ("12345 !!!", None),
    ("Yes.", None),
])
def test_detect_language(text, code):
    assert detect_language(text) == code


def test_language_rejects_other_languages_with_a_reason_and_checks_codes():
    f = only(language=["zh", "en"])
    assert f(record("今日はいい天気ですね。", prompt="天気は？")) == "language ja not in [zh, en]"
    assert f(record("12345", prompt="67890")) is None  # undetermined: kept by default
    strict = only(language={"keep": ["zh", "en"], "undetermined": "reject", "accuracy": "low"})
    assert strict(record("12345", prompt="67890")) == "language undetermined not in [zh, en]"
    assert strict(record("Bonjour, je voudrais réserver une table pour ce soir.", prompt="?")) == \
        "language fr not in [zh, en]"
    with pytest.raises(ConfigError, match="unknown language code 'chinese'"):
        build_filters({"language": ["chinese"]})


# --- filter: machine-generated markers -----------------------------------------------------------------------------

def test_markers_reject_ai_boilerplate_in_chinese_and_english():
    f = only(markers=True)
    assert f(record("作为一个AI语言模型，我无法提供医疗建议。")) == \
        "machine-generated marker: AI self-reference ('作为一个AI语言模型')"
    assert f(record("作为一个 AI 语言模型，我无法回答。")) is not None
    assert f(record("I\u2019m sorry, but as an AI, I cannot browse.")) is not None
    assert f(record("As an AI language model, I don't have opinions.")).endswith("('As an AI language model')")


def test_markers_keep_normal_text():
    f = only(markers=True)
    assert f(record("机器学习作为人工智能的一个分支，近年来发展很快。")) is None
    assert f(record("We used GPT-2 as a language model baseline.")) is None


def test_markers_from_user_files_and_inline_terms(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my markers\n# category: spam\nbuy now\n", encoding="utf-8")
    f = only(markers={"builtin": False, "files": [str(path)], "terms": ["点击领取"]})
    assert f(record("Great deal, BUY   NOW!")) == "machine-generated marker: spam ('BUY   NOW')"
    assert f(record("请点击领取红包")) == "machine-generated marker: '点击领取'"
    assert f(record("As an AI language model, …")) is None  # builtin lists off
    with pytest.raises(ConfigError, match="cannot read term list"):
        build_filters({"markers": {"files": [str(tmp_path / "missing.txt")]}})


# --- filter: repetition --------------------------------------------------------------------------------------------

def test_repetition_rejects_repeated_text():
    f = only(repetition=True)
    assert f(record("哈" * 40)).startswith("repetitive: 0.97 > 0.3 (repeated 10-char grams)")
    assert f(record("I love you so much. " * 10)).startswith("repetitive: ")
    assert "5-word grams" in f(record("I love you so much. " * 10))


def test_repetition_catches_distant_repeats_and_its_shortcut_never_hides_one():
    import random

    from lmforge.data.filters import RepetitionFilter, _repeat_bound

    block = "机器学习让计算机从数据中学习规律，而不是依靠人写死的规则。"
    assert only(repetition=True)(record(block + "常见方法有监督学习和强化学习。" + block + block)) is not None
    f, rng = RepetitionFilter(0.3, 10, 5, "answer"), random.Random(0)
    for _ in range(300):
        unit = "".join(rng.choice("哈嘿好的是我你") for _ in range(rng.randint(1, 40)))
        text = "".join(ch if rng.random() > 0.1 else "字" for ch in unit * rng.randint(1, 12))
        if len(text) >= 11:
            assert _repeat_bound(text, 10) >= f.ratio(text)[0] - 1e-9, text


def test_repetition_keeps_normal_text():
    f = only(repetition={"max_ratio": 0.3})
    assert f(record("机器学习是人工智能的一个分支。它让计算机从数据中学习规律，而不是依靠人写死的规则。"
                    "常见的方法有监督学习、无监督学习和强化学习。")) is None
    assert f(record("Machine learning lets computers learn patterns from data instead of hand-written rules. "
                    "Common approaches are supervised, unsupervised and reinforcement learning.")) is None
    assert f(record("哈哈")) is None  # too short to judge


# --- filter: blocklists --------------------------------------------------------------------------------------------

def test_blocklist_rejects_with_category_and_keeps_clean_text():
    f = only(blocklist=True)
    assert f(record("我们这里代开发票，价格优惠。")) == "blocklisted term: illegal trade ('代开发票')"
    assert f(record("You can buy cocaine online here.", prompt="hi")) == \
        "blocklisted term: illegal trade ('buy cocaine online')"
    assert f(record("发票需要由销售方开具。", prompt="怎么开发票？")) is None


def test_blocklist_respects_word_boundaries_and_searches_the_prompt_by_default():
    f = only(blocklist={"builtin": False, "terms": ["spic"]})
    assert f(record("Add a spice.", prompt="Recipe?")) is None
    assert f(record("ok", prompt="you spic")) == "blocklisted term: 'spic'"


def test_shipped_lists_are_small_and_categorized():
    for name in (*BUILTIN_LISTS["markers"], *BUILTIN_LISTS["blocklist"]):
        terms = load_terms(TERM_DIR / name)
        assert 25 <= len(terms) <= 60, name
        assert len({t.lower() for t, _ in terms}) == len(terms), f"duplicates in {name}"
        assert all(category for _, category in terms), f"uncategorized terms in {name}"


# --- filter: metadata conditions -----------------------------------------------------------------------------------

def test_where_votes():
    f = only(where="votes >= 3")
    assert f(record("a", votes=2)) == "where 'votes >= 3' is false (votes=2)"
    assert f(record("a", votes=5)) is None


def test_where_boolean_logic_lists_and_literals():
    condition = compile_condition("votes >= 3 and is_best == true and lang in ['zh', 'en'] and not deleted "
                                  "and score is not None and score > -1.5")
    good = dict(votes=3, is_best=True, lang="zh", deleted=False, score=0.0)
    assert condition(good)
    assert not condition({**good, "lang": "fr"})
    assert not condition({**good, "score": -2})
    assert condition.columns == ("votes", "is_best", "lang", "deleted", "score")


def test_where_missing_column_lists_columns_and_bad_types_say_how_to_guard():
    condition = compile_condition("votes >= 3")
    with pytest.raises(DataError, match="no column 'votes'.*columns are: messages, vote"):
        condition(record("a", vote=3))
    with pytest.raises(DataError, match="votes='many'.*is not None"):
        condition(record("a", votes="many"))


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", "function calls not allowed (column 1)"),
    ("().__class__", "attribute access"),
    ("votes.real > 1", "attribute access (a.b) not allowed (column 6)"),
    ("open('/etc/passwd')", "function calls"),
    ("votes[0] > 1", "subscripts"),
    ("votes + 1 > 3", "arithmetic"),
    ("[x for x in votes]", "comprehensions"),
    ("(lambda: 1)", "lambdas"),
    ("__builtins__", "the name '__builtins__'"),
    ("votes >= ", "invalid expression at column 9: incomplete expression"),
    ("votes = 3", "use == to compare"),
    ("votes is 3", "`is` with anything but None"),
])
def test_where_refuses_anything_but_comparisons(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        compile_condition(text)


# --- building and running ------------------------------------------------------------------------------------------

def test_build_filters_runs_cheapest_first_and_reports_the_first_reason(tiny_model_dir):
    filters = build_filters({"tokens": {"max_tokens": 100, "tokenizer": tiny_model_dir}, "language": ["zh"],
                             "repetition": True,
                             "blocklist": True, "markers": True, "length": {"min_chars": 2}, "where": "votes > 0"})
    assert [f.name for f in filters] == ["where", "length", "markers", "blocklist", "repetition", "language", "tokens"]
    records = [record("这是一个正常的中文回答。", votes=1), record("作为一个AI语言模型，我无法回答。", votes=0),
               record("哈" * 30, votes=1), record("This is an English answer.", prompt="hi", votes=1)]
    assert run_filters(filters, records) == [None, "where 'votes > 0' is false (votes=0)",
                                             "repetitive: 0.95 > 0.3 (repeated 10-char grams)",
                                             "language en not in [zh]"]


def test_build_filters_rejects_unknown_options():
    with pytest.raises(ConfigError, match="lenght"):
        build_filters({"lenght": {"min_chars": 1}})
    assert build_filters(FilterOptions(markers=False, repetition=False)) == []
