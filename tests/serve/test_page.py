"""The chat page at `/`, in a real headless Chromium (Debian's package; .ci/run installs it) driven by Playwright."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.serve.conftest import png_bytes, start_server
from tests.serve.test_app import expected_answer

# Offline-safe flags (no background connections to Google services, no sandbox as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LEAD_SCREENSHOT = "/tmp/mllm-page.png"


def chromium_path() -> str:
    path = os.environ.get("MLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the page test needs Chromium: apt-get install chromium (as .ci/run does), or set MLLM_CHROMIUM")
    return path


def test_page_streams_the_answer_generate_gives(served_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    question = "What shape is in the picture?"
    png = png_bytes("orange", size=48, shape="square")
    image_path = tmp_path / "shape.png"
    image_path.write_bytes(png)
    want = expected_answer(served_model, f"<image>\n{question}", {"image": [png]}, 16)
    assert want

    with start_server(served_model, model_name="tiny-page") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("tiny-page")
            page.set_input_files("#media", str(image_path))
            page.fill("#question", question)
            page.fill("#max_tokens", "16")
            page.click("#send")
            answer = page.locator("[data-latest]")
            expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
            assert answer.text_content() == want
            assert page.locator("#error").text_content() == ""
            assert page.locator(".turn.user img.thumb").count() == 1   # the attached image is shown
            # A second turn carries the first as history and also completes.
            page.fill("#question", "And its colour?")
            page.click("#send")
            expect(page.locator("[data-latest]")).to_have_attribute("data-state", "done", timeout=120_000)
            assert page.locator(".turn.assistant").count() == 2
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    shutil.copyfile(tmp_path / "page.png", LEAD_SCREENSHOT)
    assert (tmp_path / "page.png").stat().st_size > 1000
