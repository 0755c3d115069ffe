"""Shared fixtures: a tiny tokenizer and tiny random Llama- / Qwen2-style models built from a config.

Tiny models use tests/assets/tiny_tokenizer (a real ~1k-token byte-level BPE with ChatML tokens and template, made
by tests/assets/make_tiny_tokenizer.py), so rendering and chat templates are real; the weights are small and random.
The bundled model (SmolLM2, converted once from its GGUF package into the lmforge cache) is for tests marked
`@pytest.mark.e2e` only, through the `bundled_model_dir` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TOKENIZER_DIR = str(Path(__file__).resolve().parent / "assets" / "tiny_tokenizer")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def bundled_model_dir() -> str:
    """The real bundled model (SmolLM2-135M-Instruct): for end-to-end tests marked `@pytest.mark.e2e`."""
    from lmforge.model.loader import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


def tiny_tokenizer():
    """A fresh copy of the tiny test tokenizer (ChatML, bos <|im_start|>, eos <|im_end|>, pad <|pad|>)."""
    from lmforge.model.loader import load_tokenizer

    return load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture
def tokenizer():
    """A fresh copy of the tiny test tokenizer, safe to modify."""
    return tiny_tokenizer()


def llama3_tokenizer(base_dir: str = TINY_TOKENIZER_DIR):
    from lmforge.model.loader import load_tokenizer

    tok = load_tokenizer(base_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    tok.eos_token = "<|eot_id|>"
    return tok


def qwen_tokenizer(base_dir: str = TINY_TOKENIZER_DIR):
    from lmforge.model.loader import load_tokenizer

    tok = load_tokenizer(base_dir)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def make_tiny_model(kind: str, tokenizer, out_dir: Path, seed: int = 0) -> str:
    """Build a tiny random model of `kind` for `tokenizer`, save both, return the dir: "llama", "qwen2",
    "qwen2-window" and "gemma3" (one layer sees a window of 8 tokens), or "granite" (an architecture lmforge serve's
    fast decoder does not run)."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "qwen2-window":  # its second layer sees a window of 8 tokens
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                                   layer_types=["sliding_attention", "full_attention"]))
    elif kind == "granite":
        model = GraniteForCausalLM(GraniteConfig(**common, embedding_multiplier=2.0, logits_scaling=4.0))
    else:
        raise ValueError(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-CPU machine oversubscribed threads cost ~10x.
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny Llama built once per module (training never writes into the base model dir)."""
    return make_tiny_model("llama", tiny_tokenizer(), tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """One tiny Llama for the whole session, never written to: a `model` for commands that only read it (inspect,
    token filters, listing)."""
    return make_tiny_model("llama", tiny_tokenizer(), tmp_path_factory.mktemp("shared") / "tiny-model")


@pytest.fixture
def tiny_llama(tmp_path, tokenizer) -> str:
    return make_tiny_model("llama", tokenizer, tmp_path / "tiny-llama")


@pytest.fixture
def tiny_qwen2(tmp_path) -> str:
    return make_tiny_model("qwen2", qwen_tokenizer(), tmp_path / "tiny-qwen2")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, records) → path of a JSONL file in tmp_path."""
    import json

    def write(name: str, records: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        return path
    return write


def supervised_texts(tokenizer, example) -> list[str]:
    """The decoded text of each run of trained tokens of a rendered example (what the loss sees), in order."""
    from lmforge.data.render import IGNORE_INDEX

    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]
