"""Content safety, the same for every method: a public page must not show slurs or obscenities that a
small model can write ("Meh, that one's just a slut." came out of the plain baseline).

The list is `better-profanity`'s word list (MIT, a plain text file of 916 entries, read as text: no
pickle, no model), less `ALLOWED`, words that are ordinary in product reviews. Two steps use it:

- `WordMask`, a logits processor, keeps decoding from drawing the token that would complete a listed
  word, given the row's text so far (any tokenization, any letter case), as the bracket rule keeps "[" out;
- `withhold`, after decoding, replaces a listed word that slipped through (a word the mask cannot see
  coming, such as one written inside a longer token) with `WITHHELD` and counts it, so a note can say so.

    >>> withhold("Meh, that one's just a SLUT. It works.")
    ("Meh, that one's just a ▇▇▇. It works.", 1)
    >>> withhold("A fat tone; turn the pot knob and it screams.")
    ('A fat tone; turn the pot knob and it screams.', 0)
"""
from __future__ import annotations

import functools
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LogitsProcessor

WITHHELD = "▇▇▇"  # no "[": hygiene cuts a text at the first bracket

# Entries of the list that are ordinary words in product reviews (gear, hardware, plain complaints).
# With the whole list, 7.8% of the bundled pool's 9,025 real reviews were flagged, mostly for "knob",
# "screw", "strip", "muff" (a fuzz pedal), "pot" (a potentiometer), "fat" (a tone) and mild complaints
# ("crap", "sucks", "hell"); without these, 0.5% (README, "Content safety").
ALLOWED = frozenset("""
    knob nob screw screwed screwing strip muff pot fat flange organ lube stroke fingering wedgie hump woody
    slope whiz maxi pawn puss kill drunk slave naked junky trashy niggle snatch lust lusting erect
    enlargement murder jerk jerked honky rump nappy panty dink fisted god omg stupid ugly
    crap suck sucked sucking hell damn
    len virgin thrust penetrate facial rum weed hemp
""".split())


def wordlist_path() -> Path:
    """better-profanity's word list, found without importing the package (its import builds a
    filter of its own, about 5 MB, that this module does not use)."""
    spec = importlib.util.find_spec("better_profanity")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the content filter needs the better-profanity package (pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "profanity_wordlist.txt"


@functools.cache
def listed_words() -> tuple[str, ...]:
    """The words withheld, lower case, each with its plural in -s (the list has few plurals)."""
    entries = {line.strip().lower() for line in wordlist_path().read_text(encoding="utf-8").splitlines()}
    words = {w for w in entries if len(w) > 1 and w not in ALLOWED}
    words |= {w + "s" for w in words if w[-1].isalpha() and w[-1] != "s" and w + "s" not in ALLOWED}
    return tuple(sorted(words, key=lambda w: (-len(w), w)))  # longest first: "bull shit" before "shit"


@functools.cache
def _pattern() -> re.Pattern:
    alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in listed_words())
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def find(text: str) -> list[str]:
    """The listed words in `text`, as written, in order."""
    return [match.group() for match in _pattern().finditer(text)]


def withhold(text: str) -> tuple[str, int]:
    """`text` with every listed word replaced by `WITHHELD`, and how many were replaced."""
    return _pattern().subn(WITHHELD, text)


def note(withheld: int, name: str | None = None) -> str:
    """What a result's notes say when words were withheld."""
    words = "a word was" if withheld == 1 else f"{withheld} words were"
    return f"{name + ': ' if name else ''}{words} withheld by the content filter (shown as {WITHHELD})"


class WordMask(LogitsProcessor):
    """Keeps each row from drawing a token that completes a listed word at a word start.

    Precomputed once per tokenizer, from every token's text in lower case: `after` maps each proper
    prefix of a listed word to the tokens that are the rest of it (any split, so any tokenization of
    the prefix is caught), `bare` holds the tokens that are a whole word (banned where the text so far
    ends at a word boundary), `always` the tokens that hold a whole word after a space or mark of their
    own (" slut"). A step costs, per row, one join of its last tokens' texts and a few dict look-ups.

    Only a banned token the model gives at least `MIN_P` is masked: masking moves the top-p nucleus and so the
    sampling noise of every later step, and the ~100 tokens banned everywhere (" ass", " Nazi") hold 1e-4 to
    6e-4 of the mass at a review's start, so masking them all changed every text of a run; a listed word drawn
    below `MIN_P` (most such tokens begin other words: " Ass" + "ign") is withheld after decoding."""

    MIN_P = 1e-3

    def __init__(self, tokenizer, words: tuple[str, ...] | None = None):
        words = words if words is not None else listed_words()
        self.strings = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]
        by_text: dict[str, list[int]] = defaultdict(list)
        for token, text in enumerate(self.strings):
            by_text[text.lower()].append(token)
        after: dict[str, set[int]] = defaultdict(set)
        bare: set[int] = set()
        for word in words:
            for cut in range(1, len(word)):
                after[word[:cut]].update(by_text.get(word[cut:], ()))
            bare.update(by_text.get(word, ()))
        self.after = {prefix: torch.tensor(sorted(ids)) for prefix, ids in after.items() if ids}
        self.bare = torch.tensor(sorted(bare), dtype=torch.long)
        ending = re.compile(rf"\W(?:{'|'.join(re.escape(w) for w in words)})$")
        self.always = torch.tensor([t for t, text in enumerate(self.strings) if ending.search(text.lower())],
                                   dtype=torch.long)
        self.longest = max(map(len, words), default=1)

    def banned(self, ids: list[int]) -> list[torch.Tensor]:
        """The tokens this row may not draw next, after its generated `ids`."""
        tail = "".join(self.strings[t] for t in ids[-(self.longest + 1):]).lower()
        out = [self.always]
        if not tail or not tail[-1].isalnum():
            out.append(self.bare)
        for size in range(1, min(len(tail), self.longest - 1) + 1):
            tokens = self.after.get(tail[-size:])
            if tokens is not None and (size == len(tail) or not tail[-size - 1].isalnum()):
                out.append(tokens)
        return out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.float().softmax(-1)
        for row, ids in enumerate(input_ids.tolist()):
            banned = torch.cat(self.banned(ids)).to(scores.device)
            scores[row, banned[probs[row, banned] >= self.MIN_P]] = -float("inf")
        return scores


@functools.cache
def word_mask(tokenizer) -> WordMask:
    """One per tokenizer: it reads the whole vocabulary (about a second)."""
    return WordMask(tokenizer)
