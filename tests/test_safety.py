"""The content filter (dep_engine/safety.py): the word list as read, the decoding mask on SmolLM2's real
tokenizer, the check after decoding, and `evaluate` with the bundled model, the filter on and off."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from dep_engine import safety
from dep_engine.generation import Output, logits_processors

# Words the bundled model writes in almost every review: listed for a test, they show the filter at work
# on real decoding (the real list's words are rare enough that a few users may never meet one).
COMMON = ("great", "good", "guitar", "sound", "strings", "quality", "easy", "love", "product", "price")


@pytest.fixture
def common_words_listed(tmp_path, monkeypatch):
    """The real list plus COMMON, loaded by the module's own code from a copy of the list file."""
    words = tmp_path / "profanity_wordlist.txt"
    words.write_text(safety.wordlist_path().read_text(encoding="utf-8") + "\n".join(COMMON) + "\n", encoding="utf-8")
    monkeypatch.setattr(safety, "wordlist_path", lambda: words)
    for cached in (safety.listed_words, safety._pattern, safety.word_mask):
        cached.cache_clear()
    yield
    for cached in (safety.listed_words, safety._pattern, safety.word_mask):
        cached.cache_clear()


def test_the_list_is_read_as_text_without_the_allowed_review_words():
    words = set(safety.listed_words())
    assert len(words) > 1000 and "slut" in words and "sluts" in words and "bull shit" in words
    assert not words & safety.ALLOWED
    assert not {"knob", "pot", "screw", "fat", "muff", "crap", "lens"} & words


@pytest.mark.parametrize("text, shown, count", [
    ("Meh, that one's just a slut. It saves your life.", f"Meh, that one's just a {safety.WITHHELD}. It saves your life.", 1),
    ("SLUTS and Shit, and bull   shit.", f"{safety.WITHHELD} and {safety.WITHHELD}, and {safety.WITHHELD}.", 3),
    ("A fat tone: turn the pot knob, and it screams. Crap case though.", None, 0),
    ("Glass, assign, class, Scunthorpe, cumbersome, Japan, title.", None, 0),
])
def test_withhold_replaces_whole_listed_words_only(text, shown, count):
    assert safety.withhold(text) == (shown or text, count)
    assert "[" not in safety.WITHHELD, "hygiene cuts a text at a bracket"


def test_the_mask_bans_the_last_token_of_every_listed_word_as_the_tokenizer_writes_it(smol_tokenizer):
    """For every listed word, as a word of a sentence in lower case, capitalised and upper case: at the
    step that would complete it, its completing token is banned; the tokens before it are not."""
    mask = safety.word_mask(smol_tokenizer)
    missed = []
    for word in safety.listed_words():
        for form in (word, word.capitalize(), word.upper()):
            for text in (f"It is {form}", f"{form}", f'He said "{form}'):
                ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids[-1] not in set(torch.cat(mask.banned(ids[:-1])).tolist()):
                    missed.append(text)
    assert not missed, f"{len(missed)} not masked, e.g. {missed[:10]}"


def test_the_mask_leaves_ordinary_reviews_alone(smol_tokenizer, dataset):
    """Real reviews without a listed word, token by token: no token they are made of is ever banned
    (the mask costs ordinary text nothing)."""
    mask = safety.word_mask(smol_tokenizer)
    texts = [r.text for r in random.Random(0).sample(dataset.reviews, 300) if not safety.find(r.text)][:200]
    blocked = []
    for text in texts:
        ids = smol_tokenizer(" ".join(text.split()[:80]), add_special_tokens=False)["input_ids"]
        for step in range(len(ids)):
            if ids[step] in set(torch.cat(mask.banned(ids[:step])).tolist()):
                blocked.append(smol_tokenizer.decode(ids[max(0, step - 4):step + 1]))
    assert not blocked, blocked[:10]


def test_the_processors_follow_the_setting(tiny_llm):
    assert any(isinstance(p, safety.WordMask) for p in logits_processors(tiny_llm, True))
    assert not any(isinstance(p, safety.WordMask) for p in logits_processors(tiny_llm, False))


def test_a_result_withholds_what_slipped_through_and_says_so():
    from dep_engine.engine import DEPEngine, Prepared
    from dep_engine.store import PersonalContext

    context = PersonalContext([], np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), [])
    prepared = Prepared(context, {"generic": "", "dep": ""}, [], [], {})
    raw = [Output("Meh, that one's just a slut."), Output("A fine tuner.")]
    on, = DEPEngine._results([prepared], [["generic", "dep"]], raw, {}, 8, final=True)
    assert on.texts == {"generic": f"Meh, that one's just a {safety.WITHHELD}.", "dep": "A fine tuner."}
    assert any("generic: a word was withheld" in note for note in on.notes), on.notes
    off, = DEPEngine._results([prepared], [["generic", "dep"]], raw, {}, 8, final=True, content_filter=False)
    assert off.texts["generic"] == "Meh, that one's just a slut." and not any("withheld" in n for n in off.notes)


@pytest.fixture(scope="module")
def bundled_engine():
    from dep_engine import DEPEngine

    return DEPEngine(progress=False)


def _evaluate(engine, out, content_filter: bool, generate_only: bool) -> list[dict]:
    from dep_engine import PersonalizationSettings, SamplingSettings
    from dep_engine.evaluation import EvalSettings, evaluate, read_generations

    settings = EvalSettings(methods=["nonperso", "generic", "dep"], out=str(out), limit=3, batch_users=3,
                            generate_only=generate_only,  # short prompts: the filter acts on the output
                            personalization=PersonalizationSettings(k=2, words_per_review=40),
                            sampling=replace(SamplingSettings(max_new_tokens=32), content_filter=content_filter))
    evaluate(engine.config, settings, engine)
    return read_generations(out / "generations.jsonl")


def test_evaluate_with_the_filter_on_writes_no_listed_word(bundled_engine, tmp_path, common_words_listed):
    """Three test users, three methods, the bundled model: with the filter on no text holds a listed
    word (COMMON included, which the same run with the filter off writes), and results.json says it was on."""
    records = _evaluate(bundled_engine, tmp_path / "on", True, generate_only=False)
    assert len(records) == 9 and all(r["content_filter"] for r in records)
    found = {r["method"]: safety.find(r["text"]) for r in records if safety.find(r["text"])}
    assert not found, found
    assert sum(r["text"].strip() != "" for r in records) >= 7, "the texts are still reviews"
    results = json.loads((tmp_path / "on" / "results.json").read_text())
    assert results["settings"]["sampling"]["content_filter"] is True

    control = _evaluate(bundled_engine, tmp_path / "off", False, generate_only=True)
    written = sum(len(safety.find(r["text"])) for r in control)
    assert written >= 5, "without the filter the model writes the common words: the run above could have failed"
    drawn = sum(len(safety.find(r["raw"])) for r in records)  # what the mask let through to the check after it
    assert drawn <= written / 4, f"the mask kept {written - drawn} of {written} listed words out of decoding"
