"""Where a training step's time goes: torch.profiler over a few steps, every op's self time sorted into GEMM,
attention, elementwise / other tensor ops, optimizer and the rest (Python, dispatch, autograd bookkeeping = wall time
not inside any op). An op called from inside an attention function counts as attention (lmforge's blocked attention:
its forward and backward are autograd functions whose names say attention). Used by train_speed.py --profile so the
next speed lever is chosen by measurement. Measures; changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "mkldnn",
        "onednn", "aten::_weight", "aten::addmv", "aten::mv")
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "_sdpa", "attention")
OPTIMIZER = ("optimizer.step", "_foreach", "adamw", "_fused_adam", "clip_grad", "zero_grad")


def category(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in OPTIMIZER):
        return "optimizer"
    if any(key in lowered for key in ATTENTION):
        return "attention"
    if any(lowered.startswith(key) or key in lowered for key in GEMM):
        return "gemm"
    return "elementwise and other ops"


def _inside_attention(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if category(parent.name) == "attention":
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(step: Callable[[int], None], steps: int) -> dict:
    """Run `step(i)` for i < steps under the profiler; seconds per category (self time of ops on every thread, so
    with several intra-op threads an op counts once — its wall time on the calling thread) and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    by_op: dict[tuple[str, str], list] = {}
    for event in profiler.events():
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        group = "attention" if _inside_attention(event) else category(event.name)
        totals[group] = totals.get(group, 0.0) + seconds
        entry = by_op.setdefault((event.name, group), [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    ops = [(s, key, count, group) for (key, group), (s, count) in by_op.items()]
    inside = sum(totals.values())
    totals["python, dispatch, autograd (wall not inside an op)"] = max(0.0, wall - inside)
    ops.sort(reverse=True)
    return {"steps": steps, "wall_s": round(wall, 3),
            "seconds": {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / wall, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": key, "self_s": round(s, 3), "calls": count, "category": group}
                        for s, key, count, group in ops[:15]]}
