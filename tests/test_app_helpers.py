"""The demo's helpers (demo/): input handling and evidence, without models or a server."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from demo import evidence
from demo.inputs import mode_for, mode_hint, read_upload, table_message, table_to_text
from dep_engine import DataError, parse_history


@pytest.mark.parametrize("signals, mode", [
    (["texts"], "rag"), (["his"], "his"), (["diff"], "diff"), (["his", "diff"], "his+diff"),
    (["texts", "his", "diff"], "dep"), (["diff", "texts", "his"], "dep"),
])
def test_signals_map_to_modes(signals, mode):
    assert mode_for(signals) == mode


@pytest.mark.parametrize("signals, message", [
    ([], "at least one signal"), (None, "at least one signal"), (["texts", "his"], "has no mode"),
    (["texts", "diff"], "has no mode"), (["words"], "unknown signal"),
])
def test_signal_combinations_without_a_mode_are_refused(signals, message):
    with pytest.raises(DataError, match=message):
        mode_for(signals)
    assert "⚠️" in mode_hint(signals)


def test_table_rows_become_a_history_with_row_numbers_in_errors():
    rows = [["Snark SN1 Guitar Tuner", 5, "Fast", "Grabs the note quickly."], ["", None, "", ""],
            ["A pedal", 4.0, "", "Warm and quiet."]]
    reviews, items = parse_history(table_to_text(rows), user_id="you")
    assert [r.rating for r in reviews] == [5.0, 4.0]
    assert {i.title for i in items.values()} == {"Snark SN1 Guitar Tuner", "A pedal"}
    bad = [["A", 4, "", "fine"], ["", None, "", ""], ["B", float("nan"), "", "no rating"]]
    with pytest.raises(DataError) as caught:
        parse_history(table_to_text(bad), user_id="you")
    assert table_message(caught.value).startswith("table, row 3: ")


def test_an_empty_table_is_refused():
    with pytest.raises(DataError, match="table: it is empty"):
        table_to_text([["", None, "", ""]] * 3)


def test_uploads(tmp_path):
    text = '{"asin": "B1", "overall": 5, "reviewText": "good"}\n'
    plain = tmp_path / "h.jsonl"
    plain.write_text(text, encoding="utf-8")
    assert read_upload(plain) == text
    packed = tmp_path / "h.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert read_upload(packed) == text
    binary = tmp_path / "h.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    with pytest.raises(DataError, match="not a text file"):
        read_upload(binary)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("item_title,rating\nCaf\xe9,5\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_upload(latin)


def test_distinctive_terms_favour_habits_over_one_review():
    user = ["The warm tone of this pedal is lovely.", "Warm tone, low noise.", "Tone tone tone tone knob."]
    peers = ["Great price, fast shipping.", "Works great for the price.", "Good tone for the price."] * 3
    mine, theirs = evidence.distinctive_terms(user, peers, top=5)
    assert mine[0].term in ("warm", "warm tone") and mine[0].user_count == 2
    assert "knob" not in [t.term for t in mine]  # one review only
    assert {"price", "great"} & {t.term for t in theirs}
    assert all(t.z > 0 for t in mine) and all(t.z < 0 for t in theirs)


def test_highlight_marks_words_and_phrases_and_escapes_html():
    pieces = evidence.highlight("The <b>Sound quality</b> is great; tone!", {"sound quality", "tone"})
    assert ("Sound quality", "distinctive") in pieces and ("tone", "distinctive") in pieces
    assert "".join(text for text, _ in pieces) == "The <b>Sound quality</b> is great; tone!"
    html = evidence.pieces_html(pieces)
    assert "&lt;b&gt;" in html and html.count("<mark") == 2


def test_metrics_table_bolds_a_unique_best():
    table = evidence.metrics_markdown({"a": {"rouge1": 0.2, "bleu": 0.0}, "b": {"rouge1": 0.3, "bleu": 0.0}},
                                      {"a": "Baseline", "b": "DEP"})
    assert "**0.300**" in table and "**0.00**" not in table
    assert "| ROUGE-1 | BLEU |" in table


def test_sae_figure():
    codes = np.abs(np.random.default_rng(0).normal(size=(3, 192))).astype(np.float32)
    figure = evidence.sae_figure(codes, codes / 2, ["#1 a", "#2 b", "#3 c"], untrained=True)
    assert len(figure.axes) == 3  # his, diff, colour bar
    labels = [label for ax in figure.axes for label in ax.get_yticklabels() + ax.get_xticklabels()]
    assert labels and min(label.get_fontsize() for label in labels) >= 10, "labels readable without zooming"
    assert evidence.sae_figure(np.zeros((0, 192)), np.zeros((0, 192)), []) is None


def test_timings_markdown_reports_the_measured_rate():
    text = evidence.timings_markdown({"adapter": 0.1, "first_token": 0.4, "generation": 2.0, "tokens_per_second": 10.0},
                                     outputs=2, startup=30)
    assert "| first token after | 0.40 |" in text and "**10.0** per output, 20.0 in all" in text and "30 s" in text
    assert "tokens_per_second |" not in text


def test_the_page_figures_come_from_the_adapters_evaluation(tmp_path):
    """The bundled adapter's pooled evaluation fills the page's figures; an adapter without one (or with a
    damaged one) gets the command that makes them, never numbers that are not its own."""
    import json

    from demo import texts
    from demo.measurements import Measurements
    from dep_engine.paths import BUNDLED_ADAPTER

    shipped = json.loads((BUNDLED_ADAPTER / "evaluation" / "pooled.json").read_text())
    bundled = Measurements.of_adapter(BUNDLED_ADAPTER)
    assert f"On {shipped['users']} held-out users (3 draws)" in bundled.summary
    assert f"{shipped['methods']['nonperso']['metrics']['meteor']['mean']:.3f}" in bundled.summary
    assert "the real reviews 33%" in bundled.voice_note
    assert Measurements.of_adapter(tmp_path) == Measurements(texts.NO_MEASUREMENTS, "")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "results.json").write_text('{"methods": {}}')
    assert Measurements.of_adapter(tmp_path).summary == texts.NO_MEASUREMENTS
