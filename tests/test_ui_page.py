"""The board's page in a real headless Chromium (Debian's, driven by playwright; no browser download), against a real
`lmforge ui` on loopback: inspect the data, start a 3-step run of the bundled model from the generated form, watch the
loss curve gain points, stop it (checkpoint) and resume it, compare base and tuned, ask both the same question,
export, serve and call the server with the snippet's port and key, switch to Chinese. Screenshots are written to
$LMFORGE_TEST_ARTIFACTS/ui (default: the test's tmp dir). Skipped only where no chromium is installed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from test_ui_support import board, make_workspace, stop_all_trainings

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LONG = 900_000  # ms: steps of the bundled model take seconds on 2 idle cores, minutes on a crowded machine
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]


def result_of(page, done: str, out: str) -> None:
    """Wait until the action shows its result (`done`) or its failure (the job's log in `out`); fail with the log."""
    page.wait_for_selector(f"{done}, {out} .job-failed, #banner:not([hidden])", timeout=LONG)
    assert page.locator(done).count(), page.inner_text("#banner") + page.inner_text(out)[-3000:]


def points(page, chart: str = "chartLoss") -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


def test_the_whole_demo_from_the_page(tmp_path, bundled_model_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    artifacts = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", tmp_path)) / "ui"
    artifacts.mkdir(parents=True, exist_ok=True)
    workspace = make_workspace(tmp_path / "ws", with_model=False)
    try:
        with board(workspace) as live, sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 1000}, bypass_csp=True)  # for wait_for_function
            page.set_default_timeout(180_000)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(live.url + "/#data")
            page.wait_for_selector("body[data-ready=true]")

            # Data: the detected shape and the trained tokens marked
            page.select_option("#dataFile", "data/qa.jsonl")
            page.click("#inspectBtn")
            result_of(page, "#inspectOut mark.trained", "#inspectOut")
            assert "messages" in page.inner_text("#inspectOut")
            page.screenshot(path=str(artifacts / "data.png"))

            # Train: the form generated from the schema, an invalid value shown by its field, then a valid run
            page.click("#tabs button[data-tab=train]")
            page.fill("#cfg-name", "page-run")
            page.fill("#cfg-method-lora_rank", "1.5")
            page.wait_for_selector(".field.invalid #cfg-method-lora_rank", timeout=10000)
            assert "integer" in page.inner_text(".field.invalid .err") and page.is_disabled("#startBtn")
            page.fill("#cfg-method-lora_rank", "8")
            for field, value in (("train-max_steps", "3"), ("train-logging_steps", "1"), ("train-save_steps", "1"),
                                 ("train-batch_size", "2"), ("data-cutoff_len", "128")):
                page.fill(f"#cfg-{field}", value)
            page.wait_for_function("document.getElementById('yaml').textContent.includes('max_steps: 3')")
            page.wait_for_selector("#configErrors .ok")
            page.wait_for_function("document.getElementById('estimate').textContent.includes('MiB')")
            page.screenshot(path=str(artifacts / "train.png"))
            page.click("#startBtn")

            # Runs: the curve gains points; Stop saves a checkpoint; Resume finishes the run
            page.wait_for_selector("#runPanel:not([hidden])")
            page.wait_for_function("Number(document.getElementById('chartLoss').dataset.points) >= 1", timeout=LONG)
            page.click("#stopBtn")
            page.wait_for_selector("#runStatus[data-status=stopped]", timeout=LONG)
            stopped_at = points(page)
            assert 1 <= stopped_at < 3 and list((workspace / "runs/page-run/checkpoints").glob("step-*"))
            page.wait_for_function("!document.getElementById('resumeBtn').disabled")
            page.click("#resumeBtn")
            page.wait_for_selector("#runStatus[data-status=finished]", timeout=LONG)
            page.wait_for_function("Number(document.getElementById('chartLoss').dataset.points) === 3", timeout=LONG)
            assert points(page, "chartLr") == 3 and points(page, "chartSpeed") == 3
            page.screenshot(path=str(artifacts / "runs.png"))

            # Evaluate & compare: base vs tuned report, and both answering one prompt
            page.click("#tabs button[data-tab=compare]")
            page.select_option("#evalData", "data/qa.jsonl")
            page.fill("#evalSamples", "2")
            page.fill("#evalTokens", "8")
            assert page.input_value("#compareModels") == "base=smollm2-135m-instruct, tuned=page-run"
            page.click("#compareBtn")
            result_of(page, "#compareReport", "#compareOut")
            assert page.locator("#compareOut table.metrics tbody tr").count() == 2
            page.fill("#chatPrompt", "What is 2 plus 2?")
            page.click("#chatBtn")
            page.wait_for_selector("#chatOutA[data-done=done]", timeout=LONG)
            page.wait_for_selector("#chatOutB[data-done=done]", timeout=LONG)
            assert page.inner_text("#chatOutA").strip() and page.inner_text("#chatOutB").strip()
            page.screenshot(path=str(artifacts / "compare.png"), full_page=True)

            # Export & serve: checks shown; the snippet's port and key answer
            page.click("#tabs button[data-tab=export]")
            page.select_option("#exportRun", "page-run")
            page.click("#exportBtn")
            result_of(page, "#exportDone", "#exportOut")
            assert "relative_rms" in page.inner_text("#exportOut")
            page.click("#serveBtn")
            page.wait_for_selector("#serveState[data-state=ready]", timeout=LONG)
            curl = page.inner_text("#curlSnippet")
            base_url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", curl).group(1)
            key = re.search(r"Bearer (\S+?)\"", curl).group(1)
            reply = httpx.post(f"{base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                               json={"model": "page-run", "messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            page.screenshot(path=str(artifacts / "export.png"), full_page=True)
            page.click("#serveStop")

            # 中文
            page.click("#lang")
            assert page.inner_text("#tabs button[data-tab=train]") == "训练"
            page.click("#tabs button[data-tab=runs]")
            page.click("#runsTable tr[data-run=page-run]")
            page.wait_for_function("Number(document.getElementById('chartLoss').dataset.points) === 3", timeout=LONG)
            assert page.inner_text("#runStatus") == "已完成"
            page.screenshot(path=str(artifacts / "runs-zh.png"))
            browser.close()
            assert not errors, errors
    finally:
        stop_all_trainings(workspace)
