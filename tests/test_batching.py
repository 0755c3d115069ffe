"""Packing (positions, boundaries, targets, counts) and the seeded data order (epochs, steps, the last partial step)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lmforge.data.render import IGNORE_INDEX, Example
from lmforge.train.batching import DataOrder, pack

X = IGNORE_INDEX  # no loss


def example(ids: list[int], supervised_from: int) -> Example:
    """A prompt of ids[:supervised_from] (no loss) followed by a supervised reply."""
    return Example(ids, [X] * supervised_from + ids[supervised_from:])


EXAMPLES = [
    example([10, 11, 12, 13, 14], 3),      # reply 13 14
    example([20, 21, 22], 1),              # reply 21 22
    example([30, 31, 32, 33, 34, 35, 36], 4),  # reply 34 35 36
]


def test_pack_lays_examples_end_to_end_without_padding():
    batch = pack(EXAMPLES)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33, 34, 35, 36]]
    assert batch.num_tokens == sum(len(e.input_ids) for e in EXAMPLES) == 15
    assert batch.input_ids.shape == batch.position_ids.shape == (1, 15)
    assert batch.targets.shape == (15,)
    assert batch.max_len == 7


def test_positions_restart_at_zero_for_each_example():
    batch = pack(EXAMPLES)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]


def test_cu_seq_lens_are_cumulative_lengths():
    batch = pack(EXAMPLES)
    assert batch.cu_seq_lens.dtype == torch.int32
    assert batch.cu_seq_lens.tolist() == [0, 5, 8, 15]
    kwargs = batch.model_kwargs()
    assert kwargs["cu_seq_lens_q"] is batch.cu_seq_lens and kwargs["cu_seq_lens_k"] is batch.cu_seq_lens
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 7


def test_targets_are_next_labels_within_each_example():
    batch = pack(EXAMPLES)
    # Position i predicts token i+1 of the same example; each example's last position predicts nothing, so no
    # example is trained to predict the first token of the next one (20 and 30 never appear as targets).
    assert batch.targets.tolist() == [X, X, 13, 14, X,
                                      21, 22, X,
                                      X, X, X, 34, 35, 36, X]
    assert 20 not in batch.targets.tolist() and 30 not in batch.targets.tolist()


def test_num_supervised_counts_trainable_targets():
    batch = pack(EXAMPLES)
    assert batch.num_supervised == 2 + 2 + 3 == sum(e.num_supervised for e in EXAMPLES)
    # A label on an example's first token cannot be predicted (nothing precedes it), so it is not counted.
    everything = Example([1, 2, 3], [1, 2, 3])
    assert pack([everything]).targets.tolist() == [2, 3, X]
    assert pack([everything]).num_supervised == 2


def test_single_example_pack():
    batch = pack([EXAMPLES[1]])
    assert batch.cu_seq_lens.tolist() == [0, 3]
    assert batch.position_ids.tolist() == [[0, 1, 2]]
    assert batch.targets.tolist() == [21, 22, X]


# ---------------------------------------------------------------------------------------------- data order


def test_order_is_a_function_of_the_seed():
    a = DataOrder(num_examples=50, batch_size=4, accumulation=2, seed=7)
    b = DataOrder(num_examples=50, batch_size=4, accumulation=2, seed=7)
    assert [a.step(s) for s in range(20)] == [b.step(s) for s in range(20)]
    other = DataOrder(num_examples=50, batch_size=4, accumulation=2, seed=8)
    assert other.epoch_order(0) != a.epoch_order(0)


def test_each_epoch_is_a_different_permutation_of_all_examples():
    order = DataOrder(num_examples=50, batch_size=4, accumulation=2, seed=0)
    epochs = [order.epoch_order(e) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(50))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


@pytest.mark.parametrize("num_examples, batch_size, accumulation, steps, last_step",
                         [(16, 2, 2, 4, [[0, 1], [2, 3]]),   # divides evenly
                          (10, 2, 2, 3, [[0, 1]]),           # last step: one full micro-batch
                          (11, 2, 2, 3, [[0, 1], [2]]),      # last step: a full and a partial micro-batch
                          (5, 4, 1, 2, [[0]])])              # last step: one example
def test_steps_of_an_epoch_cover_it_exactly_once(num_examples, batch_size, accumulation, steps, last_step):
    order = DataOrder(num_examples, batch_size, accumulation, seed=3)
    assert order.steps_per_epoch == steps
    for epoch in range(2):
        per_step = [order.step(epoch * steps + s) for s in range(steps)]
        for micro_batches in per_step[:-1]:
            assert len(micro_batches) == accumulation
            assert all(len(mb) == batch_size for mb in micro_batches)
        flat = [i for micro_batches in per_step for mb in micro_batches for i in mb]
        assert flat == order.epoch_order(epoch)  # in the epoch's order, each example exactly once
        assert Counter(flat) == Counter(range(num_examples))
        epoch_order = order.epoch_order(epoch)
        assert per_step[-1] == [[epoch_order[(steps - 1) * batch_size * accumulation + i] for i in mb]
                                for mb in last_step]
        assert all(mb for micro_batches in per_step for mb in micro_batches), "no empty micro-batch"


def test_step_after_the_last_of_an_epoch_starts_the_next_epoch():
    order = DataOrder(num_examples=11, batch_size=2, accumulation=2, seed=1)
    assert order.step(order.steps_per_epoch) == [order.epoch_order(1)[0:2], order.epoch_order(1)[2:4]]
    assert order.step(2 * order.steps_per_epoch - 1) == [order.epoch_order(1)[8:10], order.epoch_order(1)[10:11]]
