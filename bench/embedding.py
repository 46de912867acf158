"""Embedding throughput of a pool build: reviews/s with the bundled MiniLM, no cache.

1000 real review texts of the bundled pool (the first N in file order), embedded with the
engine's `Encoder.encode` (batch size 64, L2-normalised), which is what `cached_encode` calls for
every block it does not find in the cache. The model is loaded first (its load time is printed
apart), then one warm-up batch, then the timed encodes (median of --repeats).

Run with torch thread counts 1 and 2 on the same texts (the machine has 2 cores, shared).
A variant that is NOT the engine's: max_seq_length 128 word pieces instead of the model's 256
(long reviews are cut earlier). Faster, but the vectors change (cosine to the 256 ones printed),
so the shipped embedding cache and the trained adapter would no longer match it.

    python bench/embedding.py [--texts 1000] [--repeats 2]
"""
from __future__ import annotations

import argparse
import time

import _common
from _common import median, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()

    import torch

    from dep_engine.data import load_dataset
    from dep_engine.embeddings import Encoder
    from dep_engine.engine import BUNDLED_DATA

    _common.header("bench/embedding.py -- pool embedding throughput (bundled all-MiniLM-L6-v2, no cache)",
                   "machine shared with other work: rows of this run are comparable, other runs less so")
    texts = [r.text for r in load_dataset(str(BUNDLED_DATA)).reviews[:args.texts]]
    words = [len(t.split()) for t in texts]
    print(f"{len(texts)} real review texts: median {median(words):.0f} words, mean {sum(words) / len(words):.0f}, "
          f"max {max(words)}")
    encoder = Encoder()
    start = time.perf_counter()
    encoder.model  # noqa: B018 - loads the model
    print(f"encoder load: {time.perf_counter() - start:.1f} s (device {encoder.device}, batch size {encoder.batch_size}, "
          f"max_seq_length {encoder.model.max_seq_length})")
    default_threads = torch.get_num_threads()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        encoder.encode(texts[:64])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            vectors = encoder.encode(texts)
            times.append(time.perf_counter() - start)
        seconds = median(times)
        rows.append([threads, len(texts), f"{seconds:.2f}", f"{len(texts) / seconds:.0f}",
                     " ".join(f"{len(texts) / t:.0f}" for t in times), _common.load_average().split()[0]])
    best_threads = max(rows, key=lambda r: float(r[3]))[0]
    torch.set_num_threads(best_threads)
    window = encoder.model.max_seq_length
    encoder.model.max_seq_length = 128
    start = time.perf_counter()
    short = encoder.encode(texts)
    seconds = time.perf_counter() - start
    encoder.model.max_seq_length = window
    cosine = (short * vectors).sum(axis=1)  # both L2-normalised
    rows.append([f"{best_threads} (max_seq_length 128, not the engine's)", len(texts), f"{seconds:.2f}",
                 f"{len(texts) / seconds:.0f}", "", _common.load_average().split()[0]])
    torch.set_num_threads(default_threads)
    table(["torch threads", "texts", "seconds (median)", "reviews/s", "each run reviews/s", "load"], rows,
          f"Encoder.encode on {len(texts)} texts, output {vectors.shape[1]}-d float32")
    print(f"max_seq_length 128 vs {window}: cosine of the vectors median {median(cosine.tolist()):.4f}, "
          f"min {cosine.min():.4f}; {sum(c < 0.9999 for c in cosine.tolist())} of {len(texts)} vectors changed")
    best = max(float(r[3]) for r in rows[:-1])
    print(f"\nat {best:.0f} reviews/s, embedding a 100k-review pool takes about {100_000 / best / 60:.0f} min "
          f"and 1M about {1_000_000 / best / 3600:.1f} h (the cache then makes later starts skip it)")
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
