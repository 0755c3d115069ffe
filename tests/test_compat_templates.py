"""LLaMA-Factory's template names: on a model without a chat template each gives the text LLaMA-Factory's template of
that name gives (written out here from its formatter slots), trains each reply plus its end-of-turn, and prompts
inference with exactly the training tokens; on a model with its own template, the model's own wins with a note."""

from __future__ import annotations

import pytest
from conftest import supervised_texts, tiny_tokenizer

from lmforge.conversation import Conversation
from lmforge.data.render import IGNORE_INDEX, ensure_chat_template, render_example, render_prompt, render_text
from lmforge.data.templates import LLAMAFACTORY_TEMPLATES, TEMPLATE_TOKENS
from lmforge.errors import ConfigError

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
CHATML = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
          "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n")
LLAMA3 = ("<bos><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
          "\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
          "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>")
# name → (the whole conversation's text, the trained text of each reply)
EXPECTED = {
    "llama3": (LLAMA3, ["A1<|eot_id|>", "A2<|eot_id|>"]),
    "llama2": ("<bos>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST]A1<eos><bos>[INST] U2 [/INST]A2<eos>",
               ["A1<eos>", "A2<eos>"]),
    "qwen": (CHATML, ["A1<|im_end|>", "A2<|im_end|>"]),
    "qwen3": (CHATML, ["A1<|im_end|>", "A2<|im_end|>"]),
    "qwen3_nothink": (CHATML, ["A1<|im_end|>", "A2<|im_end|>"]),
    "mistral": ("<bos>[INST] S\n\nU1[/INST] A1<eos>[INST] U2[/INST] A2<eos>", [" A1<eos>", " A2<eos>"]),
    "gemma": ("<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
              ["A1<end_of_turn>", "A2<end_of_turn>"]),
    "glm4": ("[gMASK]<sop><|system|>\nS<|user|>\nU1<|assistant|>\nA1<eos><|user|>\nU2<|assistant|>\nA2<eos>",
             ["A1<eos>", "A2<eos>"]),
    "alpaca": ("S\n\n### Instruction:\nU1\n\n### Response:\nA1<eos>\n\n### Instruction:\nU2\n\n### Response:\n"
               "A2<eos>\n\n", ["A1<eos>", "A2<eos>"]),
    "default": ("System: S<eos>\nHuman: U1<eos>\nAssistant:A1<eos>\nHuman: U2<eos>\nAssistant:A2<eos>\n",
                ["A1<eos>", "A2<eos>"]),
    "empty": ("SU1A1U2A2", ["A1", "A2"]),
}


def base_tokenizer():
    """The tiny byte-level tokenizer with every template's special tokens, its own <bos>/<eos>, and no template."""
    tok = tiny_tokenizer()
    specials = sorted({t for tokens in TEMPLATE_TOKENS.values() for t in tokens} - set(tok.get_vocab()))
    tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": specials})
    tok.chat_template = None
    return tok


def test_every_llamafactory_name_is_in_the_table():
    assert set(EXPECTED) == set(LLAMAFACTORY_TEMPLATES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_template_on_a_base_model_renders_as_llamafactory(name):
    tokenizer = base_tokenizer()
    note = ensure_chat_template(tokenizer, name)
    assert name in note and "no chat template" in note
    text, trained = EXPECTED[name]
    messages = MESSAGES[1:] if name == "qwen" else MESSAGES  # qwen's default system prompt, when there is none
    expected_text = QWEN_SYSTEM + text[len("<|im_start|>system\nS<|im_end|>\n"):] if name == "qwen" else text
    assert render_text(tokenizer, messages) == expected_text
    example = render_example(tokenizer, Conversation.from_dicts(messages, "t.jsonl:1"))
    assert supervised_texts(tokenizer, example) == trained
    # inference prompts with exactly the tokens training saw before each reply
    for k in (len(messages) - 3, len(messages) - 1):
        prompt = render_prompt(tokenizer, messages[:k])
        assert example.input_ids[:len(prompt)] == prompt
        assert example.labels[len(prompt) - 1] == IGNORE_INDEX and example.labels[len(prompt)] != IGNORE_INDEX


def test_the_models_own_template_wins_with_a_note():
    tokenizer = tiny_tokenizer()  # ChatML, with a default system prompt
    own = tokenizer.chat_template
    note = ensure_chat_template(tokenizer, "llama3")
    assert tokenizer.chat_template == own
    assert "'llama3' ignored" in note and "renders conversations differently" in note
    note = ensure_chat_template(tokenizer, "qwen3")  # ChatML too: the same text for a conversation with a system
    assert tokenizer.chat_template == own and "renders the same" in note


def test_a_template_whose_tokens_the_vocabulary_lacks_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError) as err:
        ensure_chat_template(tokenizer, "gemma")
    assert "<start_of_turn>" in str(err.value) and "alpaca" in str(err.value)
    with pytest.raises(ConfigError) as err:
        ensure_chat_template(tokenizer, "llama5")
    assert "llama3" in str(err.value) and "glm4" in str(err.value)
