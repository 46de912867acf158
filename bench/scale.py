"""Context building (`ReviewStore.context`) with the peer pool grown to 100k and 1M reviews.

The pool is SYNTHETIC beyond the bundled 9,018 reviews: the real reviews are repeated under new
user ids ("<user>#s<copy>"), same items, texts, ratings and times, and each copy's text embedding
gets small Gaussian noise (sigma 0.02 per coordinate, then re-normalised). So every item has
about (size / 9,018) times as many reviewers as in the real data, which is what stresses peers.
The store is built directly from arrays (`ReviewStore(dataset, embeddings, encoder, item_ids,
item_embeddings)`); requests are real bundled users' held-out requests (cut-off = target time).

Each pool size runs in its own child process, so its peak RSS is its own and a size that does
not fit cannot take the others down.

Also measured: the store's per-user running sums, before (full-size float64 temporaries) and
after (float64 a chunk of whole users at a time, `store.per_user_running_sums`): same result,
a fraction of the peak memory.

    python bench/scale.py [--sizes 9018,100000,1000000] [--requests 200]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc

import _common
import numpy as np
from _common import percentile, table, verdict

NOISE = 0.02


def grow(dataset, text_embeddings: np.ndarray, size: int, seed: int = 0):
    """`size` reviews: the real ones, then noisy copies under new user ids."""
    from dep_engine.data import Dataset, Review

    base = dataset.reviews
    reviews = list(base)
    chunks = [text_embeddings]
    rng = np.random.default_rng(seed)
    copy = 0
    while len(reviews) < size:
        copy += 1
        take = min(len(base), size - len(reviews))
        reviews += [Review(f"{r.user_id}#s{copy}", r.item_id, r.rating, r.title, r.text, r.timestamp)
                    for r in base[:take]]
        noisy = text_embeddings[:take] + rng.standard_normal((take, text_embeddings.shape[1]), dtype=np.float32) * NOISE
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        chunks.append(noisy)
    embeddings = np.concatenate(chunks)[:size]
    return Dataset(reviews[:size], dataset.items), embeddings, copy


def store_arrays(store) -> dict[str, int]:
    names = ["embeddings", "user_running_sum", "times", "user_of_row", "user_time_key", "user_start",
             "item_rows", "item_embeddings"]
    return {n: int(getattr(store, n).nbytes) for n in names if hasattr(store, n)}


def one_size(size: int, n_requests: int, warmup: int) -> dict:
    """Build a store of `size` reviews and time `context` over held-out requests (child process)."""
    from dep_engine.data import Item, by_user, load_dataset
    from dep_engine.embeddings import Encoder, cached_encode
    from dep_engine.engine import BUNDLED_DATA, embedding_cache_dir
    from dep_engine.store import ReviewStore, item_text

    dataset = load_dataset(str(BUNDLED_DATA))
    encoder = Encoder()
    cache = embedding_cache_dir(str(BUNDLED_DATA))
    text = cached_encode(encoder, [r.text for r in dataset.reviews], cache, "reviews", False)
    item_ids = sorted({r.item_id for r in dataset.reviews} | set(dataset.items))
    item_embeddings = cached_encode(encoder, [item_text(dataset.items.get(i, Item(i, i))) for i in item_ids],
                                    cache, "items", False)
    start = time.perf_counter()
    pool, embeddings, copies = grow(dataset, text, size)
    grow_s = time.perf_counter() - start
    gc.collect()
    rss_before = _common.rss_mib()
    start = time.perf_counter()
    store = ReviewStore(pool, embeddings, encoder, item_ids, item_embeddings, style=True)
    build_s = time.perf_counter() - start
    gc.collect()
    rss_after = _common.rss_mib()
    arrays = store_arrays(store)

    # requests: real users' held-out reviews, profile = everything before, cut-off = target time
    users = sorted(by_user(dataset.reviews).items())
    import random
    random.Random(0).shuffle(users)
    requests = []
    for _, history in users[:n_requests]:
        target = history[-1]
        requests.append((history[:-1], store.item(target.item_id), float(target.timestamp)))
    peers_per_item = [e - s for s, e in store.item_slice.values()]
    results = {}
    for rule in ("relevant", "recent"):
        for profile, item, cutoff in requests[:warmup]:
            store.context(profile, item, 4, rule, cutoff, 1.0, 64)
        times, peers = [], []
        for profile, item, cutoff in requests:
            t0 = time.perf_counter()
            ctx = store.context(profile, item, 4, rule, cutoff, 1.0, 64)
            times.append(time.perf_counter() - t0)
            peers.append(sum(len(s.peers) for s in ctx.selected))
        results[rule] = {"p50": percentile(times, 50), "p95": percentile(times, 95), "peers": percentile(peers, 50)}
    return {"size": len(store.reviews), "copies": copies, "users": len(store.user_ids), "grow_s": grow_s,
            "build_s": build_s, "rss_before_mib": rss_before, "rss_after_mib": rss_after, "arrays": arrays,
            "peak_rss_mib": _common.peak_rss_mib(), "results": results, "requests": len(requests),
            "reviewers_per_item": float(np.median(peers_per_item))}


# ---- running sums: before and after chunking ------------------------------------------------------

def running_sums_full(embeddings: np.ndarray, starts: list[int]) -> np.ndarray:
    """The store's expression before it was chunked: full cumsum in float64, minus each user's base row."""
    n = len(embeddings)
    running = np.cumsum(embeddings, axis=0, dtype=np.float64)
    base = np.vstack([np.zeros((1, running.shape[1])), running[np.asarray(starts[1:]) - 1]])
    return (running - np.repeat(base, np.diff(np.append(starts, n)), axis=0)).astype(np.float32)


def compare_running_sums(size: int) -> list:
    """Peak traced memory and time of the two running-sum computations on `size` x 386 vectors."""
    from dep_engine.store import per_user_running_sums

    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((size, 386), dtype=np.float32)
    lengths = rng.integers(1, 20, size=size // 5)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = [int(s) for s in starts[starts < size]]
    rows = []
    outputs = {}
    for name, fn in (("before: full float64 temporaries", running_sums_full),
                     ("after: per_user_running_sums (chunks of users)", per_user_running_sums)):
        gc.collect()
        tracemalloc.start()
        t0 = time.perf_counter()
        outputs[name] = fn(embeddings, starts)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append([name, f"{seconds:.2f}", f"{peak / 2**20:.0f}"])
    a, b = outputs.values()
    err = float(np.abs(a - b).max())
    return rows, err, embeddings.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="9018,100000,1000000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--running-sums-size", type=int, default=200_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one pool size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.requests, args.warmup)))
        return

    _common.header("bench/scale.py -- ReviewStore.context with the pool grown to 100k / 1M reviews",
                   "SYNTHETIC pool: the 9,018 real reviews repeated under new user ids, text embeddings + "
                   f"N(0, {NOISE}^2) noise (re-normalised), same items and times; machine shared with other work")
    results, failed = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        print(f"building and querying a {size:,}-review pool (child process)...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", str(size), "--requests", str(args.requests),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            failed.append((size, proc.returncode, proc.stderr.strip().splitlines()[-1:] or ["(killed)"]))
            print(f"  {size:,}: FAILED (exit {proc.returncode}): {failed[-1][2]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    rows = []
    for r in results:
        for rule, v in r["results"].items():
            rows.append([f"{r['size']:,}", f"{r['users']:,}", f"{r['reviewers_per_item']:.0f}", rule,
                         f"{v['peers']:.0f}", f"{v['p50'] * 1e3:.2f}", f"{v['p95'] * 1e3:.2f}",
                         verdict(v["p50"] < 0.020)])
    table(["pool reviews", "users", "reviewers/item (median)", "history rule", "peers used (p50)",
           "context p50 ms", "context p95 ms", "goal p50 < 20 ms"], rows,
          f"store.context(K=4, 64 peers max, T=1) over {args.requests} held-out requests")

    rows = []
    for r in results:
        arrays = r["arrays"]
        total = sum(arrays.values())
        rows.append([f"{r['size']:,}", f"{arrays.get('embeddings', 0) / 2**20:.0f}",
                     f"{arrays.get('user_running_sum', 0) / 2**20:.0f}",
                     f"{(total - arrays.get('embeddings', 0) - arrays.get('user_running_sum', 0)) / 2**20:.0f}",
                     f"{total / 2**20:.0f}", f"{r['rss_after_mib'] - r['rss_before_mib']:.0f}",
                     f"{r['peak_rss_mib']:.0f}", f"{r['build_s']:.1f}"])
    table(["pool reviews", "embeddings MiB", "running sums MiB", "other arrays MiB", "arrays total MiB",
           "store RSS growth MiB", "process peak RSS MiB", "build s"], rows,
          "Store memory: array nbytes; RSS growth = after - before building the store (arrays + Python "
          "indexes: review list, (user,item)->row dict, user/item dicts); peak includes the synthetic inputs")
    for size, code, tail in failed:
        print(f"NOT MEASURED: {size:,} reviews (exit {code}: {tail})")

    print(f"\nRunning sums on {args.running_sums_size:,} x 386 random vectors (tracemalloc peak of numpy allocations):")
    rows, err, input_bytes = compare_running_sums(args.running_sums_size)
    table(["running sums", "seconds", "peak traced MiB"], rows,
          f"(input {input_bytes / 2**20:.0f} MiB float32; max abs difference between the two: {err:.1e})")
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
