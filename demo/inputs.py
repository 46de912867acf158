"""Turning what a person typed, pasted, uploaded or chose into engine inputs, with clear errors."""
from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from pathlib import Path
from typing import Sequence

from dep_engine import DataError

MAX_UPLOAD_BYTES = 5_000_000          # what a pasted or uploaded history may weigh
MAX_HISTORY_CHARS = 5_000_000

TABLE_HEADERS = ["item_title", "rating", "review_title", "review_text"]

# "Which signals to use" -> the engine's mode for the personalized output.
SIGNALS = [("past review texts", "texts"), ("his: review embeddings", "his"),
           ("diff: difference embeddings", "diff")]
SIGNAL_MODES = {
    frozenset({"texts"}): "rag",
    frozenset({"his"}): "his",
    frozenset({"diff"}): "diff",
    frozenset({"his", "diff"}): "his+diff",
    frozenset({"texts", "his", "diff"}): "dep",
}
MODE_TITLES = {
    "generic": "Baseline: a generic reviewer (DEP with the population's average vectors)",
    "nonperso": "Baseline: the plain LLM, no personalization",
    "rag": "Personalized: past review texts only (RAG)",
    "his": "Personalized: his embeddings only",
    "diff": "Personalized: diff embeddings only",
    "his+diff": "Personalized: his + diff embeddings, no texts",
    "dep": "Personalized: DEP (texts + his + diff)",
}


def mode_name(mode: str) -> str:
    """A mode's title without its side ("Baseline: " / "Personalized: "), for tables and hints."""
    return MODE_TITLES[mode].split(": ", 1)[1]


# The left-hand output: the same DEP prompt without the person (the fair comparison), or the plain LLM.
BASELINES = {"generic": "a generic reviewer (same prompt, average vectors)",
             "nonperso": "the plain LLM (no history)"}


def mode_for(signals: Sequence[str] | None) -> str:
    """The engine mode of a set of signals; a clear error for the combinations it has no mode for."""
    chosen = frozenset(map(str, signals or ()))  # str: a JSON client may send numbers or lists
    unknown = chosen - {key for _, key in SIGNALS}
    if unknown:
        raise DataError(f"unknown signal(s) {', '.join(sorted(unknown))}; choose from texts, his, diff")
    if not chosen:
        raise DataError("signals: choose at least one signal for the personalized output "
                        "(texts, his or diff); with none it would just repeat the baseline")
    mode = SIGNAL_MODES.get(chosen)
    if mode is None:
        raise DataError(f"signals: {' + '.join(sorted(chosen))} has no mode in DEP. Choose texts alone (RAG), "
                        "embeddings without texts (his, diff or his + diff), or all three (DEP)")
    return mode


def mode_hint(signals: Sequence[str] | None) -> str:
    try:
        return f"→ runs **{mode_name(mode_for(signals))}**"
    except DataError as err:
        return f"⚠️ {err}"


def read_upload(path: str | Path | None) -> str:
    """The text of an uploaded history file (.jsonl, .json, .csv, .txt, optionally gzipped)."""
    if not path:
        raise DataError("upload: no file received")
    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"upload {name}: the file is empty")
    if size > MAX_UPLOAD_BYTES:
        raise DataError(f"upload {name}: {size / 1e6:.1f} MB is more than the limit of {MAX_UPLOAD_BYTES / 1e6:.0f} MB")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                raw = handle.read(MAX_HISTORY_CHARS + 1)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged compressed stream
            raise DataError(f"upload {name}: a broken gzip file ({err})") from None
        if len(raw) > MAX_HISTORY_CHARS:
            raise DataError(f"upload {name}: unpacked, it is more than {MAX_HISTORY_CHARS / 1e6:.0f} MB")
    if (encoding := _wide_encoding(raw)) is not None:
        raise DataError(f"upload {name}: this text's encoding is {encoding}, not UTF-8; save it as UTF-8 "
                        "(in most editors: Save as, Encoding) and upload it again")
    if b"\x00" in raw[:65536]:
        raise DataError(f"upload {name}: this is not a text file (it holds binary data); "
                        "upload JSONL, JSON or CSV")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"upload {name}: not UTF-8 text (byte {err.start} cannot be decoded); "
                        "upload JSONL, JSON or CSV saved as UTF-8") from None


def _wide_encoding(raw: bytes) -> str | None:
    """UTF-16 or UTF-32 text, by its byte-order mark or by the zero bytes of its ASCII characters."""
    if raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16"
    head = raw[:512]
    if len(head) >= 8 and max(head[0::2].count(0), head[1::2].count(0)) >= 0.4 * len(head):
        return "UTF-16"
    return None


def check_encoding(text: str) -> None:
    """Refuses text read with the wrong encoding: full of U+FFFD (bytes that were not UTF-8) or of zero
    characters (UTF-16 read as UTF-8), which would otherwise be refused for its CSV columns."""
    unreadable = text.count("\ufffd") + text.count("\x00")
    if unreadable >= 3 and unreadable >= 0.01 * len(text):
        raise DataError(f"history: {unreadable} characters could not be read (shown as \ufffd or zero): the text "
                        "was decoded with the wrong encoding (UTF-16 or another); paste or upload it as UTF-8")


def check_size(text: str) -> None:
    if len(text) > MAX_HISTORY_CHARS:
        raise DataError(f"history: {len(text) / 1e6:.1f} million characters is more than the limit of "
                        f"{MAX_HISTORY_CHARS / 1e6:.0f} million")


def _cell(value) -> str | float:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else value
    return value if isinstance(value, (int, float)) else str(value)


def table_to_text(rows) -> str:
    """An edited table (rows of item_title, rating, review_title, review_text) as JSON lines,
    one line per row so that an error's line number is the table's row number."""
    if rows is None:
        rows = []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    lines = []
    for row in rows:
        cells = [_cell(v) for v in list(row)[:4]] + [""] * (4 - len(list(row)[:4]))
        if all(str(c).strip() == "" for c in cells):
            lines.append("")
            continue
        lines.append(json.dumps(dict(zip(TABLE_HEADERS, cells)), ensure_ascii=False))
    if not any(lines):
        raise DataError("table: it is empty; fill at least one row (item title, rating, review text)")
    return "\n".join(lines)


def table_message(err: Exception) -> str:
    return re.sub(r"^history, line (\d+)", r"table, row \1", str(err))


def parse_rating_input(value) -> float:
    """A target rating from the form or the API, with the engine's wording for bad values."""
    from dep_engine.data import parse_rating

    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError("target rating: give the rating (1-5) the review should carry")
    return parse_rating(value, "target rating")
