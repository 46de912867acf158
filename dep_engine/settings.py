"""The knobs of one request, with their bounds and defaults in one place.

The engine, the CLI, the app's sliders and the API all read `BOUNDS` and the dataclass defaults,
so a bound is written once. Settings are checked when built: a bad value fails where it is made,
with a message naming the field.

    >>> PersonalizationSettings(k=2, strength=1.5).k
    2
    >>> SamplingSettings(top_p=0)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be within 0.05-1, got 0
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .prompt import WORDS_PER_REVIEW, PromptLayout

HISTORY_RULES = ("relevant", "recent")  # dense retrieval by the target item, or the paper's recency rule

BOUNDS: dict[str, tuple[float, float]] = {
    "k": (0, 16),                    # past reviews in the prompt
    "peer_temperature": (0.05, 10.0),
    "max_peers": (1, 1024),
    "words_per_review": (10, 200),
    "strength": (0.0, 2.0),          # alpha: 0 generic reviewer, 1 this user, above 1 exaggerated
    "temperature": (0.0, 2.0),       # 0: greedy
    "top_p": (0.05, 1.0),
    "max_new_tokens": (1, 400),
    "seed": (0, 2**63 - 1),
    "time_budget_s": (1.0, 3600.0),
}


def _check(settings: object) -> None:
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name not in BOUNDS or value is None:
            continue
        low, high = BOUNDS[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{f.name} must be within {low:g}-{high:g}, got {value!r}")
        if f.type == "int" and not isinstance(value, int):
            raise ValueError(f"{f.name} must be a whole number, got {value!r}")


@dataclass
class PersonalizationSettings:
    """Which history and peers personalize a request, and how strongly."""
    k: int = 4
    history_rule: str = "relevant"
    peer_temperature: float = 1.0
    max_peers: int = 64
    words_per_review: int = WORDS_PER_REVIEW  # one default for training, evaluation and the app
    strength: float = 1.0
    restate_item: bool = True        # name the product again after the past reviews (against drift; the shipped adapter's prompt)
    soft_tokens_at: str = "beside"   # each past review's soft tokens after it (the paper's), or all at the "end"
    history_as: str = "turns"        # past reviews as earlier answers of the chat (round 31), or "quoted" (the paper's)
    tell_length: bool = False        # every request says its answer's length in words (round 35)

    def __post_init__(self) -> None:
        _check(self)
        if self.history_rule not in HISTORY_RULES:
            raise ValueError(f"history_rule must be one of {', '.join(HISTORY_RULES)}, got {self.history_rule!r}")
        self.layout  # raises on a bad value of any layout field

    @property
    def layout(self) -> PromptLayout:
        """Where the prompt puts the product, the soft tokens (the adapter must be trained on the same
        places) and the past reviews (quoted or as turns: chosen on validation users)."""
        return PromptLayout(self.restate_item, self.soft_tokens_at, self.history_as, self.tell_length)


@dataclass
class SamplingSettings:
    """How the LLM samples; `time_budget_s` stops decoding (keeping what was written) when spent."""
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 160
    seed: int = 0
    time_budget_s: float | None = None
    # end each review at its first sentence end from the user's typical length on (the median of the past
    # reviews, the same for every method); round 37: length ratio 1.8 -> 1.1, ROUGE-1 +0.006 to +0.013,
    # METEOR -0.015 to -0.019 on validation, so an option, off by default
    end_at_user_length: bool = False

    def __post_init__(self) -> None:
        _check(self)
