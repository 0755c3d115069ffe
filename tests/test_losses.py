"""The packed SFT loss equals the naive one: each example alone through the full model, HF's own loss.

Tiny random Llama / Qwen2 models with the tiny test tokenizer (a real byte-level BPE). Equality of the loss and of
every gradient shows that running the LM head only on supervised positions and attending per example inside one
packed row are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, qwen_tokenizer, tiny_tokenizer
from transformers import AutoModelForCausalLM

from lmforge.config import MethodConfig
from lmforge.conversation import Conversation
from lmforge.data.render import IGNORE_INDEX, Example, render_example
from lmforge.model.lean_mlp import use_lean_mlp
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.model.methods import apply_method
from lmforge.model.packed_attention import register
from lmforge.train import losses
from lmforge.train.batching import pack
from lmforge.train.heap import trim_heap_between_layers
from lmforge.train.losses import sft_loss_sum, supervised_hidden

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Answer in Chinese."}, {"role": "user", "content": "Say hello"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "And goodbye?"},
     {"role": "assistant", "content": "再见。祝你今天过得愉快。"}],
    [{"role": "user", "content": "Count to five, please, one number per line."},
     {"role": "assistant", "content": "1\n2\n3\n4\n5"}],
]


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "gemma3", "qwen2-window"])
def model_dir(request, tmp_path) -> str:
    """Llama, Qwen2, and two with a sliding-window layer (8 tokens, shorter than the examples)."""
    if request.param.startswith("tiny_"):
        return request.getfixturevalue(request.param)
    tokenizer = qwen_tokenizer() if request.param.startswith("qwen2") else tiny_tokenizer()
    return make_tiny_model(request.param, tokenizer, tmp_path / request.param)


def packed_model(path: str):
    """The model as lmforge trains it: packed attention, the lean gated MLP, heap trims between layers."""
    model = load_model(path, torch.float32)
    model.set_attn_implementation(register())
    assert use_lean_mlp(model) == model.config.num_hidden_layers
    assert trim_heap_between_layers(model)
    return model


def reference_model(path: str):
    """The same weights with transformers' own eager attention: nothing of lmforge in the forward pass."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def examples_for(path: str):
    tokenizer = load_tokenizer(path)
    examples = [render_example(tokenizer, Conversation.from_dicts(m)) for m in CONVERSATIONS]
    assert len({len(e.input_ids) for e in examples}) == 3, "examples should have different lengths"
    return examples


def naive_loss(model, examples) -> torch.Tensor:
    """Σ over examples of HF's mean loss × its count of supervised next tokens, ÷ the total count."""
    total, count = 0.0, 0
    for example in examples:
        n = sum(label != IGNORE_INDEX for label in example.labels[1:])
        out = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
        total = total + out.loss * n
        count += n
    return total / count


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_grads_equal(actual: dict, expected: dict, rtol: float = 1e-5):
    assert actual.keys() == expected.keys()
    for name, g in expected.items():
        assert g.norm() > 0, f"{name}: no gradient"
        error = (actual[name] - g).norm() / g.norm()
        assert error < rtol, f"{name}: relative gradient error {error:.2e}"


def test_packed_loss_and_gradients_equal_the_naive_per_example_computation(model_dir):
    examples = examples_for(model_dir)
    batch = pack(examples)
    model, reference = packed_model(model_dir), reference_model(model_dir)

    loss = sft_loss_sum(model, batch) / batch.num_supervised
    expected = naive_loss(reference, examples)
    assert batch.num_supervised == sum(e.num_supervised for e in examples)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert loss.item() > 1.0  # random weights: a real loss, not a degenerate zero

    loss.backward()
    expected.backward()
    assert_grads_equal(grads(model), grads(reference))


def test_each_packed_example_sees_only_itself(model_dir):
    examples = examples_for(model_dir)
    model = packed_model(model_dir)
    decoder = model.get_decoder()

    def packed_hidden(exs):
        batch = pack(exs)
        with torch.no_grad():
            hidden = decoder(**batch.model_kwargs(), use_cache=False).last_hidden_state[0]
        bounds = batch.cu_seq_lens.tolist()
        return [hidden[s:e] for s, e in zip(bounds[:-1], bounds[1:])]

    packed = packed_hidden(examples)
    for example, inside in zip(examples, packed):
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([example.input_ids]), use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)

    # Change every token of the first example (same length): the others' hidden states do not move at all.
    changed = [Example([(t + 7) % 800 + 100 for t in examples[0].input_ids], examples[0].labels)]
    after = packed_hidden(changed + examples[1:])
    assert not torch.allclose(after[0], packed[0], atol=1e-3)
    for before_i, after_i in zip(packed[1:], after[1:]):
        torch.testing.assert_close(after_i, before_i, rtol=0, atol=1e-6)


def test_lm_head_runs_only_on_supervised_positions(tiny_llama, monkeypatch):
    """The head's matmul sees one row per supervised target, in chunks, never a full [tokens, vocab] logits tensor."""
    batch = pack(examples_for(tiny_llama))
    model = packed_model(tiny_llama)
    hidden, targets = supervised_hidden(model, batch)
    assert hidden.shape[0] == targets.shape[0] == batch.num_supervised < batch.num_tokens

    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)
    shapes = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: shapes.append(tuple(a.shape) + tuple(b.shape))
                        or real_matmul(a, b))
    sft_loss_sum(model, batch)
    head_rows = [s[0] for s in shapes if s[-1] == model.config.vocab_size]
    assert sum(head_rows) == batch.num_supervised and max(head_rows) <= 7


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_linear_cross_entropy_equals_plain_computation(softcap, weight_trains, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 5)  # 13 rows → chunks of 5, 5, 3
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=weight_trains)
    targets = torch.randint(0, 40, (13,))

    fused = losses.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap) * 0.25
    fused.backward()
    fused_grads = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad = None
    weight.grad = None

    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = F.cross_entropy(logits, targets, reduction="sum") * 0.25
    plain.backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    if weight_trains:
        torch.testing.assert_close(fused_grads[1], weight.grad)


def _bf16_reference(hidden, weight, targets):
    """float64 cross-entropy of the logits a bf16 matmul returns (inputs and product rounded to bf16), and its
    gradients with respect to hidden and weight."""
    h = hidden.detach().bfloat16().double().requires_grad_()
    w = weight.detach().bfloat16().double().requires_grad_()
    exact = h @ w.t()
    logits = exact + (exact.bfloat16().double() - exact).detach()  # rounded values, the product's gradient
    loss = F.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("weight_trains", [False, True])
def test_bf16_chunked_loss_and_gradients_equal_the_reference_within_rounding(weight_trains, monkeypatch):
    """Under bf16 autocast the head's softmax is computed in one fused pass and rounded once to bf16 (the gradient);
    the loss is -log of that rounded probability. Stated tolerance: the loss within 2⁻⁹ per token (|Δ log p| of p's
    rounding) — measured ~1e-6 relative —, gradients within 2 % of their largest entry (bf16 grad_logits and a bf16
    matmul, as in the float32 path's cast), against float64 from the same bf16 logits."""
    monkeypatch.setattr(losses, "BF16_CHUNK_ROWS", 5)  # 13 rows → chunks of 5, 5, 3
    torch.manual_seed(0)
    hidden = torch.randn(13, 64, requires_grad=True)
    weight = torch.randn(3000, 64) * 0.3
    weight = weight.requires_grad_() if weight_trains else weight.bfloat16()  # LoRA: the frozen head is bf16
    targets = torch.randint(0, 3000, (13,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, None)
    loss.backward()
    ref_loss, ref_hidden, ref_weight = _bf16_reference(hidden, weight, targets)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= len(targets) * 2 ** -9
    torch.testing.assert_close(hidden.grad.double(), ref_hidden, rtol=0, atol=0.02 * ref_hidden.abs().max().item())
    if weight_trains:
        torch.testing.assert_close(weight.grad.double(), ref_weight, rtol=0, atol=0.02 * ref_weight.abs().max().item())


def test_bf16_chunked_loss_recomputes_a_row_whose_target_probability_underflows(monkeypatch):
    """A target 1,000 nats below the best logit has p = 0 in bf16 (and float32): that row's log-softmax is recomputed
    exactly, so the loss stays finite and equal to the reference; without the recomputation it would be inf."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 16) * torch.tensor([[100.0], [1.0], [1.0]])
    hidden.requires_grad_()
    weight = torch.randn(50, 16).bfloat16()
    with torch.no_grad():
        targets = (hidden.bfloat16() @ weight.t()).float().argmin(-1)
    ref_loss, ref_hidden, _ = _bf16_reference(hidden, weight, targets)
    assert ref_loss > 500
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, None)
        monkeypatch.setattr(losses, "TINY_PROBABILITY", 0.0)
        unguarded = losses.ChunkedLinearCrossEntropy.apply(hidden.detach(), weight, targets, None)
    loss.backward()
    assert torch.isfinite(loss) and unguarded.item() == float("inf")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-3, atol=0)
    torch.testing.assert_close(hidden.grad.double(), ref_hidden, rtol=0, atol=0.02 * ref_hidden.abs().max().item())


def test_loss_through_a_lora_model(tiny_llama):
    examples = examples_for(tiny_llama)
    batch = pack(examples)
    model = apply_method(packed_model(tiny_llama), MethodConfig(type="lora", lora_target="all"))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output so the test can tell
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)

    loss = sft_loss_sum(model, batch) / batch.num_supervised
    with model.disable_adapter(), torch.no_grad():
        base_loss = sft_loss_sum(model, batch) / batch.num_supervised
    assert abs(loss.item() - base_loss.item()) > 1e-3, "the adapter must be part of the packed loss"

    loss.backward()
    packed_grads = grads(model)
    assert packed_grads and all("lora_" in name for name in packed_grads)
    model.zero_grad()
    expected = naive_loss(model, examples)  # through PeftModel.forward, HF's loss
    assert abs(loss.item() - expected.item()) < 1e-5
    expected.backward()
    assert_grads_equal(packed_grads, grads(model))
