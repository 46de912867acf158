"""Fast CPU generation (issue 11): ONNX Runtime with int8 weights against the PyTorch path, in one run.

Paths: "torch" (the PyTorch path: fp32 prompt, bf16 decode), "onnx" (the CPU default: ONNX Runtime,
int8 weights and KV cache, the prompt in bf16 under autocast where the CPU has AMX or AVX512-BF16, else fp32), and
ONNX Runtime with a float32 prompt and with a float32 KV cache, each changed alone.
A. Memory bandwidth (read, 1 GiB, as bench/generation.py measures it) and each path's bandwidth
   limit: bytes of weights read per decode step / read bandwidth. PyTorch decodes from a bf16 copy
   (all parameters, the tied 49152 x 576 LM head once); ONNX Runtime reads its int8 weights and
   their scales (the size of model.onnx.data). One step gives a token to every row of the batch.
B. The app's request: generic + DEP in one batch, T=0.8, top-p 0.95, seed 0, --new-tokens per row,
   through `engine.generate`, every path alternated --repeats times: end-to-end seconds, time to first token, decode steps/s
   after the first token (engine `Result.timings`), and that rate as a share of the limit in A.
   Goals: new decode >= 3x old and >= 50% of its limit; the request <= 5 s.
C. Time to first token of one DEP prompt alone (the longest of the held-out requests tried, about
   750 tokens), every path alternated.
D. ONNX Runtime with 1 and 2 intra-op threads, decode steps/s on the batch of B (shared cores).
E. Quality against the float32 PyTorch model on the DEP prompts of --quality-prompts held-out
   requests (trained adapter): the largest and mean logit difference at the last prompt position, and
   how many of the first --greedy-tokens greedy tokens agree, for each ONNX Runtime path and for the
   PyTorch bf16 path.
F. The app's request on the CPU default at each value of one prompt setting, --compare NAME=A,B (a
   field of PersonalizationSettings: words_per_review=30,120 for round 27's change of default,
   history_as=quoted,turns for round 31's), over --compare-requests held-out requests, the values
   alternated --repeats times: the DEP prompt's tokens, end-to-end seconds and time to first token,
   and their ratios per request.

    python bench/fast_decode.py [--new-tokens 128] [--repeats 3] [--requests 20] [--greedy-tokens 32]
                                [--compare history_as=quoted,turns] [--compare-requests 8]
                                [--sections ABCDEF] [--quick]
"""
from __future__ import annotations

import argparse
import time

import _common
from _common import median, table, verdict
from generation import bandwidth, same_prefix


FLOAT_KV = "onnx, float32 KV cache"
FLOAT_PREFILL = "onnx, float32 prompt"


def weight_bytes(paths: dict) -> dict[str, int]:
    """Weight bytes read per decode step by each path (the int8 weights are the same whatever the KV cache)."""
    from dep_engine.llm import resolve_llm
    from dep_engine.onnx_model import converted_folder

    llm = paths["onnx"]
    bf16 = sum(p.numel() * 2 for p in llm.model.parameters())
    int8 = (converted_folder(resolve_llm(llm.name)[0]) / "model.onnx.data").stat().st_size
    return {name: bf16 if name == "torch" else int8 for name in paths}


def one_request(engine, request, new_tokens: int, personalization=None) -> dict:
    """The app's request (generic + DEP, T=0.8, seed 0) through `engine.generate`, timed, with the
    engine's default prompt or `personalization`'s."""
    from dep_engine import PersonalizationSettings, SamplingSettings

    personalization = personalization or PersonalizationSettings()
    sampling = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, seed=0)
    start = time.perf_counter()
    result = engine.generate(request, ("generic", "dep"), personalization, sampling)
    seconds, t = time.perf_counter() - start, result.timings
    prompt = engine.prompt(request, result.context, "dep", personalization.words_per_review,
                           layout=personalization.layout)
    return {"seconds": seconds, "first": t["first_token"], "steps": result.new_tokens,
            "rate": (result.new_tokens - 1) / max(t["generation"] - t["first_token"], 1e-9), "prompt": len(prompt.ids)}


def app_request(engine, paths: dict, request, new_tokens: int, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, llm in paths.items():
            engine.llm = llm
            runs[name].append(one_request(engine, request, new_tokens))
    return runs


def prompt_setting(engine, name: str, values: list, n: int, new_tokens: int, repeats: int) -> None:
    """Section F: the CPU default's request at each value of one PersonalizationSettings field, alternated."""
    from dep_engine import PersonalizationSettings

    settings = [PersonalizationSettings(**{name: value}) for value in values]
    rows, ratios = [], {"seconds": [], "first": []}
    for i, request in enumerate(_common.held_out_requests(engine, n)):
        runs: list[list[dict]] = [[] for _ in values]
        for _ in range(repeats):
            for j, personalization in enumerate(settings):
                runs[j].append(one_request(engine, request, new_tokens, personalization))
        stats = [{k: median(r[k] for r in rs) for k in ("seconds", "first", "prompt")} for rs in runs]
        rows += [[i + 1, value, f"{s['prompt']:.0f}", f"{s['seconds']:.2f}", f"{s['first']:.2f}"]
                 for value, s in zip(values, stats)]
        for k in ratios:
            ratios[k].append(stats[-1][k] / stats[0][k])
    table(["request", name, "DEP prompt tokens", "end-to-end s (median)", "first token s"], rows,
          f"F. The app's request on the CPU default at {name} = {', '.join(map(str, values))} "
          f"({new_tokens} new tokens, {repeats} alternations; load {_common.load_average()})")
    print(f"{name} {values[-1]} against {values[0]}, median over {n} requests: end-to-end "
          f"{median(ratios['seconds']):.2f}x, first token {median(ratios['first']):.2f}x")


def compared_setting(text: str) -> tuple[str, list]:
    """`NAME=A,B` -> the PersonalizationSettings field and its values (whole numbers as int, true and
    false as bool)."""
    from dep_engine import PersonalizationSettings

    name, _, values = text.partition("=")
    if name not in PersonalizationSettings.__dataclass_fields__ or "," not in values:
        raise SystemExit(f"--compare: expected NAME=A,B with NAME a personalization setting, got {text!r}")
    flags = {"true": True, "false": False}
    return name, [int(v) if v.isdigit() else flags.get(v.lower(), v) for v in values.split(",")]


def longest_dep_prompt(engine, n: int):
    """The held-out request (of `n`) whose DEP prompt is longest, and its DEP embeddings."""
    best = None
    for request in _common.held_out_requests(engine, n):
        prepared = engine.prepare(request, ("dep",))
        if best is None or len(prepared.embeds[0]) > len(best[1]):
            best = (request, prepared.embeds[0])
    return best


def first_token_seconds(llm, embeds: list) -> float:
    from dep_engine.generation import stream
    from dep_engine.settings import SamplingSettings

    start = time.perf_counter()
    steps = stream(llm, embeds, SamplingSettings(temperature=0.0, max_new_tokens=2))
    next(steps)
    elapsed = time.perf_counter() - start
    steps.close()
    return elapsed


def thread_counts(engine, llm, request, new_tokens: int) -> list[list]:
    import torch

    from dep_engine.generation import generation_lock
    from dep_engine.llm import resolve_llm
    from dep_engine.onnx_decode import OnnxDecoder
    from dep_engine.onnx_model import converted_folder
    from dep_engine.settings import SamplingSettings
    from transformers import StoppingCriteriaList

    embeds = engine.prepare(request, ("generic", "dep")).embeds
    folder = converted_folder(resolve_llm(llm.name)[0])
    settings = SamplingSettings(temperature=0.0, max_new_tokens=new_tokens)
    rows = []
    for threads in (1, 2, 1, 2):
        decoder = OnnxDecoder(folder, llm.model, llm.tokenizer, threads=threads)
        times: list[float] = []
        with generation_lock, torch.inference_mode():
            decoder.decode(embeds, settings, StoppingCriteriaList(), -1, -1,
                           on_step=lambda _: times.append(time.perf_counter()))
        rows.append([threads, f"{(len(times) - 1) / (times[-1] - times[0]):.1f}"])
    return rows


def bf16_greedy(old, embeds, greedy_tokens: int):
    """The PyTorch path's greedy tokens: fp32 prompt, cache handed to the bf16 copy (as the engine does)."""
    import torch

    from dep_engine.generation import _prefill
    from dep_engine.soft_prompt import left_pad

    decoder = old.decoder()
    batch, mask = left_pad([embeds])
    with torch.inference_mode():
        cache = _prefill(old, decoder, batch, mask, greedy_tokens)
        return decoder.generate(inputs_embeds=batch.to(decoder.dtype), attention_mask=mask, cache=cache,
                                max_new_tokens=greedy_tokens, min_new_tokens=greedy_tokens, do_sample=False,
                                pad_token_id=old.tokenizer.pad_token_id)[0]


def quality(fast_paths: dict, old, embeds_list, greedy_tokens: int) -> list[list]:
    import torch
    from transformers import StoppingCriteriaList

    from dep_engine.onnx_decode import decoder_for
    from dep_engine.settings import SamplingSettings

    settings = SamplingSettings(temperature=0.0, max_new_tokens=greedy_tokens)
    rows = []
    for embeds in embeds_list:
        with torch.inference_mode():
            ref_logits = old.model(inputs_embeds=embeds[None]).logits[0, -1]
            ref = old.model.generate(inputs_embeds=embeds[None], max_new_tokens=greedy_tokens, do_sample=False,
                                     min_new_tokens=greedy_tokens, pad_token_id=old.tokenizer.pad_token_id)[0]
        row = [len(embeds)]
        for decoder in (decoder_for(llm) for llm in fast_paths.values()):
            error = (torch.from_numpy(decoder.first_logits([embeds])[0]) - ref_logits).abs()
            fast = decoder.decode([embeds], settings, StoppingCriteriaList(), -1, -1)[0]
            row += [f"{float(error.max()):.2f} / {float(error.mean()):.3f}",
                    f"{same_prefix(fast.tolist(), ref.tolist())} / {greedy_tokens}"]
        rows.append(row + [f"{same_prefix(bf16_greedy(old, embeds, greedy_tokens).tolist(), ref.tolist())} / {greedy_tokens}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="held-out requests searched for a long DEP prompt")
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--quality-prompts", type=int, default=4)
    parser.add_argument("--compare", default="history_as=quoted,turns",
                        help="section F: NAME=A,B, a personalization setting and the values compared, in order")
    parser.add_argument("--compare-requests", type=int, default=8, help="section F: held-out requests")
    parser.add_argument("--sections", default="ABCDEF", help="sections to run (A and B run together)")
    parser.add_argument("--quick", action="store_true",
                        help="32 new tokens, 1 repeat, 6 requests, 2 quality prompts, 2 compared requests")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.requests, args.greedy_tokens, args.quality_prompts = 32, 1, 6, 16, 2
        args.compare_requests = 2
    compared = compared_setting(args.compare)

    import torch

    from dep_engine import DEPEngine
    from dep_engine.llm import cpu_has_fast_bf16, load_llm

    _common.header("bench/fast_decode.py -- ONNX Runtime int8 vs PyTorch decoding on the CPU (issue 11)",
                   f"new tokens {args.new_tokens}, repeats {args.repeats}")
    engine = DEPEngine(progress=False)
    new = engine.llm
    old = load_llm(engine.config.llm, "cpu", cpu_backend="torch", cpu_prefill="float32")  # shares the fp32 weights
    paths = {"torch": old, "onnx": new, FLOAT_PREFILL: load_llm(engine.config.llm, "cpu", cpu_prefill="float32"),
             FLOAT_KV: load_llm(engine.config.llm, "cpu", cpu_kv_cache="float32")}
    print(f"the CPU default's prompt dtype here: {new.prefill_dtype or torch.float32} "
          f"(fast bf16: {cpu_has_fast_bf16()})")
    request, long_embeds = longest_dep_prompt(engine, args.requests)
    app_request(engine, paths, request, 4, 1)  # warm-up: the bf16 copy, ONNX Runtime's first runs

    if "A" in args.sections or "B" in args.sections:
        speed(engine, paths, request, args)
    if "C" in args.sections:
        first_tokens(paths, long_embeds, args.repeats)
    if "D" in args.sections:
        table(["ONNX Runtime threads", "decode steps/s"], thread_counts(engine, new, request, args.new_tokens),
              "D. ONNX Runtime intra-op threads (alternated; the engine uses torch's thread count)")
    if "E" in args.sections:
        prompts = [engine.prepare(r, ("dep",)).embeds[0]
                   for r in _common.held_out_requests(engine, args.quality_prompts, seed=1)]
        fast = {name: llm for name, llm in paths.items() if name != "torch"}
        table(["prompt tokens"] + [f"({name}) {column}" for name in fast for column in
                                   ("max / mean |logit diff| at the last position", "greedy tokens agreeing")]
              + ["(PyTorch path, bf16 decode) greedy"],
              quality(fast, old, prompts, args.greedy_tokens),
              "E. The fast path and the PyTorch path against float32 PyTorch (the reference the tests use)")
    if "F" in args.sections:
        engine.llm = new
        prompt_setting(engine, *compared, args.compare_requests, args.new_tokens, args.repeats)


def speed(engine, paths: dict, request, args: argparse.Namespace) -> None:
    """Sections A and B."""
    import torch

    new = paths["onnx"]
    bw = bandwidth(torch.get_num_threads())["read"]
    sizes = weight_bytes(paths)
    limits = {name: bw * 1e9 / size for name, size in sizes.items()}
    table(["path", "weights read per step", "limit steps/s"],
          [[n, f"{sizes[n] / 1e6:.0f} MB", f"{limits[n]:.0f}"] for n in paths],
          f"A. Read bandwidth {bw:.1f} GB/s ({torch.get_num_threads()} threads) and each path's limit")

    runs = app_request(engine, paths, request, args.new_tokens, args.repeats)
    engine.llm = new
    stats = {name: {k: median(r[k] for r in rs) for k in ("seconds", "first", "rate", "steps")}
             for name, rs in runs.items()}
    table(["path", "end-to-end s (each)", "median s", "first token s", "decode steps/s", "tokens/s (2 rows)",
           "% of limit"],
          [[n, " ".join(f"{r['seconds']:.2f}" for r in runs[n]), f"{s['seconds']:.2f}", f"{s['first']:.2f}",
            f"{s['rate']:.1f}", f"{2 * s['rate']:.1f}", f"{100 * s['rate'] / limits[n]:.0f}%"]
           for n, s in stats.items()],
          f"B. The app's request (generic + DEP, {args.new_tokens} new tokens; median steps "
          f"{stats['onnx']['steps']:.0f}; load {_common.load_average()})")
    speedup = stats["onnx"]["rate"] / stats["torch"]["rate"]
    share = stats["onnx"]["rate"] / limits["onnx"]
    print(f"decode {speedup:.2f}x the PyTorch path (goal 3x: {verdict(speedup >= 3)}); "
          f"{100 * share:.0f}% of the int8 limit (goal 50%: {verdict(share >= 0.5)}); "
          f"request {stats['onnx']['seconds']:.2f} s (goal 5 s: {verdict(stats['onnx']['seconds'] <= 5)}); "
          f"request {stats['torch']['seconds'] / stats['onnx']['seconds']:.2f}x faster; int8 KV cache "
          f"{stats['onnx']['rate'] / stats[FLOAT_KV]['rate']:.2f}x the float32 one's decode steps/s; the default's "
          f"prompt: first token {stats['onnx']['first']:.2f} s vs {stats[FLOAT_PREFILL]['first']:.2f} s in float32")


def first_tokens(paths: dict, embeds, repeats: int) -> None:
    """Section C."""
    firsts: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, llm in paths.items():
            firsts[name].append(first_token_seconds(llm, [embeds]))
    table(["path", "each s", "median s"],
          [[n, " ".join(f"{x:.2f}" for x in f), f"{median(f):.2f}"] for n, f in firsts.items()],
          f"C. Time to first token, one DEP prompt of {len(embeds)} tokens")


if __name__ == "__main__":
    main()
