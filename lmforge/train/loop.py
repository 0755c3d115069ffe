"""The training loop, one for every stage (stages.py: units, batches, loss) and method (methods.py: what trains),
read top to bottom as `train()` = `set_up()` → `run_steps()` → `finish()`. Each micro-batch's summed loss is divided
by the step's units (supervised tokens, pairs or replies), so accumulation equals one big batch. Ctrl-C checkpoints
and stops; `resume_from_checkpoint` continues exactly. Two hooks are here and only here: `wrap_model()` (the one place
the model is wrapped after set-up: distributed training) and `forward_precision()` (the context every forward runs
under: autocast). Must not know a stage or a method by name.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import Config
from ..data.render import ensure_chat_template
from ..model import packed_attention as attention
from ..model.lean_mlp import use_lean_mlp
from ..model.loader import load_model, load_tokenizer, pick_dtype, resolve_model
from ..model.methods import apply_method, check_method, load_base, trainable_summary, unwrap
from ..model.precision import training_precision
from ..model.value_head import VALUE_HEAD_FILE, detached_value_head, value_head
from ..rundir import (
    RunDir,
    load_checkpoint,
    resolve_resume,
    save_artifact,
    save_checkpoint,
)
from .batching import DataOrder
from .heap import trim_heap_between_layers
from .losses import sft_loss_sum
from .plots import plot_losses
from .stages import LossOutput, Reference, Stage, StageData, reference_needs_copy, stage_of


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


# ---------------------------------------------------------------------------------------------- the two hooks


def wrap_model(model, config: Config):
    """The one place the model is wrapped after set-up, before the optimizer sees its parameters (distributed data
    parallel / FSDP will wrap here). Today: the model itself."""
    return model


def forward_precision(config: Config, model) -> Callable[[], AbstractContextManager]:
    """The context every training and evaluation forward runs under: bf16 autocast where this CPU multiplies bf16
    fast (parameters and optimizer state stay float32), else none — model/precision.py decides at the model's shapes
    and says which and why on stderr."""
    return training_precision(config.model.dtype, getattr(unwrap(model), "config", None)).context()


# ---------------------------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss_sum: float  # summed over the step's units
    supervised: int  # supervised tokens
    tokens: int
    grad_norm: float
    units: int = 0  # what the loss is divided by: supervised tokens (pt/sft), pairs or replies
    metrics: dict | None = None  # name → (sum, count) of the stage's own figures (rewards, accuracies)


def _sft_loss(model, batch) -> LossOutput:
    return LossOutput(sft_loss_sum(model, batch))


def train_step(model, micro_batches: list, parameters, optimizer, scheduler, max_grad_norm: float,
               loss_fn: Callable = _sft_loss, precision: Callable[[], AbstractContextManager] = nullcontext
               ) -> StepResult:
    """One optimizer step over micro-batches; each micro-batch's summed loss is divided by the units of the whole
    step, so accumulating micro-batches equals one large batch. Forwards run under `precision()`."""
    units = sum(b.units for b in micro_batches)
    loss_sum, metrics = 0.0, {}
    for batch in micro_batches:
        with precision():
            output = loss_fn(model, batch)
        (output.loss_sum / units).backward()
        loss_sum += output.loss_sum.item()
        _add_metrics(metrics, output.metrics)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, sum(b.num_supervised for b in micro_batches),
                      sum(b.num_tokens for b in micro_batches), float(grad_norm), units, metrics)


def _add_metrics(into: dict, metrics: dict) -> None:
    for name, (total, count) in metrics.items():
        old = into.get(name, (0.0, 0))
        into[name] = (old[0] + total, old[1] + count)


@torch.no_grad()
def evaluate_stage(model, units: list, batch_size: int, make: Callable, loss_fn: Callable,
                   precision: Callable[[], AbstractContextManager] = nullcontext) -> dict:
    """eval_loss (and the stage's own figures, e.g. eval_rewards/accuracies) over held-out units."""
    model.eval()
    loss_sum, count, metrics = 0.0, 0, {}
    for start in range(0, len(units), batch_size):
        batch = make(units[start:start + batch_size])
        with precision():
            output = loss_fn(model, batch)
        loss_sum += float(output.loss_sum)
        count += batch.units
        _add_metrics(metrics, output.metrics)
    model.train()
    return {"eval_loss": round(loss_sum / max(count, 1), 4),
            **{f"eval_{name}": round(total / max(n, 1), 4) for name, (total, n) in metrics.items()}}


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


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class RunningTotals:
    """What the steps since the last logged record add up to; turned into a metrics.jsonl record, then reset."""
    loss_sum: float = 0.0
    units: int = 0
    supervised: int = 0
    tokens: int = 0
    metrics: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss_sum
        self.units += result.units
        self.supervised += result.supervised
        self.tokens += result.tokens
        _add_metrics(self.metrics, result.metrics or {})

    def record(self, step: int, epoch: float, grad_norm: float, lr: float) -> dict:
        """The training record for `step`: averages over the window, then a new window starts."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "loss": round(self.loss_sum / max(self.units, 1), 4),
                  "grad_norm": round(grad_norm, 4), "learning_rate": lr, "epoch": round(epoch, 3),
                  "tokens_per_s": round(self.tokens / elapsed, 1),
                  "supervised_tokens_per_s": round(self.supervised / elapsed, 1)}
        record |= {name: round(total / max(count, 1), 4) for name, (total, count) in self.metrics.items()}
        self.__init__()
        return record


@dataclass
class TrainingSession:
    """What set_up() builds and the loop and finish() use: the run dir, data, model, reference, optimizer, schedule."""
    config: Config
    stage: Stage
    run: RunDir
    tokenizer: Any
    data: StageData
    model: Any
    reference: Reference | None
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    order: DataOrder
    steps: int  # the step the run ends at
    start: int  # the step it starts from (> 0 when resuming)
    history: list[dict]  # metrics records so far
    precision: Callable[[], AbstractContextManager] = nullcontext

    def batch(self, units: list):
        return self.stage.batch(units, self.config.method.virtual_tokens, self.pad_id)

    def loss(self, model, batch) -> LossOutput:
        return self.stage.loss(self.config, model, batch, self.reference)

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def train(config: Config, callback: Callable[[dict], bool | None] | None = None) -> RunDir:
    """Run one training job. `callback(record)` sees every logged record; returning True stops like Ctrl-C."""
    session = set_up(config)
    step = run_steps(session, callback)
    return finish(session, step)


def set_up(config: Config) -> TrainingSession:
    """Everything before the first step: the run dir (checked before any work), data, model + method, reference,
    optimizer and schedule, and the state of the checkpoint being resumed."""
    cfg = config.train
    run = RunDir(config.output_dir)
    resume_from = resolve_resume(run, cfg.resume_from_checkpoint)
    run.check_free(cfg.overwrite_output_dir, resuming=resume_from is not None)  # before any data or model work
    torch.manual_seed(cfg.seed)

    model_path = resolve_model(config.model.name_or_path)
    check_method(config.method, model_path)  # on an empty copy: a wrong target is reported before anything loads
    tokenizer = load_tokenizer(model_path)
    note = ensure_chat_template(tokenizer, config.model.template)
    if note:
        print(f"note: {note}")
    stage = stage_of(config)
    data = _set_up_data(config, stage, tokenizer, run, resuming=resume_from is not None)

    model = _set_up_model(config, stage, model_path)
    reference = _set_up_reference(config, stage, model, model_path)
    model = wrap_model(model, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = DataOrder(len(data.train), cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed)
    steps = total_steps(config, order)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    start, history = 0, []
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
        history = _read_metrics(run.metrics, upto=start)
        print(f"resumed from {resume_from} at step {start}")
    _write_metrics(run.metrics, history)
    return TrainingSession(config, stage, run, tokenizer, data, model, reference, parameters, optimizer, scheduler,
                           order, steps, start, history, forward_precision(config, model))


def _set_up_data(config: Config, stage: Stage, tokenizer, run: RunDir, resuming: bool) -> StageData:
    """The stage's data, summarised on the terminal; then the run dir is created with config.yaml and data_report."""
    data = stage.prepare(config, tokenizer)
    print(f"data ({stage.name}): train {len(data.train)} units, {data.report['train_tokens']:,} tokens "
          f"({data.report['train_supervised_tokens']:,} trained) · val {len(data.val)} · "
          f"{stage.summary(data.report)}")
    run.prepare(config.train.overwrite_output_dir, resuming=resuming)
    run.config.write_text(config.to_yaml(), encoding="utf-8")
    run.data_report.write_text(json.dumps(data.report, indent=2, ensure_ascii=False), encoding="utf-8")
    return data


def _set_up_model(config: Config, stage: Stage, model_path: str):
    """The base with the method applied (only its parameters train) and what the stage adds, ready for packed
    training."""
    model = apply_method(load_base(model_path, pick_dtype(config.model.dtype), config.method), config.method)
    stage.prepare_model(model)
    model = prepare_for_training(model)
    print(trainable_summary(model))
    return model


def _set_up_reference(config: Config, stage: Stage, model, model_path: str) -> Reference | None:
    """dpo / kto compare against the model before training: the adapter switched off, or a frozen copy."""
    if not stage.needs_reference:
        return None
    frozen = None
    if reference_needs_copy(model):  # full / freeze change the base: the reference is a frozen copy of it
        frozen = prepare_for_training(load_model(model_path, pick_dtype(config.model.dtype))).eval()
        frozen.requires_grad_(False)
    return Reference(frozen)


def run_steps(session: TrainingSession, callback: Callable[[dict], bool | None] | None = None) -> int:
    """Optimizer steps from session.start until the end, Ctrl-C or the callback asks to stop; logs, evaluates and
    checkpoints on schedule. Returns the step reached."""
    cfg, run, data, order, steps = session.config.train, session.run, session.data, session.order, session.steps
    totals = RunningTotals()
    progress = tqdm(total=steps, initial=session.start, desc="train", unit="step", dynamic_ncols=True)
    step = session.start
    with _StopRequest() as stop:
        while step < steps and not stop.requested:
            micro_batches = [session.batch([data.train[i] for i in indices]) for indices in order.step(step)]
            result = train_step(session.model, micro_batches, session.parameters, session.optimizer,
                                session.scheduler, cfg.max_grad_norm, session.loss, session.precision)
            totals.add(result)
            step += 1
            progress.update(1)

            record = None
            if step % cfg.logging_steps == 0 or step == steps:
                record = totals.record(step, step / order.steps_per_epoch, result.grad_norm,
                                       session.scheduler.get_last_lr()[0])
            if data.val and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == steps):
                record = (record or {"step": step}) | evaluate_stage(session.model, data.val, cfg.eval_batch_size,
                                                                     session.batch, session.loss, session.precision)
            if record:
                session.history.append(record)
                _append_metric(run.metrics, record)
                progress.set_postfix(loss=record.get("loss"), refresh=False)
                tqdm.write(json.dumps(record))
                if callback and callback(record):
                    stop.requested = True
            if cfg.save_steps and step % cfg.save_steps == 0 or (stop.requested and step < steps):
                path = save_checkpoint(run, step, session.model, session.optimizer, session.scheduler,
                                       {"epoch": step / order.steps_per_epoch}, cfg.save_total_limit)
                tqdm.write(f"saved checkpoint {path}")
    progress.close()
    return step


def finish(session: TrainingSession, step: int) -> RunDir:
    """The loss plot; then, when every step ran, the artifact (adapter/ or model/, + the reward model's value head)
    and the run marked finished — otherwise how to continue."""
    run, model, config = session.run, session.model, session.config
    plot_losses(session.history, run.loss_plot)
    if step < session.steps:
        print(f"stopped at step {step}/{session.steps}; continue with: lmforge train {run.config} "
              f"train.resume_from_checkpoint=latest")
        return run
    head = value_head(model)
    if head is None:
        path = save_artifact(run, model, session.tokenizer, config.method.type)
    else:  # the head is saved beside the weights, not inside them (a full model/ must reload as a plain causal LM)
        with detached_value_head(model):
            path = save_artifact(run, model, session.tokenizer, config.method.type,
                                 extra={VALUE_HEAD_FILE: head.state_dict()})
    run.finished = True
    print(f"done: {path}  ·  {session.stage.follow_up(run.root)}")
    return run


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
