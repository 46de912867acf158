"""Text encoder (sentence-transformers) and an on-disk cache of embeddings keyed by encoder and content."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write
from .choices import StyleFeatures, choice
from .paths import bundled_encoder_path, default_cache_dir

log = logging.getLogger(__name__)

BUNDLED_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_encoder(name: str) -> str:
    """A local folder, or the bundled copy for the default id; other ids go to the hub (online)."""
    if name == BUNDLED_ENCODER and (local := bundled_encoder_path()) is not None:
        return str(local)
    return name


class Encoder:
    """L2-normalised sentence embeddings; `name` is what adapters record to detect a mismatch.

    The model loads on first use: a pool whose embeddings are all cached never needs it."""

    def __init__(self, name: str = BUNDLED_ENCODER, device: str = "cpu", batch_size: int = 64):
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._dim: int | None = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = resolve_encoder(self.name)
            if Path(path).is_dir():
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._model = SentenceTransformer(path, device=self.device, model_kwargs={"use_safetensors": True})
            self._dim = int(self._model.get_embedding_dimension())
        return self._model

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.model  # noqa: B018 - loading the model sets the dimension
        return self._dim

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)


STYLE_SCALE = 0.25  # style features sit at about the size of one embedding's strongest coordinates
_FIRST_PERSON = {"i", "me", "my", "mine", "myself", "i'm", "i've", "i'd", "i'll", "im", "ive"}
_OPENINGS = ({"i", "i'm", "i've", "my", "we"}, {"this", "these", "the", "it", "they"},
             {"great", "good", "nice", "excellent", "love", "awesome", "perfect", "best"})


def style_set(value: bool | str | None) -> StyleFeatures:
    """A style-feature set by name; True and False are the names older adapters saved."""
    name = "rating-length" if value is True else "none" if value is None or value is False else value
    return choice(StyleFeatures, name, "style features")


def _voice(text: str) -> list[float]:
    """How a review is written, from its text alone: sentence length, ! and ? per sentence,
    first-person words, capitals, vocabulary richness, and the kind of word it opens with."""
    words = re.findall(r"[\w']+", text)
    lower = [w.lower() for w in words]
    sentences = max(1, len(re.findall(r"[.!?]+", text)))
    letters = [c for c in text if c.isalpha()]
    head = lower[:50]
    first = lower[0] if lower else ""
    return [np.log1p(len(words) / sentences) - 2.5,
            min(1.0, text.count("!") / sentences),
            min(1.0, text.count("?") / sentences),
            min(1.0, 10 * sum(w in _FIRST_PERSON for w in lower) / max(1, len(lower))),
            min(1.0, 10 * sum(c.isupper() for c in letters) / max(1, len(letters))),
            (len(set(head)) / len(head) - 0.75) * 4 if head else 0.0,
            *(float(first in group) for group in _OPENINGS)]


def style_features(ratings: Sequence[float], texts: Sequence[str], voice: bool = False) -> np.ndarray:
    """(N, F) features a text embedding cannot hold: rating and length, and with `voice` also how the
    text is written (`_voice`; the voice check's measure, `voice.py`).

    Text embeddings are L2-normalised and mostly encode topic, so a user who writes three lines and
    one who writes three pages, or one who shouts and one who hedges, look alike; appended to the
    embedding, these let his and diff vectors carry how this user writes, against their peers.
    Fixed transforms (not fitted to the pool), so a pasted review gets the same features as a pool one."""
    rating = (np.asarray(ratings, dtype=np.float32) - 3.0) / 2.0
    length = np.log1p(np.asarray([len(t.split()) for t in texts], dtype=np.float32)) - 4.0
    columns = [rating[:, None], length[:, None]]
    if voice:
        columns.append(np.array([_voice(t) for t in texts], dtype=np.float32).reshape(len(texts), -1))
    return STYLE_SCALE * np.hstack(columns).astype(np.float32)


def content_key(encoder_name: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(encoder_name.encode())
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8", "replace"))
    return digest.hexdigest()[:24]


def writable_dir(preferred: Path) -> Path:
    """`preferred` if it can be written, else the user cache (data folders may be read-only)."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=preferred):
            return preferred
    except OSError:
        fallback = default_cache_dir() / "embeddings"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


CACHE_BLOCK = 4096  # texts per cache file: appending reviews to a pool re-embeds only the last block


def cached_encode(encoder: Encoder, texts: Sequence[str], cache_dir: Path, label: str = "pool",
                  progress: bool = True) -> np.ndarray:
    """Embeddings of `texts`, read from `cache_dir` where this encoder saw exactly these texts before.

    Cached in blocks keyed by encoder and content; a damaged or mismatched file is rebuilt, never trusted."""
    cache_dir = writable_dir(Path(cache_dir))
    blocks = [_cached_block(encoder, texts[start:start + CACHE_BLOCK], cache_dir, label, progress)
              for start in range(0, len(texts), CACHE_BLOCK)]
    return np.concatenate(blocks) if blocks else np.zeros((0, encoder.dim), dtype=np.float32)


def _cached_block(encoder: Encoder, texts: Sequence[str], cache_dir: Path, label: str, progress: bool) -> np.ndarray:
    safe_encoder = "".join(ch if ch.isalnum() else "-" for ch in encoder.name)[-60:]
    path = cache_dir / f"{label}-{safe_encoder}-{content_key(encoder.name, texts)}.npy"
    if path.exists():
        try:
            vectors = np.load(path, allow_pickle=False)
            dim_ok = encoder._dim is None or vectors.shape[1:] == (encoder._dim,)
            if vectors.ndim == 2 and len(vectors) == len(texts) and dim_ok and vectors.dtype == np.float32 \
                    and np.isfinite(vectors).all():
                encoder._dim = vectors.shape[1]
                return vectors
            log.warning("embedding cache %s has the wrong shape or values; rebuilding", path)
        except (OSError, ValueError, EOFError) as err:
            log.warning("embedding cache %s is damaged (%s); rebuilding", path, err)
    vectors = encoder.encode(texts, progress=progress)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            np.save(out, vectors, allow_pickle=False)

    atomic_write(path, write)
    return vectors
