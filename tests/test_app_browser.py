"""The real app in a real headless browser: Debian's chromium driven by Playwright.

Install: `bash setup.sh --dev` (pip's playwright package plus `apt-get install chromium`; do not run
`playwright install`). The screenshot of the page after generating is saved as
test-output/app-browser.png (and in pytest's tmp_path).
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import OUTPUT, app_url, launch, stop_process  # noqa: E402

from dep_engine.data import by_user, load_dataset  # noqa: E402
from dep_engine.paths import BUNDLED_GIFT_CARDS  # noqa: E402

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (bash setup.sh --dev)", allow_module_level=True)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
GENERATION_TIMEOUT_MS = 420_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page of the shared app, at a laptop's size."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(app_url())
    page.wait_for_selector("#generate")
    yield page
    page.close()


def set_tokens(page, tokens: int) -> None:
    box = page.locator("#max_new_tokens input[type=number]")
    box.fill(str(tokens))
    box.press("Enter")


def generate_and_wait(page) -> None:
    page.locator("#generate").click()
    page.wait_for_function(
        """() => {
            const text = id => (document.querySelector(`#${id} textarea`) || {}).value || "";
            const status = document.querySelector('#status').innerText;
            return (text('baseline').trim() && text('personalized').trim() && status.includes('Done'))
                || status.includes('Could not generate');
        }""", timeout=GENERATION_TIMEOUT_MS)
    assert "Could not generate" not in page.locator("#status").inner_text()


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
    set_tokens(page, 16)
    generate_and_wait(page)
    assert page.locator("#real textarea").input_value().strip(), "the real review is shown for comparison"
    assert "another pool" not in page.locator("#status").inner_text()  # the adapter's own pool
    sync_api.expect(page.locator("#metrics")).to_contain_text("ROUGE-1")
    sync_api.expect(page.locator("#voice")).to_contain_text("Whose voice is it?")
    sync_api.expect(page.locator("#voice")).to_contain_text("of 20")
    sync_api.expect(page.locator("#selected")).to_contain_text("relevance")
    sync_api.expect(page.locator("#max_new_tokens")).to_contain_text("on this machine:")  # the measured rate
    check_evidence_tables(page, k=4)
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


def check_evidence_tables(page, k: int) -> None:
    """All K past reviews in view without scrolling inside the table, and one-line headers."""
    page.get_by_role("tab", name="Past reviews").click()
    table = page.locator("#selected")
    sync_api.expect(table.locator("[role=row]")).to_have_count(k + 1)  # the header row and K rows
    clipped = page.evaluate("""() => [document.querySelector('#selected'), ...document.querySelectorAll('#selected *')]
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY) && e.scrollHeight > e.clientHeight + 2)
        .length""")
    assert clipped == 0, "no past review hides in a scroll box"
    heights = page.evaluate("() => [...document.querySelectorAll('#selected th.header-cell')].map(h => h.offsetHeight)")
    assert len(heights) == 7 and max(heights) < 45, f"a header wraps onto a second line: {heights}"
    clipped = page.evaluate("""() => [...document.querySelectorAll('#selected th.header-cell')]
        .filter(h => h.scrollWidth > h.clientWidth + 1).map(h => h.innerText)""")
    assert clipped == [], f"headers cut short: {clipped}"
    page.get_by_role("tab", name="SAE codes").click()
    sync_api.expect(page.locator("#sae-help")).to_contain_text("How to read it")
    sync_api.expect(page.locator("#sae-plot img")).to_have_count(1, timeout=15_000)  # drawn, though updated hidden


def test_generate_is_on_the_first_screen(page):
    box = page.locator("#generate").bounding_box()
    assert box and box["y"] >= 0 and box["y"] + box["height"] <= 1000, f"Generate sits at {box}"
    on_top = page.evaluate("""() => { const r = document.querySelector('#generate').getBoundingClientRect();
        const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        return !!hit && !!hit.closest('#generate'); }""")
    assert on_top, "nothing covers the Generate button"
    page.mouse.wheel(0, 1500)
    page.wait_for_timeout(300)
    assert page.locator("#generate").bounding_box()["y"] + 40 <= 1000, "it stays in view while scrolling"


def test_the_honest_note_is_short_and_its_numbers_open_below_it(page):
    """The figures under the accordion are the shipped evaluation's (evaluation/pooled.json), not typed in."""
    import json

    from dep_engine.paths import BUNDLED_ADAPTER

    shipped = json.loads((BUNDLED_ADAPTER / "evaluation" / "pooled.json").read_text())
    rouge = {m: shipped["methods"][m]["metrics"]["rouge1"]["mean"] for m in ("dep", "generic")}
    sync_api.expect(page.locator("body")).to_contain_text("Honest note")
    numbers = page.get_by_text(f"On {shipped['users']} held-out users")
    sync_api.expect(numbers).to_be_hidden()  # the form starts on the first screen, the figures a click away
    page.get_by_role("button", name="What the measurements say").click()
    sync_api.expect(numbers).to_be_visible()
    sync_api.expect(numbers).to_contain_text(
        f"ROUGE-1 {rouge['dep']:.3f} personalized against {rouge['generic']:.3f} generic")


def test_each_outputs_copy_button_can_be_clicked_past_its_long_label(page):
    for output in ("baseline", "personalized"):
        uncovered = page.evaluate("""id => { const button = document.querySelector(`#${id} button[aria-label=Copy]`);
            const r = button.getBoundingClientRect();
            const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return !!hit && button.contains(hit); }""", output)
        assert uncovered, f"the {output} label covers its copy button"


def test_clicking_the_reviewer_picker_lets_one_type_a_search(page):
    box = page.locator("#user_id input")
    assert "reviews" in box.input_value(), "the picker shows the long label of the chosen reviewer"
    box.click()
    box.press_sequentially("A2EZWZ", delay=30)
    assert box.input_value() == "A2EZWZ", "typing replaces the label instead of going into it"
    sync_api.expect(page.locator("#user_id [role=option]").filter(has_text="A2EZWZ8MBEDOLN")).to_have_count(1)


def test_his_diff_soft_tokens_and_the_sae_are_explained_where_they_appear(page):
    signals = page.locator("#signals")
    for words in ("his", "diff", "soft tokens"):
        sync_api.expect(signals).to_contain_text(words)
    sync_api.expect(signals).to_contain_text("where words would be")
    page.get_by_role("tab", name="SAE codes").click()
    sync_api.expect(page.locator("#sae-help")).to_contain_text("sparse autoencoder (SAE)")


def open_reference(page) -> None:
    page.get_by_text("Real review, to compare against").click()
    page.locator("#reference textarea").wait_for()


def test_a_pasted_history_does_not_keep_the_reviewers_product_or_real_review(page):
    open_reference(page)
    assert page.locator("#reference textarea").input_value().strip(), "a bundled reviewer's real review"
    page.get_by_label("Paste or upload reviews").check()
    for field in ("item_title", "review_title", "reference"):
        sync_api.expect(page.locator(f"#{field} textarea")).to_have_value("", timeout=10_000)
    sync_api.expect(page.locator("#item_id input")).to_have_value("")
    page.get_by_label("A bundled reviewer").check()
    sync_api.expect(page.locator("#item_title textarea")).not_to_have_value("", timeout=10_000)
    sync_api.expect(page.locator("#reference textarea")).not_to_have_value("")

    page.get_by_label("Paste or upload reviews").check()
    sync_api.expect(page.locator("#reference textarea")).to_have_value("", timeout=10_000)
    page.locator("#history textarea").fill(PASTED)
    page.locator("#item_title textarea").fill("A clip-on tuner")
    set_tokens(page, 8)
    generate_and_wait(page)
    assert not page.locator("#real").is_visible(), "no real review: it would belong to someone else"
    assert not page.locator("#metrics").is_visible()


def test_a_typed_title_drops_the_catalog_pick_and_its_real_review(page):
    open_reference(page)
    title = page.locator("#item_title textarea")
    title.click()
    title.press("Control+a")
    title.press_sequentially("Some other product", delay=20)
    sync_api.expect(page.locator("#reference textarea")).to_have_value("", timeout=10_000)
    sync_api.expect(page.locator("#item_id input")).to_have_value("")


PASTED = ("item_title,rating,review_title,review_text\n"
          "Snark SN1 Guitar Tuner,5,Fast,Clip-on tuner that grabs the note quickly.\n"
          "Fender picks,4,Good grip,Medium picks that do not slip.\n")

ATTACKS = ["<script>window.__dep_pwned = 'script'</script>", "<img src=x onerror='window.__dep_pwned = 1'>",
           "<svg onload='window.__dep_pwned = 2'></svg>", "<iframe srcdoc='<script>parent.__dep_pwned = 3</script>'>"]


def test_pasted_html_and_scripts_execute_nowhere(page):
    """Script and event-handler texts in a pasted history and the product are shown as text in the
    outputs, evidence tables, highlighted words and prompt, and never run."""
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    history = "item_title,rating,review_title,review_text\n" + "".join(
        f'"Snark SN1 Guitar Tuner {attack}",5,"Fast {attack}","Grabs the note quickly, {attack}, and stays on."\n'
        for attack in ATTACKS) + "Fender picks <b onmouseover=alert(1)>bold</b>,4,Grip,Picks <img src=x onerror=alert(2)>\n"
    page.get_by_label("Paste or upload reviews").check()
    page.locator("#history textarea").fill(history)
    page.locator("#item_title textarea").fill(f"Tuner {ATTACKS[1]}")
    page.locator("#review_title textarea").fill(ATTACKS[0])
    set_tokens(page, 8)
    generate_and_wait(page)
    for tab in ("Past reviews", "Peers", "SAE codes", "Distinctive words", "Prompt", "Timings"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(300)
        page.mouse.move(700, 600)
    page.get_by_role("tab", name="Prompt").click()
    assert ATTACKS[0] in page.locator("#prompt textarea").input_value(), "the prompt shows the title as text"
    page.get_by_role("tab", name="Past reviews").click()
    sync_api.expect(page.locator("#selected")).to_contain_text("onerror=", timeout=10_000)
    page.get_by_role("tab", name="Distinctive words").click()
    assert "<svg" in page.locator("#terms-text").inner_text() or "<img" in page.locator("#terms-text").inner_text()
    assert page.evaluate("() => window.__dep_pwned === undefined"), "a pasted script ran"
    assert dialogs == [], f"a pasted handler opened a dialog: {dialogs}"
    injected = "#outputs img:not(#sae-plot img), #outputs script, #outputs iframe, #outputs svg[onload]"
    assert page.locator(injected).count() == 0, "a pasted tag became an element"


def test_compare_two_reviewers_side_by_side(page):
    set_tokens(page, 8)
    page.get_by_text("Compare two reviewers: the same product, settings and seed").click()
    page.locator("#compare").click()
    sync_api.expect(page.locator("#compare-status")).to_contain_text("Done", timeout=GENERATION_TIMEOUT_MS)
    status = page.locator("#compare-status").inner_text()
    assert "same seed 0" in status and status.count("bundled user") == 2
    assert "Whose voice is it?" in status and status.count(" of 20") == 2
    first, second = (page.locator(f"#{side} textarea").input_value() for side in ("first-review", "second-review"))
    assert first.strip() and second.strip()


@pytest.fixture(scope="module")
def gift_cards_url():
    """A second app on the second bundled domain (`python app.py --data ...`), for this module only."""
    OUTPUT.mkdir(exist_ok=True)
    process, url = launch(OUTPUT / "app-server-gift-cards.log", args=("--data", str(BUNDLED_GIFT_CARDS)))
    yield url
    stop_process(process)


def test_another_domain_is_served_as_itself(browser, gift_cards_url):
    data = load_dataset(BUNDLED_GIFT_CARDS)
    users = by_user(data.reviews)
    ranked = sorted(users, key=lambda u: (-len(users[u]), u))
    most, second = ranked[:2]
    described = next(u for u in ranked if data.items[users[u][-1].item_id].description)  # 145 of 148 items
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(gift_cards_url)
    page.wait_for_selector("#generate")
    # the picker names this pool, and the Python example uses its reviewers
    sync_api.expect(page.locator("#user_id")).to_contain_text(f"{len(users)} Amazon reviewers of gift cards")
    assert "musical instruments" not in page.locator("body").inner_text()
    sync_api.expect(page.get_by_text("Use it from Python").locator("..")).to_contain_text(
        f'user_id="{most}", other_user_id="{second}"')
    # the pasted examples' products are not in this catalog: each still fills the form, with no error
    for label in ("A guitarist's CSV → a clip-on tuner", "Amazon 2023 JSONL, a critical reviewer → a strap"):
        page.get_by_text(label).click()
        sync_api.expect(page.locator("#history textarea")).not_to_have_value("", timeout=15_000)
        sync_api.expect(page.locator("#item_title textarea")).not_to_have_value("")
        page.wait_for_timeout(1_000)
        assert not page.locator(".toast-body").count(), page.locator(".toast-body").all_inner_texts()
    # a bundled reviewer's product comes with its catalog description, and the prompt shows it
    page.get_by_label("A bundled reviewer").check()
    choose_user(page, described)
    sync_api.expect(page.locator("#item_description textarea")).not_to_have_value("", timeout=15_000)
    set_tokens(page, 8)
    generate_and_wait(page)
    # generic's average reviewer is the musical-instruments training pool's: the status says so
    sync_api.expect(page.locator("#status")).to_contain_text("the generic reviewer is the average of the reviewers "
                                                             "the adapter was trained on, another pool than this one")
    page.get_by_role("tab", name="Prompt").click()
    sync_api.expect(page.locator("#prompt textarea")).to_have_value(re.compile(r"\[Item Description\]: \w"))
    page.screenshot(path=str(OUTPUT / "app-browser-gift-cards.png"), full_page=False)
    page.close()
