"""The bundled models end to end: SmolLM2-135M (GGUF) + all-MiniLM-L6-v2 + the shipped adapter."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dep_engine import DEPEngine, PersonalizationSettings, SamplingSettings
from dep_engine.engine import BUNDLED_ADAPTER

ROOT = Path(__file__).resolve().parent.parent


def looks_like_text(text: str, min_words: int = 5) -> bool:
    words = text.split()
    return len(words) >= min_words and sum(bool(re.fullmatch(r"[A-Za-z,.'!?-]+", w)) for w in words) >= len(words) / 2


@pytest.fixture(scope="module")
def engine():
    return DEPEngine(progress=False)


def test_bundled_user_gets_two_real_reviews(engine):
    assert engine.adapter_trained and engine.llm.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert engine.encoder.name == "sentence-transformers/all-MiniLM-L6-v2" and engine.store.dim == 386
    user = max(engine.users, key=lambda u: len(engine.users[u]))
    request = engine.user_request(user)
    result = engine.generate(request, ("nonperso", "dep"), PersonalizationSettings(k=4),
                             SamplingSettings(max_new_tokens=40, seed=0))
    assert looks_like_text(result.texts["nonperso"]) and looks_like_text(result.texts["dep"])
    assert result.texts["nonperso"] != result.texts["dep"]
    assert result.context.k == 4 and all(s.peers for s in result.context.selected)
    assert not any("UNTRAINED" in note for note in result.notes)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dep_engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_generates_deterministically_and_reports_bad_input(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("item_title,rating,review_title,review_text\n"
                       "Snark SN-5 Tuner,5,Great tuner,Clips on fast and reads every string even on stage.\n"
                       "Ernie Ball Regular Slinky strings,4,Good strings,Bright tone but they lose it after a month.\n")
    args = ["generate", "--history", str(history), "--item-title", "Dunlop Tortex picks, 12 pack",
            "--rating", "4", "--review-title", "Good grip", "--max-new-tokens", "24", "--seed", "3"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "=== generic ===" in first.stdout and "=== dep ===" in first.stdout and "UNTRAINED" not in first.stdout
    body = first.stdout.split("=== dep ===")[1].split("timings:")[0]
    assert looks_like_text(body, 3)
    assert first.stdout.split("timings:")[0] == second.stdout.split("timings:")[0]
    bad = run_cli("generate", "--history", str(history), "--max-new-tokens", "4")
    assert bad.returncode == 2 and "--item-title is needed" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bundled_adapter_matches_the_bundled_models():
    import json

    config = json.loads((BUNDLED_ADAPTER / "adapter_config.json").read_text())
    assert config["trained"] and config["style_features"] and config["embedding_dim"] == 386
    assert config["training"]["shuffled_user_control"]["n"] >= 100
