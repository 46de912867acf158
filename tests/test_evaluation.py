"""Evaluation: method names, every method written and resumed, the voice measures, validation users."""
import json

import numpy as np
import pytest

from dep_engine import hygiene
from dep_engine.engine import DEPEngine, EngineConfig
from dep_engine.data import DataError
from dep_engine.evaluation import ATTRIBUTION_FORM, EvalSettings, evaluate, parse_method, pool_runs, summarize
from dep_engine.settings import SamplingSettings

from conftest import TINY_LLM


def test_method_names():
    assert parse_method("dep@k=2", 4).k == 2 and parse_method("dep-shuffled", 4).shuffled
    assert parse_method("nonperso", 4).k == 0


def test_evaluation_writes_every_method(tiny_engine, tmp_path):
    methods = ["nonperso", "rag", "his", "diff", "his+diff", "dep", "dep@k=1", "dep-shuffled"]
    settings = EvalSettings(methods=methods, out=str(tmp_path / "eval"), limit=3, batch_users=2,
                            sampling=SamplingSettings(max_new_tokens=6))
    summary = evaluate(EngineConfig(llm=TINY_LLM, adapter=None), settings, engine=tiny_engine)
    assert summary["users"] == 3
    assert set(summary["methods"]) == set(methods)
    for name, entry in summary["methods"].items():
        assert entry["n"] == 3
        assert set(entry["metrics"]) == {"rouge1", "rougeL", "meteor", "bleu"}
        assert 0 <= entry["metrics"]["rouge1"]["mean"] <= 1
    assert "own_minus_shuffled" in summary["methods"]["dep-shuffled"]
    assert summary["settings"]["forward"]["cpu"] and summary["settings"]["decoding"].startswith(("onnx", "torch"))
    out = tmp_path / "eval"
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(methods)
    assert (out / "results.png").stat().st_size > 1000 and "| dep |" in (out / "results.md").read_text()
    # resuming reuses every generation
    evaluate(EngineConfig(llm=TINY_LLM, adapter=None), settings, engine=tiny_engine)
    assert (out / "generations.jsonl").read_text().splitlines() == lines


def test_eval_reviews_file_users_are_new_and_join_the_pool(tiny_llm, dataset, tmp_path):
    from dep_engine.data import by_user

    users = [h for h in by_user(dataset.reviews).values() if len(h) >= 6][:2]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps({"user_id": f"new-{n}", "parent_asin": r.item_id, "rating": r.rating,
                                        "title": r.title, "text": r.text, "timestamp": r.timestamp * 1000}) + "\n"
                            for n, history in enumerate(users) for r in history))
    config = EngineConfig(llm=TINY_LLM, adapter=None, extra_reviews=str(path))
    engine = DEPEngine(config, progress=False, llm=tiny_llm)
    pooled = [r for r in engine.store.reviews if r.user_id == "new-0"]
    assert len(pooled) == len(users[0]) - 1  # the latest review stays out of the pool
    settings = EvalSettings(methods=["nonperso", "dep"], out=str(tmp_path / "eval"), eval_reviews=str(path),
                            sampling=SamplingSettings(max_new_tokens=4))
    summary = evaluate(config, settings, engine=engine)
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert summary["users"] == 2 and {r["user_id"] for r in records} == {"new-0", "new-1"}
    assert {r["reference"] for r in records} == {users[0][-1].text, users[1][-1].text}


def test_method_names_take_a_strength_and_refuse_what_cannot_be():
    method = parse_method("dep@k=2@alpha=0.5", 4)
    assert (method.mode, method.k, method.strength, method.shuffled) == ("dep", 2, 0.5, False)
    assert parse_method("generic", 4).k == 4 and parse_method("nonperso+length", 4).k == 0
    assert parse_method("dep-shuffled@alpha=1", 4).shuffled
    for bad in ("nonperso-shuffled", "rag@alpha=2", "dep@k=x", "unknown", "dep@guidance=1", "dep@alpha=2@k=1"):
        with pytest.raises(ValueError):
            parse_method(bad, 4)


def test_attribution_is_reported_apart_for_on_product_and_drifted_texts():
    from dep_engine.voice import summary

    values = {"top1": np.array([1.0, 0, 1, 1, 0]), "reciprocal_rank": np.array([1, 0.5, 1, 1, 0.25]),
              "own_words": np.zeros(5), "drifted": np.array([0.0, 0, 1, 1, 0]),
              "length_ratio": np.ones(5), "words": np.arange(5.0), "real_words": np.arange(5.0)}
    split = summary(values)["top1_by_product"]
    assert split == {"on_product": {"n": 3, "mean": pytest.approx(1 / 3)}, "drifted": {"n": 2, "mean": 1.0}}
    values["drifted"] = np.zeros(5)
    assert summary(values)["top1_by_product"]["drifted"] == {"n": 0, "mean": None}


def test_evaluation_reports_voice_hygiene_and_the_generic_baseline(tiny_engine, tmp_path):
    methods = ["nonperso", "nonperso+length", "generic", "dep", "dep-shuffled", "dep@alpha=0.5"]
    settings = EvalSettings(methods=methods, out=str(tmp_path / "eval"), limit=4, batch_users=4, split="val",
                            sampling=SamplingSettings(max_new_tokens=6))
    summary = evaluate(EngineConfig(llm=TINY_LLM, adapter=None), settings, engine=tiny_engine)
    voice = summary["voice"]
    assert voice["n"] == 4 and set(voice["methods"]) == set(methods) | {"real review"}
    for name in methods:
        entry = voice["methods"][name]
        assert 0 <= entry["top1"]["mean"] <= 1 and 0 < entry["reciprocal_rank"]["mean"] <= 1
        assert 0 <= entry["scaffolding_or_loops_after"] <= 1
    assert "own_minus_shuffled" in voice["methods"]["dep"] and "minus_generic" in voice["methods"]["dep"]
    assert "vs_generic" in summary["methods"]["dep"]["metrics"]["rouge1"]
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert all({"raw", "ran_out", "cut", "text"} <= set(r) for r in records)
    ran_out = [r for r in records if r["ran_out"]]  # 6 new tokens: most rows run out
    assert ran_out and all(r["text"] == hygiene.clean(r["raw"], True).text for r in ran_out)
    from dep_engine.splits import validation_samples

    val_users = {s.target.user_id for s in validation_samples(tiny_engine.dataset.reviews)}
    assert {r["user_id"] for r in records} <= val_users
    assert "Voice measures" in (tmp_path / "eval" / "results.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "voice.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * (len(methods) + 1)  # every text and the real reviews
    assert {r["attribution"] for r in rows} == {ATTRIBUTION_FORM} and voice["attribution"] == ATTRIBUTION_FORM
    for name in ("dep", "real review"):
        top1 = [r["top1"] for r in rows if r["method"] == name]
        assert np.mean(top1) == pytest.approx(voice["methods"][name]["top1"]["mean"])


def test_evaluation_can_end_every_text_at_the_users_typical_length(tiny_engine, tmp_path):
    from dep_engine.prompt import typical_length
    from dep_engine.splits import validation_samples

    settings = EvalSettings(methods=["generic", "dep"], out=str(tmp_path / "eval"), limit=2, batch_users=2, split="val",
                            generate_only=True, sampling=SamplingSettings(max_new_tokens=6, end_at_user_length=True))
    evaluate(EngineConfig(llm=TINY_LLM, adapter=None), settings, engine=tiny_engine)
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    lengths = {s.target.user_id: typical_length(list(s.profile)) for s in validation_samples(tiny_engine.dataset.reviews)}
    assert len(records) == 4 and all(r["end_after_words"] == lengths[r["user_id"]] > 0 for r in records)
    assert all(r["text"] == hygiene.clean(r["raw"], r["ran_out"], r["end_after_words"]).text for r in records)


def _draw(folder, own_hits: list[bool], users=("u0", "u1", "u2", "u3"), voice: bool = True,
          attribution: str = ATTRIBUTION_FORM) -> None:
    """A constructed run: dep copies the real review where own_hits says so, the shuffled control never."""
    records = []
    for user, hit in zip(users, own_hits):
        reference = f"the {user} tuner holds its pitch and the clip is strong"
        for method, text in (("dep", reference if hit else "lovely cake recipe"), ("dep-shuffled", "lovely cake recipe")):
            records.append(dict(group=0, user_id=user, method=method, text=text, raw=text, reference=reference, seconds=1.0))
    folder.mkdir()
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if voice:  # the copy named its author, the cake recipe did not
        rows = [dict(method=r["method"], user_id=r["user_id"], top1=float(r["text"] == r["reference"]),
                     reciprocal_rank=1.0 if r["text"] == r["reference"] else 0.1, own_words=0.0, drifted=0.0,
                     **({"attribution": attribution} if attribution else {})) for r in records]
        (folder / "voice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pooled_draws_average_each_user_and_say_whether_gaps_repeat(tmp_path, capsys):
    _draw(tmp_path / "a", [True, False, True, False])
    _draw(tmp_path / "same", [True, False, True, False])
    _draw(tmp_path / "opposite", [False, True, False, True, True], users=("u0", "u1", "u2", "u3", "u4"))
    methods = [parse_method(m, 4) for m in ("dep", "dep-shuffled")]
    one = summarize([json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()], methods)
    repeated = pool_runs([str(tmp_path / "a"), str(tmp_path / "same")], out=str(tmp_path / "pooled"))
    flipped = pool_runs([str(tmp_path / "a"), str(tmp_path / "opposite")])
    assert "1 users are not in every run" in capsys.readouterr().out

    def rouge_gap(summary: dict) -> dict:
        return summary["methods"]["dep-shuffled"]["own_minus_shuffled"]["rouge1"]

    def gap(summary: dict) -> float:
        return rouge_gap(summary)["mean_diff"]

    def width(summary: dict) -> float:
        return rouge_gap(summary)["high"] - rouge_gap(summary)["low"]

    assert gap(repeated) == pytest.approx(gap(one)) and gap(one) > 0.4
    assert repeated["methods"]["dep-shuffled"]["gap_correlation_between_draws"] == pytest.approx(1.0)
    assert flipped["users"] == 4  # u4 is in one draw only
    assert flipped["methods"]["dep-shuffled"]["gap_correlation_between_draws"] == pytest.approx(-1.0)
    # each user's two draws averaged: every user hit once, so the mean stays and the spread is gone
    assert gap(flipped) == pytest.approx(gap(one)) and width(flipped) == pytest.approx(0) and width(one) > 0.5
    assert "averaged over 2 draws" in (tmp_path / "pooled" / "pooled.md").read_text()
    # the voice measures pooled the same way: per user over the draws, then the paired interval
    top1_gap = flipped["voice"]["methods"]["dep"]["own_minus_shuffled"]["top1"]
    assert top1_gap["mean_diff"] == pytest.approx(0.5) and top1_gap["high"] - top1_gap["low"] == pytest.approx(0)
    assert repeated["voice"]["methods"]["dep"]["top1_per_draw"] == [0.5, 0.5] and repeated["voice"]["n"] == 4
    assert flipped["voice"]["methods"]["dep"]["top1_per_draw"] == [0.5, 0.5]
    assert "Voice measures, each user's values averaged over 2 draws" in (tmp_path / "pooled" / "pooled.md").read_text()
    _draw(tmp_path / "unkept", [True, True, True, True], voice=False)  # a run from before voice.jsonl
    assert "voice" not in pool_runs([str(tmp_path / "a"), str(tmp_path / "unkept")])
    _draw(tmp_path / "one-draw", [True, True, True, True], attribution=None)  # attribution measured before round 52
    with pytest.raises(DataError, match="one-draw: one candidate draw"):
        pool_runs([str(tmp_path / "a"), str(tmp_path / "one-draw")])
    with pytest.raises(DataError, match="missing"):
        pool_runs([str(tmp_path / "a"), str(tmp_path / "missing")])
