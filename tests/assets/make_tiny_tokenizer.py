"""Builds tests/assets/tiny_tokenizer/: the small tokenizer the tiny-model tests use instead of the bundled model's.

A byte-level BPE (the kind SmolLM2, Llama 3 and Qwen2 use) trained here on a few paragraphs written for it, with
ChatML's special tokens and a ChatML chat template that adds a default system prompt (as SmolLM2's does). Every
byte is in the base alphabet, so any text — Chinese, emoji — encodes (as byte tokens where no merge applies) and
decodes back exactly. ~1k tokens instead of 49k keeps tiny models' embeddings small.

The files are committed; run this only to change the tokenizer (the output is deterministic):
    .venv/bin/python tests/assets/make_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0-3

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a small test assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Written for this tokenizer: chat turns, plain prose, a little code and Chinese, so common words merge.
CORPUS = """\
system
user
assistant
You are a small test assistant. Answer the question and keep the reply short.
Hello! How can I help you today? Hi there. Sure, here is the answer you asked for.
Can you help me write a short note to my neighbour about the noise on Friday evening?
Of course. Dear neighbour, the music on Friday was louder than usual; could you turn it down after ten? Thanks!
The quick brown fox jumps over the lazy dog while the small cat watches from the window.
A model reads tokens, predicts the next token, and learns from the difference between its guess and the text.
Training on the replies only means the prompt tokens carry no loss; the answer tokens and the end of turn do.
What is the capital of France? The capital of France is Paris. What is two plus three? Two plus three is five.
Please translate this sentence into English. Please summarise the following paragraph in one line.
Write a haiku about autumn rain. Leaves fall on the path / the rain keeps its quiet time / a lamp in the hall.
The weather is good today, so we will walk to the park and then read a book at home in the afternoon.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 42 100 2024 3.14 -1 1e-3 50% $20
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 1))

class Counter:
    def __init__(self):
        self.count = 0
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
instruction input output conversations from value human gpt chosen rejected label true false
你好，世界！我是一个乐于助人的助手。今天天气很好，我们去公园散步吧。
请把这句话翻译成英文。这个问题的答案是什么？谢谢你的帮助。
中文 英文 数据 模型 训练 回答 问题 用户 助手 系统
"""


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS, CORPUS.replace("\n", "\n\n")], trainer)  # newline runs merge too
    return tokenizer


def main() -> None:
    OUT.mkdir(exist_ok=True)
    tokenizer = build()
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    print(f"{OUT}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
