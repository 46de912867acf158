"""The prompt: the LLM's own chat template, each past review followed by its own his and diff slots
(the paper's layout), the past reviews quoted in the request or shown as the chat's earlier answers.

Slots are written into the rendered chat as random per-process markers (so no user text can forge
one), then the text between them is tokenized and each slot becomes one placeholder position whose
input embedding is later replaced by a soft token.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from .choices import HistoryAs, choice
from .data import Item, Review

# Words kept of each past review, chosen on validation users (the shipped adapter was trained at 30;
# at 120 their real reviews were likelier and DEP's METEOR higher).
WORDS_PER_REVIEW = 120

_NONCE = secrets.token_hex(6)
_SLOT = re.compile(rf"<<{_NONCE}:(his|diff):(\d+)>>")


@dataclass(frozen=True)
class Mode:
    """Which signals a generation uses: past review texts, his soft tokens, diff soft tokens.

    `population`: the soft tokens come from the population-average reviewer (the adapter's mean
    training vectors), not from this user: the same prompt with the person taken out.
    `length_hint`: the prompt tells the user's typical review length in words (a control that
    separates the length effect from the rest of personalization)."""
    name: str
    texts: bool
    his: bool
    diff: bool
    population: bool = False
    length_hint: bool = False

    @property
    def uses_history(self) -> bool:
        return self.texts or self.his or self.diff

    @property
    def soft(self) -> bool:
        return self.his or self.diff


MODES = {m.name: m for m in (
    Mode("nonperso", texts=False, his=False, diff=False),
    Mode("rag", texts=True, his=False, diff=False),
    Mode("his", texts=False, his=True, diff=False),
    Mode("diff", texts=False, his=False, diff=True),
    Mode("his+diff", texts=False, his=True, diff=True),
    Mode("dep", texts=True, his=True, diff=True),
    Mode("generic", texts=True, his=True, diff=True, population=True),
    Mode("nonperso+length", texts=False, his=False, diff=False, length_hint=True),
)}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}") from None


@dataclass(frozen=True)
class PastReview:
    item_title: str
    rating: float
    title: str
    text: str

    @classmethod
    def of(cls, review: Review, item_title: str) -> "PastReview":
        return cls(item_title, review.rating, review.title, review.text)


@dataclass(frozen=True)
class PromptLayout:
    """Where the prompt puts the product and the past reviews.

    `restate_item` names the product again after the past reviews ([Output Item Title]), closest to
    where the review begins, so that the model does not take the last past review's item for the one
    to review. `history_as`: "quoted" lists the past reviews inside the one user turn (the paper's
    prompt); "turns" makes each past review an earlier answer of the chat, to a request for its own
    item, so the LLM reads the user's texts as what it wrote before (only modes that show the texts;
    the others stay quoted). Each past review's his and diff slots follow it, as in the paper."""
    restate_item: bool = False
    history_as: HistoryAs = HistoryAs.QUOTED

    def __post_init__(self) -> None:
        if not isinstance(self.restate_item, bool):
            raise ValueError(f"restate_item must be true or false, got {self.restate_item!r}")
        object.__setattr__(self, "history_as", choice(HistoryAs, self.history_as, "history_as"))

    def turns(self, mode: "Mode") -> bool:
        """Whether this prompt shows the past reviews as earlier answers of the chat."""
        return self.history_as == HistoryAs.TURNS and mode.texts


@dataclass
class PromptIds:
    """Token ids and the slots' positions, one his and one diff slot per past review, in review order."""
    ids: list[int]
    his_positions: list[int]
    diff_positions: list[int]


CUT_MARK = " ..."  # ends a text `shorten` cut


def shorten(text: str, words: int) -> str:
    """At most `words` words, and at most 12 characters a word: a pasted title of 100,000 characters with
    no space is one "word", and was left whole for the prompt's fitting to drop every past review instead."""
    parts = text.split()
    short = text if len(parts) <= words else " ".join(parts[:words]) + CUT_MARK
    return short if len(short) <= 12 * words else short[:12 * words].rstrip() + CUT_MARK




def _rating(value: float) -> str:
    return f"{value:g}"


def system_message(mode: Mode, turns: bool = False, told_length: bool = False) -> str:
    lines = ["You write a product review in the voice of one particular user.",
             "You are given the item's title and description"]
    if mode.uses_history:
        lines[-1] += ", some of this user's past reviews"
    lines[-1] += ", and the rating and title of the review to write."
    if turns:
        lines.append("Your earlier answers in this chat are this user's own past reviews.")
    if mode.his:
        lines.append("[Review Embedding] is a soft prompt that encodes the text of a past review.")
    if mode.diff:
        lines.append("[Review Difference Embedding] is a soft prompt that encodes how that review differs "
                     "from other users' reviews of the same item.")
    if mode.uses_history:
        lines.append("Use them as hints to the user's opinions and style.")
    if told_length:
        lines.append("Make the review about as long as [Output Review Length] says.")
    lines.append("Write only the text of the review.")
    return " ".join(lines)


def typical_length(reviews: list[Review]) -> int:
    """The median word count of a user's reviews: what the length-told control says."""
    counts = sorted(len(r.text.split()) for r in reviews)
    return counts[len(counts) // 2] if counts else 0


def _slot_lines(index: int, mode: Mode) -> list[str]:
    lines = []
    if mode.his:
        lines.append(f"[Review Embedding]: <his_start><<{_NONCE}:his:{index}>><his_end>")
    if mode.diff:
        lines.append(f"[Review Difference Embedding]: <diff_start><<{_NONCE}:diff:{index}>><diff_end>")
    return lines


def _past_turns(past: list[PastReview], mode: Mode, words_per_review: int) -> list[dict[str, str]]:
    """Each past review as an earlier request for its own item and the user's review as the answer."""
    turns = []
    for i, review in enumerate(past):
        answer = shorten(review.text, words_per_review)
        lines = [f"[Item Title]: {shorten(review.item_title, 40)}", f"[Output Review Rating]: {_rating(review.rating)}",
                 f"[Output Review Title]: {shorten(review.title, 30)}", *_slot_lines(i, mode)]
        turns += [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": answer}]
    return turns


def user_message(item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                 words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0,
                 layout: PromptLayout = PromptLayout()) -> str:
    """The last user turn: the product, the past reviews with their soft slots (quoted layout), and the
    review to write (its length in words too, for a mode that tells it)."""
    lines = [f"[Item Title]: {shorten(item.title, 40)}"]
    if item.description:
        lines.append(f"[Item Description]: {shorten(item.description, 80)}")
    if mode.uses_history and past and not layout.turns(mode):
        lines.append("[User's Past Reviews]:")
        for i, review in enumerate(past):
            lines.append(f"Review {i + 1}:")
            lines.append(f"[Item Title]: {shorten(review.item_title, 40)}")
            if mode.texts:
                lines += [f"[Review Rating]: {_rating(review.rating)}", f"[Review Title]: {shorten(review.title, 30)}",
                          f"[Review Text]: {shorten(review.text, words_per_review)}"]
            lines += _slot_lines(i, mode)
        if layout.restate_item:
            lines.append(f"[Output Item Title]: {shorten(item.title, 40)}")
    lines += [f"[Output Review Rating]: {_rating(rating)}", f"[Output Review Title]: {shorten(review_title, 30)}"]
    if mode.length_hint and length_words:
        lines.append(f"[Output Review Length]: about {length_words} words")
    return "\n".join(lines)


def chat_messages(item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                  words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0,
                  layout: PromptLayout = PromptLayout()) -> list[dict[str, str]]:
    """The chat: the system message, the past reviews as earlier turns where `layout` says so, and
    the request for the review to write."""
    turns = layout.turns(mode) and bool(past)
    earlier = _past_turns(past, mode, words_per_review) if turns else []
    told_length = mode.length_hint and bool(length_words)
    return [{"role": "system", "content": system_message(mode, turns, told_length)}, *earlier,
            {"role": "user", "content": user_message(item, rating, review_title, past, mode, words_per_review,
                                                     length_words, layout)}]


def readable_prompt(item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                    words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0,
                    layout: PromptLayout = PromptLayout()) -> str:
    """The prompt as a person can read it, each soft slot shown as `[HIS soft token i]`."""
    messages = chat_messages(item, rating, review_title, past, mode, words_per_review, length_words, layout)
    text = "\n\n".join(f"{m['role'].upper()}:\n{m['content']}" for m in messages)
    return _SLOT.sub(lambda m: f"[{m.group(1).upper()} soft token {int(m.group(2)) + 1}]", text)


def neutralize_special_tokens(tokenizer, text: str) -> str:
    """Pasted text is plain text: a special token written in it (say `<|im_end|>`) is broken up so
    it cannot close the user's turn or open another role. Unpaired surrogates (not valid text) become '?'."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    for token in getattr(tokenizer, "all_special_tokens", []) + list(getattr(tokenizer, "added_tokens_encoder", {})):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + " " + token[1:])
    return text


def build_prompt(tokenizer, item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                 words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0, layout: PromptLayout = PromptLayout()
                 ) -> PromptIds:
    """Token ids of the chat prompt (generation prompt included) and the positions of its soft slots."""
    messages = [{"role": m["role"], "content": neutralize_special_tokens(tokenizer, m["content"])}
                for m in chat_messages(item, rating, review_title, past, mode, words_per_review, length_words, layout)]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    slots: dict[str, dict[int, int]] = {"his": {}, "diff": {}}
    cursor = 0
    for match in _SLOT.finditer(rendered):
        ids += tokenizer.encode(rendered[cursor:match.start()], add_special_tokens=False)
        slots[match.group(1)][int(match.group(2))] = len(ids)
        ids.append(placeholder)
        cursor = match.end()
    ids += tokenizer.encode(rendered[cursor:], add_special_tokens=False)
    return PromptIds(ids, *([slots[kind][i] for i in sorted(slots[kind])] for kind in ("his", "diff")))
