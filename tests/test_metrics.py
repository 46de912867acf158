"""Evaluation metrics against the libraries' reference values, the offline WordNet, the bootstrap.

Expected values are either worked out by hand (the arithmetic is in the comments) or taken from
nltk's own documentation and doctests, which were computed with the official nltk WordNet.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dep_engine import metrics, wordnet as wnbuild


def meteor_value(matches: int, hyp_len: int, ref_len: int, chunks: int) -> float:
    """METEOR as nltk defines it (alpha 0.9, beta 3, gamma 0.5), for hand-worked cases."""
    p, r = matches / hyp_len, matches / ref_len
    fmean = p * r / (0.9 * p + 0.1 * r)
    return fmean * (1 - 0.5 * (chunks / matches) ** 3)


@pytest.fixture(scope="module")
def wn():
    """nltk's WordNet reader on the folder built from Debian's package (built here if needed)."""
    return metrics._wordnet()


# ---------------------------------------------------------------- the WordNet folder


def test_lexnames_is_wordnet_30_list():
    lines = wnbuild.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[1] == "01\tadj.pert\t3" and lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.Tops\t1" and lines[28] == "28\tnoun.time\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[43] == "43\tverb.weather\t2" and lines[44] == "44\tadj.ppl\t3"
    category = {"noun": "1", "verb": "2", "adj": "3", "adv": "4"}
    for i, line in enumerate(lines):
        number, name, pos = line.split("\t")
        assert number == f"{i:02d}" and pos == category[name.split(".")[0]]
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")  # WordNet's own documentation, where installed
    if man.is_file():
        documented = re.findall(r"^(\d\d)\t(\S+)", gzip.open(man, "rt").read(), re.M)
        assert [(n, name) for n, name, _ in (line.split("\t") for line in lines)] == documented


def test_build_is_idempotent(tmp_path, capsys):
    target = tmp_path / "nltk_data"
    assert wnbuild.main(["--nltk-data", str(target)]) == 0
    folder = target / "corpora" / "wordnet"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(wnbuild.COPIED_FILES + ("lexnames",))
    for name in wnbuild.COPIED_FILES:
        assert (folder / name).read_bytes() == (wnbuild.DEBIAN_WORDNET / name).read_bytes()
    # nltk refuses data that other accounts could rewrite
    assert all((p.stat().st_mode & 0o022) == 0 for p in [target, folder, *folder.iterdir()])
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    capsys.readouterr()

    assert wnbuild.main(["--nltk-data", str(target)]) == 0
    assert capsys.readouterr().out.strip().endswith("up to date")
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stamps

    (folder / "lexnames").write_text("00\tadj.all\t3\n")  # damaged files are repaired, and only they
    (folder / "adv.exc").unlink()
    os.chmod(folder / "verb.exc", 0o664)
    os.chmod(folder, 0o775)
    assert wnbuild.build_wordnet(target) == ["adv.exc", "verb.exc", "lexnames"]
    assert all((p.stat().st_mode & 0o022) == 0 for p in [folder, *folder.iterdir()])
    assert (folder / "lexnames").read_text() == wnbuild.lexnames_text()
    assert wnbuild.build_wordnet(target) == []


def test_missing_debian_wordnet_gives_clear_error(tmp_path, capsys):
    assert wnbuild.main(["--nltk-data", str(tmp_path / "d"), "--source", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "wordnet-base" in err and "wordnet-sense-index" in err and "setup.sh --dev" in err
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "data.noun").write_text("")
    with pytest.raises(wnbuild.WordNetMissing, match="index.sense"):
        wnbuild.build_wordnet(tmp_path / "d", tmp_path / "partial")


def test_ensure_wordnet_points_nltk_at_the_folder(wn):
    import nltk

    folder = str(wnbuild.NLTK_DATA.resolve())
    assert nltk.data.path[0] == folder and folder in os.environ["NLTK_DATA"].split(os.pathsep)
    assert Path(nltk.data.find("corpora/wordnet")) == Path(folder) / "corpora" / "wordnet"


def test_wordnet_matches_nltk_reference_values(wn):
    # nltk's wordnet.doctest, run on the official download
    assert wn.get_version() == "3.0"
    assert [s.name() for s in wn.synsets("dog")] == [
        "dog.n.01", "frump.n.01", "dog.n.03", "cad.n.01", "frank.n.02", "pawl.n.01", "andiron.n.01", "chase.v.01"]
    assert wn.synset("dog.n.01").lemma_names() == ["dog", "domestic_dog", "Canis_familiaris"]
    assert wn.synset("dog.n.01").offset() == 2084071
    assert wn.synset("dog.n.01").examples() == ["the dog barked all night"]
    assert wn.synset("dog.n.01").lexname() == "noun.animal"  # read through the written lexnames
    assert wn.synset("chase.v.01").lexname() == "verb.motion"
    assert "fast" in {name for s in wn.synsets("quick") for name in s.lemma_names()}
    # Debian's rebuild drops WordNet 3.0's restrain.v.01 <-> inhibit.v.04 loop (nltk's doctest
    # lists inhibit.v.04 among the hyponyms); if this fails, the package changed: recheck METEOR
    assert sorted(s.name() for s in wn.synset("restrain.v.01").hyponyms()) == [
        "confine.v.03", "control.v.02", "hold.v.36"]
    assert [s.name() for s in wn.synset("inhibit.v.04").hypernyms()] == ["suppress.v.04"]


# ---------------------------------------------------------------- METEOR


def test_meteor_uses_wordnet_synonyms(wn):
    # 4 of 4 words match in one chunk when 'fast' counts for 'quick' ...
    with_synonym = metrics.score("the car is fast", "the car is quick")["meteor"]
    assert with_synonym == pytest.approx(meteor_value(4, 4, 4, 1)) == pytest.approx(0.9921875)
    # ... 3 of 4 when the word is unrelated
    without = metrics.score("the car is slow", "the car is quick")["meteor"]
    assert without == pytest.approx(meteor_value(3, 4, 4, 1)) == pytest.approx(0.7361111111)
    assert with_synonym > without


def test_meteor_matches_nltk_documented_values(wn):
    from nltk.translate.meteor_score import meteor_score, single_meteor_score

    # the examples in nltk.translate.meteor_score's docstrings
    hyp1 = ["It", "is", "a", "guide", "to", "action", "which", "ensures", "that", "the", "military", "always",
            "obeys", "the", "commands", "of", "the", "party"]
    ref1 = ["It", "is", "a", "guide", "to", "action", "that", "ensures", "that", "the", "military", "will",
            "forever", "heed", "Party", "commands"]
    ref2 = ["It", "is", "the", "guiding", "principle", "which", "guarantees", "the", "military", "forces",
            "always", "being", "under", "the", "command", "of", "the", "Party"]
    ref3 = ["It", "is", "the", "practical", "guide", "for", "the", "army", "always", "to", "heed", "the",
            "directions", "of", "the", "party"]
    assert round(single_meteor_score(ref1, hyp1, wordnet=wn), 4) == 0.6944
    assert round(meteor_score([ref1, ref2, ref3], hyp1, wordnet=wn), 4) == 0.6944
    # nltk's meteor.doctest (Wikipedia's examples), through this module's tokenizer
    assert metrics.meteor("The cat sat on the mat", "The cat sat on the mat") == pytest.approx(
        meteor_value(6, 6, 6, 1))  # 0.99768..., the doctest's 0.9977
    assert metrics.meteor("on the mat sat the cat", "The cat sat on the mat") == 0.5
    assert round(metrics.meteor("The cat was sat on the mat", "The cat sat on the mat"), 4) == 0.9654
    assert round(metrics.meteor("creates or updates a virtual machine scale set", "create or update a vm set"),
                 4) == 0.7806
    assert metrics.meteor("John loves Mary", "The candidate has no alignment to any of the references") == 0.0


def test_meteor_tokenizer_splits_punctuation_and_lowercases():
    assert metrics.tokenize("Great strings, DON'T buzz!") == ["great", "strings", ",", "don", "'", "t", "buzz", "!"]
    # 'mat.' and 'mat .' give the same 7 tokens: one chunk of 7 matches
    assert metrics.meteor("The cat sat on the mat.", "the cat sat on the mat .") == pytest.approx(
        meteor_value(7, 7, 7, 1))


# ---------------------------------------------------------------- ROUGE and BLEU


def test_identical_strings_score_full_marks(wn):
    s = metrics.score("The strings sound bright and stay in tune.", "The strings sound bright and stay in tune.")
    assert s["rouge1"] == 1.0 and s["rougeL"] == 1.0
    assert s["bleu"] == pytest.approx(100.0)
    assert s["meteor"] == pytest.approx(meteor_value(9, 9, 9, 1))  # 0.99931..., not exactly 1
    assert s["meteor"] < 1.0


def test_rouge_hand_computed():
    # 4 of 6 unigrams shared (the x2, sat, on): P = R = F1 = 2/3; the LCS 'the sat on the' also has 4
    s = metrics.score("the dog sat on the log", "the cat sat on the mat")
    assert s["rouge1"] == pytest.approx(2 / 3) and s["rougeL"] == pytest.approx(2 / 3)
    # same words, new order: ROUGE-1 is 1, the longest common subsequence has 3 of 6 words
    s = metrics.score("on the mat the cat sat", "the cat sat on the mat")
    assert s["rouge1"] == 1.0 and s["rougeL"] == pytest.approx(0.5)
    # Porter stemming: cat/cats and runs/running match; P = 3/3, R = 3/4, F1 = 6/7
    assert metrics.score("the cat runs", "the cats are running")["rouge1"] == pytest.approx(6 / 7)


def test_bleu_hand_computed():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: BLEU = (1/12) ** (1/4)
    one = metrics.score("the cat sat on the mat", "the cat sat on a mat")["bleu"]
    assert one == pytest.approx(100 * (1 / 12) ** 0.25)  # 53.73
    hyps, refs = ["the cat sat on the mat", "a b c d"], ["the cat sat on a mat", "a b c d"]
    # the corpus figure pools counts: 9/10, 6/8, 4/6, 2/4
    corpus = metrics.corpus_bleu(hyps, refs)
    assert corpus == pytest.approx(100 * (0.9 * 0.75 * (4 / 6) * 0.5) ** 0.25)  # 68.87
    sentence = metrics.score_many(hyps, refs)["bleu"]
    assert sentence == pytest.approx([100 * (1 / 12) ** 0.25, 100.0])
    assert corpus != pytest.approx(np.mean(sentence))
    assert metrics.corpus_bleu([], []) == 0.0


def test_empty_hypothesis_scores_zero(wn):
    zeros = {"rouge1": 0.0, "rougeL": 0.0, "meteor": 0.0, "bleu": 0.0}
    assert metrics.score("", "The tuner holds pitch well.") == zeros
    assert metrics.score("  \n", "The tuner holds pitch well.") == zeros
    many = metrics.score_many(["", "the car is fast"], ["a reference", "the car is quick"])
    assert set(many) == set(metrics.METRICS) and all(len(v) == 2 for v in many.values())
    assert many["meteor"] == pytest.approx([0.0, 0.9921875]) and many["rouge1"] == pytest.approx([0.0, 0.75])
    with pytest.raises(ValueError):
        metrics.score_many(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.corpus_bleu(["a"], [])


TWO_THREADS = """
import importlib.abc, sys, threading, time

class SlowNltk(importlib.abc.MetaPathFinder):  # widens the window in which nltk is half-imported
    def find_spec(self, name, path, target=None):
        if name == "nltk.collocations":
            time.sleep(1.0)

sys.meta_path.insert(0, SlowNltk())
from dep_engine import metrics

pairs = [("the strings sound bright and the neck feels fast", "bright tone, quick neck and good strings"),
         ("a sturdy stand that holds my bass", "solid stand, it carries the heavy guitar well"),
         ("cheap cable that crackles", "the cord is noisy and inexpensive")] * 40
results, errors = {}, []

def work(name, measure):
    try:
        results[name] = [measure(h, r) for h, r in pairs]
    except Exception as err:
        errors.append(repr(err)[:200])

threads = [threading.Thread(target=work, args=("score", metrics.score)),   # imports rouge-score, then nltk
           threading.Thread(target=work, args=("meteor", metrics.meteor))]  # imports nltk's METEOR first
threads[0].start(); time.sleep(0.5); threads[1].start()
for thread in threads:
    thread.join()
assert not errors, errors
alone = [metrics.score(h, r) for h, r in pairs]
assert results["score"] == alone and results["meteor"] == [s["meteor"] for s in alone]
print("meteor", alone[0]["meteor"])
"""


def test_two_threads_can_score_at_once(wn):
    # The app warms the metrics in a background thread while a first request may score, and Gradio runs
    # different events in parallel. Unguarded, nltk's import failed on its circular imports (and stayed
    # broken for the process), and its WordNet reader, which seeks in shared files, misread lines.
    run = subprocess.run([sys.executable, "-c", TWO_THREADS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 0 < float(run.stdout.split()[-1]) < 1


# ---------------------------------------------------------------- bootstrap


def paired_sample(n: int, true_diff: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two systems on the same n examples: a shared per-example difficulty plus small noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.5, 0.2, n)
    b = difficulty + rng.normal(0, 0.05, n)
    a = difficulty + true_diff + rng.normal(0, 0.05, n)
    return a, b


def test_paired_bootstrap_contains_true_difference():
    a, b = paired_sample(400, 0.03, seed=1)
    r = metrics.paired_bootstrap(a, b)
    assert r["mean_diff"] == pytest.approx(np.mean(a - b))
    assert r["low"] < 0.03 < r["high"] and r["low"] > 0  # the difference is found, and not by chance
    # half-width close to the normal approximation 1.96 * sd / sqrt(n)
    half = 1.96 * np.std(a - b, ddof=1) / math.sqrt(len(a))
    assert (r["high"] - r["low"]) / 2 == pytest.approx(half, rel=0.1)


def test_paired_bootstrap_coverage():
    # over many synthetic samples the 95% interval holds the true difference about 95% of the time
    hits = 0
    for seed in range(200):
        a, b = paired_sample(60, 0.02, seed=seed)
        r = metrics.paired_bootstrap(a, b, n_resamples=1000, seed=seed)
        hits += r["low"] <= 0.02 <= r["high"]
    assert 0.89 <= hits / 200 <= 0.99


def test_paired_bootstrap_narrows_with_more_samples_and_uses_pairing():
    widths = {}
    for n in (100, 1600):
        r = metrics.paired_bootstrap(*paired_sample(n, 0.02, seed=7))
        widths[n] = r["high"] - r["low"]
    assert 0.18 < widths[1600] / widths[100] < 0.33  # about 1/sqrt(16)
    # the shared difficulty cancels: the paired interval is far narrower than either system's own
    a, b = paired_sample(400, 0.02, seed=3)
    _, low_a, high_a = metrics.mean_ci(a)
    r = metrics.paired_bootstrap(a, b)
    assert (r["high"] - r["low"]) < 0.4 * (high_a - low_a)


def test_bootstrap_is_deterministic_for_a_seed():
    a, b = paired_sample(200, 0.01, seed=5)
    assert metrics.paired_bootstrap(a, b, seed=11) == metrics.paired_bootstrap(a, b, seed=11)
    assert metrics.paired_bootstrap(a, b, seed=11) != metrics.paired_bootstrap(a, b, seed=12)
    assert metrics.mean_ci(a, seed=4) == metrics.mean_ci(list(a), seed=4)


def test_mean_ci():
    values = np.random.default_rng(0).normal(10.0, 2.0, 900)
    mean, low, high = metrics.mean_ci(values, confidence=0.9)
    assert mean == pytest.approx(values.mean())
    half = 1.645 * values.std(ddof=1) / 30  # 90% normal-approximation half-width
    assert low < mean < high and (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert metrics.mean_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            metrics.mean_ci(bad)
    with pytest.raises(ValueError):
        metrics.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        metrics.mean_ci([1.0, 2.0], confidence=95)
