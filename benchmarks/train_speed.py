"""LoRA SFT training speed: lmforge's packed training step vs transformers Trainer + PEFT, each in its best setting.

Systems (each in its own child process, so peak memory is its own; all get the same model, LoRA init seed and the
SAME batches in the same order):
- `lmforge` fp32 — the reference every other system's losses are compared with;
- `lmforge-bf16` — bf16 autocast chosen by lmforge/model/precision.py, the frozen weights rounded to bf16 once as
  `lmforge train` does (only on a CPU with native bf16);
- `peer` — `Trainer` + `DataCollatorForSeq2Seq` (right padding to a multiple of 8), what LLaMA-Factory runs;
- `peer-flat` — `Trainer` + `DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)` with sdpa
  attention: padding-free, transformers' own strongest CPU setting (TRL's `padding_free` is the same);
- `peer-flat-bf16` — the same with `bf16=True` (autocast), what a LLaMA-Factory user with `bf16: true` gets (only on a
  CPU with native bf16).
Allocator: lmforge's children run on the allocator `lmforge` itself runs on (jemalloc where the system has it,
lmforge/allocator.py), the peers on glibc malloc as shipped; two more systems put the allocator beside its effect:
- `lmforge-bf16-glibc` — lmforge bf16 on glibc malloc with its heap trims (LMFORGE_ALLOCATOR=system);
- `peer-flat-bf16-jemalloc` — the bf16 flattening peer with jemalloc preloaded, the peer in its best setting here.
Each child records the allocator it ran on.
The parent prepares the batches, probes fp32 and bf16 GEMM speed at the model's shapes in the same run, runs the
children one after the other and prints the comparison plus a Markdown table for benchmarks/RESULTS.md. With
`--rounds N` every system runs N times, the order reversed every other round, so a busy machine's drift in load falls
on every system alike; the table shows each figure's median over the rounds and the per-round ratios. Measures;
changes nothing.

    python benchmarks/train_speed.py                       # 30 timed steps after 3 warm-up steps, every system
    python benchmarks/train_speed.py --steps 5 --warmup 1  # quick check
    python benchmarks/train_speed.py --profile             # + where lmforge's step time goes (torch.profiler)
    python benchmarks/train_speed.py --rounds 2            # each system twice, in alternating order (busy machine)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, step_profile.py

from machine import gemm_probe, machine_info
from train_speed_report import batch_counts, loss_check, report, useful_flops

from lmforge import allocator  # light: no torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "datasets" / "llamafactory"
DEFAULT_DATA = [DEFAULT_DATA_DIR / "alpaca_en_demo.json", DEFAULT_DATA_DIR / "alpaca_zh_demo.json"]
IGNORE_INDEX = -100
LORA_TARGETS = ["q_proj", "v_proj"]
SYSTEMS = ("lmforge", "lmforge-bf16", "peer", "peer-flat", "peer-flat-bf16", "lmforge-bf16-glibc",
           "peer-flat-bf16-jemalloc")
BF16_SYSTEMS = ("lmforge-bf16", "peer-flat-bf16", "lmforge-bf16-glibc", "peer-flat-bf16-jemalloc")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps before them (default 3)")
    parser.add_argument("--data", nargs="+", type=Path, default=None,
                        help="dataset files read with lmforge's readers, interleaved (default: LLaMA-Factory's "
                             f"alpaca_en_demo.json + alpaca_zh_demo.json in {DEFAULT_DATA_DIR})")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="lmforge model name (default: bundled)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=512, help="cutoff_len in tokens")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate, no warm-up")
    parser.add_argument("--seed", type=int, default=42, help="data shuffle and LoRA init seed")
    parser.add_argument("--pad-to-multiple-of", type=int, default=8,
                        help="peer collator padding multiple (LLaMA-Factory uses 8 when training; 0 = none)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    parser.add_argument("--system", choices=("both",) + SYSTEMS, default="both",
                        help="both = parent that runs one child per system and compares them")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                        help="which systems the parent runs (default: all; the bf16 ones only on a CPU with bf16)")
    parser.add_argument("--profile", action="store_true",
                        help="lmforge children also profile 2 extra steps (torch.profiler): GEMM / attention / "
                             "elementwise / optimizer / Python")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, the order reversed every other round (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results (per-step data) here")
    parser.add_argument("--batches", type=Path, default=None, help=argparse.SUPPRESS)  # child: prepared batches
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)      # child: result file
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be ≥ 1 and --warmup ≥ 0")
    return args


# ---------------------------------------------------------------------------------------------- data (parent)


def interleave(lists: list[list]) -> list:
    out = []
    for i in range(max(map(len, lists))):
        out += [items[i] for items in lists if i < len(items)]
    return out


def prepare_batches(args) -> tuple[list[list[dict]], dict]:
    """Read → render (chat template, loss on the reply) → truncate/drop at cutoff → seeded shuffle → batches."""
    from lmforge.data.datasets import load_conversations, resolve_dataset
    from lmforge.data.render import ensure_chat_template, render_dataset
    from lmforge.model.loader import load_tokenizer, resolve_model
    from lmforge.train.batching import DataOrder

    files = args.data or DEFAULT_DATA
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        sys.exit(f"data file(s) not found: {', '.join(missing)}; pass your own with --data FILE ...")
    per_file = [load_conversations(resolve_dataset(str(f))) for f in files]
    tokenizer = load_tokenizer(resolve_model(args.model))
    ensure_chat_template(tokenizer, None)
    examples, stats = render_dataset(tokenizer, interleave(per_file), "assistant", args.cutoff)

    order = DataOrder(len(examples), args.batch_size, 1, args.seed)  # lmforge's own per-epoch seeded shuffle
    needed = args.warmup + args.steps
    batches = []
    for step in range(needed):
        indices = order.step(step)[0]
        if len(indices) < args.batch_size:  # the last, short batch of an epoch: keep every batch full
            indices += order.epoch_order(step // order.steps_per_epoch + 1)[:args.batch_size - len(indices)]
        batches.append([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in indices])
    lengths = [len(e["input_ids"]) for b in batches for e in b]
    info = {"files": {str(f): len(c) for f, c in zip(files, per_file)}, "render": stats.summary(),
            "examples": len(examples), "batches": len(batches),
            "epochs_used": round(needed / order.steps_per_epoch, 3),
            "length_mean": round(statistics.mean(lengths), 1), "length_min": min(lengths),
            "length_max": max(lengths)}
    return batches, info


# ---------------------------------------------------------------------------------------------- memory (child)


def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak RSS of the whole child (imports + model load + training), and of the training steps alone: writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS just before the first step."""

    def mark_training_start(self) -> None:
        self.setup_peak_kb = max(proc_status_kb("VmHWM") or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.baseline_kb = proc_status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False

    def result(self) -> dict:
        end_peak = max(proc_status_kb("VmHWM") or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

        def mib(kb):
            return round(kb / 1024, 1) if kb is not None else None

        return {"peak_rss_mib": mib(max(self.setup_peak_kb, end_peak)),
                "rss_before_training_mib": mib(self.baseline_kb),
                "peak_rss_training_mib": mib(end_peak) if self.reset else None}


# ---------------------------------------------------------------------------------------------- lmforge (child)


def run_lmforge(batches: list[list[dict]], args, bf16: bool = False) -> dict:
    """lmforge's own train_step (one micro-batch per step: no accumulation), forwards under the precision
    lmforge/model/precision.py chooses for `bf16` (True: as for `bf16: true`) or float32."""
    import torch
    from transformers import get_scheduler

    from lmforge.config import MethodConfig
    from lmforge.data.render import Example
    from lmforge.model.loader import load_model, resolve_model
    from lmforge.model.methods import apply_method
    from lmforge.model.precision import keep_frozen_weights, training_precision
    from lmforge.train.batching import pack
    from lmforge.train.loop import prepare_for_training
    from lmforge.train.step import train_step

    examples = [[Example(e["input_ids"], e["labels"]) for e in batch] for batch in batches]
    model = load_model(resolve_model(args.model), torch.float32)
    torch.manual_seed(args.seed)
    model = apply_method(model, MethodConfig(type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                             lora_target=LORA_TARGETS))
    model = prepare_for_training(model)  # exactly what lmforge train does after applying the method
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    chosen = training_precision("bf16" if bf16 else "float32", model.config)
    if bf16 and chosen.autocast is None:
        sys.exit(f"lmforge-bf16: lmforge would not train in bf16 here: {chosen.reason}")
    if chosen.frozen_dtype is not None:  # what lmforge train does under bf16 autocast (loop.round_frozen_weights)
        keep_frozen_weights(model, chosen.frozen_dtype)
    precision = chosen.context()

    memory = Memory()
    memory.mark_training_start()
    counts = [batch_counts(batch) for batch in batches]
    steps = []
    previous_end, previous_cpu = time.perf_counter(), time.process_time()
    for index, batch_examples in enumerate(examples):
        batch = pack(batch_examples)
        start = time.perf_counter()
        result = train_step(model, [batch], parameters, optimizer, scheduler, 1.0, precision=precision)
        supervised, loss = result.supervised, result.loss_sum / result.supervised
        end, cpu = time.perf_counter(), time.process_time()
        steps.append({"loss": loss, "wall_s": end - previous_end, "compute_s": end - start, "cpu_s": cpu - previous_cpu,
                      "tokens": counts[index][0], "supervised": supervised, "computed_tokens": batch.num_tokens})
        print(f"[lmforge] step {index + 1}/{len(examples)}  loss {loss:.6f}  {end - previous_end:.3f} s",
              file=sys.stderr, flush=True)
        previous_end, previous_cpu = time.perf_counter(), time.process_time()  # our printing is not part of a step
    out = {"steps": steps, "memory": memory.result(), "precision": chosen.reason}
    if args.profile:  # after the timed steps, so the profiler's overhead is not in them
        from step_profile import profile_steps

        again = examples[args.warmup:args.warmup + 2]
        out["profile"] = profile_steps(lambda i: train_step(model, [pack(again[i])], parameters, optimizer,
                                                            scheduler, 1.0, precision=precision), len(again))
    return out


# ---------------------------------------------------------------------------------------------- peer (child)


def run_peer(batches: list[list[dict]], args, flatten: bool = False, bf16: bool = False) -> dict:
    """transformers Trainer + PEFT LoRA + DataCollatorForSeq2Seq (or, with `flatten`, DataCollatorWithFlattening:
    the batch as one row, position ids restarting per example, no padding) in fp32 or with `bf16` autocast; the
    batches arrive in order, unshuffled."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lmforge.model.loader import resolve_model

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    padded = []  # (all tokens, pad tokens) of every padded batch the collator built

    class CountingCollator(DataCollatorForSeq2Seq):
        def __call__(self, features, return_tensors=None):
            out = super().__call__(features, return_tensors)
            padded.append((out["attention_mask"].numel(), int((out["attention_mask"] == 0).sum())))
            return out

    class CountingFlattener(DataCollatorWithFlattening):
        def __call__(self, features, return_tensors=None, separator_id=None):
            out = super().__call__(features, return_tensors, separator_id)
            padded.append((out["input_ids"].numel(), 0))
            return out

    memory = Memory()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.cpu_ends = [], [], []

        def on_train_begin(self, args_, state, control, **kwargs):
            memory.mark_training_start()
            self.train_begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_begin(self, args_, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def on_log(self, args_, state, control, logs=None, **kwargs):  # progress only; not timed
            if logs and "loss" in logs and len(self.ends) <= len(batches):
                previous = self.ends[-2] if len(self.ends) > 1 else self.train_begin
                print(f"[peer] step {len(self.ends)}/{len(batches)}  loss {logs['loss']:.6f}  "
                      f"{self.ends[-1] - previous:.3f} s", file=sys.stderr, flush=True)

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # LLaMA-Factory pads on the right for training
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    dataset = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
               for batch in batches for e in batch]
    if flatten:
        collator = CountingFlattener(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        collator = CountingCollator(tokenizer=tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                    pad_to_multiple_of=args.pad_to_multiple_of or None, return_tensors="pt")
    with tempfile.TemporaryDirectory(prefix="train_speed_peer_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=len(batches), learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", train_sampling_strategy="sequential",
            dataloader_num_workers=0, dataloader_drop_last=False, activation_checkpointing=False, bf16=bf16,
            fp16=False, use_cpu=True, logging_strategy="steps", logging_steps=1, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed)
        timer = StepTimer()
        trainer = InOrderTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                                 processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # we print our own per-step line
        trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record and "step" in record
              and "train_loss" not in record]
    if not (len(losses) == len(timer.ends) == len(timer.begins) == len(batches) == len(padded)):
        raise RuntimeError(f"peer bookkeeping mismatch: {len(losses)} losses, {len(timer.begins)} step begins, "
                           f"{len(timer.ends)} step ends, {len(padded)} collated batches, {len(batches)} batches")
    steps = []
    previous_end, previous_cpu = timer.train_begin, timer.cpu_begin
    for index, batch in enumerate(batches):
        tokens, supervised = batch_counts(batch)
        all_tokens, pad_tokens = padded[index]
        steps.append({"loss": losses[index], "wall_s": timer.ends[index] - previous_end,
                      "compute_s": timer.ends[index] - timer.begins[index],
                      "cpu_s": timer.cpu_ends[index] - previous_cpu, "tokens": tokens,
                      "supervised": supervised, "computed_tokens": all_tokens, "pad_tokens": pad_tokens})
        previous_end, previous_cpu = timer.ends[index], timer.cpu_ends[index]
    return {"steps": steps, "memory": memory.result(), "precision": "bf16 autocast (Trainer bf16=True)" if bf16
            else "float32"}


def child_main(args) -> None:
    import peft
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = json.loads(args.batches.read_text()) if args.batches else prepare_batches(args)[0]
    runners = {"lmforge": lambda: run_lmforge(batches, args), "lmforge-bf16": lambda: run_lmforge(batches, args, True),
               "peer": lambda: run_peer(batches, args), "peer-flat": lambda: run_peer(batches, args, flatten=True),
               "peer-flat-bf16": lambda: run_peer(batches, args, flatten=True, bf16=True)}
    runners["lmforge-bf16-glibc"] = runners["lmforge-bf16"]  # the allocator differs: run_child's environment
    runners["peer-flat-bf16-jemalloc"] = runners["peer-flat-bf16"]
    result = runners[args.system]()
    result.update(system=args.system, warmup=args.warmup, threads=torch.get_num_threads(),
                  allocator="jemalloc" if allocator.jemalloc_loaded() else "glibc malloc",
                  versions={"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "python": platform.python_version()})
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


# ---------------------------------------------------------------------------------------------- parent: compare


def summarize(result: dict) -> dict:
    timed = result["steps"][result["warmup"]:]
    wall = [s["wall_s"] for s in timed]
    compute = [s["compute_s"] for s in timed]
    computed = sum(s["computed_tokens"] for s in timed)
    pad = sum(s.get("pad_tokens", 0) for s in timed)
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / sum(wall),
            "tokens_per_cpu_s": sum(s["tokens"] for s in timed) / sum(s["cpu_s"] for s in timed),
            "supervised_per_s": sum(s["supervised"] for s in timed) / sum(wall),
            "compute_tokens_per_s": sum(s["tokens"] for s in timed) / sum(compute),
            "s_per_step_mean": statistics.mean(wall), "s_per_step_median": statistics.median(wall),
            "compute_s_per_step_median": statistics.median(compute),
            "cpu_s_per_step_median": statistics.median(s["cpu_s"] for s in timed),
            "padding_fraction": pad / computed if computed else 0.0, **result["memory"]}


def run_child(system: str, args, batches_file: Path, out_file: Path, argv: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--system", system,
               "--batches", str(batches_file), "--out", str(out_file)]
    env = {key: value for key, value in os.environ.items()
           if key not in ("LD_PRELOAD", allocator.ENV_DONE, allocator.ENV_CHOICE)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if system.endswith("-glibc"):
        env[allocator.ENV_CHOICE] = "system"
    elif system.startswith("lmforge") or system.endswith("-jemalloc"):  # as `lmforge train` runs (cli.py)
        env = allocator.environment_with_jemalloc(env) or env
    if system.startswith("lmforge"):
        allocator.bound_kernel_caches(env)  # as cli.py does for every tensor verb
    print(f"running {system} in a child process …", file=sys.stderr, flush=True)
    if subprocess.run(command, env=env).returncode != 0:
        sys.exit(f"the {system} child failed (see its output above)")
    return json.loads(out_file.read_text())


def strip_child_only(argv: list[str]) -> list[str]:
    """The parent's own argv minus options it sets itself for each child."""
    out, skip, skip_list = [], False, False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--system", "--json", "--batches", "--out", "--rounds"):
            skip = True
            continue
        if item == "--systems":  # a list: skip its values too
            skip_list = True
            continue
        if skip_list and not item.startswith("--"):
            continue
        skip_list = False
        if item.startswith(("--system=", "--json=", "--batches=", "--out=", "--rounds=")):
            continue
        out.append(item)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.system != "both":
        child_main(args)
        return
    import torch
    from transformers import AutoConfig

    from lmforge.model.loader import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    machine, date = machine_info(), datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    systems = args.systems or [s for s in SYSTEMS if machine["bf16_native"] or s not in BF16_SYSTEMS]
    if "lmforge" not in systems:
        systems = ["lmforge", *systems]  # the fp32 reference for every loss comparison
    command = "python benchmarks/train_speed.py" + "".join(" " + shlex.quote(a) for a in argv)
    started = time.perf_counter()
    batches, info = prepare_batches(args)
    model_config = AutoConfig.from_pretrained(resolve_model(args.model))
    print(f"prepared {len(batches)} batches in {time.perf_counter() - started:.1f} s: {info['render']}",
          file=sys.stderr, flush=True)
    child_argv = strip_child_only(argv)
    probes = [gemm_probe(1024, model_config.hidden_size, model_config.intermediate_size)]
    rounds: list[dict] = []
    round_info: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        batches_file = Path(tmp) / "batches.json"
        batches_file.write_text(json.dumps(batches))
        for number in range(args.rounds):
            order = systems if number % 2 == 0 else systems[::-1]
            argv_now = child_argv if number == 0 else [a for a in child_argv if a != "--profile"]  # profile once
            round_info.append({"order": order, "load_average": machine_info()["load_average"]})
            ran = {s: run_child(s, args, batches_file, Path(tmp) / f"{s}.json", argv_now) for s in order}
            rounds.append({s: ran[s] for s in systems})
    probes.append(gemm_probe(1024, model_config.hidden_size, model_config.intermediate_size))
    probe = {**probes[0], "fp32_gflops": max(p["fp32_gflops"] for p in probes),
             "bf16_gflops": max(p["bf16_gflops"] for p in probes), "runs": probes}
    flops = [useful_flops(batch, model_config) for batch in batches]
    per_round = []
    for ran in rounds:
        summaries = {}
        for system, result in ran.items():
            summaries[system] = summarize(result)
            timed = result["steps"][args.warmup:]
            useful = sum(flops[args.warmup:])
            summaries[system]["useful_gflops"] = useful / sum(s["wall_s"] for s in timed) / 1e9
            summaries[system]["useful_gflops_per_cpu_s"] = useful / sum(s["cpu_s"] for s in timed) / 1e9
        per_round.append(summaries)
    summaries = {system: {key: median_or_none([r[system].get(key) for r in per_round]) for key in per_round[0][system]}
                 for system in systems}
    results = rounds[0]  # losses and the profile: the first round (every round computes the same losses)
    losses = loss_check(results)
    machine_end = machine_info()
    print(report(args, info, results, summaries, machine, machine_end, probe, losses, command, date, per_round,
                 round_info))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": date, "machine": machine,
                                         "machine_end": machine_end, "gemm_probe": probe, "data": info,
                                         "summary": summaries, "per_round": per_round, "round_info": round_info,
                                         "losses": losses, "results": results, "rounds": rounds[1:]}, indent=1))


def median_or_none(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
