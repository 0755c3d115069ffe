"""`lmforge compare` on tiny random models: every example is in report.md, report.html and compare.json with every
model's answer; the HTML is self-contained and escapes the data; contenders are runs, checkpoints, adapters or models;
the LLM judge is reached over real HTTP (a deterministic OpenAI-compatible server on 127.0.0.1, called through the
official client) and asked in both orders, so a judge that always prefers the first answer yields only ties."""

from __future__ import annotations

import html
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import make_tiny_model, tiny_tokenizer

from lmforge import cli
from lmforge.config import Config
from lmforge.errors import UserError
from lmforge.eval.compare import (
    JudgeSettings,
    combine,
    compare,
    parse_verdict,
    resolve_contender,
)
from lmforge.eval.evaluate import EvalOptions, load_test_set
from lmforge.generate import SamplingParams
from lmforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "合同无效的情形有哪些？"},
                  {"role": "assistant", "content": "违反法律、行政法规的强制性规定的合同无效。"}]},
    {"messages": [{"role": "system", "content": "Answer in HTML."},
                  {"role": "user", "content": "Show <script>alert('x')</script> & friends"},
                  {"role": "assistant", "content": "<b>bold</b> & \"quoted\""}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Table | pipes?"}, {"role": "assistant", "content": "a | b"}]},
]
ANSWER = re.compile(r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


class JudgeHandler(BaseHTTPRequestHandler):
    """/v1/chat/completions: model "longer" prefers the longer answer ([[C]] when equal); model "first" always
    says [[A]] (a judge with pure position bias). Every request is recorded."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        answers = dict(ANSWER.findall(body["messages"][-1]["content"]))
        if body["model"] == "first":
            verdict = "A"
        else:
            difference = len(answers["A"]) - len(answers["B"])
            verdict = "A" if difference > 0 else "B" if difference < 0 else "C"
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": f"Reasoning…\n[[{verdict}]]"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir):
    """A test set, a second tiny model (other seed) and a LoRA run with checkpoints."""
    root = tmp_path_factory.mktemp("compare")
    test_file = root / "test.jsonl"
    test_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    other = make_tiny_model("llama", tiny_tokenizer(), root / "other", seed=1)
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    train(Config.model_validate({
        "model": {"name_or_path": llama_dir}, "data": {"train": [str(train_file)]},
        "train": {"output_dir": str(root / "run"), "max_steps": 2, "save_steps": 1, "batch_size": 2,
                  "learning_rate": 1e-2, "logging_steps": 1}}))
    return {"root": root, "test": load_test_set([str(test_file)]), "test_file": test_file, "base": llama_dir,
            "other": other, "run": root / "run"}


OPTIONS = EvalOptions(params=SamplingParams(max_new_tokens=6), batch_size=4)


def test_contenders_are_runs_checkpoints_adapters_or_models(setup):
    run = setup["run"]
    assert resolve_contender(str(run)).weights.label == "final"
    checkpoint = resolve_contender(str(run / "checkpoints" / "step-1"))
    assert (checkpoint.label, checkpoint.weights.label) == ("run@step-1", "step-1")
    adapter = resolve_contender(f"tuned={run / 'adapter'}")
    assert (adapter.label, adapter.adapter, adapter.model) == ("tuned", str(run / "adapter"), setup["base"])
    assert resolve_contender("base=smollm2-135m-instruct").model == "smollm2-135m-instruct"
    (setup["root"] / "stray").mkdir(exist_ok=True)
    with pytest.raises(UserError, match="not a run dir"):
        resolve_contender(str(setup["root"] / "stray"))


def in_markdown(text: str, markdown: str) -> bool:
    """Quoted text in report.md: &, < and > escaped, every line of it present."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return all(line.strip() in markdown for line in escaped.split("\n"))


def test_reports_hold_every_example_and_every_answer(setup, tmp_path):
    out = tmp_path / "cmp"
    specs = [f"base={setup['base']}", str(setup["run"]), str(setup["run"] / "checkpoints" / "step-1"),
             f"other={setup['other']}"]
    comparison = compare(specs, setup["test"], OPTIONS, out)
    labels = ["base", "run", "run@step-1", "other"]
    assert [m["label"] for m in comparison["models"]] == labels
    saved = json.loads((out / "compare.json").read_text())
    page = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    assert len(saved["rows"]) == len(RECORDS)
    assert markdown.count("\n### ") == len(RECORDS) and page.count('<section class="card"') == len(RECORDS)
    for label in labels:
        predictions = [json.loads(line)["prediction"]
                       for line in (out / label / "predictions.jsonl").read_text().splitlines()]
        assert [row["outputs"][label]["prediction"] for row in saved["rows"]] == predictions
        assert all(html.escape(p) in page and in_markdown(p, markdown) for p in predictions)
        assert f"**{label}** (rouge-l" in markdown
    for record in RECORDS:
        *_, question, answer = record["messages"]
        for text in (question["content"], answer["content"]):
            assert html.escape(text) in page and in_markdown(text, markdown)
    metrics_header = next(line for line in markdown.splitlines() if line.startswith("| metric |"))
    assert metrics_header == "| metric | base | run | run@step-1 | other |"


def test_html_is_self_contained_and_escaped(setup, tmp_path):
    compare([str(setup["base"]), str(setup["other"])], setup["test"], OPTIONS, tmp_path / "cmp")
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(""", page)  # nothing fetched from anywhere
    assert '<meta charset="utf-8">' in page and "PingFang SC" in page
    assert "违反法律、行政法规的强制性规定的合同无效。" in page


def expected_outcome(ours: str, theirs: str) -> str:
    return "win" if len(ours) > len(theirs) else "loss" if len(ours) < len(theirs) else "tie"


def test_judge_over_http_asks_both_orders(setup, tmp_path, judge_url):
    url, requests = judge_url
    requests.clear()
    comparison = compare([f"base={setup['base']}", f"other={setup['other']}", str(setup["run"])], setup["test"],
                         OPTIONS, tmp_path / "cmp", JudgeSettings(url, "longer", key="sk-test"))
    assert len(requests) == 2 * 2 * len(RECORDS)  # two contenders × two orders × every example
    assert all(r["model"] == "longer" and r["temperature"] == 0 for r in requests)
    judge = comparison["judge"]
    assert judge["baseline"] == "base" and set(judge["results"]) == {"other", "run"}
    for label in ("other", "run"):
        outcomes = [expected_outcome(row["outputs"][label]["prediction"], row["outputs"]["base"]["prediction"])
                    for row in comparison["rows"]]
        assert [row["judge"][label]["outcome"] for row in comparison["rows"]] == outcomes
        summary = judge["results"][label]
        assert [summary["win"], summary["tie"], summary["loss"]] == [outcomes.count(o) for o in ("win", "tie", "loss")]
        assert summary["position_bias"] == 0
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "LLM judge" in page and "LLM judge" in (tmp_path / "cmp" / "report.md").read_text()


def test_a_judge_that_always_picks_the_first_answer_gives_only_ties(setup, tmp_path, judge_url):
    url, _ = judge_url
    comparison = compare([str(setup["base"]), str(setup["other"])], setup["test"], OPTIONS, tmp_path / "cmp",
                         JudgeSettings(url, "first"))
    summary = next(iter(comparison["judge"]["results"].values()))
    assert (summary["win"], summary["tie"], summary["loss"]) == (0, len(RECORDS), 0)
    assert summary["position_bias"] == len(RECORDS) and summary["win_rate"] == 50.0


def test_verdict_parsing_and_combination():
    assert parse_verdict("A is better.\n[[A]]") == "A"
    assert parse_verdict("[[A]] at first, but on reflection [[B]]") == "B"
    assert parse_verdict("[[C]]") == parse_verdict("[[tie]]") == "tie"
    assert parse_verdict("B is better") is None
    assert (combine("A", "B"), combine("B", "A"), combine("A", "A"), combine("tie", "B"), combine(None, "B")) == (
        "win", "loss", "tie", "tie", "tie")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_compare(setup, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", f"base={setup['base']}", str(setup["run"]), "--data",
                                str(setup["test_file"]), "-o", str(out), "--max-new-tokens", "4")
    assert code == 0, err
    assert "report.html" in stdout and (out / "report.html").is_file() and (out / "base" / "eval.json").is_file()


@pytest.mark.parametrize("extra, expected", [
    (["--judge-url", "http://127.0.0.1:9/v1"], "needs both --judge-url"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], r"judge endpoint http://127\.0\.0\.1:9/v1 cannot "
                                                                     r"be reached"),
])
def test_cli_judge_problems_are_exit_2(setup, tmp_path, capsys, extra, expected):
    code, out, err = run_cli(capsys, "compare", str(setup["base"]), str(setup["other"]), "--data",
                             str(setup["test_file"]), "-o", str(tmp_path / "cmp"), "--max-new-tokens", "2", *extra)
    assert code == 2 and "Traceback" not in out + err and re.search(expected, err), err


def test_cli_compare_needs_two_models(setup, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", str(setup["base"]), "--data", str(setup["test_file"]), "-o",
                           str(tmp_path / "cmp"))
    assert code == 2 and "at least two" in err
