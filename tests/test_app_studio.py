"""The demo's form, page and API in process, on the real bundled data with a tiny random LLM:
every form field reaches the engine, and the page's generate event takes exactly the form's fields."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from demo import api, events
from demo.page import build_demo
from demo.studio import FORM_FIELDS, Form, Studio

HISTORY = ("item_title,rating,review_title,review_text\n"
           "Snark SN1 Guitar Tuner,5,Fast,Clip-on tuner that grabs the note quickly.\n"
           "Fender picks,4,Good grip,Medium picks that do not slip.\n")
TABLE = [["Snark SN1 Guitar Tuner", 5, "Fast", "Grabs the note."], ["A capo", 3, "Stiff", "Buzzes a little."]]


@pytest.fixture(scope="module")
def studio(tiny_engine):
    return Studio(tiny_engine)


@pytest.fixture(scope="module")
def base(studio) -> Form:
    user = studio.user_ids[0]
    return Form(user_id=user, history=HISTORY, table=TABLE, max_new_tokens=2, **studio.held_out(user))


class Spy:
    """Records what the engine is asked to run, then runs it."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.stream = engine.stream

    def __call__(self, request, modes, personalization, sampling):
        self.calls.append(dict(request=request, modes=tuple(modes), personalization=personalization,
                               sampling=sampling))
        return self.stream(request, modes, personalization, sampling)


def engine_call(studio, monkeypatch, form: Form) -> dict:
    """What one press of Generate hands the engine, and the page's last value of each output."""
    spy = Spy(studio.engine)
    monkeypatch.setattr(studio.engine, "stream", spy)
    shown: dict = {}
    for changes in events.generate(studio, form):
        shown.update(changes)
    assert len(spy.calls) == 1, shown.get("status")
    return dict(spy.calls[0], shown=shown)


# field -> (the form it is changed in, the new value, where the engine (or the page) sees it)
CHANGES = {
    "source": ({}, "paste", lambda c: [r.text for r in c["request"].profile]),
    "user_id": ({}, 1, lambda c: [r.text for r in c["request"].profile]),
    "history": ({"source": "paste"}, HISTORY.replace("quickly", "slowly"), lambda c: c["request"].profile[0].text),
    "table": ({"source": "table"}, [TABLE[0]], lambda c: len(c["request"].profile)),
    "item_id": ({}, "B0002E2KPC", lambda c: c["request"].item.item_id),
    "item_title": ({}, "A brand-new tuner", lambda c: c["request"].item.title),
    "item_description": ({}, "Clips on.", lambda c: c["request"].item.description),
    "rating": ({}, 2, lambda c: c["request"].rating),
    "review_title": ({}, "Meh", lambda c: c["request"].review_title),
    "reference": ({}, "Another real review.", lambda c: c["shown"]["real"]),
    "k": ({}, 2, lambda c: c["personalization"].k),
    "history_rule": ({}, "recent", lambda c: c["personalization"].history_rule),
    "signals": ({}, ["his", "diff"], lambda c: c["modes"][1]),
    "baseline_mode": ({}, "nonperso", lambda c: c["modes"][0]),
    "strength": ({}, 0.5, lambda c: c["personalization"].strength),
    "peer_temperature": ({}, 3.0, lambda c: c["personalization"].peer_temperature),
    "temperature": ({}, 0.3, lambda c: c["sampling"].temperature),
    "top_p": ({}, 0.5, lambda c: c["sampling"].top_p),
    "max_new_tokens": ({}, 3, lambda c: c["sampling"].max_new_tokens),
    "end_at_user_length": ({}, True, lambda c: c["sampling"].end_at_user_length),
    "seed": ({}, 7, lambda c: c["sampling"].seed),
}


def test_every_form_field_is_checked_below():
    assert set(CHANGES) == set(FORM_FIELDS)


@pytest.mark.parametrize("field", list(CHANGES))
def test_every_form_field_reaches_the_engine(studio, base, monkeypatch, field):
    start, value, seen = CHANGES[field]
    if field == "user_id":
        value = studio.user_ids[value]
    before = replace(base, **start)
    after = replace(before, **{field: value})
    assert seen(engine_call(studio, monkeypatch, before)) != seen(engine_call(studio, monkeypatch, after))


def test_the_generate_event_takes_the_form_fields_in_order(studio):
    demo = build_demo(studio)
    generate = next(d for d in demo.fns.values() if d.api_name == "generate")
    assert [block.elem_id for block in generate.inputs] == FORM_FIELDS


def test_the_review_api_takes_the_form_fields_less_the_page_only_ones(studio):
    demo = build_demo(studio)
    info = demo.get_api_info()["named_endpoints"]
    names = [p["parameter_name"] for p in info["/review"]["parameters"]]
    assert names == [n for n in FORM_FIELDS if n not in ("source", "table")]
    compare = [p["parameter_name"] for p in info["/compare"]["parameters"]]
    assert compare[0] == "other_user_id" and "history" not in compare and "strength" in compare


def test_compare_two_reviewers_same_product_and_seed(studio):
    first, second = studio.user_ids[:2]
    out = api.compare(studio, other_user_id=second, user_id=first, max_new_tokens=3, seed=5)
    assert [r["user_id"] for r in out["reviews"]] == [first, second]
    assert out["item"]["item_id"] == studio.held_out(first)["item_id"]
    assert all(r["text"].strip() for r in out["reviews"])
    assert all(r["voice_check"]["candidates"] == 20 and 1 <= r["voice_check"]["rank"] <= 20 for r in out["reviews"])
    again = api.compare(studio, other_user_id=second, user_id=first, max_new_tokens=3, seed=5)
    assert again["reviews"] == out["reviews"]


WARM_UP_IMPORTS = """
import json, sys, threading

sys.path.insert(0, "tests")
from conftest import make_tiny_llm  # noqa: E402
from dep_engine.engine import DEPEngine, EngineConfig  # noqa: E402
from dep_engine.llm import load_tokenizer  # noqa: E402
from demo.studio import Studio  # noqa: E402

imported_by = {}
sys.addaudithook(lambda event, args: event == "import" and imported_by.setdefault(
    threading.current_thread().name, []).append(args[0]))
engine = DEPEngine(EngineConfig(llm="tiny-random-llama", adapter=None), progress=False,
                   llm=make_tiny_llm(load_tokenizer()))
studio = Studio(engine)
for thread in threading.enumerate():
    if "_warm_metrics" in thread.name:
        thread.join()
print(sorted({m for m in imported_by.get("MainThread", []) if m.split(".")[0] in ("nltk", "sklearn", "scipy")})[:3])
print(sorted({m for name, mods in imported_by.items() if name != "MainThread" for m in mods}))
print(json.dumps(studio.score("the strings sound bright", "the strings sound bright")))
"""


def test_the_metrics_warm_up_imports_nothing_in_its_thread():
    # The warm-up thread used to import nltk, which imports scikit-learn and SciPy, while the main thread
    # imported sentence-transformers (which imports sklearn.metrics): one of them could be handed a
    # half-made module, leaving nltk broken for the whole process (it failed CI that way). Now the
    # Studio imports the metrics' libraries itself; its thread only reads WordNet and computes.
    run = subprocess.run([sys.executable, "-c", WARM_UP_IMPORTS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    main_imports, thread_imports, scores = run.stdout.strip().splitlines()[-3:]
    assert main_imports != "[]"  # the libraries were imported, in the thread that built the Studio
    assert thread_imports == "[]"
    assert json.loads(scores)["rouge1"] == 1.0 and json.loads(scores)["meteor"] > 0.9  # and they work
