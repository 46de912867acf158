"""Round 14 (diagnostic): can SmolLM2-135M read a review's content out of its soft-token slots at all?

Round 11 put the target review's own vector in every his slot and found that review no likelier: the
adapter, as trained, passes no content through. This asks the question one level down, with no
adapter in the way: put real token embeddings of the target review's rarest words (an oracle no
request has) in the slots and measure that review's loss. If even its own keywords, as tokens the LLM
knows, do not make it likelier, no projector can; if they do, a projector has a target to aim for.

Conditions, each the LM loss of the same 120 validation users' real next reviews (nats per target token),
with the shipped adapter's prompt and diff tokens:
    own         the adapter's his tokens from the user's past reviews (the likelihood control's "own")
    keywords    his slot i holds the embedding of the target's i-th rarest content word (by document
                frequency in the pool)
    bag         every his slot holds the idf-weighted mean of the target's content-word embeddings,
                rescaled to the median token norm: one blended vector, as a projector would write
    other       his slots hold another validation user's target keywords (a derangement): what real
                words in the slots do without the right content
    end-keywords, end-other   the adapter's own his tokens, and the same four words (the target's, or
                the other user's) as text right before the model writes, in a line
                "[Output Review Keywords]: ..." after the output title (round 14b: is it the slots' place,
                or does the LLM take little from four words of content wherever they are?)

    end-userwords, end-userwords-other   not an oracle: the user's own 8 most distinctive words from their
                past reviews (log-odds against the peers, as evaluate's own-words measure computes them), or
                another validation user's, as text in a line "[User's Typical Words]: ..." after the output
                title (round 16: a channel for the person that a request has)

`--soft-tokens-at end` with `--adapter` (round 14c) moves every slot right before the answer, so the
slot conditions ask whether words in soft slots are read there (round 15's adapter, trained at the end,
fills the slots the condition leaves alone).

    python experiments/slot_oracles.py --out runs/round14/slot-oracles-val.json
    python experiments/slot_oracles.py --conditions end-keywords,end-other --out runs/round14/end-keywords-val.json
    python experiments/slot_oracles.py --conditions end-userwords,end-userwords-other --out runs/round16/user-words-val.json
    python experiments/slot_oracles.py --adapter runs/round15/end --soft-tokens-at end --conditions keywords,bag,other \
        --out runs/round14/end-slots-val.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dep_engine.engine import DEPEngine, EngineConfig  # noqa: E402
from dep_engine.metrics import paired_bootstrap  # noqa: E402
from dep_engine.paths import BUNDLED_ADAPTER  # noqa: E402
from dep_engine.prompt import SOFT_TOKEN_PLACES, PromptIds  # noqa: E402
from dep_engine.settings import PersonalizationSettings  # noqa: E402
from dep_engine.splits import derangement, held_out_targets, validation_samples  # noqa: E402
from dep_engine.terms import STOPWORDS, term_counts, tokens  # noqa: E402
from dep_engine.training import TrainSettings, prepare, target_logits  # noqa: E402
from dep_engine.voice import distinctive_user_terms  # noqa: E402


CONDITIONS = ("keywords", "bag", "other", "end-keywords", "end-other", "end-userwords", "end-userwords-other")
USER_WORDS = 8


class FixedTokens(torch.nn.Module):
    """Stands in for the adapter in `target_logits`: returns the given soft tokens whatever vectors come in."""

    def __init__(self, his: torch.Tensor, diff: torch.Tensor):
        super().__init__()
        self.his, self.diff = his, diff

    def forward(self, his: torch.Tensor, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"his_tokens": self.his, "diff_tokens": self.diff, "sae_loss": torch.zeros(())}


def content_words(text: str) -> list[str]:
    return list(dict.fromkeys(t for t in tokens(text) if len(t) > 2 and t not in STOPWORDS and not t.isdigit()))


def word_embedding(engine: DEPEngine, word: str) -> torch.Tensor:
    """The mean input embedding of the word's tokens as it appears mid-sentence (with a leading space)."""
    ids = engine.llm.tokenizer.encode(" " + word, add_special_tokens=False)
    with torch.no_grad():
        return engine.llm.embed(torch.tensor(ids, device=engine.llm.device)).float().mean(0)


def with_keyword_line(engine: DEPEngine, prompt: PromptIds, words: list[str],
                      label: str = "[Output Review Keywords]") -> PromptIds:
    """The prompt with "label: w1, w2, ..." ending the user's message (slots keep their places); none without words."""
    if not words:
        return prompt
    end = len(prompt.ids) - 1 - prompt.ids[::-1].index(engine.llm.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    line = engine.llm.tokenizer.encode(f"\n{label}: " + ", ".join(words), add_special_tokens=False)
    return replace(prompt, ids=prompt.ids[:end] + line + prompt.ids[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation users")
    parser.add_argument("--conditions", default="keywords,bag,other",
                        help=f"comma-separated, beside own: {', '.join(CONDITIONS)}")
    parser.add_argument("--adapter", default=str(BUNDLED_ADAPTER), help="the adapter that fills the other slots")
    parser.add_argument("--soft-tokens-at", choices=SOFT_TOKEN_PLACES, default="beside",
                        help="where the prompt puts the slots (as the adapter was trained)")
    parser.add_argument("--out", required=True, help="JSON file for the report (with per-sample losses)")
    args = parser.parse_args()
    chosen = args.conditions.split(",")
    if unknown := set(chosen) - set(CONDITIONS):
        parser.error(f"--conditions: unknown {', '.join(sorted(unknown))} (choose from {', '.join(CONDITIONS)})")

    engine = DEPEngine(EngineConfig(adapter=args.adapter))
    reviews = engine.dataset.reviews
    raw = validation_samples(reviews)[:args.limit] if args.limit else validation_samples(reviews)
    store = engine.store.without(held_out_targets(reviews))
    settings = TrainSettings(personalization=PersonalizationSettings(soft_tokens_at=args.soft_tokens_at), modes=("dep",))
    samples = prepare(engine, raw, settings, "preparing validation samples", store)
    texts = {(s.target.user_id, s.target.item_id): s.target.text for s in raw}
    df = term_counts(r.text for r in store.reviews)
    n_docs = len(store.reviews)
    idf = {w: math.log(n_docs / (1 + df.get(w, 0))) for w in {w for t in texts.values() for w in content_words(t)}}
    norm = engine.llm.token_norm()

    def keywords(sample, count: int) -> list[str]:
        words = sorted(content_words(texts[sample.user_id, sample.item_id]), key=lambda w: (-idf[w], w))
        return (words * count)[:count] if words else []

    user_words = {}
    if {"end-userwords", "end-userwords-other"} & set(chosen):
        for s in raw:
            context = engine.context(engine.sample_request(s), settings.personalization, store)
            user_words[s.target.user_id, s.target.item_id] = distinctive_user_terms(s, context, df)[:USER_WORDS]

    def typical_words_line(sample, words_of):
        words = user_words[words_of.user_id, words_of.item_id]
        return replace(sample, prompt=with_keyword_line(engine, sample.prompt, words, "[User's Typical Words]"))

    adapter = engine.adapter
    partner = derangement(len(samples), 0)
    losses: dict[str, list[float]] = {name: [] for name in ("own", *chosen)}
    with torch.no_grad():
        for n, sample in enumerate(tqdm(samples, desc="LM loss under slot oracles", unit="user")):
            device = engine.llm.device
            out = adapter(torch.from_numpy(sample.his).to(device), torch.from_numpy(sample.diff).to(device))
            slots = len(sample.his)
            mine, theirs = keywords(sample, slots), keywords(samples[partner[n]], slots)
            words = content_words(texts[sample.user_id, sample.item_id])
            weights = torch.tensor([idf[w] for w in words])
            bag = (torch.stack([word_embedding(engine, w) for w in words]) * weights[:, None]).sum(0) / weights.sum()
            runs = {"own": (sample, out["his_tokens"]),  # (the sample as prompted, its his tokens)
                    "keywords": (sample, torch.stack([word_embedding(engine, w) for w in mine])),
                    "bag": (sample, (bag * norm / bag.norm())[None].repeat(slots, 1)),
                    "other": (sample, torch.stack([word_embedding(engine, w) for w in theirs])),
                    "end-keywords": (replace(sample, prompt=with_keyword_line(engine, sample.prompt, mine)),
                                     out["his_tokens"]),
                    "end-other": (replace(sample, prompt=with_keyword_line(engine, sample.prompt, theirs)),
                                  out["his_tokens"]),
                    **({"end-userwords": (typical_words_line(sample, sample), out["his_tokens"]),
                        "end-userwords-other": (typical_words_line(sample, samples[partner[n]]), out["his_tokens"])}
                       if user_words else {})}
            target = torch.tensor(sample.target, device=device)
            for name in losses:
                prompted, his_tokens = runs[name]
                logits = target_logits(engine, FixedTokens(his_tokens.to(device), out["diff_tokens"]), [prompted])[0][0]
                losses[name].append(F.cross_entropy(logits, target).item())

    own = np.array(losses["own"])
    report = {"n": len(own), "prefill_dtype": str(engine.llm.prefill_dtype), "adapter": args.adapter,
              "soft_tokens_at": args.soft_tokens_at,
              "lm_loss": {name: float(np.mean(values)) for name, values in losses.items()},
              "gain_over_own_nats": {name: paired_bootstrap(own, np.array(values))
                                     for name, values in losses.items() if name != "own"},
              **{f"{mine}_over_{theirs}_nats": paired_bootstrap(np.array(losses[theirs]), np.array(losses[mine]))
                 for mine, theirs in (("keywords", "other"), ("end-keywords", "end-other"),
                                      ("end-userwords", "end-userwords-other"))
                 if mine in losses and theirs in losses},
              "user_words": {f"{u}/{i}": words for (u, i), words in user_words.items()},
              "per_sample": [{"user_id": s.user_id, "item_id": s.item_id, **{k: v[i] for k, v in losses.items()}}
                             for i, s in enumerate(samples)]}
    print(json.dumps({k: v for k, v in report.items() if k != "per_sample"}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
