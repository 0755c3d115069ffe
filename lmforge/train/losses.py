"""Losses: SFT/PT cross-entropy summed over supervised positions (the loop divides); per-sequence log-probs and the
DPO/IPO/hinge, ORPO, SimPO, KTO and Bradley-Terry formulas (from the papers; tests/test_stages.py). The LM head runs
only on supervised rows, chunk by chunk (`ChunkedLinearCrossEntropy` computes gradients in forward; log-probs
recompute each chunk in backward); a PaddedBatch uses the model's own forward. Must not step optimizers or read data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.render import IGNORE_INDEX
from ..model.methods import unwrap
from .batching import Batch, PaddedBatch

CHUNK_ROWS = 256  # rows of logits alive at once: 256 × 49 152 × 4 B ≈ 50 MB for SmolLM2
BF16_CHUNK_ROWS = 512  # the same bytes in bfloat16 (fewer passes over the head's weight)
TINY_PROBABILITY = 1e-37  # below bf16's smallest normal (1.2e-38) a rounded probability loses digits: exact row


def supervised_hidden(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions whose next token is supervised, and those next tokens."""
    hidden = unwrap(model).get_decoder()(**batch.model_kwargs(), use_cache=False).last_hidden_state[0]
    keep = batch.targets != IGNORE_INDEX
    return hidden[keep], batch.targets[keep]


def _logits_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `hidden @ weight.t()` returns here: autocast's where it is on, else the operands' promotion."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i · Wᵀ), y_i), with d/dh (and d/dW when W trains) computed during the forward pass.

    bfloat16 logits (autocast, or a bf16 head) without a softcap take one fused pass: softmax computed in float32
    inside the kernel and rounded once to bf16 — it is the gradient's p - onehot (the matmul consumes bf16 anyway) and
    the loss is -log p(target) of it in float32: p is rounded to 2⁻⁹ relative, so |Δ log p| ≤ 0.002 per token, less
    than the bf16 logits' own rounding (tests/test_losses.py). Rows whose target probability would underflow are
    recomputed exactly. Otherwise (float32, softcap) the logits are upcast and log-softmaxed in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        compute = torch.promote_types(weight.dtype, torch.float32)  # half-precision logits are summed in fp32
        total = hidden.new_zeros((), dtype=compute)
        if not softcap and _logits_dtype(hidden, weight) == torch.bfloat16:
            h16, w16 = hidden.detach().to(torch.bfloat16), weight.detach().to(torch.bfloat16)  # autocast's rounding
            rows = max(1, min(BF16_CHUNK_ROWS, hidden.shape[0]))
            logits_buffer = hidden.new_empty((rows, weight.shape[0]), dtype=torch.bfloat16)  # reused by every chunk:
            probs_buffer = torch.empty_like(logits_buffer)  # no fresh 50 MB allocation (page faults) per chunk
        else:
            rows, h16 = CHUNK_ROWS, None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            if h16 is not None:
                raw = torch.mm(h16[start:start + rows], w16.t(), out=logits_buffer[:len(y)])
                grad_logits = torch.softmax(raw, -1, out=probs_buffer[:len(y)])  # float32 inside, rounded once
                picked = grad_logits.gather(1, y[:, None])[:, 0].to(compute)
                tiny = picked < TINY_PROBABILITY
                logp = picked.log()
                if tiny.any():
                    logp[tiny] = raw[tiny].to(compute).log_softmax(-1).gather(1, y[tiny][:, None])[:, 0]
                total -= logp.sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad_logits[torch.arange(len(y)), y] -= 1.0
            else:
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
                grad_hidden[start:start + rows] = grad_logits @ w16 if h16 is not None else grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ (h16[start:start + rows] if h16 is not None else h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (grad_hidden * scale if grad_hidden is not None else None,
                grad_weight * scale if grad_weight is not None else None, None, None)


def sft_loss_sum(model, batch: Batch | PaddedBatch) -> torch.Tensor:
    if isinstance(batch, PaddedBatch):
        return -token_logps(model, batch)[0].sum()
    hidden, targets = supervised_hidden(model, batch)
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head.bias is not None or not isinstance(head, torch.nn.Linear):  # unusual heads: the plain computation
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, targets, softcap)


# ---------------------------------------------------------------------------------------------- per-sequence log-probs


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def token_logps(model, batch: Batch | PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every supervised position, and the example each belongs to."""
    keep = batch.targets != IGNORE_INDEX
    examples = batch.example_ids()[keep]
    if isinstance(batch, PaddedBatch):  # the model's own forward: virtual tokens are added inside it
        logits = model(**batch.model_kwargs(), use_cache=False).logits
        logits = logits[:, -batch.input_ids.shape[1]:].float()  # prompt tuning prepends its tokens' outputs
        return logits.log_softmax(-1)[keep].gather(1, batch.targets[keep][:, None])[:, 0], examples
    hidden, targets = supervised_hidden(model, batch)
    base = unwrap(model)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if head.bias is not None or not isinstance(head, torch.nn.Linear):
        return head(hidden).float().log_softmax(-1).gather(1, targets[:, None])[:, 0], examples
    pieces = [checkpoint(_chunk_logps, hidden[i:i + CHUNK_ROWS], head.weight, targets[i:i + CHUNK_ROWS], softcap,
                         use_reentrant=False)
              for i in range(0, hidden.shape[0], CHUNK_ROWS)]
    return torch.cat(pieces), examples


def sequence_logps(model, batch: Batch | PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of each example's supervised tokens [n], how many tokens each has [n])."""
    logps, examples = token_logps(model, batch)
    sums = logps.new_zeros(batch.num_examples).index_add(0, examples, logps)
    counts = torch.zeros(batch.num_examples).index_add(0, examples, torch.ones_like(logps))
    return sums, counts


def last_hidden(model, batch: Batch) -> torch.Tensor:
    """The final hidden state at each example's last token [n, hidden] (what a reward model scores)."""
    hidden = unwrap(model).get_decoder()(**batch.model_kwargs(), use_cache=False).last_hidden_state[0]
    return hidden[batch.last_positions()]


# ---------------------------------------------------------------------------------------------- preference formulas
# Each returns per-pair (or per-example) losses and the implicit rewards that are logged; the caller sums and
# divides by the step's pair count, as the SFT loss is divided by its token count.


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β[(π_c - ref_c) - (π_r - ref_r)]); conservative DPO smooths the
    label; hinge (SLiC): max(0, 1 - β·h); IPO (Azar et al. 2023): (h - 1/(2β))², on length-averaged log-probs."""
    logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo loss {loss_type!r}")
    return (losses, beta * (policy_chosen - reference_chosen).detach(),
            beta * (policy_rejected - reference_rejected).detach())


def orpo_loss(chosen_avg, rejected_avg, beta: float):
    """ORPO (Hong et al. 2024): NLL of the chosen reply + β · -log σ(log odds(chosen) - log odds(rejected)), with
    odds(y) = p/(1-p) on length-averaged log-probs. Rewards are β · the averaged log-probs (no reference)."""
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg).clamp(max=1 - 1e-6)) -
                                              torch.log1p(-torch.exp(rejected_avg).clamp(max=1 - 1e-6)))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float):
    """SimPO (Meng et al. 2024): -log σ(β·avg log p(chosen) - β·avg log p(rejected) - γ), as LLaMA-Factory writes
    it: β · (difference - γ/β)."""
    losses = -F.logsigmoid(beta * ((chosen_avg - rejected_avg) - gamma / beta))
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(policy, reference, desirable, kl, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024): with r = π - ref and z₀ = the batch's KL estimate (no gradient), desirable
    replies lose w_d·(1 - σ(β(r - z₀))), undesirable ones w_u·(1 - σ(β(z₀ - r)))."""
    ratio = policy - reference
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


def bradley_terry_loss(chosen_scores, rejected_scores):
    """Pairwise reward-model loss: -log σ(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)
