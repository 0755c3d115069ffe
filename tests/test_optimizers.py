"""Optimizers (train.optim by Hugging Face name, Muon, LoRA+, GaLore, APOLLO, Adam-mini) and the methods LLaMA-Factory
users reach for (LLaMA Pro, freeze modules): each builds the optimizer its library owns, and after real steps on a tiny
Llama the parameters that must stay frozen are bit-identical while the trained ones moved. LLaMA-Factory-shaped YAMLs
(tests/assets/llamafactory/*_sft.yaml) using these keys run as they are."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import observe

import lmforge.train.loop as loop
from lmforge.config import Config, MethodConfig, load_config
from lmforge.data.render import render_prompt
from lmforge.errors import ConfigError
from lmforge.generate import load_for_inference
from lmforge.model.loader import load_model, load_tokenizer
from lmforge.model.methods import apply_method, check_method, expand_blocks
from lmforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).parent / "assets" / "llamafactory"
PROMPT = [{"role": "user", "content": "What is 3 plus 3?"}]


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


def watch_optimizer(patch, seen: dict) -> None:
    """Record the optimizer loop.set_up builds (the real build_optimizer runs) in seen["optimizer"]."""
    real = loop.build_optimizer

    def build(*args, **kwargs):
        seen["optimizer"] = real(*args, **kwargs)
        return seen["optimizer"]

    patch.setattr(loop, "build_optimizer", build)


def run(config: Config):
    with pytest.MonkeyPatch.context() as patch:
        seen = observe(patch)
        watch_optimizer(patch, seen)
        result = train(config)
    model = seen["model"]
    final = dict(model.named_parameters())
    trainable = {n for n, p in final.items() if p.requires_grad}
    changed = {n for n in final if not torch.equal(seen["initial"][n], final[n].detach())}
    return SimpleNamespace(run=result, trainable=trainable, changed=changed, **seen)


def config_of(llama_dir, tmp_path, method: dict, **train) -> Config:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(8)))
    return Config.model_validate({
        "name": "o", "model": {"name_or_path": llama_dir}, "method": method, "data": {"train": [str(data)]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "logging_steps": 1,
                  "learning_rate": 1e-3, **train}})


def assert_trains_only(result, owned) -> None:
    """Every trainable parameter is one of `owned` (a predicate on the name), all of those moved, nothing else did."""
    assert result.trainable and all(owned(n) for n in result.trainable), sorted(result.trainable)[:5]
    assert result.changed == result.trainable, (sorted(result.trainable - result.changed)[:5],
                                                sorted(result.changed - result.trainable)[:5])


def last_layer(name: str) -> bool:
    return ".layers.1." in name


# train.optim → the class transformers' Trainer (or torch / bitsandbytes) builds for that Hugging Face name
OPTIMS = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "adafactor": "Adafactor", "sgd": "SGD",
          "adagrad": "Adagrad", "rmsprop": "RMSprop", "adamw_8bit": "AdamW", "paged_adamw_8bit": "AdamW",
          "paged_adamw_32bit": "AdamW", "muon": "MuonWithAdamW"}


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_each_optimizer_trains_only_the_trainable_layer(optim, llama_dir, tmp_path):
    result = run(config_of(llama_dir, tmp_path, {"type": "freeze", "freeze_trainable_layers": 1}, optim=optim,
                           learning_rate=1e-2 if optim == "sgd" else 1e-3))
    optimizer = result.optimizer
    assert type(optimizer).__name__ == OPTIMS[optim]
    assert_trains_only(result, last_layer)
    if "adamw_8bit" in optim or "paged" in optim:  # bitsandbytes; on a CPU a paged optimizer runs unpaged
        assert type(optimizer).__module__.startswith("bitsandbytes")
        assert (optimizer.args.optim_bits, optimizer.is_paged) == (8 if "8bit" in optim else 32, "paged" in optim)
        states = [s["state1"].dtype for s in optimizer.state.values() if "state1" in s]
        assert states and (torch.uint8 in states) == ("8bit" in optim)
    if optim == "adamw_torch_fused":
        assert optimizer.defaults["fused"]
    if optim == "muon":  # Muon on the 2-D weights, AdamW on the norms
        muon, adamw = optimizer.parts
        assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
        assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
        assert all(p.ndim == 1 for g in adamw.param_groups for p in g["params"])
        assert len(optimizer.state_dict()["parts"]) == 2


@pytest.mark.parametrize("kind, cls", [("galore", "AdamW"), ("apollo", "AdamW"), ("adam_mini", "Adam_mini")])
def test_low_memory_optimizers_from_their_packages_train_only_the_trainable_layer(kind, cls, llama_dir, tmp_path):
    settings = {"galore": {"galore": True, "galore_rank": 4, "galore_update_interval": 1},
                "apollo": {"apollo": True, "apollo_rank": 4, "apollo_update_interval": 1},
                "adam_mini": {"adam_mini": True}}[kind]
    result = run(config_of(llama_dir, tmp_path, {"type": "freeze", "freeze_trainable_layers": 1}, **settings))
    optimizer = result.optimizer
    assert type(optimizer).__name__ == cls  # galore_torch's GaLoreAdamW is its class AdamW
    assert type(optimizer).__module__.split(".")[0] == {"galore": "galore_torch", "apollo": "apollo_torch",
                                                        "adam_mini": "adam_mini"}[kind]
    assert_trains_only(result, last_layer)
    if kind in ("galore", "apollo"):  # the projected group holds exactly the trainable linear weights
        projected = [g for g in optimizer.param_groups if "rank" in g]
        assert len(projected) == 1 and projected[0]["rank"] == 4 and len(projected[0]["params"]) == 7
        assert any(state for state in optimizer.state.values() if "projector" in state)


def test_galore_adafactor_and_the_refusals(llama_dir, tmp_path):
    result = run(config_of(llama_dir, tmp_path, {"type": "full"}, galore=True, galore_rank=4, optim="adafactor"))
    assert type(result.optimizer).__name__ == "Adafactor" and result.optimizer.__module__.startswith("galore_torch")
    assert result.changed == result.trainable
    with pytest.raises(ValueError, match="train.galore projects the gradients"):
        config_of(llama_dir, tmp_path, {"type": "lora"}, galore=True)
    with pytest.raises(ValueError, match="GaLore's AdamW .* or Adafactor"):
        config_of(llama_dir, tmp_path, {"type": "full"}, galore=True, optim="sgd")
    with pytest.raises(ValueError, match="choose one"):
        config_of(llama_dir, tmp_path, {"type": "full"}, galore=True, apollo=True)
    with pytest.raises(ValueError, match="adam_mini partitions"):
        config_of(llama_dir, tmp_path, {"type": "lora"}, adam_mini=True)
    with pytest.raises(ValueError, match="LoRA\\+ sets the learning rate.*not 'loha'"):
        config_of(llama_dir, tmp_path, {"type": "loha", "loraplus_lr_ratio": 16})
    with pytest.raises(ConfigError, match="train.optim muon trains in one process"):
        loop.build_optimizer(config_of(llama_dir, tmp_path, {"type": "full"}, optim="muon"),
                             load_model(llama_dir, torch.float32), world=2)


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(llama_dir, tmp_path):
    result = run(config_of(llama_dir, tmp_path, {"type": "lora", "loraplus_lr_ratio": 16.0}, warmup_steps=1,
                           learning_rate=2e-3, max_steps=4))  # step 1 warms up from 0; B = 0 leaves A still in step 2
    assert_trains_only(result, lambda n: "lora_" in n)
    names = {id(p): n for n, p in result.model.named_parameters()}
    by_group = [({names[id(p)].split(".")[-3] for p in g["params"]}, g) for g in result.optimizer.param_groups
                if g["params"]]
    a_group = next(g for kinds, g in by_group if kinds == {"lora_A"})
    b_group = next(g for kinds, g in by_group if kinds == {"lora_B"})
    assert b_group["initial_lr"] == pytest.approx(16 * a_group["initial_lr"]) and a_group["initial_lr"] == 2e-3
    assert b_group["lr"] == pytest.approx(16 * a_group["lr"])  # the schedule scales both groups alike


def test_llama_pro_expansion_keeps_the_function_and_trains_only_the_new_block(llama_dir, tmp_path):
    tokenizer = load_tokenizer(llama_dir)
    ids = torch.tensor([render_prompt(tokenizer, PROMPT)])
    base = load_model(llama_dir, torch.float32).eval()
    expanded = expand_blocks(load_model(llama_dir, torch.float32), 1).eval()
    assert expanded.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in expanded.model.layers] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(expanded(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6, rtol=0)
        copied, source = expanded.model.layers[2], base.model.layers[1]
        assert torch.equal(copied.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        assert not copied.mlp.down_proj.weight.any() and not copied.self_attn.o_proj.weight.any()

    result = run(config_of(llama_dir, tmp_path, {"type": "freeze", "llama_pro": True, "llama_pro_expand": 1}))
    assert_trains_only(result, lambda n: ".layers.2." in n)
    loaded, _ = load_for_inference(run_dir=str(result.run.root))
    assert loaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="llama_pro_expand: 3 — it must divide this model's 2"):
        check_method(MethodConfig(type="freeze", llama_pro=True, llama_pro_expand=3), llama_dir)
    with pytest.raises(ValueError, match="llama_pro_expand expands the model for a freeze run"):
        MethodConfig(type="lora", llama_pro=True, llama_pro_expand=1)


def test_llama_pro_with_lora_puts_the_adapter_on_the_expanded_blocks_only(llama_dir):
    model = apply_method(load_model(llama_dir, torch.float32),
                         MethodConfig(type="lora", llama_pro=True, freeze_trainable_layers=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="2 decoder layers, which freeze_trainable_layers 3 does not divide"):
        check_method(MethodConfig(type="lora", llama_pro=True, freeze_trainable_layers=3), llama_dir)


def test_freeze_modules_inside_and_outside_the_layers(llama_dir):
    def trained(**settings) -> set[str]:
        model = apply_method(load_model(llama_dir, torch.float32), MethodConfig(type="freeze", **settings))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything = trained(freeze_trainable_layers=1, freeze_trainable_modules="all")
    assert everything == {n for n, _ in load_model(llama_dir, torch.float32).named_parameters() if ".layers.1." in n}
    assert trained(freeze_trainable_layers=-1, freeze_trainable_modules="self_attn, input_layernorm") == {
        f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "input_layernorm")}
    extra = trained(freeze_trainable_layers=1, freeze_extra_modules=["norm", "embed_tokens"])
    assert extra == everything | {"model.norm.weight", "model.embed_tokens.weight"}
    with pytest.raises(ConfigError, match="lm_head — not a module of a decoder layer; choose from input_layernorm, "
                                          "mlp, post_attention_layernorm, self_attn"):
        check_method(MethodConfig(type="freeze", freeze_trainable_modules=["lm_head"]), llama_dir)
    with pytest.raises(ConfigError, match="freeze_extra_modules: mlp — not a module outside"):
        check_method(MethodConfig(type="freeze", freeze_extra_modules=["mlp"]), llama_dir)


def flat_config(name: str, model: str, tmp_path) -> Config:
    return load_config(ASSETS / name, [f"model_name_or_path={model}", f"output_dir={tmp_path / 'run'}"])


def test_llamafactory_yamls_with_these_keys_run(llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ASSETS.parent.parent.parent)  # dataset_dir is relative to the repo root
    expanded_dir = tmp_path / "llama-pro"  # as LLaMA-Factory's scripts/llama_pro.py would have written it
    expand_blocks(load_model(llama_dir, torch.float32), 1).save_pretrained(expanded_dir)
    load_tokenizer(llama_dir).save_pretrained(expanded_dir)

    config = flat_config("llama_pro_freeze_sft.yaml", str(expanded_dir), tmp_path / "pro")
    assert config.method.llama_pro and config.method.freeze_trainable_modules == "all"
    assert config.train.optim == "adafactor"
    result = run(config)
    assert type(result.optimizer).__name__ == "Adafactor"
    assert_trains_only(result, lambda n: ".layers.2." in n)

    config = flat_config("lora_plus_pissa_sft.yaml", llama_dir, tmp_path / "plus")
    assert (config.method.loraplus_lr_ratio, config.method.lora_init, config.method.pissa_iter) == (16.0, "pissa", 2)
    result = run(config)
    assert_trains_only(result, lambda n: "lora_" in n and ("q_proj" in n or "v_proj" in n))
    assert sorted({g["initial_lr"] for g in result.optimizer.param_groups if g["params"]}) == [1e-3, 1.6e-2]

    config = flat_config("oft_sft.yaml", llama_dir, tmp_path / "oft")
    assert config.method.type == "oft" and config.method.oft_block_size == 16
    assert_trains_only(run(config), lambda n: "oft_" in n)

    config = flat_config("freeze_galore_sft.yaml", llama_dir, tmp_path / "galore")
    assert config.train.galore and config.method.freeze_trainable_modules == ["mlp"]
    result = run(config)
    assert_trains_only(result, lambda n: ".layers.1.mlp." in n or n == "model.norm.weight")
    assert [len(g["params"]) for g in result.optimizer.param_groups if "rank" in g] == [3]  # gate, up, down


def test_llamafactory_optimizer_keys(tmp_path):
    def flat(**keys) -> Config:
        path = tmp_path / "lf.yaml"
        path.write_text(json.dumps({"model_name_or_path": "m", "stage": "sft", "dataset": "d", **keys}))
        return load_config(path)

    assert flat(optim="adamw_8bit").train.optim == "adamw_8bit"
    assert flat(use_muon=True).train.optim == "muon"
    config = flat(finetuning_type="full", optim="galore_adafactor")
    assert config.train.galore and config.train.optim == "adafactor"
    assert flat(finetuning_type="full", use_apollo=True, apollo_rank=8).train.apollo_rank == 8
    assert flat(finetuning_type="lora", pissa_init=True).method.pissa_iter == 16  # LLaMA-Factory's default
    assert flat(finetuning_type="lora", pissa_init=True, pissa_iter=-1).method.pissa_iter is None  # exact SVD
    assert flat(finetuning_type="lora", pissa_iter=4).method.lora_init == "default"  # read only with pissa_init
    assert flat(finetuning_type="freeze", freeze_trainable_modules="all").method.freeze_trainable_modules == "all"
    for keys, message in ((dict(optim="lion_32bit"), "optim: 'lion_32bit'"),
                          (dict(optim="adamw_hf"), "use optim: adamw_torch"),
                          (dict(optim="galore_adamw_layerwise"), "use galore_adamw"),
                          (dict(finetuning_type="full", use_badam=True), "use_badam: true — BAdam switches"),
                          (dict(finetuning_type="full", use_galore=True, galore_layerwise=True), "galore_layerwise")):
        with pytest.raises(ConfigError, match=message):
            flat(**keys)


@pytest.mark.parametrize("settings", [
    {"optim": "muon"}, {"optim": "adafactor"}, {"galore": True, "galore_rank": 4, "galore_update_interval": 2},
    {"apollo": True, "apollo_rank": 4, "apollo_update_interval": 2}, {"adam_mini": True}, {"loraplus": 16.0}],
    ids=["muon", "adafactor", "galore", "apollo", "adam_mini", "loraplus"])
def test_resume_with_each_optimizer_equals_the_uninterrupted_run(settings, llama_dir, tmp_path):
    """The optimizer's state (Muon + AdamW's two parts, GaLore's projectors, Adam-mini's blocks, LoRA+'s groups) is
    saved in the checkpoint and restored: stopping and resuming ends at the same weights."""
    from safetensors.torch import load_file
    from test_train import stop_at

    settings = dict(settings)
    ratio = settings.pop("loraplus", None)
    method = {"type": "lora", "loraplus_lr_ratio": ratio} if ratio else {"type": "freeze", "freeze_trainable_layers": 1}

    def config(name: str, **extra) -> Config:
        made = config_of(llama_dir, tmp_path, method, max_steps=4, save_steps=2, **settings, **extra)
        return made.model_copy(update={"train": made.train.model_copy(update={"output_dir": str(tmp_path / name)})})

    full = train(config("a"))
    stopped = train(config("b"), callback=stop_at(2))
    resumed = train(config("b", resume_from_checkpoint="latest"))
    weights = "adapter/adapter_model.safetensors" if ratio else "model/model.safetensors"
    got, expected = load_file(str(resumed.root / weights)), load_file(str(full.root / weights))
    assert stopped.root == resumed.root and set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
