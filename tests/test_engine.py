"""DEPEngine's public steps on the real bundled data (tiny random LLM): requests, prepare, prompts read."""
import pytest

from dep_engine import DataError, Item, PersonalizationSettings, SamplingSettings
from dep_engine.data import Review

SHORT = SamplingSettings(max_new_tokens=4)


def _user(engine):
    return next(u for u, h in engine.users.items() if len(h) > 8)


def test_user_request_holds_out_the_reviewed_item_and_keeps_the_rest(tiny_engine):
    user = _user(tiny_engine)
    history = tiny_engine.users[user]
    latest = tiny_engine.user_request(user)
    assert latest.reference == history[-1].text and latest.cutoff == history[-1].timestamp
    assert history[-1] not in latest.profile and latest.profile
    middle = tiny_engine.user_request(user, history[3].item_id)
    assert middle.item.item_id == history[3].item_id and all(r.timestamp <= history[3].timestamp
                                                            for r in middle.profile)
    new = tiny_engine.user_request(user, Item("new", "A brand new kazoo"), rating=3.0, review_title="Buzz")
    assert new.profile == history and (new.rating, new.review_title, new.cutoff) == (3.0, "Buzz", None)
    with pytest.raises(DataError, match="unknown user"):
        tiny_engine.user_request("nobody")


def test_history_request_reads_a_pasted_csv(tiny_engine):
    csv = ("item_title,rating,review_title,review_text\n"
           "Guitar strings,5,Bright,These strings sound bright and last for months.\n"
           "Capo,2,Slips,The capo slips off the neck during songs.\n")
    request = tiny_engine.history_request(csv, Item("t", "Guitar tuner"), 4.0, "Handy")
    assert [r.rating for r in request.profile] == [5.0, 2.0] and len(request.extra_items) == 2
    result = tiny_engine.generate(request, ("generic", "dep"), sampling=SHORT)
    assert set(result.texts) == {"generic", "dep"} and result.context.k == 2


def test_prepare_returns_the_prompts_the_model_reads(tiny_engine):
    long_text = " ".join(f"word{j}" for j in range(300))
    user = _user(tiny_engine)
    profile = [Review(user, f"long{i}", 4.0, "t", f"{i} {long_text}", i) for i in range(16)]
    request = tiny_engine.user_request(user)
    request.profile, request.cutoff = profile, None
    settings = PersonalizationSettings(k=16, words_per_review=200)
    prepared = tiny_engine.prepare(request, ("dep",), settings, SamplingSettings(max_new_tokens=400))
    assert any("prompt shortened" in note for note in prepared.notes)
    shown = prepared.prompts["dep"]
    assert "word150" not in shown  # the shortened prompt, not the requested 200 words per review
    assert shown.count("[HIS soft token") == prepared.context.k
    assert set(prepared.timings) >= {"retrieval_and_differences", "prompt", "adapter"}
    result = tiny_engine.generate(request, ("dep",), settings, SamplingSettings(max_new_tokens=400, time_budget_s=5))
    assert result.prompts["dep"] == shown


def test_by_default_each_past_review_shows_its_first_120_words(tiny_engine):
    """Round 27's default: words 0-119 of a long past review reach the prompt, word 120 does not."""
    user = _user(tiny_engine)
    request = tiny_engine.user_request(user)
    request.profile = [Review(user, "long", 4.0, "t", " ".join(f"word{j}" for j in range(300)), 0)]
    request.cutoff = None
    shown = tiny_engine.prepare(request, ("dep",), sampling=SHORT).prompts["dep"]
    assert "word0 " in shown and "word119" in shown and "word120" not in shown


def test_settings_are_checked_when_built():
    with pytest.raises(ValueError, match="strength must be within 0-2"):
        PersonalizationSettings(strength=3)
    with pytest.raises(ValueError, match="max_new_tokens must be within 1-400"):
        SamplingSettings(max_new_tokens=1024)
    with pytest.raises(ValueError, match="history_rule must be one of"):
        PersonalizationSettings(history_rule="random")
    with pytest.raises(ValueError, match="k must be a whole number"):
        PersonalizationSettings(k=2.5)


def test_a_failed_4bit_load_falls_back_to_bf16_with_a_note():
    """ZeroGPU documents no 4-bit bitsandbytes; where NF4 cannot load, the LLM loads in bf16 and says so."""
    import torch

    from dep_engine.llm import load_llm

    if torch.cuda.is_available():
        pytest.skip("here 4-bit loading may work")
    llm = load_llm(device="cpu", four_bit=True, dtype=torch.bfloat16)
    assert llm.notes and llm.notes[0].startswith("4-bit NF4 loading failed") and "bfloat16" in llm.notes[0]
    assert llm.dtype == torch.bfloat16 and not getattr(llm.model, "is_loaded_in_4bit", False)
