"""LLaMA-Factory's extras-style training YAMLs whose loss or architecture lmforge does not have (DFT, EAFT, ASFT,
mixture-of-depths): refused by name with what to do, every problem at once, exit 2 before any model is loaded.
The fixtures are written here in LLaMA-Factory's shape, not copied from its examples."""

from __future__ import annotations

import pytest

from lmforge import cli
from lmforge.config import load_config
from lmforge.errors import ConfigError

FULL_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
{extra}

### dataset
dataset: identity,alpaca_en_demo
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/tiny/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
"""


@pytest.mark.parametrize("extra, expected", [
    ("use_dft_loss: true", ["use_dft_loss: true — DFT", "remove use_dft_loss"]),
    ("use_eaft_loss: true\neaft_alpha: 1.0", ["use_eaft_loss: true — EAFT", "remove use_eaft_loss"]),
    ("deepspeed: examples/deepspeed/ds_z0_config.json\nuse_asft_loss: true\nasft_alpha: 0.05",
     ["use_asft_loss: true — ASFT", "reference model", "remove use_asft_loss"]),
    ("mixture_of_depths: convert\noptim: paged_adamw_8bit\npure_bf16: true",
     ["mixture_of_depths: 'convert'", "remove mixture_of_depths"]),
], ids=["dft", "eaft", "asft", "mod"])
def test_unsupported_losses_and_architectures_are_refused_with_what_to_do(extra, expected, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "extras.yaml"
    path.write_text(FULL_SFT.format(model="no/such-model", extra=extra))
    assert cli.main(["train", str(path)]) == 2  # refused from the config alone: the model is never looked up
    err = capsys.readouterr().err
    assert "1 problem in the config" in err and "unknown key" not in err and "Traceback" not in err
    for text in expected:
        assert text in err


def test_the_same_keys_switched_off_train_as_plain_sft(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text(FULL_SFT.format(model="m", extra="use_dft_loss: false\nuse_eaft_loss: false\neaft_alpha: 1.0\n"
                                                     "use_asft_loss: false\nasft_alpha: 0.1\nmixture_of_depths: null"))
    config = load_config(path)
    assert config.method.type == "full" and config.train.stage == "sft"
    path.write_text(FULL_SFT.format(model="m", extra="use_dft_loss: true\nmixture_of_depths: load\nnot_a_key: 1"))
    with pytest.raises(ConfigError) as caught:  # every problem at once
        load_config(path)
    message = str(caught.value)
    assert "3 problems" in message and "use_dft_loss" in message and "mixture_of_depths: 'load'" in message
    assert "not_a_key" in message


def test_qoft_on_a_bitsandbytes_base_is_refused_with_why_and_what_to_do(tmp_path):
    path = tmp_path / "qoft.yaml"
    path.write_text(FULL_SFT.format(model="m", extra="quantization_bit: 4\nquantization_method: bnb\n"
                                                     "double_quantization: false\noft_block_size: 32\noft_target: all")
                    .replace("finetuning_type: full", "finetuning_type: oft"))
    with pytest.raises(ConfigError, match=r"not 'oft' \(OFT on a 4/8-bit base, LLaMA-Factory's QOFT: .* not of OFT\) "
                                          r"\(set method.type: qlora, or remove quantization_bit\)"):
        load_config(path)
    path.write_text(path.read_text().replace("quantization_bit: 4\n", ""))  # the same file on an unquantised base
    assert load_config(path).method.oft_block_size == 32


@pytest.mark.parametrize("extra", ["new_special_tokens_config: tokens_cfg.yaml\ninit_special_tokens: desc_init",
                                   "add_special_tokens: <|START_OF_SVG|>,<|END_OF_SVG|>", "resize_vocab: true",
                                   "add_tokens: <svg>"])
def test_adding_tokens_is_refused_with_what_to_do(extra, tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(FULL_SFT.format(model="m", extra=extra))
    with pytest.raises(ConfigError, match=r"1 problem in the config:\n  - \w+: .* — lmforge keeps the model's "
                                          r"vocabulary as it is .* point model_name_or_path at it"):
        load_config(path)
