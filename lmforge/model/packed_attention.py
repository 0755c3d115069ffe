"""Attention over packed examples: one causal attention per example, no padding, no cross-example attention.

Registered with transformers' AttentionInterface as "lmforge_packed". With `cu_seq_lens_q` in the call (training,
see batching.Batch) each example attends only to itself; without it (generation, padded batches) it is plain SDPA.
Must not know about losses or training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_ATTENTION = "lmforge_packed"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query: [1, heads, T, dim]; key/value: [1, kv_heads, T, dim]; enable_gqa shares kv heads without copying them
    bounds = cu_seq_lens.tolist()
    outputs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       dropout_p=dropout if module.training else 0.0, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION
