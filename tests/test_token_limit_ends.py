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
