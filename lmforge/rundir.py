"""The run directory: its layout, atomic checkpoints, exact resume, the final trained artifact, and which weights
of a run the later stages use (the `best.json` marker written by `lmforge eval --all-checkpoints`).

runs/<name>/ config.yaml · data_report.json · metrics.jsonl · loss.png · adapter/ (PEFT) or model/ (full weights),
each with the tokenizer and its chat template · checkpoints/step-N/ · eval.json · predictions.jsonl · best.json ·
sweep.json · sweep.png · evals/<step-N|final>/. Everything is written to a temporary name and renamed into place, so
an interrupted save never leaves something a later resume or chat would trust. Must not load models.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, UserError

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.json"  # which weights chat / export / serve use by default (written by lmforge eval)
EVAL_FILE = "eval.json"  # metrics of the weights the run uses by default
PREDICTIONS_FILE = "predictions.jsonl"


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
    best_marker = property(lambda self: self.root / BEST_FILE)
    eval_report = property(lambda self: self.root / EVAL_FILE)
    predictions = property(lambda self: self.root / PREDICTIONS_FILE)
    sweep_report = property(lambda self: self.root / "sweep.json")
    sweep_plot = property(lambda self: self.root / "sweep.png")
    evals = property(lambda self: self.root / "evals")  # one evaluation per weights: evals/step-N/, evals/final/

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
            for path in (self.adapter, self.model, self.checkpoints, self.evals):
                shutil.rmtree(path, ignore_errors=True)
            for path in (self.metrics, self.loss_plot, self.data_report, self.best_marker, self.eval_report,
                         self.predictions, self.sweep_report, self.sweep_plot):
                path.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        _prune(self, keep=None)

    def artifact(self) -> Path:
        """The trained result: adapter/ or model/."""
        for path in (self.adapter, self.model):
            if (path / "config.json").exists() or (path / "adapter_config.json").exists():
                return path
        if not self.root.is_dir():
            raise UserError(f"run dir {self.root} does not exist (train one with `lmforge train CONFIG.yaml`)")
        steps = [p.name for p in complete_checkpoints(self)]
        pick = (f"; it has checkpoints ({', '.join(steps)}): evaluate or use one with --checkpoint {steps[-1]}"
                if steps else "")
        raise UserError(f"{self.root} has no trained adapter/ or model/ — has training finished? "
                        f"(train with `lmforge train CONFIG.yaml`){pick}")

    def read_best(self) -> dict | None:
        """The best.json marker, or None when no sweep has chosen a best checkpoint."""
        if not self.best_marker.is_file():
            return None
        try:
            record = json.loads(self.best_marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"{self.best_marker}: not valid JSON ({error}); delete it or rerun "
                            f"`lmforge eval {self.root} --data TEST --all-checkpoints`") from None
        if not isinstance(record, dict) or not isinstance(record.get("weights"), str):
            raise UserError(f"{self.best_marker}: expected an object with \"weights\" (a path inside the run dir); "
                            f"delete it or rerun `lmforge eval {self.root} --data TEST --all-checkpoints`")
        return record

    def write_json(self, path: Path, record: dict) -> None:
        """Write a JSON file of the run atomically (temp name + rename)."""
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def final_step(self) -> int | None:
        """The last step of a finished run (the step of adapter/ or model/), from metrics.jsonl."""
        if not self.metrics.is_file():
            return None
        steps = [json.loads(line).get("step") for line in self.metrics.read_text().splitlines() if line.strip()]
        return max((s for s in steps if isinstance(s, int)), default=None)


@dataclass(frozen=True)
class RunWeights:
    """One set of weights of a run: the final adapter/ or model/, or a checkpoint (base + method + trainable
    tensors). `reason` says in words which one and why, for the "using …" line chat / eval / serve print."""

    run: RunDir
    label: str  # "final" or "step-N"
    path: Path  # adapter/, model/ or checkpoints/step-N/
    step: int | None
    reason: str

    @property
    def is_checkpoint(self) -> bool:
        return self.label != "final"


def choose_weights(run: RunDir, which: str | None = None) -> RunWeights:
    """Which weights of a run to use: `which` = None (the best checkpoint if best.json names one, else the final
    artifact), "best", "final", "step-N" / "N", or a checkpoint dir of this run."""
    if which in (None, "best"):
        best = run.read_best()
        if best is None:
            if which == "best":
                raise UserError(f"{run.root} has no {BEST_FILE}: choose one with "
                                f"`lmforge eval {run.root} --data TEST.jsonl --all-checkpoints`")
            return _final_weights(run, "final weights")
        figure = f" ({best['metric']} {best['value']:g})" if "metric" in best and "value" in best else ""
        if best.get("label") == "final":
            return _final_weights(run, "best weights: the final", figure)
        target = run.root / best["weights"]
        if not (target / STATE_FILE).is_file():
            if which == "best":
                raise UserError(f"{run.best_marker} names {target}, which is not a complete checkpoint any more; "
                                f"rerun `lmforge eval {run.root} --data TEST.jsonl --all-checkpoints`")
            return _final_weights(run, "final weights", f" ({BEST_FILE} names {best['weights']}, which is gone)")
        return RunWeights(run, target.name, target, _step_of(target), f"best checkpoint {target.name}{figure}")
    if which == "final":
        return _final_weights(run, "final weights")
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        path = run.checkpoints / (which if which.startswith("step-") else f"step-{which}")
    if not (path / STATE_FILE).is_file() or _step_of(path) < 0:
        available = ", ".join(p.name for p in complete_checkpoints(run)) or "none"
        raise UserError(f"{which!r} is not a checkpoint of {run.root} (complete checkpoints: {available}); use "
                        f"step-N, final or best")
    return RunWeights(run, path.name, path, _step_of(path), f"checkpoint {path.name}")


def _final_weights(run: RunDir, what: str, detail: str = "") -> RunWeights:
    artifact = run.artifact()
    return RunWeights(run, "final", artifact, run.final_step(), f"{what} {artifact.name}/{detail}")


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


@dataclass
class TrainingState:
    """What a checkpoint holds besides its step record: the trainable tensors, optimizer and schedule state, and each
    training process's random-number state (one entry per rank; a single-process run has one)."""
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: list[dict]


def rng_state() -> dict:
    """This process's random-number state (torch, Python, and CUDA where present)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run: RunDir, step: int, training: TrainingState, state: dict, keep: int | None) -> Path:
    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(training.trainable, str(tmp / TRAINABLE_FILE))
    torch.save({"optimizer": training.optimizer, "scheduler": training.scheduler, "rng": training.rng},
               tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(run, keep)
    return final


def _prune(run: RunDir, keep: int | None) -> None:
    """Remove what an interrupted save left behind, and checkpoints beyond the newest `keep` — except the one
    best.json names, which chat / export / serve use."""
    for stale in run.checkpoints.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        best = run.best_marker.is_file() and (run.read_best() or {}).get("weights")
        for old in complete_checkpoints(run)[:-keep]:
            if best and old.resolve() == (run.root / best).resolve():
                continue
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, trainable_names: set[str]) -> tuple[TrainingState, dict]:
    """A checkpoint's training state and its step record, checked against the names of the run's trainable tensors."""
    weights = load_file(str(path / TRAINABLE_FILE))
    if set(weights) != trainable_names:
        raise ConfigError(f"checkpoint {path} does not match this model/method: it holds {len(weights)} trainable "
                          f"tensors, the run expects {len(trainable_names)} (was the method or model changed?)")
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    rng = extra["rng"] if isinstance(extra["rng"], list) else [extra["rng"]]  # before multi-process runs: one state
    training = TrainingState(weights, extra["optimizer"], extra["scheduler"], rng)
    return training, json.loads((path / STATE_FILE).read_text())


def save_artifact(run: RunDir, model, tokenizer, method: str, *,
                  extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write adapter/ (an adapter dir: PEFT format, or lmforge's bottleneck adapters in the same layout) or model/
    (full / freeze: full weights), with the tokenizer and its chat template, and `extra` safetensors files (a reward
    model's value head)."""
    from .model.method_specs import METHOD_SPECS
    from .model.methods import save_trained

    final = run.model if METHOD_SPECS[method].saves_model else run.adapter
    tmp = run.root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_trained(model, tmp)
    tokenizer.save_pretrained(tmp)
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
