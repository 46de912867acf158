"""What the demo shows next to the generated reviews, as plain data and figures.

- `distinctive_terms`: the words and two-word phrases that set a user's reviews apart from their
  peers' reviews of the same items (log-odds ratio with an informative Dirichlet prior, Monroe,
  Colaresi & Quinn 2008), so the "difference" DEP encodes can be read, not only plotted.
- `sae_figure`: a heatmap of the sparse-autoencoder codes of the his and diff vectors.
- table builders for the selected past reviews and their peers, timing and metric summaries.
"""
from __future__ import annotations

import html
import statistics
from typing import Iterable, Sequence

import numpy as np

from dep_engine.prompt import shorten
from dep_engine.terms import _TOKEN, Term, distinctive_terms, term_counts, terms, tokens  # noqa: F401 (re-exported)


def highlight(text: str, marked: Iterable[str], label: str = "distinctive") -> list[tuple[str, str | None]]:
    """`text` cut into (span, label or None) pieces for gr.HighlightedText, marking words and phrases."""
    marked = set(marked)
    spans = [(m.start(), m.end(), m.group(0).lower().replace("\u2019", "'")) for m in _TOKEN.finditer(text.lower())]
    hit = [False] * len(spans)
    for i, (_, _, tok) in enumerate(spans):
        if tok in marked:
            hit[i] = True
        if i + 1 < len(spans) and f"{tok} {spans[i + 1][2]}" in marked:
            hit[i] = hit[i + 1] = True
    pieces: list[tuple[str, str | None]] = []
    cursor = 0
    for (start, end, _), on in zip(spans, hit):
        if not on:
            continue
        if start > cursor:
            pieces.append((text[cursor:start], None))
        pieces.append((text[start:end], label))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], None))
    return _merge(pieces)


def _merge(pieces: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Join marked pieces separated only by a space, so a phrase shows as one highlight."""
    out: list[tuple[str, str | None]] = []
    for text, label in pieces:
        if out and out[-1][1] == label:
            out[-1] = (out[-1][0] + text, label)
        elif (label is not None and len(out) >= 2 and out[-1][1] is None and out[-1][0].strip() == ""
              and out[-2][1] == label):
            gap = out.pop()[0]
            out[-1] = (out[-1][0] + gap + text, label)
        else:
            out.append((text, label))
    return out


def pieces_html(pieces: Sequence[tuple[str, str | None]]) -> str:
    """`highlight` pieces as HTML: marked spans in <mark>, everything escaped, paragraphs kept."""
    out = []
    for text, label in pieces:
        escaped = html.escape(text).replace("\n", "<br>")
        out.append(f"<mark class='dep-mark'>{escaped}</mark>" if label else escaped)
    return "".join(out)


def stars(rating: float) -> str:
    return f"★{rating:g}"


def typical_rating(ratings: Sequence[float]) -> float:
    return float(statistics.median_low(sorted(ratings))) if ratings else 0.0


# ---- figures -----------------------------------------------------------------------------------

LABEL_SIZE = 11  # points: about 15 px on the page, readable without zooming


def sae_figure(his_codes: np.ndarray, diff_codes: np.ndarray, labels: Sequence[str], untrained: bool = False):
    """Heatmaps of the sparse codes, one row per selected past review; None when there is none."""
    from matplotlib.figure import Figure

    if his_codes.size == 0:
        return None
    k, width = his_codes.shape
    fig = Figure(figsize=(10, 2.4 + 0.8 * k), dpi=110, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    vmax = float(max(his_codes.max(), diff_codes.max(), 1e-6))
    names = [("his codes: what each past review says", his_codes),
             ("diff codes: how it differs from the peers' reviews", diff_codes)]
    for ax, (title, codes) in zip(axes, names):
        image = ax.imshow(codes, aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=vmax)
        active = (codes > 0.05 * vmax).sum(axis=1).mean()
        ax.set_title(f"{title} (≈{active:.0f} of {width} features active)", fontsize=LABEL_SIZE, loc="left")
        ax.set_yticks(range(k), [shorten(label, 6)[:34] for label in labels], fontsize=LABEL_SIZE)
        ax.tick_params(axis="x", labelsize=LABEL_SIZE)
    axes[-1].set_xlabel("SAE feature", fontsize=LABEL_SIZE)
    bar = fig.colorbar(image, ax=list(axes), shrink=0.8)
    bar.set_label("activation", fontsize=LABEL_SIZE)
    bar.ax.tick_params(labelsize=LABEL_SIZE)
    if untrained:
        fig.suptitle("untrained adapter: these activations come from random weights", fontsize=9, color="#b45309")
    return fig


# ---- tables ------------------------------------------------------------------------------------

SELECTED_HEADERS = ["#", "past item", "★", "review title", "relevance", "peers", "review (start)"]
PEER_HEADERS = ["#", "past item", "peer", "★", "weight", "peer's review (start)"]


def selected_rows(context) -> list[list]:
    rows = []
    for n, s in enumerate(context.selected, 1):
        peers = f"{len(s.peers)}" + (" (nearest items)" if s.cold_start else "")
        rows.append([n, s.item_title, s.review.rating, s.review.title, round(float(s.relevance), 3), peers,
                     shorten(s.review.text, 24)])
    return rows


def peer_rows(context, per_review: int = 12) -> list[list]:
    rows = []
    for n, s in enumerate(context.selected, 1):
        ranked = sorted(s.peers, key=lambda p: -p.weight)
        for peer in ranked[:per_review]:
            rows.append([n, shorten(s.item_title, 8), peer.user_id, peer.rating, round(peer.weight, 3),
                         shorten(peer.text, 24)])
        if len(ranked) > per_review:
            rest = sum(p.weight for p in ranked[per_review:])
            rows.append([n, "", f"… {len(ranked) - per_review} more", None, round(rest, 3), ""])
    return rows


STAGE_NAMES = {"retrieval_and_differences": "history selection, peers, differences",
               "adapter": "adapter (SAE + projectors)", "prompt": "prompt building",
               "first_token": "first token after", "generation": "generation (both outputs in one batch)"}


def timings_markdown(timings: dict[str, float], outputs: int, startup: float | None = None) -> str:
    """Seconds per stage, and the decoding rate the engine measured (`tokens_per_second`, per output)."""
    lines = ["| stage | seconds |", "|---|---:|"]
    for stage, seconds in timings.items():
        if stage != "tokens_per_second":
            lines.append(f"| {STAGE_NAMES.get(stage, stage)} | {seconds:.2f} |")
    rate = timings.get("tokens_per_second", 0.0)
    if rate:
        lines.append(f"| **tokens per second** | **{rate:.1f}** per output, {rate * outputs:.1f} in all |")
    text = "\n".join(lines)
    if startup is not None:
        text += f"\n\nModels were loaded once at start-up in {startup:.0f} s."
    return text


def metrics_markdown(scores: dict[str, dict[str, float]], labels: dict[str, str], note: str = "") -> str:
    """A table of metric columns (ROUGE-1, METEOR, …) for each output; the best value in bold."""
    columns = [c for c in ("rouge1", "meteor", "rougeL", "bleu") if any(c in s for s in scores.values())]
    names = {"rouge1": "ROUGE-1", "meteor": "METEOR", "rougeL": "ROUGE-L", "bleu": "BLEU"}
    lines = ["| output | " + " | ".join(names[c] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    best = {c: max((s[c] for s in scores.values() if c in s), default=None) for c in columns}
    for key, s in scores.items():
        cells = []
        for c in columns:
            if c not in s:
                cells.append("n/a")
                continue
            value = f"{s[c]:.2f}" if c == "bleu" else f"{s[c]:.3f}"
            unique_best = sum(1 for other in scores.values() if other.get(c) == best[c]) == 1
            cells.append(f"**{value}**" if len(scores) > 1 and s[c] == best[c] and unique_best else value)
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{note}" if note else "")
