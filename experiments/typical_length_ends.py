"""Round 37: an `evaluate` run's texts ended at the first sentence end from the user's typical length on.

Each record gets `end_after_words`, the typical length (median words, `prompt.typical_length`) of the
past reviews its request had (the validation or test sample's profile), which hygiene applies
(`hygiene.clean(..., end_after_words)`); the copy is scored with the run's settings
(`token_limit_ends.rescore`) and the share of texts the rule shortened is printed per method.

    python experiments/typical_length_ends.py runs/round36/val-s0 --out runs/round37/val-s0-at-length
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.data import load_dataset  # noqa: E402
from dep_engine.evaluation import read_generations  # noqa: E402
from dep_engine.paths import BUNDLED_DATA  # noqa: E402
from dep_engine.prompt import typical_length  # noqa: E402
from dep_engine.splits import test_samples, validation_samples  # noqa: E402
from token_limit_ends import rescore, run_and_out, run_settings  # noqa: E402


def main() -> None:
    run, out = run_and_out(__doc__, "an `evaluate` output folder of the bundled data's val or test users",
                           "where the copy is written and scored")
    split = run_settings(run)["split"]
    reviews = load_dataset(str(BUNDLED_DATA)).reviews
    samples = validation_samples(reviews) if split == "val" else test_samples(reviews)
    lengths = {s.target.user_id: typical_length(list(s.profile)) for s in samples}
    rescore(run, out, lambda record: {**record, "end_after_words": lengths[record["user_id"]]})
    records = read_generations(out / "generations.jsonl")
    shortened, total = Counter(r["method"] for r in records if r["cut"] == "length"), Counter(r["method"] for r in records)
    print("\n| method | ended at the user's length |\n|---|---|")
    for method in total:
        print(f"| {method} | {shortened[method] / total[method]:.1%} |")


if __name__ == "__main__":
    main()
