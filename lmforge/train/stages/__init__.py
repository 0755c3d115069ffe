"""The training stages, one object each, by name: which data a stage reads, the units it makes of it, how units
become micro-batches, the loss and the stage's own figures, whether it needs a reference model.

    lm.py     pt, sft
    pairs.py  rm, dpo, orpo, simpo
    kto.py    kto
    base.py   the Stage interface, batch / loss types, the held-out split, the reference model

Adding a stage: a Stage subclass in the module of its family (or a new one), one entry in STAGES below, and its name
in config/schema.py's TrainConfig.stage (tests/test_stages.py checks the two agree).
"""

from __future__ import annotations

from ...config import Config
from .base import LossOutput, Reference, Stage, StageBatch, StageData, hold_out, reference_needs_copy
from .kto import KTO
from .lm import Pretraining, SupervisedFineTuning
from .pairs import DPO, ORPO, RewardModel, SimPO, value_scores

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Pretraining(), SupervisedFineTuning(), RewardModel(), DPO(), ORPO(), SimPO(), KTO())}


def stage_of(config: Config) -> Stage:
    """The configured stage (config.train.stage)."""
    return STAGES[config.train.stage]


def read_stage_data(config: Config) -> tuple[list, dict]:
    """The records of data.train in the shape the configured stage reads (conversations, pairs, replies, documents)."""
    return stage_of(config).read(config)


def prepare_data(config: Config, tokenizer) -> StageData:
    """The configured stage's data: read, split, tokenized into units, with its report."""
    return stage_of(config).prepare(config, tokenizer)


__all__ = ["STAGES", "LossOutput", "Reference", "Stage", "StageBatch", "StageData", "hold_out", "prepare_data",
           "read_stage_data", "reference_needs_copy", "stage_of", "value_scores"]
