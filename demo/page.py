"""`build_demo`: the page assembled from its views (demo/layout.py), their events (demo/events.py)
and the named API endpoints (demo/api.py)."""
from __future__ import annotations

import os

import gradio as gr

from dep_engine.choices import Preset

from . import api, events, layout, texts
from .sharing import DELETE_CACHE
from .studio import Studio


def build_demo(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title=texts.TITLE, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(texts.INTRO)
        with gr.Accordion("What the measurements say", open=False):
            gr.Markdown(studio.measurements.summary)
        if not studio.engine.adapter_trained:
            gr.Markdown(texts.UNTRAINED, elem_classes="dep-banner")
        if studio.engine.config.preset == Preset.PAPER:
            gr.Markdown(texts.PAPER_PRESET.format(llm=studio.engine.config.llm, adapter=studio.engine.config.adapter),
                        elem_classes="dep-banner")
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
            api_example = gr.Markdown(api_help(studio, local_url()))

        def show_api_help(request: gr.Request) -> str:
            return api_help(studio, page_url(request))

        demo.load(show_api_help, None, api_example, queue=False, api_visibility="private", show_progress="hidden")
        events.wire(demo, studio, ui)
        api.register(studio)
    return demo


def api_help(studio: Studio, url: str) -> str:
    """The Python example, with the pool's most prolific reviewers and this server's address."""
    first, second = (studio.user_ids * 2)[:2]
    return texts.API_HELP.format(user=first, other=second).replace("http://127.0.0.1:7860/", url)


def local_url() -> str:
    """The address app.py binds (its GRADIO_SERVER_NAME / GRADIO_SERVER_PORT), until a page load says better."""
    host = os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{os.environ.get('GRADIO_SERVER_PORT') or 7860}/"


def page_url(request: gr.Request) -> str:
    """The address the visitor's browser used (through a proxy: the proxy's), which gradio_client can use too."""
    host = request.headers.get("x-forwarded-host") or request.headers.get("host")
    if not host:
        return local_url()
    scheme = (request.headers.get("x-forwarded-proto") or getattr(request.url, "scheme", "http") or "http").split(",")[0]
    return f"{scheme}://{host}/"


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="violet",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
