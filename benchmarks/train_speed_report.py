"""train_speed.py's arithmetic and its report: real / supervised token counts of a batch, the useful FLOPs of a
LoRA step, losses against the fp32 reference, and the text + Markdown table printed for benchmarks/RESULTS.md.
Measures nothing itself; changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from machine import machine_line

IGNORE_INDEX = -100
LABELS = {"lmforge": "lmforge fp32 (packed)", "lmforge-bf16": "lmforge bf16 autocast (packed)",
          "peer": "Trainer + padding collator, fp32", "peer-flat": "Trainer + DataCollatorWithFlattening, fp32",
          "peer-flat-bf16": "Trainer + DataCollatorWithFlattening, bf16",
          "lmforge-bf16-glibc": "lmforge bf16 autocast (packed), glibc malloc + heap trims",
          "peer-flat-bf16-jemalloc": "Trainer + DataCollatorWithFlattening, bf16, jemalloc preloaded"}


def batch_counts(batch: list[dict]) -> tuple[int, int]:
    """(real tokens, supervised targets); a target is a label at position ≥ 1 of its example (both losses shift)."""
    return (sum(len(e["input_ids"]) for e in batch),
            sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in batch))


def fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def useful_flops(batch: list[dict], model_config) -> float:
    """FLOPs a LoRA step must do on a batch, whoever does it: per real token the decoder's linear layers forward and
    their input gradients (4 × linear weights; LoRA's own few are left out), per supervised target the LM head both
    ways (4 × hidden × vocab), per example causal attention (QKᵀ and AV forward 2·T²·d per layer, backward twice that).
    Padding, recomputation and LM-head rows of prompt tokens are waste, not counted."""
    c = model_config
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_layer = c.hidden_size * (heads * head_dim + 2 * kv * head_dim) + heads * head_dim * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    linear = per_layer * c.num_hidden_layers
    tokens, supervised = batch_counts(batch)
    attention = sum(6 * len(e["input_ids"]) ** 2 * heads * head_dim * c.num_hidden_layers for e in batch)
    return 4 * linear * tokens + 4 * c.hidden_size * c.vocab_size * supervised + attention


def loss_check(results: dict, reference: str = "lmforge") -> dict:
    """Per system: max |loss - reference loss| over all steps, absolute and relative to the reference."""
    ref = [s["loss"] for s in results[reference]["steps"]]
    out = {}
    for system, result in results.items():
        losses = [s["loss"] for s in result["steps"]]
        diffs = [abs(a - b) for a, b in zip(losses, ref)]
        out[system] = {"max_abs": max(diffs), "max_rel": max(d / abs(r) for d, r in zip(diffs, ref)),
                       "step1": losses[0]}
    return out


def round_lines(per_round: list[dict], round_info: list[dict], peers: list[str], lm_best: str) -> list[str]:
    """With several rounds: the figures above are medians over them; each round's order, load and ratios."""
    if len(per_round) < 2 or not peers:
        return []
    lines = [f"Figures above: medians over {len(per_round)} rounds, the order reversed every other round:", ""]
    for number, (summaries, info) in enumerate(zip(per_round, round_info), 1):
        best_wall = max(peers, key=lambda s: summaries[s]["tokens_per_s"])
        best_cpu = max(peers, key=lambda s: summaries[s]["tokens_per_cpu_s"])
        wall = summaries[lm_best]["tokens_per_s"] / summaries[best_wall]["tokens_per_s"]
        cpu = summaries[lm_best]["tokens_per_cpu_s"] / summaries[best_cpu]["tokens_per_cpu_s"]
        lines.append(f"- round {number} ({' → '.join(info['order'])}; load average before it "
                     f"{info['load_average']}): {lm_best} / {best_wall} {wall:.2f}× real tokens/s; / {best_cpu} "
                     f"{cpu:.2f}× per CPU-second")
    return lines + [""]


def report(args, info: dict, results: dict, summaries: dict, machine: dict, machine_end: dict, probe: dict,
           losses: dict, command: str, date: str, per_round: list[dict] | None = None,
           round_info: list[dict] | None = None) -> str:
    systems = list(results)
    versions, threads = results[systems[0]]["versions"], results[systems[0]]["threads"]
    peers = [s for s in systems if s.startswith("peer")]
    lm_best = max((s for s in systems if s.startswith("lmforge")), key=lambda s: summaries[s]["tokens_per_s"])
    peer_best = max(peers, key=lambda s: summaries[s]["tokens_per_s"]) if peers else None
    peer_best_cpu = max(peers, key=lambda s: summaries[s]["tokens_per_cpu_s"]) if peers else None
    gemm = {s: probe["bf16_gflops"] if "bf16" in s else probe["fp32_gflops"] for s in systems}

    def row(name, key, digits=1, suffix=""):
        return f"| {name} | " + " | ".join(f"{fmt(summaries[s].get(key), digits)}{suffix}" for s in systems) + " |"

    ref_losses = [s["loss"] for s in results["lmforge"]["steps"]]
    lines = [
        f"data: {info['render']}; {info['batches']} batches of {args.batch_size} "
        f"(examples {info['length_min']}–{info['length_max']} tokens, mean {info['length_mean']}; "
        f"{info['epochs_used']} epochs of the shuffled data)", "",
        "loss per step (" + " | ".join(systems) + "):",
        *[f"  {i + 1:3d}{'*' if i < args.warmup else ' '} "
          + " | ".join(f"{results[s]['steps'][i]['loss']:.6f}" for s in systems) for i in range(len(ref_losses))],
        "  (* = warm-up step, not timed)", "",
        *[f"{s}: precision {results[s].get('precision')}" for s in systems], "",
        "---- Markdown for benchmarks/RESULTS.md ----", "",
        f"### LoRA SFT step speed, {machine['cpu']}, {date}", "",
        f"`{command}`", "",
        f"`{args.model}` on CPU · LoRA r=8 α=16 dropout 0 on q_proj,v_proj · batch {args.batch_size}, no accumulation "
        f"· cutoff {args.cutoff} · lr {args.lr:g} constant · AdamW · clip 1.0 · {args.steps} timed steps after "
        f"{args.warmup} warm-up · same batches in the same order for every system · data: "
        f"{', '.join(Path(f).name for f in info['files'])} interleaved ({info['render']}; batch examples "
        f"{info['length_min']}–{info['length_max']} tokens, mean {info['length_mean']}). GEMM probe in the same run "
        f"({'×'.join(map(str, probe['shape']))}, {probe['threads']} threads): fp32 {probe['fp32_gflops']:.0f}, "
        f"bf16 {probe['bf16_gflops']:.0f} GFLOP/s.", "",
        "| | " + " | ".join(LABELS[s] for s in systems) + " |",
        "|---|" + "---:|" * len(systems),
        "| allocator | " + " | ".join(results[s].get("allocator", "n/a") for s in systems) + " |",
        row("real tokens/s", "tokens_per_s"),
        "| × best peer" + (f" ({peer_best})" if peer_best else "") + " | " + " | ".join(
            f"{summaries[s]['tokens_per_s'] / summaries[peer_best]['tokens_per_s']:.2f}×" if peer_best else "n/a"
            for s in systems) + " |",
        row("real tokens per CPU-second (steadier on a busy machine)", "tokens_per_cpu_s"),
        "| × best peer per CPU-second" + (f" ({peer_best_cpu})" if peer_best_cpu else "") + " | " + " | ".join(
            f"{summaries[s]['tokens_per_cpu_s'] / summaries[peer_best_cpu]['tokens_per_cpu_s']:.2f}×"
            if peer_best_cpu else "n/a" for s in systems) + " |",
        row("supervised tokens/s", "supervised_per_s"),
        row("s/step median", "s_per_step_median", 3),
        row("s/step median, compute only¹", "compute_s_per_step_median", 3),
        row("CPU s/step median (all threads)³", "cpu_s_per_step_median", 3),
        "| padding fraction | " + " | ".join(f"{summaries[s]['padding_fraction']:.1%}" for s in systems) + " |",
        row("useful GFLOP/s⁴", "useful_gflops"),
        "| useful / GEMM probe of its precision | " + " | ".join(
            f"{summaries[s]['useful_gflops'] / gemm[s]:.0%}" for s in systems) + " |",
        row("useful GFLOP per CPU-second", "useful_gflops_per_cpu_s"),
        "| useful per CPU-second / GEMM probe of its precision | " + " | ".join(
            f"{summaries[s]['useful_gflops_per_cpu_s'] / gemm[s]:.0%}" for s in systems) + " |",
        row("peak RSS (MiB)", "peak_rss_mib", 0),
        row("peak RSS during training steps (MiB)²", "peak_rss_training_mib", 0),
        "| max abs loss diff vs lmforge fp32 (relative) | " + " | ".join(
            f"{losses[s]['max_abs']:.1e} ({losses[s]['max_rel']:.1e})" for s in systems) + " |",
        "",
        f"Best lmforge ({lm_best}) / best peer ({peer_best}): "
        + (f"**{summaries[lm_best]['tokens_per_s'] / summaries[peer_best]['tokens_per_s']:.2f}×** real tokens/s"
           if peer_best else "n/a") + ".", "",
        "Seconds/step and tokens/s are wall time from the end of one optimizer step to the end of the next (batch "
        "building/collation included). ¹ Forward + backward + clip + optimizer step only (peer: Trainer's "
        "on_step_begin → on_step_end). ² VmHWM reset (/proc/self/clear_refs) just before the first step; each "
        "system runs in its own process. ³ Process CPU time over the same interval; a wall time much larger than "
        "CPU time / threads means the run was waiting for a CPU. ⁴ FLOPs any system must do for these batches "
        "(linear layers forward + input gradients, LM head on supervised targets, causal attention; padding and "
        "recomputation not counted) per second of wall time.", "",
        *round_lines(per_round or [], round_info or [], peers, lm_best),
        f"Machine: {machine_line(machine)} at start, {machine_end['load_average']} at end; "
        f"torch.get_num_threads()={threads}; Python {versions['python']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, peft {versions['peft']}; {machine['os']}; {date}.",
    ]
    for system in systems:
        prof = results[system].get("profile")
        if prof:
            lines += ["", f"Where {system}'s step time goes (torch.profiler, {prof['steps']} steps, "
                          f"{prof['wall_s']:.2f} s wall):", "",
                      "| | s | share |", "|---|---:|---:|",
                      *[f"| {k} | {v:.2f} | {prof['share'][k]:.0%} |" for k, v in prof["seconds"].items()], "",
                      "top ops: " + "; ".join(f"{o['op']} {o['self_s']:.2f} s ({o['calls']})"
                                              for o in prof["top_ops"][:8])]
    return "\n".join(lines)
