"""The real app in a real headless browser: Debian's chromium driven by Playwright.

Install: `bash setup.sh --dev` (pip's playwright package plus `apt-get install chromium`; do not run
`playwright install`). The screenshot of the page after generating is saved as
test-output/app-browser.png (and in pytest's tmp_path).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import OUTPUT, app_url  # noqa: E402

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (bash setup.sh --dev)", allow_module_level=True)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
GENERATION_TIMEOUT_MS = 420_000


@pytest.fixture(scope="module")
def page():
    url = app_url()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(url)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def choose_user(page, user_id: str) -> None:
    box = page.locator("#user_id input")
    box.click()
    box.press("Control+a")
    box.press_sequentially(user_id[:8], delay=20)
    page.locator("#user_id [role=option]").filter(has_text=user_id).first.click()


def test_pick_a_user_generate_and_screenshot(page, tmp_path):
    page.get_by_label("A bundled reviewer").check()
    user_id = "A2EZWZ8MBEDOLN"  # a bundled reviewer whose held-out item has peers
    choose_user(page, user_id)
    sync_api.expect(page.locator("#item_title textarea")).not_to_have_value("", timeout=15_000)
    sync_api.expect(page.locator("#review_title textarea")).not_to_have_value("", timeout=15_000)
    tokens = page.locator("#max_new_tokens input[type=number]")
    tokens.fill("16")
    tokens.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function(
        """() => {
            const text = id => (document.querySelector(`#${id} textarea`) || {}).value || "";
            const status = document.querySelector('#status').innerText;
            return text('baseline').trim() && text('personalized').trim() && status.includes('Done');
        }""", timeout=GENERATION_TIMEOUT_MS)
    assert "Could not generate" not in page.locator("#status").inner_text()
    assert page.locator("#real textarea").input_value().strip(), "the real review is shown for comparison"
    sync_api.expect(page.locator("#metrics")).to_contain_text("ROUGE-1")
    sync_api.expect(page.locator("#selected")).to_contain_text("relevance")
    page.wait_for_timeout(500)
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "app-browser.png"), full_page=True)
    page.screenshot(path=str(tmp_path / "app-browser.png"), full_page=True)
    assert (OUTPUT / "app-browser.png").stat().st_size > 50_000


def test_bad_input_shows_a_clear_message(page, tmp_path):
    page.get_by_label("Paste or upload reviews").check()
    binary = tmp_path / "history.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    page.locator("#paste-group input[type=file]").set_input_files(str(binary))
    sync_api.expect(page.locator("#history-status")).to_contain_text("not a text file", timeout=20_000)

    page.locator("#history textarea").fill('{"asin": "B003VWJ2K8", "overall": 5, "reviewText": "ok"}\n{"asin": ')
    sync_api.expect(page.locator("#history-status")).to_contain_text("line 2: malformed JSON", timeout=20_000)
    page.locator("#generate").click()
    sync_api.expect(page.locator("#status")).to_contain_text("Could not generate", timeout=30_000)
    sync_api.expect(page.locator("#status")).to_contain_text("line 2: malformed JSON")
    assert "Traceback" not in page.locator("#status").inner_text()
    page.screenshot(path=str(OUTPUT / "app-browser-error.png"), full_page=False)
