"""The page's components, built view by view. Each builder adds its components to the Blocks being
built and returns them by name: the names of `studio.Form`'s fields for the form's inputs, and
`OUTPUTS` for what a generation fills in."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from . import evidence, examples, texts
from dep_engine import BOUNDS

from .inputs import BASELINES, MODE_TITLES, SIGNALS, TABLE_HEADERS, mode_hint
from .render import TIMINGS_EMPTY
from .studio import ALL_SIGNALS, Form, Studio

Components = dict[str, gr.components.Component]

OUTPUTS = ("status", "baseline", "personalized", "voice", "compare_group", "real", "metrics", "selected", "peers",
           "peers_table", "sae", "sae_figure", "terms", "terms_text", "prompt", "timings")


def build_inputs(studio: Studio) -> Components:
    """① whose voice, ② which product, ③ how to personalize, and the Generate and Stop buttons."""
    ui: Components = {}
    start = studio.held_out(studio.user_ids[0])
    _history_inputs(studio, ui)
    _product_inputs(studio, ui, start)
    _settings_inputs(studio, ui)
    with gr.Row(elem_id="action-bar"):  # sticky (texts.CSS): on the first screen, and while scrolling the form
        ui["generate"] = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
        ui["stop"] = gr.Button("Stop", variant="stop", scale=1)
    return ui


def _history_inputs(studio: Studio, ui: Components) -> None:
    default_user = studio.user_ids[0]
    gr.Markdown("### ① Whose voice?", elem_classes="dep-step")
    ui["source"] = gr.Radio([("A bundled reviewer", "bundled"), ("Paste or upload reviews", "paste"),
                             ("Type reviews in a table", "table")], value="bundled", show_label=False,
                            elem_id="source")
    with gr.Group(visible=True) as ui["bundled_group"]:
        ui["user_id"] = gr.Dropdown(studio.user_choices, value=default_user, label="Bundled reviewer",
                                    info=f"{len(studio.user_ids):,} {studio.pool_name}, "
                                         "most reviews first; type to search", elem_id="user_id")
        ui["user_info"] = gr.Markdown(studio.user_summary(default_user), padding=True)
        with gr.Accordion("Their reviews, oldest first", open=False):
            ui["user_history"] = gr.Dataframe(studio.user_table(default_user), interactive=False, wrap=True,
                                              max_height=300, elem_id="user-history")
    with gr.Group(visible=False, elem_id="paste-group") as ui["paste_group"]:
        ui["history"] = gr.Textbox(
            label="Past reviews: JSONL (Amazon 2014 or 2023 fields) or CSV",
            info="CSV columns: item_title, rating, review_title, review_text. JSON lines: "
                 "reviewerID/asin/overall/summary/reviewText or user_id/parent_asin/rating/title/text, "
                 "or the CSV's column names.",
            lines=7, max_lines=14, placeholder=examples.CSV_GUITARIST, elem_id="history")
        ui["upload"] = gr.File(label="…or upload a .jsonl, .json, .csv (or .gz) file",
                               file_types=[".jsonl", ".json", ".csv", ".txt", ".gz"], height=120)
        ui["history_status"] = gr.Markdown(padding=True, elem_id="history-status")
    with gr.Group(visible=False) as ui["table_group"]:
        ui["table"] = gr.Dataframe(value=[["", None, "", ""]] * 3, headers=TABLE_HEADERS,
                                   datatype=["str", "number", "str", "str"], column_count=4, interactive=True,
                                   wrap=True, column_widths=["30%", "14%", "22%", "34%"],
                                   label="Your past reviews: one row each (more rows: a cell's ⋮ menu)",
                                   elem_id="table")


def _product_inputs(studio: Studio, ui: Components, start: dict) -> None:
    gr.Markdown("### ② Which product, which rating?", elem_classes="dep-step")
    ui["held_out_button"] = gr.Button("↺ This reviewer's held-out review (with the real text to compare)",
                                      size="sm", elem_id="held-out")
    ui["item_id"] = gr.Dropdown(studio.catalog_choices, value=start["item_id"],
                                label=f"Pick from the catalog ({len(studio.catalog_choices)} products)",
                                info="type to search by title; or type any product below", elem_id="item_id")
    ui["item_title"] = gr.Textbox(start["item_title"], label="Product title", elem_id="item_title")
    ui["item_description"] = gr.Textbox(start["item_description"], label="Product description (optional)",
                                        lines=2, max_lines=6, elem_id="item_description")
    with gr.Row():
        ui["rating"] = gr.Slider(1, 5, value=start["rating"], step=1, label="Rating ★", elem_id="rating")
        ui["review_title"] = gr.Textbox(start["review_title"], label="Review title", elem_id="review_title")
    with gr.Accordion("Real review, to compare against (optional)", open=False):
        ui["reference"] = gr.Textbox(start["reference"], show_label=False, lines=4, max_lines=10,
                                     placeholder="Filled in for a bundled reviewer's own product; "
                                                 "paste one here to score a pasted history too.",
                                     elem_id="reference")


def _settings_inputs(studio: Studio, ui: Components) -> None:
    form = Form()
    gr.Markdown("### ③ How to personalize", elem_classes="dep-step")
    with gr.Row():
        ui["k"] = _slider("k", form.k, 1, "K: past reviews used", info="0 = no history", elem_id="k")
        ui["history_rule"] = gr.Radio([("most relevant", "relevant"), ("most recent", "recent")],
                                      value=form.history_rule, label="Which past reviews",
                                      elem_id="history_rule")
    ui["signals"] = gr.CheckboxGroup(SIGNALS, value=ALL_SIGNALS, label="Signals for the personalized output",
                                     info=texts.SIGNALS_HELP, elem_id="signals")
    ui["signals_hint"] = gr.Markdown(mode_hint(ALL_SIGNALS))
    ui["strength"] = _slider("strength", form.strength, 0.1, "Personalization strength",
                             info="0 = the generic reviewer, 1 = this user, 2 = this user, exaggerated",
                             elem_id="strength")
    ui["baseline_mode"] = gr.Radio([(label, mode) for mode, label in BASELINES.items()], value=form.baseline_mode,
                              label="Compare with", elem_id="baseline_mode")
    ui["max_new_tokens"] = _slider("max_new_tokens", form.max_new_tokens, 1, "Max new tokens",
                                   info=studio.speed_hint(), elem_id="max_new_tokens")
    ui["end_at_user_length"] = gr.Checkbox(form.end_at_user_length, label="End near the user's typical length",
                                           info=texts.END_AT_USER_LENGTH_HELP, elem_id="end_at_user_length")
    with gr.Accordion("Advanced", open=False):
        ui["peer_temperature"] = _slider("peer_temperature", form.peer_temperature, 0.05,
                                         "Peer weighting temperature",
                                         info="higher: peers count more equally in the differences",
                                         elem_id="peer_temperature")
        with gr.Row():
            ui["temperature"] = _slider("temperature", form.temperature, 0.05, "Temperature", info="0 = greedy",
                                          elem_id="temperature")
            ui["top_p"] = _slider("top_p", form.top_p, 0.05, "Top-p", elem_id="top_p")
        ui["seed"] = gr.Number(form.seed, label="Seed", precision=0, minimum=BOUNDS["seed"][0],
                               maximum=BOUNDS["seed"][1], elem_id="seed")


def _slider(field: str, value: float, step: float, label: str, **kwargs) -> gr.Slider:
    """A slider over the engine's own bounds of a setting (dep_engine.settings.BOUNDS)."""
    low, high = BOUNDS[field]
    return gr.Slider(low, high, value=value, step=step, label=label, **kwargs)


def build_outputs() -> Components:
    """The status line, the two reviews side by side with their voice check, and the real review with its
    metrics."""
    ui: Components = {}
    ui["status"] = gr.Markdown(texts.READY, elem_id="status", padding=True)
    with gr.Row(equal_height=True):
        ui["baseline"] = gr.Textbox(label=MODE_TITLES[Form.baseline_mode], lines=9, max_lines=24, interactive=False,
                                    buttons=["copy"], elem_id="baseline")
        ui["personalized"] = gr.Textbox(label=MODE_TITLES["dep"], lines=9, max_lines=24, interactive=False,
                                        buttons=["copy"], elem_id="personalized")
    ui["voice"] = gr.Markdown(padding=True, elem_id="voice")
    with gr.Group(visible=False) as ui["compare_group"]:
        ui["real"] = gr.Textbox(label="The real review", lines=4, max_lines=12, interactive=False, elem_id="real")
        ui["metrics"] = gr.Markdown(padding=True, elem_id="metrics")
    return ui


def build_evidence() -> Components:
    """The tabs that explain a generation: past reviews, peers, SAE codes, words, prompt, timings."""
    ui: Components = {}
    with gr.Tabs():
        with gr.Tab("Past reviews"):
            gr.Markdown(texts.PAST_REVIEWS_HELP, padding=True)
            ui["selected"] = gr.Dataframe(pd.DataFrame(columns=evidence.SELECTED_HEADERS), interactive=False,
                                          wrap=True, max_height=2000, elem_id="selected",
                                          column_widths=["5%", "22%", "6%", "16%", "13%", "9%", "29%"])
        with gr.Tab("Peers") as ui["peers_tab"]:
            gr.Markdown(texts.PEERS_HELP, padding=True)
            ui["peers"] = gr.Dataframe(pd.DataFrame(columns=evidence.PEER_HEADERS), interactive=False, wrap=True,
                                       max_height=600, elem_id="peers",
                                       column_widths=["5%", "20%", "17%", "8%", "10%", "40%"])
            ui["peers_table"] = gr.State()  # the latest rows: a table updated in a hidden tab shows none
        with gr.Tab("SAE codes") as ui["sae_tab"]:
            gr.Markdown(texts.SAE_HELP, padding=True, elem_id="sae-help")
            ui["sae"] = gr.Plot(show_label=False, elem_id="sae-plot")
            ui["sae_figure"] = gr.State()  # the latest figure: a plot updated in a hidden tab stays blank
        with gr.Tab("Distinctive words"):
            ui["terms"] = gr.Markdown(texts.TERMS_HELP, padding=True)
            gr.Markdown("**Where this user's words appear in the past reviews used**", padding=True)
            ui["terms_text"] = gr.HTML(elem_id="terms-text", padding=True)
        with gr.Tab("Prompt"):
            ui["prompt"] = gr.Textbox(show_label=False, lines=14, max_lines=30, interactive=False, buttons=["copy"],
                                      placeholder="The personalized prompt appears here.", elem_id="prompt")
        with gr.Tab("Timings"):
            ui["timings"] = gr.Markdown(TIMINGS_EMPTY, padding=True)
    return ui


def build_compare(studio: Studio) -> Components:
    """Two bundled reviewers on the form's product, with its settings and seed, side by side."""
    ui: Components = {}
    with gr.Accordion("Compare two reviewers: the same product, settings and seed", open=False,
                      elem_id="compare-view"):
        gr.Markdown(texts.COMPARE_HELP, padding=True)
        with gr.Row():
            ui["other_user_id"] = gr.Dropdown(studio.user_choices, value=studio.user_ids[1], label="Second reviewer",
                                              scale=3, elem_id="other-user")
            ui["compare"] = gr.Button("Compare", scale=1, elem_id="compare")
        ui["compare_status"] = gr.Markdown(padding=True, elem_id="compare-status")
        with gr.Row(equal_height=True):
            ui["first_review"] = gr.Textbox(label="The reviewer chosen in ①", lines=8, max_lines=20,
                                            interactive=False, elem_id="first-review")
            ui["second_review"] = gr.Textbox(label="The second reviewer", lines=8, max_lines=20, interactive=False,
                                             elem_id="second-review")
    return ui


def build_examples(studio: Studio, ui: Components) -> None:
    """One-click examples that fill the form: bundled reviewers, and pasted histories."""
    gr.Markdown("### Examples: one click fills the form, then press Generate")
    with gr.Row():
        with gr.Column():
            gr.Examples([["bundled", u, 4, "relevant", ALL_SIGNALS] for u in studio.example_users],
                        inputs=[ui[n] for n in ("source", "user_id", "k", "history_rule", "signals")],
                        label="Bundled reviewers", example_labels=[studio.user_label(u) for u in studio.example_users])
        with gr.Column():
            gr.Examples(examples.pasted(studio.items), label="Pasted histories", example_labels=examples.PASTED_LABELS,
                        inputs=[ui[n] for n in examples.PASTED_FIELDS])
