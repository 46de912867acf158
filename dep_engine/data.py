"""Reviews and items in one internal form, read from either Amazon schema, and the chronological split.

Amazon 2014: reviewerID, asin, overall, summary, reviewText, unixReviewTime (seconds).
Amazon 2023: user_id, parent_asin, rating, title, text, timestamp (milliseconds).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

MAX_TEXT_CHARS = 20_000  # a review longer than this is cut; nothing downstream reads further


class DataError(ValueError):
    """Bad input data: the message names the file or field and, where known, the line."""


@dataclass(frozen=True)
class Review:
    user_id: str
    item_id: str
    rating: float
    title: str
    text: str
    timestamp: int  # seconds since the epoch


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    description: str = ""


@dataclass
class Dataset:
    reviews: list[Review]
    items: dict[str, Item] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One generation task: the target review and the user's reviews written before it."""
    target: Review
    profile: tuple[Review, ...]
    split: str  # "train" | "val" | "test"


_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")  # terminal escapes


def clean_text(value: object) -> str:
    """HTML entities unescaped, terminal escape sequences and control characters dropped, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, list):  # 2023 metadata keeps descriptions as lists of paragraphs
        value = " ".join(str(v) for v in value if v)
    text = _ANSI.sub("", html.unescape(str(value)))
    text = "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in text)
    return " ".join(text.split())[:MAX_TEXT_CHARS]


def _first(record: dict, *keys: str) -> object:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line else source


def _short(value: object, limit: int = 40) -> str:
    """A bad value as an error message shows it: a pasted megabyte must not come back whole."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's 4300-digit limit)
        return "(a number too long to print)"
    return text if len(text) <= limit else text[:limit] + "…"


def parse_rating(value: object, where: str = "rating") -> float:
    if isinstance(value, bool):  # JSON `true` is not one star
        raise DataError(f"{where}: rating {value!r} is not a number")
    try:
        rating = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: rating {_short(value)} is not a number") from None
    except OverflowError:  # a JSON integer with hundreds of digits
        rating = math.inf
    if not math.isfinite(rating) or not 1 <= rating <= 5:
        raise DataError(f"{where}: rating {_short(value)} is outside 1-5")
    return rating


def parse_timestamp(value: object, where: str) -> int:
    try:
        stamp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: timestamp {_short(value)} is not a number") from None
    except OverflowError:
        stamp = math.inf
    if not math.isfinite(stamp) or stamp < 0:
        raise DataError(f"{where}: timestamp {_short(value)} is not a valid time")
    seconds = int(stamp / 1000) if stamp > 1e11 else int(stamp)  # 2023 release counts milliseconds
    if seconds > time.time() + 2 * 86400:
        raise DataError(f"{where}: timestamp {_short(value)} is in the future "
                        f"({time.strftime('%Y-%m-%d', time.gmtime(min(seconds, 253402300799)))})")
    return seconds


def _field(record: dict, where: str, keys: tuple[str, ...], valid, kind: str) -> object:
    """The first present field of `keys`, which must pass `valid`: a value of the wrong type where text
    or an id belongs is a mistake to name, not something to stringify."""
    key = next((k for k in keys if record.get(k) is not None), None)
    if key is None:
        return None
    value = record[key]
    if not valid(value):
        raise DataError(f"{where}: {key} must be {kind}, got {type(value).__name__} {_short(value)}")
    return value


def _text(record: dict, where: str, *keys: str) -> object:
    """A text field (a list of paragraphs also counts)."""
    return _field(record, where, keys, lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v)), "text")


def _identifier(record: dict, where: str, *keys: str) -> object:
    """An id field: text or a whole number, never an object, list or fraction."""
    return _field(record, where, keys, lambda v: isinstance(v, (str, int)) and not isinstance(v, bool),
                  "text or a whole number")


def parse_review(record: object, source: str = "review", line: int | None = None,
                 default_user: str | None = None, require_text: bool = True) -> Review:
    """One review from a dict in either schema; raises DataError naming what is wrong."""
    where = _where(source, line)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    user = _identifier(record, where, "reviewerID", "user_id") or default_user
    item = _identifier(record, where, "asin", "parent_asin", "item_id")
    if user is None or str(user).strip() == "":
        raise DataError(f"{where}: missing user id (reviewerID or user_id)")
    if item is None or str(item).strip() == "":
        raise DataError(f"{where}: missing item id (asin or parent_asin)")
    rating_value = _first(record, "overall", "rating")
    if rating_value is None:
        raise DataError(f"{where}: missing rating (overall or rating)")
    text = clean_text(_text(record, where, "reviewText", "text"))
    if require_text and not text:
        raise DataError(f"{where}: empty review text (reviewText or text)")
    stamp = _first(record, "unixReviewTime", "timestamp")
    return Review(user_id=clean_text(user), item_id=clean_text(item),
                  rating=parse_rating(rating_value, where),
                  title=clean_text(_text(record, where, "summary", "title")), text=text,
                  timestamp=parse_timestamp(stamp, where) if stamp is not None else 0)


def parse_item(record: object, source: str = "item", line: int | None = None) -> Item:
    where = _where(source, line)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    item = _first(record, "asin", "parent_asin", "item_id")
    if item is None:
        raise DataError(f"{where}: missing item id (asin or parent_asin)")
    return Item(item_id=clean_text(item), title=clean_text(record.get("title")),
                description=clean_text(record.get("description")))


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_json_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for a .json/.jsonl file, gzipped or not; a JSON array also works."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text ({err})") from None
    yield from iter_json_text(text, str(path))


def _loads(raw: str, source: str, line: int) -> object:
    """json.loads with every way it fails as a DataError: bad syntax, but also nesting deep enough
    to exhaust the stack and integers too long to convert."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}, line {line + err.lineno - 1}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{source}, line {line}: malformed JSON (nested too deeply)") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise DataError(f"{source}, line {line}: malformed JSON ({str(err).split(':')[0]})") from None


def iter_json_text(text: str, source: str) -> Iterator[tuple[int, object]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from enumerate(_loads(stripped, source, 1), 1)  # type: ignore[arg-type]
        return
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            yield number, _loads(raw, source, number)


def read_reviews(path: str | Path, skip_empty: bool = True) -> list[Review]:
    """Reviews of a file; reviews with empty text are skipped (they carry nothing to learn from)."""
    reviews = []
    for number, record in iter_json_records(path):
        if skip_empty and isinstance(record, dict) and not clean_text(_first(record, "reviewText", "text")):
            continue
        reviews.append(parse_review(record, str(path), number))
    return reviews


def read_items(path: str | Path) -> dict[str, Item]:
    return {item.item_id: item for item in
            (parse_item(record, str(path), number) for number, record in iter_json_records(path))}


def _data_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")))
    meta = [p for p in files if "meta" in p.name]
    return [p for p in files if p not in meta], meta


def load_dataset(path: str | Path) -> Dataset:
    """A reviews file, or a folder holding reviews files and `meta*` item files."""
    path = Path(path)
    if path.is_dir():
        review_files, meta_files = _data_files(path)
        if not review_files:
            raise DataError(f"{path}: no .json/.jsonl review files in this folder")
    elif path.is_file():
        review_files, meta_files = [path], []
    else:
        raise DataError(f"{path}: no such file or folder")
    reviews = [r for f in review_files for r in read_reviews(f)]
    items: dict[str, Item] = {}
    for meta in meta_files:
        items.update(read_items(meta))
    return Dataset(reviews=deduplicate(reviews), items=items)


def deduplicate(reviews: Iterable[Review]) -> list[Review]:
    """One review per (user, item): the latest one, as the method de-duplicates per user."""
    latest: dict[tuple[str, str], Review] = {}
    for review in reviews:
        key = (review.user_id, review.item_id)
        if key not in latest or review.timestamp >= latest[key].timestamp:
            latest[key] = review
    return list(latest.values())


def data_fingerprint(reviews: Iterable[Review]) -> str:
    """A short hash of a set of reviews, whatever their order: adapters record their training pool's."""
    digest = hashlib.sha256()
    for r in sorted(reviews, key=lambda r: (r.user_id, r.item_id, r.timestamp)):
        digest.update(f"{r.user_id}\t{r.item_id}\t{r.timestamp}\t{r.rating}\t{r.title}\t{r.text}\n".encode())
    return digest.hexdigest()[:16]


def by_user(reviews: Iterable[Review]) -> dict[str, list[Review]]:
    """Each user's reviews, oldest first (ties keep file order)."""
    users: dict[str, list[Review]] = {}
    for review in reviews:
        users.setdefault(review.user_id, []).append(review)
    for history in users.values():
        history.sort(key=lambda r: r.timestamp)
    return users


def split_of(index: int, count: int) -> str:
    """The chronological split of a user's review `index` of `count`: newest test, the one before
    validation, earlier ones training."""
    return "test" if index == count - 1 else "val" if index == count - 2 else "train"


def profile_before(history: list[Review], index: int) -> list[Review]:
    """What the user wrote before review `index` (a time-sorted history): every earlier review, and
    the others dated the same day (timestamps are whole days) except held-out validation or test
    targets. The one same-day rule: history takes such reviews; peers never do (`store`)."""
    target = history[index]
    same_day = [r for n, r in enumerate(history[index + 1:], start=index + 1)
                if r.timestamp == target.timestamp and split_of(n, len(history)) == "train"]
    return history[:index] + same_day


def without_twins(profile: Iterable[Review], target: Review) -> list[Review]:
    """The history less any review whose text is the target's (case, spacing and punctuation aside): a
    review cross-posted to another item would show the model the very answer it is asked to write."""
    def words(text: str) -> str:
        return re.sub(r"\W+", " ", text.lower()).strip()
    text = words(target.text)
    return [r for r in profile if words(r.text) != text]


def chronological_split(reviews: Iterable[Review], min_profile: int = 1) -> list[Sample]:
    """Each user's reviews as samples: the newest is the test target, the one before it validation,
    earlier ones training (`split_of`). A target's profile is `profile_before` it; targets with fewer
    than `min_profile` reviews in it are not used.
    """
    samples = []
    for history in by_user(reviews).values():
        for index, target in enumerate(history):
            profile = profile_before(history, index)
            if len(profile) < min_profile:
                continue
            samples.append(Sample(target=target, profile=tuple(profile), split=split_of(index, len(history))))
    return samples


# ---- histories pasted or uploaded by a person -------------------------------------------------

HISTORY_CSV_COLUMNS = ("item_title", "rating", "review_title", "review_text")


def parse_history(text: str, user_id: str = "you", max_reviews: int = 500) -> tuple[list[Review], dict[str, Item]]:
    """A pasted history: JSON/JSONL in either Amazon schema, or CSV with item_title, rating,
    review_title, review_text (and optional timestamp). Items the catalog lacks are named by
    their title. Raises DataError with the line of the first problem."""
    if not isinstance(text, str) or not text.strip():
        raise DataError("history: it is empty; paste at least one review")
    text = text.removeprefix("\ufeff")  # the byte-order mark Excel and Notepad put before UTF-8 files
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        rows = [(number, record) for number, record in iter_json_text(text, "history")]
        reviews, items = [], {}
        for number, record in rows:
            if isinstance(record, dict) and "item_title" in record:
                review, item = _review_from_row(record, number, user_id)
                items[item.item_id] = item
            else:
                review = parse_review(record, "history", number, default_user=user_id)
                if isinstance(record, dict) and record.get("item_title"):
                    items[review.item_id] = Item(review.item_id, clean_text(record["item_title"]))
            reviews.append(review)
    else:
        reviews, items = _parse_history_csv(text, user_id)
    if not reviews:
        raise DataError("history: no reviews found")
    if len(reviews) > max_reviews:
        raise DataError(f"history: {len(reviews)} reviews is more than the limit of {max_reviews}")
    # One person's history: a pasted file may carry its own ids, but it is one user.
    reviews = [Review(user_id, r.item_id, r.rating, r.title, r.text, r.timestamp or index)
               for index, r in enumerate(reviews, 1)]
    return reviews, items


def _review_from_row(row: dict, number: int, user_id: str) -> tuple[Review, Item]:
    where = f"history, line {number}"
    title = clean_text(_text(row, where, "item_title"))
    if not title:
        raise DataError(f"{where}: missing item_title")
    text = clean_text(_text(row, where, "review_text"))
    if not text:
        raise DataError(f"{where}: empty review_text")
    stamp = row.get("timestamp")
    item_id = clean_text(_identifier(row, where, "item_id")) or "title:" + title.lower()
    review = Review(user_id=user_id, item_id=item_id, rating=parse_rating(row.get("rating"), where),
                    title=clean_text(_text(row, where, "review_title")), text=text,
                    timestamp=parse_timestamp(stamp, where) if stamp not in (None, "") else 0)
    return review, Item(item_id, title)


def _parse_history_csv(text: str, user_id: str) -> tuple[list[Review], dict[str, Item]]:
    # csv refuses fields over 128 KB by default; no field can be longer than the text itself
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("item_title", "rating", "review_text") if c not in header]
        if missing:
            raise DataError("history: not JSON, and as CSV the header lacks " + ", ".join(missing)
                            + f" (expected columns: {', '.join(HISTORY_CSV_COLUMNS)})")
        reviews, items = [], {}
        for number, row in enumerate(reader, 2):
            row = {(k or "").strip(): v for k, v in row.items()}
            review, item = _review_from_row(row, number, user_id)
            reviews.append(review)
            items[item.item_id] = item
    except csv.Error as err:
        raise DataError(f"history, line {reader.line_num}: malformed CSV ({err})") from None
    return reviews, items
