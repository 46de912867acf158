"""Rounds 29, 30 and 30b's reading: one loss report against another, the same held-out samples.

Each report's `per_sample` holds every sample's LM loss (nats per target token) under several
conditions: `likelihood`'s own vectors and, in modes with soft tokens, the population's;
`experiments/whose_history.py`'s own texts, another user's texts and no past reviews. This pairs two
reports sample by sample: the own loss (candidate minus baseline: below zero means the real reviews
are likelier with the candidate), the same over the samples whose loss moved (the prompt changed),
and each share (one condition's loss minus another's, per sample) in each report, paired too. By
default the own condition is `own` and the one share is the vectors' (population minus own).

    python experiments/paired_likelihood.py runs/round29/k8-w120.json --against runs/round29/k4-w120.json
    python experiments/paired_likelihood.py experiments/results/round30/whose-rag-turns.json \
        --against experiments/results/round30/whose-rag-quoted.json --own own_texts_population \
        --share texts_share=other_texts_population-own_texts_population \
        --share own_texts_over_none=no_history-own_texts_population \
        --share other_texts_over_none=no_history-other_texts_population
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.metrics import mean_ci, paired_bootstrap  # noqa: E402

MOVED = 1e-6  # nats per token: below this the two prompts gave the same loss (the prompt did not change)


def losses(path: str) -> dict[tuple[str, str], dict[str, float]]:
    """(user, item) -> its losses in the report."""
    report = json.loads(Path(path).read_text())
    return {(row["user_id"], row["item_id"]): row for row in report["per_sample"]}


def gap(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b with its paired 95% bootstrap interval; empty when there is nothing to pair."""
    return paired_bootstrap(a, b) if len(a) else {}


def mean_with_ci(values: np.ndarray) -> dict[str, float]:
    """A share's mean over the samples with its 95% bootstrap interval."""
    return dict(zip(("mean_diff", "low", "high"), mean_ci(values)))


def parse_share(text: str) -> tuple[str, tuple[str, str]]:
    """'name=minuend-subtrahend' -> (name, (minuend, subtrahend)), the conditions as the reports name them."""
    name, sep, terms = text.partition("=")
    minuend, dash, subtrahend = terms.partition("-")
    if not (sep and dash and name and minuend and subtrahend):
        raise argparse.ArgumentTypeError(f"a share is NAME=MINUEND-SUBTRAHEND, got {text!r}")
    return name, (minuend, subtrahend)


VECTORS_SHARE = {"vectors_share": ("population", "own")}


def compare(candidate: str, baseline: str, own: str = "own",
            shares: dict[str, tuple[str, str]] | None = None) -> dict:
    """Pair two reports per sample. `shares` maps a name to two conditions (minuend, subtrahend); by
    default the vectors' share, reported only where both reports have the population's loss."""
    new, old = losses(candidate), losses(baseline)
    keys = [k for k in old if k in new]
    own_new, own_old = (np.array([run[k][own] for k in keys]) for run in (new, old))
    moved = np.abs(own_new - own_old) > MOVED
    report = {"candidate": candidate, "baseline": baseline, "n": len(keys), "n_moved": int(moved.sum()),
              "own_loss": {"candidate": float(own_new.mean()), "baseline": float(own_old.mean())},
              "own_loss_change": gap(own_new, own_old),
              "own_loss_change_where_moved": gap(own_new[moved], own_old[moved])}
    if shares is None:
        shares = {n: pair for n, pair in VECTORS_SHARE.items()
                  if all(c in run[k] for run in (new, old) for k in keys for c in pair)}
    for name, (minuend, subtrahend) in shares.items():
        new_share, old_share = (np.array([run[k][minuend] - run[k][subtrahend] for k in keys]) for run in (new, old))
        report[name] = {"candidate": mean_with_ci(new_share), "baseline": mean_with_ci(old_share),
                        "change": gap(new_share, old_share)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", help="likelihood report (JSON) of the setting tried")
    parser.add_argument("--against", required=True, help="likelihood report (JSON) of the baseline")
    parser.add_argument("--own", default="own", help="the condition whose loss is paired (default: own)")
    parser.add_argument("--share", type=parse_share, action="append", default=None, metavar="NAME=A-B",
                        help="a share to pair: condition A's loss minus B's per sample (repeatable; "
                             "default: vectors_share=population-own where both reports have it)")
    parser.add_argument("--out", default=None, help="JSON file for the comparison")
    args = parser.parse_args()
    report = compare(args.candidate, args.against, own=args.own,
                     shares=dict(args.share) if args.share else None)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
