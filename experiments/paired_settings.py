"""Round 27's generation check: one setting's `evaluate` runs against another's, the same users and seeds.

`pool` summarizes draws of one setting; this pairs two settings (for example 120 and 30 words per past
review) per user: each user's ROUGE-1, ROUGE-L and METEOR are averaged over the draws of each setting,
then paired-bootstrapped, method by method; attribution top-1, drift, the scaffolding-or-loops share
and the median length ratio are the means of each run's results.json over the draws.

    python experiments/paired_settings.py --runs runs/round27/gen-w120-s0 runs/round27/gen-w120-s1 \\
        --against runs/round27/gen-w30-s0 runs/round27/gen-w30-s1 --out runs/round27/paired.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.evaluation import draw_scores, read_draws  # noqa: E402
from dep_engine.metrics import paired_bootstrap  # noqa: E402

METRICS = ("rouge1", "rougeL", "meteor")
VOICE = ("top1", "drifted", "scaffolding_or_loops_after", "length_ratio_median")


def per_user(folders: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> user -> metric, averaged over the runs (draws); the users every run has."""
    draws, methods = read_draws(folders)
    users, _, by_draw = draw_scores(draws, methods)
    return {m.name: {u: {metric: float(by_draw[m.name][metric][:, i].mean()) for metric in METRICS}
                     for i, u in enumerate(users)} for m in methods}


def voice_means(folders: list[str]) -> dict[str, dict[str, float]]:
    """method -> the mean over runs of each VOICE figure its results.json has (older runs lack some)."""
    results = [json.loads((Path(f) / "results.json").read_text())["voice"]["methods"] for f in folders]

    def value(entry: dict | float) -> float:
        return entry["mean"] if isinstance(entry, dict) else entry

    return {method: {key: float(np.mean([value(r[method][key]) for r in results]))
                     for key in VOICE if all(key in r[method] for r in results)}
            for method in results[0] if all(method in r for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="evaluate folders of the setting tried")
    parser.add_argument("--against", nargs="+", required=True, help="evaluate folders of the setting it is paired with")
    parser.add_argument("--out", required=True, help="JSON file for the report")
    args = parser.parse_args()
    if len(args.runs) != len(args.against):
        parser.error("--runs and --against need the same number of draws")
    tried, base = per_user(args.runs), per_user(args.against)
    voice_tried, voice_base = voice_means(args.runs), voice_means(args.against)
    report = {"runs": args.runs, "against": args.against, "methods": {}}
    for method in tried:
        if method not in base:
            continue
        users = sorted(set(tried[method]) & set(base[method]))
        entry = {"n": len(users)}
        for metric in METRICS:
            a = np.array([tried[method][u][metric] for u in users])
            b = np.array([base[method][u][metric] for u in users])
            entry[metric] = {"tried": float(a.mean()), "against": float(b.mean()), "difference": paired_bootstrap(a, b)}
        if method in voice_tried and method in voice_base:
            entry["voice"] = {key: {"tried": voice_tried[method][key], "against": voice_base[method][key]}
                              for key in VOICE if key in voice_tried[method] and key in voice_base[method]}
        report["methods"][method] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
