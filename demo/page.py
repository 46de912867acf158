"""`build_demo`: the page assembled from its views (demo/layout.py), their events (demo/events.py)
and the named API endpoints (demo/api.py)."""
from __future__ import annotations

import gradio as gr

from . import api, events, layout, texts
from .sharing import DELETE_CACHE
from .studio import Studio


def build_demo(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title=texts.TITLE, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(texts.INTRO)
        with gr.Accordion("What the measurements say", open=False):
            gr.Markdown(texts.MEASUREMENTS)
        if not studio.engine.adapter_trained:
            gr.Markdown(texts.UNTRAINED, elem_classes="dep-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=380):
                ui = layout.build_inputs(studio)
            with gr.Column(scale=7, min_width=420, elem_id="outputs"):
                ui |= layout.build_outputs()
                ui |= layout.build_evidence()
                ui |= layout.build_compare(studio)
        layout.build_examples(studio, ui)
        with gr.Row():
            gr.Markdown(texts.HOW_IT_WORKS)
            first, second = (studio.user_ids * 2)[:2]  # the pool's most prolific reviewers
            gr.Markdown(texts.API_HELP.format(user=first, other=second))
        events.wire(demo, studio, ui)
        api.register(studio)
    return demo


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
