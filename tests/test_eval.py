"""`lmforge eval` on tiny random models: per-reference losses equal a one-example-at-a-time computation, predictions
equal one-by-one decoding in the test set's order, eval.json's figures are the means of predictions.jsonl's, a
checkpoint loads to the same model as the final adapter, the checkpoint sweep picks the checkpoint with the best
metric and chat / eval then use it, and bad input is a clear message with exit code 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.config import Config
from lmforge.data.render import IGNORE_INDEX, render_example
from lmforge.errors import DataError, UserError
from lmforge.eval.evaluate import (
    EvalOptions,
    evaluate_model,
    load_test_set,
    pick_best,
    reference_losses,
    selection_metric,
    sweep_checkpoints,
    write_eval,
)
from lmforge.generate import SamplingParams, load_for_inference, replies, reply
from lmforge.model.lean_decoder import bfloat16_kernels
from lmforge.rundir import RunDir, _prune, choose_weights
from lmforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "black"]


def qa(question: str, answer: str, history: list[dict] = ()) -> dict:
    return {"messages": [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def train_records() -> list[dict]:
    return [qa(f"What colour is item {i}?", f"Item {i} is {COLOURS[i % 4]}.") for i in range(8)]


def sample_records() -> list[dict]:
    return [qa("What colour is item 3?", "Item 3 is black."),
            qa("物品五是什么颜色？", "物品五是绿色的。"),
            qa("And item 6?", "Item 6 is blue.", [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello! Ask me about items."}]),
            qa("Is item 1 green?", "Yes."),
            qa("Describe item 2 in one long sentence, please, with every detail you know.", "Item 2 is blue.")]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir) -> Path:
    """LoRA on the tiny Llama, 12 steps at a high learning rate, a checkpoint every 4 steps: each checkpoint answers
    differently."""
    return train_run(tmp_path_factory.mktemp("eval"), llama_dir, "lora", max_steps=12, save_steps=4)


def train_run(root: Path, model_dir: str, method: str, **fields) -> Path:
    data = write_jsonl(root / "train.jsonl", train_records())
    config = Config.model_validate({
        "model": {"name_or_path": model_dir}, "method": {"type": method}, "data": {"train": [str(data)]},
        "train": {"output_dir": str(root / "run"), "batch_size": 4, "learning_rate": 1e-2,
                  "lr_scheduler_type": "constant", "logging_steps": 4, **fields}})
    train(config)
    return root / "run"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# ------------------------------------------------------------------------------------------------- test sets


def test_test_set_splits_prompt_and_reference(tmp_path):
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])
    third = test.items[2]
    assert third.reference == "Item 6 is blue."
    assert third.prompt == sample_records()[2]["messages"][:-1]
    assert third.source.endswith("t.jsonl:3")


def test_test_set_that_ends_with_a_user_message_names_file_and_line(tmp_path):
    records = [qa("a?", "b."), {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "and c?"}]}]
    with pytest.raises(DataError, match=r"t\.jsonl:2: the last message is 'user'.*reference"):
        load_test_set([str(write_jsonl(tmp_path / "t.jsonl", records))])


def test_test_set_without_answers_says_what_eval_needs(tmp_path):
    records = [{"messages": [{"role": "user", "content": "What is your name?"}]}]
    with pytest.raises(DataError, match=r"(?s)q\.jsonl:1.*no assistant message.*reference answer"):
        load_test_set([str(write_jsonl(tmp_path / "q.jsonl", records))])


# --------------------------------------------------------------------------------------------- one model


def naive_losses(model, tokenizer, test) -> list[tuple[float, int]]:
    """Each reference's summed loss from the model's full logits, one example at a time."""
    out = []
    for item in test.items:
        example = render_example(tokenizer, item.conversation, "last_assistant")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        targets = torch.tensor(example.labels[1:])
        keep = targets != IGNORE_INDEX
        out.append((float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")),
                    int(keep.sum())))
    return out


def test_reference_losses_equal_one_example_at_a_time(tmp_path, llama_dir):
    model, tokenizer = load_for_inference(model=llama_dir)
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])
    packed = reference_losses(model, tokenizer, test.items, EvalOptions(batch_size=3))
    for (total, tokens), (expected_total, expected_tokens) in zip(packed, naive_losses(model, tokenizer, test)):
        assert tokens == expected_tokens
        assert total == pytest.approx(expected_total, rel=1e-4)


def test_reference_losses_compute_as_training_would_except_in_exact_mode(tmp_path, llama_dir):
    """The loss pass takes training's precision for this CPU and model (bf16 autocast where bf16 is fast: the bundled
    model's loss pass ~1.7x faster on an AVX512_BF16 CPU), float32 under --decode-dtype float32, and eval.json says
    which; bf16 losses stay within bf16's rounding of float32's."""
    from lmforge.eval.evaluate import loss_precision
    from lmforge.model.precision import Precision, training_precision

    model, tokenizer = load_for_inference(model=llama_dir)
    exact = loss_precision(model, EvalOptions(params=SamplingParams(decode_dtype="float32")))
    assert exact.autocast is None
    auto = loss_precision(model, EvalOptions(params=SamplingParams(decode_dtype="auto")))
    assert auto.autocast == training_precision("auto", model.config, announce=False).autocast
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])
    fp32 = reference_losses(model, tokenizer, test.items, EvalOptions(batch_size=3), exact)
    bf16 = reference_losses(model, tokenizer, test.items, EvalOptions(batch_size=3),
                            Precision(torch.float32, torch.bfloat16, "bf16 autocast, forced for the test"))
    for (total, tokens), (total_bf16, tokens_bf16) in zip(fp32, bf16):
        assert tokens == tokens_bf16 and total_bf16 == pytest.approx(total, rel=2e-2)
    result = evaluate_model(model, tokenizer, test, EvalOptions(params=SamplingParams(max_new_tokens=2)))
    assert result.info["loss_precision"]["name"] == auto.name


def test_the_loss_line_says_why_on_a_cpu_and_on_a_gpu():
    from lmforge.eval.evaluate import _loss_line
    from lmforge.model.precision import CpuCapability, GemmProbe, choose_cpu_training, choose_gpu_training

    bf16_cpu = CpuCapability("Some CPU", frozenset({"avx512_bf16"}))
    cpu = choose_cpu_training("auto", bf16_cpu, 576, lambda: GemmProbe((256, 576, 1536), 100.0, 250.0))
    line = _loss_line(cpu)
    assert "because Some CPU has avx512_bf16" in line and "optimizer" not in line
    gpu = _loss_line(choose_gpu_training("auto", True))
    assert "on the GPU" in gpu and "because" not in gpu
    assert _loss_line(choose_cpu_training("float32", bf16_cpu, 576, lambda: None)).startswith("loss in float32")


def test_eval_of_a_model_writes_every_example_in_order(tmp_path, llama_dir):
    model, tokenizer = load_for_inference(model=llama_dir)
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])
    params = SamplingParams(max_new_tokens=6)
    result = evaluate_model(model, tokenizer, test, EvalOptions(params=params, batch_size=2))
    write_eval(result, tmp_path / "out")

    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [line["reference"] for line in lines] == [r["messages"][-1]["content"] for r in sample_records()]
    assert [line["prompt"] for line in lines] == [r["messages"][:-1] for r in sample_records()]
    # batched and length-sorted decoding gives each prompt the answer it gets alone
    assert [line["prediction"] for line in lines] == [reply(model, tokenizer, item.prompt, params).strip()
                                                      for item in test.items]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    metrics = report["metrics"]
    for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"):
        assert metrics[name] == pytest.approx(sum(line["scores"][name] for line in lines) / len(lines), abs=1e-3)
    losses = naive_losses(model, tokenizer, test)
    expected = sum(t for t, _ in losses) / sum(n for _, n in losses)
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-3)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-3)
    assert report["examples"] == 5 and report["choices"] is None  # free-text answers: no choice accuracy
    assert "choice_accuracy" not in metrics


def test_classification_set_reports_choice_accuracy(tmp_path, llama_dir):
    model, tokenizer = load_for_inference(model=llama_dir)
    records = [qa(f"Review {i}: is it good?", label) for i, label in enumerate(["正面", "负面", "正面", "负面"])]
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", records))])
    result = evaluate_model(model, tokenizer, test, EvalOptions(params=SamplingParams(max_new_tokens=4)))
    assert result.info["choices"] == ["正面", "负面"]
    expected = [100.0 if r.get("choice") == r["reference"] else 0.0 for r in result.records]
    assert result.metrics["choice_accuracy"] == pytest.approx(sum(expected) / len(expected))


# ------------------------------------------------------------------------------------- checkpoints and sweep


def logits_of(loaded, text: str = "What colour is item 5?") -> torch.Tensor:
    model, tokenizer = loaded
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits


def test_last_checkpoint_loads_to_the_final_adapter(run_dir):
    final = logits_of(load_for_inference(str(run_dir), checkpoint="final", announce=False))
    last = logits_of(load_for_inference(str(run_dir), checkpoint="step-12", announce=False))
    first = logits_of(load_for_inference(str(run_dir), checkpoint="4", announce=False))
    assert torch.allclose(final, last, atol=1e-5)
    assert not torch.allclose(final, first, atol=1e-3)


@pytest.mark.parametrize("method", ["full", "ptuning", "qlora"])
def test_checkpoint_of_other_methods_loads_to_the_final_weights(tmp_path, llama_dir, method):
    """full (model/), P-tuning v2 (virtual tokens, padded rows) and QLoRA (a quantised base): the last checkpoint
    scores exactly what the final weights score, an earlier one does not."""
    run = train_run(tmp_path, llama_dir, method, max_steps=2, save_steps=1)
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])

    def loss(which: str) -> float:
        loaded = load_for_inference(str(run), checkpoint=which, announce=False)
        return evaluate_model(*loaded, test, EvalOptions(generate=False)).metrics["eval_loss"]
    final = loss("final")
    assert loss("step-2") == pytest.approx(final, abs=1e-4)
    assert loss("step-1") != pytest.approx(final, abs=1e-4)


def test_sweep_picks_the_checkpoint_with_the_best_metric(run_dir, tmp_path, capsys):
    """The test references are what step-8 answers, so step-8 scores ROUGE-L 100 and the others less: more steps
    is not better here (nor fewer), and the sweep must say so."""
    run = copy_run(run_dir, tmp_path)
    params = SamplingParams(max_new_tokens=12)  # long enough that the three checkpoints' answers differ
    prompts = [r["messages"][:-1] for r in sample_records()]
    step8 = load_for_inference(str(run), checkpoint="step-8", announce=False)
    answers = [text.strip() for text in replies(*step8, prompts, params)]
    test_file = write_jsonl(tmp_path / "test.jsonl",
                            [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers)])
    test = load_test_set([str(test_file)])

    result = sweep_checkpoints(str(run), test, EvalOptions(params=params, batch_size=2), metric="rouge-l")
    by_label = {p["label"]: p["metrics"]["rouge-l"] for p in result.points}
    assert list(by_label) == ["step-4", "step-8", "step-12"]  # step 12 is the final step: evaluated once
    assert by_label["step-8"] == 100.0 and max(by_label["step-4"], by_label["step-12"]) < 100.0
    best = json.loads((run / "best.json").read_text())
    assert (best["label"], best["weights"], best["step"], best["metric"], best["value"]) == (
        "step-8", "checkpoints/step-8", 8, "rouge-l", 100.0)
    # the run's eval.json now describes the best weights; every checkpoint keeps its own
    assert json.loads((run / "eval.json").read_text())["model"]["weights"] == "step-8"
    assert all((run / "evals" / label / "predictions.jsonl").is_file() for label in by_label)
    assert (run / "sweep.png").stat().st_size > 0

    capsys.readouterr()
    chosen = load_for_inference(str(run))  # what chat / serve do with a run dir
    assert "using best checkpoint step-8 (rouge-l 100)" in capsys.readouterr().err
    assert torch.allclose(logits_of(chosen), logits_of(step8))
    assert choose_weights(RunDir(run), "final").label == "final"  # the final weights stay reachable


def test_sweep_on_loss_picks_the_lowest_eval_loss(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    test = load_test_set([str(write_jsonl(tmp_path / "t.jsonl", sample_records()))])
    result = sweep_checkpoints(str(run), test, EvalOptions(generate=False))
    assert result.metric == "eval_loss"
    independent = {}
    for label in ("step-4", "step-8", "final"):
        model, tokenizer = load_for_inference(str(run), checkpoint=label, announce=False)
        independent[label] = evaluate_model(model, tokenizer, test, EvalOptions(generate=False)).metrics["eval_loss"]
    assert {p["label"]: p["metrics"]["eval_loss"] for p in result.points} == pytest.approx(
        {"step-4": independent["step-4"], "step-8": independent["step-8"], "step-12": independent["final"]}, abs=1e-3)
    expected = min(independent, key=independent.get)
    assert result.best["label"] == expected  # the final step's checkpoint is recorded as the final adapter


def test_pruning_keeps_the_best_checkpoint_and_overwrite_forgets_it(run_dir, tmp_path):
    run = RunDir(copy_run(run_dir, tmp_path))
    run.write_json(run.best_marker, {"label": "step-4", "weights": "checkpoints/step-4", "step": 4})
    _prune(run, keep=1)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-12", "step-4"]
    run.prepare(overwrite=True, resuming=False)
    assert not run.best_marker.exists()


def test_best_marker_naming_a_missing_checkpoint_falls_back_to_the_final(run_dir, tmp_path):
    run = RunDir(copy_run(run_dir, tmp_path))
    run.write_json(run.best_marker, {"label": "step-8", "weights": "checkpoints/step-8", "step": 8,
                                     "metric": "rouge-l", "value": 50})
    shutil.rmtree(run.checkpoints / "step-8")
    weights = choose_weights(run)
    assert weights.label == "final" and "which is gone" in weights.reason
    with pytest.raises(UserError, match="not a complete checkpoint any more"):
        choose_weights(run, "best")


# ------------------------------------------------------------------------------------------------ the CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_eval_of_a_run_end_to_end(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    test = write_jsonl(tmp_path / "test.jsonl", sample_records())
    code, out, err = run_cli(capsys, "eval", str(run), "--data", str(test), "--max-new-tokens", "5")
    assert code == 0, err
    assert "using final weights adapter/" in out and "rouge-l" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["model"]["weights"] == "final" and report["examples"] == 5
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 5

    code, out, err = run_cli(capsys, "eval", str(run), "--data", str(test), "--checkpoint", "step-4",
                             "--no-generate")
    assert code == 0, err
    assert set(json.loads((run / "evals" / "step-4" / "eval.json").read_text())["metrics"]) == {
        "eval_loss", "perplexity"}
    assert json.loads((run / "eval.json").read_text())["model"]["weights"] == "final"  # not overwritten


@pytest.mark.parametrize("make_args, expected", [
    (lambda d: [str(d / "empty"), "--data", str(d / "test.jsonl")], r"has no trained adapter/ or model/"),
    (lambda d: ["--model", "x", "--data", str(d / "test.jsonl")], r"-o OUT_DIR is needed with --model"),
    (lambda d: ["RUN", "--data", str(d / "bad.jsonl")], r"bad\.jsonl:1"),
    (lambda d: ["RUN", "--data", str(d / "test.jsonl"), "--checkpoint", "step-7"],
     r"'step-7' is not a checkpoint of .*step-4, step-8, step-12"),
    (lambda d: ["RUN", "--data", str(d / "test.jsonl"), "--metric", "rouge-l"], r"--metric .* --all-checkpoints"),
    (lambda d: ["RUN", "--data", str(d / "test.jsonl"), "--all-checkpoints", "--metric", "rouge"],
     r"--metric 'rouge' is not a metric"),
    (lambda d: ["RUN", "--data", str(d / "test.jsonl"), "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (lambda d: ["RUN", "--data", str(d / "test.jsonl"), "--cutoff-len", "3"], r"none of the 5 test references fits "
                                                                             r"within --cutoff-len=3"),
])
def test_cli_bad_input_is_exit_2_with_a_message(run_dir, tmp_path, capsys, make_args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("{}")
    write_jsonl(tmp_path / "test.jsonl", sample_records())
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "just text, no conversation"}])
    args = [str(run_dir) if a == "RUN" else a for a in make_args(tmp_path)]
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and err.startswith("error: ")
    assert __import__("re").search(expected, err), err


def test_cli_sweep_without_checkpoints_says_how_to_get_them(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    shutil.rmtree(run / "checkpoints")
    test = write_jsonl(tmp_path / "test.jsonl", sample_records())
    code, _, err = run_cli(capsys, "eval", str(run), "--data", str(test), "--all-checkpoints")
    assert code == 2 and "no checkpoints" in err and "train.save_steps" in err


def test_selection_metric_rules():
    generating, loss_only = EvalOptions(), EvalOptions(generate=False)
    assert selection_metric("auto", generating, has_choices=True) == "choice_accuracy"
    assert selection_metric("auto", generating, has_choices=False) == "rouge-l"
    assert selection_metric("auto", loss_only, has_choices=True) == "eval_loss"
    with pytest.raises(UserError, match="needs generation"):
        selection_metric("bleu-4", loss_only, has_choices=False)
    with pytest.raises(UserError, match="classification-style"):
        selection_metric("choice_accuracy", generating, has_choices=False)
    points = [{"label": "step-2", "step": 2, "metrics": {"eval_loss": 2.0, "rouge-l": 40.0}},
              {"label": "step-4", "step": 4, "metrics": {"eval_loss": 1.5, "rouge-l": 40.0}},
              {"label": "step-6", "step": 6, "metrics": {"eval_loss": 1.0, "rouge-l": 30.0}}]
    assert pick_best(points, "rouge-l")["label"] == "step-4"  # tie on ROUGE-L: the lower loss
    assert pick_best(points, "eval_loss")["label"] == "step-6"


# ------------------------------------------------------------------------------- the fast decoder behind eval/chat


def greedy_both_ways(model, tokenizer, steps: int = 12):
    """(fast decoder's tokens, the model's own forward's tokens) for the sample prompts as one batch."""
    from lmforge.data.render import end_of_turn_ids, render_prompt
    from lmforge.generate import generate_tokens, model_forward_tokens

    prompts = [render_prompt(tokenizer, r["messages"][:-1]) for r in sample_records()]
    params = SamplingParams(max_new_tokens=steps)
    stop = end_of_turn_ids(tokenizer)
    return list(generate_tokens(model, prompts, stop, params)), list(model_forward_tokens(model, prompts, stop, params))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_fast_decoder_replies_equal_the_models_own_forward(kind, tmp_path, tokenizer):
    """eval / compare / chat decode on the lean decoder (float32 weights): greedy tokens as the model's own forward
    gives them, batched prompts of different lengths included."""
    from conftest import make_tiny_model

    from lmforge.generate import lean_decoder

    model, tokenizer = load_for_inference(model=make_tiny_model(kind, tokenizer, tmp_path / kind))
    assert lean_decoder(model, 5, 64) is not None  # the fast path is the one taken
    fast, own = greedy_both_ways(model, tokenizer)
    assert fast == own and len(fast) == 12


def test_fast_decoder_applies_a_runs_lora_and_each_checkpoints(run_dir):
    from lmforge.generate import lean_decoder, load_run_base, load_trainable

    model, tokenizer = load_for_inference(str(run_dir))  # base + the trained LoRA adapter
    assert lean_decoder(model, 5, 64)[1] == 1  # LoRA rows on the decoder
    fast, own = greedy_both_ways(model, tokenizer)
    assert fast == own
    base, tokenizer = load_run_base(RunDir(run_dir))
    answers = []
    for step in (4, 12):  # the sweep swaps a checkpoint's tensors in: the decoder follows
        load_trainable(base, run_dir / "checkpoints" / f"step-{step}")
        fast, own = greedy_both_ways(base, tokenizer, steps=6)
        assert fast == own
        answers.append(fast)
    assert answers[0] != answers[1]


def test_architectures_the_fast_decoder_does_not_run_decode_through_their_own_forward(tmp_path, tokenizer):
    from conftest import make_tiny_model

    from lmforge.generate import lean_decoder

    model, tokenizer = load_for_inference(model=make_tiny_model("granite", tokenizer, tmp_path / "granite"))
    assert lean_decoder(model, 5, 64) is None
    fast, own = greedy_both_ways(model, tokenizer, steps=4)
    assert fast == own


def test_lora_on_modules_the_fast_decoder_does_not_adapt_decodes_through_the_models_forward(llama_dir):
    from peft import LoraConfig, get_peft_model

    from lmforge.generate import lean_decoder
    from lmforge.model.loader import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(llama_dir, torch.float32), LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()  # lm_head: not on the decoder
    assert lean_decoder(model, 5, 64) is None and lean_decoder(model, 5, 64) is None  # refused once, remembered
    fast, own = greedy_both_ways(model, load_tokenizer(llama_dir), steps=4)
    assert fast == own


# ------------------------------------------------------------- continuous batching and the decode weight format


def one_by_one_and_together(model, tokenizer, params: SamplingParams, rows: int = 2):
    """Every sample prompt decoded alone, and all of them as one continuous batch on `rows` rows (fewer rows than
    prompts: rows free up and take the next prompt mid-batch)."""
    from lmforge.data.render import end_of_turn_ids, render_prompt
    from lmforge.generate import generate_all

    prompts = [render_prompt(tokenizer, r["messages"][:-1]) for r in sample_records()]
    stop = end_of_turn_ids(tokenizer)
    alone = [generate_all(model, [prompt], stop, params, slots=1)[0][0] for prompt in prompts]
    together, decoding = generate_all(model, prompts, stop, params, slots=rows)
    return alone, together, decoding


def test_float32_continuous_batch_equals_one_by_one_and_the_models_own_forward(run_dir):
    """--decode-dtype float32: the set decoded as one continuous batch on 2 rows gives every prompt the tokens it
    gets alone, and those are the model's own forward's (greedy), with the run's LoRA on the decoder."""
    from lmforge.data.render import end_of_turn_ids, render_prompt
    from lmforge.generate import model_forward_tokens

    model, tokenizer = load_for_inference(str(run_dir))
    params = SamplingParams(max_new_tokens=10, decode_dtype="float32")
    alone, together, decoding = one_by_one_and_together(model, tokenizer, params)
    assert together == alone
    assert (decoding.path, decoding.weights, decoding.slots) == ("fast decoder", "float32", 2)
    for prompt_record, tokens in zip(sample_records(), alone):
        prompt = render_prompt(tokenizer, prompt_record["messages"][:-1])
        own = [step[0] for step in model_forward_tokens(model, [prompt], end_of_turn_ids(tokenizer), params)]
        assert tokens == own


def test_seeded_sampling_does_not_depend_on_the_batch(tmp_path, tokenizer):
    """Prompt i samples from seed + i: the same tokens alone (at its index) as in the batch."""
    from conftest import make_tiny_model

    from lmforge.data.render import end_of_turn_ids, render_prompt
    from lmforge.generate import generate_all

    model, tokenizer = load_for_inference(model=make_tiny_model("llama", tokenizer, tmp_path / "llama"))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, decode_dtype="float32")
    prompts = [render_prompt(tokenizer, r["messages"][:-1]) for r in sample_records()]
    stop = end_of_turn_ids(tokenizer)
    together, _ = generate_all(model, prompts, stop, params, slots=2)
    for i, prompt in enumerate(prompts):
        shifted = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5 + i, decode_dtype="float32")
        assert generate_all(model, [prompt], stop, shifted, slots=1)[0][0] == together[i]


@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_rows_whose_replies_ended_are_not_computed_and_replies_do_not_change(tmp_path, tokenizer, weights):
    """Once no prompt waits, a reply on a high row moves down into a row freed below it, so a decode step computes
    only running replies (eval's last steps, one long reply left, cost one row, not the whole batch's); every prompt
    still gets the tokens it gets alone."""
    from conftest import make_tiny_model

    from lmforge.data.render import render_prompt
    from lmforge.generate import generate_all
    from lmforge.model.lean_decoder import Decoder

    model, tokenizer = load_for_inference(model=make_tiny_model("llama", tokenizer, tmp_path / "llama"))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, decode_dtype=weights)  # varied tokens
    prompts = [render_prompt(tokenizer, r["messages"][:-1]) for r in sample_records()]
    free_running, _ = generate_all(model, prompts, [], params, slots=len(prompts))
    # a stop token that ends the first reply early and never ends the last one: rows free up below a running one
    stop = next(t for t in free_running[0][1:6] if t not in free_running[-1])
    calls = []
    real_decode = Decoder.decode

    def recording(self, slots, tokens, positions, adapters):
        calls.append(list(slots))
        return real_decode(self, slots, tokens, positions, adapters)

    Decoder.decode = recording
    try:
        together, _ = generate_all(model, prompts, [stop], params, slots=len(prompts))
    finally:
        Decoder.decode = real_decode
    assert len(together[0]) < 6 and len(together[-1]) == 12
    assert all(slots == list(range(len(slots))) for slots in calls), calls  # rows 0..n-1, no idle row inside
    assert any(len(slots) < len(prompts) for slots in calls)
    alone = [generate_all(model, [prompt], [stop], params, slots=1, keys=[i])[0][0] for i, prompt in enumerate(prompts)]
    assert together == alone


@pytest.mark.parametrize("weights", ["float16", "bfloat16"])
def test_a_shared_system_prompt_is_prefilled_once_and_a_prompts_logits_do_not_depend_on_the_batch(
        tmp_path, tokenizer, weights):
    """eval's prompts share the template's head (system prompt, user turn opening): in the reduced formats it is
    prefilled once per batch and copied, and each prompt's logits are bit-identical alone and in the batch."""
    if weights == "bfloat16" and not bfloat16_kernels():
        pytest.skip("no native bf16 kernels in torch's oneDNN on this CPU")
    from conftest import make_tiny_model

    from lmforge.data.render import prompt_heads, render_prompt
    from lmforge.generate import _prefill, _usable_head, lean_decoder
    from lmforge.model.lean_decoder import Decoder

    model, tokenizer = load_for_inference(model=make_tiny_model("llama", tokenizer, tmp_path / "llama"))
    system = {"role": "system", "content": "You answer questions about tenancy law in plain words."}
    questions = ["Can my landlord keep the deposit?", "How long is a notice period?", "Who fixes the boiler?"]
    conversations = [[system, {"role": "user", "content": q}] for q in questions]
    conversations.append([{"role": "user", "content": "Hello there"}])  # no system prompt: a head of its own
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    heads = prompt_heads(tokenizer, conversations, prompts)
    assert heads[0] == heads[1] == heads[2] > heads[3] > 0
    assert prompts[0][:heads[0]] == prompts[2][:heads[0]] and prompts[0][heads[0]] != prompts[1][heads[0]]
    assert prompt_heads(tokenizer, [[system]], [render_prompt(tokenizer, [system])]) == [0]  # no user message
    usable = [_usable_head(heads, prompts, i) for i in range(len(prompts))]
    decoder, adapter = lean_decoder(model, len(prompts), 256, weights)
    rows = []
    real_prefill = Decoder.prefill_many

    def counting(self, slots, token_lists, starts, adapters):
        rows.append(sum(map(len, token_lists)))
        return real_prefill(self, slots, token_lists, starts, adapters)

    Decoder.prefill_many = counting
    try:
        together = _prefill(decoder, adapter, list(range(len(prompts))), prompts, usable)
    finally:
        Decoder.prefill_many = real_prefill
    distinct_heads = len({tuple(p[:h]) for p, h in zip(prompts, usable) if h})
    assert sum(rows) == sum(len(p) for p in prompts) - sum(usable) + sum(
        len(h) for h in {tuple(p[:h]) for p, h in zip(prompts, usable) if h})
    assert distinct_heads < sum(1 for h in usable if h)  # the three with the system prompt computed it once
    for slot, (prompt, head) in enumerate(zip(prompts, usable)):
        alone = _prefill(decoder, adapter, [slot], [prompt], [head])
        assert torch.equal(alone[0], together[slot]), slot


@pytest.mark.skipif(not bfloat16_kernels(),
                    reason="no native bf16 kernels in torch's oneDNN on this CPU: --decode-dtype bfloat16 is refused")
def test_bfloat16_decoding_merges_the_lora_and_a_reply_does_not_depend_on_the_batch(run_dir):
    """--decode-dtype bfloat16 on a LoRA run: the adapter is merged into the bf16 weights (no LoRA rows), the logits
    stay within bf16's rounding of float32's with the LoRA, and each prompt's reply is the same alone or batched."""
    from lmforge.generate import lean_decoder
    from lmforge.model.lean_decoder import Decoder

    model, tokenizer = load_for_inference(str(run_dir))
    params = SamplingParams(max_new_tokens=10, decode_dtype="bfloat16")
    alone, together, decoding = one_by_one_and_together(model, tokenizer, params)
    assert together == alone
    assert (decoding.path, decoding.weights) == ("fast decoder", "bfloat16")
    reduced, adapter = lean_decoder(model, 1, 64, "bfloat16")
    assert adapter == 0 and not any(linear.lora for layer in reduced.layers
                                    for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
    exact = Decoder(model, slots=1, max_len=64)  # float32 with the LoRA rows beside the weights
    exact.add_lora("run", model, model.active_adapter)
    prompt = [(5 * i) % 90 + 3 for i in range(20)]
    want = exact.prefill(0, prompt, 0, 1)
    got = reduced.prefill(0, prompt, 0, 0)
    base_only = exact.prefill(0, prompt, 0, 0)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max(), rtol=0)
    assert (got - want).abs().max() < (base_only - want).abs().max()  # the adapter is in: closer than the base


def test_auto_decode_weights_follow_the_cpu():
    """auto: bf16 where the CPU multiplies bf16 natively and oneDNN has the kernels, else float16 where FBGEMM runs
    the weights, else float32; an explicit format is taken as asked; the reason names the CPU's instructions."""
    from lmforge.errors import ModelError
    from lmforge.model.lean_decoder import choose_decode_weights

    weights, why = choose_decode_weights("auto", ["amx_bf16", "avx512_bf16"], True, True)
    assert weights == "bfloat16" and "amx_bf16, avx512_bf16" in why and "--decode-dtype float32" in why
    assert choose_decode_weights("auto", [], False, True)[0] == "float16"  # AVX2-only (Zen 3)
    assert "no native bf16" in choose_decode_weights("auto", [], False, True)[1]
    assert choose_decode_weights("auto", ["avx512_bf16"], False, True)[0] == "float16"  # torch without the kernels
    assert choose_decode_weights("auto", [], False, False)[0] == "float32"
    assert choose_decode_weights("float32", ["amx_bf16"], True, True) == (
        "float32", "float32 as requested (greedy replies as the model's own forward gives them)")
    with pytest.raises(ModelError, match="use auto, float32, float16, bfloat16"):
        choose_decode_weights("int8", [], False, False)


def test_cli_eval_records_the_decoding_it_chose(run_dir, tmp_path, capsys):
    """eval.json says how the replies were decoded (path, weights, why, rows) and stderr says it too; float32 gives
    the model's own forward's greedy predictions."""
    from lmforge.generate import decode_weights

    run = copy_run(run_dir, tmp_path)
    test = write_jsonl(tmp_path / "test.jsonl", sample_records())
    code, out, err = run_cli(capsys, "eval", str(run), "--data", str(test), "--max-new-tokens", "6")
    assert code == 0, err
    decoding = json.loads((run / "eval.json").read_text())["decoding"]
    model, _ = load_for_inference(str(run))
    assert (decoding["path"], decoding["slots"]) == ("fast decoder", 5)  # 16 rows asked, 5 prompts
    assert (decoding["weights"], decoding["reason"]) == decode_weights(model, "auto")
    assert decoding["reason"].startswith("auto: ") and f"{decoding['weights']} weights" in err
    code, out, err = run_cli(capsys, "eval", str(run), "--data", str(test), "--max-new-tokens", "6",
                             "--decode-dtype", "float32", "--batch-size", "2")
    assert code == 0, err
    report = json.loads((run / "eval.json").read_text())
    assert report["decoding"]["weights"] == "float32" and report["generation"]["decode_dtype"] == "float32"
    predictions = [json.loads(line)["prediction"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    tokenizer = load_for_inference(str(run))[1]
    alone = [reply(model, tokenizer, r["messages"][:-1], SamplingParams(max_new_tokens=6)).strip()
             for r in sample_records()]  # float32, one prompt at a time (= the model's own forward: tests above)
    assert predictions == alone
