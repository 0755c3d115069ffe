"""End to end on the real bundled model (SmolLM2-135M-Instruct): a few LoRA steps, loss falls, the adapter reloads
with PEFT and generates, and the chat CLI answers with it."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.generate import SamplingParams, load_for_inference, reply
from lmforge.train.loop import train

pytestmark = pytest.mark.e2e

FACTS = [
    ("What is the secret word?", "The secret word is pineapple."),
    ("Tell me the secret word.", "The secret word is pineapple."),
    ("Which word is the secret one?", "The secret word is pineapple."),
    ("Do you know the secret word?", "Yes. The secret word is pineapple."),
]


def test_lora_on_bundled_model_learns_reloads_and_chats(tmp_path, write_jsonl, bundled_model_dir, capsys):
    data = write_jsonl("secret.jsonl", [{"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]} for q, a in FACTS])
    config = load_config(None, [f"data.train=[{data}]", f"train.output_dir={tmp_path / 'run'}",
                                "train.max_steps=8", "train.batch_size=4", "train.learning_rate=2e-3",
                                "train.logging_steps=1", "train.lr_scheduler_type=constant",
                                "method.lora_target=[q_proj,v_proj]", "data.cutoff_len=128"])
    run = train(config)

    losses = [r["loss"] for r in map(json.loads, run.metrics.read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses

    model, tokenizer = load_for_inference(run_dir=str(run.root))
    answer = reply(model, tokenizer, [{"role": "user", "content": "What is the secret word?"}],
                   SamplingParams(max_new_tokens=12))
    assert "pineapple" in answer.lower()

    from peft import PeftModel

    from lmforge.model.loader import load_model
    plain = PeftModel.from_pretrained(load_model(bundled_model_dir, torch.float32), str(run.adapter)).eval()
    ids = torch.tensor([tokenizer("The secret word is")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)

    capsys.readouterr()
    assert cli_main(["chat", str(run.root), "--prompt", "Tell me the secret word.", "--max-new-tokens", "12"]) == 0
    assert "pineapple" in capsys.readouterr().out.lower()
