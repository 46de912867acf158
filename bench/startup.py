"""Start-up of the demo: `python app.py` until GET / answers 200, first start vs second start, and memory.

The first start runs with DEP_CACHE_DIR pointing at a new empty folder, so the bundled GGUF is
de-quantized into it (as on a fresh machine); the second start reuses that folder (as every later
start does). The pool's embeddings ship in assets/, so neither start embeds the pool. The OS page
cache is not dropped (that needs root and would disturb other work): "first" means a cold
dep-studio cache, not cold disks.

Memory: resident set (RSS) of the app process (and any children) at rest after start-up, and its
peak while one /review request (a bundled user, 128 new tokens) runs, sampled every 50 ms; VmHWM
(the kernel's own high-water mark) is printed beside it.

Then, each in a fresh child process: where a warm start's time goes (imports, data, store, LLM,
adapter), and two measured proposals for the engine/app:
  * clean_text fast path: skip the per-character control-character filter when str.isprintable()
    says there is nothing to filter (identical output, checked); the filter is most of load_dataset.
  * overlap (opt-in, --overlap 2): load the engine in a thread while the main thread imports
    gradio (app.py does them one after the other). Measured slower (the imports hold the GIL).

Goal: second start < 15 s. The warm start is repeated (--warm-starts, default 3) and the median
printed too, as one start moves by seconds with the machine's load.

    python bench/startup.py [--keep-cache] [--warm-starts 3] [--no-generation] [--no-phases] [--overlap PAIRS]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
from _common import ROOT, table, verdict

sys.path.insert(0, str(ROOT / "tests"))
from app_server import launch, stop_process  # noqa: E402  (the app's tests start the server the same way)

TIMEOUT = 600


def tree_rss_mib(pid: int) -> float:
    """RSS of the process and its children (psutil if installed, else /proc of the process alone)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20
    except ImportError:
        return _common.rss_mib(pid)
    except Exception:  # noqa: BLE001 - the process may be gone
        return float("nan")


def rss_split(pid: int) -> str:
    """'anon A / file F' MiB from /proc: file-backed pages include the memory-mapped model weights."""
    values = _common.proc_status_mib(pid, "RssAnon", "RssFile")
    if not values:
        return "n/a"
    return f"{values.get('RssAnon', float('nan')):.0f} / {values.get('RssFile', float('nan')):.0f}"


def vm_hwm_mib(pid: int) -> float:
    return _common.proc_status_mib(pid, "VmHWM").get("VmHWM", float("nan"))


class Sampler:
    """Peak RSS of a process tree, sampled every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


MARKERS = {"loading the engine": "imports", "ready in": "engine + UI"}


def start_app(cache_dir: str | None, log_path: Path) -> tuple[subprocess.Popen, str, float, dict]:
    """Launch app.py (tests/app_server.py's helper); return when GET / answers 200, with the moments its
    log lines first appeared (polled every 0.1 s): 'loading the engine' ends the imports, 'ready in'
    ends engine + UI."""
    seen: dict[str, float] = {}
    start = time.perf_counter()

    def watch_log() -> None:
        text = log_path.read_text(errors="replace") if len(seen) < len(MARKERS) and log_path.exists() else ""
        for marker, phase in MARKERS.items():
            if phase not in seen and marker in text:
                seen[phase] = time.perf_counter() - start

    process, url = launch(log_path, env={"DEP_CACHE_DIR": cache_dir} if cache_dir else None, timeout=TIMEOUT,
                          on_poll=watch_log)
    return process, url, time.perf_counter() - start, seen


def ready_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "ready in" in line]
    return lines[-1].split(": ", 1)[-1] if lines else "(no 'ready in' line)"


def one_generation(url: str, pid: int, new_tokens: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    user = client.predict(limit=1, api_name="/users")[0]["user_id"]
    with Sampler(pid) as sampler:
        start = time.perf_counter()
        out = client.predict(user_id=user, max_new_tokens=new_tokens, api_name="/review")
        seconds = time.perf_counter() - start
    return {"user": user, "seconds": seconds, "peak": sampler.peak, "hwm": vm_hwm_mib(pid), "split": rss_split(pid),
            "words": len(str(out.get("personalized", "")).split()) if isinstance(out, dict) else 0}


# ---- child processes: phases of a warm start, and the overlap variant ------------------------------

def clean_text_fast(value: object) -> str:
    """dep_engine.data.clean_text with a fast path: the per-character filter only when needed."""
    import html

    from dep_engine.data import MAX_TEXT_CHARS

    if value is None:
        return ""
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    text = html.unescape(str(value))
    if not text.isprintable():  # C-level scan; most reviews hold nothing to filter
        text = "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in text)
    return " ".join(text.split())[:MAX_TEXT_CHARS]


def child_phases() -> dict:
    times = {}
    start = time.perf_counter()
    import gradio  # noqa: F401
    times["import gradio"] = time.perf_counter() - start
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    times["import torch + transformers"] = time.perf_counter() - start
    from dep_engine import data
    from dep_engine.adapter import DEPAdapter
    from dep_engine.embeddings import Encoder
    from dep_engine.engine import BUNDLED_ADAPTER, BUNDLED_DATA, embedding_cache_dir
    from dep_engine.llm import load_llm
    from dep_engine.store import ReviewStore

    start = time.perf_counter()
    dataset = data.load_dataset(str(BUNDLED_DATA))
    times["load_dataset (engine)"] = time.perf_counter() - start
    original = data.clean_text
    data.clean_text = clean_text_fast
    try:
        start = time.perf_counter()
        fast = data.load_dataset(str(BUNDLED_DATA))
        times["load_dataset (clean_text fast path)"] = time.perf_counter() - start
    finally:
        data.clean_text = original
    same = fast.reviews == dataset.reviews and fast.items == dataset.items
    start = time.perf_counter()
    ReviewStore.build(dataset, Encoder(), embedding_cache_dir(str(BUNDLED_DATA)), False, style=True)
    times["review store (cached embeddings)"] = time.perf_counter() - start
    start = time.perf_counter()
    load_llm()
    times["LLM (de-quantized fp32 folder)"] = time.perf_counter() - start
    start = time.perf_counter()
    DEPAdapter.from_pretrained(BUNDLED_ADAPTER)
    times["adapter"] = time.perf_counter() - start
    return {"times": times, "identical": same}


def child_load(overlap: bool) -> dict:
    """gradio import + DEPEngine(), one after the other (as app.py) or overlapped in a thread."""
    start = time.perf_counter()
    box: dict = {}

    def load_engine() -> None:
        from dep_engine import DEPEngine

        box["engine"] = DEPEngine(progress=False)

    if overlap:
        thread = threading.Thread(target=load_engine)
        thread.start()
        import gradio
        thread.join()
    else:
        import gradio  # noqa: F401
        load_engine()
    return {"seconds": time.perf_counter() - start}


def run_child(mode: str) -> dict:
    import json

    proc = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error"))
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phases_report(pairs: int) -> None:
    from _common import median

    phases = run_child("phases")
    rows = [[name, f"{seconds:.2f}"] for name, seconds in phases["times"].items()]
    table(["phase (fresh process, warm dep-studio cache)", "seconds"], rows, "Where a warm start goes")
    t = phases["times"]
    print(f"clean_text fast path: load_dataset {t['load_dataset (engine)']:.2f} s -> "
          f"{t['load_dataset (clean_text fast path)']:.2f} s, identical dataset: {phases['identical']}")
    if not pairs:
        return
    runs = {"sequential (as app.py)": [], "overlapped (engine in a thread)": []}
    for i in range(pairs):
        order = [("sequential (as app.py)", "sequential"), ("overlapped (engine in a thread)", "overlap")]
        if i % 2:
            order.reverse()
        for label, mode in order:
            runs[label].append(run_child(mode)["seconds"])
    rows = [[label, " ".join(f"{v:.1f}" for v in values), f"{median(values):.1f}"] for label, values in runs.items()]
    table(["import gradio + DEPEngine()", "runs s", "median s"], rows,
          f"Overlap proposal ({pairs} fresh processes each, interleaved)")
    seq, ovl = (median(v) for v in runs.values())
    print(f"overlap saves {seq - ovl:.1f} s ({seq / ovl:.2f}x) of the import + engine part of a start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["phases", "sequential", "overlap"], help=argparse.SUPPRESS)
    parser.add_argument("--no-phases", action="store_true")
    parser.add_argument("--overlap", type=int, default=0, metavar="PAIRS",
                        help="also measure the overlap proposal with this many sequential/overlap child pairs")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the real ~/.cache/dep-studio (then the first start is warm too)")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--warm-starts", type=int, default=3, help="starts after the first (cache reused)")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.child:
        import json

        result = child_phases() if args.child == "phases" else child_load(args.child == "overlap")
        print(json.dumps(result))
        return

    _common.header("bench/startup.py -- `python app.py` until GET / answers 200; memory at rest and while generating",
                   "machine shared with other work: start-up times move with the load average")
    try:
        import psutil  # noqa: F401
        how = "psutil (process tree)"
    except ImportError:
        how = "/proc/<pid>/status VmRSS (main process only)"
    cache_dir = None if args.keep_cache else tempfile.mkdtemp(prefix="dep-bench-cache-")
    print(f"dep-studio cache: {cache_dir or 'the real one (~/.cache/dep-studio)'}; RSS via {how}")
    logs = Path(tempfile.mkdtemp(prefix="dep-bench-logs-"))
    rows, gen = [], None
    try:
        names = ["first", "second", "third", "fourth", "fifth", "sixth"]
        runs = names[:1 + max(1, min(args.warm_starts, len(names) - 1))]
        for run in runs:
            log_path = logs / f"app-{run}.log"
            process, url, seconds, seen = start_app(cache_dir, log_path)
            try:
                time.sleep(2.0)  # at rest: start-up work finished, no request yet
                rest = tree_rss_mib(process.pid)
                split = rss_split(process.pid)
                imports = seen.get("imports", float("nan"))
                ready = seen.get("engine + UI", float("nan"))
                rows.append([run, f"{seconds:.1f}", f"{imports:.1f}", f"{ready - imports:.1f}", f"{seconds - ready:.1f}",
                             ready_line(log_path), f"{rest:.0f}", split, f"{vm_hwm_mib(process.pid):.0f}",
                             _common.load_average().split()[0]])
                if run == runs[-1] and not args.no_generation:
                    gen = one_generation(url, process.pid, args.new_tokens)
            finally:
                stop_process(process)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    table(["start", "s to HTTP 200", "imports s", "engine + UI s", "launch s", "app's own log", "RSS at rest MiB",
           "anon / file MiB", "VmHWM MiB", "load"], rows,
          "Start-up (first: empty dep-studio cache, GGUF de-quantized; later: cache reused); phases from the "
          "app's log lines, 0.1 s resolution")
    warm = [float(r[1]) for r in rows[1:]]
    second = float(rows[1][1])
    print(f"warm starts: {' '.join(f'{w:.1f}' for w in warm)} s, median {_common.median(warm):.1f} s "
          f"(goal < 15 s: {verdict(_common.median(warm) < 15)})")
    print(f"second start {second:.1f} s (goal < 15 s: {verdict(second < 15)}); "
          f"first start {float(rows[0][1]):.1f} s")
    if gen:
        print(f"\nOne /review request on the {runs[-1]} start (user {gen['user']}, baseline + personalized in one batch, max {args.new_tokens} "
              f"new tokens) took {gen['seconds']:.1f} s; peak RSS during it {gen['peak']:.0f} MiB "
              f"(VmHWM after it: {gen['hwm']:.0f} MiB; anon / file after it: {gen['split']} MiB)")
        print("RSS at rest is low partly because the LLM's safetensors are memory-mapped: their pages (file-backed, "
              "reclaimable) enter RSS when the first generation reads the weights")
    print(f"logs: {logs}")
    if not args.no_phases:
        print()
        phases_report(args.overlap)
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
