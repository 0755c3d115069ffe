"""One optimizer step and one evaluation pass, for every stage and method: micro-batches → loss (divided by the
units of the whole step, so accumulation equals one big batch) → backward → clip → optimizer and schedule. Under
torchrun the same step runs on each process's share, with the divisor and the figures summed over all processes.
Must not know a stage or a method by name; the loop (loop.py) decides when to step, log, evaluate and save.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .distributed import Parallel
from .losses import sft_loss_sum
from .stages import LossOutput


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
               loss_fn: Callable = _sft_loss, precision: Callable[[], AbstractContextManager] = nullcontext,
               parallel: Parallel | None = None, weights: list[float] | None = None,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One optimizer step over micro-batches; each micro-batch's summed loss is divided by the units of the whole
    step, so accumulating micro-batches equals one large batch. Forwards run under `precision()`.

    Under torchrun (`parallel`) this process holds its share of the step's micro-batches (weight 0 marks a stand-in
    for an empty share); the divisor is the whole step's units over all processes divided by their number, because
    DDP and FSDP average gradients — so N processes × batch b train exactly as one process × batch N·b.
    `scaler`: float16 autocast on a GPU scales the loss and unscales the gradients before clipping."""
    weights = weights or [1.0] * len(micro_batches)
    units = sum(b.units for b, weight in zip(micro_batches, weights) if weight)
    divisor = units if parallel is None else parallel.sum([units])[0] / parallel.ranks.world
    loss_sum, metrics = 0.0, {}
    for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
        with parallel.no_sync(last=i == len(micro_batches) - 1) if parallel else nullcontext():
            with precision():
                output = loss_fn(model, batch)
            loss = output.loss_sum / divisor * weight
            (scaler.scale(loss) if scaler else loss).backward()
        if weight:
            loss_sum += output.loss_sum.item()
            add_metrics(metrics, output.metrics)
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    if scaler:  # skips the step when the scaled gradients overflowed, and adjusts the scale
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    counted = [b for b, weight in zip(micro_batches, weights) if weight]
    result = StepResult(loss_sum, sum(b.num_supervised for b in counted), sum(b.num_tokens for b in counted),
                        float(grad_norm), units, metrics)
    return result if parallel is None else _summed_over_processes(result, parallel)


def _summed_over_processes(result: StepResult, parallel: Parallel) -> StepResult:
    """The step's figures over every process (each holds its share), for the record rank 0 writes."""
    names = sorted(result.metrics or {})
    values = [result.loss_sum, result.supervised, result.tokens, result.units]
    values += [v for name in names for v in result.metrics[name]]
    total = parallel.sum(values)
    metrics = {name: (total[4 + 2 * i], int(total[5 + 2 * i])) for i, name in enumerate(names)}
    return StepResult(total[0], int(total[1]), int(total[2]), result.grad_norm, int(total[3]), metrics)


def add_metrics(into: dict, metrics: dict) -> None:
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
        add_metrics(metrics, output.metrics)
    model.train()
    return {"eval_loss": round(loss_sum / max(count, 1), 4),
            **{f"eval_{name}": round(total / max(n, 1), 4) for name, (total, n) in metrics.items()}}
