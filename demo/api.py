"""The named API endpoints (/review, /users, /search_items), for `gradio_client` and plain HTTP.

/review takes the form's fields by name (`studio.API_FIELDS`, derived from `Form`), so a field
added to the form reaches the API without being written out again here.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import gradio as gr

from . import evidence
from .sharing import LLM_QUEUE, RequestLog
from .studio import API_FIELDS, FORM_TYPES, Form, Job, Studio, describe_error

TEXT_FIELDS = ("user_id", "history", "item_id", "item_title", "item_description", "review_title", "reference",
               "history_rule", "baseline_mode")


def review(studio: Studio, **arguments: Any) -> dict:
    """One /review call run to the end: baseline and personalized reviews, metrics and evidence."""
    record = RequestLog("api", _source(arguments))
    try:
        form = review_form(studio, **arguments)
        job = studio.job(form)
        record.jobs, record.modes = [job], (job.baseline, job.mode)
        for record.result in studio.run(job):
            pass
        return review_json(studio, job, record.result, form.reference)
    except Exception as err:
        record.error = err
        raise
    finally:
        record.done()


def _source(arguments: dict) -> str:
    """A history given (even empty or blank: it is then refused as empty) makes it a pasted one; an empty
    text beside a user id is a client filling every field."""
    history = arguments.get("history")
    return "paste" if isinstance(history, str) and (history or not arguments.get("user_id")) else "bundled"


def review_form(studio: Studio, **arguments: Any) -> Form:
    """The API's arguments as a form: the source follows from what is given, and a bundled user's
    own review of the product (by default their held-out latest one) fills what was left out."""
    form = Form(**arguments)
    for name in TEXT_FIELDS:  # a JSON client may send any type where the page sends text
        value = getattr(form, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: expected text, got {type(value).__name__}")
    if form.signals is not None and not isinstance(form.signals, list):
        raise ValueError(f"signals: expected a list of texts, his, diff; got {type(form.signals).__name__}")
    form.signals = list(form.signals) if form.signals else None  # none given: all three (DEP)
    if form.item_id:
        item = studio.items.get(form.item_id)
        if item is None:
            raise ValueError(f"item_id {form.item_id!r} is not in the catalog; give item_title instead")
        form.item_title, form.item_description = item.title, form.item_description or item.description
    if _source(arguments) == "paste":
        form.source = "paste"
        return form
    if not form.user_id:
        raise ValueError("give either user_id (a bundled user) or history (your past reviews)")
    form.source = "bundled"
    known: dict = {}
    if form.item_id:
        own = studio.own_review(form.user_id, form.item_id)
        if own is not None:
            known = dict(rating=own.rating, review_title=own.title, reference=own.text)
    elif not (form.item_title or "").strip():
        known = studio.held_out(form.user_id)
        form.item_id, form.item_title, form.item_description = (known.pop("item_id"), known.pop("item_title"),
                                                                known.pop("item_description"))
    for name, value in known.items():
        if getattr(form, name) is None:
            setattr(form, name, value)
    return form


def review_json(studio: Studio, job: Job, result, reference: str | None) -> dict:
    texts, context = result.texts, result.context
    ref = (reference or "").strip()
    metrics = None
    if ref:
        metrics = {"baseline": studio.score(texts[job.baseline], ref),
                   "personalized": studio.score(texts[job.mode], ref)}
    mine, theirs = studio.terms(context)
    selected = [dict(item_title=s.item_title, rating=s.review.rating, title=s.review.title,
                     relevance=round(float(s.relevance), 4), text=s.review.text, cold_start=s.cold_start,
                     peers=[dict(user_id=p.user_id, item_id=p.item_id, rating=p.rating, weight=round(p.weight, 4))
                            for p in s.peers])
                for s in context.selected]
    return dict(
        baseline=texts[job.baseline], personalized=texts[job.mode], baseline_mode=job.baseline, mode=job.mode,
        reference=ref or None, prompt=result.prompts.get(job.mode, ""),
        metrics=metrics, item=dict(item_id=job.request.item.item_id, title=job.request.item.title),
        rating=job.request.rating, review_title=job.request.review_title, selected=selected,
        distinctive_terms=dict(user=[t.term for t in mine], peers=[t.term for t in theirs]),
        voice_check=_voice_json(studio.voice_check(job, result), job),
        timings={name: round(seconds, 3) for name, seconds in result.timings.items()}, new_tokens=result.new_tokens,
        tokens_per_second=round(result.timings.get("tokens_per_second", 0.0), 2) or None,
        notes=job.notes + list(result.notes), adapter_trained=studio.engine.adapter_trained)


def _voice_json(checks: dict, job: Job) -> dict | None:
    """The voice check of both sides: author rank among bundled reviewers, drift to a past item."""
    if not checks:
        return None
    return {side: dataclasses.asdict(checks[mode]) for side, mode in (("baseline", job.baseline), ("personalized", job.mode))}


def _own_voice(studio: Studio, job: Job, result) -> dict | None:
    """The voice check of one reviewer's text in a comparison."""
    check = studio.voice_check(job, result, (job.mode,)).get(job.mode)
    return dataclasses.asdict(check) if check else None


def users(studio: Studio, limit: int = 20) -> list[dict]:
    """Bundled users, most reviews first: id, number of reviews, typical rating, held-out item."""
    out = []
    for user_id in studio.user_ids[:max(0, int(limit))]:
        history = studio.users[user_id]
        out.append(dict(user_id=user_id, reviews=len(history),
                        typical_rating=evidence.typical_rating([r.rating for r in history]),
                        summary=studio.user_label(user_id), held_out_item=history[-1].item_id,
                        held_out_title=studio.item_title(history[-1].item_id)))
    return out


def compare(studio: Studio, other_user_id: str = "", **arguments: Any) -> dict:
    """Two bundled reviewers' personalized reviews of one product, with the same settings and seed."""
    record = RequestLog("api-compare", "bundled")
    try:
        form = review_form(studio, **arguments)
        jobs, stream = studio.compare(form, other_user_id)
        record.jobs, record.modes = jobs, (jobs[0].mode,)
        for results in stream:
            record.result = results[0]
    except Exception as err:
        record.error = err
        raise
    finally:
        record.done()
    return dict(item=dict(item_id=jobs[0].request.item.item_id, title=jobs[0].request.item.title),
                rating=jobs[0].request.rating, review_title=jobs[0].request.review_title, mode=jobs[0].mode,
                reviews=[dict(user_id=user, text=result.texts[job.mode], notes=list(result.notes),
                              voice_check=_own_voice(studio, job, result))
                         for user, job, result in zip((form.user_id, other_user_id), jobs, results)],
                timings={name: round(seconds, 3) for name, seconds in results[0].timings.items()})


def register(studio: Studio) -> None:
    """Adds the named endpoints to the Blocks being built."""
    gr.api(_endpoint(studio, review, API_FIELDS, REVIEW_DOC), api_name="review", concurrency_limit=1,
           concurrency_id=LLM_QUEUE)
    gr.api(_endpoint(studio, compare, COMPARE_FIELDS, COMPARE_DOC, first=("other_user_id", str, "")),
           api_name="compare", concurrency_limit=1, concurrency_id=LLM_QUEUE)

    def users_endpoint(limit: int = 20) -> list[dict]:
        """Bundled users, most reviews first: id, number of reviews, typical rating, held-out item."""
        return users(studio, limit)

    def search_items(query: str, limit: int = 10) -> list[dict]:
        """Catalog items whose title contains every word of `query`."""
        return studio.search_items(query, limit)

    users_endpoint.__name__ = "users"
    gr.api(users_endpoint, api_name="users")
    gr.api(search_items, api_name="search_items")


def _endpoint(studio: Studio, call: Callable[..., dict], names: list[str], doc: str,
              first: tuple[str, type, Any] | None = None) -> Callable[..., dict]:
    """An endpoint with one keyword argument per named field of `Form`, typed and defaulted as there
    (after `first`, an argument of its own); errors come back as one clear message."""
    defaults = dict(vars(Form()), history=None)  # None: no history given; "": an empty one
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[name],
                                    annotation=FORM_TYPES[name] | None if defaults[name] is None else FORM_TYPES[name])
                  for name in names]
    if first:
        parameters.insert(0, inspect.Parameter(first[0], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=first[2],
                                               annotation=first[1]))
    signature = inspect.Signature(parameters, return_annotation=dict)

    def endpoint(*args: Any, **kwargs: Any) -> dict:
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        try:
            return call(studio, **arguments.arguments)
        except Exception as err:  # noqa: BLE001 - every problem becomes a message
            raise gr.Error(describe_error(err), title="Bad input", print_exception=False) from None

    endpoint.__signature__ = signature  # type: ignore[attr-defined]
    endpoint.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dict}
    endpoint.__name__, endpoint.__doc__ = call.__name__, doc
    return endpoint


COMPARE_FIELDS = [name for name in API_FIELDS if name not in ("history", "reference", "baseline_mode")]

REVIEW_DOC = """Baseline and personalized reviews for a bundled user (`user_id`) or a pasted `history`
(JSONL in either Amazon schema, or CSV with item_title, rating, review_title, review_text). With a
bundled user and no product, their held-out latest review is the target and its real text the
reference. `signals`: any of texts, his, diff (default all three = DEP). `baseline_mode`: generic
(the same prompt with a population-average reviewer) or nonperso (the plain LLM). `strength`: 0 is
the generic reviewer, 1 this user, up to 2 exaggerated. `end_at_user_length`: true ends both reviews at
their first sentence end from the user's typical length on."""

COMPARE_DOC = """Two bundled reviewers (`user_id`, `other_user_id`) write about the same product with
the same settings and seed, decoded together. With no product given, it is `user_id`'s held-out
latest review."""
