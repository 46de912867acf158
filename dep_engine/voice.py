"""Measures of a user's voice in generated reviews, beside ROUGE and METEOR (which mostly reward
topic words and length): does the text sound like *this* person?

- length: generated / real length ratio, and their correlation across users;
- attribution: rank the true author among N candidate users by how close the text is to each
  candidate's past reviews (MiniLM embedding plus standardized voice features); top-1 accuracy and
  MRR, chance 1/N and H_N/N, each as its exact expectation over every set of N - 1 other evaluated
  users (the same candidates for every method: all of them; no candidate draw's noise). The real
  reviews' own score is the ceiling: how much voice the data holds for this measure;
- own words: the share of the user's distinctive terms (log-odds against peers, `terms.py`) that
  the output uses;
- on-product: whether the output is closer to one of the past items in the prompt than to the
  target item (it drifted to another product).
Per-example values go through the same paired bootstrap as the metrics (`metrics.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Sequence

import numpy as np

from .data import Item, Review, Sample
from .embeddings import style_features
from .store import PersonalContext, ReviewStore
from .terms import distinctive_terms, term_counts, terms

CANDIDATES = 20
STYLE_WEIGHT = 0.5  # norm of the voice block beside the unit-norm text embedding


@dataclass
class Profiles:
    """Each evaluated user's voice: the centroid of their past reviews' vectors."""
    centroids: np.ndarray       # (U, D) normalised
    mean: np.ndarray            # style standardization, fitted on the pool
    std: np.ndarray


def _style(texts: list[str]) -> np.ndarray:
    """Voice features without the rating (every method is told the target rating)."""
    return style_features([3.0] * len(texts), texts, voice=True)[:, 1:]


def _vectors(text_embeddings: np.ndarray, styles: np.ndarray, profiles_mean: np.ndarray,
             profiles_std: np.ndarray) -> np.ndarray:
    z = (styles - profiles_mean) / profiles_std * (STYLE_WEIGHT / np.sqrt(styles.shape[1]))
    v = np.hstack([text_embeddings, z])
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-9)


def style_scale(store: ReviewStore) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the voice features over the pool, which put them on the text's scale."""
    pool_style = _style([r.text for r in store.reviews])
    return pool_style.mean(axis=0), pool_style.std(axis=0).clip(1e-6)


def build_profiles(store: ReviewStore, histories: Sequence[Sequence[Review]],
                   scale: tuple[np.ndarray, np.ndarray] | None = None) -> Profiles:
    """One centroid per history (a user's past reviews); `scale` from `style_scale`, computed if not given."""
    mean, std = scale or style_scale(store)
    centroids = []
    for history in histories:
        history = list(history)
        text = store.embed_reviews(history)[:, :store.text_dim]
        vectors = _vectors(text, _style([r.text for r in history]), mean, std)
        centroid = vectors.mean(axis=0)
        centroids.append(centroid / np.linalg.norm(centroid).clip(1e-9))
    return Profiles(np.array(centroids), mean, std)


def attribution_ranks(text_embeddings: np.ndarray, texts: list[str], profiles: Profiles,
                      candidates: list[list[int]]) -> np.ndarray:
    """Rank (1 = first) of each text's true author (candidates[i][0]) among its candidates."""
    vectors = _vectors(text_embeddings, _style(texts), profiles.mean, profiles.std)
    ranks = []
    for i, group in enumerate(candidates):
        scores = profiles.centroids[group] @ vectors[i]
        ranks.append(1 + int((scores[1:] > scores[0]).sum()))
    return np.array(ranks)


def attribution_chances(text_embeddings: np.ndarray, texts: list[str], profiles: Profiles,
                        size: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """Per text i (written by user i): its author's top-1 and reciprocal rank among `size` candidates,
    the author and `size` - 1 of the other users, each the exact expectation over every such set.

    If b of the other n - 1 users score above the author, the number of them in a set of k = size - 1
    is hypergeometric: top-1 is P(none) = C(n - 1 - b, k) / C(n - 1, k), and the reciprocal rank
    E[1 / (1 + drawn)]. Ties go to the author, as in `attribution_ranks`."""
    vectors = _vectors(text_embeddings, _style(texts), profiles.mean, profiles.std)
    scores = vectors @ profiles.centroids.T                     # (texts, users)
    others = len(profiles.centroids) - 1
    k = min(size, others + 1) - 1
    beaten = (scores > np.diag(scores)[:, None]).sum(axis=1)
    sets = comb(others, k)
    top1, reciprocal = [], []
    for b in beaten.tolist():
        drawn = [comb(b, x) * comb(others - b, k - x) / sets for x in range(min(b, k) + 1)]
        top1.append(drawn[0])
        reciprocal.append(sum(p / (1 + x) for x, p in enumerate(drawn)))
    return np.array(top1), np.array(reciprocal)


def own_word_share(text: str, user_terms: list[str]) -> float:
    """Share of the user's distinctive terms that the text uses (0 when the user has none)."""
    if not user_terms:
        return 0.0
    used = set(terms(text))
    return sum(t in used for t in user_terms) / len(user_terms)


def distinctive_user_terms(sample: Sample, context: PersonalContext, background) -> list[str]:
    peers = [p.text for s in context.selected for p in s.peers]
    mine, _ = distinctive_terms([r.text for r in sample.profile], peers, background, top=12)
    return [t.term for t in mine]


def drifted(text_embedding: np.ndarray, target: np.ndarray, past: np.ndarray) -> bool:
    """True when the text is closer to one of the prompt's past items than to the target item."""
    return closest_past_item(text_embedding, target, past) is not None


def closest_past_item(text_embedding: np.ndarray, target: np.ndarray, past: np.ndarray) -> int | None:
    """The index of the past item the text is closer to than to the target item, if any."""
    if not len(past):
        return None
    scores = past @ text_embedding
    best = int(scores.argmax())
    return best if scores[best] > target @ text_embedding else None


@dataclass
class VoiceCheck:
    """One output measured as `evaluate` measures every output, for a person to read beside it."""
    rank: int                   # the author's rank among `candidates` reviewers (1: closest to their past reviews)
    candidates: int
    drifted_to: str | None      # the past review's item the text is closer to than to the product, if any


def check_texts(store: ReviewStore, texts: Sequence[str], histories: Sequence[Sequence[Review]],
                target: Item, past_items: Sequence[Item],
                scale: tuple[np.ndarray, np.ndarray] | None = None) -> list[VoiceCheck]:
    """Attribution rank of the author (`histories[0]`; the others are the candidates beside them) and
    drift to a past item, for each text."""
    profiles = build_profiles(store, histories, scale)
    embeddings = store.encoder.encode(list(texts))
    everyone = list(range(len(histories)))
    ranks = attribution_ranks(embeddings, list(texts), profiles, [everyone] * len(texts))
    items = store.item_vectors([target, *past_items])
    out = []
    for rank, embedding in zip(ranks, embeddings):
        past = closest_past_item(embedding, items[0], items[1:])
        out.append(VoiceCheck(int(rank), len(histories), None if past is None else past_items[past].title))
    return out


@dataclass
class SampleVoice:
    """What the measures need of one evaluated sample, computed once for every method."""
    user_terms: list[str]
    target_item: np.ndarray     # (384,) encoder vector of the target item
    past_items: np.ndarray      # (K, 384) encoder vectors of the prompt's past items


def sample_voices(store: ReviewStore, samples: list[Sample], contexts: list[PersonalContext]) -> list[SampleVoice]:
    """Each sample's distinctive words (against word counts of the pool less every evaluated target, so that
    the texts being scored never shape the measure) and its items' vectors."""
    targets = {(s.target.user_id, s.target.item_id, s.target.timestamp) for s in samples}
    background = term_counts(r.text for r in store.reviews if (r.user_id, r.item_id, r.timestamp) not in targets)
    out = []
    for sample, context in zip(samples, contexts):
        items = [store.item(sample.target.item_id)] + [store.item(s.review.item_id) for s in context.selected]
        vectors = store.item_vectors(items)
        out.append(SampleVoice(distinctive_user_terms(sample, context, background), vectors[0], vectors[1:]))
    return out


def per_sample(texts: list[str], references: list[str], embeddings: np.ndarray, voices: list[SampleVoice],
               profiles: Profiles) -> dict[str, np.ndarray]:
    """Per-sample values of every voice measure for one method's texts (samples in one order, sample i
    written by profile i)."""
    top1, reciprocal = attribution_chances(embeddings, texts, profiles)
    words = np.array([len(t.split()) for t in texts], dtype=float)
    real = np.array([len(r.split()) for r in references], dtype=float)
    return {
        "top1": top1,
        "reciprocal_rank": reciprocal,
        "own_words": np.array([own_word_share(t, v.user_terms) for t, v in zip(texts, voices)]),
        "drifted": np.array([drifted(e, v.target_item, v.past_items) for e, v in zip(embeddings, voices)], float),
        "length_ratio": (words + 1) / (real + 1),
        "words": words,
        "real_words": real,
    }


def summary(values: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Means with bootstrap intervals, the length correlation, and chance levels."""
    from .metrics import mean_ci

    out = {}
    for name in ("top1", "reciprocal_rank", "own_words", "drifted"):
        mean, low, high = mean_ci(values[name], seed=seed)
        out[name] = {"mean": mean, "low": low, "high": high}
    # Attribution partly reads topic: a text about one of the user's past products is close to their past
    # reviews. Top-1 among on-product and among drifted texts apart shows how much of it is that.
    drift = values["drifted"].astype(bool)
    out["top1_by_product"] = {label: {"n": int(rows.sum()), "mean": float(values["top1"][rows].mean()) if rows.any() else None}
                              for label, rows in (("on_product", ~drift), ("drifted", drift))}
    out["length_ratio_median"] = float(np.median(values["length_ratio"]))
    words, real = values["words"], values["real_words"]
    out["length_correlation"] = float(np.corrcoef(words, real)[0, 1]) if words.std() and real.std() else 0.0
    return out


def chance(n_candidates: int = CANDIDATES) -> dict[str, float]:
    return {"top1": 1 / n_candidates, "reciprocal_rank": sum(1 / r for r in range(1, n_candidates + 1)) / n_candidates}

