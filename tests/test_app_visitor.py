"""What a first-time visitor hits (issue 34): the evidence tabs after the first generation, switching the
history source, an overlong pasted field, and the messages for an empty history, a wrongly encoded one, a
history pasted many times over, the API example's address, and the evidence tables' headers.

The real app (the session's shared server, tests/app_server.py) in Debian's chromium and through
gradio_client, as tests/test_app_browser.py and tests/test_app_api.py drive it."""
from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import OUTPUT, app_url  # noqa: E402
from test_app_browser import GENERATION_TIMEOUT_MS, browser, generate_and_wait, page, set_tokens, sync_api  # noqa: E402,F401

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

TOKENS = 4


@pytest.fixture(scope="module")
def client():
    return gradio_client.Client(app_url(), verbose=False)


# ---- in the browser --------------------------------------------------------------------------------

def test_peers_show_on_the_first_visit_and_another_source_clears_the_old_results(page):
    """The first path of every visitor: Generate, then open Peers (never opened before); then switch to
    pasting a history: nothing of the bundled reviewer's run stays beside the empty form."""
    set_tokens(page, TOKENS)
    generate_and_wait(page)
    sync_api.expect(page.locator("#real")).to_be_visible()
    page.get_by_role("tab", name="Peers").click()
    peers = page.locator("#peers")
    sync_api.expect(peers.locator("th.header-cell").first).to_be_visible(timeout=10_000)
    headers = [h.strip() for h in peers.locator("th.header-cell").all_inner_texts()]
    assert "peer" in headers and "weight" in headers, f"the peers table is headed {headers}"
    assert peers.locator("[role=row]").count() > 2, "the peers table has rows"

    page.get_by_label("Paste or upload reviews").check()
    for output in ("baseline", "personalized"):
        sync_api.expect(page.locator(f"#{output} textarea")).to_have_value("", timeout=10_000)
    sync_api.expect(page.locator("#real")).to_be_hidden()
    sync_api.expect(page.locator("#metrics")).to_be_hidden()
    sync_api.expect(page.locator("#voice")).not_to_contain_text("Whose voice")
    assert "Done" not in page.locator("#status").inner_text(), "the old run's status is gone"


def test_the_api_example_names_this_servers_address(page):
    example = page.get_by_text("Use it from Python").locator("..")
    sync_api.expect(example).to_contain_text(f'Client("{app_url()}")')


def test_the_evidence_tables_headers_are_not_cut_short(page):
    page.get_by_role("tab", name="Past reviews").click()
    for table, tab in (("selected", "Past reviews"), ("peers", "Peers")):
        page.get_by_role("tab", name=tab).click()
        header = page.locator(f"#{table} th.header-cell").first
        sync_api.expect(header).to_be_visible(timeout=10_000)
        clipped = page.evaluate("""id => [...document.querySelectorAll(`#${id} th.header-cell`)]
            .flatMap(h => [h, ...h.querySelectorAll('*')])
            .filter(e => e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right
                         > e.closest('th').getBoundingClientRect().right + 1)
            .map(e => e.closest('th').innerText.trim())""", table)
        assert not clipped, f"{table}: headers cut short: {sorted(set(clipped))}"


def test_a_utf16_upload_is_refused_for_its_encoding(page, tmp_path):
    page.get_by_label("Paste or upload reviews").check()
    upload = tmp_path / "history.csv"
    upload.write_bytes("item_title,rating,review_title,review_text\nA tuner,5,Fast,Grabs the note.\n".encode("utf-16"))
    page.locator("#paste-group input[type=file]").set_input_files(str(upload))
    sync_api.expect(page.locator("#history-status")).to_contain_text("UTF-16", timeout=20_000)
    sync_api.expect(page.locator("#history-status")).to_contain_text("UTF-8")


# ---- through the API -------------------------------------------------------------------------------

def _log_lines() -> list[str]:
    return (OUTPUT / "app-server.log").read_text(errors="replace").splitlines()


@pytest.mark.parametrize("history", ["", "   \n\t  "], ids=["empty", "whitespace"])
def test_an_empty_history_is_called_empty_and_logged_as_pasted(client, history):
    started = datetime.now().replace(microsecond=0)
    with pytest.raises(AppError) as caught:
        client.predict(history=history, item_title="A tuner", rating=4, max_new_tokens=TOKENS, api_name="/review")
    assert "history: it is empty" in str(caught.value)
    deadline = time.monotonic() + 10
    while not (lines := _api_lines_since(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lines and "source=paste" in lines[-1] and "error=DataError" in lines[-1], lines


def _api_lines_since(started: datetime) -> list[str]:
    """The server log's /review lines (one per request, `sharing.RequestLog`) written from `started` on."""
    lines = []
    for line in _log_lines():
        try:
            when = datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        except ValueError:
            continue
        if when >= started and "dep_studio.requests: api: source=" in line:
            lines.append(line)
    return lines


def test_text_of_another_encoding_is_refused_for_its_encoding(client):
    utf16 = "item_title,rating,review_title,review_text\nA tuner,5,Fast,Grabs the note.\n".encode("utf-16-le")
    for history in (utf16.decode("utf-8", errors="replace"), ("\ufffd" * 40 + ",5,t,x\n") * 3):
        with pytest.raises(AppError) as caught:
            client.predict(history=history, item_title="A tuner", rating=4, max_new_tokens=TOKENS, api_name="/review")
        assert "encoding" in str(caught.value) and "UTF-8" in str(caught.value), str(caught.value)


def test_many_copies_of_one_review_are_used_once_with_a_note(client):
    history = "item_title,rating,review_title,review_text\n" + "Snark SN1 Guitar Tuner,5,Fast,Grabs the note.\n" * 50
    out = client.predict(history=history, item_title="A tuner", rating=4, max_new_tokens=TOKENS, api_name="/review")
    assert len(out["selected"]) == 1
    assert any("50 past reviews" in note and "once" in note for note in out["notes"]), out["notes"]


def test_an_overlong_field_is_cut_before_any_past_review_is_dropped(client):
    history = ("item_title,rating,review_title,review_text\n"
               f"Snark SN1 Guitar Tuner,5,{'x' * 100_000},Clip-on tuner that grabs the note quickly.\n"
               "Fender picks,4,Good grip,Medium picks that do not slip.\n"
               "Ernie Ball strings,4,Bright,Bright strings that stay in tune.\n")
    out = client.predict(history=history, item_title="A tuner " + "y" * 100_000, rating=4, max_new_tokens=TOKENS,
                         api_name="/review")
    assert len(out["selected"]) == 3, out["notes"]
    assert not any("no history" in note or "past review(s)" in note for note in out["notes"]), out["notes"]
    assert len(out["prompt"]) < 20_000
