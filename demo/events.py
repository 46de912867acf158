"""What the page does when a visitor acts: switching the history source, picking a user or an item,
pasting or uploading a history, choosing signals, and generating."""
from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from dep_engine import DataError, parse_history

from . import render, texts
from .inputs import MODE_TITLES, check_encoding, check_size, mode_for, mode_hint, read_upload
from .layout import OUTPUTS, Components
from .sharing import LLM_QUEUE, RequestLog, forget_upload
from .studio import FORM_FIELDS, Form, Studio, describe_error

PRODUCT = ("item_id", "item_title", "item_description", "rating", "review_title", "reference")
QUIET = dict(api_visibility="private", show_progress="hidden")


def wire(demo: gr.Blocks, studio: Studio, ui: Components) -> None:
    """Connects every control of the page to its callback."""
    demo.load(lambda: gr.update(info=studio.speed_hint()), None, ui["max_new_tokens"], queue=False, **QUIET)
    _wire_history(studio, ui)
    _wire_product(studio, ui)
    ui["signals"].change(on_signals, ui["signals"], [ui["signals_hint"], ui["personalized"]], queue=False, **QUIET)
    ui["sae_tab"].select(lambda figure: figure, ui["sae_figure"], ui["sae"], queue=False, **QUIET)
    ui["peers_tab"].select(lambda table: gr.skip() if table is None else table, ui["peers_table"], ui["peers"],
                           queue=False, **QUIET)
    _wire_generate(studio, ui)
    _wire_compare(studio, ui)


def _wire_history(studio: Studio, ui: Components) -> None:
    def show_source(choice: str) -> list:
        return [gr.update(visible=choice == group) for group in ("bundled", "paste", "table", "bundled")]

    ui["source"].change(show_source, ui["source"], [ui[n] for n in ("bundled_group", "paste_group", "table_group",
                                                                   "held_out_button")], queue=False, **QUIET)

    def on_history(text: str | None) -> str:
        return history_status(studio, text)

    ui["history"].change(on_history, ui["history"], ui["history_status"], trigger_mode="always_last", **QUIET)
    ui["upload"].upload(on_upload, ui["upload"], [ui["history"], ui["history_status"], ui["upload"]],
                        api_visibility="private")


def _wire_product(studio: Studio, ui: Components) -> None:
    """The product fields follow the reviewer and the catalog pick, and never keep what belonged to
    another reviewer or product (their real review above all: it is what the outputs are scored on)."""
    product = [ui[n] for n in PRODUCT]

    def on_user(user_id: str | None) -> list:
        if not user_id or user_id not in studio.users:
            return [studio.user_summary(None), studio.user_table(None)] + [gr.skip()] * len(PRODUCT)
        return [studio.user_summary(user_id), studio.user_table(user_id)] + held_out_values(studio, user_id)

    ui["user_id"].change(on_user, ui["user_id"], [ui["user_info"], ui["user_history"]] + product, **QUIET)
    ui["held_out_button"].click(lambda user_id: held_out_values(studio, user_id), ui["user_id"], product, **QUIET)

    def on_source(choice: str, user_id: str | None) -> list:
        if choice == "bundled":
            return held_out_values(studio, user_id)
        return [None, "", "", gr.skip(), "", ""]  # the rating alone says nothing about the old reviewer

    ui["source"].input(on_source, [ui["source"], ui["user_id"]], product, **QUIET)
    # the last run's outputs, real review and metrics belong to the history just left
    ui["source"].input(lambda: {ui[name]: value for name, value in render.cleared().items()}, None,
                       [ui[n] for n in OUTPUTS], **QUIET)

    def on_catalog(item_id: str | None, source: str, user_id: str | None) -> list:
        item = studio.items.get(item_id or "")
        if item is None:
            return [gr.skip()] * 5
        own = studio.own_review(user_id, item_id) if source == "bundled" else None
        if own is not None:
            return [item.title, item.description, own.rating, own.title, own.text]
        return [item.title, item.description, gr.skip(), gr.skip(), ""]

    ui["item_id"].input(on_catalog, [ui["item_id"], ui["source"], ui["user_id"]], product[1:], **QUIET)

    def on_title(title: str, item_id: str | None) -> list:
        item = studio.items.get(item_id or "")
        if item is not None and item.title.strip() != (title or "").strip():
            return [None, ""]  # another product now: not the catalog pick, nor its real review
        return [gr.skip(), gr.skip()]

    ui["item_title"].input(on_title, [ui["item_title"], ui["item_id"]], [ui["item_id"], ui["reference"]],
                           trigger_mode="always_last", **QUIET)


def held_out_values(studio: Studio, user_id: str | None) -> list:
    """The product fields of a bundled reviewer's held-out review (unchanged, with a warning, if none)."""
    try:
        held = studio.held_out(user_id)
    except DataError as err:
        gr.Warning(str(err))
        return [gr.skip()] * len(PRODUCT)
    return [held[n] for n in PRODUCT]


def history_status(studio: Studio, text: str | None) -> str:
    """A one-line check of a pasted history, while the visitor types."""
    if not text or not text.strip():
        return ""
    try:
        check_size(text)
        check_encoding(text)
        reviews, items = parse_history(text, user_id="you")
    except DataError as err:
        return f"✖ {err}"
    store = studio.engine.store
    known = sum(1 for r in reviews if store.resolve_item(store.item(r.item_id, items)).item_id in store.item_slice)
    return (f"✓ {len(reviews)} review(s) read · {known} of their items are in the catalog, so other "
            "people's reviews of them can serve as peers")


def on_upload(path: str | None) -> tuple:
    """The upload's text into the history box; the file itself is deleted once read (or refused)."""
    try:
        return read_upload(path), gr.skip(), None
    except DataError as err:
        return gr.skip(), f"✖ {err}", None
    except OSError as err:
        return gr.skip(), f"✖ upload: cannot read the file ({err})", None
    finally:
        forget_upload(path)


def on_signals(chosen: list[str] | None) -> tuple:
    try:
        label = MODE_TITLES[mode_for(chosen)]
    except DataError:
        return mode_hint(chosen), gr.skip()
    return mode_hint(chosen), gr.update(label=label)


def _wire_generate(studio: Studio, ui: Components) -> None:
    outputs = [ui[n] for n in OUTPUTS] + [ui["max_new_tokens"]]

    def on_generate(*values: Any) -> Iterator[dict]:
        for changes in generate(studio, Form(*values)):
            yield {ui[name]: value for name, value in changes.items()}

    event = ui["generate"].click(on_generate, [ui[n] for n in FORM_FIELDS], outputs, api_name="generate",
                                 api_visibility="undocumented", concurrency_limit=1, concurrency_id=LLM_QUEUE,
                                 show_progress="minimal")
    ui["stop"].click(lambda: texts.STOPPED, None, ui["status"], cancels=[event], api_visibility="private",
                     queue=False)


def generate(studio: Studio, form: Form) -> Iterator[dict[str, Any]]:
    """Both reviews, streamed, then the evidence, metrics and timings; every problem becomes a message.
    One log line per request, also when the visitor stops it."""
    record = RequestLog("page", form.source)
    try:
        yield from _generate(studio, form, record)
    finally:
        record.done()


def _generate(studio: Studio, form: Form, record: RequestLog) -> Iterator[dict[str, Any]]:
    try:
        job = studio.job(form)
    except Exception as err:  # noqa: BLE001 - every problem becomes a message
        record.error = err
        message = describe_error(err)
        gr.Warning(message, title="Please check the input")
        yield dict(status=render.error_markdown(message))
        return
    record.jobs, record.modes = [job], (job.baseline, job.mode)
    reference = (form.reference or "").strip()
    yield dict(status=f"Working: selecting {job.personalization.k} past reviews of {job.who}, and peers…",
               baseline=gr.update(value="", label=MODE_TITLES[job.baseline]),
               personalized=gr.update(value="", label=MODE_TITLES[job.mode]),
               voice="", compare_group=gr.update(visible=bool(reference)), real=reference, metrics="")
    try:
        for partial in studio.run(job):
            changes = dict(baseline=partial.texts[job.baseline], personalized=partial.texts[job.mode],
                           status=render.working_status(job, partial))
            if record.result is None:  # the evidence is known before the first token
                changes.update(render.evidence_panels(studio, partial.context), prompt=partial.prompts[job.mode])
            record.result = partial
            yield changes
    except Exception as err:  # noqa: BLE001
        record.error = err
        message = describe_error(err)
        gr.Warning(message, title="Generation failed")
        yield dict(status=render.error_markdown(message))
        return
    result = record.result
    if result is None:
        yield dict(status=render.error_markdown("the engine returned nothing"))
        return
    final = dict(timings=render.timings_panel(studio, result), status=render.done_status(job, result),
                 voice=render.voice_panel(job, studio.voice_check(job, result), studio.measurements.voice_note),
                 max_new_tokens=gr.update(info=studio.speed_hint()))
    if reference:
        final["metrics"] = render.metrics_panel(studio, job, result, reference)
    yield final


def _wire_compare(studio: Studio, ui: Components) -> None:
    outputs = [ui[n] for n in ("compare_status", "first_review", "second_review")]

    def on_compare(*values: Any) -> Iterator[dict]:
        for changes in compare(studio, Form(*values[:-1]), values[-1]):
            yield {ui[name]: value for name, value in changes.items()}

    ui["compare"].click(on_compare, [ui[n] for n in FORM_FIELDS] + [ui["other_user_id"]], outputs,
                        api_visibility="private", concurrency_limit=1, concurrency_id=LLM_QUEUE, show_progress="minimal")


def compare(studio: Studio, form: Form, other_user_id: str) -> Iterator[dict[str, Any]]:
    """Two reviewers' personalized reviews, streamed side by side."""
    record = RequestLog("page-compare", "bundled")
    try:
        jobs, stream = studio.compare(form, other_user_id)
        record.jobs, record.modes = jobs, (jobs[0].mode,)
        yield dict(compare_status="Working: two reviewers, one batch…", first_review="", second_review="")
        for results in stream:
            record.result = results[0]
            yield dict(first_review=results[0].texts[jobs[0].mode], second_review=results[1].texts[jobs[1].mode])
        notes = sorted(set(results[0].notes) | set(results[1].notes))
        checks = [studio.voice_check(job, result, (job.mode,)) for job, result in zip(jobs, results)]
        yield dict(compare_status=f"✓ Done: {jobs[0].who} and {jobs[1].who}, same seed "
                                  f"{jobs[0].sampling.seed}." + render.compare_voice(jobs, checks)
                                  + render.notes_markdown(notes))
    except Exception as err:  # noqa: BLE001 - every problem becomes a message
        record.error = err
        yield dict(compare_status=render.error_markdown(describe_error(err)))
    finally:
        record.done()
