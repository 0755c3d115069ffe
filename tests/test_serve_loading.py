"""What `lmforge serve RUN_DIR` loads: the weights chat and export would use (the best checkpoint when a sweep named
one), and a clear refusal for adapters the batching server cannot run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import RunDir
from lmforge.errors import ModelError
from lmforge.serve.loading import _resolve_target
from test_eval import train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir):
    return train_run(tmp_path_factory.mktemp("serve-run"), llama_dir, "lora", max_steps=8, save_steps=4)


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_a_run_is_served_with_its_best_checkpoint(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    _, _, adapter, _ = _resolve_target(str(run), None)
    assert adapter == RunDir(run).adapter  # no best.json: the final adapter
    (run / "best.json").write_text(json.dumps({"label": "step-4", "weights": "checkpoints/step-4", "step": 4,
                                               "metric": "rouge-l", "value": 50.0}))
    capsys.readouterr()
    _, _, adapter, name = _resolve_target(str(run), None)
    assert "using best checkpoint step-4 (rouge-l 50)" in capsys.readouterr().err
    served, final = adapter_tensors(adapter), adapter_tensors(RunDir(run).adapter)
    checkpoint = load_file(str(run / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert served.keys() == final.keys() and name == "run"
    assert any(not torch.equal(served[k], final[k]) for k in served)  # step 4 is not the final weights …
    for key, value in served.items():  # … it is the checkpoint's tensors
        match = [v for k, v in checkpoint.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value)


def test_a_prefix_tuning_adapter_is_refused_with_what_to_do(tmp_path, llama_dir):
    from lmforge.serve.decoder import load_adapter_into

    adapter = tmp_path / "prefix"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="is a PREFIX_TUNING adapter; the server batches LoRA adapters only.*chat"):
        load_adapter_into(None, None, "legal", adapter)
