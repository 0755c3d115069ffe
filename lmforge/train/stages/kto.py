"""kto: single replies labelled desirable or undesirable, against a reference model, with the KL estimate from
mismatched prompt/reply rows (each reply's prompt + the next example's reply, fixed when the data is prepared so it
does not depend on the batch size). The loss is divided by replies. Must not step optimizers or touch the run dir.
"""

from __future__ import annotations

import torch

from ...config import Config
from ...data.preference import load_labelled
from ...data.render import IGNORE_INDEX, Example, RenderStats
from ...errors import DataError
from ..batching import collate
from ..losses import kto_loss, sequence_logps
from .base import LossOutput, Reference, Stage, StageBatch, cut, render_last_replies, stat


class KTO(Stage):
    name = "kto"
    reads = "kto"
    needs_reference = True

    def load(self, specs, max_samples):
        return load_labelled(specs, max_samples)

    def units(self, tokenizer, items, cutoff_len: int):
        examples = render_last_replies(tokenizer, [item.conversation for item in items])
        kept, stats = [], RenderStats(read=len(items))
        for example, item in zip(examples, items):
            example_cut = cut(example, cutoff_len)
            if example_cut is None:
                stats.dropped_cutoff += 1
                continue
            stats.truncated += example_cut is not example
            kept.append((example_cut, item.desirable))
        stats.kept = len(kept)
        if len(kept) == 1:
            raise DataError("kto needs at least 2 replies in train and in val (data.val_size): its KL estimate pairs "
                            "each prompt with another example's reply")
        units = [(example, desirable, mismatched(example, kept[(i + 1) % len(kept)][0]))
                 for i, (example, desirable) in enumerate(kept)]
        return units, {**stats.__dict__, "desirable": sum(d for _, d in kept), "tokens": sum(len(e.input_ids)
                       for e, _ in kept), "supervised_tokens": sum(e.num_supervised for e, _ in kept)}

    def batch(self, units, padded, pad_id=0):
        return StageBatch(collate([e for e, _, _ in units], padded, pad_id), len(units),
                          torch.tensor([d for _, d, _ in units]), collate([kl for _, _, kl in units], padded, pad_id))

    def loss(self, config: Config, model, batch: StageBatch, reference: Reference | None) -> LossOutput:
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
            metrics["rewards/chosen"] = stat(rewards[desirable])
        if (~desirable).any():
            metrics["rewards/rejected"] = stat(rewards[~desirable])
        return LossOutput(losses.sum(), metrics)


def mismatched(prompt_of: Example, reply_of: Example) -> Example:
    """Prompt of one example + reply of another (KTO's KL estimate uses unrelated prompt/reply pairs)."""
    split_a = next(i for i, label in enumerate(prompt_of.labels) if label != IGNORE_INDEX)
    split_b = next(i for i, label in enumerate(reply_of.labels) if label != IGNORE_INDEX)
    return Example(prompt_of.input_ids[:split_a] + reply_of.input_ids[split_b:],
                   [IGNORE_INDEX] * split_a + reply_of.labels[split_b:])
