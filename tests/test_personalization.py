"""Issue 10's fair comparison and measures: the generic reviewer, the strength, output hygiene,
voice attribution, and the rules that keep held-out reviews out of training (real bundled data)."""
import numpy as np
import pytest
import torch

from dep_engine import PersonalizationSettings, SamplingSettings, hygiene, voice
from dep_engine.data import Review, by_user, profile_before, split_of
from dep_engine.generation import stopping_criteria
from dep_engine import splits

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=6)


def _user(engine):
    return next(u for u, h in engine.users.items() if len(h) > 8)


@pytest.fixture
def population(tiny_engine):
    """A random population-average reviewer in the shared tiny engine, put back to zeros afterwards."""
    torch.manual_seed(1)
    tiny_engine.adapter.set_population(torch.randn(tiny_engine.store.dim), torch.randn(tiny_engine.store.dim))
    yield
    tiny_engine.adapter.set_population(torch.zeros(tiny_engine.store.dim), torch.zeros(tiny_engine.store.dim))


def test_generic_is_dep_with_the_population_vectors_and_strength_mixes_them(tiny_engine, population):
    request = tiny_engine.user_request(_user(tiny_engine))

    def embeds(strength: float, modes=("generic", "dep")):
        return tiny_engine.prepare(request, modes, PersonalizationSettings(strength=strength), GREEDY).embeds

    generic, dep = embeds(1.0)
    assert not torch.equal(generic, dep)  # the user's vectors are not the population's
    assert torch.equal(embeds(0.0)[1], generic)  # strength 0: the generic reviewer, exactly
    assert torch.equal(embeds(1.0, ("dep",))[0], dep)  # strength 1: exactly the personalized mode
    half = embeds(0.5)[1]
    assert not torch.equal(half, generic) and not torch.equal(half, dep)
    texts = tiny_engine.generate(request, ("generic", "dep"), PersonalizationSettings(strength=0.0), GREEDY).texts
    assert texts["generic"] == texts["dep"]


def test_two_reviewers_share_product_settings_and_seed(tiny_engine):
    users = [u for u, h in tiny_engine.users.items() if len(h) > 8][:2]
    item = tiny_engine.user_request(users[0]).item
    requests = [tiny_engine.user_request(u, item) for u in users]
    final = list(tiny_engine.stream_compare(requests, "dep", sampling=GREEDY))[-1]
    assert [r.context.selected[0].review.user_id for r in final] == users
    alone = tiny_engine.generate(requests[1], ("dep",), sampling=GREEDY).texts["dep"]
    assert final[1].texts["dep"] == alone  # greedy: batching two reviewers changes nothing


@pytest.mark.parametrize("raw, kept, reason", [
    ("Great tone. [Output Review Rating]: 5", "Great tone.", "scaffolding"),
    ("Hey [User's Name], nice pedal", "Hey", "scaffolding"),
    ("[Output Review Rating]: 4\n[Output Review Title]: Solid\nIt holds tune well.", "It holds tune well.", None),
    ("Great. Great. Great. Great.", "Great.", "repetition"),
    ("I like it. It works fine. I like it. It works fine.", "I like it. It works fine.", "repetition"),
    ("Works as described.\nReview 2:\nItem Title: Capo", "Works as described.", "scaffolding"),
    ("Nice picks, good grip.\nuser\nWrite a review of", "Nice picks, good grip.", "scaffolding"),
    ("A fine strap, soft and strong.", "A fine strap, soft and strong.", None),
    ("The Dust-Dream-Dream-Dream-Dream-Dream-Dream-Dream-Dream-Dream-Dream", "The Dust-Dream", "repetition"),
    ("Loud! 👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉👉", "Loud! 👉", "repetition"),
    ("Best strap ever!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n------------------------------\nFive stars.",
     "Best strap ever!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n------------------------------\nFive stars.", None),
])
def test_hygiene_cuts_scaffolding_and_loops(raw, kept, reason):
    cleaned = hygiene.clean(raw)
    assert (cleaned.text, cleaned.reason) == (kept, reason)
    assert not hygiene.flagged(cleaned.text)
    assert hygiene.flagged(raw) == (raw != kept)


@pytest.mark.parametrize("raw, kept", [
    ("Nice strings. They stay in tune and the", "Nice strings."),
    ('Bright tone! I call it "the best." The low E', 'Bright tone! I call it "the best."'),
    ("Solid case, fits my Strat\nThe latch is a bit", "Solid case, fits my Strat"),
    ("It costs 3.5 dollars and holds", "It costs 3.5 dollars and holds ..."),  # no sentence end: marked
    ("It works. Five stars.", "It works. Five stars."),  # it ran out exactly at its end: kept
])
def test_a_text_that_ran_out_of_tokens_ends_at_its_last_full_sentence(raw, kept):
    cleaned = hygiene.clean(raw, ran_out=True)
    assert cleaned.text == kept and cleaned.reason == (None if kept == raw else "token limit")
    assert hygiene.clean(raw) == hygiene.Cleaned(raw, None)  # a text that ended by itself keeps its words
    looped = hygiene.clean("Great. Great. Great. Great and", ran_out=True)
    assert looped == hygiene.Cleaned("Great.", "repetition")  # scaffolding and loops are cut first


def test_a_text_can_end_at_the_users_typical_length():
    text = "Nice strings. They stay in tune for weeks. The box is pretty. I would buy"
    assert hygiene.end_after(text, 5) == "Nice strings. They stay in tune for weeks."  # the first end from 5 words on
    assert hygiene.end_after(text, 2) == "Nice strings."
    assert hygiene.end_after(text, 40) == text  # shorter than the target: all of it
    assert hygiene.clean(text, ran_out=True, end_after_words=5) == hygiene.Cleaned(
        "Nice strings. They stay in tune for weeks.", "length")
    assert hygiene.clean(text, ran_out=True, end_after_words=40).reason == "token limit"  # then the limit's rule
    assert hygiene.should_stop(text, 5) and not hygiene.should_stop(text, 40) and not hygiene.should_stop(text)


def test_decoding_stops_the_rows_that_reached_scaffolding(tiny_engine):
    tokenizer = tiny_engine.llm.tokenizer
    rows = ["It sounds warm and clear. [Output Review Rating]: 5", "It sounds warm and clear and it stays in"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in rows]
    width = max(map(len, ids))
    width += -width % 4  # the check runs every 4 steps
    batch = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    stop = stopping_criteria(tiny_engine.llm, SamplingSettings(), None)
    assert stop(batch, None).tolist() == [True, False]


def test_time_budget_stops_decoding_with_a_note(tiny_engine):
    import time

    request = tiny_engine.user_request(_user(tiny_engine))
    started = time.perf_counter()
    result = tiny_engine.generate(request, ("nonperso",), sampling=SamplingSettings(max_new_tokens=400, time_budget_s=1))
    assert time.perf_counter() - started < 1 + 10  # prefill and set-up on 2 shared cores, then at most the budget
    assert result.new_tokens < 400 and any("time budget" in n for n in result.notes)


@pytest.fixture(scope="module")
def held_out_users(dataset):
    return splits.test_samples(dataset.reviews)[:120]


def test_attribution_finds_authors_of_their_own_words_and_sits_at_chance_on_one_text(store, encoder, held_out_users):
    profiles = voice.build_profiles(store, [s.profile for s in held_out_users])
    own = [s.profile[-1].text for s in held_out_users]  # a review each user really wrote
    top1, reciprocal = voice.attribution_chances(encoder.encode(own), own, profiles)
    assert top1.mean() > 0.5 and reciprocal.mean() > top1.mean()  # chance is 0.05
    # one text for everyone: each author's place among all users is a different one, so over every set of
    # candidates the author is first exactly once in 20 (no draw's luck either way)
    same = ["These strings sound bright and stay in tune."] * len(held_out_users)
    top1, reciprocal = voice.attribution_chances(encoder.encode(same), same, profiles)
    assert top1.mean() == pytest.approx(voice.chance()["top1"], abs=1e-9)
    assert reciprocal.mean() == pytest.approx(voice.chance()["reciprocal_rank"], abs=1e-9)


def test_attribution_is_the_one_draw_measure_averaged_over_every_candidate_set(store, encoder, held_out_users):
    """The exact expectation agrees with drawing candidate sets at random, many times."""
    import random

    users = held_out_users[:40]
    profiles = voice.build_profiles(store, [s.profile for s in users])
    texts = [s.profile[-1].text for s in users]
    embeddings = encoder.encode(texts)
    top1, reciprocal = voice.attribution_chances(embeddings, texts, profiles, size=5)
    rng = random.Random(0)
    draws = 3000
    sets = [[i] + rng.sample([j for j in range(len(users)) if j != i], 4) for i in range(len(users)) for _ in range(draws)]
    ranks = voice.attribution_ranks(np.repeat(embeddings, draws, axis=0), [t for t in texts for _ in range(draws)],
                                    profiles, sets).reshape(len(users), draws)
    assert np.abs((ranks == 1).mean(axis=1) - top1).max() < 0.05
    assert np.abs((1 / ranks).mean(axis=1) - reciprocal).max() < 0.05
    assert 0.05 < top1.mean() < 0.95  # neither all first nor all last: the comparison has something to compare


def test_voice_check_ranks_the_author_and_names_the_item_a_text_drifted_to(store, held_out_users):
    """The app's per-output check: a review the user wrote ranks them first among 20; a text about a
    past review's item is named as drifted to it, one about the product is not."""
    author, others = held_out_users[0], held_out_users[1:20]
    target = store.item(author.target.item_id)
    past = [store.item(r.item_id) for r in author.profile[-3:]]
    texts = [author.profile[-1].text, f"{past[0].title}. {past[0].description}", f"{target.title}. {target.description}"]
    own, off, on = voice.check_texts(store, texts, [author.profile] + [s.profile for s in others], target, past)
    assert own.rank == 1 and own.candidates == 20
    assert off.drifted_to == past[0].title and on.drifted_to is None


def test_own_words_and_drift():
    assert voice.own_word_share("the tone knob is smooth", ["tone knob", "smooth", "cheap"]) == pytest.approx(2 / 3)
    target, past = np.array([1.0, 0.0]), np.array([[0.0, 1.0]])
    assert voice.drifted(np.array([0.2, 0.9]), target, past) and not voice.drifted(np.array([0.9, 0.2]), target, past)


def test_same_day_reviews_go_to_history_never_to_peers(dataset, store):
    histories = by_user(dataset.reviews).values()
    history, n = next((h, n) for h in histories for n in range(len(h) - 1)
                      if h[n].timestamp == h[n + 1].timestamp and split_of(n + 1, len(h)) == "train")
    assert history[n + 1] in profile_before(history, n)  # a later review of the same day is history
    last = len(history) - 1
    assert history[last] not in profile_before(history, last - 1)  # the held-out test target never is
    target = history[n]
    peers = store._peer_rows(target.item_id, "nobody", target.timestamp, 1000)
    assert all(store.times[r] < target.timestamp for r in peers)


def test_identical_past_reviews_are_used_once(tiny_engine):
    base = tiny_engine.users[_user(tiny_engine)]
    twin = [Review(r.user_id, r.item_id + "-again", r.rating, r.title, r.text, r.timestamp) for r in base[:3]]
    request = tiny_engine.user_request(base[0].user_id)
    request.profile = list(base[:3]) + twin
    context = tiny_engine.context(request, PersonalizationSettings(k=6))
    texts = [s.review.text for s in context.selected]
    assert len(texts) == len(set(texts)) == len({r.text for r in base[:3]})


def test_no_training_sample_sees_a_held_out_target_among_its_peers(tiny_engine):
    """The audit that found 342 of 1,000 training samples with a test target among their peers."""
    import random

    reviews = tiny_engine.dataset.reviews
    held = {(r.user_id, r.item_id) for r in splits.held_out_targets(reviews)}
    store = tiny_engine.store.without(splits.held_out_targets(reviews))
    samples = random.Random(0).sample(splits.training_samples(reviews), 300)
    peers = [(p.user_id, p.item_id) for s in samples
             for selected in tiny_engine.context(tiny_engine.sample_request(s), PersonalizationSettings(), store).selected
             for p in selected.peers]
    assert len(peers) > 1000 and not held & set(peers)
    everything = [(p.user_id, p.item_id) for s in samples
                  for selected in tiny_engine.context(tiny_engine.sample_request(s), PersonalizationSettings()).selected
                  for p in selected.peers]
    assert held & set(everything)  # the full pool would have leaked them: the check can fail
