"""After training, LLaMA-Factory's own kinds of files work on lmforge runs: inference YAMLs (`lmforge chat FILE`,
`lmforge serve --config FILE`), merge YAMLs pointing at a LoRA or full run's output_dir (`lmforge export FILE`), and
do_predict YAMLs (`lmforge eval FILE`). The YAMLs are written here in LLaMA-Factory's shapes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmforge import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, llama_dir):
    """A folder laid out as a LLaMA-Factory user's: data/ with dataset_info.json, and a LoRA and a full run trained
    from flat YAMLs into saves/…"""
    root = tmp_path_factory.mktemp("lf_user")
    data = root / "data"
    data.mkdir()
    records = [{"instruction": f"Double {i}.", "input": "", "output": f"{2 * i}"} for i in range(6)]
    (data / "doubles.json").write_text(json.dumps(records), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"doubles": {"file_name": "doubles.json"}}))
    before = os.getcwd()
    os.chdir(root)
    try:
        for method in ("lora", "full"):
            path = write_yaml(root / f"tiny_{method}_sft.yaml", {
                "model_name_or_path": llama_dir, "trust_remote_code": True, "stage": "sft", "do_train": True,
                "finetuning_type": method, "lora_target": "all", "dataset": "doubles", "template": "llama3",
                "cutoff_len": 64, "output_dir": f"saves/tiny/{method}/sft", "per_device_train_batch_size": 2,
                "max_steps": 2, "learning_rate": 1e-3, "report_to": "none", "bf16": False})
            assert cli.main(["train", path]) == 0
    finally:
        os.chdir(before)
    return root


def test_inference_yaml_chats_with_the_run(workdir, llama_dir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    infer = write_yaml(workdir / "infer_lora.yaml", {
        "model_name_or_path": llama_dir, "adapter_name_or_path": "saves/tiny/lora/sft", "template": "llama3",
        "infer_backend": "huggingface", "trust_remote_code": True})
    capsys.readouterr()
    assert cli.main(["chat", infer, "--prompt", "Double 3.", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "is an lmforge run dir" in out and "trust_remote_code" in out
    from_yaml = [line for line in out.splitlines() if not line.startswith("note: ")]
    assert cli.main(["chat", "saves/tiny/lora/sft", "--prompt", "Double 3.", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines() == from_yaml  # the same weights, greedy


def test_inference_yaml_problems_and_train_on_it(workdir, llama_dir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    bad = write_yaml(workdir / "bad_infer.yaml", {"model_name_or_path": llama_dir, "infer_backend": "sglang",
                                                  "top_k": 5, "adapter_nme_or_path": "x"})
    assert cli.main(["chat", bad]) == 2
    message = capsys.readouterr().err
    assert "3 problems" in message and "sglang" in message and "top_k" in message
    assert "unknown key 'adapter_nme_or_path' — did you mean adapter_name_or_path?" in message
    infer = write_yaml(workdir / "infer_base.yaml", {"model_name_or_path": llama_dir, "template": "llama3"})
    assert cli.main(["train", infer]) == 2
    assert f"lmforge chat {infer}" in capsys.readouterr().err


def test_serve_with_an_inference_yaml_as_config(workdir, llama_dir):
    infer = write_yaml(workdir / "infer_full.yaml", {
        "model_name_or_path": "saves/tiny/full/sft", "template": "llama3", "infer_backend": "huggingface"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--config", infer, "--port", str(port),
                               "--threads", "1"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        name = models["data"][0]["id"]
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Double 2."}], "max_tokens": 4})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert "is an lmforge run dir" in output


@pytest.mark.parametrize("method", ["lora", "full"])
def test_merge_yaml_pointing_at_a_run_output_dir_exports_it(workdir, llama_dir, monkeypatch, capsys, method):
    monkeypatch.chdir(workdir)
    merge = {"model_name_or_path": llama_dir, "adapter_name_or_path": f"saves/tiny/{method}/sft",
             "template": "llama3", "trust_remote_code": True, "export_dir": f"merged/{method}", "export_size": 5,
             "export_device": "cpu", "export_legacy_format": False}
    if method == "full":  # LLaMA-Factory's full-run merge file names the output dir as the model
        merge["model_name_or_path"] = merge.pop("adapter_name_or_path")
    assert cli.main(["export", write_yaml(workdir / f"merge_{method}.yaml", merge)]) == 0
    assert "is an lmforge run dir" in capsys.readouterr().out
    out = workdir / "merged" / method
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert json.loads((out / "manifest.json").read_text())


def test_do_predict_yaml_runs_eval(workdir, llama_dir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    predict = write_yaml(workdir / "tiny_lora_predict.yaml", {
        "model_name_or_path": llama_dir, "adapter_name_or_path": "saves/tiny/lora/sft", "trust_remote_code": True,
        "stage": "sft", "do_predict": True, "finetuning_type": "lora", "eval_dataset": "doubles",
        "template": "llama3", "cutoff_len": 64, "max_samples": 3, "overwrite_cache": True,
        "preprocessing_num_workers": 4, "output_dir": "saves/tiny/lora/predict", "overwrite_output_dir": True,
        "report_to": "none", "per_device_eval_batch_size": 2, "predict_with_generate": True,
        "ddp_timeout": 180000000, "max_new_tokens": 4})
    assert cli.main(["eval", predict]) == 0
    result = json.loads((workdir / "saves/tiny/lora/predict/eval.json").read_text())
    assert {"bleu-4", "rouge-l"} <= set(result["metrics"])
    predictions = (workdir / "saves/tiny/lora/predict/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3
    # the same file given to train says where it belongs
    assert cli.main(["train", predict]) == 2
    assert "lmforge eval" in capsys.readouterr().err


def test_adapter_name_or_path_continues_training_that_adapter(workdir, llama_dir, monkeypatch, capsys):
    from safetensors.torch import load_file

    monkeypatch.chdir(workdir)
    first = load_file(str(workdir / "saves/tiny/lora/sft/adapter/adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in first.items())
    raw = {"model_name_or_path": llama_dir, "adapter_name_or_path": "saves/tiny/lora/sft", "stage": "sft",
           "do_train": True, "finetuning_type": "lora", "lora_rank": 16, "lora_target": "q_proj",
           "dataset": "doubles", "cutoff_len": 64, "output_dir": "saves/tiny/lora/sft_more", "max_steps": 1,
           "per_device_train_batch_size": 2, "learning_rate": 0.0, "report_to": "none"}
    assert cli.main(["train", write_yaml(workdir / "continue.yaml", raw)]) == 0
    out = capsys.readouterr().out
    # the adapter's own settings win over the file's, as when LLaMA-Factory loads it, and the user is told
    assert "continuing saves/tiny/lora/sft with its own settings" in out and "lora_rank 16 → 8" in out
    assert "continuing the adapter in" in out
    continued = load_file(str(workdir / "saves/tiny/lora/sft_more/adapter/adapter_model.safetensors"))
    assert set(continued) == set(first)
    assert all(continued[name].equal(first[name]) for name in first)  # learning rate 0: the weights it started from
    # an adapter that is not there, or a full run asked to continue an adapter: one clear report
    raw.update(adapter_name_or_path="saves/nothing", output_dir="saves/x")
    assert cli.main(["train", write_yaml(workdir / "bad_continue.yaml", raw)]) == 2
    assert "no readable adapter_config.json" in capsys.readouterr().err
    raw.update(adapter_name_or_path="saves/tiny/lora/sft", finetuning_type="full")
    assert cli.main(["train", write_yaml(workdir / "bad_continue.yaml", raw)]) == 2
    assert "point model_name_or_path at it" in capsys.readouterr().err
