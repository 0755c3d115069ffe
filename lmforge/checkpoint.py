"""The run directory: its layout, atomic checkpoints, exact resume, and the final trained artifact.

runs/<name>/ config.yaml · data_report.json · metrics.jsonl · loss.png · adapter/ (PEFT) or model/ (full weights),
each with the tokenizer and its chat template · checkpoints/step-N/. Everything is written to a temporary name and
renamed into place, so an interrupted save never leaves something a later resume or chat would trust.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, UserError

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.finished = False  # set by train() when every step ran and the artifact was written

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    data_report = property(lambda self: self.root / "data_report.json")
    loss_plot = property(lambda self: self.root / "loss.png")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    model = property(lambda self: self.root / "model")

    def has_results(self) -> bool:
        return any(p.exists() for p in (self.adapter, self.model, self.checkpoints, self.metrics))

    def check_free(self, overwrite: bool, resuming: bool) -> None:
        """Refuse to start over a previous run unless told to replace or continue it."""
        if self.has_results() and not (overwrite or resuming):
            raise ConfigError(f"output dir {self.root} already holds a run: set train.overwrite_output_dir=true to "
                              f"replace it, train.resume_from_checkpoint=latest to continue it, or pick another name")

    def prepare(self, overwrite: bool, resuming: bool) -> None:
        self.check_free(overwrite, resuming)
        if overwrite and not resuming:
            for path in (self.adapter, self.model, self.checkpoints):
                shutil.rmtree(path, ignore_errors=True)
            for path in (self.metrics, self.loss_plot, self.data_report):
                path.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        _prune(self, keep=None)

    def artifact(self) -> Path:
        """The trained result: adapter/ or model/."""
        for path in (self.adapter, self.model):
            if (path / "config.json").exists() or (path / "adapter_config.json").exists():
                return path
        raise UserError(f"{self.root} has no trained adapter/ or model/ — has training finished? "
                        f"(train with `lmforge train CONFIG.yaml`)")


def _step_of(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(run: RunDir) -> list[Path]:
    if not run.checkpoints.is_dir():
        return []
    found = [p for p in run.checkpoints.iterdir() if _step_of(p) >= 0 and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def resolve_resume(run: RunDir, value: str | None) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = complete_checkpoints(run)
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint=latest but {run.checkpoints} has no complete checkpoint")
        return found[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: RunDir, step: int, model, optimizer, scheduler, state: dict, keep: int | None) -> Path:
    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(run, keep)
    return final


def _prune(run: RunDir, keep: int | None) -> None:
    """Remove what an interrupted save left behind, and checkpoints beyond the newest `keep`."""
    for stale in run.checkpoints.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        for old in complete_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ConfigError(f"checkpoint {path} does not match this model/method: it holds {len(weights)} trainable "
                          f"tensors, the run expects {len(expected)} (was the method or model changed?)")
    model.load_state_dict(weights, strict=False)
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"])
    random.setstate(extra["rng"]["python"])
    return json.loads((path / STATE_FILE).read_text())


def save_artifact(run: RunDir, model, tokenizer, method: str) -> Path:
    """Write adapter/ (PEFT format) or model/ (full weights), with the tokenizer and its chat template."""
    final = run.adapter if method == "lora" else run.model
    tmp = run.root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
