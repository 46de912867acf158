"""experiments/token_limit_ends.py counts, per method, the texts that ran out and that end mid-sentence."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
spec = importlib.util.spec_from_file_location("token_limit_ends", ROOT / "experiments" / "token_limit_ends.py")
token_limit_ends = importlib.util.module_from_spec(spec)
spec.loader.exec_module(token_limit_ends)


def test_a_text_is_mid_sentence_unless_it_ends_at_a_sentence_end():
    assert not token_limit_ends.mid_sentence('It works. I call it "the best."')
    assert not token_limit_ends.mid_sentence("Solid case\nFits my Strat!")
    assert token_limit_ends.mid_sentence("It works and the")
    assert token_limit_ends.mid_sentence("It costs 3.5 dollars and holds ...")  # the rule's mark: still cut


def test_shares_per_method():
    records = [{"method": "dep", "text": "Fine.", "ran_out": True}, {"method": "dep", "text": "Fine and", "ran_out": True},
               {"method": "generic", "text": "Fine and"}, {"method": "generic", "text": "Good. Fine."}]
    assert token_limit_ends.shares(records) == {"dep": {"ran_out": 1.0, "mid_sentence": 0.5},
                                                "generic": {"ran_out": 0.0, "mid_sentence": 0.5}}


spec = importlib.util.spec_from_file_location("derived_ran_out", ROOT / "experiments" / "derived_ran_out.py")
derived = importlib.util.module_from_spec(spec)
spec.loader.exec_module(derived)


def test_a_texts_tokens_short_of_the_limit_are_counted_with_the_real_tokenizer(smol_tokenizer):
    """Round 42 reads an older run's text as run out when it is at most SLACK tokens short of the limit."""
    def text(tokens: int) -> str:
        raw = "good" + " good" * (tokens - 1)
        assert len(smol_tokenizer(raw, add_special_tokens=False).input_ids) == tokens
        return raw

    assert derived.tokens_short(smol_tokenizer, text(160), 160) == 0
    assert derived.tokens_short(smol_tokenizer, text(160 - derived.SLACK), 160) == derived.SLACK  # counts as run out
    assert derived.tokens_short(smol_tokenizer, text(40), 160) == 120
    assert derived.counts_as_run_out(0) and derived.counts_as_run_out(derived.SLACK)
    assert not derived.counts_as_run_out(derived.SLACK + 1)
    assert not derived.counts_as_run_out(120)


spec = importlib.util.spec_from_file_location("voice_values", ROOT / "experiments" / "voice_values.py")
voice_values = importlib.util.module_from_spec(spec)
spec.loader.exec_module(voice_values)


def test_a_rescored_run_must_repeat_every_number_of_its_results_but_the_timings(tmp_path):
    """Round 50 reads a rescored run only where its results.json repeats the run's."""
    import json

    def results(folder: str, **changes) -> Path:
        summary = {"users": 3, "methods": {"dep": {"metrics": {"rouge1": {"mean": 0.2, "low": 0.1}},
                                                    "seconds_per_generation": 1.5}},
                   "settings": {"seed": 0, "adapter": "assets/adapter", "seconds": 100.0}}
        summary["methods"]["dep"]["metrics"]["rouge1"].update(changes)
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(summary))
        return tmp_path / folder

    run = results("run")
    timed_again = results("timed")
    (timed_again / "results.json").write_text((timed_again / "results.json").read_text().replace("100.0", "7.0"))
    assert voice_values.differences(run, timed_again) == []
    assert voice_values.differences(run, results("moved", mean=0.2 + 1e-6)) == ["/methods/dep/metrics/rouge1/mean: 0.2 -> 0.200001"]
    assert voice_values.differences(run, results("grown", high=0.3)) == ["/methods/dep/metrics/rouge1/high: None -> 0.3"]
    attribution = results("attribution")  # round 52 measures attribution another way: the rest must repeat
    (attribution / "results.json").write_text((attribution / "results.json").read_text().replace(
        '"metrics"', '"voice": {"top1": {"mean": 0.3}}, "metrics"'))
    assert voice_values.differences(run, attribution) == ["/methods/dep/voice/top1/mean: None -> 0.3"]
    assert voice_values.differences(run, attribution, skip=voice_values.ATTRIBUTION) == []
