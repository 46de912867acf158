"""Rounds 29 and 30's reading: one `likelihood` report against another, the same held-out samples.

Each report's `per_sample` holds every sample's LM loss (nats per target token) with its own vectors
and, in modes with soft tokens, the population's and another user's. This pairs two reports sample by
sample: the own loss (candidate minus baseline: below zero means the real reviews are likelier with
the candidate), the same over the samples whose loss moved (the prompt changed), and each report's
vectors' share (population minus own loss), paired too.

    python experiments/paired_likelihood.py runs/round29/k8-w120.json --against runs/round29/k4-w120.json
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


def share(values: np.ndarray) -> dict[str, float]:
    """The vectors' share (population minus own loss, per sample): its mean with a 95% bootstrap interval."""
    return dict(zip(("mean_diff", "low", "high"), mean_ci(values)))


def compare(candidate: str, baseline: str) -> dict:
    new, old = losses(candidate), losses(baseline)
    keys = [k for k in old if k in new]
    own_new, own_old = (np.array([run[k]["own"] for k in keys]) for run in (new, old))
    moved = np.abs(own_new - own_old) > MOVED
    report = {"candidate": candidate, "baseline": baseline, "n": len(keys), "n_moved": int(moved.sum()),
              "own_loss": {"candidate": float(own_new.mean()), "baseline": float(own_old.mean())},
              "own_loss_change": gap(own_new, own_old),
              "own_loss_change_where_moved": gap(own_new[moved], own_old[moved])}
    if all("population" in run[k] for run in (new, old) for k in keys):
        share_new, share_old = (np.array([run[k]["population"] - run[k]["own"] for k in keys]) for run in (new, old))
        report["vectors_share"] = {"candidate": share(share_new), "baseline": share(share_old),
                                   "change": gap(share_new, share_old)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", help="likelihood report (JSON) of the setting tried")
    parser.add_argument("--against", required=True, help="likelihood report (JSON) of the baseline")
    parser.add_argument("--out", default=None, help="JSON file for the comparison")
    args = parser.parse_args()
    report = compare(args.candidate, args.against)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
