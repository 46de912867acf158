import numpy as np
import pytest

from dep_engine.data import Item, Review, by_user, parse_history
from dep_engine.differences import difference_embeddings_loop
from dep_engine.embeddings import style_features
from dep_engine.store import per_user_running_sums


def heavy_user(dataset):
    users = by_user(dataset.reviews)
    return max(users, key=lambda u: len(users[u])), users


def test_peers_exclude_the_user_and_the_future(store, dataset):
    user, users = heavy_user(dataset)
    history = users[user]
    target = history[-1]
    context = store.context(history[:-1], store.item(target.item_id), k=6, cutoff=target.timestamp)
    assert context.k == 6 and context.his.shape == (6, 386) and context.diff.shape == (6, 386)
    times = {(r.user_id, r.item_id): r.timestamp for r in dataset.reviews}
    for selected in context.selected:
        assert selected.peers
        for peer in selected.peers:
            assert peer.user_id != user
            assert times[(peer.user_id, peer.item_id)] < target.timestamp
        assert abs(sum(p.weight for p in selected.peers) - 1) < 1e-5


def test_differences_match_the_formula_on_real_reviews(store, dataset):
    user, users = heavy_user(dataset)
    profile = users[user][:-1]
    context = store.context(profile, store.item(users[user][-1].item_id), k=3, cutoff=users[user][-1].timestamp)
    user_mean = store.embed_reviews(profile).mean(axis=0)
    peers, means = [], []
    for selected in context.selected:
        rows = [store.row_of[(p.user_id, p.item_id)] for p in selected.peers]
        peers.append(store.embeddings[rows])
        # each peer's mean over their reviews before the cut-off, computed directly
        means.append(np.array([
            store.embeddings[[i for i, r in enumerate(store.reviews)
                              if r.user_id == p.user_id and r.timestamp < users[user][-1].timestamp]].mean(axis=0)
            for p in selected.peers]))
    expected = difference_embeddings_loop(context.his, user_mean, peers, means)
    np.testing.assert_allclose(context.diff, expected, atol=1e-5)


def test_relevant_rule_ranks_by_similarity_and_recent_rule_by_time(store, dataset):
    user, users = heavy_user(dataset)
    profile = users[user][:-1]
    target = store.item(users[user][-1].item_id)
    relevant = store.context(profile, target, k=4, rule="relevant")
    scores = [s.relevance for s in relevant.selected]
    assert scores == sorted(scores, reverse=True)
    recent = store.context(profile, target, k=4, rule="recent")
    stamps = [s.review.timestamp for s in recent.selected]
    assert stamps == sorted(stamps, reverse=True)
    assert stamps[0] == max(r.timestamp for r in profile if any(True for _ in [r]))


def test_first_k_is_a_prefix(store, dataset):
    user, users = heavy_user(dataset)
    full = store.context(users[user][:-1], store.item(users[user][-1].item_id), k=8)
    two = full.first(2)
    assert two.k == 2 and np.array_equal(two.diff, full.diff[:2])


def test_pasted_history_of_an_unknown_user(store, dataset):
    title = next(iter(dataset.items.values())).title
    text = ("item_title,rating,review_title,review_text\n"
            f'"{title}",4,Solid,Works well for the price and sounds fine\n'
            "Some gadget nobody sells,2,Meh,Broke after a week of light use\n")
    reviews, items = parse_history(text, user_id="stranger")
    context = store.context(reviews, Item("t", "Guitar tuner"), k=2, extra_items=items)
    assert context.k == 2
    by_title = {s.item_title: s for s in context.selected}
    assert not by_title[title].cold_start  # matched to the catalog item by title: real peers
    assert by_title["Some gadget nobody sells"].cold_start  # nobody reviewed it: nearest items' reviewers
    assert by_title["Some gadget nobody sells"].peers


def test_no_history_means_no_personalization(store):
    context = store.context([], Item("t", "Guitar tuner"), k=4)
    assert context.k == 0 and "nothing could be personalized" in context.notes[0]


def test_unknown_rule_is_rejected(store, dataset):
    user, users = heavy_user(dataset)
    with pytest.raises(ValueError, match="history rule"):
        store.context(users[user], Item("t", "x"), rule="random")


def test_embed_reviews_reuses_pool_and_encodes_new(store, encoder, dataset):
    known = dataset.reviews[0]
    new = Review("someone", "x", 3.0, "", "A completely new review text about a banjo.", 0)
    vectors = store.embed_reviews([known, new])
    np.testing.assert_allclose(vectors[0], store.embeddings[store.row_of[(known.user_id, known.item_id)]])
    np.testing.assert_allclose(vectors[1, :384], encoder.encode([new.text])[0], atol=1e-6)
    np.testing.assert_allclose(vectors[1, 384:], style_features([3.0], [new.text])[0])


def test_style_features_follow_rating_and_length():
    short_low, long_high = style_features([1.0, 5.0], ["word " * 5, "word " * 300])
    assert short_low[0] < 0 < long_high[0] and short_low[1] < 0 < long_high[1]


def test_voice_features_tell_a_shouting_writer_from_a_calm_one():
    shout, calm = style_features([5.0, 5.0], ["I LOVE IT!!! Best strings EVER! I'd buy again!",
                                              "The strings are fine. They hold their tuning well."], voice=True)
    assert shout.shape == calm.shape == (11,)
    exclamations, first_person, capitals = 3, 5, 6  # columns after rating, length, sentence length
    assert shout[exclamations] > calm[exclamations] == 0
    assert shout[first_person] > calm[first_person] == 0
    assert shout[capitals] > calm[capitals]


def test_held_out_targets_never_enter_the_training_pool(store, dataset):
    from dep_engine.splits import held_out_targets, user_group

    held = held_out_targets(dataset.reviews)
    pool = store.without(held)
    kept = {(r.user_id, r.item_id, r.timestamp) for r in pool.reviews}
    assert held and not any((r.user_id, r.item_id, r.timestamp) in kept for r in held)
    assert len(pool.reviews) == len(store.reviews) - len(held)
    groups = {user_group(r.user_id) for r in held}
    assert groups == {"val", "test"}
    for row, review in enumerate(pool.reviews):  # same vectors, rebuilt from the text part
        np.testing.assert_allclose(pool.embeddings[row], store.embeddings[store.row_of[(review.user_id, review.item_id)]])
        if row > 50:
            break


@pytest.mark.parametrize("chunk", [1, 3, 8192])
def test_running_sums_restart_at_each_user_whatever_the_chunk(chunk):
    rng = np.random.default_rng(chunk)
    embeddings = rng.standard_normal((200, 5)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(rng.integers(1, 40, size=30))])
    starts = starts[starts < len(embeddings)]
    sums = per_user_running_sums(embeddings, starts, chunk)
    for lo, hi in zip(starts, np.append(starts[1:], len(embeddings))):
        np.testing.assert_allclose(sums[lo:hi], np.cumsum(embeddings[lo:hi].astype(np.float64), axis=0), atol=1e-5)
