"""Engine results as the page shows them: status lines, notes, the evidence panels and the metrics.
Every text that came from a visitor or the data is escaped here before it becomes HTML."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from dep_engine.prompt import shorten

from . import evidence, texts
from .inputs import mode_name
from .studio import Job, Studio


TIMINGS_EMPTY = "Run a generation to see the time of each stage."


def error_markdown(message: str) -> str:
    return f"<div class='dep-error'>✖ <b>Could not generate.</b> {html.escape(message, quote=False)}</div>"


def notes_markdown(notes: list[str]) -> str:
    if not notes:
        return ""
    return "\n\n" + "\n".join(f"- ⚠️ {n}" if "UNTRAINED" in n else f"- {n}" for n in notes)


def working_status(job: Job, result) -> str:
    return (f"Working: writing… {result.new_tokens} of at most {job.sampling.max_new_tokens} tokens · "
            f"{result.timings.get('tokens_per_second', 0.0):.1f} tokens/s per output" + notes_markdown(job.notes + result.notes))


def done_status(job: Job, result) -> str:
    return (f"✓ Done: {result.new_tokens} tokens in {result.timings.get('generation', 0):.1f} s "
            f"({result.timings.get('tokens_per_second', 0.0):.1f} tokens/s per output) for {job.who}."
            + notes_markdown(job.notes + result.notes))


def timings_panel(studio: Studio, result) -> str:
    return evidence.timings_markdown(result.timings, 2, studio.engine.startup_seconds)


def metrics_panel(studio: Studio, job: Job, result, reference: str) -> str:
    """ROUGE/METEOR/BLEU of both outputs against the real review."""
    scores = {mode: studio.score(result.texts[mode], reference) for mode in (job.baseline, job.mode)}
    if any(s is None for s in scores.values()):
        return studio.metrics_note
    labels = {mode: mode_name(mode) for mode in scores}
    return evidence.metrics_markdown(scores, labels, note="One sample against one real review: indicative, "
                                                          "not a benchmark.")


def voice_panel(job: Job, checks: dict, note: str = "") -> str:
    """Each output's author rank among bundled reviewers and its drift, as `evaluate` measures them."""
    if not checks:
        return ""
    candidates = checks[job.mode].candidates
    rows = ["| output | rank of this reviewer | on the product? |", "|---|---|---|"]
    for mode in (job.baseline, job.mode):
        check = checks[mode]
        about = ("yes" if check.drifted_to is None else
                 f"drifted toward *{html.escape(shorten(check.drifted_to, 10), quote=False)}* (a past review's item)")
        rows.append(f"| {mode_name(mode)} | **{check.rank}** of {check.candidates} | {about} |")
    head = texts.VOICE_HEAD.format(others=candidates - 1, chance=(candidates + 1) / 2)
    return head + "\n\n" + "\n".join(rows) + "\n\n" + note


def compare_voice(jobs: list[Job], checks: list[dict]) -> str:
    """Each reviewer's rank for their own text, as in the voice check of a single generation."""
    if not all(checks):
        return ""
    ranks = [check[job.mode] for job, check in zip(jobs, checks)]
    candidates = ranks[0].candidates
    return texts.COMPARE_VOICE.format(first=ranks[0].rank, second=ranks[1].rank, candidates=candidates,
                                      others=candidates - 1, chance=(candidates + 1) / 2)


def cleared() -> dict[str, Any]:
    """Every output of a generation as before the first one: what a page shows once the history changes."""
    return dict(status=texts.READY, baseline="", personalized="", voice="", compare_group=gr.update(visible=False),
                real="", metrics="", selected=pd.DataFrame(columns=evidence.SELECTED_HEADERS),
                peers=pd.DataFrame(columns=evidence.PEER_HEADERS), peers_table=None, sae=None, sae_figure=None,
                terms=texts.TERMS_HELP,
                terms_text="", prompt="", timings=TIMINGS_EMPTY)


def evidence_panels(studio: Studio, context) -> dict[str, Any]:
    """The evidence tabs of one generation: past reviews used, peers, SAE codes, distinctive words."""
    if not context.selected:
        empty = "No past review was used, so there is nothing to explain." + notes_markdown(context.notes)
        peers = pd.DataFrame(columns=evidence.PEER_HEADERS)
        return dict(selected=pd.DataFrame(columns=evidence.SELECTED_HEADERS),
                    peers=peers, peers_table=peers, sae=None, sae_figure=None, terms=empty,
                    terms_text="")
    mine, theirs = studio.terms(context)
    figure = studio.sae_figure(context)
    peers = pd.DataFrame(evidence.peer_rows(context), columns=evidence.PEER_HEADERS)
    return dict(selected=pd.DataFrame(evidence.selected_rows(context), columns=evidence.SELECTED_HEADERS),
                peers=peers, peers_table=peers,
                sae=figure, sae_figure=figure, terms=_terms_markdown(context, mine, theirs),
                terms_text=_marked_reviews(context, {t.term for t in mine}))


def _terms_markdown(context, mine: list[evidence.Term], theirs: list[evidence.Term]) -> str:
    n_own, n_peers = len(context.selected), sum(len(s.peers) for s in context.selected)

    def listed(terms: list[evidence.Term]) -> str:
        return " · ".join(f"`{t.term}` ({t.user_count}/{n_own} vs {t.peer_count}/{n_peers})"
                          for t in terms) or "nothing stands out"

    share = "share of their reviews vs of the peers' reviews that use it"
    return (f"**This user writes, more than their peers** ({share}): {listed(mine)}"
            f"\n\n**Their peers write, more than this user:** {listed(theirs)}" + texts.TERMS_NOTE)


def _marked_reviews(context, marked: set[str]) -> str:
    """The past reviews used, as HTML paragraphs with this user's distinctive words marked."""
    paragraphs = []
    for n, s in enumerate(context.selected, 1):
        text = evidence.pieces_html(evidence.highlight(shorten(s.review.text, 90), marked))
        paragraphs.append(f"<p><b>#{n} {html.escape(s.item_title)}</b> ({evidence.stars(s.review.rating)}): {text}</p>")
    return "".join(paragraphs)
