"""Round 42: a run from before round 36, which did not record `ran_out`, read with round 36's rule.

Round 36's rule ends a text that ran out of tokens at its last full sentence; it works on the text after
decoding, so an older run's texts read with it are what a run at today's defaults writes. Whether a text
ran out is derived from its raw text's token count: at `max_new_tokens - SLACK` tokens or more. The count
is not exact (decoding strips end spaces, re-tokenizing can merge tokens); `--check` measures the derived
flag against runs that record it, and counts the texts the rule would end differently.

    python experiments/derived_ran_out.py --check runs/round36/val-s0 runs/round41/val-s0
    python experiments/derived_ran_out.py runs/round34/test-s0 --out runs/round42/test-s0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from token_limit_ends import rescore, run_records, run_settings  # noqa: E402

from dep_engine import hygiene  # noqa: E402
from dep_engine.llm import load_tokenizer  # noqa: E402

SLACK = 6  # chosen on 1,320 validation texts that record ran_out (rounds 36, 38, 41): none ends differently


def tokens_short(tokenizer, raw: str, max_new_tokens: int) -> int:
    """How many tokens a text's raw form falls short of the limit; at SLACK or fewer it counts as run out."""
    return max_new_tokens - len(tokenizer(raw, add_special_tokens=False).input_ids)


def counts_as_run_out(short: int, slack: int = SLACK) -> bool:
    """The derived flag: a text at most `slack` tokens short of the limit ran out."""
    return short <= slack


def check(runs: list[Path]) -> None:
    """Per slack, how often the derived flag differs from the recorded one, and how many texts the rule
    would then end differently (what matters: a text that ends at a sentence end reads the same either way)."""
    tokenizer = load_tokenizer(run_settings(runs[0])["llm"])
    records = []
    for run in runs:
        limit = run_settings(run)["sampling"]["max_new_tokens"]
        for record in run_records(run):
            if "ran_out" not in record:
                sys.exit(f"{run}: its records say no ran_out; --check needs runs made since round 36")
            record["tokens_short"] = tokens_short(tokenizer, record["raw"], limit)
            records.append(record)
    print(f"{len(records)} texts\n| slack | derived flag wrong | texts ended differently |\n|---|---|---|")
    for slack in range(0, 11):
        wrong = [r for r in records if counts_as_run_out(r["tokens_short"], slack) != r["ran_out"]]
        ended_differently = sum(hygiene.clean(r["raw"], True).text != hygiene.clean(r["raw"], False).text
                                for r in wrong)
        print(f"| {slack} | {len(wrong)} | {ended_differently} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="with --check: runs made since round 36; else one older run")
    parser.add_argument("--out", type=Path, help="where the older run's copy, with ran_out derived, is written and scored")
    parser.add_argument("--check", action="store_true", help="measure the derived flag against recorded ones")
    args = parser.parse_args()
    if args.check:
        check(args.runs)
        return
    if len(args.runs) != 1 or args.out is None:
        parser.error("give one run and --out (or --check with runs that record ran_out)")
    run = args.runs[0]
    if any("ran_out" in record for record in run_records(run)):
        sys.exit(f"{run}: its records say ran_out already (a run made since round 36): nothing to derive")
    settings = run_settings(run)
    tokenizer, limit = load_tokenizer(settings["llm"]), settings["sampling"]["max_new_tokens"]
    rescore(run, args.out, lambda record: {**record, "ran_out": counts_as_run_out(tokens_short(tokenizer, record["raw"], limit))})


if __name__ == "__main__":
    main()
