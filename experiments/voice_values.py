"""Round 50: an `evaluate` run from before `evaluate` kept each text's voice values (voice.jsonl),
copied to OUT and scored again with the run's own settings (a complete run resumes without
generating), so that `pool` can average the voice measures per user over draws:

    python experiments/voice_values.py runs/round36/val-s0 --out runs/round50/val-s0

The copy's results.json must repeat the run's (every number to 1e-9, timings aside, and with
`--attribution-changed` the attribution figures, which round 52 measures as their expectation over
candidate sets); the script says where it does not and exits with 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from token_limit_ends import rescore, run_and_out_parser  # noqa: E402


def numbers(tree, path: str = "") -> dict[str, float]:
    """Every number in a results.json, by its path (seconds left out: they time the scoring)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if "seconds" not in key
                for k, v in numbers(value, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for n, value in enumerate(tree) for k, v in numbers(value, f"{path}/{n}").items()}
    return {path: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


ATTRIBUTION = ("/top1", "/reciprocal_rank")  # the measures round 52 changed: their paths hold these


def differences(run: Path, copy: Path, tolerance: float = 1e-9, skip: tuple[str, ...] = ()) -> list[str]:
    """The results.json numbers of the copy that differ from the run's, or that one of them lacks
    (numbers whose path holds one of `skip` left out)."""
    before = numbers(json.loads((run / "results.json").read_text()))
    after = numbers(json.loads((copy / "results.json").read_text()))
    return [f"{key}: {before.get(key)} -> {after.get(key)}" for key in sorted(set(before) | set(after))
            if not any(part in key for part in skip)
            and (key not in before or key not in after or abs(before[key] - after[key]) > tolerance)]


def main() -> None:
    parser = run_and_out_parser(__doc__, "an `evaluate` output folder", "folder for the copy and its voice.jsonl")
    parser.add_argument("--attribution-changed", action="store_true",
                        help="the run's attribution was one candidate draw (before round 52): check every other number")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    rescore(run, out, lambda record: record)
    wrong = differences(run, out, skip=ATTRIBUTION if args.attribution_changed else ())
    print(f"{out}: results.json repeats {run}'s" if not wrong else
          f"{out}: {len(wrong)} numbers differ from {run}'s:\n" + "\n".join(wrong[:20]))
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
