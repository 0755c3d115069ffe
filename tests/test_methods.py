"""Every fine-tuning method on a tiny random Llama: it trains, only the parameters it owns change, the artifact it
saves reloads (through load_for_inference, as chat / eval / serve load it) to the same logits, and decoding works.
QLoRA keeps its base 4-bit and frozen. Wrong targets and impossible combinations fail before a model loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_train import observe

from lmforge.config import Config, MethodConfig, load_config
from lmforge.conversation import Conversation
from lmforge.data.render import render_example, render_prompt
from lmforge.errors import ConfigError
from lmforge.generate import SamplingParams, load_for_inference, reply
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.model.methods import apply_method, check_method, load_base, unwrap
from lmforge.train.batching import collate, pack
from lmforge.train.loop import train
from lmforge.train.losses import sft_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [{"role": "user", "content": "What is 3 plus 3?"}]

# method settings → the substring that every parameter the method owns has in its name
METHODS = {
    "lora": ({"type": "lora"}, "lora_"),
    "lora-rslora-pissa": ({"type": "lora", "use_rslora": True, "lora_init": "pissa"}, "lora_"),
    "lora-pissa-fast-svd": ({"type": "lora", "lora_init": "pissa", "pissa_iter": 4}, "lora_"),
    "dora": ({"type": "dora"}, "lora_"),
    "qlora": ({"type": "qlora"}, "lora_"),
    "qlora-8bit": ({"type": "lora", "quantization_bit": 8}, "lora_"),
    "loha": ({"type": "loha"}, "hada_"),
    "lokr": ({"type": "lokr"}, "lokr_"),
    "ia3": ({"type": "ia3"}, "ia3_l"),
    "oft": ({"type": "oft", "oft_block_size": 16}, "oft_"),
    "prefix": ({"type": "prefix", "num_virtual_tokens": 4}, "prompt_encoder"),
    "ptuning": ({"type": "ptuning", "num_virtual_tokens": 4}, "prompt_encoder"),
    "prompt": ({"type": "prompt", "num_virtual_tokens": 4, "prompt_init_text": "Answer briefly"}, "prompt_encoder"),
    "adapter": ({"type": "adapter", "adapter_size": 8}, ".adapter_"),
    "freeze": ({"type": "freeze", "freeze_trainable_layers": 1}, "layers.1."),
    "freeze-mlp": ({"type": "freeze", "freeze_trainable_layers": 1, "freeze_trainable_modules": ["mlp"]},
                   "layers.1.mlp."),
    "full": ({"type": "full"}, ""),
}


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


@torch.no_grad()
def logits_of(model, tokenizer) -> torch.Tensor:
    model.eval()
    ids = render_prompt(tokenizer, PROMPT)
    return model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # prompt tuning: no rows for virtual tokens


def run_method(llama_dir, tmp_path, settings: dict):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(8)))
    config = Config.model_validate({
        "name": "m", "model": {"name_or_path": llama_dir}, "method": settings, "data": {"train": [str(data)]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 3, "logging_steps": 1,
                  "learning_rate": 1e-3 if settings["type"] in ("full", "freeze") else 2e-2}})
    with pytest.MonkeyPatch.context() as patch:
        seen = observe(patch)  # the real apply_method / save_artifact, watched
        run = train(config)
    return SimpleNamespace(run=run, **seen)


def watch_weight_loads(monkeypatch) -> list[tuple[str, str]]:
    """Record (what, path) for every weight load from here on, at two public seams whatever module calls them:
    lmforge's loader.load_model and transformers' AutoModelForCausalLM.from_pretrained (qlora's quantised load goes
    straight there). The real functions still run."""
    import transformers

    import lmforge.model.loader as loader

    loads: list[tuple[str, str]] = []
    real_load, real_from_pretrained = loader.load_model, transformers.AutoModelForCausalLM.from_pretrained

    def load_model(path, *args, **kwargs):
        loads.append(("load_model", path))
        return real_load(path, *args, **kwargs)

    def from_pretrained(path, *args, **kwargs):
        loads.append(("from_pretrained", str(path)))
        return real_from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return loads


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_only_its_parameters_and_reloads_to_the_same_logits(name, llama_dir, tmp_path):
    settings, owned = METHODS[name]
    result = run_method(llama_dir, tmp_path, settings)
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(owned in n for n in trainable), sorted(trainable)[:5]
    final = dict(model.named_parameters())
    changed = {n for n in final if not torch.equal(result.initial[n], final[n].detach())}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    if name == "full":
        assert changed == set(final)

    tokenizer = load_tokenizer(llama_dir)
    expected = logits_of(model, tokenizer)
    base = logits_of(load_model(llama_dir, torch.float32), tokenizer)
    assert (expected - base).abs().max() > 1e-4, "training must have changed the outputs"
    loaded, loaded_tokenizer = load_for_inference(run_dir=str(result.run.root))
    torch.testing.assert_close(logits_of(loaded, loaded_tokenizer), expected, atol=2e-5, rtol=0)
    assert isinstance(reply(loaded, loaded_tokenizer, PROMPT, SamplingParams(max_new_tokens=3)), str)
    # eval's held-out loss runs the decoder on packed rows: for every method it equals the training loss
    examples = [render_example(tokenizer, Conversation.from_dicts(c["messages"])) for c in conversations(3)]
    with torch.no_grad():
        trained = sft_loss_sum(model.eval(), collate(examples, padded=Config.model_validate(
            {"method": settings, "data": {"train": ["x"]}}).method.virtual_tokens))
        assert float(sft_loss_sum(loaded, pack(examples))) == pytest.approx(float(trained), rel=1e-5)
    artifact = result.run.artifact()
    assert artifact.name == ("model" if settings["type"] in ("full", "freeze") else "adapter")
    assert (artifact / "tokenizer_config.json").is_file()


def test_qlora_base_stays_4bit_and_frozen_while_the_adapter_trains(llama_dir, tmp_path):
    import bitsandbytes as bnb

    result = run_method(llama_dir, tmp_path, {"type": "qlora", "quantization_type": "nf4"})
    base = unwrap(result.model)
    quantized = [(n, m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers
    for name, module in quantized:
        weight = module.weight
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4" and not weight.requires_grad
        key = next(k for k in result.initial if k.endswith(f"{name.split('model.', 1)[-1]}.weight") and "base_layer"
                   in k)
        assert torch.equal(result.initial[key], weight.data), f"{name}: the 4-bit base changed"
    lora = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    settings = json.loads((result.run.adapter / "lmforge_quantization.json").read_text())
    assert settings == {"bits": 4, "quant_type": "nf4", "double_quantization": True}


def test_wrong_target_lists_the_modules_that_exist_before_any_model_loads(llama_dir, tmp_path, monkeypatch):
    loads = watch_weight_loads(monkeypatch)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(2)))
    config = Config.model_validate({"model": {"name_or_path": llama_dir},
                                    "method": {"type": "loha", "lora_target": ["q_proj", "query_key_value"]},
                                    "data": {"train": [str(data)]}, "train": {"output_dir": str(tmp_path / "r")}})
    with pytest.raises(ConfigError) as error:
        train(config)
    message = str(error.value)
    assert "query_key_value not found" in message and "q_proj" not in message.split("not found")[0]
    assert all(name in message for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "up_proj", "v_proj"))
    assert not loads and not (tmp_path / "r").exists()
    load_base(llama_dir, torch.float32, MethodConfig(type="loha"))  # the watch sees the load train() makes
    assert loads == [("load_model", llama_dir), ("from_pretrained", llama_dir)]
    with pytest.raises(ConfigError, match="adapter_target: attn_out not found.*o_proj"):
        check_method(MethodConfig(type="adapter", adapter_target=["attn_out"]), llama_dir)
    with pytest.raises(ConfigError, match="freeze_trainable_layers: 5 — this model has 2 decoder layers"):
        check_method(MethodConfig(type="freeze", freeze_trainable_layers=5), llama_dir)


def test_impossible_method_combinations_are_config_errors(tmp_path):
    def problems(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_config(path)
        return str(error.value)

    assert "quantization_bit" in problems("data: {train: [a.jsonl]}\nmethod: {type: prefix, quantization_bit: 4}\n")
    assert "lora_init" in problems("data: {train: [a.jsonl]}\nmethod: {type: qlora, lora_init: pissa}\n")
    message = problems("data: {train: [a.jsonl]}\nmethod: {type: prompt}\ntrain: {stage: rm}\n")
    assert "stage rm" in message and "prompt" in message and "lora" in message
    assert "did you mean" in problems("data: {train: [a.jsonl]}\nmethod: {type: lora, quantisation_bit: 4}\n")
    assert "data.recipe cleans conversations" in problems("data: {train: [a.jsonl], recipe: default}\n"
                                                          "train: {stage: dpo}\n")


def test_llamafactory_keys_select_the_methods(tmp_path):
    def flat(**keys) -> Config:
        path = tmp_path / "lf.yaml"
        path.write_text(json.dumps({"model_name_or_path": "m", "stage": "sft", "dataset": "d", **keys}))
        return load_config(path)

    config = flat(finetuning_type="lora", quantization_bit=4, double_quantization=False, quantization_type="fp4")
    assert config.method.bits == 4 and config.method.quantization_type == "fp4"
    assert not config.method.double_quantization
    assert flat(finetuning_type="qlora").method.bits == 4
    config = flat(finetuning_type="lora", use_dora=True, use_rslora=True, pissa_init=True)
    assert config.method.dora and config.method.use_rslora and config.method.lora_init == "pissa"
    for name in ("loha", "lokr", "ia3", "prefix", "ptuning", "prompt", "adapter", "freeze", "full"):
        assert flat(finetuning_type=name).method.type == name
    with pytest.raises(ConfigError, match="quantization_method: 'gptq'"):
        flat(finetuning_type="lora", quantization_bit=4, quantization_method="gptq")


def test_bottleneck_adapter_starts_as_the_identity(llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    before = logits_of(load_model(llama_dir, torch.float32), tokenizer)
    model = apply_method(load_model(llama_dir, torch.float32), MethodConfig(type="adapter"))
    wrapped = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    assert len(wrapped) == 4
    torch.testing.assert_close(logits_of(model, tokenizer), before)


def test_the_method_table_is_the_config_choices_and_each_peft_entry_builds(llama_dir):
    """model/method_specs.py is the one list of methods: method.type's choices come from it, and every peft entry's
    builder gives the config of its kind for a real architecture (virtual-token methods are prompt learning)."""
    from typing import get_args

    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.model.method_specs import ALL, BOTTLENECK, LAYERS, METHOD_SPECS
    from lmforge.model.methods import peft_config

    assert tuple(METHOD_SPECS) == get_args(MethodConfig.model_fields["type"].annotation)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama_dir))
    kinds = {}
    for name, spec in METHOD_SPECS.items():
        if spec.peft_config is None:
            assert spec.changes in (BOTTLENECK, LAYERS, ALL), name
            continue
        config = peft_config(model, MethodConfig(type=name))
        kinds[name] = type(config).__name__
        assert config.is_prompt_learning == spec.virtual_tokens == MethodConfig(type=name).virtual_tokens, name
    assert kinds == {"lora": "LoraConfig", "dora": "LoraConfig", "qlora": "LoraConfig", "loha": "LoHaConfig",
                     "lokr": "LoKrConfig", "ia3": "IA3Config", "oft": "OFTConfig", "prefix": "PrefixTuningConfig",
                     "ptuning": "PrefixTuningConfig", "prompt": "PromptTuningConfig"}
    assert [n for n, s in METHOD_SPECS.items() if s.saves_model] == ["freeze", "full"]
    assert [n for n, s in METHOD_SPECS.items() if not s.mergeable] == ["prefix", "ptuning", "prompt", "adapter"]
