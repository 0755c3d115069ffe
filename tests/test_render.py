"""Rendering: the trained tokens are exactly each assistant reply plus its end-of-turn token, under real templates.

Templates: the tiny test tokenizer's own (ChatML with a default system prompt, as SmolLM2's), a Llama-3-style and a
Qwen-style template, all on that byte-level BPE tokenizer; plus the named templates and a tiny word-level tokenizer
built here that lacks ChatML tokens.
"""

from __future__ import annotations

import pytest
from conftest import LLAMA3_TEMPLATE, llama3_tokenizer, qwen_tokenizer, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmforge.conversation import Conversation
from lmforge.data.render import (
    IGNORE_INDEX,
    NAMED_TEMPLATES,
    end_of_turn_ids,
    ensure_chat_template,
    render_dataset,
    render_example,
    render_prompt,
    render_text,
)
from lmforge.errors import ConfigError
from lmforge.model.loader import load_tokenizer

CONVERSATIONS = {
    "two_turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Can you help?"},
        {"role": "assistant", "content": "Sure."},
    ],
    "system_chinese_trailing_whitespace": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，世界"},
        {"role": "assistant", "content": "你好！我是助手。"},
        {"role": "user", "content": "say something ending in spaces  "},
        {"role": "assistant", "content": "ends with spaces  "},
        {"role": "user", "content": "and newlines"},
        {"role": "assistant", "content": "ends with newlines\n\n"},
    ],
    # Replies starting with whitespace: the generation prompt's "\n" must not merge into the reply's first token.
    "leading_whitespace": [
        {"role": "user", "content": "indent this"},
        {"role": "assistant", "content": "  def f():\n    return 1\n"},
        {"role": "user", "content": "and this"},
        {"role": "assistant", "content": "\n\n  code"},
    ],
}

# Renders earlier assistant replies empty and only the last one in full (like templates that drop past reasoning).
DROPS_HISTORY_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module", params=["chatml", "llama3", "qwen"])
def templated(request):
    """(tokenizer, end-of-turn token) for each template family; shared, so tests using it must not modify it."""
    if request.param == "chatml":
        return tiny_tokenizer(), "<|im_end|>"
    if request.param == "llama3":
        return llama3_tokenizer(), "<|eot_id|>"
    return qwen_tokenizer(), "<|im_end|>"


def supervised_runs(example) -> list[tuple[int, list[int]]]:
    """(start index, token ids) of each contiguous run of supervised labels."""
    runs = []
    for i, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        if label == IGNORE_INDEX:
            continue
        assert label == token, "a supervised label must be the token itself"
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(token)
        else:
            runs.append((i, [token]))
    return runs


def decoded_runs(tokenizer, example) -> list[str]:
    return [tokenizer.decode(ids) for _, ids in supervised_runs(example)]


def assistant_contents(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def render(tokenizer, messages, train_on="assistant"):
    return render_example(tokenizer, Conversation.from_dicts(messages, "test.jsonl:1"), train_on)


# ---------------------------------------------------------------------------------------------- trained tokens


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_supervised_tokens_are_each_reply_plus_end_of_turn(templated, name):
    tokenizer, eot = templated
    messages = CONVERSATIONS[name]
    example = render(tokenizer, messages)
    assert decoded_runs(tokenizer, example) == [content + eot for content in assistant_contents(messages)]
    assert len(example.input_ids) == len(example.labels)


def test_train_on_last_assistant_supervises_only_the_last_reply(templated):
    tokenizer, eot = templated
    messages = CONVERSATIONS["system_chinese_trailing_whitespace"]
    example = render(tokenizer, messages, "last_assistant")
    assert decoded_runs(tokenizer, example) == [messages[-1]["content"] + eot]
    # Same tokens as the all-assistant rendering; only the labels of earlier replies differ.
    assert example.input_ids == render(tokenizer, messages).input_ids


def test_train_on_all_supervises_every_token(templated):
    tokenizer, _ = templated
    example = render(tokenizer, CONVERSATIONS["two_turns"], "all")
    assert example.labels == example.input_ids
    assert example.num_supervised == len(example.input_ids)
    assert tokenizer.decode(example.input_ids) == render_text(tokenizer, CONVERSATIONS["two_turns"])


def test_supervised_ids_are_the_reply_tokenized_on_its_own(tokenizer):
    # The reply a model generates after the prompt is its own tokens; training must use the same ones.
    messages = CONVERSATIONS["leading_whitespace"]
    example = render(tokenizer, messages)
    for (_, ids), content in zip(supervised_runs(example), assistant_contents(messages)):
        assert ids == tokenizer(content + "<|im_end|>", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- prefix-preserving


@pytest.mark.parametrize("system, index", [(False, 1), (True, 2)])
def test_template_that_is_not_prefix_preserving_is_refused(tokenizer, system, index):
    tokenizer.chat_template = DROPS_HISTORY_TEMPLATE
    messages = CONVERSATIONS["two_turns"]
    if system:
        messages = [{"role": "system", "content": "Be brief."}] + messages
    with pytest.raises(ConfigError) as err:
        render(tokenizer, messages)
    message = str(err.value)
    assert "prefix-preserving" in message and f"assistant message {index}" in message
    assert "test.jsonl:1" in message and "last_assistant" in message

    example = render(tokenizer, messages, "last_assistant")
    assert decoded_runs(tokenizer, example) == ["Sure.<|im_end|>"]
    # Inference renders the same prompt the last reply was trained after.
    prompt = render_prompt(tokenizer, messages[:-1])
    assert example.input_ids[:len(prompt)] == prompt
    assert supervised_runs(example)[0][0] == len(prompt)


# ---------------------------------------------------------------------------------------------- train = inference


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_prompt_is_the_training_prefix_of_every_reply(templated, name):
    tokenizer, _ = templated
    messages = CONVERSATIONS[name]
    example = render(tokenizer, messages)
    starts = [start for start, _ in supervised_runs(example)]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    for start, k in zip(starts, turns):
        prompt = render_prompt(tokenizer, messages[:k])
        assert prompt == example.input_ids[:start], f"prompt before assistant message {k} differs from training"


# ---------------------------------------------------------------------------------------------- named templates


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"),
    ("human_assistant", "<|im_start|>Human: Hi<|im_end|><|im_start|>Assistant: Hello!<|im_end|>"),
])
def test_named_template_is_set_as_jinja_and_survives_save_and_reload(tokenizer, tmp_path, name, expected):
    messages = CONVERSATIONS["two_turns"][:2]
    note = ensure_chat_template(tokenizer, name)
    assert "replaces the model's own" in note  # the tokenizer has its own template
    assert tokenizer.chat_template == NAMED_TEMPLATES[name]
    text = render_text(tokenizer, messages)
    assert text == expected  # the tokenizer's bos/eos are <|im_start|>/<|im_end|> (as SmolLM2's)

    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded.chat_template == NAMED_TEMPLATES[name]
    assert render_text(reloaded, messages) == text
    assert render_prompt(reloaded, messages[:1]) == render_prompt(tokenizer, messages[:1])
    reply = "Hello!<|im_end|>" if name == "chatml" else " Hello!<|im_end|>"
    assert decoded_runs(reloaded, render(reloaded, messages)) == [reply]


def test_jinja_string_template_is_used_verbatim(tokenizer):
    note = ensure_chat_template(tokenizer, LLAMA3_TEMPLATE)
    assert "Jinja" in note
    assert tokenizer.chat_template == LLAMA3_TEMPLATE


def test_model_without_template_must_name_one(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ConfigError) as err:
        ensure_chat_template(tokenizer, None)
    assert "chatml" in str(err.value) and "human_assistant" in str(err.value)


def word_level_tokenizer(pre_tokenizer) -> PreTrainedTokenizerFast:
    """A tiny tokenizer with <s>/</s> but no ChatML tokens."""
    words = ["[UNK]", "<s>", "</s>", "Human:", "Assistant:", "Human", "Assistant", ":", "hi", "hello"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


# WhitespaceSplit maps "<|im_start|>" to a single [UNK]: one token, but not the token chatml needs.
@pytest.mark.parametrize("pre_tokenizer", [pre_tokenizers.Whitespace(), pre_tokenizers.WhitespaceSplit()],
                         ids=["whitespace", "whitespace_split"])
def test_chatml_on_a_vocabulary_without_its_tokens_suggests_human_assistant(pre_tokenizer):
    tok = word_level_tokenizer(pre_tokenizer)
    with pytest.raises(ConfigError) as err:
        ensure_chat_template(tok, "chatml")
    assert "<|im_start|>" in str(err.value) and "human_assistant" in str(err.value)
    assert tok.chat_template is None

    assert ensure_chat_template(tok, "human_assistant") is None  # no template of its own to replace
    text = render_text(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert text == "<s>Human: hi</s><s>Assistant: hello</s>"
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_llama_factory_template_name_is_ignored_when_the_model_has_a_template(tokenizer):
    own = tokenizer.chat_template
    note = ensure_chat_template(tokenizer, "qwen")
    assert "'qwen' ignored" in note
    assert tokenizer.chat_template == own


def test_llama_factory_template_name_without_a_model_template_is_an_error(tokenizer):
    tokenizer.chat_template = None  # vicuna is one of LLaMA-Factory's names lmforge has no table entry for
    with pytest.raises(ConfigError) as err:
        ensure_chat_template(tokenizer, "vicuna")
    assert "'vicuna'" in str(err.value) and "chatml" in str(err.value) and "llama3" in str(err.value)


# ---------------------------------------------------------------------------------------------- dataset + cutoff


def test_render_dataset_truncates_and_drops_by_cutoff(tokenizer):
    long_text = " ".join(["word"] * 200)
    short = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}]
    reply_beyond_cutoff = [{"role": "system", "content": "S"}, {"role": "user", "content": long_text},
                           {"role": "assistant", "content": "ok"}]
    truncated = short + [{"role": "user", "content": long_text}, {"role": "assistant", "content": "bye"}]
    conversations = [Conversation.from_dicts(m, f"d.jsonl:{i}")
                     for i, m in enumerate([short, reply_beyond_cutoff, truncated], 1)]
    cutoff = 64
    full = [render_example(tokenizer, c) for c in conversations]
    assert len(full[0].input_ids) <= cutoff < len(full[2].input_ids)

    examples, stats = render_dataset(tokenizer, conversations, "assistant", cutoff)
    assert (stats.read, stats.kept, stats.truncated, stats.dropped_cutoff) == (3, 2, 1, 1)
    assert stats.kept + stats.dropped_cutoff == stats.read == len(conversations)
    assert len(examples) == stats.kept
    assert examples[0] == full[0]
    assert examples[1].input_ids == full[2].input_ids[:cutoff] and examples[1].labels == full[2].labels[:cutoff]
    assert decoded_runs(tokenizer, examples[1]) == ["Hello!<|im_end|>"]  # the second reply was cut off
    assert "1 truncated" in stats.summary() and "1 dropped" in stats.summary()


# ---------------------------------------------------------------------------------------------- stopping


def test_end_of_turn_ids(tokenizer):
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    llama3 = llama3_tokenizer()
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    assert eot != llama3.unk_token_id
    assert end_of_turn_ids(llama3) == [eot]
