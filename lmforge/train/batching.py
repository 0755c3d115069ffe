"""Examples → Batch: padding-free packing of one micro-batch into a single row (or padded rows where packing
cannot apply: methods that add virtual tokens in front of every sequence).

The examples of a micro-batch are laid end to end (no padding tokens); positions restart at 0 for each example and
`cu_seq_lens` marks the boundaries, so attention never crosses from one example into another (see attention.py).
Targets are the next-token labels, shifted within each example, so no example predicts the start of the next.
Both batch kinds say which example each target belongs to, so per-sequence log-probs (preference losses) and
last-token states (reward models) come out of either. Also owns the data order: a seeded shuffle per epoch, cut into
micro-batches and optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.render import IGNORE_INDEX, Example


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

    @property
    def units(self) -> int:
        """What a token-level loss is divided by."""
        return self.num_supervised

    @property
    def num_examples(self) -> int:
        return len(self.cu_seq_lens) - 1

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}

    def example_ids(self) -> torch.Tensor:
        """[T]: the index of the example each position belongs to."""
        lengths = self.cu_seq_lens[1:] - self.cu_seq_lens[:-1]
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths.long())

    def last_positions(self) -> torch.Tensor:
        """[n]: the position of each example's last token in the packed row."""
        return self.cu_seq_lens[1:].long() - 1


@dataclass
class PaddedBatch:
    """Examples as right-padded rows, for the model's own forward (virtual-token methods)."""
    input_ids: torch.Tensor       # [n, L]
    attention_mask: torch.Tensor  # [n, L]
    targets: torch.Tensor         # [n, L], IGNORE_INDEX at padding and where no loss
    lengths: torch.Tensor         # [n]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def units(self) -> int:
        return self.num_supervised

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0]

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def example_ids(self) -> torch.Tensor:
        """[n, L]: the row index of each position."""
        return torch.arange(self.num_examples)[:, None].expand_as(self.input_ids)

    def last_positions(self) -> torch.Tensor:
        return self.lengths - 1


def pad(examples: list[Example], pad_id: int = 0) -> PaddedBatch:
    longest = max(len(e.input_ids) for e in examples)
    ids, masks, targets = [], [], []
    for example in examples:
        n, missing = len(example.input_ids), longest - len(example.input_ids)
        ids.append(example.input_ids + [pad_id] * missing)
        masks.append([1] * n + [0] * missing)
        targets.append(example.labels[1:] + [IGNORE_INDEX] * (missing + 1))
    return PaddedBatch(torch.tensor(ids), torch.tensor(masks), torch.tensor(targets),
                       torch.tensor([len(e.input_ids) for e in examples]))


def collate(examples: list[Example], padded: bool = False, pad_id: int = 0) -> Batch | PaddedBatch:
    """One micro-batch: packed into one row, or padded rows when the method adds virtual tokens."""
    return pad(examples, pad_id) if padded else pack(examples)


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
