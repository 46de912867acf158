"""Rounds 21, 23 and 24 (diagnostics): what the soft tokens' copies at the end carry and cost, untrained.

Round 21 asks whether they carry the person themselves or a worse prompt leans more on the tokens beside
the reviews; round 23 how their cost and share fall with their size; round 24 what their text lines cost.

Round 19 wrote the shipped adapter's tokens twice (`--soft-tokens-at both`): every prompt got 0.095 nats
per token worse and the user's vectors gained +0.0115 over the population's, 2.7 times the shipped
adapter's +0.0043, with both copies taken from the vectors compared. Here only one copy takes them and
the other holds the population-average reviewer's tokens whatever the condition, the shipped adapter
and the "both" prompt otherwise:

    --varies beside   the copies at the end hold the population's tokens: the same disruption of every
                      prompt, with the person only beside the reviews
    --varies end      the tokens beside the reviews are the population's: the person only at the end
    --varies both     both copies take the vectors compared (round 19's step 1)

`--end-scale S` multiplies the copies at the end by S (round 23: how much of their cost to the task
goes with how much of their share of the person, untrained). `--bare-end` drops the eight text lines
the copies sit in: after the output title a newline, then the soft tokens alone, his and diff of each
past review in turn (round 24).

Each run is `likelihood`'s report (own, another user's and the population's vectors in the copy that
varies) with the per-sample losses, on the 120 validation users:

    python experiments/end_copies.py --varies beside --out runs/round21/varies-beside-val.json
    python experiments/end_copies.py --varies end --out runs/round21/varies-end-val.json
    python experiments/end_copies.py --varies both --end-scale 0.5 --out runs/round23/scale-0.5-val.json
    python experiments/end_copies.py --varies both --bare-end --out runs/round24/bare-end-val.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.adapter import DEPAdapter  # noqa: E402
from dep_engine.engine import DEPEngine, EngineConfig  # noqa: E402
from dep_engine.paths import BUNDLED_ADAPTER  # noqa: E402
from dep_engine.prompt import PromptIds  # noqa: E402
from dep_engine.settings import PersonalizationSettings  # noqa: E402
from dep_engine.splits import held_out_targets, validation_samples  # noqa: E402
from dep_engine.training import TrainSettings, personal_likelihood, prepare  # noqa: E402

COPIES = ("beside", "end", "both")


class OneCopyVaries(DEPAdapter):
    """The adapter, its tokens for the given vectors in the copies that vary and the population's in the
    other; the copies at the end multiplied by `end_scale`."""

    def __init__(self, adapter: DEPAdapter, varies: str, end_scale: float = 1.0):
        super().__init__(adapter.config)
        self.load_state_dict(adapter.state_dict())
        self.varies, self.end_scale = varies, end_scale

    def forward(self, his: torch.Tensor, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(his, diff)
        population = super().forward(self.population_his[None], self.population_diff[None])
        for kind in ("his_tokens", "diff_tokens"):
            fixed = population[kind].expand_as(out[kind])
            beside = out[kind] if self.varies in ("beside", "both") else fixed
            end = out[kind] if self.varies in ("end", "both") else fixed
            out[kind] = torch.stack([beside, self.end_scale * end], dim=-2)
        return out


def bare_end(engine: DEPEngine, beside: PromptIds) -> PromptIds:
    """The paper's prompt with a copy of every slot right before its closing tail, without any text lines:
    after the output title a newline, then his and diff of each past review in turn."""
    tail = len(engine.llm.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False))
    head = beside.ids[:-tail] + engine.llm.tokenizer.encode("\n", add_special_tokens=False)
    placeholder = beside.ids[beside.his_positions[0]]
    n = len(beside.his_positions)
    end_his = [len(head) + 2 * i for i in range(n)]
    end_diff = [len(head) + 2 * i + 1 for i in range(n)]
    return PromptIds(head + [placeholder] * (2 * n) + beside.ids[-tail:], beside.his_positions + end_his,
                     beside.diff_positions + end_diff, copies=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--varies", choices=COPIES, required=True, help="the copies that take the compared vectors")
    parser.add_argument("--end-scale", type=float, default=1.0, help="multiplies the copies at the end")
    parser.add_argument("--bare-end", action="store_true", help="the copies at the end without their text lines")
    parser.add_argument("--adapter", default=str(BUNDLED_ADAPTER), help="an adapter trained beside the reviews")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation users")
    parser.add_argument("--out", required=True, help="JSON file for the report (with per-sample losses)")
    args = parser.parse_args()

    engine = DEPEngine(EngineConfig(adapter=args.adapter))
    reviews = engine.dataset.reviews
    raw = validation_samples(reviews)[:args.limit] if args.limit else validation_samples(reviews)
    settings = TrainSettings(personalization=PersonalizationSettings(soft_tokens_at="both"), modes=("dep",))
    store = engine.store.without(held_out_targets(reviews))
    samples = prepare(engine, raw, settings, "preparing validation samples", store)
    if args.bare_end:
        paper = replace(settings, personalization=PersonalizationSettings(soft_tokens_at="beside"))
        beside = prepare(engine, raw, paper, "preparing the paper's prompts", store)
        assert all(np.array_equal(a.his, b.his) and np.array_equal(a.diff, b.diff) for a, b in zip(samples, beside))
        samples = [replace(s, prompt=bare_end(engine, b.prompt)) for s, b in zip(samples, beside)]
    adapter = OneCopyVaries(engine.adapter, args.varies, args.end_scale).to(engine.llm.device).eval()
    report = {"varies": args.varies, "end_scale": args.end_scale, "bare_end": args.bare_end, "adapter": args.adapter,
              **personal_likelihood(engine, adapter, samples, settings.batch_size, settings.seed)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_sample"}, indent=2))


if __name__ == "__main__":
    main()
