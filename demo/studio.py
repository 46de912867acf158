"""The engine as the demo uses it.

`Form` declares every field a generation reads, once: the page's inputs list, the generate
callback's arguments and the /review API's argument names are all derived from it. `Studio` holds
the loaded engine with the user list and catalog the page shows, and turns a `Form` into an engine
request (`Studio.job`), checking each field and naming it when it is wrong.
"""
from __future__ import annotations

import logging
import math
import threading
import traceback
import typing
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from dep_engine import DataError, DEPEngine, Item, PersonalizationSettings, Request, Result, SamplingSettings
from dep_engine import metrics, parse_history
from dep_engine.choices import Preset
from dep_engine.data import clean_text
from dep_engine.paper_engine import PAPER_MODES
from dep_engine.prompt import shorten

from . import evidence, texts
from .gpu import on_gpu
from .inputs import BASELINES, check_encoding, check_size, mode_for, parse_rating_input, table_message, table_to_text
from .measurements import Measurements

log = logging.getLogger("dep_studio.app")

DEFAULT_MAX_NEW_TOKENS = 120  # the page's default: about 60-90 words, a few seconds per output on a CPU
DEFAULT_TIME_BUDGET_S = 60.0  # decoding stops there on a shared CPU, keeping what was written
ALL_SIGNALS = ["texts", "his", "diff"]


@dataclass
class Form:
    """Every field a generation reads, in the order the page passes them."""
    source: str = "bundled"             # whose history: "bundled", "paste" or "table" (the API infers it)
    user_id: str = ""                   # a bundled reviewer
    history: str = ""                   # pasted or uploaded past reviews
    table: Any = None                   # past reviews typed in the page's table
    item_id: str = ""                   # a catalog item, when the product is one
    item_title: str = ""
    item_description: str = ""
    rating: float | None = None         # API: None takes a bundled reviewer's own rating of the item
    review_title: str | None = None     # API: None takes a bundled reviewer's own title
    reference: str | None = None        # the real review, to score against
    k: int = PersonalizationSettings.k
    history_rule: str = PersonalizationSettings.history_rule
    signals: list[str] | None = None    # any of texts, his, diff; None: all three (DEP)
    baseline_mode: str = "generic"      # the left-hand output: "generic" (DEP without the person) or "nonperso"
    strength: float = PersonalizationSettings.strength
    peer_temperature: float = PersonalizationSettings.peer_temperature
    temperature: float = SamplingSettings.temperature
    top_p: float = SamplingSettings.top_p
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    end_at_user_length: bool = SamplingSettings.end_at_user_length  # both texts end near the user's length
    seed: int = SamplingSettings.seed


FORM_FIELDS = [f.name for f in fields(Form)]
PAGE_ONLY = ("source", "table")  # the page's own: an API client sends a history or a user id
API_FIELDS = [name for name in FORM_FIELDS if name not in PAGE_ONLY]
FORM_TYPES = typing.get_type_hints(Form)


@dataclass
class Job:
    """One checked generation: what the engine runs, and a few words on whose history it is."""
    request: Request
    baseline: str
    mode: str
    personalization: PersonalizationSettings
    sampling: SamplingSettings
    who: str                            # "bundled user X (41 earlier reviews)", "your history (3 reviews)"
    notes: list[str] = field(default_factory=list)  # what the page and the API say beside the engine's notes


ENGINE: dict[str, DEPEngine] = {}  # this process's engine, kept out of the GPU function's arguments


@on_gpu
def _stream_compare(requests: list[Request], mode: str, personalization: PersonalizationSettings,
                    sampling: SamplingSettings) -> Iterator[list[Result]]:
    yield from ENGINE["engine"].stream_compare(requests, mode, personalization, sampling)


@on_gpu
def _stream(request: Request, modes: tuple[str, ...], personalization: PersonalizationSettings,
            sampling: SamplingSettings) -> Iterator[Result]:
    yield from ENGINE["engine"].stream(request, modes, personalization, sampling)


class Studio:
    """The loaded engine plus the user list, catalog and word counts the page needs."""

    def __init__(self, engine: DEPEngine, time_budget_s: float = DEFAULT_TIME_BUDGET_S):
        self.engine = engine
        self.time_budget_s = time_budget_s
        self.measured_rate: float | None = None  # tokens/s per output of the latest generation
        ENGINE["engine"] = engine
        self.users = engine.users
        self.items = engine.store.items
        self.user_ids = sorted(self.users, key=lambda u: (-len(self.users[u]), u))
        self.user_choices = [(self.user_label(u), u) for u in self.user_ids]
        self.catalog_choices = sorted(((item.title or item_id, item_id) for item_id, item in self.items.items()),
                                      key=lambda c: c[0].lower())
        self.background = evidence.term_counts(r.text for r in engine.dataset.reviews)
        self.measurements = Measurements.of_adapter(engine.config.adapter)
        self.example_users = self._pick_example_users()
        folder = Path(engine.config.data)
        self.pool_name = texts.POOLS.get(folder.name, f"reviewers in {folder.name}")
        self.metrics_note = ""
        self._import_metrics()  # here, not in the thread below: `metrics.import_libraries` says why
        threading.Thread(target=self._warm_metrics, daemon=True).start()

    # ---- users and items ----

    def user_label(self, user_id: str) -> str:
        history = self.users[user_id]
        typical = evidence.typical_rating([r.rating for r in history])
        snippet = shorten(history[-1].title or history[-1].text, 7)
        return f"{user_id} · {len(history)} reviews · usually {evidence.stars(typical)} · “{snippet}”"

    def _pick_example_users(self) -> list[str]:
        """A prolific user, a critical one, and one with a short history."""
        ranked = self.user_ids
        picks = [ranked[0]]
        critical = [u for u in ranked if evidence.typical_rating([r.rating for r in self.users[u]]) <= 3]
        if critical:
            picks.append(critical[0])
        short = [u for u in reversed(ranked) if len(self.users[u]) == 5]
        if short:
            picks.append(short[len(short) // 2])
        return picks

    def user_summary(self, user_id: str | None) -> str:
        if not user_id or user_id not in self.users:
            return "Choose a user to see their history."
        history = self.users[user_id]
        counts = Counter(int(r.rating) for r in history)
        spread = ", ".join(f"★{s} ×{counts[s]}" for s in sorted(counts, reverse=True))
        target = history[-1]
        return (f"**{len(history)} reviews** from {_date(history[0].timestamp)} to {_date(target.timestamp)} · "
                f"ratings {spread}  \nHeld-out latest review (the one DEP tries to write): "
                f"*{self.item_title(target.item_id)}*, {evidence.stars(target.rating)}, “{target.title}”")

    def user_table(self, user_id: str | None) -> pd.DataFrame:
        history = self.users.get(user_id or "", [])
        rows = [[_date(r.timestamp), self.item_title(r.item_id), r.rating, r.title,
                 shorten(r.text, 25) + ("  ← held out" if n == len(history) - 1 else "")]
                for n, r in enumerate(history)]
        return pd.DataFrame(rows, columns=["date", "item", "rating", "review title", "review (start)"])

    def item_title(self, item_id: str) -> str:
        item = self.items.get(item_id)
        return item.title if item and item.title else item_id

    def held_out(self, user_id: str | None) -> dict:
        """Form values for a bundled user's held-out (latest) review."""
        if not user_id:
            raise DataError("user: choose a bundled user first")
        if user_id not in self.users:
            raise DataError(f"user: {user_id!r} is not one of the bundled users")
        target = self.users[user_id][-1]
        item = self.engine.store.item(target.item_id)
        return dict(item_id=target.item_id, item_title=item.title, item_description=item.description,
                    rating=target.rating, review_title=target.title, reference=target.text)

    def own_review(self, user_id: str | None, item_id: str | None):
        """A bundled user's own review of a catalog item, if they wrote one."""
        return next((r for r in self.users.get(user_id or "", []) if r.item_id == item_id), None)

    def speed_hint(self) -> str:
        """The decoding speed measured on this machine, for the max-new-tokens slider."""
        if self.measured_rate is None:
            return "the speed on this machine shows here after the first generation"
        return f"on this machine: {self.measured_rate:.1f} tokens per second per output (latest generation)"

    def search_items(self, query: str, limit: int = 10) -> list[dict]:
        words = query.lower().split()
        found = [(title, item_id) for title, item_id in self.catalog_choices if all(w in title.lower() for w in words)]
        return [dict(item_id=item_id, title=title) for title, item_id in found[:limit]]

    # ---- from a form to an engine request ----

    def job(self, form: Form) -> Job:
        """Checks every field, in the form's order (history, product, settings), and builds the engine
        request; DataError/ValueError name the field."""
        if form.source not in ("bundled", "paste", "table"):
            raise DataError(f"history source {form.source!r}: choose bundled, paste or table")
        if form.source == "bundled" and not form.user_id:
            raise DataError("user: choose a bundled user, or switch to pasting a history")
        if form.source == "bundled" and form.user_id not in self.users:
            raise DataError(f"user: {form.user_id!r} is not one of the bundled users")
        pasted = self._pasted_history(form)
        item, rating, title = self._item(form), parse_rating_input(form.rating), clean_text(form.review_title)
        mode = mode_for(form.signals if form.signals is not None else ALL_SIGNALS)
        if form.baseline_mode not in BASELINES:
            raise DataError(f"baseline_mode: {form.baseline_mode!r}; choose {' or '.join(BASELINES)}")
        personalization, sampling = self.settings(form)
        if pasted is None:
            request = self.engine.user_request(form.user_id, item, rating, title)
            who = f"bundled user {form.user_id} ({len(request.profile)} earlier reviews)"
        else:
            reviews, items = pasted
            request = Request(profile=reviews, item=item, rating=rating, review_title=title, extra_items=items)
            who = f"your history ({len(reviews)} reviews)"
        request.validate()
        notes = repeated_note(request.profile)
        baseline = form.baseline_mode
        if self.engine.config.preset == Preset.PAPER and (baseline, mode) != PAPER_MODES:
            notes.append(texts.PAPER_MODES_NOTE)  # the authors' checkpoint writes these two
            baseline, mode = PAPER_MODES
        return Job(request, baseline, mode, personalization, sampling, who, notes)

    def _pasted_history(self, form: Form) -> tuple[list, dict] | None:
        """(reviews, their items) of a pasted or typed history, checked first so that its errors come
        first; None for a bundled user."""
        if form.source == "paste":
            check_size(form.history or "")
            check_encoding(form.history or "")
            return parse_history(form.history or "", user_id="you")
        if form.source == "table":
            try:
                return parse_history(table_to_text(form.table), user_id="you")
            except DataError as err:
                raise DataError(table_message(err)) from None
        return None

    def _item(self, form: Form) -> Item:
        """The product; typed text is cleaned as pasted text is, so no control character or lone
        surrogate reaches the tokenizer."""
        title, description = clean_text(form.item_title), clean_text(form.item_description)
        if not title:
            raise DataError("product: give a title (or pick an item from the catalog)")
        catalog = self.items.get(form.item_id or "")
        if catalog is None or catalog.title.strip() != title:
            return Item("new-product", title, description)
        if description and description != catalog.description:
            return Item(catalog.item_id, catalog.title, description)
        return catalog

    def settings(self, form: Form) -> tuple[PersonalizationSettings, SamplingSettings]:
        """The engine's settings of a form (checked by the engine when built, naming the field), with
        this app's time budget per generation."""
        personalization = PersonalizationSettings(
            k=_int(form.k, "k"), history_rule=str(form.history_rule),
            peer_temperature=_float(form.peer_temperature, "peer_temperature"),
            strength=_float(form.strength, "strength"))
        sampling = SamplingSettings(temperature=_float(form.temperature, "temperature"),
                                    top_p=_float(form.top_p, "top_p"),
                                    max_new_tokens=_int(form.max_new_tokens, "max_new_tokens"),
                                    end_at_user_length=_flag(form.end_at_user_length, "end_at_user_length"),
                                    seed=_int(form.seed, "seed"), time_budget_s=self.time_budget_s)
        return personalization, sampling

    def run(self, job: Job) -> Iterator[Result]:
        """Partial results while decoding, the baseline beside the personalized mode; the last is final."""
        result = None
        for result in _stream(job.request, (job.baseline, job.mode), job.personalization, job.sampling):
            yield result
        if result is not None:
            self.measured_rate = result.timings.get("tokens_per_second") or self.measured_rate

    def compare(self, form: Form, other_user_id: str) -> tuple[list[Job], Iterator[list[Result]]]:
        """Two bundled reviewers on the form's product, with its settings and seed, decoded together:
        their jobs, and the partial results (one per reviewer) while decoding."""
        if not isinstance(other_user_id, str) or not other_user_id:
            raise DataError("other_user_id: choose a second bundled reviewer to compare with")
        jobs = [self.job(replace(form, source="bundled", user_id=user)) for user in (form.user_id, other_user_id)]
        first = jobs[0]
        return jobs, _stream_compare([j.request for j in jobs], first.mode, first.personalization, first.sampling)

    # ---- evidence ----

    def terms(self, context) -> tuple[list[evidence.Term], list[evidence.Term]]:
        user_texts = [s.review.text for s in context.selected]
        peer_texts = [p.text for s in context.selected for p in s.peers]
        return evidence.distinctive_terms(user_texts, peer_texts, self.background, top=12)

    def sae_figure(self, context):
        if not context.selected:
            return None
        his, diff = self.engine.sae_codes(context)
        labels = [f"#{n} {s.item_title}" for n, s in enumerate(context.selected, 1)]
        return evidence.sae_figure(his, diff, labels, untrained=not self.engine.adapter_trained)

    # ---- metrics ----

    def _import_metrics(self) -> None:
        try:
            metrics.import_libraries()
        except Exception as err:  # noqa: BLE001 - scoring is a side panel; the reviews still show
            self._metrics_failed(err)

    def _warm_metrics(self) -> None:
        """Loads WordNet for METEOR and the voice check's scale in the background, so the first request
        does not wait."""
        self.score("warm up the metrics", "warm up the metrics")
        self.engine.voice_scale  # noqa: B018 - computed once, on first access

    def voice_check(self, job: Job, result, modes: tuple[str, ...] | None = None) -> dict:
        """The outputs' author rank and drift (`DEPEngine.voice_check`), by default of both sides; empty,
        logged, if it fails."""
        try:
            return self.engine.voice_check(job.request, result, modes or (job.baseline, job.mode))
        except Exception as err:  # noqa: BLE001 - a side panel; the reviews still show
            log.info("voice check failed: %s", type(err).__name__)  # its message could quote the visitor's text
            return {}

    def score(self, hypothesis: str, reference: str) -> dict[str, float] | None:
        """ROUGE, METEOR and BLEU of one output; None (with `metrics_note` saying why) when they fail."""
        try:
            return metrics.score(hypothesis, reference)
        except Exception as err:  # noqa: BLE001 - scoring is a side panel; the reviews still show
            self._metrics_failed(err)
            return None

    def _metrics_failed(self, err: Exception) -> None:
        self.metrics_note = f"Metrics are unavailable here ({type(err).__name__}: {err})."
        log.info("metrics: %s", self.metrics_note)


def repeated_note(profile: list) -> list[str]:
    """A note when past reviews repeat one another's text: the engine uses each text once (`ReviewStore.select`)."""
    counts = Counter(" ".join(r.text.lower().split()) for r in profile)
    repeats = {text: n for text, n in counts.items() if n > 1}
    if not repeats:
        return []
    texts_ = "1 text" if len(repeats) == 1 else f"{len(repeats)} texts"
    return [f"{sum(repeats.values())} past reviews are copies of {texts_}: each text is used once"]


def describe_error(err: BaseException) -> str:
    """The message a person sees: the engine's own wording for bad input, a short line otherwise."""
    if isinstance(err, (DataError, ValueError)):
        return str(err)
    # the traceback without the message: a message can quote what the visitor typed
    log.error("unexpected %s while generating:\n%s", type(err).__name__, "".join(traceback.format_tb(err.__traceback__)))
    return (f"Something went wrong inside the engine ({type(err).__name__}: {err}). "
            "The details are in the server log; try again, or change the input.")


def _date(timestamp: int) -> str:
    if timestamp < 10_000:  # pasted histories without times are numbered 1, 2, ...
        return f"#{timestamp}"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d")


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int with hundreds of digits
        raise DataError(f"{name}: {value!r} is not a number") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact: a float would round a large seed
    number = _float(value, name)
    if not math.isfinite(number) or number != int(number):
        raise DataError(f"{name}: {value!r} is not a whole number")
    return int(number)


def _flag(value: Any, name: str) -> bool:
    """A checkbox's value: true or false only (the string "false" must not read as true)."""
    if isinstance(value, bool):
        return value
    raise DataError(f"{name}: {value!r} is not true or false")
