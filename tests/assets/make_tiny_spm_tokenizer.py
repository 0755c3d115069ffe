"""Builds tests/assets/tiny_spm_tokenizer/: a small SentencePiece-style tokenizer shaped like Gemma 3's.

Gemma's vocabulary, as lmforge holds it (the bundled gemma-3-270m is read from a GGUF by transformers), is a BPE with
byte fallback: spaces become ▁ (no prefix space), <pad> <eos> <bos> <unk> <mask> are ids 0-4, <start_of_turn> /
<end_of_turn> are control tokens, newline runs are user-defined tokens, runs of ▁ are ordinary tokens placed early,
the 256 byte tokens <0x00>..<0xFF> follow, then the learned pieces in the order they were learned; the merges are
rebuilt from that order, as transformers does for a Gemma GGUF. Here the pieces are learned (tokenizers' BPE trainer)
on the tiny tokenizer's corpus, ~700 tokens instead of 262k. The chat template is written for this file in Gemma 3's
instruction format (BOS, a system message folded into the first user turn, "model" as the assistant's role).

The files are committed; run this only to change the tokenizer (the output is deterministic):
    .venv/bin/python tests/assets/make_tiny_spm_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from make_tiny_tokenizer import CORPUS
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GemmaTokenizer
from transformers.tokenization_utils_base import generate_merges

OUT = Path(__file__).resolve().parent / "tiny_spm_tokenizer"
SPACE = "\u2581"
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
NEWLINES = ["\n", "\n\n", "\n\n\n"]  # user-defined: matched whole
SPACE_RUNS = [SPACE * n for n in (2, 3, 4, 8)]
BYTES = [f"<0x{byte:02X}>" for byte in range(256)]
LEARNED = 480

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def learned_pieces() -> list[str]:
    """Pieces in the order BPE learned them (alphabet first), words split before spaces as SentencePiece does."""
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.Replace(" ", SPACE)
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=LEARNED, show_progress=False, max_token_length=12)
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    trainer_model.train_from_iterator(lines, trainer)
    by_id = sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])
    return [piece for piece, _ in by_id]


def build() -> GemmaTokenizer:
    fixed = CONTROL + NEWLINES + SPACE_RUNS + BYTES
    vocab = {token: index for index, token in enumerate(fixed)}
    for piece in learned_pieces():
        vocab.setdefault(piece, len(vocab))
    positions = {token: -index for token, index in vocab.items()}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, positions), add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.add_tokens(NEWLINES)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def main() -> None:
    tokenizer = build()
    tokenizer.save_pretrained(str(OUT))
    print(f"{OUT}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
