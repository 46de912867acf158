"""Which users train the adapter and which ones only ever evaluate it.

Users are assigned by a hash of their id, so the assignment never depends on file order or on
which other users are present: 20% test users, 10% validation users, 70% training users.
Training users give every review that has history before it as a training target; validation
users give their second newest review (the chronological split's validation target), test users
their newest. Held-out targets, and anything a held-out user wrote after them, never enter a
training or validation sample's peers (`held_out_targets`).
"""
from __future__ import annotations

import hashlib
from typing import Iterable

from .data import Review, Sample, by_user, chronological_split


def user_group(user_id: str) -> str:
    bucket = int(hashlib.sha1(user_id.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def training_samples(reviews: Iterable[Review]) -> list[Sample]:
    return [s for s in chronological_split(reviews) if user_group(s.target.user_id) == "train"]


def validation_samples(reviews: Iterable[Review]) -> list[Sample]:
    """The validation target (second newest review) of each validation user."""
    return [s for s in chronological_split(reviews) if user_group(s.target.user_id) == "val" and s.split == "val"]


def test_samples(reviews: Iterable[Review]) -> list[Sample]:
    """The test target (newest review) of each test user: users the adapter never saw."""
    return [s for s in chronological_split(reviews) if user_group(s.target.user_id) == "test" and s.split == "test"]


def held_out_targets(reviews: Iterable[Review]) -> list[Review]:
    """Validation users' two newest reviews (their target and what follows it) and test users' newest."""
    held = []
    for user_id, history in by_user(reviews).items():
        group = user_group(user_id)
        if group != "train":
            held += history[-2:] if group == "val" else history[-1:]
    return held


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed random permutation with no fixed point: sample i borrows the embeddings of sample p[i].

    The shuffled-user control: same prompts, another user's his and diff vectors."""
    import random

    if n < 2:
        return list(range(n))
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    # a cycle through the shuffled order moves every element
    partner = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        partner[a] = b
    return partner
