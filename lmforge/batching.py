"""Examples → Batch: padding-free packing of one micro-batch into a single row.

The examples of a micro-batch are laid end to end (no padding tokens); positions restart at 0 for each example and
`cu_seq_lens` marks the boundaries, so attention never crosses from one example into another (see attention.py).
Targets are the next-token labels, shifted within each example, so no example predicts the start of the next.
Also owns the data order: a seeded shuffle per epoch, cut into micro-batches and optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .render import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor     # [1, T]
    position_ids: torch.Tensor  # [1, T], restarting at 0 for each example
    targets: torch.Tensor       # [T], the label of the next token, IGNORE_INDEX where no loss
    cu_seq_lens: torch.Tensor   # [n + 1] int32, cumulative example lengths
    max_len: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def pack(examples: list[Example]) -> Batch:
    ids, positions, targets, lengths = [], [], [], [0]
    for example in examples:
        n = len(example.input_ids)
        ids += example.input_ids
        positions += range(n)
        targets += example.labels[1:] + [IGNORE_INDEX]
        lengths.append(lengths[-1] + n)
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        cu_seq_lens=torch.tensor(lengths, dtype=torch.int32),
        max_len=max(len(e.input_ids) for e in examples),
    )


@dataclass(frozen=True)
class DataOrder:
    """Which examples go into which micro-batch of which optimizer step; a pure function of the seed."""
    num_examples: int
    batch_size: int
    accumulation: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.accumulation))

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def step(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step `step` (0-based, counted over all epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        per_step = self.batch_size * self.accumulation
        chosen = order[index * per_step:(index + 1) * per_step]
        return [chosen[i:i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]


def eval_batches(examples: list[Example], batch_size: int) -> list[Batch]:
    return [pack(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
