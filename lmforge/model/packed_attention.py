"""Attention over packed examples: one causal attention per example, no padding, no cross-example attention.

Registered with transformers' AttentionInterface as "lmforge_packed". With `cu_seq_lens_q` in the call (training,
see batching.Batch) each example attends only to itself, and within a sliding-window layer's window; without it
(generation, padded batches) it is plain SDPA with the mask transformers built.
Must not know about losses or training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import blocked_attention

PACKED_ATTENTION = "lmforge_packed"
SHORT_IN_FLOAT32 = 100  # tokens: below this, float32 flash beats the blocked kernel under CPU bf16 (see _causal)


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query: [1, heads, T, dim]; key/value: [1, kv_heads, T, dim]; enable_gqa shares kv heads without copying them.
    # split, not slicing: a slice's backward fills a zero tensor of the whole row per example and adds them up
    bounds = cu_seq_lens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    dropout = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")  # a sliding-window layer's (Gemma 3, Mistral, Qwen2 with windows), else None
    outputs = [_causal(q, k, v, dropout, scaling) if window is None or q.shape[2] <= window
               else _windowed(q, k, v, dropout, scaling, window)
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _causal(query, key, value, dropout: float, scaling):
    """One example's causal attention. Under CPU bf16 autocast (no dropout) an example of SHORT_IN_FLOAT32 tokens or
    more goes through blocked_attention's kernel: torch's CPU flash attention is 2.0–2.3× slower forward + backward at
    256–512 tokens. Shorter ones attend in float32 flash, which is faster there than the kernel's per-block ops and
    than bf16 flash (benchmarks/RESULTS.md)."""
    if (dropout == 0.0 and query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        if query.shape[2] >= SHORT_IN_FLOAT32:
            return blocked_attention.causal_attention(query, key, value,
                                                      query.shape[-1] ** -0.5 if scaling is None else scaling)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=True,
                                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def _windowed(query, key, value, dropout: float, scaling, window: int):
    """One example longer than a sliding-window layer's window: position p attends to keys p - window < k <= p, as
    transformers' sliding-window mask has it (the fast decoder's too). Rare in fine-tuning, so plain masked SDPA."""
    positions = torch.arange(query.shape[2], device=query.device)
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def register() -> str:
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION
