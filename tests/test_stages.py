"""Stages on tiny random models: the preference formulas against hand-computed values from the papers; DPO raises the
chosen-over-rejected margin; a reward model's held-out accuracy rises on a separable set and `lmforge score` uses
it; pt loss falls on repeated text inside document-separated blocks; KTO pulls desirable and undesirable log-ratios
apart; the data shapes (ours and LLaMA-Factory's) read, and bad preference data fails with file:line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge import cli
from lmforge.config import Config, load_config
from lmforge.data.datasets import resolve_dataset
from lmforge.data.preference import load_labelled, load_pairs
from lmforge.errors import DataError
from lmforge.eval.reward import load_reward_model, score
from lmforge.generate import SamplingParams, load_for_inference, reply
from lmforge.train.loop import train
from lmforge.train.losses import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from lmforge.train.stages import STAGES

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- formulas by hand


def test_dpo_losses_match_hand_computed_values():
    # h = (π_c - ref_c) - (π_r - ref_r) = (-1 + 1.5) - (-2 + 1.5) = 1.0; β = 0.1
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5), 0.1)
    losses, chosen, rejected = dpo_loss(*args)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.1)))  # -log σ(0.1) = 0.644397
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    assert dpo_loss(*args, loss_type="hinge")[0].item() == pytest.approx(0.9)
    assert dpo_loss(*args, loss_type="ipo")[0].item() == pytest.approx((1 - 1 / 0.2) ** 2)  # 16
    smoothed = dpo_loss(*args, label_smoothing=0.1)[0].item()
    assert smoothed == pytest.approx(0.9 * math.log(1 + math.exp(-0.1)) + 0.1 * math.log(1 + math.exp(0.1)))


def test_orpo_simpo_kto_and_bradley_terry_match_hand_computed_values():
    # ORPO: p_c = 1/2, p_r = 1/4 → odds 1 and 1/3 → log odds ratio log 3; σ(log 3) = 3/4
    losses, chosen, _ = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), 0.1)
    assert losses.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75))
    assert chosen.item() == pytest.approx(0.1 * math.log(0.5))
    # SimPO: β = 2, γ = 0.5: -log σ(2·(-1 - -2) - 0.5) = -log σ(1.5)
    assert simpo_loss(t(-1.0), t(-2.0), 2.0, 0.5)[0].item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    # KTO: r = [1, -1], z0 = 0.5, β = 0.1: 1 - σ(0.05) for the desirable, 1 - σ(0.15) for the undesirable
    losses, rewards = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.5, 0.1)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.05), 1 - sigmoid(0.15)])
    assert rewards.tolist() == pytest.approx([0.1, -0.1])
    weighted, _ = kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.5, 0.1, 2.0, 0.5)
    assert weighted.tolist() == pytest.approx([2 * (1 - sigmoid(0.05)), 0.5 * (1 - sigmoid(0.15))])
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))


# ---------------------------------------------------------------------------------------------- data


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Is {i} a number?"}],
             "chosen": f"Yes, {i} is a number.", "rejected": "Banana banana banana banana."} for i in range(n)]


def test_pair_shapes_read_into_the_same_conversations(tmp_path):
    ours = write(tmp_path / "ours.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": {"role": "assistant", "content": "Go away."}}])
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}],
                                     "chosen": {"from": "gpt", "value": "Hello!"},
                                     "rejected": {"from": "gpt", "value": "Go away."}}]))
    write(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "input": "", "chosen": "Hello!",
                                                "rejected": "Go away."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "sg": {"file_name": "sg.json", "ranking": True, "formatting": "sharegpt",
               "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "al": {"file_name": "alpaca.jsonl", "ranking": True,
               "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
    read, counts = load_pairs([resolve_dataset(str(ours), shape="pairs"),
                               resolve_dataset("sg", tmp_path, "pairs"), resolve_dataset("al", tmp_path, "pairs")])
    assert counts == {str(ours): 2, "sg": 1, "al": 1}
    expected = [{"role": "user", "content": "Hi"}]
    assert all(p.chosen.to_dicts() == expected + [{"role": "assistant", "content": "Hello!"}] for p in read)
    assert all(p.rejected.to_dicts() == expected + [{"role": "assistant", "content": "Go away."}] for p in read)
    with pytest.raises(DataError, match=r"preference data \(ranking\) is for stage dpo/rm, not sft"):
        resolve_dataset("sg", tmp_path)


def test_bad_preference_and_kto_records_name_file_and_line(tmp_path):
    missing = write(tmp_path / "p.jsonl", [pairs(1)[0], {"messages": [{"role": "user", "content": "Q"}],
                                                         "chosen": "A"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        load_pairs([resolve_dataset(str(missing), shape="pairs")])
    unlabelled = write(tmp_path / "k.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                            {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"k\.jsonl:1: missing field 'label'.*true \(desirable\)"):
        load_labelled([resolve_dataset(str(unlabelled), shape="kto")])
    one_kind = write(tmp_path / "one.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                            {"role": "assistant", "content": "A"}], "label": True}])
    with pytest.raises(DataError, match="needs both kinds"):
        load_labelled([resolve_dataset(str(one_kind), shape="kto")])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"plain": {"file_name": "one.jsonl"}}))
    with pytest.raises(DataError, match="no \"ranking\": true"):
        resolve_dataset("plain", tmp_path, "pairs")


def test_llamafactory_demo_preference_files_read():
    """LLaMA-Factory's ranking (sharegpt chosen/rejected) and kto_tag entries, from a data folder written for the
    tests in the shapes of its dpo_*_demo / kto_en_demo files (tests/assets/llamafactory)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parent / "assets" / "llamafactory"
    read, counts = load_pairs([resolve_dataset("dpo_en_demo", demo, "pairs"),
                               resolve_dataset("dpo_zh_demo", demo, "pairs")])
    assert counts == {"dpo_en_demo": 3, "dpo_zh_demo": 2} and len(read) == 5
    assert all(p.chosen.messages[:-1] == p.rejected.messages[:-1] for p in read)
    assert all(p.chosen.messages[-1].role == p.rejected.messages[-1].role == "assistant" for p in read)
    multi_turn, with_system = read[1], read[4]  # earlier turns and a system message stay in the shared prompt
    assert [m.role for m in multi_turn.chosen.messages] == ["user", "assistant", "user", "assistant"]
    assert (multi_turn.chosen.messages[-1].content, multi_turn.rejected.messages[-1].content) == (
        "Then Sir Whiskerton, or Marmalade Fog if you like something softer.", "Pebble.")
    assert [(m.role, m.content) for m in with_system.rejected.messages] == [
        ("system", "你是一名耐心的数学老师。"), ("user", "三分之一加六分之一等于多少？"),
        ("assistant", "等于九分之二。")]
    labelled, _ = load_labelled([resolve_dataset("kto_en_demo", demo, "kto")])
    assert [item.desirable for item in labelled] == [True, False, True, False, True]
    assert labelled[2].conversation.messages[-1].content == "谢谢 (xiè xie)."
    assert labelled[1].conversation.source == f"{demo / 'kto_en_demo.json'}:15"


def test_pt_blocks_keep_documents_apart(tokenizer):
    blocks, report = STAGES["pt"].units(tokenizer, ["one two three four five", "six seven", "eight nine ten"], 6)
    assert all(sum(len(e.input_ids) for e in block) == 6 for block in blocks[:-1])
    batch = STAGES["pt"].batch(blocks[:2], padded=False)
    assert batch.num_tokens == 12 and batch.num_examples == sum(len(b) for b in blocks[:2])
    assert report["documents"] == 3 and report["blocks"] == len(blocks)


# ---------------------------------------------------------------------------------------------- training


def stage_config(llama_dir, tmp_path, stage, data, method=None, **train_fields) -> Config:
    return Config.model_validate({
        "name": stage, "model": {"name_or_path": llama_dir}, "method": method or {"type": "lora"},
        "data": {"train": [str(data)], "cutoff_len": 128, **train_fields.pop("data_fields", {})},
        "preference": train_fields.pop("preference", {}),
        "train": {"stage": stage, "output_dir": str(tmp_path / f"run-{stage}"), "batch_size": 4, "logging_steps": 1,
                  "learning_rate": 2e-2, "lr_scheduler_type": "constant", **train_fields}})


def logged(run) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text().splitlines()]


def test_dpo_raises_the_chosen_over_rejected_margin(llama_dir, tmp_path):
    data = write(tmp_path / "pairs.jsonl", pairs(8))
    run = train(stage_config(llama_dir, tmp_path, "dpo", data, max_steps=12))
    records = logged(run)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(records[0])
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-3)  # LoRA B = 0: policy = reference at step 1
    assert records[-1]["rewards/margins"] > 0.5 and records[-1]["rewards/accuracies"] == 1.0
    assert records[-1]["loss"] < records[0]["loss"] - 0.2
    model, tokenizer = load_for_inference(run_dir=str(run.root))  # the DPO adapter loads like any other


@pytest.mark.parametrize("stage,method", [("orpo", "lora"), ("simpo", "ia3"), ("dpo", "full"), ("dpo", "prefix"),
                                          ("kto", "freeze"), ("rm", "adapter")])
def test_stage_and_method_compose(stage, method, llama_dir, tmp_path):
    data = write(tmp_path / "d.jsonl", pairs(4) if stage != "kto" else [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}],
         "label": i % 2 == 0} for i in range(4)])
    run = train(stage_config(llama_dir, tmp_path, stage, data, method={"type": method, "num_virtual_tokens": 2},
                             max_steps=2, learning_rate=1e-3))
    records = logged(run)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert run.artifact().name == ("model" if method in ("full", "freeze") else "adapter")


def test_reward_model_accuracy_rises_and_score_uses_it(llama_dir, tmp_path, capsys):
    data = write(tmp_path / "pairs.jsonl", pairs(24))
    run = train(stage_config(llama_dir, tmp_path, "rm", data, max_steps=12, eval_steps=6, batch_size=4,
                             learning_rate=1e-2, save_steps=6, data_fields={"val_size": 6}))
    evals = [r for r in logged(run) if "eval_accuracy" in r]
    assert len(evals) == 2 and evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_loss"] < 0.5
    assert (run.adapter / "value_head.safetensors").is_file()

    model, tokenizer = load_reward_model(run.root)
    read, _ = load_pairs([resolve_dataset(str(data), shape="pairs")])
    chosen, rejected = score(model, tokenizer, [p.chosen for p in read[:3]]), \
        score(model, tokenizer, [p.rejected for p in read[:3]])
    assert all(c > r for c, r in zip(chosen, rejected))
    alone = score(model, tokenizer, [read[0].chosen], batch_size=1)
    assert alone[0] == pytest.approx(chosen[0], abs=1e-4)  # a packed batch scores like one at a time

    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", str(run.root), "--data", str(data), "-o", str(out)]) == 0
    assert "24 pairs: accuracy 1.0000" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 24
    assert cli.main(["score", str(tmp_path / "nope"), "--data", str(data)]) == 2
    # a reward model's checkpoint (value head included) loads for chat / eval like any other run's
    checkpoint = load_for_inference(str(run.root), checkpoint="step-6", announce=False)
    assert isinstance(reply(*checkpoint, [{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=3)), str)


def test_pt_loss_falls_on_repeated_text(llama_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(["The tenant pays rent on the first day of every month."] * 12) + "\n")
    run = train(stage_config(llama_dir, tmp_path, "pt", text, method={"type": "full"}, max_steps=10, batch_size=2,
                             learning_rate=3e-3))
    losses = [r["loss"] for r in logged(run)]
    assert losses[-1] < losses[0] - 1.0, losses
    report = json.loads(run.data_report.read_text())
    assert report["train"]["documents"] == 12 and report["train"]["blocks"] >= 1


def test_kto_moves_desirable_and_undesirable_log_ratios_apart(llama_dir, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"Is {i} a number?"},
                             {"role": "assistant", "content": f"Yes, {i} is a number." if i % 2 else "Banana."}],
                "label": bool(i % 2)} for i in range(8)]
    run = train(stage_config(llama_dir, tmp_path, "kto", write(tmp_path / "kto.jsonl", records), max_steps=10,
                             batch_size=8, learning_rate=5e-3))
    logs = logged(run)
    first, last = logs[0], logs[-1]
    assert "kl" in last
    assert first["rewards/chosen"] - first["rewards/rejected"] == pytest.approx(0, abs=1e-3)
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]  # desirable replies up, undesirable ones down
    assert last["rewards/chosen"] - last["rewards/rejected"] > 0.5


def test_llamafactory_preference_keys(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text(json.dumps({"model_name_or_path": "m", "pref_loss": "orpo", "stage": "dpo", "dataset": "d",
                                "pref_beta": 0.2, "finetuning_type": "lora"}))
    config = load_config(path)
    assert config.train.stage == "orpo" and config.preference.beta == 0.2
    path.write_text(json.dumps({"model_name_or_path": "m", "stage": "dpo", "dataset": "d", "pref_loss": "ipo",
                                "pref_ftx": 0.5, "dpo_label_smoothing": 0.1}))
    config = load_config(path)
    assert config.train.stage == "dpo" and config.preference.loss == "ipo" and config.preference.ftx == 0.5


def test_preference_data_for_sft_says_which_stage(tmp_path):
    data = write(tmp_path / "pairs.jsonl", pairs(2))
    run = stage_config("unused", tmp_path, "sft", data)
    from lmforge.train.stages import read_stage_data

    with pytest.raises(DataError, match=r"pairs\.jsonl:1: .*preference pair.*stage dpo"):
        read_stage_data(run)


def test_kto_kl_rows_pair_each_prompt_with_another_reply_at_any_batch_size(tokenizer):
    """KTO's KL estimate needs unrelated prompt/reply pairs; they are fixed per example over the whole dataset, so a
    batch of one still gets a mismatched row (not its own reply, which would make the KL equal the reward)."""
    from lmforge.conversation import Conversation
    from lmforge.data.preference import LabelledReply

    items = [LabelledReply(Conversation.from_dicts([{"role": "user", "content": f"question {i}"},
                                                   {"role": "assistant", "content": f"answer {i} " * (i + 1)}]),
                           bool(i % 2)) for i in range(3)]
    units, report = STAGES["kto"].units(tokenizer, items, 256)
    assert report["kept"] == 3 and report["desirable"] == 1
    for i, (example, _, kl) in enumerate(units):
        text = tokenizer.decode(kl.input_ids)
        assert f"question {i}" in text and f"answer {(i + 1) % 3}" in text and f"answer {i} " not in text
    batch = STAGES["kto"].batch(units[:1], padded=False)
    assert batch.kl_rows.input_ids.tolist() != batch.rows.input_ids.tolist()
    with pytest.raises(DataError, match="at least 2 replies"):
        STAGES["kto"].units(tokenizer, items[:1], 256)


def test_the_stage_registry_is_the_config_choices():
    """train/stages/'s STAGES and config's train.stage choices name the same stages; each object answers to its name
    and only dpo / kto ask for a reference model."""
    from typing import get_args

    from lmforge.config import TrainConfig
    from lmforge.train.stages import Stage

    assert set(STAGES) == set(get_args(TrainConfig.model_fields["stage"].annotation))
    assert all(isinstance(stage, Stage) and stage.name == name for name, stage in STAGES.items())
    assert sorted(name for name, stage in STAGES.items() if stage.needs_reference) == ["dpo", "kto"]
