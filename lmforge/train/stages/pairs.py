"""The stages on preference pairs: rm (a reward model: value head, Bradley-Terry), dpo (against a reference: sigmoid,
hinge or ipo), orpo and simpo (reference-free). Chosen and rejected are separate packed examples of one row; the loss
is divided by pairs. Must not step optimizers or touch the run dir.
"""

from __future__ import annotations

import torch

from ...config import Config
from ...data.preference import load_pairs
from ...data.render import RenderStats
from ...model.value_head import attach_value_head, value_head
from ..batching import Batch, collate
from ..losses import bradley_terry_loss, dpo_loss, last_hidden, orpo_loss, sequence_logps, simpo_loss
from .base import LossOutput, Reference, Stage, StageBatch, cut, render_last_replies, stat


class PairStage(Stage):
    """Units are (chosen, rejected) examples, loss on each one's last reply; a batch is chosen rows then rejected."""
    reads = "pairs"

    def load(self, specs, max_samples):
        return load_pairs(specs, max_samples)

    def units(self, tokenizer, pairs, cutoff_len: int):
        examples = render_last_replies(tokenizer, [c for pair in pairs for c in (pair.chosen, pair.rejected)])
        kept, stats = [], RenderStats(read=len(pairs))
        for chosen, rejected in zip(examples[::2], examples[1::2]):
            both = (cut(chosen, cutoff_len), cut(rejected, cutoff_len))
            if None in both:
                stats.dropped_cutoff += 1
                continue
            stats.truncated += both != (chosen, rejected)
            kept.append(both)
        stats.kept = len(kept)
        return kept, {**stats.__dict__, "tokens": sum(len(e.input_ids) for pair in kept for e in pair),
                      "supervised_tokens": sum(e.num_supervised for pair in kept for e in pair)}

    def batch(self, units, padded, pad_id=0):
        return StageBatch(collate([c for c, _ in units] + [r for _, r in units], padded, pad_id), len(units))


class RewardModel(PairStage):
    """rm: a value head on the last token's hidden state, trained so chosen scores above rejected."""
    name = "rm"

    def prepare_model(self, model) -> None:
        attach_value_head(model)  # trains with the method's parameters; saved as value_head.safetensors

    def loss(self, config: Config, model, batch: StageBatch, reference=None) -> LossOutput:
        scores = value_scores(model, batch.rows)
        chosen, rejected = scores[:batch.count], scores[batch.count:]
        losses = bradley_terry_loss(chosen, rejected)
        return LossOutput(losses.sum(), {"accuracy": stat((chosen > rejected).float()),
                                         "scores/chosen": stat(chosen), "scores/rejected": stat(rejected)})

    def follow_up(self, run_root) -> str:
        return f"score with it: lmforge score {run_root} --data PAIRS.jsonl"


class PolicyPairStage(PairStage):
    """dpo / orpo / simpo: a formula over the policy's per-sequence log-probs of chosen and rejected replies, plus
    preference.ftx × the chosen replies' SFT loss where the formula does not already hold it."""
    adds_ftx = True

    def loss(self, config: Config, model, batch: StageBatch, reference: Reference | None) -> LossOutput:
        pref, n = config.preference, batch.count
        sums, counts = sequence_logps(model, batch.rows)
        averages = sums / counts.clamp(min=1)
        losses, chosen_r, rejected_r = self.formula(pref, model, batch, reference, sums, averages)
        if pref.ftx and self.adds_ftx:
            losses = losses - pref.ftx * averages[:n]
        return LossOutput(losses.sum(), {"rewards/chosen": stat(chosen_r), "rewards/rejected": stat(rejected_r),
                                         "rewards/margins": stat(chosen_r - rejected_r),
                                         "rewards/accuracies": stat((chosen_r > rejected_r).float())})

    def formula(self, pref, model, batch, reference, sums, averages):
        """(per-pair losses, chosen rewards, rejected rewards)."""
        raise NotImplementedError


class DPO(PolicyPairStage):
    """dpo: the log-prob margin over a reference model (sigmoid, hinge or ipo)."""
    name = "dpo"
    needs_reference = True

    def formula(self, pref, model, batch, reference, sums, averages):
        n = batch.count
        ref_sums, ref_counts = reference.logps(model, batch.rows)
        policy, ref = (averages, ref_sums / ref_counts.clamp(min=1)) if pref.loss == "ipo" else (sums, ref_sums)
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], pref.beta, pref.loss, pref.label_smoothing)


class ORPO(PolicyPairStage):
    """orpo: the chosen NLL plus an odds-ratio term, no reference."""
    name = "orpo"
    adds_ftx = False  # ORPO's loss already holds the chosen NLL

    def formula(self, pref, model, batch, reference, sums, averages):
        n = batch.count
        return orpo_loss(averages[:n], averages[n:], pref.beta)


class SimPO(PolicyPairStage):
    """simpo: length-averaged log-prob margin against a target margin, no reference."""
    name = "simpo"

    def formula(self, pref, model, batch, reference, sums, averages):
        n = batch.count
        return simpo_loss(averages[:n], averages[n:], pref.beta, pref.simpo_gamma)


def value_scores(model, rows: Batch) -> torch.Tensor:
    """The reward of each example: the value head on the final hidden state of its last token."""
    return value_head(model)(last_hidden(model, rows))[:, 0].float()
