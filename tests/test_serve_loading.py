"""What `lmforge serve` loads and how it runs it: a run is served with the weights chat and export would use (the
best checkpoint when a sweep named one); every fine-tuning method's run is served — LoRA as rows beside the base,
other mergeable methods merged into the base, virtual tokens and bottleneck adapters through the model's own
forward — and the served greedy tokens equal generate.py's decode loop, alone and with concurrent requests; an
adapter that cannot share the base is refused with what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from serve_helpers import vivid_tiny_model
from test_eval import train_run
from test_serve_engine import _run

from lmforge.data.render import render_prompt
from lmforge.errors import ModelError, UserError
from lmforge.generate import SamplingParams, generate_tokens, load_for_inference
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.rundir import RunDir
from lmforge.serve.decoder import Decoder
from lmforge.serve.engine import Sampling, Submission
from lmforge.serve.loading import _resolve_target, build_engine
from lmforge.serve.model_decoder import ModelDecoder
from lmforge.serve.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["What colour is item 3?", "Is item 1 green?", "Describe item 2."]
REPLY_TOKENS = 6


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir):
    return train_run(tmp_path_factory.mktemp("serve-run"), llama_dir, "lora", max_steps=8, save_steps=4)


@pytest.fixture(scope="module")
def vivid_llama(tmp_path_factory, bundled_model_dir) -> str:
    """The tiny Llama with std-0.3 weights: greedy replies depend on the prompt and on what the method learned."""
    return vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path_factory.mktemp("vivid") / "llama")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vivid_llama):
    """method → a run of it on the vivid Llama (4 steps, a checkpoint every 2), trained once per module."""
    runs = {}

    def run(method: str):
        if method not in runs:
            runs[method] = train_run(tmp_path_factory.mktemp(method), vivid_llama, method, max_steps=4, save_steps=2)
        return runs[method]
    return run


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def chat_tokens(model, prompts: list[list[int]]) -> list[list[int]]:
    """What generate.py's decode loop (chat, eval) answers to each prompt alone, greedy, REPLY_TOKENS tokens."""
    params = SamplingParams(max_new_tokens=REPLY_TOKENS)
    return [[step[0] for step in generate_tokens(model, [prompt], [], params)] for prompt in prompts]


def greedy(prompt: list[int], n: int = 1) -> Submission:
    return Submission(prompt, 0, [Sampling(max_tokens=REPLY_TOKENS)] * n, frozenset())


def served_equals_chat(engine, run_dir, checkpoint: str | None = None) -> list[list[int]]:
    """Assert the engine's greedy tokens equal the decode loop's on the same run: one request alone, then three at
    once (one with n=2, sharing the chat template's prompt prefix with the others); return the decode loop's."""
    model, tokenizer = load_for_inference(run_dir=str(run_dir), dtype="float32", checkpoint=checkpoint,
                                          announce=False)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = chat_tokens(model, prompts)
    assert all(len(tokens) == REPLY_TOKENS for tokens in expected)
    engine.start()
    try:
        assert _run(engine, [greedy(prompts[0])]) == [[expected[0]]]
        together = _run(engine, [greedy(prompts[0]), greedy(prompts[1], n=2), greedy(prompts[2])])
        assert together == [[expected[0]], [expected[1]] * 2, [expected[2]]]
        assert engine.reused_prompt_tokens > 0  # slots were copied (virtual tokens included) and continued
    finally:
        engine.stop()
    return expected


# ------------------------------------------------------------------------------------------- which weights


def test_a_run_is_served_with_its_best_checkpoint(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    assert _resolve_target(str(run), None).lora == RunDir(run).adapter  # no best.json: the final adapter
    (run / "best.json").write_text(json.dumps({"label": "step-4", "weights": "checkpoints/step-4", "step": 4,
                                               "metric": "rouge-l", "value": 50.0}))
    capsys.readouterr()
    target = _resolve_target(str(run), None)
    assert "using best checkpoint step-4 (rouge-l 50)" in capsys.readouterr().err
    served, final = adapter_tensors(target.lora), adapter_tensors(RunDir(run).adapter)
    checkpoint = load_file(str(run / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert served.keys() == final.keys() and target.name == "run"
    assert any(not torch.equal(served[k], final[k]) for k in served)  # step 4 is not the final weights …
    for key, value in served.items():  # … it is the checkpoint's tensors
        match = [v for k, v in checkpoint.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value)


def test_a_lora_run_is_served_beside_its_base_with_more_lora_adapters(lora_run, capsys):
    engine = build_engine(str(lora_run), None, {"again": str(lora_run / "adapter")}, ServeSettings(max_concurrent=2))
    assert isinstance(engine.decoder, Decoder) and "note:" not in capsys.readouterr().err
    assert {name: model.adapter for name, model in engine.models.items()} == {"tiny-llama": 0, "run": 1, "again": 2}


# ------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method, merged", [("prefix", False), ("prompt", False), ("ptuning", False),
                                            ("adapter", False), ("loha", True), ("ia3", True), ("dora", True)])
def test_every_method_is_served_as_chat_decodes_it(method, merged, trained, vivid_llama, capsys):
    run = trained(method)
    capsys.readouterr()
    engine = build_engine(str(run), None, {}, ServeSettings(max_concurrent=4))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert list(engine.models) == ["run"]  # the plain base is not served beside it, and one line says so
    assert len(notes) == 1 and "the plain base llama is not served beside it" in notes[0]
    if merged:
        assert "merged into the base weights" in notes[0] and isinstance(engine.decoder, Decoder)
    else:
        assert "the model's own forward (slower, no cross-request batching)" in notes[0]
        assert isinstance(engine.decoder, ModelDecoder)
    expected = served_equals_chat(engine, run)
    base = load_model(vivid_llama, torch.float32).eval()
    tokenizer = load_tokenizer(vivid_llama)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert chat_tokens(base, prompts) != expected  # the method changed the replies, so serving it is what is tested


def test_a_prefix_runs_best_checkpoint_and_a_bottleneck_adapter_dir_are_served(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained("prefix"), run)
    (run / "best.json").write_text(json.dumps({"label": "step-2", "weights": "checkpoints/step-2", "step": 2}))
    capsys.readouterr()
    engine = build_engine(str(run), None, {}, ServeSettings(max_concurrent=3))
    assert "using best checkpoint step-2" in capsys.readouterr().err
    served_equals_chat(engine, run, checkpoint="step-2")

    adapter = trained("adapter") / "adapter"  # `lmforge serve ADAPTER_DIR`: served under the dir's name
    engine = build_engine(str(adapter), None, {}, ServeSettings(max_concurrent=3))
    assert list(engine.models) == ["adapter"] and isinstance(engine.decoder, ModelDecoder)


def test_gemma3_runs_on_the_fast_decoder_with_lora_adapters_per_request(tmp_path_factory, bundled_model_dir, capsys):
    """Gemma 3 (the second bundled model; here a tiny one whose first layer sees a window of 8 tokens, shorter than
    the prompts): a LoRA run on it is served beside its base, token for token as chat decodes it."""
    gemma = vivid_tiny_model("gemma3", load_tokenizer(bundled_model_dir), tmp_path_factory.mktemp("gemma") / "g3")
    run = train_run(tmp_path_factory.mktemp("gemma-run"), gemma, "lora", max_steps=4)
    engine = build_engine(str(run), None, {}, ServeSettings(max_concurrent=4))
    assert isinstance(engine.decoder, Decoder) and list(engine.models) == ["g3", "run"]
    assert engine.decoder.max_len > 8  # the window is applied per layer, not taken as the context length
    served_equals_chat(engine, run)


def test_an_architecture_the_fast_decoder_does_not_run_is_served_through_its_own_forward(tmp_path_factory,
                                                                                         bundled_model_dir, capsys):
    """Granite (llama-like, with multipliers the fast decoder does not apply): a LoRA run on it is merged and served
    alone through the model's own forward, token for token as chat decodes it; a per-request --adapter beside it is
    refused with what to do."""
    granite = vivid_tiny_model("granite", load_tokenizer(bundled_model_dir), tmp_path_factory.mktemp("granite") / "g")
    run = train_run(tmp_path_factory.mktemp("granite-run"), granite, "lora", max_steps=4)
    capsys.readouterr()
    engine = build_engine(str(run), None, {}, ServeSettings(max_concurrent=4))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert isinstance(engine.decoder, ModelDecoder) and list(engine.models) == ["run"]
    assert "this granite model is served through its own forward" in notes[-1]
    served_equals_chat(engine, run)
    with pytest.raises(UserError, match="per-request LoRA adapters need lmforge's fast decoder"):
        build_engine(None, granite, {"lora": str(run / "adapter")}, ServeSettings())


# ------------------------------------------------------------------------------------------- refusals


def test_an_adapter_that_cannot_share_the_base_is_refused_with_what_to_do(lora_run, trained):
    loha, prefix = trained("loha") / "adapter", trained("prefix") / "adapter"
    with pytest.raises(ModelError, match=r"adapter 'x' \(.*\) is a LOHA adapter, which cannot share the base.*"
                                         r"serve it on its own with `lmforge serve .*adapter`, or merge it into "
                                         r"its base with `lmforge export .*adapter -o OUT`"):
        build_engine(str(lora_run), None, {"x": str(loha)}, ServeSettings())
    with pytest.raises(ModelError, match=r"PREFIX_TUNING adapter.*serve it on its own with `lmforge serve "
                                         r"[^`]*adapter`$"):  # prefix tuning cannot be merged: no export advice
        build_engine(str(lora_run), None, {"x": str(prefix)}, ServeSettings())
    with pytest.raises(UserError, match=r"--adapter legal: run \(loha\) is served as a model of its own.*another "
                                        r"`lmforge serve`"):
        build_engine(str(trained("loha")), None, {"legal": str(lora_run / "adapter")}, ServeSettings())
