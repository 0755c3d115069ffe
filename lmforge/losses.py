"""Losses. SFT: cross-entropy on supervised positions only, summed (the loop divides by supervised tokens).

The LM head runs only on the hidden states whose next token carries loss: full-vocabulary logits for prompt tokens
are never built. Those logits are also never held all at once: `ChunkedLinearCrossEntropy` computes loss and
gradients chunk by chunk in the forward pass (as Liger's fused linear cross-entropy does), so the LM head costs one
chunk of logits in memory instead of three full copies. Must not step optimizers or know about data files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import Batch
from .methods import unwrap
from .render import IGNORE_INDEX

CHUNK_ROWS = 256  # rows of logits alive at once: 256 × 49 152 × 4 B ≈ 50 MB for SmolLM2


def supervised_hidden(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions whose next token is supervised, and those next tokens."""
    hidden = unwrap(model).get_decoder()(**batch.model_kwargs(), use_cache=False).last_hidden_state[0]
    keep = batch.targets != IGNORE_INDEX
    return hidden[keep], batch.targets[keep]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i · Wᵀ), y_i), with d/dh (and d/dW when W trains) computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        compute = torch.promote_types(weight.dtype, torch.float32)  # half-precision logits are summed in fp32
        total = hidden.new_zeros((), dtype=compute)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, y = hidden[start:start + CHUNK_ROWS], targets[start:start + CHUNK_ROWS]
            raw = (h @ weight.t()).to(compute)
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw
            log_probs = logits.log_softmax(-1)
            total -= log_probs.gather(1, y[:, None]).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(len(y)), y] -= 1.0
            if softcap:
                grad_logits *= 1.0 - (logits / softcap) ** 2
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + CHUNK_ROWS] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (grad_hidden * scale if grad_hidden is not None else None,
                grad_weight * scale if grad_weight is not None else None, None, None)


def sft_loss_sum(model, batch: Batch) -> torch.Tensor:
    hidden, targets = supervised_hidden(model, batch)
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head.bias is not None or not isinstance(head, torch.nn.Linear):  # unusual heads: the plain computation
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, targets, softcap)
