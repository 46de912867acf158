"""Issue 36: the vLLM backend against today's default path (ONNX Runtime, int8), in one run on this machine.

A. evaluation throughput: `evaluate --generate-only` on N held-out users (generic + dep), reviews/s;
B. the app's request (generic + DEP in one batch, 128 new tokens, default sampling), seconds;
C. 8 concurrent visitors, each sending the app's request at once: the mean wait per visitor (local: one
   generation at a time, `generation.generation_lock`; vLLM: every row in the server's batch).
D. the no-empty-review rule and the content filter after decoding: how many reviews of A came out empty,
   how many words were withheld.

    python bench/vllm.py [--users 8] [--dtype bfloat16] [--url URL]   # without --url starts a local server
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from dep_engine import vllm_backend
from dep_engine.engine import DEPEngine, EngineConfig
from dep_engine.evaluation import EvalSettings, evaluate, read_generations
from dep_engine.llm import resolve_llm
from dep_engine.settings import SamplingSettings

APP = SamplingSettings(max_new_tokens=128)


def throughput(engine: DEPEngine, users: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        evaluate(engine.config, EvalSettings(methods=["generic", "dep"], limit=users, generate_only=True, out=out,
                                             sampling=SamplingSettings(max_new_tokens=tokens)), engine=engine)
        seconds = time.perf_counter() - started
        records = read_generations(Path(out) / "generations.jsonl")
    return {"reviews": len(records), "seconds": seconds, "reviews_per_s": len(records) / seconds,
            "empty": sum(not r["text"].strip() for r in records), "withheld": sum(r.get("withheld", 0) for r in records)}


def app_request(engine: DEPEngine, user: str, repeats: int = 2) -> float:
    request = engine.user_request(user)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.generate(request, ("generic", "dep"), sampling=APP)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def visitors(engine: DEPEngine, users: list[str], count: int = 8) -> float:
    """Mean seconds from sending to the final result over `count` visitors arriving together."""
    waits: list[float] = []
    lock = threading.Lock()

    def visit(user: str) -> None:
        started = time.perf_counter()
        engine.generate(engine.user_request(user), ("generic", "dep"), sampling=APP)
        with lock:
            waits.append(time.perf_counter() - started)

    threads = [threading.Thread(target=visit, args=(u,)) for u in users[:count]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statistics.mean(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8, help="held-out users in A (2 reviews each)")
    parser.add_argument("--tokens", type=int, default=160, help="new tokens per review in A")
    parser.add_argument("--dtype", default="bfloat16", help="the local server's dtype")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    args = parser.parse_args()
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:12])
    local = DEPEngine(progress=False)
    server = None
    if args.url is None:
        started = time.perf_counter()
        server = vllm_backend.LocalServer.start(resolve_llm(local.config.llm)[0], dtype=args.dtype, kv_cache_gib=2)
        print(f"vLLM server ({args.dtype}, {vllm_backend.server_env()['OMP_NUM_THREADS']} threads) ready in "
              f"{time.perf_counter() - started:.1f} s")
    try:
        remote = DEPEngine(EngineConfig(vllm_url=args.url or server.url), progress=False)
        users = list(local.users)[:8]
        app_request(remote, users[0], 1)  # warm-up
        app_request(local, users[0], 1)
        report = {}
        for name, engine in (("local (ONNX Runtime int8)", local), (f"vLLM ({args.dtype})", remote)):
            report[name] = {"evaluation": throughput(engine, args.users, args.tokens),
                            "app_request_s": app_request(engine, users[1]),
                            "8_visitors_mean_wait_s": visitors(engine, users)}
            print(name, json.dumps(report[name], indent=1), flush=True)
        print(json.dumps(report, indent=1))
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
