"""experiments/paired_likelihood.py pairs two likelihood reports sample by sample."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("paired_likelihood", ROOT / "experiments" / "paired_likelihood.py")
paired_likelihood = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_likelihood)


def write(path: Path, rows: list[tuple[str, float, float]]) -> str:
    path.write_text(json.dumps({"per_sample": [{"user_id": u, "item_id": "i", "own": own, "population": pop}
                                               for u, own, pop in rows]}))
    return str(path)


def test_pairs_by_sample_and_reads_where_the_prompt_changed(tmp_path):
    baseline = write(tmp_path / "a.json", [("u1", 3.0, 3.1), ("u2", 2.0, 2.0), ("u3", 4.0, 4.2), ("gone", 9.0, 9.0)])
    candidate = write(tmp_path / "b.json", [("u3", 3.8, 4.1), ("u1", 3.0, 3.1), ("u2", 1.9, 2.0)])
    report = paired_likelihood.compare(candidate, baseline)
    assert report["n"] == 3 and report["n_moved"] == 2  # the sample only the baseline has is left out
    assert report["own_loss_change"]["mean_diff"] == pytest.approx(-0.1)  # (0 - 0.1 - 0.2) / 3
    assert report["own_loss_change_where_moved"]["mean_diff"] == pytest.approx(-0.15)
    share = report["vectors_share"]  # population minus own: (0.1, 0.1, 0.3) against (0.1, 0, 0.2)
    assert share["candidate"]["mean_diff"] == pytest.approx(0.5 / 3)
    assert share["change"]["mean_diff"] == pytest.approx(0.2 / 3)
    texts_only = tmp_path / "rag.json"
    texts_only.write_text(json.dumps({"per_sample": [{"user_id": "u1", "item_id": "i", "own": 2.5}]}))
    assert "vectors_share" not in paired_likelihood.compare(str(texts_only), baseline)


def test_named_conditions_and_shares_pair_other_reports(tmp_path):
    """Round 30b's pairing: whose_history reports, the texts' share (another's texts minus own) per layout."""
    def whose(path: Path, rows: list[tuple[str, float, float]]) -> str:
        path.write_text(json.dumps({"per_sample": [
            {"user_id": u, "item_id": "i", "own_texts_population": own, "other_texts_population": other}
            for u, own, other in rows]}))
        return str(path)
    quoted = whose(tmp_path / "quoted.json", [("u1", 3.0, 3.1), ("u2", 2.0, 2.3)])
    turns = whose(tmp_path / "turns.json", [("u1", 2.8, 3.0), ("u2", 1.8, 2.2)])
    report = paired_likelihood.compare(
        turns, quoted, own="own_texts_population",
        shares={"texts_share": ("other_texts_population", "own_texts_population")})
    assert report["own_loss_change"]["mean_diff"] == pytest.approx(-0.2)
    share = report["texts_share"]  # (0.2, 0.4) against (0.1, 0.3)
    assert share["candidate"]["mean_diff"] == pytest.approx(0.3)
    assert share["change"]["mean_diff"] == pytest.approx(0.1)
    assert "vectors_share" not in report
    assert paired_likelihood.parse_share("s=a-b") == ("s", ("a", "b"))
    with pytest.raises(Exception, match="NAME=MINUEND-SUBTRAHEND"):
        paired_likelihood.parse_share("a-b")
