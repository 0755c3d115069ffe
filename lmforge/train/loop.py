"""The training loop, one for every stage (stages.py: units, batches, loss) and method (methods.py: what trains),
read top to bottom as `train()` = `set_up()` → `run_steps()` → `finish()`. Each micro-batch's summed loss is divided
by the step's units (supervised tokens, pairs or replies), so accumulation equals one big batch. Ctrl-C checkpoints
and stops; `resume_from_checkpoint` continues exactly. Two hooks are here and only here: `wrap_model()` (the one place
the model is wrapped after set-up: DDP / FSDP2 under torchrun, train/distributed.py) and `forward_precision()` (the
context every forward runs under: autocast). Under torchrun every process runs this same loop on its share of each
micro-batch; only rank 0 writes. Must not know a stage or a method by name.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import allocator
from ..config import Config
from ..data.render import ensure_chat_template
from ..errors import UserError
from ..model import packed_attention as attention
from ..model.lean_mlp import use_lean_mlp
from ..model.loader import load_model, load_tokenizer, pick_dtype, resolve_model
from ..model.methods import apply_method, check_method, load_base, trainable_summary, unwrap
from ..model.precision import Precision, keep_frozen_weights, training_precision
from ..model.value_head import VALUE_HEAD_FILE, detached_value_head, value_head
from ..rundir import (
    RunDir,
    TrainingState,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_artifact,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from . import distributed
from .batching import DataOrder
from .distributed import Parallel, Ranks
from .heap import trim_heap_between_layers
from .memory import MemoryEstimate, available_bytes, check_fits, estimate_peak, peak_process_bytes
from .optimizers import build_optimizer
from .plots import plot_losses
from .stages import LossOutput, Reference, Stage, StageData, reference_needs_copy, stage_of
from .step import StepResult, add_metrics, evaluate_stage, train_step
from .warm_start import continue_adapter


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


def wrap_model(model, config: Config, loss: Callable, ranks: Ranks) -> Parallel | None:
    """The one place the model is wrapped after set-up, before the optimizer sees its parameters: under torchrun,
    DDP or FSDP2 around the step's loss (train/distributed.py); one process: nothing."""
    mode = distributed.choose_mode(config.train.distributed, ranks)
    if mode is None:
        return None
    cfg = config.train
    print(f"training on {ranks.world} processes ({mode}): global batch {ranks.world} × {cfg.batch_size} per "
          f"process × {cfg.gradient_accumulation_steps} accumulation")
    return Parallel(model, loss, mode, ranks, cfg.ddp_find_unused_parameters)


def forward_precision(config: Config, model) -> Precision:
    """How every training and evaluation forward computes: bf16 autocast where this CPU multiplies bf16 fast
    (parameters and optimizer state stay float32), half precision with autocast on a GPU (float16 with a gradient
    scaler), else float32 — model/precision.py decides at the model's shapes and says which and why on stderr."""
    return training_precision(config.model.dtype, getattr(unwrap(model), "config", None))


def round_frozen_weights(config: Config, model, precision: Precision, ranks: Ranks) -> str | None:
    """Under bf16 autocast on a CPU the frozen weight matrices are rounded to bf16 once, before the first step
    (model/precision.py), so autocast stops re-casting them at every use — where only what trains is saved (an
    adapter; freeze / full save the whole model), the base is not quantised, and one process or DDP trains (FSDP2
    shards groups of one dtype). Returns the line to print, or None when nothing changed."""
    if precision.frozen_dtype is None or config.method.spec.saves_model or config.method.bits:
        return None
    if distributed.choose_mode(config.train.distributed, ranks) not in (None, "ddp"):
        return None
    count, saved = keep_frozen_weights(unwrap(model), precision.frozen_dtype)
    return f"frozen weights: {count} matrices kept in bf16 ({saved / 2**20:,.0f} MiB less)" if count else None


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
        add_metrics(self.metrics, result.metrics or {})

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
    scaler: torch.amp.GradScaler | None = None  # float16 autocast on a GPU
    ranks: Ranks = field(default_factory=Ranks)  # this process among the training processes (torchrun)
    parallel: Parallel | None = None  # DDP / FSDP2 around the step's loss when several processes train
    memory: MemoryEstimate | None = None

    def batch(self, units: list):
        batch = self.stage.batch(units, self.config.method.virtual_tokens, self.pad_id)
        device = next(self.model.parameters()).device
        return batch if device.type == "cpu" else distributed.to_device(batch, device)

    def loss(self, model, batch) -> LossOutput:
        return self.stage.loss(self.config, model, batch, self.reference)

    def rebuild(self):
        """A fresh copy of the model with the method applied, unsharded (FSDP saves the gathered weights into it)."""
        return _model_with_method(self.config, self.stage, resolve_model(self.config.model.name_or_path))

    def step_loss(self, model, batch) -> LossOutput:
        """The loss the loop trains and evaluates on: through the wrapped module when several processes train."""
        return self.loss(model, batch) if self.parallel is None else LossOutput(*self.parallel.loss(batch))

    def micro_batches(self, step: int) -> tuple[list, list[float]]:
        """This process's micro-batches of optimizer step `step` and their weights (0: a stand-in, see Ranks.share)."""
        batches, weights = [], []
        for indices in self.order.step(step):
            mine, stand_in = self.ranks.share(indices)
            batches.append(self.batch([self.data.train[i] for i in mine]))
            weights.append(0.0 if stand_in else 1.0)
        return batches, weights

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def train(config: Config, callback: Callable[[dict], bool | None] | None = None) -> RunDir:
    """Run one training job. `callback(record)` sees every logged record; returning True stops like Ctrl-C.
    Under torchrun, this process joins the others first; only rank 0 prints and writes."""
    ranks = distributed.ranks_from_environment()
    with ExitStack() as stack:
        if distributed.start(ranks, distributed.training_device(ranks), config.train.ddp_timeout):
            stack.callback(distributed.stop)
        if not ranks.is_main:
            stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            session = set_up(config, ranks)
            step = run_steps(session, callback)
            run = finish(session, step)
            # DDP's reducer holds the process group. Freed after distributed.stop(), it would destroy the group from
            # a destructor that keeps the GIL while joining gloo's worker thread, which may need the GIL to free the
            # last barrier's tensors: a finished rank that never exits. Freed here, the group is still registered.
            del session
            gc.collect()
            return run
        except RuntimeError as error:
            if not (ranks.distributed and distributed.peer_lost(error)):
                raise
            raise UserError(f"training process {ranks.rank}: another process stopped (its message is above); "
                            f"stopping too") from None


def set_up(config: Config, ranks: Ranks | None = None) -> TrainingSession:
    """Everything before the first step: the run dir (checked before any work), data, the memory pre-flight, model +
    method, reference, the wrapping for several processes, optimizer and schedule, and the state of the checkpoint
    being resumed."""
    cfg = config.train
    ranks = ranks or Ranks()
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
    if not ranks.is_main:  # rank 0 prepares the data and the run dir first; the others then read its caches
        distributed.barrier(ranks)
    data = _set_up_data(config, stage, tokenizer, run, resuming=resume_from is not None, writes=ranks.is_main)
    if ranks.is_main:
        distributed.barrier(ranks)
    device = distributed.training_device(ranks)
    memory = _check_memory(config, stage, model_path, data, ranks, device)

    model = _set_up_model(config, stage, model_path).to(device)
    reference = _set_up_reference(config, stage, model, model_path)

    def loss(model, batch):
        return stage.loss(config, model, batch, reference)

    precision = forward_precision(config, model)
    rounded = round_frozen_weights(config, model, precision, ranks)  # before DDP copies the model's state
    if rounded:
        print(rounded)
    if device.type == "cpu":
        print(allocator.describe())
    parallel = wrap_model(model, config, loss, ranks)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, model, ranks.world)  # train/optimizers.py: train.optim, LoRA+, GaLore, …
    order = DataOrder(len(data.train), cfg.batch_size * ranks.world, cfg.gradient_accumulation_steps, cfg.seed)
    steps = total_steps(config, order)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    start, history = 0, []
    if resume_from is not None:
        start = _restore(resume_from, model, optimizer, scheduler, parallel, ranks, cfg.seed)
        history = _read_metrics(run.metrics, upto=start)
        print(f"resumed from {resume_from} at step {start}")
    if ranks.is_main:
        _write_metrics(run.metrics, history)
    return TrainingSession(config, stage, run, tokenizer, data, model, reference, parameters, optimizer, scheduler,
                           order, steps, start, history, precision.context(), scaler, ranks, parallel, memory)


def _set_up_data(config: Config, stage: Stage, tokenizer, run: RunDir, resuming: bool, writes: bool = True
                 ) -> StageData:
    """The stage's data, summarised on the terminal; then the run dir is created with config.yaml and data_report
    (by rank 0 only, when several processes train)."""
    data = stage.prepare(config, tokenizer)
    print(f"data ({stage.name}): train {len(data.train)} units, {data.report['train_tokens']:,} tokens "
          f"({data.report['train_supervised_tokens']:,} trained) · val {len(data.val)} · "
          f"{stage.summary(data.report)}")
    if not writes:
        return data
    run.prepare(config.train.overwrite_output_dir, resuming=resuming)
    run.config.write_text(config.to_yaml(), encoding="utf-8")
    run.data_report.write_text(json.dumps(data.report, indent=2, ensure_ascii=False), encoding="utf-8")
    return data


def _set_up_model(config: Config, stage: Stage, model_path: str):
    """The base with the method applied (only its parameters train) and what the stage adds, ready for packed
    training."""
    model = prepare_for_training(_model_with_method(config, stage, model_path))
    print(trainable_summary(model))
    return model


def _model_with_method(config: Config, stage: Stage, model_path: str):
    model = apply_method(load_base(model_path, pick_dtype(config.model.dtype), config.method), config.method)
    if config.model.adapter:  # LLaMA-Factory's adapter_name_or_path: training continues that adapter
        print(continue_adapter(model, config.model.adapter))
    stage.prepare_model(model)
    return model


def _set_up_reference(config: Config, stage: Stage, model, model_path: str) -> Reference | None:
    """dpo / kto compare against the model before training: the adapter switched off, or a frozen copy."""
    if not stage.needs_reference:
        return None
    frozen = None
    if reference_needs_copy(model):  # full / freeze change the base: the reference is a frozen copy of it
        frozen = prepare_for_training(load_model(model_path, pick_dtype(config.model.dtype))).eval()
        frozen.to(next(model.parameters()).device)
        frozen.requires_grad_(False)
    return Reference(frozen)


def _check_memory(config: Config, stage: Stage, model_path: str, data: StageData, ranks: Ranks,
                  device: torch.device) -> MemoryEstimate:
    """The pre-flight, printed on every run: the estimated peak of this process, refused when it cannot fit."""
    cfg = config.train
    sizes = sorted((_unit_tokens(unit) for unit in data.train), reverse=True)[:cfg.batch_size]
    longest = len(sizes) * sizes[0] if config.method.virtual_tokens and sizes else sum(sizes)
    mode = distributed.choose_mode(cfg.distributed, ranks)
    estimate = estimate_peak(config, model_path, longest, ranks.world, mode, distributed.processes_here(),
                             str(device), stage.needs_reference and config.method.type in ("full", "freeze"))
    print(estimate.summary())
    if not cfg.skip_memory_check:
        check_fits(estimate, available_bytes(str(device)), config.method.type, cfg.batch_size,
                   config.data.cutoff_len, ranks.world, mode)
    return estimate


def _unit_tokens(unit) -> int:
    """Tokens of a unit of any stage: an Example, a pt block (a list of them), a pair or a KTO triple."""
    if hasattr(unit, "input_ids"):
        return len(unit.input_ids)
    if isinstance(unit, (list, tuple)):
        return sum(_unit_tokens(part) for part in unit)
    return 0


def _restore(path: Path, model, optimizer, scheduler, parallel: Parallel | None, ranks: Ranks, seed: int) -> int:
    """Load a checkpoint written by any number of processes into this run (of any number); returns its step."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    training, record = load_checkpoint(path, names)
    if parallel is None:
        model.load_state_dict(training.trainable, strict=False)
        optimizer.load_state_dict(training.optimizer)
    else:
        parallel.load_trainable(training.trainable)
        parallel.load_optimizer_state(optimizer, training.optimizer)
    scheduler.load_state_dict(training.scheduler)
    if ranks.rank < len(training.rng):
        set_rng_state(training.rng[ranks.rank])
    else:  # more processes than the checkpoint had: a fresh, distinct stream for this one
        torch.manual_seed(seed + 7919 * ranks.rank + record["step"])
    return record["step"]


def _save_checkpoint(session: TrainingSession, step: int) -> Path | None:
    """Every process takes part (FSDP gathers the shards); rank 0 writes. Returns the path on rank 0."""
    parallel = session.parallel
    if parallel is None:
        training = TrainingState(trainable_state(session.model), session.optimizer.state_dict(),
                                 session.scheduler.state_dict(), [rng_state()])
    else:
        training = TrainingState(parallel.trainable_state(), parallel.optimizer_state(session.optimizer),
                                 session.scheduler.state_dict(), distributed.gather_objects(rng_state(), session.ranks))
    if not session.ranks.is_main:
        return None
    return save_checkpoint(session.run, step, training, {"epoch": step / session.order.steps_per_epoch},
                           session.config.train.save_total_limit)


def run_steps(session: TrainingSession, callback: Callable[[dict], bool | None] | None = None) -> int:
    """Optimizer steps from session.start until the end, Ctrl-C or the callback asks to stop; logs, evaluates and
    checkpoints on schedule. Returns the step reached."""
    cfg, run, data, order, steps = session.config.train, session.run, session.data, session.order, session.steps
    totals = RunningTotals()
    main = session.ranks.is_main
    progress = tqdm(total=steps, initial=session.start, desc="train", unit="step", dynamic_ncols=True,
                    disable=not main)
    step = session.start
    with _StopRequest() as stop:
        while step < steps and not stop.requested:
            micro_batches, weights = session.micro_batches(step)
            result = train_step(session.model, micro_batches, session.parameters, session.optimizer,
                                session.scheduler, cfg.max_grad_norm, session.step_loss, session.precision,
                                session.parallel, weights, session.scaler)
            totals.add(result)
            step += 1
            progress.update(1)

            record = None
            if step % cfg.logging_steps == 0 or step == steps:
                record = totals.record(step, step / order.steps_per_epoch, result.grad_norm,
                                       session.scheduler.get_last_lr()[0])
            if data.val and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == steps):
                record = (record or {"step": step}) | evaluate_stage(session.model, data.val, cfg.eval_batch_size,
                                                                     session.batch, session.step_loss,
                                                                     session.precision)
            if record:
                session.history.append(record)
                if main:
                    _append_metric(run.metrics, record)
                    progress.set_postfix(loss=record.get("loss"), refresh=False)
                    tqdm.write(json.dumps(record))
                if callback and callback(record):
                    stop.requested = True
            if session.parallel is not None:  # every process stops at the same step (Ctrl-C may reach one)
                stop.requested = session.parallel.any(stop.requested)
            if cfg.save_steps and step % cfg.save_steps == 0 or (stop.requested and step < steps):
                path = _save_checkpoint(session, step)
                if path is not None:
                    tqdm.write(f"saved checkpoint {path}")
    progress.close()
    return step


def finish(session: TrainingSession, step: int) -> RunDir:
    """The loss plot; then, when every step ran, the artifact (adapter/ or model/, + the reward model's value head)
    and the run marked finished — otherwise how to continue."""
    run, main = session.run, session.ranks.is_main
    if main:
        plot_losses(session.history, run.loss_plot)
    if step < session.steps:
        print(f"stopped at step {step}/{session.steps}; continue with: lmforge train {run.config} "
              f"train.resume_from_checkpoint=latest")
        return run
    whole = session.parallel.whole_model(session.rebuild) if session.parallel else nullcontext(session.model)
    with whole as model:
        if main:  # under FSDP, rank 0 holds the gathered weights
            path = _save_trained(session, model)
    distributed.barrier(session.ranks)
    run.finished = True
    if main:
        print(f"done: {path}  ·  {session.stage.follow_up(run.root)}")
    if session.memory is not None and session.memory.device == "cpu":
        print(f"memory: peak {peak_process_bytes() / 2**30:.2f} GiB, estimated {session.memory.peak / 2**30:.2f} GiB "
              f"(this process)")
    return run


def _save_trained(session: TrainingSession, model) -> Path:
    """adapter/ or model/, and the reward model's value head beside the weights, not inside them (a full model/
    must reload as a plain causal LM)."""
    head = value_head(model)
    method = session.config.method.type
    if head is None:
        return save_artifact(session.run, model, session.tokenizer, method)
    with detached_value_head(model):
        return save_artifact(session.run, model, session.tokenizer, method,
                             extra={VALUE_HEAD_FILE: head.state_dict()})


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
