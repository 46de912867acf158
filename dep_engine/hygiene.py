"""Output hygiene, the same for every method: a review ends where the model starts writing the
prompt's scaffolding (its field labels, template brackets such as "[User's Name]") or loops, and a text
that ran out of tokens ends at its last full sentence.

A small model left alone often echoes "[Output Review Rating]: 5" or repeats "Great. Great. Great.";
scoring such text against a real review credits whichever method loops less with "personalization".
`clean` cuts a text there (and, asked, at the user's typical length); `should_stop` tells the decoder
that a row is done; `flagged` is a broader, independent check used to report how many outputs still
carry scaffolding or loops.

    >>> clean("[Review Text]: Nice strings. [Output Review Rating]: 5").text
    'Nice strings.'
    >>> clean("Great. Great. Great. Great.").text
    'Great.'
    >>> clean("Nice strings. They stay in tune and the", ran_out=True).text
    'Nice strings.'
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

from .prompt import CUT_MARK


class Output(NamedTuple):
    """A decoded text, and whether decoding reached the token limit before the text ended (no
    end-of-text token, no stop): such a text likely stops mid-sentence (`clean` ends it)."""
    text: str
    ran_out: bool = False


@functools.cache
def bracket_tokens(tokenizer) -> tuple[int, ...]:
    """Every token that writes "[", which no decoding path may draw: the prompt's field labels ("[Output
    Review Rating]: 5") and template placeholders ("[User's Name]") all open with one, `clean` cuts a review
    at the first of them, and a review has no use for the character. The plain LLM echoed such labels until
    the token limit in 6.5% of its test outputs, leaving nothing after hygiene. Once per tokenizer: it reads
    the whole vocabulary (0.2 s)."""
    return tuple(i for i in range(len(tokenizer)) if "[" in tokenizer.decode([i]))

# A sentence end: a run of . ! ? or …, closing quotes or brackets after it, then a space or the end; or a line break
SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n")

# a bracketed label or placeholder: "[Item Title]", "[User's Name]", "[Output Review Rating]"
_BRACKET = re.compile(r"\[[#*]?[A-Za-z][\w' .:#/-]{0,40}\]")
# the prompt's slot markers, the chat template's tokens, and a chat role alone on its line
_MARKER = re.compile(r"</?(?:his|diff)_(?:start|end)>|<\|im_(?:start|end)\|>|(?m:^\s*(?:user|assistant|system)\s*$)")
# a field label at the start of a line, as the prompt writes them: "Review 2:", "Item Title:"
_LINE_LABEL = re.compile(r"(?m)^\s*(?:Review \d+|Item (?:Title|Description)|Review (?:Rating|Title|Text)|"
                         r"Output (?:Review \w+|Item Title)|User's Past Reviews)\s*:")
# leading echoes of the prompt's output fields ("[Output Review Rating]: 5" on its own line) go whole;
# a leading "Review Text:" label goes, and the text after it stays
_ECHO = re.compile(r"^\s*\[?#?(?:Output )?(?:Review |Item )?(?:Rating|Title|Description)\]?\s*:[^\n]*(?:\n|$)")
_LEADING = re.compile(r"^\s*(?:\[[^\]\n]{1,40}\]\s*:?\s*|(?:Output Review \w+|Review(?: Text)?)\s*:\s*)+")
_WORD = re.compile(r"\S+")
_MAX_UNIT = 20  # words in the longest looping unit looked for
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


@dataclass(frozen=True)
class Cleaned:
    text: str
    reason: str | None  # "scaffolding", "repetition", "length" or "token limit" when the text was cut, else None


def _repeated_sentence(text: str) -> int | None:
    """Start of the first sentence (of 3 words or more) that repeats an earlier one."""
    seen: set[str] = set()
    for match in _SENTENCE.finditer(text):
        words = re.findall(r"\w+", match.group().lower())
        if len(words) < 3:
            continue
        key = " ".join(words)
        if key in seen:
            return match.start()
        seen.add(key)
    return None


def _loop(text: str) -> int | None:
    """End of the first occurrence of a unit of words (4 characters or more, with a letter) that is
    written three times in a row: "Great. Great. Great." is cut after the first "Great."."""
    spans = [(m.end(), m.group().lower()) for m in _WORD.finditer(text)]
    words = [w for _, w in spans]
    for start in range(len(words)):
        for size in range(1, min(_MAX_UNIT, (len(words) - start) // 3) + 1):
            unit = words[start:start + size]
            if (words[start + size:start + 2 * size] == unit == words[start + 2 * size:start + 3 * size]
                    and len(" ".join(unit)) >= 4 and any(c.isalpha() for c in "".join(unit))):
                return spans[start + size - 1][0]
    return None


# A run inside one "word": a unit of up to 30 characters written 8 times or more, 24 characters in all,
# with something besides separator punctuation ("-Dream-Dream-Dream...", ".S.S.S...", emoji). No review
# among the bundled 9,018 has one; their long runs are separator lines ("-----", "*****"), kept as written.
_CHAR_RUN = re.compile(r"(\S{1,30}?)\1{7,}")
_SEPARATORS = frozenset("-*=_~.!#+|/\\:")


def _char_loop(text: str) -> int | None:
    """End of the first unit of a run of one unit within a word (`_CHAR_RUN`)."""
    for match in _CHAR_RUN.finditer(text):
        unit = match.group(1)
        if len(match.group()) >= 24 and any(c not in _SEPARATORS for c in unit):
            return match.start() + len(unit)
    return None


def _cut(text: str) -> tuple[int, str] | None:
    cuts = []
    for pattern in (_BRACKET, _MARKER, _LINE_LABEL):
        if match := pattern.search(text):
            cuts.append((match.start(), "scaffolding"))
    for end in (_loop(text), _char_loop(text)):
        if end is not None:
            cuts.append((end, "repetition"))
    if (start := _repeated_sentence(text)) is not None:
        cuts.append((start, "repetition"))
    return min(cuts) if cuts else None


def _strip_leading(text: str) -> str:
    while (shorter := _ECHO.sub("", text, count=1)) != text:
        text = shorter
    return _LEADING.sub("", text)


def end_at_sentence(text: str) -> str:
    """`text` up to its last sentence end; with none, all of it and the cut mark (as a shortened past review)."""
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    if not ends:
        return text + CUT_MARK
    return text[:ends[-1]].rstrip()


def end_after(text: str, words: int) -> str:
    """`text` up to its first sentence end at or after `words` words; all of it where there is none."""
    for match in SENTENCE_END.finditer(text):
        if len(text[:match.end()].split()) >= words:
            return text[:match.end()].rstrip()
    return text


def clean(text: str, ran_out: bool = False, end_after_words: int | None = None) -> Cleaned:
    """The text without leading field labels, cut at the first scaffolding or runaway repetition;
    with `end_after_words`, ended at its first sentence end from that many words on (`end_after`);
    if decoding reached the token limit before the text ended (`ran_out`), ended at its last full sentence.

    A text stopped mid-sentence by the limit reads as broken to a visitor whichever method wrote it."""
    body = _strip_leading(text)
    if (cut := _cut(body)) is not None:
        return Cleaned(body[:cut[0]].strip(), cut[1])
    body = body.strip()
    if end_after_words and (ended := end_after(body, end_after_words)) != body:
        return Cleaned(ended, "length")
    if ran_out and (ended := end_at_sentence(body)) != body:
        return Cleaned(ended, "token limit")
    return Cleaned(body, None)


def should_stop(text: str, end_after_words: int | None = None) -> bool:
    """True once decoding more of this row can only be cut away (`clean` with the same `end_after_words`)."""
    return clean(text, end_after_words=end_after_words).reason is not None


def flagged(text: str) -> bool:
    """Any bracket, prompt marker, field label or loop left anywhere in a final output, or no text at all."""
    if not text.strip():
        return True
    return bool(re.search(r"\[[^\]]{1,40}\]", text) or _MARKER.search(text) or _LINE_LABEL.search(text)
                or _repeated_sentence(text) is not None or _char_loop(text) is not None
                or re.search(r"(\b[a-z]\w*(?:\W+\w+){0,3}\b)(?:\W+\1\b){2,}", text, re.I))
