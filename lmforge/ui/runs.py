"""What the board shows about a run, read from its run dir only (the rundir.py contract), so runs started from the CLI,
from another browser or before a restart of the board look the same.

Owns: a run's summary (status, step / total, ETA, which weights exist, eval / sweep / export results), reading
metrics.jsonl from a line offset (for the SSE stream), the log tail, and the hints (NaN or divergence, eval loss
rising while train loss falls, nothing supervised). Must not start processes or load models.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import yaml

from ..rundir import RunDir, complete_checkpoints
from .jobs import JOB_FILE, TRAIN_LOG, Job


def read_metrics(run: RunDir, start_line: int = 0) -> tuple[list[dict], int]:
    """Records of metrics.jsonl from line `start_line` on, and the line count read so far. A line still being
    written (no newline yet) is left for the next call."""
    if not run.metrics.is_file():
        return [], start_line
    text = run.metrics.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # the last piece has no newline yet (or is empty)
    if len(lines) < start_line:  # rewritten (a resume keeps the history up to its checkpoint): start over
        start_line = 0
    records = []
    for line in lines[start_line:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"unreadable": line[:200]})
    return records, len(lines)


def read_config(run: RunDir) -> dict:
    try:
        data = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def log_tail(run: RunDir, max_bytes: int = 8000) -> str:
    path = run.root / TRAIN_LOG
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - max_bytes))
        text = handle.read().decode("utf-8", errors="replace")
    return terminal_text(text)


def terminal_text(text: str) -> str:
    """What a terminal would show: a progress bar redrawn with carriage returns keeps only its last state."""
    lines = [next((part for part in reversed(line.split("\r")) if part.strip()), "") for line in text.split("\n")]
    return "\n".join(line for line in lines if line.strip())


def total_steps(config: dict, records: list[dict]) -> int | None:
    """max_steps, or epochs × steps per epoch (read back from the logged epoch fraction of a step)."""
    train = config.get("train") or {}
    if isinstance(train.get("max_steps"), int) and train["max_steps"] > 0:
        return train["max_steps"]
    for record in reversed(records):
        if record.get("epoch") and record.get("step"):
            per_epoch = round(record["step"] / record["epoch"])
            return max(1, math.ceil(per_epoch * float(train.get("num_train_epochs", 3))))
    return None


def status(run: RunDir, job: Job | None) -> str:
    if job is not None and job.state in ("queued", "running", "stopping"):
        return job.state
    if (run.adapter / "adapter_config.json").is_file() or (run.model / "config.json").is_file():
        return "finished"
    if job is not None and job.state == "failed":
        return "failed"
    if complete_checkpoints(run) or (job is not None and job.state == "stopped"):
        return "stopped"
    return "failed" if job is not None and job.state in ("done", "ended") else "not started"


def summary(run: RunDir, job: Job | None, *, detail: bool = False) -> dict:
    config = read_config(run)
    records, _ = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    step = max((r.get("step", 0) for r in records), default=0)
    total = total_steps(config, records)
    state = status(run, job)
    result = {"name": run.root.name, "status": state, "step": step, "total_steps": total,
              "model": (config.get("model") or {}).get("name_or_path"),
              "method": (config.get("method") or {}).get("type"), "stage": (config.get("train") or {}).get("stage"),
              "loss": train_records[-1]["loss"] if train_records else None,
              "checkpoints": [p.name for p in complete_checkpoints(run)],
              "artifact": next((p.name for p in (run.adapter, run.model) if p.is_dir()), None),
              "updated": max((p.stat().st_mtime for p in (run.config, run.metrics) if p.is_file()), default=None),
              "job": job.to_dict() if job else None,
              "eta_seconds": eta_seconds(run, job, records, total) if state == "running" else None}
    if detail:
        result.update(config=config, hints=hints(run, records), eval=read_json(run.eval_report),
                      best=read_json(run.best_marker), sweep=read_json(run.sweep_report),
                      sweep_plot=run.sweep_plot.is_file(), loss_plot=run.loss_plot.is_file(),
                      data_report=read_json(run.data_report))
    return result


def eta_seconds(run: RunDir, job: Job | None, records: list[dict], total: int | None) -> float | None:
    """Seconds left at the pace since the child started (or since config.yaml was written, for a CLI run)."""
    if not records or not total:
        return None
    begun = job.started if job and job.started else (run.config.stat().st_mtime if run.config.is_file() else None)
    first_step = int(job.meta.get("start_step", 0)) if job and job.started else 0  # a resume counts its own steps
    last = records[-1].get("step") or 0
    if begun is None or last <= first_step:
        return None
    seconds_per_step = (run.metrics.stat().st_mtime - begun) / (last - first_step)
    left = max(0, total - last) * seconds_per_step - (time.time() - run.metrics.stat().st_mtime)
    return round(max(left, 0.0), 1)


def hints(run: RunDir, records: list[dict]) -> list[dict]:
    """What a user should act on, each with an id the page translates and the figures behind it."""
    found = []
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    bad = [s for s, loss in losses if not math.isfinite(loss)] + \
          [r["step"] for r in records if isinstance(r.get("grad_norm"), float) and not math.isfinite(r["grad_norm"])]
    if bad:
        found.append({"id": "nan", "step": min(bad)})
    elif len(losses) >= 3:
        lowest = min(loss for _, loss in losses)
        if losses[-1][1] > 2 * lowest and losses[-1][1] - lowest > 0.5:
            found.append({"id": "diverging", "step": losses[-1][0], "loss": losses[-1][1], "lowest": lowest})
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if len(evals) >= 3:
        best_step, best_eval = min(evals, key=lambda e: e[1])
        train_at = [loss for step, loss in losses if step <= best_step]
        if evals[-1][1] > best_eval * 1.01 and train_at and losses[-1][1] < train_at[-1]:
            found.append({"id": "overfitting", "best_step": best_step, "best_eval_loss": best_eval,
                          "last_eval_loss": evals[-1][1]})
    report = read_json(run.data_report) or {}
    rates = [r["supervised_tokens_per_s"] for r in records if "supervised_tokens_per_s" in r]
    if report.get("train_supervised_tokens") == 0 or (rates and not any(rates)):
        found.append({"id": "no_supervised"})
    return found


def job_file(run: RunDir) -> Path:
    return run.root / JOB_FILE
