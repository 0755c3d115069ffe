"""What the board reads from a run dir: metrics from a line offset (a line still being written waits), the total step
count from the logged epoch fraction, and the hints a user acts on (NaN, divergence, eval loss rising while train loss
falls, nothing supervised)."""

from __future__ import annotations

import json

from lmforge.rundir import RunDir
from lmforge.ui.runs import hints, read_metrics, total_steps


def write(run: RunDir, records: list[dict], tail: str = "") -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def ids(run: RunDir) -> list[str]:
    return [h["id"] for h in hints(run, read_metrics(run)[0])]


def test_metrics_from_an_offset_wait_for_a_whole_line(tmp_path):
    run = RunDir(tmp_path / "r")
    write(run, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], tail='{"step": 3, "lo')
    records, lines = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and lines == 2
    write(run, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}])
    records, lines = read_metrics(run, lines)
    assert [r["step"] for r in records] == [3] and lines == 3
    write(run, [{"step": 1, "loss": 2.0}])  # a resume rewrote the history up to its checkpoint: read from the start
    assert [r["step"] for r in read_metrics(run, 3)[0]] == [1]


def test_total_steps_from_max_steps_or_epochs():
    assert total_steps({"train": {"max_steps": 7}}, []) == 7
    records = [{"step": 4, "epoch": 0.5}]  # 8 steps per epoch
    assert total_steps({"train": {"max_steps": -1, "num_train_epochs": 3}}, records) == 24
    assert total_steps({"train": {"max_steps": -1}}, []) is None


def test_hints(tmp_path):
    falling = [{"step": s, "loss": 3.0 - 0.1 * s, "grad_norm": 1.0} for s in range(1, 10)]
    run = RunDir(tmp_path / "healthy")
    write(run, falling)
    assert ids(run) == []

    run = RunDir(tmp_path / "nan")
    write(run, falling[:3] + [{"step": 4, "loss": float("nan"), "grad_norm": 1.0}])
    assert ids(run) == ["nan"] and hints(run, read_metrics(run)[0])[0]["step"] == 4

    run = RunDir(tmp_path / "diverging")
    write(run, falling[:5] + [{"step": 6, "loss": 9.0, "grad_norm": 40.0}])
    assert ids(run) == ["diverging"]

    run = RunDir(tmp_path / "overfitting")
    evals = {3: 2.0, 6: 1.8, 9: 2.3}  # lowest at step 6, then up while train loss keeps falling
    write(run, [r | ({"eval_loss": evals[r["step"]]} if r["step"] in evals else {}) for r in falling])
    found = hints(run, read_metrics(run)[0])
    assert [h["id"] for h in found] == ["overfitting"] and found[0]["best_step"] == 6

    run = RunDir(tmp_path / "unsupervised")
    write(run, [{"step": 1, "loss": 0.0, "supervised_tokens_per_s": 0}])
    run.data_report.write_text(json.dumps({"train_supervised_tokens": 0}))
    assert ids(run) == ["no_supervised"]
