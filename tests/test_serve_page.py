"""The chat page at / in a real headless Chromium: it asks for the key, defaults to the served run, and streams a
reply that equals the API's. Skipped where no browser is installed (apt-get install chromium; pip install playwright);
test_serve.py::test_chat_page_contract checks the page's HTTP/JS contract everywhere."""

from __future__ import annotations

import shutil

import openai
import pytest
from serve_helpers import live_server, make_adapter, vivid_tiny_model

from lmforge.model.loader import load_tokenizer
from lmforge.serve.app import create_app
from lmforge.serve.loading import build_engine
from lmforge.serve.settings import ServeSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")]
KEY = "page-test-key"


def test_page_asks_for_the_key_talks_to_the_served_run_and_streams_its_reply(tmp_path, bundled_model_dir):
    """Served: a base and its adapter "legal" (as `lmforge serve runs/legal` serves a LoRA run). The page opens
    asking for the key (no error), defaults to the adapter, names the model under the reply, keeps the key for the
    tab only (sessionStorage, never localStorage), and streams what the API answers."""
    sync_api = pytest.importorskip("playwright.sync_api")
    base = vivid_tiny_model("llama", load_tokenizer(bundled_model_dir), tmp_path / "tiny")
    adapter = make_adapter(base, tmp_path / "legal", ["q_proj", "v_proj"], seed=1)
    settings = ServeSettings(api_keys=[KEY])
    with live_server(create_app(build_engine(base, None, {"legal": adapter}, settings), settings)) as (url, _):
        expected = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="legal", messages=[{"role": "user", "content": "Is this contract valid?"}], max_tokens=12,
            temperature=0).choices[0].message.content
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
            assert page.locator(".msg.error").count() == 0
            assert page.evaluate("document.activeElement.id") == "apiKey"
            page.fill("#apiKey", KEY)
            page.dispatch_event("#apiKey", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            assert page.input_value("#model") == "legal"  # the served run, not the untuned base
            assert page.evaluate("sessionStorage.getItem('lmforge-api-key')") == KEY
            assert page.evaluate("localStorage.length") == 0
            page.reload()  # the key survives a reload of the tab
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            page.fill("#temperature", "0")
            page.fill("#maxTokens", "12")
            page.fill("#input", "Is this contract valid?")
            page.press("#input", "Enter")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30000)
            texts = page.locator(".msg.assistant .text").all_text_contents()
            who = page.locator(".msg.assistant .who").all_text_contents()
            page.screenshot(path=str(tmp_path / "chat.png"))
            browser.close()
    assert texts == [expected]
    assert who == ["assistant · legal"]
