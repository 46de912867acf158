"""The prompt: the LLM's own chat template, each past review followed by its own his and diff slots
(the paper's layout), or all slots together right before the answer (`PromptLayout.soft_tokens_at`).

Slots are written into the rendered chat as random per-process markers (so no user text can forge
one), then the text between them is tokenized and each slot becomes one placeholder position whose
input embedding is later replaced by a soft token.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from .data import Item, Review

# Words kept of each past review: 120 since round 28, chosen on validation users in round 27 (the
# shipped adapter was trained at 30; at 120 their reviews were likelier and DEP's METEOR higher).
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


SOFT_TOKEN_PLACES = ("beside", "end", "both")
HISTORY_PLACES = ("quoted", "turns", "turns-ended")


@dataclass(frozen=True)
class PromptLayout:
    """Where the prompt puts the product and the soft slots.

    `restate_item` names the product again after the past reviews ([Output Item Title]), closest to
    where the review begins, so that the model does not take the last past review's item for the one
    to review. `soft_tokens_at`: "beside" puts each past review's his and diff slots after its text (the
    paper's prompt); "end" puts all of them after the output review's title, right before the answer,
    where this LLM reads more of what a slot holds (experiments/README.md, rounds 14 to 14c); "both"
    puts a slot in both places: the same token twice, or, from an adapter with end projectors, a
    second token of its own at the end (rounds 19 and 20). `history_as`: "quoted" lists the past reviews
    inside the one user turn (the paper's prompt); "turns" makes each past review an earlier answer of
    the chat, to a request for its own item, so the LLM reads the user's texts as what it wrote before
    (round 30; only modes that show the texts, the others stay quoted); "turns-ended" ends each earlier
    answer at a sentence end instead of cutting it with " ..." (round 33). `tell_length`: in a prompt
    that shows the past reviews' texts, every request says how long its answer is in words (an earlier
    answer its own length as shown, the review to write the user's typical length), so the model can
    learn from its earlier answers that the line is kept (round 35)."""
    restate_item: bool = False
    soft_tokens_at: str = "beside"
    history_as: str = "quoted"
    tell_length: bool = False

    def __post_init__(self) -> None:
        for name in ("restate_item", "tell_length"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.soft_tokens_at not in SOFT_TOKEN_PLACES:
            raise ValueError(f"soft_tokens_at must be one of {', '.join(SOFT_TOKEN_PLACES)}, "
                             f"got {self.soft_tokens_at!r}")
        if self.history_as not in HISTORY_PLACES:
            raise ValueError(f"history_as must be one of {', '.join(HISTORY_PLACES)}, got {self.history_as!r}")

    @property
    def slots_beside(self) -> bool:
        """Whether each past review has its soft slots next to it."""
        return self.soft_tokens_at in ("beside", "both")

    @property
    def slots_at_end(self) -> bool:
        """Whether the soft slots come (again) right before the answer."""
        return self.soft_tokens_at in ("end", "both")

    def turns(self, mode: "Mode") -> bool:
        """Whether this prompt shows the past reviews as earlier answers of the chat."""
        return self.history_as.startswith("turns") and mode.texts

    def tells_length(self, mode: "Mode") -> bool:
        """Whether this prompt's requests say their answers' lengths (the length-told control always does)."""
        return mode.length_hint or (self.tell_length and mode.texts)


@dataclass
class PromptIds:
    """Token ids and the slots' positions: every past review's slot once, in review order, then again
    for each further copy (`copies` is 2 in the "both" layout)."""
    ids: list[int]
    his_positions: list[int]
    diff_positions: list[int]
    copies: int = 1

    def slots_from_copy(self, copy: int) -> list[int]:
        """Positions of the slots of copy `copy` and after (0: every slot)."""
        his, diff = (len(p) // self.copies * copy for p in (self.his_positions, self.diff_positions))
        return self.his_positions[his:] + self.diff_positions[diff:]


CUT_MARK = " ..."  # ends a text `shorten` cut


def shorten(text: str, words: int) -> str:
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + CUT_MARK


# A sentence end: a run of . ! ? or …, closing quotes or brackets after it, then a space or the end; or a line break
SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n")


def shorten_to_sentence(text: str, words: int) -> str:
    """The first `words` words, ended at the last sentence end among them (all of them, without
    " ...", when none ends there): an earlier answer that stops as the user's reviews do."""
    parts = text.split()
    if len(parts) <= words:
        return text
    kept = " ".join(parts[:words])
    ends = [m.end() for m in SENTENCE_END.finditer(kept)]
    return kept[:ends[-1]] if ends else kept


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


def _length_line(words: int) -> str:
    return f"[Output Review Length]: about {words} words"


def _slot_lines(index: int, mode: Mode, numbered: bool) -> list[str]:
    label = f"Review {index + 1} " if numbered else "Review "
    lines = []
    if mode.his:
        lines.append(f"[{label}Embedding]: <his_start><<{_NONCE}:his:{index}>><his_end>")
    if mode.diff:
        lines.append(f"[{label}Difference Embedding]: <diff_start><<{_NONCE}:diff:{index}>><diff_end>")
    return lines


def _past_turns(past: list[PastReview], mode: Mode, words_per_review: int,
                layout: PromptLayout) -> list[dict[str, str]]:
    """Each past review as an earlier request for its own item and the user's review as the answer
    (cut at a sentence end in the "turns-ended" layout; its length told where `layout` says so)."""
    cut = shorten_to_sentence if layout.history_as == "turns-ended" else shorten
    turns = []
    for i, review in enumerate(past):
        answer = cut(review.text, words_per_review)
        lines = [f"[Item Title]: {shorten(review.item_title, 40)}", f"[Output Review Rating]: {_rating(review.rating)}",
                 f"[Output Review Title]: {shorten(review.title, 30)}"]
        if layout.tells_length(mode):
            lines.append(_length_line(len(answer.removesuffix(CUT_MARK).split())))
        if layout.slots_beside:
            lines += _slot_lines(i, mode, numbered=False)
        turns += [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": answer}]
    return turns


def user_message(item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                 words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0,
                 layout: PromptLayout = PromptLayout()) -> str:
    """The last user turn: the product, the past reviews (quoted layout), the review to write, and
    the soft slots where `layout` puts them."""
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
            if layout.slots_beside:
                lines += _slot_lines(i, mode, numbered=False)
        if layout.restate_item:
            lines.append(f"[Output Item Title]: {shorten(item.title, 40)}")
    lines += [f"[Output Review Rating]: {_rating(rating)}", f"[Output Review Title]: {shorten(review_title, 30)}"]
    if layout.tells_length(mode) and length_words:
        lines.append(_length_line(length_words))
    if layout.slots_at_end and mode.uses_history:
        lines += [line for i in range(len(past)) for line in _slot_lines(i, mode, numbered=True)]
    return "\n".join(lines)


def chat_messages(item: Item, rating: float, review_title: str, past: list[PastReview], mode: Mode,
                  words_per_review: int = WORDS_PER_REVIEW, length_words: int = 0,
                  layout: PromptLayout = PromptLayout()) -> list[dict[str, str]]:
    """The chat: the system message, the past reviews as earlier turns where `layout` says so, and
    the request for the review to write."""
    turns = layout.turns(mode) and bool(past)
    earlier = _past_turns(past, mode, words_per_review, layout) if turns else []
    told_length = layout.tells_length(mode) and bool(length_words)
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
    slots: dict[str, dict[int, list[int]]] = {"his": {}, "diff": {}}
    cursor = 0
    for match in _SLOT.finditer(rendered):
        ids += tokenizer.encode(rendered[cursor:match.start()], add_special_tokens=False)
        slots[match.group(1)].setdefault(int(match.group(2)), []).append(len(ids))
        ids.append(placeholder)
        cursor = match.end()
    ids += tokenizer.encode(rendered[cursor:], add_special_tokens=False)
    copies = 2 if layout.soft_tokens_at == "both" else 1

    def in_copy_order(kind: str) -> list[int]:
        return [slots[kind][i][copy] for copy in range(copies) for i in sorted(slots[kind])]
    return PromptIds(ids, in_copy_order("his"), in_copy_order("diff"), copies)
