"""`lmforge export` on runs trained here for a few steps (tiny random Llama / Qwen2 models, the tiny test tokenizer):
merged logits equal base+adapter logits and differ from the base; shards, tokenizer, generation_config and manifest
are what a user relies on; the GGUF file reads back with transformers' own GGUF loader to the same logits and tokens;
the Modelfile TEMPLATE renders the same prompt as the chat template; bad input is refused clearly; a killed export
leaves nothing that looks complete."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import torch
from conftest import make_tiny_model, qwen_tokenizer, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from lmforge.cli import main
from lmforge.config import Config
from lmforge.conversation import Conversation
from lmforge.data.render import (
    end_of_turn_ids,
    render_example,
    render_prompt,
    render_text,
)
from lmforge.export.modelfile import (
    ollama_prompt,
    read_modelfile,
)
from lmforge.export.pipeline import ExportRequest, export
from lmforge.generate import load_for_inference
from lmforge.model.loader import load_model, load_tokenizer, sha256_of
from lmforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_TURNS = [{"role": "user", "content": "租金每月多少？"}, {"role": "assistant", "content": "每月 1,200 元。"},
             {"role": "user", "content": "When is it due?"}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]


def train_tiny_run(kind: str, tokenizer, root: Path) -> Path:
    """A LoRA run of a few steps at a high learning rate, so the adapter visibly changes the model."""
    base = make_tiny_model(kind, tokenizer, root / "base")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(12)), encoding="utf-8")
    config = Config.model_validate({
        "name": "run", "model": {"name_or_path": base}, "method": {"type": "lora", "lora_rank": 4},
        "data": {"train": [str(data)]},
        "train": {"output_dir": str(root / "run"), "batch_size": 4, "max_steps": 3, "learning_rate": 5e-2,
                  "logging_steps": 1, "save_steps": 2}})
    assert train(config).finished
    return root / "run"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    return train_tiny_run("llama", tiny_tokenizer(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_export(llama_run, tmp_path_factory) -> Path:
    """The llama run merged, in shards of 200 kB (the tiny model has ~0.9 MB in float32), with an f16 GGUF and a
    Modelfile."""
    out = tmp_path_factory.mktemp("exports") / "llama"
    export(ExportRequest(source=str(llama_run), output=str(out), gguf="f16", shard_size_gb=0.0002))
    return out


@pytest.fixture(scope="module")
def qwen2_export(tmp_path_factory) -> tuple[Path, Path]:
    """A Qwen2 run (chat template with a default system prompt) exported as bfloat16 safetensors + q8_0 GGUF."""
    run = train_tiny_run("qwen2", qwen_tokenizer(), tmp_path_factory.mktemp("qwen2"))
    out = tmp_path_factory.mktemp("exports") / "qwen2"
    export(ExportRequest(source=str(run), output=str(out), gguf="q8_0", dtype="bfloat16"))
    return run, out


@torch.inference_mode()
def logits(model, tokenizer, messages) -> torch.Tensor:
    return model(input_ids=torch.tensor([render_prompt(tokenizer, messages)])).logits[0].float()


def relative_rms(expected: torch.Tensor, got: torch.Tensor) -> float:
    return math.sqrt(float(((expected - got) ** 2).sum()) / float((expected ** 2).sum()))


# ---------------------------------------------------------------------------------------------- merged safetensors


def test_merged_logits_equal_base_plus_adapter_and_differ_from_base(llama_run, llama_export):
    trained, tokenizer = load_for_inference(str(llama_run), dtype="float32", checkpoint="final")
    merged = load_model(str(llama_export), torch.float32).eval()
    config = json.loads((llama_run / "adapter" / "adapter_config.json").read_text())
    base = load_model(config["base_model_name_or_path"], torch.float32).eval()
    for messages in (TWO_TURNS, WITH_SYSTEM):
        expected = logits(trained, tokenizer, messages)
        assert torch.allclose(logits(merged, tokenizer, messages), expected, atol=1e-4, rtol=1e-4)
        assert (logits(base, tokenizer, messages) - expected).abs().max() > 0.1  # the adapter is in there


def test_merged_dir_is_sharded_with_training_tokenizer_and_generation_config(llama_run, llama_export):
    index = json.loads((llama_export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((llama_export / shard).is_file() for shard in shards)
    trained = load_tokenizer(str(llama_run / "adapter"))
    exported = load_tokenizer(str(llama_export))
    assert exported.chat_template == trained.chat_template
    example = Conversation.from_dicts([*TWO_TURNS, {"role": "assistant", "content": "On the 1st."}])
    assert render_example(exported, example) == render_example(trained, example)
    generation = json.loads((llama_export / "generation_config.json").read_text())
    assert set(end_of_turn_ids(trained)) <= set(generation["eos_token_id"])


def test_manifest_records_origin_data_hash_and_checks(llama_run, llama_export):
    manifest = json.loads((llama_export / "manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["run"]["weights"] == "final" and manifest["run"]["step"] == 3
    data_file = llama_run.parent / "data.jsonl"
    assert manifest["data"]["files"][0]["sha256"] == sha256_of(data_file)
    checks = manifest["verification"]
    assert checks["merged_vs_adapter"]["relative_rms"] < 1e-4 < checks["adapter_vs_base"]["relative_rms"]
    assert manifest["data_report"]["train"]["kept"] == 12
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(llama_export / name)


# ---------------------------------------------------------------------------------------------- GGUF round trip


def read_back_gguf(directory: Path, name: str, scratch: Path):
    """Model and tokenizer from the GGUF file alone (a dir holding only it: beside the export's config.json and
    tokenizer.json, transformers would read those instead)."""
    scratch.mkdir()
    os.link(directory / name, scratch / name)
    model = AutoModelForCausalLM.from_pretrained(str(scratch), gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    return model, AutoTokenizer.from_pretrained(str(scratch), gguf_file=name)


# q8_0 on the tiny random Qwen2 (hidden 64, flat logits) measures ~6e-2 relative RMS; on the bundled model it is
# 2.1e-2 (export/checks.py; the e2e test below holds the real model to the exporter's 5e-2).
@pytest.mark.parametrize("which, gguf_name, tolerance", [("llama", "model-f16.gguf", 1e-2),
                                                         ("qwen2", "model-q8_0.gguf", 8e-2)])
def test_gguf_reads_back_with_transformers_to_the_same_logits_and_tokens(which, gguf_name, tolerance, request,
                                                                         tmp_path):
    if which == "llama":
        run, out = request.getfixturevalue("llama_run"), request.getfixturevalue("llama_export")
    else:
        run, out = request.getfixturevalue("qwen2_export")
    trained, tokenizer = load_for_inference(str(run), dtype="float32", checkpoint="final")
    model, gguf_tokenizer = read_back_gguf(out, gguf_name, tmp_path / "gguf")
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[which]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    for messages in (TWO_TURNS, WITH_SYSTEM):
        assert render_prompt(gguf_tokenizer, messages) == render_prompt(tokenizer, messages)
        expected = logits(trained, tokenizer, messages)
        got = logits(model, tokenizer, messages)
        assert relative_rms(expected, got) < tolerance
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("which, gguf_name, tolerance", [("llama", "model-f16.gguf", 1e-2),
                                                         ("qwen2", "model-q8_0.gguf", 5e-2)])
def test_gguf_runs_in_llama_cpp_to_the_same_logits(which, gguf_name, tolerance, request):
    """The consumer users export for: llama.cpp itself (what Ollama runs) loads the file, tokenizes the rendered
    prompt to the same ids, computes the trained model's logits, and carries the training chat template."""
    from llama_cpp import Llama

    if which == "llama":
        run, out = request.getfixturevalue("llama_run"), request.getfixturevalue("llama_export")
    else:
        run, out = request.getfixturevalue("qwen2_export")
    trained, tokenizer = load_for_inference(str(run), dtype="float32", checkpoint="final")
    llm = Llama(model_path=str(out / gguf_name), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    for messages in (TWO_TURNS, WITH_SYSTEM):
        ids = render_prompt(tokenizer, messages)
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = torch.tensor(llm.scores[:len(ids)])
        expected = logits(trained, tokenizer, messages)
        assert relative_rms(expected, got) < tolerance
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_qwen2_export_casts_safetensors_to_the_requested_dtype(qwen2_export):
    run, out = qwen2_export
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["gguf"]["type"] == "q8_0"
    assert 0 < manifest["verification"]["exported_vs_trained"]["relative_rms"] < 3e-2


# ---------------------------------------------------------------------------------------------- Ollama Modelfile


def go_to_jinja(template: str) -> jinja2.Template:
    """An independent reading of the Go-template subset Ollama templates use, by translating it into Jinja:
    range over .Messages, if / else if / else / end, eq .Role "x", .Content, .Role, .System, trim markers."""
    out, stack = [], []
    for piece in re.split(r"(\{\{-?.*?-?\}\})", template, flags=re.DOTALL):
        match = re.fullmatch(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", piece, flags=re.DOTALL)
        if not match:
            out.append(piece.replace("{", "{{ '{' }}") if "{" in piece else piece)
            continue
        left, action, right = match.group(1), match.group(2), match.group(3)
        action = re.sub(r'eq \$?\.(\w+) "([^"]*)"', lambda m: f'dot.{m.group(1).lower()} == "{m.group(2)}"', action)
        action = re.sub(r"\$?\.System", "system", action)
        if action.startswith("range"):
            stack.append("for")
            tag = "for dot in messages"
        elif action.startswith("if "):
            stack.append("if")
            tag = f"if {action[3:]}"
        elif action.startswith("else if "):
            tag = f"elif {action[8:]}"
        elif action == "else":
            tag = "else"
        elif action == "end":
            tag = f"end{stack.pop()}"
        else:
            out.append(f"{{{{{left} dot.{action.lstrip('.').lower()} {right}}}}}")
            continue
        out.append(f"{{%{left} {tag} {right}%}}")
    return jinja2.Environment(keep_trailing_newline=True).from_string("".join(out))


def as_ollama_would(modelfile: dict, messages: list[dict]) -> str:
    """Ollama's chat: SYSTEM as a leading system message when the chat has none; .System = the system texts."""
    if modelfile.get("system") and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile["system"]}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return go_to_jinja(modelfile["template"]).render(messages=messages, system=system)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_modelfile_template_renders_the_chat_templates_prompt(which, request):
    out = request.getfixturevalue("llama_export") if which == "llama" else request.getfixturevalue("qwen2_export")[1]
    modelfile = read_modelfile((out / "Modelfile").read_text())
    tokenizer = load_tokenizer(str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert modelfile["from"] == f"./{manifest['gguf']['file']}"
    bos = tokenizer.bos_token if manifest["gguf"]["add_bos_token"] else ""
    for messages in (TWO_TURNS, WITH_SYSTEM):
        expected = render_text(tokenizer, messages, add_generation_prompt=True)
        assert bos + as_ollama_would(modelfile, messages) == expected
    stops = [value for name, value in modelfile["parameters"] if name == "stop"]
    assert '"<|im_end|>"' in stops  # the end-of-turn token of this chat template
    if which == "qwen2":  # the template's default system prompt is carried as SYSTEM
        assert modelfile["system"] == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_ollama_prompt_follows_go_template_semantics():
    """lmforge's own renderer (used in every export's check) on a LLaMA-Factory-style Llama 3 template with trim
    markers, .System and else branches, against the text Go's text/template gives."""
    template = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n{{- end }}'
                '{{- range .Messages }}{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n'
                '{{ .Content }}<|eot_id|>{{ else if eq .Role "assistant" }}<|start_header_id|>assistant'
                '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant'
                '<|end_header_id|>\n\n')
    expected = ("<|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nagain\n\nplease<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}, {"role": "user", "content": "please"}]
    assert ollama_prompt(template, "Be nice.", messages) == expected  # consecutive user turns merge, as in Ollama


# ---------------------------------------------------------------------------------------------- other sources


def test_adapter_only_export_reloads_to_the_trained_model(llama_run, tmp_path):
    out = tmp_path / "adapter"
    manifest = export(ExportRequest(source=str(llama_run), output=str(out), adapter_only=True))
    assert manifest["format"] == "adapter" and not (out / "model.safetensors").exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    trained, tokenizer = load_for_inference(str(llama_run), dtype="float32", checkpoint="final")
    reloaded, reloaded_tokenizer = load_for_inference(model=base, adapter=str(out), dtype="float32")
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(logits(reloaded, tokenizer, TWO_TURNS), logits(trained, tokenizer, TWO_TURNS))


def test_a_checkpoint_exports_the_weights_chat_loads_for_it(llama_run, tmp_path):
    out = tmp_path / "step-2"
    manifest = export(ExportRequest(source=str(llama_run), output=str(out), checkpoint="step-2"))
    assert manifest["run"]["weights"] == "step-2" and manifest["run"]["step"] == 2
    checkpoint, tokenizer = load_for_inference(str(llama_run), dtype="float32", checkpoint="step-2")
    final, _ = load_for_inference(str(llama_run), dtype="float32", checkpoint="final")
    merged = load_model(str(out), torch.float32).eval()
    expected = logits(checkpoint, tokenizer, TWO_TURNS)
    assert torch.allclose(logits(merged, tokenizer, TWO_TURNS), expected, atol=1e-4, rtol=1e-4)
    assert (logits(final, tokenizer, TWO_TURNS) - expected).abs().max() > 1e-3  # step 2 is not the final step 3


def test_llamafactory_export_yaml_merges_and_overwrite_replaces(llama_run, tmp_path, capsys):
    base = json.loads((llama_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = tmp_path / "lf-export"
    config = tmp_path / "merge.yaml"
    config.write_text(f"model_name_or_path: {base}\nadapter_name_or_path: {llama_run}\ntemplate: llama3\n"
                      f"finetuning_type: lora\nexport_dir: {out}\nexport_size: 1\nexport_device: cpu\n"
                      f"export_legacy_format: false\n", encoding="utf-8")
    assert main(["export", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "template 'llama3' ignored" in printed and "merged == base+adapter" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_size_gb"] == 1 and manifest["verification"]["merged_vs_adapter"]["relative_rms"] < 1e-4
    first = manifest["created"], (out / "manifest.json").stat().st_mtime_ns

    assert main(["export", str(config)]) == 2  # OUT is not empty now
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(config), "--overwrite"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns != first[1]
    assert not list(tmp_path.glob(".lf-export.*"))  # no temp or old dirs left beside it


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals_are_clear_and_leave_nothing_behind(llama_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((llama_run / "config.yaml").read_text())
    assert main(["export", str(unfinished), "-o", str(tmp_path / "a")]) == 2
    assert "has no trained adapter/ or model/" in capsys.readouterr().err

    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main(["export", str(llama_run), "-o", str(occupied)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (occupied / "keep.txt").read_text() == "mine"

    assert main(["export", str(llama_run), "-o", str(llama_run), "--overwrite"]) == 2
    assert "own source" in capsys.readouterr().err

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = tmp_path / "tiny-gemma3"
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Gemma3ForCausalLM(config).save_pretrained(gemma)
    tiny_tokenizer().save_pretrained(gemma)
    assert main(["export", str(gemma), "-o", str(tmp_path / "g"), "--gguf", "q8_0"]) == 2
    error = capsys.readouterr().err
    assert "query_pre_attn_scalar 256 with head_dim 16" in error  # a Gemma 3 llama.cpp would run differently

    prefix_run = tmp_path / "prefix-run"  # a run whose method adds virtual tokens: nothing to merge into weights
    shutil.copytree(llama_run / "adapter", prefix_run / "adapter")
    (prefix_run / "config.yaml").write_text((llama_run / "config.yaml").read_text().replace("type: lora",
                                                                                          "type: prefix"))
    assert main(["export", str(prefix_run), "-o", str(tmp_path / "p")]) == 2
    assert "cannot be merged into plain weights" in capsys.readouterr().err

    assert main(["export", str(llama_run), "-o", str(tmp_path / "b"), "--adapter-only", "--gguf", "f16"]) == 2
    assert "--gguf needs merged weights" in capsys.readouterr().err
    assert not any(p.name.startswith((".a.", ".b.", ".g.", ".p.")) for p in tmp_path.iterdir())


def test_a_killed_export_leaves_no_output_dir_and_the_next_one_cleans_up(llama_run, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lmforge", "export", str(llama_run), "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "export.log"
    with log.open("w") as stream:
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        started, deadline = time.monotonic(), time.monotonic() + 300
        while not list(tmp_path.glob(".killed.tmp-*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.005)  # the staged dir lives ~1 s on the tiny model: a fine poll cannot miss it
        process.send_signal(signal.SIGKILL)
        returncode = process.wait()
    assert list(tmp_path.glob(".killed.tmp-*")), (
        f"the export never started writing (exit code {returncode} after {time.monotonic() - started:.1f} s; "
        f"-9 = killed by the test at its deadline); its output:\n{log.read_text()[-3000:]}")
    assert not out.exists()  # nothing at OUT that a user could mistake for an export

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".killed.tmp-*"))


# ---------------------------------------------------------------------------------------------- the bundled model


@pytest.mark.e2e
def test_bundled_model_run_exports_to_a_gguf_that_reads_back(tmp_path, bundled_model_dir):
    """SmolLM2 itself came from a Q4_1 GGUF; a LoRA run on it goes back out as q8_0 GGUF with its template."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"租客 {i} 号问：押金什么时候退？"},
        {"role": "assistant", "content": "退租交房验收后七日内退还押金。"}]}, ensure_ascii=False) + "\n"
        for i in range(8)), encoding="utf-8")
    config = Config.model_validate({
        "name": "bundled", "model": {"name_or_path": "smollm2-135m-instruct"},
        "method": {"type": "lora", "lora_rank": 8, "lora_target": ["q_proj", "v_proj"]},
        "data": {"train": [str(data)]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3}})
    run = train(config).root
    out = tmp_path / "export"
    manifest = export(ExportRequest(source=str(run), output=str(out), gguf="q8_0"))
    assert manifest["gguf"]["architecture"] == "llama" and manifest["base_model"]["name"] == "smollm2-135m-instruct"
    assert manifest["modelfile"]["written"]
    assert "SmolLM" in read_modelfile((out / "Modelfile").read_text())["system"]

    trained, tokenizer = load_for_inference(str(run), dtype="float32", checkpoint="final")
    model, gguf_tokenizer = read_back_gguf(out, "model-q8_0.gguf", tmp_path / "gguf")
    assert render_prompt(gguf_tokenizer, WITH_SYSTEM) == render_prompt(tokenizer, WITH_SYSTEM)
    expected, got = logits(trained, tokenizer, WITH_SYSTEM), logits(model, tokenizer, WITH_SYSTEM)
    assert relative_rms(expected, got) < 5e-2
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
