"""Model name resolution, dtype choice, the atomic conversion cache, and the real bundled SmolLM2 model."""

import json
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.errors import ModelError, UserError
from lmforge.model import loader as models


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_model_writer(calls=None):
    """A write_files callback that saves a tiny random Llama, the same step the GGUF conversion ends with."""

    def write(out_dir: Path) -> dict:
        if calls is not None:
            calls.append(out_dir)
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
        models.write_model_files(LlamaForCausalLM(config), None, out_dir)
        return {"alias": out_dir.name, "description": "tiny test model"}

    return write


# ---------------------------------------------------------------------------------------------- resolution


def test_lmforge_home_follows_env(home):
    assert models.lmforge_home() == home


def test_misspelled_alias_suggests_the_builtin(home):
    with pytest.raises(ModelError) as err:
        models.resolve_model("smollm2-135m-instrct")
    message = str(err.value)
    assert "Did you mean 'smollm2-135m-instruct'?" in message
    assert "gemma-3-270m" in message and "--model /path/to/dir" in message
    with pytest.raises(ModelError, match="Did you mean 'gemma-3-270m'"):
        models.resolve_model("gemma-3-27m")


def test_nonexistent_path_is_reported_as_a_path(home, tmp_path):
    for missing in ["./no/such/model", str(tmp_path / "nope"), "~/definitely-not-here-lmforge"]:
        with pytest.raises(ModelError, match="model path does not exist") as err:
            models.resolve_model(missing)
        assert "smollm2-135m-instruct (default)" in str(err.value)


def test_path_whose_first_component_exists_is_a_path(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match="model path does not exist: runs/x"):
        models.resolve_model("runs/x")


def test_local_dir_needs_config_json(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path / "empty")) == str((tmp_path / "empty").resolve())


def test_unreachable_hub_id_lists_the_builtin_aliases(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        models.resolve_model("lmforge-tests/no-such-model")
    message = str(err.value)
    assert "lmforge-tests/no-such-model" in message
    assert "smollm2-135m-instruct" in message and "gemma-3-270m" in message
    assert "model.name_or_path: /path/to/dir" in message


def test_unknown_local_dir_content_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelError, match="cannot load the model from"):
        models.load_model(str(tmp_path), torch.float32)


# ---------------------------------------------------------------------------------------------- dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU")
def test_weights_load_in_float32_without_gpu():
    """On a CPU bf16 is autocast over float32 weights (model/precision.py, tests/test_precision.py)."""
    for name in (None, "auto", "fp32", "bf16", "bfloat16", "float16"):
        assert models.pick_dtype(name) == torch.float32


def test_unknown_dtype_lists_valid_values():
    with pytest.raises(UserError, match="valid values: auto, float32, fp32, bfloat16, bf16, float16, fp16"):
        models.pick_dtype("float8")


# ---------------------------------------------------------------------------------------------- atomic cache


def test_built_dir_has_marker_and_loads(home):
    final = models.models_dir() / "tiny"
    assert models.build_model_dir(final, tiny_model_writer()) is True
    assert {"config.json", "model.safetensors", "generation_config.json", models.MARKER_FILE} <= {
        p.name for p in final.iterdir()}
    assert json.loads((final / models.MARKER_FILE).read_text())["lmforge_version"]
    assert not list(final.parent.glob(".tiny.tmp-*"))
    assert models.load_model(models.resolve_model(str(final)), torch.float32).config.num_hidden_layers == 2
    assert models.build_model_dir(final, tiny_model_writer()) is False  # trusted: not rebuilt


def test_interrupted_write_leaves_no_final_dir_and_next_call_succeeds(home, monkeypatch):
    final = models.models_dir() / "tiny"
    real_write_marker = models.write_marker

    def crash_before_marker(model_dir, info):
        assert (model_dir / "model.safetensors").is_file()  # the weights were written: crash mid-conversion
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "write_marker", crash_before_marker)
    with pytest.raises(KeyboardInterrupt):
        models.build_model_dir(final, tiny_model_writer())
    assert not final.exists()
    assert not list(final.parent.glob(".tiny.tmp-*"))

    monkeypatch.setattr(models, "write_marker", real_write_marker)
    assert models.build_model_dir(final, tiny_model_writer()) is True
    assert models.is_trusted(final)


def test_dir_without_marker_is_not_trusted_and_is_rebuilt(home):
    final = models.models_dir() / "tiny"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{half written")
    calls = []
    assert models.build_model_dir(final, tiny_model_writer(calls)) is True
    assert len(calls) == 1
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_stale_temp_dirs_from_killed_runs_are_removed(home):
    final = models.models_dir() / "tiny"
    stale = final.parent / ".tiny.tmp-999999"
    (stale / "junk").mkdir(parents=True)
    models.build_model_dir(final, tiny_model_writer())
    assert not stale.exists()


def test_concurrent_builders_convert_once(home, monkeypatch, capsys):
    """The second builder arrives while the first is writing, waits on the lock, then finds the dir built. Events,
    not sleeps, order the two: the first write finishes only once the second is blocked on the lock."""
    final = models.models_dir() / "tiny"
    calls, results = [], {}
    write = tiny_model_writer(calls)
    writing, second_waits = threading.Event(), threading.Event()
    real_flock = models.fcntl.flock

    def flock(file, operation):
        if operation == models.fcntl.LOCK_EX:  # the blocking wait, after the non-blocking try found the lock taken
            second_waits.set()
        return real_flock(file, operation)

    def held_write(out_dir):
        writing.set()
        assert second_waits.wait(timeout=60), "the second builder never waited on the lock"
        return write(out_dir)

    monkeypatch.setattr(models.fcntl, "flock", flock)
    first = threading.Thread(target=lambda: results.update(first=models.build_model_dir(final, held_write)))
    second = threading.Thread(target=lambda: results.update(second=models.build_model_dir(final, write)))
    first.start()
    assert writing.wait(timeout=60)
    second.start()
    for thread in (first, second):
        thread.join(timeout=120)
    assert results == {"first": True, "second": False}  # the second found it built when the lock came free
    assert len(calls) == 1 and models.is_trusted(final)
    assert "Waiting for another lmforge process to finish converting" in capsys.readouterr().err


def test_list_models_shows_builtins_and_marked_dirs(home):
    models.build_model_dir(models.models_dir() / "my-model", tiny_model_writer())
    (models.models_dir() / "unmarked").mkdir()
    rows = models.list_models()
    assert [r["alias"] for r in rows] == ["smollm2-135m-instruct", "gemma-3-270m", "my-model"]
    assert [r["cached"] for r in rows] == [False, False, True]
    assert rows[2]["size_bytes"] > 0
    table = models.format_models_table(rows)
    assert table.splitlines()[0].split() == ["ALIAS", "CACHED", "SIZE", "DESCRIPTION", "PATH"]
    assert "my-model" in table and "tiny test model" in table


# ---------------------------------------------------------------------------------------------- the real model


@pytest.mark.e2e
def test_bundled_model_converts_and_loads():
    """Converts SmolLM2 into the default home on first run (~45 s); later runs reuse the cache."""
    path = Path(models.resolve_model(models.DEFAULT_MODEL))
    assert path == models.lmforge_home() / "models" / models.DEFAULT_MODEL
    assert (path / "model.safetensors").is_file()
    marker = json.loads((path / models.MARKER_FILE).read_text())
    assert marker["alias"] == models.DEFAULT_MODEL and len(marker["source"]["gguf_sha256"]) == 64

    tokenizer = models.load_tokenizer(str(path))
    model = models.load_model(str(path), models.pick_dtype("auto"))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
