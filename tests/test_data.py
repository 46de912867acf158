import gzip
import json

import pytest

from dep_engine.data import (DataError, Review, chronological_split, load_dataset, parse_history, read_items,
                             read_reviews)
from dep_engine import splits
from dep_engine.paths import BUNDLED_GIFT_CARDS
from dep_engine.splits import derangement, training_samples, user_group, validation_samples

R2014 = {"reviewerID": "U1", "asin": "A1", "overall": 4.0, "summary": "Nice &amp; cheap",
         "reviewText": "It works &quot;fine&quot;.", "unixReviewTime": 1393545600}
R2023 = {"user_id": "U2", "parent_asin": "B1", "rating": 5, "title": "Great",
         "text": "Love it <br>", "timestamp": 1627679830425}


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as out:
            out.write(text)
    else:
        path.write_text(text)


def test_both_schemas_become_one_record(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [R2014])
    write_jsonl(tmp_path / "b.jsonl.gz", [R2023], gz=True)
    old, = read_reviews(tmp_path / "a.jsonl")
    new, = read_reviews(tmp_path / "b.jsonl.gz")
    assert (old.user_id, old.item_id, old.rating, old.title, old.text, old.timestamp) == \
        ("U1", "A1", 4.0, "Nice & cheap", 'It works "fine".', 1393545600)
    assert (new.user_id, new.item_id, new.rating, new.title, new.timestamp) == ("U2", "B1", 5.0, "Great", 1627679830)


def test_items_in_both_schemas(tmp_path):
    write_jsonl(tmp_path / "meta.jsonl", [{"asin": "A1", "title": "Cable 1/4&quot;"},
                                          {"parent_asin": "B1", "title": "Bow", "description": ["Red", "bow"]}])
    items = read_items(tmp_path / "meta.jsonl")
    assert items["A1"].title == 'Cable 1/4"'
    assert items["B1"].description == "Red bow"


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(R2014) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: malformed JSON"):
        read_reviews(path)
    path.write_text(json.dumps({**R2014, "overall": 9}) + "\n")
    with pytest.raises(DataError, match=r"line 1: rating 9 is outside 1-5"):
        read_reviews(path)


def test_bundled_data_loads_with_titles(dataset):
    assert len(dataset.reviews) > 8900
    assert len({r.user_id for r in dataset.reviews}) == 1279
    assert len(dataset.items) == 900
    assert not any("&quot;" in item.title for item in dataset.items.values())


def test_second_bundled_domain_loads_with_descriptions_and_splits():
    gift_cards = load_dataset(BUNDLED_GIFT_CARDS)
    assert len(gift_cards.reviews) == 2959 and len(gift_cards.items) == 148
    assert len({r.user_id for r in gift_cards.reviews}) == 457
    assert sum(bool(item.description) for item in gift_cards.items.values()) == 145
    assert all(r.item_id in gift_cards.items for r in gift_cards.reviews)
    # the same hash rule holds out users here: none of them trained the adapter
    assert len(splits.test_samples(gift_cards.reviews)) == 84 and len(validation_samples(gift_cards.reviews)) == 51


def test_chronological_split_is_per_user_and_ordered(dataset):
    samples = chronological_split(dataset.reviews)
    by_split = {}
    for s in samples:
        by_split.setdefault(s.target.user_id, []).append(s)
        assert all(p.timestamp <= s.target.timestamp for p in s.profile)
        assert s.target not in s.profile
    for user_samples in by_split.values():
        splits = [s.split for s in sorted(user_samples, key=lambda s: len(s.profile))]
        assert splits[-1] == "test" and splits[-2] == "val" and set(splits[:-2]) <= {"train"}


def test_user_groups_are_disjoint_and_sized(dataset):
    train_users = {s.target.user_id for s in training_samples(dataset.reviews)}
    val_users = {s.target.user_id for s in validation_samples(dataset.reviews)}
    test_users = {s.target.user_id for s in splits.test_samples(dataset.reviews)}
    assert not (train_users & test_users) and not (train_users & val_users) and not (val_users & test_users)
    assert len(test_users) >= 200
    assert all(user_group(u) == "test" for u in test_users)


def test_derangement_moves_everyone():
    partner = derangement(50, seed=3)
    assert sorted(partner) == list(range(50))
    assert all(p != i for i, p in enumerate(partner))
    assert partner == derangement(50, seed=3)


def test_pasted_history_json_csv_and_errors():
    csv_text = "item_title,rating,review_title,review_text\nGuitar strings,5,Bright,Sound bright and last long\n"
    reviews, items = parse_history(csv_text)
    assert reviews[0].text == "Sound bright and last long" and items[reviews[0].item_id].title == "Guitar strings"
    reviews, _ = parse_history(json.dumps(R2023) + "\n" + json.dumps(R2014))
    assert [r.user_id for r in reviews] == ["you", "you"]
    with pytest.raises(DataError, match="line 2: rating"):
        parse_history("item_title,rating,review_title,review_text\nX,7,t,text\n")
    with pytest.raises(DataError, match="header lacks"):
        parse_history("a,b\n1,2\n")
    with pytest.raises(DataError, match="empty"):
        parse_history("   ")


def test_load_dataset_reports_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nothing")


def test_terminal_escapes_wrong_types_and_future_times_in_pasted_histories():
    import json

    from dep_engine.data import DataError, clean_text, parse_history

    assert clean_text("red \x1b[31mwarning\x1b[0m here") == "red warning here"
    cases = {"review_text must be text, got int": {"item_title": "Capo", "rating": 5, "review_text": 12345},
             "asin must be text or a whole number, got dict": {"asin": {"x": 1}, "overall": 5, "reviewText": "ok"},
             "is in the future": {"asin": "a", "overall": 5, "reviewText": "ok", "unixReviewTime": 99999999999}}
    for message, record in cases.items():
        with pytest.raises(DataError, match=message):
            parse_history(json.dumps(record))


def test_a_history_review_with_the_targets_text_is_not_shown(dataset, tiny_engine):
    """Cross-posted twins: the same text posted for two items. Shown as a past review, it would hand the
    model the answer. The bundled pool has such a test user (A46D3MTB5LIUY: their target's 710 characters
    were posted for another item four days before) and seven training samples; the engine drops the twin
    from every split sample's history, and nothing else."""
    from dep_engine.data import without_twins
    from dep_engine.splits import test_samples, training_samples, validation_samples

    def twinned(samples):
        return [s for s in samples if len(without_twins(s.profile, s.target)) < len(s.profile)]
    assert [len(twinned(f(dataset.reviews))) for f in (training_samples, validation_samples, test_samples)] == [7, 0, 1]
    sample = twinned(test_samples(dataset.reviews))[0]
    assert sample.target.user_id == "A46D3MTB5LIUY" and len(sample.target.text) == 710
    request = tiny_engine.sample_request(sample)
    assert len(request.profile) == len(sample.profile) - 1
    assert all(r.text != sample.target.text for r in request.profile)
    cased = Review("u", "i", 5.0, "t", sample.target.text.upper() + " !", 0)
    assert without_twins([cased, *request.profile], sample.target) == request.profile
