"""Training beyond one process, measured: (1) DDP scaling on this machine — 1 process vs N processes × 1 torch thread
each, same global batch, real tokens/s; (2) the memory pre-flight's estimate against the measured peak of the same
run, for several configurations. Every run is a real `lmforge train` child process (torchrun for N > 1) on the
bundled model; the figures are read from what the run prints and writes (metrics.jsonl, the "memory:" line).

    python benchmarks/distributed.py                         # both parts
    python benchmarks/distributed.py --part scaling --steps 6
    python benchmarks/distributed.py --part memory --json benchmarks/distributed_DATE.json

Measures; changes nothing. The machine line (CPU model, flags, load) is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_info, machine_line  # noqa: E402

DATA = [str(ROOT / "examples/data/identity.jsonl"), str(ROOT / "examples/data/domain.jsonl")]


def config(out: Path, method: dict, batch_size: int, cutoff: int, steps: int, stage: str = "sft",
           data: list[str] | None = None, **train) -> dict:
    return {"name": out.name, "model": {"name_or_path": "smollm2-135m-instruct"},
            "method": {"lora_dropout": 0.0, **method}, "data": {"train": data or DATA, "cutoff_len": cutoff},
            "train": {"output_dir": str(out), "stage": stage, "batch_size": batch_size, "max_steps": steps,
                      "logging_steps": 1, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
                      "overwrite_output_dir": True, **train}}


def run(work: Path, name: str, body: dict, nproc: int = 1, threads: int = 1) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    command = [sys.executable, "-m", "lmforge", "train", str(path)]
    if nproc > 1:
        command += ["--nproc", str(nproc), "--threads-per-rank", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (Path(body["train"]["output_dir"]) / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    memory = [line for line in done.stdout.splitlines() if line.startswith("memory: peak")]
    estimate = [line for line in done.stdout.splitlines() if line.startswith("memory estimate")]
    return {"records": records, "memory": memory[0] if memory else None, "estimate": estimate[0] if estimate else None}


def scaling(work: Path, steps: int, global_batch: int, nprocs: list[int], threads: int) -> list[dict]:
    """Same global batch and data order; tokens/s of the steps after the first (warm-up). Each process count runs
    with 1 torch thread per process; then one process with `threads` threads, what the same cores give one process."""
    rows = []
    for n, per_process in [(n, 1) for n in nprocs] + ([(1, threads)] if threads > 1 else []):
        name = f"scale{n}x{per_process}"
        body = config(work / name, {"type": "lora", "lora_rank": 8}, global_batch // n, 512, steps)
        body["model"]["dtype"] = "float32"  # the same arithmetic in every run
        result = run(work, name, body, nproc=n, threads=per_process)
        timed = result["records"][1:]
        rows.append({"processes": n, "threads_per_process": per_process, "batch_per_process": global_batch // n,
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
                     "losses": [r["loss"] for r in result["records"]]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


MEMORY_CONFIGS = {
    "lora b4 c512": ({"type": "lora"}, 4, 512, "sft"),
    "lora b8 c1024": ({"type": "lora"}, 8, 1024, "sft"),
    "full b4 c512": ({"type": "full"}, 4, 512, "sft"),
    "freeze b4 c512": ({"type": "freeze", "freeze_trainable_layers": 4}, 4, 512, "sft"),
    "qlora b4 c512": ({"type": "qlora"}, 4, 512, "sft"),
    "prefix b4 c512": ({"type": "prefix"}, 4, 512, "sft"),
}


def memory(work: Path, steps: int, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        method, batch, cutoff, stage = MEMORY_CONFIGS[name]
        body = config(work / name.replace(" ", "_"), method, batch, cutoff, steps, stage)
        body["model"]["dtype"] = "float32"
        result = run(work, name.replace(" ", "_"), body)
        line = result["memory"]
        measured = float(line.split("memory: peak ", 1)[1].split(" GiB", 1)[0])
        estimated = float(line.split("estimated ", 1)[1].split(" GiB", 1)[0])
        rows.append({"config": name, "measured_gib": measured, "estimated_gib": estimated,
                     "error": round((estimated - measured) / measured, 3), "estimate_line": result["estimate"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["scaling", "memory", "both"], default="both")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="also one process with this many threads")
    parser.add_argument("--configs", nargs="+", default=list(MEMORY_CONFIGS), choices=list(MEMORY_CONFIGS))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    report = {"machine_start": machine_info()}
    print(machine_line(report["machine_start"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.part in ("scaling", "both"):
            report["scaling"] = scaling(work, args.steps, args.global_batch, args.nproc, args.threads)
        if args.part in ("memory", "both"):
            report["memory"] = memory(work, max(2, args.steps // 2), args.configs)
    report["machine_end"] = machine_info()
    print(machine_line(report["machine_end"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
