"""What a visitor waits for with *End near the user's typical length* on and off.

The app's request (generic baseline and DEP decoded in one batch, the app's 120 new tokens, its
default sampling) for bundled users' held-out requests, once with `end_at_user_length` and once
without, interleaved request by request (order alternating) so machine noise hits both alike. With
the option each row stops at its first sentence end from the user's typical length on (round 37),
so the batch ends when the longer of the two rows does.

    python bench/user_length.py [--requests 12] [--new-tokens 120]
"""
from __future__ import annotations

import argparse
import time

import _common
from _common import median, percentile, table

VARIANTS = {"off (default)": False, "on": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12, help="bundled users' held-out requests")
    parser.add_argument("--new-tokens", type=int, default=120, help="the app's max new tokens")
    args = parser.parse_args()

    from dep_engine import DEPEngine, SamplingSettings

    _common.header("The app's request with and without ending near the user's typical length",
                   f"{args.requests} held-out requests, generic + dep in one batch, up to {args.new_tokens} tokens")
    engine = DEPEngine(progress=False)
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in VARIANTS}
    for n, request in enumerate(_common.held_out_requests(engine, args.requests)):
        order = list(VARIANTS.items()) if n % 2 == 0 else list(VARIANTS.items())[::-1]
        for name, on in order:
            sampling = SamplingSettings(max_new_tokens=args.new_tokens, seed=n, end_at_user_length=on)
            start = time.perf_counter()
            result = engine.generate(request, ("generic", "dep"), sampling=sampling)
            words = max(len(text.split()) for text in result.texts.values())
            runs[name].append((time.perf_counter() - start, result.new_tokens, words))
    rows = [[name, f"{median(s for s, _, _ in r):.2f}", f"{percentile([s for s, _, _ in r], 90):.2f}",
             f"{median(t for _, t, _ in r):.0f}", f"{median(w for _, _, w in r):.0f}"] for name, r in runs.items()]
    table(["end near the user's length", "median s", "p90 s", "median decode steps", "median words (longer text)"],
          rows, f"Per request ({_common.load_average().split()[0]} load)")
    ratios = [off[0] / on[0] for off, on in zip(runs["off (default)"], runs["on"])]
    print(f"a request with the option takes {1 / median(ratios):.2f} of the time without it (median of "
          f"{len(ratios)} paired requests)")


if __name__ == "__main__":
    main()
