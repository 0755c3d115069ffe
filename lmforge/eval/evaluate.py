"""`lmforge eval`: score a model on a held-out test set, and sweep a run's checkpoints to find the best one.

The last assistant message of a test conversation is the reference, the rest the prompt. Scores: the reference's loss
and perplexity, and the model's reply scored by metrics.py. Writes eval.json + predictions.jsonl; a sweep also
sweep.json, sweep.png and best.json (names in checkpoint.py). Must not know about argparse or HTML.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..conversation import Conversation
from ..data.datasets import load_many
from ..data.render import IGNORE_INDEX, Example, ensure_chat_template, render_example
from ..errors import DataError, UserError
from ..generate import (
    Decoding,
    SamplingParams,
    decode_replies,
    load_for_inference,
    load_run_base,
    load_run_weights,
    load_trainable,
)
from ..model import packed_attention as attention
from ..model.methods import unwrap
from ..model.precision import Precision, training_precision
from ..rundir import (
    EVAL_FILE,
    PREDICTIONS_FILE,
    RunDir,
    RunWeights,
    choose_weights,
    complete_checkpoints,
)
from ..train.batching import pack
from ..train.losses import supervised_hidden
from .scoring import (
    CHOICE_METRIC,
    GENERATION_METRICS,
    LOWER_IS_BETTER,
    detect_choices,
    mean_scores,
    normalize_answer,
    score_example,
)

SELECTABLE_METRICS = ("auto", *LOWER_IS_BETTER, *GENERATION_METRICS, CHOICE_METRIC)


@dataclass(frozen=True)
class TestItem:
    prompt: list[dict]  # the messages before the reference
    reference: str      # the last assistant message
    source: str         # file:line
    conversation: Conversation


@dataclass(frozen=True)
class TestSet:
    names: list[str]  # as the user gave them (files or dataset_info.json names)
    items: list[TestItem]


def load_test_set(entries: list[str], dataset_dir: str | None = None, max_samples: int | None = None) -> TestSet:
    """Test conversations, each split into prompt and reference (its last message, which must be the assistant's)."""
    try:
        conversations, _ = load_many(entries, dataset_dir, max_samples)
    except DataError as error:
        raise DataError(f"test set: {error}\n(lmforge eval needs conversations that end with the reference answer: "
                        f"an assistant message, or alpaca's \"output\")") from None
    items = []
    for conversation in conversations:
        messages = conversation.to_dicts()
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{conversation.source}: the last message is {messages[-1]['role']!r}; lmforge eval "
                            f"takes the last assistant message as the reference answer, so every test conversation "
                            f"must end with one")
        items.append(TestItem(messages[:-1], messages[-1]["content"], conversation.source, conversation))
    return TestSet(list(entries), items)


@dataclass
class EvalOptions:
    generate: bool = True
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256))
    batch_size: int = 32  # decode rows (fast decoder: one continuous batch) or prompts per batch; loss batch
    cutoff_len: int = 1024
    choices: list[str] | None = None  # None: detected from the references (metrics.detect_choices)
    dtype: str = "auto"

    def __post_init__(self):
        problems = [f"{name} must be at least 1, got {value}" for name, value in (
            ("--batch-size", self.batch_size), ("--cutoff-len", self.cutoff_len),
            ("--max-new-tokens", self.params.max_new_tokens)) if value < 1]
        if self.params.temperature < 0:
            problems.append(f"--temperature must be 0 (greedy) or more, got {self.params.temperature}")
        if not 0 < self.params.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.params.top_p}")
        if self.choices is not None and len(self.choices) < 2:
            problems.append(f"--choices needs at least two labels, got {self.choices}")
        if problems:
            raise UserError("; ".join(problems))
        if self.choices is not None:
            self.choices = [normalize_answer(c) for c in self.choices]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict]  # the lines of predictions.jsonl
    info: dict           # what was evaluated and how (the rest of eval.json)

    def report(self) -> dict:
        return {"metrics": self.metrics, **self.info}


def evaluate_model(model, tokenizer, test: TestSet, options: EvalOptions, desc: str = "eval",
                   describe: dict | None = None) -> EvalResult:
    """Loss of every reference, then (if options.generate) a reply to every prompt, scored against its reference."""
    items = test.items
    ensure_chat_template(tokenizer, None)  # a base model without one cannot be prompted like the test set's chats
    precision = loss_precision(model, options)
    losses = reference_losses(model, tokenizer, items, options, precision)
    scored_tokens = sum(tokens for _, tokens in filter(None, losses))
    if not scored_tokens:
        raise DataError(f"none of the {len(items)} test references fits within --cutoff-len={options.cutoff_len} "
                        f"tokens after its prompt; raise --cutoff-len")
    tqdm.write(f"{desc}: {_loss_line(precision)}", file=sys.stderr)
    loss = sum(total for total, _ in filter(None, losses)) / scored_tokens
    metrics = {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50.0)), 4)}
    records = [{"index": i, "source": item.source, "prompt": item.prompt, "reference": item.reference,
                "loss": round(pair[0] / pair[1], 4) if pair else None}
               for i, (item, pair) in enumerate(zip(items, losses))]
    choices = choices_for(test, options)
    decoding = None
    if options.generate:
        predictions, decoding = generate_replies(model, tokenizer, items, options, desc)
        tqdm.write(f"{desc}: {decoding.line()}", file=sys.stderr)
        per_example = []
        for record, item, prediction in zip(records, items, predictions):
            scored = score_example(prediction, item.reference.strip(), choices)
            record.update(prediction=prediction, scores=scored.scores)
            if choices is not None:
                record["choice"] = scored.choice
            per_example.append(scored.scores)
        metrics.update(mean_scores(per_example))
    info = {"data": test.names, "examples": len(items), "loss_examples": sum(p is not None for p in losses),
            "model": describe or {}, "choices": choices, "cutoff_len": options.cutoff_len,
            "generation": vars(options.params) if options.generate else None,
            "decoding": decoding.as_dict() if decoding else None,
            "loss_precision": {"name": precision.name, "reason": precision.reason},
            "lmforge": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return EvalResult(metrics, records, info)


def choices_for(test: TestSet, options: EvalOptions) -> list[str] | None:
    return options.choices if options.choices is not None else detect_choices([i.reference for i in test.items])


def loss_precision(model, options: EvalOptions) -> Precision:
    """How the reference losses compute: as training would on this CPU (bf16 autocast where it multiplies bf16 fast:
    about half the time of float32 on the bundled model), except that `--decode-dtype float32`, the exact mode, keeps
    them float32 too."""
    requested = "float32" if options.params.decode_dtype == "float32" else "auto"
    return training_precision(requested, getattr(unwrap(model), "config", None), announce=False)


def _loss_line(precision: Precision) -> str:
    """What eval says about its loss pass: the training precision's reason, without the parts only training has
    (optimizer state, rounded frozen weights) where the reason says why in a `because` clause."""
    if precision.autocast is None:
        return f"loss in float32 ({precision.reason})"
    head, _, because = precision.reason.partition(", because ")
    why = f"as training runs on this CPU, because {because}" if because else head  # GPU reasons have no clause
    return f"loss in {precision.name}, {why}; --decode-dtype float32 computes it in float32"


def reference_losses(model, tokenizer, items: list[TestItem], options: EvalOptions,
                     precision: Precision | None = None) -> list[tuple[float, int] | None]:
    """(summed loss, tokens) of each reference given its prompt; None when cutoff_len leaves none of it. Under
    `precision`'s autocast when given (else in the weights' dtype)."""
    examples: list[Example | None] = []
    for item in items:
        example = render_example(tokenizer, item.conversation, "last_assistant")
        example = Example(example.input_ids[:options.cutoff_len], example.labels[:options.cutoff_len])
        examples.append(example if example.num_supervised else None)
    kept = [(i, e) for i, e in enumerate(examples) if e is not None]
    out: list[tuple[float, int] | None] = [None] * len(items)
    if not kept:
        return out
    base = unwrap(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(attention.register())  # packed rows: each example attends only to itself
    try:
        for start in tqdm(range(0, len(kept), options.batch_size), desc="loss", unit="batch", leave=False):
            chunk = kept[start:start + options.batch_size]
            with precision.context()() if precision else nullcontext():
                pairs = _packed_losses(model, [e for _, e in chunk])
            for (index, _), pair in zip(chunk, pairs):
                out[index] = pair
    finally:
        base.set_attn_implementation(previous)
    return out


@torch.inference_mode()
def _packed_losses(model, examples: list[Example]) -> list[tuple[float, int]]:
    """Per-example summed cross-entropy over supervised tokens, with all examples packed into one row."""
    batch = pack(examples)
    hidden, targets = supervised_hidden(model, batch)
    positions = (batch.targets != IGNORE_INDEX).nonzero().squeeze(1)
    owner = torch.searchsorted(batch.cu_seq_lens[1:].long(), positions, right=True)
    base = unwrap(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    token_loss = torch.empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), 256):  # 256 rows of full-vocabulary logits at a time
        logits = head(hidden[start:start + 256]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_loss[start:start + 256] = torch.nn.functional.cross_entropy(
            logits, targets[start:start + 256], reduction="none")
    sums = torch.zeros(len(examples)).index_add_(0, owner, token_loss)
    counts = torch.zeros(len(examples), dtype=torch.long).index_add_(0, owner, torch.ones_like(owner))
    return [(float(s), int(c)) for s, c in zip(sums, counts)]


def generate_all(model, tokenizer, items: list[TestItem], options: EvalOptions, desc: str) -> list[str]:
    """Replies to every prompt (see generate_replies)."""
    return generate_replies(model, tokenizer, items, options, desc)[0]


def generate_replies(model, tokenizer, items: list[TestItem], options: EvalOptions, desc: str
                     ) -> tuple[list[str], Decoding]:
    """Replies to every prompt and how they were decoded (said on stderr). On the fast decoder the whole set is one
    continuous batch on options.batch_size rows; the longest prompts go first, so the slowest start early and the
    progress bar's estimate errs long (and on the model's own forward, prompts of similar length share a batch).
    Sampling with a seed: test example i draws from seed + i, in any order and batch."""
    order = sorted(range(len(items)), key=lambda i: -len(tokenizer.apply_chat_template(items[i].prompt,
                                                                                      tokenize=False)))
    predictions: list[str] = [""] * len(items)
    with tqdm(total=len(items), desc=desc, unit="ex", dynamic_ncols=True) as progress:
        texts, decoding = decode_replies(model, tokenizer, [items[i].prompt for i in order], options.params,
                                         options.batch_size, done=lambda _: progress.update(1), keys=order)
    for i, text in zip(order, texts):
        predictions[i] = text.strip()
    return predictions, decoding


def write_eval(result: EvalResult, out_dir: Path) -> Path:
    """eval.json and predictions.jsonl in out_dir (each written to a temp name, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(out_dir)
    run.write_json(out_dir / EVAL_FILE, result.report())
    tmp = out_dir / f".tmp-{PREDICTIONS_FILE}"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records), encoding="utf-8")
    tmp.replace(out_dir / PREDICTIONS_FILE)
    return out_dir / EVAL_FILE


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:g}" for name, value in metrics.items())


# ------------------------------------------------------------------------------------------- one model or run


def evaluate_run_or_model(test: TestSet, options: EvalOptions, run_dir: str | None = None,
                          model: str | None = None, adapter: str | None = None, checkpoint: str | None = None,
                          out: str | None = None) -> tuple[EvalResult, Path]:
    """`lmforge eval`: a run's weights (best.json's choice unless `checkpoint` says) or a model (+ adapter).
    Output: the run dir for the weights the run uses by default, else RUN/evals/<step-N|final>/, or `out`."""
    if run_dir:
        run = RunDir(Path(run_dir))
        weights = choose_weights(run, checkpoint)
        default = choose_weights(run, None).path == weights.path
        print(f"using {weights.reason} of {run.root}")
        out_dir = Path(out) if out else (run.root if default else run.evals / weights.label)
        loaded = load_run_weights(weights, options.dtype)
        describe = describe_weights(weights)
    else:
        if not out:
            raise UserError("-o OUT_DIR is needed with --model (a run dir keeps its results inside itself)")
        out_dir = Path(out)
        loaded = load_for_inference(model=model, adapter=adapter, dtype=options.dtype, checkpoint=checkpoint)
        describe = {"model": model, "adapter": adapter}
    result = evaluate_model(*loaded, test, options, describe=describe)
    return result, write_eval(result, out_dir)


def describe_weights(weights: RunWeights) -> dict:
    return {"run": str(weights.run.root), "weights": weights.label, "step": weights.step,
            "path": str(weights.path.relative_to(weights.run.root)), "reason": weights.reason}


# ------------------------------------------------------------------------------------------ checkpoint sweep


@dataclass
class SweepResult:
    metric: str
    points: list[dict]  # {"label", "step", "metrics"} in step order
    best: dict          # the chosen point (+ "weights": its path inside the run dir)


def selection_metric(requested: str, options: EvalOptions, has_choices: bool) -> str:
    """--metric auto: choice accuracy on a classification-style set, ROUGE-L when generating, else eval loss."""
    if requested not in SELECTABLE_METRICS:
        raise UserError(f"--metric {requested!r} is not a metric lmforge eval reports; use one of "
                        f"{', '.join(SELECTABLE_METRICS)}")
    if requested == "auto":
        return CHOICE_METRIC if options.generate and has_choices else "rouge-l" if options.generate else "eval_loss"
    if requested not in LOWER_IS_BETTER and not options.generate:
        raise UserError(f"--metric {requested} needs generation; drop --no-generate or use --metric eval_loss")
    if requested == CHOICE_METRIC and not has_choices:
        raise UserError("--metric choice_accuracy needs a classification-style test set (a few short labels as "
                        "references) or --choices LABEL,LABEL,…")
    return requested


def pick_best(points: list[dict], metric: str) -> dict:
    """The best point by `metric`; ties go to the lower eval loss, then to the earlier step (less overfitting)."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return min(points, key=lambda p: (sign * p["metrics"][metric], p["metrics"]["eval_loss"], p["step"] or 0))


def sweep_checkpoints(run_dir: str, test: TestSet, options: EvalOptions, metric: str = "auto") -> SweepResult:
    """Evaluate every complete checkpoint (and the final weights when they come after the last checkpoint), pick
    the best by `metric`, and record it: best.json, sweep.json, sweep.png; the best's eval.json and
    predictions.jsonl are copied into the run dir (they describe what chat / export / serve now load)."""
    run = RunDir(Path(run_dir))
    checkpoints = complete_checkpoints(run)
    if not checkpoints:
        raise UserError(f"{run.root} has no checkpoints to sweep (looked in {run.checkpoints}); train with "
                        f"train.save_steps=N to keep one every N steps")
    metric = selection_metric(metric, options, choices_for(test, options) is not None)
    model, tokenizer = load_run_base(run, options.dtype)
    candidates = [choose_weights(run, str(path)) for path in checkpoints]
    points = []
    for weights in candidates:
        load_trainable(model, weights.path)
        points.append(_sweep_point(weights, evaluate_model(model, tokenizer, test, options, weights.label,
                                                           describe_weights(weights))))
    del model
    final = _final_if_any(run)
    if final is not None and final.step not in [w.step for w in candidates]:
        loaded = load_run_weights(final, options.dtype)
        points.append(_sweep_point(final, evaluate_model(*loaded, test, options, "final", describe_weights(final))))
        candidates.append(final)
    best = pick_best(points, metric)
    chosen = next(w for w in candidates if w.label == best["label"])
    if final is not None and chosen.step == final.step:
        chosen = final  # identical weights: prefer the self-contained adapter/ or model/
    marker = {"label": chosen.label, "weights": str(chosen.path.relative_to(run.root)), "step": chosen.step,
              "metric": metric, "value": best["metrics"][metric],
              "higher_is_better": metric not in LOWER_IS_BETTER, "data": test.names,
              "examples": len(test.items), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run.write_json(run.sweep_report, {"metric": metric, "best": marker, "points": points})
    plot_sweep(points, metric, best, run.sweep_plot)
    for name in (EVAL_FILE, PREDICTIONS_FILE):
        shutil.copyfile(run.evals / best["label"] / name, run.root / name)
    run.write_json(run.best_marker, marker)
    return SweepResult(metric, points, marker)


def _final_if_any(run: RunDir) -> RunWeights | None:
    try:
        return choose_weights(run, "final")
    except UserError:  # stopped early: no adapter/ or model/ yet, only checkpoints
        return None


def _sweep_point(weights: RunWeights, result: EvalResult) -> dict:
    write_eval(result, weights.run.evals / weights.label)
    tqdm.write(f"{weights.label}: {format_metrics(result.metrics)}")
    return {"label": weights.label, "step": weights.step, "metrics": result.metrics}


def format_sweep(result: SweepResult) -> str:
    """A text table of the sweep, the best row marked."""
    names = list(result.points[0]["metrics"])
    rows = [["weights", "step", *names, ""]]
    for point in result.points:
        best = point["step"] == result.best["step"]
        rows.append([point["label"], str(point["step"]), *(f"{point['metrics'][n]:g}" for n in names),
                     f"← best ({result.metric})" if best else ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def plot_sweep(points: list[dict], metric: str, best: dict, path: Path) -> None:
    """sweep.png: the selection metric against step (eval loss on a second axis), the best point starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ordered = sorted(points, key=lambda p: p["step"] or 0)
    steps = [p["step"] or 0 for p in ordered]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    axis.plot(steps, [p["metrics"][metric] for p in ordered], "o-", color="#1f77b4", label=metric)
    axis.plot([best["step"] or 0], [best["metrics"][metric]], "*", markersize=18, color="#ff7f0e",
              label=f"best: {best['label']} ({metric} {best['metrics'][metric]:g})")
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if metric not in LOWER_IS_BETTER:
        loss_axis = axis.twinx()
        loss_axis.plot(steps, [p["metrics"]["eval_loss"] for p in ordered], "s--", color="#d62728", alpha=0.6,
                       label="eval loss")
        loss_axis.set_ylabel("eval loss")
        more_handles, more_labels = loss_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels, loc="best")
    axis.set_title("checkpoint sweep")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
