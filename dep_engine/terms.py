"""Distinctive terms: the words and two-word phrases that set a user's reviews apart from their
peers' reviews of the same items (log-odds ratio with an informative Dirichlet prior, Monroe,
Colaresi & Quinn 2008). The demo shows them as evidence; evaluation counts how many of them a
generated review uses ("own words").
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down
during each even few for from further get got had hadn't has hasn't have haven't having he he'd he'll
he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is isn't it
it's its itself just let's me more most much mustn't my myself no nor not now of off on once one only
or other ought our ours ourselves out over own really same shan't she she'd she'll she's should
shouldn't so some such than that that's the their theirs them themselves then there there's these
they they'd they'll they're they've this those through to too under until up upon us very was wasn't
we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself
yourselves will just would could also get got ve ll re don doesn didn isn wasn im ive id s t
""".split())

_TOKEN = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)?")


def tokens(text: str) -> list[str]:
    return [t.replace("\u2019", "'") for t in _TOKEN.findall(text.lower())]


def _content(token: str) -> bool:
    return len(token) > 1 and token not in STOPWORDS and not token.isdigit()


def terms(text: str) -> list[str]:
    """Content words and two-word phrases of content words ("sound quality", "tone knob")."""
    toks = tokens(text)
    keep = [_content(t) for t in toks]
    out = [t for t, k in zip(toks, keep) if k]
    out += [f"{toks[i]} {toks[i + 1]}" for i in range(len(toks) - 1) if keep[i] and keep[i + 1]]
    return out


def term_counts(texts: Iterable[str]) -> Counter:
    """In how many of the texts each term occurs (document frequency): one long review repeating a
    word counts once, so the terms that come out describe habits, not one review's topic."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(set(terms(text)))
    return counts


@dataclass
class Term:
    term: str
    z: float            # > 0: the user uses it more than their peers; < 0: less
    user_count: int     # number of the user's reviews it occurs in
    peer_count: int     # number of the peers' reviews it occurs in


def distinctive_terms(user_texts: Sequence[str], peer_texts: Sequence[str], background: Counter | None = None,
                      top: int = 12, prior_strength: float = 200.0) -> tuple[list[Term], list[Term]]:
    """(terms the user uses more than their peers, terms the peers use more), strongest first.

    z-scores of the log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008) over
    document frequencies; the prior comes from the `background` counts (the whole pool) when
    given, else from the two sides together. A term must occur in two of the user's reviews (in
    one, when they gave a single review) to count as theirs, and in two of the peers' reviews."""
    user, peers = term_counts(user_texts), term_counts(peer_texts)
    vocab = set(user) | set(peers)
    if not vocab or not user:
        return [], []
    prior_source = background if background else user + peers
    prior_total = sum(prior_source.get(w, 0) for w in vocab) + 0.5 * len(vocab)
    n_user, n_peers = sum(user.values()), sum(peers.values())
    scored = []
    for word in vocab:
        alpha = prior_strength * (prior_source.get(word, 0) + 0.5) / prior_total
        y, p = user.get(word, 0), peers.get(word, 0)
        delta = (math.log((y + alpha) / (n_user + prior_strength - y - alpha))
                 - math.log((p + alpha) / (n_peers + prior_strength - p - alpha)))
        z = delta / math.sqrt(1.0 / (y + alpha) + 1.0 / (p + alpha))
        scored.append(Term(word, z, y, p))
    scored.sort(key=lambda t: (-t.z, t.term))
    least = 2 if len(user_texts) > 1 else 1
    mine = [t for t in scored if t.z > 0 and t.user_count >= least]
    theirs = [t for t in reversed(scored) if t.z < 0 and t.peer_count >= 2]
    return _drop_overlaps(mine)[:top], _drop_overlaps(theirs)[:top]


def _drop_overlaps(ranked: list[Term]) -> list[Term]:
    """A phrase and a word inside it usually say the same thing: keep the better-ranked one."""
    kept: list[Term] = []
    for term in ranked:
        words = set(term.term.split())
        if any(words & set(k.term.split()) and (" " in term.term) != (" " in k.term) for k in kept):
            continue
        kept.append(term)
    return kept
