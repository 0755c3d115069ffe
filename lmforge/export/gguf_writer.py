"""GGUF writer: a merged transformers model + its tokenizer → one .gguf file (f32, f16 or q8_0) for llama.cpp / Ollama.

Owns the transformers → GGUF mapping for the architectures we can write (Llama, Qwen2, Gemma 3): llama.cpp's metadata
keys, tensor names (from the `gguf` package's own name map), llama.cpp's Q/K row order for Llama, Gemma's norm weights
stored as 1 + weight, and the vocabulary in llama.cpp's form for it: byte-level BPE with its merges (`gpt2`), or a
SentencePiece vocabulary with scores and token types (`llama`, Gemma); special ids and the training chat template.
Refuses anything else by name, and what llama.cpp would compute differently from transformers (it hard-codes some
of Gemma 3's settings).
Must not merge adapters, verify results or know about run dirs (export.py does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch

from ..data.render import end_of_turn_ids
from ..errors import ModelError

GGUF_TYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture in the file
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's Llama kernels expect Q/K rows interleaved per head (its convert_hf_to_gguf permute)
    vocabulary: str = "bpe"  # the tokenizer kind llama.cpp reads for it: "bpe" (byte-level, gpt2) or "spm" (llama)
    norm_shift: float = 0.0  # added to every norm weight: Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w


# transformers model_type → how to write it. All read back with transformers' GGUF loader and run in llama.cpp.
ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "gemma3_text": GGUFArchitecture("gemma3", gguf.MODEL_ARCH.GEMMA3, permute_qk=False, vocabulary="spm",
                                    norm_shift=1.0),
}
# What llama.cpp's gemma3 graph hard-codes (llama-model.cpp) and transformers' GGUF reader assumes (Gemma3TextConfig
# defaults): every 6th layer global, the others sliding; local RoPE base 10000; attention scaled by 1/sqrt(head_dim),
# where the reader takes query_pre_attn_scalar 256; GELU (tanh); no soft-capping, no RoPE scaling (neither is read
# back). A Gemma 3 differing in any of these would run differently there, so it is refused.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
_GEMMA3_QUERY_SCALAR = 256

# llama.cpp names the BPE pre-tokenizer (`tokenizer.ggml.pre`) by hashing the ids of one check text, the way its
# convert_hf_to_gguf.py get_vocab_base_pre() does; these are the hashes for the tokenizers of the architectures above.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "  # noqa: E501 (llama.cpp's exact text)
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "  # noqa: E501 (llama.cpp's exact text)
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "  # noqa: E501 (llama.cpp's exact text)
    "'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def supported_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def check_architecture(model_type: str) -> GGUFArchitecture:
    if model_type not in ARCHITECTURES:
        raise ModelError(f"GGUF export does not support the {model_type!r} architecture yet; it writes: "
                         f"{supported_architectures()}. Export without --gguf (an HF model dir) and convert it with "
                         f"llama.cpp's convert_hf_to_gguf.py, or fine-tune a model of a supported architecture")
    return ARCHITECTURES[model_type]


def check_gguf_config(config) -> GGUFArchitecture:
    """The writer for a model of this transformers config, or a ModelError saying what cannot be written (the
    tokenizer aside: check_gguf_support checks both)."""
    architecture = check_architecture(getattr(config, "model_type", "?"))
    for rope_type in _rope_types(config):
        if rope_type != "default":
            raise ModelError(f"GGUF export writes plain RoPE only; this model uses rope_type {rope_type!r} "
                             f"(export without --gguf and convert with llama.cpp)")
    if architecture.arch == gguf.MODEL_ARCH.GEMMA3:
        _check_gemma3(config)
    return architecture


def check_gguf_support(model, tokenizer) -> GGUFArchitecture:
    """The writer for this model, or a ModelError saying what cannot be written and what can."""
    architecture = check_gguf_config(model.config)
    kind = vocabulary_kind(tokenizer)
    if kind != architecture.vocabulary:
        described = {"bpe": "a byte-level BPE", "spm": "a SentencePiece (BPE with byte fallback)"}
        raise ModelError(f"GGUF export writes {architecture.name} models with {described[architecture.vocabulary]} "
                         f"tokenizer only; this tokenizer is {described[kind]} one. Export without --gguf and "
                         f"convert with llama.cpp's convert_hf_to_gguf.py")
    if kind == "bpe":
        pre_tokenizer_name(tokenizer)  # raises for a tokenizer we cannot describe
    return architecture


def _rope_types(config) -> list[str]:
    """The rope_type of each RoPE the model uses (Gemma 3 keeps one per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        return ["default"]
    nested = [value for value in rope.values() if isinstance(value, dict)]
    return [part.get("rope_type", "default") for part in nested] if nested else [rope.get("rope_type", "default")]


def _check_gemma3(config) -> None:
    """Refuse a Gemma 3 whose settings llama.cpp (or transformers' reader, which verifies the file) would not honour."""
    head_dim = config.head_dim
    expected_layers = ["sliding_attention" if (i + 1) % _GEMMA3_SWA_PATTERN else "full_attention"
                       for i in range(config.num_hidden_layers)]
    rope = config.rope_parameters or {}
    local_theta = float((rope.get("sliding_attention") or {}).get("rope_theta", _GEMMA3_LOCAL_ROPE_THETA))
    problems = []
    if list(config.layer_types) != expected_layers:
        problems.append(f"layer_types {list(config.layer_types)} (llama.cpp makes every {_GEMMA3_SWA_PATTERN}th "
                        f"layer global, the others sliding)")
    if local_theta != _GEMMA3_LOCAL_ROPE_THETA:
        problems.append(f"a sliding-layer RoPE base of {local_theta:g} (llama.cpp uses {_GEMMA3_LOCAL_ROPE_THETA:g})")
    if config.query_pre_attn_scalar != head_dim or head_dim != _GEMMA3_QUERY_SCALAR:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} with head_dim {head_dim} (llama.cpp "
                        f"scales attention by 1/sqrt(head_dim); the GGUF reader that checks the file assumes "
                        f"{_GEMMA3_QUERY_SCALAR})")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            problems.append(f"{name} {getattr(config, name)} (not read back from a GGUF, so it cannot be checked)")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (an embedding model, not a causal LM)")
    if config.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"hidden_activation {config.hidden_activation!r} (llama.cpp uses GELU, tanh approximation)")
    if getattr(config, "attention_bias", False):
        problems.append("attention biases (llama.cpp's gemma3 has none)")
    if problems:
        raise ModelError("GGUF export cannot write this Gemma 3 as llama.cpp would run it: " + "; ".join(problems)
                         + ". Export without --gguf (an HF model dir)")


def vocabulary_kind(tokenizer) -> str:
    """"bpe" for a byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM), "spm" for a SentencePiece-style BPE with
    byte fallback (Gemma, Llama 2); a ModelError for anything else (Unigram, WordPiece, ...)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    pipeline = json.dumps([backend.get("pre_tokenizer"), backend.get("decoder")])
    if model["type"] == "BPE" and "ByteLevel" in pipeline:
        return "bpe"
    if model["type"] == "BPE" and model.get("byte_fallback"):
        return "spm"
    raise ModelError(f"GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) and SentencePiece BPE "
                     f"ones (Gemma); this tokenizer is a {model['type']} model"
                     f"{'' if model['type'] != 'BPE' else ' without byte-level pre-tokenization or byte fallback'}. "
                     f"Export without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE: by its check-text hash when the vocabulary is
    one llama.cpp knows, else by the split regex itself (e.g. a SmolLM vocabulary behind Qwen2's regex)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre_tokenizer = json.dumps(backend.get("pre_tokenizer"))
    if vocabulary_kind(tokenizer) != "bpe":
        raise ModelError("llama.cpp names pre-tokenizers of byte-level BPE vocabularies only; this tokenizer is a "
                         "SentencePiece one")
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[digest]
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    splits = re.findall(r'"Split", "pattern": \{"Regex": ("(?:[^"\\]|\\.)*")', pre_tokenizer)
    if len(splits) == 1:
        regex = json.loads(splits[0])
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():  # the names llama.cpp and transformers share
            if known == regex:
                return name
    elif not splits and '"use_regex": true' in pre_tokenizer:
        return "gpt-2"  # ByteLevel's own regex
    raise ModelError(f"GGUF export does not recognise this tokenizer's pre-tokenizer (llama.cpp check hash "
                     f"{digest[:16]}…, split {splits[0][:60] if splits else 'none'}); it writes the ones of "
                     f"Llama 3, Qwen2, SmolLM and GPT-2. Export without --gguf and convert with llama.cpp's "
                     f"convert_hf_to_gguf.py")


def write_gguf(model, tokenizer, path: Path, qtype: str, name: str) -> dict:
    """Write `model` (a plain transformers causal LM, float weights) and `tokenizer` to `path`; return a summary."""
    if qtype not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    architecture = check_gguf_support(model, tokenizer)
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if architecture.arch == gguf.MODEL_ARCH.GEMMA3:
        _add_gemma3_hyperparameters(writer, config)
    else:
        _add_hyperparameters(writer, config)
    if architecture.vocabulary == "spm":
        _add_sentencepiece_vocabulary(writer, tokenizer, config.vocab_size)
    else:
        _add_bpe_vocabulary(writer, tokenizer, config.vocab_size)
    with_bos = _add_special_tokens(writer, tokenizer)
    counts = _add_tensors(writer, model, architecture, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": architecture.name, "type": qtype, "tensors": counts, "add_bos_token": with_bos}


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _add_gemma3_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The keys llama.cpp's convert_hf_to_gguf.py writes for Gemma 3 (its Gemma3Model), and no others: the rest of
    the architecture (sliding pattern, local RoPE base, embedding scale) is hard-coded in llama.cpp."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if "sliding_attention" in config.layer_types:
        writer.add_sliding_window(config.sliding_window)
    writer.add_head_count_kv(config.num_key_value_heads)


def _rope_theta(config) -> float:
    """The RoPE base of the model's global (full-attention) layers."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _vocabulary_by_id(tokenizer, vocab_size: int) -> dict[int, str]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has only "
                         f"{vocab_size} rows (were tokens added without resizing the model?)")
    return {index: token for token, index in vocab.items()}


def _add_bpe_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE vocabulary in id order (padding ids the embedding has beyond it) and its merges."""
    by_id = _vocabulary_by_id(tokenizer, vocab_size)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPM_SPACE = "\u2581"  # ▁, SentencePiece's spelling of a space inside tokens


def _add_sentencepiece_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A SentencePiece vocabulary the way llama.cpp writes one (tokenizer model `llama`): every token in id order with
    a score and a type, no merges. llama.cpp's tokenizer merges the adjacent pair whose joined token scores highest,
    so a token's score is minus its id (a BPE vocabulary lists tokens in the order their merges were learned, and
    transformers' reader rebuilds the merges from that same order); byte tokens score 0; control and user-defined
    tokens -1000, with ▁ in user-defined ones written as the spaces llama.cpp matches them by (its
    convert_hf_to_gguf.py does the same for Gemma, whose runs of spaces are user-defined tokens)."""
    by_id = _vocabulary_by_id(tokenizer, vocab_size)
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        elif index in added and added[index].special:
            tokens.append(token)
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL)
        elif index in added or (len(token) > 1 and set(token) == {_SPM_SPACE}):
            tokens.append(token.replace(_SPM_SPACE, " "))
            scores.append(-1000.0)
            types.append(gguf.TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(token):
            tokens.append(token)
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            scores.append(-float(index))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)  # Gemma's normalizer turns spaces into ▁ without prepending one
    writer.add_add_sep_token(False)


def _add_special_tokens(writer: gguf.GGUFWriter, tokenizer) -> bool:
    """Special ids, the chat template with its end-of-turn token, and whether llama.cpp adds BOS / EOS."""
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template:
        turn_end = [i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_token_id]
        if turn_end:  # llama.cpp stops generation at end-of-turn as well as at end-of-sequence
            writer.add_eot_token_id(turn_end[0])
        writer.add_chat_template(template)
    with_bos = bos_added(tokenizer)
    writer.add_add_bos_token(with_bos)
    writer.add_add_eos_token(False)  # a prompt never ends with EOS; training never saw one there
    return with_bos


def bos_added(tokenizer) -> bool:
    """Whether llama.cpp should put BOS before a prompt (`add_bos_token`), the convention Ollama's templates assume.

    Training tokenised the chat template's text as written, with no special tokens added. So: yes when the tokenizer
    adds BOS to plain text and the template's text starts with it (the Ollama TEMPLATE then leaves it out); no when
    either is false, so llama.cpp never adds a BOS the training prompts did not have."""
    ids = tokenizer("x")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        return False
    if not isinstance(tokenizer.chat_template, str):
        return True
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return text.startswith(tokenizer.bos_token)


def _add_tensors(writer: gguf.GGUFWriter, model, architecture: GGUFArchitecture, qtype: str) -> dict[str, int]:
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # llama.cpp reuses token_embd when output.weight is absent
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} of {architecture.name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if architecture.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute_rows(data, heads)
        elif architecture.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _permute_rows(data, kv_heads)
        if architecture.norm_shift and gguf_name.endswith("norm.weight"):
            data = data + np.float32(architecture.norm_shift)
        stored = _store(writer, gguf_name, data, qtype)
        counts[stored] = counts.get(stored, 0) + 1
    return counts


def _permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF keeps each head's rotary halves apart ([x0..x31, y0..y31]); llama.cpp wants them interleaved in pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _store(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: str) -> str:
    """Norms and biases stay float32 (as llama.cpp writes them); matrices take the requested type. A matrix whose
    rows do not split into 32-value q8_0 blocks is written as f16 instead."""
    if data.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return "F32"
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "Q8_0"
    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    return "F16"
