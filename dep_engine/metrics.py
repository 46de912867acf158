"""Evaluation metrics for generated reviews, computed offline with the standard libraries.

- ROUGE-1 and ROUGE-L F1 from Google's `rouge-score` (Porter stemming on, its own tokenizer),
  on a 0-1 scale.
- METEOR from `nltk.translate.meteor_score` (exact, Porter-stem and WordNet-synonym matches),
  on a 0-1 scale. Texts are lower-cased and split with `nltk.tokenize.wordpunct_tokenize`
  (the regular expression `\\w+|[^\\w\\s]+`: runs of letters/digits, runs of punctuation), because
  nltk's `word_tokenize` needs the punkt model, which cannot be downloaded here. WordNet comes from
  Debian's package through `dep_engine.wordnet.ensure_wordnet()`.
- BLEU from `sacrebleu` with its defaults (13a tokenizer, exponential smoothing for sentence BLEU),
  on sacrebleu's 0-100 scale: `sentence_bleu` per example, `corpus_bleu` for the corpus figure,
  which pools n-gram counts and so is not the mean of the sentence scores.

Differences between two systems are judged with a paired bootstrap over examples
(`paired_bootstrap`); `mean_ci` gives the bootstrap interval of one system's mean.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

METRICS = ("rouge1", "rougeL", "meteor", "bleu")

T = TypeVar("T")
_loading = threading.Lock()
_reading_wordnet = threading.Lock()  # nltk's WordNet reader seeks in shared files: one lookup at a time


def _loaded_once(load: Callable[[], T]) -> Callable[[], T]:
    """`load`, run once and one thread at a time. nltk imported from two threads at once fails on its
    circular imports, and stays broken for the rest of the process: its half-imported submodules are
    left behind. (Imports of other libraries in other threads can break it too: see `import_libraries`.)"""
    cached = lru_cache(maxsize=1)(load)

    def get() -> T:
        with _loading:
            return cached()

    return get


@_loaded_once
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@_loaded_once
def _wordnet() -> Any:
    """nltk's WordNet reader on the folder that `ensure_wordnet` builds, loaded once (about 2 s).

    It is nltk's own `WordNetCorpusReader` with one loading step skipped. On loading, nltk (3.9 and
    later) maps WordNet 3.0's synset offsets onto the loaded WordNet's for the multilingual OMW
    data, reading index.sense twice; it does so even when the loaded WordNet is 3.0 itself, and
    that takes longer (3-6 s here) than the rest of the load. English lookups, all that METEOR
    makes, never use the map, so the scores are the same as with `nltk.corpus.wordnet`.
    """
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from .wordnet import ensure_wordnet

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, *args: Any, **kwargs: Any) -> None:
            return None  # what nltk returns when no mapping is needed

    ensure_wordnet()
    with warnings.catch_warnings():
        # no OMW reader is given: "The multilingual functions are not available ..."
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return EnglishWordNet(nltk.data.find("corpora/wordnet"), None)


@_loaded_once
def _nltk_functions() -> tuple[Callable, Callable]:
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.meteor_score import meteor_score

    return wordpunct_tokenize, meteor_score


def import_libraries() -> None:
    """Imports every library the metrics use, in the calling thread (1-2 s, once per process).

    Call it before other threads may import anything, as the app does on start before it loads WordNet
    in the background. nltk imports scikit-learn, SciPy and pandas; when another thread imports parts
    of those at the same moment (sentence-transformers imports `sklearn.metrics`), Python's escape from
    an import deadlock hands one thread a half-made module, and nltk stays broken for the process.
    """
    import nltk.corpus.reader.wordnet  # noqa: F401 - what `_wordnet` reads with
    import sacrebleu.tokenizers.tokenizer_13a  # noqa: F401 - BLEU's tokenizer, otherwise imported on first use

    from . import wordnet  # noqa: F401

    _rouge()
    _nltk_functions()


def tokenize(text: str) -> list[str]:
    """METEOR's tokens: lower-cased `wordpunct_tokenize` (no model needed, unlike `word_tokenize`)."""
    wordpunct_tokenize, _ = _nltk_functions()
    return wordpunct_tokenize(text.lower())


def meteor(hyp: str, ref: str) -> float:
    """nltk's METEOR of one hypothesis against one reference; 0 when either has no tokens."""
    hyp_tokens, ref_tokens = tokenize(hyp), tokenize(ref)
    if not hyp_tokens or not ref_tokens:
        return 0.0
    _, meteor_score = _nltk_functions()
    wordnet = _wordnet()
    with _reading_wordnet:
        return float(meteor_score([ref_tokens], hyp_tokens, wordnet=wordnet))


def score(hyp: str, ref: str) -> dict[str, float]:
    """All metrics of one example: rouge1, rougeL, meteor (0-1) and sentence bleu (0-100)."""
    import sacrebleu

    if not hyp.strip() or not ref.strip():
        # Nothing to match: every metric is 0 (the libraries agree; this also skips their work).
        return {name: 0.0 for name in METRICS}
    rouge = _rouge().score(ref, hyp)  # rouge-score takes (target, prediction)
    return {
        "rouge1": float(rouge["rouge1"].fmeasure),
        "rougeL": float(rouge["rougeL"].fmeasure),
        "meteor": meteor(hyp, ref),
        "bleu": float(sacrebleu.sentence_bleu(hyp, [ref]).score),
    }


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def score_many(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """Per-example metric lists (same keys as `score`), ready for `mean_ci` and `paired_bootstrap`."""
    _check_pairs(hyps, refs)
    out: dict[str, list[float]] = {name: [] for name in METRICS}
    for hyp, ref in zip(hyps, refs):
        for name, value in score(hyp, ref).items():
            out[name].append(value)
    return out


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100), one reference per hypothesis: the figure papers report."""
    import sacrebleu

    _check_pairs(hyps, refs)
    if not hyps:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def _as_vector(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples of `x` drawn with replacement, in chunks of bounded memory."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, min(n_resamples, 4_000_000 // n))  # at most ~32 MB of indices at a time
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_ci(values: Sequence[float], n_resamples: int = 2000, seed: int = 0,
            confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its percentile-bootstrap confidence interval."""
    x = _as_vector(values, "values")
    low, high = _percentile_interval(_bootstrap_means(x, n_resamples, seed), confidence)
    return float(x.mean()), low, high


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, float]:
    """Percentile-bootstrap interval of mean(a - b) for two systems scored on the same examples.

    Resampling examples (not each system separately) keeps the pairing, so the per-example
    difficulty both systems share cancels out and the interval is as narrow as the data allow.
    An interval that excludes 0 means the difference is unlikely to be resampling noise.
    Returns mean_diff, low and high. Deterministic for a given seed.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples differ in length: {x.size} and {y.size}")
    diff = x - y
    low, high = _percentile_interval(_bootstrap_means(diff, n_resamples, seed), confidence)
    return {"mean_diff": float(diff.mean()), "low": low, "high": high}
