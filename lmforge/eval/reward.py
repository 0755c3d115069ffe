"""Using a reward model trained with stage rm: load it (the run's weights + its value head) and score conversations
or preference pairs (`lmforge score`, Python callers). A score is the value head on the final hidden state of the
conversation's last token, rendered with the training chat template. Must not train; loads through generate.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..conversation import Conversation
from ..data.render import render_example
from ..errors import UserError
from ..model import packed_attention as attention
from ..model.value_head import VALUE_HEAD_FILE, attach_value_head
from ..rundir import RunDir, choose_weights
from ..train.batching import pack
from ..train.stages import value_scores


def load_reward_model(run_dir: str | Path, checkpoint: str | None = None, dtype: str = "auto"):
    """(model with its value head, tokenizer) of a run trained with stage rm."""
    from ..generate import load_run_base, load_run_weights, load_trainable, run_config

    run = RunDir(Path(run_dir))
    config = run_config(run)
    if config.train.stage != "rm":
        raise UserError(f"{run.root} was trained with stage {config.train.stage}, not rm: it has no reward head "
                        f"(train one with train.stage: rm on preference pairs)")
    weights = choose_weights(run, checkpoint)
    if weights.is_checkpoint:  # the checkpoint's trainable tensors include the head
        model, tokenizer = load_run_base(run, dtype)
        attach_value_head(model)
        load_trainable(model, weights.path)
    else:
        model, tokenizer = load_run_weights(weights, dtype)
        head = attach_value_head(model)
        state = load_file(str(weights.path / VALUE_HEAD_FILE))
        head.load_state_dict(state)
    model.set_attn_implementation(attention.register())  # scores of a packed batch = scores one by one
    return model.eval(), tokenizer


@torch.no_grad()
def score(model, tokenizer, conversations: list[Conversation], batch_size: int = 8) -> list[float]:
    """One reward per conversation (its last message is the reply being judged)."""
    examples = [render_example(tokenizer, c, "last_assistant") for c in conversations]
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        scores += value_scores(model, pack(examples[start:start + batch_size])).tolist()
    return scores


@dataclass
class PairScores:
    chosen: list[float]
    rejected: list[float]

    @property
    def accuracy(self) -> float:
        return sum(c > r for c, r in zip(self.chosen, self.rejected)) / max(len(self.chosen), 1)


def score_pairs(model, tokenizer, pairs, batch_size: int = 8) -> PairScores:
    return PairScores(score(model, tokenizer, [p.chosen for p in pairs], batch_size),
                      score(model, tokenizer, [p.rejected for p in pairs], batch_size))


def score_file(run_dir: str, data: list[str], dataset_dir: str | None = None, output: str | None = None,
               checkpoint: str | None = None, batch_size: int = 8) -> dict:
    """`lmforge score`: preference pairs → accuracy and per-pair scores; conversations → one score each."""
    from ..data.datasets import load_specs, resolve_many
    from ..data.preference import load_pairs

    pairs_data = _looks_like_pairs(data, dataset_dir)
    specs = resolve_many(data, dataset_dir, "pairs" if pairs_data else "sft")  # data errors before the model loads
    records = load_pairs(specs)[0] if pairs_data else load_specs(specs)[0]
    model, tokenizer = load_reward_model(run_dir, checkpoint)
    if pairs_data:
        result = score_pairs(model, tokenizer, records, batch_size)
        rows = [{"chosen": c, "rejected": r} for c, r in zip(result.chosen, result.rejected)]
        summary = {"pairs": len(rows), "accuracy": round(result.accuracy, 4),
                   "mean_margin": round(sum(c - r for c, r in zip(result.chosen, result.rejected)) / len(rows), 4)}
    else:
        rows = [{"score": s} for s in score(model, tokenizer, records, batch_size)]
        summary = {"conversations": len(rows), "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4)}
    if output:
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        summary["output"] = output
    return summary


def _looks_like_pairs(data: list[str], dataset_dir: str | None) -> bool:
    from ..data.sources import read_records

    path = Path(data[0])
    if not path.is_file():  # a dataset_info.json name: its "ranking" flag decides
        info = Path(dataset_dir or "data") / "dataset_info.json"
        entry = json.loads(info.read_text(encoding="utf-8")).get(data[0], {}) if info.is_file() else {}
        return bool(entry.get("ranking"))
    record, _ = next(iter(read_records(path)))
    return "chosen" in record and "rejected" in record
