"""Vectorised `difference_embeddings` against the per-peer reference loop, on the same inputs.

Inputs are real review vectors of the bundled pool (MiniLM text embedding + 2 style features,
d = 386, read from the shipped embedding cache): K = 8 selected reviews, each with a random
number of peers, and each peer's author mean (running sums, as the store computes them).
Both functions get identical arrays; the loop gets them split per item.

    python bench/differences.py [--cases 40] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import _common
import numpy as np
from _common import median, table, verdict


def load_pool():
    """The bundled pool's store (embeddings from the cache in assets/; the encoder is never loaded)."""
    from dep_engine.data import load_dataset
    from dep_engine.embeddings import Encoder
    from dep_engine.engine import BUNDLED_DATA, embedding_cache_dir
    from dep_engine.store import ReviewStore

    dataset = load_dataset(str(BUNDLED_DATA))
    return ReviewStore.build(dataset, Encoder(), embedding_cache_dir(str(BUNDLED_DATA)), progress=False, style=True)


def make_case(store, rng: np.random.Generator, k: int, low: int, high: int):
    counts = rng.integers(low, high + 1, size=k)
    rows = rng.integers(0, len(store.reviews), size=int(counts.sum()))
    his = store.embeddings[rng.integers(0, len(store.reviews), size=k)]
    user_mean = store.embeddings[rng.integers(0, len(store.reviews), size=20)].mean(axis=0)
    peers = store.embeddings[rows]
    peer_means = store.user_mean(rows, float("inf"))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return his, user_mean, peers, peer_means, offsets, counts


def best_of(fn, repeats: int) -> float:
    """Median of `repeats` timings (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="random cases per peer-count range")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()

    from dep_engine.differences import difference_embeddings, difference_embeddings_loop

    _common.header("bench/differences.py -- vectorised difference_embeddings vs the per-peer loop",
                   "machine shared with other work: speed-ups are ratios measured back to back")
    store = load_pool()
    print(f"pool: {len(store.reviews)} real reviews, d = {store.dim}; K = {args.k}; "
          f"{args.cases} random cases per row; time = median of {args.repeats} calls per case, then median over cases")
    rng = np.random.default_rng(0)
    rows, worst_all = [], 0.0
    speedups_all = []
    for low, high in ((5, 5), (5, 50), (5, 200), (200, 200)):
        fast_times, loop_times, errors, peers_total = [], [], [], []
        for _ in range(args.cases):
            his, user_mean, peers, peer_means, offsets, counts = make_case(store, rng, args.k, low, high)
            bounds = np.append(offsets, len(peers))
            split_peers = [peers[bounds[j]:bounds[j + 1]] for j in range(args.k)]
            split_means = [peer_means[bounds[j]:bounds[j + 1]] for j in range(args.k)]
            fast, _ = difference_embeddings(his, user_mean, peers, peer_means, offsets, 1.0)
            reference = difference_embeddings_loop(his, user_mean, split_peers, split_means, 1.0)
            errors.append(float(np.abs(fast.astype(np.float64) - reference).max()))
            fast_times.append(best_of(partial(difference_embeddings, his, user_mean, peers, peer_means, offsets, 1.0),
                                      args.repeats))
            loop_times.append(best_of(partial(difference_embeddings_loop, his, user_mean, split_peers, split_means, 1.0),
                                      max(1, args.repeats // 2)))
            peers_total.append(int(counts.sum()))
        speedup = median(l / f for l, f in zip(loop_times, fast_times))
        speedups_all.append(speedup)
        worst = max(errors)
        worst_all = max(worst_all, worst)
        rows.append([f"{low}-{high}", f"{median(peers_total):.0f}", f"{median(fast_times) * 1e3:.3f}",
                     f"{median(loop_times) * 1e3:.2f}", f"{speedup:.1f}x", f"{worst:.1e}"])
    table(["peers per item", "peers total (median)", "vectorised ms", "loop ms", "speed-up (median)",
           "max |diff|"], rows, f"K = {args.k}, d = {store.dim}, temperature 1")
    print(f"\nmax abs difference over all cases: {worst_all:.2e} (goal < 1e-5: {verdict(worst_all < 1e-5)}); "
          f"speed-up {min(speedups_all):.1f}x to {max(speedups_all):.1f}x")
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
