"""The "coming from LLaMA-Factory / ChatGLM3" key table of the README, generated from the translation tables.

Owns only the wording of each row: what a key does here (honoured → where it goes; noted → why it changes nothing;
refused → why, and what to do). The tables themselves stay in llamafactory.py, llamafactory_infer.py and chatglm3.py;
tests/test_compat_readme.py checks that README.md / README_zh.md hold exactly what `python -m
lmforge.config.compat_keys` prints, so a key added to a table without a row here fails the tests.
"""

from __future__ import annotations

import sys

from . import chatglm3, llamafactory, llamafactory_infer

# Keys whose converter decides by value: (status, what happens).
CONVERTER_DOCS = {
    "fp16": ("honoured", "`model.dtype: float16` (on a CPU: float32, with a warning)"),
    "bf16": ("honoured", "`model.dtype: bfloat16` (on a CPU without bf16: float32, with a warning)"),
    "pure_bf16": ("honoured", "`model.dtype: bfloat16`"),
    "do_train": ("partly", "true is what `lmforge train` does; false is refused: evaluation-only configs run with "
                           "`lmforge eval`"),
    "do_predict": ("refused", "in a training config: a prediction config runs with `lmforge eval FILE`"),
    "pissa_init": ("honoured", "`method.lora_init: pissa` with `method.pissa_iter` 16 (fast SVD) unless pissa_iter "
                               "says otherwise"),
    "pissa_iter": ("honoured", "with pissa_init: `method.pissa_iter` (peft's pissa_niter_N); -1 = exact SVD"),
    "optim": ("partly", "adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, rmsprop, adamw_8bit / "
                        "adamw_bnb_8bit / paged_adamw_8bit / paged_adamw_32bit (bitsandbytes) → `train.optim`; "
                        "galore_adamw / galore_adafactor / apollo_adamw → `train.galore` / `train.apollo`; layer-wise, "
                        "GPU-only and other third-party optimizers refused (use adamw_torch)"),
    "use_muon": ("honoured", "`train.optim: muon` (torch.optim.Muon on the hidden 2-D weights, AdamW on the rest)"),
    "quantization_method": ("partly", "bnb (bitsandbytes) honoured; GPTQ / AWQ / HQQ / EETQ refused (they need a "
                                      "GPU)"),
    "pref_loss": ("partly", "sigmoid / hinge / ipo → `preference.loss`; orpo / simpo → `train.stage`; others "
                            "refused"),
    "train_on_prompt": ("honoured", "`data.train_on: all`"),
    "mask_history": ("honoured", "`data.train_on: last_assistant`"),
    "report_to": ("partly", "none honoured; wandb / tensorboard / … refused: lmforge writes metrics.jsonl and "
                            "loss.png in the run dir"),
    "warmup_steps": ("honoured", "`train.warmup_steps`; a value below 1 is a ratio, as transformers reads it "
                                 "(→ `train.warmup_ratio`)"),
    "deepspeed": ("honoured", "the ZeRO stage → `train.distributed` under torchrun (ZeRO-0 → ddp, 1/2 → "
                              "fsdp_grad_op, 3 → fsdp); in one process it changes nothing"),
    "ray_num_workers": ("refused", "lmforge does not launch Ray workers: train in one process, or start several "
                                  "with torchrun (`lmforge train CONFIG --nproc N`)"),
    "ray_init_kwargs": ("refused", "as ray_num_workers"),
    "ray_run_name": ("refused", "as ray_num_workers"),
    "ray_storage_path": ("refused", "as ray_num_workers"),
    "ray_storage_filesystem": ("refused", "as ray_num_workers"),
    **{key: ("refused", "adding tokens: " + llamafactory._NEW_TOKENS) for key in (
        "add_tokens", "add_special_tokens", "new_special_tokens_config", "resize_vocab")},
    "mixture_of_depths": ("refused", "convert / load: mixture-of-depths (the mixture-of-depth package's layers that "
                                     "route tokens past blocks) is not an architecture lmforge trains; remove it"),
}

STATUS_ZH = {"honoured": "支持", "noted": "接受并提示（不起作用）", "refused": "拒绝", "partly": "部分支持"}
HEADERS = {"en": ("key", "status", "what lmforge does"), "zh": ("键", "状态", "lmforge 的处理")}


def flat_rows() -> list[tuple[str, str, str]]:
    """(key, status, text) for every LLaMA-Factory training key lmforge knows."""
    rows = []
    for key, target in llamafactory.FLAT_KEYS.items():
        if isinstance(target, str):
            rows.append((key, "honoured", f"`{target}`"))
        elif key in CONVERTER_DOCS:
            rows.append((key, *CONVERTER_DOCS[key]))
        else:
            rows.append((key, *_by_trying(key, target)))
    return rows


def chatglm3_rows() -> list[tuple[str, str, str]]:
    rows = [(f"data_config.{key}", "noted" if key in ("test_file", "num_proc") else "honoured", text)
            for key, text in chatglm3.DATA_CONFIG_KEYS.items()]
    rows.append(("max_input_length + max_output_length", "honoured", "`data.cutoff_len` = their sum + 1 (as "
                                                                      "finetune_hf.py cuts)"))
    rows.append(("training_args.*", "honoured", "the Seq2SeqTrainingArguments keys of the LLaMA-Factory table "
                                                 "(same meaning, same row)"))
    rows += [(f"training_args.{key}", "noted", text) for key, text in chatglm3.TRAINER_NOTES.items()]
    types = ", ".join(f"{name} → {ours}" for name, ours in chatglm3.PEFT_TYPES.items())
    rows.append(("peft_config.peft_type", "partly", f"{types} (PREFIX_TUNING with prefix_projection: true → "
                                                    f"prefix); no peft_config → full"))
    rows += [(f"peft_config.peft_type: {name}", "refused", text) for name, text in chatglm3.PEFT_REFUSED.items()]
    rows += [(f"peft_config.{key}", "honoured", f"`{path}`") for key, path in chatglm3.PEFT_KEYS.items()]
    rows += [(f"peft_config.{key}", "noted", text.split(": ", 1)[1]) for key, text in chatglm3.PEFT_NOTES.items()
             if text]
    return rows


def after_training_rows() -> list[tuple[str, str, str]]:
    """Inference, prediction and export files."""
    rows = [(key, "honoured", f"inference: {field}") for key, field in llamafactory_infer.INFER_FIELDS.items()]
    rows.append(("infer_backend", "partly", "huggingface → lmforge's decoder; vllm → `lmforge serve` with vLLM's "
                                            "engine; sglang / ktransformers refused"))
    rows += [(key, "noted", f"inference: {text}") for key, text in llamafactory_infer.INFER_NOTES.items()]
    rows += [(key, "refused", f"inference: {text}") for key, text in llamafactory_infer.INFER_REFUSALS.items()]
    rows += [(key, "honoured", f"prediction (`lmforge eval FILE`): {field or 'runs the file'}")
             for key, field in llamafactory_infer.PREDICT_KEYS.items()]
    rows += [(key, "honoured", f"export: `{field}`") for key, field in llamafactory.EXPORT_KEYS.items() if field]
    rows += [(key, "noted", f"export: {text.split(': ', 1)[1]}") for key, text in llamafactory._EXPORT_NOTES.items()]
    rows.append(("export_legacy_format", "partly", "export: false honoured; true refused (transformers 5 writes "
                                                   "safetensors only)"))
    rows += [(key, "refused", f"export: {text}") for key, text in llamafactory._EXPORT_REFUSALS.items()]
    return rows


def _by_trying(key: str, converter) -> tuple[str, str]:
    """A converter without a row in CONVERTER_DOCS, described by what it does with `true`."""
    try:
        partial, note = converter(True)
    except llamafactory.Refused as refusal:
        return "refused", str(refusal).removeprefix(f"{key}: ")
    if partial:
        paths = [f"`{section}.{name}`" for section, fields in partial.items() for name in fields]
        return "honoured", ", ".join(paths)
    return "noted", (note or "").removeprefix(f"{key}: ").removesuffix(" (ignored)")


def markdown(lang: str = "en") -> str:
    """The README tables: LLaMA-Factory training keys, ChatGLM3 config keys, after-training files."""
    head = HEADERS[lang]
    titles = {"en": ("LLaMA-Factory training YAML", "ChatGLM3 finetune_demo config", "LLaMA-Factory inference, "
                     "prediction and export YAMLs"),
              "zh": ("LLaMA-Factory 训练 YAML", "ChatGLM3 finetune_demo 配置",
                     "LLaMA-Factory 推理、预测与导出 YAML")}[lang]
    out = []
    for title, rows in zip(titles, (flat_rows(), chatglm3_rows(), after_training_rows())):
        out.append(f"**{title}**\n")
        out.append(f"| {head[0]} | {head[1]} | {head[2]} |\n| --- | --- | --- |")
        for key, status, text in rows:
            shown = STATUS_ZH[status] if lang == "zh" else status
            out.append(f"| `{key}` | {shown} | {text.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(sys.argv[1] if len(sys.argv) > 1 else "en"), end="")
