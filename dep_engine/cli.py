"""Command line: `python -m dep_engine generate | users | train | evaluate | likelihood | pool |
convert-paper-checkpoint | vllm-server`."""
from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import sys
import textwrap
import types
import typing
from pathlib import Path

from .adapter import AdapterError
from .choices import Preset
from .data import DataError, Item, parse_history
from . import paper_checkpoint, vllm_backend
from .engine import BUNDLED_ADAPTER, BUNDLED_DATA, EngineConfig, Request
from .prompt import MODES, get_mode
from .settings import PersonalizationSettings, SamplingSettings
from .training import TrainSettings


def add_options(parser: argparse.ArgumentParser, settings: type, title: str, only: tuple[str, ...] = (),
                skip: tuple[str, ...] = ()) -> None:
    """One option per field of a settings dataclass (`--field-name`), its help and choices taken from the
    field: the dataclass is the one place a knob is described. Booleans get `--x/--no-x`, enums their
    values as choices, tuples a comma-separated list. `only`/`skip` pick fields by name."""
    hints = typing.get_type_hints(settings)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(settings):
        if (only and f.name not in only) or f.name in skip or "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `X | None`: an option of type X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.metadata.get("option", f.name.replace("_", "-"))
        extra: dict = {}
        if kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            extra["choices"] = [member.value for member in kind]
        elif typing.get_origin(kind) is tuple:
            extra["type"] = lambda text: tuple(part.strip() for part in text.split(","))
            default = ",".join(default)
        else:
            extra["type"] = kind
        shown = "" if default is None or kind is bool else f" (default: {default})"
        group.add_argument(name, dest=f.name, default=default, help=f.metadata["help"] + shown, **extra)


def settings_from(args: argparse.Namespace, settings: type, **given):
    """The dataclass built from the parsed options `add_options` made for it, and `given` fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings) if hasattr(args, f.name)}
    return settings(**{**values, **given})


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return settings_from(args, EngineConfig)


def personalization(args: argparse.Namespace) -> PersonalizationSettings:
    return settings_from(args, PersonalizationSettings)


def sampling(args: argparse.Namespace) -> SamplingSettings:
    return settings_from(args, SamplingSettings)


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
    paper = getattr(args, "preset", None) == Preset.PAPER  # its --adapter may be a Hub id
    if adapter and not paper and Path(adapter) != BUNDLED_ADAPTER and not Path(adapter).is_dir():
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
    from .paper_engine import build_engine

    modes = args.modes.split(",")
    for mode in modes:
        get_mode(mode)
    settings = personalization(args), sampling(args)
    history = _read_history(args)
    _check_paths(args)
    _quiet_model_loading()
    engine = build_engine(engine_config(args))
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


def cmd_train(args: argparse.Namespace) -> None:
    from .engine import DEPEngine
    from .training import train

    settings = settings_from(args, TrainSettings, personalization=personalization(args))
    config = dataclasses.replace(engine_config(args), adapter=None)  # training starts from a fresh adapter
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


def cmd_likelihood(args: argparse.Namespace) -> None:
    import json

    from .engine import DEPEngine
    from .training import held_out_likelihood

    get_mode(args.mode)
    if args.out and Path(args.out).is_dir():
        raise DataError(f"{args.out}: is a folder; --out names the JSON file to write")
    _check_paths(args)
    _quiet_model_loading()
    settings = TrainSettings(personalization=personalization(args), modes=(args.mode,), batch_size=args.batch_size,
                             seed=args.seed)
    report = held_out_likelihood(DEPEngine(engine_config(args)), args.split, settings, args.limit)
    print(json.dumps({key: value for key, value in report.items() if key != "per_sample"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def cmd_pool(args: argparse.Namespace) -> None:
    from .evaluation import pool_runs

    pool_runs(args.runs, args.out)


PAPER_OPTIONS = ("preset", "paper_encoder", "allow_cpu")


def _common_options(parser: argparse.ArgumentParser, sampling: bool = False, preset: bool = False) -> None:
    """The engine's and personalization's options; `sampling` for commands that generate; `preset` for those
    that also run the authors' checkpoint (training and the likelihood are this project's adapter's)."""
    add_options(parser, EngineConfig, "models and data", skip=() if preset else PAPER_OPTIONS)
    add_options(parser, PersonalizationSettings, "personalization")
    if sampling:
        add_options(parser, SamplingSettings, "sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dep_engine", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) messages")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="personalized and baseline reviews for one user and product")
    _common_options(gen, sampling=True, preset=True)
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
    _common_options(tr)
    add_options(tr, TrainSettings, "training")
    tr.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="compare methods on held-out users")
    _common_options(ev, sampling=True, preset=True)
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
    _common_options(lik)
    lik.add_argument("--split", choices=("val", "test"), default="val",
                     help="val: validation users, for choices; test: held-out test users, to report once")
    lik.add_argument("--mode", default="dep", help=f"prompt mode, one of: {', '.join(MODES)}")
    lik.add_argument("--limit", type=int, default=None, help="number of users (default: all of the split)")
    lik.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    lik.add_argument("--seed", type=int, default=0, help="seed of the shuffled partners and the bootstrap")
    lik.add_argument("--out", default=None, help="JSON file for the report (default: print only)")
    lik.set_defaults(func=cmd_likelihood)

    pool = sub.add_parser("pool", help="summarize several evaluate runs of the same users (other --seed) together: "
                                       "metrics and voice measures averaged per user over the runs")
    pool.add_argument("runs", nargs="+", help="evaluate output folders (each with its generations.jsonl)")
    pool.add_argument("--out", default=None, help="folder for pooled.json and pooled.md (default: print only)")
    pool.set_defaults(func=cmd_pool)

    paper_checkpoint.add_command(sub)
    vllm_backend.add_command(sub)
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
