"""What every stage is made of: the Stage interface the loop talks to, the batch and loss types a stage returns, the
held-out split, the reference model of dpo / kto, and the render-and-cut helpers pairs and kto share.
Must not step optimizers or touch the run dir; must not know any stage by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...config import Config
from ...data.cache import rendered_dataset
from ...data.datasets import resolve_many
from ...data.render import Example
from ...errors import DataError
from ...model.methods import adapter_disabled, has_adapter
from ..batching import Batch, PaddedBatch
from ..losses import sequence_logps

NO_CUTOFF = 1 << 30


@dataclass
class StageData:
    train: list[Any]  # units: Example (sft), list[Example] (a pt block), (chosen, rejected), (reply, desirable, KL row)
    val: list[Any]
    report: dict


@dataclass
class StageBatch:
    """A micro-batch of pairs (chosen rows then rejected rows) or of KTO replies (+ their KL rows)."""
    rows: Batch | PaddedBatch
    count: int  # pairs or replies: what the step's loss is divided by
    desirable: torch.Tensor | None = None
    kl_rows: Batch | PaddedBatch | None = None

    @property
    def units(self) -> int:
        return self.count

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens + (self.kl_rows.num_tokens if self.kl_rows is not None else 0)

    @property
    def num_supervised(self) -> int:
        return self.rows.num_supervised


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    metrics: dict[str, tuple[float, int]] = field(default_factory=dict)  # name → (sum, count), averaged when logged


class Reference:
    """Reference log-probs for dpo / kto: the policy with its adapter off, or a frozen model (full / freeze)."""

    def __init__(self, frozen=None):
        self.frozen = frozen

    @torch.no_grad()
    def logps(self, policy, rows) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None:
            return sequence_logps(self.frozen, rows)
        with adapter_disabled(policy):
            return sequence_logps(policy, rows)


def reference_needs_copy(model) -> bool:
    """full / freeze change the base itself, so the reference must be a frozen copy of it."""
    return not has_adapter(model)


class Stage:
    """One training stage. The loop asks it for: its data (`prepare`), micro-batches of units (`batch`), the summed
    loss of a micro-batch and the stage's own figures (`loss`), whether it needs a reference model, what to do to the
    model before training (`prepare_model`) and what to tell the user afterwards (`follow_up`)."""

    name: str
    reads = "sft"  # the record shape of data.train (data/datasets.py): sft, text, pairs or kto
    needs_reference = False  # dpo / kto: log-probs of the model before training, see Reference

    def read(self, config: Config) -> tuple[list, dict]:
        """The records of data.train in this stage's shape, and how many came from each dataset."""
        data = config.data
        return self.load(resolve_many(data.train, data.dataset_dir, self.reads), data.max_samples)

    def load(self, specs: list, max_samples: int | None) -> tuple[list, dict]:
        raise NotImplementedError

    def prepare(self, config: Config, tokenizer) -> StageData:
        """Read, split (data.val or data.val_size) and tokenize into units; every record is counted in the report."""
        data = config.data
        records, counts = self.read(config)
        if data.val:
            val_records, _ = self.read(config.model_copy(update={"data": data.model_copy(update={"train": data.val})}))
        else:
            records, val_records = hold_out(records, data.val_size, config.train.seed)
        train, train_report = self.units(tokenizer, records, data.cutoff_len)
        val, val_report = self.units(tokenizer, val_records, data.cutoff_len) if val_records else ([], {})
        if not train:
            raise DataError(f"no training data left after tokenizing: {train_report}; raise data.cutoff_len")
        return StageData(train, val, {"datasets": counts, "train": train_report, "val": val_report,
                                      "train_tokens": train_report["tokens"],
                                      "train_supervised_tokens": train_report["supervised_tokens"]})

    def units(self, tokenizer, records: list, cutoff_len: int) -> tuple[list, dict]:
        """Records → the units the data order shuffles (and a report with tokens and supervised_tokens)."""
        raise NotImplementedError

    def batch(self, units: list, padded: bool, pad_id: int = 0):
        """One micro-batch of units: packed into one row, or padded rows for virtual-token methods."""
        raise NotImplementedError

    def loss(self, config: Config, model, batch, reference: Reference | None) -> LossOutput:
        """The micro-batch's summed loss (the loop divides by the step's units) and the stage's own figures."""
        raise NotImplementedError

    def prepare_model(self, model) -> None:
        """Anything the stage adds to the model before training (rm: the value head)."""

    def summary(self, report: dict) -> str:
        """One line on what the data became, for the terminal."""
        train = report["train"]
        return (f"{train['read']} records → {train['kept']} kept ({train['truncated']} truncated to cutoff_len, "
                f"{train['dropped_cutoff']} dropped: nothing trainable left within cutoff_len)")

    def follow_up(self, run_root) -> str:
        return f"chat with it: lmforge chat {run_root}"


def hold_out(items: list, val_size: float, seed: int) -> tuple[list, list]:
    if val_size <= 0:
        return items, []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(items)))
    if count >= len(items):
        raise DataError(f"data.val_size={val_size} would leave no training data ({len(items)} records)")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def render_last_replies(tokenizer, conversations) -> list[Example]:
    """Each conversation through the chat template, loss on its last reply only, uncut."""
    examples, _, _ = rendered_dataset(tokenizer, conversations, "last_assistant", NO_CUTOFF)
    return examples


def cut(example: Example, cutoff_len: int) -> Example | None:
    """The example cut to cutoff_len tokens, or None when nothing trainable is left."""
    if len(example.input_ids) <= cutoff_len:
        return example
    kept = Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])
    return kept if kept.num_supervised else None


def stat(values: torch.Tensor) -> tuple[float, int]:
    """A figure logged as an average: (sum, count)."""
    return float(values.detach().sum()), values.numel()
