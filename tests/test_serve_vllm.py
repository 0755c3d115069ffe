"""`lmforge serve --backend vllm`: vLLM's engine behind lmforge's API and guard.

vLLM needs a GPU, so here the end-to-end test is skipped; what runs everywhere: the translation of vLLM's cumulative
outputs into engine events, and the refusals a user meets before any loading."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest
from serve_helpers import live_server, make_adapter, vivid_tiny_model
from test_cli import assert_user_error, run_cli

from lmforge.errors import UserError
from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings
from lmforge.serve.vllm_engine import max_lora_rank, new_events

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_cumulative_outputs_become_each_token_once_then_the_finish():
    sent, finished = [0, 0], {}
    first = new_events([(0, [5, 6], None), (1, [7], None)], sent, finished, frozenset({2}))
    assert first == [(0, 5, None), (0, 6, None), (1, 7, None)]
    again = new_events([(0, [5, 6], None), (1, [7, 8, 2], "stop")], sent, finished, frozenset({2}))
    assert again == [(1, 8, None), (1, None, "stop")]  # the stop token ends the choice and is not emitted
    last = new_events([(0, [5, 6, 9], "length"), (1, [7, 8, 2], "stop")], sent, finished, frozenset({2}))
    assert last == [(0, 9, None), (0, None, "length")]  # a finished choice sends nothing more
    assert finished == {0: "length", 1: "stop"}
    assert new_events([(0, [4], "abort")], [0], {}, frozenset()) == [(0, 4, None), (0, None, "cancelled")]


def test_lora_rank_rounds_up_to_one_vllm_accepts():
    assert [max_lora_rank(r) for r in ([4], [8, 12], [300])] == [8, 16, 320]
    with pytest.raises(UserError, match="rank 1024"):
        max_lora_rank([1024])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_get_it(capsys, tmp_path, bundled_model_dir):
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    capsys.readouterr()  # building the model printed progress bars
    err = assert_user_error(*run_cli(capsys, "serve", "--model", base, "--backend", "vllm"))
    assert "pip install vllm" in err and "GPU" in err


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (GPU machines)")
def test_vllm_backend_serves_base_and_adapters_through_the_same_api(tmp_path, bundled_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    adapters = {"legal": make_adapter(base, tmp_path / "legal", ["q_proj", "v_proj"], seed=1, rank=8),
                "medical": make_adapter(base, tmp_path / "medical", ["k_proj", "o_proj"], seed=2, rank=8)}
    settings = ServeSettings(backend="vllm", api_keys=["k"], max_tokens=32, context_length=256,
                             vllm_args={"gpu_memory_utilization": 0.3, "enforce_eager": True})
    engine = build_engine(base, None, adapters, settings)
    with live_server(create_app(engine, settings)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list()} == {"tiny", "legal", "medical"}
        hi = [{"role": "user", "content": "What does article 12 say?"}]
        replies = {}
        for name in ("tiny", "legal", "medical"):
            whole = client.chat.completions.create(model=name, messages=hi, max_tokens=12, temperature=0)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                model=name, messages=hi, max_tokens=12, temperature=0, stream=True) if chunk.choices)
            assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens > 0
            replies[name] = streamed
        assert len(set(replies.values())) == 3  # the model field picks the adapter
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_backend_vllm_refuses_what_it_cannot_serve(tmp_path, bundled_model_dir):
    """A run of a method vLLM does not load (prefix tuning, …) is refused with what to do, before any loading."""
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4,
                                                            "base_model_name_or_path": base}))
    with pytest.raises(UserError, match="PREFIX_TUNING run: merge it with `lmforge export prefix -o OUT`"):
        build_engine(str(prefix), None, {}, ServeSettings(backend="vllm"))
