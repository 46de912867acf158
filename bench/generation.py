"""Decoding speed: soft prompts vs a plain prompt, and decoding against the memory-bandwidth limit.

A. Memory bandwidth, measured in this run: torch.sum over a 1 GiB float32 tensor (read) and a
   copy into a warmed 1 GiB tensor (read + write), with 1 and 2 torch threads.
B. fp32 / bf16 x dynamic / static KV cache x 1 / 2 torch threads, on one typical DEP prompt
   (the held-out request whose DEP prompt length is the median of 40): time to first token
   (prefill), decode tokens/s, total for 128 new tokens, and the fraction of the bandwidth limit.
   Bytes per token = the model's parameter bytes in its dtype, each tensor counted once:
   SmolLM2 ties its input embeddings and LM head, and the LM head reads the whole 49152 x 576
   matrix every token, so it is counted once, in full; the input embedding lookup reads one row
   (ignored). "+KV" also counts reading the KV cache (dynamic: the mean context over the 128
   steps; static: the whole preallocated cache, as attention runs over all of it).
C. (run first, right after loading, with the engine's threads) Soft (DEP prompt with his/diff soft
   tokens) vs plain (the same ids, soft slots left with the placeholder token's embedding): same
   model, same length, greedy, 128 new tokens, 6 interleaved pairs.
   Goal: soft/plain decode tokens/s >= 0.95, judged on the median time per decode step (whole-run
   tokens/s printed too; on a shared machine one preempted stretch moves it by 10%).
   The prefill column (time to the first token) is the prompt's prefill, fp32 vs bf16.
D. Prefill with the fp32 model, convert its KV cache to bf16 and decode with a bf16 copy of the
   model and a static cache (two model copies: +269 MB; what the engine now does on the CPU). Run back to back with fp32 + static cache at each thread count (the load changes
   over minutes, so only neighbouring runs compare). Also with one model copy: fp32 + static
   cache, the prefill with 2 threads and the decode steps with 1 (a logits processor switches
   torch's thread count after the prompt's forward).

E. The engine's own `generate` on the app's batch (baseline + DEP, sampled), before (fp32
   throughout) and after (fp32 prompt, bf16 decode: the default), alternated.

Everything in A-D greedy (do_sample=False) with min_new_tokens = max_new_tokens, so every run decodes
exactly as many tokens. The machine is shared: compare rows of one run, not across runs.

Decoding in B and D stops after --decode-seconds (default 15 s, counted from the first new token,
so the prefill always completes); such runs are marked * and their total is projected from the
measured rate. C always decodes all tokens.

    python bench/generation.py [--new-tokens 128] [--pairs 6] [--decode-seconds 15] [--quick]
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from itertools import pairwise

import _common
from _common import median, table, verdict

warnings.filterwarnings("ignore", category=FutureWarning)


class TimingStreamer:
    """Timestamps of every `put`: the first is the prompt (empty with inputs_embeds), then one per token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def bandwidth(threads: int) -> dict[str, float]:
    """GB/s (1e9 bytes) for reading (sum) and copying (read + write) 1 GiB, median of 3."""
    import torch

    set_threads(threads)
    x = torch.ones(256 * 2**20, dtype=torch.float32)
    y = torch.zeros_like(x)  # touched, so the copy pays no page faults
    x.sum()
    y.copy_(x)
    reads, copies = [], []
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        reads.append(x.nbytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        y.copy_(x)
        copies.append(2 * x.nbytes / (time.perf_counter() - start) / 1e9)
    del x, y
    return {"read": median(reads), "copy": median(copies)}


def weight_bytes(model) -> int:
    """Parameter bytes, each tensor once (model.parameters() yields a tied tensor once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_position(model) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element


class DecodeBudget:
    """A stopping criterion: stop `seconds` after the first new token (the prefill is never cut)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.first: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        now = time.perf_counter()
        if self.first is None:
            self.first = now
        done = now - self.first > self.seconds
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class SwitchThreads:
    """A logits processor that sets torch's thread count once the prompt's forward is done, so the
    prefill runs with the threads set before generate and the decode steps with `threads`."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, input_ids, scores):
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return scores


def decode(llm, embeds, new_tokens: int, cache: str | None = None, past=None, budget: float | None = None,
           decode_threads: int | None = None) -> dict:
    """Greedy generation of exactly `new_tokens` tokens from (L, H) `embeds`; timings from a streamer.

    With `budget`, decoding stops `budget` seconds after the first new token; the decode rate is
    then over the tokens made, and "total" is projected to `new_tokens` (result["cut"] is True)."""
    import torch
    from transformers import StoppingCriteriaList

    batch = embeds[None].to(llm.dtype)
    mask = torch.ones(batch.shape[:2], dtype=torch.long)
    streamer = TimingStreamer()
    kwargs = {}
    if cache:
        kwargs["cache_implementation"] = cache
    if past is not None:
        kwargs["cache"] = past
    if budget:
        kwargs["stopping_criteria"] = StoppingCriteriaList([DecodeBudget(budget)])
    if decode_threads:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([SwitchThreads(decode_threads)])
    threads_before = torch.get_num_threads()
    with torch.inference_mode():
        start = time.perf_counter()
        out = llm.model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=llm.tokenizer.pad_token_id,
                                 eos_token_id=llm.tokenizer.eos_token_id, streamer=streamer, **kwargs)
        end = time.perf_counter()
    torch.set_num_threads(threads_before)
    steps = streamer.times[1:]  # the first put is the (empty) prompt
    first = steps[0] - start
    rate = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    gaps = sorted(b - a for a, b in pairwise(steps))
    step = gaps[len(gaps) // 2] if gaps else float("nan")  # median time per decode step: robust to preemption
    made = out.shape[1]
    cut = made < new_tokens
    total = first + (new_tokens - 1) / rate if cut else end - start
    return {"prefill": first, "rate": rate, "step": step, "total": total, "tokens": made, "cut": cut,
            "ids": out[0].tolist()}


def hybrid(fp32, bf16, embeds, new_tokens: int, budget: float | None = None) -> dict:
    """fp32 prefill of all but the last prompt position, KV cache cast to bf16 into a static cache,
    then the bf16 model decodes (it runs the last prompt position itself, as generate needs one)."""
    import torch
    from transformers import StaticCache

    length = len(embeds)
    with torch.inference_mode():
        start = time.perf_counter()
        out = fp32.model(inputs_embeds=embeds[None, :length - 1].to(fp32.dtype), use_cache=True)
        cache = StaticCache(config=bf16.model.config, max_cache_len=length + new_tokens)
        prefilled_cache = getattr(out, "cache", None) or out.past_key_values
        for layer, source in zip(cache.layers, prefilled_cache.layers):
            layer.update(source.keys.to(torch.bfloat16), source.values.to(torch.bfloat16))
        prefilled = time.perf_counter()
    result = decode(bf16, embeds, new_tokens, past=cache, budget=budget)
    result["prefill"] += prefilled - start
    result["total"] += prefilled - start
    result["fp32_prefill"] = prefilled - start
    return result


def engine_before_after(engine, request, new_tokens: int, repeats: int = 2) -> None:
    """E. The engine's own generate on the app's batch (baseline + DEP, sampled), before and after
    its CPU decoding change: fp32 throughout vs fp32 prompt + bf16 decode (the default). Alternated."""
    import dataclasses

    from dep_engine import SamplingSettings

    after = engine.llm
    variants = {"before: fp32 throughout (cpu_decode=float32)": dataclasses.replace(after, decode_dtype=None),
                "after: fp32 prompt, bf16 decode (default)": after}
    sampling = SamplingSettings(max_new_tokens=new_tokens, seed=0)
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, llm in variants.items():
            engine.llm = llm
            start = time.perf_counter()
            result = engine.generate(request, ("nonperso", "dep"), sampling=sampling)
            runs[name].append((time.perf_counter() - start, result.new_tokens))
    engine.llm = after
    rows = [[name, " ".join(f"{s:.2f}" for s, _ in r), f"{median(s for s, _ in r):.2f}",
             f"{median(n / s for s, n in r):.1f}"] for name, r in runs.items()]
    table(["engine.generate, nonperso + dep in one batch", "each run s", "median s", "decode steps/s (a token in each row)"], rows,
          f"E. The engine before and after (T=0.8, top-p 0.95, seed 0, up to {new_tokens} new tokens per row; "
          f"{_common.load_average().split()[0]} load)")
    before, after_s = (median(s for s, _ in r) for r in runs.values())
    print(f"engine request {before / after_s:.2f}x faster after (texts differ: sampling sees bf16 logits)")


def typical_prompt(engine, n: int = 40):
    """The held-out request whose DEP prompt length is the median, with its soft tokens."""
    from dep_engine import PersonalizationSettings

    settings = PersonalizationSettings()
    candidates = []
    for request in _common.held_out_requests(engine, n):
        context = engine.context(request, settings)
        if not context.selected:
            continue
        prompt = engine.prompt(request, context, "dep", settings.words_per_review)
        candidates.append((len(prompt.ids), request, context, prompt))
    candidates.sort(key=lambda c: c[0])
    return candidates[len(candidates) // 2]


def finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=6, help="soft/plain pairs (section C); one pair varies by +-10%%")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to try")
    parser.add_argument("--decode-seconds", type=float, default=15.0,
                        help="decode time cap per run in B and D; on a busy machine 2-thread runs can take minutes")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 pair (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.pairs = 32, 1

    import torch

    from dep_engine import DEPEngine
    from dep_engine.soft_prompt import prompt_embeddings
    from dep_engine.llm import load_llm

    _common.header("bench/generation.py -- decoding with soft prompts, and against the memory-bandwidth limit",
                   "machine shared with other work: compare rows within this run; the load average is printed per row")
    default_threads = torch.get_num_threads()
    thread_counts = [int(t) for t in args.threads.split(",")]
    new = args.new_tokens

    bw = {t: bandwidth(t) for t in thread_counts}
    table(["torch threads", "read GB/s (sum 1 GiB)", "copy GB/s (read+write)"],
          [[t, f"{v['read']:.1f}", f"{v['copy']:.1f}"] for t, v in bw.items()], "A. Memory bandwidth")
    set_threads(default_threads)

    engine = DEPEngine(progress=False)
    fp32 = engine.llm
    bf16 = load_llm(engine.config.llm, "cpu", dtype=torch.bfloat16)
    length, request, context, prompt = typical_prompt(engine)
    his, diff = engine.soft_tokens(context.his, context.diff)
    soft = {"fp32": prompt_embeddings(fp32, prompt, his, diff), "bf16": prompt_embeddings(bf16, prompt, his, diff)}
    plain = fp32.embed(torch.tensor(prompt.ids)).detach()
    models = {"fp32": fp32, "bf16": bf16}
    print(f"\ntypical DEP prompt: {length} tokens ({len(prompt.his_positions)} his + {len(prompt.diff_positions)} "
          f"diff soft tokens), user {request.profile[0].user_id}; {new} new tokens, greedy; "
          f"engine default torch threads: {default_threads}")
    warm = soft["fp32"][:32]
    for t in thread_counts:  # warm every kernel path cheaply (short prompt)
        set_threads(t)
        for name, llm in models.items():
            for cache in (None, "static"):
                decode(llm, warm, 4, cache)

    # ---- C. soft vs plain --------------------------------------------------------------------------
    t_soft = default_threads  # the engine's; C runs first, before the bf16 and static-cache runs touch the process
    set_threads(t_soft)
    runs = {"soft": [], "plain": []}
    for pair in range(args.pairs):
        order = [("soft", soft["fp32"]), ("plain", plain)]
        if pair % 2:
            order.reverse()
        for label, embeds in order:
            runs[label].append(decode(fp32, embeds, new))
    rows = []
    for label, rs in runs.items():
        rows.append([label, length, f"{median(r['prefill'] for r in rs):.2f}", f"{median(r['rate'] for r in rs):.2f}",
                     " ".join(f"{r['rate']:.1f}" for r in rs), f"{median(r['step'] for r in rs) * 1e3:.1f}",
                     f"{1 / median(r['step'] for r in rs):.2f}"])
    table(["prompt", "tokens", "prefill s (median)", "decode tok/s (median)", "each run", "median step ms",
           "tok/s from median step"], rows,
          f"C. Soft vs plain prompt: fp32, dynamic cache, {t_soft} thread(s) (the engine's default, run before B), greedy, {new} new "
          f"tokens, {args.pairs} interleaved pair(s)")
    ratio = median(r["step"] for r in runs["plain"]) / median(r["step"] for r in runs["soft"])
    mean_ratio = median(r["rate"] for r in runs["soft"]) / median(r["rate"] for r in runs["plain"])
    print(f"soft/plain decode speed: {ratio:.3f} from the median step time (robust to other work preempting a "
          f"step), {mean_ratio:.3f} from whole-run tokens/s; goal >= 0.95: {verdict(ratio >= 0.95)}. The prompts "
          f"differ only in {len(prompt.his_positions) + len(prompt.diff_positions)} input vectors and have the same "
          "length, so each decode step does the same work; a gap is noise")

    # ---- B. dtype x cache x threads --------------------------------------------------------------
    rows, results = [], {}
    for t in thread_counts:
        set_threads(t)
        for name, llm in models.items():
            weights = weight_bytes(llm.model)
            kv = kv_bytes_per_position(llm.model)
            for cache in (None, "static"):
                r = decode(llm, soft[name], new, cache, budget=args.decode_seconds)
                results[(name, cache or "dynamic", t)] = r
                print(f"  ran {name} {cache or 'dynamic'} {t} thread(s): {r['tokens']} tokens, "
                      f"{r['rate']:.1f} tok/s", flush=True)
                positions = (length + new) if cache else (length + new / 2)
                limit = bw[t]["read"] * 1e9 / weights
                limit_kv = bw[t]["read"] * 1e9 / (weights + kv * positions)
                rows.append([name, cache or "dynamic", t, f"{r['prefill']:.2f}", f"{length / r['prefill']:.0f}",
                             f"{r['rate']:.1f}", f"{r['total']:.2f}" + ("*" if r["cut"] else ""),
                             f"{weights / 1e6:.0f}", f"{limit:.0f}",
                             f"{r['rate'] / limit * 100:.0f}%", f"{r['rate'] / limit_kv * 100:.0f}%",
                             _common.load_average().split()[0]])
    table(["dtype", "KV cache", "threads", "prefill s", "prompt tok/s", "decode tok/s", f"total s ({new} tok)", "MB/token",
           "limit tok/s", "of limit", "of limit +KV", "load"], rows,
          f"B. Decoding the typical DEP prompt ({length} tokens); limit = read GB/s / weight bytes per token")
    if any(r["cut"] for r in results.values()):
        print(f"* decoding stopped after --decode-seconds {args.decode_seconds:g} before {new} tokens (see the 'ran' lines); total "
              f"projected as prefill + {new - 1} / decode tok/s")
    best_threads = {}
    for name in models:
        best_threads[name] = min(thread_counts, key=lambda t: min(finite_or_inf(results[(name, c, t)]["total"])
                                                                  for c in ("dynamic", "static")))

    # ---- D. hybrid, next to fp32 + static cache ---------------------------------------------------
    rows, pairs = [], {}
    for t in thread_counts:
        set_threads(t)
        single = decode(fp32, soft["fp32"], new, "static", budget=args.decode_seconds)
        mixed = hybrid(fp32, bf16, soft["fp32"], new, args.decode_seconds)
        pairs[t] = (single, mixed)
        load = _common.load_average().split()[0]
        for label, r in ((f"fp32, static cache, {t} thread(s)", single),
                         (f"fp32 prefill -> bf16 static decode, {t} thread(s)", mixed)):
            rows.append([label, f"{r['prefill']:.2f}", f"{r['rate']:.1f}",
                         f"{r['total']:.2f}" + ("*" if r["cut"] else ""), load])
    switched = None
    if len(thread_counts) > 1:
        most, least = max(thread_counts), min(thread_counts)
        set_threads(most)
        switched = decode(fp32, soft["fp32"], new, "static", budget=args.decode_seconds, decode_threads=least)
        rows.append([f"fp32, static cache, {most}-thread prefill -> {least}-thread decode", f"{switched['prefill']:.2f}",
                     f"{switched['rate']:.1f}", f"{switched['total']:.2f}" + ("*" if switched["cut"] else ""),
                     _common.load_average().split()[0]])
        set_threads(default_threads)
    table(["end to end (prefill + decode)", "prefill s", "decode tok/s", f"total s ({new} tok)", "load"], rows,
          f"D. One DEP request end to end ({length}-token prompt + {new} new tokens), pairs run back to back")
    for t, (single, mixed) in pairs.items():
        print(f"{t} thread(s): hybrid {single['total'] / mixed['total']:.2f}x the speed of fp32 + static cache; "
              f"its greedy text shares the first {same_prefix(mixed['ids'], single['ids'])} of {new} tokens with "
              "fp32's (bf16 rounding changes some argmaxes)")
    candidates = {f"{k[0]} {k[1]} cache, {k[2]} thread(s) (B)": r["total"] for k, r in results.items()}
    for t, (single, mixed) in pairs.items():
        candidates[f"fp32 static cache, {t} thread(s) (D)"] = single["total"]
        candidates[f"fp32 prefill + bf16 static decode, {t} thread(s) (D)"] = mixed["total"]
    if switched:
        candidates["fp32 static cache, thread switch after the prefill (D)"] = switched["total"]
    engine_before_after(engine, request, new)
    finite = {k: v for k, v in candidates.items() if math.isfinite(v)}
    fastest = min(finite, key=finite.get)
    print(f"fastest measured in this run: {fastest} ({finite[fastest]:.2f} s)")
    print(f"load average at the end: {_common.load_average()}")


if __name__ == "__main__":
    main()
