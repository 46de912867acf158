"""Command line: `python -m dep_engine generate | users | train | evaluate | likelihood | pool`."""
from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap
from pathlib import Path

from .adapter import AdapterError
from .data import DataError, Item, parse_history
from .embeddings import STYLE_SETS
from .engine import BUNDLED_ADAPTER, BUNDLED_DATA, EngineConfig, Request
from .settings import HISTORY_RULES, PersonalizationSettings, SamplingSettings
from .training import TrainSettings
from .llm import CPU_BACKENDS, CPU_DECODE_DTYPES, CPU_PREFILLS
from .onnx_model import KV_CACHES
from .prompt import HISTORY_PLACES, MODES, SOFT_TOKEN_PLACES, get_mode


def _engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and data")
    group.add_argument("--data", default=str(BUNDLED_DATA), help="reviews file or folder with the pool and its metadata")
    group.add_argument("--encoder", default=EngineConfig.encoder, help="sentence-transformers id or folder")
    group.add_argument("--llm", default=EngineConfig.llm, help="Hugging Face causal LM id, folder or .gguf file")
    group.add_argument("--adapter", default=str(BUNDLED_ADAPTER), help="trained DEP adapter folder")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.add_argument("--no-4bit", action="store_true", help="on CUDA, load the LLM in bf16 instead of 4-bit NF4")
    group.add_argument("--cpu-decode", choices=tuple(CPU_DECODE_DTYPES), default=EngineConfig.cpu_decode,
                       help="with --cpu-backend torch, decode in this dtype after an fp32 prompt (bfloat16: ~1.5x faster)")
    group.add_argument("--cpu-backend", choices=CPU_BACKENDS, default=EngineConfig.cpu_backend,
                       help="on the CPU, generate with ONNX Runtime (int8 weights, converted once) or PyTorch")
    group.add_argument("--cpu-kv-cache", choices=KV_CACHES, default=EngineConfig.cpu_kv_cache,
                       help="with ONNX Runtime, keep the KV cache in int8 (faster on long prompts) or float32")
    group.add_argument("--cpu-prefill", choices=CPU_PREFILLS, default=EngineConfig.cpu_prefill,
                       help="on the CPU, read prompts (and run training's forward passes) in bfloat16 (faster on "
                            "CPUs with AMX or AVX512-BF16, slower without) or float32; auto: bfloat16 where the CPU "
                            "has either")
    group.add_argument("--style-features", choices=STYLE_SETS + ("on", "off"), default=None,
                       help="features appended to review vectors: rating-length, voice (also sentence length, "
                            "punctuation, first person, capitals, vocabulary, openings) or none; on = rating-length; "
                            "default: as the adapter was trained")


def _personalization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("personalization")
    group.add_argument("--k", type=int, default=PersonalizationSettings.k, help="past reviews used")
    group.add_argument("--history-rule", choices=HISTORY_RULES, default=PersonalizationSettings.history_rule,
                       help="relevant: the past reviews closest to the product; recent: the newest (the paper's rule)")
    group.add_argument("--strength", type=float, default=PersonalizationSettings.strength,
                       help="personalization strength alpha: 0 the generic reviewer, 1 this user, 2 exaggerated")
    group.add_argument("--peer-temperature", type=float, default=PersonalizationSettings.peer_temperature,
                       help="softmax temperature of the peer weights: lower puts more weight on the nearest peers")
    group.add_argument("--words-per-review", type=int, default=PersonalizationSettings.words_per_review,
                       help="words of each past review's text put in the prompt")
    group.add_argument("--restate-item", action=argparse.BooleanOptionalAction,
                       default=PersonalizationSettings.restate_item,
                       help="name the product again after the past reviews, so the review is about it, not them "
                            "(the shipped adapter was trained with it)")
    group.add_argument("--soft-tokens-at", choices=SOFT_TOKEN_PLACES, default=PersonalizationSettings.soft_tokens_at,
                       help="beside: each past review's soft tokens after it (the paper's prompt); end: all of them "
                            "right before the answer. The adapter must have been trained with the same")
    group.add_argument("--history-as", choices=HISTORY_PLACES, default=PersonalizationSettings.history_as,
                       help="quoted: the past reviews listed in the request (the paper's prompt); turns: each one "
                            "an earlier answer of the chat, to a request for its own item; turns-ended: those "
                            "answers end at a sentence end, not cut with ' ...'")
    group.add_argument("--tell-length", action=argparse.BooleanOptionalAction,
                       default=PersonalizationSettings.tell_length,
                       help="every request that shows the past reviews says its answer's length in words: an "
                            "earlier answer its own, the review to write the user's typical length")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=SamplingSettings.temperature,
                       help="sampling temperature (0: greedy)")
    group.add_argument("--top-p", type=float, default=SamplingSettings.top_p, help="nucleus sampling mass")
    group.add_argument("--max-new-tokens", type=int, default=SamplingSettings.max_new_tokens,
                       help="longest review written, in tokens")
    group.add_argument("--seed", type=int, default=SamplingSettings.seed, help="sampling seed (same seed, same text)")
    group.add_argument("--end-at-user-length", action=argparse.BooleanOptionalAction,
                       default=SamplingSettings.end_at_user_length,
                       help="end each review at its first sentence end from the user's typical length on (the "
                            "median of their past reviews), every method alike: nearer the real length, "
                            "ROUGE-1 up and METEOR down on validation (round 37)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(data=args.data, encoder=args.encoder, llm=args.llm, adapter=args.adapter,
                        device=args.device, four_bit=False if args.no_4bit else None, cpu_decode=args.cpu_decode,
                        cpu_backend=args.cpu_backend, cpu_kv_cache=args.cpu_kv_cache, cpu_prefill=args.cpu_prefill,
                        style_features={"on": True, "off": False}.get(args.style_features, args.style_features))


def personalization(args: argparse.Namespace) -> PersonalizationSettings:
    return PersonalizationSettings(k=args.k, history_rule=args.history_rule, peer_temperature=args.peer_temperature,
                                   words_per_review=args.words_per_review, strength=args.strength,
                                   restate_item=args.restate_item, soft_tokens_at=args.soft_tokens_at,
                                   history_as=args.history_as, tell_length=args.tell_length)


def sampling(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, end_at_user_length=args.end_at_user_length)


def _read_history(args: argparse.Namespace) -> str | None:
    """The --history file's text, checked before any model loads."""
    if not args.history:
        return None
    path = Path(args.history)
    if not path.is_file():
        raise DataError(f"{path}: no such history file")
    if not args.item_title:
        raise DataError("--item-title is needed with --history")
    text = path.read_text(encoding="utf-8", errors="replace")
    parse_history(text)  # a broken file is reported now, not after the models load
    return text


def _check_paths(args: argparse.Namespace) -> None:
    """--data and --adapter exist: a typo is reported in seconds, not after the models load."""
    if not Path(args.data).exists():
        raise DataError(f"{args.data}: no such data file or folder (--data)")
    adapter = getattr(args, "adapter", None)
    if adapter and Path(adapter) != BUNDLED_ADAPTER and not Path(adapter).is_dir():
        raise AdapterError(f"{adapter}: no such adapter folder (--adapter)")


def _quiet_model_loading() -> None:
    """No "Loading weights" bars from transformers; our own long work (training, evaluation) keeps its bars."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _build_request(engine, args: argparse.Namespace, history: str | None) -> Request:
    typed = Item("target", args.item_title, args.item_description or "") if args.item_title else None
    if history is not None:
        return engine.history_request(history, typed, 5.0 if args.rating is None else args.rating,
                                      args.review_title or "")
    request = engine.user_request(args.user or next(iter(engine.users)), typed or args.item, args.rating,
                                  args.review_title)
    if typed:
        request.reference = None
    return request


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import DEPEngine

    modes = args.modes.split(",")
    for mode in modes:
        get_mode(mode)
    settings = personalization(args), sampling(args)
    history = _read_history(args)
    _check_paths(args)
    _quiet_model_loading()
    engine = DEPEngine(engine_config(args))
    request = _build_request(engine, args, history)
    result = engine.generate(request, modes, *settings)
    print(f"\nProduct: {request.item.title}  |  rating {request.rating:g}  |  title: {request.review_title}")
    if not engine.adapter_trained:
        print("NOTE: the DEP adapter is UNTRAINED (no trained checkpoint found): soft prompts are random, "
              "so the personalized outputs show plumbing, not personalization.")
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nPast reviews used ({result.context.k}):")
    for selected in result.context.selected:
        print(f"  - [{selected.relevance:.2f}] {selected.item_title[:70]} ({len(selected.peers)} peers"
              f"{', from nearest items' if selected.cold_start else ''})")
    for mode, text in result.texts.items():
        print(f"\n=== {mode} ===\n" + textwrap.fill(text, 100))
    if request.reference:
        print("\n=== real review ===\n" + textwrap.fill(request.reference, 100))
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}" if k == "tokens_per_second" else f"{k} {v * 1000:.0f} ms"
                                   for k, v in result.timings.items()))


def cmd_users(args: argparse.Namespace) -> None:
    from .data import by_user, load_dataset

    users = by_user(load_dataset(args.data).reviews)
    most_reviewed_first = sorted(users.items(), key=lambda item: (-len(item[1]), item[0]))  # as the app's /users
    for user_id, history in most_reviewed_first[:args.limit]:
        print(f"{user_id}\t{len(history)} reviews\tlatest: {history[-1].title[:60]}")


TRAIN_OPTIONS = (
    ("modes", str, "comma-separated prompt modes, taken in turn by the training samples"),
    ("max_target_tokens", int, "target review tokens learned from"),
    ("max_samples", int, "cap on training samples (CPU budgets)"),
    ("val_samples", int, "validation samples for the validation LM loss"),
    ("epochs", int, "passes over the training samples"),
    ("batch_size", int, "samples per optimizer step"),
    ("lr", float, "peak learning rate (AdamW, warm-up then cosine decay)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup", float, "share of the steps spent warming up"),
    ("grad_clip", float, "gradient norm clip"),
    ("token_norm", str, "soft-token norm: auto (the LLM's median token norm), none, or a number"),
    ("sparsity_target", float, "rho, the SAE's target mean activation"),
    ("sparsity_weight", float, "KL sparsity weight inside the SAE loss"),
    ("sae_loss_weight", float, "weight of the SAE loss beside the LM loss"),
    ("sae_activation", str, "SAE code activation: gelu (the paper), relu (exact zeros) or topk (only the "
                       "sparsity target's share of units; a gelu or relu adapter can be fine-tuned into it)"),
    ("contrast_weight", float, "weight of the margin term rewarding own over another user's vectors"),
    ("contrast_margin", float, "nats per token own vectors should beat another user's by"),
    ("contrast_partner", str, "whose vectors the contrast uses: batch (a batch-mate), same-item (a reviewer of the "
                              "same product) or population (the generic reviewer, its loss held fixed)"),
    ("his_oracle_rate", float, "share of training samples with their own target review's vector in every his slot "
                               "(a restating task: the slots learn to carry a review's content)"),
    ("max_minutes", float, "stop after this many minutes, keeping the best checkpoint"),
    ("init_from", str, "a trained adapter folder to fine-tune instead of starting from fresh weights"),
    ("end_projectors", str, "a second projector pair for the copies of the 'both' layout at the end: none, joint "
                            "(trained with the rest) or only (the rest of --init-from stays as it is)"),
    ("deviation_projectors", str, "a linear map of each vector's deviation from the population-average reviewer, "
                                  "added to its soft tokens and zero for generic: none, joint or only"),
    ("eval_every", int, "optimizer steps between validations"),
    ("seed", int, "random seed"),
)


def cmd_train(args: argparse.Namespace) -> None:
    from .engine import DEPEngine
    from .training import train

    overrides = {name: getattr(args, name) for name, _, _ in TRAIN_OPTIONS if getattr(args, name) is not None}
    if "modes" in overrides:
        overrides["modes"] = tuple(overrides["modes"].split(","))
        for mode in overrides["modes"]:
            get_mode(mode)
    settings = TrainSettings(out=args.out, personalization=personalization(args), **overrides)
    config = engine_config(args)
    config.adapter = None  # training starts from a fresh adapter
    _check_paths(argparse.Namespace(data=args.data))
    _quiet_model_loading()
    train(DEPEngine(config), settings, resume=not args.restart)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import EvalSettings, evaluate, parse_method

    for method in args.methods.split(","):
        parse_method(method, args.k)
    if args.eval_reviews and not Path(args.eval_reviews).exists():
        raise DataError(f"{args.eval_reviews}: no such reviews file or folder (--eval-reviews)")
    _check_paths(args)
    _quiet_model_loading()
    evaluate(engine_config(args), EvalSettings(
        methods=args.methods.split(","), limit=args.limit, seed=args.seed, out=args.out,
        eval_reviews=args.eval_reviews, batch_users=args.batch_users, generate_only=args.generate_only, split=args.split,
        personalization=personalization(args), sampling=sampling(args)))


def guidance_scales(text: str | None) -> tuple[float, ...]:
    """--guidance 0.25,0.5,1 as positive floats; a bad value is named."""
    scales = []
    for part in (text.split(",") if text else []):
        try:
            scale = float(part)
        except ValueError:
            scale = -1.0
        if not 0 < scale < math.inf:
            raise ValueError(f"--guidance: {part.strip()!r} is not a positive number (expected e.g. 0.25,0.5,1)")
        scales.append(scale)
    return tuple(scales)


def cmd_likelihood(args: argparse.Namespace) -> None:
    import json

    from .engine import DEPEngine
    from .training import held_out_likelihood

    get_mode(args.mode)
    scales = guidance_scales(args.guidance)
    if args.out and Path(args.out).is_dir():
        raise DataError(f"{args.out}: is a folder; --out names the JSON file to write")
    _check_paths(args)
    _quiet_model_loading()
    settings = TrainSettings(personalization=personalization(args), modes=(args.mode,), batch_size=args.batch_size,
                             seed=args.seed)
    report = held_out_likelihood(DEPEngine(engine_config(args)), args.split, settings, args.limit, scales,
                                 args.his_oracle)
    print(json.dumps({key: value for key, value in report.items() if key != "per_sample"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def cmd_pool(args: argparse.Namespace) -> None:
    from .evaluation import pool_runs

    pool_runs(args.runs, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dep_engine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) messages")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="personalized and baseline reviews for one user and product")
    _engine_args(gen)
    _personalization_args(gen)
    _sampling_args(gen)
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--user", help="a bundled user's id (default: the first user)")
    who.add_argument("--history", help="a history file: JSON/JSONL in either Amazon schema, or CSV")
    gen.add_argument("--item", help="item id from the catalog (default: the user's held-out latest review)")
    gen.add_argument("--item-title", help="a product by title instead of a catalog item")
    gen.add_argument("--item-description", help="the product's description, with --item-title")
    gen.add_argument("--rating", type=float, default=None,
                     help="the review's star rating, 1-5 (default: the held-out review's, or 5)")
    gen.add_argument("--review-title", default=None, help="the review's title (default: the held-out review's)")
    gen.add_argument("--modes", default="generic,dep", help=f"comma-separated, from: {', '.join(MODES)}")
    gen.set_defaults(func=cmd_generate)

    users = sub.add_parser("users", help="list bundled users")
    users.add_argument("--data", default=str(BUNDLED_DATA), help="reviews file or folder (default: bundled)")
    users.add_argument("--limit", type=int, default=20, help="users listed, most reviewed first")
    users.set_defaults(func=cmd_users)

    tr = sub.add_parser("train", help="train the DEP adapter")
    _engine_args(tr)
    _personalization_args(tr)
    tr.add_argument("--out", default="runs/adapter", help="folder for the adapter, its log and checkpoints")
    for name, kind, help_text in TRAIN_OPTIONS:
        tr.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name,
                        help=f"{help_text} (default: {getattr(TrainSettings, name)})")
    tr.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="compare methods on held-out users")
    _engine_args(ev)
    _personalization_args(ev)
    _sampling_args(ev)
    ev.add_argument("--eval-reviews", help="extra reviews file: each user in it is evaluated on their latest review")
    ev.add_argument("--methods", default="nonperso,nonperso+length,generic,dep,dep-shuffled,his+diff,his+diff-shuffled",
                    help="comma-separated mode[-shuffled][@k=N][@alpha=A]")
    ev.add_argument("--split", choices=("val", "test"), default="test",
                    help="val: validation users, for choices; test: held-out test users, to report once")
    ev.add_argument("--limit", type=int, default=None, help="number of users")
    ev.add_argument("--out", default="runs/eval", help="folder for results.json, generations.jsonl, results.md/png")
    ev.add_argument("--batch-users", type=int, default=4, help="users decoded together in one batch")
    ev.add_argument("--generate-only", action="store_true", help="write generations, skip the metrics")
    ev.set_defaults(func=cmd_evaluate)

    lik = sub.add_parser("likelihood", help="how much likelier held-out users' real reviews are with their own "
                                            "vectors than with another user's or the population's (no generation)")
    _engine_args(lik)
    _personalization_args(lik)
    lik.add_argument("--split", choices=("val", "test"), default="val",
                     help="val: validation users, for choices; test: held-out test users, to report once")
    lik.add_argument("--mode", default="dep", help=f"prompt mode, one of: {', '.join(MODES)}")
    lik.add_argument("--limit", type=int, default=None, help="number of users (default: all of the split)")
    lik.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    lik.add_argument("--seed", type=int, default=0, help="seed of the shuffled partners and the bootstrap")
    lik.add_argument("--guidance", default=None,
                     help="comma-separated guidance scales (e.g. 0.25,0.5,1): the loss with own vectors under "
                          "decode-time guidance toward the user at each, as `evaluate`'s dep@guidance=G decodes")
    lik.add_argument("--his-oracle", action="store_true",
                     help="also score with the target review's own vector in every his slot (no real request has "
                          "it): how much the his channel could carry about the review to write")
    lik.add_argument("--out", default=None, help="JSON file for the report (default: print only)")
    lik.set_defaults(func=cmd_likelihood)

    pool = sub.add_parser("pool", help="summarize several evaluate runs of the same users (other --seed) together: "
                                       "metrics and voice measures averaged per user over the runs")
    pool.add_argument("runs", nargs="+", help="evaluate output folders (each with its generations.jsonl)")
    pool.add_argument("--out", default=None, help="folder for pooled.json and pooled.md (default: print only)")
    pool.set_defaults(func=cmd_pool)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (DataError, AdapterError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
