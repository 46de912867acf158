"""The real app (`python app.py`, on a free local port) driven through its API with gradio_client."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import app_url  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

TOKENS = 16  # generation on 2 CPU cores is slow; a few tokens prove the path

HISTORY_CSV = """item_title,rating,review_title,review_text
Snark SN1 Guitar Tuner,5,Fast and accurate,"Clip-on tuner that grabs the note quickly, bright display, works on stage."
"D'Addario EXL110 Nickel Wound Electric Guitar Strings, Regular Light, 10-46",4,Default set,"Bright, then warm."
My grandfather's homemade capo,3,Quirky,"A wooden capo nobody else owns; it buzzes on the G string but has character."
"""


@pytest.fixture(scope="module")
def client():
    return gradio_client.Client(app_url(), verbose=False)


def test_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/review", "/compare", "/users", "/search_items"} <= set(endpoints)


def test_users_and_catalog_search(client):
    users = client.predict(limit=3, api_name="/users")
    assert len(users) == 3
    assert users[0]["reviews"] >= users[1]["reviews"] >= users[2]["reviews"] >= 5
    assert users[0]["user_id"] in users[0]["summary"] and users[0]["held_out_title"]
    items = client.predict(query="snark tuner", limit=5, api_name="/search_items")
    assert items and all("snark" in i["title"].lower() for i in items)


def test_bundled_user_returns_two_reviews_with_evidence(client):
    user = client.predict(limit=1, api_name="/users")[0]
    out = client.predict(user_id=user["user_id"], max_new_tokens=TOKENS, api_name="/review")
    assert out["baseline"].strip() and out["personalized"].strip()
    assert out["mode"] == "dep" and out["baseline_mode"] == "generic"
    assert out["item"]["item_id"] == user["held_out_item"]
    assert out["reference"], "the held-out real review comes back for comparison"
    for side in ("baseline", "personalized"):
        assert 0 <= out["metrics"][side]["rouge1"] <= 1
    assert 1 <= len(out["selected"]) <= 4
    for selected in out["selected"]:
        assert selected["peers"], "every selected review has peers"
        assert abs(sum(p["weight"] for p in selected["peers"]) - 1) < 1e-3
    assert out["timings"]["generation"] > 0 and 1 <= out["new_tokens"] <= TOKENS
    assert isinstance(out["notes"], list)
    past_titles = {s["item_title"] for s in out["selected"]}
    for side in ("baseline", "personalized"):
        check = out["voice_check"][side]
        assert check["candidates"] == 20 and 1 <= check["rank"] <= 20
        assert check["drifted_to"] is None or check["drifted_to"] in past_titles


def test_pasted_history_of_an_unknown_user(client):
    out = client.predict(history=HISTORY_CSV, item_title="Snark SN-5 Tuner for Guitar, Bass and Violin",
                         rating=4, review_title="Handy tuner", k=3, signals=["texts"],
                         max_new_tokens=TOKENS, api_name="/review")
    assert out["baseline"].strip() and out["personalized"].strip()
    assert out["mode"] == "rag"
    assert out["reference"] is None and out["metrics"] is None
    titles = {s["item_title"] for s in out["selected"]}
    assert "Snark SN1 Guitar Tuner" in titles  # a catalog title: its peers come from the pool
    assert 1 <= out["voice_check"]["personalized"]["rank"] <= 20  # the visitor among 19 bundled reviewers


BAD_INPUTS = [
    pytest.param(dict(history="just some words, not a history"), "header lacks", id="not-json-not-csv"),
    pytest.param(dict(history='{"asin": "B003VWJ2K8", "overall": 5, "reviewText": "fine"}\n{"asin": ',
                      item_title="x", rating=5), "line 2: malformed JSON", id="malformed-jsonl"),
    pytest.param(dict(history='{"overall": 5, "reviewText": "no item"}', item_title="x", rating=5),
                 "missing item id", id="missing-field"),
    pytest.param(dict(history="item_title,rating,review_title,review_text\nA pedal,9,t,good\n",
                      item_title="x", rating=5), "outside 1-5", id="history-rating-out-of-range"),
    pytest.param(dict(user_id="@first", rating=7), "target rating", id="target-rating-out-of-range"),
    pytest.param(dict(history="item_title,rating,review_title,review_text\n"
                      + "A pedal,4,t,good pedal\n" * 501, item_title="x", rating=5),
                 "more than the limit", id="huge-history"),
    pytest.param(dict(), "give either user_id", id="no-history"),
    pytest.param(dict(user_id="NOBODY"), "not one of the bundled users", id="unknown-user"),
    pytest.param(dict(user_id="@first", signals=["texts", "his"]), "has no mode", id="signals-without-mode"),
    pytest.param(dict(user_id="@first", item_id="NOT-AN-ITEM"), "not in the catalog", id="unknown-item"),
    pytest.param(dict(user_id="@first", k=99), "k must be within", id="k-out-of-range"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS)
def test_bad_input_gets_a_clear_error(client, kwargs, message):
    if kwargs.get("user_id") == "@first":
        kwargs = dict(kwargs, user_id=client.predict(limit=1, api_name="/users")[0]["user_id"])
    with pytest.raises(AppError) as caught:
        client.predict(max_new_tokens=TOKENS, api_name="/review", **kwargs)
    text = str(caught.value)
    assert message in text
    assert "Traceback" not in text


def test_the_api_writes_what_the_engine_writes_for_the_same_request_and_seed(client):
    """The app adds nothing to a generation: /review's texts are the engine's own, from another process."""
    from dep_engine import DEPEngine, PersonalizationSettings, SamplingSettings

    user = client.predict(limit=2, api_name="/users")[1]["user_id"]
    out = client.predict(user_id=user, max_new_tokens=TOKENS, seed=11, api_name="/review")
    engine = DEPEngine(progress=False)
    result = engine.generate(engine.user_request(user), ("generic", "dep"), PersonalizationSettings(),
                             SamplingSettings(max_new_tokens=TOKENS, seed=11))
    assert (out["baseline"], out["personalized"]) == (result.texts["generic"], result.texts["dep"])
    assert out["prompt"] == result.prompts["dep"], "the prompt shown is the one the model read"
