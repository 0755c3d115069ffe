"""The training loop on tiny random models: loss falls, the right parameters change, the run dir is complete and
reloads to the same logits, gradient accumulation equals one big batch, resume equals an uninterrupted run,
checkpoints are atomic, validation runs, and decoding is greedy-deterministic and stops where it should."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file

import lmforge.train.loop as train_module
from lmforge.config import Config, load_config
from lmforge.conversation import Conversation
from lmforge.data.render import end_of_turn_ids, render_example, render_prompt
from lmforge.errors import ConfigError
from lmforge.generate import SamplingParams, load_for_inference, replies, reply
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.rundir import STATE_FILE, RunDir, complete_checkpoints, resolve_resume
from lmforge.train.batching import DataOrder
from lmforge.train.loop import train

PROMPT = [{"role": "user", "content": "What is 3 plus 3?"}]


pytestmark = pytest.mark.usefixtures("one_thread")



def conversations(n: int) -> list[dict]:
    """Short conversations whose replies differ in length, so per-micro-batch token counts differ."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " + " ".join(words[:i % 8])}]}
            for i in range(n)]


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_config(model_dir: str, data: Path, out: Path, method: dict | None = None, data_extra: dict | None = None,
                **train_fields) -> Config:
    return Config.model_validate({
        "name": out.name, "model": {"name_or_path": model_dir}, "method": method or {},
        "data": {"train": [str(data)], **(data_extra or {})},
        "train": {"output_dir": str(out), "batch_size": 4, "logging_steps": 1, **train_fields}})


def with_train(config: Config, **fields) -> Config:
    return config.model_copy(update={"train": config.train.model_copy(update=fields)})


def records(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]


def observe(monkeypatch) -> dict:
    """Wrap lmforge.train.loop's own apply_method/save_artifact (the real ones still run) to see the model it trains:
    its parameters right after the method is applied, and the in-memory model at the end."""
    seen: dict = {}
    real_apply, real_save = train_module.apply_method, train_module.save_artifact

    def apply_method(model, method):
        model = real_apply(model, method)
        seen["initial"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return model

    def save_artifact(run, model, tokenizer, method, **extra):
        seen["model"] = model
        return real_save(run, model, tokenizer, method, **extra)

    monkeypatch.setattr(train_module, "apply_method", apply_method)
    monkeypatch.setattr(train_module, "save_artifact", save_artifact)
    return seen


def changed_params(initial: dict[str, torch.Tensor], model) -> dict[str, bool]:
    final = dict(model.named_parameters())
    assert set(final) == set(initial)
    return {name: not torch.equal(initial[name], final[name].detach()) for name in final}


@torch.no_grad()
def logits_of(model, tokenizer, messages=PROMPT) -> torch.Tensor:
    model.eval()
    return model(input_ids=torch.tensor([render_prompt(tokenizer, messages)])).logits[0]


# ---------------------------------------------------------------------------------------------- LoRA, one 30-step run


@pytest.fixture(scope="module")
def lora_run(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = write_records(root / "train.jsonl", conversations(8))
    config = make_config(llama_dir, data, root / "run", max_steps=30, batch_size=2, learning_rate=1e-2,
                         lr_scheduler_type="constant")
    with pytest.MonkeyPatch.context() as mp:
        seen = observe(mp)
        run = train(config)
    return SimpleNamespace(run=run, config=config, **seen)


def test_lora_loss_falls(lora_run):
    losses = [r["loss"] for r in records(lora_run.run)]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses


def test_lora_changes_only_lora_params(lora_run):
    changed = changed_params(lora_run.initial, lora_run.model)
    lora = [name for name in changed if "lora_" in name]
    # rank-8 A and B for every linear layer of both decoder layers (q, k, v, o, gate, up, down)
    assert len(lora) == 2 * 7 * 2
    assert all(changed[name] for name in lora), [n for n in lora if not changed[n]]
    assert not any(changed[name] for name in changed if "lora_" not in name), \
        [n for n in changed if changed[n] and "lora_" not in n]
    trainable = {name for name, p in lora_run.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora)


def test_lora_run_dir_is_complete(lora_run):
    run = lora_run.run
    for path in (run.config, run.metrics, run.loss_plot, run.data_report, run.adapter):
        assert path.exists(), path
    assert run.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # config.yaml is the resolved config and loads back to the same thing (the resume hint relies on it)
    assert load_config(run.config).model_dump() == lora_run.config.model_dump()
    report = json.loads(run.data_report.read_text())
    assert report["train"]["read"] == report["train"]["kept"] == 8
    assert sum(report["datasets"].values()) == 8
    assert 0 < report["train_supervised_tokens"] < report["train_tokens"]


def test_lora_metrics_records(lora_run):
    logged = records(lora_run.run)
    assert [r["step"] for r in logged] == list(range(1, 31))
    for r in logged:
        assert {"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["learning_rate"] == pytest.approx(1e-2)  # constant schedule
        assert r["epoch"] == pytest.approx(r["step"] / 4)  # 8 examples, batch 2 → 4 steps per epoch
        assert r["tokens_per_s"] > 0


def test_lora_adapter_reloads_to_the_same_logits(lora_run, llama_dir):
    run = lora_run.run
    tokenizer = load_tokenizer(llama_dir)
    expected = logits_of(lora_run.model, tokenizer)

    base_logits = logits_of(load_model(llama_dir, torch.float32), tokenizer)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters, so equality below means something

    with_peft = PeftModel.from_pretrained(load_model(llama_dir, torch.float32), str(run.adapter))
    torch.testing.assert_close(logits_of(with_peft, tokenizer), expected, atol=1e-5, rtol=0)

    model, loaded_tokenizer = load_for_inference(run_dir=str(run.root))
    torch.testing.assert_close(logits_of(model, loaded_tokenizer), expected, atol=1e-5, rtol=0)


def test_lora_adapter_carries_the_tokenizer_and_chat_template(lora_run, llama_dir):
    adapter = lora_run.run.adapter
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    saved, original = load_tokenizer(str(adapter)), load_tokenizer(llama_dir)
    assert saved.chat_template and saved.chat_template == original.chat_template
    assert render_prompt(saved, PROMPT) == render_prompt(original, PROMPT)


# ---------------------------------------------------------------------------------------------- full and freeze


def test_full_changes_every_param_and_model_dir_reloads(llama_dir, tmp_path, monkeypatch):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    seen = observe(monkeypatch)
    run = train(make_config(llama_dir, data, tmp_path / "run", method={"type": "full"}, max_steps=3,
                            learning_rate=1e-3))
    changed = changed_params(seen["initial"], seen["model"])
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert not run.adapter.exists() and (run.model / "config.json").is_file()

    tokenizer = load_tokenizer(llama_dir)
    model, loaded_tokenizer = load_for_inference(run_dir=str(run.root))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    torch.testing.assert_close(logits_of(model, loaded_tokenizer), logits_of(seen["model"], tokenizer),
                               atol=1e-5, rtol=0)


def test_freeze_changes_only_the_last_decoder_layer(llama_dir, tmp_path, monkeypatch):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    seen = observe(monkeypatch)
    run = train(make_config(llama_dir, data, tmp_path / "run",
                            method={"type": "freeze", "freeze_trainable_layers": 1}, max_steps=3, learning_rate=1e-3))
    changed = changed_params(seen["initial"], seen["model"])
    last_layer = {name for name in changed if name.startswith("model.layers.1.")}
    assert len(last_layer) == 9  # q, k, v, o, gate, up, down + 2 norms
    assert {name for name, c in changed.items() if c} == last_layer

    tokenizer = load_tokenizer(llama_dir)
    model, loaded_tokenizer = load_for_inference(run_dir=str(run.root))
    torch.testing.assert_close(logits_of(model, loaded_tokenizer), logits_of(seen["model"], tokenizer),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- accumulation, resume


def test_gradient_accumulation_equals_one_big_batch(llama_dir, tmp_path):
    # 10 examples: steps of 4, 4, 2 in epoch 0, then a fresh shuffle; micro-batches of 2 must group the same examples
    big, accumulated = DataOrder(10, 4, 1, seed=42), DataOrder(10, 2, 2, seed=42)
    assert big.steps_per_epoch == accumulated.steps_per_epoch == 3
    for step in range(6):
        assert [i for mb in big.step(step) for i in mb] == [i for mb in accumulated.step(step) for i in mb]
        assert all(len(mb) <= 2 for mb in accumulated.step(step))
    assert len(big.step(2)[0]) == 2  # the short last step of an epoch

    data = write_records(tmp_path / "train.jsonl", conversations(10))
    method = {"lora_dropout": 0.0}
    run_a = train(make_config(llama_dir, data, tmp_path / "a", method=method, max_steps=4, learning_rate=1e-2,
                              batch_size=4, gradient_accumulation_steps=1))
    run_b = train(make_config(llama_dir, data, tmp_path / "b", method=method, max_steps=4, learning_rate=1e-2,
                              batch_size=2, gradient_accumulation_steps=2))
    a, b = records(run_a), records(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=2e-4)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=2e-4)
        assert ra["epoch"] == rb["epoch"]
    weights_a = load_file(str(run_a.adapter / "adapter_model.safetensors"))
    weights_b = load_file(str(run_b.adapter / "adapter_model.safetensors"))
    assert set(weights_a) == set(weights_b)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-5, rtol=0, msg=name)


def stop_at(step: int):
    return lambda record: record["step"] == step


def test_resume_equals_uninterrupted_run(llama_dir, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", conversations(12))
    method = {"lora_dropout": 0.1}  # dropout draws random numbers: resume must restore the RNG
    full = train(make_config(llama_dir, data, tmp_path / "a", method=method, max_steps=6, save_steps=3,
                             learning_rate=1e-2))
    expected = records(full)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]

    config = make_config(llama_dir, data, tmp_path / "b", method=method, max_steps=6, save_steps=3,
                         learning_rate=1e-2)
    stopped = train(config, callback=stop_at(3))
    assert "stopped at step 3/6" in capsys.readouterr().out
    assert not stopped.adapter.exists() and not stopped.model.exists()
    assert [p.name for p in complete_checkpoints(stopped)] == ["step-3"]
    assert [r["step"] for r in records(stopped)] == [1, 2, 3]

    resumed = train(with_train(config, resume_from_checkpoint="latest"))
    assert f"resumed from {stopped.checkpoints / 'step-3'} at step 3" in capsys.readouterr().out
    got = records(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for r_got, r_expected in zip(got, expected):
        assert r_got["loss"] == pytest.approx(r_expected["loss"], abs=1e-4), (r_got, r_expected)
        assert r_got["learning_rate"] == pytest.approx(r_expected["learning_rate"])
    weights = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    expected_weights = load_file(str(full.adapter / "adapter_model.safetensors"))
    assert set(weights) == set(expected_weights)
    for name in weights:
        torch.testing.assert_close(weights[name], expected_weights[name], atol=1e-6, rtol=0, msg=name)


def test_resume_ignores_and_cleans_incomplete_checkpoints(llama_dir, tmp_path, capsys):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    config = make_config(llama_dir, data, tmp_path / "run", max_steps=4, save_steps=2, learning_rate=1e-2)
    run = train(config, callback=stop_at(2))
    step2 = run.checkpoints / "step-2"
    assert (step2 / STATE_FILE).is_file()

    # A save killed before its rename (even with every file written) and a step dir missing its state file.
    crashed = run.checkpoints / ".tmp-step-9-123"
    shutil.copytree(step2, crashed)
    (crashed / STATE_FILE).write_text(json.dumps({"step": 9}))
    incomplete = run.checkpoints / "step-7"
    incomplete.mkdir()
    save_file({"garbage": torch.zeros(1)}, str(incomplete / "trainable.safetensors"))

    assert resolve_resume(run, "latest") == step2
    assert [p.name for p in complete_checkpoints(run)] == ["step-2"]
    resumed = train(with_train(config, resume_from_checkpoint="latest"))
    assert f"resumed from {step2} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in records(resumed)] == [1, 2, 3, 4]
    assert resumed.adapter.is_dir()
    assert not crashed.exists()
    assert [p.name for p in complete_checkpoints(run)] == ["step-2", "step-4"]


def test_resume_latest_without_checkpoint_is_a_config_error(llama_dir, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(4))
    config = make_config(llama_dir, data, tmp_path / "run", max_steps=1, resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(config)


def test_save_total_limit_keeps_the_newest(llama_dir, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    run = train(make_config(llama_dir, data, tmp_path / "run", max_steps=5, save_steps=1, save_total_limit=2))
    kept = sorted(p.name for p in run.checkpoints.iterdir())
    assert kept == ["step-4", "step-5"]
    for name, step in (("step-4", 4), ("step-5", 5)):
        assert json.loads((run.checkpoints / name / STATE_FILE).read_text())["step"] == step


# ---------------------------------------------------------------------------------------------- validation, output dir


def test_val_size_holds_out_data_and_logs_eval_loss(llama_dir, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(15))
    run = train(make_config(llama_dir, data, tmp_path / "run", data_extra={"val_size": 0.2}, max_steps=4,
                            eval_steps=2))
    report = json.loads(run.data_report.read_text())
    assert report["train"]["kept"] == 12 and report["val"]["kept"] == 3
    evals = [r for r in records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in evals)
    assert all("loss" in r for r in records(run))  # eval merges into the step's train record


def test_separate_val_file_and_eval_loss_is_token_mean_cross_entropy(llama_dir, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    val_records = [{"messages": [{"role": "user", "content": "Name a colour."},
                                 {"role": "assistant", "content": "Blue, like the sky."}]},
                   {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hi."},
                                 {"role": "assistant", "content": "Hi."}]}]
    val = write_records(tmp_path / "val.jsonl", val_records)
    run = train(make_config(llama_dir, data, tmp_path / "run", data_extra={"val": [str(val)]}, max_steps=2,
                            eval_steps=1))
    report = json.loads(run.data_report.read_text())
    assert report["train"]["kept"] == 8 and report["val"]["kept"] == 2
    evals = [r for r in records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]

    # The final eval_loss is the mean cross-entropy over the val set's supervised tokens, computed here with the
    # reloaded adapter and plain logits (no packing).
    model, tokenizer = load_for_inference(run_dir=str(run.root))
    total, count = 0.0, 0
    with torch.no_grad():
        for record in val_records:
            example = render_example(tokenizer, Conversation.from_dicts(record["messages"]))
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, abs=1e-3)


def test_existing_run_needs_overwrite_or_resume(llama_dir, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(4))
    config = make_config(llama_dir, data, tmp_path / "run", max_steps=1, save_steps=1)
    run = train(config)
    with pytest.raises(ConfigError, match="already holds a run") as err:
        train(config)
    assert "overwrite_output_dir" in str(err.value) and "resume_from_checkpoint=latest" in str(err.value)
    assert run.adapter.is_dir()  # the refused run left the old one alone

    (run.checkpoints / "step-99").mkdir()
    train(with_train(config, overwrite_output_dir=True, save_steps=None))
    assert not run.checkpoints.exists()  # overwrite starts clean: no stale checkpoints to resume from later
    assert [r["step"] for r in records(run)] == [1]


# ---------------------------------------------------------------------------------------------- qwen2, generation


def test_lora_on_tiny_qwen2(tiny_qwen2, tmp_path):
    data = write_records(tmp_path / "train.jsonl", conversations(8))
    run = train(make_config(tiny_qwen2, data, tmp_path / "run", max_steps=2, learning_rate=1e-2))
    assert [r["step"] for r in records(run)] == [1, 2]
    model, tokenizer = load_for_inference(run_dir=str(run.root))
    assert "<|im_start|>" in tokenizer.chat_template
    assert isinstance(reply(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=3)), str)


@pytest.fixture(scope="module")
def base_model(llama_dir):
    return load_for_inference(model=llama_dir)


@torch.no_grad()
def transformers_greedy(model, tokenizer, max_new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy generate, stopping at the same end-of-turn tokens."""
    prompt_ids = render_prompt(tokenizer, PROMPT)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_reply_is_a_string_and_stops_at_max_new_tokens(base_model):
    model, tokenizer = base_model
    reference = transformers_greedy(model, tokenizer, 5)
    assert len(reference) == 5 and not set(reference) & set(end_of_turn_ids(tokenizer))  # max_new_tokens is the stop
    text = reply(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=5))
    assert isinstance(text, str) and text
    assert text == tokenizer.decode(reference, skip_special_tokens=True)
    assert reply(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=2)) == \
        tokenizer.decode(reference[:2], skip_special_tokens=True)


def test_greedy_decoding_is_deterministic_and_matches_transformers(base_model):
    model, tokenizer = base_model
    params = SamplingParams(max_new_tokens=12)
    text = reply(model, tokenizer, PROMPT, params)
    assert text == reply(model, tokenizer, PROMPT, params)
    assert text == tokenizer.decode(transformers_greedy(model, tokenizer, 12), skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_the_seed_and_temperature_matter(base_model):
    model, tokenizer = base_model

    def sampled(seed: int) -> str:
        return reply(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed))

    texts = [sampled(seed) for seed in (7, 8, 9)]
    assert sampled(7) == texts[0]  # the same seed, the same text
    assert len(set(texts)) == 3, texts  # other seeds, other texts: the seed is used
    greedy = reply(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=8))
    assert greedy not in texts  # temperature 1 samples rather than taking the most likely token


def test_batched_replies_equal_one_by_one(tmp_path, tokenizer):
    """replies() decodes several prompts of different lengths together (left padding, prompts stopping at different
    steps) and gives each the same text as reply() alone."""
    path = make_tiny_model("llama", tokenizer, tmp_path / "tiny")
    model, tok = load_for_inference(model=path)
    conversations = [[{"role": "user", "content": text}] for text in
                     ("Hi", "Tell me a long story about a dragon and a knight", "2+2?", "你好，请介绍一下你自己")]
    params = SamplingParams(max_new_tokens=9)
    one_by_one = [reply(model, tok, c, params) for c in conversations]
    assert replies(model, tok, conversations, params, batch_size=3) == one_by_one
