"""Losses. SFT: cross-entropy on supervised positions only, summed (the loop divides by supervised tokens).

The LM head runs only on the hidden states whose next token carries loss: full-vocabulary logits for prompt tokens
are never built. Must not step optimizers or know about data files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import Batch
from .render import IGNORE_INDEX


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is supervised, and those next tokens."""
    base = _base_model(model)
    hidden = base.get_decoder()(**batch.model_kwargs(), use_cache=False).last_hidden_state[0]  # [T, H]
    keep = batch.targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[keep]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, batch.targets[keep]


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    logits, targets = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")
