"""Round 36: an `evaluate` run's texts as they read before the token-limit rule, scored as the run was.

Since round 36 a text whose decoding reached the token limit before it ended ends at its last full
sentence (`hygiene.clean(text, ran_out)`), and `generations.jsonl` records `ran_out`. This copies a
run's generations.jsonl to OUT without `ran_out` (hygiene then reads every text as one that ended by
itself, as before the rule), scores the copy with the run's own settings (`evaluate` resumes a
complete run: no text is generated) and prints, per method, the share of texts that ran out and the
share ending mid-sentence with and without the rule. Pair the two with `paired_settings.py`:

    python experiments/token_limit_ends.py runs/round36/val-s0 --out runs/round36/val-s0-unended
    python experiments/paired_settings.py --runs runs/round36/val-s0 --against runs/round36/val-s0-unended \\
        --out runs/round36/paired.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine import hygiene  # noqa: E402
from dep_engine.engine import EngineConfig  # noqa: E402
from dep_engine.evaluation import EvalSettings, evaluate, read_generations  # noqa: E402
from dep_engine.prompt import CUT_MARK  # noqa: E402
from dep_engine.settings import PersonalizationSettings, SamplingSettings  # noqa: E402


def mid_sentence(text: str) -> bool:
    """True where the text does not end at a sentence end, or ends in the rule's mark for one that had none."""
    return text.endswith(CUT_MARK) or hygiene.end_at_sentence(text) != text


def shares(records: list[dict]) -> dict[str, dict[str, float]]:
    """method -> the share of its texts that ran out of tokens and that end mid-sentence."""
    by_method = defaultdict(list)
    for record in records:
        by_method[record["method"]].append(record)
    return {method: {"ran_out": sum(r.get("ran_out", False) for r in rows) / len(rows),
                     "mid_sentence": sum(mid_sentence(r["text"]) for r in rows) / len(rows)}
            for method, rows in by_method.items()}


def run_settings(run: Path) -> dict:
    """The settings an `evaluate` run recorded in its results.json."""
    return json.loads((run / "results.json").read_text())["settings"]


def run_records(run: Path) -> list[dict]:
    """An `evaluate` run's generations.jsonl as recorded (no hygiene applied, unlike `read_generations`)."""
    return [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines() if line.strip()]


def rescore(run: Path, out: Path, edit: Callable[[dict], dict]) -> None:
    """RUN's generations.jsonl with `edit` applied to every record, written to OUT and scored as `evaluate`
    scores (RUN's settings; a complete run resumes without generating)."""
    records = run_records(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generations.jsonl").write_text("".join(json.dumps(edit(r)) + "\n" for r in records))
    ran = run_settings(run)
    settings = EvalSettings(methods=ran["methods"], out=str(out), limit=ran["limit"], seed=ran["seed"],
                            eval_reviews=ran["eval_reviews"], split=ran["split"],
                            personalization=PersonalizationSettings(**ran["personalization"]),
                            sampling=SamplingSettings(**ran["sampling"]))
    evaluate(EngineConfig(adapter=ran["adapter"], llm=ran["llm"], encoder=ran["encoder"]), settings)


def run_and_out_parser(doc: str, run_help: str, out_help: str) -> argparse.ArgumentParser:
    """The command line of a script that rescores one run: the run's folder and the copy's."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run", help=run_help)
    parser.add_argument("--out", required=True, help=out_help)
    return parser


def run_and_out(doc: str, run_help: str, out_help: str) -> tuple[Path, Path]:
    args = run_and_out_parser(doc, run_help, out_help).parse_args()
    return Path(args.run), Path(args.out)


def main() -> None:
    run, out = run_and_out(__doc__, "an `evaluate` output folder made since round 36 (its records say ran_out)",
                           "where the copy without ran_out is written and scored")
    if "ran_out" not in (run / "generations.jsonl").read_text():
        sys.exit(f"{run}: its generations.jsonl records no ran_out (a run from before round 36)")
    rescore(run, out, lambda record: {k: v for k, v in record.items() if k != "ran_out"})
    ended, unended = shares(read_generations(run / "generations.jsonl")), shares(read_generations(out / "generations.jsonl"))
    print("\n| method | ran out of tokens | ending mid-sentence without the rule → with it |\n|---|---|---|")
    for method in ended:
        print(f"| {method} | {ended[method]['ran_out']:.1%} | "
              f"{unended[method]['mid_sentence']:.1%} → {ended[method]['mid_sentence']:.1%} |")


if __name__ == "__main__":
    main()
