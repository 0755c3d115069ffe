"""Training stages — which data units a stage reads, how they become micro-batches, which loss: pt (document blocks,
each document its own packed example), sft, rm / dpo / orpo / simpo (chosen and rejected packed as separate
examples), kto (+ mismatched rows for the KL estimate); padded rows for virtual-token methods. The dpo/kto reference
is the policy with its adapter off, or a frozen copy for full/freeze. Must not step optimizers or touch the run dir.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..data.cache import rendered_dataset
from ..data.datasets import resolve_many
from ..data.documents import load_documents
from ..data.preference import load_labelled, load_pairs
from ..data.render import IGNORE_INDEX, Example, RenderStats
from ..errors import DataError
from ..model.methods import adapter_disabled, has_adapter
from ..model.value_head import value_head
from .batching import Batch, PaddedBatch, collate
from .losses import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    last_hidden,
    orpo_loss,
    sequence_logps,
    sft_loss_sum,
    simpo_loss,
)

PAIR_STAGES = ("rm", "dpo", "orpo", "simpo")
DATA_SHAPE = {"pt": "text", "sft": "sft", "rm": "pairs", "dpo": "pairs", "orpo": "pairs", "simpo": "pairs",
              "kto": "kto"}
NO_CUTOFF = 1 << 30


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


@dataclass
class StageData:
    train: list[Any]  # units: Example (sft), list[Example] (a pt block), (chosen, rejected), (Example, desirable, KL row)
    val: list[Any]
    report: dict


def hold_out(items: list, val_size: float, seed: int) -> tuple[list, list]:
    if val_size <= 0:
        return items, []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(items)))
    if count >= len(items):
        raise DataError(f"data.val_size={val_size} would leave no training data ({len(items)} records)")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------------------------------------- data


def read_stage_data(config: Config) -> tuple[list, dict]:
    """The records of data.train in the shape the stage reads (conversations, pairs, labelled replies, documents)."""
    from ..data.datasets import load_specs

    data, shape = config.data, DATA_SHAPE[config.train.stage]
    specs = resolve_many(data.train, data.dataset_dir, shape)
    loader = {"sft": load_specs, "pairs": load_pairs, "kto": load_labelled, "text": load_documents}[shape]
    return loader(specs, data.max_samples)


def prepare_stage_data(config: Config, tokenizer) -> StageData:
    """Read, split and tokenize the data of a pt / pairs / kto stage (sft: train.prepare_data)."""
    data, stage = config.data, config.train.stage
    records, counts = read_stage_data(config)
    if data.val:
        val_records, _ = read_stage_data(config.model_copy(update={"data": data.model_copy(update={"train": data.val})}))
    else:
        records, val_records = hold_out(records, data.val_size, config.train.seed)
    build = {"text": _pt_blocks, "pairs": _pairs, "kto": _labelled}[DATA_SHAPE[stage]]
    train, train_report = build(tokenizer, records, data.cutoff_len)
    val, val_report = build(tokenizer, val_records, data.cutoff_len) if val_records else ([], {})
    if not train:
        raise DataError(f"no training data left after tokenizing: {train_report}; raise data.cutoff_len")
    return StageData(train, val, {"datasets": counts, "train": train_report, "val": val_report,
                                  "train_tokens": train_report["tokens"],
                                  "train_supervised_tokens": train_report["supervised_tokens"]})


def _pt_blocks(tokenizer, documents: list[str], cutoff_len: int):
    """Documents + eos, joined and cut into blocks of cutoff_len tokens; a block is its document pieces."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    blocks, current, filled = [], [], 0
    for text in documents:
        ids = tokenizer(text)["input_ids"] + eos
        while ids:
            piece, ids = ids[:cutoff_len - filled], ids[cutoff_len - filled:]
            current.append(Example(piece, list(piece)))
            filled += len(piece)
            if filled == cutoff_len:
                blocks.append(current)
                current, filled = [], 0
    if current:
        blocks.append(current)
    tokens = sum(len(e.input_ids) for block in blocks for e in block)
    return blocks, {"documents": len(documents), "blocks": len(blocks), "tokens": tokens,
                    "supervised_tokens": sum(max(len(e.input_ids) - 1, 0) for b in blocks for e in b)}


def _render_last_replies(tokenizer, conversations):
    examples, _, _ = rendered_dataset(tokenizer, conversations, "last_assistant", NO_CUTOFF)
    return examples


def _cut(example: Example, cutoff_len: int) -> Example | None:
    if len(example.input_ids) <= cutoff_len:
        return example
    cut = Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])
    return cut if cut.num_supervised else None


def _pairs(tokenizer, pairs, cutoff_len: int):
    examples = _render_last_replies(tokenizer, [c for pair in pairs for c in (pair.chosen, pair.rejected)])
    kept, stats = [], RenderStats(read=len(pairs))
    for chosen, rejected in zip(examples[::2], examples[1::2]):
        cut = (_cut(chosen, cutoff_len), _cut(rejected, cutoff_len))
        if None in cut:
            stats.dropped_cutoff += 1
            continue
        stats.truncated += cut != (chosen, rejected)
        kept.append(cut)
    stats.kept = len(kept)
    return kept, {**stats.__dict__, "tokens": sum(len(e.input_ids) for pair in kept for e in pair),
                  "supervised_tokens": sum(e.num_supervised for pair in kept for e in pair)}


def _labelled(tokenizer, items, cutoff_len: int):
    examples = _render_last_replies(tokenizer, [item.conversation for item in items])
    kept, stats = [], RenderStats(read=len(items))
    for example, item in zip(examples, items):
        cut = _cut(example, cutoff_len)
        if cut is None:
            stats.dropped_cutoff += 1
            continue
        stats.truncated += cut is not example
        kept.append((cut, item.desirable))
    stats.kept = len(kept)
    if len(kept) == 1:
        raise DataError("kto needs at least 2 replies in train and in val (data.val_size): its KL estimate pairs each prompt with another example's reply")
    # each reply's KL row: its prompt + the next example's reply, fixed here so it does not depend on the batch size
    units = [(example, desirable, _mismatched(example, kept[(i + 1) % len(kept)][0]))
             for i, (example, desirable) in enumerate(kept)]
    return units, {**stats.__dict__, "desirable": sum(d for _, d in kept), "tokens": sum(len(e.input_ids)
                   for e, _ in kept), "supervised_tokens": sum(e.num_supervised for e, _ in kept)}


# ---------------------------------------------------------------------------------------------- batches


def make_batch(stage: str, units: list, padded: bool, pad_id: int = 0):
    if stage == "sft":
        return collate(units, padded, pad_id)
    if stage == "pt":
        return collate([piece for block in units for piece in block], padded, pad_id)
    if stage in PAIR_STAGES:
        return StageBatch(collate([c for c, _ in units] + [r for _, r in units], padded, pad_id), len(units))
    return StageBatch(collate([e for e, _, _ in units], padded, pad_id), len(units),
                      torch.tensor([d for _, d, _ in units]), collate([kl for _, _, kl in units], padded, pad_id))


def _mismatched(prompt_of: Example, reply_of: Example) -> Example:
    """Prompt of one example + reply of another (KTO's KL estimate uses unrelated prompt/reply pairs)."""
    split_a = next(i for i, label in enumerate(prompt_of.labels) if label != IGNORE_INDEX)
    split_b = next(i for i, label in enumerate(reply_of.labels) if label != IGNORE_INDEX)
    return Example(prompt_of.input_ids[:split_a] + reply_of.input_ids[split_b:],
                   [IGNORE_INDEX] * split_a + reply_of.labels[split_b:])


# ---------------------------------------------------------------------------------------------- losses


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


def needs_reference(config: Config) -> bool:
    return config.train.stage in ("dpo", "kto")


def reference_needs_copy(model) -> bool:
    """full / freeze change the base itself, so the reference must be a frozen copy of it."""
    return not has_adapter(model)


def stage_loss(config: Config, model, batch, reference: Reference | None) -> LossOutput:
    stage, pref = config.train.stage, config.preference
    if stage in ("sft", "pt"):
        return LossOutput(sft_loss_sum(model, batch))
    if stage == "rm":
        scores = value_scores(model, batch.rows)
        chosen, rejected = scores[:batch.count], scores[batch.count:]
        losses = bradley_terry_loss(chosen, rejected)
        return LossOutput(losses.sum(), {"accuracy": _stat((chosen > rejected).float()),
                                         "scores/chosen": _stat(chosen), "scores/rejected": _stat(rejected)})
    if stage == "kto":
        return _kto(config, model, batch, reference)
    sums, counts = sequence_logps(model, batch.rows)
    n = batch.count
    averages = sums / counts.clamp(min=1)
    if stage == "orpo":
        losses, chosen_r, rejected_r = orpo_loss(averages[:n], averages[n:], pref.beta)
    elif stage == "simpo":
        losses, chosen_r, rejected_r = simpo_loss(averages[:n], averages[n:], pref.beta, pref.simpo_gamma)
    else:
        ref_sums, ref_counts = reference.logps(model, batch.rows)
        policy, ref = (averages, ref_sums / ref_counts.clamp(min=1)) if pref.loss == "ipo" else (sums, ref_sums)
        losses, chosen_r, rejected_r = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], pref.beta, pref.loss,
                                                pref.label_smoothing)
    if pref.ftx and stage != "orpo":  # ORPO's loss already holds the chosen NLL
        losses = losses - pref.ftx * averages[:n]
    return LossOutput(losses.sum(), _reward_metrics(chosen_r, rejected_r))


def _kto(config: Config, model, batch: StageBatch, reference: Reference) -> LossOutput:
    pref = config.preference
    sums, counts = sequence_logps(model, batch.rows)
    ref_sums, _ = reference.logps(model, batch.rows)
    with torch.no_grad():  # the KL estimate z0 carries no gradient (KTO paper, §4)
        kl_policy, _ = sequence_logps(model, batch.kl_rows)
        kl_reference, _ = reference.logps(model, batch.kl_rows)
        kl = (kl_policy - kl_reference).mean().clamp(min=0)
    desirable = batch.desirable
    losses, rewards = kto_loss(sums, ref_sums, desirable, kl, pref.beta, pref.kto_desirable_weight,
                               pref.kto_undesirable_weight)
    if pref.ftx:
        losses = losses - pref.ftx * torch.where(desirable, sums / counts.clamp(min=1), torch.zeros_like(sums))
    metrics = {"kl": (float(kl) * batch.count, batch.count)}
    if desirable.any():
        metrics["rewards/chosen"] = _stat(rewards[desirable])
    if (~desirable).any():
        metrics["rewards/rejected"] = _stat(rewards[~desirable])
    return LossOutput(losses.sum(), metrics)


def _stat(values: torch.Tensor) -> tuple[float, int]:
    return float(values.detach().sum()), values.numel()


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    return {"rewards/chosen": _stat(chosen), "rewards/rejected": _stat(rejected),
            "rewards/margins": _stat(chosen - rejected), "rewards/accuracies": _stat((chosen > rejected).float())}


# ---------------------------------------------------------------------------------------------- reward model head


def value_scores(model, rows: Batch) -> torch.Tensor:
    """The reward of each example: the value head on the final hidden state of its last token."""
    return value_head(model)(last_hidden(model, rows))[:, 0].float()
