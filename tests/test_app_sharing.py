"""A public demo that keeps nothing and cannot be hogged, against a real `python app.py`.

Its own server, with a short time budget per generation (BUDGET s) so that "long" requests are
quick to test, and its own Gradio temp folder and log, so that what it keeps can be read back.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import OUTPUT, launch, stop_process  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.utils import Status  # noqa: E402

BUDGET = 3.0               # seconds per generation on this server, prompt included: about 80 tokens here
LONG = 400                 # the most new tokens the page offers: far more than BUDGET allows on a CPU
MARKER = "zqxjvortex"      # a word no model or data holds: any copy of it was kept from a request
HISTORY = ("item_title,rating,review_title,review_text\n"
           f"Snark SN1 Guitar Tuner,5,{MARKER} title,Clip-on tuner {MARKER} that grabs the note quickly.\n"
           f"Fender picks {MARKER},4,Good grip,Medium picks that do not slip, {MARKER}.\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    temp = tmp_path_factory.mktemp("gradio-temp")
    OUTPUT.mkdir(exist_ok=True)
    log = OUTPUT / "app-sharing-server.log"
    process, url = launch(log, env={"GRADIO_TEMP_DIR": str(temp)}, args=("--time-budget", str(BUDGET)))
    warm = gradio_client.Client(url, verbose=False)  # the first generation also builds the decoding copy
    warm.predict(user_id=warm.predict(limit=1, api_name="/users")[0]["user_id"], max_new_tokens=4, api_name="/review")
    yield dict(url=url, log=log, temp=temp)
    stop_process(process)


def client(server, **kwargs):
    return gradio_client.Client(server["url"], verbose=False, **kwargs)


def user_ids(server, n: int) -> list[str]:
    return [u["user_id"] for u in client(server).predict(limit=n, api_name="/users")]


def test_a_request_over_the_budget_stops_in_time_with_a_note(server):
    """A fast machine may finish a short review inside the budget: such requests must carry no note,
    and the test goes on to the next user until one runs into the budget."""
    for user in user_ids(server, 4):
        began = time.perf_counter()
        out = client(server).predict(user_id=user, max_new_tokens=LONG, api_name="/review")
        seconds = time.perf_counter() - began
        note = [n for n in out["notes"] if "time budget" in n]
        timings = out["timings"]
        after_first_token = timings["generation"] - timings["first_token"]
        print(f"\nrequest with budget {BUDGET:g} s: {seconds:.1f} s in all; first token after "
              f"{timings['first_token']:.1f} s (prompt), then {after_first_token:.1f} s of decoding, "
              f"{out['new_tokens']} tokens, budget note: {bool(note)}")
        if note:
            break
        assert timings["generation"] < BUDGET, "a request that ended on its own ended inside the budget"
    assert note, "four users' reviews all ended inside the budget: raise LONG or lower BUDGET"
    assert out["new_tokens"] < LONG and out["personalized"].strip()
    assert after_first_token < BUDGET + 1.0, "decoding stops at the budget"
    assert seconds < BUDGET + timings["first_token"] + 3.0, "and the answer comes soon after"


def wait_until_queued(jobs: list) -> None:
    """`submit` joins the queue in a thread: wait until every job is in the queue (or done)."""
    deadline = time.monotonic() + 60
    while any(job.status().code in (Status.STARTING, Status.JOINING_QUEUE) for job in jobs):
        assert time.monotonic() < deadline, "the requests did not reach the queue in 60 s"
        time.sleep(0.05)


def timed(call, **kwargs) -> tuple[dict, float]:
    began = time.perf_counter()
    out = call(**kwargs)
    return out, time.perf_counter() - began


def test_a_flooding_client_does_not_hold_up_another(server):
    """A client sends ten long requests at once; another visitor's short request, sent once the first
    long one runs, waits for at most that one (its turn comes before the flood's second)."""
    users = user_ids(server, 12)
    _, long_alone = timed(client(server).predict, user_id=users[10], max_new_tokens=LONG, api_name="/review")
    _, short_alone = timed(client(server).predict, user_id=users[11], max_new_tokens=16, api_name="/review")
    flood = client(server)
    jobs = [flood.submit(user_id=u, max_new_tokens=LONG, seed=n, api_name="/review") for n, u in enumerate(users[:10])]
    wait_until_queued(jobs)
    began = time.perf_counter()
    while sum(job.done() for job in jobs) < 8 and time.perf_counter() - began < 10:  # they join in any order
        time.sleep(0.05)
    refusals_took = time.perf_counter() - began
    visitor, waited = timed(client(server).predict, user_id=users[11], max_new_tokens=16, api_name="/review")
    served, refused = [], []
    for job in jobs:
        try:
            served.append(job.result())
        except Exception as err:  # noqa: BLE001 - the refusals are what this test counts
            refused.append(str(err))
    print(f"\nalone: a long request {long_alone:.1f} s, the visitor's 16-token request {short_alone:.1f} s; "
          f"during a flood of 10 long requests the visitor's took {waited:.1f} s; {len(served)} of the flood "
          f"served, {len(refused)} refused within {refusals_took:.1f} s")
    assert visitor["personalized"].strip()
    assert len(served) == 2 and len(refused) == 8 and refusals_took < 5.0, "the other 8 are refused at once"
    assert all("queued or running" in message for message in refused)
    one_long = max(long_alone, BUDGET + 1.0)  # a flood request may run to the budget where this one ended early
    assert waited < one_long + short_alone + 5.0, "the visitor waits for one long request at most"


def test_the_forwarded_address_counts_as_one_client(server):
    """On a Space every visitor comes through a proxy: two sessions from one address share the limit."""
    users = user_ids(server, 3)
    headers = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    first, second = client(server, headers=headers), client(server, headers=headers)
    jobs = [first.submit(user_id=u, max_new_tokens=LONG, api_name="/review") for u in users[:2]]
    wait_until_queued(jobs)
    with pytest.raises(Exception, match="queued or running"):
        second.predict(user_id=users[2], max_new_tokens=8, api_name="/review")
    assert all(job.result()["personalized"] for job in jobs)


@pytest.mark.parametrize("field, value", [("max_new_tokens", 401), ("k", 17), ("strength", 2.5),
                                          ("temperature", 2.5), ("top_p", 0.01), ("peer_temperature", 20),
                                          ("seed", -1)])
def test_the_api_refuses_what_the_page_cannot_ask_for(server, field, value):
    with pytest.raises(Exception) as caught:
        client(server).predict(user_id="A2EZWZ8MBEDOLN", api_name="/review", **{field: value})
    assert f"{field} must be within" in str(caught.value)


def test_the_log_holds_no_text_of_a_pasted_history(server):
    out = client(server).predict(history=HISTORY, item_title=f"Tuner {MARKER}", rating=4,
                                 review_title=f"Handy {MARKER}", reference=f"Real {MARKER}", max_new_tokens=8,
                                 api_name="/review")
    assert out["personalized"].strip()
    time.sleep(0.5)
    log = server["log"].read_text()
    assert "api: source=paste modes=generic+dep reviews=2 k=4 tokens=" in log
    assert MARKER not in log
    assert "faiss.loader" not in log, "faiss's 'could not load AVX512' notice is not logged as if it failed"


def test_an_upload_is_deleted_once_read(server, tmp_path):
    """Through the page in Chromium: upload, generate; nothing holding the upload's text is left in
    Gradio's temp folder (GRADIO_TEMP_DIR) or its cache."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (bash setup.sh --dev)")
    upload = tmp_path / "my_reviews.csv"
    upload.write_text(HISTORY)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(server["url"])
        page.get_by_label("Paste or upload reviews").check()
        page.locator("#paste-group input[type=file]").set_input_files(str(upload))
        sync_api.expect(page.locator("#history textarea")).to_have_value(HISTORY, timeout=30_000)
        page.locator("#item_title textarea").fill("A clip-on tuner")
        page.locator("#generate").click()
        sync_api.expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
        browser.close()
    kept = [path for path in server["temp"].rglob("*") if path.is_file() and MARKER.encode() in path.read_bytes()]
    assert kept == []
