"""Personalization overhead per request: everything the engine does before `generate`.

`DEPEngine.prepare` = retrieval of the K past reviews, peers, difference embeddings, SAE and
projectors (the adapter), prompt assembly and the soft-token input embeddings. Timed over bundled
users' held-out requests (latest review is the target), p50 and p95, and set against the
end-to-end latency of a few full DEP generations of exactly 128 new tokens.

Variants, interleaved request by request (order alternating) so machine noise hits both alike:
  engine      : the engine as it is (torch's default thread count)
  1 thread    : the same call inside torch.set_num_threads(1) -- a proposed engine change: the
                adapter and prompt tensors are tiny, and with 2 OpenMP threads on 2 shared cores
                one preempted thread stalls the other.

Then the app's request as the app makes it (baseline and DEP decoded in one batch) against DEP
alone and the baseline alone, 128 tokens each, back to back.

Goals: p50 < 20 ms and < 5% of the request.

    python bench/overhead.py [--requests 200] [--generations 3] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import _common
from _common import percentile, table, verdict


@contextmanager
def threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_prepare(engine, request, modes, personalization, sampling, n_threads):
    with threads(n_threads):
        start = time.perf_counter()
        prepared = engine.prepare(request, modes, personalization, sampling)
        embeds, stages = prepared.embeds, prepared.timings
        total = time.perf_counter() - start
    return total, stages, embeds


def full_generation(engine, request, personalization, sampling, new_tokens, n_threads, modes=("dep",)):
    """Prepare (with `n_threads` torch threads) then decode exactly `new_tokens` tokens with the
    engine's generate arguments (min_new_tokens forces the length, so every run decodes as much)."""
    import torch

    from dep_engine.soft_prompt import left_pad

    llm = engine.llm
    cpu = time.process_time()
    start = time.perf_counter()
    with threads(n_threads):
        embeds = engine.prepare(request, modes, personalization, sampling).embeds
    prepared = time.perf_counter()
    batch, mask = left_pad(embeds)
    with torch.inference_mode():
        torch.manual_seed(sampling.seed)
        out = llm.model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=True, temperature=sampling.temperature,
                                 top_p=sampling.top_p, top_k=None, pad_token_id=llm.tokenizer.pad_token_id,
                                 eos_token_id=llm.tokenizer.eos_token_id)
    end = time.perf_counter()
    return prepared - start, end - start, out.shape[1], max(len(e) for e in embeds), time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-app-request", dest="app_request", action="store_false",
                        help="skip timing the app's two-prompt batch against one prompt")
    args = parser.parse_args()

    import torch

    from dep_engine import DEPEngine, PersonalizationSettings
    from dep_engine.generation import SamplingSettings

    _common.header("bench/overhead.py -- personalization overhead per request (DEPEngine.prepare)",
                   "machine shared with other work: compare variants within this run, not across runs")
    start = time.perf_counter()
    engine = DEPEngine(progress=False)
    print(f"engine loaded in {time.perf_counter() - start:.1f} s: {len(engine.dataset.reviews)} reviews, "
          f"{len(engine.users)} users, LLM dtype {engine.llm.dtype}, torch threads {torch.get_num_threads()}")
    personalization = PersonalizationSettings()  # K=4, relevant, T=1, 64 peers, 60 words (the app's defaults)
    sampling = SamplingSettings(max_new_tokens=args.new_tokens)
    requests = _common.held_out_requests(engine, args.requests)
    print(f"{len(requests)} held-out requests (bundled users' latest reviews), settings {personalization}")

    variants = {"engine": None, "1 thread": 1}
    mode_sets = {"dep": ("dep",), "nonperso+dep (app)": ("nonperso", "dep")}
    for request in requests[:args.warmup]:
        for n in variants.values():
            for modes in mode_sets.values():
                time_prepare(engine, request, modes, personalization, sampling, n)

    totals = {(v, m): [] for v in variants for m in mode_sets}
    stages: dict[tuple[str, str], list[float]] = {}
    lengths = []
    for i, request in enumerate(requests):
        order = list(variants.items())
        if i % 2:
            order.reverse()
        for name, n in order:
            for label, modes in mode_sets.items():
                total, parts, embeds = time_prepare(engine, request, modes, personalization, sampling, n)
                totals[(name, label)].append(total)
                if label == "dep":
                    for stage, seconds in parts.items():
                        stages.setdefault((name, stage), []).append(seconds)
                    if name == "engine":
                        lengths.append(len(embeds[0]))

    rows = []
    for (name, label), values in totals.items():
        rows.append([label, name, f"{percentile(values, 50) * 1e3:.2f}", f"{percentile(values, 95) * 1e3:.2f}",
                     f"{max(values) * 1e3:.1f}"])
    table(["modes", "variant", "p50 ms", "p95 ms", "max ms"], rows,
          f"Whole prepare over {len(requests)} requests (prompt length p50 {percentile(lengths, 50):.0f} tokens)")
    rows = [[name, stage, f"{percentile(v, 50) * 1e3:.2f}", f"{percentile(v, 95) * 1e3:.2f}"]
            for (name, stage), v in sorted(stages.items())]
    table(["variant", "stage (engine's own timings)", "p50 ms", "p95 ms"], rows, "Stages, DEP mode")

    print(f"\nEnd-to-end: {args.generations} DEP generations of exactly {args.new_tokens} new tokens "
          f"(sampling T={sampling.temperature}, top_p={sampling.top_p}, seed {sampling.seed}; "
          f"prepare then model.generate as the engine calls it, min_new_tokens={args.new_tokens})", flush=True)
    full_generation(engine, requests[0], personalization, SamplingSettings(max_new_tokens=8), 8, None)  # warm-up
    e2e = {"engine": [], "1 thread": []}
    rows = []
    for g in range(args.generations):
        request = requests[g + 1]
        name = "engine"
        prep, total, _, length, cpu = full_generation(engine, request, personalization, sampling, args.new_tokens,
                                                 variants[name])
        e2e[name].append(total)
        rows.append([g + 1, length, f"{prep * 1e3:.1f}", f"{total:.2f}",
                     f"{args.new_tokens / (total - prep):.1f}", f"{prep / total * 100:.2f}%", f"{cpu / total:.2f}"])
    table(["run", "prompt tokens", "prepare ms", "end-to-end s", "tok/s (incl. prefill)", "prepare share",
           "CPU s per wall s"], rows)
    print("(CPU s per wall s: up to 2 with 2 threads; much lower means other work held the cores)")

    if args.app_request:
        request = requests[1]
        rows = []
        for label, modes in (("dep alone", ("dep",)), ("nonperso alone", ("nonperso",)),
                             ("nonperso + dep, one batch (app)", ("nonperso", "dep"))):
            prep, total, _, length, _ = full_generation(engine, request, personalization, sampling, args.new_tokens,
                                                        None, modes)
            rows.append([label, length, f"{prep * 1e3:.1f}", f"{total:.2f}"])
        table(["modes", "longest prompt", "prepare ms", f"end-to-end s ({args.new_tokens} tokens each)"], rows,
              "The app's request decodes the baseline and DEP in one left-padded batch; same request, back to back")
        print(f"batch of two / dep alone: {float(rows[2][3]) / float(rows[0][3]):.2f}x; "
              f"sequential (dep then nonperso) would take {float(rows[0][3]) + float(rows[1][3]):.2f} s")

    e2e_median = _common.median(e2e["engine"])
    print("\nSummary (DEP mode, prepare p50 against the median end-to-end latency of "
          f"{e2e_median:.2f} s for {args.new_tokens} new tokens):")
    rows = []
    for name in variants:
        p50 = percentile(totals[(name, "dep")], 50)
        p95 = percentile(totals[(name, "dep")], 95)
        share = p50 / e2e_median
        rows.append([name, f"{p50 * 1e3:.2f}", f"{p95 * 1e3:.2f}", f"{share * 100:.2f}%",
                     verdict(p50 < 0.020), verdict(share < 0.05)])
    table(["variant", "p50 ms", "p95 ms", "p50 share of request", "goal p50 < 20 ms", "goal < 5%"], rows)
    speedup = percentile(totals[("engine", "dep")], 50) / percentile(totals[("1 thread", "dep")], 50)
    print(f"\n1-thread prepare vs engine: p50 {speedup:.2f}x faster "
          f"(p95 {percentile(totals[('engine', 'dep')], 95) / percentile(totals[('1 thread', 'dep')], 95):.2f}x)")
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
