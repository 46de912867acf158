"""The review pool: embeddings, user and item indexes, history selection and peers for one request.

Reviews are kept in user-major, time-sorted order so that the mean of any user's reviews before a
cut-off time is one subtraction of per-user running sums, and in an item-major order so that an
item's reviewers are one slice. Nothing at or after a request's cut-off enters its peers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Dataset, Item, Review
from .differences import difference_embeddings
from .embeddings import Encoder, cached_encode, style_features, style_set
from .choices import HistoryRule, choice
TIME_SPAN = 2**33  # larger than any timestamp in seconds, so (user, time) packs into one sortable int


@dataclass
class Peer:
    user_id: str
    item_id: str  # differs from the user's item when the item had no reviewers (cold start)
    text: str
    rating: float
    weight: float


@dataclass
class SelectedReview:
    review: Review
    item_title: str
    relevance: float
    peers: list[Peer]
    cold_start: bool  # peers came from the nearest items, as nobody else reviewed this one


@dataclass
class PersonalContext:
    """What personalizes one request: the chosen past reviews, their his and diff vectors, evidence."""
    selected: list[SelectedReview]
    his: np.ndarray   # (K, d) the user's own review embeddings
    diff: np.ndarray  # (K, d) difference embeddings against the peers
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.selected)

    def first(self, k: int) -> "PersonalContext":
        """The context of the K best past reviews: selection is ranked, so that is a prefix."""
        return PersonalContext(self.selected[:k], self.his[:k], self.diff[:k], self.notes)


def item_text(item: Item) -> str:
    return f"{item.title}. {item.description}".strip(" .") if item.description else item.title


def per_user_running_sums(embeddings: np.ndarray, user_start: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Row i: the sum of its user's rows up to and including i (rows are user-major).

    Summed in float64 for precision, a chunk of whole users at a time, so the float64 temporaries
    stay small (a million-review pool would otherwise need gigabytes of them)."""
    n = len(embeddings)
    out = np.empty(embeddings.shape, dtype=np.float32)
    starts = np.asarray(user_start, dtype=np.int64)
    bounds = np.unique(starts[np.minimum(np.searchsorted(starts, np.arange(0, n, chunk)), len(starts) - 1)]) \
        if n else starts
    for lo, hi in zip(bounds, np.append(bounds[1:], n)):
        local = starts[(starts >= lo) & (starts < hi)] - lo
        running = np.cumsum(embeddings[lo:hi], axis=0, dtype=np.float64)
        base = np.vstack([np.zeros((1, running.shape[1])), running[local[1:] - 1]])
        out[lo:hi] = running - np.repeat(base, np.diff(np.append(local, hi - lo)), axis=0)
    return out


class ReviewStore:
    def __init__(self, dataset: Dataset, embeddings: np.ndarray, encoder: Encoder,
                 item_ids: list[str], item_embeddings: np.ndarray, style: bool | str = "rating-length"):
        order = sorted(range(len(dataset.reviews)),
                       key=lambda i: (dataset.reviews[i].user_id, dataset.reviews[i].timestamp))
        self.encoder = encoder
        self.style = style_set(style)
        self.text_dim = embeddings.shape[1]
        self.items = dict(dataset.items)
        self.reviews: list[Review] = [dataset.reviews[i] for i in order]
        self.embeddings = self._with_style(np.ascontiguousarray(embeddings[order], dtype=np.float32), self.reviews)
        self.times = np.array([r.timestamp for r in self.reviews], dtype=np.int64)
        self.row_of = {(r.user_id, r.item_id): i for i, r in enumerate(self.reviews)}

        users = [r.user_id for r in self.reviews]
        starts = [i for i in range(len(users)) if i == 0 or users[i] != users[i - 1]]
        self.user_ids = [users[i] for i in starts]
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.user_start = np.array(starts, dtype=np.int64)
        self.user_of_row = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(users))))
        self.user_time_key = self.user_of_row.astype(np.int64) * TIME_SPAN + self.times  # sorted
        self.user_running_sum = per_user_running_sums(self.embeddings, self.user_start)

        by_item = sorted(range(len(self.reviews)), key=lambda i: (self.reviews[i].item_id, self.times[i]))
        self.item_rows = np.array(by_item, dtype=np.int64)
        self.item_slice: dict[str, tuple[int, int]] = {}
        for position, row in enumerate(by_item):
            item = self.reviews[row].item_id
            first, _ = self.item_slice.get(item, (position, position))
            self.item_slice[item] = (first, position + 1)

        self.item_ids = list(item_ids)
        self.item_position = {item: n for n, item in enumerate(self.item_ids)}
        self.item_embeddings = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        self._item_index = None
        self.title_to_item = {self.items[i].title.lower(): i for i in self.item_ids if i in self.items}

    @property
    def dim(self) -> int:
        """Size of a review vector: the text embedding, plus the style features if used."""
        return self.embeddings.shape[1]

    def _with_style(self, text_embeddings: np.ndarray, reviews: Sequence[Review]) -> np.ndarray:
        if self.style == "none":
            return text_embeddings
        features = style_features([r.rating for r in reviews], [r.text for r in reviews])
        return np.ascontiguousarray(np.hstack([text_embeddings, features]), dtype=np.float32)

    @classmethod
    def build(cls, dataset: Dataset, encoder: Encoder, cache_dir: str | Path, progress: bool = True,
              style: bool | str = "rating-length", extra: Dataset | None = None, extra_cache_dir: str | Path | None = None
              ) -> "ReviewStore":
        """Embed the pool (or read the cache) and index it; `style` names the style features appended.

        `extra` reviews join the pool; they are embedded and cached on their own (in
        `extra_cache_dir`), so the pool's cache stays valid."""
        parts = [(dataset, cache_dir)] + ([(extra, extra_cache_dir or cache_dir)] if extra else [])
        embeddings = np.concatenate([cached_encode(encoder, [r.text for r in part.reviews], Path(folder),
                                                   "reviews", progress) for part, folder in parts])
        parts = [part for part, _ in parts]
        pool = Dataset([r for part in parts for r in part.reviews], {k: v for part in parts for k, v in part.items.items()})
        item_ids = sorted({r.item_id for r in pool.reviews} | set(pool.items))
        item_texts = [item_text(pool.items.get(i, Item(i, i))) for i in item_ids]
        item_embeddings = cached_encode(encoder, item_texts, Path(cache_dir), "items", progress)
        return cls(pool, embeddings, encoder, item_ids, item_embeddings, style)

    # ---- users and items -------------------------------------------------------------------

    def without(self, reviews: Sequence[Review]) -> "ReviewStore":
        """The same pool less `reviews` (held-out targets that training must never see as peers),
        reusing the embeddings: nothing is encoded again."""
        drop = {(r.user_id, r.item_id, r.timestamp) for r in reviews}
        keep = [i for i, r in enumerate(self.reviews) if (r.user_id, r.item_id, r.timestamp) not in drop]
        pool = Dataset([self.reviews[i] for i in keep], self.items)
        return ReviewStore(pool, self.embeddings[keep, :self.text_dim], self.encoder, self.item_ids,
                           self.item_embeddings, self.style)

    @property
    def item_index(self):
        """Exact inner-product faiss index over item embeddings, built on first cold start."""
        if self._item_index is None:
            import faiss

            index = faiss.IndexFlatIP(self.item_embeddings.shape[1])
            index.add(self.item_embeddings)
            self._item_index = index
        return self._item_index

    def item(self, item_id: str, extra: dict[str, Item] | None = None) -> Item:
        """A catalog item, one from `extra` (a pasted history's own), or a bare id."""
        return self.items.get(item_id) or (extra or {}).get(item_id) or Item(item_id, item_id)

    def resolve_item(self, item: Item) -> Item:
        """A pasted item whose title matches a catalog item becomes that item, so its peers are found."""
        if item.item_id in self.item_position:
            return self.items.get(item.item_id, item)
        known = self.title_to_item.get(item.title.lower())
        return self.items[known] if known else item

    def embed_reviews(self, reviews: Sequence[Review]) -> np.ndarray:
        """Pool embeddings where the pool holds the same review, the encoder for the rest."""
        result = np.zeros((len(reviews), self.dim), dtype=np.float32)
        missing = []
        for n, review in enumerate(reviews):
            row = self.row_of.get((review.user_id, review.item_id))
            if row is not None and self.reviews[row] == review:
                result[n] = self.embeddings[row]
            else:
                missing.append(n)
        if missing:
            new = [reviews[n] for n in missing]
            result[missing] = self._with_style(self.encoder.encode([r.text for r in new]), new)
        return result

    def item_vectors(self, items: Sequence[Item]) -> np.ndarray:
        """Item embeddings: from the index where known, the others encoded in one batch."""
        vectors = np.zeros((len(items), self.item_embeddings.shape[1]), dtype=np.float32)
        unknown = []
        for n, item in enumerate(items):
            position = self.item_position.get(item.item_id)
            if position is None:
                unknown.append(n)
            else:
                vectors[n] = self.item_embeddings[position]
        if unknown:
            vectors[unknown] = self.encoder.encode([item_text(items[n]) for n in unknown])
        return vectors

    def item_vector(self, item: Item) -> np.ndarray:
        return self.item_vectors([item])[0]

    # ---- history selection -----------------------------------------------------------------

    def _peer_rows(self, item_id: str, user_id: str, cutoff: float, max_peers: int) -> np.ndarray:
        first, end = self.item_slice.get(item_id, (0, 0))
        rows = self.item_rows[first:end]
        rows = rows[(self.times[rows] < cutoff)]
        if len(rows) and user_id in self.user_index:
            rows = rows[self.user_of_row[rows] != self.user_index[user_id]]
        return rows[-max_peers:]

    def _cold_start_rows(self, vector: np.ndarray, item_id: str, user_id: str, cutoff: float, max_peers: int,
                         neighbour_items: int) -> np.ndarray:
        """Reviews of the items nearest to an item's `vector`, for an item nobody else reviewed."""
        found: list[np.ndarray] = []
        search = min(len(self.item_ids), 16 + neighbour_items * 4)
        _, neighbours = self.item_index.search(vector[None, :], search)
        for position in neighbours[0]:
            if position < 0 or self.item_ids[position] == item_id:
                continue
            rows = self._peer_rows(self.item_ids[position], user_id, cutoff, max_peers)
            if len(rows):
                found.append(rows)
            if len(found) == neighbour_items:
                break
        return np.concatenate(found)[-max_peers:] if found else np.zeros(0, dtype=np.int64)

    def select(self, profile: Sequence[Review], profile_embeddings: np.ndarray, target: Item,
               k: int, rule: str, cutoff: float, user_id: str) -> tuple[list[int], list[float]]:
        """Indexes into `profile` of the K reviews to use, and their relevance to the target.

        relevant: highest cosine between the target item's embedding and the review's embedding.
        recent: the paper's rule, the K newest reviews whose items have peers (newest others fill up)."""
        rule = choice(HistoryRule, rule, "history rule")
        relevance = profile_embeddings[:, :self.text_dim] @ self.item_vector(target) if len(profile) else np.zeros(0)
        if rule == "relevant":
            ranked = list(np.argsort(-relevance, kind="stable"))
        else:
            newest = list(range(len(profile) - 1, -1, -1))
            with_peers = [n for n in newest if len(self._peer_rows(profile[n].item_id, user_id, cutoff, 1))]
            ranked = with_peers + [n for n in newest if n not in with_peers]
        chosen, seen = [], set()
        for n in ranked:  # a review pasted or stored twice is shown once
            key = " ".join(profile[n].text.lower().split())
            if key not in seen:
                seen.add(key)
                chosen.append(int(n))
            if len(chosen) == k:
                break
        return chosen, [float(relevance[n]) for n in chosen]

    # ---- one request -----------------------------------------------------------------------

    def user_mean(self, rows: np.ndarray, cutoff: float) -> np.ndarray:
        """Mean embedding of each row's author over their reviews before `cutoff` (at least that row)."""
        users = self.user_of_row[rows]
        starts = self.user_start[users]
        keys = users.astype(np.int64) * TIME_SPAN + int(min(cutoff, TIME_SPAN - 1))
        counts = np.searchsorted(self.user_time_key, keys, "left") - starts
        return self.user_running_sum[starts + counts - 1] / counts[:, None]

    def context(self, profile: Sequence[Review], target: Item, k: int = 4, rule: str = "relevant",
                cutoff: float | None = None, temperature: float = 1.0, max_peers: int = 64,
                neighbour_items: int = 2, extra_items: dict[str, Item] | None = None) -> PersonalContext:
        """Select K past reviews and build their his and diff vectors.

        `profile` is the user's history before the target (pool users and pasted ones alike);
        `cutoff` keeps reviews written at or after it out of the peers (default: no limit)."""
        cutoff = float("inf") if cutoff is None else float(cutoff)
        dim = self.dim
        if not profile or k <= 0:
            note = "no history: nothing could be personalized" if not profile else "K = 0: no history used"
            return PersonalContext([], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32), [note])
        user_id = profile[0].user_id
        profile_embeddings = self.embed_reviews(profile)
        chosen, relevance = self.select(profile, profile_embeddings, self.resolve_item(target), k, rule, cutoff, user_id)
        user_mean = profile_embeddings.mean(axis=0)

        notes: list[str] = []
        items = [self.resolve_item(self.item(profile[n].item_id, extra_items)) for n in chosen]
        peer_rows = [self._peer_rows(item.item_id, user_id, cutoff, max_peers) for item in items]
        cold = [len(rows) == 0 for rows in peer_rows]
        cold_items = [i for i, is_cold in enumerate(cold) if is_cold]
        for i, vector in zip(cold_items, self.item_vectors([items[i] for i in cold_items])):
            peer_rows[i] = self._cold_start_rows(vector, items[i].item_id, user_id, cutoff, max_peers, neighbour_items)
        keep = [i for i, rows in enumerate(peer_rows) if len(rows)]
        if len(keep) < len(chosen):
            notes.append(f"{len(chosen) - len(keep)} past review(s) had no peers at all and were left out")
        if sum(cold):
            notes.append(f"{sum(cold)} past item(s) had no other reviewers; peers came from the nearest items")
        chosen = [chosen[i] for i in keep]
        if not chosen:
            return PersonalContext([], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32),
                                   notes + ["no past review had peers: nothing could be personalized"])
        rows = np.concatenate([peer_rows[i] for i in keep])
        offsets = np.cumsum([0] + [len(peer_rows[i]) for i in keep[:-1]])
        his = profile_embeddings[chosen]
        diff, weights = difference_embeddings(his, user_mean, self.embeddings[rows], self.user_mean(rows, cutoff),
                                              offsets, temperature)
        selected = []
        bounds = np.append(offsets, len(rows))
        for j, n in enumerate(chosen):
            peers = [Peer(self.reviews[r].user_id, self.reviews[r].item_id, self.reviews[r].text,
                          self.reviews[r].rating, float(weights[p]))
                     for p, r in enumerate(rows[bounds[j]:bounds[j + 1]], start=bounds[j])]
            selected.append(SelectedReview(profile[n], self.item(profile[n].item_id, extra_items).title, relevance[keep[j]], peers, cold[keep[j]]))
        return PersonalContext(selected, his, diff, notes)
