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

from dataclasses import dataclass, field, fields

from .choices import HistoryAs, HistoryRule, choice
from .prompt import WORDS_PER_REVIEW, PromptLayout

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


def described(text: str, option: str | None = None) -> dict:
    """A field's help, which the CLI shows for the option made from it (`--<option>`: by default the
    field's name with dashes)."""
    return {"help": text, **({"option": option} if option else {})}


@dataclass
class PersonalizationSettings:
    """Which history and peers personalize a request, and how strongly."""
    k: int = field(default=4, metadata=described("past reviews in the prompt"))
    history_rule: HistoryRule = field(default=HistoryRule.RELEVANT, metadata=described(
        "which past reviews: the most relevant to the product, or the most recent (the paper's rule)"))
    peer_temperature: float = field(default=1.0, metadata=described(
        "softmax temperature of the peer weights (higher: more uniform)"))
    max_peers: int = field(default=64, metadata=described("at most this many peers per past review"))
    words_per_review: int = field(default=WORDS_PER_REVIEW, metadata=described(
        "words kept of each past review's text"))
    strength: float = field(default=1.0, metadata=described(
        "personalization strength: 0 the generic reviewer, 1 this user, above 1 exaggerated"))
    restate_item: bool = field(default=True, metadata=described(
        "name the product again after the past reviews, so the model does not review the last one's item"))
    history_as: HistoryAs = field(default=HistoryAs.TURNS, metadata=described(
        "past reviews as the chat's earlier answers (turns), or listed in the request (quoted, the paper's)"))

    def __post_init__(self) -> None:
        _check(self)
        self.history_rule = choice(HistoryRule, self.history_rule, "history_rule")
        self.history_as = choice(HistoryAs, self.history_as, "history_as")
        self.layout  # raises on a bad value of any layout field

    @property
    def layout(self) -> PromptLayout:
        """Where the prompt puts the product and the past reviews."""
        return PromptLayout(self.restate_item, self.history_as)


@dataclass
class SamplingSettings:
    """How the LLM samples; `time_budget_s` stops decoding (keeping what was written) when spent."""
    temperature: float = field(default=0.8, metadata=described("sampling temperature (0: greedy)"))
    top_p: float = field(default=0.95, metadata=described("nucleus sampling's top-p"))
    max_new_tokens: int = field(default=160, metadata=described("at most this many new tokens per review"))
    seed: int = field(default=0, metadata=described("the same seed gives the same texts"))
    time_budget_s: float | None = field(default=None, metadata=described(
        "stop decoding after this many seconds, keeping what was written"))
    end_at_user_length: bool = field(default=False, metadata=described(
        "end each review at its first sentence end from the user's typical length on (the median of their "
        "past reviews, the same for every method): closer lengths, ROUGE-1 up and METEOR down on validation "
        "users, so off by default"))
    content_filter: bool = field(default=True, metadata=described(
        "keep listed offensive words out of the texts (dep_engine/safety.py); off only for research"))

    def __post_init__(self) -> None:
        _check(self)
