"""The page's figures, read from the evaluation that ships beside the adapter in use, never typed in.

`evaluate` writes results.json (one draw) and `pool` writes pooled.json (several draws of the same
users, averaged per user); the page prefers the pooled one. An adapter without an evaluation gets no
figures, only a pointer to the command that makes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import texts

EVALUATION_FILES = ("evaluation/pooled.json", "evaluation/results.json")


@dataclass(frozen=True)
class Measurements:
    """What the page says of an adapter's evaluation: the accordion's text and the voice panel's note."""
    summary: str
    voice_note: str

    @classmethod
    def of_adapter(cls, folder: str | Path | None) -> "Measurements":
        for name in EVALUATION_FILES:
            path = Path(folder or "") / name
            if folder and path.is_file():
                try:
                    return cls.from_summary(json.loads(path.read_text()))
                except (ValueError, KeyError, TypeError):
                    break  # a damaged or older file: say nothing rather than something wrong
        return cls(texts.NO_MEASUREMENTS, "")

    @classmethod
    def from_summary(cls, summary: dict) -> "Measurements":
        """The figures of an `evaluate` results.json or a `pool` pooled.json."""
        methods, voice = summary["methods"], summary["voice"]["methods"]

        def metric(method: str, name: str) -> float:
            return methods[method]["metrics"][name]["mean"]

        def top1(method: str) -> float:
            return voice[method]["top1"]["mean"]

        draws = summary.get("draws", 1)
        figures = dict(users=summary["users"], draws=f"{draws} draw{'s' if draws != 1 else ''}",
                       dep_rouge=metric("dep", "rouge1"), generic_rouge=metric("generic", "rouge1"),
                       dep_meteor=metric("dep", "meteor"), generic_meteor=metric("generic", "meteor"),
                       plain_rouge=metric("nonperso", "rouge1"), plain_meteor=metric("nonperso", "meteor"),
                       shuffled_gap=metric("dep", "rouge1") - metric("dep-shuffled", "rouge1"),
                       dep_top1=top1("dep"), generic_top1=top1("generic"),
                       real_top1=voice.get("real review", {}).get("top1", {}).get("mean", float("nan")),
                       drift_low=min(voice[m]["drifted"]["mean"] for m in ("dep", "generic")),
                       drift_high=max(voice[m]["drifted"]["mean"] for m in ("dep", "generic")))
        return cls(texts.MEASUREMENTS.format(**figures), texts.VOICE_NOTE.format(**figures))
