"""One example's causal attention for training on a CPU under bf16 autocast, with its own backward.

The queries go in blocks of BLOCK rows; a block multiplies only the keys up to its own last row, so of the masked upper
triangle only the diagonal block is computed. Products are bf16 batched matmuls (the query heads that share a
key/value head are stacked into one matrix, so keys and values are never copied per head); the softmax and its
backward run in torch's fused kernels, which compute in float32. Scores are rounded to bf16 before the softmax, as
eager attention under autocast does: the output differs from float32 attention by ~1e-2 relative, torch's bf16 flash
attention by ~6e-3 (benchmarks/RESULTS.md).

Why: torch's CPU flash-attention backward runs at ~18 GFLOP/s on the 64–512-token examples fine-tuning sees and was a
third of a bf16 training step; this computes forward + backward 2.0–2.3× faster at 256–512 tokens (1.15× at 128, 0.8×
at 64; benchmarks/attention_speed.py). An example of up to KEEP_PROBABILITIES_UP_TO tokens keeps its attention
probabilities for the backward (bf16, heads × T²/2 values: about 110 MiB on the benchmark's batches of the bundled
model, where the new attention raised peak memory by ~150 MiB, 2,090 → 2,250 MiB in an alternating A/B); a longer one
recomputes them block by block, so its memory stays linear in T. Must not know about packing, models or training.
"""

from __future__ import annotations

import torch

BLOCK = 64  # query rows per block: of 32/64/128/256 the fastest at 256–1,024 tokens on a Zen 4 (AMX not measured)
KEEP_PROBABILITIES_UP_TO = 512  # tokens

_upper_triangles: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """query [1, heads, T, dim], key and value [1, kv_heads, T, dim] (any float dtype) → [1, heads, T, dim] in
    `dtype`, the dtype its products compute in."""
    return _BlockedCausalAttention.apply(query[0].to(dtype), key[0].to(dtype), value[0].to(dtype), scale)[None]


def _masked_above_diagonal(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, rows]: -inf above the diagonal, 0 elsewhere; added to a block's diagonal square of scores."""
    mask = _upper_triangles.get((rows, dtype))
    if mask is None:
        mask = _upper_triangles[(rows, dtype)] = torch.full((rows, rows), float("-inf")).triu_(1).to(dtype)
    return mask


def _blocks(length: int):
    """(start, end) of each query block."""
    return [(start, min(start + BLOCK, length)) for start in range(0, length, BLOCK)]


def _probabilities(query_block, keys, start: int, end: int, groups: tuple[int, int]):
    """Softmax of one query block's scores over the keys up to `end`: [kv_heads, group, rows, end]."""
    kv_heads, group = groups
    rows = end - start
    scores = torch.bmm(query_block, keys[:, :end].transpose(1, 2)).view(kv_heads, group, rows, end)
    scores[..., start:end] += _masked_above_diagonal(rows, scores.dtype)
    return torch.softmax(scores, -1)


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale):
        heads, length, dim = query.shape
        kv_heads = key.shape[0]
        groups = (kv_heads, heads // kv_heads)
        # the scale goes into the queries once (one rounding), rows of a query head group stacked per kv head
        scaled = (query.float() * scale).to(query.dtype).view(*groups, length, dim)
        key, value = key.contiguous(), value.contiguous()
        out = query.new_empty(*groups, length, dim)
        kept = []
        for start, end in _blocks(length):
            rows = end - start
            block = scaled[:, :, start:end].reshape(kv_heads, -1, dim)
            probabilities = _probabilities(block, key, start, end, groups)
            out[:, :, start:end] = torch.bmm(probabilities.view(kv_heads, -1, end), value[:, :end]).view(
                *groups, rows, dim)
            if length <= KEEP_PROBABILITIES_UP_TO:
                kept.append(probabilities)
        ctx.save_for_backward(scaled, key, value, *kept)
        ctx.scale = scale
        return out.view(heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        scaled, key, value, *kept = ctx.saved_tensors
        kv_heads, group, length, dim = scaled.shape
        groups = (kv_heads, group)
        grad_out = grad_out.to(scaled.dtype).reshape(*groups, length, dim)
        grad_query = scaled.new_empty(*groups, length, dim)
        grad_key = torch.zeros(kv_heads, length, dim, dtype=torch.float32)
        grad_value = torch.zeros(kv_heads, length, dim, dtype=torch.float32)
        for i, (start, end) in enumerate(_blocks(length)):
            rows = end - start
            block = scaled[:, :, start:end].reshape(kv_heads, -1, dim)
            probabilities = kept[i] if kept else _probabilities(block, key, start, end, groups)
            grad_block = grad_out[:, :, start:end].reshape(kv_heads, -1, dim)
            grad_value[:, :end] += torch.bmm(probabilities.view(kv_heads, -1, end).transpose(1, 2), grad_block)
            grad_probabilities = torch.bmm(grad_block, value[:, :end].transpose(1, 2)).view(*groups, rows, end)
            grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, scaled.dtype).view(
                kv_heads, -1, end)
            grad_query[:, :, start:end] = torch.bmm(grad_scores, key[:, :end]).view(*groups, rows, dim)
            grad_key[:, :end] += torch.bmm(grad_scores.transpose(1, 2), block)
        grad_query = (grad_query.float() * ctx.scale).to(scaled.dtype).view(kv_heads * group, length, dim)
        return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), None
