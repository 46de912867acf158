"""Round 26 (diagnostic): how much of the person is in the past reviews' texts, beside their vectors.

The model card's point 3 says the voice lives mostly in the past review texts, which the generic mode
shows too; nothing measured it. Here each validation user's real review is scored with the shipped
adapter and the DEP prompt, its request (product, rating, review title) kept, in five conditions:

    own texts, own vectors          the DEP prompt as the engine builds it
    own texts, population vectors   the generic mode
    other texts, their vectors      another user's past reviews (the `likelihood` control's partner),
                                    chosen by relevance to this user's product, with their vectors
    other texts, population vectors the same past reviews under the generic reviewer's vectors
    no past reviews                 the plain LLM's prompt (mode nonperso)

The texts' share of the person is (other texts, population) − (own texts, population); the vectors'
share is `likelihood`'s own over population. The partner's reviews of this very product are left out
of their history. Topic and person are not separated: another user's most relevant past reviews are
about other products more often than this user's are.

`--mode rag` scores the texts alone (no soft tokens: only the own-texts, other-texts and no-history
conditions) and `--history-as turns` shows the past reviews as earlier answers of the chat (round 30).

    python experiments/whose_history.py --out runs/round26/whose-history-val.json
    python experiments/whose_history.py --mode rag --history-as turns --out runs/round30/whose-rag-turns.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.engine import DEPEngine, EngineConfig  # noqa: E402
from dep_engine.llm import forward_setup  # noqa: E402
from dep_engine.metrics import paired_bootstrap  # noqa: E402
from dep_engine.paths import BUNDLED_ADAPTER  # noqa: E402
from dep_engine.choices import HistoryAs  # noqa: E402
from dep_engine.prompt import get_mode  # noqa: E402
from dep_engine.settings import PersonalizationSettings  # noqa: E402
from dep_engine.splits import derangement, held_out_targets, validation_samples  # noqa: E402
from dep_engine.training import TrainSettings, evaluate_loss, prepare  # noqa: E402

GAPS = {  # name: (the condition subtracted from, the condition subtracted): positive when the second is likelier
    "texts_share": ("other_texts_population", "own_texts_population"),
    "vectors_share": ("own_texts_population", "own_texts_own_vectors"),
    "whole_person": ("other_texts_their_vectors", "own_texts_own_vectors"),
    "history_over_none": ("no_history", "own_texts_population"),
    "other_history_over_none": ("no_history", "other_texts_population"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(BUNDLED_ADAPTER), help="the adapter (default: the shipped one)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation users")
    parser.add_argument("--seed", type=int, default=0, help="the partners' derangement, as `likelihood --seed`")
    parser.add_argument("--mode", choices=("dep", "rag"), default="dep",
                        help="dep: the five conditions; rag: the past reviews' texts alone, no soft tokens")
    parser.add_argument("--history-as", choices=list(HistoryAs), default="quoted", help="how the prompt shows them")
    parser.add_argument("--out", required=True, help="JSON file for the report (with per-sample losses)")
    args = parser.parse_args()

    engine = DEPEngine(EngineConfig(adapter=args.adapter))
    reviews = engine.dataset.reviews
    raw = validation_samples(reviews)[:args.limit] if args.limit else validation_samples(reviews)
    settings = TrainSettings(modes=(args.mode,), personalization=PersonalizationSettings(history_as=args.history_as))
    store = engine.store.without(held_out_targets(reviews))
    own = prepare(engine, raw, settings, "preparing validation samples", store)
    by_target = {(s.target.user_id, s.target.item_id): s for s in raw}
    kept = [by_target[(p.user_id, p.item_id)] for p in own]
    partner = derangement(len(own), args.seed)
    swapped = []
    for sample, j in zip(kept, partner):
        other = kept[j]
        profile = tuple(r for r in other.profile if r.item_id != sample.target.item_id)
        swapped.append(replace(sample, profile=profile))
    other = prepare(engine, swapped, settings, "preparing the other users' histories", store)
    assert [(p.user_id, p.item_id) for p in other] == [(p.user_id, p.item_id) for p in own], "a partner without history"
    bare = prepare(engine, kept, replace(settings, modes=("nonperso",)), "preparing prompts without history", store)

    adapter, size = engine.adapter, settings.batch_size
    if get_mode(args.mode).soft:
        losses = {"own_texts_own_vectors": evaluate_loss(engine, adapter, own, size, "own"),
                  "own_texts_population": evaluate_loss(engine, adapter, own, size, "population"),
                  "other_texts_their_vectors": evaluate_loss(engine, adapter, other, size, "own"),
                  "other_texts_population": evaluate_loss(engine, adapter, other, size, "population")}
    else:  # the texts alone: the population's vectors would change nothing
        losses = {"own_texts_population": evaluate_loss(engine, adapter, own, size, "own"),
                  "other_texts_population": evaluate_loss(engine, adapter, other, size, "own")}
    losses["no_history"] = evaluate_loss(engine, adapter, bare, size, "own")
    gaps = {name: pair for name, pair in GAPS.items() if set(pair) <= set(losses)}
    report = {"adapter": args.adapter, "mode": args.mode, "history_as": args.history_as, "n": len(own),
              "seed": args.seed, "forward": forward_setup(engine.llm),
              "lm_loss": {name: float(values.mean()) for name, values in losses.items()},
              **{f"{name}_nats": paired_bootstrap(losses[worse], losses[better]) for name, (worse, better) in gaps.items()},
              "per_sample": [{"user_id": p.user_id, "item_id": p.item_id,
                              **{name: float(values[n]) for name, values in losses.items()}}
                             for n, p in enumerate(own)]}
    if get_mode(args.mode).soft:
        report["texts_minus_vectors_share_nats"] = paired_bootstrap(
            losses["other_texts_population"] - losses["own_texts_population"],
            losses["own_texts_population"] - losses["own_texts_own_vectors"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_sample"}, indent=2))


if __name__ == "__main__":
    main()
