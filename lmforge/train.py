"""The training loop, readable top to bottom: data → model + method → steps → checkpoints → artifact.

One optimizer step = `gradient_accumulation_steps` packed micro-batches; the loss is summed over supervised tokens
and divided by the step's total supervised tokens, so accumulation equals one big batch. Ctrl-C finishes the current
step, saves a checkpoint and stops; `resume_from_checkpoint` continues exactly (weights, optimizer, scheduler, RNG,
data position). Distributed wrapping, when it comes, belongs in one function here.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import attention
from .batching import Batch, DataOrder, eval_batches, pack
from .checkpoint import (RunDir, load_checkpoint, resolve_resume, save_artifact, save_checkpoint)
from .config import Config
from .conversation import Conversation
from .data.datasets import load_specs, resolve_many
from .data.recipe import load_recipe
from .data_cache import cleaned_dataset, rendered_dataset
from .errors import DataError
from .fused_mlp import use_lean_mlp
from .heap import trim_heap_between_layers
from .losses import sft_loss_sum
from .methods import apply_method, trainable_summary
from .models import load_model, load_tokenizer, pick_dtype, resolve_model
from .plots import plot_losses
from .render import Example, RenderStats, ensure_chat_template


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    report: dict


def prepare_data(config: Config, tokenizer) -> PreparedData:
    """Read (cleaning first when a recipe is set), split and render the datasets. Every conversation is accounted for
    in the report. Cleaned data and token ids are cached by content (data_cache.py), so a rerun does not redo them."""
    data = config.data
    steps = load_recipe(None if data.recipe == "default" else data.recipe) if data.recipe else None
    cleaning: dict[str, dict] = {}

    def load(entries: list[str]):
        specs = resolve_many(entries, data.dataset_dir)
        if steps:
            for i, spec in enumerate(specs):
                specs[i], cleaning[spec.name] = cleaned_dataset(spec, steps)
                summary = cleaning[spec.name]
                print(f"clean {spec.name}: {summary['records_in']} records → kept {summary['kept']}, rejected "
                      f"{summary['rejected']}{' (cached)' if summary['cached'] else ''} · report {summary['report']}")
        return load_specs(specs, data.max_samples)

    conversations, counts = load(data.train)
    if data.val:
        val_conversations, _ = load(data.val)
    else:
        conversations, val_conversations = _hold_out(conversations, data.val_size, config.train.seed)
    train, train_stats, train_cached = rendered_dataset(tokenizer, conversations, data.train_on, data.cutoff_len)
    val, val_stats, _ = rendered_dataset(tokenizer, val_conversations, data.train_on, data.cutoff_len)
    if not train:
        raise DataError(f"no training examples left: all {train_stats.read} were dropped because nothing trainable "
                        f"fits within data.cutoff_len={data.cutoff_len} (every prompt is longer than that). "
                        f"Raise data.cutoff_len.")
    report = {"datasets": counts, "train": asdict(train_stats), "val": asdict(val_stats),
              "train_tokens": sum(len(e.input_ids) for e in train),
              "train_supervised_tokens": sum(e.num_supervised for e in train), "tokenized_from_cache": train_cached}
    if cleaning:
        report["cleaning"] = cleaning
    return PreparedData(train, val, report)


def _hold_out(conversations: list[Conversation], val_size: float, seed: int):
    if val_size <= 0:
        return conversations, []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(conversations)))
    if count >= len(conversations):
        raise DataError(f"data.val_size={val_size} would leave no training data ({len(conversations)} conversations)")
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def total_steps(config: Config, order: DataOrder) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(order.steps_per_epoch * config.train.num_train_epochs))


def prepare_for_training(model):
    """Packed per-example attention, the lean gated MLP and heap trims between layers; training mode."""
    model.set_attn_implementation(attention.register())
    use_lean_mlp(model)
    trim_heap_between_layers(model)
    return model.train()


@dataclass
class StepResult:
    loss_sum: float  # summed over the step's supervised tokens
    supervised: int
    tokens: int
    grad_norm: float


def train_step(model, micro_batches: list[Batch], parameters, optimizer, scheduler, max_grad_norm: float
               ) -> StepResult:
    """One optimizer step over packed micro-batches; each micro-batch's summed loss is divided by the supervised
    tokens of the whole step, so accumulating micro-batches equals one large batch."""
    supervised = sum(b.num_supervised for b in micro_batches)
    loss_sum = 0.0
    for batch in micro_batches:
        batch_loss = sft_loss_sum(model, batch)
        (batch_loss / supervised).backward()
        loss_sum += batch_loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, supervised, sum(b.num_tokens for b in micro_batches), float(grad_norm))


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int) -> float:
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in eval_batches(examples, batch_size):
        loss_sum += float(sft_loss_sum(model, batch))
        tokens += batch.num_supervised
    model.train()
    return loss_sum / max(tokens, 1)


class _StopRequest:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""
    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(config: Config, callback: Callable[[dict], bool | None] | None = None) -> RunDir:
    """Run one training job. `callback(record)` sees every logged record; returning True stops like Ctrl-C."""
    cfg = config.train
    run = RunDir(config.output_dir)
    resume_from = resolve_resume(run, cfg.resume_from_checkpoint)
    run.check_free(cfg.overwrite_output_dir, resuming=resume_from is not None)  # before any data or model work
    torch.manual_seed(cfg.seed)

    model_path = resolve_model(config.model.name_or_path)
    tokenizer = load_tokenizer(model_path)
    note = ensure_chat_template(tokenizer, config.model.template)
    if note:
        print(f"note: {note}")
    data = prepare_data(config, tokenizer)
    print(f"data: train {data.report['train']['kept']} examples, {data.report['train_tokens']:,} tokens "
          f"({data.report['train_supervised_tokens']:,} trained) · val {len(data.val)} · "
          f"{RenderStats(**data.report['train']).summary()}")

    run.prepare(cfg.overwrite_output_dir, resuming=resume_from is not None)
    run.config.write_text(config.to_yaml(), encoding="utf-8")
    run.data_report.write_text(json.dumps(data.report, indent=2, ensure_ascii=False), encoding="utf-8")

    model = prepare_for_training(apply_method(load_model(model_path, pick_dtype(config.model.dtype)), config.method))
    print(trainable_summary(model))

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = DataOrder(len(data.train), cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed)
    steps = total_steps(config, order)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    start = 0
    history: list[dict] = []
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
        history = _read_metrics(run.metrics, upto=start)
        print(f"resumed from {resume_from} at step {start}")
    _write_metrics(run.metrics, history)

    window = {"loss_sum": 0.0, "supervised": 0, "tokens": 0, "start": time.perf_counter()}
    progress = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step = start
    with _StopRequest() as stop:
        while step < steps and not stop.requested:
            micro_batches = [pack([data.train[i] for i in indices]) for indices in order.step(step)]
            result = train_step(model, micro_batches, parameters, optimizer, scheduler, cfg.max_grad_norm)
            window["loss_sum"] += result.loss_sum
            window["supervised"] += result.supervised
            window["tokens"] += result.tokens
            step += 1
            progress.update(1)

            record = None
            if step % cfg.logging_steps == 0 or step == steps:
                record = _train_record(step, steps, order, window, result.grad_norm, scheduler.get_last_lr()[0])
            if data.val and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == steps):
                record = (record or {"step": step}) | {"eval_loss": round(evaluate_loss(model, data.val,
                                                                                        cfg.eval_batch_size), 4)}
            if record:
                history.append(record)
                _append_metric(run.metrics, record)
                progress.set_postfix(loss=record.get("loss"), refresh=False)
                tqdm.write(json.dumps(record))
                if callback and callback(record):
                    stop.requested = True
            if cfg.save_steps and step % cfg.save_steps == 0 or (stop.requested and step < steps):
                path = save_checkpoint(run, step, model, optimizer, scheduler,
                                       {"epoch": step / order.steps_per_epoch}, cfg.save_total_limit)
                tqdm.write(f"saved checkpoint {path}")
    progress.close()
    plot_losses(history, run.loss_plot)
    if step < steps:
        print(f"stopped at step {step}/{steps}; continue with: lmforge train {run.config} "
              f"train.resume_from_checkpoint=latest")
        return run
    path = save_artifact(run, model, tokenizer, config.method.type)
    run.finished = True
    print(f"done: {path}  ·  chat with it: lmforge chat {run.root}")
    return run


def _train_record(step, steps, order, window, grad_norm, lr) -> dict:
    elapsed = time.perf_counter() - window["start"]
    record = {"step": step, "loss": round(window["loss_sum"] / max(window["supervised"], 1), 4),
              "grad_norm": round(grad_norm, 4), "learning_rate": lr, "epoch": round(step / order.steps_per_epoch, 3),
              "tokens_per_s": round(window["tokens"] / elapsed, 1),
              "supervised_tokens_per_s": round(window["supervised"] / elapsed, 1)}
    window.update(loss_sum=0.0, supervised=0, tokens=0, start=time.perf_counter())
    return record


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto]


def _write_metrics(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _append_metric(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
