"""The blocked causal attention that CPU bf16 training runs (model/blocked_attention.py) computes what float32
attention computes, within bf16's rounding, forward and backward — at lengths on and around its block edges and past
the length where it stops keeping probabilities — and packed training under bf16 autocast goes through it for all but
short examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import blocked_attention
from lmforge.model.blocked_attention import BLOCK, KEEP_PROBABILITIES_UP_TO, causal_attention
from lmforge.model.packed_attention import SHORT_IN_FLOAT32, packed_attention_forward

HEADS, KV_HEADS, DIM = 6, 2, 32
TOLERANCE = 2.5e-2  # relative (norm of the difference / norm of float32's): bf16 scores and products


def inputs(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # scores of a few units, as trained models have; rounded to bf16 first so both sides see the same values
    q = (torch.randn(1, HEADS, length, DIM, generator=generator) * 2).bfloat16().float().requires_grad_()
    k = (torch.randn(1, KV_HEADS, length, DIM, generator=generator) * 2).bfloat16().float().requires_grad_()
    v = torch.randn(1, KV_HEADS, length, DIM, generator=generator).bfloat16().float().requires_grad_()
    grad_out = torch.randn(1, HEADS, length, DIM, generator=generator)
    return q, k, v, grad_out


def forward_backward(attention, q, k, v, grad_out):
    out = attention(q, k, v)
    out.float().backward(grad_out)
    results = [out.detach().float(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    q.grad = k.grad = v.grad = None
    return results


def float32_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=DIM ** -0.5)


def blocked(q, k, v):
    return causal_attention(q, k, v, DIM ** -0.5)


@pytest.mark.parametrize("length", [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, KEEP_PROBABILITIES_UP_TO + 7])
def test_output_and_gradients_equal_float32_attention_within_bf16_rounding(length):
    q, k, v, grad_out = inputs(length)
    reference = forward_backward(float32_attention, q, k, v, grad_out)
    result = forward_backward(blocked, q, k, v, grad_out)
    # (+1e-4: at one token the query and key gradients are 0, float32 leaves rounding noise of ~1e-6)
    for name, got, want in zip(("output", "query grad", "key grad", "value grad"), result, reference):
        error = (got - want).norm().item()
        assert error <= TOLERANCE * want.norm().item() + 1e-4, (name, length, error, want.norm().item())


def test_in_float32_it_is_float32_attention_to_rounding():
    """The kernel in float32 (benchmarks/attention_speed.py --precision float32 measures it): no bf16 anywhere."""
    q, k, v, grad_out = inputs(2 * BLOCK + 9)
    reference = forward_backward(float32_attention, q, k, v, grad_out)
    result = forward_backward(lambda *qkv: causal_attention(*qkv, DIM ** -0.5, torch.float32), q, k, v, grad_out)
    for got, want in zip(result, reference):
        assert (got - want).norm() <= 1e-5 * want.norm()


def test_a_later_token_never_changes_an_earlier_output():
    q, k, v, _ = inputs(2 * BLOCK + 3)
    before = blocked(q, k, v).detach()
    with torch.no_grad():
        k[:, :, -1] += 5.0
        v[:, :, -1] -= 5.0
    after = blocked(q, k, v).detach()
    assert torch.equal(after[:, :, :-1], before[:, :, :-1])
    assert not torch.equal(after[:, :, -1], before[:, :, -1])


def test_recomputing_probabilities_in_the_backward_gives_the_same_gradients(monkeypatch):
    """Long examples do not keep their probabilities; the recomputed ones are the same values."""
    q, k, v, grad_out = inputs(2 * BLOCK + 9)
    kept = forward_backward(blocked, q, k, v, grad_out)
    monkeypatch.setattr(blocked_attention, "KEEP_PROBABILITIES_UP_TO", 0)
    recomputed = forward_backward(blocked, q, k, v, grad_out)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


def test_packed_examples_under_cpu_bf16_autocast_attend_through_the_blocked_kernel_short_ones_in_float32():
    lengths = [SHORT_IN_FLOAT32, 5, 2 * BLOCK + 3, SHORT_IN_FLOAT32 - 1]
    q, k, v, _ = inputs(sum(lengths))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = torch.nn.Module().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = packed_attention_forward(module, q, k, v, None, scaling=DIM ** -0.5, cu_seq_lens_q=bounds)
    assert packed.dtype == torch.bfloat16
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        attention = blocked if length >= SHORT_IN_FLOAT32 else float32_attention
        alone = attention(q[:, :, part].bfloat16().float(), k[:, :, part].bfloat16().float(),
                          v[:, :, part].bfloat16().float()).bfloat16()
        assert torch.equal(packed[0, part], alone[0].transpose(0, 1)), length
        start += length
