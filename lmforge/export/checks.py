"""The checks an export must pass before it is declared done: probe conversations, logits compared by relative RMS
within a per-precision tolerance, and tokenizers compared by what they render (template, special ids, prompt tokens,
training examples with their labels).

Must not write files or load models; export.py decides what is compared with what.
"""

from __future__ import annotations

import math

import torch

from ..conversation import Conversation
from ..data.render import render_example, render_prompt, render_text
from ..errors import ModelError

# Largest allowed relative RMS difference of logits, ||got - expected|| / ||expected||, per stored precision.
# Measured on a LoRA run of SmolLM2-135M: float32 merge 1.3e-6, float16 6.8e-4, bfloat16 6.5e-3, q8_0 GGUF 2.1e-2
# (its weights were Q4_1 before; next-token agreement 96.7%). The limits leave headroom and still fail on any real
# mistake: a wrong or transposed tensor, or a lost adapter, moves it to ~1.
TOLERANCE = {"merge": 1e-4, "float32": 1e-5, "f32": 1e-5, "float16": 1e-2, "f16": 1e-2, "bfloat16": 3e-2,
             "q8_0": 5e-2}
# Conversations every export is checked on (prompt = all but the last message; the last is the reply).
PROBES = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are a careful legal assistant."},
     {"role": "user", "content": "租客提前退租需要付违约金吗？"},
     {"role": "assistant", "content": "要看租赁合同的约定。"},
     {"role": "user", "content": "如果合同没写呢？"},
     {"role": "assistant", "content": "一般按实际损失协商，可以咨询律师。"}],
    [{"role": "user", "content": "Summarise: the tenant pays 1,200 EUR rent on the 1st of each month."},
     {"role": "assistant", "content": "Rent: 1,200 EUR, due monthly on the 1st."}],
]


class ExportVerificationError(ModelError):
    """The export was written to a temp dir but failed a check; nothing was put at OUT."""


def usable_probes(tokenizer) -> list[list[dict]]:
    """The probe conversations this chat template accepts (some reject a system message); without a template, none
    (the checks then run on plain text)."""
    if not tokenizer.chat_template:
        return []
    usable = []
    for conversation in PROBES:
        try:
            render_text(tokenizer, conversation)
        except Exception:  # the template's raise_exception: this probe's shape is not one it accepts
            continue
        usable.append(conversation)
    if not usable:
        raise ModelError("the chat template rejects every probe conversation (user/assistant turns); cannot verify")
    return usable


def probe_ids(tokenizer, probes: list[list[dict]]) -> list[list[int]]:
    if not probes:
        return [tokenizer(text, add_special_tokens=True)["input_ids"] for text in
                ("The capital of France is", "租客提前退租需要付违约金吗？", "Rent: 1,200 EUR, due monthly.")]
    return [render_prompt(tokenizer, conversation[:-1]) for conversation in probes]


@torch.inference_mode()
def logits_of(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]


def logit_gap(expected: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """How far `got` is from `expected`: relative RMS, largest absolute difference, next-token agreement."""
    squared = sum(float(((a - b) ** 2).sum()) for a, b in zip(expected, got))
    scale = sum(float((a ** 2).sum()) for a in expected)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(expected, got))
    positions = sum(a.shape[0] for a in expected)
    return {"relative_rms": math.sqrt(squared / max(scale, 1e-30)),
            "max_abs": max(float((a - b).abs().max()) for a, b in zip(expected, got)),
            "top1_agreement": round(agree / positions, 4)}


def require_close(what: str, expected, got, tolerance_key: str) -> dict:
    gap = logit_gap(expected, got)
    gap["tolerance"] = TOLERANCE[tolerance_key]
    if not gap["relative_rms"] <= gap["tolerance"]:
        raise ExportVerificationError(
            f"verification failed: {what} differ from the trained model's logits (relative RMS "
            f"{gap['relative_rms']:.3g} > {gap['tolerance']:g}; largest difference {gap['max_abs']:.3g}). Nothing "
            f"was written to the output dir; please report this with the command you ran")
    return gap


def tokenizer_differences(expected, got, probes: list[list[dict]]) -> list[str]:
    """Where `got` would give the model other tokens than training did: template, special ids, rendered probes."""
    problems = []
    if (expected.chat_template or None) != (got.chat_template or None):
        problems.append("the chat template differs")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(expected, name) != getattr(got, name):
            problems.append(f"{name} {getattr(got, name)} instead of {getattr(expected, name)}")
    for index, (want, have) in enumerate(zip(probe_ids(expected, probes), probe_ids(got, probes))):
        if want != have:
            problems.append(f"probe {index}: the prompt tokenizes differently")
    for index, conversation in enumerate(probes):
        trained = render_example(expected, Conversation.from_dicts(conversation))
        exported = render_example(got, Conversation.from_dicts(conversation))
        if trained != exported:
            problems.append(f"probe {index}: the training example (tokens or trained labels) differs")
    return problems


def require_same_tokens(what: str, expected, got, probes) -> None:
    problems = tokenizer_differences(expected, got, probes)
    if problems:
        raise ExportVerificationError(f"verification failed: the {what} does not render like training: "
                                      f"{'; '.join(problems)}. Nothing was written to the output dir")
